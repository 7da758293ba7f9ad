"""SALT experiment 1: does signed cancellation grow with the number of rollouts per prompt? (H1, docs/RESULTS.md §1)

The paper's premise: more rollouts per prompt add redundant, partly cancelling gradient directions, so the
per-rollout efficiency of a GRPO update falls as G grows. We measure it on the embedded SmolLM2-135M-Instruct
and the built-in arithmetic task (the demo's task), with GRPO advantages and SALT's default Gram: the exact Gram of
the full LM-head score gradients (`common.lm_head_gram`, as the authors' code; `salt_grpo.scope_gram`).

Protocol: each batch draws P prompts and samples G_max = 16 rollouts per prompt (seeded, temperature 1). For every
G ∈ {2, 4, 8, 16} the batch keeps the FIRST G rollouts of each prompt (the same prompts, nested rollouts), computes
the group-relative advantages a and the Gram K = G Gᵀ / B (a sub-matrix of the batch's Gram), and records
  PR = (tr K)²/‖K‖_F² and PR/B;  n_eff = aᵀKa / Σ a_i² K_ii and n_eff/B;  n_eff / B_active (rows with a ≠ 0);
  the mean per-group n_eff (mixed groups only) and n_eff_in / G; the mean within-group |cosine| (the signed mean
  is ≈ 0 by the score identity E[∇log π] = 0 whatever the geometry, so it is recorded but says nothing); the
  fraction of zero-variance groups.
Spread: over batches (disjoint prompt sets). Nothing is trained.

Scaled down: P = 16 prompts × 6 batches (the paper's recipe uses 512 prompts × 16 rollouts per step on a 7B model).
The rollouts' Grams are cached under outputs/experiments/ and reused by salt_geometry.py (experiment 3).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

import common

import harness
import salt_grpo as sg
from data import arithmetic
from experiments.shared import experiment_args, group_geometry, mean_std, pyplot

G_VALUES = [2, 4, 8, 16]
SETTINGS = dict(model=harness.EMBEDDED, prompts=16, batches=6, g_max=16, seed=0, micro_batch=64)
SMOKE = dict(model=harness.TINY, prompts=4, batches=2, g_max=16, seed=0, micro_batch=64)


# ---- rollouts and features (shared with salt_geometry.py) ----------------------------------------------------

def rollout_config(s: dict) -> sg.Config:
    """The demo's task and SALT's default (exact LM-head) Gram; smoke: the tiny model, 8 new tokens."""
    cfg = sg.demo_config(model=s["model"], seed=s["seed"], num_generations=s["g_max"], prompts_per_step=s["prompts"],
                    micro_batch_size=s["micro_batch"], bf16=False, salt="official")
    if s["model"] == harness.TINY:
        cfg = dataclasses.replace(cfg, max_completion_length=8)
    return cfg


def collect_batches(s: dict, cache_dir: Path) -> list[dict]:
    """[{K (B×B exact Gram, unnormalised), r (B,)}] per batch, rows prompt-major (G_max rollouts per prompt); cached."""
    key = hashlib.sha1(json.dumps({**s, "gram": "exact"}, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"salt_batches_{key}.safetensors"
    if path.exists():
        from safetensors.torch import load_file

        t = load_file(str(path))
        return [{"K": t[f"K{b}"], "r": t[f"r{b}"]} for b in range(s["batches"])]
    from tqdm.auto import tqdm

    cfg = rollout_config(s)
    torch.manual_seed(s["seed"])
    model, tok = harness.load_model(cfg.model, torch.float32, seed=s["seed"])
    model.eval()
    spec = sg.FeatureSpec(model, cfg)
    train_rows, _ = sg.load_rows(cfg)
    device, G = torch.device("cpu"), s["g_max"]
    out, tensors = [], {}
    for b in tqdm(range(s["batches"]), desc="rollouts + features"):
        idx = harness.prompts_for_round(len(train_rows), s["prompts"], b, s["seed"])
        F_parts, r_parts = [], []
        for lo in range(0, len(idx), max(1, s["micro_batch"] // G)):  # a few prompts × G rollouts at a time
            chunk = idx[lo:lo + max(1, s["micro_batch"] // G)]
            texts = [harness.format_prompt(tok, train_rows[i]["prompt"]) for i in chunk for _ in range(G)]
            gens = [torch.Generator().manual_seed(harness.rollout_seed(s["seed"], b, i, g)) for i in chunk for g in range(G)]
            pids, pam, comp, cmask = harness.generate(model, tok, texts, cfg, device, cfg.max_completion_length, gens)
            done = tok.batch_decode(comp, skip_special_tokens=True)
            r_parts.append(torch.tensor([arithmetic.reward_fn(c, train_rows[i]["answer"])
                                         for c, i in zip(done, [i for i in chunk for _ in range(G)])]))
            batch = {"prompt_ids": pids, "prompt_mask": pam, "comp_ids": comp, "comp_mask": cmask}
            F_parts += sg.feature_pass(model, spec, [batch], cfg, device, exact=True)  # tokens of these rollouts
        K, r = sg.scope_gram(None, spec, F_parts, gather=False), torch.cat(r_parts).float()
        out.append({"K": K, "r": r})
        tensors[f"K{b}"], tensors[f"r{b}"] = K, r
    harness.save_safetensors(path, tensors)
    return out


def subset(batch: dict, G: int, g_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first G rollouts of every prompt: (their Gram K, rewards, group ids)."""
    P = batch["r"].numel() // g_max
    keep = torch.cat([torch.arange(p * g_max, p * g_max + G) for p in range(P)])
    return batch["K"][keep][:, keep], batch["r"][keep], torch.arange(P).repeat_interleave(G)


# ---- measurement -------------------------------------------------------------------------------------------

def grpo_gram(K: torch.Tensor, r: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K / B, GRPO advantages a) as salt_grpo builds them (per-group std, its default eps)."""
    return K / K.shape[0], sg.group_advantages(r.double(), G, "group", sg.demo_config().adv_eps)


def geometry(K: torch.Tensor, r: torch.Tensor, groups: torch.Tensor, G: int) -> dict:
    """H1's statistics for one batch at one G."""
    K, a = grpo_gram(K, r, G)
    B, active = a.numel(), int((a != 0).sum())
    gg = group_geometry(K, a, groups)
    neff = common.signed_neff(K, a) if active else float("nan")
    pr = common.participation_ratio(K)
    return {"G": G, "B": B, "B_active": active, "participation_ratio": pr, "pr_over_B": pr / B,
            "neff": neff, "neff_over_B": neff / B, "neff_over_B_active": neff / active if active else float("nan"),
            "neff_within": gg["neff_within"], "neff_within_over_G": gg["neff_within"] / G,
            "pr_within": gg["pr_within"], "cos_within": gg["cos_within"], "cos_within_abs": gg["cos_within_abs"],
            "frac_zero_std_groups": float((r.view(-1, G).std(1) == 0).double().mean()),
            "reward": float(r.mean())}


def summarise(rows: list[dict], keys: list[str]) -> dict:
    """Per G: mean, sample std and n over batches."""
    return {G: {k: mean_std([x[k] for x in rows if x["G"] == G]) for k in keys} for G in G_VALUES}


KEYS = ["participation_ratio", "pr_over_B", "neff", "neff_over_B", "neff_over_B_active", "neff_within",
        "neff_within_over_G", "pr_within", "cos_within_abs", "cos_within", "frac_zero_std_groups"]


def plot(summary: dict, path: Path) -> None:
    plt = pyplot()
    panels = [("participation_ratio", "PR"), ("pr_over_B", "PR / B"), ("neff", "n_eff (GRPO)"),
              ("neff_over_B", "n_eff / B"), ("neff_within", "per-group n_eff"),
              ("neff_within_over_G", "per-group n_eff / G")]
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, (k, title) in zip(axes.flat, panels):
        m = [summary[G][k]["mean"] for G in G_VALUES]
        e = [summary[G][k]["std"] for G in G_VALUES]
        ax.errorbar(G_VALUES, m, yerr=e, marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(G_VALUES, [str(g) for g in G_VALUES])
        ax.set_title(title)
        ax.set_xlabel("G (rollouts per prompt)")
        ax.grid(alpha=0.3)
    fig.suptitle("GRPO gradient geometry vs G (mean ± std over batches, same prompts, nested rollouts)")
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = experiment_args("salt_cancellation", __doc__, argv, smoke="tiny random model, 2 small batches (seconds)",
                           cache_dir=True)
    t0 = time.perf_counter()
    s = SMOKE if args.smoke else SETTINGS
    out = args.out
    batches = collect_batches(s, args.cache_dir)
    rows = [{"batch": b, **geometry(*subset(batch, G, s["g_max"]), G)} for b, batch in enumerate(batches)
            for G in G_VALUES]
    summary = summarise(rows, KEYS)
    result = {"experiment": "salt_cancellation", "settings": {**s, "G_values": G_VALUES,
              "features": "lm_head (exact Gram of the full LM-head score gradients)",
              "task": "built-in arithmetic (salt_grpo defaults)"},
              "per_batch": rows, "summary": {str(G): v for G, v in summary.items()},
              "wall_time_s": time.perf_counter() - t0}
    harness.write_json(out / "results.json", result)
    plot(summary, out / "cancellation_vs_G.png")
    print(f"{'G':>3} " + " ".join(f"{k:>20}" for k in KEYS[:7]))
    for G in G_VALUES:
        print(f"{G:>3} " + " ".join(f"{summary[G][k]['mean']:>12.3f} ± {summary[G][k]['std']:<5.3f}" for k in KEYS[:7]))
    print(f"wrote {out}/results.json and cancellation_vs_G.png in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    harness.run_main(main)
