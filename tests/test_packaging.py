"""The configs ship inside the package: an installed mmtune finds them from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from mmtune.utils.configs import packaged_configs, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_config_path_that_names_no_file_here_is_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = packaged_configs() / "demo" / "digits-ve.yaml"
    assert shipped.is_file()
    assert resolve_config("demo/digits-ve.yaml") == shipped
    assert resolve_config("configs/demo/digits-ve.yaml") == shipped
    assert resolve_config("demo") == packaged_configs() / "demo"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "digits-ve.yaml").write_text("seed: 1\n")  # the user's own wins
    assert resolve_config("demo/digits-ve.yaml") == Path("demo/digits-ve.yaml")
    assert resolve_config("nowhere.yaml") == Path("nowhere.yaml")


def test_the_checkout_configs_folder_is_the_shipped_one():
    assert (ROOT / "configs").resolve() == (ROOT / "src" / "mmtune" / "configs").resolve()


def test_a_built_wheel_ships_every_config_and_runs_them_from_another_directory(tmp_path):
    """pip builds the wheel (no network: the build backend is already installed), the wheel
    holds every YAML of configs/, and the installed copy, run from an unrelated directory,
    reads the shipped demo config."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("mmtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "mmtune/configs/" + p.relative_to(packaged_configs()).as_posix()
        for p in packaged_configs().rglob("*.yaml")
    }
    assert expected and expected <= names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-m", "mmtune.cli", "train", "--config", "demo/digits-ve.yaml",
         "--print_config"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "data: digits-ve" in run.stdout and "output_dir: runs/demo/digits-ve" in run.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import mmtune.utils.configs as c; print(c.resolve_config('demo'))"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(target)
