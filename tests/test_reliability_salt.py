"""salt_grpo.py misused or faulted: every case ends with exit status 2 and one `error:` line naming the flag, file,
row or field (never a traceback), before any work where the input allows, and nothing in the output folder is lost
or changed. Classes: field bounds and choices, cross-field settings, the output folder, resume, reward functions,
dataset rows, non-finite training. (SPICE and the common layer: tests/test_reliability.py.)"""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


import harness
import salt_grpo as sg
from test_salt_train import PARITY, ROOT, chat_model, reset_accelerate

REWARDS = PARITY.rsplit(":", 1)[0]
SMOKE = ["--preset", "smoke", "--max_steps", "2", "--eval_size", "2", "--max_completion_length", "6"]


def main(argv, capsys) -> tuple[int, str]:
    """salt_grpo's main in this process: (exit status, stderr)."""
    reset_accelerate()
    capsys.readouterr()
    code = 0
    try:
        harness.run_main(lambda: sg.main(list(argv)))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_error(err: str, *names: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished smoke run with checkpoint-1 and checkpoint-2 (copied per test)."""
    out = tmp_path_factory.mktemp("base") / "run"
    reset_accelerate()
    sg.main(SMOKE + ["--save_every", "1", "--output_dir", str(out)])
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


BAD = [  # (flags, names the error line must contain)
    (["--save_every", "-1"], ["--save_every"]),
    (["--eval_every", "-1"], ["--eval_every"]),
    (["--max_grad_norm", "nan"], ["--max_grad_norm"]),
    (["--task_size", "0"], ["--task_size"]),
    (["--learning_rate", "nan"], ["--learning_rate"]),
    (["--learning_rate", "-1e-5"], ["--learning_rate"]),
    (["--adam_beta1", "1.5"], ["--adam_beta1"]),
    (["--report_to", "wandbx"], ["--report_to", "wandbx"]),
    (["--dtype", "float64"], ["--dtype"]),
    (["--dtype", "fp8"], ["--dtype"]),
    (["--lora_r", "0"], ["--lora_r"]),
    (["--steps_per_generation", "0"], ["--steps_per_generation"]),
    (["--max_prompt_length", "0"], ["--max_prompt_length"]),
    (["--lora_dropout", "1"], ["--lora_dropout"]),
    (["--salt_scope", "micro", "--micro_batch_size", "1"], ["--salt_scope micro", "--micro_batch_size 1"]),
    (["--reward_funcs", ""], ["--reward_funcs"]),
    (["--reward_weights", "1,2"], ["--reward_weights"]),
    (["--reward_weights", "nan"], ["--reward_weights"]),
    (["--reward_funcs", "bogus"], ["--reward_funcs", "bogus"]),
    (["--reward_funcs", "no_such_module_xyz:f"], ["--reward_funcs", "no_such_module_xyz"]),
    (["--reward_funcs", f"{REWARDS}:missing"], ["--reward_funcs", "missing"]),
    (["--dataset", "{data}", "--dataset_split", "test"], ["d.jsonl", "split 'test'"]),
    (["--dataset", "{data}", "--prompt_column", "question", "--eval_split", "test"], ["--eval_split", "d.jsonl"]),
    (["--num_generations", "1"], ["num_generations=1"]),
    (["--bogus_flag", "1"], ["--bogus_flag"]),
]


@pytest.mark.parametrize("flags,names", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_settings_fail_before_any_work_and_touch_nothing(run_dir, tmp_path, capsys, flags, names):
    """Even with --overwrite_output_dir, a bad setting is refused before the old run is touched."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    before = snapshot(run_dir)
    code, err = main(SMOKE + ["--output_dir", str(run_dir), "--overwrite_output_dir"] +
                     [f.format(data=data) for f in flags], capsys)
    assert code == 2
    one_error(err, *names)
    assert snapshot(run_dir) == before


def test_output_dir_that_is_not_empty_a_file_or_unwritable(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    code, err = main(SMOKE + ["--output_dir", str(run_dir)], capsys)
    assert code == 2 and "--overwrite_output_dir" in err
    one_error(err, "--output_dir", "not empty")
    assert snapshot(run_dir) == before
    f = tmp_path / "afile"
    f.write_text("keep")
    for out, words in ((f, ["is a file"]), (f / "sub", ["not writable"])):
        code, err = main(SMOKE + ["--output_dir", str(out)], capsys)
        assert code == 2
        one_error(err, "--output_dir", *words)
    assert f.read_text() == "keep"


def test_overwrite_output_dir_replaces_the_old_run_without_mixing(run_dir, capsys):
    code, _ = main(SMOKE + ["--output_dir", str(run_dir), "--overwrite_output_dir", "--max_steps", "1"], capsys)
    assert code == 0 and not (run_dir / "checkpoint-2").exists() and (run_dir / "final" / "model.safetensors").exists()
    assert [r["step"] for r in harness.read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 1]


def _cut(p: Path, keep: float = 0.5):
    p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])


RESUME = [  # (how the checkpoint or the command is changed, extra flags, names)
    ("", ["--resume_from", "{run}/checkpoint-9"], ["--resume_from", "checkpoint-9"]),
    ("state.json", ["--resume_from", "{run}/checkpoint-1"], ["--resume_from", "state.json"]),
    ("model.safetensors", ["--resume_from", "{run}/checkpoint-1"], ["--resume_from", "cannot load"]),
    ("optimizer.bin", ["--resume_from", "{run}/checkpoint-1"], ["--resume_from", "cannot load"]),
    ("processes", ["--resume_from", "{run}/checkpoint-1"], ["written by 2 processes"]),
    ("", ["--resume_from", "{run}/checkpoint-1", "--learning_rate", "0.5"], ["learning_rate=0.001 (now 0.5)"]),
    ("", ["--resume_from", "{run}/checkpoint-1", "--model", "{chat}"], ["model='tiny'"]),
    ("", ["--resume_from", "{run}/checkpoint-2", "--max_steps", "1"], ["--max_steps 1", "step 2"]),
]


@pytest.mark.parametrize("damage,flags,names", RESUME, ids=[f"{d or f[-2]}" for d, f, _ in RESUME])
def test_bad_resume_is_one_line_and_touches_nothing(run_dir, tmp_path, capsys, damage, flags, names):
    ck = run_dir / "checkpoint-1"
    if damage == "processes":
        state = json.loads((ck / "state.json").read_text())
        (ck / "state.json").write_text(json.dumps(dict(state, processes=2)))
    elif damage:
        _cut(ck / damage)
    chat = chat_model(tmp_path / "chat") if "{chat}" in flags else ""
    before = snapshot(run_dir)
    code, err = main(SMOKE + ["--output_dir", str(run_dir)] +
                     [f.format(run=run_dir, chat=chat) for f in flags], capsys)
    assert code == 2
    one_error(err, *names)
    assert snapshot(run_dir) == before


def test_resume_after_a_kill_mid_line_and_with_harmless_changes(run_dir, capsys):
    """A killed run's metrics.jsonl may end in half a line: the resumed run rebuilds it from the checkpoint. Eval,
    save and step-count settings may change on resume."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')
    code, err = main(SMOKE + ["--output_dir", str(run_dir), "--resume_from", str(run_dir / "checkpoint-1"),
                              "--max_steps", "3", "--eval_every", "2", "--save_every", "0"], capsys)
    assert code == 0, err[-2000:]
    rows = harness.read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and rows[0] == {"step": 0, **rows[0]}
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["resumed_from_step"] == 1 and s["eval_accuracy_start"] is not None  # from the original run's step 0


@pytest.mark.parametrize("fn,words", [("text", ["'text'", "'1.0'"]), ("short", ["'short'", "length 0"]),
                                      ("nan", ["'nan'", "nan"]), ("none", ["'none'", "NoneType"])])
def test_a_bad_reward_function_is_named(tmp_path, capsys, fn, words):
    """Each function is called on one row before any work (salt_grpo.probe_rewards): the folder is never made."""
    out = tmp_path / "o"
    code, err = main(SMOKE + ["--output_dir", str(out), "--reward_funcs", f"{REWARDS}:{fn}", "--eval_size", "0",
                              "--prompts_per_step", "4"], capsys)
    assert code == 2
    one_error(err, "reward function", *words)
    assert not out.exists()


def test_non_finite_training_stops_before_saving(tmp_path, capsys):
    out = tmp_path / "o"
    code, err = main(SMOKE + ["--output_dir", str(out), "--learning_rate", "1e30", "--max_steps", "4",
                              "--save_every", "1", "--eval_size", "0"], capsys)
    assert code == 2
    line = one_error(err, "non-finite")
    step = int(line.split("step ")[1].split(":")[0])
    assert not (out / f"checkpoint-{step}").exists() and not (out / "final").exists()
    assert not (out / "summary.json").exists()


BAD_ROWS = [
    ({"question": [{"role": "user"}], "answer": "1"}, ["d.jsonl row 2", "'question'", "role, content"]),
    ({"question": "", "answer": "1"}, ["d.jsonl row 2", "'question'", "empty"]),
    ({"question": "2+2?", "answer": "four"}, ["d.jsonl row 2", "'answer'", "no number"]),
    ({"q": "2+2?", "answer": "4"}, ["d.jsonl row 2", "missing field 'question'"]),
]


@pytest.mark.parametrize("row,names", BAD_ROWS, ids=[str(i) for i in range(len(BAD_ROWS))])
def test_bad_dataset_rows_name_file_row_and_field(tmp_path, capsys, row, names):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps(row) + "\n")
    code, err = main(SMOKE + ["--output_dir", str(tmp_path / "o"), "--dataset", str(data), "--prompt_column", "question",
                              "--eval_size", "0"], capsys)
    assert code == 2
    one_error(err, *names)


def test_a_20kb_prompt_is_cut_not_allocated(tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"question": ("lorem ipsum " * 1700 if i == 0 else "") + f"{i} + 1?",
                                        "answer": str(i + 1)}) + "\n" for i in range(6)))
    code, err = main(SMOKE + ["--output_dir", str(tmp_path / "o"), "--dataset", str(data), "--prompt_column", "question",
                              "--max_prompt_length", "32",
                              "--eval_size", "1"], capsys)
    assert code == 0, err[-2000:]
    assert "1 of 6 prompts are longer than --max_prompt_length 32 tokens" in err


def test_the_script_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "salt_grpo.py"), "--preset", "smoke", "--dtype", "float64",
                        "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --dtype") and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_an_interrupted_final_save_keeps_the_old_final_and_leaves_no_temp(run_dir, capsys, monkeypatch):
    """A kill (here KeyboardInterrupt) in the middle of writing final/ (weights written, tokenizer not yet): the
    previous final/ stays whole and no temporary folder is left behind."""
    from transformers import PreTrainedTokenizerBase

    before = {p: (run_dir / "final" / p).read_bytes() for p in ("model.safetensors", "config.json")}

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        main(SMOKE + ["--output_dir", str(run_dir), "--resume_from", str(run_dir / "checkpoint-1")], capsys)
    assert {p: (run_dir / "final" / p).read_bytes() for p in before} == before
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".final")]
