"""One-line errors: ``mmtune: error: <file or field>: <what>``, exit 2, no traceback."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mmtune.recipes.train import train

from .conftest import cli_env, last_line


def _one_line(proc, starts: str, contains: str = "") -> str:
    line = last_line(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert line.startswith(f"mmtune: error: {starts}"), line
    assert contains in line, line
    return line


def test_yaml_errors_name_the_file_and_line(tmp_path, mmtune):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {data: digits-ve\noptim: [\n")
    _one_line(mmtune("train", bad), f"{bad}, line 2, column 6: not valid YAML")


def test_config_field_errors_are_one_line(tmp_path, write_yaml, mmtune):
    config = write_yaml(tmp_path / "run")
    _one_line(
        mmtune("train", config, "--task.data_options", "{num_samples: 80, sed: 1}"),
        "task.data_options: unknown option(s) ['sed']",
    )
    _one_line(mmtune("train", config, "--optim.decay_every", "0"), "optim.decay_every must be")
    _one_line(mmtune("train", config, "--keep_checkpoints", "-1"), "keep_checkpoints must be")


def test_debug_shows_the_traceback(tmp_path, write_yaml, mmtune):
    config = write_yaml(tmp_path / "run")
    for proc in (
        mmtune("train", config, "--keep_checkpoints", "0", "--debug"),
        mmtune(
            "train",
            config,
            "--keep_checkpoints",
            "0",
            env={**cli_env(tmp_path), "MMTUNE_DEBUG": "1"},
        ),
    ):
        assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_output_dirs_that_cannot_be_written_are_refused_before_any_work(
    tmp_path, write_yaml, mmtune
):
    config = write_yaml(tmp_path / "run")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_line(mmtune("train", config, "--output_dir", a_file), f"{a_file}: exists and is not")
    _one_line(mmtune("train", config, "--output_dir", a_file / "sub"), f"{a_file / 'sub'}: output")
    _one_line(mmtune("train", config, "--output_dir", "/sys/mmtune-run"), "/sys/mmtune-run: output")


def test_unreadable_jsonl_names_the_file(tmp_path, mmtune):
    path = tmp_path / "snli_ve_train.jsonl"
    path.write_bytes(b'\xff\xfe\x00garbage\n{"a": 1}\n')
    _one_line(mmtune("data", "inspect", path, "--format", "snli-ve"), f"{path}, line 1: not UTF-8")
    folder = tmp_path / "snli_ve_dev.jsonl"
    folder.mkdir()
    _one_line(mmtune("data", "inspect", folder, "--format", "snli-ve"), f"{folder}")


@pytest.fixture
def finished(make_config, tmp_path):
    out = tmp_path / "done"
    train(make_config(out, epochs=1), progress=False)
    return out


def test_predict_inputs_are_checked(finished, tmp_path, mmtune, make_config):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    _one_line(
        mmtune(
            "predict",
            finished,
            "The digit is odd.",
            "--image",
            tmp_path / "x.png",
            "--out",
            tmp_path,
        ),
        f"{tmp_path}: is a directory",
    )
    sentiment = tmp_path / "sentiment"
    train(make_config(sentiment, data="movie-sentiment", epochs=1), progress=False)
    not_npz = tmp_path / "frames.npz"
    not_npz.write_text("not an archive")
    _one_line(
        mmtune("predict", sentiment, "A fine film.", "--frames", not_npz),
        f"{not_npz}: not a readable .npz",
    )
    np.savez(tmp_path / "ok.npz", audio=np.zeros((3, 5)), vision=np.full((2, 20), np.inf))
    _one_line(
        mmtune("predict", sentiment, "A fine film.", "--frames", tmp_path / "ok.npz"),
        f"{tmp_path / 'ok.npz'}: array 'vision' holds NaN",
    )


def test_a_truncated_adapter_is_one_line_naming_the_file(finished, mmtune):
    weights = finished / "adapter" / "task.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    _one_line(mmtune("eval", finished), f"{weights}: 64 bytes, but")


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, write_yaml, mmtune):
    with _tmpfs(tmp_path / "small", "48k") as disk:
        out = disk / "run"
        proc = mmtune("train", write_yaml(out), "--quiet", "true")
        line = _one_line(proc, str(out), "no space left on device")
        assert not (out / "results.json").exists()
        assert line


def test_eval_on_a_read_only_run_prints_its_metrics_first(finished, tmp_path, mmtune):
    import shutil

    with _tmpfs(tmp_path / "ro", "64m") as disk:
        run = disk / "done"
        shutil.copytree(finished, run)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
        if remount.returncode != 0:
            pytest.skip("cannot remount read-only here")
        proc = mmtune("eval", run)
        assert f"{run} on test: accuracy" in proc.stdout
        _one_line(proc, str(run / "eval-test.json"), "Read-only file system")
        config, new = tmp_path / "ro.yaml", disk / "new"  # the same run, another output_dir
        settings = json.loads((finished / "run.json").read_text())["config"]
        config.write_text(json.dumps({**settings, "output_dir": str(new)}))
        ro = mmtune("train", config, "--quiet", "true")
        _one_line(ro, str(new), "output_dir is not writable (Read-only file system)")
        expected = json.loads((finished / "results.json").read_text())["metrics"]["accuracy"]
        assert f"accuracy {expected:.4f}" in proc.stdout
