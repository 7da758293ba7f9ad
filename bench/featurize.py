"""Per-sample gradient features: accuracy against cost on the embedded SmolLM2-135M (fp32), in one run.

SPICE (`spice_frontier`): 16 sequences × 128 tokens, for the LoRA adapters of q,k,v,o,gate,up,down (r = 8, the
official code's parameter set, 2.4 M parameters) and every Linear of the last 4 blocks (14.2 M): exact per-sample
gradients (one batched forward + backward), CountSketch at d ∈ {1k, 4k, 16k}, Kronecker at k ∈ {16, 32, 64},
and the per-sample backward loop + dense Gaussian JL (LESS, the official SPICE code). Printed: median time, peak
memory, Gram relative Frobenius error, RMS off-diagonal cosine error, participation-ratio error, and the Jaccard of
SPICE's picks (4 of 16) against the picks on exact features.

    python bench/featurize.py [--repeats 3] [--json FILE]
"""
import argparse
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

B, T = 16, 128


def batch(tok, seed=0):
    """16 random token sequences of 128 tokens; the first 32 are an unscored prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, len(tok) - 100, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    lm = am.clone()
    lm[:, :32] = 0
    return ids, am, lm


def _rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


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
    base, tok = C.load_model(C.EMBEDDED, dtype=torch.float32)
    ids, am, lm = batch(tok)
    torch.manual_seed(0)  # peft draws lora_A from the global RNG
    lora = get_peft_model(C.load_model(C.EMBEDDED, dtype=torch.float32)[0], LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], init_lora_weights=False))  # B ≠ 0: ∂/∂A carries signal
    for set_name, model, spec in [("lora", lora, "lora"), (args.last, base, args.last)]:
        model.eval().requires_grad_(False)
        layers = C.select_linear_layers(model, spec)
        D = sum(m.weight.numel() for m in layers.values())
        for p in C.linear_params(layers).values():  # the loop differentiates these; the Featurizer never reads .grad
            p.requires_grad_(True)
        h0 = _hwm_reset()
        t = time.perf_counter()
        G = C.exact_per_sample_grads(model, C.linear_params(layers), ids, am, lm, reduction="mean")
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
        F = C.dense_jl(G, args.dense_d)
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
    ap.add_argument("--sketch_dims", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384])
    ap.add_argument("--kron_ks", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64])
    ap.add_argument("--dense_d", type=int, default=1024, help="dense JL dimension of the loop baseline")
    ap.add_argument("--last", default="last:4", help="the second layer set")
    ap.add_argument("--picks", type=int, default=4, help="SPICE picks of the 16 rows for the Jaccard column")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    print(f"SPICE features, SmolLM2-135M fp32, {B} rows × {T} tokens (mean loss over the last {T - 32}); "
          f"{torch.get_num_threads()} threads; median of {args.repeats}; peak = VmHWM growth in-process")
    print(f"{'layers':7} {'method':18} {'d':>8} {'median s':>9} {'peak MiB':>9} {'Gram err':>9} {'cos err':>8} "
          f"{'PR err':>7} {'Jaccard':>7}")
    rows = spice_frontier(args)
    if args.json:
        C.write_json(args.json, {"spice": rows})


if __name__ == "__main__":
    main()
