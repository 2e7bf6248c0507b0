"""SIGKILL at random moments of one short run, resuming after each: the end is unchanged.

The moments are random but tied to the run's progress, so each of the ten kills lands on a
live process: during start-up (data, models, the lower-layer cache), or a random delay after
epoch k's checkpoint appears (mid-epoch, mid-save, or during the final evaluation and save).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import cli_env

KILLS, EPOCHS = 10, 8


def _done(out: Path) -> int:
    epochs = [int(p.name[6:]) for p in (out / "checkpoints").glob("epoch-[0-9]*")]
    return max(epochs, default=0)


@pytest.mark.slow  # about a minute and a half: a dozen process starts
def test_ten_random_kills_then_resume_give_the_uninterrupted_result(tmp_path, write_yaml):
    env = cli_env(tmp_path)
    cmd = [sys.executable, "-m", "mmtune.cli", "train"]
    whole = tmp_path / "whole"
    subprocess.run(
        [*cmd, write_yaml(whole, epochs=EPOCHS, samples=400), "--quiet", "true"],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    out = tmp_path / "killed"
    config = write_yaml(out, epochs=EPOCHS, samples=400)
    rng = random.Random(0)
    kills = []
    while len(kills) < KILLS:
        resume = ["--resume", "true"] if (out / "run.json").is_file() else []
        done = _done(out)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*cmd, config, "--quiet", "true", *resume],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if done >= EPOCHS or rng.random() < 0.3:  # start-up: reading data, building models
            target, delay = None, rng.uniform(0.3, 3.5)
        else:
            target, delay = done + 1, rng.uniform(0.0, 0.45)  # within the next epoch
        while target is not None and _done(out) < target and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        err = proc.stderr.read()
        assert alive and rc == -signal.SIGKILL, (kills, target, delay, rc, err[-2000:])
        kills.append(
            (
                f"after epoch {target}" if target else "start-up",
                round(delay, 2),
                round(time.perf_counter() - start, 1),
            )
        )
    if not (out / "results.json").is_file():  # a kill after results.json leaves a finished run
        last = subprocess.run(
            [*cmd, config, "--quiet", "true", "--resume", "true"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert last.returncode == 0, last.stderr[-2000:]
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert b["metrics"] == a["metrics"], kills
    assert [e["train_loss"] for e in b["history"]] == [e["train_loss"] for e in a["history"]]
    wa = load_file(str(whole / "final" / "trainable.safetensors"))
    wb = load_file(str(out / "final" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa), kills
    print(f"kills (phase, delay s, seconds alive): {kills}")
