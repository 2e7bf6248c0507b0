"""The configs that ship inside the package (``mmtune/configs/``, ``configs/`` in a checkout).

``mmtune train --config demo/digits-ve.yaml`` (or ``configs/demo/digits-ve.yaml``) works from
any directory after a plain install: a config path that names no file here is looked up among
the shipped ones, with or without its leading ``configs/``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["packaged_configs", "resolve_config"]


def packaged_configs() -> Path:
    """The folder of the configs shipped with mmtune."""
    return Path(str(files("mmtune") / "configs"))


def resolve_config(path: str | Path) -> Path:
    """``path`` if it exists; else the shipped config (or folder) at that relative path, with or
    without a leading ``configs/``; else ``path`` unchanged (the caller names it missing)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    shipped = packaged_configs().joinpath(*parts) if parts else packaged_configs()
    return shipped if shipped.exists() else given
