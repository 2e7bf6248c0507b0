"""Checkpoints without pickle: tensors in safetensors, the rest in JSON, all under a manifest.

A checkpoint directory ``checkpoints/epoch-NNN`` holds

- ``trainable.safetensors``: every trainable tensor of the task model;
- ``state.safetensors`` + ``state.json``: optimizer, scheduler, history, epoch, world size and
  the run's config (tensors in the first file, everything else as JSON that points to them);
- ``rng-rank{r}.safetensors`` + ``rng-rank{r}.json``: each rank's torch, numpy and Python RNG;
- ``trainable-sha256-rank{r}.txt``: each rank's digest of its trainable tensors (they must agree);
- ``manifest.json``, written last: SHA-256 and size of every file above.

Loading never unpickles anything, so a crafted file cannot run code; a checkpoint counts only
when its manifest verifies and its weights are finite (:func:`verify_checkpoint`), and resume
takes the newest one that does (:func:`newest_intact`).
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtune.utils.io import (
    IntegrityError,
    load_tensors,
    read_json,
    save_tensors,
    verify_manifest,
    write_json,
)

__all__ = [
    "checkpoint_dirs",
    "load_state",
    "newest_intact",
    "pack",
    "rng_state",
    "rotate",
    "save_state",
    "set_rng_state",
    "unpack",
    "verify_checkpoint",
]

FORMAT = "mmtune-checkpoint/2"


# ----------------------------------------------------------------------------- packing


def pack(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, arrays, numbers) into a flat
    tensor dict and a JSON tree whose leaves ``{"__tensor__": key}`` point into it."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(x, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(x))
            return {"__ndarray__": path}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {"__items__": [[k, enc(v, f"{path}.{i}")] for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"checkpoint state at {path!r}: cannot store a {type(x).__name__}")

    return tensors, enc(obj, "s")


def unpack(tensors: dict[str, torch.Tensor], tree: Any, where: str = "state") -> Any:
    """The inverse of :func:`pack`; a dangling tensor reference names ``where``."""

    def tensor(key: Any) -> torch.Tensor:
        if key not in tensors:
            raise IntegrityError(f"{where}: refers to tensor {key!r}, which is not stored")
        return tensors[key]

    def dec(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {"__tensor__"}:
                return tensor(x["__tensor__"])
            if set(x) == {"__ndarray__"}:
                return tensor(x["__ndarray__"]).numpy()
            if set(x) == {"__tuple__"}:
                return tuple(dec(v) for v in x["__tuple__"])
            if set(x) == {"__items__"}:
                return {(tuple(k) if isinstance(k, list) else k): dec(v) for k, v in x["__items__"]}
            return {k: dec(v) for k, v in x.items()}
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(tree)


def save_state(directory: Path, stem: str, state: Any) -> list[str]:
    """Write ``stem.safetensors`` + ``stem.json``; returns their names."""
    tensors, tree = pack(state)
    save_tensors(directory / f"{stem}.safetensors", tensors)
    write_json(directory / f"{stem}.json", {"format": FORMAT, "state": tree})
    return [f"{stem}.safetensors", f"{stem}.json"]


def load_state(directory: Path, stem: str) -> Any:
    """Read what :func:`save_state` wrote; no code can run from either file."""
    meta = read_json(directory / f"{stem}.json", "checkpoint state")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IntegrityError(f"{directory / f'{stem}.json'}: not an {FORMAT} state file")
    tensors = load_tensors(directory / f"{stem}.safetensors", "checkpoint state", finite=False)
    return unpack(tensors, meta["state"], where=str(directory / f"{stem}.json"))


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states of this process."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": keys.astype(np.int64),  # safetensors has no uint32 on every version
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = np.asarray(n["keys"]).astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# ----------------------------------------------------------------------------- directories


def checkpoint_dirs(out: Path) -> list[Path]:
    """``out/checkpoints/epoch-NNN`` directories, oldest first (complete or not)."""
    root = out / "checkpoints"
    return sorted(p for p in root.glob("epoch-[0-9][0-9][0-9]*") if p.is_dir())


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of an intact checkpoint; :class:`IntegrityError` names what is wrong."""
    if (path / "state.pt").exists() and not (path / "state.json").exists():
        raise IntegrityError(
            f"{path}: an old-format checkpoint (state.pt, a pickle); it is not loaded, since "
            "loading it could run code"
        )
    manifest = verify_manifest(path, "checkpoint")
    if manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path / 'manifest.json'}: not an {FORMAT} checkpoint")
    load_tensors(path / "trainable.safetensors", "trainable weights")  # finite, readable
    return manifest


def newest_intact(out: Path) -> Path | None:
    """The newest checkpoint that verifies; every newer damaged one is named in a warning."""
    for path in reversed(checkpoint_dirs(out)):
        try:
            verify_checkpoint(path)
        except (IntegrityError, OSError) as e:
            warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
            continue
        return path
    return None


def rotate(out: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest intact checkpoints; never the newest intact one.

    Damaged checkpoints older than the newest intact one go too (they cannot be resumed).
    Returns the deleted directories.
    """
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    intact = []
    for path in checkpoint_dirs(out):
        try:
            verify_checkpoint(path)
            intact.append(path)
        except (IntegrityError, OSError):
            pass
    if not intact:
        return []
    kept = set(intact[-keep:])
    newest = intact[-1]
    removed = []
    for path in checkpoint_dirs(out):
        if path not in kept and path < newest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for stale in (out / "checkpoints").glob(".epoch-*.tmp"):  # a killed save's leftovers
        shutil.rmtree(stale, ignore_errors=True)
    return removed
