"""The registry of ``lmm tune`` methods: names, defaults, and an adapter nobody made refused."""

import json

import pytest

from mmtune.methods.lmm_tuning import get_lmm_tuning, lmm_tunings, load_lmm_adapter
from mmtune.recipes.instruct import DEFAULT_LR, METHODS


def test_the_four_methods_in_table_order_with_their_defaults():
    assert lmm_tunings() == METHODS == ("zero-shot", "projector", "lora", "mrt")
    assert DEFAULT_LR == {"zero-shot": 0.0, "projector": 1e-3, "lora": 2e-3, "mrt": 1e-3}
    assert not get_lmm_tuning("zero-shot").trains and get_lmm_tuning("zero-shot").save is None
    assert get_lmm_tuning("lora").library == "peft" and get_lmm_tuning("mrt").library == "mmtune"
    with pytest.raises(KeyError, match="lmm tune method 'prefix': not one of zero-shot"):
        get_lmm_tuning("prefix")


def test_an_adapter_of_another_method_is_refused_naming_the_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"method": "mit"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: field 'method' is 'mit'"):
        load_lmm_adapter(tmp_path)
