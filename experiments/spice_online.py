"""Experiment 13 (issue 25, part 2): SPICE as the paper selects — pool by pool, with the proxy trained online on its
own picks — against greedy, random, top_norm and the full pool, with selection variance across seeds.

Question: experiment 10 selected 10 rows once from a 100-row pool (deterministic, so no selection variance), from
the LoRA proxy at initialisation (B = 0 makes every ∂ℓ/∂A zero) and offline. Does SPICE, run on the paper's schedule
(windows of 120 candidates → 12 picks, the LoRA proxy updated on its picks every T windows), pick a 10 % that
fine-tunes better than a random 10 % on the same windows, and as well as the whole pool?

Arms (each seed = one window order: the pool shuffled by spice_select.pool_windows with the seed, which also seeds the
proxy's LoRA init and feature projections):
- `online`: spice_select.select_online itself, method spice (λ = 0.1), T = SETTINGS["T"], proxy AdamW on its picks.
- `greedy` (λ = 0), `top_norm` (largest ‖g‖), `random` (spice_select.random_select): each picks 12 of the same
  window, from the same window features (the proxy that trains on SPICE's picks; select_online takes one method, so
  the other selectors are run beside it on each window's G by wrapping spice_select.run_method during the call).
  Where greedy's picks equal SPICE's in every window, its own online loop would be the same run.
- `full`: the whole pool.
Downstream: a fresh SmolLM2-135M-Instruct LoRA (experiment 6's target, spice_downstream.fresh_target; its training loop
with a step cap) on each arm's picks, at EQUAL EPOCHS (1 epoch of the picks, the paper's rule) and at EQUAL STEPS (the
full pool's step count for 1 epoch). Metrics on a family-balanced held-out set (HELDOUT_SEED's generator, clean):
response NLL per token (primary), exact match (secondary), overall, per family and on the rows whose instruction is
not in the pool. Also each arm's family coverage and mean ‖g‖ of its picks (the window features at pick time).
Statistics: per-seed paired differences, experiments.shared.paired (mean ± SE, t-test p, sign count) and
shared.false_positive_rate(n). The decision rules are in docs/RESULTS.md, experiment 13, written before the run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import harness  # noqa: E402
import spice_select as ss  # noqa: E402
from data import spice_pool  # noqa: E402
from experiments import spice_downstream as sd  # noqa: E402
from experiments.shared import ROOT, experiment_args, false_positive_rate, mean_std, paired, pyplot  # noqa: E402

torch.set_num_threads(1)

# Sizes: the amendment in docs/RESULTS.md (one core, fp32). The paper's: 97.5 K rows, Qwen2-7B, 3 epochs, T = 10.
SETTINGS = dict(model="embedded", pool_n=1000, heldout_per_family=20, seeds=(0, 1, 2), window=120, per_window=12,
                T=1, lam=0.1, features="kronecker", proxy_dtype="float32", batch=8, lr=5e-4, target_dtype="float32",
                full_epochs=1)
SMOKE = dict(SETTINGS, model="tiny", pool_n=60, heldout_per_family=2, seeds=(0, 1), window=20, per_window=2, batch=4)
ARMS = ("online", "greedy", "random", "top_norm")       # the 10 % arms; `full` besides
RULES = ("equal_epochs", "equal_steps")
HELDOUT_SEED = 1
CACHE = ROOT / "outputs/experiments/spice_online"


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

def clean_pool(n: int) -> list[dict]:
    """n rows of the demo generator with no corrupted row and no near-duplicate (seed 0)."""
    return spice_pool.generate(n, corrupt_frac=0.0, dup_frac=0.0, seed=0)


def heldout(pool: list[dict], per_family: int) -> list[dict]:
    """per_family distinct clean rows per family from a fresh generator (HELDOUT_SEED): instructions not in the pool
    first; a family with too few unseen instructions (capitals 24, opposites 18, counting 40, days 42 in all) is
    filled with distinct instructions the pool also holds. Each row gets `seen` (its instruction is in the pool)."""
    in_pool = {r["instruction"] for r in pool}
    fresh = spice_pool.generate(20000, corrupt_frac=0.0, dup_frac=0.0, seed=HELDOUT_SEED)
    out = []
    for f in spice_pool.FAMILIES:
        rows, taken = [r for r in fresh if r["family"] == f], set()
        for want_seen in (False, True):
            for r in rows:
                if len([x for x in out if x["family"] == f]) >= per_family:
                    break
                if (r["instruction"] in in_pool) == want_seen and r["instruction"] not in taken:
                    taken.add(r["instruction"])
                    out.append({**r, "seen": want_seen})
    return out


def coverage(idx: list[int], rows: list[dict]) -> dict:
    fams = {f: sum(rows[i]["family"] == f for i in idx) for f in spice_pool.FAMILIES}
    return {"families": fams, "covered": sum(v > 0 for v in fams.values())}


# ----------------------------------------------------------------------------------------------------------
# Selection: spice_select's online loop, the other selectors beside it on each window's features
# ----------------------------------------------------------------------------------------------------------

class _Log:
    """The logger select_online writes to: kept in memory."""

    def __init__(self):
        self.rows = []

    def log(self, d: dict, step: int) -> None:
        self.rows.append({"step": step, **d})


def proxy_config(S: dict, seed: int) -> ss.Config:
    return ss.validate(ss.Config(model=S["model"], prompt_format="plain", dtype=S["proxy_dtype"], lora=True, features=S["features"],
                                 seed=seed, mode="online", method="spice", lam=S["lam"], pool_size=S["window"],
                                 select_k=S["per_window"], update_every=S["T"], cache_dir="none",
                                 output_dir=str(CACHE / "unused")))


def select_seed(S: dict, pool: list[dict], seed: int) -> dict:
    """One seed's window order: SPICE online (spice_select.select_online) and, on the same window features, greedy,
    top_norm and random. Returns global pool indices per arm, per-window agreement, ‖g‖ and timings."""
    from accelerate import Accelerator

    t0 = time.perf_counter()
    cfg = proxy_config(S, seed)
    model, tok, fz = ss.build_proxy(cfg, lora=True, rows=cfg.pool_size)
    tokens = ss.tokenize([harness.Example(r["instruction"], r["response"]) for r in pool], tok, cfg)
    windows = ss.pool_windows(len(pool), cfg.pool_size, seed)
    quotas = ss.window_quotas([len(w) for w in windows], ss.per_pool(cfg), cfg.pool_size, seed)
    active = [w for w, q in enumerate(quotas) if q]  # select_online featurizes only these, in this order
    beside: list[dict] = []
    real = ss.run_method

    def run_method(method, G, k, c, progress=False):  # select_online's call, plus the other selectors on the same G
        sel = real(method, G, k, c, progress)
        w = active[len(beside)]
        win = windows[w]
        norms = G.norm(dim=1)
        picks = {"online": sel.indices, "greedy": real("greedy", G, k, c).indices,
                 "top_norm": real("top_norm", G, k, c).indices,
                 "random": ss.random_select(G, k, c.alpha, seed=seed * 100_003 + w).indices}
        beside.append({"window": w, "picks": {a: [win[i] for i in p] for a, p in picks.items()},
                       "norm": {a: [float(norms[i]) for i in p] for a, p in picks.items()},
                       "window_mean_norm": float(norms.mean()), "window_norm_sum": float(norms.sum()),
                       "window_n": len(win), "zero_A_grad_share": float((G == 0).all(0).float().mean())})
        return sel

    log = _Log()
    ss.run_method = run_method
    try:
        sel = ss.select_online(cfg, Accelerator(cpu=True), model=model, tok=tok, fz=fz, tokens=tokens, method="spice",
                               logger=log)
    finally:
        ss.run_method = real
    idx = {a: [i for b in beside for i in b["picks"][a]] for a in ARMS}
    assert idx["online"] == sel.indices, "the wrapped run_method must see select_online's own picks"
    n_all = sum(b["window_n"] for b in beside)
    return {"seed": seed, "indices": idx, "window_order_head": [w[:5] for w in windows],
            "quotas": quotas, "feature_dim": fz.dim, "feature_mode": fz.mode,
            "greedy_equals_online_windows": sum(b["picks"]["greedy"] == b["picks"]["online"] for b in beside),
            "n_windows": len(beside),
            "mean_norm": {a: sum(x for b in beside for x in b["norm"][a]) / len(idx[a]) for a in ARMS},
            "pool_mean_norm": sum(b["window_norm_sum"] for b in beside) / n_all,
            "zero_feature_share_by_window": [b["zero_A_grad_share"] for b in beside],
            "proxy_log": log.rows, "log_det_final_proxy": sel.log_det, "seconds": time.perf_counter() - t0}


def selections(S: dict, pool: list[dict], seed: int, cache: Path) -> dict:
    key = hashlib.sha1(json.dumps([S[k] for k in ("model", "pool_n", "window", "per_window", "T", "lam", "features",
                                                   "proxy_dtype")] + [seed], sort_keys=True).encode()).hexdigest()[:10]
    path = cache / f"selection_seed{seed}_{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = select_seed(S, pool, seed)
    harness.write_json(path, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Downstream: experiment 6's target and loop, with a step cap; per-row evaluation
# ----------------------------------------------------------------------------------------------------------

def train(model, tok, tokens, S: dict, seed: int, epochs: int, max_steps: int | None, desc: str) -> dict:
    """spice_downstream.train (AdamW, warmup 10 % + cosine, per-row mean response NLL) with the batch list cut at
    max_steps (the equal-steps arms: the full pool's step count)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=S["lr"], weight_decay=0.0)
    rng = random.Random(seed)
    batches = []
    for _ in range(epochs):
        order = list(range(len(tokens)))
        rng.shuffle(order)
        ep = []
        for c in range(0, len(order), 16 * S["batch"]):
            chunk = sorted(order[c:c + 16 * S["batch"]], key=lambda i: len(tokens[i][0]))
            ep += [chunk[s:s + S["batch"]] for s in range(0, len(chunk), S["batch"])]
        rng.shuffle(ep)
        batches += ep
    batches = batches[:max_steps] if max_steps else batches
    n_steps, n_warm = len(batches), max(1, round(sd.WARMUP * len(batches)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / n_warm if t < n_warm else
                                              0.5 * (1 + math.cos(math.pi * (t - n_warm) / max(1, n_steps - n_warm))))
    model.train()
    losses, t0 = [], time.perf_counter()
    for b in tqdm(batches, desc=desc, leave=False, mininterval=10):
        ids, am, lm = ss.collate([tokens[i] for i in b], tok.pad_token_id, True)
        logits, tgt, row = sd.response_logits(model, ids, am, lm)
        loss = sd.per_row_nll(logits, tgt, row, len(b)).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return {"steps": n_steps, "epochs": epochs, "rows_seen": sum(map(len, batches)),
            "seconds": time.perf_counter() - t0, "first_loss": losses[0],
            "last_loss": sum(losses[-5:]) / len(losses[-5:])}


def steps_per_epoch(n: int, batch: int) -> int:
    return sum(math.ceil(len(range(c, min(n, c + 16 * batch))) / batch) for c in range(0, n, 16 * batch))


@torch.no_grad()
def evaluate(model, tok, tokens, held: list[dict]) -> dict:
    """Per-row response NLL and exact match (spice_downstream.evaluate's one-pass rule), aggregated overall, on the
    unseen-instruction rows and per family (mean over rows)."""
    model.eval()
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i][0]))
    nll, em = [0.0] * len(tokens), [0.0] * len(tokens)
    for s in range(0, len(order), sd.EVAL_BATCH):
        b = order[s:s + sd.EVAL_BATCH]
        ids, am, lm = ss.collate([tokens[i] for i in b], tok.pad_token_id, True)
        logits, tgt, row = sd.response_logits(model, ids, am, lm)
        r = sd.per_row_nll(logits, tgt, row, len(b))
        wrong = torch.zeros(len(b)).index_add_(0, row, (logits.argmax(-1) != tgt).float())
        for j, i in enumerate(b):
            nll[i], em[i] = float(r[j]), float(wrong[j] == 0)
    groups = {"overall": list(range(len(held))), "unseen": [i for i, r in enumerate(held) if not r["seen"]]}
    groups.update({f: [i for i, r in enumerate(held) if r["family"] == f] for f in spice_pool.FAMILIES})
    return {g: {"loss": sum(nll[i] for i in ix) / len(ix), "exact_match": sum(em[i] for i in ix) / len(ix),
                "n": len(ix)} for g, ix in groups.items() if ix}


# ----------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------

COMPARISONS = [("online", "random"), ("greedy", "random"), ("top_norm", "random"), ("online", "greedy"),
               ("online", "top_norm"), ("online", "full"), ("random", "full")]
EQUIV_MARGIN = 0.05   # nats per token: "10 % matches full" if the 95 % t-interval of online − full lies within ±margin


def t_quantile_975(df: int) -> float:
    return {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}.get(df, 2.0)


def compare(runs: dict, a: str, b: str, rule: str, metric: str, group: str = "overall") -> dict | None:
    """Paired by seed: a@rule − b@rule (full has one rule); None if a seed lacks either arm."""
    ka, kb = (x if x == "full" else f"{x}@{rule}" for x in (a, b))
    seeds = sorted(set(runs.get(ka, {})) & set(runs.get(kb, {})))
    if len(seeds) < 1:
        return None
    d = [runs[ka][s]["eval"][group][metric] - runs[kb][s]["eval"][group][metric] for s in seeds]
    p = paired(d)
    lower = metric == "loss"  # lower NLL is better; higher exact match is better
    wins = sum((x < 0) if lower else (x > 0) for x in d)
    losses = sum((x > 0) if lower else (x < 0) for x in d)
    good = p["mean"] < 0 if lower else p["mean"] > 0
    if len(seeds) >= 2 and p["p_value"] == p["p_value"] and p["p_value"] < 0.05 and (wins == len(d) or
                                                                                     losses == len(d)):
        reading = f"{a} better" if good else f"{a} worse"
    elif all(x == 0 for x in d):
        reading = "no difference (every per-seed difference is 0)"
    else:
        reading = "no detectable difference (not enough power to say)"
    out = {"a": ka, "b": kb, "metric": metric, "group": group, "seeds": seeds, "diffs": d, **p,
           "wins_for_a": wins, "false_positive_rate_2se": false_positive_rate(len(d)), "reading": reading}
    if b == "full" and metric == "loss" and len(d) > 1:
        half = t_quantile_975(len(d) - 1) * p["se"]
        out["ci95"] = [p["mean"] - half, p["mean"] + half]
        out["matches_full"] = bool(abs(p["mean"]) + half <= EQUIV_MARGIN)
    return out


def summary_table(runs: dict, sels: dict, pool: list[dict]) -> list[dict]:
    table = []
    for key in [f"{a}@{r}" for r in RULES for a in ARMS] + ["full"]:
        if key not in runs or not runs[key]:
            table.append({"arm": key, "n_seeds": 0})
            continue
        seeds = sorted(runs[key])
        arm = key.split("@")[0]
        row = {"arm": key, "n_seeds": len(seeds), "steps": runs[key][seeds[0]]["train"]["steps"]}
        for g in ("overall", "unseen"):
            for m in ("loss", "exact_match"):
                st = mean_std([runs[key][s]["eval"][g][m] for s in seeds])
                row[f"{g}_{m}"], row[f"{g}_{m}_std"] = st["mean"], st["std"]
        if arm != "full":
            row["coverage"] = mean_std([sels[s]["coverage"][arm]["covered"] for s in seeds])["mean"]
            row["mean_norm"] = mean_std([sels[s]["mean_norm"][arm] for s in seeds])["mean"]
        else:
            row["coverage"] = coverage(list(range(len(pool))), pool)["covered"]
            row["mean_norm"] = mean_std([sels[s]["pool_mean_norm"] for s in sels])["mean"]
        table.append(row)
    return table


def fmt(x, nd=3):
    return "–" if x is None or x != x else f"{x:.{nd}f}"


def fmt_tables(result: dict) -> str:
    lines = ["| arm | steps | seeds | held-out NLL | exact match | unseen NLL | families covered | mean ‖g‖ of picks |",
             "|---|---|---|---|---|---|---|---|"]
    nl = result["null"]
    lines.append(f"| null (untuned) | 0 | – | {fmt(nl['overall']['loss'])} | {fmt(nl['overall']['exact_match'])} | "
                 f"{fmt(nl.get('unseen', {}).get('loss'))} | – | – |")
    for r in result["table"]:
        if not r["n_seeds"]:
            lines.append(f"| `{r['arm']}` | – | 0 | not run | not run | not run | – | – |")
            continue
        lines.append(f"| `{r['arm']}` | {r['steps']} | {r['n_seeds']} | {fmt(r['overall_loss'])} ± "
                     f"{fmt(r['overall_loss_std'])} | {fmt(r['overall_exact_match'])} ± "
                     f"{fmt(r['overall_exact_match_std'])} | {fmt(r['unseen_loss'])} | {fmt(r['coverage'], 1)}/8 | "
                     f"{fmt(r['mean_norm'], 2)} |")
    lines += ["", "| comparison (a − b) | metric | per-seed differences | mean ± SE | t-test p | seeds a better |"
              " P(|mean| > 2·SE \\| null) | reading |", "|---|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| `{c['a']}` − `{c['b']}` | {c['metric']} ({c['group']}) | "
                     + ", ".join(f"{x:+.3f}" for x in c["diffs"]) + f" | {c['mean']:+.3f} ± {fmt(c['se'])} | "
                     f"{fmt(c['p_value'])} | {c['wins_for_a']}/{c['n']} | {fmt(c['false_positive_rate_2se'], 2)} | "
                     f"{c['reading']}" + (f"; 95 % CI [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if "ci95" in c
                                          else "") + " |")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    plt = pyplot()
    runs, keys = result["runs"], [r["arm"] for r in result["table"] if r["n_seeds"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric, lab in ((axes[0], "loss", "held-out response NLL / token"), (axes[1], "exact_match",
                                                                                 "held-out exact match")):
        for i, k in enumerate(keys):
            vals = [runs[k][s]["eval"]["overall"][metric] for s in sorted(runs[k])]
            col = "#d62728" if k.startswith("online") else "#1f77b4" if k == "full" else "#7f7f7f" \
                if k.startswith("random") else "#2ca02c"
            ax.bar(i, sum(vals) / len(vals), color=col, alpha=0.6 if "equal_epochs" in k else 1.0)
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        ax.axhline(result["null"]["overall"][metric], color="k", ls=":", lw=1, label="untuned")
        ax.set_xticks(range(len(keys)), keys, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(lab)
        ax.legend(fontsize=8)
    fig.suptitle("Experiment 13: 10 % selections pool by pool (120 → 12) vs the full pool; bars: mean, dots: seeds")
    fig.tight_layout()
    harness.save_figure(fig, out / "heldout_nll.png", dpi=120)

    fams = [f for f in spice_pool.FAMILIES if f in result["null"]]
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(keys) + 1.8))
    M = [[sum(runs[k][s]["eval"][f]["loss"] for s in runs[k]) / len(runs[k]) for f in fams] for k in keys]
    im = ax.imshow(M, cmap="magma_r", aspect="auto")
    n = result["heldout"]["per_family"]
    ax.set_xticks(range(len(fams)), [f"{f}\n(n={n[f]}, unseen {result['heldout']['unseen_per_family'][f]})"
                                     for f in fams], fontsize=7)
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    for i, r in enumerate(M):
        for j, v in enumerate(r):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="w" if float(im.norm(v)) > 0.5 else "k")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title("held-out response NLL per family (mean over seeds)", fontsize=9)
    fig.tight_layout()
    harness.save_figure(fig, out / "per_family_nll.png", dpi=120)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = experiment_args("spice_online", __doc__, argv, smoke="tiny model, 60-row pool, 2 seeds: seconds",
                           seeds=dict(type=int, nargs="*", help="override the seeds"),
                           stop_at=dict(help="UTC HH:MM: start no fine-tune whose estimated end is later "
                                             "(recorded as not run)"))
    S = dict(SMOKE if args.smoke else SETTINGS)
    if args.seeds:
        S["seeds"] = tuple(args.seeds)
    out, cache = args.out, CACHE / ("smoke" if args.smoke else "full")
    out.mkdir(parents=True, exist_ok=True)
    (cache / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    deadline = None
    if args.stop_at:
        now = datetime.now(timezone.utc)
        hh, mm = map(int, args.stop_at.split(":"))
        deadline = time.perf_counter() + (now.replace(hour=hh, minute=mm, second=0) - now).total_seconds()

    pool = clean_pool(S["pool_n"])
    held = heldout(pool, S["heldout_per_family"])
    fams = [r["family"] for r in held]
    print(f"pool {len(pool)} clean rows; held-out {len(held)} rows ({sum(not r['seen'] for r in held)} unseen)",
          flush=True)
    _, tok = harness.load_model(S["model"], S["target_dtype"])
    cfg_tok = ss.Config(model=S["model"], prompt_format="plain")
    tok_pool = ss.tokenize([harness.Example(r["instruction"], r["response"]) for r in pool], tok, cfg_tok)
    tok_held = ss.tokenize([harness.Example(r["instruction"], r["response"]) for r in held], tok, cfg_tok)
    full_steps = steps_per_epoch(len(pool), S["batch"]) * S["full_epochs"]
    result = {"experiment": "spice_online", "settings": {**S, "arms": ARMS, "rules": RULES, "full_steps": full_steps,
                                                         "lora_target": sd.LORA, "warmup": sd.WARMUP,
                                                         "heldout_seed": HELDOUT_SEED, "equiv_margin": EQUIV_MARGIN},
              "pool": {"n": len(pool), "per_family": {f: sum(r["family"] == f for r in pool)
                                                      for f in spice_pool.FAMILIES}},
              "heldout": {"n": len(held), "unseen": sum(not r["seen"] for r in held),
                          "per_family": {f: fams.count(f) for f in spice_pool.FAMILIES},
                          "unseen_per_family": {f: sum(r["family"] == f and not r["seen"] for r in held)
                                                for f in spice_pool.FAMILIES}},
              "selections": {}, "runs": {}, "not_run": []}
    model, _ = sd.fresh_target(S, 0, lora=False)
    result["null"] = evaluate(model, tok, tok_held, held)
    del model
    sels = result["selections"]
    step_s = {"value": None}  # measured seconds per optimizer step, for the stop_at estimate

    def job(seed: int, arm: str, rule: str | None) -> None:
        key = "full" if arm == "full" else f"{arm}@{rule}"
        if seed not in sels:
            sels[seed] = selections(S, pool, seed, cache)
            sels[seed]["coverage"] = {a: coverage(sels[seed]["indices"][a], pool) for a in ARMS}
            sels[seed]["coverage"]["full"] = coverage(list(range(len(pool))), pool)
            print(f"seed {seed}: selection {sels[seed]['seconds']:.0f} s; greedy = online in "
                  f"{sels[seed]['greedy_equals_online_windows']}/{sels[seed]['n_windows']} windows", flush=True)
        idx = list(range(len(pool))) if arm == "full" else sels[seed]["indices"][arm]
        if rule == "equal_steps":
            epochs, cap = math.ceil(full_steps / steps_per_epoch(len(idx), S["batch"])), full_steps
        else:
            epochs, cap = (S["full_epochs"] if arm == "full" else 1), None
        ident = hashlib.sha1(json.dumps([S["model"], S["batch"], S["lr"], S["target_dtype"], seed, idx, epochs, cap,
                                         len(held)]).encode()).hexdigest()[:12]
        path = cache / "runs" / f"{ident}.json"
        if path.exists():
            r = json.loads(path.read_text())
        else:
            n_steps = min(cap or 10**9, epochs * steps_per_epoch(len(idx), S["batch"]))
            if deadline is not None and step_s["value"] and \
                    time.perf_counter() + n_steps * step_s["value"] + 30 > deadline:
                result["not_run"].append({"seed": seed, "arm": key, "reason": f"stop_at {args.stop_at}"})
                print(f"skip {key}@seed{seed}: would end after {args.stop_at}", flush=True)
                return
            model, _ = sd.fresh_target(S, seed)
            tr = train(model, tok, [tok_pool[i] for i in idx], S, seed, epochs, cap, f"{key}@{seed}")
            t1 = time.perf_counter()
            r = {"train": tr, "eval": evaluate(model, tok, tok_held, held), "eval_seconds": time.perf_counter() - t1}
            del model
            harness.write_json(path, r)
        if r["train"]["steps"] >= 10:
            step_s["value"] = r["train"]["seconds"] / r["train"]["steps"]
        result["runs"].setdefault(key, {})[seed] = {**r, "run_id": ident}
        result["wall_seconds"] = time.perf_counter() - t_start
        harness.write_json(out / "results.json", result)
        print(f"{key}@seed{seed}: steps {r['train']['steps']} ({r['train']['seconds']:.0f} s), held-out NLL "
              f"{r['eval']['overall']['loss']:.3f}, EM {r['eval']['overall']['exact_match']:.3f}", flush=True)

    # Priority order (a stop leaves whole comparisons): per seed the primary arms, then greedy, then top_norm.
    for s in S["seeds"]:
        for arm, rule in (("full", None), ("online", "equal_steps"), ("random", "equal_steps"),
                          ("online", "equal_epochs"), ("random", "equal_epochs")):
            job(s, arm, rule)
    for arm, rule in (("greedy", "equal_epochs"), ("greedy", "equal_steps"), ("top_norm", "equal_epochs"),
                      ("top_norm", "equal_steps")):
        for s in S["seeds"]:
            job(s, arm, rule)

    runs = result["runs"]
    result["table"] = summary_table(runs, sels, pool)
    comps = []
    for rule in RULES:
        for a, b in COMPARISONS:
            for metric, group in (("loss", "overall"), ("exact_match", "overall"), ("loss", "unseen")):
                c = compare(runs, a, b, rule, metric, group)
                if c:
                    comps.append({**c, "rule": rule})
    result["comparisons"] = comps
    result["wall_seconds"] = time.perf_counter() - t_start
    harness.write_json(out / "results.json", result)
    harness.write_text(out / "table.md", fmt_tables(result) + "\n")
    plot(result, out)
    print(fmt_tables(result))
    print(f"wall time {result['wall_seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    harness.run_main(main)
