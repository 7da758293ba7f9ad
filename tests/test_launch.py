"""The programs launched the way the README launches them: `accelerate launch` as a subprocess, with
ACCELERATE_USE_CPU=1 --multi_gpu --num_processes 2 for two processes on a CPU (gloo). Nothing here hands the code an
Accelerator built by the test: each run decides its process count from the launcher alone (issue 22: a build()
that fixed distributed state before the Accelerator ran every rank as its own 1-process training)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


import harness

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TWO = ["--multi_gpu", "--num_processes", "2"]  # with ACCELERATE_USE_CPU=1: two gloo processes on the CPU
ONE = ["--cpu", "--num_processes", "1"]
SALT_SMOKE = ["--preset", "smoke", "--eval_size", "4"]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    return {**e, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def launch(procs: list[str], script: str, args: list[str], timeout: int = 240, **extra) -> subprocess.CompletedProcess:
    """`accelerate launch PROCS script ARGS` exactly as documented (two processes: ACCELERATE_USE_CPU=1)."""
    e = env(**extra, **({"ACCELERATE_USE_CPU": "1"} if procs is TWO else {}))
    cmd = [ACCELERATE, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *procs,
           str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def numbers(rows: list[dict]) -> list[dict]:
    """The metrics that describe the run (timings and the sample left out)."""
    return [{k: v for k, v in r.items() if isinstance(v, (int, float)) and "time" not in k} for r in rows]


@pytest.fixture(scope="module")
def salt_runs(tmp_path_factory):
    """The SALT smoke run launched with one process and with two (fp32, tiny model), once for the module."""
    d = tmp_path_factory.mktemp("launch")
    for name, procs in (("one", ONE), ("two", TWO)):
        ok(launch(procs, "salt_grpo.py", SALT_SMOKE + ["--output_dir", str(d / name)]))
    return d


def test_salt_two_processes_launched_as_documented_equal_one(salt_runs):
    s1, s2 = (json.loads((salt_runs / n / "summary.json").read_text()) for n in ("one", "two"))
    assert s1["processes"] == 1 and s2["processes"] == 2
    m1, m2 = (numbers(harness.read_metrics(salt_runs / n / "metrics.jsonl")) for n in ("one", "two"))
    assert len(m1) == len(m2) and [r["step"] for r in m1] == [r["step"] for r in m2]
    assert any("salt/neff" in r for r in m1)  # SALT acted
    for r1, r2 in zip(m1, m2):
        assert r1.keys() == r2.keys()
        for k in r1:
            assert abs(r1[k] - r2[k]) <= 1e-6 * max(1.0, abs(r1[k])), (r1["step"], k, r1[k], r2[k])
    w1, w2 = (load_file(str(salt_runs / n / "final" / "model.safetensors")) for n in ("one", "two"))
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-6
    assert not list((salt_runs / "two").glob(".*"))  # no lock, staging or temporary folder left


def test_spice_two_processes_launched_as_documented_pick_what_one_picks(tmp_path):
    args = ["--preset", "smoke", "--compare", "false"]
    for name, procs in (("one", ONE), ("two", TWO)):
        ok(launch(procs, "spice_select.py", args + ["--output_dir", str(tmp_path / name)]))
    s1, s2 = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two"))
    assert s1["indices"] == s2["indices"] and len(s1["indices"]) == 6
    assert s1["log_det"] == pytest.approx(s2["log_det"], rel=1e-6)
    assert (tmp_path / "two" / "selected.jsonl").read_bytes() == (tmp_path / "one" / "selected.jsonl").read_bytes()


def descendants(pid: int) -> list[int]:
    """Every process below pid (torch's launcher starts its workers in sessions of their own, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """kill -9 of the launcher and every process it started, and wait until they are gone."""
    procs = descendants(pid)
    for q in [pid] + procs:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while any(harness._alive(q) for q in procs) and time.time() < deadline:
        time.sleep(0.1)


def test_two_process_kill_and_resume_through_the_cli(tmp_path):
    """kill -9 of a 2-process launch mid-run (after checkpoint-2, inside step 3's generation), then `--resume_from`
    through the same CLI: the final weights equal an uninterrupted 2-process run's, bit for bit."""
    args = SALT_SMOKE + ["--max_steps", "4", "--save_every", "1", "--eval_size", "0",
                         "--reward_funcs", "tests/salt_rewards.py:closeness_or_hang"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    ok(launch(TWO, "salt_grpo.py", args + ["--output_dir", str(full)]))
    e = env(ACCELERATE_USE_CPU="1", SALT_TEST_HANG_AFTER="2")
    cmd = [ACCELERATE, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *TWO,
           str(ROOT / "salt_grpo.py"), *args, "--output_dir", str(cut)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (cut / "checkpoint-2" / "state.json").exists():
            assert p.poll() is None and time.time() < deadline, "the run ended before its checkpoint-2"
            time.sleep(0.2)
        time.sleep(1.0)  # inside step 3 now: the reward function sleeps
        assert p.poll() is None
    finally:
        kill_tree(p.pid)
        p.wait()
    assert not (cut / "final").exists() and (cut / ".lock").exists()  # killed: a stale lock, no final model
    r = ok(launch(TWO, "salt_grpo.py", args + ["--output_dir", str(cut), "--resume_from", str(cut / "checkpoint-2")]))
    assert "2 processes" in r.stdout
    w1, w2 = (load_file(str(d / "final" / "model.safetensors")) for d in (full, cut))
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    s = json.loads((cut / "summary.json").read_text())
    assert s["resumed_from_step"] == 2 and s["processes"] == 2
    assert [r["step"] for r in harness.read_metrics(cut / "metrics.jsonl")] == [1, 2, 3, 4]
