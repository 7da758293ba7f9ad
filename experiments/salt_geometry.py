"""SALT experiment 3: the geometry of the applied update after reweighting (H2, docs/RESULTS.md §3).

SALT replaces the GRPO advantages a by a′ and claims a less cancelling, more spread update. On the same rollouts
and features as experiment 1 (embedded SmolLM2-135M-Instruct, built-in task, LM-head features; the cache of
salt_cancellation.py is reused when present), for every batch and G ∈ {2, 4, 8, 16} we apply to the same (K, a):

  off              a′ = a (GRPO)
  official         the released SALT rule (salt_grpo.salt_reweight, release defaults)
  random_subspace  the same rule with a random k-dim subspace (same k), averaged over 8 random draws
  positive_only    a′_i = a⁺_i − mean over the group of a⁺ (the relu without geometry)

and measure, for the applied coefficients a′:
  n_eff(a′) = a′ᵀKa′ / Σ a′_i² K_ii             signed-update effective sample size of the update Σ a′_i g_i
  PR(a′)   = PR(D K D), D = diag(a′)           spectral spread of the signed per-rollout updates a′_i g_i
             (GRPO's a is 0 on zero-variance groups while P a is dense: part of a PR difference is support)
  cos(Gᵀa, Gᵀa′) = aᵀKa′ / √(aᵀKa · a′ᵀKa′)   how far the update turns away from GRPO's

Part of SALT's n_eff increase is mechanical (P a puts coefficient mass on high-eigenvalue directions; see
docs/salt.md#paper-to-code-map): the random-subspace control, with the same k and the same α rule, shows how much.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

import common

import harness
import salt_grpo as sg
from experiments import salt_cancellation as exp1  # same batches, same G values
from experiments.shared import experiment_args, mean_std, pyplot

MODES = ["off", "official", "random_subspace", "positive_only"]
RANDOM_DRAWS = 8


def applied_geometry(K: torch.Tensor, a: torch.Tensor, a_new: torch.Tensor) -> dict:
    """n_eff and PR of the update built from coefficients a′, and its cosine to GRPO's update (all from K)."""
    D = torch.diag(a_new)
    aKa, bKb, aKb = float(a @ K @ a), float(a_new @ K @ a_new), float(a @ K @ a_new)
    return {"neff": common.signed_neff(K, a_new), "pr": common.participation_ratio(D @ K @ D),
            "cos_to_grpo": aKb / max((aKa * bKb) ** 0.5, 1e-300)}


def measure(K: torch.Tensor, r: torch.Tensor, G: int, seed: int) -> dict:
    """Every mode on one (K, a); random_subspace is the mean over RANDOM_DRAWS seeded subspaces."""
    K, a = exp1.grpo_gram(K, r, G)
    if not (a != 0).any():
        return {}
    out = {}
    for mode in MODES:
        cfg = dataclasses.replace(sg.demo_config(), salt=mode, num_generations=G)
        draws = RANDOM_DRAWS if mode == "random_subspace" else 1
        vals = []
        for d in range(draws):
            a_new, diag = sg.salt_reweight(K, a, cfg, torch.Generator().manual_seed(seed * 1000 + d))
            vals.append({**applied_geometry(K, a, a_new.double()), "k": diag.get("k", float("nan")),
                         "alpha": diag.get("alpha", float("nan"))})
        out[mode] = {k: statistics.fmean(v[k] for v in vals) for k in vals[0]}
    return out


def plot(summary: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.2
    panels = [("neff", "n_eff of the applied update"), ("pr", "PR of the signed updates a′_i g_i"),
              ("cos_to_grpo", "cos(update, GRPO update)")]
    for ax, (k, title) in zip(axes, panels):
        for i, mode in enumerate(MODES):
            xs = [j + (i - 1.5) * width for j in range(len(exp1.G_VALUES))]
            m = [summary[f"G{G}/{mode}"][k]["mean"] for G in exp1.G_VALUES]
            e = [summary[f"G{G}/{mode}"][k]["std"] for G in exp1.G_VALUES]
            ax.bar(xs, m, width, yerr=e, capsize=2, label=mode)
        ax.set_xticks(range(len(exp1.G_VALUES)), [f"G={G}" for G in exp1.G_VALUES])
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle("Geometry after reweighting, same batches (mean ± std over batches)")
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = experiment_args("salt_geometry", __doc__, argv, smoke="tiny random model, 2 small batches (seconds)",
                           cache_dir=True)
    t0 = time.perf_counter()
    s = exp1.SMOKE if args.smoke else exp1.SETTINGS
    batches = exp1.collect_batches(s, args.cache_dir)
    rows = []
    for b, batch in enumerate(batches):
        for G in exp1.G_VALUES:
            K, r, _ = exp1.subset(batch, G, s["g_max"])
            m = measure(K, r, G, b)
            rows += [{"batch": b, "G": G, "mode": mode, **v} for mode, v in m.items()]
    summary = {}
    for G in exp1.G_VALUES:
        for mode in MODES:
            sel = [x for x in rows if x["G"] == G and x["mode"] == mode]
            summary[f"G{G}/{mode}"] = {k: mean_std([x[k] for x in sel])
                                       for k in ["neff", "pr", "cos_to_grpo", "k", "alpha"]}
    out = args.out
    result = {"experiment": "salt_geometry", "settings": {**s, "G_values": exp1.G_VALUES, "modes": MODES,
              "random_draws": RANDOM_DRAWS}, "per_batch": rows, "summary": summary,
              "wall_time_s": time.perf_counter() - t0}
    harness.write_json(out / "results.json", result)
    plot(summary, out / "geometry_after_reweighting.png")
    print(f"{'G/mode':<22} {'n_eff(a′)':>16} {'PR(a′)':>16} {'cos to GRPO':>14} {'k':>6} {'alpha':>6}")
    for name, v in summary.items():
        print(f"{name:<22} {v['neff']['mean']:>8.3f} ± {v['neff']['std']:<5.3f} {v['pr']['mean']:>8.2f} ± "
              f"{v['pr']['std']:<5.2f} {v['cos_to_grpo']['mean']:>14.3f} {v['k']['mean']:>6.1f} "
              f"{v['alpha']['mean']:>6.2f}")
    print(f"wrote {out}/results.json and geometry_after_reweighting.png in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    harness.run_main(main)
