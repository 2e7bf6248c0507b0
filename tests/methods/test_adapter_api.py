"""One adapter API for every method wrapper (MiT, MRT on the LLaVA-style model, MRT on a
transformers VLM), tested the same way for each: identity at init, only adapter tensors change
after a step, the exact saved key set, a save / from_pretrained round trip, disable_adapter,
unload, and the old names as warning aliases."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from tests.conftest import D_I, tiny_model
from tests.tiny_assets import tiny_llm_dir, tiny_vit_dir

from mmtune import LMMConfig, MiTConfig, MRTConfig, build_lmm, inject_mit, inject_mrt
from mmtune.methods.base import AdapterModel
from mmtune.methods.mit import MiTModel
from mmtune.methods.mrt import MRTForVLM, MRTModel


@dataclass
class Case:
    build: Callable[[], AdapterModel]  # a fresh base model, wrapped (same seed: same base)
    base: Callable[[], torch.nn.Module]  # a fresh base model alone
    run: Callable[[Any], torch.Tensor]  # logits of the wrapper (or of a base model)
    run_base: Callable[[Any], torch.Tensor]
    load: Callable[[Any], AdapterModel]  # from_pretrained(fresh base, dir)
    prefix: str


IDS = torch.tensor([[1, 5, 7, 9, 11, 13], [1, 4, 6, 8, 10, 12]])
I = torch.randn(2, D_I, generator=torch.Generator().manual_seed(0))


def _mit_case() -> Case:
    config = MiTConfig(d_modality=D_I, layers=[3, 4], form="gated")  # identity at init
    return Case(
        build=lambda: inject_mit(tiny_model("llama"), config),
        base=lambda: tiny_model("llama"),
        run=lambda m: m(input_ids=IDS, modality=I).logits,
        run_base=lambda b: b(input_ids=IDS).logits,
        load=lambda d: MiTModel.from_pretrained(tiny_model("llama"), d),
        prefix="infusion.",
    )


def _mrt_case(root) -> Case:
    llm, vit = tiny_llm_dir(root / "llm"), tiny_vit_dir(root / "vit")

    def base():
        torch.manual_seed(0)
        return build_lmm(LMMConfig(llm=str(llm), vision=str(vit), system_prompt=None))

    rng = np.random.default_rng(0)
    ims = [rng.random((8, 8)).astype(np.float32) for _ in range(2)]
    prompts = ["<image> which digit is shown ?", "is <image> even ?"]
    config = MRTConfig(vision_layers=[0, -1], llm_layers=[0, 2], first=2, last=2)

    def batch(b):
        return b.batch(prompts, [[im] for im in ims], answers=["7", "yes"])

    return Case(
        build=lambda: inject_mrt(base(), config),
        base=base,
        run=lambda m: m(batch(m.base_model)),
        run_base=lambda b: b(batch(b)),
        load=lambda d: MRTModel.from_pretrained(base(), d),
        prefix="edits.",
    )


def _vlm_case() -> Case:
    from tests.methods.test_mrt_vlm import CONFIG, _batch, _llava, _prompt

    inputs = _batch([_prompt([10, 11, 12]), _prompt([20, 21])])
    return Case(
        build=lambda: inject_mrt(_llava(), CONFIG),
        base=_llava,
        run=lambda m: m(**inputs).logits,
        run_base=lambda b: b(**inputs).logits,
        load=lambda d: MRTForVLM.from_pretrained(_llava(), d),
        prefix="edits.",
    )


@pytest.fixture(params=["mit", "mrt", "mrt-vlm"])
def case(request, tmp_path_factory) -> Case:
    if request.param == "mit":
        return _mit_case()
    if request.param == "mrt":
        return _mrt_case(tmp_path_factory.mktemp("lmm"))
    return _vlm_case()


def _perturb(model: AdapterModel) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _loss(case: Case, model: AdapterModel) -> torch.Tensor:
    return case.run(model).float().pow(2).mean()


def test_identity_at_init(case):
    model = case.build()
    assert isinstance(model, AdapterModel)
    with torch.no_grad():
        torch.testing.assert_close(case.run(model), case.run_base(case.base()), rtol=0, atol=1e-6)


def test_one_step_changes_only_adapter_tensors(case):
    model = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    _perturb(model)
    _loss(case, model).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(case.prefix) for k in changed)
    count = model.trainable_parameters()
    assert 0 < count.trainable < count.total
    assert model.get_nb_trainable_parameters() == (count.trainable, count.total)


def test_exact_saved_keys_and_round_trip(case, tmp_path):
    model = case.build()
    _perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = model.adapter_state_dict()
    assert saved and all(k.startswith(case.prefix) for k in saved)
    expected = {k for k in model.state_dict() if k.startswith(case.prefix)}
    assert set(saved) == expected
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter" / "adapter.safetensors")) == expected
    again = case.load(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(case.run(again), case.run(model), rtol=0, atol=0)


def test_disable_adapter_and_unload_give_the_base_model(case):
    model = case.build()
    _perturb(model)
    with torch.no_grad():
        base_logits = case.run_base(case.base())
        assert (case.run(model) - base_logits).abs().max() > 1e-4  # the adapter acts
        with model.disable_adapter():
            torch.testing.assert_close(case.run(model), base_logits, rtol=0, atol=1e-6)
        assert (case.run(model) - base_logits).abs().max() > 1e-4  # and acts again after
        assert model.get_base_model() is model.base_model
        base = model.unload()
        torch.testing.assert_close(case.run_base(base), base_logits, rtol=0, atol=1e-6)


def test_old_names_warn_and_still_work(tmp_path):
    mit = inject_mit(tiny_model("llama"), MiTConfig(d_modality=D_I, layers=[4]))
    with pytest.warns(DeprecationWarning, match="MiTModel.save_adapter is deprecated"):
        mit.save_adapter(tmp_path / "mit")
    assert (tmp_path / "mit" / "adapter.safetensors").is_file()
    case = _mrt_case(tmp_path)
    mrt = case.build()
    with pytest.warns(DeprecationWarning, match="MRTModel.parameter_count is deprecated"):
        assert mrt.parameter_count() == mrt.trainable_parameters()
    with pytest.warns(DeprecationWarning, match="MRTModel.adapter_tensors is deprecated"):
        assert mrt.adapter_tensors().keys() == mrt.adapter_state_dict().keys()
    with pytest.warns(DeprecationWarning, match="MRTModel.base is deprecated"):
        assert mrt.base is mrt.base_model
    with pytest.warns(DeprecationWarning, match="MRTModel.save_adapter is deprecated"):
        mrt.save_adapter(tmp_path / "mrt")
    with pytest.warns(DeprecationWarning, match="MRTModel.remove is deprecated"):
        assert mrt.remove() is mrt.base_model
