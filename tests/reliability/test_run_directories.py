"""A run directory belongs to one run: lock, refusal of another run, strict resume, finishing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mmtune.recipes.train import train
from mmtune.training.rundir import Finisher, RunLock

from .conftest import ROOT, last_line


def _hold_lock(out):
    """A process that holds ``out``'s run lock until it is killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from mmtune.training.rundir import "
            "RunLock\nwith RunLock(Path(sys.argv[1])):\n    print('held', flush=True); "
            "time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_locked_dir_fails_at_once_naming_the_holder(
    make_config, tmp_path, write_yaml, mmtune
):
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        start = time.perf_counter()
        proc = mmtune("train", write_yaml(out), "--quiet", "true")
        assert proc.returncode == 2 and time.perf_counter() - start < 30
        line = last_line(proc)
        assert line.startswith(f"mmtune: error: {out}: another run is using this output_dir")
        assert f"pid {holder.pid}" in line
        assert not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_the_holder_dies(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)
    holder.kill()
    holder.wait()
    with RunLock(out):  # kill -9 frees it: no stale lock to clear by hand
        pass


def test_another_run_is_refused_unless_resume_or_overwrite(make_config, tmp_path):
    out = tmp_path / "run"
    first = train(make_config(out, epochs=1, seed=0), progress=False)
    with pytest.raises(ValueError, match=r"holds a finished run; pass --resume true"):
        train(make_config(out, epochs=1, seed=1), progress=False)
    assert json.loads((out / "results.json").read_text())["metrics"] == first["metrics"]
    (out / "eval-test.json").write_text("{}")
    again = train(make_config(out, epochs=2, seed=1, overwrite=True), progress=False)
    assert again["config"]["seed"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-001", "epoch-002"]
    assert not (out / "eval-test.json").exists()  # the old run's files went with it


def test_an_unfinished_run_is_refused_too(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(out, epochs=1), progress=False)
    (out / "results.json").unlink()
    with pytest.raises(ValueError, match="holds an unfinished run"):
        train(make_config(out, epochs=1), progress=False)


def test_resume_refuses_changed_settings_and_lists_them(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(out, epochs=1), progress=False)
    cfg = make_config(out, epochs=2, resume=True, seed=3)
    cfg.optim.lr = 0.01
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.001 -> 0\.01; seed: 0 -> 3"):
        train(cfg, progress=False)


def test_resume_on_an_empty_dir_says_nothing_to_resume(make_config, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        train(make_config(tmp_path / "empty", resume=True), progress=False)


def test_resume_of_a_finished_run_needs_more_epochs(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(out, epochs=1), progress=False)
    with pytest.raises(ValueError, match="already finished its 1 epochs"):
        train(make_config(out, epochs=1, resume=True), progress=False)
    more = train(make_config(out, epochs=2, resume=True), progress=False)
    assert [e["epoch"] for e in more["history"]] == [1, 2]


def test_finishing_shows_results_only_with_the_matching_rest(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    finish = Finisher(out)
    (finish.stage / "final").mkdir()
    (finish.stage / "final" / "trainable.safetensors").write_text("new")
    (finish.stage / "results.json").write_text('{"new": true}')
    real = os.replace

    def killed_before_results(src, dst):
        if str(dst).endswith("results.json"):
            raise KeyboardInterrupt  # the process dies right after final/ is in place
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_results)
    with pytest.raises(KeyboardInterrupt):
        finish.commit()
    assert (out / "final").is_dir() and not (out / "results.json").exists()  # never a mix


def test_a_kill_after_final_resumes_into_a_complete_run(make_config, tmp_path):
    whole = train(make_config(tmp_path / "whole", epochs=2), progress=False)
    out = tmp_path / "run"
    train(make_config(out, epochs=2), progress=False)
    (out / "results.json").unlink()  # what a kill between final/ and results.json leaves
    again = train(make_config(out, epochs=2, resume=True), progress=False)
    assert again["metrics"] == whole["metrics"]
    assert (out / "results.json").is_file()


def test_keep_checkpoints_below_one_is_refused(make_config, tmp_path):
    for keep in (0, -1):
        with pytest.raises(ValueError, match=f"keep_checkpoints must be >= 1, got {keep}"):
            make_config(tmp_path / "run", keep_checkpoints=keep)


def test_resume_and_overwrite_together_are_refused(make_config, tmp_path):
    with pytest.raises(ValueError, match="resume and overwrite: choose one"):
        make_config(tmp_path / "run", resume=True, overwrite=True)


def test_a_compare_cell_that_was_stopped_is_resumed_not_refused(tmp_path):
    from mmtune.recipes.compare import Cell, _command

    cell = Cell("b.yaml", "v.yaml", 0, None)
    out = tmp_path / "cell"
    assert "--resume" not in _command(cell, out) and "--overwrite" not in _command(cell, out)
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert _command(cell, out)[-2:] == ["--resume", "true"]
    (out / "run.json").unlink()
    (out / "checkpoints").mkdir()
    assert _command(cell, out)[-2:] == ["--overwrite", "true"]
