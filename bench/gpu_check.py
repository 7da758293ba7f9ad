"""The one prepared GPU check of salt_grpo.py: memory, speed and finiteness at ~1B parameters, nothing downloaded.

    bash bench/gpu_check.sh           # one GPU, about 5-8 minutes
    bash bench/gpu_check.sh --cpu     # the same matrix on a tiny model on CPU (a test runs this), about a minute

A random-init Llama of ~1B parameters (TinyLlama-1.1B's shape, the character tokenizer, so nothing is downloaded)
trains for a few steps on the built-in task with the partial-credit `closeness` reward (mixed groups, so SALT acts),
in three set-ups, each with `--salt off` and `--salt official` side by side:
  lora   bf16 weights + gradient checkpointing + LoRA (r 16, all linear layers)
  full   full fine-tuning, fp32 weights with bf16 autocast, AdamW
  fsdp2  full fine-tuning under accelerate's FSDP2 (world size 1; on CPU accelerate runs it as one plain process)
Each is one `accelerate launch --num_processes 1 salt_grpo.py ...` (single-process: accelerate adds no DDP wrapper;
multi-process DDP is what the 2-process tests check). Printed: median step time (steps 2..N), peak GPU memory,
the overhead ratio official/off, and whether the loss, gradient norm and SALT diagnostics were finite at every step;
the exit status is 1 when any run failed or anything was not finite.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETUPS = {
    "lora": ["--dtype", "bfloat16", "--gradient_checkpointing", "--use_peft", "--lora_target_modules", "all-linear",
             "--learning_rate", "1e-4"],
    "full": ["--dtype", "float32", "--learning_rate", "1e-6"],
    "fsdp2": ["--dtype", "float32", "--learning_rate", "1e-6"],
}
FSDP2 = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
         "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT",
         "--fsdp_reshard_after_forward", "true"]
FINITE = ["loss", "grad_norm", "entropy", "salt/alpha", "salt/neff", "salt/participation_ratio", "salt/k"]


def make_model(path: Path, cpu: bool) -> int:
    """A random-init Llama saved with the character tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import harness

    tok = harness.char_tokenizer()
    shape = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if cpu else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4)  # TinyLlama-1.1B's shape
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **shape)
    torch.manual_seed(0)
    with torch.device("cpu" if cpu else "cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if not cpu else torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run(name: str, salt: str, model: Path, out: Path, a) -> dict:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--dynamo_backend", "no", "--mixed_precision", "no"]
    launch += FSDP2 if name == "fsdp2" else ["--cpu"] if a.cpu else []  # FSDP on CPU: ACCELERATE_USE_CPU below
    d = out / f"{name}_{salt}"
    args = ["--model", str(model), "--salt", salt, "--max_steps", str(a.steps), "--prompts_per_step", str(a.prompts),
            "--num_generations", str(a.G), "--max_completion_length", str(a.length), "--micro_batch_size",
            str(a.micro_batch), "--reward_funcs", "closeness", "--eval_size", "0", "--max_prompt_length", "256",
            "--output_dir", str(d), "--overwrite_output_dir"] + SETUPS[name]
    t0 = time.perf_counter()
    r = subprocess.run(launch + [str(ROOT / "salt_grpo.py")] + args, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                                **({"ACCELERATE_USE_CPU": "1"} if a.cpu else {})))
    row = {"setup": name, "salt": salt, "ok": r.returncode == 0, "wall_s": time.perf_counter() - t0}
    if r.returncode != 0:
        row["error"] = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return row
    steps = [m for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    row["step_s"] = statistics.median(m["step_time"] for m in steps[1:] or steps)
    row["peak_gib"] = max((m.get("memory/max_allocated_gib", float("nan")) for m in steps), default=float("nan"))
    want = [k for k in FINITE if salt != "off" or not k.startswith("salt/")]
    row["finite"] = all(k in m and math.isfinite(m[k]) for m in steps for k in want)
    row["salt_acted"] = salt == "off" or all(m.get("salt/skipped", 1) == 0 for m in steps)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny model on CPU (seconds per run)")
    ap.add_argument("--out", default="", help="work folder (default: outputs/gpu_check or outputs/gpu_check_cpu)")
    a = ap.parse_args()
    a.steps, a.prompts, a.G, a.length, a.micro_batch = (3, 2, 4, 8, 4) if a.cpu else (5, 8, 8, 128, 16)
    out = Path(a.out or ROOT / "outputs" / ("gpu_check_cpu" if a.cpu else "gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    n = make_model(out / "model", a.cpu)
    print(f"model: random-init Llama, {n / 1e6:.1f} M parameters; {a.prompts} prompts x {a.G} rollouts, "
          f"{a.length} new tokens, micro-batch {a.micro_batch}, {a.steps} steps per run", flush=True)
    rows = []
    for name in SETUPS:
        for salt in ("off", "official"):
            rows.append(run(name, salt, out / "model", out, a))
            r = rows[-1]
            print(f"  {name:6s} {salt:9s} {'ok' if r['ok'] else 'FAILED: ' + r['error']}  ({r['wall_s']:.0f} s)",
                  flush=True)
    print(f"\n{'setup':7s}{'salt':10s}{'step s':>8s}{'peak GiB':>10s}{'ratio':>7s}  finite  SALT acted")
    for r in rows:
        if not r["ok"]:
            print(f"{r['setup']:7s}{r['salt']:10s}  FAILED")
            continue
        off = next((x for x in rows if x["setup"] == r["setup"] and x["salt"] == "off" and x["ok"]), None)
        ratio = f"{r['step_s'] / off['step_s']:.3f}" if off and r["salt"] != "off" else ""
        peak = "n/a" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"
        print(f"{r['setup']:7s}{r['salt']:10s}{r['step_s']:8.2f}{peak:>10s}{ratio:>7s}  "
              f"{'yes' if r['finite'] else 'NO':6s}  {'yes' if r['salt_acted'] else 'NO'}")
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    sys.exit(0 if all(r["ok"] and r["finite"] and r["salt_acted"] for r in rows) else 1)


if __name__ == "__main__":
    main()
