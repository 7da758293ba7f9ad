"""Speed of spice_select's exact greedy against submodlib's LogDeterminantFunction, on identical features.

Features: n × d standard normal rows, L2-normalised; kernel K = X Xᵀ. submodlib maximises log det(K_S + λI) with
λ = 1, which is U(S) = log det(I + α Σ_S g gᵀ) with α = 1, so the objectives are the same function. We compare
objective values (≤ 1e-6 relative on the same set; greedy paths can part at near-ties, which the bench
locates and reports), and print time ratios measured side by
side in this run (medians of --reps).

    python bench/spice_speed.py                      # (5000, 500, 256) and (20000, 2000, 1024)
    python bench/spice_speed.py --cases large        # n=100000, d=1024, k=10000: time and peak memory (ours)
    python bench/spice_speed.py --cases small --naive  # also submodlib NaiveGreedy (slow: O(n·k²) with set copies)

submodlib is an optional bench dependency (`pip install submodlib-py`, wheels for Python ≤ 3.12), never in
requirements.txt; without it only our timings are printed. The official wrapper hands the dense kernel to C++
as a Python list of lists (`K.tolist()`, ~13 GB at n = 20000), so above --wrapper_max_n the same C++ class is
built from the NumPy array directly; both hand-overs are timed and counted as submodlib's cost.
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import spice_select as S  # noqa: E402

CASES = {"small": (5000, 500, 256), "medium": (20000, 2000, 1024), "large": (100000, 10000, 1024)}


def features(n: int, d: int, seed: int = 0, norms: str = "varied") -> torch.Tensor:
    """Gaussian rows, L2-normalised; `varied` then rescales row i by a log-uniform factor in [0.5, 2].

    With unit norms every first gain is log 2 and most later ones are near-ties, so two exact greedy runs
    that compare gains at different precisions part at pick 1; varied norms keep the paths comparable.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X = X / X.norm(dim=1, keepdim=True)
    if norms == "varied":
        X = X * torch.exp(torch.empty(n, 1).uniform_(math.log(0.5), math.log(2.0), generator=g))
    return X


def timed(fn, reps: int):
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def submodlib_runs(X: torch.Tensor, k: int, reps: int, naive: bool, wrapper_max_n: int) -> dict:
    try:
        import numpy as np
        import submodlib_cpp
        from submodlib import LogDeterminantFunction
    except ImportError:
        return {}
    n = X.shape[0]
    t = time.perf_counter()
    K = (X @ X.T).double().numpy()  # the kernel submodlib needs (ours never forms it in feature form)
    t_kernel = time.perf_counter() - t
    t = time.perf_counter()
    if n <= wrapper_max_n:
        f = LogDeterminantFunction(n=n, mode="dense", lambdaVal=1.0, sijs=K)
        handover = "wrapper (K.tolist())"
    else:  # same C++ object, NumPy array handed to pybind11 directly
        f = LogDeterminantFunction.__new__(LogDeterminantFunction)
        f.n, f.cpp_obj = n, submodlib_cpp.LogDeterminant(n, np.ascontiguousarray(K), False, {-1}, 1.0)
        f.effective_ground = f.cpp_obj.getEffectiveGroundSet()
        handover = "direct C++ constructor"
    t_ctor = time.perf_counter() - t
    out = {"kernel_s": t_kernel, "ctor_s": t_ctor, "handover": handover}
    opts = ["LazyGreedy"] + (["NaiveGreedy"] if naive else [])
    for opt in opts:
        sec, res = timed(lambda: f.maximize(budget=k, optimizer=opt, stopIfZeroGain=False, stopIfNegativeGain=False,
                                            show_progress=False), reps if opt == "LazyGreedy" else 1)
        idx = [int(i) for i, _ in res]
        out[opt] = {"seconds": sec, "objective": S.log_det(X[idx], 1.0), "sum_gains": sum(g for _, g in res),
                    "indices": idx}
    del K
    return out


def divergence(X: torch.Tensor, ours: list[int], theirs: list[int]) -> str:
    """Where two greedy paths part, and whether that step was a near-tie of exact gains (then the
    objectives of the two final sets may differ slightly although both are exact greedy runs)."""
    t = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if t is None:
        return "same picks in the same order"
    base = S.log_det(X[ours[:t]], 1.0)
    ga, gb = S.log_det(X[ours[:t + 1]], 1.0) - base, S.log_det(X[ours[:t] + [theirs[t]]], 1.0) - base
    return (f"paths agree for {t} picks; at pick {t + 1} exact gains ours {ga:.9f} vs its {gb:.9f} "
            f"(rel. gap {abs(ga - gb) / ga:.1e}: a near-tie, its gains are float32); final sets "
            f"share {len(set(ours) & set(theirs))}/{len(ours)} rows")


def run_case(name: str, reps: int, naive: bool, wrapper_max_n: int, forms: list[str], norms: str) -> None:
    n, k, d = CASES[name]
    X = features(n, d, norms=norms)
    print(f"\n== {name}: n={n}, k={k}, d={d}  (α = λ_submodlib = 1, Gaussian features, {norms} norms)")
    if name == "large":  # one SPICE run: time and peak memory (the n × d features are the only O(n) state)
        t = time.perf_counter()
        sel = S.spice_select(X, k, alpha=1.0, lam=0.1, form="auto", progress=True)
        print(f"  ours spice λ=0.1[{sel.form}]  {time.perf_counter() - t:8.1f} s   objective {sel.log_det:.6f}   "
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        return
    ours = {}
    for form in forms:
        sec, sel = timed(lambda: S.spice_select(X, k, alpha=1.0, lam=0.0, form=form), reps)
        ours[f"greedy[{sel.form}]"] = (sec, sel.log_det)
        g_idx = sel.indices
    best = min(ours, key=lambda m: ours[m][0])
    g_sec, g_obj = ours[best]
    form = best[best.index("[") + 1:-1]
    s_sec, s_sel = timed(lambda: S.spice_select(X, k, alpha=1.0, lam=0.1, form=form), reps)
    ours[f"spice λ=0.1[{form}]"] = (s_sec, s_sel.log_det)
    for m, (sec, obj) in ours.items():
        print(f"  ours {m:<22} {sec:8.2f} s   objective {obj:.6f}")
    print(f"  ratio  SPICE(λ=0.1) / plain greedy        = {s_sec / g_sec:.2f}   (target ≤ 2)")
    print(f"  peak RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    sub = submodlib_runs(X, k, reps, naive, wrapper_max_n)
    if not sub:
        print("  submodlib not installed: `pip install submodlib-py` (Python ≤ 3.12) to compare")
        return
    print(f"  submodlib kernel K = XXᵀ {sub['kernel_s']:.2f} s, hand-over {sub['ctor_s']:.2f} s ({sub['handover']})")
    for opt in ("LazyGreedy", "NaiveGreedy"):
        if opt not in sub:
            continue
        r = sub[opt]
        rel = abs(r["objective"] - g_obj) / abs(r["objective"])
        total = r["seconds"] + sub["ctor_s"] + sub["kernel_s"]
        print(f"  submodlib {opt:<12} {r['seconds']:8.2f} s (+ kernel + hand-over = {total:.2f} s)   objective "
              f"{r['objective']:.6f} (its Σ gains {r['sum_gains']:.4f}); |ours − it| / it = {rel:.1e} "
              f"{'OK' if rel <= 1e-6 else 'ABOVE 1e-6'}")
        print(f"  ratio  submodlib {opt} incl. hand-over / ours greedy = {total / g_sec:.2f}   "
              f"(maximize alone: {r['seconds'] / g_sec:.2f}; target ≥ 2 for LazyGreedy)")
        print("    " + divergence(X, g_idx, r["indices"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="small,medium", help="comma list of small, medium, large")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--naive", action="store_true", help="also time submodlib NaiveGreedy (small case: ~25 s)")
    ap.add_argument("--forms", default="auto", help="our gain engines to time: auto or kernel,feature")
    ap.add_argument("--norms", default="varied", choices=["varied", "unit"], help="row norms (see features)")
    ap.add_argument("--wrapper_max_n", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: submodlib's greedy is "
                                                          "single-threaded, and 2 threads spin on a busy 2-core box)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.cases.split(","):
        run_case(name.strip(), 1 if name.strip() == "large" else args.reps, args.naive, args.wrapper_max_n,
                 args.forms.split(","), args.norms)


if __name__ == "__main__":
    main()
