"""What every data set loader shares: checked file access, safe unpickling, split containers.

Loaders only read: no data set file is ever written or modified.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

__all__ = [
    "DataSplits",
    "SafeUnpickler",
    "TaskDataset",
    "check_options",
    "load_pickle",
    "read_jsonl",
    "require_fields",
    "require_file",
]


def check_options(
    fn: Callable[..., Any], options: dict[str, Any], where: str, skip: int = 0
) -> None:
    """Refuse keyword options that ``fn`` does not take, naming the unknown key and the known.

    ``skip`` leading parameters (a loader's path) are not options.
    """
    import inspect

    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown}; {fn.__name__} takes {known or 'none'}"
        )


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    return path


def require_fields(record: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    """Raise one error naming the place and every missing field."""
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


# Globals a data pickle may name: containers and numpy arrays, never code. Exact (module, name)
# pairs only: no prefix rule and no dotted name, since protocol 4 resolves ``a.b.c`` attribute
# chains (``numpy.dtypes`` + ``__builtins__.get`` reaches ``eval``).
_ALLOWED = frozenset(
    {
        ("builtins", name)
        for name in (
            "list",
            "dict",
            "tuple",
            "set",
            "frozenset",
            "str",
            "bytes",
            "int",
            "float",
            "complex",
            "bool",
            "bytearray",
            "slice",
        )
    }
    | {
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("_codecs", "encode"),  # bytes in protocol 0-2 pickles written by Python 3
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "float32"),
        ("numpy", "float64"),
        ("numpy", "int64"),
        ("numpy", "int32"),
    }
)


class SafeUnpickler(pickle.Unpickler):
    """Unpickles containers and numpy arrays only; any other global is refused by name."""

    source = "pickle"

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle  # Python 2 names (__builtin__.set), as the unpickler maps them

        wanted = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        wanted = (_compat_pickle.IMPORT_MAPPING.get(wanted[0], wanted[0]), wanted[1])
        if wanted in _ALLOWED:  # exact pairs, none dotted: no attribute chains
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{self.source}: refers to {module}.{name}, which a data file has no reason to "
            "contain; refusing to load it (only containers and numpy arrays are allowed)"
        )


def load_pickle(path: str | Path, what: str) -> Any:
    """Load a data pickle safely; Python 2 pickles (REFER's refs files) are decoded too."""
    path = require_file(path, what)

    def load(**kwargs: Any) -> Any:
        with open(path, "rb") as f:
            unpickler = SafeUnpickler(f, **kwargs)
            unpickler.source = str(path)
            return unpickler.load()

    try:
        return load()
    except UnicodeDecodeError:  # a Python 2 pickle holding non-ASCII byte strings
        return _utf8_fix(load(encoding="latin1"))
    except (pickle.UnpicklingError, EOFError, ValueError, ImportError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable {what} pickle ({e})") from e


def _utf8_fix(obj: Any) -> Any:
    if isinstance(obj, str):
        try:
            return obj.encode("latin1").decode("utf8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return obj
    if isinstance(obj, list):
        return [_utf8_fix(x) for x in obj]
    if isinstance(obj, dict):
        return {_utf8_fix(k): _utf8_fix(v) for k, v in obj.items()}
    return obj


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSON-lines file; a bad line names file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}, line {lineno}: not UTF-8 text ({e.reason} at byte {e.start})"
                ) from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object")
            yield lineno, record


class TaskDataset(Dataset):
    """The one Dataset protocol every loader's splits follow.

    ``ds[i]`` is the whole item (the image decoded, where there is one); the three methods
    below let training work from the frozen features without decoding images again."""

    def metadata(self, i: int) -> dict[str, Any]:
        """Item ``i`` without decoding its image (for ``mmtune data inspect``)."""
        return {k: v for k, v in self[i].items() if k != "image"}

    def image_source(self, i: int) -> Any:
        """What the frozen vision encoder reads for item ``i``: a path or an (H, W, 3) array."""
        return self[i]["image"]

    def scoring_item(self, i: int) -> dict[str, Any]:
        """Item ``i`` as training and scoring need it once the image is encoded: every field
        but the decoded image (a mask is kept: it is what segmentation is scored against)."""
        return {k: v for k, v in self.metadata(i).items() if k != "image"}

    def check_image_sizes(self) -> None:
        """Refuse images whose size differs from what the annotations say (no-op by default)."""


@dataclass
class DataSplits:
    """The splits of one data set, by name, plus what the task needs to know about it."""

    name: str
    """Format and data set, e.g. ``refcoco (unc)``."""
    task: str
    """``segmentation``, ``classification`` or ``sentiment``."""
    splits: dict[str, TaskDataset]
    """Split name -> dataset; each item is a dict (see the loader)."""
    label_names: list[str] = field(default_factory=list)
    """Class names, index = label (classification only)."""
    describe: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Turns one item into a printable summary (for ``mmtune data inspect``)."""

    def __post_init__(self) -> None:
        empty = [k for k, v in self.splits.items() if len(v) == 0]
        if empty:
            raise ValueError(f"{self.name}: split(s) {empty} have no samples")

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}
