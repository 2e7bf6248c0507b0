"""Training logs through accelerate's trackers (report_to), with no hand-written writer."""

from __future__ import annotations

import pytest

from mmtune import MiTConfig
from mmtune.recipes.train import ModelConfig, OptimConfig, TrainConfig, train
from mmtune.tasks.model import TaskConfig
from tiny_assets import tiny_llm_dir, tiny_vit_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return tiny_llm_dir(root / "llm"), tiny_vit_dir(root / "vit")


def _cfg(assets, out, report_to):
    llm, vit = assets
    return TrainConfig(
        task=TaskConfig(data="digits-ve", data_options={"num_samples": 64}),
        model=ModelConfig(llm=str(llm), vision=str(vit)),
        mit=MiTConfig(layers=[3, 4]),
        optim=OptimConfig(epochs=2, batch_size=8),
        output_dir=str(out),
        feature_cache=False,
        plots=False,
        report_to=report_to,
    )


def test_tensorboard_gets_every_step_loss_and_each_epochs_val_metrics(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = train(_cfg(assets, tmp_path / "run", "tensorboard"), progress=False)
    logs = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    logs.Reload()
    steps = results["data"]["splits"]["train"] // 8
    assert len(logs.Scalars("train/loss")) == 2 * steps
    val = logs.Scalars("val/accuracy")
    assert [round(e.value, 6) for e in val] == [
        round(h["val"]["accuracy"], 6) for h in results["history"]
    ]
    assert [e.step for e in val] == [steps, 2 * steps]  # after each epoch's last step


def test_report_to_none_writes_no_logs(assets, tmp_path):
    train(_cfg(assets, tmp_path / "run", "none"), progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "results.json").is_file()


def test_a_tracker_without_its_package_or_an_unknown_one_is_one_clear_error(assets, tmp_path):
    from accelerate.utils import is_wandb_available

    with pytest.raises(ValueError, match="report_to must be one of"):
        _cfg(assets, tmp_path / "run", "comet")
    if is_wandb_available():
        pytest.skip("wandb is installed here")
    with pytest.raises(ValueError, match=r"report_to: wandb needs the wandb package"):
        train(_cfg(assets, tmp_path / "run", "wandb"), progress=False)
    assert not (tmp_path / "run" / "results.json").exists()
