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

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmtune._version import __version__
from mmtune.training.final import load_trainable, trainable_tensors
from mmtune.utils.cache import content_hash
from mmtune.utils.io import (
    IntegrityError,
    atomic_write,
    load_tensors,
    read_json,
    save_tensors,
    verify_manifest,
    write_json,
    write_manifest,
)

__all__ = [
    "checkpoint_dirs",
    "load_checkpoint",
    "load_state",
    "newest_intact",
    "pack",
    "rng_state",
    "rotate",
    "save_checkpoint",
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


def save_checkpoint(
    accelerator: Any,
    module: nn.Module,
    optimizer: Any,
    scheduler: Any,
    epoch: int,
    history: dict,
    out: Path,
    config: dict[str, Any],
    keep: int,
) -> None:
    """``out/checkpoints/epoch-NNN``: the trainable tensors, optimiser, schedule, history,
    ``config`` and every rank's RNG, under a manifest; built as a temporary directory and
    renamed into place, then all but the ``keep`` newest intact ones removed. Every rank must
    hold the same trainable weights (their digests are compared)."""
    final = out / "checkpoints" / f"epoch-{epoch:03d}"
    tmp = out / "checkpoints" / f".epoch-{epoch:03d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank, world = accelerator.process_index, accelerator.num_processes
    save_state(tmp, f"rng-rank{rank}", rng_state())
    trainable = trainable_tensors(module)
    digest = content_hash(trainable.values())  # every rank must hold the same weights
    with atomic_write(tmp / f"trainable-sha256-rank{rank}.txt") as part:  # ENOSPC names it
        part.write_text(digest + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        digests = {(tmp / f"trainable-sha256-rank{r}.txt").read_text() for r in range(world)}
        if len(digests) != 1:
            raise RuntimeError(
                f"{tmp}: the {world} processes hold different trainable weights after epoch "
                f"{epoch}; refusing to save a checkpoint that no rank could resume exactly"
            )
        save_tensors(tmp / "trainable.safetensors", trainable)
        save_state(
            tmp,
            "state",
            {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "world_size": world,
                "config": config,
            },
        )
        files = [p.name for p in tmp.iterdir() if p.is_file()]
        write_manifest(tmp, files, format=FORMAT, epoch=epoch, mmtune_version=__version__)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint appears complete or not at all
        rotate(out, keep)
    accelerator.wait_for_everyone()


def load_checkpoint(
    path: Path, accelerator: Any, module: nn.Module, optimizer: Any, scheduler: Any
) -> tuple[int, dict]:
    state = load_state(path, "state")
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(
            f"{path}: saved with {state['world_size']} processes, resumed with "
            f"{accelerator.num_processes}"
        )
    load_trainable(module, path / "trainable.safetensors")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_state(path, f"rng-rank{accelerator.process_index}"))
    return state["epoch"], state["history"]
