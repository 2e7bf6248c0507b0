"""The reliance check: each sample's modality taken from another by a seeded derangement."""

from __future__ import annotations

import pytest
import torch

from mmtune import MiTConfig
from mmtune.metrics import derangement
from mmtune.recipes.train import ModelConfig, OptimConfig, TrainConfig
from mmtune.tasks.model import TaskConfig
from mmtune.training.build import build
from mmtune.training.evaluation import evaluate_split, reliance
from tiny_assets import tiny_llm_dir, tiny_vit_dir


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 101):
        d = derangement(n, seed=3)
        assert sorted(d) == list(range(n)) and all(d[i] != i for i in range(n))
        assert d == derangement(n, seed=3)
    assert derangement(50, seed=0) != derangement(50, seed=1)
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_derangement_avoids_donors_of_the_same_image():
    groups = [i // 3 for i in range(30)]  # three expressions per image, as in RefCOCO
    d = derangement(30, seed=0, groups=groups)
    assert all(d[i] != i for i in range(30)) and sorted(d) == list(range(30))
    assert all(groups[d[i]] != groups[i] for i in range(30))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliance")
    return tiny_llm_dir(root / "llm"), tiny_vit_dir(root / "vit")


def _build(assets, data, method="mit", **task):
    llm, vit = assets
    cfg = TrainConfig(
        task=TaskConfig(data=data, data_options={"num_samples": 60}, **task),
        model=ModelConfig(llm=str(llm), vision=str(vit)),
        mit=MiTConfig(layers=[3, 4]),
        method=method,
        optim=OptimConfig(epochs=1),
        feature_cache=False,
    )
    return build(cfg)


@pytest.mark.parametrize(
    ("data", "method", "fields"),
    [
        ("digits-ve", "mit", {"pooled"}),
        ("digits-ve", "concat", {"pooled", "level2"}),
        ("digits-ve", "text", set()),
        ("shapes-ref", "mit", {"pooled"}),
        ("shapes-ref", "concat", {"token_level2"}),
        ("movie-sentiment", "mit", {"audio", "audio_length", "vision", "vision_length"}),
    ],
)
def test_modality_fields_per_task_and_method(assets, data, method, fields):
    model, _, _, _ = _build(assets, data, method)
    assert set(model.modality_fields()) == fields


class _Accelerator:
    num_processes, process_index, device = 1, 0, torch.device("cpu")

    @staticmethod
    def unwrap_model(m):
        return m


def test_the_swap_feeds_the_donors_modality_and_identity_changes_nothing(assets, monkeypatch):
    model, splits, _, _ = _build(assets, "digits-ve")
    test = splits["test"]
    n = len(test)
    plain = evaluate_split(model, test, _Accelerator, 8)
    same = evaluate_split(model, test, _Accelerator, 8, donors=list(range(n)))
    assert [r["pred"] for r in same["rows"]] == [r["pred"] for r in plain["rows"]]
    seen = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda b: seen.append(b["pooled"]) or real(b))
    donors = derangement(n)
    evaluate_split(model, test, _Accelerator, 8, donors=donors)
    expected = torch.stack([test[donors[i]]["pooled"] for i in range(n)])
    assert torch.equal(torch.cat(seen), expected)


def test_reliance_of_a_text_model_is_none_and_of_mit_is_measured(assets):
    model, splits, _, _ = _build(assets, "digits-ve", "text")
    r = reliance(model, splits["test"], _Accelerator, 8, {"accuracy": 0.5})
    assert r["drop"] is None and r["swapped"] == []
    model, splits, _, _ = _build(assets, "movie-sentiment", "mit")
    mae = evaluate_split(model, splits["test"], _Accelerator, 8)["metrics"]["mae"]
    r = reliance(model, splits["test"], _Accelerator, 8, {"mae": mae})
    assert r["metric"] == "mae" and r["drop"] == pytest.approx(r["deranged"] - mae)


def test_standardized_modality_has_zero_mean_on_train_and_survives_reload(assets, tmp_path):
    from mmtune.recipes.evaluate import load_run
    from mmtune.recipes.train import train
    from mmtune.tasks.model import collate

    llm, vit = assets
    cfg = TrainConfig(
        task=TaskConfig(
            data="digits-ve", data_options={"num_samples": 60}, modality_norm="standardize"
        ),
        model=ModelConfig(llm=str(llm), vision=str(vit)),
        mit=MiTConfig(layers=[3, 4]),
        optim=OptimConfig(epochs=1),
        feature_cache=False,
        plots=False,
        output_dir=str(tmp_path / "run"),
    )
    model, splits, _, _ = build(cfg)
    train_ds = splits["train"]
    batch = collate([train_ds[i] for i in range(len(train_ds))], "classification")
    vector = model.modality(batch)
    assert vector.mean(0).abs().max() < 1e-4 and torch.allclose(
        vector.std(0)[batch["pooled"].std(0) > 1e-5], torch.ones(1), atol=1e-3
    )
    train(cfg, progress=False)
    _, _, again = load_run(tmp_path / "run")
    assert torch.allclose(again.modality(batch), vector, atol=1e-5)


@pytest.mark.parametrize("norm", ["unit", "l2"])
def test_unit_and_l2_modality_scales(assets, norm):
    from mmtune.tasks.model import collate

    model, splits, _, _ = _build(assets, "digits-ve", modality_norm=norm)
    batch = collate([splits["train"][i] for i in range(len(splits["train"]))], "classification")
    norms = model.modality(batch).norm(dim=-1)
    if norm == "l2":
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    else:  # E||z||^2 / d_I = 1 over the training split
        assert (norms**2).mean() == pytest.approx(1.0, rel=0.05)


def test_a_head_without_the_image_reads_the_text_vector_only(assets):
    model, _, _, _ = _build(assets, "digits-ve", head_image=False)
    assert model.head.d_image == 0 and model.modality_fields() == {"pooled": "pooled"}


def test_a_run_saved_before_modality_norm_existed_loads_with_i_unscaled(tmp_path):
    import json
    import warnings
    from dataclasses import asdict

    from mmtune.recipes.evaluate import load_config

    raw = asdict(TrainConfig(task=TaskConfig(data="digits-ve")))
    del raw["task"]["modality_norm"]  # a 0.2 run's config.json
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text(json.dumps(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it records no SHA-256, like runs before 0.2
        assert load_config(tmp_path).task.modality_norm == "none"
    assert TaskConfig().modality_norm == "l2"  # while new runs scale it to unit norm


def test_paired_bootstrap_error_against_the_binomial_formula():
    """For accuracy the paired drop's error is sqrt(b + c - (b - c)^2 / n) / n, b and c the
    samples only one of the two scorings gets right (McNemar's counts)."""
    import numpy as np

    from mmtune.metrics import paired_bootstrap_se

    rng = np.random.default_rng(0)
    n = 2000
    own = rng.random(n) < 0.8
    other = np.where(rng.random(n) < 0.3, ~own, own)  # 30% of the samples change
    b, c = int((own & ~other).sum()), int((~own & other).sum())
    expected = np.sqrt(b + c - (b - c) ** 2 / n) / n
    se = paired_bootstrap_se(np.mean, own.tolist(), other.tolist(), resamples=400)
    assert se == pytest.approx(expected, rel=0.15)
    assert paired_bootstrap_se(np.mean, own.tolist(), own.tolist()) == 0.0
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap_se(np.mean, [1, 0], [1])


def test_an_untrained_mit_model_is_flagged_as_not_using_the_modality(assets):
    """MiT at init is the frozen model (gated form) and the head sees no image: every
    prediction is the same with the donors' I, so the drop is 0 and the guard warns."""
    from mmtune.training.evaluation import unused_modality_warning

    model, splits, _, _ = _build(assets, "digits-ve", head_image=False)
    test = splits["test"]
    scored = evaluate_split(model, test, _Accelerator, 8)
    acc = scored["metrics"]["accuracy"]
    r = reliance(model, test, _Accelerator, 8, {"accuracy": acc}, rows=scored["rows"])
    assert r["drop"] == 0.0 and r["drop_se"] == 0.0 and r["uses_modality"] is False
    assert r["warning"].startswith("the modality is not used: accuracy")
    assert "--method text" in r["warning"] and "drop_se" in r["conventions"]
    r2 = reliance(model, test, _Accelerator, 8, {"accuracy": acc})  # no rows: no verdict
    assert "uses_modality" not in r2
    seg = unused_modality_warning({**r, "metric": "oIoU"}, "segmentation")
    assert "decoder reads the image maps itself" in seg
