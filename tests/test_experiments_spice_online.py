"""Smoke test of experiments/spice_online.py (experiment 13: tiny model, 60-row pool, windows of 20 → 2, 2 seeds)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_spice_online_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "experiments.spice_online", "--smoke", "--out", str(tmp_path)], cwd=cwd,
                   env=env, check=True, capture_output=True, timeout=180)
    assert not any(cwd.iterdir()), "wrote under the working directory instead of ROOT"
    res = json.loads((tmp_path / "results.json").read_text())
    for f in ("heldout_nll.png", "per_family_nll.png", "table.md"):
        assert (tmp_path / f).stat().st_size > 0
    S = res["settings"]
    sels = res["selections"]
    assert len(sels) == len(S["seeds"]) >= 2
    # each seed is its own window order: selection variance for every arm
    orders = [json.dumps(s["window_order_head"]) for s in sels.values()]
    assert len(set(orders)) == len(orders)
    n_windows = math.ceil(S["pool_n"] / S["window"])
    k = round(S["per_window"] * S["pool_n"] / S["window"])
    for s in sels.values():
        assert s["n_windows"] == n_windows
        for arm in ("online", "greedy", "random", "top_norm"):
            idx = s["indices"][arm]
            assert len(idx) == k and len(set(idx)) == k  # per_window picks from each full window
        # the proxy trains on its picks: the LoRA-A half of the features is zero only before the first update
        assert s["zero_feature_share_by_window"][0] > 0 and s["zero_feature_share_by_window"][-1] == 0
        assert any("proxy_loss" in r for r in s["proxy_log"])
    assert len({json.dumps(s["indices"]["random"]) for s in sels.values()}) == len(sels)
    for key in ("full", "online@equal_steps", "random@equal_epochs", "top_norm@equal_steps"):
        assert len(res["runs"][key]) == len(S["seeds"])
        for r in res["runs"][key].values():
            assert math.isfinite(r["eval"]["overall"]["loss"]) and r["eval"]["overall"]["n"] == res["heldout"]["n"]
    steps = {r["arm"]: r["steps"] for r in res["table"]}
    assert steps["online@equal_steps"] == steps["full"] == S["full_steps"] > steps["online@equal_epochs"]
    c = next(c for c in res["comparisons"] if c["a"] == "online@equal_steps" and c["b"] == "random@equal_steps"
             and c["metric"] == "loss" and c["group"] == "overall")
    assert len(c["diffs"]) == len(S["seeds"]) and {"p_value", "se", "n_positive", "reading"} <= set(c)
