"""Experiment 4 — conflict vs. diminishing returns on real LM gradients (SPICE paper Fig. 2, Tables 4–5).

Claims tested (docs/RESULTS.md §4):
  (a) along plain log-det greedy, the step-wise Spearman ρ(conflict(x|S), Δ_x(S)) ≈ −0.792 and
      ρ(conflict(x|S), |ε_x(S)|) ≈ 0.901 over the candidates (conflict = Definition 4, against the mean of the
      picks so far);
  (b) split by conflict into top / bottom 20 %, greedy in each half: the low-conflict half decays more slowly,
      half-life 10–30 steps;
  (c) Theorem 4's perturbation bound |ε_x(S)| ≤ C·α²Σ_{y∈S}(g_xᵀg_y)²/(1+α‖g_x‖²) is violated in 6.4–13.4 % of
      cases for |S| = 16…256 (Table 4), with Spearman 0.72–0.82 / Pearson 0.50–0.54 between |ε| and the sum term
      and decomposition error < 1e-6; curvature grows with conflict (Table 5).

Setting: the embedded 1,000-row instruction pool of spice_select.py, gradient features of the embedded
SmolLM2-135M-Instruct proxy by spice_select's own feature path (defaults: last 2 blocks, 16×16 factored
projection per Linear = 3,584 dims, bf16, token-mean response loss), cached under outputs/experiments/.
Scaled down from the paper (Qwen2-7B gradients of real SFT data) to what a shared 2-core CPU affords: a 135M proxy,
a synthetic 8-family pool, 512-row random subsets (as the paper's 512-sample sets), 3 subset seeds.

Protocol fixed before looking at any number:
  * α = 1 (the script's and the official code's default) is the main setting. Theorem 4 assumes α‖F_S‖₂ < 1;
    we report ‖F_S‖₂ and how often the assumptions hold. Because the feature scale is arbitrary, part (c) (and
    (a)) is also run at α_safe = 1/(4·λ_max(F_D)) with F_D the Fisher of the whole 512-row subset: then ρ ≤ 1/4
    and αG_max²ρ ≤ 1/16 for every S ⊆ D, so the assumptions hold by construction. This is a rule that makes the
    theorem applicable, not a tuned value.
  * (b) conflict reference: the mean gradient of the 512-row subset (the pool mean), ranked by the signed
    −cos(g_x, ḡ_pool) (Definition 4 before the hinge, so that ranks are not tied at 0); top 20 % = most
    anti-aligned, bottom 20 % = most aligned. Half-life = first step t (1-based) with Δ_t ≤ Δ_1/2.
  * (c) G_max = the largest gradient norm in the subset; a violation is |ε| > bound·(1 + 1e-9); the rate is
    over the candidates x ∉ S whose (x, S) meets the assumptions. We also give, clearly labelled, the rate of
    |ε| exceeding the first-order term alone (C = 1), which is defined whatever α is.

    bash run.sh experiments spice_decay            # ~3 min with a cold feature cache, seconds when warm
    python -m experiments.spice_decay --smoke --out /tmp/x
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


import harness
import spice_select as S
from data import spice_pool
from experiments.shared import ROOT, experiment_args, finite_mean_std, pyplot

PAPER = {"spearman_conflict_delta": -0.792, "spearman_conflict_abs_eps": 0.901, "half_life_steps": "10-30",
         "table4": {16: (0.723, 0.501, 6.4), 32: (0.756, 0.515, 7.1), 64: (0.789, 0.528, 10.3),
                    128: (0.801, 0.534, 12.8), 256: (0.818, 0.541, 13.4)},
         "table5_curvature": {"low": 0.032, "medium": 0.074, "high": 0.092}}


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------



def settings(smoke: bool) -> dict:
    """The protocol's fixed values. cache_dir is relative to ROOT (recorded as is in results.json)."""
    if smoke:  # tiny random model, small pool: checks the plumbing only
        return dict(model="tiny", dtype="float32", pool_rows=160, subset=64, seeds=[0, 1, 2], steps=32,
                    checkpoints=[4, 8, 16, 32], alpha=1.0, split_frac=0.2, eta=1e-8, feature_seed=0,
                    cache_dir="outputs/experiments/spice_features_smoke")
    return dict(model="embedded", dtype="bfloat16", pool_rows=1000, subset=512, seeds=[0, 1, 2], steps=256,
                checkpoints=[16, 32, 64, 128, 256], alpha=1.0, split_frac=0.2, eta=1e-8, feature_seed=0,
                cache_dir="outputs/experiments/spice_features")


# ----------------------------------------------------------------------------------------------------------
# Data: gradient features of the demo pool generator (data/spice_pool.py) by spice_select's feature path (cached)
# ----------------------------------------------------------------------------------------------------------

def pool_features(model: str, dtype: str, rows: int, seed: int, cache_dir: str) -> tuple[list[dict], torch.Tensor]:
    """(rows, G) for a pool of data/spice_pool.py: load_pool → build_proxy → tokenize → compute_features, cached.

    cache_dir is taken relative to ROOT (an absolute path is used as is), never to the working directory.
    Shared with spice_selectors.py, which imports it from here.
    """
    from accelerate import Accelerator

    cache_root = ROOT / cache_dir
    pool = spice_pool.pool_file(cache_root / "pools", rows, seed=seed)  # the demo pool's generator, rows × seed
    cfg = S.validate(S.Config(model=model, dtype=dtype, prompt_format="plain", pool=str(pool), seed=seed,
                              lora=False, features="kronecker", cache_dir=str(cache_root)))
    pool, examples, _, _ = S.load_pool(cfg)
    proxy, tok, fz = S.build_proxy(cfg, lora=False)
    tokens = S.tokenize(examples, tok, cfg)
    cache = cache_root / S.feature_cache_key(cfg, fz, tokens)
    G = S.compute_features(fz, tok, tokens, cfg, Accelerator(cpu=True), cache)
    return pool, G


def feature_summary(G: torch.Tensor) -> dict:
    """Shape and squared-norm range of the features (sets the scale α = 1 acts on)."""
    sq = (G.double() ** 2).sum(1)
    return {"n": G.shape[0], "d": G.shape[1], "sq_norm_median": float(sq.median()),
            "sq_norm_max": float(sq.max()), "sq_norm_min": float(sq.min())}


# ----------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------

def rankdata(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties get their average rank (as scipy.stats.rankdata)."""
    _, inv, cnt = torch.unique(x, return_inverse=True, return_counts=True)
    cum = torch.cumsum(cnt, 0).double()
    return (cum - (cnt.double() - 1) / 2)[inv]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(rankdata(a), rankdata(b))


def greedy_trace(G: torch.Tensor, steps: int, alpha: float, eta: float, checkpoints: list[int]) -> dict:
    """Plain greedy (λ = 0) with spice_select's exact kernel engine, measuring every candidate at every step.

    (a) per step t ≥ 1: Spearman over x ∉ S_t of conflict(x|S_t) vs Δ_x(S_t) and vs |ε_x(S_t)|;
    (c) at |S| ∈ checkpoints: Theorem 4's bound, the assumptions, |ε| vs the sum term, decomposition error.
    The picks are checked against spice_select.spice_select(λ = 0).
    """
    G = G.double()
    n = G.shape[0]
    eng = S.KernelGains(G, alpha, steps + 1)
    sq = (G * G).sum(1)
    norms, base = sq.sqrt(), S.base_gain(sq, alpha)
    g_max2 = float(sq.max())
    r, ss = torch.zeros(n, dtype=torch.float64), 0.0
    taken = torch.zeros(n, dtype=torch.bool)
    picks, step_rows, table = [], [], []
    for t in range(steps + 1):
        delta = eng.gains()
        cand = ~taken
        if t >= 1:
            conf = S.conflict(r, norms, ss, t, eta)[cand]
            eps = (delta - base)[cand]
            # post hoc (added after seeing that about 95–96 % of conflicts are exactly 0 — conflict > 0 for
            # 4.3 % of candidates at α = 1, 5.5 % at α_safe): Definition 4 before the hinge
            neg_cos = conf - S.conflict(-r, norms, ss, t, eta)[cand]  # = −Align(g_x)
            step_rows.append({"t": t, "frac_conflict_positive": float((conf > 0).double().mean()),
                              "spearman_conflict_delta": spearman(conf, delta[cand]),
                              "spearman_conflict_abs_eps": spearman(conf, eps.abs()),
                              "spearman_negcos_delta": spearman(neg_cos, delta[cand]),
                              "spearman_negcos_abs_eps": spearman(neg_cos, eps.abs())})
        if t in checkpoints:
            table.append(theorem4(G, picks, cand, delta, base, alpha, g_max2))
        if t == steps:
            break
        j = int(torch.argmax(delta.masked_fill(taken, -math.inf)))
        picks.append(j)
        taken[j] = True
        k_row = eng.row(j)
        ss += 2 * float(r[j]) + float(k_row[j])
        r += k_row
        eng.add(j, k_row)
    ref = S.spice_select(G, steps, alpha, lam=0.0, eta=eta, form="kernel")
    assert ref.indices == picks, "trace greedy differs from spice_select(λ=0)"
    return {"picks": picks, "steps": step_rows, "table4": table}


def theorem4(G, picks, cand, delta, base, alpha, g_max2) -> dict:
    """Theorem 4 at S = picks for every x ∉ S, with ε computed directly (Woodbury solve, float64)."""
    GS, Gx = G[picks], G[cand]
    K = GS @ GS.T
    lam_max = float(torch.linalg.eigvalsh(K).max())  # ‖F_S‖₂ = λ_max(G_SᵀG_S) = λ_max(K_SS)
    rho = alpha * lam_max
    denom = 1 - rho - alpha * g_max2 * rho
    holds = rho < 1 and denom > 0
    kx = Gx @ GS.T
    sq = (Gx * Gx).sum(1)
    q = sq - alpha * (kx * torch.linalg.solve(torch.eye(len(picks), dtype=G.dtype) + alpha * K, kx.T).T).sum(1)
    eps = torch.log1p(alpha * q) - torch.log1p(alpha * sq)  # ε_x(S) = Δ_x(S) − base_x, directly
    abs_eps = eps.abs()
    sum_term = (kx * kx).sum(1)  # Σ_{y∈S} (g_xᵀ g_y)²
    first_order = alpha ** 2 * sum_term / (1 + alpha * sq)
    out = {"S": len(picks), "norm_F_S": lam_max, "rho": rho, "C": 1 / denom if holds else None,
           "assumptions_hold": holds, "n_candidates": int(cand.sum()),
           "spearman_abs_eps_sum": spearman(abs_eps, sum_term), "pearson_abs_eps_sum": pearson(abs_eps, sum_term),
           "decomposition_error_max": float((delta[cand] - base[cand] - eps).abs().max()),
           "first_order_exceed_rate": float((abs_eps > first_order * (1 + 1e-9)).double().mean()),
           "mean_abs_eps_over_base": float((abs_eps / base[cand].clamp(min=1e-300)).mean())}
    if holds:
        bound = first_order / denom
        out["violation_rate"] = float((abs_eps > bound * (1 + 1e-9)).double().mean())
        out["max_abs_eps_over_bound"] = float((abs_eps / bound.clamp(min=1e-300)).max())
    else:
        out["violation_rate"] = None
    return out


def conflict_split(G: torch.Tensor, alpha: float, frac: float, eta: float, alpha_safe: float) -> dict:
    """(b) and Table 5: rank by −cos to the pool mean; greedy within the top / bottom `frac`; curvature by level."""
    G = G.double()
    n = G.shape[0]
    m = G.mean(0)
    neg_cos = -(G @ m) / (G.norm(dim=1) * m.norm() + eta)
    order = torch.argsort(neg_cos, stable=True)  # ascending: most aligned first
    size = max(2, round(frac * n))
    mid = (n - size) // 2
    groups = {"low": order[:size], "medium": order[mid:mid + size], "high": order[n - size:]}
    out = {}
    for name, idx in groups.items():
        Gg = G[idx]
        c = S.curvature(Gg, alpha)
        rec = {"n": len(idx), "mean_neg_cos": float(neg_cos[idx].mean()),
               "frac_positive_conflict": float((neg_cos[idx] > 0).double().mean()),
               "curvature": c, "curvature_ratio": (1 - math.exp(-c)) / c if c > 0 else 1.0,
               "curvature_alpha_safe": S.curvature(Gg, alpha_safe)}
        if name != "medium":
            sel = S.spice_select(Gg, len(idx), alpha, lam=0.0, eta=eta, form="kernel")
            d = [x["delta"] for x in sel.records]
            curve = [x / d[0] for x in d]
            hl = next((t + 1 for t, v in enumerate(curve) if v <= 0.5), None)
            rec.update(delta_1=d[0], curve=curve, half_life=hl, log_det=sel.log_det,
                       log_det_first_32=sum(d[:32]))
        out[name] = rec
    return out


def measure_subset(G_all: torch.Tensor, seed: int, cfg: dict) -> dict:
    """Everything measured on one random `subset`-row subset: (a)+(c) at α = 1 and at α_safe, (b) the split."""
    idx = torch.randperm(G_all.shape[0], generator=torch.Generator().manual_seed(seed))[:cfg["subset"]]
    G = G_all[idx].double()
    lam_max_D = float(torch.linalg.eigvalsh(G @ G.T).max())
    alpha_safe = 1 / (4 * lam_max_D)
    main_trace = greedy_trace(G, cfg["steps"], cfg["alpha"], cfg["eta"], cfg["checkpoints"])
    safe_trace = greedy_trace(G, cfg["steps"], alpha_safe, cfg["eta"], cfg["checkpoints"])
    split = conflict_split(G, cfg["alpha"], cfg["split_frac"], cfg["eta"], alpha_safe)
    return {"seed": seed, "rows": idx.tolist(), "norm_F_D": lam_max_D, "alpha_safe": alpha_safe,
            "G_max_sq": float((G * G).sum(1).max()),
            "alpha_main": {"steps": main_trace["steps"], "table4": main_trace["table4"], "picks": main_trace["picks"]},
            "alpha_safe_trace": {"steps": safe_trace["steps"], "table4": safe_trace["table4"]},
            "split": split}


# ----------------------------------------------------------------------------------------------------------
# Analysis: aggregate over steps (within a subset) and over subset seeds
# ----------------------------------------------------------------------------------------------------------

def step_summary(per_seed: list[dict], key: str, which: str) -> dict:
    """(a) one step-wise statistic: mean and std over the steps where it is defined, per seed, then over seeds."""
    per = []
    for s in per_seed:
        vals = [r[key] for r in s[which]["steps"] if math.isfinite(r[key])]
        per.append({"mean_over_steps": finite_mean_std(vals)["mean"], "std_over_steps": finite_mean_std(vals)["std"],
                    "n_steps_defined": len(vals), "n_steps": len(s[which]["steps"])})
    return {"per_seed": per, "mean_over_seeds": finite_mean_std([p["mean_over_steps"] for p in per]),
            "std_over_steps_mean": finite_mean_std([p["std_over_steps"] for p in per])["mean"]}


def table_summary(per_seed: list[dict], which: str, checkpoints: list[int]) -> list[dict]:
    """(c) Table 4: one row per |S|, mean ± std over seeds (maxima for the error and tightness columns)."""
    rows_out = []
    for i, size in enumerate(checkpoints):
        ent = [s[which]["table4"][i] for s in per_seed]
        rows_out.append({"S": size, "alpha": which,
                         "assumptions_hold_frac": sum(e["assumptions_hold"] for e in ent) / len(ent),
                         "violation_rate": finite_mean_std([e["violation_rate"] for e in ent]),
                         "first_order_exceed_rate": finite_mean_std([e["first_order_exceed_rate"] for e in ent]),
                         "spearman_abs_eps_sum": finite_mean_std([e["spearman_abs_eps_sum"] for e in ent]),
                         "pearson_abs_eps_sum": finite_mean_std([e["pearson_abs_eps_sum"] for e in ent]),
                         "norm_F_S": finite_mean_std([e["norm_F_S"] for e in ent]),
                         "rho": finite_mean_std([e["rho"] for e in ent]),
                         "decomposition_error_max": max(e["decomposition_error_max"] for e in ent),
                         "max_abs_eps_over_bound": max((e.get("max_abs_eps_over_bound") or 0.0) for e in ent)})
    return rows_out


def split_summary(per_seed: list[dict]) -> dict:
    """(b) and Table 5: per conflict group, curvature over seeds; half-lives and gains for low / high."""
    part_b = {}
    for g in ("low", "medium", "high"):
        ent = [s["split"][g] for s in per_seed]
        part_b[g] = {"curvature": finite_mean_std([e["curvature"] for e in ent]),
                     "curvature_ratio": finite_mean_std([e["curvature_ratio"] for e in ent]),
                     "curvature_alpha_safe": finite_mean_std([e["curvature_alpha_safe"] for e in ent]),
                     "mean_neg_cos": finite_mean_std([e["mean_neg_cos"] for e in ent]),
                     "frac_positive_conflict": finite_mean_std([e["frac_positive_conflict"] for e in ent])}
        if g != "medium":
            part_b[g].update(half_life=[e["half_life"] for e in ent],
                             half_life_stats=finite_mean_std([e["half_life"] for e in ent]),
                             delta_1=finite_mean_std([e["delta_1"] for e in ent]),
                             log_det=finite_mean_std([e["log_det"] for e in ent]),
                             log_det_first_32=finite_mean_std([e["log_det_first_32"] for e in ent]))
    return part_b


def aggregate(per_seed: list[dict], cfg: dict) -> tuple[dict, dict, dict]:
    """(part_a, part_b, part_c): step-wise Spearman, conflict split, Theorem 4 table, over the subset seeds."""
    part_a = {w: {k: step_summary(per_seed, k, w) for k in ("spearman_conflict_delta", "spearman_conflict_abs_eps",
                                                            "spearman_negcos_delta", "spearman_negcos_abs_eps")}
              for w in ("alpha_main", "alpha_safe_trace")}
    for w in part_a:
        part_a[w]["frac_conflict_positive"] = finite_mean_std(
            [r["frac_conflict_positive"] for s in per_seed for r in s[w]["steps"]])
    part_c = {"alpha_main": table_summary(per_seed, "alpha_main", cfg["checkpoints"]),
              "alpha_safe": table_summary(per_seed, "alpha_safe_trace", cfg["checkpoints"])}
    return part_a, split_summary(per_seed), part_c


# ----------------------------------------------------------------------------------------------------------
# Outputs: results.json, table4.csv, console summary
# ----------------------------------------------------------------------------------------------------------

def table4_csv(part_c: dict) -> str:
    """Table 4 as CSV: one line per (α setting, |S|), means over seeds."""
    def f(v) -> str:
        return "" if v is None else f"{v:.6g}"

    csv = ["alpha,S,assumptions_hold_frac,violation_rate_mean,first_order_exceed_mean,spearman_mean,pearson_mean,"
           "norm_F_S_mean,rho_mean,decomposition_error_max"]
    for w, tab in part_c.items():
        for r in tab:
            csv.append(",".join([w, str(r["S"]), f(r["assumptions_hold_frac"]), f(r["violation_rate"]["mean"]),
                                 f(r["first_order_exceed_rate"]["mean"]), f(r["spearman_abs_eps_sum"]["mean"]),
                                 f(r["pearson_abs_eps_sum"]["mean"]), f(r["norm_F_S"]["mean"]),
                                 f(r["rho"]["mean"]), f(r["decomposition_error_max"])]))
    return "\n".join(csv) + "\n"


def write_outputs(out: Path, result: dict) -> None:
    """results.json and table4.csv under out (the plot is written by plot())."""
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out / "results.json", result)
    harness.write_text(out / "table4.csv", table4_csv(result["part_c_theorem4"]))


def print_summary(result: dict, out: Path) -> None:
    """The headline numbers of (a), (b), (c) next to the paper's."""
    cfg, feature_info = result["settings"], result["features"]
    a, part_b, part_c = (result["part_a_stepwise_spearman"]["alpha_main"], result["part_b_conflict_split"],
                         result["part_c_theorem4"])
    print(f"\nfeatures {feature_info['n']}×{feature_info['d']}, median ‖g‖² {feature_info['sq_norm_median']:.3g}; "
          f"{len(cfg['seeds'])} subsets of {cfg['subset']}, α = {cfg['alpha']}")
    print(f"(a) step-wise Spearman, mean over steps then seeds (paper −0.792 / 0.901): "
          f"conflict~Δ {a['spearman_conflict_delta']['mean_over_seeds']['mean']:+.3f} ± "
          f"{a['spearman_conflict_delta']['mean_over_seeds']['std']:.3f}, conflict~|ε| "
          f"{a['spearman_conflict_abs_eps']['mean_over_seeds']['mean']:+.3f} ± "
          f"{a['spearman_conflict_abs_eps']['mean_over_seeds']['std']:.3f}")
    print(f"    post hoc, −cos before the hinge: ~Δ {a['spearman_negcos_delta']['mean_over_seeds']['mean']:+.3f}, "
          f"~|ε| {a['spearman_negcos_abs_eps']['mean_over_seeds']['mean']:+.3f}; share of candidates with "
          f"conflict > 0: {a['frac_conflict_positive']['mean']:.3f}")
    print("    curvature at α_safe low/med/high: " + " / ".join(
        f"{part_b[g]['curvature_alpha_safe']['mean']:.3f}" for g in ("low", "medium", "high")))
    print(f"(b) half-life low / high conflict: {part_b['low']['half_life']} / {part_b['high']['half_life']}; "
          f"curvature low/med/high {part_b['low']['curvature']['mean']:.3f} / "
          f"{part_b['medium']['curvature']['mean']:.3f} / {part_b['high']['curvature']['mean']:.3f}")
    print("(c) |S|  α      holds  violation  first-order>  spearman  pearson  ‖F_S‖₂     decomp.err")
    for w, tab in part_c.items():
        for r in tab:
            v = r["violation_rate"]["mean"]
            print(f"    {r['S']:<4} {w[6:]:<6} {r['assumptions_hold_frac']:.2f}   "
                  f"{'  n/a ' if v is None else f'{100 * v:5.1f}%'}     "
                  f"{100 * r['first_order_exceed_rate']['mean']:5.1f}%"
                  f"        {r['spearman_abs_eps_sum']['mean']:+.3f}    {r['pearson_abs_eps_sum']['mean']:+.3f}   "
                  f"{r['norm_F_S']['mean']:.3g}  {r['decomposition_error_max']:.1e}")
    print(f"wrote {out}/results.json, table4.csv, spice_decay.png in {result['wall_seconds']:.1f} s")


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------

def plot(per_seed: list[dict], part_c: dict, cfg: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(18, 4.6))
    # (b) decay curves
    for g, col in (("low", "tab:blue"), ("high", "tab:red")):
        for i, s in enumerate(per_seed):
            c = s["split"][g]["curve"]
            ax[0].plot(range(1, len(c) + 1), c, color=col, alpha=0.7, lw=1,
                       label=f"{g} conflict ({'bottom' if g == 'low' else 'top'} {int(100 * cfg['split_frac'])} % "
                       f"by −cos to the pool mean)" if i == 0 else None)
    ax[0].axhline(0.5, color="grey", ls=":", lw=1)
    ax[0].set(xlabel="greedy step t", ylabel="Δ_t / Δ_1", title="(b) decay within conflict groups (one line per seed)")
    ax[0].legend(fontsize=8)
    # (a) step-wise Spearman
    for key, col, pv in (("spearman_conflict_delta", "tab:purple", PAPER["spearman_conflict_delta"]),
                         ("spearman_conflict_abs_eps", "tab:green", PAPER["spearman_conflict_abs_eps"])):
        for i, s in enumerate(per_seed):
            st = s["alpha_main"]["steps"]
            ax[1].plot([r["t"] for r in st], [r[key] for r in st], color=col, alpha=0.6, lw=0.8,
                       label={"spearman_conflict_delta": "ρ(conflict, Δ)",
                              "spearman_conflict_abs_eps": "ρ(conflict, |ε|)"}[key] if i == 0 else None)
        ax[1].axhline(pv, color=col, ls="--", lw=1)
    ax[1].set(xlabel="|S| (greedy step, α = 1)", ylabel="Spearman over candidates",
              title="(a) step-wise Spearman (dashed: paper)", ylim=(-1.05, 1.05))
    ax[1].legend(fontsize=8)
    # (c) Table 4
    xs = [r["S"] for r in part_c["alpha_main"]]
    width = 0.25
    pos = torch.arange(len(xs)).tolist()
    paper = [PAPER["table4"].get(x, (None, None, float("nan")))[2] for x in xs]
    safe = [100 * (r["violation_rate"]["mean"] or 0) for r in part_c["alpha_safe"]]
    first = [100 * r["first_order_exceed_rate"]["mean"] for r in part_c["alpha_main"]]
    ax[2].bar([p - width for p in pos], paper, width, label="paper Table 4", color="grey")
    ax[2].bar(pos, safe, width, label="bound violated, α_safe (assumptions hold)", color="tab:blue")
    ax[2].bar([p + width for p in pos], first, width, label="|ε| > first-order term, α = 1 (C = 1)",
              color="tab:orange")
    holds = [r["assumptions_hold_frac"] for r in part_c["alpha_main"]]
    ax[2].set_xticks(pos, [f"{x}\n(α=1 holds {h:.0%})" for x, h in zip(xs, holds)], fontsize=8)
    tight = [r["max_abs_eps_over_bound"] for r in part_c["alpha_safe"]]
    for p, v, f, t in zip(pos, safe, first, tight):
        ax[2].text(p + width / 2, max(v, f) + 0.3, f"{v:.1f}/{f:.1f} %\nmax\n|ε|/bd\n{t:.2f}", ha="center",
                   fontsize=6.5)
    ax[2].set(xlabel="|S|", ylabel="% of (x, S)", title="(c) Theorem 4 bound (ours: α_safe / first-order at α=1)")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------------------------------------
# Main: data → measurement per subset seed → analysis → outputs → plots
# ----------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = experiment_args("spice_decay", __doc__, argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = settings(args.smoke)
    t0 = time.perf_counter()

    _, G_all = pool_features(cfg["model"], cfg["dtype"], cfg["pool_rows"], cfg["feature_seed"], cfg["cache_dir"])
    t_feat = time.perf_counter() - t0
    per_seed = [measure_subset(G_all, seed, cfg) for seed in tqdm(cfg["seeds"], desc="subsets")]
    part_a, part_b, part_c = aggregate(per_seed, cfg)
    result = {"experiment": "spice_decay", "settings": {**cfg, "smoke": args.smoke}, "paper": PAPER,
              "features": feature_summary(G_all), "feature_seconds": t_feat,
              "wall_seconds": time.perf_counter() - t0,
              "part_a_stepwise_spearman": part_a, "part_b_conflict_split": part_b, "part_c_theorem4": part_c,
              "per_seed": per_seed}

    write_outputs(args.out, result)
    plot(per_seed, part_c, cfg, args.out / "spice_decay.png")
    print_summary(result, args.out)
    return result


if __name__ == "__main__":
    harness.run_main(main)
