"""Baselines: token concatenation (projector), LoRA and IA3 through PEFT, and the text method."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from mmtune.methods.concat import (
    ConcatConfig,
    PeftAdapterConfig,
    TokenProjector,
    image_tokens,
    inject_peft,
)
from mmtune.tasks.model import TaskConfig, TaskModel


def test_image_tokens_are_row_major_cells_and_pool_to_a_grid():
    fmap = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)  # (B, C, h, w)
    tokens = image_tokens(fmap)
    assert tokens.shape == (2, 8, 3)
    assert torch.equal(tokens[1, 5], fmap[1, :, 1, 1])  # cell (row 1, col 1) is token 1 * 4 + 1
    pooled = image_tokens(fmap, grid=1)
    assert torch.allclose(pooled[:, 0], fmap.mean((2, 3)))
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        image_tokens(fmap[0])


def test_projector_concatenates_sources_in_order_and_checks_widths():
    proj = TokenProjector({"audio": 5, "vision": 7}, d_model=16)
    a, v = torch.randn(2, 3, 5), torch.randn(2, 4, 7)
    ma, mv = torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.ones(2, 4, dtype=torch.long)
    tokens, mask = proj({"audio": (a, ma), "vision": (v, mv)})
    assert tokens.shape == (2, 7, 16) and mask.tolist()[0] == [1, 1, 0, 1, 1, 1, 1]
    assert torch.allclose(tokens[:, :3], proj.proj["audio"](a))
    with pytest.raises(ValueError, match=r"vision features must be \(B, N, 7\)"):
        proj({"audio": (a, ma), "vision": (torch.randn(2, 4, 6), mv)})
    with pytest.raises(ValueError, match="no features for"):
        proj({"audio": (a, ma)})
    with pytest.raises(ValueError, match="projector"):
        ConcatConfig(projector="qformer")


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_peft_adapters_start_as_the_identity_and_only_they_train(kind):
    base = tiny_model("llama")
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        ref = base(input_ids=ids).logits.clone()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = inject_peft(base, kind, PeftAdapterConfig())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f"{kind}_" in n for n in trainable)
    if kind == "lora":  # PEFT's LLaMA default targets
        assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # LoRA's B starts at 0: A moves from the second step on
        opt.zero_grad()
        model(input_ids=ids).logits.pow(2).mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        if name in trainable:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(p, before[original]), name
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(not torch.equal(p, torch.zeros_like(p)) for p in lora_b)


def test_peft_with_targets_that_do_not_exist_names_the_field():
    with pytest.raises(ValueError, match="target_modules"):
        inject_peft(tiny_model("llama"), "lora", PeftAdapterConfig(target_modules=["nope"]))


class _WordTokenizer:
    """Enough of a tokenizer for TaskModel: word -> id, left padding."""

    pad_token, eos_token = "<pad>", "<pad>"
    padding_side = truncation_side = "left"
    is_fast = False

    def __call__(
        self, texts, return_tensors=None, padding=False, truncation=False, max_length=None
    ):
        rows = [[3 + (sum(map(ord, w)) % 90) for w in t.split()][:max_length] for t in texts]
        if return_tensors is None:  # lengths only (TaskModel.fit_prompts)
            return {"input_ids": rows}
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}


def _task_model(task: str, method: str, **kw) -> TaskModel:
    torch.manual_seed(0)
    llm = tiny_model("llama", attn="sdpa").requires_grad_(False)
    return TaskModel(
        task,
        llm,
        _WordTokenizer(),
        TaskConfig(**kw),
        method=method,
        **{
            "classification": {"d_image": 6, "level_channels": (2, 3, 6), "num_classes": 3},
            "sentiment": {"frame_widths": {"audio": 5, "vision": 4}},
        }[task],
    ).eval()


def test_concatenated_image_tokens_batched_equals_one_by_one():
    model = _task_model("classification", "concat")
    batch = {
        "id": ["a", "b", "c"],
        "text": ["a dog", "two cats on a long red sofa", "one"],
        "pooled": torch.randn(3, 6),
        "level2": torch.randn(3, 6, 2, 2),  # 4 image tokens each
    }
    with torch.no_grad():
        together = model.text_vector(batch, None)
        for i in range(3):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            assert torch.allclose(model.text_vector(one, None)[0], together[i], atol=1e-5)
        # the image tokens matter
        other = {**batch, "level2": torch.randn(3, 6, 2, 2)}
        assert not torch.allclose(model.text_vector(other, None), together)


def test_concatenated_frames_ignore_padding_frames():
    model = _task_model("sentiment", "concat", modalities=["audio", "vision"])
    batch = {
        "id": ["a", "b"],
        "text": ["great film", "dull and slow"],
        "audio": torch.randn(2, 6, 5),
        "audio_length": torch.tensor([3, 6]),
        "vision": torch.randn(2, 5, 4),
        "vision_length": torch.tensor([5, 2]),
    }
    noisy = {**batch, "audio": batch["audio"].clone(), "vision": batch["vision"].clone()}
    noisy["audio"][0, 3:] = 1e3  # beyond sample 0's audio length
    noisy["vision"][1, 2:] = -1e3  # beyond sample 1's vision length
    with torch.no_grad():
        assert torch.allclose(model(batch)["prediction"], model(noisy)["prediction"], atol=1e-5)
        noisy["audio"][0, 2] += 1.0  # a real frame: the prediction moves
        assert not torch.allclose(model(batch)["prediction"], model(noisy)["prediction"])


def test_text_method_sees_neither_vector_nor_image():
    model = _task_model("classification", "text")
    assert model.head.d_image == 0 and model.projector is None
    batch = {"id": ["a"], "text": ["a dog"], "pooled": torch.randn(1, 6)}
    with torch.no_grad():
        a = model(batch)["logits"]
        b = model({**batch, "pooled": torch.randn(1, 6)})["logits"]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown method"):
        _task_model("classification", "prefix")
