"""The Method registry, method and peft as separate fields, and the deprecated spellings."""

import warnings

import pytest
import yaml

from mmtune.methods.registry import MethodSpec, get_method, methods, register_method
from mmtune.recipes.evaluate import load_config
from mmtune.training.config import TrainConfig, load_train_config


def test_registered_methods_by_model_kind():
    assert methods("llm") == ["concat", "mit", "text"] and methods("lmm") == ["mrt"]
    assert get_method("concat").takes_peft and not get_method("mit").takes_peft
    assert get_method("mit").reads == "vector" and get_method("text").reads == "nothing"
    with pytest.raises(KeyError, match="method 'prefix': not one of concat, mit, mrt, text"):
        get_method("prefix")


def test_method_and_peft_are_separate_fields():
    cfg = TrainConfig(method="concat", peft="lora")
    assert (cfg.method, cfg.peft, cfg.peft_config.lora_r) == ("concat", "lora", 8)
    with pytest.raises(ValueError, match="peft: lora adapters go with method concat, not mit"):
        TrainConfig(method="mit", peft="lora")
    with pytest.raises(ValueError, match=r"TrainConfig\.method must be one of concat, mit, text"):
        TrainConfig(method="mrt")  # an LLaVA-style method: `mmtune lmm tune`
    with pytest.raises(ValueError, match=r"TrainConfig\.peft must be one of none, lora, ia3"):
        TrainConfig(method="concat", peft="prefix")


def test_old_spellings_load_with_a_deprecation_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"method": "concat_lora", "peft": {"lora_r": 4}}))
    with pytest.warns(DeprecationWarning) as seen:
        cfg = load_train_config(path)
    assert (cfg.method, cfg.peft, cfg.peft_config.lora_r) == ("concat", "lora", 4)
    said = " ".join(str(w.message) for w in seen)
    assert "method: concat and peft: lora" in said and "peft_config" in said
    with pytest.warns(DeprecationWarning, match="'concat_ia3' is deprecated"):
        assert TrainConfig(method="concat_ia3").peft == "ia3"
    with pytest.raises(ValueError, match="'concat_lora' and peft 'ia3' disagree"):
        TrainConfig(method="concat_lora", peft="ia3")


def test_a_stored_run_of_an_older_version_loads_silently(tmp_path):
    import json
    from dataclasses import asdict

    raw = asdict(TrainConfig(method="concat", peft="lora"))
    raw["method"], raw["peft"] = "concat_lora", raw.pop("peft_config")  # as mmtune 0.3 wrote it
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*records no SHA-256.*")
        cfg = load_config(tmp_path / "run")
    assert (cfg.method, cfg.peft) == ("concat", "lora")


def test_a_new_method_registers_in_one_place():
    spec = register_method(MethodSpec("prefix-test", "a test entry", model="lmm", reads="tokens"))
    assert get_method("prefix-test") is spec and "prefix-test" in methods("lmm")
