"""Every trained run is an adapter with a card, loadable through each documented route."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mmtune import MiTConfig, MiTModel, load_llm
from mmtune.recipes.evaluate import evaluate_run, load_run
from mmtune.recipes.train import ModelConfig, OptimConfig, TrainConfig, train
from mmtune.tasks.model import TaskConfig
from mmtune.utils.io import IntegrityError
from tiny_assets import tiny_llm_dir, tiny_vit_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return tiny_llm_dir(root / "llm"), tiny_vit_dir(root / "vit")


def _train(assets, out: Path, method: str, data: str) -> dict:
    llm, vit = assets
    cfg = TrainConfig(
        task=TaskConfig(data=data, data_options={"num_samples": 64}),
        model=ModelConfig(llm=str(llm), vision=str(vit)),
        method=method.split("+")[0],
        peft=method.split("+")[1] if "+" in method else "none",
        mit=MiTConfig(layers=[3, 4]),
        optim=OptimConfig(epochs=1, batch_size=8, lr=1e-2, head_lr_scale=1.0),
        output_dir=str(out),
        feature_cache=False,
        plots=False,
    )
    return train(cfg, progress=False)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


CASES = [
    ("mit", "digits-ve"),
    ("text", "movie-sentiment"),
    ("concat", "shapes-ref"),
    ("concat+lora", "digits-ve"),
    ("concat+ia3", "digits-ve"),
]


@pytest.mark.parametrize(("method", "data"), CASES)
def test_a_run_writes_an_adapter_with_a_card_that_loads_anywhere(assets, tmp_path, method, data):
    run = tmp_path / "run"
    results = _train(assets, run, method, data)
    adapter = run / "adapter"
    files = {str(p.relative_to(adapter)) for p in adapter.rglob("*") if p.is_file()}
    expected = {
        "adapter_config.json",
        "adapter.safetensors",
        "task.safetensors",
        "mmtune_run.json",
        "README.md",
        "manifest.json",
    }
    if "+" in method:
        expected |= {"peft/adapter_config.json", "peft/adapter_model.safetensors"}
    assert files == expected
    meta = _front_matter((adapter / "README.md").read_text())
    assert meta["library_name"] == "mmtune" and meta["base_model"] == str(assets[0])
    assert "mmtune" in meta["tags"] and method.replace("+", "-") in meta["tags"]
    card = (adapter / "README.md").read_text()
    headline, value = next(iter(results["headline"].items()))
    assert f"| {headline} | {value:.4f} |" in card and "## How to load" in card
    run_file = json.loads((adapter / "mmtune_run.json").read_text())
    assert run_file["frozen"]["llm"] == str(assets[0])
    assert (run_file["frozen"]["vision"] is None) == (data == "movie-sentiment")

    # The adapter alone, moved away from its run, scores what the run scored.
    moved = tmp_path / "elsewhere" / "my-adapter"
    shutil.copytree(adapter, moved)
    shutil.rmtree(run)
    again = evaluate_run(moved, "test", write=False)
    assert again["metrics"][headline] == pytest.approx(value, abs=1e-6)


def test_mit_run_adapter_loads_with_mit_model_from_pretrained(assets, tmp_path):
    run = tmp_path / "run"
    _train(assets, run, "mit", "digits-ve")
    _, spec, model = load_run(run)
    llm, tokenizer = load_llm(str(assets[0]))
    mit = MiTModel.from_pretrained(llm, run / "adapter")
    trained = model.llm.adapter_state_dict()
    assert set(mit.adapter_state_dict()) == set(trained)
    assert all(torch.equal(mit.adapter_state_dict()[k], v) for k, v in trained.items())
    ids = tokenizer(["a prompt"], return_tensors="pt")
    modality = torch.randn(1, spec["d_modality"])
    with torch.no_grad():
        ours = model.llm(**ids, modality=modality).logits
        theirs = mit(**ids, modality=modality).logits
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_peft_baselines_are_saved_in_peft_format(assets, tmp_path, kind):
    from peft import PeftModel

    run = tmp_path / "run"
    _train(assets, run, f"concat+{kind}", "digits-ve")
    _, _, model = load_run(run)
    fresh, tokenizer = load_llm(str(assets[0]))
    ids = tokenizer(["a prompt of some words"], return_tensors="pt")
    with torch.no_grad():
        base = fresh(**ids).logits
        peft = PeftModel.from_pretrained(fresh, run / "adapter" / "peft")
        theirs = peft(**ids).logits
        ours = model.llm(**ids).logits
    torch.testing.assert_close(ours, theirs)
    assert (theirs - base).abs().max() > 1e-6  # the adapters changed something


def test_a_changed_adapter_file_is_refused(assets, tmp_path):
    run = tmp_path / "run"
    _train(assets, run, "mit", "digits-ve")
    task = run / "adapter" / "task.safetensors"
    data = bytearray(task.read_bytes())
    data[-1] ^= 0xFF
    task.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"task\.safetensors"):
        load_run(run)
