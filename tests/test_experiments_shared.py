"""experiments.shared: the command line every experiment takes, the statistics and the pre-registered verdict rule."""
import math
from pathlib import Path

import pytest

import common
from experiments import shared


def test_verdict_is_two_standard_errors_either_way():
    assert shared.verdict(0.21, 0.1) == "better" and shared.verdict(-0.21, 0.1) == "worse"
    assert shared.verdict(0.2, 0.1) == shared.verdict(-0.2, 0.1) == "no detectable difference"  # strict at 2·SE
    assert shared.verdict(5.0, float("nan")) == "no detectable difference"  # one seed: no SE, no claim


def test_paired_differences():
    r = shared.paired([1.0, 2.0, 3.0])  # mean 2, std 1, SE 1/√3: 2 > 2·SE = 1.155
    assert (r["mean"], r["std"], r["n"], r["n_positive"], r["outcome"]) == (2.0, 1.0, 3, 3, "better")
    assert r["se"] == pytest.approx(1 / math.sqrt(3), abs=1e-15)
    r = shared.paired([-1.0, 1.0, float("nan")])  # NaN is left out of n
    assert (r["n"], r["n_positive"], r["outcome"]) == (2, 1, "no detectable difference")
    assert math.isnan(shared.paired([0.5])["se"])


def test_the_three_mean_std_recipes():
    r = shared.mean_std([2.0, float("nan")])  # NaN left out; one value has no sample std
    assert (r["mean"], r["n"]) == (2.0, 1) and math.isnan(r["std"])
    assert math.isnan(shared.mean_std([])["mean"])
    assert shared.finite_mean_std([2.0]) == {"mean": 2.0, "std": 0.0, "n": 1}
    assert shared.mean_std_pair([1.0, 3.0]) == (2.0, math.sqrt(2.0)) and shared.mean_std_pair([4.0]) == (4.0, 0.0)
    assert math.isnan(shared.mean_or_nan([])) and shared.mean_or_nan([1.0, 2.0]) == 1.5


def test_series_and_step_mean_read_a_trace():
    run = {"trace": [{"step": 1, "a": 1.0}, {"step": 2, "a": None}, {"step": 3, "a": 3.0, "b": 5.0}]}
    assert shared.series(run, "a") == ([1, 3], [1.0, 3.0])
    assert shared.step_mean(run, "a") == 2.0 and math.isnan(shared.step_mean(run, "c"))


def test_experiment_args(tmp_path):
    doc = "Title line.\n\nMore."
    args = shared.experiment_args("x", doc, [])
    assert args.out == shared.results_dir("x", False) == shared.ROOT / "docs/results/x" and not args.smoke
    assert not hasattr(args, "cache_dir")
    args = shared.experiment_args("x", doc, ["--smoke"], cache_dir=True, seeds=dict(type=int, nargs="*"))
    assert args.out == shared.ROOT / "outputs/experiments-smoke/x"  # a smoke run never overwrites the results
    assert args.cache_dir == shared.ROOT / "outputs/experiments" and args.seeds is None
    args = shared.experiment_args("x", doc, ["--out", str(tmp_path), "--cache_dir", "c", "--seeds", "1", "2"],
                                  cache_dir=True, seeds=dict(type=int, nargs="*"))
    assert (args.out, args.cache_dir, args.seeds) == (tmp_path, Path("c"), [1, 2])
    with pytest.raises(common.UserError, match="unrecognized arguments: --smok"):  # no abbreviations, one line
        shared.experiment_args("x", doc, ["--smok"])


def test_paired_t_test_matches_tabulated_student_t():
    """The two-sided p of Student's t equals tabulated critical values (t_{0.975} at df 1, 4, 29) and the
    false-positive rate of the 2·SE rule the evidence issue quotes (about 18 % at 3 seeds, 12 % at 5)."""
    from experiments.shared import false_positive_rate, paired, t_test_p
    for t, df in ((12.7062, 1), (2.7764, 4), (2.0452, 29)):
        assert abs(t_test_p(t, df) - 0.05) < 1e-4
    assert abs(t_test_p(0.0, 5) - 1.0) < 1e-12 and t_test_p(50.0, 3) < 1e-4
    assert abs(false_positive_rate(3) - 0.1835) < 1e-3 and abs(false_positive_rate(5) - 0.1161) < 1e-3
    r = paired([0.1, 0.2, 0.3])          # mean 0.2, std 0.1, SE 0.0577, t 3.464 on 2 df
    assert abs(r["t"] - 3.4641) < 1e-3 and abs(r["p_value"] - 0.0742) < 1e-3 and r["n_positive"] == 3
