"""Experiment 5 — static selector comparison on real LM gradient features (SPICE paper §5.4; docs/RESULTS.md §5).

Claims tested (docs/RESULTS.md §5):
  * the paper: SPICE "selects subsets with higher log-determinant information than original criteria";
    Jaccard(SPICE, FisherSFT) = 0.47 (Table 12); SPICE avoids conflicting / redundant samples;
  * the expectation written before the run (docs/RESULTS.md §5): on a fixed pool SPICE's exact log-det is at
    most plain greedy's, while SPICE raises the minimum cosine to the selected-set mean and lowers the fraction of
    negative cosines; SPICE ≫ random and ≥ top_norm in log-det.

Setting: the same cached features as spice_decay.py (the embedded 1,000-row pool: 8 task families, 17 % corrupted
responses (170 rows; 15 % is only the generator's rate parameter), 15 % near-duplicates, all tagged;
SmolLM2-135M-Instruct proxy, spice_select's default featurization, 3,584 dims, bf16), α = 1, budget 10 % (100 rows).
Selectors, all from spice_select on the same features:
SPICE λ ∈ {0.1, 0.5, 1}, plain greedy (λ = 0), top_norm (official default), official_diag (official g⁴ surrogate,
λ = 0.1), random (5 seeds, mean ± std), SPICE+ (λ = 0.1, ω = 0.5) with the 10 % budget as cap and, separately,
with a 50 % cap (to see where the ω rule stops on its own). Two schedules: whole pool offline, and pool by pool
(pool_size 120 → select_k 12, the paper's schedule; F and ḡ reset per window) with 3 window-permutation seeds.
Scaled down from the paper (Qwen2-7B SFT on real data, downstream accuracy) to the selection-side statistics only.

    bash run.sh experiments spice_selectors         # seconds with a warm feature cache (spice_decay makes it)
    python -m experiments.spice_selectors --smoke --out /tmp/x
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
from experiments import spice_decay  # the same feature path and pool_features
from experiments.shared import experiment_args, finite_mean_std, pyplot

PAPER = {"jaccard_spice_fisher": 0.47, "claim": "SPICE selects subsets with higher log-det than other criteria"}
METRICS = ("log_det", "frac_corrupted", "frac_duplicates", "n_families_covered", "min_family_share",
           "cos_to_mean", "min_cos_to_mean", "frac_negative_cos", "jaccard_greedy", "k", "frac_picks_conflict_positive")


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------



def settings(smoke: bool) -> dict:
    """The protocol's fixed values. cache_dir is relative to ROOT (recorded as is in results.json)."""
    base = dict(alpha=1.0, budget=0.1, lams=[0.1, 0.5, 1.0], omega=0.5, spice_plus_caps=[0.1, 0.5],
                random_seeds=[0, 1, 2, 3, 4], pool_size=120, select_k=12, window_seeds=[0, 1, 2], feature_seed=0)
    if smoke:
        return {**base, "model": "tiny", "dtype": "float32", "pool_rows": 160, "pool_size": 40, "select_k": 4,
                "cache_dir": "outputs/experiments/spice_features_smoke"}
    return {**base, "model": "embedded", "dtype": "bfloat16", "pool_rows": 1000,
            "cache_dir": "outputs/experiments/spice_features"}


# ----------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------

def selectors(cfg: dict) -> list[tuple[str, str, dict]]:
    """(label, spice_select method, Config overrides) for each deterministic selector."""
    out = [(f"SPICE λ={lam:g}", "spice", {"lam": lam}) for lam in cfg["lams"]]
    out += [("greedy (λ=0)", "greedy", {}), ("top_norm", "top_norm", {}), ("official_diag", "official_diag", {})]
    out += [(f"SPICE+ ω={cfg['omega']:g} (cap {cap:.0%})", "spice", {"lam": 0.1, "omega": cfg["omega"], "budget": cap})
            for cap in cfg["spice_plus_caps"]]
    return out


def measure(sel: S.Selection, G: torch.Tensor, rows: list[dict], alpha: float, greedy_set: set | None) -> dict:
    st = S.selection_stats(sel, G, rows, alpha)
    st["n_families_covered"] = int(st["families_covered"].split("/")[0])
    picked = set(sel.indices)
    conf = [r["conflict"] for r in sel.records if math.isfinite(r["conflict"])]  # conflict(x_t|S_{t−1}) at pick
    st["frac_picks_conflict_positive"] = sum(c > 0 for c in conf) / len(conf) if conf else None
    st["jaccard_greedy"] = (len(picked & greedy_set) / len(picked | greedy_set)) if greedy_set is not None else 1.0
    return st


def run_schedule(G: torch.Tensor, rows: list[dict], cfg: dict, pool_size, select_k, window_seed: int) -> dict:
    """Every selector on one schedule (whole pool when pool_size is None); random over its seeds."""
    def conf(**kw):
        base = dict(alpha=cfg["alpha"], budget=cfg["budget"], pool_size=pool_size, select_k=select_k, seed=window_seed)
        return S.Config(**{**base, **kw})

    def random_sel(seed: int) -> S.Selection:
        if not pool_size:
            return S.select_offline(G, conf(seed=seed), "random")
        return _random_windows(G, cfg, pool_size, select_k, window_seed, seed)

    greedy = S.select_offline(G, conf(), "greedy")
    greedy_set = set(greedy.indices)
    res = {}
    for label, method, kw in selectors(cfg):
        if pool_size and "omega" in kw:  # SPICE+ per window: cap = the cap fraction of each window
            # select_k reuses the budget fraction as the per-window cap (10 % → 12 of each 120-row window,
            # 50 % → 60), so the overall budget equals the cap.
            kw = {**kw, "select_k": kw["budget"]}
        sel = S.select_offline(G, conf(**kw), method)
        res[label] = {k: v for k, v in measure(sel, G, rows, cfg["alpha"], greedy_set).items() if k in METRICS}
        res[label]["indices"] = sel.indices
    rand = [measure(random_sel(s), G, rows, cfg["alpha"], greedy_set) for s in cfg["random_seeds"]]
    res["random"] = {m: finite_mean_std([r[m] for r in rand]) for m in METRICS}
    return res


def _random_windows(G, cfg, pool_size, select_k, window_seed, seed) -> S.Selection:
    """Random pool by pool: the same windows as the other selectors, a seeded random draw inside each."""
    picks = []
    windows = S.pool_windows(G.shape[0], pool_size, window_seed)
    quotas = S.window_quotas([len(w) for w in windows], select_k, pool_size, window_seed)
    for w, win in enumerate(windows):
        if not quotas[w]:
            continue
        sel = S.random_select(G[win], quotas[w], cfg["alpha"], seed=1000 * seed + w)
        picks += [win[i] for i in sel.indices]
    return S.Selection("random", picks, [], S.log_det(G[picks], cfg["alpha"]))


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def aggregate(runs: list[dict]) -> dict:
    """Mean ± std over window seeds of per-run values (random: of its per-run means)."""
    out = {}
    for label in runs[0]:
        vals = {}
        for m in METRICS:
            xs = [r[label][m]["mean"] if isinstance(r[label][m], dict) else r[label][m] for r in runs]
            xs = [x for x in xs if x is not None]
            vals[m] = finite_mean_std(xs)
        out[label] = vals
    return out


# ----------------------------------------------------------------------------------------------------------
# Main: data → selection (two schedules) → table → plot
# ----------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = experiment_args("spice_selectors", __doc__, argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = settings(args.smoke)
    out = args.out
    t0 = time.perf_counter()

    # Data: the same cached features as spice_decay.py (spice_select's feature path)
    rows, G = spice_decay.pool_features(cfg["model"], cfg["dtype"], cfg["pool_rows"], cfg["feature_seed"],
                                        cfg["cache_dir"])
    pool_info = {"n": len(rows), "d": G.shape[1], "frac_corrupted": sum(r["corrupted"] for r in rows) / len(rows),
                 "frac_duplicates": sum(r["duplicate_of"] is not None for r in rows) / len(rows),
                 "n_families": len(spice_pool.FAMILIES), "log_det_pool": S.log_det(G, cfg["alpha"])}

    whole = run_schedule(G, rows, cfg, None, None, 0)
    per_pool_runs = [run_schedule(G, rows, cfg, cfg["pool_size"], cfg["select_k"], s)
                     for s in tqdm(cfg["window_seeds"], desc="pool-by-pool seeds")]
    per_pool = aggregate(per_pool_runs)
    wall = time.perf_counter() - t0

    result = {"experiment": "spice_selectors", "settings": {**cfg, "smoke": args.smoke}, "paper": PAPER,
              "pool": pool_info, "whole_pool": whole, "pool_by_pool": per_pool,
              "pool_by_pool_runs": [{k: {m: v[m] for m in METRICS if m in v} for k, v in r.items()}
                                    for r in per_pool_runs],
              "wall_seconds": wall}
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out / "results.json", result)
    lines = ["schedule,selector," + ",".join(f"{m}_mean,{m}_std" for m in METRICS)]
    for sched, tab in (("whole_pool", whole), ("pool_by_pool", per_pool)):
        for label, v in tab.items():
            cells = []
            for m in METRICS:
                x = v[m]
                x = x if isinstance(x, dict) else {"mean": x, "std": None}
                cells += ["" if x[q] is None else f"{float(x[q]):.6g}" for q in ("mean", "std")]
            lines.append(f"{sched},{label}," + ",".join(cells))
    harness.write_text(out / "selectors.csv", "\n".join(lines) + "\n")
    plot(whole, per_pool, pool_info, out / "spice_selectors.png")

    print(f"\npool {pool_info['n']} rows, d = {pool_info['d']}: {pool_info['frac_corrupted']:.3f} corrupted, "
          f"{pool_info['frac_duplicates']:.3f} near-duplicates; α = {cfg['alpha']}, budget {cfg['budget']:.0%}")
    for sched, tab in (("whole pool", whole), (f"pool by pool ({cfg['pool_size']}→{cfg['select_k']}, "
                                               f"mean over {len(cfg['window_seeds'])} window seeds)", per_pool)):
        print(f"\n{sched}")
        print(f"{'selector':<26}{'k':>5}{'log_det':>10}{'corrupt':>9}{'dup':>7}{'fam':>5}{'minfam':>8}"
              f"{'cos':>7}{'mincos':>8}{'neg':>7}{'Jacc':>7}{'conf>0':>9}")
        for label, v in tab.items():
            g = lambda m: v[m]["mean"] if isinstance(v[m], dict) else v[m]  # noqa: E731
            print(f"{label:<26}{g('k'):>5.0f}{g('log_det'):>10.2f}{g('frac_corrupted'):>9.3f}"
                  f"{g('frac_duplicates'):>7.3f}{g('n_families_covered'):>5.1f}{g('min_family_share'):>8.3f}"
                  f"{g('cos_to_mean'):>7.3f}{g('min_cos_to_mean'):>8.3f}{g('frac_negative_cos'):>7.3f}"
                  f"{g('jaccard_greedy'):>7.3f}{fmt(g('frac_picks_conflict_positive')):>9}")
    print(f"\nwrote {out}/results.json, selectors.csv, spice_selectors.png in {wall:.1f} s")
    return result


def plot(whole: dict, per_pool: dict, pool_info: dict, path: Path) -> None:
    plt = pyplot()
    panels = [("log_det", "exact log det(I + αF_S)"), ("min_cos_to_mean", "min cos(g, ḡ_S) over the picks"),
              ("frac_corrupted", "fraction corrupted"), ("frac_duplicates", "fraction near-duplicates"),
              ("min_family_share", "min family share"), ("jaccard_greedy", "Jaccard with plain greedy")]
    labels = list(whole)
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    x = torch.arange(len(labels)).tolist()
    w = 0.4
    for ax, (m, title) in zip(axes.flat, panels):
        for off, tab, name, col in ((-w / 2, whole, "whole pool", "tab:blue"),
                                    (w / 2, per_pool, "pool by pool 120→12", "tab:orange")):
            mean = [tab[lb][m]["mean"] if isinstance(tab[lb][m], dict) else tab[lb][m] for lb in labels]
            err = [tab[lb][m]["std"] if isinstance(tab[lb][m], dict) else 0.0 for lb in labels]
            ax.bar([i + off for i in x], mean, w, yerr=err, capsize=2, label=name, color=col)
        if m == "frac_corrupted":
            ax.axhline(pool_info["frac_corrupted"], color="grey", ls=":", lw=1, label="pool rate")
        if m == "frac_duplicates":
            ax.axhline(pool_info["frac_duplicates"], color="grey", ls=":", lw=1, label="pool rate")
        if m == "log_det":
            lo = min((whole[lb][m]["mean"] if isinstance(whole[lb][m], dict) else whole[lb][m]) for lb in labels)
            ax.set_ylim(bottom=0.9 * lo if lo > 0 else None)
        ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Selectors on the embedded pool (α = 1, 10 %); random: mean ± std over seeds; "
                 "pool by pool: mean ± std over window seeds", fontsize=10)
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    harness.run_main(main)
