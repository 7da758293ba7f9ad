"""Nothing lost, nothing silent (issue 11): every class of bad input or fault ends in ONE line naming the flag,
file, row or field, with exit status 2, and leaves the output_dir as it was; SPICE's selected.jsonl feeds a
standard SFT loop as is. The common config layer is checked for both scripts' CLIs (salt_grpo-specific classes
are in test_reliability_salt.py). Tiny model and pools only."""
import dataclasses
import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common

import harness
from experiments import shared
import salt_grpo as SG
import spice_select as S

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")
MAINS = {"salt_grpo": SG.main, "spice_select": S.main}


def snapshot(d: Path) -> dict:
    """Every file under d with its bytes and mode: what must survive a failed run unchanged."""
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mode) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def out(tmp_path):
    """An output_dir holding a previous run's files."""
    d = tmp_path / "out"
    d.mkdir()
    (d / "selected.jsonl").write_text('{"instruction": "old", "response": "run"}\n')
    (d / "summary.json").write_text('{"k": 1}\n')
    (d / "metrics.jsonl").write_text('{"step": 0}\n')
    return d


def fails_in_one_line(capsys, script: str, argv: list[str], expect: str, out: Path) -> str:
    """Run a script's CLI entry (harness.run_main, as `python script.py` does): exit status 2, stderr one `error:`
    line naming `expect` (plus at most one `hint:` line), no traceback, and the output_dir unchanged."""
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        harness.run_main(lambda: MAINS[script](argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) <= 2 and err[0].startswith("error: ") and all(x.startswith("hint: ") for x in err[1:]), err
    assert expect in err[0], err
    assert snapshot(out) == before
    return err[0]


def write(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------- the config layer

COMMON_CASES = [  # (argv, text the one line must hold), for BOTH scripts: they share harness.parse_config
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["stray"], "unrecognized arguments: stray"),
    (["--se", "1"], "unrecognized arguments: --se"),  # no abbreviations
    (["--seed", "2.5"], "--seed"),
    (["--seed", "-1"], "--seed must be ≥ 0"),
    (["--seed"], "--seed"),
    (["--preset", "huge"], "--preset"),
    (["--config", "missing.yaml"], "missing.yaml"),
]
YAML_CASES = [("seed: 2.5\n", "field seed must be an integer"), ("seed: [1]\n", "field seed must be an integer"),
              ("seed: null\n", "field seed must be an integer"), ("sed: 1\n", "unknown field(s) sed"),
              ("- 1\n", "expected a mapping"), ("seed: [\n", "cannot parse"), (b"seed: 1 # caf\xe9\n", "line 1: not UTF-8")]
SCRIPT_CASES = {
    "spice_select": [
        (["--k_out", "0"], "--k_out must be ≥ 1"), (["--omega", "1"], "--omega must be < 1"),
        (["--select_k", "0"], "--select_k must be > 0"), (["--update_every", "0"], "--update_every must be ≥ 1"),
        (["--alpha", "inf"], "--alpha must be a finite number"), (["--alpha", "nan"], "--alpha"),
        (["--lam", "-1"], "--lam must be ≥ 0"), (["--dtype", "float64"], "--dtype"), (["--dtype", "fp8"], "--dtype"),
        (["--method", "best"], "--method"), (["--budget", "2.5"], "--budget 2.5"),
        (["--budget", "100.0"], "--budget 100.0"), (["--budget", "5000"], "--budget 5000 is larger than the pool"),
        (["--pool_size", "10", "--select_k", "20"], "--select_k 20 is larger than --pool_size 10"),
        (["--pool_size", "10", "--budget", "5"], "--select_k"), (["--mode", "online"], "--pool_size"),
        (["--batch_size", "0"], "--batch_size"), (["--max_length", "1"], "--max_length"),
    ],
    "salt_grpo": [
        (["--task_size", "0"], "--task_size must be ≥ 1"), (["--learning_rate", "nan"], "--learning_rate"),
        (["--learning_rate", "-1"], "--learning_rate must be ≥ 0"), (["--adam_beta1", "1.5"], "--adam_beta1"),
        (["--max_grad_norm", "nan"], "--max_grad_norm"), (["--save_every", "-1"], "--save_every"),
        (["--eval_every", "-1"], "--eval_every"), (["--loss_type", "ppo"], "--loss_type"), (["--salt", "on"], "--salt"),
    ],
}


@pytest.mark.parametrize("script, argv, expect", [(s, a, e) for s in sorted(MAINS) for a, e in COMMON_CASES] +
                         [(s, a, e) for s, cases in SCRIPT_CASES.items() for a, e in cases])
def test_bad_flags_are_one_line_and_touch_nothing(capsys, out, script, argv, expect):
    fails_in_one_line(capsys, script, argv + ["--output_dir", str(out)], expect, out)


@pytest.mark.parametrize("script", sorted(MAINS))
@pytest.mark.parametrize("text, expect", YAML_CASES)
def test_bad_config_files_are_one_line(capsys, out, tmp_path, script, text, expect):
    f = tmp_path / "c.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    fails_in_one_line(capsys, script, ["--config", str(f), "--output_dir", str(out)], expect, out)


def test_yaml_exponents_and_counts_keep_their_meaning(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nbudget: 1.0\nselect_k: 12\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = S.parse_config(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.lr, cfg.budget, cfg.select_k) == (1e-3, 1.0, 12) and isinstance(cfg.select_k, int)
    assert isinstance(S.parse_config(["--budget", "1"]).budget, int)  # 1 is one row, 1.0 all of them
    (tmp_path / "s.yaml").write_text("learning_rate: 1e-5\n")
    assert SG.parse_config(["--config", str(tmp_path / "s.yaml")]).learning_rate == 1e-5


def test_the_cli_itself_prints_one_line(tmp_path):
    """`python script.py` wires run_main: one line, exit 2, for both scripts."""
    for script in ("spice_select.py", "salt_grpo.py"):
        p = subprocess.run([sys.executable, str(ROOT / script), "--nope"], capture_output=True, text=True, env=ENV)
        assert p.returncode == 2 and p.stderr.splitlines()[0] == "error: unrecognized arguments: --nope", p.stderr


# ---------------------------------------------------------------------------------------------- data in

@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_one_row_convention_in_every_format(tmp_path, fmt):
    """The same bad row is `row 3` whatever the format (counted from 1; a CSV header is not a row)."""
    import datasets

    rows = [{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "d"},
            {"instruction": "e", "response": ""}]
    p = tmp_path / f"pool.{fmt}"
    if fmt == "jsonl":
        write(p, rows)
    elif fmt == "json":
        p.write_text(json.dumps(rows, indent=1))
    else:
        getattr(datasets.Dataset.from_list(rows), f"to_{fmt}")(str(p))
    with pytest.raises(common.UserError) as e:
        S.load_pool(S.Config(pool=str(p)))
    assert f"pool.{fmt} row 3" in str(e.value) and "field 'response' is empty" in str(e.value)
    assert (f"(line 4)" in str(e.value)) == (fmt == "csv")  # the line, where a text file's line differs


def test_bad_data_files_are_one_line(capsys, out, tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "b"}\n')
    fails_in_one_line(capsys, "spice_select", ["--pool", str(latin), "--output_dir", str(out)],
                      "latin.jsonl line 2: not UTF-8 (byte 0xe9 at column 21)", out)
    csv = tmp_path / "latin.csv"
    csv.write_bytes(b"instruction,response\na,b\nc,caf\xe9\n")
    fails_in_one_line(capsys, "spice_select", ["--pool", str(csv), "--output_dir", str(out)], "latin.csv line 3", out)
    good = write(tmp_path / "good.jsonl", [{"instruction": "a", "response": "b"}] * 3)
    fails_in_one_line(capsys, "spice_select", ["--pool", good, "--split", "test", "--output_dir", str(out)],
                      "split 'test'", out)
    (tmp_path / "empty").mkdir()
    line = fails_in_one_line(capsys, "spice_select", ["--pool", str(tmp_path / "empty"), "--output_dir", str(out)],
                             "empty", out)
    assert "doesn't contain any data files" in line or "cannot load" in line
    fails_in_one_line(capsys, "spice_select", ["--pool", str(tmp_path / "x.txt"), "--output_dir", str(out)],
                      "x.txt", out)
    fails_in_one_line(capsys, "spice_select", ["--pool", write(tmp_path / "bad.jsonl", ['{"instruction": "a"', "{}"]),
                                               "--output_dir", str(out)], "bad.jsonl row 1: invalid JSON", out)


def test_split_slices_folders_and_saved_datasets_are_read(tmp_path):
    import datasets

    rows = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(6)]
    p = write(tmp_path / "pool.jsonl", rows)
    assert S.load_pool(S.Config(pool=p, split="train[2:4]"))[0] == rows[2:4]
    rows_, label = harness.read_rows(p, "train[2:4]")
    assert harness.row_location(label, 0) == f"{p} row 3"  # a slice keeps the file's row numbers
    (tmp_path / "folder").mkdir()
    write(tmp_path / "folder" / "part.jsonl", rows)
    assert S.load_pool(S.Config(pool=str(tmp_path / "folder")))[0] == rows
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:4]), test=datasets.Dataset.from_list(rows[4:]))
    dd.save_to_disk(str(tmp_path / "saved"))
    assert S.load_pool(S.Config(pool=str(tmp_path / "saved"), split="test"))[0] == rows[4:]
    with pytest.raises(common.UserError, match="split 'dev'"):
        S.load_pool(S.Config(pool=str(tmp_path / "saved"), split="dev"))


def test_input_is_read_in_every_row_not_decided_by_row_0(tmp_path):
    rows = [{"instruction": "Translate", "output": "x"}, {"instruction": "Translate", "input": "chat", "output": "y"},
            {"instruction": "Translate", "input": "chien", "output": "z"}]
    _, ex, _, _ = S.load_pool(S.Config(pool=write(tmp_path / "p.jsonl", rows)))
    assert [e.prompt for e in ex] == ["Translate", "Translate\n\nInput:\nchat", "Translate\n\nInput:\nchien"]


# ---------------------------------------------------------------------------------------------- outputs

def tiny(tmp_path, **kw) -> S.Config:
    base = dict(model="tiny", dtype="float32", max_length=48, batch_size=8, shard_batches=1, compare=False,
                output_dir=str(tmp_path / "run"), cache_dir="none")
    return S.validate(S.Config(**{**base, **kw}))


def test_selected_keeps_every_pool_column(tmp_path):
    from accelerate import Accelerator

    rows = [{"instruction": f"q{i}", "response": f"r{i}", "score": -i, "delta": "mine", "pool_index": 100 + i,
             "messages": f"a note {i}"} for i in range(12)]
    cfg = tiny(tmp_path, pool=write(tmp_path / "p.jsonl", rows), instruction_field="instruction",
               response_field="response", budget=4, save_to_disk=str(tmp_path / "ds"), overwrite_output_dir=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text('{"step": 0}\n')  # an earlier online run's log
    res = S.run(cfg, Accelerator(cpu=True))
    assert not (tmp_path / "run/metrics.jsonl").exists()  # the outputs describe one run
    got = [json.loads(x) for x in (tmp_path / "run/selected.jsonl").read_text().splitlines()]
    assert [g["spice_index"] for g in got] == res["indices"] and len(got) == 4
    for g in got:  # the user's score/delta/pool_index/messages untouched; ours prefixed; the chat beside theirs
        assert {k: g[k] for k in rows[0]} == rows[g["spice_index"]]
        assert g["spice_messages"] == [{"role": "user", "content": g["instruction"]},
                                       {"role": "assistant", "content": g["response"]}]
    assert [g["spice_t"] for g in got] == [0, 1, 2, 3] and all(math.isfinite(g["spice_delta"]) for g in got)
    import datasets

    assert datasets.load_from_disk(str(tmp_path / "ds")).to_list() == got
    with pytest.raises(common.UserError, match="column.* spice_index"):  # a pool holding our column: stop, early
        S.run(tiny(tmp_path, pool=write(tmp_path / "q.jsonl", got), budget=2, instruction_field="instruction",
                   response_field="response"), Accelerator(cpu=True))


def test_output_dirs_that_cannot_be_written_fail_before_the_run(capsys, out, tmp_path):
    pool = write(tmp_path / "p.jsonl", [{"instruction": "a", "response": "b"}] * 4)
    (tmp_path / "file").write_text("x")
    base = ["--pool", pool, "--model", "tiny"]
    fails_in_one_line(capsys, "spice_select", base + ["--output_dir", str(tmp_path / "file")], "is a file", out)
    fails_in_one_line(capsys, "spice_select", base + ["--output_dir", "/proc/salt-spice"], "not writable", out)
    fails_in_one_line(capsys, "spice_select", base + ["--output_dir", str(out), "--save_to_disk", str(out)],
                      "is not a saved dataset", out)


def test_corrupt_cache_shard_is_recomputed(tmp_path, capfd):
    from accelerate import Accelerator

    cfg = tiny(tmp_path, pool=str(S.DEMO_POOL), split="train[:24]", budget=0.25, cache_dir=str(tmp_path / "cache"))
    first = S.run(cfg, Accelerator(cpu=True))
    shard = sorted((tmp_path / "cache").glob("*/shard_*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated shard
    capfd.readouterr()
    again = S.run(dataclasses.replace(cfg, overwrite_output_dir=True), Accelerator(cpu=True))  # the same folder
    assert again["indices"] == first["indices"] and "unreadable" in capfd.readouterr().err
    from safetensors.torch import load_file

    assert load_file(str(shard))["features"].shape[0] == 8  # rewritten whole


def test_huge_features_are_one_line_not_nan_gains():
    G = torch.randn(20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(common.UserError, match=r"too large for float64.*row \d+") as e:
        S.spice_select(G * 1e160, 5)
    assert "\n" not in str(e.value)
    ok = S.spice_select(G * 1e150, 5)  # inside the bound the gains stay finite
    assert all(math.isfinite(r["delta"]) for r in ok.records)


def strict_json(text: str):
    """Parse as a strict JSON parser does: NaN / Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON output"))


def test_json_outputs_have_no_bare_nan_and_the_usual_mode(tmp_path):
    import numpy as np

    obj = {"a": float("nan"), "b": [float("inf"), torch.tensor([1.0, float("nan")])], "c": np.float64("nan"),
           "d": np.int64(3)}
    harness.write_json(tmp_path / "x.json", obj)
    harness.write_jsonl(tmp_path / "x.jsonl", [obj])
    log = harness.MetricsLogger(None, tmp_path)
    log.log({"loss": float("nan"), "r": torch.tensor(float("inf"))}, step=0)
    want = {"a": None, "b": [None, [1.0, None]], "c": None, "d": 3}
    assert strict_json((tmp_path / "x.json").read_text()) == want
    assert strict_json((tmp_path / "x.jsonl").read_text()) == want
    assert strict_json((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "loss": None, "r": None}
    umask = os.umask(0)
    os.umask(umask)
    (tmp_path / "plain.txt").write_text("x")
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    for f in ("x.json", "x.jsonl"):  # atomic files get the mode any other file gets (0644 under umask 022)
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == plain == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------- experiments

def test_experiment_smoke_never_overwrites_the_published_results(tmp_path, monkeypatch):
    scripts = [f for f in sorted((ROOT / "experiments").glob("*.py")) if f.stem not in ("__init__", "shared")]
    # one script per experiment section of docs/RESULTS.md (`### N. … — `bash run.sh experiments NAME``), no more
    documented = set(re.findall(r"^### \d+\..*`bash run.sh experiments (\w+)`",
                                (ROOT / "docs/RESULTS.md").read_text(), flags=re.M))
    assert {f.stem for f in scripts} == documented and len(scripts) >= 13
    for f in scripts:  # every script's --out default comes from experiment_args, which calls results_dir
        assert f'experiment_args("{f.stem}", __doc__, argv' in f.read_text(), f
    assert "results_dir(name, args.smoke)" in (ROOT / "experiments/shared.py").read_text()
    assert shared.results_dir("x", True) == ROOT / "outputs/experiments-smoke/x"
    assert shared.results_dir("x", False) == ROOT / "docs/results/x"
    calls = []
    monkeypatch.setattr(shared, "results_dir", lambda name, smoke: calls.append((name, smoke)) or tmp_path / name)
    from experiments import salt_geometry as mod
    mod.main(["--smoke", "--cache_dir", str(tmp_path / "cache")])
    assert calls == [("salt_geometry", True)] and (tmp_path / "salt_geometry/results.json").exists()
    with pytest.raises(common.UserError, match="unrecognized arguments: --smok"):  # one line, not a usage block
        mod.main(["--smok"])


# ---------------------------------------------------------------------------------------------- SFT tools

def test_selected_jsonl_trains_with_a_standard_sft_loop(tmp_path):
    """`--preset smoke` in seconds; selected.jsonl loads with datasets' json loader and two steps of transformers'
    Trainer run on its `messages` column as written (what TRL's SFTTrainer reads)."""
    import datasets
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    out = tmp_path / "sel"
    p = subprocess.run([sys.executable, str(ROOT / "spice_select.py"), "--preset", "smoke", "--output_dir", str(out),
                        "--save_to_disk", str(tmp_path / "ds")], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    ds = datasets.load_dataset("json", data_files=str(out / "selected.jsonl"), split="train")
    assert ds.num_rows == 6 and {"instruction", "response", "family", "messages", "spice_index"} <= set(ds.column_names)
    assert datasets.load_from_disk(str(tmp_path / "ds")).to_list() == ds.to_list()
    model, tok = harness.tiny_llama(seed=0)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    train = ds.map(lambda r: tok(tok.apply_chat_template(r["messages"], tokenize=False)))
    args = TrainingArguments(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
