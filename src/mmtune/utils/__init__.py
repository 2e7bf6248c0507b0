"""Utilities imported by every layer and importing none of mmtune: safe file I/O and integrity."""

from mmtune.utils.io import (
    IntegrityError,
    atomic_write,
    file_sha256,
    load_tensors,
    read_json,
    save_tensors,
    verify_manifest,
    write_json,
    write_manifest,
)

__all__ = [
    "IntegrityError",
    "atomic_write",
    "file_sha256",
    "load_tensors",
    "read_json",
    "save_tensors",
    "verify_manifest",
    "write_json",
    "write_manifest",
]
