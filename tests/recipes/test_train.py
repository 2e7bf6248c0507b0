"""End-to-end training on tiny random models: every task, kill-and-resume, 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from mmtune import MiTConfig
from mmtune.recipes.train import ModelConfig, OptimConfig, TrainConfig, train
from mmtune.tasks.model import TaskConfig
from tiny_assets import tiny_llm_dir, tiny_vit_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return tiny_llm_dir(root / "llm"), tiny_vit_dir(root / "vit")


def _config(assets, data, out, epochs=2, samples=120, **extra):
    llm, vit = assets
    return TrainConfig(
        task=TaskConfig(data=data, data_options={"num_samples": samples}),
        model=ModelConfig(llm=str(llm), vision=str(vit)),
        mit=MiTConfig(layers=[3, 4]),
        optim=OptimConfig(epochs=epochs, batch_size=8, lr=1e-3, head_lr_scale=1.0),
        output_dir=str(out),
        feature_cache=False,
        **extra,
    )


@pytest.mark.parametrize("data", ["digits-ve", "shapes-ref", "movie-sentiment"])
def test_each_task_trains_end_to_end_and_reports(assets, tmp_path, data):
    cfg = _config(assets, data, tmp_path / "run")
    results = train(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["metrics"] == results["metrics"] and saved["conventions"]
    assert saved["config"]["task"]["data"] == data and saved["versions"]["mmtune"]
    assert 0 < saved["parameters"]["trainable"] < saved["parameters"]["total"]
    relies = saved["reliance"]
    assert relies["metric"] == next(iter(saved["headline"])) and relies["swapped"]
    assert isinstance(relies["deranged"], float) and isinstance(relies["drop"], float)
    assert relies["drop_se"] >= 0 and relies["uses_modality"] == (
        relies["drop"] > 2 * relies["drop_se"]
    )
    assert (relies["warning"] is None) == relies["uses_modality"]
    for epoch in saved["history"]:  # the val reliance curve
        assert isinstance(epoch["val"]["reliance_drop"], float)
        assert epoch["val"]["reliance_drop_se"] >= 0
    assert saved["lower_layer_cache"]["first_infused_layer"] == 3
    assert saved["lower_layer_cache"]["bytes"] > 0
    ids = [
        json.loads(line)["id"]
        for line in (tmp_path / "run" / "predictions-test.jsonl").read_text().splitlines()
    ]
    assert (
        len(ids)
        == len(set(ids))
        == saved["metrics"]["num_samples"]
        == saved["data"]["splits"]["test"]
    )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "epoch-001",
        "epoch-002",
    ]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    pictures = {
        "digits-ve": {"curves"},
        "shapes-ref": {"curves", "masks"},
        "movie-sentiment": {"curves", "scatter"},
    }[data]
    assert set(saved["pictures"]) == pictures
    assert all(Path(p).stat().st_size > 1000 for p in saved["pictures"].values())
    assert (tmp_path / "run" / "final" / "trainable.safetensors").is_file()


def test_lower_layer_cache_gives_the_same_training(assets, tmp_path):
    # Epoch 1 and the first evaluations fill the cache; epoch 2 and the test split read it.
    a = train(_config(assets, "digits-ve", tmp_path / "a", epochs=2), progress=False)
    b = train(
        _config(assets, "digits-ve", tmp_path / "b", epochs=2, cache_lower_layers=False),
        progress=False,
    )
    assert b["lower_layer_cache"] is None
    cache = a["lower_layer_cache"]
    assert cache["bytes"] > 0 and cache["filling_epoch_seconds"] == a["history"][0]["seconds"]
    assert cache["cached_epoch_seconds"] == a["history"][1]["seconds"]
    assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
    for ea, eb in zip(a["history"], b["history"], strict=True):
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-4)
        assert ea["val"]["accuracy"] == eb["val"]["accuracy"]


def test_the_cache_keeps_every_prompt_it_has_seen_and_none_under_training_dropout(assets):
    from mmtune.tasks.model import collate
    from mmtune.training.build import build

    model, splits, _, _ = build(_config(assets, "digits-ve", "unused", samples=40))
    ds = splits["val"]
    batch = collate([ds[i] for i in range(len(ds))], "classification")
    prompts = model.prompts(batch)
    assert not model.lower_cache.has(prompts)
    model.eval()
    with torch.no_grad():
        uncached = model(batch)["logits"]  # fills the cache
        assert model.lower_cache.has(prompts)
        assert torch.allclose(model(batch)["logits"], uncached, atol=1e-5)  # reads it
    model.lower_cache.states.clear()
    model.decoder_backbone.config.attention_dropout = 0.1
    model.train()
    model(batch)
    assert not model.lower_cache.states  # dropout in training: states differ per pass
    model.eval()
    model(batch)
    assert model.lower_cache.has(prompts)  # evaluation still keeps them


def test_samples_with_the_same_prompt_share_one_cache_entry(assets):
    # The frozen layers below the first infused one read only the prompt: one entry per
    # distinct prompt, which serves samples of other images (and other splits) too.
    from mmtune.tasks.model import collate
    from mmtune.training.build import build

    model, splits, _, _ = build(_config(assets, "digits-ve", "unused", samples=60))
    model.eval()
    train, test = splits["train"], splits["test"]
    seen = collate([train[i] for i in range(len(train))], "classification")
    with torch.no_grad():
        model(seen)
    distinct = set(model.prompts(seen))
    assert len(distinct) < len(train)  # the generator's hypotheses repeat
    assert set(model.lower_cache.states) == distinct
    states = model.lower_cache.states
    marked = {p: t + 1.0 for p, t in states.items()}  # stand-ins a second store would replace
    states.update(marked)
    missing = next(iter(distinct))
    del states[missing]
    with torch.no_grad():  # a batch lacking one prompt: the full forward stores only that one
        model(collate([train[i] for i in reversed(range(len(train)))], "classification"))
    assert set(states) == distinct
    assert all(torch.equal(states[p], t) for p, t in marked.items() if p != missing)
    assert not torch.equal(states[missing], marked[missing])
    states.update({p: t - 1.0 for p, t in marked.items() if p != missing})
    wording = model.prompts(collate([test[i] for i in range(len(test))], "classification"))
    known = [i for i, prompt in enumerate(wording) if prompt in distinct]
    other = collate([test[i] for i in known], "classification")
    assert known and model.lower_cache.has(model.prompts(other))
    with torch.no_grad():
        cached = model(other)["logits"]  # other images, prompts seen: the upper layers only
        model.lower_cache = None
        full = model(other)["logits"]
    assert torch.allclose(cached, full, atol=1e-5)


def _yaml(assets, tmp_path, out: Path, epochs: int, samples: int) -> Path:
    llm, vit = assets
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(f"""
task: {{data: digits-ve, data_options: {{num_samples: {samples}}}}}
model: {{llm: {llm}, vision: {vit}}}
mit: {{layers: [3, 4]}}
optim: {{epochs: {epochs}, batch_size: 4, lr: 1.0e-3, head_lr_scale: 1.0}}
output_dir: {out}
feature_cache: false
plots: false
""")
    return path


def _env(tmp_path):
    return {
        **os.environ,
        "MMTUNE_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(assets, tmp_path):
    epochs, samples = 4, 600
    whole = tmp_path / "whole"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mmtune.cli",
            "train",
            str(_yaml(assets, tmp_path, whole, epochs, samples)),
            "--quiet",
            "true",
        ],
        check=True,
        env=_env(tmp_path),
        capture_output=True,
    )
    broken = tmp_path / "broken"
    cmd = [
        sys.executable,
        "-m",
        "mmtune.cli",
        "train",
        str(_yaml(assets, tmp_path, broken, epochs, samples)),
        "--quiet",
        "true",
    ]
    proc = subprocess.Popen(
        cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "epoch-001").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before epoch 1 saved"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (broken / "results.json").exists()
    assert not (broken / "checkpoints" / "epoch-004").exists()
    subprocess.run([*cmd, "--resume", "true"], check=True, env=_env(tmp_path), capture_output=True)
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((broken / "results.json").read_text())
    assert b["metrics"] == a["metrics"]
    assert [e["train_loss"] for e in b["history"]] == [e["train_loss"] for e in a["history"]]


def test_two_process_ddp_on_cpu(assets, tmp_path):
    out = tmp_path / "ddp"
    config = _yaml(assets, tmp_path, out, epochs=2, samples=160)
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
            "train",
            str(config),
            "--quiet",
            "true",
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2
    last = out / "checkpoints" / "epoch-002"
    digests = {p.read_text() for p in last.glob("trainable-sha256-rank*.txt")}
    assert len(list(last.glob("trainable-sha256-rank*.txt"))) == 2 and len(digests) == 1
    ids = [
        json.loads(line)["id"] for line in (out / "predictions-test.jsonl").read_text().splitlines()
    ]
    assert len(ids) == len(set(ids)) == results["data"]["splits"]["test"]  # each sample once


def test_eval_and_predict_from_a_run_directory(assets, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from mmtune import cli

    run = tmp_path / "seg"
    results = train(_config(assets, "shapes-ref", run, epochs=1), progress=False)
    cli.main(["eval", str(run), "--split", "test"])
    saved = json.loads((run / "eval-test.json").read_text())
    assert saved["metrics"]["oIoU"] == pytest.approx(results["metrics"]["oIoU"], abs=1e-6)
    image = np.zeros((64, 80, 3), np.uint8)
    image[10:30, 10:30] = (40, 80, 220)
    Image.fromarray(image).save(tmp_path / "scene.png")
    cli.main(
        [
            "predict",
            str(run),
            "the blue square",
            "--image",
            str(tmp_path / "scene.png"),
            "--out",
            str(tmp_path / "mask.png"),
        ]
    )
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Image.open(answer["overlay"]).size == (80, 64)
    cls = tmp_path / "cls"
    train(_config(assets, "digits-ve", cls, epochs=1), progress=False)
    cli.main(
        [
            "predict",
            str(cls),
            "The digit is even.",
            "--image",
            str(tmp_path / "scene.png"),
        ]
    )
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["class"] in {"entailment", "neutral", "contradiction"}


def test_task_token_pooling_trains_and_is_saved(assets, tmp_path):
    import torch
    from safetensors.torch import load_file

    cfg = _config(assets, "digits-ve", tmp_path / "tok", epochs=1)
    cfg.task.pooling = "task_token"
    results = train(cfg, progress=False)
    assert results["lower_layer_cache"] is None  # the token enters at layer 0: nothing to cache
    saved = load_file(str(tmp_path / "tok" / "final" / "trainable.safetensors"))
    assert "task_token.embedding" in saved
    from mmtune.recipes.evaluate import load_run

    _, _, model = load_run(tmp_path / "tok")
    batch = {"id": ["a", "b"], "text": ["The digit is even.", "The digit is odd."]}
    with torch.no_grad():
        before = model.text_vector(batch, torch.zeros(2, model.llm.mit_config.d_modality))
        model.task_token.embedding.add_(1.0)
        after = model.text_vector(batch, torch.zeros(2, model.llm.mit_config.d_modality))
    assert (before - after).abs().max() > 1e-3  # the pooled vector is read at the task token


@pytest.mark.parametrize(
    ("method", "data"),
    [
        ("concat+lora", "digits-ve"),
        ("concat+ia3", "shapes-ref"),
        ("concat", "movie-sentiment"),
        ("text", "digits-ve"),
    ],
)
def test_baselines_train_and_reload_through_the_same_path(assets, tmp_path, method, data):
    """Each baseline trains, saves only its own tensors, and `mmtune eval` rebuilds the run."""
    from safetensors.torch import load_file

    from mmtune.recipes.evaluate import evaluate_run

    run = tmp_path / method
    name, _, peft = method.partition("+")
    cfg = _config(assets, data, run, epochs=1, method=name, peft=peft or "none")
    results = train(cfg, progress=False)
    assert (results["config"]["method"], results["config"]["peft"]) == (name, peft or "none")
    saved = load_file(str(run / "final" / "trainable.safetensors"))
    keys = set(saved)
    assert not any("infusion" in k for k in keys)  # no MiT tensors in a baseline
    if method.startswith("concat"):
        assert any(k.startswith("projector.") for k in keys)
    if method == "concat+lora":
        assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    if method == "concat+ia3":
        assert any("ia3_l" in k for k in keys)
    if method == "text":  # only the head trains; the whole frozen LLM's output is cached
        assert all(k.startswith("head.") for k in keys)
        assert results["lower_layer_cache"]["first_infused_layer"] == 5  # N + 1
    headline = next(iter(results["headline"]))
    again = evaluate_run(run, "test")
    assert again["metrics"][headline] == pytest.approx(results["metrics"][headline], abs=1e-6)


def test_every_long_wait_of_a_run_is_reported_through_the_progress_callback(assets, tmp_path):
    calls = []
    train(
        _config(assets, "digits-ve", tmp_path / "run", epochs=2, samples=60),
        progress=lambda stage, done, total, info: calls.append((stage, done, total, info)),
    )
    stages = list(dict.fromkeys(c[0] for c in calls))
    assert stages == [
        "encode digits-ve-train",
        "encode digits-ve-val",
        "encode digits-ve-test",
        "digits-ve epoch 1/2",  # no cache fill pass: the first epoch fills it
        "eval val",
        "reliance",  # the val reliance curve (TrainConfig.val_reliance), then the test's
        "digits-ve epoch 2/2",
        "eval test",
    ]
    for stage in stages:  # each starts at 0 and ends at its total, counting up by one
        done = [c[1] for c in calls if c[0] == stage]
        total = {c[2] for c in calls if c[0] == stage}
        assert len(total) == 1 and done[0] == 0 and done[-1] == total.pop()
    epoch = [c for c in calls if c[0] == "digits-ve epoch 1/2" and c[1] > 0]
    assert all(c[3]["loss"] > 0 and c[3]["samples_s"] > 0 for c in epoch)


def test_a_run_that_does_not_read_the_image_is_warned_before_the_decay_and_at_the_end(
    assets, tmp_path, capsys
):
    """At a vanishing learning rate MiT stays the frozen model and the head reads no image:
    the val drop is 0 at the epoch before the decay (a Python warning) and the test drop is
    0 (results.json's reliance.warning, printed by the CLI)."""
    from mmtune.cli import _reliance_line

    cfg = _config(assets, "digits-ve", tmp_path / "run", epochs=2, samples=60)
    cfg.task.head_image = False
    cfg.mit.form = "gated"
    cfg.optim.lr, cfg.optim.decay_every = 1e-12, 1
    cfg.optim.decay_waits_for_modality = False
    with pytest.warns(UserWarning, match="after epoch 1 the val accuracy drops by"):
        results = train(cfg, progress=False)
    r = results["reliance"]
    assert r["drop"] == 0.0 and r["uses_modality"] is False
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["reliance"]["warning"] == r["warning"]
    assert "mmtune: warning: the modality is not used" in _reliance_line(r)


def test_the_decay_waits_while_the_modality_is_not_read(assets, tmp_path):
    """decay_waits_for_modality: epochs whose val drop is within noise do not count toward
    decay_every, so a model that does not read I keeps its learning rate; with the wait off,
    the decay comes after epoch 1 as configured."""
    lrs = {}
    for waits in (True, False):
        cfg = _config(assets, "digits-ve", tmp_path / f"run-{waits}", epochs=3, samples=60)
        cfg.task.head_image, cfg.mit.form = False, "gated"
        cfg.optim.lr, cfg.optim.decay_every = 1e-12, 1
        cfg.optim.decay_waits_for_modality = waits
        with pytest.warns(UserWarning) if not waits else _no_warning():
            history = train(cfg, progress=False)["history"]
        lrs[waits] = [e["lr"] for e in history]
        assert [e.get("decay_held", False) for e in history] == [waits, waits, False]
    assert lrs[True] == [1e-12, 1e-12, 1e-12]
    assert lrs[False] == pytest.approx([1e-12, 1e-13, 1e-14])


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def guard():
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="after epoch")
            yield

    return guard()


def test_step_decay_is_steplr_without_holds_and_reads_old_checkpoints():
    from mmtune.training.loop import StepDecay

    p = torch.nn.Parameter(torch.zeros(1))
    ours, ref_opt = torch.optim.Adam([p], lr=1e-3), torch.optim.Adam([p], lr=1e-3)
    mine, ref = StepDecay(ours, 2, 0.1), torch.optim.lr_scheduler.StepLR(ref_opt, 2, 0.1)
    for epoch in range(1, 8):
        mine.step(epoch)
        ref.step()
        assert ours.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    old = StepDecay(torch.optim.Adam([p], lr=1e-3), 2, 0.1)
    old.load_state_dict(ref.state_dict())  # a checkpoint written before StepDecay
    assert (old.counted, old.decays, old.held) == (7, 3, [])
    held = StepDecay(torch.optim.Adam([p], lr=1e-3), 1, 0.1)
    held.step(1, hold=True)
    held.step(2)
    held.step(3, hold=True)  # after the first decay a hold is ignored
    assert held.held == [1] and held.decays == 2


def test_plateau_decay_is_reduce_lr_on_plateau_and_stops_after_its_last_decay():
    from mmtune.training.loop import PlateauDecay

    p = torch.nn.Parameter(torch.zeros(1))
    ours, ref_opt = torch.optim.Adam([p], lr=1e-3), torch.optim.Adam([p], lr=1e-3)
    mine = PlateauDecay(ours, 0.1, 0.005, max_decays=10)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, mode="max", factor=0.1, patience=0, threshold=0.005, threshold_mode="abs"
    )
    for epoch, v in enumerate([0.5, 0.6, 0.603, 0.7, 0.69, 0.71, 0.712, 0.8], start=1):
        mine.step(epoch, v)
        ref.step(v)
        assert ours.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert mine.decays == 3 and not mine.stopped
    stop = PlateauDecay(torch.optim.Adam([p], lr=1.0), 0.1, 0.0, max_decays=1)
    for epoch, (v, hold) in enumerate([(0.9, True), (0.3, False), (0.3, False)], start=1):
        stop.step(epoch, v, hold=hold)  # a held epoch sets no best
    assert (stop.held, stop.decays, stop.stopped) == ([1], 1, False)
    stop.step(4, 0.2)
    assert stop.stopped and stop.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    again = PlateauDecay(torch.optim.Adam([p], lr=1.0), 0.1, 0.0, max_decays=1)
    again.load_state_dict(stop.state_dict())
    assert again.state_dict() == stop.state_dict()


def test_the_plateau_schedule_ends_the_run_and_a_resume_keeps_it_ended(assets, tmp_path):
    """schedule plateau at a vanishing learning rate: the val accuracy never improves after
    epoch 1, so epoch 2 decays, epoch 3 stops the run (max_decays 1) before optim.epochs;
    resuming the finished run with more epochs trains nothing more."""
    cfg = _config(assets, "digits-ve", tmp_path / "run", epochs=6, samples=60)
    cfg.task.head_image, cfg.mit.form = False, "gated"
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.max_decays = 1e-12, "plateau", 1
    cfg.optim.decay_waits_for_modality = False
    history = train(cfg, progress=False)["history"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert [e["lr"] for e in history] == pytest.approx([1e-12, 1e-12, 1e-13])
    assert history[-1]["stopped"] is True
    cfg.resume, cfg.optim.epochs = True, 8
    assert [e["epoch"] for e in train(cfg, progress=False)["history"]] == [1, 2, 3]


@pytest.mark.parametrize("method", ["mit", "concat"])
def test_gradient_checkpointing_trains_the_same_run(assets, tmp_path, method, monkeypatch):
    """TrainConfig.gradient_checkpointing: every epoch's loss, the val curve and the test
    metrics equal the run without it (MiT replays each layer with its modality), and the
    layers were checkpointed (torch's checkpoint ran)."""
    import transformers.modeling_utils as hf

    calls = [0]
    checkpoint = hf.checkpoint

    def counted(*args, **kwargs):
        calls[0] += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(hf, "checkpoint", counted)
    runs = {}
    for on in (False, True):
        cfg = _config(assets, "digits-ve", tmp_path / f"run-{on}", epochs=2, samples=60)
        cfg.method, cfg.gradient_checkpointing = method, on
        runs[on] = train(cfg, progress=False)
        assert (calls[0] > 0) == on
    a, b = runs[False], runs[True]
    assert [e["train_loss"] for e in b["history"]] == pytest.approx(
        [e["train_loss"] for e in a["history"]], abs=1e-5
    )
    assert b["metrics"]["accuracy"] == a["metrics"]["accuracy"]
    assert b["config"]["gradient_checkpointing"] is True


def test_the_val_reliance_curve_changes_no_training_step(assets, tmp_path):
    """The committed figures stay true: the val reliance check (its own seeded donors, in
    eval mode) changes no step, so a run whose decay does not wait (the modality read before
    the decay epoch, or segmentation) is the run of mmtune 0.4: every loss and the test
    metrics equal the run without the check."""
    runs = {}
    for on in (False, True):
        cfg = _config(assets, "digits-ve", tmp_path / f"run-{on}", epochs=3, samples=60)
        cfg.optim.decay_every, cfg.optim.decay_waits_for_modality = 2, False
        cfg.val_reliance = on
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "may settle on a text-only solution" one
            runs[on] = train(cfg, progress=False)
    a, b = runs[False], runs[True]
    assert (
        "reliance_drop" in b["history"][0]["val"] and "reliance_drop" not in a["history"][0]["val"]
    )
    assert [e["train_loss"] for e in b["history"]] == [e["train_loss"] for e in a["history"]]
    assert b["metrics"] == a["metrics"]
