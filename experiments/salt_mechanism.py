"""SALT experiment 7 (issue 12, round 2): what SALT's mechanism does on a warm-started tiny model, by scope and channel.

Experiment 2 (salt_training) found SALT slower than GRPO but tested, in effect, only the projection a′ = P a:
α = clip(1 − n_eff, 0, 1) was ≈ 0, so the tail channel never ran, and the scope was `mini` (all rollouts of a step),
not the authors' per-micro-batch scope where P stays closer to I. This experiment separates the parts.

Arms (same warm starts, prompts and budget; `salt_grpo.train` throughout):
- `grpo`: --salt off.
- `mini`: the released rule over all rollouts of a step (experiment 2's SALT arm).
- `micro4`, `micro8`: the released rule on each micro-batch of 4 / 8 rollouts (--salt_scope micro), the official
  code's scope (docs/salt.md: where this differs from the official code); micro-batches are consecutive
  rollouts, so at G = 16 one holds part of a group.
- `tail_on`: the released rule at mini scope with α forced to 1 (--salt_alpha_min 1; relu on): the tail channel
  α (I − P) relu(a) always on, the part the paper says "amplifies the residual when cancellation is severe".
- `positive_only`: a′_i = a⁺_i − mean over the group of a⁺ (the relu without geometry).

Logged per step (salt_reweight's diagnostics; at micro scope the mean over the step's micro-batches): the share of
the positive and of the negative advantage mass kept by P a (pos/neg_mass_kept = Σ_{a_i ≷ 0} (P a)_i / Σ_{a_i ≷ 0} a_i)
and by a′, α, k, n_eff before and after, the mean within-group |cos| of the features.

Model, task, optimiser and warm start: experiment 2's (salt_training.SETTINGS, the same cached warm starts).
Features: FEATURES below, the exact Gram of the LM-head score feature (V × H = 104 × 64).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


import harness
import salt_grpo as sg
from experiments.salt_training import SETTINGS as TRAINING, train_cached, warm_start
from experiments.shared import experiment_args, mean_std, paired, pyplot, series, step_mean

# The per-rollout feature every SALT arm uses: the exact LM-head Gram (issue 9). The published results were measured
# with its predecessor `lm_head_exact` (the unprojected feature, the same exact Gram for this 104-token vocabulary).
FEATURES = "lm_head"
ARMS = {
    "grpo": dict(salt="off"),
    "mini": dict(salt="official", salt_scope="mini"),
    "micro4": dict(salt="official", salt_scope="micro", micro_batch_size=4),
    "micro8": dict(salt="official", salt_scope="micro", micro_batch_size=8),
    "tail_on": dict(salt="official", salt_scope="mini", salt_alpha_min=1.0),
    "positive_only": dict(salt="positive_only", salt_scope="mini"),
}
SETTINGS = dict(TRAINING, steps=30, eval_every=10)  # 30 steps (round 1: 80): sized to the CPU budget, RESULTS.md
# smoke: partial-credit rewards, so that even a barely trained model has mixed groups and SALT acts
SMOKE = dict(SETTINGS, seeds=[0], G_values=[4], prompts_per_step=2, steps=2, eval_every=0, eval_size=8, warm_steps=5,
             reward_funcs="closeness")
TRACE = ["reward", "eval/accuracy", "eval/reward", "frac_reward_zero_std", "salt/B", "salt/k", "salt/alpha",
         "salt/neff", "salt/neff_after", "salt/pos_mass_kept", "salt/neg_mass_kept", "salt/pos_mass_after",
         "salt/neg_mass_after", "salt/cos_within_abs", "salt/participation_ratio", "salt/skipped", "step_time"]


def config(s: dict, arm: dict, G: int, seed: int, model_dir: Path, out: Path, **extra) -> sg.Config:
    """salt_grpo's Config for one run: experiment 2's settings, the arm's SALT flags, FEATURES."""
    return sg.demo_config(model=str(model_dir), seed=seed, salt_features=FEATURES, num_generations=G,
                     prompts_per_step=s["prompts_per_step"], max_steps=s["steps"], eval_every=s["eval_every"],
                     eval_size=s["eval_size"], eval_batch_size=256, learning_rate=s["lr"],
                     max_completion_length=s["max_completion_length"], bf16=False,
                     task_min_terms=s["task_min_terms"], task_max_terms=s["task_max_terms"], task_word_frac=0.0,
                     reward_funcs=s.get("reward_funcs", "exact_match"), output_dir=str(out),
                     overwrite_output_dir=True, **{**arm, **extra})


def run_cached(cfg: sg.Config, accelerator, trace_keys: list[str]) -> dict:
    """salt_training.train_cached, the fields these experiments read from the summary, and the trace."""
    summary, trace = train_cached(cfg, accelerator, trace_keys)
    return {"eval_metric": summary["eval_metric"], "eval_start": summary["eval_accuracy_start"],
            "eval_end": summary["eval_accuracy_end"], "wall_time_s": summary["wall_time_s"], "trace": trace}


def auc(run: dict) -> float:
    """Mean held-out accuracy (reward, in the smoke) over the evaluation points (step 0 included)."""
    return statistics.fmean(series(run, run["eval_metric"])[1])


def summarise(runs: list[dict], s: dict) -> dict:
    out = {}
    for G in s["G_values"]:
        base = {r["seed"]: r for r in runs if r["G"] == G and r["arm"] == "grpo"}
        mini = {r["seed"]: r for r in runs if r["G"] == G and r["arm"] == "mini"}
        for arm in dict.fromkeys(r["arm"] for r in runs):
            rs = [r for r in runs if r["G"] == G and r["arm"] == arm]
            row = {"eval_end": mean_std([r["eval_end"] for r in rs]), "eval_auc": mean_std([auc(r) for r in rs])}
            if arm != "grpo":
                row["auc_minus_grpo"] = paired([auc(r) - auc(base[r["seed"]]) for r in rs if r["seed"] in base])
                row["end_minus_grpo"] = paired([r["eval_end"] - base[r["seed"]]["eval_end"] for r in rs
                                                if r["seed"] in base])
                row["alpha_positive_share"] = mean_std([statistics.fmean(
                    [a > 0 for a in series(r, "salt/alpha")[1]] or [float("nan")]) for r in rs])
                # P a keeps less of the positive than of the negative mass: neg_kept − pos_kept > 0
                row["neg_minus_pos_kept"] = paired([step_mean(r, "salt/neg_mass_kept") -
                                                    step_mean(r, "salt/pos_mass_kept") for r in rs])
            if arm == "tail_on":
                row["auc_minus_mini"] = paired([auc(r) - auc(mini[r["seed"]]) for r in rs if r["seed"] in mini])
            for k in TRACE[4:-1]:
                row[k.split("/")[1]] = mean_std([step_mean(r, k) for r in rs])
            out[f"G{G}/{arm}"] = row
    return out


def plot(runs: list[dict], s: dict, path: Path) -> None:
    plt = pyplot()
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    keys = [(runs[0]["eval_metric"], "held-out accuracy"), ("salt/pos_mass_kept", "positive mass kept by P a"),
            ("salt/neg_mass_kept", "negative mass kept by P a"), ("salt/alpha", "α")]
    fig, axes = plt.subplots(len(s["G_values"]), len(keys), figsize=(4.2 * len(keys), 3.4 * len(s["G_values"])),
                             squeeze=False)
    for i, G in enumerate(s["G_values"]):
        for j, (key, title) in enumerate(keys):
            ax = axes[i, j]
            for c, arm in enumerate(arms):
                rs = [r for r in runs if r["G"] == G and r["arm"] == arm and series(r, key)[1]]
                if not rs:
                    continue
                n = min(len(series(r, key)[1]) for r in rs)
                ys = torch.tensor([series(r, key)[1][:n] for r in rs], dtype=torch.float64)
                if not key.startswith("eval/") and n >= 5:  # per-step diagnostics: a 5-step moving average
                    ys = torch.nn.functional.avg_pool1d(ys[:, None], 5, 1, 2, count_include_pad=False)[:, 0]
                ax.plot(series(rs[0], key)[0][:n], ys.mean(0), color=f"C{c}", label=arm)
            ax.set_title(f"G = {G}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"SALT's mechanism by scope and channel, tiny warm-started Llama, mean over {len(s['seeds'])} seeds")
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    args = experiment_args("salt_mechanism", __doc__, argv, smoke="1 seed, G = 4, 2 steps, every arm (seconds)",
                           cache_dir=True)
    out, cache = args.out, args.cache_dir
    t0 = time.perf_counter()
    s = SMOKE if args.smoke else SETTINGS
    accelerator = Accelerator(cpu=True)
    runs = []
    jobs = [(seed, G, arm) for seed in s["seeds"] for G in s["G_values"] for arm in ARMS]
    for seed, G, arm in tqdm(jobs, desc="runs"):
        run_dir = cache / f"salt_mechanism_runs/{arm}_G{G}_s{seed}"
        cfg = config(s, ARMS[arm], G, seed, warm_start(s, seed, cache), run_dir)
        runs.append({"arm": arm, "G": G, "seed": seed, **run_cached(cfg, accelerator, TRACE)})
    result = {"experiment": "salt_mechanism", "settings": {**s, "features": FEATURES, "arms": ARMS},
              "summary": summarise(runs, s), "runs": runs, "wall_time_s": time.perf_counter() - t0,
              "runs_wall_time_s": sum(r["wall_time_s"] for r in runs)}
    harness.write_json(out / "results.json", result)
    plot(runs, s, out / "mechanism.png")
    for name, v in result["summary"].items():
        f = lambda d: f"{d['mean']:+.3f} ± {d['std']:.3f}" if d["n"] else "–"  # noqa: E731
        print(f"{name:<18} auc {f(v['eval_auc'])}  auc−grpo {f(v.get('auc_minus_grpo', {'n': 0}))} "
              f"{v.get('auc_minus_grpo', {}).get('outcome', ''):<10} α {f(v['alpha'])} pos kept "
              f"{f(v['pos_mass_kept'])} neg kept {f(v['neg_mass_kept'])} n_eff {f(v['neff'])}")
    print(f"wrote {out}/results.json and mechanism.png in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    harness.run_main(main)
