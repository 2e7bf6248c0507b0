"""MRT on transformers' LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL (tiny random models built here):
the tests the ``llava`` entry has (tests/methods/test_mrt_vlm.py), for each new table row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from mmtune import MRTConfig, inject_mrt
from mmtune.methods.mrt import VLM_ARCHITECTURES, MRTForVLM

IMAGE, START, END = 99, 97, 96  # placeholder, vision start / end (Qwen)
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 100}  # fmt: skip
QWEN_TEXT = {**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [2, 3, 3]}}  # fmt: skip


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    tokens: int  # image tokens per image
    pixels: Callable[[list[int]], dict[str, torch.Tensor]]  # image rows -> model inputs
    start: list[int]  # tokens around the image placeholders
    end: list[int]


def _llava_next() -> torch.nn.Module:
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            image_size=28, patch_size=14,
        ),
        text_config=LlamaConfig(**TEXT, pad_token_id=0),
        image_token_id=IMAGE, vision_feature_layer=-2,
        image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]],
    )  # fmt: skip
    return LlavaNextForConditionalGeneration(cfg).eval()


def _qwen(config_cls: Any, model_cls: Any, vision: dict[str, Any]) -> torch.nn.Module:
    cfg = config_cls(
        vision_config={"depth": 2, "num_heads": 2, "patch_size": 2, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, **vision},
        text_config=QWEN_TEXT, image_token_id=IMAGE, video_token_id=98,
        vision_start_token_id=START, vision_end_token_id=END, pad_token_id=0,
    )  # fmt: skip
    return model_cls(cfg).eval()


torch.manual_seed(1)
NEXT_PIXELS = torch.randn(2, 3, 3, 28, 28)  # per image: the base view and two crops
QWEN_PIXELS = torch.randn(2, 16, 3 * 2 * 2 * 2)  # per image: 4 x 4 patches of 3 x 2 x 2 x 2

FAMILIES = [
    Family(
        "llava_next", _llava_next, 14,
        lambda rows: {"pixel_values": NEXT_PIXELS[rows],
                      "image_sizes": torch.tensor([[28, 56]] * len(rows))},
        [1, 5], [],
    ),
    Family(
        "qwen2_vl",
        lambda: _qwen(Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                      {"embed_dim": 16, "hidden_size": 32, "mlp_ratio": 2}),
        4,
        lambda rows: {"pixel_values": QWEN_PIXELS[rows].flatten(0, 1),
                      "image_grid_thw": torch.tensor([[1, 4, 4]] * len(rows))},
        [1, 5, START], [END],
    ),
    Family(
        "qwen2_5_vl",
        lambda: _qwen(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                      {"hidden_size": 16, "out_hidden_size": 32, "intermediate_size": 32,
                       "window_size": 8, "fullatt_block_indexes": [1]}),
        4,
        lambda rows: {"pixel_values": QWEN_PIXELS[rows].flatten(0, 1),
                      "image_grid_thw": torch.tensor([[1, 4, 4]] * len(rows))},
        [1, 5, START], [END],
    ),
]  # fmt: skip

CONFIG = MRTConfig(vision_layers=[-1], llm_layers=[0, 2], first=2, last=2)


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def family(request) -> Family:
    return request.param


def _model(family: Family, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return family.build()


def _prompt(family: Family, text: list[int]) -> list[int]:
    return [*family.start, *[IMAGE] * family.tokens, *family.end, *text]


def _batch(family: Family, prompts: list[list[int]], rows: list[int] | None = None):
    """Left-padded, as the processors pad for generation; ``rows``: each prompt's image."""
    t = max(map(len, prompts))
    ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    out = {"input_ids": ids, "attention_mask": mask}
    out.update(family.pixels(rows if rows is not None else list(range(len(prompts)))))
    if family.name.startswith("qwen"):
        out["mm_token_type_ids"] = (ids == IMAGE).int()  # what the processor returns
    return out


def _perturb(mrt: MRTForVLM) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in mrt.edit_names:
            w = mrt.edit(name).source.weight
            w.add_(0.5 * torch.randn(w.shape, generator=g))
            mrt.edit(name).source.bias.add_(0.5)


def test_the_table_has_the_families():
    assert {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"} <= set(VLM_ARCHITECTURES)


def test_identity_at_init_each_edit_acts_scale_zero_and_unload(family):
    model = _model(family)
    inputs = _batch(family, [_prompt(family, [10, 11, 12])])
    with torch.no_grad():
        before = model(**inputs).logits
        mrt = inject_mrt(model, CONFIG)
        assert isinstance(mrt, MRTForVLM)
        # -1: the block whose output the model reads (LLaVA-NeXT: feature layer -2 of 3
        # blocks; Qwen: the last of 2)
        assert mrt.edit_names == ["vision.1", "projector", "llm.0", "llm.2"]
        trained = {id(q) for q in mrt.edits.parameters()}
        assert all(not p.requires_grad for p in model.parameters() if id(p) not in trained)
        assert torch.equal(mrt(**inputs).logits, before)
        for name in mrt.edit_names:  # every edit on its own changes the output
            w = mrt.edit(name).source.bias
            w.add_(0.5)
            assert (mrt(**inputs).logits - before).abs().max() > 1e-5, name
            w.sub_(0.5)
        _perturb(mrt)
        mrt.scale = 0.0
        assert torch.equal(mrt(**inputs).logits, before)
        mrt.scale = 1.0
        assert torch.equal(mrt.unload()(**inputs).logits, before)


def test_batched_generation_equals_one_by_one_with_left_padding(family):
    mrt = inject_mrt(_model(family), CONFIG)
    _perturb(mrt)
    prompts = [_prompt(family, [10, 11, 12, 13, 14]), _prompt(family, [20])]
    kw = {"max_new_tokens": 4, "do_sample": False, "output_logits": True,
          "return_dict_in_generate": True, "pad_token_id": 0}  # fmt: skip
    inputs = _batch(family, prompts)
    together = mrt.generate(**inputs, **kw)
    for i, p in enumerate(prompts):
        alone = mrt.generate(**_batch(family, [p], [i]), **kw)
        torch.testing.assert_close(together.logits[0][i], alone.logits[0][0], atol=1e-4, rtol=1e-4)
        new = together.sequences[i, inputs["input_ids"].shape[1] :]
        assert new.tolist() == alone.sequences[0, len(p) :].tolist()


def test_training_lowers_the_loss_and_the_adapter_round_trips(family, tmp_path):
    config = MRTConfig(vision_layers=[-1], llm_layers=[0, 2], first=32, last=0)  # whole prompt
    mrt = inject_mrt(_model(family), config)
    inputs = _batch(family, [_prompt(family, [10, 11, 12]), _prompt(family, [13, 14])])
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
    assert losses[-1] < losses[0] - 0.4  # ln 100 = 4.6 at the start (see test_mrt_vlm.py)
    trained = {n for n, p in mrt.named_parameters() if p.requires_grad and p.grad is not None}
    assert trained <= {n for n, _ in mrt.edits.named_parameters(prefix="edits")}
    mrt.eval()
    mrt.save_pretrained(tmp_path / "adapter")
    again = MRTForVLM.from_pretrained(_model(family), tmp_path / "adapter")
    assert again.mrt_config == config
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, mrt(**inputs).logits)


def test_gradient_checkpointing_gives_the_gradients_of_the_plain_run(family):
    inputs = _batch(family, [_prompt(family, [10, 11, 12]), _prompt(family, [13, 14])])
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100

    def grads(checkpointing: bool):
        mrt = inject_mrt(_model(family), CONFIG)
        _perturb(mrt)
        if checkpointing:
            from mmtune.models.llm import enable_activation_checkpointing

            enable_activation_checkpointing(mrt.base_model)
        mrt.train()
        loss = mrt(**inputs, labels=labels).loss
        loss.backward()
        named = mrt.edits.named_parameters()
        return loss.item(), {n: p.grad.clone() for n, p in named if p.grad is not None}

    loss, plain = grads(False)
    c_loss, checkpointed = grads(True)
    assert c_loss == pytest.approx(loss, abs=1e-6) and plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5)
