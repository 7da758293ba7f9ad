"""Smoke tests of the SPICE experiment commands (experiments/spice_decay.py, spice_selectors.py): each runs
with --smoke (tiny model, small pool) in a subprocess and must write sane JSON / CSV / PNG. They run from an empty
working directory, which must stay empty: every cache path is ROOT-based."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(name: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cwd = out / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--smoke", "--out", str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(cwd.iterdir()), "wrote under the working directory instead of ROOT"
    return json.loads((out / "results.json").read_text())


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_spice_decay_smoke(tmp_path):
    res = run_smoke("spice_decay", tmp_path)
    cfg = res["settings"]
    assert cfg["smoke"] and cfg["model"] == "tiny" and len(cfg["seeds"]) >= 3
    assert (tmp_path / "spice_decay.png").stat().st_size > 1000
    assert len((tmp_path / "table4.csv").read_text().strip().splitlines()) == 1 + 2 * len(cfg["checkpoints"])
    # (a) one Spearman per greedy step and subset, each in [-1, 1] (or NaN when every conflict is 0)
    a = res["part_a_stepwise_spearman"]["alpha_main"]
    for key in ("spearman_conflict_delta", "spearman_conflict_abs_eps"):
        m = a[key]["mean_over_seeds"]["mean"]
        assert finite(m) and -1 <= m <= 1
    for s in res["per_seed"]:
        assert len(s["alpha_main"]["steps"]) == cfg["steps"]
        assert len(s["alpha_main"]["picks"]) == len(set(s["alpha_main"]["picks"])) == cfg["steps"]
    # (b) decay curves start at 1, never exceed it (plain greedy gains decay monotonically), half-life in range
    for s in res["per_seed"]:
        for g in ("low", "high"):
            curve = s["split"][g]["curve"]
            assert abs(curve[0] - 1) < 1e-12 and all(0 <= v <= 1 + 1e-12 for v in curve)
            assert all(b <= a + 1e-12 for a, b in zip(curve, curve[1:]))
            hl = s["split"][g]["half_life"]
            assert hl is None or 1 <= hl <= len(curve)
            assert 0 <= s["split"][g]["curvature"] <= 1
    # (c) one row per |S|; exact decomposition; α_safe makes the assumptions hold and the theorem is not violated
    for w in ("alpha_main", "alpha_safe"):
        tab = res["part_c_theorem4"][w]
        assert [r["S"] for r in tab] == cfg["checkpoints"]
        for r in tab:
            assert r["decomposition_error_max"] < 1e-9 and finite(r["norm_F_S"]["mean"])
            assert 0 <= r["first_order_exceed_rate"]["mean"] <= 1
    for r in res["part_c_theorem4"]["alpha_safe"]:
        assert r["assumptions_hold_frac"] == 1.0 and r["violation_rate"]["mean"] == 0.0
    assert finite(res["wall_seconds"])


def test_spice_selectors_smoke(tmp_path):
    res = run_smoke("spice_selectors", tmp_path)
    cfg = res["settings"]
    assert cfg["smoke"] and cfg["model"] == "tiny"
    assert (tmp_path / "spice_selectors.png").stat().st_size > 1000
    labels = ["SPICE λ=0.1", "SPICE λ=0.5", "SPICE λ=1", "greedy (λ=0)", "top_norm", "official_diag", "random"]
    for sched in ("whole_pool", "pool_by_pool"):
        tab = res[sched]
        assert all(lb in tab for lb in labels) and sum(lb.startswith("SPICE+") for lb in tab) == 2
        val = {lb: (v["log_det"]["mean"] if isinstance(v["log_det"], dict) else v["log_det"]) for lb, v in tab.items()}
        assert all(finite(x) and x > 0 for x in val.values())
        assert val["greedy (λ=0)"] > val["random"]  # greedy ≫ random in exact log-det
        jac = tab["greedy (λ=0)"]["jaccard_greedy"]
        assert (jac["mean"] if isinstance(jac, dict) else jac) == 1.0
        for lb, v in tab.items():
            for m in ("frac_corrupted", "frac_duplicates", "min_family_share", "frac_negative_cos"):
                x = v[m]["mean"] if isinstance(v[m], dict) else v[m]
                assert 0 <= x <= 1, (sched, lb, m, x)
    # whole pool: plain greedy's log-det is the largest of the greedy-type selectors of the same size
    whole = res["whole_pool"]
    assert whole["greedy (λ=0)"]["log_det"] >= whole["top_norm"]["log_det"]
    assert whole["random"]["log_det"]["n"] == len(cfg["random_seeds"]) >= 3
    assert len((tmp_path / "selectors.csv").read_text().strip().splitlines()) == 1 + 2 * len(whole)


def test_mean_std_is_shared():
    """spice_decay and spice_selectors use experiments.shared's finite_mean_std: finite values only, sample std
    (ddof = 1)."""
    from experiments import shared, spice_decay, spice_selectors

    assert spice_selectors.spice_decay is spice_decay
    assert not hasattr(spice_selectors, "mean_std") and not hasattr(spice_selectors, "pool_features")
    assert spice_decay.finite_mean_std is spice_selectors.finite_mean_std is shared.finite_mean_std
    r = shared.finite_mean_std([1, None, 3.0, float("nan"), True])
    assert r["n"] == 3 and abs(r["mean"] - 5 / 3) < 1e-12 and abs(r["std"] - math.sqrt(4 / 3)) < 1e-12
    assert shared.finite_mean_std([None]) == {"mean": None, "std": None, "n": 0}
