"""Stage 1, instruction tuning of every method, the VQA table and the lmm CLI, end to end on tiny
random models (the real code paths: models loaded from directories, adapters written to disk)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from tests.tiny_assets import tiny_llm_dir, tiny_vit_dir

from mmtune.cli import main
from mmtune.data.vqa import VQA_BENCHMARKS, exact_match
from mmtune.methods.mrt import MRTConfig, load_mrt
from mmtune.metrics import derangement
from mmtune.models.lmm import LMMConfig, load_lmm
from mmtune.recipes.instruct import (
    METHODS,
    Stage1Config,
    TuneConfig,
    _pixels,
    _prompt,
    fit,
    generate_answers,
    load_tuned,
    stage1,
    tune,
)
from mmtune.recipes.vqa_table import TableConfig, table_report, vqa_table


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    lmm = LMMConfig(
        llm=str(tiny_llm_dir(root / "llm")), vision=str(tiny_vit_dir(root / "vit")),
        system_prompt=None,
    )  # fmt: skip
    out = root / "stage1"
    r = stage1(Stage1Config(lmm=lmm, num_samples=20, batch_size=8, lr=1e-2, output_dir=out))
    assert r["captions"] == 24 and r["params"]["trainable"] == 0  # projector frozen again
    assert len(r["losses"]) == 3
    return out


@pytest.mark.parametrize("method", METHODS)
def test_tune_each_method_end_to_end(method, stage1_dir, tmp_path):
    out = tmp_path / method
    cfg = TuneConfig(
        benchmark="digits", method=method, base=stage1_dir, num_samples=20, epochs=1,
        batch_size=6, lr=1e-2, mrt=MRTConfig(llm_layers=[0, 2], first=2, last=2), output_dir=out,
    )  # fmt: skip
    waits = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = tune(cfg, answers=lambda stage, done, total, info: waits.append((stage, done, total)))
    # e.g. transformers 5.2x: "`past_key_values` is deprecated ... Use `cache` instead"
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], seen
    saved = json.loads((out / "results.json").read_text())
    for split in ("val", "test"):  # the answering reports each batch
        done = [d for s, d, _ in waits if s == f"answer {split}"]
        assert done[0] == 0 and done[-1] == next(t for s, _, t in waits if s == f"answer {split}")
    assert saved["test"]["num_samples"] == 5 and 0.0 <= saved["test"]["exact_match"] <= 1.0
    assert saved["method"] == method and len(saved["examples"]) == 5
    base_meta = json.loads((stage1_dir / "adapter_config.json").read_text())  # which base
    assert saved["base_sha256"] == base_meta["sha256"]["adapter.safetensors"]
    rel = saved["reliance"]  # the test split again, each image from another item
    assert rel["metric"] == "exact_match" and rel["headline"] == saved["test"]["exact_match"]
    assert rel["drop"] == pytest.approx(rel["headline"] - rel["deranged"]) and rel["seed"] == 0
    assert [d for s, d, _ in waits if s == "reliance"][-1] == 1  # one batch of 5 items
    if method == "zero-shot":
        assert r["params"]["trainable"] == 0 and r["steps"] == 0 and saved["curve"] == []
        assert not (out / "adapter").exists()
    else:
        assert r["steps"] == 2 and r["params"]["trainable"] > 0
        # the epoch's val score is the final one, answered once
        assert [c["val_exact_match"] for c in saved["curve"]] == [saved["val"]["exact_match"]]
        assert len([d for s, d, _ in waits if s == "answer val" and d == 0]) == 1
        weights = "adapter_model" if method == "lora" else "adapter"  # LoRA: PEFT's own format
        assert (out / "adapter" / f"{weights}.safetensors").is_file()
        card = (out / "adapter" / "README.md").read_text()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["base_model"] and f"lmm-{method}" in meta["tags"]
        assert f"| test | {saved['test']['exact_match']:.4f} | 5 |" in card
        # the saved adapter alone gives the same answers (greedy decoding)
        items = VQA_BENCHMARKS["digits"](num_samples=20)["test"]
        again = load_tuned(out / "adapter")
        base = getattr(again, "base_model", again)
        preds = generate_answers(
            again,
            [_prompt(it) for it in items],
            _pixels(base, items),
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
        )
        assert preds[:5] == [e["prediction"] for e in saved["examples"]]
        donors = derangement(len(items), 0)
        assert all(d != i for i, d in enumerate(donors))
        swapped = generate_answers(
            again,
            [_prompt(it) for it in items],
            [_pixels(base, items)[d] for d in donors],
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
        )
        assert rel["deranged"] == exact_match(swapped, [it["answer"] for it in items])
    if method == "lora":  # and PEFT loads the LLM's part itself
        from peft import PeftModel

        llm = PeftModel.from_pretrained(load_lmm(stage1_dir).llm, out / "adapter")
        ids = again.tokenizer(["Which digit is shown?"], return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(llm(**ids).logits, again.llm(**ids).logits)
    if method == "mrt":
        assert r["params"]["share"] < 0.2
        model = load_mrt(out / "adapter")  # without the training script
        assert model.edit_names == [
            "vision.1",
            "projector",
            "llm.0",
            "llm.2",
        ]  # -1: the last block read


def test_val_curve_does_not_change_training(stage1_dir, tmp_path):
    """Scoring val after each epoch leaves the training itself as it was."""
    runs = {}
    for curve in (True, False):
        cfg = TuneConfig(
            benchmark="shapes", method="mrt", base=stage1_dir, num_samples=20, epochs=3,
            batch_size=6, lr=1e-2, mrt=MRTConfig(llm_layers=[0, 2], first=2, last=2),
            val_curve=curve, output_dir=tmp_path / str(curve), save_adapter=False,
            checkpoint=False,
        )  # fmt: skip
        runs[curve] = tune(cfg)
    assert runs[True]["losses"] == runs[False]["losses"] and len(runs[True]["losses"]) == 6
    assert [c["epoch"] for c in runs[True]["curve"]] == [1, 2, 3]
    assert all(c["val_exact_match"] is None for c in runs[False]["curve"])
    assert runs[True]["curve"][-1]["val_exact_match"] == runs[True]["val"]["exact_match"]


def test_fit_puts_the_model_back_in_training_mode_after_validate(stage1_dir):
    model = load_lmm(stage1_dir)
    model.projector.requires_grad_(True)
    items = VQA_BENCHMARKS["digits"](num_samples=20)["train"]
    modes, epochs = [], []

    def validate(epoch):
        model.eval()  # as answering does
        epochs.append(epoch)
        return {"exact_match": 0.5}

    log = fit(
        model, items, _pixels(model, items), prompt=_prompt, target="answer", epochs=2,
        batch_size=6, lr=1e-2, seed=0, validate=validate,
        on_step=lambda *_: modes.append(model.projector.training),
    )  # fmt: skip
    assert epochs == [1, 2] and modes == [True, True, True, True]
    assert [e["val"] for e in log["epochs"]] == [{"exact_match": 0.5}] * 2


def test_lora_dropout_trains_while_the_frozen_llm_stays_in_eval_mode(stage1_dir):
    from mmtune.methods.concat import PeftAdapterConfig, inject_peft

    model = load_lmm(stage1_dir)
    inject_peft(model.llm, "lora", PeftAdapterConfig(lora_dropout=0.5))
    dropouts = [m for n, m in model.llm.named_modules() if n.endswith("lora_dropout.default")]
    frozen = [m for n, m in model.llm.named_modules() if "lora" not in n and n]
    assert dropouts and frozen
    model.train()
    assert all(m.training for m in dropouts) and not any(m.training for m in frozen)
    assert not any(m.training for m in model.tower.modules())
    model.eval()
    assert not any(m.training for m in model.modules())


def test_table_rebuilds_a_base_without_its_weights(stage1_dir, tmp_path):
    """A committed base keeps adapter_config.json and results.json, not the weights."""
    import shutil

    base = tmp_path / "stage1"
    shutil.copytree(stage1_dir, base)
    (base / "adapter.safetensors").unlink()
    lmm = LMMConfig(
        llm=str(stage1_dir.parent / "llm"), vision=str(stage1_dir.parent / "vit"),
        system_prompt=None,
    )  # fmt: skip
    lines = []
    cfg = TableConfig(
        base=base, stage1=Stage1Config(lmm=lmm, num_samples=20, batch_size=8),
        benchmarks=["digits"], methods=["zero-shot"], num_samples=20, output_dir=tmp_path / "vqa",
    )  # fmt: skip
    vqa_table(cfg, log=lines.append)
    assert lines[0] == f"stage 1 -> {base}" and (base / "adapter.safetensors").is_file()


def test_table_and_lmm_cli(stage1_dir, tmp_path, capsys):
    cfg = TableConfig(
        base=stage1_dir, benchmarks=["shapes"], methods=["zero-shot", "mrt"], seeds=[0, 1],
        epochs=1, num_samples=20, batch_size=8, output_dir=tmp_path / "vqa",
    )  # fmt: skip
    table = vqa_table(cfg)
    methods = [(r["method"], r["seeds"]) for r in table["rows"]]
    assert methods == [("zero-shot", [0]), ("mrt", [0, 1])]
    md = (tmp_path / "vqa" / "vqa.md").read_text()
    assert "| shapes | mrt |" in md and "| reliance drop |" in md
    mrt_row = next(r for r in table["rows"] if r["method"] == "mrt")
    assert mrt_row["reliance_drop"]["n"] == 2 and "not measured" not in md
    seeds = [json.loads((tmp_path / f"vqa/runs/shapes/mrt/seed{s}/results.json").read_text())
             for s in (0, 1)]  # fmt: skip
    mean = sum(r["curve"][0]["val_exact_match"] for r in seeds) / 2
    assert mrt_row["val_by_epoch"] == [pytest.approx(mean)] and f"| {mean:.3f} |" in md
    assert (tmp_path / "vqa" / "curves.png").stat().st_size > 0
    mtime = (tmp_path / "vqa/runs/shapes/mrt/seed1/results.json").stat().st_mtime
    vqa_table(cfg)  # resumable: finished cells are reused
    assert (tmp_path / "vqa/runs/shapes/mrt/seed1/results.json").stat().st_mtime == mtime
    assert table_report(tmp_path / "vqa")["rows"] == table["rows"]
    held = tmp_path / "vqa/runs/shapes/mrt/seed2"
    held.mkdir(parents=True)
    (held / ".running").touch()  # another table process holds this cell
    cfg.seeds = [0, 1, 2]
    vqa_table(cfg)
    assert not (held / "results.json").exists() and (held / ".running").exists()

    # lmm table from the CLI: every flag reaches TableConfig (adapters kept on request)
    main(["lmm", "table", "--base", str(stage1_dir), "--benchmarks", "[shapes]", "--methods",
          "[mrt]", "--seeds", "[3]", "--epochs", "1", "--num_samples", "20", "--output_dir",
          str(tmp_path / "vqa"), "--save_adapters", "true", "--lr", "{mrt: 0.05}",
          "--decay_every", "1", "--decay_gamma", "0.5"])  # fmt: skip
    assert (tmp_path / "vqa/runs/shapes/mrt/seed3/adapter/adapter.safetensors").is_file()
    seed3 = json.loads((tmp_path / "vqa/runs/shapes/mrt/seed3/results.json").read_text())
    assert seed3["lr"] == 0.05
    assert (seed3["config"]["decay_every"], seed3["config"]["decay_gamma"]) == (1, 0.5)
    with pytest.raises(ValueError, match=r"TableConfig.lr: \['full'\]"):
        TableConfig(lr={"full": 1e-3})
    assert not (tmp_path / "vqa/runs/shapes/mrt/seed0/adapter").exists()
    assert "| shapes | mrt |" in capsys.readouterr().out

    # lmm tune + generate from the CLI, with control
    main(["lmm", "tune", "--benchmark", "shapes", "--base", str(stage1_dir), "--num_samples",
          "20", "--epochs", "1", "--lr", "0.05", "--output_dir", str(tmp_path / "cli"),
          "--mrt.llm_layers", "[0, 1]", "--quiet", "true"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "shapes / mrt: test exact match" in printed and "reliance: exact_match" in printed
    adapter = str(tmp_path / "cli" / "adapter")
    outputs = []
    for extra in ([], ["--scale", "0"], ["--edit_scales", '{"llm.1": 3.0}', "--last", "1"]):
        main(["lmm", "generate", "--adapter", adapter, "--item", "shapes:test:0",
              "--max_new_tokens", "4", *extra])  # fmt: skip
        outputs.append(capsys.readouterr().out.strip().splitlines())
    assert all(o[0].startswith("item vqa-shapes-0-") for o in outputs)
    # benchmark-level control: every edit off scores exactly as the zero-shot base model
    main(["lmm", "eval", adapter, "--benchmark", "shapes", "--num_samples", "20",
          "--scale", "0", "--output", str(tmp_path / "eval.json")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "shapes test (n = 5): exact match" in printed and "reliance: exact_match" in printed
    zero_shot = json.loads((tmp_path / "vqa/runs/shapes/zero-shot/seed0/results.json").read_text())
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["exact_match"] == zero_shot["test"]["exact_match"]
    assert scored["reliance"]["deranged"] == zero_shot["reliance"]["deranged"]
    assert scored["predictions"][:5] == [e["prediction"] for e in zero_shot["examples"]]
    main(["lmm", "generate", "--base", str(stage1_dir), "--item", "shapes:test:0",
          "--max_new_tokens", "4"])  # fmt: skip
    base_out = capsys.readouterr().out.strip().splitlines()
    assert outputs[1] == base_out  # scale 0 = the base model
    with pytest.raises(SystemExit):
        main(["lmm", "generate", "--adapter", adapter, "--item", "shapes:test:0",
              "--edit_scales", '{"nope": 1}'])  # fmt: skip
    assert "MRTControl.edit_scales" in capsys.readouterr().err


def test_stage1_and_tune_configs_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="not among"):
        Stage1Config(benchmarks=["coco"])
    with pytest.raises(ValueError, match=r"TuneConfig.method"):
        TuneConfig(method="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"MRTConfig.llm_rank"):
        MRTConfig(llm_rank=0)


def test_tune_refuses_a_base_that_captioned_its_test_images(stage1_dir, tmp_path):
    # stage 1 captioned the train images of 20 items: 12 of them; with num_samples 10 this
    # run's val and test images (items 6-9) are among those
    cfg = TuneConfig(
        benchmark="digits", method="zero-shot", base=stage1_dir, num_samples=10,
        output_dir=tmp_path / "leak",
    )  # fmt: skip
    with pytest.raises(ValueError, match="stage 1 captioned the train images of 20 digits"):
        tune(cfg)
    assert not (tmp_path / "leak").exists()
    broken = tmp_path / "base"
    broken.mkdir()
    (broken / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"not stage 1's results\.json"):
        tune(TuneConfig(benchmark="digits", method="zero-shot", base=broken, output_dir=tmp_path))
