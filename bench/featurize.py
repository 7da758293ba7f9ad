"""Per-sample gradient features: factored projection (ours) vs per-sample loop + dense projection (LESS, SPICE code).

On the embedded SmolLM2-135M, 16 sequences × 128 tokens, gradients of every Linear layer of the last 4 blocks
(14.2 M parameters). Both methods produce features of the same dimension d (plus one factored row at 4× k,
16× the dimension, to show what a larger k buys). Printed, side by side in one run:
median wall time of each and their ratio, peak memory (RSS growth in a fresh child process), and how well each
feature Gram matrix matches the exact per-sample-gradient Gram (Pearson r over entries, relative Frobenius error
of the Gram and of the cosine matrix).

    python bench/featurize.py [--repeats 3] [--k 8] [--dtypes fp32,bf16] [--no-memory]
"""
import argparse
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=8, help="rows of P_out and P_in per layer (d = 28·k²)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    args = ap.parse_args()

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
