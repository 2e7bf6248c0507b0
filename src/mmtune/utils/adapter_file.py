"""What every mmtune method shares: parameter reports and the adapter file format.

An adapter directory holds exactly two files:

- ``adapter.safetensors``: the method's own tensors, keyed as in the wrapper's ``state_dict``;
- ``adapter_config.json``: ``{"method", "mmtune_version", "base_model", "base_model_type",
  "config", "sha256"}``, where ``config`` is the method's config dataclass as a dict and
  ``sha256`` records the digest of ``adapter.safetensors`` and of the rest of this JSON
  (canonical form: sorted keys), so a flipped byte or an edited config is refused on load.

Both are written to a temporary file in the same directory and renamed into place, so an
interrupted save never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtune._version import __version__
from mmtune.utils.io import (
    IntegrityError,
    atomic_write,
    file_sha256,
    load_tensors,
    read_json,
    save_tensors,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "ParameterCount",
    "atomic_write",
    "count_parameters",
    "read_adapter",
    "write_adapter",
]

ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameter counts of a wrapped model (shared tensors counted once)."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        """Trainable share of all parameters, as a fraction in [0, 1]."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.share:.4f}"
        )


def count_parameters(module: nn.Module) -> ParameterCount:
    """Count parameters of ``module``; works on the meta device (no memory is touched)."""
    trainable = total = 0
    for p in module.parameters():  # parameters() already yields tied tensors once
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return ParameterCount(trainable=trainable, total=total)


def base_model_id(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def write_adapter(
    directory: str | os.PathLike[str],
    *,
    method: str,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    base_model: nn.Module,
) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``directory``."""
    directory = Path(directory)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "method": method,
        "mmtune_version": __version__,
        "base_model": base_model_id(base_model),
        "base_model_type": getattr(getattr(base_model, "config", None), "model_type", None),
        "config": config,
    }
    save_tensors(
        directory / ADAPTER_WEIGHTS_NAME, weights, metadata={"format": "pt", "method": method}
    )
    meta["sha256"] = {
        ADAPTER_WEIGHTS_NAME: file_sha256(directory / ADAPTER_WEIGHTS_NAME),
        "config": _meta_digest(meta),
    }
    with atomic_write(directory / ADAPTER_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of an adapter config without its ``sha256`` field, in canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _verify_adapter(meta: dict[str, Any], config_path: Path, weights_path: Path) -> None:
    recorded = meta.get("sha256")
    if recorded is None:
        warnings.warn(
            f"{config_path}: records no SHA-256 (saved by mmtune < 0.2?); loading it unchecked",
            stacklevel=3,
        )
        return
    if not isinstance(recorded, dict):
        raise IntegrityError(f"{config_path}: field 'sha256' must be an object")
    if recorded.get("config") != _meta_digest(meta):
        raise IntegrityError(
            f"{config_path}: its contents differ from the SHA-256 recorded when it was saved "
            "(the file was edited or damaged)"
        )
    if recorded.get(ADAPTER_WEIGHTS_NAME) != file_sha256(weights_path):
        raise IntegrityError(
            f"{weights_path}: SHA-256 differs from the one recorded in {config_path} "
            "(the file was changed or damaged)"
        )


def read_adapter(
    directory: str | os.PathLike[str], *, method: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter directory; errors name the file and the field that is wrong."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG_NAME
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: no such file (an mmtune adapter directory holds "
                f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})"
            )
    meta = read_json(config_path, "adapter config")
    if not isinstance(meta, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(meta).__name__}")
    for field in ("method", "config"):
        if field not in meta:
            raise ValueError(f"{config_path}: missing field {field!r}")
    if meta["method"] != method:
        raise ValueError(
            f"{config_path}: field 'method' is {meta['method']!r}, expected {method!r}"
        )
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{config_path}: field 'config' must be an object")
    _verify_adapter(meta, config_path, weights_path)
    tensors = load_tensors(weights_path, "adapter weights")
    return meta, tensors


def load_adapter_tensors(
    module: nn.Module, tensors: dict[str, torch.Tensor], *, source: str, prefix: str
) -> None:
    """Copy ``tensors`` into the parameters of ``module`` named ``prefix*``, strictly.

    Missing keys, unexpected keys and shape mismatches raise one error that lists them all.
    """
    own = {k: v for k, v in module.state_dict(keep_vars=True).items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong_shape = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(tensors))
        if tuple(tensors[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong_shape:
        problems.append("shape mismatches " + "; ".join(wrong_shape))
    if problems:
        raise ValueError(
            f"{source} does not fit this model: "
            + " | ".join(problems)
            + " (was it saved from another base model or config?)"
        )
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
