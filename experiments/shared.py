"""What the experiment scripts share: the repository root, the command line, the statistics and the verdict rule."""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Sequence

import torch

import common

import harness

ROOT = Path(__file__).resolve().parents[1]


def results_dir(name: str, smoke: bool) -> Path:
    """An experiment's default output folder: docs/results/NAME, but outputs/experiments-smoke/NAME for --smoke,
    so that a smoke run never overwrites the published results."""
    return ROOT / ("outputs/experiments-smoke" if smoke else "docs/results") / name


def experiment_args(name: str, doc: str, argv: list[str] | None, smoke: str | None = None, cache_dir: bool = False,
                    **flags: dict) -> argparse.Namespace:
    """Parse an experiment's command line: --out, --smoke (its help: `smoke`), --cache_dir when the script caches
    under a folder the user may move (default outputs/experiments), then one `--FLAG` per `flags` entry, built from
    its add_argument keywords. args.out defaults to results_dir, so a --smoke run never overwrites the
    published results; errors are one-line UserErrors (harness.ArgParser)."""
    ap = harness.ArgParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, help=f"default: docs/results/{name}; with --smoke "
                    f"outputs/experiments-smoke/{name} (never the published results)")
    ap.add_argument("--smoke", action="store_true", help=smoke)
    if cache_dir:
        ap.add_argument("--cache_dir", type=Path, default=ROOT / "outputs/experiments")
    for flag, kw in flags.items():
        ap.add_argument(f"--{flag}", **kw)
    args = ap.parse_args(argv)
    args.out = args.out or results_dir(name, args.smoke)
    return args


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display is needed), imported only when a script plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Three mean/std recipes, not one: each experiment's published numbers were computed with its own, and their sums
# round differently (exact fsum, torch's pairwise sum, a plain loop), so merging them would move the last digits.

def mean_std(xs: list[float]) -> dict:
    """Mean, sample std and n; NaN (a batch with no mixed group, a quantity an arm lacks) is left out of all three.
    The SALT experiments' statistic."""
    xs = [x for x in xs if x == x]
    return {"mean": statistics.fmean(xs) if xs else float("nan"),
            "std": statistics.stdev(xs) if len(xs) > 1 else float("nan"), "n": len(xs)}


def finite_mean_std(xs: list) -> dict:
    """Mean and sample std (ddof = 1) of the finite values; None / NaN / inf are dropped and n counts the rest.
    Experiments 4 and 5 (spice_decay, spice_selectors)."""
    xs = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(xs) > 1 else 0.0, "n": len(xs)}


def mean_std_pair(xs: list[float]) -> tuple[float, float]:
    """(mean, sample std), std 0 for one value. Experiments 6, 10 and 11 (spice_downstream and those built on it)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def mean_or_nan(xs: list[float]) -> float:
    """The mean of xs, NaN when there is none (a statistic a run never logged)."""
    return statistics.fmean(xs) if xs else float("nan")


def series(run: dict, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged statistic in a salt_grpo run's trace, the steps that logged it."""
    pts = [(m["step"], m[key]) for m in run["trace"] if key in m and m[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def step_mean(run: dict, key: str) -> float:
    """The mean of a per-step statistic over a run, NaN when it was never logged."""
    return mean_or_nan(series(run, key)[1])


def verdict(d: float, se: float) -> str:
    """The pre-registered reading of a difference d with standard error SE: better if d > 2·SE, worse if
    d < −2·SE, else no detectable difference (always the last when SE is NaN: one seed)."""
    return "better" if d > 2 * se else "worse" if d < -2 * se else "no detectable difference"


def paired(xs: list[float]) -> dict:
    """Mean, std, n of paired differences (one per seed), SE = std/√n, the verdict, how many are positive, and the
    paired t-test: t = mean/SE on n − 1 degrees of freedom, two-sided p (NaN for n < 2 or SE = 0)."""
    d = mean_std(xs)
    se = d["std"] / d["n"] ** 0.5 if d["n"] > 1 else float("nan")
    t = d["mean"] / se if d["n"] > 1 and se > 0 else float("nan")
    return {**d, "se": se, "outcome": verdict(d["mean"], se), "n_positive": sum(x > 0 for x in xs),
            "t": t, "p_value": t_test_p(t, d["n"] - 1)}


def t_test_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with df degrees of freedom: P(|T| ≥ |t|) = I_{df/(df+t²)}(df/2, 1/2), the
    regularised incomplete beta function (evaluated by its continued fraction; no SciPy in the requirements)."""
    if not math.isfinite(t) or df < 1:
        return float("nan")
    return _betainc(df / 2, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (Numerical Recipes §6.4), using the symmetry for x > (a+1)/(a+b+2)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def false_positive_rate(n: int) -> float:
    """P(|mean| > 2·SE) under a null of paired differences ~ N(0, σ²) at n seeds: P(|T_{n−1}| > 2)."""
    return t_test_p(2.0, n - 1)


# ---- geometry only the experiments read ----

def group_geometry(K: torch.Tensor, a: torch.Tensor, groups: Sequence[int] | torch.Tensor) -> dict[str, float]:
    """Within- and across-group statistics of a Gram K (B × B) with advantages a and group ids (one per row).

    cos_within: mean pairwise cosine within a group (r_in without clipping); cos_within_pos: negatives clipped at 0
    (the official code's r_in); cos_within_abs: mean |cosine| (the signed mean is ≈ 0 whatever the geometry, by the
    score identity E[∇log π] = 0); cos_across: mean cosine between the groups' mean features (r_out without
    clipping); neff_within / pr_within: mean over groups of the group's n_eff / participation ratio.
    """
    groups = torch.as_tensor(groups)
    C = common.cosine_matrix(K)
    ids = groups.unique().tolist()
    within, within_pos, within_abs, neffs, prs = [], [], [], [], []
    for g in ids:
        idx = (groups == g).nonzero().flatten()
        if len(idx) >= 2:
            off = C[idx][:, idx][~torch.eye(len(idx), dtype=torch.bool)]
            within.append(off.mean())
            within_pos.append(off.clamp(min=0).mean())
            within_abs.append(off.abs().mean())
        Kg = K[idx][:, idx]
        if (a[idx] != 0).any():
            neffs.append(common.signed_neff(Kg, a[idx]))
        if torch.trace(Kg) > 0:
            prs.append(common.participation_ratio(Kg))
    onehot = torch.stack([(groups == g).to(K.dtype) for g in ids])  # (P, B)
    means = onehot / onehot.sum(1, keepdim=True)
    Cm = common.cosine_matrix(means @ K @ means.T)  # cosines of the groups' mean features
    across = Cm[~torch.eye(len(ids), dtype=torch.bool)] if len(ids) >= 2 else torch.zeros(0)

    def mean(xs):
        return float(torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in xs]).mean()) if xs else math.nan

    return {"cos_within": mean(within), "cos_within_pos": mean(within_pos), "cos_within_abs": mean(within_abs),
            "cos_across": float(across.mean()) if across.numel() else math.nan,
            "neff_within": mean(neffs), "pr_within": mean(prs)}
