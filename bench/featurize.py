"""Per-sample gradient features: factored projection (ours) vs per-sample loop + dense projection (LESS, SPICE code).

On the embedded SmolLM2-135M, 16 sequences × 128 tokens, gradients of every Linear layer of the last 4 blocks
(14.2 M parameters). Both methods produce features of the same dimension d (plus one factored row at 4× k,
16× the dimension, to show what a larger k buys). Printed, side by side in one run:
median wall time of each and their ratio, peak memory (RSS growth in a fresh child process), and how well each
feature Gram matrix matches the exact per-sample-gradient Gram (Pearson r over entries, relative Frobenius error
of the Gram and of the cosine matrix).

    python bench/featurize.py [--repeats 3] [--k 8] [--dtypes fp32,bf16] [--no-memory]

--consumer salt: SALT's accuracy-vs-cost frontier on one demo batch (4 prompts × 8 rollouts × 24 new tokens, sampled
by salt_grpo's generate path): the exact LM-head Gram (`common.lm_head_gram`, the reference), TensorSketch at
d ∈ {1k, 4k, 16k}, the Kronecker projection at k ∈ {16, 32, 64} and materialise + dense JL (d = 4k), with median time,
peak RSS growth, Gram relative Frobenius error, off-diagonal cosine error, PR error and the SALT a′ relative L2 error
against the exact rule (errors: mean over 5 seeds).

    python bench/featurize.py --consumer salt [--json FILE]
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import common as C  # noqa: E402

B, T, LAYERS = 16, 128, "last:4"


def batch(tok, seed=0):
    """16 random token sequences of 128 tokens; the first 32 are an unscored prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, len(tok) - 100, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    lm = am.clone()
    lm[:, :32] = 0
    return ids, am, lm


def factored(model, ids, am, lm, k, seed):
    return C.Featurizer(model, LAYERS, k_out=k, k_in=k, seed=seed)(ids, am, lm)


def loop_dense(model, ids, am, lm, d, seed):
    layers = C.select_linear_layers(model, LAYERS)
    G = C.exact_per_sample_grads(model, C.linear_params(layers), ids, am, lm)
    return C.dense_jl(G, d, seed=seed)


def _rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _child(method, dtype, k, d, q):
    model, tok = C.load_model(C.EMBEDDED, dtype=dtype)
    model.eval()
    ids, am, lm = batch(tok)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) after loading the model
    base = _rss("VmRSS:")
    (factored(model, ids, am, lm, k, 0) if method == "factored" else loop_dense(model, ids, am, lm, d, 0))
    q.put(_rss("VmHWM:") - base)


def peak_memory(method, dtype, k, d):
    """Peak RSS growth of one call, in a fresh process that has loaded the model."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(method, dtype, k, d, q))
    p.start()
    out = q.get()
    p.join()
    return out


def gram_match(F, K_exact):
    """Pearson r over Gram entries, relative Frobenius error of the Gram and of the cosine matrix."""
    K = C.gram(F)
    iu = torch.triu_indices(len(K), len(K))
    x, y = K[iu[0], iu[1]], K_exact[iu[0], iu[1]]
    r = torch.corrcoef(torch.stack([x, y]))[0, 1]
    cos, cos_x = C.cosine_matrix(K), C.cosine_matrix(K_exact)
    return float(r), float((K - K_exact).norm() / K_exact.norm()), float((cos - cos_x).norm() / cos_x.norm())


def timed(fn, repeats, warmup=True):
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


# ---------------------------------------------------------------------------------------------- SALT frontier

def salt_batch(seed=0):
    """One demo step: (model, LM-head tokens, B, advantages, Config), as salt_grpo samples and scores it."""
    import salt_grpo as sg

    cfg = sg.Config(bf16=False, seed=seed, prompts_per_step=4, num_generations=8, max_completion_length=24)
    model, tok = C.load_model(C.EMBEDDED, dtype=torch.float32)
    model.eval()
    rows = sg.load_rows(cfg)[0]
    idx = sg.prompts_for_round(len(rows), cfg.prompts_per_step, 0, seed)
    G = cfg.num_generations
    gens = [torch.Generator().manual_seed(sg.rollout_seed(seed, 0, i, g)) for i in idx for g in range(G)]
    texts = [sg.format_prompt(tok, rows[i]["prompt"]) for i in idx for _ in range(G)]
    with torch.no_grad():
        pids, pam, comp, cmask = sg.generate(model, tok, texts, cfg, "cpu", cfg.max_completion_length, gens)
        b = {"prompt_ids": pids, "prompt_mask": pam, "comp_ids": comp, "comp_mask": cmask}
        _, _, hidden, logits = sg.policy_forward(model, model.lm_head, b, cfg, "cpu", want_hidden=True)
    r = torch.tensor([sg.reward_fn(c, rows[i]["answer"]) for c, i in
                      zip(tok.batch_decode(comp, skip_special_tokens=True), [i for i in idx for _ in range(G)])])
    a = sg.group_advantages(r, G, cfg.scale_rewards, cfg.adv_eps)
    return model, C.lm_head_tokens(hidden, logits, comp, cmask), len(comp), a, cfg


def materialise_dense_jl(tok, B, d, seed=0, cols=1 << 16, fraction=1.0):
    """The per-sample V×H gradients, formed a block of vocabulary rows at a time, times a dense Gaussian (d × VH).
    fraction < 1: only that share of the column blocks (for timing; the cost is linear in the columns)."""
    delta, h, R = C.score_delta(tok["z"], tok["y"]), tok["h"].float(), torch.nn.functional.one_hot(tok["r"], B).float()
    V, H = delta.shape[1], h.shape[1]
    rows = max(1, cols // H)
    out = torch.zeros(B, d)
    for c, v0 in enumerate(range(0, int(V * fraction), rows)):
        Gb = torch.einsum("nb,nv,nh->bvh", R, delta[:, v0:v0 + rows], h).flatten(1)  # B × (rows·H)
        out += Gb @ C._gaussian(d, Gb.shape[1], seed * 7919 + c, "cpu").T
    return out


def _peak(fn):
    """(result, peak RSS growth in bytes) of one call; VmHWM is reset first (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS:")
    out = fn()
    return out, _rss("VmHWM:") - base


def salt_errors(K, K_exact, a, cfg):
    """Gram relative Frobenius error, off-diagonal cosine error, PR error (relative), a′ relative L2 error."""
    import salt_grpo as sg

    off = ~torch.eye(len(K), dtype=torch.bool)
    c, cx = C.cosine_matrix(K)[off], C.cosine_matrix(K_exact)[off]
    pr, prx = C.participation_ratio(K), C.participation_ratio(K_exact)
    a1, a0 = sg.salt_reweight(K, a, cfg)[0], sg.salt_reweight(K_exact, a, cfg)[0]
    return {"gram_err": float((K - K_exact).norm() / K_exact.norm()), "cos_err": float((c - cx).norm() / cx.norm()),
            "pr": pr, "pr_err": abs(pr - prx) / prx, "a_err": float((a1 - a0).norm() / a0.norm().clamp(min=1e-30))}


def salt_frontier(args) -> list[dict]:
    """SALT's Gram options on one SmolLM2 demo batch (rows: method, d, time_s, peak_mib, errors vs exact)."""
    model, tok, B, a, cfg = salt_batch()
    head = model.lm_head
    V, H = head.out_features, head.in_features
    seeds, rows = range(5), []
    K_exact = C.lm_head_gram_tokens(tok, B)
    methods = [("exact", V * H, lambda s: C.lm_head_gram_tokens(tok, B), False)]
    methods += [("sketch", d, lambda s, d=d: C.lm_head_sketch(tok, B, d, seed=s), True) for d in (1024, 4096, 16384)]

    def kron(s, k):
        p = C.FactoredProjector({"lm_head": head}, k, k, seed=s).mats["lm_head"]
        return _kron_rows(tok, B, *p)
    methods += [("kronecker", k * k, lambda s, k=k: kron(s, k), True) for k in (16, 32, 64)]
    for name, d, fn, approx in methods:
        med, _, _ = timed(lambda: fn(0), args.repeats)
        _, mem = _peak(lambda: fn(0))
        errs = [salt_errors(C.gram(fn(s)) if approx else fn(s), K_exact, a, cfg) for s in (seeds if approx else [0])]
        rows.append({"method": name, "d": d, "time_s": med, "peak_mib": mem / 2**20,
                     **{k: statistics.mean(e[k] for e in errs) for k in errs[0]}})
    # materialise + dense JL at d = 4096: timed on 1/16 of the vocabulary and scaled (the cost is linear in it); its
    # errors from F = K^{1/2} Z / √d, which has exactly the distribution of G Pᵀ for a Gaussian P (rotation invariance)
    d, frac = 4096, args.jl_fraction
    t0 = time.perf_counter()
    _, mem = _peak(lambda: materialise_dense_jl(tok, B, d, fraction=frac))
    med = time.perf_counter() - t0
    L = torch.linalg.cholesky(K_exact + 1e-9 * K_exact.diagonal().mean() * torch.eye(B, dtype=K_exact.dtype))
    for dd in (1024, 4096, 16384):
        errs = [salt_errors(C.gram(L @ torch.randn(B, dd, dtype=L.dtype, generator=torch.Generator().manual_seed(s))
                                   / dd ** 0.5), K_exact, a, cfg) for s in seeds]
        rows.append({"method": "materialise + dense JL", "d": dd, "time_s": med / frac if dd == d else float("nan"),
                     "peak_mib": mem / 2**20 if dd == d else float("nan"),
                     **{k: statistics.mean(e[k] for e in errs) for k in errs[0]}})
    print(f"SALT frontier: SmolLM2-135M, one demo batch of {B} rollouts, {len(tok['y'])} scored tokens, V = {V}, "
          f"H = {H}; exact PR = {C.participation_ratio(K_exact):.2f}; errors: mean of {len(seeds)} seeds")
    print(f"{'method':24} {'d':>9} {'median s':>9} {'peak MiB':>9} {'Gram err':>9} {'cos err':>8} {'PR':>6} "
          f"{'PR err':>7} {'a′ err':>7}")
    for r in rows:
        print(f"{r['method']:24} {r['d']:9d} {r['time_s']:9.3f} {r['peak_mib']:9.0f} {r['gram_err']:9.4f} "
              f"{r['cos_err']:8.4f} {r['pr']:6.2f} {r['pr_err']:7.4f} {r['a_err']:7.4f}")
    return rows


def _kron_rows(tok, B, p_out, p_in):
    """lm_head_score_features on flattened tokens: rows of f_i = Σ_t (P_out δ_t)(P_in h_t)ᵀ."""
    dp = C.score_delta(tok["z"], tok["y"]) if p_out is None else torch.softmax(tok["z"].float(), -1) @ p_out.T - p_out.T[tok["y"]]
    f = torch.einsum("no,ni->noi", dp, tok["h"].float() if p_in is None else tok["h"].float() @ p_in.T).flatten(1)
    return torch.zeros(B, f.shape[1]).index_add_(0, tok["r"], f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=8, help="rows of P_out and P_in per layer (d = 28·k²)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--consumer", default="both", choices=["salt", "spice", "both"])
    ap.add_argument("--jl_fraction", type=float, default=1 / 16, help="SALT: share of the vocabulary the "
                    "materialise + dense JL timing runs on (scaled up; its cost is linear in it)")
    ap.add_argument("--json", default="", help="write the frontier rows to this file")
    args = ap.parse_args()
    out = {}
    if args.consumer in ("salt", "both"):
        out["salt"] = salt_frontier(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.consumer == "salt":
        return

    model32, tok = C.load_model(C.EMBEDDED, dtype=torch.float32)
    model32.eval()
    ids, am, lm = batch(tok)
    layers = C.select_linear_layers(model32, LAYERS)
    D = sum(m.weight.numel() for m in layers.values())
    d = len(layers) * args.k ** 2
    G = C.exact_per_sample_grads(model32, C.linear_params(layers), ids, am, lm)
    K_exact = C.gram(G)
    del G
    print(f"SmolLM2-135M, {B} sequences × {T} tokens, {len(layers)} Linear layers of the last 4 blocks, "
          f"D = {D / 1e6:.1f} M parameters → d = {d}; {torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'dtype':6} {'method':24} {'d':>6} {'median s':>9} {'runs':>18} {'peak MiB':>9} {'Gram r':>7} "
          f"{'Gram err':>9} {'cos err':>8}")
    k4 = 4 * args.k
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        model = model32 if dtype == torch.float32 else C.load_model(C.EMBEDDED, dtype=dtype)[0].eval()
        res = {}
        # The loop baseline runs for minutes; its first call is as warm as the factored runs before it.
        for method, kk, dd, fn in [
                ("factored (ours)", args.k, d, lambda: factored(model, ids, am, lm, args.k, 0)),
                (f"factored, k={k4}", k4, len(layers) * k4 ** 2, lambda: factored(model, ids, am, lm, k4, 0)),
                ("loop + dense JL", args.k, d, lambda: loop_dense(model, ids, am, lm, d, 0))]:
            med, times, F = timed(fn, args.repeats, warmup=not method.startswith("loop"))
            mem = float("nan") if args.no_memory else peak_memory(
                "loop" if method.startswith("loop") else "factored", dtype, kk, dd) / 2**20
            r, err, cerr = gram_match(F, K_exact)
            res[method] = med
            print(f"{name:6} {method:24} {dd:6d} {med:9.2f} {' '.join(f'{t:.1f}' for t in times):>18} {mem:9.0f} "
                  f"{r:7.3f} {err:9.3f} {cerr:8.3f}", flush=True)
        print(f"{name:6} time ratio (loop + dense JL) / factored at equal d = {d}: "
              f"{res['loop + dense JL'] / res['factored (ours)']:.1f}×", flush=True)


if __name__ == "__main__":
    main()
