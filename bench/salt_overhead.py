"""SALT's overhead over plain GRPO on SmolLM2-135M-Instruct: median optimizer-step time, `--salt off` vs `official`.

Both trainers start from the same weights with the same seed and settings and run interleaved in one process
(off, official, off, official, ...), so machine noise hits both alike. Each step is the whole thing: generation,
rewards, advantages, (features, SALT), forward/backward, AdamW. Prints the median step times, their ratio
(target ≤ 1.10) and the breakdown. Optionally (--trl, when `trl` is importable) also times TRL's GRPOTrainer on the
same model, prompts and settings and prints ours/TRL.

    python bench/salt_overhead.py                       # about 3-4 minutes on a quiet 2-core CPU
    python bench/salt_overhead.py --steps 6 --no-bf16
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


import harness  # noqa: E402
import salt_grpo as sg  # noqa: E402
from data import arithmetic

PARTS = ["time/generation_s", "time/features_s", "time/salt_s", "time/backward_s", "time/optimizer_s"]


def one_step(trainer, step):
    step_start = time.perf_counter()
    rollouts = sg.make_rollouts(trainer, step)
    m = dict(rollouts["metrics"])
    m.update(sg.accumulate_gradients(trainer, rollouts["slices"][0], step))
    m["time/optimizer_s"] = 0.0
    with harness.timed(m, "time/optimizer_s"):
        sg.optimizer_step(trainer)
    m["step_time"] = time.perf_counter() - step_start
    return m


def time_trl(cfg, steps):
    """TRL's GRPOTrainer on the same model, prompts, G, lengths and learning rate (fp32/bf16 as ours)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    train_rows, _ = sg.load_rows(cfg)
    model, tok = harness.load_model(cfg.model)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                            for r in train_rows])

    def reward(completions, answer, **_):
        return [arithmetic.reward_fn(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    times = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(output_dir="/tmp/trl_bench", per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
                      num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                      learning_rate=cfg.learning_rate, beta=0.0, loss_type="dapo", temperature=1.0,
                      max_steps=steps + 1, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                      bf16=cfg.bf16, seed=cfg.seed, gradient_checkpointing=False, dataloader_num_workers=0)
    GRPOTrainer(model=model, processing_class=tok, reward_funcs=reward, args=args, train_dataset=ds,
                callbacks=[Timer()]).train()
    return statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=harness.EMBEDDED)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up step each)")
    ap.add_argument("--prompts_per_step", type=int, default=4)
    ap.add_argument("--num_generations", type=int, default=8)
    ap.add_argument("--max_completion_length", type=int, default=24)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--trl", action="store_true", help="also time TRL's GRPOTrainer when trl is importable")
    ap.add_argument("--out", default="", help="write the raw numbers to this JSON file")
    a = ap.parse_args()
    base = dataclasses.replace(sg.demo_config(), model=a.model, prompts_per_step=a.prompts_per_step,
                               num_generations=a.num_generations, max_completion_length=a.max_completion_length,
                               bf16=a.bf16, eval_size=0, output_dir="/tmp/salt_overhead",
                               overwrite_output_dir=True)
    trainers = {m: sg.build(dataclasses.replace(base, salt=m)) for m in ("off", "official")}
    rows = {m: [] for m in trainers}
    for step in range(a.steps + 1):  # interleaved; step 0 is the warm-up
        for m, trainer in trainers.items():
            r = one_step(trainer, step)
            if step > 0:
                rows[m].append(r)
            print(f"step {step} {m:8s} {r['step_time']:6.2f} s  reward {r['reward']:.2f}", file=sys.stderr)
    med = {m: {k: statistics.median(r[k] for r in rows[m]) for k in ["step_time"] + PARTS} for m in rows}
    ratio = med["official"]["step_time"] / med["off"]["step_time"]
    B = a.prompts_per_step * a.num_generations
    print(f"SALT overhead on {a.model} ({B} rollouts = {a.prompts_per_step}x{a.num_generations}, "
          f"{a.max_completion_length} new tokens, {'bf16 autocast' if a.bf16 else 'fp32'}, "
          f"{torch.get_num_threads()} threads, median of {a.steps} steps after a warm-up)")
    print(f"{'':22s}{'off':>10s}{'official':>10s}")
    for k in ["step_time"] + PARTS:
        print(f"{k:22s}{med['off'][k]:10.3f}{med['official'][k]:10.3f}")
    print(f"ratio official/off (median step time): {ratio:.3f}  (target <= 1.10)")
    out = {"median": med, "ratio": ratio, "settings": vars(a)}
    if a.trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed: TRL comparison skipped")
        else:
            trl_t = time_trl(dataclasses.replace(base, salt="off"), a.steps)
            out["trl_step_time"] = trl_t
            print(f"TRL GRPOTrainer median step {trl_t:.3f} s; ours (official)/TRL = "
                  f"{med['official']['step_time'] / trl_t:.3f} (target <= 1.0)")
    if a.out:
        harness.write_json(a.out, out)


if __name__ == "__main__":
    harness.run_main(main)
