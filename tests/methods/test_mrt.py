"""MRT on tiny random LLaVA-style models built in-process (tiny LLaMA + tiny ViT / MobileNetV2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.tiny_assets import tiny_llm_dir, tiny_vit_dir

from mmtune import LMMConfig, LoReFTEdit, MRTConfig, MRTControl, MRTModel, inject_mrt, load_mrt
from mmtune.encoders.images import ImagePreprocess
from mmtune.encoders.mobilenet import MobileNetV2Encoder
from mmtune.methods.mrt import mrt_trainable
from mmtune.methods.mrt.params import mrt_share
from mmtune.models.lmm import LlavaStyleModel, VisualTokens, build_lmm, load_lmm
from mmtune.models.shapes import VISION_SHAPES
from mmtune.recipes.instruct import fit

PROMPTS = [
    "<image> which digit is shown ?",
    "the image <image> shows a digit . is it even or odd ?",
    "compare <image> and <image> : which is greater ?",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmm")
    return tiny_llm_dir(root / "llm"), tiny_vit_dir(root / "vit")


def tiny_lmm(dirs, seed: int = 0) -> LlavaStyleModel:
    torch.manual_seed(seed)
    llm, vit = dirs
    return build_lmm(LMMConfig(llm=str(llm), vision=str(vit), system_prompt=None))


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((8, 8)).astype(np.float32) for _ in range(n)]


def batch_of(model: LlavaStyleModel, answers: bool = False):
    ims = images(4)
    per_sample = [[ims[0]], [ims[1]], [ims[2], ims[3]]]
    return model.batch(PROMPTS, per_sample, answers=["7", "odd", "the first"] if answers else None)


def perturb(mrt: MRTModel, std: float = 0.5, seed: int = 1) -> MRTModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mrt.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return mrt


# ----------------------------------------------------------------------------- the edit


def test_loreft_edit_matches_the_formula_and_r_is_orthonormal():
    torch.manual_seed(0)
    edit = LoReFTEdit(24, 4, init="loreft")
    r = edit.rotate.weight
    assert torch.allclose(r @ r.T, torch.eye(4), atol=1e-5)
    h = torch.randn(3, 5, 24)
    w, b = edit.source.weight, edit.source.bias
    reference = h + (h @ w.T + b - h @ r.T) @ r  # h + R^T (W h + b - R h), by hand
    assert torch.allclose(edit(h), reference, atol=1e-5)
    assert torch.allclose(edit(h, 0.5), h + 0.5 * (reference - h), atol=1e-5)


def test_identity_init_is_exact_and_r_stays_orthonormal_under_adamw():
    torch.manual_seed(0)
    edit = LoReFTEdit(24, 4)
    h = torch.randn(6, 24)
    assert torch.equal(edit(h), h)
    opt = torch.optim.AdamW(edit.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        ((edit(h) - 1.0) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    r = edit.rotate.weight
    assert torch.allclose(r @ r.T, torch.eye(4), atol=1e-5)
    assert not torch.equal(edit(h), h)
    with pytest.raises(ValueError, match="rank 30 exceeds"):
        LoReFTEdit(24, 30)


# ----------------------------------------------------------------------------- the model


def test_mrt_is_identity_at_init_and_zero_scale_gives_base_logits_exactly(dirs):
    model = tiny_lmm(dirs)
    b = batch_of(model)
    with torch.no_grad():
        base = model(b)
        mrt = inject_mrt(
            model, MRTConfig(vision_layers=[-1, 0], llm_layers=[0, 2], first=2, last=2)
        )
        assert torch.equal(mrt(b), base)  # W = R, b = 0: exactly the identity
        perturb(mrt)
        edited = mrt(b)
        assert (edited - base).abs().max() > 1e-3
        mrt.set_control(MRTControl(scale=0.0))
        assert torch.equal(mrt(b), base)
        mrt.set_control(MRTControl(edit_scales={k: 0.0 for k in mrt.edit_names}))
        assert torch.equal(mrt(b), base)
        mrt.set_control(MRTControl(scale=1.0))
        assert torch.equal(mrt(b), edited)
        mrt.set_control(MRTControl(scale=2.0))
        assert (mrt(b) - edited).abs().max() > 1e-3


def test_one_step_changes_only_edit_parameters(dirs):
    model = tiny_lmm(dirs)
    mrt = inject_mrt(model)
    before = {k: v.clone() for k, v in mrt.state_dict().items()}
    trainable = {n for n, p in mrt.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("edits.") for n in trainable)
    items = [
        {"q": "<image> which digit ?", "a": str(i), "image": im} for i, im in enumerate(images(4))
    ]
    pixels = [model.tower.preprocess([it["image"]]) for it in items]
    fit(mrt, items, pixels, prompt=lambda it: it["q"], target="a", epochs=1, batch_size=4,
        lr=1e-2, seed=0)  # fmt: skip
    after = mrt.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("edits.") for k in changed)
    assert any("source.weight" in k for k in changed)


def test_every_edit_gets_a_gradient(dirs):
    # an edit whose output the model never reads (a ViT block after the feature layer, or the
    # feature layer's own output recorded before the edit) would get none and never train
    mrt = perturb(inject_mrt(tiny_lmm(dirs), MRTConfig(vision_layers=[0, -1], llm_layers=[0, 2])))
    mrt.loss(batch_of(mrt.base_model, answers=True)).backward()
    dead = [n for n, p in mrt.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead and mrt.edit_names[:2] == ["vision.0", "vision.1"]


def test_llm_positions_come_from_each_samples_real_prompt_span(dirs):
    model = tiny_lmm(dirs)
    mrt = inject_mrt(model, MRTConfig(first=2, last=3))
    b = batch_of(model, answers=True)
    pos = mrt.prompt_positions(b)
    for i in range(3):
        start, end = int(b.prompt_start[i]), int(b.prompt_end[i])
        expected = {start, start + 1, end - 3, end - 2, end - 1}
        assert set(torch.nonzero(pos[i]).flatten().tolist()) == expected
    mrt.set_control(MRTControl(positions=[0, -1]))
    pos = mrt.prompt_positions(b)
    assert pos.sum(1).tolist() == [2, 2, 2]
    mrt.set_control(MRTControl(positions=[500]))
    with pytest.raises(ValueError, match=r"MRTControl.positions"):
        mrt.prompt_positions(b)
    with pytest.raises(ValueError, match=r"MRTControl.edit_scales"):
        mrt.set_control(MRTControl(edit_scales={"llm.99": 0.0}))


def test_batched_generation_equals_one_by_one(dirs):
    model = tiny_lmm(dirs)
    mrt = perturb(inject_mrt(model, MRTConfig(llm_layers=[0, 1, 3], first=1, last=4)), std=0.3)
    mrt.eval()
    ims = images(4)
    per_sample = [[ims[0]], [ims[1]], [ims[2], ims[3]]]
    tokens, logits = mrt.generate(model.batch(PROMPTS, per_sample), max_new_tokens=5)
    for i in range(3):
        one_tokens, one_logits = mrt.generate(
            model.batch([PROMPTS[i]], [per_sample[i]]), max_new_tokens=5
        )
        assert one_tokens[0] == tokens[i]
        assert torch.allclose(one_logits[0], logits[i], atol=1e-5)
    # the forward pass too: each sample's logits over its own span
    full = mrt(model.batch(PROMPTS, per_sample))
    for i in range(3):
        one = mrt(model.batch([PROMPTS[i]], [per_sample[i]]))
        assert torch.allclose(full[i, -one.shape[1] :], one[0], atol=1e-5)


def test_save_load_round_trip_from_the_adapter_alone(dirs, tmp_path: Path):
    model = tiny_lmm(dirs)
    model.save_projector(tmp_path / "stage1")
    mrt = perturb(inject_mrt(model, MRTConfig(vision_layers=[1], llm_layers=[1, 3])))
    mrt.eval()
    b = batch_of(model)
    with torch.no_grad():
        expected = mrt(b)
    mrt.save_pretrained(tmp_path / "mrt", base_dir=tmp_path / "stage1")
    files = sorted(p.name for p in (tmp_path / "mrt").iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json"]
    meta = json.loads((tmp_path / "mrt" / "adapter_config.json").read_text())
    assert meta["method"] == "mrt" and meta["config"]["mrt"]["llm_layers"] == [1, 3]
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "mrt" / "adapter.safetensors")))
    assert keys == {k for k in mrt.state_dict() if k.startswith("edits.")}
    loaded = load_mrt(tmp_path / "mrt")  # base rebuilt from the recorded stage-1 directory
    with torch.no_grad():
        assert torch.equal(
            loaded(loaded.base_model.batch(PROMPTS, [[im] for im in images(2)] + [images(4)[2:]])),
            expected,
        )
    other = tiny_lmm(dirs, seed=5)  # a different (random) projector
    with pytest.raises(ValueError, match="projector with hash"):
        load_mrt(tmp_path / "mrt", base=other)
    import mmtune.models.lmm as lmm_module

    reads = []
    real_read = lmm_module.read_adapter

    def counting_read(directory, *, method):
        reads.append(method)
        return real_read(directory, method=method)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lmm_module, "read_adapter", counting_read)
        rebuilt = load_lmm(tmp_path / "stage1")
    assert isinstance(rebuilt, LlavaStyleModel)
    assert reads == ["lmm-projector"]  # the stage-1 weights are read and hashed once
    for k, v in rebuilt.projector.state_dict().items():
        assert torch.equal(v, loaded.base_model.projector.state_dict()[k])


def test_cnn_tower_edits_sit_on_the_token_grid(dirs):
    llm_dir, _ = dirs
    from mmtune import load_llm

    llm, tok = load_llm(str(llm_dir))
    encoder = MobileNetV2Encoder(ImagePreprocess(size=64, resize=None), pretrained=False).eval()
    tower = VisualTokens(encoder)
    assert tower.num_tokens == 4 and tower.width == 1280  # a 2 x 2 grid at 64 px
    model = LlavaStyleModel(llm, tok, tower, LMMConfig(system_prompt=None))
    b = model.batch(["<image> which digit ?"], [images(1)])
    with torch.no_grad():
        base = model(b)
        mrt = perturb(inject_mrt(model, MRTConfig(vision_layers=[14, 17, 18])))
        assert (mrt(b) - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="block 13 has 16 positions"):
        inject_mrt(tiny_lmm_cnn(llm_dir), MRTConfig(vision_layers=[13]))


def tiny_lmm_cnn(llm_dir: Path) -> LlavaStyleModel:
    from mmtune import load_llm

    llm, tok = load_llm(str(llm_dir))
    encoder = MobileNetV2Encoder(ImagePreprocess(size=64, resize=None), pretrained=False).eval()
    return LlavaStyleModel(llm, tok, VisualTokens(encoder), LMMConfig(system_prompt=None))


def test_visual_token_control_limits_the_vision_edits(dirs):
    model = tiny_lmm(dirs)
    b = model.batch(["<image> which digit ?"], [images(1)])
    with torch.no_grad():
        mrt = perturb(inject_mrt(model, MRTConfig(llm_layers=[], projector_edit=True)))
        mrt.set_control(MRTControl(visual_tokens=[]))
        base_like = mrt(b)
        mrt.set_control(
            MRTControl(edit_scales={"projector": 0.0, **{k: 0.0 for k in mrt.edit_names}})
        )
        assert torch.equal(base_like, mrt(b))  # no visual token selected = no vision edit
        mrt.set_control(MRTControl(visual_tokens=[0]))
        assert (mrt(b) - base_like).abs().max() > 1e-4
        mrt.set_control(MRTControl(visual_tokens=[99]))
        with pytest.raises(ValueError, match=r"MRTControl.visual_tokens"):
            mrt(b)


def test_tunable_share_counts(dirs):
    model = tiny_lmm(dirs)
    config = MRTConfig(vision_layers=[0, -1], llm_layers=[0, 3])
    mrt = inject_mrt(model, config)
    counted = mrt_trainable(
        config,
        d_model=32,
        num_llm_layers=4,
        vision_widths=model.tower.block_widths,
    )
    assert counted["total"] == mrt.trainable_parameters().trainable
    shapes = VISION_SHAPES
    small = mrt_share("smollm2-135m", "mobilenet-v2", MRTConfig(), shapes)
    assert small["share_of_all"] <= 0.001  # the bound at SmolLM2 scale
    big = mrt_share("llama-2-7b", "clip-vit-l-14-336", MRTConfig(), shapes)
    assert big["params"]["vision"] == 303_507_456  # CLIP ViT-L/14-336's vision tower
    assert big["share_of_all"] < small["share_of_all"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_of_the_llm_gives_the_gradients_of_the_plain_run(dirs, reentrant):
    """Activation checkpointing of the LLaVA-style model's LLM: MRT's edits act on layer
    outputs, outside each replayed layer, so loss and every edit's gradient are unchanged."""
    from mmtune.models.llm import enable_activation_checkpointing

    def grads(checkpointing: bool):
        mrt = perturb(inject_mrt(tiny_lmm(dirs), MRTConfig(vision_layers=[-1], llm_layers=[0, 2])))
        llm = mrt.base_model.llm
        if checkpointing and reentrant:
            enable = getattr(llm, "activation_checkpointing_enable", None)  # transformers 5.2x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": True})
            else:
                llm.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": True}
                )
        elif checkpointing:
            enable_activation_checkpointing(mrt.base_model.llm)
        mrt.train()
        loss = mrt.loss(batch_of(mrt.base_model, answers=True))
        loss.backward()
        return loss.item(), {
            n: p.grad.clone() for n, p in mrt.named_parameters() if p.grad is not None
        }

    loss, plain = grads(False)
    c_loss, checkpointed = grads(True)
    assert c_loss == pytest.approx(loss, abs=1e-6) and checkpointed.keys() == plain.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5)
