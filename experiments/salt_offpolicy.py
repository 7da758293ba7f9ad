"""SALT experiment 9 (issue 12, round 2): off-policy passes (num_iterations 4), where the score features stop being
zero-mean.

On-policy, E_y[∇ log π(y|x)] = 0, so the features of one prompt's rollouts have no common component and SALT's
n_eff stays ≥ 1 (α = 0). After the first PPO pass over a round the policy has moved, the rollouts are off-policy and
that identity no longer holds: this is the one faithful setting in which the features can share a per-prompt
component, which the zero-sum advantages then cancel (n_eff < 1, α > 0).

Arms: `grpo` = `--salt identity` (a′ = a to 1e-9, so the update is GRPO's, but features and diagnostics are computed)
and `official` (the released rule, mini scope). μ = 4 passes per round at lr 3e-4 (experiment 2: 1e-4 at μ = 1);
everything else as experiment 7 (salt_mechanism): the same warm starts, task, evaluation and FEATURES. Each step's
statistics are split by its pass j ∈ {1, 2, 3, 4} within the round; j = 1 is on-policy.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch


import harness
from experiments.salt_mechanism import SETTINGS as MECHANISM, SMOKE as MECHANISM_SMOKE, auc, config, run_cached
from experiments.salt_training import warm_start
from experiments.shared import experiment_args, mean_or_nan, mean_std, paired, pyplot, series

MU = 4
ARMS = {"grpo": dict(salt="identity", salt_scope="mini"), "official": dict(salt="official", salt_scope="mini")}
SETTINGS = dict(MECHANISM, steps=40, eval_every=10, lr=3e-4)  # 40 steps = 10 rounds of μ = 4 passes
SMOKE = dict(MECHANISM_SMOKE, steps=4)
KEYS = ["salt/cos_within_abs", "salt/neff", "salt/alpha", "salt/neff_after", "salt/pos_mass_kept",
        "salt/neg_mass_kept", "salt/k"]
TRACE = ["reward", "eval/accuracy", "eval/reward", *KEYS, "clip_ratio/region_mean", "step_time"]


def by_pass(run: dict, key: str, j: int) -> float:
    """Mean of a per-step statistic over the steps that are pass j (1-based) of their round."""
    steps, ys = series(run, key)
    return mean_or_nan([y for st, y in zip(steps, ys) if (st - 1) % MU + 1 == j])


def summarise(runs: list[dict], s: dict) -> dict:
    out = {}
    for G in s["G_values"]:
        base = {r["seed"]: r for r in runs if r["G"] == G and r["arm"] == "grpo"}
        for arm in ARMS:
            rs = [r for r in runs if r["G"] == G and r["arm"] == arm]
            row = {"eval_end": mean_std([r["eval_end"] for r in rs]), "eval_auc": mean_std([auc(r) for r in rs])}
            for key in KEYS + ["clip_ratio/region_mean"]:
                name = key.split("/")[1]
                row[name] = {f"pass{j}": mean_std([by_pass(r, key, j) for r in rs]) for j in range(1, MU + 1)}
                # off-policy minus on-policy, per run: pass μ minus pass 1
                row[name]["last_minus_first"] = paired([by_pass(r, key, MU) - by_pass(r, key, 1) for r in rs])
            steps_alpha = [[a > 0 for st, a in zip(*series(r, "salt/alpha")) if (st - 1) % MU] for r in rs]
            row["alpha_positive_share_off_policy"] = mean_std([mean_or_nan(x) for x in steps_alpha])
            if arm != "grpo":
                row["auc_minus_grpo"] = paired([auc(r) - auc(base[r["seed"]]) for r in rs if r["seed"] in base])
                row["end_minus_grpo"] = paired([r["eval_end"] - base[r["seed"]]["eval_end"] for r in rs
                                                if r["seed"] in base])
            out[f"G{G}/{arm}"] = row
    return out


def plot(summary: dict, s: dict, path: Path) -> None:
    plt = pyplot()
    names = [("cos_within_abs", "within-group mean |cos|"), ("neff", "n_eff of a"), ("alpha", "α (official)")]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4))
    for ax, (name, title) in zip(axes, names):
        for c, G in enumerate(s["G_values"]):
            for arm, ls in (("grpo", "-"), ("official", "--")):
                if name == "alpha" and arm == "grpo":
                    continue
                v = summary[f"G{G}/{arm}"][name]
                m = torch.tensor([v[f"pass{j}"]["mean"] for j in range(1, MU + 1)])
                sd = torch.tensor([v[f"pass{j}"]["std"] for j in range(1, MU + 1)]).nan_to_num(0.0)
                ax.errorbar(range(1, MU + 1), m, yerr=sd, color=f"C{c}", ls=ls, marker="o", capsize=3,
                            label=f"G = {G}, {arm}")
        ax.set_xticks(range(1, MU + 1))
        ax.set_xlabel("pass within the round (1 = on-policy)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Off-policy passes (μ = {MU}, lr {s['lr']:g}), mean ± std over {len(s['seeds'])} seeds")
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    args = experiment_args("salt_offpolicy", __doc__, argv,
                           smoke="1 seed, G = 4, 4 steps (one round), both arms (seconds)", cache_dir=True)
    out, cache = args.out, args.cache_dir
    t0 = time.perf_counter()
    s = SMOKE if args.smoke else SETTINGS
    accelerator = Accelerator(cpu=True)
    runs = []
    for seed, G, arm in tqdm([(a, b, c) for a in s["seeds"] for b in s["G_values"] for c in ARMS], desc="runs"):
        run_dir = cache / f"salt_offpolicy_runs/{arm}_G{G}_s{seed}"
        cfg = config(s, ARMS[arm], G, seed, warm_start(s, seed, cache), run_dir, num_iterations=MU)
        runs.append({"arm": arm, "G": G, "seed": seed, **run_cached(cfg, accelerator, TRACE)})
    result = {"experiment": "salt_offpolicy", "settings": {**s, "num_iterations": MU, "arms": ARMS},
              "summary": summarise(runs, s), "runs": runs, "wall_time_s": time.perf_counter() - t0,
              "runs_wall_time_s": sum(r["wall_time_s"] for r in runs)}
    harness.write_json(out / "results.json", result)
    plot(result["summary"], s, out / "offpolicy.png")
    for name, v in result["summary"].items():
        f = lambda d: f"{d['mean']:.3f}"  # noqa: E731
        line = " ".join(f"{k} " + "/".join(f(v[k][f"pass{j}"]) for j in range(1, MU + 1))
                        for k in ("cos_within_abs", "neff", "alpha"))
        extra = f" auc−grpo {v['auc_minus_grpo']['mean']:+.3f} ({v['auc_minus_grpo']['outcome']})" \
            if "auc_minus_grpo" in v else ""
        print(f"{name:<14} auc {f(v['eval_auc'])} {line}{extra}")
    print(f"wrote {out}/results.json and offpolicy.png in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    harness.run_main(main)
