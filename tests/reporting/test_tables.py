"""One mean/spread rule for every table: sample std over seeds, None (not 0, not NaN) for one."""

import json
import math
import statistics

import pytest

from mmtune.reporting.tables import format_mean_std, mean_std


def test_sample_std_over_seeds():
    stat = mean_std([0.94, 0.941, 0.938])
    assert stat["mean"] == pytest.approx(statistics.fmean([0.94, 0.941, 0.938]))
    assert stat["std"] == pytest.approx(statistics.stdev([0.94, 0.941, 0.938]))
    assert stat["n"] == 3
    assert format_mean_std(stat) == "0.940 ± 0.002"


def test_one_value_has_no_spread_and_stays_valid_json():
    stat = mean_std([0.5])
    assert stat == {"mean": 0.5, "std": None, "n": 1}
    assert json.loads(json.dumps(stat, allow_nan=False)) == stat
    assert format_mean_std(stat) == "0.500"
    assert format_mean_std({"mean": 0.5, "std": math.nan}) == "0.500"  # tables before 0.3


def test_no_values_is_an_error():
    with pytest.raises(ValueError, match="no values"):
        mean_std([])
