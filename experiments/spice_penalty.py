"""SPICE experiment 11 (issue 12, round 2): the conflict penalty where conflict exists — a λ sweep.

Experiment 5 found the penalty λ·conflict never changing a pick, because conflict = max(0, −cos(g_x, ḡ_S)) was 0 for
about 95 % of the candidates. This experiment sweeps λ on feature sets where conflict can be positive:
- `A_unit`: experiment 5's embedded pool (corrupted rows and near-duplicates included), each feature unit-normalised
  (the gain no longer follows ‖g‖², so the penalty's scale is comparable to the gains);
- `B`: a contradictory pool, each of N clean instructions twice, once with its answer and once with a contradictory
  answer (another row's answer of the same family and template), features as SPICE computes them;
- `B_unit`: B unit-normalised.
Features: spice_clean.FEATURES (the authors' LoRA features). Per λ, whole pool and pool by pool (120 → 12): the share
of steps where the penalty changes the pick, Jaccard with greedy (λ = 0), exact log-det, conflict at the picks, min
cosine to the selected mean; on B the contradictory share, pairs with both members picked, the pair cosines. Then
experiment 10's LoRA fine-tune at equal steps on each distinct whole-pool selection: held-out NLL and exact match.
"""
from __future__ import annotations

import math
import random
import time

import torch
from tqdm.auto import tqdm


import harness
import spice_select as ss
from data import spice_pool
from experiments import spice_downstream as sd
from experiments.shared import ROOT, experiment_args, paired  # paired: the pre-registered rule
from experiments.spice_clean import SETTINGS as CLEAN, finetune, pool_features

LAMBDAS = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)
# Scaled for a 1-core CPU (RESULTS.md, experiment 11's amendment): 50 instructions (B: 100 rows), pools of 20 → 2, and
# the downstream runs only where the decision rule reads them (B, B_unit; λ = 0 and 0.1). The protocol's scale:
# instructions 500, pool_size 120, select_k 12, downstream on every set and λ.
SETTINGS = dict(CLEAN, instructions=50, pool_size=20, select_k=2, downstream_sets=("B", "B_unit"),
                downstream_lambdas=(0.0, 0.1))
SMOKE_LAMBDAS = (0.0, 0.1, 5.0)
SMOKE = dict(SETTINGS, model="tiny", proxy_dtype="float32", pool_n=40, instructions=20, heldout_per_family=2,
             seeds=(0,), target_dtype="float32", pool_size=20, select_k=2, downstream_sets=("A_unit", "B", "B_unit"),
             downstream_lambdas=SMOKE_LAMBDAS)
CACHE = ROOT / "outputs/experiments/spice_penalty"


def contradictory_pool(n: int, seed: int = 0) -> list[dict]:
    """n distinct clean instructions, each followed by a copy with a contradictory answer: the answer of another
    row of the same family (same template, a different answer). `partner` is the other row's index."""
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < 2 * n:
        fam = spice_pool.FAMILIES[rng.randrange(len(spice_pool.FAMILIES))]
        ins, res = spice_pool.family_row(fam, rng)
        if ins in seen:
            continue
        for _ in range(100):
            other = spice_pool.family_row(fam, rng)[1]
            if other != res:
                break
        else:  # a family with a single possible answer here: skip the instruction
            continue
        seen.add(ins)
        i = len(rows)
        rows += [{"instruction": ins, "response": res, "family": fam, "contradictory": False, "partner": i + 1,
                  "corrupted": False, "duplicate_of": None},
                 {"instruction": ins, "response": other, "family": fam, "contradictory": True, "partner": i,
                  "corrupted": True, "duplicate_of": None}]
    return rows


def unit(G: torch.Tensor) -> torch.Tensor:
    return G / G.norm(dim=1, keepdim=True).clamp(min=1e-30)


def changed_share(G: torch.Tensor, picks: list[int], alpha: float) -> float:
    """Share of the steps whose pick has a strictly lower gain Δ than the best candidate on the same prefix, i.e.
    where λ·conflict changed the pick (plain greedy would have taken another row)."""
    if not picks:
        return float("nan")
    eng = ss.KernelGains(G.double(), alpha, len(picks))
    taken = torch.zeros(G.shape[0], dtype=torch.bool)
    changed = 0
    for t, j in enumerate(picks):
        delta = eng.gains().masked_fill(taken, -math.inf)
        changed += bool(delta[j] < delta.max() - 1e-12)
        taken[j] = True
        k_row = eng.row(j)
        if t + 1 < len(picks):
            eng.add(j, k_row)
    return changed / len(picks)


def sweep(G: torch.Tensor, raw: torch.Tensor, rows: list[dict], S: dict, lambdas, pool_size) -> dict:
    """Every λ on one feature set and one schedule (whole pool when pool_size is None)."""
    alpha, k_total, res = 1.0, ss.budget_count(S["budget"], len(rows)), {}
    windows = ss.pool_windows(len(rows), pool_size, 0) if pool_size else [list(range(len(rows)))]
    quotas = ss.window_quotas([len(w) for w in windows], S["select_k"], pool_size, 0) if pool_size else [k_total]
    for lam in lambdas:
        picks, changed, records = [], [], []
        for win, k in zip(windows, quotas):
            if not k:
                continue
            sel = ss.spice_select(G[win], k, alpha, lam)
            changed.append(changed_share(G[win], sel.indices, alpha) * len(sel.indices))
            picks += [win[i] for i in sel.indices]
            records += sel.records
        st = ss.selection_stats(ss.Selection("spice", picks, records, ss.log_det(G[picks], alpha)), G, rows, alpha)
        conf = [r["conflict"] for r in records]
        res[lam] = {"indices": picks, "changed_share": sum(changed) / len(picks), "log_det": st["log_det"],
                    "log_det_raw": ss.log_det(raw[picks], alpha), "min_cos_to_mean": st["min_cos_to_mean"],
                    "frac_negative_cos": st["frac_negative_cos"],
                    "frac_picks_conflict_positive": sum(c > 0 for c in conf) / len(conf),
                    "frac_corrupted": st.get("frac_corrupted")}
        if "partner" in rows[0]:
            pk = set(picks)
            res[lam]["pairs_both_picked"] = sum(rows[i]["partner"] in pk for i in picks) // 2
    greedy = set(res[0.0]["indices"])
    for v in res.values():
        v["jaccard_greedy"] = len(set(v["indices"]) & greedy) / len(set(v["indices"]) | greedy)
        v["log_det_minus_greedy"] = v["log_det"] - res[0.0]["log_det"]
    return res


def pair_cosines(G: torch.Tensor, rows: list[dict]) -> dict:
    """cos(g_answer, g_contradiction) over the pairs of the contradictory pool."""
    i = torch.tensor([r["partner"] for r in rows if not r["contradictory"]])
    j = torch.tensor([k for k, r in enumerate(rows) if not r["contradictory"]])
    c = torch.nn.functional.cosine_similarity(G[j].double(), G[i].double(), dim=1)
    return {"median": float(c.median()), "frac_negative": float((c < 0).double().mean()), "min": float(c.min())}


def main(argv=None) -> dict:
    args = experiment_args("spice_penalty", __doc__, argv, smoke="tiny model, small pools, 3 λ, 1 seed (seconds)")
    out = args.out
    S, lambdas = (SMOKE, SMOKE_LAMBDAS) if args.smoke else (SETTINGS, LAMBDAS)
    cache = CACHE / ("smoke" if args.smoke else "full")
    t0 = time.perf_counter()
    rows_a, G_a, _ = pool_features(S, {}, cache)
    b_path = cache / "contradictory_pool.jsonl"
    harness.write_jsonl(b_path, contradictory_pool(S["instructions"]))
    rows_b, G_b, _ = pool_features(S, dict(pool=str(b_path)), cache)
    sets = {"A_unit": (unit(G_a), G_a, rows_a), "B": (G_b, G_b, rows_b), "B_unit": (unit(G_b), G_b, rows_b)}
    result = {"experiment": "spice_penalty", "settings": {**S, "lambdas": lambdas},
              "pair_cosines_B": pair_cosines(G_b, rows_b), "sweeps": {}, "runs": {}, "verdicts": {}}
    for name, (G, raw, rows) in sets.items():
        result["sweeps"][name] = {"whole_pool": sweep(G, raw, rows, S, lambdas, None),
                                  "pool_by_pool": sweep(G, raw, rows, S, lambdas, S["pool_size"])}
    _, tok = harness.load_model(S["model"], S["target_dtype"])
    for name, (G, raw, rows) in sets.items():  # downstream: each distinct whole-pool selection, equal steps
        if name not in S["downstream_sets"]:
            continue
        held = sd.heldout_rows(rows, S["heldout_per_family"])
        k = ss.budget_count(S["budget"], len(rows))
        done: dict = {}
        for lam in tqdm([lam for lam in lambdas if lam in S["downstream_lambdas"]], desc=f"fine-tune {name}"):
            idx = result["sweeps"][name]["whole_pool"][lam]["indices"]
            key = tuple(sorted(idx))
            if key not in done:
                done[key] = {s: finetune(S, rows, idx, round(len(rows) / k), s, held, tok, f"{name} λ={lam:g}")
                             for s in S["seeds"]}
            result["runs"][f"{name}/{lam:g}"] = done[key]
        r0, r1 = result["runs"][f"{name}/0"], result["runs"][f"{name}/0.1"]
        # d = NLL(λ = 0) − NLL(λ = 0.1), paired by seed: "better" reads λ = 0.1 has the lower held-out loss
        result["verdicts"][name] = paired([r0[s]["eval"]["loss"] - r1[s]["eval"]["loss"] for s in S["seeds"]])
    result["wall_time_s"] = time.perf_counter() - t0
    harness.write_json(out / "results.json", result)
    for name in sets:
        for sched in ("whole_pool", "pool_by_pool"):
            for lam, v in result["sweeps"][name][sched].items():
                print(f"{name:<7} {sched:<13} λ={lam:<4g} changed {v['changed_share']:.3f} jaccard "
                      f"{v['jaccard_greedy']:.3f} Δlogdet {v['log_det_minus_greedy']:+.3f} conflict>0 "
                      f"{v['frac_picks_conflict_positive']:.3f}")
        v = result["verdicts"].get(name)
        if v:
            print(f"{name}: NLL(λ=0) − NLL(λ=0.1) = {v['mean']:+.4f} → λ = 0.1 {v['outcome']}")
    print(f"wrote {out}/results.json in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    harness.run_main(main)
