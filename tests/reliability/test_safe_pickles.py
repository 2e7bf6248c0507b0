"""No code runs from a data pickle: an exact (module, name) allowlist, no prefix, no dotted names.

Every crafted pickle would write a marker file if it ran; each test asserts that it does not.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmtune.data.base import SafeUnpickler, load_pickle

ROOT = Path(__file__).resolve().parents[2]


def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def _global(module: str, name: str, proto: int) -> bytes:
    """Push module.name: GLOBAL below protocol 4, STACK_GLOBAL (short strings) from 4 on."""
    if proto < 4:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    out = b""
    for s in (module, name):
        data = s.encode()
        out += b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE
    return out + b"\x93"  # STACK_GLOBAL


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + len(data).to_bytes(4, "little") + data  # BINUNICODE


def _frame(body: bytes, proto: int) -> bytes:
    head = b"\x80" + bytes([proto])
    if proto >= 4:
        head += b"\x95" + len(body).to_bytes(8, "little")  # FRAME
    return head + body + b"."


def _dotted_eval(marker: Path, proto: int) -> bytes:
    """numpy.dtypes + '__builtins__.get' -> dict.get; get('eval') -> eval; eval(code)."""
    get = _global("numpy.dtypes", "__builtins__.get", proto)
    return _frame(get + _str("eval") + b"\x85R" + _str(_code(marker)) + b"\x85R", proto)


def _memo_trick(marker: Path, proto: int) -> bytes:
    """Store an allowed global in the memo, then fetch builtins.eval under a memo index."""
    allowed = _global("builtins", "list", proto) + b"q\x00"  # BINPUT 0
    evil = _global("builtins", "eval", proto) + b"q\x01"  # BINPUT 1
    call = b"h\x01" + _str(_code(marker)) + b"\x85R"  # BINGET 1; (code,); REDUCE
    return _frame(allowed + b"0" + evil + b"0" + call, proto)  # POP after each put


class _Reduce:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


CRAFTED = {
    "dotted numpy.dtypes chain": _dotted_eval,
    "memo trick": _memo_trick,
    "plain __reduce__": lambda marker, proto: pickle.dumps(_Reduce(marker), protocol=proto),
    "dotted builtins name": lambda marker, proto: _frame(
        _global("builtins", "getattr.__self__.eval", proto) + _str(_code(marker)) + b"\x85R",
        proto,
    ),
    "numpy prefix module": lambda marker, proto: _frame(
        _global("numpy.dtypes.os", "system", proto) + _str(f"touch {marker}") + b"\x85R", proto
    ),
}


@pytest.mark.parametrize("proto", [2, 4, 5])
@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, kind, proto):
    marker = tmp_path / "marker"
    data = CRAFTED[kind](marker, proto)
    pickletools.dis(data, out=io.StringIO())  # a well-formed pickle, not a parse error
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: not a readable"):
        load_pickle(path, "REFER refs")
    assert not marker.exists()


def test_the_dotted_chain_would_run_without_the_allowlist(tmp_path):
    """The crafted pickle is a real exploit: plain pickle runs it (so the test above can fail)."""
    marker = tmp_path / "marker"
    pickle.loads(_dotted_eval(marker, 4))
    assert marker.read_text() == "pwned"


def test_cli_and_train_refuse_a_crafted_mmsa_pickle(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "unaligned_50.pkl"
    path.write_bytes(_dotted_eval(marker, 4))
    run = subprocess.run(
        [sys.executable, "-m", "mmtune.cli", "data", "inspect", str(path)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"mmtune: error: {path}: not a readable")
    assert "numpy.dtypes.__builtins__.get" in run.stderr and "Traceback" not in run.stderr
    assert not marker.exists()


@pytest.mark.parametrize("proto", [0, 2, 3, 4, 5])
def test_data_pickles_still_load_at_every_protocol(tmp_path, proto):
    from collections import OrderedDict

    data = {
        "train": {
            "audio": np.arange(6, dtype=np.float32).reshape(1, 2, 3),
            "id": ["a"],
            "labels": np.array([0.5]),
            "scalar": np.float32(2.0),
            "strings": np.array(["x", "yy"]),
            "nested": OrderedDict(a=(1, 2.5, None), b={3, 4}, c=b"raw"),
        }
    }
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(data, protocol=proto))
    back = load_pickle(path, "MMSA")["train"]
    assert np.array_equal(back["audio"], data["train"]["audio"]) and back["id"] == ["a"]
    assert back["nested"] == data["train"]["nested"] and back["scalar"] == 2.0


def test_python2_names_map_onto_the_allowlist():
    # protocol 2 as Python 2 writes a set: __builtin__.set
    data = b"\x80\x02c__builtin__\nset\nq\x00]q\x01K\x01a\x85q\x02Rq\x03."
    assert SafeUnpickler(io.BytesIO(data)).load() == {1}
