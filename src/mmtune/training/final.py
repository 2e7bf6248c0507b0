"""A finished run's ``final/``: trainable tensors, config and data-derived spec, with a manifest."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mmtune._version import __version__
from mmtune.utils.io import (
    copy_tensors_into,
    load_tensors,
    save_tensors,
    verify_manifest,
    write_json,
    write_manifest,
)

if TYPE_CHECKING:
    from mmtune.training.config import TrainConfig

__all__ = [
    "FINAL_FILES",
    "FINAL_FORMAT",
    "load_trainable",
    "trainable_tensors",
    "verify_final",
    "write_final",
]


def trainable_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: nn.Module, path: Path) -> None:
    """Copy a trainable.safetensors into ``module``; its keys and shapes must be exactly the
    trainable ones, and its values finite."""
    weights = load_tensors(path, "trainable weights")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    copy_tensors_into(params, weights, path)


FINAL_FORMAT = "mmtune-final/1"


FINAL_FILES = ("trainable.safetensors", "config.json", "spec.json")


def verify_final(run: Path) -> Path:
    """``run/final`` after checking its manifest; a run saved before manifests existed loads
    with a warning, a damaged one is refused naming the file."""
    final = Path(run) / "final"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(
            2, f"no such file; is {run} a finished mmtune run?", str(final / "config.json")
        )
    if not (final / "manifest.json").is_file():
        warnings.warn(
            f"{final}: records no SHA-256 (saved by mmtune < 0.2); loading unchecked",
            stacklevel=2,
        )
        return final
    verify_manifest(final, "final model")
    return final


def write_final(final: Path, trainable: dict[str, torch.Tensor], cfg: TrainConfig, spec: dict):
    final.mkdir(parents=True, exist_ok=True)
    save_tensors(final / "trainable.safetensors", trainable)
    write_json(final / "config.json", asdict(cfg))
    write_json(final / "spec.json", spec)
    write_manifest(final, FINAL_FILES, format=FINAL_FORMAT, mmtune_version=__version__)
