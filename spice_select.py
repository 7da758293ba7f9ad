"""SPICE data selection (Submodular Penalized Information–Conflict sElection, arXiv 2601.23155), one file.

Read beside the paper. Per-sample gradients g_i of the response loss on a proxy model (by default the LoRA adapters
of q,k,v,o,gate,up,down, the authors' parameter set: exact, or CountSketched to 8192 dims when the pool's exact
features would not fit --feature_memory_gb); then, greedily,

    U(S)          = log det(I + α Σ_{i∈S} g_i g_iᵀ)                              (Fisher utility)
    Δ_x(S)        = log(1 + α g_xᵀ (I + α F_S)⁻¹ g_x)                            (marginal gain)
    conflict(x|S) = max(0, −g_xᵀ ḡ / (‖g_x‖ ‖ḡ‖ + η)),  ḡ = mean of the picks   (Definition 4)
    score         = Δ_x(S) − λ · conflict(x|S)                                   (Eq. 14)

with ties to the lowest index and an optional early stop (SPICE+: stop at the first t with Δ_t ≤ ω·Δ_1). Gains are
exact and incremental: kernel-space incremental Cholesky (Chen et al. 2018) or feature-space rank-one updates, never
refactorised.

Reading order: U(S), Δ, conflict; spice_select (score, early stop); the incremental gain engines; the baselines
(random, top_norm, greedy, official_diag); the offline, pool-by-pool and online loops; the features of a pool; the
Config; main(). What a run needs that is not the method (config layer, pool reading, feature cache, outputs) is
harness.py. Guide: docs/spice.md.

    python spice_select.py                      # demo pool data/spice_pool.jsonl + embedded SmolLM2, 10 %, table
    python spice_select.py --preset smoke       # tiny random model, 64-row demo pool: seconds
    accelerate launch spice_select.py --pool data.jsonl --budget 1000 --output_dir out/
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

import common
import harness
from common import UserError
from harness import option

# ----------------------------------------------------------------------------------------------------------
# The objective: U(S), the gain Δ_x(S) and its modular part base_x (Definition 3), conflict (Definition 4)
# ----------------------------------------------------------------------------------------------------------

def log_det(G: torch.Tensor, alpha: float) -> float:
    """U(S) = log det(I_d + α G_Sᵀ G_S) = log det(I_|S| + α G_S G_Sᵀ) (Sylvester), the smaller side, float64."""
    G = G.double()
    if G.shape[0] == 0:
        return 0.0
    M = G @ G.T if G.shape[0] <= G.shape[1] else G.T @ G
    M = alpha * (M + M.T) / 2 + torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return float(2 * torch.log(torch.diagonal(torch.linalg.cholesky(M))).sum())


def marginal_gain(G_S: torch.Tensor, g_x: torch.Tensor, alpha: float) -> float:
    """Δ_x(S) = U(S ∪ {x}) − U(S) = log(1 + α g_xᵀ (I + α F_S)⁻¹ g_x), F_S = G_Sᵀ G_S (matrix determinant lemma): the
    definition, refactorised per call; the engines below give every Δ_x(S) incrementally."""
    return log_det(torch.cat([G_S, g_x[None]]), alpha) - log_det(G_S, alpha)


def base_gain(sq_norm: torch.Tensor, alpha: float) -> torch.Tensor:
    """base_x = Δ_x(∅) = log(1 + α‖g_x‖²), the modular part of the gain (Definition 3)."""
    return torch.log1p(alpha * sq_norm)


def conflict(r: torch.Tensor, norms: torch.Tensor, ss: float, m: int, eta: float) -> torch.Tensor:
    """conflict(x|S) = max(0, −Align), Align = g_xᵀḡ / (‖g_x‖‖ḡ‖ + η), ḡ = (1/|S|) Σ_S g_y (Definition 4).

    From running sums only: r_x = Σ_{y∈S} g_xᵀg_y and ss = ‖Σ_S g_y‖², so g_xᵀḡ = r_x/m and ‖ḡ‖ = √ss/m.
    Zero when S = ∅.
    """
    if m == 0:
        return torch.zeros_like(r)
    align = (r / m) / (norms * math.sqrt(max(ss, 0.0)) / m + eta)
    return (-align).clamp(min=0)


@dataclass
class Selection:
    """What every selector returns; `indices` in pick order, positions in the G it was given."""
    method: str
    indices: list[int]
    records: list[dict]  # per pick: t, index, delta, base, eps, conflict, score
    log_det: float
    stopped_early: bool = False
    form: str = ""
    seconds: float = 0.0


def sq_norms(G: torch.Tensor) -> torch.Tensor:
    """‖g_i‖² in float64, a block of rows at a time (no float64 copy of a wide G)."""
    return torch.cat([b.double().pow(2).sum(1) for b in G.split(256)]) if len(G) else G.new_zeros(0).double()


def check_features(G: torch.Tensor, k: int, alpha: float = 1.0) -> None:
    """Features the gains can use, and 1 ≤ k ≤ n. Finite entries are not enough: every Gram entry, α‖g‖² and
    ‖Σ_S g‖² ≤ n Σ‖g‖² must be finite in float64 too (features near 1e160 pass isfinite and give NaN gains)."""
    if G.ndim != 2 or G.shape[0] == 0:
        raise UserError("no candidates to select from (empty pool)")
    if not torch.isfinite(G).all():
        bad = (~torch.isfinite(G).all(1)).nonzero().flatten().tolist()
        raise UserError(f"features of rows {bad[:10]} are NaN or infinite",
                        hint="check the proxy model; try --dtype float32 or a smaller --max_length")
    sq = sq_norms(G)
    if not math.isfinite(alpha * G.shape[0] * float(sq.sum())):
        raise UserError(f"features too large for float64: α·n·Σ‖g‖² overflows (largest ‖g‖² {float(sq.max()):.3g}, "
                        f"row {int(sq.argmax())})", hint="rescale the features (U(S) depends on α·scale², so "
                                                         "dividing g by c equals α/c²)")
    if not 1 <= k <= G.shape[0]:
        raise UserError(f"budget k={k} must be between 1 and the number of candidates ({G.shape[0]})")
    if 0 < alpha * float(sq.max()) < 1e-12:
        raise UserError(f"--alpha {alpha:g}: α·max‖g‖² = {alpha * float(sq.max()):.3g}, so 1 + α‖g‖² rounds to 1 and "
                        "every gain to about 0: the picks would be the first rows, not the most informative",
                        hint="raise --alpha (U(S) depends on α·‖g‖² only)")


def spice_select(G: torch.Tensor, k: int, alpha: float = 1.0, lam: float = 0.1, eta: float = 1e-8,
                 omega: Optional[float] = None, form: str = "auto", progress: bool = False,
                 method: str = "") -> Selection:
    """Greedy SPICE: at each step pick argmax_x Δ_x(S) − λ·conflict(x|S) (Eq. 14), ties to the lowest index.

    λ = 0 is plain log-det (Fisher) greedy. With ω set (SPICE+), stop at the first t > 1 with
    Δ_{x_t} ≤ ω·Δ_{x_1}; x_t is not kept (as the official half-life check; the paper leaves it open).
    The gains are exact (float64), so Σ_t Δ_t = log det(I + αF_S) whatever λ is. form: the gain engine,
    `auto`/`kernel`/`feature` (exact) or `official_diag` (the official code's surrogate, a baseline).
    """
    t0 = time.perf_counter()
    check_features(G, k, alpha)
    n, d = G.shape
    form = choose_form(n, d, k, form)
    if form == "kernel" and 8 * n * n < 4e9:  # the float64 Gram alone: no float64 copy of G (D = 2.4 M for LoRA)
        engine = KernelGains(G, alpha, k)
        sq = torch.diagonal(engine.K).clone()
    else:
        G = G.double()
        engine = (OfficialDiagGains(G, alpha) if form == "official_diag" else FeatureGains(G, alpha)
                  if form == "feature" else KernelGains(G, alpha, k, precompute=False))
        sq = (G * G).sum(1)
    norms, base = sq.sqrt(), base_gain(sq, alpha)
    r, ss = torch.zeros(n, dtype=torch.float64, device=G.device), 0.0  # Σ_S g_xᵀg_y, ‖Σ_S g_y‖²
    taken = torch.zeros(n, dtype=torch.bool, device=G.device)
    picks, records, stopped = [], [], False
    for t in tqdm(range(k), desc=method or "select", disable=not progress, leave=False):
        delta = engine.gains()
        conflicts = conflict(r, norms, ss, len(picks), eta)
        score = (delta - lam * conflicts).masked_fill(taken, -math.inf)
        j = int(torch.argmax(score))  # first maximal index: ties go to the lowest index
        if omega is not None and t > 0 and delta[j] <= omega * records[0]["delta"]:
            stopped = True
            break
        records.append({"t": t, "index": j, "delta": float(delta[j]), "base": float(base[j]),
                        "eps": float(delta[j] - base[j]), "conflict": float(conflicts[j]),
                        "score": float(score[j])})
        picks.append(j)
        taken[j] = True
        k_row = engine.row(j)
        ss += 2 * float(r[j]) + float(k_row[j])  # ‖Σ_S g + g_j‖² = ss + 2 g_jᵀΣ_S g + ‖g_j‖²
        r += k_row
        if t + 1 < k:  # no gains are read after the last pick
            engine.add(j, k_row)
    # Exact engines telescope to the log-det; the diagonal surrogate does not, so its U(S) is computed.
    u = log_det(G[picks], alpha) if form == "official_diag" else sum(rec["delta"] for rec in records)
    return Selection(method or ("greedy" if lam == 0 else "spice"), picks, records, log_det=u, stopped_early=stopped,
                     form=form, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# The exact gain engines: S → Δ_x(S) for every x, incrementally (one greedy loop serves them all)
# ----------------------------------------------------------------------------------------------------------

# A gain engine holds S: gains() → Δ_x(S) for every x, row(j) → K_j· = G g_j, add(j, K_j·) → S ∪ {j}. The exact
# kernel and feature forms and the official diagonal surrogate share it, so spice_select is one loop for all three.

class KernelGains:
    """Exact gains by incremental Cholesky of M = I + αK in kernel space (Chen et al. 2018, fast greedy MAP).

    Each candidate keeps its Cholesky row c_i and d_i² = 1 + αK_ii − ‖c_i‖² = 1 + α g_iᵀ(I + αF_S)⁻¹g_i
    (Woodbury), so Δ_i = log d_i². After picking j: e_i = (αK_ji − c_jᵀc_i)/d_j, c_i ← [c_i, e_i],
    d_i² ← d_i² − e_i². O(n·t) per pick; K rows come from a precomputed float64 Gram or from G on the fly.
    """

    def __init__(self, G: torch.Tensor, alpha: float, k: int, precompute: bool = True):
        self.G, self.alpha = G, alpha
        self.K = common.gram(G) if precompute else None
        sq = torch.diagonal(self.K).clone() if precompute else (G * G).sum(1)
        self.d2 = 1 + alpha * sq
        self.C = torch.zeros(G.shape[0], k, dtype=torch.float64, device=G.device)
        self.picked = 0  # columns of C filled

    def gains(self) -> torch.Tensor:
        return torch.log(self.d2.clamp(min=1.0))  # d_i² ≥ 1 in exact arithmetic

    def row(self, j: int) -> torch.Tensor:
        """K_j· = G g_j (n,)."""
        return self.K[j] if self.K is not None else self.G @ self.G[j]

    def add(self, j: int, k_row: torch.Tensor) -> None:
        m = self.picked
        e = (self.alpha * k_row - self.C[:, :m] @ self.C[j, :m]) / math.sqrt(self.d2[j].item())
        self.C[:, m] = e
        self.d2 = self.d2 - e * e
        self.picked += 1


class FeatureGains:
    """Exact gains by rank-one (Sherman–Morrison) updates of A⁻¹ = (I + αF_S)⁻¹ in feature space (d × d).

    q_i = g_iᵀA⁻¹g_i, Δ_i = log(1 + α q_i). After picking j, with u = A⁻¹g_j and β = 1 + α g_jᵀu:
    A⁻¹ ← A⁻¹ − α u uᵀ/β and q_i ← q_i − α (g_iᵀu)²/β. O(n·d + d²) per pick: the cheaper form when d ≪ n.
    """

    def __init__(self, G: torch.Tensor, alpha: float):
        self.G, self.alpha = G, alpha
        self.q = (G * G).sum(1)
        self.Ainv = torch.eye(G.shape[1], dtype=torch.float64, device=G.device)
        self._u = None

    def gains(self) -> torch.Tensor:
        return torch.log1p(self.alpha * self.q.clamp(min=0))

    def row(self, j: int) -> torch.Tensor:
        """K_j· and G u in one pass over G (the pass is memory bound; two vectors cost about as much as one)."""
        g = self.G[j]
        self._u = self.Ainv @ g
        both = self.G @ torch.stack([g, self._u]).T  # column-major right side: ~3× faster than a d × 2 block
        self._Gu = both[:, 1]
        return both[:, 0]

    def add(self, j: int, k_row: torch.Tensor) -> None:
        u, Gu = self._u, self._Gu
        beta = 1 + self.alpha * float(Gu[j])
        self.q = self.q - (self.alpha / beta) * Gu * Gu
        self.Ainv.addr_(u, u, alpha=-self.alpha / beta)


def choose_form(n: int, d: int, k: int, form: str = "auto") -> str:
    """The cheaper exact engine for (n candidates, d dims, k picks); both give the same gains.

    kernel: Gram n²d at BLAS speed, then O(n·t) per pick over the n × k Cholesky table;
    feature: O(n·d + d²) per pick, memory bound. The kernel form always wins when d ≥ n (the paper's regime:
    120 candidates, millions of LoRA dims); at n = 10⁵, k = 10⁴ its table alone would be 8 GB.
    Seconds modelled at ~6 GFLOP/s (BLAS, float64) and ~5 GB/s (memory-bound passes) per core.
    """
    if form != "auto":
        return form
    if d >= n:
        return "kernel"
    kernel_s = n * n * d / 6e9 + 8 * n * k * k / 2 / 5e9
    feature_s = 8 * k * (n * d + 2 * d * d) / 5e9
    return "kernel" if kernel_s < feature_s and 8 * n * (n + k) < 6e9 else "feature"


# ----------------------------------------------------------------------------------------------------------
# Baselines (same features, same outputs)
# ----------------------------------------------------------------------------------------------------------

def random_select(G: torch.Tensor, k: int, alpha: float = 1.0, seed: int = 0) -> Selection:
    """random: k rows uniformly without replacement (seeded)."""
    t0 = time.perf_counter()
    check_features(G, k, alpha)
    idx = torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(seed))[:k].tolist()
    return _fixed_selection("random", G, idx, alpha, t0)


def top_norm_select(G: torch.Tensor, k: int, alpha: float = 1.0, omega: Optional[float] = None) -> Selection:
    """top_norm: the official code's default `top_k` selector — rank by base_x = log(1 + α‖g_x‖²), i.e. by
    gradient norm, no interaction and no conflict term. With ω: keep rows with base_x > ω·max base (as there)."""
    t0 = time.perf_counter()
    check_features(G, k, alpha)
    base = base_gain(sq_norms(G), alpha)
    order = sorted(range(len(base)), key=lambda i: (-float(base[i]), i))[:k]  # ties to the lowest index
    if omega is not None:
        order = [i for i in order if base[i] > omega * base[order[0]]]
    return _fixed_selection("top_norm", G, order, alpha, t0)


class OfficialDiagGains:
    """The official code's diagonal surrogate (Chang-pw/SPICE, `fisher_mode=diag`), NOT the exact gain.

    Δ̃_x = log(1 + α Σ_j g_xj²/den_j) with den = 1 initially and den ← den + α(|g|·g)² = den + α g⁴ after each
    pick — not the diagonal of I + αF_S (that would add α g²), so Σ Δ̃ ≠ log det.
    """

    def __init__(self, G: torch.Tensor, alpha: float):
        self.G, self.G2, self.alpha = G, G * G, alpha
        self.den = torch.ones(G.shape[1], dtype=torch.float64, device=G.device)

    def gains(self) -> torch.Tensor:
        return torch.log1p(self.alpha * (self.G2 / self.den).sum(1))

    def row(self, j: int) -> torch.Tensor:
        return self.G @ self.G[j]

    def add(self, j: int, k_row: torch.Tensor) -> None:
        self.den += self.alpha * self.G2[j] ** 2


def official_diag_select(G: torch.Tensor, k: int, alpha: float = 1.0, lam: float = 0.1, eta: float = 1e-8,
                         omega: Optional[float] = None) -> Selection:
    """official_diag: Chang-pw/SPICE `greedy_select_with_conflict_penalty` with `fisher_mode=diag`.

    The same greedy loop, conflict penalty and tie-break as `spice_select`, with the gain replaced by the official
    diagonal surrogate Δ̃ (`OfficialDiagGains`). The recorded `delta` is Δ̃, `log_det` the exact U(S). The official
    function has no early stop; ω here applies the same test as spice_select, on Δ̃.
    """
    return spice_select(G, k, alpha, lam, eta, omega=omega, form="official_diag", method="official_diag")


def _fixed_selection(method: str, G: torch.Tensor, idx: list[int], alpha: float, t0: float) -> Selection:
    """Records with the exact Δ of each pick given the earlier ones (so the same analysis applies)."""
    G = G[idx].double()
    records = []
    sq = (G * G).sum(1)
    if len(idx) <= 2000:  # per-pick exact gains; beyond that only the final log-det
        engine = KernelGains(G, alpha, len(idx))
        for t, j in enumerate(idx):
            delta, base = float(engine.gains()[t]), float(base_gain(sq[t], alpha))
            records.append({"t": t, "index": j, "delta": delta, "base": base, "eps": delta - base,
                            "conflict": float("nan"), "score": float("nan")})
            if t + 1 < len(idx):
                engine.add(t, engine.row(t))
    return Selection(method, idx, records, log_det=log_det(G, alpha), seconds=time.perf_counter() - t0)


def run_method(method: str, G: torch.Tensor, k: int, cfg: Config, progress: bool = False) -> Selection:
    """One of METHODS on features G with the config's α, λ, η, ω, form and seed."""
    if method in ("spice", "greedy"):
        return spice_select(G, k, alpha=cfg.alpha, lam=cfg.lam if method == "spice" else 0.0, eta=cfg.eta,
                            omega=cfg.omega, form=cfg.form, progress=progress, method=method)
    if method == "top_norm":
        return top_norm_select(G, k, alpha=cfg.alpha, omega=cfg.omega)
    if method == "random":
        return random_select(G, k, alpha=cfg.alpha, seed=cfg.seed)
    return official_diag_select(G, k, alpha=cfg.alpha, lam=cfg.lam, eta=cfg.eta, omega=cfg.omega)


# ----------------------------------------------------------------------------------------------------------
# Diagnostics: curvature, conflict statistics
# ----------------------------------------------------------------------------------------------------------

def curvature(G: torch.Tensor, alpha: float) -> float:
    """Total curvature c = 1 − min_x Δ_x(D∖{x}) / Δ_x(∅) over the rows of G (Theorem 3; Lemma 1).

    With M = I + αK, the leave-one-out gain is Δ_x(D∖{x}) = −log[M⁻¹]_xx (matrix determinant lemma), so one
    inverse gives every x. Rows with g_x = 0 have no gain either way and are left out.
    """
    if G.shape[0] > 4000:  # n × n inverse; estimate on a deterministic subsample for large pools
        G = G[torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(0))[:4000]]
    K = common.gram(G)
    M = torch.eye(G.shape[0], dtype=torch.float64) + alpha * K
    loo = -torch.log(torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(M))))
    base = base_gain(torch.diagonal(K), alpha)
    ok = base > 1e-12
    return float(1 - (loo[ok] / base[ok]).min()) if ok.any() else 0.0


def selection_stats(sel: Selection, G: torch.Tensor, rows: list[dict] | None = None, alpha: float = 1.0) -> dict:
    """log-det, gains, conflict of the picks and, for tagged pools, corrupted / duplicate share and coverage."""
    Gs = G[sel.indices].double()
    out = {"method": sel.method, "k": len(sel.indices), "log_det": sel.log_det, "seconds": sel.seconds,
           "stopped_early": sel.stopped_early}
    if len(sel.indices):
        mean = Gs.mean(0)
        cos = Gs @ mean / (Gs.norm(dim=1) * mean.norm() + 1e-8)
        out.update(cos_to_mean=float(cos.mean()), min_cos_to_mean=float(cos.min()),
                   frac_negative_cos=float((cos < 0).double().mean()), mean_norm=float(Gs.norm(dim=1).mean()))
        out["curvature_selected"] = curvature(Gs, alpha) if len(sel.indices) > 1 else 0.0
    if rows and "family" in rows[0]:
        picked = [rows[i] for i in sel.indices]
        fams = {r["family"] for r in rows}
        out["frac_corrupted"] = sum(bool(r.get("corrupted")) for r in picked) / max(1, len(picked))
        out["frac_duplicates"] = sum(r.get("duplicate_of") is not None for r in picked) / max(1, len(picked))
        out["families_covered"] = f"{len({r['family'] for r in picked})}/{len(fams)}"
        counts = [sum(r["family"] == f for r in picked) for f in sorted(fams)]
        out["min_family_share"] = min(counts) / max(1, len(picked))
    return out


# ----------------------------------------------------------------------------------------------------------
# The selection loop: offline (the whole pool or pool by pool) and online (the proxy trains on its picks)
# ----------------------------------------------------------------------------------------------------------

def budget_count(budget: Union[int, float], n: int, what: str = "--budget", of: str = "the pool") -> int:
    """Picks out of n: a float is a fraction in (0, 1] (1.0 = all n; at least 1 pick), an int a count ≤ n —
    written `0.1` or `1.0` versus `100` or `1`, as datasets' train_test_split reads test_size."""
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise UserError(f"{what} {budget} is a fraction (written with a point) above 1",
                            hint="a fraction is at most 1.0; a count is written without a point, e.g. 100")
        return max(1, round(budget * n))
    if budget > n:
        raise UserError(f"{what} {budget} is larger than {of} ({n} rows)", hint="use a fraction, e.g. 0.1")
    return budget


def check_budget(cfg: Config, n: int) -> None:
    """--budget / --select_k against the pool, before any feature is computed (the drivers use the same rule)."""
    if cfg.mode == "offline" and (not cfg.pool_size or cfg.pool_size >= n):
        budget_count(cfg.budget, n)
        return
    if cfg.select_k is None and isinstance(cfg.budget, int):
        raise UserError(f"--budget {cfg.budget} counts rows of the whole pool; pool by pool the picks per pool are "
                        "--select_k", hint="pass --select_k (a count per pool or a fraction), or a fractional "
                                           "--budget")
    budget_count(per_pool(cfg), cfg.pool_size, "--select_k" if cfg.select_k is not None else "--budget",
                 f"--pool_size {cfg.pool_size}")


def per_pool(cfg: Config) -> Union[int, float]:
    return cfg.select_k if cfg.select_k is not None else cfg.budget


def window_quotas(sizes: list[int], per: Union[int, float], pool_size: int, seed: int) -> list[int]:
    """Picks from each window, summing to the requested budget: window w's target is per·s_w (a fraction) or
    c·s_w/pool_size (a count c per full window); each gets its target's floor, and the rest of the total
    max(1, round(Σ targets)) goes one each to the windows with the largest remainders, ties in a seeded order
    (largest remainder apportionment). A full window gets exactly its share; a window may get 0."""
    budget_count(per, pool_size, "--select_k")  # a count ≤ pool_size, or a fraction in (0, 1]
    targets = [round(per * s if isinstance(per, float) else per * s / pool_size, 9) for s in sizes]
    quotas = [math.floor(t) for t in targets]
    tie = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
    order = sorted(range(len(sizes)), key=lambda w: (quotas[w] - targets[w], tie[w]))  # largest remainder first
    for w in order[: max(1, round(sum(targets))) - sum(quotas)]:
        quotas[w] += 1
    return quotas


def pool_windows(n: int, pool_size: int, seed: int) -> list[list[int]]:
    """The official schedule: a seeded permutation of the pool cut into consecutive windows of pool_size."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[s:s + pool_size] for s in range(0, n, pool_size)]


def select_offline(G: torch.Tensor, cfg: Config, method: str, progress: bool = False) -> Selection:
    """The whole pool at once, or pool by pool (pool_size → select_k per window, F and ḡ reset per window)."""
    n = G.shape[0]
    if not cfg.pool_size or cfg.pool_size >= n:
        return run_method(method, G, budget_count(cfg.budget, n), cfg, progress)
    t0 = time.perf_counter()
    windows = pool_windows(n, cfg.pool_size, cfg.seed)
    quotas = window_quotas([len(w) for w in windows], per_pool(cfg), cfg.pool_size, cfg.seed)
    picks, records, stops = [], [], 0
    for w, win in enumerate(tqdm(windows, desc=method, disable=not progress, leave=False)):
        if not quotas[w]:
            continue
        sel = run_method(method, G[win], quotas[w], cfg)
        picks += [win[i] for i in sel.indices]
        records += [{**rec, "pool": w, "index": win[rec["index"]]} for rec in sel.records]
        stops += sel.stopped_early
    return Selection(method, picks, records, log_det=log_det(G[picks], cfg.alpha), stopped_early=stops > 0,
                     form="per-pool", seconds=time.perf_counter() - t0)


def train_proxy_step(model, opt, cfg: Config, accelerator, *, tokens, buffer: list[int], pad_id: int,
                     rng_seed: Optional[int] = None) -> float:
    """One AdamW step of the LoRA proxy on the buffer (each process its share of the rows, gradients summed).

    online_loss=mean: the mean per-sample SFT loss over the buffer. official_sum: the sum over micro-batches of
    `online_micro_batch` rows of each micro-batch's mean loss (Chang-pw/SPICE train.py sums before one step).
    rng_seed: LoRA dropout seeded per micro-batch from it (the same masks whatever the process count); None: the
    global RNG as it is.
    """
    model.train()
    opt.zero_grad(set_to_none=True)
    mb = cfg.online_micro_batch
    chunks = [buffer[s:s + mb] for s in range(0, len(buffer), mb)]
    total = torch.zeros((), device=accelerator.device)
    for j in range(accelerator.process_index, len(chunks), accelerator.num_processes):
        c = chunks[j]
        ids, am, lm = (x.to(accelerator.device) for x in collate([tokens[i] for i in c], pad_id, cfg.mask_prompt))
        seeded = (harness.seeded_rng("proxy dropout", rng_seed, j, device=accelerator.device) if rng_seed is not None
                  else contextlib.nullcontext())
        with torch.enable_grad(), seeded:
            nll = common.sequence_nll(model, ids, am, lm, cfg.reduction)
            loss = nll.sum() / len(buffer) if cfg.online_loss == "mean" else nll.mean()
            loss.backward()
        total += loss.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = accelerator.reduce(p.grad, reduction="sum")
        total = accelerator.reduce(total, reduction="sum")
    opt.step()
    model.eval()
    return float(total)


def select_online(cfg: Config, accelerator, *, model, tok, fz, tokens, method: str, logger) -> Selection:
    """The paper's online schedule: pools of pool_size, select_k picks each from features of the *current*
    proxy; every T = update_every pools one AdamW step on the buffer of picks, buffer cleared."""
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    picks, records, buffer, stops = [], [], [], 0
    windows = pool_windows(len(tokens), cfg.pool_size, cfg.seed)
    quotas = window_quotas([len(w) for w in windows], per_pool(cfg), cfg.pool_size, cfg.seed)
    for w, win in enumerate(tqdm(windows, desc=f"online {method}", disable=not accelerator.is_main_process)):
        sel = Selection(method, [], [], log_det=0.0)  # a window whose quota is 0 is not featurized
        if quotas[w]:
            G = compute_features(fz, tok, [tokens[i] for i in win], cfg, accelerator, cache=None, desc=f"pool {w}")
            sel = run_method(method, G, quotas[w], cfg) if accelerator.is_main_process else None
            sel = common.broadcast_object(accelerator, sel)
        picks += [win[i] for i in sel.indices]
        records += [{**rec, "pool": w, "index": win[rec["index"]]} for rec in sel.records]
        buffer += [win[i] for i in sel.indices]
        stops += sel.stopped_early
        logger.log({"pool_log_det": sel.log_det, "picks": len(sel.indices)}, step=w)
        if (w + 1) % cfg.update_every == 0 and buffer:
            loss = train_proxy_step(model, opt, cfg, accelerator, tokens=tokens, buffer=buffer, pad_id=tok.pad_token_id,
                                    rng_seed=cfg.seed * 100_003 + w)
            logger.log({"proxy_loss": loss, "buffer": len(buffer)}, step=w)
            buffer = []
    # U(S) of the union of picks, with features of the final proxy (gains in the records are per pool)
    G_final = compute_features(fz, tok, [tokens[i] for i in picks], cfg, accelerator, cache=None, desc="final")
    return Selection(method, picks, records, log_det=log_det(G_final, cfg.alpha), stopped_early=stops > 0,
                     form="online", seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# Features of a pool: tokens with the loss mask, the proxy, per-sample gradients in shards (cached)
# ----------------------------------------------------------------------------------------------------------

def chat_format(cfg: Config, tok) -> bool:
    """--prompt_format resolved: chat (the tokenizer's template) or plain (the official `Instruction:/Response:`)."""
    has = bool(getattr(tok, "chat_template", None))
    if cfg.prompt_format == "chat" and not has:
        raise UserError(f"--prompt_format chat: the tokenizer of {cfg.model!r} has no chat template",
                        hint="use --prompt_format plain (or auto)")
    return cfg.prompt_format == "chat" or cfg.prompt_format == "auto" and has


def sft_pair(ex: harness.Example, chat: bool) -> tuple[Any, Any]:
    """(prompt, completion) of one example in TRL's prompt-completion format, exactly what SPICE scores: chat, a
    conversation and the assistant's reply (SFTTrainer renders them with the template and trains the reply's tokens);
    plain, the official code's text and the response (SFTTrainer appends EOS, as we do). A conversational row without
    chat falls back to role-tagged text."""
    if chat:
        msgs = ex.prompt if isinstance(ex.prompt, list) else [{"role": "user", "content": ex.prompt}]
        return list(msgs), [{"role": "assistant", "content": ex.response}]
    if isinstance(ex.prompt, list):
        return "".join(f"{m['role'].capitalize()}:\n{m['content']}\n\n" for m in ex.prompt) + "Assistant:\n", ex.response
    return f"Instruction:\n{ex.prompt}\n\nResponse:\n", ex.response  # Chang-pw/SPICE spice/data.py format


def sft_pairs(examples: list[harness.Example], tok, cfg: Config) -> list[tuple[Any, Any]]:
    """sft_pair of every example; a conversational row is rendered with the template whenever there is one."""
    chat, has = chat_format(cfg, tok), bool(getattr(tok, "chat_template", None))
    return [sft_pair(ex, chat or isinstance(ex.prompt, list) and has) for ex in examples]


def tokenize(examples: list[harness.Example], tok, cfg: Config) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example, with the loss mask TRL's SFTTrainer uses on sft_pair's
    prompt/completion (completion_only_loss): under a chat template, prompt + reply rendered together and the reply
    starting where the rendering of the prompt alone (with the generation prompt) stops matching (TRL's
    common_prefix_length); plain, prompt tokens then response tokens + EOS. At most max_length tokens: too long, the
    prompt keeps its last tokens and the response its first, so that at least half of the window (or the whole
    response) is scored (SFTTrainer cuts the right end instead; it only matters for rows over max_length).
    """
    out = []
    for ex, (prompt, completion) in zip(examples, sft_pairs(examples, tok, cfg)):
        if isinstance(prompt, list):
            try:
                p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
                full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
            except Exception as e:  # jinja2's TemplateError, or any error a template raises (a role it rejects)
                raise UserError(f"{ex.where or 'a pool row'}: the chat template of --model {cfg.model} rejects this "
                                f"conversation ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
                                hint="fix the row's roles, or use --prompt_format plain") from None
            n = common_prefix_length(p["input_ids"], full)
            p, r = full[:n], full[n:]
        else:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            r = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(p) + len(r) > cfg.max_length:
            keep_r = min(len(r), max(cfg.max_length // 2, cfg.max_length - len(p)))  # ≤ max_length
            r, p = r[:keep_r], p[len(p) - (cfg.max_length - keep_r):]
        out.append((p + r, len(p)))
    return out


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def collate(batch: list[tuple[list[int], int]], pad_id: int, mask_prompt: bool):
    """Left-padded input_ids, attention_mask and loss_mask (1 where a token is a scored target)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    am, lm = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (x, n_prompt) in enumerate(batch):
        start = width - len(x)
        ids[b, start:] = torch.tensor(x)
        am[b, start:] = 1
        lm[b, start + (n_prompt if mask_prompt else 1):] = 1  # position 0 is never a target
    return ids, am, lm


def feature_mode(cfg: Config, D: int, rows: int) -> str:
    """--features auto: exact when the rows × D float32 features held at once fit --feature_memory_gb, else sketch."""
    if cfg.features != "auto":
        return cfg.features
    return "exact" if 4 * rows * D <= cfg.feature_memory_gb * 2**30 else "sketch"


def build_proxy(cfg: Config, lora: bool, rows: int = 0):
    """The proxy model (frozen base; LoRA adapters trainable when asked), its tokenizer and the Featurizer
    (`fz.mode`: the feature mode for `rows` candidates held at once)."""
    model, tok = harness.load_model(cfg.model, cfg.dtype, cfg.trust_remote_code, seed=cfg.seed,
                                    init_kwargs=cfg.model_init_kwargs)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # auto: the checkpoint's own
    model.requires_grad_(False)  # the features need ∂ℓ/∂y of the chosen layers only, never parameter .grad
    if lora:
        targets = [name.strip() for name in cfg.lora_targets.split(",") if name.strip()]
        model = harness.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.seed, "--lora_targets")
    model.eval()  # features without dropout (the official code keeps LoRA dropout on: train mode)
    layers = cfg.layers or ("lora" if lora else "last:2")
    D = common.FactoredProjector(common.select_linear_layers(model, layers), None, None).dim  # no matrices drawn
    mode = feature_mode(cfg, D, rows)
    k_out, k_in = (cfg.k_out, cfg.k_in) if mode == "kronecker" else (None, None)
    fz = common.Featurizer(model, layers, k_out, k_in, seed=cfg.seed, reduction=cfg.reduction,
                           sketch_dim=cfg.sketch_dim if mode == "sketch" else None)
    fz.mode, fz.full_dim, fz.dtype = mode, D, dtype
    return model, tok, fz


def feature_cache_key(cfg: Config, fz, tokens: list[tuple[list[int], int]]) -> str:
    """harness.feature_cache_key over everything the features depend on: model, layers, feature mode and dims, seed,
    loss, pool tokens, batching."""
    meta = {k: getattr(cfg, k) for k in ("model", "dtype", "layers", "lora", "lora_r", "lora_alpha", "lora_targets",
                                         "seed", "reduction", "mask_prompt", "batch_size", "shard_batches")}
    # the resolved mode (auto's choice depends on the pool and the budget) and only the dims that mode reads
    meta.update(mode=fz.mode, dim=fz.dim, dtype=fz.dtype, k=[cfg.k_out, cfg.k_in] if fz.mode == "kronecker" else None)
    return harness.feature_cache_key(meta, fz.model, tokens)


def compute_features(fz, tok, tokens: list[tuple[list[int], int]], cfg: Config, accelerator,
                     cache: Optional[Path] = None, desc: str = "features"):
    """G (n × d, float32, pool order) on every process.

    Rows are sorted by length (little padding) into fixed batches and shards; shard s goes to process
    s mod P, so a row's batch — hence its features — does not depend on the number of processes. Each shard
    is written to `cache/shard_XXXXX.safetensors` once computed; a rerun loads what exists and computes the
    rest. Rows are gathered in rank order with common.gather_rows and put back in pool order.
    """
    n = len(tokens)
    order = sorted(range(n), key=lambda i: (len(tokens[i][0]), i))
    batches = [order[s:s + cfg.batch_size] for s in range(0, n, cfg.batch_size)]
    shards = [batches[s:s + cfg.shard_batches] for s in range(0, len(batches), cfg.shard_batches)]
    mine = list(range(accelerator.process_index, len(shards), accelerator.num_processes))
    device = accelerator.device
    feats, index = [], []
    bar = tqdm(total=sum(len(b) for s in mine for b in shards[s]), desc=desc, unit="row",
               disable=not accelerator.is_local_main_process, leave=False)

    def featurize(batch: list[int]) -> torch.Tensor:
        ids, am, lm = collate([tokens[i] for i in batch], tok.pad_token_id, cfg.mask_prompt)
        return fz(ids.to(device), am.to(device), lm.to(device)).float()

    for s in mine:
        idx = torch.tensor([i for b in shards[s] for i in b])
        path = cache / f"shard_{s:05d}.safetensors" if cache else None
        F = harness.load_shard(path, idx, fz.dim) if path is not None else None
        if F is None:
            F = torch.cat([featurize(b) for b in shards[s]])
            if path is not None:  # a non-finite shard is stopped by check_features, and recomputed by load_shard
                harness.save_safetensors(path, {"features": F, "index": idx})
        feats.append(F.to(device))
        index.append(idx)
        bar.update(len(idx))
    bar.close()
    F = torch.cat(feats) if feats else torch.zeros(0, fz.dim, device=device)
    idx = torch.cat(index).to(device) if index else torch.zeros(0, dtype=torch.long, device=device)
    F, idx = common.gather_rows(accelerator, F), common.gather_rows(accelerator, idx)
    G = torch.empty_like(F)
    G[idx] = F
    return G.cpu()


# ----------------------------------------------------------------------------------------------------------
# Config: the method's settings (proxy, features, selection, online loop); the run's (pool, columns, batching,
# cache, outputs) come from harness.PoolRunConfig
# ----------------------------------------------------------------------------------------------------------

METHODS = ("spice", "greedy", "top_norm", "random", "official_diag")



@dataclass
class Config(harness.PoolRunConfig):
    dtype: str = option("auto", "proxy weights dtype (TRL's ModelConfig.dtype); auto: the checkpoint's own (float32 for "
                                "the embedded model)", choices=["auto", "float32", "bfloat16", "float16"])
    seed: int = option(0, "seed of the pool order, LoRA init, projections and random baselines (the demo pool file "
                          "is one fixed draw; another: python -m data.spice_pool --seed S --out F)", ge=0, le=2**32 - 1)
    output_dir: str = option("outputs/spice", "selected.jsonl, picks.jsonl, summary.json, feature cache", path=True)
    column_prefix: str = option("spice_", "prefix of the columns selected.jsonl adds to the pool's own")
    # proxy model and features
    layers: Optional[str] = option(None, "layer spec (common.select_linear_layers); default `lora`, or `last:2` "
                                         "with --lora false")
    lora: bool = option(True, "wrap the proxy with peft LoRA; features are the adapters' gradients (official code)")
    lora_r: int = option(8, "LoRA rank", ge=1)
    lora_alpha: int = option(16, "LoRA alpha", ge=1)
    lora_dropout: float = option(0.05, "LoRA dropout (used when the proxy trains; features are taken in eval mode)",
                                 ge=0, lt=1)
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "LoRA target modules")
    features: str = option("auto", "exact per-sample gradients | sketch (CountSketch to --sketch_dim) | kronecker "
                                   "(k_out × k_in per layer) | auto: exact when rows × D × 4 bytes fit "
                                   "--feature_memory_gb, else sketch", choices=["auto", "exact", "sketch", "kronecker"])
    sketch_dim: int = option(8192, "sketch dimension d (the official projection size)", ge=1)
    feature_memory_gb: float = option(2.0, "auto: the largest exact feature block (pool or --pool_size online rows)",
                                      gt=0)
    k_out: Optional[int] = option(16, "kronecker: projection rows per layer, output side (none: unprojected)", ge=1)
    k_in: Optional[int] = option(16, "kronecker: projection rows per layer, input side (none: unprojected)", ge=1)
    reduction: str = option("mean", "per-sample loss over scored tokens: mean (SFT) or sum", choices=["mean", "sum"])
    mask_prompt: bool = option(True, "score response tokens only; false = official code (loss on the whole text)")
    prompt_format: str = option("auto", "the text scored and written to selected.jsonl's prompt/completion: auto = "
                                        "chat when the proxy's tokenizer has a template, else plain; chat = the "
                                        "template, reply tokens scored (as TRL's SFTTrainer trains prompt/completion "
                                        "rows); plain = `Instruction:\\n…\\n\\nResponse:\\n` (the official code's)",
                                choices=["auto", "chat", "plain"])
    sft_format: str = option("prompt_completion", "columns selected.jsonl adds for fine-tuning: prompt_completion "
                                                  "(TRL's prompt/completion, the text scored, and `messages`) or "
                                                  "messages (only `messages`)",
                             choices=["prompt_completion", "messages"])
    max_length: int = option(96, "tokens per row (prompt + response), longer rows are cut", ge=2)
    # selection
    method: str = option("spice", "spice | greedy (λ=0) | top_norm (official default) | random | official_diag "
                                  "(den += α·g⁴)", choices=list(METHODS))
    compare: bool = option(True, "also run every other method on the same features and print the comparison "
                                 "table (offline)")
    alpha: float = option(1.0, "α in log det(I + α F_S) (official alpha_fisher 1.0)", gt=0)
    lam: float = option(0.1, "λ, conflict weight (paper default 0.1)", ge=0)
    eta: float = option(1e-8, "η in the conflict cosine's denominator", gt=0)
    omega: Optional[float] = option(None, "SPICE+ early stop: Δ_t ≤ ω·Δ_1 (paper 0.5); off by default", ge=0, lt=1)
    budget: Union[int, float] = option(0.1, "total picks: a fraction in (0, 1] of the pool, written with a point "
                                            "(0.1; 1.0 = all rows, ranked), or a whole count (100)", gt=0)
    form: str = option("auto", "auto | kernel (incremental Cholesky) | feature (rank-one updates of (I+αF_S)⁻¹)",
                       choices=["auto", "kernel", "feature"])
    mode: str = option("offline", "offline | online (proxy trained on the picks)", choices=["offline", "online"])
    pool_size: Optional[int] = option(None, "candidates per pool (paper 120); default: the whole pool at once "
                                            "(offline)", ge=1)
    select_k: Optional[Union[int, float]] = option(None, "picks per pool: a count (paper 12 of 120) or a fraction "
                                                         "(0.1) of pool_size; default: the --budget fraction", gt=0)
    # online proxy loop (the paper's periodic selection–training schedule: an AdamW step on the buffer every T pools)
    update_every: int = option(10, "T: pools between proxy updates (paper 10)", ge=1)
    lr: float = option(2e-4, "proxy AdamW learning rate (online mode)", gt=0)
    weight_decay: float = option(0.01, "proxy AdamW weight decay", ge=0)
    online_loss: str = option("mean", "mean over the buffer | official_sum (sum of micro-batch means, as "
                                      "Chang-pw/SPICE train.py)", choices=["mean", "official_sum"])
    online_micro_batch: int = option(4, "rows per proxy forward in online mode", ge=1)


# The demo pools, written by data/spice_pool.py (seeded; its test regenerates them byte for byte).
DEMO_POOL = Path(__file__).resolve().parent / "data" / "spice_pool.jsonl"  # 500 rows, the default --pool
SMOKE_POOL = DEMO_POOL.with_name("spice_pool_smoke.jsonl")  # its first 64 rows

PRESETS = {"smoke": dict(model=harness.TINY, dtype="float32", pool=str(SMOKE_POOL), max_length=48,
                         output_dir="outputs/spice_smoke")}

# What a run of spice_select.py writes in its output folder (what --overwrite_output_dir replaces); feature_cache/
# (keyed by everything the features depend on) is kept and may be present without the flag: an interrupted run
# continues from it. The folder is the contract of harness.OutputFolder.
OWNED = ["selected.jsonl", "picks.jsonl", "summary.json", "metrics.jsonl", "spice_select"]  # spice_select: trackers


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults < --preset < --config file < CLI flags, each field checked (harness.parse_config), then combinations."""
    return check_combinations(harness.parse_config(Config, sys.argv[1:] if argv is None else argv, PRESETS))


def validate(cfg: Config) -> Config:
    """A Config built in code: every field's declared checks (harness.check_config), then combinations."""
    return check_combinations(harness.check_config(cfg))


def check_combinations(cfg: Config) -> Config:
    """The settings that cannot work together."""
    harness.check_pool_run(cfg)
    if cfg.mode == "online" and not cfg.pool_size:
        raise UserError("online mode needs --pool_size (paper: 120)")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------

def load_pool(cfg: Config) -> tuple[list[dict], list[harness.Example], str, list[dict]]:
    """harness.load_pool with the demo pool as the default --pool."""
    return harness.load_pool(cfg, DEMO_POOL)


def output_folder(cfg: Config) -> harness.OutputFolder:
    """The run's output folder; its outputs are staged and appear together (a kill never mixes two runs')."""
    inputs = [(flag, p) for flag, p in (("--pool", cfg.pool), ("--model", cfg.model)) if p and Path(p).exists()]
    return harness.OutputFolder(cfg.output_dir, overwrite=cfg.overwrite_output_dir, owned=OWNED,
                               keep=["feature_cache"], inputs=inputs, stage_always=True)


def run(cfg: Config, accelerator=None) -> dict:
    """The whole pipeline on every process; returns the summary (selection made on the main process). The
    Accelerator comes first; every check that can fail (pool, budget, columns, output paths, proxy model, LoRA
    targets, chat template) runs before the output folder is opened; the outputs appear together at the end."""
    from accelerate import Accelerator

    harness.check_trackers(harness.report_to(cfg))  # the Accelerator takes them: a bad name is our one-line error
    accelerator = accelerator or Accelerator(log_with=harness.report_to(cfg) or None, project_dir=cfg.output_dir)
    timings, t0 = {}, time.perf_counter()
    rows, examples, label, skipped = load_pool(cfg)
    check_budget(cfg, len(rows))  # every check that needs the pool, before the proxy and its features
    harness.messages_column(cfg, harness.columns(rows))  # a clash with selected.jsonl's columns: stop now
    folder = output_folder(cfg)
    harness.check_outputs(cfg, folder)
    file_index = (lambda i: label.rows[i] - 1) if getattr(label, "rows", None) else (lambda i: i)
    gone = {s["index"] for s in skipped}
    positions = [file_index(i) for i in range(len(rows) + len(skipped)) if i not in gone]  # kept row → file row − 1
    skipped = [{**s_, "index": file_index(s_["index"])} for s_ in skipped]
    lora = cfg.lora or cfg.mode == "online"
    model, tok, fz = build_proxy(cfg, lora, cfg.pool_size if cfg.mode == "online" else len(rows))
    model.to(accelerator.device)
    tokens = tokenize(examples, tok, cfg)
    pairs = sft_pairs(examples, tok, cfg) if cfg.sft_format == "prompt_completion" else None
    if pairs:
        harness.check_sft_columns(rows, examples, pairs)
    folder.open_on_all(accelerator)  # the first write: everything above has passed
    if harness.report_to(cfg):  # the trackers write in the run's folder (staged with the outputs until the commit)
        accelerator.project_configuration.project_dir = accelerator.project_configuration.logging_dir = str(folder.path)
        accelerator.init_trackers("spice_select", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                                          if isinstance(v, (int, float, str, bool))})
    try:
        return select_and_write(cfg, accelerator, folder, t0, timings, rows=rows, examples=examples, label=label,
                                skipped=skipped, positions=positions, model=model, tok=tok, fz=fz, tokens=tokens,
                                sft=pairs)
    finally:
        folder.close()


def select_and_write(cfg: Config, accelerator, folder: harness.OutputFolder, t0: float, timings: dict, *, rows,
                     examples, label, skipped, positions, model, tok, fz, tokens, sft=None) -> dict:
    timings["load"] = time.perf_counter() - t0
    summary: dict[str, Any] = {"pool": label, "n_pool": len(rows), "n_skipped": len(skipped), "skipped": skipped[:50],
                               "features": fz.mode, "feature_dim": fz.dim, "gradient_dim": fz.full_dim,
                               "layers": list(fz.layers), "config": dataclasses.asdict(cfg)}
    stats: list[dict] = []
    if cfg.mode == "online":
        t1 = time.perf_counter()
        sel = select_online(cfg, accelerator, model=model, tok=tok, fz=fz, tokens=tokens, method=cfg.method,
                            logger=harness.MetricsLogger(accelerator, folder))
        timings["online"] = time.perf_counter() - t1
    else:
        t1 = time.perf_counter()
        cache = None
        if (cfg.cache_dir or "").lower() != "none":
            key = feature_cache_key(cfg, fz, tokens)
            cache = Path(cfg.cache_dir or Path(cfg.output_dir) / "feature_cache") / key
            summary["feature_cache"] = str(cache)
        G = compute_features(fz, tok, tokens, cfg, accelerator, cache=cache)
        timings["features"] = time.perf_counter() - t1
        sel = None
        if accelerator.is_main_process:
            methods = [cfg.method] + ([m for m in METHODS if m != cfg.method] if cfg.compare else [])
            for m in methods:
                s = select_offline(G, cfg, m, progress=(m == cfg.method))
                sel = sel or s
                stats.append(selection_stats(s, G, rows, cfg.alpha))
            summary["curvature_pool"] = curvature(G, cfg.alpha)
        sel = common.broadcast_object(accelerator, sel)
        timings["selection"] = time.perf_counter() - t1 - timings["features"]
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()  # the main process writes and commits the outputs
        return {"indices": [positions[i] for i in sel.indices]}
    conf = [r["conflict"] for r in sel.records if math.isfinite(r["conflict"])]
    timings["total"] = time.perf_counter() - t0
    summary.update({
        "method": sel.method, "k": len(sel.indices), "log_det": sel.log_det, "stopped_early": sel.stopped_early,
        "form": sel.form, "indices": [positions[i] for i in sel.indices],
        "gains": [r["delta"] for r in sel.records],
        "conflict": {"mean": sum(conf) / len(conf) if conf else 0.0, "max": max(conf, default=0.0),
                     "frac_positive": sum(c > 0 for c in conf) / len(conf) if conf else 0.0},
        "comparison": stats, "timings": timings})
    if stats:
        summary["curvature_selected"] = stats[0].get("curvature_selected")
    layers = ", ".join(fz.layers)
    header = (f"\nSPICE selection from {label}: {len(rows)} rows, features {fz.mode} d={fz.dim} of D={fz.full_dim} "
              f"({layers[:60]}{'…' if len(layers) > 60 else ''}), α={cfg.alpha}, λ={cfg.lam}")
    if accelerator.trackers:  # the selection's numbers (online runs also logged each pool's)
        accelerator.log({"log_det": sel.log_det, "k": len(sel.indices), "seconds": timings["total"],
                         **{f"{st['method']}/log_det": st["log_det"] for st in stats}}, step=0)
        accelerator.end_training()
    harness.publish_selection(cfg, folder, accelerator, sel, summary, rows=rows, examples=examples,
                              positions=positions, skipped=skipped, stats=stats, header=header, sft=sft)
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(argv))


if __name__ == "__main__":
    harness.run_main(main)
