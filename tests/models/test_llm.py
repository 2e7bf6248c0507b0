"""LLM loading: the real embedded SmolLM2-135M, local directories, bad paths."""

from __future__ import annotations

import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_model
from mmtune import MiTConfig, inject_mit
from mmtune.models.llm import load_llm, smollm2_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    model, tokenizer = load_llm("smollm2-135m")
    return model, tokenizer, time.perf_counter() - start


def _greedy(generate, tokenizer, **extra):
    enc = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = generate(**enc, max_new_tokens=12, do_sample=False, **extra)
    return out[0, enc["input_ids"].shape[1] :], tokenizer


@pytest.mark.slow
def test_real_smollm2_answers_paris(smollm2):
    model, tokenizer, _ = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (9, 3, 1536)
    assert model.config._name_or_path == "smollm2-135m"
    tokens, _ = _greedy(model.generate, tokenizer)
    assert "Paris" in tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.slow
def test_mit_at_init_leaves_the_greedy_reply_identical(smollm2):
    model, tokenizer, _ = smollm2
    plain, _ = _greedy(model.generate, tokenizer)
    mit = inject_mit(model, MiTConfig(d_modality=1280, layers="paper", form="gated"))
    try:
        assert mit.layer_ids == [11, 15, 19, 23, 27, 30]
        image_vector = torch.randn(1, 1280)
        infused, _ = _greedy(mit.generate, tokenizer, modality=image_vector)
        assert torch.equal(infused, plain)
    finally:
        mit.unload()


@pytest.mark.slow
def test_second_load_comes_from_the_verified_cache(smollm2):
    path, hit = smollm2_path()
    assert hit and (path / "model.safetensors").is_file() and (path / "manifest.json").is_file()
    start = time.perf_counter()
    load_llm("smollm2-135m")
    assert time.perf_counter() - start < smollm2[2] + 5  # no second conversion


def _word_tokenizer(path):
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c", "d"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip
    fast.save_pretrained(path)


def test_load_by_local_directory(tmp_path):
    original = tiny_model("llama")
    original.save_pretrained(tmp_path)
    _word_tokenizer(tmp_path)
    model, tokenizer = load_llm(str(tmp_path), attn_implementation="eager")
    ids = tokenizer("a b c d", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[4, 5, 6, 7]]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_bad_model_sources_name_the_problem(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        load_llm(str(tmp_path))
    with pytest.raises(ValueError, match="could not load a causal LM from '/no/such/model'"):
        load_llm("/no/such/model")


def test_a_loaded_model_is_not_kernelized_with_hub_kernels(tmp_path, monkeypatch):
    """transformers >= 5.25 turns Hub kernels on by default in from_pretrained: load_llm
    turns them off (a fused kernel could skip a hooked submodule; the Hub is never reached)."""
    import transformers
    from tests.tiny_assets import tiny_llm_dir

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_kernels"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_llm(str(tiny_llm_dir(tmp_path / "llm")))
    assert seen == [False] and not getattr(model, "use_kernels", False)
