"""Smoke tests of the round-2 experiment commands (issue 12: experiments/salt_mechanism.py, salt_smollm.py,
salt_offpolicy.py, spice_clean.py, spice_penalty.py): each runs --smoke in a subprocess, from an empty working
directory that must stay empty, and must write sane numbers. The real runs live in docs/results/."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("exp-cache")


def run_smoke(name: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cwd = out / "elsewhere"
    cwd.mkdir()
    p = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--smoke", "--out", str(out),
                        *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not any(cwd.iterdir()), "wrote under the working directory"
    return json.loads((out / "results.json").read_text())


def within(x, lo, hi):
    return x is not None and lo - 1e-9 <= x <= hi + 1e-9


def test_salt_mechanism_smoke(tmp_path, cache):
    res = run_smoke("salt_mechanism", tmp_path, "--cache_dir", str(cache))
    assert (tmp_path / "mechanism.png").stat().st_size > 10_000
    arms = ["grpo", "mini", "micro4", "micro8", "tail_on", "positive_only"]
    assert [r["arm"] for r in res["runs"]] == arms
    by = {r["arm"]: r for r in res["runs"]}
    for arm in arms:
        steps = [m for m in by[arm]["trace"] if "reward" in m]
        assert [m["step"] for m in steps] == [1, 2]
        for m in steps:
            if arm == "grpo":
                assert "salt/alpha" not in m  # SALT off computes nothing
                continue
            assert m["salt/skipped"] < 1 and within(m["salt/neff"], 0, 8) and within(m["salt/cos_within_abs"], 0, 1)
            assert m["salt/B"] == (4 if arm == "micro4" else 8)  # micro scope: one micro-batch of 4
            if arm == "tail_on":
                assert m["salt/alpha"] == 1.0  # α forced on
            elif arm != "positive_only":
                assert within(m["salt/alpha"], 0, 1) and m["salt/k"] >= 1
    row = res["summary"]["G4/mini"]
    assert row["auc_minus_grpo"]["outcome"] in {"better", "worse", "no detectable difference"}
    assert math.isfinite(row["pos_mass_kept"]["mean"]) and res["wall_time_s"] > 0


def test_salt_offpolicy_smoke(tmp_path, cache):
    res = run_smoke("salt_offpolicy", tmp_path, "--cache_dir", str(cache))
    assert (tmp_path / "offpolicy.png").stat().st_size > 10_000
    assert {r["arm"] for r in res["runs"]} == {"grpo", "official"}
    for r in res["runs"]:  # μ = 4: the 4 steps are the 4 passes over one generation round; reward logged once
        assert [m["step"] for m in r["trace"] if "salt/neff" in m] == [1, 2, 3, 4]
        assert [m["step"] for m in r["trace"] if "reward" in m] == [1]
    g = res["summary"]["G4/grpo"]
    assert all(within(g["cos_within_abs"][f"pass{j}"]["mean"], 0, 1) for j in range(1, 5))
    assert "auc_minus_grpo" in res["summary"]["G4/official"]


def test_salt_smollm_smoke(tmp_path, cache):
    res = run_smoke("salt_smollm", tmp_path, "--cache_dir", str(cache))
    assert res["settings"]["features"] == "lm_head" and [r["arm"] for r in res["runs"]] == ["grpo", "micro4"]
    micro = [m for m in res["runs"][1]["trace"] if "salt/B" in m]
    assert micro and all(m["salt/B"] == 4 for m in micro)
    assert res["summary"]["micro4"]["auc_minus_grpo"]["n"] == 1


def test_spice_clean_smoke(tmp_path):
    res = run_smoke("spice_clean", tmp_path)
    assert res["pool"]["corrupted"] == 0 and res["settings"]["features"]["lora"] is True
    t, k = res["table"], res["settings"]["k"]
    assert t["full"]["steps"] == t["spice@equal_steps"]["steps"] == res["pool"]["n"] // 4  # equal steps
    assert t["spice@equal_epochs"]["steps"] == math.ceil(k / 4)
    for name, v in t.items():
        assert math.isfinite(v["loss"]["mean"]) and within(v["exact_match"]["mean"], 0, 1), name
    assert {v["outcome"] for v in res["verdicts"]} <= {"better", "worse", "no detectable difference"}


def test_spice_penalty_smoke(tmp_path):
    res = run_smoke("spice_penalty", tmp_path)
    assert set(res["sweeps"]) == {"A_unit", "B", "B_unit"}
    for name, scheds in res["sweeps"].items():
        for sched, by_lam in scheds.items():
            g = by_lam["0.0"]
            assert g["changed_share"] == 0 and g["jaccard_greedy"] == 1  # λ = 0 is greedy: nothing changed
            for v in by_lam.values():
                assert within(v["changed_share"], 0, 1) and within(v["jaccard_greedy"], 0, 1)
                assert math.isfinite(v["log_det"]) and math.isfinite(v["log_det_raw"])
    pc = res["pair_cosines_B"]
    assert within(pc["frac_negative"], 0, 1) and -1 <= pc["min"] <= pc["median"] <= 1
    assert set(res["verdicts"]) == {"A_unit", "B", "B_unit"}


def test_changed_share_counts_picks_the_penalty_changed():
    """g1 is picked first (largest norm); g2 then has the larger gain (0.344 nats against 0.223 for g3) but points
    against g1 (conflict ≈ 1): λ = 0 takes g2, λ = 1 takes g3, a pick the penalty changed (1 of 2 steps)."""
    import spice_select as ss
    from experiments import spice_penalty

    G = torch.tensor([[3.0, 0.0], [-2.0, 0.1], [0.0, 0.5]], dtype=torch.float64)
    assert ss.spice_select(G, 2, 1.0, 0.0).indices == [0, 1]
    sel = ss.spice_select(G, 2, 1.0, 1.0)
    assert sel.indices == [0, 2]
    assert spice_penalty.changed_share(G, sel.indices, 1.0) == 0.5
    assert spice_penalty.changed_share(G, [0, 1], 1.0) == 0.0
    assert spice_penalty.unit(G).norm(dim=1).sub(1).abs().max() < 1e-12


def test_contradictory_pool_pairs_one_instruction_with_two_answers():
    from experiments import spice_penalty

    rows = spice_penalty.contradictory_pool(60, seed=3)
    assert len(rows) == 120 and len({r["instruction"] for r in rows}) == 60
    for i, r in enumerate(rows):
        p = rows[r["partner"]]
        assert p["partner"] == i and p["instruction"] == r["instruction"] and p["family"] == r["family"]
        assert p["response"] != r["response"] and p["contradictory"] != r["contradictory"]
