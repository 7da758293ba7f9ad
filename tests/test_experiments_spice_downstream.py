"""Smoke test of experiments/spice_downstream.py (tiny model, 80-row pool, 2 seeds), run from an empty working
directory that must stay empty (the selection cache is ROOT-based)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_spice_downstream_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "experiments.spice_downstream", "--smoke", "--out", str(tmp_path)], cwd=cwd,
                   env=env, check=True, capture_output=True, timeout=120)
    assert not any(cwd.iterdir()), "wrote under the working directory instead of ROOT"
    res = json.loads((tmp_path / "results.json").read_text())
    for f in ("overall.png", "per_family.png", "summary.csv", "table.md"):
        assert (tmp_path / f).stat().st_size > 0
    methods = ("spice", "greedy", "top_norm", "official_diag", "random", "online", "full")
    assert set(res["runs"]) == set(methods)
    seeds = res["settings"]["seeds"]
    for m in methods:
        assert len(res["runs"][m]) == len(seeds)
        for run in res["runs"][m].values():
            ev = run["eval"]["overall"]
            assert math.isfinite(ev["loss"]) and ev["loss"] > 0 and 0 <= ev["exact_match"] <= 1
            assert ev["n"] == res["heldout"]["n"]
    comp = res["selection"]["composition"]
    k = round(0.1 * res["settings"]["pool_n"])
    assert all(c["n"] == k for c in comp["spice"].values())          # 10 % offline
    assert all(c["n"] == res["settings"]["pool_n"] for c in comp["full"].values())
    assert all(0 <= c["frac_corrupted"] <= 1 for m in methods for c in comp[m].values())
    assert [r["method"] for r in res["summary"]] == ["null", *methods]
    assert math.isfinite(res["null"]["overall"]["loss"])
    assert res["wall_seconds"] > 0
