"""Per-sample gradient features: accuracy against cost on the embedded SmolLM2-135M (fp32), in one run.

SPICE (`spice_frontier`): 16 sequences × 128 tokens, for the LoRA adapters of q,k,v,o,gate,up,down (r = 8, the
official code's parameter set, 2.4 M parameters) and every Linear of the last 4 blocks (14.2 M): exact per-sample
gradients (one batched forward + backward), CountSketch at d ∈ {1k, 4k, 16k}, Kronecker at k ∈ {16, 32, 64},
and the per-sample backward loop + dense Gaussian JL (LESS, the official SPICE code). Printed: median time, peak
memory, Gram relative Frobenius error, RMS off-diagonal cosine error, participation-ratio error, and the Jaccard of
SPICE's picks (4 of 16) against the picks on exact features.

    python bench/featurize.py --consumer spice [--repeats 3] [--json FILE]

--consumer salt: SALT's accuracy-vs-cost frontier on one demo batch (4 prompts × 8 rollouts × 24 new tokens, sampled
by salt_grpo's generate path): the exact LM-head Gram (`common.lm_head_gram`, the reference), TensorSketch at
d ∈ {1k, 4k, 16k}, the Kronecker projection at k ∈ {16, 32, 64} and materialise + dense JL (d = 4k), with median time,
peak RSS growth, Gram relative Frobenius error, off-diagonal cosine error, PR error and the SALT a′ relative L2 error
against the exact rule (errors: mean over 5 seeds).

    python bench/featurize.py --consumer salt [--json FILE]

--smoke: the same code on the tiny random model, small sizes, one repeat (seconds; the figures mean nothing).
"""
import argparse
import json
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
import harness as H  # noqa: E402
from data import arithmetic as A  # noqa: E402
from tests import reference as R  # noqa: E402

B, T = 16, 128


def batch(tok, seed=0):
    """B random token sequences of T tokens (16 × 128); the first T/4 are an unscored prompt."""
    g = torch.Generator().manual_seed(seed)
    lo = min(100, len(tok) // 4)  # ids away from the special tokens at both ends of the vocabulary
    ids = torch.randint(lo, len(tok) - lo, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    lm = am.clone()
    lm[:, :T // 4] = 0
    return ids, am, lm


def _rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


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

def salt_batch(seed=0, model_name=H.EMBEDDED):
    """One demo step: (model, LM-head tokens, B, advantages, Config), as salt_grpo samples and scores it."""
    import salt_grpo as sg

    cfg = sg.demo_config(bf16=False, seed=seed, prompts_per_step=4, num_generations=8, max_completion_length=24)
    model, tok = H.load_model(model_name, dtype=torch.float32)
    model.eval()
    rows = sg.load_rows(cfg)[0]
    idx = H.prompts_for_round(len(rows), cfg.prompts_per_step, 0, seed)
    G = cfg.num_generations
    gens = [torch.Generator().manual_seed(H.rollout_seed(seed, 0, i, g)) for i in idx for g in range(G)]
    texts = [H.format_prompt(tok, rows[i]["prompt"]) for i in idx for _ in range(G)]
    with torch.no_grad():
        pids, pam, comp, cmask = H.generate(model, tok, texts, cfg, "cpu", cfg.max_completion_length, gens)
        b = {"prompt_ids": pids, "prompt_mask": pam, "comp_ids": comp, "comp_mask": cmask}
        _, _, hidden, logits = sg.policy_forward(model, model.lm_head, b, cfg, "cpu", want_hidden=True)
    r = torch.tensor([A.reward_fn(c, rows[i]["answer"]) for c, i in
                      zip(tok.batch_decode(comp, skip_special_tokens=True), [i for i in idx for _ in range(G)])])
    a = sg.group_advantages(r, G, cfg.scale_rewards, cfg.adv_eps)
    return model, C.lm_head_tokens(hidden, logits, comp, cmask), len(comp), a, cfg


def lm_head_kron_tokens(tok: dict, n_rows: int, p_out: torch.Tensor | None, p_in: torch.Tensor | None,
                        temperature: float = 1.0, chunk_tokens: int = 4096) -> torch.Tensor:
    """The Kronecker-projected LM-head score feature f_i = Σ_t (P_out δ_t)(P_in h_t)ᵀ from flattened tokens {h, z, y, r}
    (common.lm_head_tokens), the projection salt_grpo.py had as `--salt_features kronecker` (dropped in issue 23; the
    sketch is more accurate at equal cost, the frontier below): kept here as the bench's reference."""
    k_o = tok["z"].shape[1] if p_out is None else p_out.shape[0]
    k_i = tok["h"].shape[1] if p_in is None else p_in.shape[0]
    feats = torch.zeros(n_rows, k_o * k_i, device=tok["h"].device)
    for s in range(0, len(tok["y"]), chunk_tokens):
        h, z, y, r = (tok[k][s:s + chunk_tokens] for k in "hzyr")
        if p_out is None:
            dp = C.score_delta(z, y, temperature)
        else:  # P_out (p − e_y) without forming p − e_y
            dp = torch.softmax(z.float() / temperature, -1) @ p_out.T - p_out.T[y]
        xp = h.float() if p_in is None else h.float() @ p_in.T
        feats.index_add_(0, r, torch.einsum("no,ni->noi", dp, xp).flatten(1))
    return feats


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
    model, tok, B, a, cfg = salt_batch(model_name=args.model)
    head = model.lm_head
    V, H = head.out_features, head.in_features
    seeds, rows = range(5), []
    K_exact = C.lm_head_gram_tokens(tok, B)
    methods = [("exact", V * H, lambda s: C.lm_head_gram_tokens(tok, B), False)]
    methods += [("sketch", d, lambda s, d=d: C.lm_head_sketch(tok, B, d, seed=s), True) for d in args.sketch_dims]

    def kron(s, k):
        p = C.FactoredProjector({"lm_head": head}, k, k, seed=s).mats["lm_head"]
        return lm_head_kron_tokens(tok, B, *p)
    methods += [("kronecker", k * k, lambda s, k=k: kron(s, k), True) for k in args.kron_ks]
    for name, d, fn, approx in methods:
        med, _, _ = timed(lambda: fn(0), args.repeats)
        _, mem = _peak(lambda: fn(0))
        errs = [salt_errors(C.gram(fn(s)) if approx else fn(s), K_exact, a, cfg) for s in (seeds if approx else [0])]
        rows.append({"method": name, "d": d, "time_s": med, "peak_mib": mem / 2**20,
                     **{k: statistics.mean(e[k] for e in errs) for k in errs[0]}})
    # materialise + dense JL at d = 4096: timed on 1/16 of the vocabulary and scaled (the cost is linear in it); its
    # errors from F = K^{1/2} Z / √d, which has exactly the distribution of G Pᵀ for a Gaussian P (rotation invariance)
    d, frac = args.sketch_dims[len(args.sketch_dims) // 2], args.jl_fraction
    t0 = time.perf_counter()
    _, mem = _peak(lambda: materialise_dense_jl(tok, B, d, fraction=frac))
    med = time.perf_counter() - t0
    L = torch.linalg.cholesky(K_exact + 1e-9 * K_exact.diagonal().mean() * torch.eye(B, dtype=K_exact.dtype))
    for dd in args.sketch_dims:
        errs = [salt_errors(C.gram(L @ torch.randn(B, dd, dtype=L.dtype, generator=torch.Generator().manual_seed(s))
                                   / dd ** 0.5), K_exact, a, cfg) for s in seeds]
        rows.append({"method": "materialise + dense JL", "d": dd, "time_s": med / frac if dd == d else float("nan"),
                     "peak_mib": mem / 2**20 if dd == d else float("nan"),
                     **{k: statistics.mean(e[k] for e in errs) for k in errs[0]}})
    print(f"SALT frontier: {args.model}, one demo batch of {B} rollouts, {len(tok['y'])} scored tokens, V = {V}, "
          f"H = {H}; exact PR = {C.participation_ratio(K_exact):.2f}; errors: mean of {len(seeds)} seeds")
    print(f"{'method':24} {'d':>9} {'median s':>9} {'peak MiB':>9} {'Gram err':>9} {'cos err':>8} {'PR':>6} "
          f"{'PR err':>7} {'a′ err':>7}")
    for r in rows:
        print(f"{r['method']:24} {r['d']:9d} {r['time_s']:9.3f} {r['peak_mib']:9.0f} {r['gram_err']:9.4f} "
              f"{r['cos_err']:8.4f} {r['pr']:6.2f} {r['pr_err']:7.4f} {r['a_err']:7.4f}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# SPICE: accuracy-vs-cost frontier of the per-sample gradient features (LoRA and last:N layer sets)
# ----------------------------------------------------------------------------------------------------------

def _hwm_reset():
    """Return freed heap to the OS, then reset the peak-RSS counter, so VmHWM − VmRSS is this call's peak."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss("VmRSS:")


def _frontier_row(name, d, times, mem, F, K_exact, picks_exact, k):
    import spice_select as S

    K = C.gram(F)
    off = ~torch.eye(len(K), dtype=torch.bool)
    cos, cos_x = C.cosine_matrix(K), C.cosine_matrix(K_exact)
    pr, pr_x = C.participation_ratio(K), C.participation_ratio(K_exact)
    picks = set(S.spice_select(F, k).indices)
    return {"method": name, "d": d, "median_s": statistics.median(times), "runs_s": times, "peak_mib": mem / 2**20,
            "gram_err": float((K - K_exact).norm() / K_exact.norm()),
            "cos_err": float((cos - cos_x)[off].pow(2).mean().sqrt()),  # RMS over off-diagonal cosines
            "pr_err": abs(pr - pr_x) / pr_x, "jaccard": len(picks & picks_exact) / len(picks | picks_exact)}


def spice_frontier(args) -> list[dict]:
    """SPICE features on SmolLM2 (16 × 128 tokens) for the LoRA (r = 8, q,k,v,o,gate,up,down) and last:N sets:
    exact (batched), CountSketch d ∈ sketch_dims, Kronecker k ∈ kron_ks, per-sample loop + dense JL (d = 1024).
    Errors are against the exact per-sample Gram (the loop's gradients); Jaccard compares SPICE's picks
    (spice_select, k of 16, α = 1, λ = 0.1) with the picks on exact features."""
    import spice_select as S
    from peft import LoraConfig, get_peft_model

    rows = []
    base, tok = H.load_model(args.model, dtype=torch.float32)
    ids, am, lm = batch(tok)
    torch.manual_seed(0)  # peft draws lora_A from the global RNG
    lora = get_peft_model(H.load_model(args.model, dtype=torch.float32)[0], LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], init_lora_weights=False))  # B ≠ 0: ∂/∂A carries signal
    for set_name, model, spec in [("lora", lora, "lora"), (args.last, base, args.last)]:
        model.eval().requires_grad_(False)
        layers = C.select_linear_layers(model, spec)
        D = sum(m.weight.numel() for m in layers.values())
        for p in R.linear_params(layers).values():  # the loop differentiates these; the Featurizer never reads .grad
            p.requires_grad_(True)
        h0 = _hwm_reset()
        t = time.perf_counter()
        G = R.exact_per_sample_grads(model, R.linear_params(layers), ids, am, lm, reduction="mean")
        t_loop, mem_loop = time.perf_counter() - t, _rss("VmHWM:") - h0
        K_exact = C.gram(G)
        picks_exact = set(S.spice_select(G, args.picks).indices)

        def run(name, d, fn, reps):  # no warm-up: the loop above ran the same model code first
            times, mem, F = [], 0, None
            for _ in range(reps):
                h0 = _hwm_reset()
                t = time.perf_counter()
                F = fn()
                times.append(time.perf_counter() - t)
                mem = max(mem, _rss("VmHWM:") - h0)
            rows.append({"layers": set_name, "D": D, **_frontier_row(name, d, times, mem, F, K_exact, picks_exact,
                                                                      args.picks)})
            print(_fmt(rows[-1]), flush=True)

        fzs = [("exact", C.Featurizer(model, spec, None, None, reduction="mean"))]
        fzs += [(f"sketch d={d}", C.Featurizer(model, spec, reduction="mean", sketch_dim=d)) for d in args.sketch_dims]
        fzs += [(f"kronecker k={k}", C.Featurizer(model, spec, k, k, reduction="mean")) for k in args.kron_ks]
        for name, f in fzs:  # projections drawn at construction (CountSketch: on the first call, ~0.1 s)
            run(name, f.dim, lambda f=f: f(ids, am, lm), args.repeats)
        h0 = _hwm_reset()
        t = time.perf_counter()
        F = R.dense_jl(G, args.dense_d)
        t_jl = time.perf_counter() - t
        rows.append({"layers": set_name, "D": D, **_frontier_row(
            "loop + dense JL", args.dense_d, [t_loop + t_jl], max(mem_loop, _rss("VmHWM:") - h0), F, K_exact,
            picks_exact, args.picks)})
        print(_fmt(rows[-1]), flush=True)
        del G
    return rows


def _fmt(r):
    return (f"{r['layers']:7} {r['method']:18} {r['d']:>8} {r['median_s']:9.2f} {r['peak_mib']:9.0f} "
            f"{r['gram_err']:9.4f} {r['cos_err']:8.4f} {r['pr_err']:7.4f} {r['jaccard']:7.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--consumer", default="both", choices=["salt", "spice", "both"])
    ap.add_argument("--jl_fraction", type=float, default=1 / 16, help="SALT: share of the vocabulary the "
                    "materialise + dense JL timing runs on (scaled up; its cost is linear in it)")
    ap.add_argument("--sketch_dims", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384])
    ap.add_argument("--kron_ks", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64])
    ap.add_argument("--dense_d", type=int, default=1024, help="SPICE: dense JL dimension of the loop baseline")
    ap.add_argument("--last", default="last:4", help="SPICE: the second layer set")
    ap.add_argument("--picks", type=int, default=4, help="SPICE picks of the 16 rows for the Jaccard column")
    ap.add_argument("--json", default="", help="write the frontier rows to this file")
    ap.add_argument("--model", default=H.EMBEDDED, help="the model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, small sizes, one repeat (seconds)")
    args = ap.parse_args()
    if args.smoke:
        global B, T
        B, T = 4, 24
        args.model, args.repeats, args.picks, args.dense_d = H.TINY, 1, 2, 64
        args.sketch_dims, args.kron_ks, args.jl_fraction, args.last = [64, 256, 1024], [4], 1.0, "last:1"
    out = {}
    if args.consumer in ("salt", "both"):
        out["salt"] = salt_frontier(args)
    if args.consumer in ("spice", "both"):
        print(f"SPICE features, {args.model} fp32, {B} rows × {T} tokens (mean loss over the last {T - T // 4}); "
              f"{torch.get_num_threads()} threads; median of {args.repeats}; peak = VmHWM growth in-process")
        print(f"{'layers':7} {'method':18} {'d':>8} {'median s':>9} {'peak MiB':>9} {'Gram err':>9} {'cos err':>8} "
              f"{'PR err':>7} {'Jaccard':>7}")
        out["spice"] = spice_frontier(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
