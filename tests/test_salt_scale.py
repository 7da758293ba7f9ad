"""salt_grpo.py at recipe scale, on the tiny model: each TRL flag (dtype, gradient checkpointing, LoRA,
steps_per_generation, reward functions, conversational prompts, system prompt, prompt length, truncated-completion
masking, several EOS ids) trains and changes the parameters it should; the memory-lean log-probs; answer parsing;
FSDP2 generation under torch's fully_shard; bench/gpu_check.sh --cpu. (2 processes == 1 and resume: test_salt_train.)"""
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

import common

import harness
import salt_grpo as sg
from data import arithmetic
from test_salt_train import PARITY, ROOT, chat_model, reset_accelerate, smoke

REWARDS = PARITY.rsplit(":", 1)[0]


def one_step(c):
    """build, one optimizer step; (trainer, metrics, names of the parameters that changed)."""
    reset_accelerate()
    t = sg.build(c)
    before = {n: p.detach().clone() for n, p in t.raw.named_parameters()}
    rnd = sg.make_rollouts(t, 0)
    m = {**rnd["metrics"], **sg.accumulate_gradients(t, rnd["slices"][0], 0), "grad_norm": sg.optimizer_step(t, 0)}
    return t, m, {n for n, p in t.raw.named_parameters() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize("flags", [
    {}, {"gradient_checkpointing": True}, {"dtype": "bfloat16"}, {"dtype": "auto"}, {"mask_truncated_completions": True},
    {"system_prompt": "Be brief.", "max_prompt_length": 8}, {"optimizer_steps_per_generation": 2, "micro_batch_size": 3},
    {"use_peft": True, "lora_target_modules": "q_proj,v_proj"}, {"use_peft": True, "gradient_checkpointing": True,
                                                                "lora_target_modules": "all-linear"}])
def test_each_flag_trains_the_parameters_it_should(tmp_path, flags):
    if flags.get("mask_truncated_completions"):  # many EOS ids, so that some completions end before the limit
        flags = dict(flags, model=str(chat_model(tmp_path / "m", "aeiou0123456789")), max_completion_length=8)
    t, m, changed = one_step(smoke(tmp_path, **flags))
    for key in ("loss", "grad_norm", "entropy", "reward", "reward_std", "salt/neff", "salt/alpha"):
        assert math.isfinite(m[key]), key
    trainable = {n for n, p in t.raw.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    if flags.get("use_peft"):  # only the adapter trains; every base weight stays as loaded
        assert all("lora_" in n for n in trainable)  # step 1 moves lora_B only (B = 0 zeroes A's gradient)
        assert changed == {n for n in trainable if "lora_B" in n}
        want = {"q_proj", "v_proj"} if flags["lora_target_modules"] != "all-linear" else {"q_proj", "gate_proj"}
        assert all(any(w in n for n in changed) for w in want)
    if "dtype" in flags:
        assert next(t.raw.parameters()).dtype == (torch.bfloat16 if flags["dtype"] == "bfloat16" else torch.float32)
    if flags.get("mask_truncated_completions"):  # truncated rows are out of the loss, the others untouched
        s = t.buffer["slices"][0] if t.buffer else sg.make_rollouts(t, 0)["slices"][0]
        assert 0 < int((s["comp_mask"].sum(1) == 0).sum()) < s["comp_mask"].shape[0]
        assert 0 < m["completions/clipped_ratio"] < 1
    if flags.get("max_prompt_length"):
        assert t.buffer is None and all(s["prompt_ids"].shape[1] <= 8 for s in sg.make_rollouts(t, 1)["slices"])


def test_gradient_checkpointing_and_micro_batches_give_the_same_gradients(tmp_path):
    reset_accelerate()
    ts = [sg.build(smoke(tmp_path, **kw))
          for kw in ({}, {"gradient_checkpointing": True}, {"gradient_checkpointing": True, "micro_batch_size": 3})]
    batch = sg.make_rollouts(ts[0], 0)["slices"][0]
    grads = []
    for t in ts:
        sg.accumulate_gradients(t, batch, 0)
        grads.append({n: p.grad for n, p in t.raw.named_parameters()})
    for g in grads[1:]:
        for n in grads[0]:
            assert torch.allclose(grads[0][n], g[n], atol=1e-6, rtol=1e-4), n


def test_steps_per_generation_splits_one_round_into_optimizer_steps(tmp_path):
    """S = 2: one generation round of 2 × prompts_per_step prompts; step 1 is exactly step 1 of the S = 1 run (same
    prompts, rollouts, loss), step 2 trains the round's second half against the stored log-probs it was sampled with."""
    reset_accelerate()
    one, two = (sg.build(smoke(tmp_path, steps_per_generation=s)) for s in (1, 2))
    r1, r2 = sg.make_rollouts(one, 0), sg.make_rollouts(two, 0)
    assert len(r1["slices"]) == 1 and len(r2["slices"]) == 2 and "old_logp" in r2["slices"][1]
    assert torch.equal(r1["slices"][0]["comp_ids"], r2["slices"][0]["comp_ids"])
    assert not torch.equal(r2["slices"][0]["prompt_ids"], r2["slices"][1]["prompt_ids"])
    m1, m2 = sg.accumulate_gradients(one, r1["slices"][0], 0), sg.accumulate_gradients(two, r2["slices"][0], 0)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-7)
    s = sg.train(smoke(tmp_path, "s2", steps_per_generation=2, max_steps=4))
    rows = [r for r in harness.read_metrics(Path(s["outputs"]["metrics"])) if "loss" in r]
    assert [("time/generation_s" in r) for r in rows] == [True, False, True, False]


def test_custom_reward_functions_with_weights_and_dataset_columns(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1), "bonus": i % 3}) + "\n"
                            for i in range(10)))
    t, m, changed = one_step(smoke(tmp_path, dataset=str(data), eval_size=2, reward_funcs=f"{REWARDS}:length_bonus,"
                                   "closeness", reward_weights="1,0.5"))
    assert set(m) >= {"rewards/length_bonus/mean", "rewards/closeness/std"} and changed
    assert m["reward"] == pytest.approx(m["rewards/length_bonus/mean"] + 0.5 * m["rewards/closeness/mean"])
    assert [n for n, _ in t.rewards] == ["length_bonus", "closeness"]


def test_conversational_prompts_system_prompt_and_chat_template(tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": i + 1} for i in range(8)]
    rows[0]["messages"] = [{"role": "system", "content": "Own."}] + rows[0]["messages"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = smoke(tmp_path, model=str(chat_model(tmp_path / "m")), dataset=str(data), prompt_column="messages",
              prompt_suffix=" Just the number.", system_prompt="Be brief.", eval_size=2,
              reward_funcs=f"{REWARDS}:conversational")
    t, m, changed = one_step(c)
    assert changed and math.isfinite(m["loss"])
    text = harness.format_prompt(t.tok, t.train_rows[0]["prompt"], c.system_prompt)
    assert text.startswith("<system>Be brief.\n<user>What is") and text.endswith(" Just the number.\n<assistant>")
    own = next(r for r in t.train_rows + t.eval_rows if r["prompt"][0]["role"] == "system")
    assert harness.format_prompt(t.tok, own["prompt"], c.system_prompt).startswith("<system>Own.\n<user>")


def test_several_eos_ids_stop_mask_and_truncate(tmp_path):
    t = sg.build(smoke(tmp_path, model=str(chat_model(tmp_path / "m", eos_extra="!"))))
    assert t.eos == [t.tok.eos_token_id, t.tok.convert_tokens_to_ids("!")]  # from generation_config's list
    model, tok = harness.tiny_llama(seed=0)
    c = sg.demo_config(bf16=False)
    _, _, comp, mask = harness.generate(model, tok, ["What is 1 + 2?\n"], c, torch.device("cpu"), 12)  # greedy
    assert int(mask.sum()) == 12 and bool(harness.truncated(comp, mask, [tok.eos_token_id])[0])
    second = int(comp[0, 3])  # make the 4th greedy token an EOS: the row must stop there, EOS included
    _, _, comp2, mask2 = harness.generate(model, tok, ["What is 1 + 2?\n"], c, torch.device("cpu"), 12,
                                     eos=[tok.eos_token_id, second])
    stop = int((comp[0] == second).nonzero()[0]) + 1
    assert int(mask2.sum()) == stop and torch.equal(comp2[0, :stop], comp[0, :stop])
    assert (comp2[0, stop:] == tok.pad_token_id).all() and not bool(harness.truncated(comp2, mask2, [2, second])[0])


def test_prompts_are_cut_on_the_left_with_a_warning(tmp_path, capsys):
    model, tok = harness.tiny_llama(seed=0)
    long = "x" * 5000 + " What is 1 + 2?\n"
    ids, am, _, _ = harness.generate(model, tok, [long, "Hi\n"], sg.demo_config(bf16=False, max_prompt_length=10),
                                torch.device("cpu"), 2)
    assert ids.shape[1] == 10 and tok.decode(ids[0]) == long[-10:]
    sg.build(smoke(tmp_path, max_prompt_length=20))
    assert "prompts are longer than --max_prompt_length 20 tokens" in capsys.readouterr().err


def test_held_out_split_of_a_dataset_with_duplicates_is_disjoint_by_prompt(tmp_path):
    data = tmp_path / "dup.jsonl"
    qs = ["same?"] * 12 + ["b?"] * 4 + ["c?", "d?", "e?"]
    data.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in qs))
    for seed in range(6):
        tr, ev = sg.load_rows(dataclasses.replace(sg.demo_config(), dataset=str(data), eval_size=2, seed=seed,
                                                  prompt_column="question"))
        held = {r["prompt"] for r in ev}
        assert len(ev) == len(held) == 2 and not held & {r["prompt"] for r in tr}
        assert len(tr) + sum(qs.count(q) for q in held) == len(qs)  # duplicates of a kept prompt all stay in train


@pytest.mark.parametrize("text,value", [
    ("so 3 + 4 = 7.", 7), ("the answer is 3/4", 0.75), ("\\frac{3}{4}", 0.75), ("$\\dfrac{-1}{2}$", -0.5),
    ("1e3 apples", 1000), ("it is -12", -12), ("#### 1,234,567", 1234567), ("total: -1,234.5", -1234.5),
    ("3 / 4 of them", 0.75), ("12, 34", 34), ("x = 1/0", None), ("no number", None), ("2.5e-1", 0.25)])
def test_answer_parsing(text, value):
    assert arithmetic.extract_final_number(text) == (None if value is None else pytest.approx(value))


def test_token_logprobs_match_log_softmax_without_an_fp32_copy():
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.bfloat16):
        z = torch.randn(3, 5, 11, dtype=dtype, requires_grad=True)
        y = torch.randint(0, 11, (3, 5))
        lp, ent = common.token_logprobs(z, y, 0.7, with_entropy=True, chunk_elems=22)  # 2 tokens per chunk
        ref = (z.double() / 0.7).log_softmax(-1)
        assert lp.dtype == torch.float32 and torch.allclose(lp.double(), ref.gather(-1, y[..., None])[..., 0], atol=1e-5)
        assert torch.allclose(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-5) and not ent.requires_grad
        w = torch.randn(3, 5, dtype=torch.float64)
        g, = torch.autograd.grad((lp.double() * w).sum(), z)
        g_ref, = torch.autograd.grad((ref.gather(-1, y[..., None])[..., 0] * w).sum(), z)
        assert g.dtype == dtype and torch.allclose(g.double(), g_ref.double(), atol=1e-5 if dtype == torch.float64 else 1e-2)


def test_fsdp2_generation_runs_the_same_forwards_on_every_rank():
    """torch's fully_shard on CPU (gloo): ranks stopping after 12 and 3 tokens finish together, outputs unchanged."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                        str(ROOT / "tests" / "fsdp2_generate.py"), "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 0 EQUAL" in r.stdout and "rank 1 EQUAL" in r.stdout


def test_gpu_check_runs_on_cpu(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(x["setup"], x["salt"]) for x in rows] == [(s, m) for s in ("lora", "full", "fsdp2") for m in ("off", "official")]
    assert all(x["ok"] and x["finite"] and x["salt_acted"] for x in rows)
    assert "ratio" in r.stdout and "peak GiB" in r.stdout
    assert load_file(str(tmp_path / "lora_official" / "final" / "adapter_model.safetensors"))


def test_lora_final_model_is_an_adapter_that_loads_on_its_base(tmp_path):
    base = chat_model(tmp_path / "base")
    reset_accelerate()
    s = sg.train(smoke(tmp_path, model=str(base), use_peft=True, max_steps=1))
    final = Path(s["outputs"]["final_model"])
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    model, tok = harness.load_model(str(final))  # transformers puts the adapter on base_model_name_or_path
    assert hasattr(model, "peft_config") and tok.chat_template


def test_bf16_autocast_only_with_native_bf16(monkeypatch):
    """--bf16 on a CPU without bf16 matmuls would be emulated (~15× slower): autocast is skipped there, kept elsewhere."""
    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(harness, "bf16_native", lambda device, n=native: n)
        with harness.autocast(sg.demo_config(bf16=True), cpu):
            assert torch.is_autocast_enabled("cpu") == native
    with harness.autocast(sg.demo_config(bf16=False), cpu):
        assert not torch.is_autocast_enabled("cpu")
