"""Integration tests of salt_grpo.py on the tiny random model: identity == off, SALT ≠ GRPO when n_eff < 1,
2 processes == 1 process, resume == uninterrupted, the script end to end, and one SmolLM2 step (slow)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
import salt_grpo as sg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


PARITY = f"{ROOT / 'tests' / 'salt_rewards.py'}:parity"  # a hash bit: mixed groups for a random model


def smoke(tmp_path, name="run", **kw):
    base = dict(sg.PRESETS["smoke"], output_dir=str(tmp_path / name), eval_size=0, max_steps=2,
                prompts_per_step=2, num_generations=4, max_completion_length=6, reward_funcs=PARITY,
                overwrite_output_dir=True, prompt_column="question")  # GSM8K's column, as the tests' datasets
    base.update(kw)
    return dataclasses.replace(sg.demo_config(), **base)


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def grads_of(t):
    return {n: p.grad.clone() for n, p in t.raw.named_parameters() if p.grad is not None}


def test_rollouts_are_exact_samples_of_the_trained_policy():
    """generate + GumbelSampler draws token t from softmax(z_t/τ) of the model itself, with each rollout's own
    generator, ignoring sampling settings in the model's generation_config (here a repetition penalty)."""
    model, tok = harness.tiny_llama(seed=3)
    model.generation_config.repetition_penalty, model.generation_config.do_sample = 3.0, True
    c = sg.demo_config(bf16=False, temperature=0.7)
    prompts = ["What is 1 + 2?\n", "Hi\n"]
    seeds = [11, 12]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    _, _, comp, mask = harness.generate(model, tok, prompts, c, torch.device("cpu"), 5, gens)
    for i, p in enumerate(prompts):  # a plain loop: full forward, Gumbel-max with the rollout's own generator
        g = torch.Generator().manual_seed(seeds[i])
        ids = tok(p, return_tensors="pt").input_ids
        for t in range(int(mask[i].sum())):
            with torch.no_grad():
                z = model(input_ids=ids).logits[0, -1].float() / 0.7
            u = torch.rand(z.shape[-1], generator=g)
            nxt = int(torch.argmax(z - torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))))
            assert nxt == int(comp[i, t]), (i, t)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)


def test_identity_equals_off_for_loss_and_gradients(tmp_path):
    reset_accelerate()
    off = sg.build(smoke(tmp_path, salt="off"))
    ident = sg.build(smoke(tmp_path, salt="identity"))
    batch = sg.make_rollouts(off, 0)["slices"][0]
    assert batch["adv"].abs().sum() > 0  # mixed groups
    m_off = sg.accumulate_gradients(off, batch, 0)
    m_id = sg.accumulate_gradients(ident, batch, 0)
    assert m_id["salt/k"] >= 1 and m_id["salt/skipped"] == 0  # SALT really ran
    assert abs(m_off["loss"] - m_id["loss"]) <= 1e-6
    g_off, g_id = grads_of(off), grads_of(ident)
    assert g_off.keys() == g_id.keys() and len(g_off) > 0
    for n in g_off:
        assert (g_off[n] - g_id[n]).abs().max() <= 1e-6, n


def test_salt_changes_the_update_when_neff_below_one(tmp_path):
    reset_accelerate()
    runs = {m: sg.build(smoke(tmp_path, salt=m)) for m in ("off", "official")}
    batch = sg.make_rollouts(runs["off"], 0)["slices"][0]
    # advantages along K's smallest eigenvector: strong signed cancellation, n_eff < 1
    t = runs["official"]
    parts = sg.feature_pass(t.raw, t.spec, [batch], t.cfg, t.accelerator.device, True)
    K = sg.scope_gram(t.accelerator, t.spec, parts, False)
    v = torch.linalg.eigh(K)[1][:, 0]
    batch["adv"] = (v / v.abs().max()).float()
    before = {n: p.detach().clone() for n, p in t.raw.named_parameters()}
    out = {}
    for mode, tr in runs.items():
        m = sg.accumulate_gradients(tr, batch, 0)
        sg.optimizer_step(tr)
        out[mode] = {n: p.detach().clone() for n, p in tr.raw.named_parameters()}
        if mode == "official":
            assert m["salt/neff"] < 1 and m["salt/alpha"] > 0
            a, a_new = tr.last_advantages
            assert (a_new - a).abs().max() > 1e-3
    moved = sum(float((out["off"][n] - before[n]).abs().sum()) for n in before)
    diff = sum(float((out["off"][n] - out["official"][n]).abs().sum()) for n in before)
    assert moved > 0 and diff > 1e-3 * moved


def test_micro_scope_and_several_micro_batches_run(tmp_path):
    """mini scope with 2 micro-batches (no-grad feature pass) equals mini scope in one micro-batch; micro scope runs."""
    reset_accelerate()
    one = sg.build(smoke(tmp_path, salt_features="sketch", salt_sketch_dim=64))  # (kronecker before issue 23)
    two = sg.build(smoke(tmp_path, micro_batch_size=4, salt_features="sketch", salt_sketch_dim=64))
    micro = sg.build(smoke(tmp_path, micro_batch_size=4, salt_scope="micro"))
    layers = sg.build(smoke(tmp_path, salt_features="layers", salt_layers="last:1", salt_k_out=4, salt_k_in=4))
    batch = sg.make_rollouts(one, 0)["slices"][0]
    m1, m2 = sg.accumulate_gradients(one, batch, 0), sg.accumulate_gradients(two, batch, 0)
    assert abs(m1["salt/neff"] - m2["salt/neff"]) < 1e-5 and m1["salt/B"] == m2["salt/B"] == 8
    assert torch.allclose(one.last_advantages[1], two.last_advantages[1], atol=1e-5)
    g1, g2 = grads_of(one), grads_of(two)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-4), n
    mm = sg.accumulate_gradients(micro, batch, 0)
    assert mm["salt/B"] == 4
    zero_first = dict(batch, adv=torch.cat([torch.zeros(4), batch["adv"][4:].abs() + 0.5 * torch.arange(4) - 1]))
    mz = sg.accumulate_gradients(micro, zero_first, 0)  # one micro-batch skipped (a ≡ 0), the other reweighted
    assert mz["salt/skipped"] == 0.5 and mz["salt/k"] >= 1
    ml = sg.accumulate_gradients(layers, batch, 0)
    assert ml["salt/B"] == 8 and ml["salt/participation_ratio"] >= 1
    assert ml["salt/gram"] == mm["salt/gram"] == 1.0 and m1["salt/gram"] == 0.0  # layers, lm_head exact; sketch


def _job(cfg_dict):
    reset_accelerate()
    from accelerate import Accelerator

    sg.train(sg.demo_config(**cfg_dict), Accelerator(cpu=True))


def launch(n: int, c, tmp_path) -> None:
    """Train c with n processes. debug_launcher runs in a fresh interpreter (see __main__ below): forking a pytest
    process whose OpenMP pool is already running can deadlock the children."""
    f = tmp_path / f"cfg-{Path(c.output_dir).name}.json"
    f.write_text(json.dumps(dataclasses.asdict(c)))
    r = subprocess.run([sys.executable, __file__, str(n), str(f)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def chat_model(path: Path, eos_extra: str = "!") -> Path:
    """The tiny model saved with a chat template and several EOS ids in its generation_config (as Qwen2.5 / Llama-3
    have two): the tokenizer's and each character of eos_extra."""
    model, tok = harness.tiny_llama(seed=0)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    model.generation_config.eos_token_id = [tok.eos_token_id] + [tok.convert_tokens_to_ids(ch) for ch in eos_extra]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("gram", [{}, {"salt_exact_budget": 1.0}])  # exact Gram (tokens gathered), the sketch
def test_two_processes_equal_one_process(tmp_path, gram):
    kw = dict(max_steps=2, prompts_per_step=2, num_generations=4, max_completion_length=6, seed=1, **gram)
    one, two = smoke(tmp_path, "p1", **kw), smoke(tmp_path, "p2", **kw)
    for n, c in ((1, one), (2, two)):
        launch(n, c, tmp_path)
    s1, s2 = (json.loads((Path(c.output_dir) / "summary.json").read_text()) for c in (one, two))
    assert s1["processes"] == 1 and s2["processes"] == 2
    a1, a2 = (load_file(str(Path(c.output_dir) / "last_advantages.safetensors")) for c in (one, two))
    assert a1["a"].abs().sum() > 0 and (a1["a_new"] - a1["a"]).abs().max() > 1e-4  # SALT acted
    assert torch.allclose(a1["a"], a2["a"]) and torch.allclose(a1["a_new"], a2["a_new"], atol=1e-6)
    w1, w2 = (load_file(str(Path(c.output_dir) / "final" / "model.safetensors")) for c in (one, two))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5, rtol=1e-4), k
    m1, m2 = (harness.read_metrics(Path(c.output_dir) / "metrics.jsonl") for c in (one, two))
    assert len(m1) == len(m2)
    for r1, r2 in zip(m1, m2):
        assert r1.get("salt/gram", 0.0) == (0.0 if gram else 1.0) or "salt/neff" not in r1
        for key in ("reward", "num_tokens", "salt/k", "salt/neff", "loss"):
            if key in r1:
                assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key


def test_two_processes_equal_one_process_with_every_new_option(tmp_path):
    """LoRA + gradient checkpointing + steps_per_generation + two reward functions (one reading a dataset column) with
    weights + conversational prompts + system prompt + prompt truncation + truncated-completion masking + several EOS
    ids + micro-batches (gradient accumulation) + an eval set that does not split evenly over the processes."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + {i % 3}?"}],
                                        "answer": str(i + i % 3), "bonus": i % 2}) + "\n" for i in range(12)))
    kw = dict(model=str(chat_model(tmp_path / "chat_model")), dataset=str(data), prompt_column="prompt",
              use_peft=True, lora_dropout=0.0, lora_r=4, gradient_checkpointing=True, optimizer_steps_per_generation=2,
              max_steps=3, reward_funcs=f"{PARITY.rsplit(':', 1)[0]}:length_bonus,{PARITY}", reward_weights="0.5,1",
              system_prompt="Be brief.", max_prompt_length=24, mask_truncated_completions=True, micro_batch_size=2,
              eval_size=3, eval_batch_size=2, seed=2, learning_rate=3e-3)
    one, two = smoke(tmp_path, "o1", **kw), smoke(tmp_path, "o2", **kw)
    for n, c in ((1, one), (2, two)):
        launch(n, c, tmp_path)
    w1, w2 = (load_file(str(Path(c.output_dir) / "final" / "adapter_model.safetensors")) for c in (one, two))
    assert w1.keys() == w2.keys() and any("lora_B" in k for k in w1)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5, rtol=1e-4), k
    assert any(w1[k].abs().sum() > 0 for k in w1 if "lora_B" in k)  # the adapter trained (lora_B starts at 0)
    m1, m2 = (harness.read_metrics(Path(c.output_dir) / "metrics.jsonl") for c in (one, two))
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [0, 1, 2, 3, 3]
    for r1, r2 in zip(m1, m2):
        assert r1.keys() == r2.keys()
        # (entropy, kl and clip_ratio/* are TRL's means of per-micro-batch means, so they depend on the split: here
        # 4 micro-batches on 1 process, 2 pooled over 2 on 2, and truncation-masked micro-batches count as 0)
        for key in ("reward", "rewards/length_bonus/mean", "loss", "num_tokens", "salt/neff",
                    "eval/reward", "completions/clipped_ratio"):
            if key in r1:
                assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key
    assert "reward" in m1[1] and "reward" not in m1[2] and "reward" in m1[3]  # one generation per 2 steps


@pytest.mark.parametrize("lora", [False, True])
def test_resume_under_two_processes_matches_uninterrupted(tmp_path, lora):
    """Resumed mid-round (steps_per_generation=2) under 2 processes, with a KL reference (for LoRA: the base with the
    adapter disabled): the same weights as the uninterrupted run."""
    kw = dict(max_steps=3, optimizer_steps_per_generation=2, beta=0.05, lr_scheduler_type="linear", seed=3, use_peft=lora,
              **({"lora_dropout": 0.0} if lora else {}))  # LoRA flags without --use_peft are refused
    full = smoke(tmp_path, "full", save_every=1, **kw)
    launch(2, full, tmp_path)
    res = smoke(tmp_path, "res", resume_from=str(Path(full.output_dir) / "checkpoint-1"), **kw)
    launch(2, res, tmp_path)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    w1, w2 = (load_file(str(Path(c.output_dir) / "final" / name)) for c in (full, res))
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    s = json.loads((Path(res.output_dir) / "summary.json").read_text())
    assert s["resumed_from_step"] == 1 and s["processes"] == 2


@pytest.mark.parametrize("iters,resume_at,spg", [(1, 2, 1), (2, 3, 1), (1, 3, 2)])
def test_resume_matches_uninterrupted(tmp_path, iters, resume_at, spg):
    """num_iterations=2 or steps_per_generation=2 resumed at step 3 restarts mid-round, from the saved rollouts."""
    reset_accelerate()
    kw = dict(max_steps=4, num_iterations=iters, optimizer_steps_per_generation=spg, lr_scheduler_type="linear", warmup_steps=1,
              beta=0.05)
    full = smoke(tmp_path, "full", save_every=1, **kw)
    sg.train(full)
    reset_accelerate()
    res = smoke(tmp_path, "resumed", resume_from=str(Path(full.output_dir) / f"checkpoint-{resume_at}"), **kw)
    s = sg.train(res)
    assert s["resumed_from_step"] == resume_at
    w1, w2 = (load_file(str(Path(c.output_dir) / "final" / "model.safetensors")) for c in (full, res))
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    tail = [r for r in harness.read_metrics(Path(full.output_dir) / "metrics.jsonl") if r["step"] > resume_at and "loss" in r]
    rows = harness.read_metrics(Path(res.output_dir) / "metrics.jsonl")
    again = [r for r in rows if r["step"] > resume_at and "loss" in r]
    assert [r["loss"] for r in tail] == [r["loss"] for r in again]
    # the resumed run's metrics and summary describe the whole run, from step 0
    full_rows = harness.read_metrics(Path(full.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in full_rows]
    s_full = json.loads((Path(full.output_dir) / "summary.json").read_text())
    assert s["reward_start"] == s_full["reward_start"] and s["reward_end"] == s_full["reward_end"]


def run_script(args, tmp_path, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, str(ROOT / "salt_grpo.py"), *args], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=300)


def test_script_end_to_end_smoke_and_plot(tmp_path):
    cfgfile = tmp_path / "run.yaml"
    cfgfile.write_text(f"preset: smoke\noutput_dir: {tmp_path / 'out'}\nsalt_scope: mini\n")
    r = run_script(["--config", str(cfgfile), "--max_steps", "3", "--eval_size", "4"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    assert "held-out reward" in r.stdout and str(out) in r.stdout and "train reward" in r.stdout
    rows = harness.read_metrics(out / "metrics.jsonl")
    steps = [x for x in rows if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "clip_ratio/region_mean",
                "step_time", "grad_norm", "salt/B", "time/generation_s", "time/backward_s"):
        assert key in steps[0], key
    assert "eval/reward" in rows[0] and "eval/reward" in rows[-1]  # the smoke preset's closeness reward
    for x in steps:  # the smoke preset exercises SALT: mixed groups, α and k computed (not skipped), all finite
        assert x["salt/skipped"] == 0 and x["salt/k"] >= 1 and x["frac_reward_zero_std"] < 1, x
        for key in ("salt/alpha", "salt/neff", "salt/participation_ratio", "loss", "entropy", "grad_norm"):
            assert math.isfinite(x[key]), key
    assert steps[0]["num_tokens"] < steps[1]["num_tokens"] < steps[2]["num_tokens"]  # TRL's: cumulative
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_size"] == 4
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "config.json").exists()
    r = run_script(["plot", str(out)], tmp_path)
    assert r.returncode == 0 and (out / "metrics.png").stat().st_size > 1000


def test_script_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "2+2?", "answer": "4"}\n{"prompt": "x", "answer": "1"}\n')
    r = run_script(["--preset", "smoke", "--dataset", str(bad), "--prompt_column", "question", "--eval_size", "0",
                    "--output_dir", str(tmp_path / "o")], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad} row 2: missing field 'question'" in r.stderr
    r = run_script(["--preset", "smoke", "--num_generations", "1", "--output_dir", str(tmp_path / "o")], tmp_path)
    assert r.returncode == 2 and "num_generations=1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_smollm2_one_step(tmp_path):
    """The embedded model: one SALT step with the default (exact LM-head Gram) features, bf16 autocast where native."""
    reset_accelerate()
    c = dataclasses.replace(sg.demo_config(), output_dir=str(tmp_path / "s"), max_steps=1, prompts_per_step=1,
                            num_generations=3, max_completion_length=4, eval_size=0, salt_alpha_min=0.5)
    sg.train(c)
    rows = [r for r in harness.read_metrics(tmp_path / "s" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 1 and (tmp_path / "s" / "final" / "model.safetensors").exists()
    assert rows[0]["num_tokens"] > 0 and ("salt/k" in rows[0] or rows[0].get("salt/skipped") == 1.0)


if __name__ == "__main__":  # `python tests/test_salt_train.py N cfg.json`: N processes through debug_launcher
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    from accelerate import debug_launcher

    n, cfg_dict = int(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    if n == 1:
        _job(cfg_dict)
    else:
        debug_launcher(_job, args=(cfg_dict,), num_processes=n)
