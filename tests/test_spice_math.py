"""spice_select.py: the objective and the greedy (spice.md §7.1 properties 1–15), on synthetic float64 features."""
import itertools
import math

import pytest
import torch

import spice_select as S
from common import UserError

FORMS = ["kernel", "feature"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def feats(n=40, d=12, seed=0, scale=1.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def U(G, idx, alpha=1.0):
    """Reference objective: log det(I + α G_S G_Sᵀ) by slogdet."""
    Gs = G[list(idx)].double()
    return float(torch.linalg.slogdet(torch.eye(len(idx), dtype=torch.float64) + alpha * Gs @ Gs.T)[1]) if idx else 0.0


def naive_greedy(G, k, alpha=1.0, lam=0.0, eta=1e-8):
    """Reference greedy: every gain by slogdet differences, every cosine against the explicit mean."""
    S_, n = [], G.shape[0]
    for _ in range(k):
        best, bj = -math.inf, None
        for x in range(n):
            if x in S_:
                continue
            gain = U(G, S_ + [x], alpha) - U(G, S_, alpha)
            pen = 0.0
            if S_:
                m = G[S_].mean(0)
                pen = max(0.0, -float(G[x] @ m / (G[x].norm() * m.norm() + eta)))
            if gain - lam * pen > best:  # strict: ties keep the lowest index
                best, bj = gain - lam * pen, x
        S_.append(bj)
    return S_


# 1. λ = 0 is plain log-det greedy; 2. each gain equals the slogdet difference
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_matches_naive_slogdet_greedy(form, lam):
    G = feats(30, 8, seed=1) + 0.3  # a shared direction, so the conflict term is active for some rows
    G[::3] *= -1
    sel = S.spice_select(G, 10, alpha=0.7, lam=lam, form=form)
    assert sel.indices == naive_greedy(G, 10, alpha=0.7, lam=lam)
    for t, rec in enumerate(sel.records):
        exact = U(G, sel.indices[:t + 1], 0.7) - U(G, sel.indices[:t], 0.7)
        assert abs(rec["delta"] - exact) <= 1e-9


@pytest.mark.parametrize("form", FORMS)
def test_incremental_gains_of_every_candidate_equal_slogdet_differences(form):
    G, alpha = feats(25, 10, seed=2), 0.5
    eng = S.KernelGains(G, alpha, 8) if form == "kernel" else S.FeatureGains(G, alpha)
    chosen = []
    for j in [3, 17, 0, 9, 22, 5, 11]:
        gains = eng.gains()
        ref = torch.tensor([U(G, chosen + [x], alpha) - U(G, chosen, alpha) for x in range(25)], dtype=torch.float64)
        mask = torch.ones(25, dtype=torch.bool)
        mask[chosen] = False
        assert (gains[mask] - ref[mask]).abs().max() <= 1e-9
        # the paper-form definition the engines implement, Δ_x(S) = log(1 + α g_xᵀ(I + αF_S)⁻¹g_x)
        x = next(i for i in range(25) if i not in chosen)
        Ginv = torch.linalg.inv(torch.eye(10, dtype=torch.float64) + alpha * G[chosen].T @ G[chosen])
        assert S.marginal_gain(G[chosen], G[x], alpha) == pytest.approx(
            math.log1p(alpha * float(G[x] @ Ginv @ G[x])), abs=1e-10) == pytest.approx(float(gains[x]), abs=1e-9)
        eng.add(j, eng.row(j))
        chosen.append(j)


def test_kernel_forms_agree_and_rows_on_the_fly():
    G = feats(300, 20, seed=3)
    a = S.spice_select(G, 40, lam=0.1, form="kernel")
    b = S.spice_select(G, 40, lam=0.1, form="feature")
    eng = S.KernelGains(G.double(), 1.0, 5, precompute=False)
    ref = S.KernelGains(G.double(), 1.0, 5, precompute=True)
    for j in [4, 8]:
        eng.add(j, eng.row(j))
        ref.add(j, ref.row(j))
    assert (eng.gains() - ref.gains()).abs().max() < 1e-12
    assert a.indices == b.indices and abs(a.log_det - b.log_det) < 1e-9
    assert S.choose_form(120, 4_000_000, 12) == "kernel" and S.choose_form(100_000, 1024, 10_000) == "feature"


# 3. telescoping: Σ Δ_t = log det(I + αF_S), for any λ (gains are exact along the chosen chain)
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_telescoping(lam):
    G = feats(60, 16, seed=4)
    sel = S.spice_select(G, 20, alpha=2.0, lam=lam)
    assert abs(sum(r["delta"] for r in sel.records) - U(G, sel.indices, 2.0)) <= 1e-9
    assert abs(sel.log_det - S.log_det(G[sel.indices], 2.0)) <= 1e-9
    assert abs(S.log_det(G[:5], 2.0) - U(G, range(5), 2.0)) < 1e-10  # both sides of Sylvester
    assert abs(S.log_det(G[:40], 2.0) - U(G, range(40), 2.0)) < 1e-9


# 4. decay: λ = 0 gains non-increasing; λ > 0: Δ_t ≤ Δ_1; any fixed x's gain non-increasing in S (also diag)
def test_monotone_decay():
    G = feats(80, 10, seed=5)
    d0 = [r["delta"] for r in S.spice_select(G, 30, lam=0.0).records]
    assert all(b <= a + 1e-12 for a, b in zip(d0, d0[1:]))
    d1 = [r["delta"] for r in S.spice_select(G, 30, lam=2.0).records]
    assert all(x <= d1[0] + 1e-12 for x in d1)
    eng, prev = S.FeatureGains(G, 1.0), None
    for j in range(10):
        g = eng.gains()
        assert prev is None or (g <= prev + 1e-12).all()
        prev = g
        eng.add(j, eng.row(j))


def test_official_diag_gain_of_a_fixed_row_never_grows():
    G = feats(30, 6, seed=6)
    sel = S.official_diag_select(G, 10, lam=0.0)
    den, G2 = torch.ones(6, dtype=torch.float64), G ** 2
    prev = None
    for j in sel.indices:
        g = torch.log1p((G2 / den).sum(1))
        assert prev is None or (g <= prev + 1e-15).all()
        prev = g
        den += G2[j] ** 2


# 5. ε sanity
def test_epsilon():
    G = feats(50, 8, seed=7)
    recs = S.spice_select(G, 15, lam=0.1).records
    assert recs[0]["eps"] == pytest.approx(0.0, abs=1e-12)
    assert all(r["eps"] <= 1e-12 for r in recs)
    assert all(abs(r["delta"] - r["base"] - r["eps"]) < 1e-12 for r in recs)
    # Δ_x(A) − Δ_x(B) = ε_x(A) − ε_x(B) for A ⊆ B, and ε_x is non-increasing along the chain
    x, A, B = 40, [1, 2], [1, 2, 3, 4, 5]
    base = math.log1p(float(G[x] @ G[x]))
    eA = U(G, A + [x]) - U(G, A) - base
    eB = U(G, B + [x]) - U(G, B) - base
    assert eB <= eA <= 0


# 6. first pick = largest norm, whatever λ
@pytest.mark.parametrize("lam", [0.0, 0.1, 10.0])
def test_first_pick_is_largest_norm(lam):
    G = feats(70, 9, seed=8)
    top = int(G.norm(dim=1).argmax())
    assert S.spice_select(G, 3, lam=lam).indices[0] == top
    assert S.official_diag_select(G, 3, lam=lam).indices[0] == top
    assert S.top_norm_select(G, 3).indices[0] == top


# 7. sign: Δ_g(S) = Δ_{−g}(S); the conflict term separates g from −g
def test_sign_invariance_and_conflict_prefers_aligned():
    G = feats(40, 7, seed=9)
    flip = torch.ones(40, dtype=torch.float64)
    flip[::2] = -1
    assert S.spice_select(G, 12, lam=0.0).indices == S.spice_select(G * flip[:, None], 12, lam=0.0).indices
    a = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    x = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    P = torch.stack([a, -x, x])  # −x first: λ = 0 takes it on the tie; λ > 0 takes x (cos(x, ḡ) > 0)
    assert S.spice_select(P, 2, lam=0.0).indices == [0, 1]
    sel = S.spice_select(P, 2, lam=0.1)
    assert sel.indices == [0, 2]
    assert sel.records[1]["conflict"] == 0.0


# 8. scale and rotation invariance of the exact mode; the diagonal mode is not rotation-invariant
@pytest.mark.parametrize("form", FORMS)
def test_scale_and_rotation_invariance(form):
    G = feats(60, 10, seed=10)
    ref = S.spice_select(G, 15, alpha=1.0, lam=0.2, form=form)
    scaled = S.spice_select(3.0 * G, 15, alpha=1.0 / 9.0, lam=0.2, form=form)
    Q, _ = torch.linalg.qr(feats(10, 10, seed=11))
    rotated = S.spice_select(G @ Q, 15, alpha=1.0, lam=0.2, form=form)
    assert ref.indices == scaled.indices == rotated.indices
    assert abs(ref.log_det - rotated.log_det) < 1e-9


def test_official_diag_is_not_rotation_invariant():
    differs = 0
    for seed in range(5):
        G = feats(60, 10, seed=20 + seed)
        Q, _ = torch.linalg.qr(feats(10, 10, seed=40 + seed))
        differs += S.official_diag_select(G, 15).indices != S.official_diag_select(G @ Q, 15).indices
    assert differs > 0


# 9. orthogonal gradients: ε ≡ 0, conflict ≡ 0, SPICE = top-k by norm = optimal
def test_orthogonal_rows():
    norms = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5, 1.5], dtype=torch.float64)
    G = torch.diag(norms)
    for lam in (0.0, 0.5):
        sel = S.spice_select(G, 4, lam=lam)
        assert sel.indices == S.top_norm_select(G, 4).indices == [1, 4, 2, 5]
        assert all(abs(r["eps"]) < 1e-12 and r["conflict"] == 0 for r in sel.records)
    assert S.curvature(G, 1.0) == pytest.approx(0.0, abs=1e-12)


# 10. duplicates and antipodes lose to an orthogonal row of equal norm
def test_duplicates_and_antipodes():
    g = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    h = torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    G = torch.stack([g, g.clone(), -g, h])
    sel = S.spice_select(G, 2, lam=0.0)
    assert sel.indices == [0, 3]
    eng = S.FeatureGains(G, 1.0)
    eng.add(0, eng.row(0))
    s = 4.0
    gains = eng.gains().tolist()
    assert gains[1] == pytest.approx(math.log1p(s / (1 + s)), abs=1e-12)
    assert gains[2] == pytest.approx(gains[1], abs=1e-12) and gains[1] < math.log(2)


# 11. conflict ∈ [0, 1), score ∈ [Δ − λ, Δ], conflict = 0 when cos ≥ 0
def test_conflict_range():
    G = feats(100, 5, seed=12)
    sel = S.spice_select(G, 30, lam=0.3)
    assert any(r["conflict"] > 0 for r in sel.records)
    for r in sel.records:
        assert 0 <= r["conflict"] < 1
        assert r["delta"] - 0.3 - 1e-12 <= r["score"] <= r["delta"] + 1e-12
    # running-sum conflict equals the explicit cosine against the mean of the picks
    picks = sel.indices[:7]
    m = G[picks].mean(0)
    r = G @ G[picks].sum(0)
    ss = float(G[picks].sum(0).norm() ** 2)
    cos = G @ m / (G.norm(dim=1) * m.norm() + 1e-8)
    assert torch.allclose(S.conflict(r, G.norm(dim=1), ss, 7, 1e-8), (-cos).clamp(min=0), atol=1e-12)
    assert (S.conflict(r, G.norm(dim=1), ss, 7, 1e-8)[cos >= 0] == 0).all()


# 12. early stop: a prefix of the fixed-budget run, cut at the first Δ_t ≤ ωΔ_1
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_early_stop_prefix(lam):
    G = feats(200, 6, seed=13)
    full = S.spice_select(G, 60, lam=lam)
    deltas = [r["delta"] for r in full.records]
    for omega in (0.3, 0.5, 0.8):
        es = S.spice_select(G, 60, lam=lam, omega=omega)
        stop = next(t for t in range(1, 60) if deltas[t] <= omega * deltas[0])
        assert es.indices == full.indices[:stop] and es.stopped_early
    assert len(S.spice_select(G, 60, lam=lam, omega=1.0).indices) == 1
    assert S.spice_select(G, 60, lam=lam, omega=0.0).indices == full.indices


# 13. guarantees on brute force (n ≤ 14): greedy ≥ (1 − 1/e)·OPT and ≥ ((1 − e^{−c})/c)·OPT; Lemma 1; Theorem 4
def test_brute_force_guarantees_and_curvature():
    worst = math.inf
    for seed in range(25):
        n, k = (12, 4) if seed % 2 else (14, 5)
        G = feats(n, 4, seed=100 + seed, scale=0.8)
        opt = max(U(G, list(c)) for c in itertools.combinations(range(n), k))
        got = S.spice_select(G, k, lam=0.0).log_det
        c = S.curvature(G, 1.0)
        # Lemma 1 (an equality): c = 1 − min_x Δ_x(D∖{x}) / Δ_x(∅) with explicit slogdet gains
        loo = [U(G, range(n)) - U(G, [y for y in range(n) if y != x]) for x in range(n)]
        c_ref = 1 - min(l / math.log1p(float(G[x] @ G[x])) for x, l in enumerate(loo))
        assert c == pytest.approx(c_ref, abs=1e-9)
        assert got >= (1 - 1 / math.e) * opt - 1e-9
        assert got >= (1 - math.exp(-c)) / c * opt - 1e-9
        assert got <= opt + 1e-9
        worst = min(worst, got / opt)
    assert worst > 1 - 1 / math.e


def test_theorem4_perturbation_bound():
    checked = 0
    for seed in range(200):
        G = feats(10, 6, seed=300 + seed, scale=0.15)
        alpha, Sset, x = 1.0, list(range(1, 6)), 0
        F = G[Sset].T @ G[Sset]
        rho = alpha * float(torch.linalg.matrix_norm(F, 2))
        gmax2 = float((G * G).sum(1).max())
        if not (rho < 1 and 1 - rho - alpha * gmax2 * rho > 0):
            continue
        eps = U(G, Sset + [x]) - U(G, Sset) - math.log1p(alpha * float(G[x] @ G[x]))
        bound = alpha ** 2 * float(((G[Sset] @ G[x]) ** 2).sum()) / (1 + alpha * float(G[x] @ G[x]))
        bound /= 1 - rho - alpha * gmax2 * rho
        assert abs(eps) <= bound + 1e-12
        checked += 1
    assert checked >= 50


# 14. code-compatibility selectors
def test_official_diag_and_top_norm_follow_the_code():
    g1 = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    g2 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    G = torch.stack([g1, g2])
    sel = S.official_diag_select(G, 2, alpha=0.5, lam=0.0)
    den = 1 + 0.5 * g1 ** 4  # den ← den + α(|g|g)² = 1 + α g⁴ (not α g²)
    assert sel.indices == [0, 1]
    assert sel.records[1]["delta"] == pytest.approx(math.log1p(0.5 * float((g2 ** 2 / den).sum())), abs=1e-12)
    assert sel.log_det == pytest.approx(U(G, [0, 1], 0.5), abs=1e-12)
    G = feats(30, 5, seed=14)
    assert S.top_norm_select(G, 7).indices == G.norm(dim=1).argsort(descending=True)[:7].tolist()
    eq = torch.ones(4, 2, dtype=torch.float64)  # all tied: lowest indices
    assert S.top_norm_select(eq, 2).indices == [0, 1] and S.spice_select(eq, 1).indices == [0]
    om = S.top_norm_select(G, 30, omega=0.9)
    base = torch.log1p(G.norm(dim=1) ** 2)
    assert sorted(om.indices) == sorted((base > 0.9 * base.max()).nonzero().flatten().tolist())


# 15. permuting the pool permutes the output
@pytest.mark.parametrize("form", FORMS)
def test_permutation_equivariance(form):
    G = feats(50, 8, seed=15)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    a = S.spice_select(G, 12, lam=0.1, form=form).indices
    b = S.spice_select(G[perm], 12, lam=0.1, form=form).indices
    assert [int(perm[i]) for i in b] == a


def test_not_asserting_spice_beats_greedy_but_both_beat_random():
    G = feats(200, 12, seed=16)
    g, s = S.spice_select(G, 20, lam=0.0), S.spice_select(G, 20, lam=0.1)
    r = S.random_select(G, 20, seed=0)
    assert g.log_det > r.log_det and s.log_det > r.log_det
    assert S.random_select(G, 20, seed=0).indices == r.indices != S.random_select(G, 20, seed=1).indices
    assert abs(r.log_det - U(G, r.indices)) < 1e-9
    assert abs(sum(x["delta"] for x in r.records) - r.log_det) < 1e-9  # exact per-pick gains for baselines too


# bad input
def test_bad_features_and_budgets():
    G = feats(10, 3)
    with pytest.raises(UserError, match="empty"):
        S.spice_select(torch.zeros(0, 3), 1)
    with pytest.raises(UserError, match="budget"):
        S.spice_select(G, 11)
    for fn in (S.spice_select, S.official_diag_select, S.top_norm_select, S.random_select):
        with pytest.raises(UserError, match="budget"):
            fn(G, 0)
    for bad in (float("nan"), float("inf")):
        H = G.clone()
        H[4, 1] = bad
        with pytest.raises(UserError, match=r"rows \[4\]"):
            S.spice_select(H, 2)
    assert S.budget_count(0.1, 1000) == 100 and S.budget_count(25, 1000) == 25 and S.budget_count(0.001, 10) == 1
    with pytest.raises(UserError, match="larger than the pool"):
        S.budget_count(11, 10)
    assert S.budget_count(1.0, 10) == 10 and S.budget_count(1, 10) == 1  # 1.0 is all rows, 1 is one row
    for bad in (2.5, 100.0):  # a fraction above 1: a count is written without a point
        with pytest.raises(UserError, match="fraction .* above 1"):
            S.budget_count(bad, 1000)
    Z = torch.zeros(5, 3, dtype=torch.float64)  # zero gradients: zero gains, no crash, ties to lowest index
    assert S.spice_select(Z, 3, lam=0.1).indices == [0, 1, 2]


def test_pool_by_pool_offline():
    G = feats(250, 6, seed=17)
    cfg = S.Config(pool_size=120, select_k=12, budget=0.1, method="spice")
    sel = S.select_offline(G, cfg, "spice")
    wins = S.pool_windows(250, 120, cfg.seed)
    assert [len(w) for w in wins] == [120, 120, 10]
    assert len(sel.indices) == 12 + 12 + 1 and len(set(sel.indices)) == len(sel.indices)
    assert sel.indices[:12] == [wins[0][i] for i in S.spice_select(G[wins[0]], 12).indices]  # F, ḡ reset per pool
    assert abs(sel.log_det - U(G, sel.indices)) < 1e-9
