"""Files we write and read (docs/design.md section 10): atomic writes, JSON, tensors, manifests.

- :func:`atomic_write` builds a file under a temporary name in the target's folder and renames
  it into place only on success; the result follows the process umask like any new file.
- :func:`read_json` names the file, line and column of a parse error.
- :func:`save_tensors` / :func:`load_tensors`: safetensors only (no pickle); loading refuses
  non-finite values and names the file and the tensor.
- :func:`write_manifest` / :func:`verify_manifest`: ``manifest.json`` records the SHA-256 and
  size of every file of a directory (checkpoint, final weights); a mismatch names the file.

Nothing here imports the rest of mmtune.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MANIFEST_NAME",
    "IntegrityError",
    "atomic_write",
    "file_sha256",
    "load_tensors",
    "read_json",
    "save_tensors",
    "umask_mode",
    "verify_manifest",
    "write_json",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"


class IntegrityError(ValueError):
    """A file does not match the SHA-256 recorded for it, or holds non-finite weights."""


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: the permissions ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, not a file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file we meant to write, not the temporary one
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(umask_mode())  # mkstemp makes it 0600 whatever the umask
        os.replace(tmp_path, path)
    except OSError as e:
        if e.filename is None:  # a write error (a full disk) names the file it was for
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    path = Path(path)
    text = json.dumps(obj, indent=2, default=str) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing file, bad bytes or bad syntax raise one error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"no such file ({what})", str(path))
    try:
        text = path.read_text(encoding="utf8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({what}): {e.reason} at byte {e.start}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{path}, line {e.lineno}, column {e.colno}"
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_tensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write tensors as safetensors, atomically; a full disk raises OSError naming the file."""
    from safetensors.torch import save

    path = Path(path)
    data = save(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata
    )
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)  # plain writes: ENOSPC surfaces as OSError(errno), not a parse error
    return path


def load_tensors(
    path: str | os.PathLike[str], what: str = "weights", *, finite: bool = True
) -> dict[str, torch.Tensor]:
    """Read a safetensors file; unreadable files and (with ``finite``) NaN/inf values raise an
    error naming the file and the first offending tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"no such file ({what})", str(path))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({what}): {e}") from e
    if finite:
        for key, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise IntegrityError(
                    f"{path}: tensor {key!r} holds {bad} NaN or infinite value(s); refusing to "
                    f"load non-finite {what}"
                )
    return tensors


def write_manifest(directory: str | os.PathLike[str], files: Iterable[str], **fields: Any) -> Path:
    """Write ``directory/manifest.json``: ``fields`` plus SHA-256 and size of each named file."""
    directory = Path(directory)
    entries = {}
    for name in sorted(files):
        f = directory / name
        entries[name] = {"sha256": file_sha256(f), "size": f.stat().st_size}
    return write_json(directory / MANIFEST_NAME, {**fields, "files": entries})


def verify_manifest(directory: str | os.PathLike[str], what: str = "directory") -> dict[str, Any]:
    """Check every file listed in ``directory/manifest.json``; return the manifest.

    Raises :class:`IntegrityError` naming the first file that is missing, of another size or
    of another SHA-256 than recorded (a truncated, flipped or edited file).
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise IntegrityError(f"{path}: missing; {directory} is not a complete {what}")
    try:
        manifest = read_json(path, f"{what} manifest")
    except ValueError as e:
        raise IntegrityError(str(e)) from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise IntegrityError(f"{path}: field 'files' must be a non-empty object")
    for name, info in files.items():
        f = directory / name
        if not f.is_file():
            raise IntegrityError(f"{f}: missing (listed in {path})")
        try:
            size, digest = int(info["size"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{path}: entry {name!r} lacks size/sha256") from e
        if f.stat().st_size != size:
            raise IntegrityError(
                f"{f}: {f.stat().st_size} bytes, but {path} records {size} (truncated or changed)"
            )
        if file_sha256(f) != digest:
            raise IntegrityError(f"{f}: SHA-256 differs from the one in {path} (file changed)")
    return manifest


def copy_tensors_into(
    params: dict[str, Any], weights: dict[str, Any], source: str | os.PathLike[str]
) -> None:
    """Copy ``weights`` into the same-named ``params`` (torch tensors); the key sets and every
    shape must match exactly, else one ValueError naming ``source`` lists what differs."""
    import torch

    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ValueError(
            f"{source} does not fit the model: missing {missing[:5]}, extra {extra[:5]}"
        )
    wrong = [
        f"{n}: file {tuple(w.shape)} vs model {tuple(params[n].shape)}"
        for n, w in weights.items()
        if w.shape != params[n].shape
    ]
    if wrong:
        raise ValueError(
            f"{source} does not fit the model: shape mismatches {'; '.join(wrong[:5])}"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
