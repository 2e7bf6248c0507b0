"""Content-verified caches: hit, miss, invalidation, corruption, two processes at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mmtune.utils.cache import DirectoryCache, FeatureCache, cache_root, content_hash


def _writer(calls: list[str], payload: bytes = b"x" * 1000):
    def build(tmp):
        calls.append("built")
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")

    return build


def test_directory_cache_hit_miss_and_key_change(tmp_path):
    cache, calls = DirectoryCache("models", tmp_path), []
    path, hit = cache.get_or_build("m", {"v": 1}, _writer(calls))
    assert not hit and calls == ["built"]
    assert (path / "weights.bin").read_bytes() == b"x" * 1000
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.bin", "sub/config.json"}
    again, hit = cache.get_or_build("m", {"v": 1}, _writer(calls))
    assert hit and again == path and calls == ["built"]
    other, hit = cache.get_or_build("m", {"v": 2}, _writer(calls))
    assert not hit and other != path and calls == ["built", "built"]
    assert not list(cache.dir.glob(".m-*"))  # no temporary directories left


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_file"])
def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path, damage):
    cache, calls = DirectoryCache("models", tmp_path), []
    path, _ = cache.get_or_build("m", {"v": 1}, _writer(calls))
    f = path / "weights.bin"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:500])
    elif damage == "flip":
        f.write_bytes(b"y" + f.read_bytes()[1:])  # same size, other content
    elif damage == "delete_manifest":
        (path / "manifest.json").unlink()
    else:
        f.unlink()
    assert not cache.is_valid(path, {"v": 1})
    again, hit = cache.get_or_build("m", {"v": 1}, _writer(calls))
    assert not hit and again == path and calls == ["built", "built"]
    assert f.read_bytes() == b"x" * 1000


def test_a_failing_builder_leaves_no_entry(tmp_path):
    cache = DirectoryCache("models", tmp_path)

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"partial")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="killed"):
        cache.get_or_build("m", {"v": 1}, broken)
    assert not cache.entry_path("m", {"v": 1}).exists()
    assert [p.name for p in cache.dir.iterdir() if not p.name.endswith(".lock")] == []


def test_two_processes_at_once_build_once(tmp_path):
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from mmtune.utils.cache import DirectoryCache
        def build(tmp):
            with open({str(tmp_path / "log")!r}, "a") as log:
                log.write("built\\n")
            time.sleep(1.0)
            (tmp / "w.bin").write_bytes(b"z" * 4096)
        path, hit = DirectoryCache("models", {str(tmp_path / "cache")!r}).get_or_build(
            "m", {{"v": 1}}, build)
        print(path, hit, (path / "w.bin").read_bytes() == b"z" * 4096)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert (tmp_path / "log").read_text() == "built\n"  # one conversion, not two
    assert outs[0][0] == outs[1][0] and {o[1] for o in outs} == {"True", "False"}
    assert all(o[2] == "True" for o in outs)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MMTUNE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("MMTUNE_CACHE")
    assert cache_root().name == "mmtune"


def test_feature_cache_hit_miss_invalidation_and_truncation(tmp_path):
    cache, calls = FeatureCache(tmp_path), []

    def compute():
        calls.append(1)
        return {"pooled": torch.arange(12.0).view(3, 4)}

    key = {"encoder": "e1", "preprocess": {"size": 8}, "inputs": content_hash([np.ones(3)])}
    a = cache.get_or_compute("set", key, compute)
    assert cache.last_hit is False and len(calls) == 1
    b = cache.get_or_compute("set", key, compute)
    assert cache.last_hit is True and len(calls) == 1 and torch.equal(a["pooled"], b["pooled"])
    for change in (
        {"encoder": "e2"},
        {"preprocess": {"size": 9}},
        {"inputs": content_hash([np.zeros(3)])},
    ):
        cache.get_or_compute("set", {**key, **change}, compute)
        assert cache.last_hit is False
    assert len(calls) == 4
    f = cache.entries.entry_path("set", key) / "features.safetensors"
    f.write_bytes(f.read_bytes()[:-7])  # truncated
    c = cache.get_or_compute("set", key, compute)
    assert cache.last_hit is False and len(calls) == 5
    assert torch.equal(c["pooled"], torch.arange(12.0).view(3, 4))


def test_content_hash_sees_shape_dtype_and_values():
    x = np.arange(6, dtype=np.float32)
    assert content_hash([x]) == content_hash([x.copy()])
    assert content_hash([x]) != content_hash([x.reshape(2, 3)])
    assert content_hash([x]) != content_hash([x.astype(np.float64)])
    assert content_hash([x]) == content_hash([torch.from_numpy(x)])
    with pytest.raises(TypeError, match="cannot hash"):
        content_hash([object()])
