"""Validation at the door: config fields, data problems, truncation, unused inputs."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.data import annotation_mask, load_mmsa, load_refcoco, load_snli_ve
from mmtune.recipes.train import ModelConfig, OptimConfig, TrainConfig, train
from mmtune.tasks.model import TaskConfig
from mmtune.training.build import build
from tiny_assets import tiny_llm_dir, tiny_vit_dir


def test_an_unknown_data_option_is_named(make_config, tmp_path):
    cfg = make_config(tmp_path / "run")
    cfg.task.data_options = {"num_samples": 80, "seeed": 1}
    with pytest.raises(ValueError, match=r"task\.data_options: unknown option\(s\) \['seeed'\]"):
        train(cfg, progress=False)


def test_decay_every_must_be_positive_or_null(make_config, tmp_path):
    with pytest.raises(ValueError, match=r"optim\.decay_every must be >= 1, or null"):
        OptimConfig(decay_every=0)
    cfg = make_config(tmp_path / "run", epochs=2)
    cfg.optim.decay_every = None  # explicit: no decay
    cfg.optim.decay_gamma = 0.5
    train(cfg, progress=False)
    from mmtune.training import checkpoint as ckpt

    state = ckpt.load_state(tmp_path / "run" / "checkpoints" / "epoch-002", "state")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- SNLI-VE


def _snli(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "snli_ve_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(pair: str, text, label="entailment") -> dict:
    return {"Flikr30kID": "1.jpg", "pairID": pair, "sentence2": text, "gold_label": label}


def test_snli_rows_sharing_a_pair_id_are_refused(tmp_path):
    path = _snli(tmp_path, [_row("p1", "A dog."), _row("p2", "A cat."), _row("p1", "A cow.")])
    with pytest.raises(ValueError, match=r"snli_ve_train\.jsonl: lines 1 and 3 share the id 'p1'"):
        load_snli_ve(path)


@pytest.mark.parametrize("text", [None, "", "   "])
def test_null_or_empty_hypotheses_are_refused_naming_file_and_line(tmp_path, text):
    path = _snli(tmp_path, [_row("p1", "A dog."), _row("p2", text)])
    with pytest.raises(ValueError, match=r"snli_ve_train\.jsonl, line 2: field 'sentence2'"):
        load_snli_ve(path)


# ----------------------------------------------------------------------------- RefCOCO


def _refcoco(tmp_path: Path, polygon: list[float], image_size=(40, 30)) -> Path:
    folder = tmp_path / "refcoco"
    (tmp_path / "images" / "train2014").mkdir(parents=True)
    folder.mkdir()
    Image.new("RGB", image_size).save(tmp_path / "images" / "train2014" / "a.jpg")
    (folder / "instances.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 40}],
                "annotations": [{"id": 7, "image_id": 1, "segmentation": [polygon]}],
            }
        )
    )
    refs = [
        {
            "ref_id": r,
            "ann_id": 7,
            "image_id": 1,
            "split": split,
            "sentences": [{"sent_id": r, "sent": "the square"}],
        }
        for r, split in enumerate(["train", "val", "test"])
    ]
    path = folder / "refs(unc).p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    return path


SQUARE = [5.0, 5.0, 20.0, 5.0, 20.0, 20.0, 5.0, 20.0]


def test_an_image_whose_size_disagrees_with_instances_is_refused_in_training(tmp_path):
    refs = _refcoco(tmp_path, SQUARE, image_size=(41, 30))
    data = load_refcoco(refs)
    with pytest.raises(ValueError, match=r"a\.jpg: image is 41x30 but instances\.json says 40x30"):
        data.splits["train"].check_image_sizes()
    cfg = TrainConfig(task=TaskConfig(data=str(refs)), model=_tiny_model_config(tmp_path))
    with pytest.raises(ValueError, match="image is 41x30"):  # the training path checks too
        build(cfg)


def _tiny_model_config(tmp_path):
    llm, vit = tiny_llm_dir(tmp_path / "llm"), tiny_vit_dir(tmp_path / "vit")
    return ModelConfig(llm=str(llm), vision=str(vit))


@pytest.mark.parametrize(
    ("polygon", "match"),
    [
        ([5.0, float("nan"), 20.0, 5.0, 20.0, 20.0], "NaN or infinite"),
        ([5.0, 5.0, 5.0, 5.0, 5.0, 5.0], "covers no pixel"),
        ([100.0, 100.0, 120.0, 100.0, 120.0, 120.0], "covers no pixel"),
    ],
)
def test_degenerate_polygons_are_refused(polygon, match):
    with pytest.raises(ValueError, match=f"annotation 7: .*{match}"):
        annotation_mask([polygon], 30, 40, where="annotation 7")


# ----------------------------------------------------------------------------- MMSA


def _mmsa(path: Path, **change) -> Path:
    rng = np.random.default_rng(0)
    data = {}
    for split in ("train", "valid", "test"):
        data[split] = {
            "raw_text": [f"{split} sentence {i}" for i in range(4)],
            "audio": rng.normal(size=(4, 6, 5)).astype(np.float32),
            "vision": rng.normal(size=(4, 5, 20)).astype(np.float32),
            "regression_labels": np.array([-3.0, -0.4, 0.0, 2.6], dtype=np.float32),
            "audio_lengths": [6, 3, 1, 2],
            "vision_lengths": [5, 5, 2, 1],
            "id": [f"vid_{i}" for i in range(4)],
        }
    for key, value in change.items():
        data["train"][key] = value
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def test_a_modality_that_is_mostly_non_finite_is_named(tmp_path):
    path = _mmsa(tmp_path / "m.pkl", vision=np.full((4, 5, 20), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"split 'train': field 'vision' is 100% NaN or infinite"):
        load_mmsa(path)


def test_zero_length_frames_are_refused(tmp_path):
    path = _mmsa(tmp_path / "m.pkl", audio_lengths=[6, 0, 1, 2])
    with pytest.raises(ValueError, match=r"audio_lengths\[1\] is 0 \(sample id 'vid_1'\)"):
        load_mmsa(path)


def test_mmsa_empty_texts_and_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"raw_text\[2\] is empty"):
        load_mmsa(_mmsa(tmp_path / "a.pkl", raw_text=["a", "b", "", "d"]))
    with pytest.raises(ValueError, match="id 'x' appears more than once"):
        load_mmsa(_mmsa(tmp_path / "b.pkl", id=["x", "y", "x", "z"]))


def test_huge_frame_values_name_the_samples(make_config, tmp_path):
    from mmtune.tasks.model import collate

    cfg = make_config(tmp_path / "run", data="movie-sentiment")
    model, splits, _, _ = build(cfg)
    items = [dict(splits["train"][i]) for i in range(3)]
    items[1]["audio"] = np.full_like(np.asarray(items[1]["audio"]), 1e30)
    batch = collate(items, "sentiment")
    with pytest.raises(ValueError, match=rf"samples \['{items[1]['id']}'\]: the encoded"):
        model(batch)


# ----------------------------------------------------------------------------- truncation


def test_a_long_text_is_cut_at_its_end_keeping_the_statement_start(make_config, tmp_path):
    cfg = make_config(tmp_path / "run")
    model, _, _, _ = build(cfg)
    filler = " ".join(["word"] * 10_000)
    prompts, cut = model.fit_prompts(
        [f"The digit is even. {filler}", f"The digit is odd. {filler}"]
    )
    assert cut == 2
    assert prompts[0] != prompts[1]
    assert "The digit is even." in prompts[0] and "The digit is odd." in prompts[1]
    template = model.prompt.template
    assert prompts[0].startswith(template.split("{")[0]) and prompts[0].endswith(
        template.split("}")[-1]
    )
    for p in prompts:
        assert len(model.tokenizer(p)["input_ids"]) <= cfg.task.max_length
    a, b = (model.tokenize([p])["input_ids"] for p in prompts)
    assert not torch.equal(a, b)  # "even" and "odd" reach the model


def test_cut_prompts_are_counted_in_one_warning(make_config, tmp_path):
    cfg = make_config(tmp_path / "run")
    cfg.task.max_length = 16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(cfg)
    cut = [w for w in caught if "longer than task.max_length=16" in str(w.message)]
    assert len(cut) == 1 and str(cut[0].message).split(" of ")[0].isdigit()


# ----------------------------------------------------------------------------- unused inputs


def test_inputs_the_run_does_not_read_are_named_in_a_warning(make_config, tmp_path):
    from mmtune.recipes.evaluate import predict

    run = tmp_path / "run"
    train(make_config(run, epochs=1), progress=False)
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    np.savez(tmp_path / "f.npz", audio=np.zeros((3, 5), np.float32))
    with pytest.warns(UserWarning, match=r"--frames .*f\.npz: this classification run reads no"):
        out = predict(run, "The digit is even.", tmp_path / "x.png", tmp_path / "f.npz")
    assert out["class"] in {"entailment", "neutral", "contradiction"}


def test_an_image_for_a_sentiment_run_is_named_in_a_warning(make_config, tmp_path):
    from mmtune.recipes.evaluate import predict

    run = tmp_path / "sentiment"
    train(make_config(run, data="movie-sentiment", epochs=1), progress=False)
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    np.savez(tmp_path / "f.npz", audio=np.zeros((3, 5)), vision=np.zeros((2, 20)))
    with pytest.warns(UserWarning, match=r"--image .*x\.png: a sentiment run reads no image"):
        out = predict(run, "A fine film.", tmp_path / "x.png", tmp_path / "f.npz")
    assert isinstance(out["score"], float)
