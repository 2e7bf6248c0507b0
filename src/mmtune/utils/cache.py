"""On-disk caches: converted models and frozen-encoder features.

Root: ``$MMTUNE_CACHE`` if set, else the user's cache directory (``~/.cache/mmtune`` on Linux).

Every entry is a directory holding its files and, written last, ``manifest.json`` with the
entry's key and the SHA-256 and size of every file. An entry counts only when the manifest
exists and every file matches it, so a partial write (a killed process) or a corrupted or
truncated file is detected and the entry is rebuilt. Entries are built in a temporary
directory and renamed into place under a file lock, so two processes starting at once never
see or produce a half-written entry: the second waits and then reuses the first one's result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from mmtune.utils.io import file_sha256, umask_mode

__all__ = [
    "DirectoryCache",
    "FeatureCache",
    "cache_root",
    "content_hash",
    "file_sha256",
]

MANIFEST = "manifest.json"


def cache_root() -> Path:
    """``$MMTUNE_CACHE``, else the platform's user cache directory for mmtune."""
    env = os.environ.get("MMTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mmtune"))


def content_hash(items: Iterable[Any]) -> str:
    """SHA-256 over the bytes of arrays, tensors, strings or bytes, in order (shape-aware)."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().contiguous().numpy()
        if isinstance(item, np.ndarray):
            h.update(f"{item.dtype.str}{item.shape}".encode())
            h.update(np.ascontiguousarray(item).tobytes())
        elif isinstance(item, str):
            h.update(b"s" + item.encode())
        elif isinstance(item, bytes | bytearray):
            h.update(b"b" + bytes(item))
        else:
            raise TypeError(f"content_hash cannot hash {type(item).__name__}")
    return h.hexdigest()


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


class DirectoryCache:
    """Content-verified cache entries, one directory each, under ``root/namespace``."""

    def __init__(self, namespace: str, root: str | os.PathLike[str] | None = None):
        self.dir = (Path(root) if root is not None else cache_root()) / namespace

    def entry_path(self, name: str, key: dict[str, Any]) -> Path:
        return self.dir / f"{name}-{_key_digest(key)}"

    def is_valid(self, path: Path, key: dict[str, Any]) -> bool:
        """True when ``path`` has a manifest for ``key`` and every file matches its hash."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if manifest.get("key") != json.loads(json.dumps(key, sort_keys=True, default=str)):
            return False
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return False
        for rel, info in files.items():
            f = path / rel
            try:
                if f.stat().st_size != info["size"] or file_sha256(f) != info["sha256"]:
                    return False
            except (OSError, KeyError, TypeError):
                return False
        return True

    def get_or_build(
        self, name: str, key: dict[str, Any], build: Callable[[Path], None]
    ) -> tuple[Path, bool]:
        """Return (entry directory, hit). ``build(tmp_dir)`` writes the entry's files on a miss.

        A present but invalid entry (partial, corrupted, truncated) is removed and rebuilt.
        """
        path = self.entry_path(name, key)
        if self.is_valid(path, key):
            return path, True
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if self.is_valid(path, key):  # another process built it while we waited
                return path, True
            # Holding the lock, no other builder of this entry is alive: any temp dir left
            # under its name is a killed build's.
            for stale in self.dir.glob(f".{path.name}.*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=self.dir))
            tmp.chmod(umask_mode(0o777))  # mkdtemp makes it 0700 whatever the umask
            try:
                build(tmp)
                files = {
                    str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
                    for f in sorted(tmp.rglob("*"))
                    if f.is_file()
                }
                if not files:
                    raise RuntimeError(f"cache entry {path.name}: the builder wrote no files")
                manifest = {"key": key, "files": files}
                (tmp / MANIFEST).write_text(
                    json.dumps(manifest, indent=2, sort_keys=True, default=str)
                )
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return path, False


class FeatureCache:
    """Frozen-encoder outputs stored once and reused across epochs and runs.

    The key holds everything the features depend on: the encoder's identity (id and weights
    fingerprint), the preprocessing, and a hash of the input contents. Change any part and the
    lookup misses; the old entry stays on disk for the old key.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.entries = DirectoryCache("features", root)
        self.last_hit: bool | None = None

    def get_or_compute(
        self,
        name: str,
        key: dict[str, Any],
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        def build(tmp: Path) -> None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
            save_file(tensors, str(tmp / "features.safetensors"))

        path, self.last_hit = self.entries.get_or_build(name, key, build)
        return load_file(str(path / "features.safetensors"))
