"""A run directory belongs to one run (docs/design.md section 10).

- :func:`check_writable`: the directory is created and a probe file written before any work.
- :class:`RunLock`: an exclusive lock per process rank (filelock), held for the life of the
  run; a second run on the same directory fails at once and names the holder's pid and command.
- :func:`claim`: a directory that holds another run is refused unless it is resumed with the
  same settings, or ``overwrite`` is given (then the previous run's files are removed: only
  the names mmtune writes, never anything else in the folder).
- :class:`Finisher`: the run's results, final weights, predictions and pictures are built in
  a staging folder and renamed into place, ``results.json`` last, after any stale one is gone:
  whoever sees a ``results.json`` sees the matching rest.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mmtune.utils.io import read_json, write_json

__all__ = [
    "RUN_FILE",
    "RunLock",
    "RunLockedError",
    "check_writable",
    "claim",
    "config_differences",
]

RUN_FILE = "run.json"
# Everything a run writes at the top of its directory (removed by overwrite, nothing else).
RUN_OUTPUTS = (
    RUN_FILE,
    "results.json",
    "final",
    "adapter",
    "checkpoints",
    "tensorboard",
    "curves.png",
    "masks.png",
    "scatter.png",
    ".finish",
)
# Settings a resumed run may change: more epochs, and the flags that say how to start.
RESUMABLE = {
    "optim.epochs",
    "resume",
    "overwrite",
    "output_dir",
    "report_to",
    "gradient_checkpointing",
}


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file in it; an OSError names ``out`` if either fails."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(20, "exists and is not a directory (output_dir)", str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise type(e)(e.errno, f"output_dir is not writable ({e.strerror})", str(out)) from None


class RunLock:
    """Exclusive lock of ``out`` for this process rank, released on exit or when it dies."""

    def __init__(self, out: Path, rank: int = 0):
        self.path = out / f".lock-rank{rank}"
        self.owner = out / f".lock-rank{rank}.owner.json"
        self.lock = FileLock(str(self.path))

    def __enter__(self) -> RunLock:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            try:
                who = json.loads(self.owner.read_text())
                holder = (
                    f"pid {who['pid']} on {who['host']}, started {who['started']}: {who['command']}"
                )
            except (OSError, ValueError, KeyError, TypeError):
                holder = "another process"
            raise RunLockedError(
                f"{self.path.parent}: another run is using this output_dir ({holder})"
            ) from None
        write_json(
            self.owner,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv),
            },
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.owner.unlink(missing_ok=True)
        self.lock.release()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``field: saved -> now`` for every setting that differs, except the resumable ones."""
    a = _flat(json.loads(json.dumps(saved, default=str)))
    b = _flat(json.loads(json.dumps(now, default=str)))
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if k not in RESUMABLE and a.get(k) != b.get(k)
    ]


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds (part of) a run: a run file, checkpoints, final weights, results."""
    return any((out / name).exists() for name in (RUN_FILE, "results.json", "final", "checkpoints"))


def claim(out: Path, config: dict[str, Any], *, resume: bool, overwrite: bool) -> str:
    """Decide what a run may do with ``out``: ``"fresh"``, ``"resume"`` or ``"overwrite"``.

    Raises a ValueError naming the directory when the run would lose or mix another run.
    Only reads: the caller removes files (:func:`clear`) and writes the run file.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite: choose one")
    if not holds_run(out):
        if resume:
            raise ValueError(f"{out}: nothing to resume (no run in this output_dir)")
        return "fresh"
    if overwrite:
        return "overwrite"
    run_file = out / RUN_FILE
    if not resume:
        what = "a finished run" if (out / "results.json").is_file() else "an unfinished run"
        raise ValueError(
            f"{out}: holds {what}; pass --resume true to continue it (same settings) or "
            "--overwrite true to replace it, or choose another output_dir"
        )
    if not run_file.is_file():
        raise ValueError(
            f"{out}: has no {RUN_FILE} (written by mmtune >= 0.2), so its settings are unknown; "
            "cannot resume it safely (use --overwrite true to start again)"
        )
    saved = read_json(run_file, "run settings")
    diffs = config_differences(saved.get("config", {}), config)
    if diffs:
        raise ValueError(
            f"{run_file}: resume with changed settings ({'; '.join(diffs)}); only optim.epochs "
            "may change on resume"
        )
    results = out / "results.json"
    if results.is_file():
        done = read_json(results, "run results").get("config", {}).get("optim", {}).get("epochs")
        if done == config["optim"]["epochs"]:
            raise ValueError(
                f"{out}: the run already finished its {done} epochs; raise --optim.epochs "
                "to train further"
            )
    return "resume"


def clear(out: Path) -> None:
    """Remove what a previous run wrote in ``out`` (only mmtune's own names)."""
    names = [*RUN_OUTPUTS, *(p.name for p in out.glob("predictions-*.jsonl"))]
    names += [p.name for p in out.glob("eval-*.json")]
    for name in names:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


class Finisher:
    """Stage a run's final outputs in ``out/.finish`` and move them into place together."""

    def __init__(self, out: Path):
        self.out = out
        self.stage = out / ".finish"
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir()

    def commit(self) -> None:
        """Move every staged item into ``out``, ``results.json`` last (a stale one goes first)."""
        (self.out / "results.json").unlink(missing_ok=True)
        items = sorted(self.stage.iterdir(), key=lambda p: p.name == "results.json")
        for item in items:
            target = self.out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        self.stage.rmdir()
