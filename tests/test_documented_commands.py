"""Every shell command written in README.md and docs/*.md runs, or is in SKIP with its reason (issue 22).

Commands are collected from fenced shell blocks (continuation lines joined, comments dropped) and from inline code
spans that start like a command. Each one is run at smoke size, the way it is written plus what `smoke_form` appends
(`--preset smoke`, `--smoke`, a few steps, an output folder under tmp), or, for an experiment, checked to have its
`--smoke` run in tests/test_experiments_*.py; a command the docs gain later fails this test until it runs or is
listed in SKIP. The commands that share a smoke form run once.
"""
import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("bash ", "python ", "python3 ", ".venv/bin/python ", "accelerate ", "ACCELERATE_USE_CPU=", "torchrun ",
          "pip ")

# command as written → why it does not run here. Exact text; a changed command must be looked at again.
SKIP = {
    "bash run.sh": "the two demos on SmolLM2 (about 20 minutes on this CPU); their pipelines run below as "
                   "`bash run.sh salt --preset smoke` and `bash run.sh spice --preset smoke`",
    "bash run.sh test": "the test suite itself",
    "bash run.sh setup": "run by every `bash run.sh` command below (and by CI before the suite)",
    "bash run.sh [setup|main|test|salt|spice|bench [NAME]|experiments NAME]": "a usage line, not a command",
    "bash run.sh experiments": "a usage line: without a NAME it prints the list (tests/test_experiments_salt.py)",
    "bash run.sh experiments NAME": "a template (NAME); each experiment's command is listed and smoke-tested",
    "python -m experiments.NAME": "a template (NAME)",
    "bash run.sh bench [featurize|salt_overhead|spice_speed]": "a usage line; each benchmark runs below",
    "accelerate launch": "the word, in prose",
    "accelerate launch --num_processes N salt_grpo.py ...": "GPUs (a template: N); the 2-process CPU form runs in "
                                                            "tests/test_launch.py",
    "accelerate launch --cpu --num_processes 2": "quoted as what NOT to do (it silently runs one process)",
    "accelerate launch --num_processes 8 salt_grpo.py ...": "8 GPUs",
    "accelerate launch --config_file fsdp2.yaml salt_grpo.py ...": "GPUs (FSDP2); the FSDP2 path runs on CPU under "
                                                                   "gloo in tests/test_salt_scale.py",
    "accelerate launch --config_file zero3.yaml salt_grpo.py ...": "GPUs and DeepSpeed",
    "bash bench/gpu_check.sh": "a GPU machine (the --cpu form runs in tests/test_salt_scale.py)",
    "accelerate config": "interactive (it asks questions)",
    "python bench/salt_overhead.py [--steps N] [--trl] [--no-bf16] [--out raw.json]": "a usage line; its concrete "
                                                                                     "form runs below",
}
SKIP["python salt_grpo.py plot 'outputs/experiments/salt_attribution_runs/grpo_s*' 'outputs/experiments/salt_attribution_runs/micro4_s*' 'outputs/experiments/salt_attribution_runs/cosine_s*' --labels GRPO \"SALT official (micro scope)\" \"SALT, --salt_gram cosine\" --smooth 3 --out docs/figures/salt_vs_grpo_smollm.png"] = \
    "reads experiment 12's 12 runs (47 min); `plot A B` runs on smoke runs in tests/test_trl_carryover.py"
SKIP["python salt_grpo.py plot 'outputs/salt_s*' 'outputs/grpo_s*' --out salt_vs_grpo.png"] = \
    "a template (folders of your runs); `plot A B` runs in tests/test_trl_carryover.py"
QWEN = "needs 8 GPUs and Qwen2.5-1.5B-Instruct and GSM8K from the Hugging Face hub"


def extract(text: str) -> list[str]:
    """Commands in fenced shell blocks and in inline code spans."""
    out, block, lang, lines = [], False, "", text.split("\n")
    pending = ""
    prose = []
    for line in lines:
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            block, lang = (not block, fence.group(1)) if not block else (False, "")
            continue
        if not block:
            prose.append(line)
            continue
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        s = line.strip()
        if pending:
            s, pending = pending + " " + s, ""
        if s.endswith("\\"):
            pending = s[:-1].strip()
            continue
        s = re.sub(r"\s+#\s.*$", "", s).strip()
        if s.startswith(STARTS):
            out.append(re.sub(r"\s+", " ", s))
    for m in re.finditer(r"`([^`]+)`", "\n".join(prose)):  # a span may wrap onto the next line
        if m.group(1).startswith(STARTS):
            out.append(re.sub(r"\s+", " ", m.group(1).strip()))
    return out


def documented() -> list[str]:
    return sorted({c for doc in DOCS for c in extract(doc.read_text(encoding="utf-8"))})


def experiment_of(cmd: str) -> str | None:
    m = re.match(r"^(?:bash run\.sh experiments|(?:\.venv/bin/)?python3? -m experiments\.)\s*([a-z_0-9]+)", cmd)
    return m.group(1) if m else None


def smoke_form(cmd: str, tmp: Path) -> str | None:
    """The command at smoke size, or None when it is not run here (SKIP, Qwen, experiments)."""
    if cmd in SKIP or "Qwen/" in cmd or experiment_of(cmd):
        return None
    out = tmp / re.sub(r"\W+", "_", cmd)[:80]
    c = cmd.replace("data.jsonl", str(ROOT / "data" / "spice_pool_smoke.jsonl"))
    c = c.replace("--config run.yaml", f"--config {tmp / 'run.yaml'}")
    c = c.replace("--config recipe.yaml", f"--config {tmp / 'recipe.yaml'}")
    if "plot" in c.split():  # draw a finished smoke run (made by the fixture)
        return re.sub(r"plot \S+", f"plot {tmp / 'salt_run'}", c)
    if "salt_grpo.py" in c or c.startswith("bash run.sh salt"):
        return f"{c} --preset smoke --max_steps 1 --eval_size 2 --output_dir {out}"
    if "spice_select.py" in c or c.startswith("bash run.sh spice"):
        return f"{c} --preset smoke --output_dir {out}"
    if "bench/featurize.py" in c or c.startswith("bash run.sh bench featurize"):
        return c.replace("--json FILE", f"--json {out}.json") + " --smoke"
    if "bench/salt_overhead.py" in c or c.startswith("bash run.sh bench salt_overhead"):
        return f"{c} --model tiny --steps 1 --no-bf16 --prompts_per_step 2 --num_generations 4 --max_completion_length 4"
    if "bench/spice_speed.py" in c or c.startswith("bash run.sh bench spice_speed"):
        return re.sub(r"--cases \S+", "", c) + " --cases small --reps 1"
    return c  # anything else runs as written (the data generators rewrite the committed files: checked unchanged)


# files a documented command may rewrite in the checkout: they must come out byte for byte the same
GENERATED = ["data/arithmetic/train.jsonl", "data/arithmetic/test.jsonl", "data/spice_pool.jsonl",
             "data/spice_pool_smoke.jsonl"]


def test_every_documented_command_is_run_or_listed_with_a_reason():
    """A documented command runs (smoke_form) unless SKIP, the Qwen recipe or an experiment names it; SKIP holds only
    commands the docs still show."""
    cmds = documented()
    assert len(cmds) > 20  # the collector sees the docs
    stale = [c for c in SKIP if c not in cmds]
    assert not stale, f"SKIP lists commands the docs no longer hold: {stale}"
    ran = [c for c in cmds if smoke_form(c, Path("/tmp")) is not None]
    skipped = [c for c in cmds if c in SKIP or "Qwen/" in c]
    assert len(ran) + len(skipped) + sum(bool(experiment_of(c)) for c in cmds) == len(cmds)


def test_documented_experiments_have_a_smoke_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_experiments*.py"))
    names = {experiment_of(c) for c in documented()} - {None, "NAME"}
    modules = {p.stem for p in (ROOT / "experiments").glob("*.py")} - {"__init__", "shared"}
    assert names and names <= modules, names - modules
    missing = [n for n in names if not re.search(rf"\b{n}\b", tests)]
    assert not missing, f"experiments documented without a --smoke test: {missing}"


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every runnable documented command in its smoke form, each distinct form once: {command: (form, result)}."""
    tmp = tmp_path_factory.mktemp("docs")
    (tmp / "run.yaml").write_text("max_steps: 1\nlearning_rate: 1.0e-3\nsalt: 'off'\n")
    (tmp / "recipe.yaml").write_text(  # a TRL GRPO recipe in open-r1's style, at smoke size
        "model_name_or_path: tiny\nreward_funcs:\n- closeness\nreward_weights: [1.0]\nper_device_train_batch_size: 4\n"
        "gradient_accumulation_steps: 2\nnum_generations: 4\nmax_completion_length: 6\nmax_steps: 1\n"
        "learning_rate: 1.0e-3\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\nlogging_steps: 1\nseed: 42\n"
        "report_to:\n- none\nbf16: false\nlogging_first_step: true\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("ACCELERATE_USE_CPU", None)
    setup = subprocess.run([sys.executable, "salt_grpo.py", "--preset", "smoke", "--max_steps", "1", "--eval_size",
                            "2", "--output_dir", str(tmp / "salt_run")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert setup.returncode == 0, setup.stderr[-2000:]
    before = {f: (ROOT / f).read_bytes() for f in GENERATED}
    forms = {cmd: smoke_form(cmd, tmp) for cmd in documented()}
    forms = {c: f for c, f in forms.items() if f is not None}

    def run(form: str) -> subprocess.CompletedProcess:
        e, rest = env, form
        if form.startswith("ACCELERATE_USE_CPU="):
            var, rest = form.split(" ", 1)
            e = {**env, var.split("=")[0]: var.split("=")[1]}
        argv = shlex.split(rest)
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        return subprocess.run(argv, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)

    # two at a time (each single-threaded): most of each command is Python and torch starting up
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = dict(zip(sorted(set(forms.values())), pool.map(run, sorted(set(forms.values())))))
    results = {c: (f, done[f]) for c, f in forms.items()}
    changed = [f for f in GENERATED if (ROOT / f).read_bytes() != before[f]]
    for f in changed:  # leave the checkout as it was, then fail below
        (ROOT / f).write_bytes(before[f])
    results["(committed data files unchanged)"] = ("", subprocess.CompletedProcess([], 1 if changed else 0, "",
                                                                                   f"rewritten: {changed}"))
    return results


def test_every_runnable_documented_command_runs(smoke_runs):
    assert len(smoke_runs) >= 15
    failed = {c: (f, r.stderr[-1500:]) for c, (f, r) in smoke_runs.items() if r.returncode != 0}
    assert not failed, failed
    print(f"\n{len(smoke_runs)} documented commands run ({len({f for f, _ in smoke_runs.values()})} distinct smoke "
          f"forms); {len(SKIP)} listed in SKIP")
