"""MRT on transformers' own LlavaForConditionalGeneration (a tiny random one, built here)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmtune import MRTConfig, inject_mrt
from mmtune.methods.mrt import MRTForVLM

IMAGE = 99  # the image placeholder id
N = 4  # image tokens per image: (28 / 14)^2 patches, CLS dropped ("default" strategy)


def _llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            image_size=28, patch_size=14,
        ),
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=100, pad_token_id=0,
        ),
        image_token_id=IMAGE, vision_feature_layer=-2, image_seq_length=N,
    )  # fmt: skip
    return LlavaForConditionalGeneration(cfg).eval()


def _prompt(text: list[int]) -> list[int]:
    return [1, 5, 6, *[IMAGE] * N, *text]  # a template token, the image, the question


torch.manual_seed(1)
PIXELS = torch.randn(2, 3, 28, 28)


def _batch(prompts: list[list[int]], images: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded like the processor does for generation; ``images``: rows of PIXELS."""
    t = max(map(len, prompts))
    ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    rows = images if images is not None else list(range(len(prompts)))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": PIXELS[rows]}


CONFIG = MRTConfig(vision_layers=[-1], llm_layers=[0, 2], first=2, last=2)


def _perturb(mrt: MRTForVLM) -> None:
    with torch.no_grad():
        for name in mrt.edit_names:
            mrt.edit(name).source.weight.add_(0.5 * torch.randn_like(mrt.edit(name).source.weight))
            mrt.edit(name).source.bias.add_(0.5)


def test_inject_mrt_finds_the_parts_through_the_table_and_is_the_identity_at_init():
    model = _llava()
    inputs = _batch([_prompt([10, 11, 12])])
    with torch.no_grad():
        before = model(**inputs).logits
        mrt = inject_mrt(model, CONFIG)
        assert isinstance(mrt, MRTForVLM)
        assert mrt.edit_names == ["vision.1", "projector", "llm.0", "llm.2"]  # -1: block 1 feeds
        assert all(not p.requires_grad for p in model.parameters() if id(p) not in
                   {id(q) for q in mrt.edits.parameters()})  # fmt: skip
        assert torch.equal(mrt(**inputs).logits, before)
        _perturb(mrt)
        assert (mrt(**inputs).logits - before).abs().max() > 1e-4  # each kind of edit acts
        mrt.scale = 0.0
        assert torch.equal(mrt(**inputs).logits, before)
        mrt.scale = 1.0
        assert torch.equal(mrt.unload()(**inputs).logits, before)


def test_every_edit_on_its_own_changes_the_output():
    """The feature layer's block (vision.-1) among them: transformers records the hidden
    state LLaVA reads with a hook of its own, so the edit runs before it (prepended)."""
    model = _llava()
    inputs = _batch([_prompt([10, 11, 12])])
    with torch.no_grad():
        before = model(**inputs).logits
        mrt = inject_mrt(model, CONFIG)
        for name in mrt.edit_names:
            mrt.edit(name).source.bias.add_(0.5)
            assert (mrt(**inputs).logits - before).abs().max() > 1e-4, name
            mrt.edit(name).source.bias.sub_(0.5)


def test_an_edit_the_features_never_read_is_refused():
    with pytest.raises(ValueError, match="outside the 2 blocks whose outputs reach"):
        inject_mrt(_llava(), MRTConfig(vision_layers=[2]))


def test_batched_generation_equals_one_by_one_with_left_padding():
    mrt = inject_mrt(_llava(), CONFIG)
    _perturb(mrt)
    prompts = [_prompt([10, 11, 12, 13, 14]), _prompt([20])]
    kw = {"max_new_tokens": 4, "do_sample": False, "output_logits": True,
          "return_dict_in_generate": True, "pad_token_id": 0}  # fmt: skip
    together = mrt.generate(**_batch(prompts), **kw)
    for i, p in enumerate(prompts):
        alone = mrt.generate(**_batch([p], [i]), **kw)
        inputs = _batch(prompts)
        torch.testing.assert_close(
            together.logits[0][i], alone.logits[0][0], atol=1e-4, rtol=1e-4
        )  # the prefill: every edit at this sample's own positions
        new = together.sequences[i, inputs["input_ids"].shape[1] :]
        assert new.tolist() == alone.sequences[0, len(p) :].tolist()


def test_mrt_trains_on_a_vlm_and_round_trips(tmp_path):
    config = MRTConfig(vision_layers=[-1], llm_layers=[0, 2], first=16, last=0)  # whole prompt
    mrt = inject_mrt(_llava(), config)
    inputs = _batch([_prompt([10, 11, 12]), _prompt([13, 14])])
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[labels == IMAGE] = -100
    opt = torch.optim.AdamW(mrt.edits.parameters(), lr=1e-1)
    losses = []
    for _ in range(30):
        loss = mrt(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a random tiny LM's logits are near-uniform (ln 100 = 4.6) and span little: about 4.0 is
    # the floor reachable through its final norm and head, whatever the edits do
    assert losses[-1] < losses[0] - 0.4
    assert {n for n, p in mrt.named_parameters() if p.requires_grad and p.grad is not None} <= {
        n for n, _ in mrt.edits.named_parameters(prefix="edits")
    }
    mrt.eval()
    mrt.save_pretrained(tmp_path / "adapter")
    again = MRTForVLM.from_pretrained(_llava(), tmp_path / "adapter")
    assert again.mrt_config == config
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, mrt(**inputs).logits)
    out = again.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_run(reentrant):
    """Activation checkpointing of the VLM's vision and language layers: the edits sit on
    layer outputs, outside each replayed forward, so loss and every edit's gradient equal the
    run without it."""
    inputs = _batch([_prompt([10, 11, 12]), _prompt([13, 14])])
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100

    def grads(checkpointing: bool):
        torch.manual_seed(3)
        mrt = inject_mrt(_llava(), CONFIG)
        _perturb(mrt)
        if checkpointing:
            kwargs = {"use_reentrant": reentrant}
            model = mrt.base_model
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        mrt.train()
        loss = mrt(**inputs, labels=labels).loss
        loss.backward()
        named = mrt.edits.named_parameters()
        return loss.item(), {n: p.grad.clone() for n, p in named if p.grad is not None}

    loss, plain = grads(False)
    c_loss, checkpointed = grads(True)
    assert c_loss == pytest.approx(loss, abs=1e-6)
    assert plain and checkpointed.keys() == plain.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5)
