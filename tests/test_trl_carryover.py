"""A TRL user's recipe carries over (issue 24): TRL 1.16's names, list spellings, YAML recipes in open-r1's style,
TRL's reward contract, TRL's metric definitions; SPICE's selection trains the loss it scored (TRL's prompt/completion
with the completion mask of the chat template); `salt_grpo.py plot A B` compares runs in one figure."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import harness
import salt_grpo as sg
import spice_select as ss
from test_reliability_salt import REWARDS, main, one_error
from test_salt_train import reset_accelerate

# TRL 1.16's defaults for the names both projects share (trl/trainer/grpo_config.py, transformers.TrainingArguments)
TRL_DEFAULTS = dict(learning_rate=1e-6, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, max_grad_norm=1.0,
                    gradient_checkpointing=True, seed=42, lr_scheduler_type="linear", warmup_steps=0,
                    warmup_ratio=0.0, num_train_epochs=3.0, max_steps=-1, logging_steps=10, save_steps=500,
                    num_generations=8, max_completion_length=512, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
                    repetition_penalty=1.0, beta=0.0, num_iterations=1, epsilon=0.2, epsilon_high=None,
                    scale_rewards="group", loss_type="dapo", mask_truncated_completions=False,
                    steps_per_generation=None, reward_weights=None, log_completions=False,
                    gradient_accumulation_steps=None, per_device_train_batch_size=None, save_total_limit=None,
                    report_to=["none"], dataset_prompt_column="prompt")


def test_shared_names_have_trls_defaults():
    """A name shared with TRL has TRL's default (None where TRL's value is derived: 8 and 1 in TRL's batch terms)."""
    c, al = sg.Config(), {a: f.name for f in dataclasses.fields(sg.Config) for a in f.metadata.get("aliases", ())}
    for name, value in TRL_DEFAULTS.items():
        here = al.get(name, name)
        if name == "save_steps":
            here = "save_every"
        assert getattr(c, here) == value, (name, here, getattr(c, here), value)
    # the demo keeps its own settings in its preset, not in the defaults
    d = sg.parse_config(["--preset", "demo"])
    assert (d.learning_rate, d.seed, d.lr_scheduler_type, d.max_completion_length, d.max_steps) == (1e-5, 0, "constant",
                                                                                                     24, 32)


def test_batch_in_trls_terms_and_steps_per_generation_in_trls_meaning():
    c = sg.Config(micro_batch_size=4, gradient_accumulation_steps=2, num_generations=4, steps_per_generation=4)
    sg.resolve_batch(c, n_proc=2)
    # 4 × 2 completions per process and step, 2 processes: 4 prompts of G = 4; 4 micro-batch steps per generation
    # round = 2 optimizer steps (TRL's steps_per_generation counts micro-batches)
    assert (c.prompts_per_step, c.optimizer_steps_per_generation, c.steps_per_generation) == (4, 2, 4)
    with pytest.raises(harness.UserError, match="--steps_per_generation 3"):
        sg.resolve_batch(sg.Config(micro_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                                   steps_per_generation=3), n_proc=1)
    with pytest.raises(harness.UserError, match="not a multiple of num_generations"):
        sg.resolve_batch(sg.Config(micro_batch_size=3, num_generations=4), n_proc=1)


SPELLINGS = [
    (["--reward_funcs", "a.py:x", "pkg.mod.y"], ["--reward_funcs", "a.py:x,pkg.mod.y"]),
    (["--reward_weights", "1.0", "0.5"], ["--reward_weights", "1.0,0.5"]),
    (["--lora_target_modules", "q_proj", "v_proj"], ["--lora_target_modules", "q_proj,v_proj"]),
    (["--report_to", "tensorboard", "wandb"], ["--report_to", "tensorboard,wandb"]),
    (["--model_name_or_path", "m"], ["--model", "m"]),
    (["--dataset_name", "d.jsonl"], ["--dataset", "d.jsonl"]),
    (["--dataset_train_split", "x"], ["--dataset_split", "x"]),
    (["--dataset_test_split", "y"], ["--eval_split", "y"]),
    (["--dataset_prompt_column", "problem"], ["--prompt_column", "problem"]),
    (["--per_device_train_batch_size", "4"], ["--micro_batch_size", "4"]),
    (["--eval_steps", "5"], ["--eval_every", "5"]),
    (["--save_steps", "5"], ["--save_every", "5"]),
    (["--torch_dtype", "float32"], ["--dtype", "float32"]),
    (["--resume_from_checkpoint", "c"], ["--resume_from", "c"]),
    (["--model_init_kwargs", '{"attn_implementation": "eager"}'], ["--model_init_kwargs", "{\"attn_implementation\":\"eager\"}"]),
]


@pytest.mark.parametrize("trl,ours", SPELLINGS, ids=[s[0][0] for s in SPELLINGS])
def test_list_and_alias_spellings_equal_the_comma_and_primary_spellings(trl, ours):
    assert checked(trl) == checked(ours)


def checked(argv) -> dict:
    """The Config a command line gives once its values are typed and checked (as when a run starts)."""
    return dataclasses.asdict(harness.check_config(sg.parse_config(argv)))


def test_yaml_lists_equal_flags_and_an_alias_given_twice_is_one_line(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("reward_funcs:\n  - a.py:x\n  - pkg.mod.y\nreward_weights: [1.0, 0.5]\nreport_to: [none]\n"
                 "lora_target_modules: [q_proj, v_proj]\nmodel_name_or_path: m\n")
    a = checked(["--config", str(y)])
    b = checked(["--reward_funcs", "a.py:x,pkg.mod.y", "--reward_weights", "1,0.5", "--report_to", "none",
                 "--lora_target_modules", "q_proj,v_proj", "--model", "m", "--config", str(y)])
    assert a == b and a["reward_funcs"] == ["a.py:x", "pkg.mod.y"] and a["reward_weights"] == [1.0, 0.5]
    assert a["lora_target_modules"] == ["q_proj", "v_proj"] and a["report_to"] == ["none"]
    with pytest.raises(harness.UserError, match="--model is given twice"):
        sg.parse_config(["--model", "a", "--model_name_or_path", "b"])


def _open_r1(tmp_path: Path, extra: str = "") -> Path:
    """An open-r1 style GRPO recipe (their recipes/*/grpo/config_demo.yaml's fields) on a local dataset and the tiny
    model; the rewards in a module reached by a dotted path, as open-r1's are."""
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "solution": str(i + 1)}) + "\n"
                            for i in range(12)))
    (tmp_path / "r1_rewards.py").write_text(
        "def accuracy(completions, solution, **kwargs):\n"
        "    return [float(s in c) for c, s in zip(completions, solution)]\n\n"
        "def format(completions, **kwargs):\n"
        "    return [float(len(c) % 2) for c in completions]\n")
    y = tmp_path / "config_demo.yaml"
    y.write_text(f"""# Model arguments
model_name_or_path: {harness.TINY}
torch_dtype: float32
# Data training arguments
dataset_name: {data}
dataset_prompt_column: problem
system_prompt: "You are a helpful AI Assistant. Answer with a number."
# GRPO trainer config
bf16: false
gradient_accumulation_steps: 2
gradient_checkpointing: true
learning_rate: 1.0e-03
log_completions: true
log_level: info
logging_first_step: true
logging_steps: 1
lr_scheduler_type: cosine
max_prompt_length: 64
max_completion_length: 6
max_steps: 2
num_generations: 4
per_device_train_batch_size: 4
output_dir: {tmp_path / 'out'}
report_to:
- none
reward_funcs:
- r1_rewards.accuracy
- r1_rewards.format
reward_weights:
- 1.0
- 0.5
save_steps: 1
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
{extra}""")
    return y


def test_an_open_r1_recipe_runs_two_steps_with_salts_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    y = _open_r1(tmp_path)
    code, err = main(["--config", str(y), "--salt", "official", "--salt_scope", "micro", "--eval_size", "2"], capsys)
    assert code == 0, err[-3000:]
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"], cfg["prompt_column"], cfg["micro_batch_size"], cfg["gradient_accumulation_steps"],
            cfg["prompts_per_step"], cfg["reward_funcs"], cfg["reward_weights"], cfg["salt_scope"]) == \
        (harness.TINY, "problem", 4, 2, 2, ["r1_rewards.accuracy", "r1_rewards.format"], [1.0, 0.5], "micro")
    rows = harness.read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("rewards/accuracy/mean" in r and "rewards/format/mean" in r and "salt/alpha" in r for r in steps)
    # save_steps 1 with save_total_limit 1: only the last checkpoint is kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and (out / "final").is_dir()
    assert (out / "completions.jsonl").is_file()
    assert "logging_first_step" in err and "log_level" in err  # logging-only fields: accepted with a note


def test_trl_fields_this_project_does_not_implement_stop_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    y = _open_r1(tmp_path, "use_vllm: true\nvllm_mode: colocate\npush_to_hub: true\n")
    code, err = main(["--config", str(y)], capsys)
    assert code == 2
    one_error(err, "use_vllm", "vllm_mode", "push_to_hub")
    assert not (tmp_path / "out").exists()


def test_trls_reward_contract_trainer_state_none_rows_and_log_metric(tmp_path, capsys):
    """The keywords TRL 1.16 passes (GRPOTrainer._calculate_rewards: the dataset's columns but prompt, prompts,
    completions, completion_ids, trainer_state, log_extra, log_metric); None for a row leaves it out of that
    function's mean and of the weighted sum (nansum); log_metric lands in the step's metrics."""
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "rw.py").write_text(f"""import json
def stateful(completions, trainer_state, log_metric, log_extra, **kw):
    with open({str(seen)!r}, "a") as f:
        f.write(json.dumps({{"step": trainer_state.global_step, "keys": sorted(kw)}}) + "\\n")
    log_metric("my/metric", 3.0)
    log_extra("note", ["x"] * len(completions))
    return [float(trainer_state.global_step)] * len(completions)

def partial(completions, **kw):
    return [None if i % 2 else 1.0 for i in range(len(completions))]
""")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": str(i + 1), "level": i % 3}) + "\n"
                            for i in range(10)))
    code, err = main(["--preset", "smoke", "--dataset", str(data), "--reward_funcs", f"{tmp_path / 'rw.py'}:stateful",
                      f"{tmp_path / 'rw.py'}:partial", "--max_steps", "2", "--eval_size", "2",
                      "--log_completions", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 0, err[-3000:]
    calls = [json.loads(x) for x in seen.read_text().splitlines()]
    train_calls = calls[:2] if len(calls) > 2 else calls
    assert [c["step"] for c in calls].count(0) >= 1 and 1 in [c["step"] for c in calls]
    assert train_calls[0]["keys"] == sorted(["prompts", "completion_ids", "answer", "level"])  # + the named ones
    rows = [r for r in harness.read_metrics(tmp_path / "o" / "metrics.jsonl") if "reward" in r]
    for r, step in zip(rows, (0, 1)):
        # B rollouts, even rows score 1 from `partial`, odd rows None: mean of partial = 1; the weighted sum per row
        # is step + 1 (even) or step (odd, None left out), so the mean reward is step + 0.5
        assert r["rewards/partial/mean"] == 1.0 and r["rewards/stateful/mean"] == step
        assert math.isclose(r["reward"], step + 0.5, abs_tol=1e-12)
        assert r["my/metric"] == 3.0
    logged = [json.loads(x) for x in (tmp_path / "o" / "completions.jsonl").read_text().splitlines()]
    assert logged and all(x.get("note") == "x" for x in logged)


def test_metric_definitions_are_trls_on_constant_groups_and_four_micro_batches():
    """frac_reward_zero_std is TRL's is_std_zero: under scale_rewards=batch the batch std is tested (0 unless the whole
    batch is constant), under group each group's; clip ratios are, per micro-batch, token means pooled over processes,
    then the mean over micro-batches (TRL logs one value per micro-batch and averages them); low_min is the smallest
    per-sequence ratio of a micro-batch, averaged."""
    G = 4
    r = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 1, 2, 2, 2, 2], dtype=torch.float64)  # two constant groups of three
    assert sg.frac_zero_std(r, G, "group") == pytest.approx(2 / 3)
    assert sg.frac_zero_std(r, G, "batch") == 0.0  # TRL: the batch std is not 0
    assert sg.frac_zero_std(torch.ones(8, dtype=torch.float64), G, "batch") == 1.0
    # 4 micro-batches of 2 sequences × 3 tokens; per micro-batch (clipped tokens, tokens)
    clipped = torch.tensor([[[1, 0, 0], [1, 1, 0]], [[0, 0, 0], [0, 0, 0]], [[1, 1, 1], [0, 1, 0]],
                            [[0, 1, 0], [0, 0, 0]]], dtype=torch.float64)
    mask = torch.tensor([[[1, 1, 0], [1, 1, 1]], [[1, 1, 1], [1, 0, 0]], [[1, 1, 1], [1, 1, 1]],
                         [[1, 1, 1], [1, 1, 0]]], dtype=torch.float64)
    per_mb = [(clipped[i] * mask[i]).sum() / mask[i].sum() for i in range(4)]
    per_seq_min = [min(float((clipped[i, s] * mask[i, s]).sum() / mask[i, s].sum()) for s in range(2)) for i in range(4)]
    mean = sg.micro_batch_mean((clipped * mask).sum((1, 2)), mask.sum((1, 2)))
    low_min = sg.micro_batch_extreme([(clipped[i] * mask[i]).sum(1) / mask[i].sum(1) for i in range(4)], torch.min)
    assert math.isclose(mean, float(sum(per_mb) / 4), rel_tol=1e-12)
    assert math.isclose(low_min, sum(per_seq_min) / 4, rel_tol=1e-12)
    pooled = float((clipped * mask).sum() / mask.sum())
    assert not math.isclose(mean, pooled, rel_tol=1e-3)  # the global token mean (ours before) differs here


# ---- SPICE: the selection trains what it scored ---------------------------------------------------------------

def chat_tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(harness.embedded_model_dir())
    assert tok.chat_template
    return tok


def test_spice_scores_the_completion_tokens_of_the_chat_template():
    """For a conversational row, the tokens SPICE scores are exactly the completion tokens TRL's SFTTrainer trains on
    prompt/completion: apply_chat_template(prompt + completion) minus the rendering of the prompt alone."""
    tok = chat_tokenizer()
    ex = harness.Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
                         "Paris.")
    cfg = ss.Config(prompt_format="auto", max_length=512)
    (ids, n_prompt), = ss.tokenize([ex], tok, cfg)
    prompt, completion = ss.sft_pairs([ex], tok, cfg)[0]
    full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    p = tok.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    assert full[:len(p)] == p and ids == full and n_prompt == len(p)
    _, _, lm = ss.collate([(ids, n_prompt)], tok.pad_token_id, True)
    scored = [t for t, m in zip(ids, lm[0].tolist()) if m]
    assert scored == full[len(p):] and tok.decode(scored).startswith("Paris.")
    # plain text: the official format, the response + EOS scored
    (ids, n_prompt), = ss.tokenize([harness.Example("Capital of France?", "Paris.")], tok,
                                   ss.Config(prompt_format="plain"))
    assert tok.decode(ids[:n_prompt]) == "Instruction:\nCapital of France?\n\nResponse:\n"
    assert ids[n_prompt:] == tok("Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def run_spice(argv, capsys) -> tuple[int, str]:
    """spice_select's main in this process: (exit status, stderr)."""
    reset_accelerate()
    capsys.readouterr()
    code = 0
    try:
        harness.run_main(lambda: ss.main(list(argv)))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_selected_jsonl_trains_two_trainer_steps_on_prompt_completion(tmp_path):
    """selected.jsonl has TRL's prompt/completion (the scored text), messages and the pool's own columns; it loads with
    datasets.load_dataset("json") and trains two steps of transformers' Trainer with completion-only labels."""
    import datasets
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    reset_accelerate()
    out = tmp_path / "sel"
    ss.run(ss.parse_config(["--preset", "smoke", "--model", str(harness.embedded_model_dir()), "--budget", "4",
                            "--features", "sketch", "--sketch_dim", "256", "--layers", "last:1", "--lora", "false",
                            "--compare", "false", "--output_dir", str(out)]))
    ds = datasets.load_dataset("json", data_files=str(out / "selected.jsonl"), split="train")
    assert {"prompt", "completion", "messages", "instruction", "response", "family"} <= set(ds.column_names)
    assert len(ds) == 4 and ds[0]["completion"][0]["role"] == "assistant"  # conversational: SmolLM2 has a template
    tok = chat_tokenizer()
    cfg = ss.Config(prompt_format="auto")
    examples = [harness.Example(r["instruction"], r["response"]) for r in ds]
    scored = ss.tokenize(examples, tok, cfg)

    def encode(row):  # what SFTTrainer does with a conversational prompt/completion row (completion_only_loss)
        p = tok.apply_chat_template(row["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)
        full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)
        n = len(p["input_ids"])
        return {"input_ids": full["input_ids"], "labels": [-100] * n + full["input_ids"][n:]}

    enc = [encode(r) for r in ds]
    for e, (ids, n_prompt) in zip(enc, scored):
        assert e["input_ids"] == ids and sum(x != -100 for x in e["labels"]) == len(ids) - n_prompt

    def collate(batch):
        w = max(len(b["input_ids"]) for b in batch)
        pad = lambda xs, v: [x + [v] * (w - len(x)) for x in xs]  # noqa: E731
        ids = torch.tensor(pad([b["input_ids"] for b in batch], tok.pad_token_id))
        return {"input_ids": ids, "attention_mask": (torch.tensor(pad([[1] * len(b["input_ids"]) for b in batch], 0))),
                "labels": torch.tensor(pad([b["labels"] for b in batch], -100))}

    model = AutoModelForCausalLM.from_pretrained(harness.embedded_model_dir(), dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(enc), data_collator=collate)
    losses = [h["loss"] for h in trainer.train() and trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_a_pool_whose_prompt_column_would_be_overwritten_is_one_line_before_any_output(tmp_path, capsys):
    pool = tmp_path / "p.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}", "prompt": "x"}) + "\n"
                            for i in range(20)))
    code, err = run_spice(["--preset", "smoke", "--pool", str(pool), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2
    one_error(err, "p.jsonl row 1", "'prompt'")
    assert "--sft_format messages" in err
    assert not (tmp_path / "o").exists()
    code, err = run_spice(["--preset", "smoke", "--pool", str(pool), "--sft_format", "messages", "--budget", "3",
                           "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 0, err[-2000:]
    picked = [json.loads(x) for x in (tmp_path / "o" / "selected.jsonl").read_text().splitlines()]
    assert all(r["prompt"] == "x" and "completion" not in r and r["messages"] for r in picked)  # the pool's own kept
    # a selection selected from again: its prompt/completion are what would be written, so nothing is lost
    code, err = run_spice(["--preset", "smoke", "--budget", "6", "--output_dir", str(tmp_path / "a")], capsys)
    assert code == 0, err[-2000:]
    code, err = run_spice(["--preset", "smoke", "--pool", str(tmp_path / "a" / "selected.jsonl"), "--budget", "3",
                           "--instruction_field", "instruction", "--response_field", "response",
                           "--column_prefix", "spice2_", "--output_dir", str(tmp_path / "b")], capsys)
    assert code == 0, err[-2000:]


# ---- the comparison plot ------------------------------------------------------------------------------------

def test_plot_compares_runs_in_one_figure_with_labelled_lines(tmp_path, capsys):
    """`plot A B` writes one PNG with a line per run labelled from each run's config; a quoted glob is one arm."""
    for name, salt, seed in (("grpo_s0", "off", 0), ("grpo_s1", "off", 1), ("salt_s0", "official", 0)):
        code, err = main(["--preset", "smoke", "--salt", salt, "--seed", str(seed), "--max_steps", "3",
                          "--output_dir", str(tmp_path / name)], capsys)
        assert code == 0, err[-2000:]
    import matplotlib
    matplotlib.use("Agg")
    drawn = {}
    real = harness.save_figure

    def spy(fig, path, dpi=110):
        drawn["labels"] = [t.get_text() for t in fig.legends[0].get_texts()]
        drawn["ticks"] = [t for ax in fig.axes for t in ax.get_xticks()]
        drawn["titles"] = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.axison]
        return real(fig, path, dpi)

    harness.save_figure = spy
    try:
        code, err = main(["plot", str(tmp_path / "grpo_s*"), str(tmp_path / "salt_s0"), "--out",
                          str(tmp_path / "cmp.png")], capsys)
    finally:
        harness.save_figure = real
    assert code == 0, err
    png = (tmp_path / "cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["labels"] == ["GRPO (--salt off) (n=2)", "SALT official (mini scope)"]
    assert all(float(t).is_integer() for t in drawn["ticks"])
    assert any(t.startswith("mean reward") for t in drawn["titles"]) and any("α" in t for t in drawn["titles"])
    code, err = main(["plot", str(tmp_path / "nothing*"), str(tmp_path / "salt_s0")], capsys)
    assert code == 2 and "nothing*" in err


def test_salt_gram_cosine_is_the_rule_on_the_unit_diagonal_gram():
    """--salt_gram cosine (offered after experiment 12) = the released rule on K_ij/√(K_ii K_jj): invariant to
    rescaling the rollouts' features (K → DKD), equal to experiment 12's `cosine` arm, and raw by default."""
    from experiments import salt_attribution as exp12
    g = torch.Generator().manual_seed(0)
    F = torch.randn(8, 32, generator=g, dtype=torch.float64)
    K = F @ F.T / 8
    a = sg.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1], dtype=torch.float64), 4)
    D = torch.diag(torch.tensor([0.3, 2.0, 1.0, 5.0, 0.7, 1.1, 3.0, 0.2], dtype=torch.float64))
    cos = dataclasses.replace(sg.demo_config(), salt_gram="cosine", num_generations=4)
    raw = dataclasses.replace(cos, salt_gram="raw")
    assert sg.demo_config().salt_gram == "raw"
    a1, _ = sg.salt_reweight(K, a, cos)
    a2, _ = sg.salt_reweight(D @ K @ D, a, cos)
    a3, _ = exp12.cosine(K, a, raw)
    assert torch.allclose(a1, a2, atol=1e-10) and torch.allclose(a1, a3, atol=1e-12)
    assert not torch.allclose(sg.salt_reweight(D @ K @ D, a, raw)[0], sg.salt_reweight(K, a, raw)[0], atol=1e-3)
