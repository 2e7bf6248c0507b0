"""MRT (and every ``lmm`` method) on the shared training loop: resume continues bit for bit, a
killed run resumes to the uninterrupted result, two CPU processes train one model (DDP), and the
schedule and clipping settings reach the optimiser."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tests.tiny_assets import tiny_llm_dir, tiny_vit_dir

from mmtune.methods.mrt import MRTConfig
from mmtune.models.lmm import LMMConfig
from mmtune.recipes.instruct import Stage1Config, TuneConfig, stage1, tune

MRT = MRTConfig(llm_layers=[0, 2], first=2, last=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    lmm = LMMConfig(
        llm=str(tiny_llm_dir(root / "llm")), vision=str(tiny_vit_dir(root / "vit")),
        system_prompt=None,
    )  # fmt: skip
    out = root / "stage1"
    stage1(Stage1Config(lmm=lmm, num_samples=20, batch_size=8, lr=1e-2, output_dir=out))
    return out


def _cfg(base, out, epochs, **kw):
    fields = dict(
        benchmark="digits", method="mrt", base=base, num_samples=40, epochs=epochs, batch_size=4,
        lr=1e-2, mrt=MRT, output_dir=out, eval_batch_size=10,
    )  # fmt: skip
    return TuneConfig(**{**fields, **kw})


def _env(tmp_path):
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MMTUNE_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }


def test_resume_continues_bit_for_bit(base, tmp_path):
    whole = tune(_cfg(base, tmp_path / "whole", epochs=3))
    tune(_cfg(base, tmp_path / "split", epochs=1))  # stops after epoch 1 (its checkpoint stays)
    resumed = tune(_cfg(base, tmp_path / "split", epochs=3, resume=True))
    assert resumed["losses"] == whole["losses"] and len(whole["losses"]) == 3 * 6
    assert resumed["test"] == {**whole["test"], "seconds": resumed["test"]["seconds"]}
    a = load_file(tmp_path / "whole" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "split" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(base, tmp_path):
    tune(_cfg(base, tmp_path / "run", epochs=1))
    with pytest.raises(ValueError, match=r"cannot resume with other settings: lr: 0.01 -> 0.02"):
        tune(_cfg(base, tmp_path / "run", epochs=2, resume=True, lr=2e-2))


def test_a_fresh_run_removes_an_older_runs_checkpoints(base, tmp_path):
    tune(_cfg(base, tmp_path / "run", epochs=2))
    assert (tmp_path / "run" / "checkpoints" / "epoch-002").is_dir()
    tune(_cfg(base, tmp_path / "run", epochs=1))  # not a resume: epoch 2 of the old run goes
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["epoch-001"]


def test_schedule_and_clipping_reach_the_optimiser(base, tmp_path, monkeypatch):
    from mmtune.training import loop

    seen = {}
    real = loop.fit

    def spy(model, **kw):
        result = real(model, **kw)
        seen["settings"] = kw["settings"]
        seen["lr"] = [g["lr"] for g in kw["param_groups"]]
        return result

    monkeypatch.setattr(loop, "fit", spy)
    r = tune(_cfg(base, tmp_path / "run", epochs=2, decay_every=1, decay_gamma=0.5, grad_clip=0.1))
    s = seen["settings"]
    assert (s.decay_every, s.decay_gamma, s.grad_clip, s.optimizer) == (1, 0.5, 0.1, "adamw")
    assert seen["lr"] == [1e-2] and r["steps"] == 12


def _cli(base, out, epochs, *extra):
    return [
        "lmm", "tune", "--method", "mrt", "--base", str(base), "--num_samples", "60",
        "--epochs", str(epochs), "--batch_size", "2", "--lr", "0.01",
        "--mrt.llm_layers", "[0, 2]", "--mrt.first", "2", "--mrt.last", "2",
        "--eval_batch_size", "15", "--output_dir", str(out), "--quiet", "true", *extra,
    ]  # fmt: skip


@pytest.mark.slow  # three process starts
def test_a_killed_run_resumes_to_the_uninterrupted_result(base, tmp_path):
    cmd = [sys.executable, "-m", "mmtune.cli"]
    env = _env(tmp_path)
    subprocess.run([*cmd, *_cli(base, tmp_path / "whole", 4)], check=True, env=env, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, *_cli(base, out, 4)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "epoch-001").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "results.json").exists()
    subprocess.run([*cmd, *_cli(base, out, 4, "--resume", "true")], check=True, env=env)
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert b["losses"] == a["losses"] and b["test"]["exact_match"] == a["test"]["exact_match"]


def test_two_process_ddp_on_cpu(base, tmp_path):
    out = tmp_path / "ddp"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",  # a free port for the rendezvous, never a fixed one
            "-m",
            "mmtune.cli",
            *_cli(base, out, 2),
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2
    assert results["steps"] == 2 * (36 // (2 * 2))  # 36 train items, batch 2 on each of 2 ranks
    last = out / "checkpoints" / "epoch-002"
    digests = {p.read_text() for p in last.glob("trainable-sha256-rank*.txt")}
    assert len(list(last.glob("trainable-sha256-rank*.txt"))) == 2 and len(digests) == 1
    assert (out / "adapter" / "adapter.safetensors").is_file()
