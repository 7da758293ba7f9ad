"""Smoke tests of the SALT experiment commands (experiments/salt_*.py) on tiny settings, so they cannot rot.

The real runs (minutes to tens of minutes) are not part of the suite; their results live in docs/results/.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("exp-cache")


def run_experiment(name: str, out: Path, cache: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--smoke", "--out", str(out),
                        "--cache_dir", str(cache)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_salt_cancellation_smoke(tmp_path, cache):
    res = run_experiment("salt_cancellation", tmp_path, cache)
    assert (tmp_path / "cancellation_vs_G.png").stat().st_size > 10_000
    assert set(res["summary"]) == {"2", "4", "8", "16"}
    assert len(res["per_batch"]) == 2 * 4
    for row in res["per_batch"]:  # PR of B rows lies in [1, B]; nested subsets: B = prompts · G
        assert row["B"] == 4 * row["G"] and 1 <= row["participation_ratio"] <= row["B"] + 1e-9
        assert row["neff"] is None or 0 <= row["neff"] <= row["B"] + 1e-9  # NaN is written as null


def test_salt_geometry_smoke(tmp_path, cache):
    res = run_experiment("salt_geometry", tmp_path, cache)
    assert (tmp_path / "geometry_after_reweighting.png").stat().st_size > 10_000
    assert {r["mode"] for r in res["per_batch"]} <= {"off", "official", "random_subspace", "positive_only"}
    for r in res["per_batch"]:
        assert 0 <= r["neff"] <= 4 * r["G"] + 1e-9 and -1 - 1e-9 <= r["cos_to_grpo"] <= 1 + 1e-9
        if r["mode"] == "off":
            assert r["cos_to_grpo"] == pytest.approx(1.0)


def test_salt_training_smoke(tmp_path, cache):
    res = run_experiment("salt_training", tmp_path, cache)
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert [(r["arm"], r["G"]) for r in res["runs"]] == [("off", 4), ("official", 4)]
    for r in res["runs"]:
        assert [m["step"] for m in r["trace"] if "reward" in m] == [1, 2]
        assert 0 <= r["eval_end"] <= 1


def test_run_sh_dispatches_experiments(tmp_path, cache):
    """`bash run.sh experiments` lists every experiment in experiments/ and runs one by name."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VENV": sys.prefix}  # this interpreter's venv: no new install
    p = subprocess.run(["bash", str(ROOT / "run.sh"), "experiments"], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    names = p.stderr.split("one of:")[1].split("(see")[0].split()
    assert sorted(names) == sorted(f.stem for f in (ROOT / "experiments").glob("*.py")
                                   if f.stem not in ("__init__", "shared"))  # the helpers are not experiments
    for name in ("shared", "__init__", "salt"):
        assert subprocess.run(["bash", str(ROOT / "run.sh"), "experiments", name], capture_output=True,
                              env=env).returncode == 2
    p = subprocess.run(["bash", str(ROOT / "run.sh"), "experiments", "salt_geometry", "--smoke", "--out",
                        str(tmp_path), "--cache_dir", str(cache)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["experiment"] == "salt_geometry"
