"""Checkpoints and final weights: no pickle, SHA-256 checked on every load, fallback, rotation."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmtune.recipes.evaluate import evaluate_run, load_run
from mmtune.recipes.train import train
from mmtune.training import checkpoint as ckpt
from mmtune.utils.io import IntegrityError, write_manifest


def _flip(path: Path, offset: int = -8) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x7F
    path.write_bytes(bytes(data))


def test_pack_unpack_round_trip_keeps_every_type():
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}}},
        "groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}],
        "rng": np.arange(5, dtype=np.int64),
        "none": None,
        "nan": float("nan"),
    }
    tensors, tree = ckpt.pack(state)
    back = ckpt.unpack(tensors, json.loads(json.dumps(tree)))
    assert back["groups"][0]["betas"] == (0.9, 0.999) and 0 in back["optimizer"]["state"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(2, 2))
    assert np.array_equal(back["rng"], np.arange(5)) and back["none"] is None
    assert np.isnan(back["nan"])


def test_rng_state_round_trips_through_files(tmp_path):
    ckpt.save_state(tmp_path, "rng", ckpt.rng_state())
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    ckpt.set_rng_state(ckpt.load_state(tmp_path, "rng"))
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_a_crafted_state_pt_does_not_execute_on_resume(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(out, epochs=1), progress=False)
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    last = out / "checkpoints" / "epoch-001"
    for f in last.iterdir():  # an old-format checkpoint, as a crafted download would be
        f.unlink()
    (last / "state.pt").write_bytes(pickle.dumps({"state": Payload()}))
    (last / "rng-rank0.pt").write_bytes(pickle.dumps(Payload()))
    cfg = make_config(out, epochs=2, resume=True)
    with pytest.warns(UserWarning, match="old-format checkpoint"):
        train(cfg, progress=False)
    assert not marker.exists()


def test_flipped_bytes_in_the_last_checkpoint_fall_back_to_the_previous(make_config, tmp_path):
    whole = train(make_config(tmp_path / "whole", epochs=3), progress=False)
    out = tmp_path / "run"
    train(make_config(out, epochs=2), progress=False)
    _flip(out / "checkpoints" / "epoch-002" / "trainable.safetensors")
    with pytest.warns(UserWarning, match=r"epoch-002/trainable\.safetensors: SHA-256 differs"):
        again = train(make_config(out, epochs=3, resume=True), progress=False)
    assert again["metrics"] == whole["metrics"]
    assert [e["train_loss"] for e in again["history"]] == [
        e["train_loss"] for e in whole["history"]
    ]


def test_a_truncated_last_checkpoint_names_its_file_and_falls_back(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(out, epochs=2), progress=False)
    state = out / "checkpoints" / "epoch-002" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"epoch-002/state\.safetensors: \d+ bytes, but"):
        assert ckpt.newest_intact(out).name == "epoch-001"


def test_rotation_never_deletes_the_newest_intact_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for epoch in (1, 2, 3):
        d = root / f"epoch-{epoch:03d}"
        d.mkdir(parents=True)
        save_file({"w": torch.ones(2)}, str(d / "trainable.safetensors"))
        ckpt.save_state(d, "state", {"epoch": epoch})
        write_manifest(
            d, ["trainable.safetensors", "state.json", "state.safetensors"], format=ckpt.FORMAT
        )
    _flip(root / "epoch-003" / "trainable.safetensors")  # the newest is damaged
    removed = ckpt.rotate(tmp_path, keep=1)
    assert [p.name for p in removed] == ["epoch-001"]
    assert sorted(p.name for p in root.iterdir()) == ["epoch-002", "epoch-003"]
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
        ckpt.rotate(tmp_path, keep=0)


def test_non_finite_weights_are_refused_on_load(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(out, epochs=1), progress=False)
    weights = out / "checkpoints" / "epoch-001" / "trainable.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, str(weights))
    last = out / "checkpoints" / "epoch-001"
    manifest = json.loads((last / "manifest.json").read_text())
    files = manifest.pop("files")
    write_manifest(last, files, **manifest)  # as a diverged run would have saved it
    with pytest.raises(IntegrityError, match=rf"tensor '{key}' holds \d+ NaN"):
        ckpt.verify_checkpoint(last)


@pytest.mark.parametrize("damage", ["truncate-weights", "truncate-config", "edit-config"])
def test_a_damaged_final_dir_is_refused_naming_the_file(make_config, tmp_path, damage):
    out = tmp_path / "run"
    train(make_config(out, epochs=1), progress=False)
    shutil.rmtree(out / "adapter")  # as mmtune < 0.3 saved a run: final/ is what loads
    final = out / "final"
    if damage == "truncate-weights":
        target = final / "trainable.safetensors"
        target.write_bytes(target.read_bytes()[:50])
    else:
        target = final / "config.json"
        text = target.read_text()
        target.write_text(
            text[:20] if damage == "truncate-config" else text.replace("0.001", "0.01")
        )
    with pytest.raises(IntegrityError, match=rf"final/{target.name}: "):
        evaluate_run(out, "test")
    with pytest.raises(IntegrityError, match=rf"final/{target.name}: "):
        load_run(out)


@pytest.mark.parametrize(
    "target", ["task.safetensors", "adapter.safetensors", "mmtune_run.json", "adapter_config.json"]
)
def test_a_damaged_run_adapter_is_refused_naming_the_file(make_config, tmp_path, target):
    out = tmp_path / "run"
    train(make_config(out, epochs=1), progress=False)
    path = out / "adapter" / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, the size unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"adapter/{re.escape(target)}: SHA-256 differs"):
        evaluate_run(out, "test")
    with pytest.raises(IntegrityError, match=rf"adapter/{re.escape(target)}: SHA-256 differs"):
        load_run(out / "adapter")


def test_final_weights_of_the_wrong_shape_are_named(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(out, epochs=1), progress=False)
    shutil.rmtree(out / "adapter")  # a run of mmtune < 0.3
    final = out / "final"
    tensors = load_file(str(final / "trainable.safetensors"))
    key = next(k for k in sorted(tensors) if tensors[k].ndim == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(final / "trainable.safetensors"))
    write_manifest(
        final, ["trainable.safetensors", "config.json", "spec.json"], format="mmtune-final/1"
    )  # a consistent but wrong file
    with pytest.raises(ValueError, match=rf"does not fit the model: shape mismatches {key}"):
        load_run(out)


@pytest.mark.parametrize("damage", ["flip", "nan", "edit-config"])
def test_adapter_damage_is_refused_on_from_pretrained(tmp_path, damage):
    from conftest import tiny_model
    from mmtune import MiTConfig, MiTModel, inject_mit

    mit = inject_mit(tiny_model("llama"), MiTConfig(d_modality=12, layers=[2], form="residual"))
    mit.save_pretrained(tmp_path)
    weights, config = tmp_path / "adapter.safetensors", tmp_path / "adapter_config.json"
    if damage == "flip":
        _flip(weights)
        match = r"adapter\.safetensors: SHA-256 differs"
    elif damage == "nan":  # re-recorded hashes: only the finiteness check can catch it
        tensors = load_file(str(weights))
        key = sorted(tensors)[0]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(weights))
        meta = json.loads(config.read_text())
        from mmtune.utils.adapter_file import _meta_digest
        from mmtune.utils.io import file_sha256

        meta["sha256"]["adapter.safetensors"] = file_sha256(weights)
        meta["sha256"]["config"] = _meta_digest(meta)
        config.write_text(json.dumps(meta))
        match = rf"tensor '{key}' holds \d+ NaN"
    else:
        meta = json.loads(config.read_text())
        meta["config"]["form"] = "gated"
        config.write_text(json.dumps(meta))
        match = r"adapter_config\.json: its contents differ"
    with pytest.raises(IntegrityError, match=match):
        MiTModel.from_pretrained(tiny_model("llama"), tmp_path)
