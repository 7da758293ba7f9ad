"""SALT attribution (issue 25, part 1): is SALT's deficit on SmolLM2 its sign asymmetry, and does a cosine Gram remove it?

Question. Experiment 8 found SALT (the released rule, micro scope, micro-batches of 4) below GRPO on SmolLM2 on every
seed, while P a kept about half of the positive and seven eighths of the negative advantage mass. Hypothesis: the
rollouts' score gradients are nearly orthogonal, so the top eigenvectors of the uncentred Gram K sit near the
coordinate axes of its largest-norm rows and P ≈ "keep the k rows of largest ‖g_i‖"; correct rollouts are more
likely and have smaller score gradients (K_ii), so P drops the positive advantages first. If so, (i) a geometry-free
update that only rescales each sign by the mass P a kept should reproduce the deficit, and (ii) the released rule on
the unit-diagonal (cosine) Gram, where every row has norm 1, should not have the asymmetry.

Arms (same seeds, same Config but for the SALT flags; all at micro scope with micro-batches of 4 but `grpo`):
  grpo      --salt off
  micro4    the released rule on K (experiment 8's arm)
  signmass  a′ = kept_pos·a⁺ + kept_neg·a⁻, kept_± = Σ_{a_i ≷ 0} (P a)_i / Σ_{a_i ≷ 0} a_i with P the released rule's
            projection on the same K: SALT's per-sign mass, no geometry otherwise
  cosine    the released rule on C_ij = K_ij / √(K_ii K_jj) (zero diagonals guarded), P, PR, k, n_eff and α all from C

Protocol (docs/RESULTS.md, experiment 12): experiment 8's recipe (embedded SmolLM2-135M-Instruct, salt_grpo's built-in
task, G = 8, 4 prompts per step, lr 1e-5, 24 new tokens, exact lm_head Gram), fp32 on this CPU (bf16 is the protocol's
GPU setting), seeds 0–2, scaled to 8 steps with held-out greedy accuracy on 64 problems at steps 0, 4 and 8. Per run:
the accuracy at each evaluation, its AUC (mean over the evaluation points), the final accuracy and the step means of
the salt/* diagnostics (K_ii of positive- vs negative-advantage rows, P_ii on each, kept mass by sign, k, n_eff, α).
Every comparison is paired by seed (experiments.shared.paired). The signmass and cosine modes are registered in
salt_grpo.SALT_MODES when this module is imported, before any Config is built.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

import harness
import salt_grpo as sg
from experiments.salt_mechanism import auc, run_cached
from experiments.shared import (experiment_args, false_positive_rate, mean_std, paired, pyplot, series,
                                step_mean)


# ---- the two new --salt modes (registered in salt_grpo.SALT_MODES below) ----------------------------------------

def signmass(K: torch.Tensor, a: torch.Tensor, cfg: sg.Config, generator=None):
    """a′ = kept_pos·a⁺ + kept_neg·a⁻ with kept_± the advantage mass the released rule's P a keeps on each sign
    (Σ_{a_i>0} (P a)_i / Σ_{a_i>0} a_i, likewise for a_i < 0; 1 where a sign is absent, which then has no mass),
    then --salt_renorm as `official`. The rule runs on K for P and its diagnostics; a′ holds no other geometry."""
    _, terms = sg.salt_rule(K, a, **sg.rule_constants(cfg))
    pos, neg = a > 0, a < 0
    kept_pos = float(terms["a_dom"][pos].sum() / a[pos].sum()) if pos.any() else 1.0
    kept_neg = float(terms["a_dom"][neg].sum() / a[neg].sum()) if neg.any() else 1.0
    a_new = a.clamp(min=0) * kept_pos + a.clamp(max=0) * kept_neg
    return sg.renormalise(a_new, a, cfg.salt_renorm), {**terms, "kept_pos": kept_pos, "kept_neg": kept_neg}


unit_diagonal = sg.unit_diagonal  # --salt_gram cosine in salt_grpo.py since this experiment


def cosine(K: torch.Tensor, a: torch.Tensor, cfg: sg.Config, generator=None):
    """The released rule (`official`, --salt_renorm included) on the unit-diagonal Gram: every rollout's feature
    normalised to length 1, so no row leads the top eigenvectors by its norm alone."""
    return sg.official(unit_diagonal(K), a, cfg, generator)


sg.SALT_MODES["signmass"] = signmass
sg.SALT_MODES["cosine"] = cosine

# ---- the experiment -----------------------------------------------------------------------------------------

FEATURES = "lm_head"  # the exact LM-head Gram, as experiment 8
MICRO = dict(salt_scope="micro", micro_batch_size=4)
ARMS = {"grpo": dict(salt="off"), "micro4": dict(salt="official", **MICRO),
        "signmass": dict(salt="signmass", **MICRO), "cosine": dict(salt="cosine", **MICRO)}
# Experiment 8's SETTINGS at its 8-step amendments' schedule (fp32; on a GPU the protocol is bf16=True, 32 steps,
# eval_every 8): RESULTS.md experiment 12's amendment.
SETTINGS = dict(model=harness.EMBEDDED, seeds=[0, 1, 2], steps=8, eval_every=4, eval_size=64, bf16=False)
SMOKE = dict(model=harness.TINY, seeds=[0], steps=2, eval_every=0, eval_size=4, bf16=False, prompts_per_step=2,
             num_generations=4, max_completion_length=6, reward_funcs="closeness")
# the salt/* step statistics read per run (salt_diagnostics' keys; salt_metrics averages them over micro-batches)
DIAG = ["salt/kii_pos", "salt/kii_neg", "salt/kii_pos_over_neg", "salt/pii_pos", "salt/pii_neg",
        "salt/pos_mass_kept", "salt/neg_mass_kept", "salt/pos_mass_after", "salt/neg_mass_after", "salt/k",
        "salt/neff", "salt/neff_after", "salt/alpha", "salt/participation_ratio", "salt/cos_within_abs",
        "salt/skipped", "salt/B"]
TRACE = ["reward", "eval/accuracy", "eval/reward", "frac_reward_zero_std", *DIAG, "step_time"]


def config(s: dict, arm: dict, seed: int, out: Path) -> sg.Config:
    """salt_smollm.config: the demo's Config (salt_grpo's defaults) with the arm's SALT flags, FEATURES and the
    evaluation schedule."""
    kw = {k: v for k, v in s.items() if k not in ("seeds", "steps")}
    return sg.demo_config(seed=seed, max_steps=s["steps"], salt_features=FEATURES, output_dir=str(out),
                     overwrite_output_dir=True, **kw, **arm)


def evals(run: dict) -> list[float]:
    return series(run, run["eval_metric"])[1]


def summarise(runs: list[dict]) -> dict:
    """Per arm: AUC, final accuracy, the diagnostics' means; paired differences against grpo and micro4; and the
    per-seed quantities the decision rules read."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = {}
    for arm in ARMS:
        rs = [by[arm, s] for s in seeds if (arm, s) in by]
        row = {"eval_end": mean_std([r["eval_end"] for r in rs]), "eval_auc": mean_std([auc(r) for r in rs]),
               "per_seed": {r["seed"]: {"evals": evals(r), "auc": auc(r), "eval_end": r["eval_end"],
                                        **{k.split("/")[1]: step_mean(r, k) for k in DIAG}} for r in rs}}
        if arm != "grpo":
            row.update({k.split("/")[1]: mean_std([step_mean(r, k) for r in rs]) for k in DIAG})
            row["neg_minus_pos_kept"] = paired([step_mean(r, "salt/neg_mass_kept") - step_mean(r, "salt/pos_mass_kept")
                                                for r in rs])
            row["pii_neg_minus_pos"] = paired([step_mean(r, "salt/pii_neg") - step_mean(r, "salt/pii_pos") for r in rs])
            row["kii_ratio_minus_1"] = paired([step_mean(r, "salt/kii_pos_over_neg") - 1 for r in rs])
            for ref in ("grpo", "micro4"):
                if ref == arm:
                    continue
                pairs = [(r, by[ref, r["seed"]]) for r in rs if (ref, r["seed"]) in by]
                row[f"auc_minus_{ref}"] = paired([auc(r) - auc(b) for r, b in pairs])
                row[f"end_minus_{ref}"] = paired([r["eval_end"] - b["eval_end"] for r, b in pairs])
        out[arm] = row
    out["false_positive_rate_2se"] = false_positive_rate(len(seeds))
    out["decisions"] = decide(out, seeds)
    return out


def decide(s: dict, seeds: list[int]) -> dict:
    """The pre-registered rules D1–D3 (docs/RESULTS.md, experiment 12), read on per-seed run means."""
    if "micro4" not in s or not s["micro4"]["per_seed"]:
        return {}
    m4, g = s["micro4"]["per_seed"], s["grpo"]["per_seed"]
    d1 = {"kii_ratio_below_1": [m4[x]["kii_pos_over_neg"] < 1 for x in m4],
          "pii_pos_below_neg": [m4[x]["pii_pos"] < m4[x]["pii_neg"] for x in m4]}
    d1["holds"] = all(d1["kii_ratio_below_1"]) and all(d1["pii_pos_below_neg"])
    out = {"D1": d1}
    if "signmass" in s:
        sm = s["signmass"]["per_seed"]
        share = {x: (sm[x]["auc"] - g[x]["auc"]) / (m4[x]["auc"] - g[x]["auc"])
                 if m4[x]["auc"] < g[x]["auc"] else float("nan") for x in sm if x in m4 and x in g}
        out["D2"] = {"deficit_share": share, "holds": bool(share) and all(v >= 0.5 for v in share.values()),
                     "none": bool(share) and all(v < 0.5 for v in share.values())}
    if "cosine" in s:
        cs = s["cosine"]["per_seed"]

        def asym(r):
            return abs(r["neg_mass_kept"] - r["pos_mass_kept"])

        halved = {x: asym(cs[x]) < 0.5 * asym(m4[x]) for x in cs if x in m4}
        outcome = s["cosine"].get("auc_minus_grpo", {}).get("outcome")
        out["D3"] = {"asymmetry_halved": halved, "auc_minus_grpo_outcome": outcome,
                     "holds": bool(halved) and all(halved.values()) and outcome != "worse"}
        d = s["cosine"].get("auc_minus_grpo", {})
        out["offer_cosine_gram"] = bool(d) and d["outcome"] != "worse" and d["mean"] >= -(d["se"] if d["se"] == d["se"]
                                                                                          else 0.0)
    return out


def plot(runs: list[dict], out: Path) -> None:
    """attribution.png: K_ii by advantage sign and its ratio, kept mass by sign per arm, held-out accuracy vs step."""
    plt = pyplot()
    arms, seeds = list(ARMS), sorted({r["seed"] for r in runs})
    by = {(r["arm"], r["seed"]): r for r in runs}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    salt_arms = [a for a in arms if a != "grpo"]
    ax = axes[0]  # K_ii ratio (positive / negative advantage rows), per seed, per SALT arm (all measure K itself)
    for c, arm in enumerate(salt_arms):
        ys = [step_mean(by[arm, s], "salt/kii_pos_over_neg") for s in seeds if (arm, s) in by]
        ax.scatter([c + 0.08 * (i - 1) for i in range(len(ys))], ys, color=f"C{c + 1}", label=arm)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(salt_arms)), salt_arms)
    ax.set_title("K_ii(a > 0, correct) / K_ii(a < 0, wrong)\nstep mean per seed", fontsize=9)
    ax = axes[1]  # kept mass by sign: P a (filled) and a′ (hollow)
    w = 0.2
    for c, arm in enumerate(salt_arms):
        for j, (key, label) in enumerate([("pos", "positive"), ("neg", "negative")]):
            kept = mean_std([step_mean(by[arm, s], f"salt/{key}_mass_kept") for s in seeds if (arm, s) in by])
            after = mean_std([step_mean(by[arm, s], f"salt/{key}_mass_after") for s in seeds if (arm, s) in by])
            x = c + (j - 0.5) * 2 * w
            ax.bar(x, kept["mean"], w, yerr=kept["std"] if kept["n"] > 1 else None, color=f"C{j}",
                   label=f"{label} (P a)" if c == 0 else None)
            ax.scatter([x], [after["mean"]], facecolors="none", edgecolors="k", zorder=3,
                       label="a′" if c == 0 and j == 0 else None)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(salt_arms)), salt_arms)
    ax.set_title("advantage mass kept, by sign (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    for c, arm in enumerate(arms):
        rs = [by[arm, s] for s in seeds if (arm, s) in by]
        if not rs:
            continue
        n = min(len(evals(r)) for r in rs)
        ys = torch.tensor([evals(r)[:n] for r in rs], dtype=torch.float64)
        xs = series(rs[0], rs[0]["eval_metric"])[0][:n]
        ax.plot(xs, ys.mean(0), color=f"C{c}", marker="o", label=arm)
        for y in ys:
            ax.plot(xs, y, color=f"C{c}", alpha=0.25, lw=0.8)
    ax.set_xlabel("step")
    ax.set_title("held-out accuracy (mean of seeds, thin: each seed)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "attribution.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    args = experiment_args("salt_attribution", __doc__, argv,
                           smoke="tiny random model, 1 seed, 2 steps, the four arms (seconds)", cache_dir=True)
    out, cache = args.out, args.cache_dir
    t0 = time.perf_counter()
    s = SMOKE if args.smoke else SETTINGS
    accelerator = Accelerator(cpu=True)
    runs = []
    for seed, arm in tqdm([(a, b) for a in s["seeds"] for b in ARMS], desc="runs"):
        cfg = config(s, ARMS[arm], seed, cache / f"salt_attribution_runs/{arm}_s{seed}")
        runs.append({"arm": arm, "seed": seed, **run_cached(cfg, accelerator, TRACE)})
        print(f"[salt_attribution] {arm} seed {seed}: evals {evals(runs[-1])} ({runs[-1]['wall_time_s']:.0f} s)",
              flush=True)
    result = {"experiment": "salt_attribution", "settings": {**s, "features": FEATURES, "arms": ARMS},
              "summary": summarise(runs), "runs": runs, "wall_time_s": time.perf_counter() - t0,
              "runs_wall_time_s": sum(r["wall_time_s"] for r in runs)}
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out / "results.json", result)
    plot(runs, out)
    for arm in ARMS:
        v = result["summary"][arm]
        d = v.get("auc_minus_grpo")
        print(f"{arm:<9} auc {v['eval_auc']['mean']:.3f} end {v['eval_end']['mean']:.3f}"
              + (f" auc−grpo {d['mean']:+.3f} ± {d['se']:.3f} ({d['outcome']})" if d else "")
              + (f" kept +{v['pos_mass_kept']['mean']:.3f} −{v['neg_mass_kept']['mean']:.3f}"
                 f" Kii+/− {v['kii_pos_over_neg']['mean']:.3f}" if arm != "grpo" else ""))
    print(f"decisions: {result['summary']['decisions']}")
    print(f"wrote {out}/results.json and attribution.png in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    harness.run_main(main)
