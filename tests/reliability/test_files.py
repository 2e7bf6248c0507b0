"""Written files follow the umask; a killed cache build leaves nothing behind for good."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from mmtune.utils.cache import DirectoryCache
from mmtune.utils.io import atomic_write, save_tensors, write_json


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_tensors(tmp_path / "b.safetensors", {"w": torch.ones(2)})
        with atomic_write(tmp_path / "c.txt") as tmp:
            tmp.write_text("c")
    finally:
        os.umask(old)
    for name in ("a.json", "b.safetensors", "c.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_run_outputs_follow_the_umask(make_config, tmp_path):
    from mmtune.recipes.train import train

    old = os.umask(0o022)
    try:
        train(make_config(tmp_path / "run", epochs=1), progress=False)
    finally:
        os.umask(old)
    for f in ("results.json", "final/trainable.safetensors", "checkpoints/epoch-001/state.json"):
        assert stat.S_IMODE((tmp_path / "run" / f).stat().st_mode) == 0o644, f


def test_the_next_build_removes_a_killed_builds_temp_dir(tmp_path):
    cache = DirectoryCache("things", tmp_path)
    key = {"v": 1}
    entry = cache.entry_path("x", key)
    cache.dir.mkdir(parents=True)
    stale = cache.dir / f".{entry.name}.abc123"  # what a build killed with -9 leaves
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"\0" * 10)
    path, hit = cache.get_or_build("x", key, lambda d: (d / "f.txt").write_text("ok"))
    assert not hit and (path / "f.txt").read_text() == "ok"
    assert not stale.exists()


def test_atomic_write_refuses_a_directory_target(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"), atomic_write(tmp_path):
        pass
