"""How ``lmm tune`` tunes a LLaVA-style model, one registered entry per method.

Each :class:`LMMTuning` says what a method trains on a stage-1 model (``prepare``), how its
adapter is written and read back (``save`` / ``load``, keyed by the method the adapter records),
its default learning rate and the card's loading snippet; the recipe
(:mod:`mmtune.recipes.instruct`) asks :func:`get_lmm_tuning` instead of branching on names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmtune.methods.concat import (
    PeftAdapterConfig,
    inject_peft,
    load_peft_format,
    save_peft_format,
)
from mmtune.methods.mrt import MRTConfig, MRTModel, load_mrt
from mmtune.models.lmm import LlavaStyleModel, load_lmm
from mmtune.utils.io import read_json, write_json

__all__ = [
    "LMM_RUN_FILE",
    "LMMTuning",
    "get_lmm_tuning",
    "lmm_tunings",
    "load_lmm_adapter",
    "register_lmm_tuning",
]

LMM_RUN_FILE = "mmtune_lmm.json"
"""Beside a LoRA adapter in PEFT's format: the method, the stage-1 base and the LoRA options."""


@dataclass(frozen=True)
class LMMTuning:
    """One way ``lmm tune`` tunes a stage-1 LLaVA-style model."""

    name: str
    """``--method`` of ``lmm tune``."""
    default_lr: float
    """AdamW learning rate when ``--lr`` is not given."""
    prepare: Callable[[LlavaStyleModel, MRTConfig, PeftAdapterConfig], nn.Module]
    """The model to train (or to score, for a method that trains nothing)."""
    trains: bool = True
    """False: nothing is trained or saved (the zero-shot baseline)."""
    save: Callable[[nn.Module, Path, Path, str, PeftAdapterConfig], None] | None = None
    """``save(model, out, base_dir, llm_hub_id, peft)``: write the adapter to ``out``."""
    adapter_method: str | None = None
    """The ``method`` its adapter records (``adapter_config.json`` or ``mmtune_lmm.json``)."""
    load: Callable[[Path, Any, Path], nn.Module] | None = None
    """``load(adapter, recorded_meta, meta_file)``: the tuned model from its adapter."""
    library: str = "mmtune"
    """The model card's ``library_name``."""
    load_snippet: str = ""
    """Python that loads the adapter, for the model card."""


_TUNINGS: dict[str, LMMTuning] = {}


def register_lmm_tuning(tuning: LMMTuning) -> LMMTuning:
    """Register ``tuning`` under its name (the one registration point); returns it."""
    _TUNINGS[tuning.name] = tuning
    return tuning


def get_lmm_tuning(name: str) -> LMMTuning:
    """The registered ``lmm tune`` method ``name``; an unknown one is one error naming them."""
    try:
        return _TUNINGS[name]
    except KeyError:
        raise KeyError(f"lmm tune method {name!r}: not one of {', '.join(_TUNINGS)}") from None


def lmm_tunings() -> tuple[str, ...]:
    """The registered ``lmm tune`` methods, in registration order."""
    return tuple(_TUNINGS)


def load_lmm_adapter(adapter: str | Path) -> nn.Module:
    """The model an ``lmm tune`` run saved in ``adapter``, ready to generate; the stage-1 base
    is found from what the adapter records."""
    adapter = Path(adapter)
    if (adapter / LMM_RUN_FILE).is_file():
        meta = read_json(adapter / LMM_RUN_FILE, "lmm adapter")
        recorded = meta.get("method") if isinstance(meta, dict) else None
        where = adapter / LMM_RUN_FILE
    else:
        meta = read_json(adapter / "adapter_config.json", "adapter config")
        recorded = meta.get("method") if isinstance(meta, dict) else None
        where = adapter / "adapter_config.json"
    for tuning in _TUNINGS.values():
        if tuning.load is not None and tuning.adapter_method == recorded:
            return tuning.load(adapter, meta, where)
    known = ", ".join(t.adapter_method for t in _TUNINGS.values() if t.adapter_method)
    raise ValueError(
        f"{where}: field 'method' is {recorded!r}; expected an lmm tune adapter ({known})"
    )


# ----------------------------------------------------------------------------- the four methods


def _prepare_projector(base: LlavaStyleModel, mrt: MRTConfig, peft: PeftAdapterConfig):
    base.projector.requires_grad_(True)
    return base


def _prepare_lora(base: LlavaStyleModel, mrt: MRTConfig, peft: PeftAdapterConfig):
    inject_peft(base.llm, "lora", peft)
    return base


def _save_mrt(model, out, base_dir, hub, peft):
    model.save_pretrained(out, base_dir=base_dir)


def _save_projector(model, out, base_dir, hub, peft):
    model.save_projector(out)


def _save_lora(model, out, base_dir, hub, peft):
    save_peft_format(model.llm, out, hub)
    write_json(
        out / LMM_RUN_FILE,
        {"method": "lora", "base_dir": str(Path(base_dir).resolve()), "peft": asdict(peft)},
    )


def _load_lora(adapter: Path, meta: Any, where: Path) -> nn.Module:
    if not isinstance(meta, dict) or "base_dir" not in meta:
        raise ValueError(f"{where}: expected method 'lora' and base_dir")
    base = load_lmm(meta["base_dir"])
    try:
        peft = PeftAdapterConfig(**meta.get("peft", {}))
    except TypeError as e:
        raise ValueError(f"{where}: field 'peft': {e}") from e
    inject_peft(base.llm, "lora", peft)
    load_peft_format(base.llm, adapter)
    return base.eval()


for _tuning in (
    LMMTuning("zero-shot", 0.0, prepare=lambda base, mrt, peft: base, trains=False),
    LMMTuning(
        "projector",
        1e-3,
        prepare=_prepare_projector,
        save=_save_projector,
        adapter_method="lmm-projector",
        load=lambda adapter, meta, where: load_lmm(adapter).eval(),
        load_snippet="from mmtune import load_lmm\nmodel = load_lmm('path/to/adapter')",
    ),
    LMMTuning(
        "lora",
        2e-3,
        prepare=_prepare_lora,
        save=_save_lora,
        adapter_method="lora",
        load=_load_lora,
        library="peft",
        load_snippet="from mmtune.methods.lmm_tuning import load_lmm_adapter\n"
        "model = load_lmm_adapter('path/to/adapter')\n"
        "# or the LLM's adapters alone, with PEFT:\nfrom peft import PeftModel\n"
        "llm = PeftModel.from_pretrained(load_lmm(BASE).llm, 'path/to/adapter')",
    ),
    LMMTuning(
        "mrt",
        # 1e-2 (mmtune <= 0.4) stays on the constant-answer plateau: a LoReFT edit moves with
        # |h| (75-616 in SmolLM2's edited layers) on every Adam step. docs/mrt.md has the runs.
        1e-3,
        prepare=lambda base, mrt, peft: MRTModel(base, mrt),
        save=_save_mrt,
        adapter_method="mrt",
        load=lambda adapter, meta, where: load_mrt(adapter),
        load_snippet="from mmtune import load_mrt\nmodel = load_mrt('path/to/adapter')",
    ),
):
    register_lmm_tuning(_tuning)
del _tuning
