"""The output-folder contract and the misuse classes of issue 22, one parametrised test per class.

Each case feeds a wrong input that must fail (exit status 2, ONE `error:` line naming the flag, file, row, field or
function, no traceback) and checks that the run it would replace is byte for byte as it was. The contract itself
(harness.OutputFolder): every check before the folder is touched, --overwrite_output_dir replacing the old run only
once the new one has something to keep, a lock, `~` expanded once, no output holding an input, each shared entry
swapped in one step, an interrupted commit finished by the next run."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


import harness
import salt_grpo as sg
from data import arithmetic
import spice_select as S
from test_reliability_salt import SMOKE, finished, main, one_error, run_dir, snapshot  # noqa: F401 (fixtures)
from test_salt_train import ROOT

REWARDS = ROOT / "tests" / "salt_rewards.py"


def spice_main(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = 0
    try:
        harness.run_main(lambda: S.main(list(argv)))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def template_model(path: Path, reject: str = "system") -> Path:
    """The tiny model with a chat template that raises on one role (as many templates do for `system`)."""
    model, tok = harness.tiny_llama(seed=0)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == '" + reject + "' %}"
                         "{{ raise_exception('no " + reject + " role') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# 1. --overwrite_output_dir never costs the old run before the new one is known good
# --------------------------------------------------------------------------------------------------------------

def _setup(kind: str, tmp: Path) -> list[str]:
    """Flags of a new run that cannot start (or cannot finish), and the data or model it needs."""
    rows = [{"prompt": f"{i} + 1?", "answer": str(i + 1)} for i in range(8)]
    if kind == "model_typo":
        return ["--model", str(tmp / "no_such_model")]
    if kind == "model_without_config":
        (tmp / "empty_model").mkdir()
        return ["--model", str(tmp / "empty_model")]
    if kind == "uncached_hub_id":
        return ["--model", "someone/not-a-cached-model"]
    if kind == "lora_targets":
        return ["--use_peft", "--lora_target_modules", "bogus"]
    if kind == "seed_overflow":
        return ["--seed", "9223372036854775807"]
    if kind == "template_rejects_system_prompt":
        return ["--model", str(template_model(tmp / "m")), "--system_prompt", "Be brief."]
    if kind == "template_rejects_a_rows_role":
        conv = [{"prompt": [{"role": "user", "content": f"{i} + 1?"}], "answer": str(i + 1)} for i in range(8)]
        conv[5]["prompt"] = [{"role": "tool", "content": "x"}] + conv[5]["prompt"]
        return ["--model", str(template_model(tmp / "m", reject="tool")), "--dataset", jsonl(tmp / "c.jsonl", conv)]
    if kind in ("completions", "prompts", "answer_column"):
        return ["--dataset", jsonl(tmp / "d.jsonl", [{**r, kind: "x"} for r in rows])]
    if kind == "nan_mid_run":  # starts, then diverges at step 1: nothing to keep, so the old run stays
        return ["--learning_rate", "1e30", "--max_steps", "3", "--eval_size", "0"]
    raise KeyError(kind)


NEW_RUN_FAILS = [("model_typo", "no_such_model"), ("model_without_config", "no config.json"),
                 ("uncached_hub_id", "not-a-cached-model"), ("lora_targets", "--lora_target_modules"),
                 ("seed_overflow", "--seed"), ("template_rejects_system_prompt", "--system_prompt"),
                 ("template_rejects_a_rows_role", "c.jsonl row 6"), ("completions", "'completions'"),
                 ("prompts", "'prompts'"), ("answer_column", "'answer_column'"), ("nan_mid_run", "non-finite")]


@pytest.mark.parametrize("kind,names", NEW_RUN_FAILS, ids=[k for k, _ in NEW_RUN_FAILS])
def test_overwrite_keeps_the_old_run_until_the_new_one_has_something_to_keep(run_dir, tmp_path, capsys, kind, names):
    before = snapshot(run_dir)
    code, err = main(SMOKE + ["--output_dir", str(run_dir), "--overwrite_output_dir"] + _setup(kind, tmp_path), capsys)
    assert code == 2
    one_error(err, names)
    assert snapshot(run_dir) == before


def test_overwrite_replaces_only_the_old_runs_own_files(run_dir, capsys):
    """A run stopped before its first checkpoint (here Ctrl-C in step 2) leaves the old run whole; a finished one
    replaces it, and a file of the user's in the folder survives both."""
    (run_dir / "notes.txt").write_text("mine")
    before = snapshot(run_dir)
    calls = {"n": 0}
    real = sg.accumulate_gradients

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    sg.accumulate_gradients = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            main(SMOKE + ["--output_dir", str(run_dir), "--overwrite_output_dir", "--max_steps", "3"], capsys)
    finally:
        sg.accumulate_gradients = real
    assert snapshot(run_dir) == before
    code, err = main(SMOKE + ["--output_dir", str(run_dir), "--overwrite_output_dir", "--max_steps", "1"], capsys)
    assert code == 0, err
    (run_dir / "salt_grpo").mkdir(exist_ok=True)  # the old run's tracker files (TensorBoard events) go with it
    (run_dir / "salt_grpo" / "events.out.tfevents.1.old").write_bytes(b"old")
    code, err = main(SMOKE + ["--output_dir", str(run_dir), "--overwrite_output_dir", "--max_steps", "1"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "final", "last_advantages.safetensors",
                                                         "last_sample.json", "metrics.jsonl", "notes.txt",
                                                         "summary.json"]
    assert (run_dir / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------------------
# 3. `~` and $VARIABLES, expanded once where the path is read
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "yaml", "env"])
def test_home_and_variables_are_expanded_once(tmp_path, capsys, monkeypatch, how):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RUNS", str(home / "runs"))
    monkeypatch.chdir(tmp_path)
    argv = SMOKE + ["--max_steps", "1"]
    if how == "yaml":
        (tmp_path / "c.yaml").write_text("output_dir: ~/x\n")
        argv += ["--config", "~/../c.yaml"]
    else:
        argv += ["--output_dir", "~/x" if how == "flag" else "$RUNS/x"]
    code, err = main(argv, capsys)
    assert code == 0, err
    target = home / ("runs/x" if how == "env" else "x")
    assert (target / "final" / "model.safetensors").exists() and not (tmp_path / "~").exists()
    code, err = main(argv, capsys)  # the second run sees the first one, where it is
    assert code == 2
    one_error(err, "not empty")
    code, err = spice_main(["--preset", "smoke", "--output_dir", "~/s"], capsys)
    assert code == 0, err
    assert (home / "s" / "selected.jsonl").exists() and not (tmp_path / "~").exists()


# --------------------------------------------------------------------------------------------------------------
# 4. one run per folder at a time (a lock file)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("holder", ["alive", "dead", "other_host"])
def test_a_folder_in_use_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys, holder):
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid = {"alive": os.getpid(), "dead": dead.pid, "other_host": os.getpid()}[holder]
    host = "elsewhere" if holder == "other_host" else __import__("socket").gethostname()
    (out / ".lock").write_text(json.dumps({"pid": pid, "host": host, "argv": ["salt_grpo.py"]}))
    before = snapshot(out)
    code, err = main(SMOKE + ["--output_dir", str(out)], capsys)
    if holder == "dead":
        assert code == 0, err
        assert not (out / ".lock").exists() and (out / "final").exists()
    else:
        assert code == 2
        one_error(err, "in use by another run", f"pid {pid}")
        assert snapshot(out) == before


def test_two_runs_started_at_once_on_one_fresh_folder(tmp_path):
    """Exactly one of two simultaneous runs writes the folder; the other stops in one line."""
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "salt_grpo.py")] + SMOKE + ["--output_dir", str(out)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    res = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(c for c, _ in res) == [0, 2], res
    err = next(e for c, e in res if c == 2)
    assert any(w in err for w in ("in use by another run", "is not empty")) and "Traceback" not in err
    steps = [r["step"] for r in harness.read_metrics(out / "metrics.jsonl")]
    assert steps == [0, 1, 2, 2]  # one run's rows


# --------------------------------------------------------------------------------------------------------------
# 5. resuming into another run's folder needs --overwrite_output_dir; 6. zero-variance groups; 7. the minus sign
# --------------------------------------------------------------------------------------------------------------

def test_resume_into_another_finished_run_needs_overwrite(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "notes.txt").write_text("B")
    before = snapshot(other)
    argv = SMOKE + ["--resume_from", str(run_dir / "checkpoint-1"), "--output_dir", str(other)]
    code, err = main(argv, capsys)
    assert code == 2
    one_error(err, "holds another run", "--overwrite_output_dir")
    assert snapshot(other) == before
    code, err = main(argv + ["--overwrite_output_dir"], capsys)
    assert code == 0, err
    s = json.loads((other / "summary.json").read_text())
    assert s["resumed_from_step"] == 1 and (other / "notes.txt").read_text() == "B"
    assert not (other / "checkpoint-1").exists() and not (other / "checkpoint-2").exists()  # the old run's, gone


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_groups_get_advantage_zero_whatever_eps(scale):
    r = torch.tensor([0.1] * 4 + [0.3] * 4 + [1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    for eps in (0.0, 1e-4):
        a = sg.group_advantages(r, 4, scale, eps)
        assert torch.isfinite(a).all() and torch.equal(a[:8], torch.zeros(8, dtype=torch.float64))
        assert a[8:].abs().min() > 0.4
    assert torch.equal(sg.group_advantages(torch.full((8,), 0.7, dtype=torch.float64), 4, "batch", 0.0),
                       torch.zeros(8, dtype=torch.float64))


def test_adv_eps_zero_trains(tmp_path, capsys):
    code, err = main(SMOKE + ["--output_dir", str(tmp_path / "o"), "--adv_eps", "0", "--scale_rewards", "batch"],
                     capsys)
    assert code == 0, err


@pytest.mark.parametrize("text,value", [("The answer is −3", -3.0), ("x = ‒4.5", -4.5), ("–1,234", -1234.0),
                                        ("ranges 5 – 7 then -2", -2.0), ("3/−4", -0.75), ("#### −12", -12.0)])
def test_unicode_minus_signs_before_a_number(text, value):
    assert arithmetic.extract_final_number(text) == value
    assert arithmetic.exact_match([text], answer=[f"#### {abs(value)}"]) == [0.0]


# --------------------------------------------------------------------------------------------------------------
# 8, 9. SPICE never writes over its inputs or its own outputs
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spice_done(tmp_path_factory):
    """A finished SPICE smoke run (selected.jsonl, picks.jsonl, summary.json, a saved dataset)."""
    d = tmp_path_factory.mktemp("spice")
    S.run(S.parse_config(["--preset", "smoke", "--output_dir", str(d / "run"), "--save_to_disk", str(d / "ds")]))
    return d


@pytest.mark.parametrize("case", ["save_to_disk_is_output_dir", "save_to_disk_is_pool", "pool_inside_output_dir",
                                  "save_to_disk_exists", "output_dir_holds_a_run"])
def test_spice_outputs_never_replace_an_input_or_each_other(spice_done, tmp_path, capsys, case):
    d = tmp_path / "copy"
    shutil.copytree(spice_done, d)
    run, ds = d / "run", d / "ds"
    argv, names = {
        "save_to_disk_is_output_dir": (["--output_dir", str(run), "--save_to_disk", str(run),
                                        "--overwrite_output_dir"], ["--save_to_disk", "not a saved dataset"]),
        "save_to_disk_is_pool": (["--pool", str(ds), "--save_to_disk", str(ds), "--output_dir", str(d / "new"),
                                  "--overwrite_output_dir", "--column_prefix", "x_"], ["--save_to_disk", "--pool"]),
        "pool_inside_output_dir": (["--pool", str(run / "selected.jsonl"), "--output_dir", str(run),
                                    "--overwrite_output_dir", "--column_prefix", "x_"],
                                   ["--output_dir", "--pool", "selected.jsonl"]),
        "save_to_disk_exists": (["--output_dir", str(d / "new"), "--save_to_disk", str(ds)],
                                ["--save_to_disk", "--overwrite_output_dir"]),
        "output_dir_holds_a_run": (["--output_dir", str(run)], ["not empty"]),
    }[case]
    before = snapshot(d)
    code, err = spice_main(["--preset", "smoke"] + argv, capsys)
    assert code == 2
    one_error(err, *names)
    assert snapshot(d) == before


def test_spice_interrupted_mid_write_keeps_the_old_outputs_together(spice_done, tmp_path, capsys, monkeypatch):
    """A kill while the new outputs are written (here: during summary.json) leaves the old selected.jsonl,
    picks.jsonl and summary.json, never a mix; a folder holding only the feature cache continues without a flag."""
    d = tmp_path / "copy"
    shutil.copytree(spice_done, d)
    before = snapshot(d / "run")
    real = harness.write_json

    def killed(path, obj):
        if Path(path).name == "summary.json":
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(harness, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        spice_main(["--preset", "smoke", "--output_dir", str(d / "run"), "--overwrite_output_dir", "--budget", "3"],
                   capsys)
    monkeypatch.undo()
    assert snapshot(d / "run") == before
    only_cache = tmp_path / "c"
    shutil.copytree(d / "run" / "feature_cache", only_cache / "feature_cache")
    code, err = spice_main(["--preset", "smoke", "--output_dir", str(only_cache)], capsys)
    assert code == 0, err


# --------------------------------------------------------------------------------------------------------------
# 10. pool-by-pool budgets sum to the requested budget
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,pool_size,budget,total", [(1200, 120, 0.004, 5), (30, 3, 0.1, 3), (500, 120, 12, 50),
                                                       (1000, 120, 0.1, 100), (50, 20, 2, 5), (7, 3, 0.5, 4)])
def test_pool_by_pool_quotas_sum_to_the_budget(n, pool_size, budget, total):
    sizes = [len(w) for w in S.pool_windows(n, pool_size, 0)]
    q = S.window_quotas(sizes, budget, pool_size, seed=0)
    assert sum(q) == total and all(0 <= a <= s for a, s in zip(q, sizes))
    per = budget * pool_size if isinstance(budget, float) else budget
    assert all(a in (int(per), int(per) + 1) for a, s in zip(q, sizes) if s == pool_size)  # full windows: their share
    G = torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cfg = S.validate(S.Config(pool_size=pool_size, **({"select_k": budget} if isinstance(budget, int) else
                                                      {"budget": budget})))
    assert len(S.select_offline(G, cfg, "greedy").indices) == total


# --------------------------------------------------------------------------------------------------------------
# The weak classes: each ends in one line naming the culprit, exit status 2, nothing lost
# --------------------------------------------------------------------------------------------------------------

def _weak(kind: str, tmp: Path, run_dir: Path) -> tuple[list[str], list[str]]:
    """(flags, words the error line must hold) of one misuse."""
    bad_import = tmp / "bad_syntax.py"
    bad_import.write_text("def f(:\n")
    raising = tmp / "raising.py"
    raising.write_text("raise RuntimeError('configuration missing')\n")
    return {
        "reward_raises": (["--reward_funcs", f"{REWARDS}:raises"], ["'raises'", "ValueError", "boom"]),
        "reward_without_kwargs": (["--reward_funcs", f"{REWARDS}:no_kwargs"], ["'no_kwargs'", "does not accept"]),
        "reward_needs_an_argument": (["--reward_funcs", f"{REWARDS}:needs_x"], ["'needs_x'", "'x'"]),
        "reward_module_syntax_error": (["--reward_funcs", f"{bad_import}:f"], ["bad_syntax", "SyntaxError"]),
        "reward_module_raises": (["--reward_funcs", f"{raising}:f"], ["raising", "configuration missing"]),
        "reward_exits": (["--reward_funcs", f"{REWARDS}:exits"], ["'exits'", "sys.exit(0)"]),
        "two_rewards_one_name": (["--reward_funcs", f"{REWARDS}:parity,{tmp / 'p2.py'}:parity"], ["'parity'"]),
        "output_name_too_long": (["--output_dir", str(tmp / ("x" * 300))], ["--output_dir", "255"]),
        "seed_beyond_2_53": (["--seed", str(2**53 + 1)], ["--seed"]),
        "lora_rank_2_62": (["--use_peft", "--lora_r", str(2**62)], ["--lora_r"]),
        "lora_rank_unallocatable": (["--use_peft", "--lora_r", str(2**40)], ["--lora_r"]),
        "lora_flags_without_peft": (["--lora_r", "4"], ["--lora_r", "--use_peft"]),
        "eval_every_without_eval": (["--eval_every", "1", "--eval_size", "0"], ["--eval_every", "--eval_size 0"]),
        "temperature_underflow": (["--temperature", "1e-45", "--eval_size", "0"], ["--temperature"]),
        "rewards_overflow": (["--reward_funcs", f"{REWARDS}:huge,{tmp / 'h2.py'}:huge2", "--eval_size", "0"],
                             ["overflow"]),
        "mixed_text_and_conversations": (["--dataset", jsonl(tmp / "m.jsonl", [
            {"prompt": "1 + 1?", "answer": "2"}, {"prompt": [{"role": "user", "content": "2 + 2?"}],
                                                   "answer": "4"}] * 4)], ["m.jsonl row 2", "conversation"]),
    }[kind]


WEAK = ["reward_raises", "reward_without_kwargs", "reward_needs_an_argument", "reward_module_syntax_error",
        "reward_module_raises", "reward_exits", "two_rewards_one_name", "output_name_too_long", "seed_beyond_2_53",
        "lora_rank_2_62", "lora_rank_unallocatable", "lora_flags_without_peft", "eval_every_without_eval",
        "temperature_underflow", "rewards_overflow", "mixed_text_and_conversations"]


@pytest.mark.parametrize("kind", WEAK)
def test_weak_classes_end_in_one_line_and_lose_nothing(run_dir, tmp_path, capsys, kind):
    (tmp_path / "p2.py").write_text("def parity(completions, **_):\n    return [0.0] * len(completions)\n")
    (tmp_path / "h2.py").write_text("def huge2(completions, **_):\n    return [1e308] * len(completions)\n")
    flags, names = _weak(kind, tmp_path, run_dir)
    before = snapshot(run_dir)
    out = [] if "--output_dir" in flags else ["--output_dir", str(run_dir), "--overwrite_output_dir"]
    code, err = main(SMOKE + out + flags, capsys)
    assert code == 2
    one_error(err, *names)
    assert snapshot(run_dir) == before


def test_resuming_after_the_dataset_file_changed(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    jsonl(data, [{"prompt": f"{i} + 1?", "answer": str(i + 1)} for i in range(10)])
    out = tmp_path / "o"
    code, err = main(SMOKE + ["--dataset", str(data), "--save_every", "1", "--output_dir", str(out)], capsys)
    assert code == 0, err
    jsonl(data, [{"prompt": f"{i} + 2?", "answer": str(i + 2)} for i in range(10)])
    before = snapshot(out)
    code, err = main(SMOKE + ["--dataset", str(data), "--resume_from", str(out / "checkpoint-1"), "--output_dir",
                              str(out), "--max_steps", "3"], capsys)
    assert code == 2
    one_error(err, "--resume_from", "dataset changed")
    assert snapshot(out) == before


@pytest.mark.parametrize("what", ["checkpoint", "final"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_old_files(run_dir, capsys, monkeypatch, what):
    """Resumed in place, then the disk fills while checkpoint-2 (or final/) is written: the old checkpoint-2 and
    final/ stay whole and no temporary folder is left."""
    before = snapshot(run_dir)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if what == "final":
        from transformers import PreTrainedModel

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    else:
        from accelerate import Accelerator

        monkeypatch.setattr(Accelerator, "save_state", full)
    code, err = main(SMOKE + ["--output_dir", str(run_dir), "--resume_from", str(run_dir / "checkpoint-1"),
                              "--save_every", "1" if what == "checkpoint" else "0"], capsys)
    assert code == 2
    one_error(err, "No space left on device")
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k.startswith(("final/", "checkpoint-2/"))} == \
           {k: v for k, v in before.items() if k.startswith(("final/", "checkpoint-2/"))}
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_kill_inside_the_final_swap_leaves_a_whole_final(run_dir, capsys, monkeypatch):
    """final/ is swapped in one step (renameat2): killed right after it, final/ is the new model, whole."""
    old = (run_dir / "final" / "model.safetensors").read_bytes()
    real = harness.remove

    def killed(p):
        if Path(p).name == ".final.tmp" and (Path(p) / "model.safetensors").exists():
            raise KeyboardInterrupt  # the old final/ is in .final.tmp now, not yet deleted
        return real(p)

    monkeypatch.setattr(harness, "remove", killed)
    with pytest.raises(KeyboardInterrupt):
        main(SMOKE + ["--output_dir", str(run_dir), "--resume_from", str(run_dir / "checkpoint-1"), "--max_steps",
                      "3"], capsys)
    monkeypatch.undo()
    new = (run_dir / "final" / "model.safetensors").read_bytes()
    assert new != old and (run_dir / "final" / "config.json").exists()


def test_common_replace_path_without_an_atomic_exchange(tmp_path, monkeypatch):
    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(harness, "exchange", lambda a, b: False)
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "t" / "f").write_text("old")
        (tmp_path / "n").mkdir()
        (tmp_path / "n" / "f").write_text("new")
        harness.replace_path(tmp_path / "n", tmp_path / "t")
        assert (tmp_path / "t" / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["t"]


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 5])
def test_an_interrupted_commit_is_finished_by_the_next_open(tmp_path, monkeypatch, stop_after):
    """The commit of a staged run, killed after `stop_after` renames: the next open() completes it, so the folder
    holds exactly the new run's entries and the user's own file."""
    root = tmp_path / "o"
    root.mkdir()
    for name, text in (("metrics.jsonl", "old"), ("summary.json", "old"), ("checkpoint-4", None), ("final", None),
                       ("notes.txt", "mine")):
        (root / name).mkdir() if text is None else (root / name).write_text(text)
    f = harness.OutputFolder(root, overwrite=True, owned=sg.OWNED)
    f.check()
    f.open()
    assert f.staged and f.path == root / f.STAGING
    (f.path / "metrics.jsonl").write_text("new")
    (f.path / "final").mkdir()
    (f.path / "final" / "w").write_text("new")
    (f.path / "checkpoint-2").mkdir()
    real, count = os.replace, {"n": 0}

    def rename(a, b):
        if Path(b).name != f.MARK:  # the commit's own renames (not the atomic write of its mark)
            if count["n"] >= stop_after:
                raise KeyboardInterrupt
            count["n"] += 1
        return real(a, b)

    monkeypatch.setattr(harness.os, "replace", rename)
    monkeypatch.setattr(harness, "exchange", lambda a, b: False)  # every step a plain rename, so each can be cut
    with pytest.raises(KeyboardInterrupt):
        f.commit()
    monkeypatch.undo()
    (root / f.LOCK).unlink()  # as if the process had been killed (its lock is then stale)
    g = harness.OutputFolder(root, overwrite=True, owned=sg.OWNED)
    g.open()
    g.close()
    names = sorted(p.name for p in root.iterdir())
    assert names == ["checkpoint-2", "final", "metrics.jsonl", "notes.txt"], names
    assert (root / "metrics.jsonl").read_text() == "new" and (root / "final" / "w").read_text() == "new"


def test_plot_of_a_bad_metrics_file_and_bad_config_files(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\nnot json\n{"step": 2}\n')
    code, err = main(["plot", str(run)], capsys)
    assert code == 2
    one_error(err, "metrics.jsonl line 2")
    for text, names in (("max_steps: 1\nmax_steps: 2\n", ["c.yaml", "max_steps", "twice"]),
                        ("config: other.yaml\n", ["c.yaml", "config"]),
                        ("salt: off\n", ["c.yaml", "salt", "quote"])):
        (tmp_path / "c.yaml").write_text(text)
        code, err = main(["--config", str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "o")], capsys)
        assert code == 2
        one_error(err, *names)
    assert not (tmp_path / "o").exists()


def test_read_only_model_cache_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SALT_SPICE_CACHE", str(tmp_path / "file" / "cache"))
    code, err = main(SMOKE + ["--model", "embedded", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2
    one_error(err, "the model cache", "is a file")
    assert not (tmp_path / "o").exists()


def test_spice_weak_classes(tmp_path, capsys):
    """A chat template that rejects a row's role (named by row), α so small every gain rounds to 0, a cache shard
    holding NaN (named, recomputed), spice_index counting file rows inside a --split slice."""
    pool = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    pool[7]["messages"] = [{"role": "system", "content": "s"}] + pool[7]["messages"]
    model = template_model(tmp_path / "m")
    code, err = spice_main(["--pool", jsonl(tmp_path / "p.jsonl", pool), "--model", str(model), "--dtype", "float32",
                            "--output_dir", str(tmp_path / "o1")], capsys)
    assert code == 2
    one_error(err, "p.jsonl row 8", "chat template")
    code, err = spice_main(["--preset", "smoke", "--alpha", "1e-300", "--output_dir", str(tmp_path / "o2")], capsys)
    assert code == 2
    one_error(err, "--alpha")
    assert not (tmp_path / "o2" / "selected.jsonl").exists()
    rows = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(12)]
    out = tmp_path / "o3"
    code, err = spice_main(["--pool", jsonl(tmp_path / "r.jsonl", rows), "--model", "tiny", "--dtype", "float32",
                            "--split", "train[4:10]", "--budget", "3", "--output_dir", str(out), "--compare", "false"],
                           capsys)
    assert code == 0, err
    got = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert all(rows[g["spice_index"]]["instruction"] == g["instruction"] for g in got)
    assert all(4 <= g["spice_index"] < 10 for g in got)
    shard = sorted((out / "feature_cache").glob("*/shard_*.safetensors"))[0]
    from safetensors.torch import load_file, save_file

    blob = load_file(str(shard))
    blob["features"][0, 0] = float("nan")
    save_file(blob, str(shard))
    capsys.readouterr()
    code, err = spice_main(["--pool", str(tmp_path / "r.jsonl"), "--model", "tiny", "--dtype", "float32", "--split",
                            "train[4:10]", "--budget", "3", "--output_dir", str(out), "--compare", "false",
                            "--overwrite_output_dir"], capsys)
    assert code == 0 and f"{shard}" in err and "non-finite" in err
    assert [json.loads(x)["spice_index"] for x in (out / "selected.jsonl").read_text().splitlines()] == \
           [g["spice_index"] for g in got]
