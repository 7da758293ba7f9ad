"""Unit tests of salt_grpo.py's math: SALT (salt.md §5.1, properties 1–13), GRPO advantages and loss, the task,
the answer checker and config validation. Pure tensors; float64 where the math is tested."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import common

import harness
import reference
import salt_grpo as sg
from common import UserError
from data import arithmetic


def cfg(**kw):  # the demo's settings; datasets written here use GSM8K's `question` column
    return dataclasses.replace(sg.demo_config(prompt_column="question"), **kw)


def rand_feats(B, D, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(B, D, generator=g, dtype=torch.float64)
    return torch.randn(B, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, D, generator=g, dtype=torch.float64)


def grpo_adv(B, G, seed):
    g = torch.Generator().manual_seed(seed)
    r = (torch.rand(B, generator=g) < 0.4).double()
    r[:G] = torch.tensor([1.0] + [0.0] * (G - 1), dtype=torch.float64)  # at least one mixed group
    return sg.group_advantages(r, G, "group", 1e-6)


def K_of(F):
    return common.gram(F) / F.shape[0]


def numpy_salt(K, a, rho=1.0, k_min=1, k_max=64, amin=0.0, amax=1.0, relu=True):
    """An independent NumPy transcription of the released rule (salt.md §1.3–1.6)."""
    K, a = np.asarray(K, float), np.asarray(a, float)
    B = len(a)
    pr = np.trace(K) ** 2 / (np.sum(K * K) + 1e-30)
    k = max(k_min, min(int(round(rho * pr)), k_max, B - 1))
    w, V = np.linalg.eigh(K)
    P = V[:, -k:] @ V[:, -k:].T
    neff = a @ K @ a / (np.sum(a * a * np.diag(K)) + 1e-30)
    alpha = min(max(1 - neff, amin), amax)
    phi = np.maximum(a, 0) if relu else a
    return P @ a + alpha * (phi - P @ phi), k, neff, alpha


# --- the released rule, checked against an independent transcription ---------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_official_rule_matches_independent_numpy(seed):
    F = rand_feats(16, 6, seed, rank=5) + 0.05 * rand_feats(16, 6, seed + 100)
    a = grpo_adv(16, 4, seed)
    K = K_of(F)
    a_new, d = sg.salt_reweight(K, a, cfg())
    ref, k, neff, alpha = numpy_salt(K.numpy(), a.numpy())
    assert d["k"] == k and math.isclose(d["neff"], neff, rel_tol=1e-9) and math.isclose(d["alpha"], alpha, abs_tol=1e-12)
    assert np.allclose(a_new.numpy(), ref, atol=1e-10)


# 1. off switch ------------------------------------------------------------------------------------------

def test_1_off_leaves_advantages_bit_identical():
    F, a = rand_feats(12, 8, 0), grpo_adv(12, 4, 0)
    a_new, d = sg.salt_reweight(K_of(F), a, cfg(salt="off"))
    assert torch.equal(a_new, a) and d["skipped"] == 1.0


# 2. identity preset -------------------------------------------------------------------------------------

@pytest.mark.parametrize("B", [1, 2, 3, 8, 33])
@pytest.mark.parametrize("rho,k_max", [(1.0, 64), (0.3, 2), (3.0, 64)])
def test_2_identity_gives_a_exactly(B, rho, k_max):
    F = rand_feats(B, 5, B)
    a = torch.randn(B, generator=torch.Generator().manual_seed(B), dtype=torch.float64)
    a_new, _ = sg.salt_reweight(K_of(F), a, cfg(salt="identity", salt_rho=rho, salt_k_max=k_max))
    assert (a_new - a).abs().max() <= 1e-12


def test_2_official_default_is_not_grpo_even_at_alpha_one():
    """relu on: α = 1 still differs from GRPO (salt.md §3.2)."""
    F, a = rand_feats(12, 4, 1), grpo_adv(12, 4, 1)
    a_new, _ = sg.salt_reweight(K_of(F), a, cfg(salt_alpha_min=1.0, salt_alpha_max=1.0))
    assert (a_new - a).abs().max() > 1e-3


# 3. projector -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 7])
def test_3_projector_properties(k):
    K = K_of(rand_feats(10, 6, k))
    P, _ = sg.top_eigenspace(K, k)
    assert torch.allclose(P, P.T, atol=1e-12) and torch.allclose(P @ P, P, atol=1e-10)
    assert math.isclose(float(torch.trace(P)), k, abs_tol=1e-10)
    a = grpo_adv(10, 5, k)
    a_dom, a_tail = P @ a, (torch.eye(10, dtype=torch.float64) - P) @ a.clamp(min=0)
    assert abs(float(a_dom @ a_tail)) < 1e-10
    # P spans the top-k eigenvectors: K P = P K and tr(K P) = the sum of the k largest eigenvalues
    assert math.isclose(float(torch.trace(K @ P)), float(torch.linalg.eigvalsh(K)[-k:].sum()), rel_tol=1e-9)
    _, d = sg.salt_reweight(K, a, cfg())
    assert math.isclose(d["main_contrib_ratio"] + d["exp_contrib_ratio"], 1.0, abs_tol=1e-12)


# 4. k rule ----------------------------------------------------------------------------------------------

def test_4_k_rule():
    a = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    g = rand_feats(1, 4, 0)
    _, d = sg.salt_reweight(K_of(g.expand(6, 4).clone()), a, cfg(salt_k_min=2))  # rank one
    assert math.isclose(d["participation_ratio"], 1.0, rel_tol=1e-9) and d["k"] == 2
    _, d = sg.salt_reweight(3.0 * torch.eye(6, dtype=torch.float64), a, cfg())   # isotropic
    assert math.isclose(d["participation_ratio"], 6.0, rel_tol=1e-12) and d["k"] == 5
    _, d = sg.salt_reweight(3.0 * torch.eye(6, dtype=torch.float64), a, cfg(salt_k_max=3))
    assert d["k"] == 3
    _, d = sg.salt_reweight(K_of(rand_feats(2, 5, 3)), a[:2], cfg())
    assert d["k"] == 1
    one = torch.tensor([0.7], dtype=torch.float64)
    out, d = sg.salt_reweight(torch.ones(1, 1, dtype=torch.float64), one, cfg())
    assert torch.equal(out, one) and d["skipped"] == 1.0
    # ρ scales k with Python rounding: PR = 6 → ρ=0.25 gives round(1.5) = 2, ρ=0.75 gives round(4.5) = 4
    assert sg.subspace_size(6.0, 10, rho=0.25, k_min=1, k_max=64) == 2
    assert sg.subspace_size(6.0, 10, rho=0.75, k_min=1, k_max=64) == 4
    assert sg.subspace_size(6.0, 10, rho=0.5, k_min=1, k_max=64) == 3
    assert sg.subspace_size(0.2, 10, rho=1.0, k_min=1, k_max=64) == 1


# 5. PR bounds and scale invariance ----------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 3, 6])
def test_5_pr_bounds_and_scale(rank):
    K = K_of(rand_feats(12, 20, rank, rank=rank))
    a = grpo_adv(12, 4, rank)
    _, d1 = sg.salt_reweight(K, a, cfg())
    _, d2 = sg.salt_reweight(37.5 * K, a, cfg())
    assert 1 - 1e-9 <= d1["participation_ratio"] <= rank + 1e-9
    assert math.isclose(d1["participation_ratio"], d2["participation_ratio"], rel_tol=1e-12)


# 6. n_eff -----------------------------------------------------------------------------------------------

def test_6_neff_formula_range_and_limits():
    F, a = rand_feats(16, 9, 4), grpo_adv(16, 4, 4)
    _, d = sg.salt_reweight(K_of(F), a, cfg())
    assert math.isclose(d["neff"], reference.signed_neff_direct(F, a), rel_tol=1e-9)
    assert 0 <= d["neff"] <= 16
    # identical features, zero-sum a: complete cancellation → n_eff = 0, α = α_max
    same = rand_feats(1, 5, 5).expand(4, 5).clone()
    z = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    _, d = sg.salt_reweight(K_of(same), z, cfg(salt_alpha_max=0.8))
    assert abs(d["neff"]) < 1e-12 and d["alpha"] == 0.8
    # mutually orthogonal features → n_eff = 1, α = α_min = 0
    _, d = sg.salt_reweight(K_of(torch.eye(4, 7, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])),
                            z, cfg())
    assert math.isclose(d["neff"], 1.0, rel_tol=1e-12) and d["alpha"] == 0.0
    # identical signed updates a_i g_i → n_eff = B
    pos = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    G = rand_feats(1, 5, 6) / pos[:, None]
    _, d = sg.salt_reweight(K_of(G), pos, cfg())
    assert math.isclose(d["neff"], 4.0, rel_tol=1e-9)


# 7. α range ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_7_alpha_in_bounds(seed):
    F, a = rand_feats(12, 3 + seed, seed, rank=2 + seed % 3), grpo_adv(12, 3, seed)
    c = cfg(salt_alpha_min=0.1, salt_alpha_max=0.6)
    _, d = sg.salt_reweight(K_of(F), a, c)
    assert 0.1 <= d["alpha"] <= 0.6


# 8. invariances ------------------------------------------------------------------------------------------

def test_8_invariances():
    F, a = rand_feats(12, 10, 8, rank=4) + 0.1 * rand_feats(12, 10, 9), grpo_adv(12, 4, 8)
    base, _ = sg.salt_reweight(K_of(F), a, cfg())
    scaled, _ = sg.salt_reweight(K_of(5.0 * F), a, cfg())
    Q, _ = torch.linalg.qr(rand_feats(10, 10, 10))
    rotated, _ = sg.salt_reweight(K_of(F @ Q), a, cfg())
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    permuted, _ = sg.salt_reweight(K_of(F[perm]), a[perm], cfg())
    homog, _ = sg.salt_reweight(K_of(F), 2.5 * a, cfg())
    tail = cfg(salt_alpha_min=0.5)  # keep the tail channel on, where relu acts
    pos, neg = sg.salt_reweight(K_of(F), a, tail)[0], sg.salt_reweight(K_of(F), -a, tail)[0]
    assert torch.allclose(scaled, base, atol=1e-10) and torch.allclose(rotated, base, atol=1e-10)
    assert torch.allclose(permuted, base[perm], atol=1e-10)
    assert torch.allclose(homog, 2.5 * base, atol=1e-10)
    assert not torch.allclose(neg, -pos, atol=1e-3)  # relu: not odd in a


# 9. zero advantages -------------------------------------------------------------------------------------

def test_9_zero_advantage_behaviour():
    F = rand_feats(8, 6, 11)
    zero = torch.zeros(8, dtype=torch.float64)
    out, d = sg.salt_reweight(K_of(F), zero, cfg())
    assert torch.equal(out, zero) and d["skipped"] == 1.0
    # a zero-variance group sharing the scope with a mixed group may receive non-zero a′ (faithful; §1.8)
    shared = rand_feats(2, 6, 12)
    F2 = torch.cat([shared[0].expand(4, 6), shared[1].expand(4, 6)]) + 0.3 * rand_feats(8, 6, 13)
    a = sg.group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.float64), 4, "group", 1e-6)
    out, d = sg.salt_reweight(K_of(F2), a, cfg(salt_alpha_min=1.0))
    assert torch.all(a[4:] == 0) and out[4:].abs().max() > 1e-6 and d["zero_adv_mass"] > 0


# 10. projection consistency -------------------------------------------------------------------------------

def test_10_orthogonal_projection_is_exact_and_jl_error_shrinks():
    F, a = rand_feats(24, 40, 14, rank=5), grpo_adv(24, 4, 14)
    exact, _ = sg.salt_reweight(K_of(F), a, cfg())
    Q, _ = torch.linalg.qr(rand_feats(40, 40, 15))
    assert torch.allclose(sg.salt_reweight(K_of(F @ Q), a, cfg())[0], exact, atol=1e-10)
    # JL on structured low-rank features with clear eigengaps: the error of a′ falls as d grows
    g = torch.Generator().manual_seed(16)
    U = torch.linalg.qr(torch.randn(24, 4, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(2048, 4, generator=g, dtype=torch.float64))[0]
    F = U @ torch.diag(torch.tensor([40.0, 20.0, 10.0, 5.0], dtype=torch.float64)) @ V.T
    exact, _ = sg.salt_reweight(K_of(F), a, cfg())
    errs = {}
    for d in (32, 1024):
        e = []
        for s in range(5):
            Fp = reference.dense_jl(F.float(), d, seed=s).double()
            e.append(float((sg.salt_reweight(K_of(Fp), a, cfg())[0] - exact).norm() / exact.norm()))
        errs[d] = float(np.median(e))
    assert errs[1024] < errs[32] and errs[1024] < 0.1


# 11. token broadcast round trip -----------------------------------------------------------------------------

def per_sample_advantage(A_tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official collapse of token advantages to one per rollout: a_i = Σ_t A_it m_it / max(1, Σ_t m_it)."""
    m = mask.to(A_tok.dtype)
    return (A_tok * m).sum(1) / m.sum(1).clamp(min=1)


def test_11_broadcast_round_trip():
    a = torch.tensor([0.3, -1.2, 2.0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.allclose(per_sample_advantage(sg.broadcast_advantage(a, mask), mask), a)


# 12. fp32 vs fp64 ---------------------------------------------------------------------------------------

def test_12_fp32_matches_fp64_on_well_conditioned_K():
    U = torch.linalg.qr(rand_feats(16, 16, 17))[0]
    K = U @ torch.diag(torch.linspace(10.0, 0.5, 16, dtype=torch.float64)) @ U.T
    a = grpo_adv(16, 4, 17)
    a64, d64 = sg.salt_reweight(K, a, cfg())
    a32, d32 = sg.salt_reweight(K.float(), a.float(), cfg())
    assert d64["k"] == d32["k"] and (a32.double() - a64).abs().max() < 1e-4


# 13. determinism ----------------------------------------------------------------------------------------

def test_13_determinism_of_projection_and_reweighting():
    model, _ = harness.tiny_llama(seed=0)
    def proj(seed):  # the projection pair of the first layer of a `layers` feature (salt_features=kronecker: dropped)
        spec = sg.FeatureSpec(model, cfg(salt_features="layers", salt_layers="last:1", salt_k_out=8, salt_k_in=4,
                                         seed=seed))
        return next(iter(spec.featurizer.projector.mats.values()))
    (o1, i1), (o2, i2) = proj(0), proj(0)
    assert torch.equal(o1, o2) and torch.equal(i1, i2)
    assert not torch.equal(o1, proj(1)[0])
    F, a = rand_feats(12, 7, 18), grpo_adv(12, 4, 18)
    assert torch.equal(sg.salt_reweight(K_of(F), a, cfg())[0], sg.salt_reweight(K_of(F), a, cfg())[0])
    r = [sg.salt_reweight(K_of(F), a, cfg(salt="random_subspace"), torch.Generator().manual_seed(3))[0] for _ in "ab"]
    assert torch.equal(r[0], r[1])


# --- the research controls -------------------------------------------------------------------------------

def test_controls_random_subspace_and_amplify():
    F, a = rand_feats(16, 12, 19, rank=4) + 0.05 * rand_feats(16, 12, 20), grpo_adv(16, 4, 19)
    off, d0 = sg.salt_reweight(K_of(F), a, cfg())
    rnd, d1 = sg.salt_reweight(K_of(F), a, cfg(salt="random_subspace"), torch.Generator().manual_seed(0))
    assert d0["k"] == d1["k"] and not torch.allclose(off, rnd, atol=1e-3)
    lam0, _ = sg.salt_reweight(K_of(F), a, cfg(salt="amplify", salt_lambda=0.0))
    assert torch.allclose(lam0, a, atol=1e-12)  # λ = 0 is GRPO
    amp, d = sg.salt_reweight(K_of(F), a, cfg(salt="amplify", salt_lambda=2.0))
    assert math.isclose(float(amp.norm()), float(a.norm()), rel_tol=1e-12)  # renormalised to ‖a‖
    assert d["alpha"] == 1.0 + 2.0 * min(max(d["cancellation"], 0.0), 1.0)


def test_positive_only_control_is_recentred_relu_per_group():
    G = 4
    r = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.float64)
    a = sg.group_advantages(r, G, "group", 1e-6)
    F = rand_feats(16, 6, 22)
    out, d = sg.salt_reweight(K_of(F), a, cfg(salt="positive_only", num_generations=G))
    pos = a.clamp(min=0).view(-1, G)
    assert torch.allclose(out, (pos - pos.mean(1, keepdim=True)).flatten(), atol=1e-15)
    assert torch.allclose(out.view(-1, G).sum(1), torch.zeros(4, dtype=torch.float64), atol=1e-12)  # zero-sum groups
    # binary rewards: a⁺ − mean a⁺ = (1 − p)·a in each group (p = the group's success rate); K plays no part
    p = r.view(-1, G).mean(1, keepdim=True)
    assert torch.allclose(out, ((1 - p) * a.view(-1, G)).flatten(), atol=1e-12)
    same, _ = sg.salt_reweight(K_of(rand_feats(16, 6, 23)), a, cfg(salt="positive_only", num_generations=G))
    assert torch.equal(out, same) and math.isnan(d["alpha"]) and d["neff_after"] >= 0
    with pytest.raises(UserError, match="whole groups"):
        sg.validate(cfg(salt="positive_only", salt_scope="micro"))


def test_mass_kept_and_within_group_cos_diagnostics():
    """pos/neg_mass_kept = Σ_{a_i ≷ 0} (P a)_i / Σ_{a_i ≷ 0} a_i by hand; identity keeps all of it; cos_within_abs is
    the mean |cos| over same-group pairs (groups of G consecutive rows) and NaN when the rows are not whole groups."""
    F, a = rand_feats(12, 5, 3, rank=4), grpo_adv(12, 4, 3)
    K = K_of(F)
    _, d = sg.salt_reweight(K, a, cfg(num_generations=4))
    ref, k, _, alpha = numpy_salt(K.numpy(), a.numpy())
    w, V = np.linalg.eigh(K.numpy())
    Pa = V[:, -k:] @ V[:, -k:].T @ a.numpy()
    pos, neg = a.numpy() > 0, a.numpy() < 0
    assert d["pos_mass_kept"] == pytest.approx(Pa[pos].sum() / a.numpy()[pos].sum(), abs=1e-12)
    assert d["neg_mass_kept"] == pytest.approx(Pa[neg].sum() / a.numpy()[neg].sum(), abs=1e-12)
    assert d["pos_mass_after"] == pytest.approx(ref[pos].sum() / a.numpy()[pos].sum(), abs=1e-12)
    C = np.abs(sg.common.cosine_matrix(K).numpy())
    want = np.mean([C[i, j] for i in range(12) for j in range(12) if i != j and i // 4 == j // 4])
    assert d["cos_within_abs"] == pytest.approx(want, abs=1e-12)
    _, d = sg.salt_reweight(K, a, cfg(num_generations=4, salt="identity"))
    assert d["pos_mass_after"] == pytest.approx(1.0) and d["neg_mass_after"] == pytest.approx(1.0)
    assert math.isnan(sg.salt_reweight(K, a, cfg(num_generations=5))[1]["cos_within_abs"])


def test_renorm_std_matches_official_normalize_final():
    F, a = rand_feats(12, 5, 21), grpo_adv(12, 4, 21)
    plain, _ = sg.salt_reweight(K_of(F), a, cfg())
    out, _ = sg.salt_reweight(K_of(F), a, cfg(salt_renorm="std"))
    assert math.isclose(float(out.std()), float(a.std()), rel_tol=1e-12)
    assert torch.allclose(out, plain * a.std() / plain.std(), atol=1e-12)


def test_salt_errors_are_raised():
    with pytest.raises(ValueError):
        sg.salt_reweight(torch.eye(3), torch.ones(4), cfg())
    with pytest.raises(FloatingPointError):
        sg.salt_reweight(torch.full((2, 2), float("nan")), torch.ones(2), cfg())


# --- GRPO advantages and loss by hand --------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = sg.group_advantages(r, 4, "group", 1e-4)
    s = math.sqrt(1 / 3)  # Bessel std of [1, 0, 0, 1]
    exp = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    assert torch.allclose(a, torch.tensor(exp, dtype=torch.float64), atol=1e-12)
    sb = float(r.double().std())  # batch std
    ab = sg.group_advantages(r, 4, "batch", 0.0)
    assert torch.allclose(ab, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64) / sb)
    an = sg.group_advantages(r, 4, "none")
    assert torch.allclose(an, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64))


def test_clipped_loss_and_aggregation_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    old = torch.tensor([[-1.5, -2.0, -0.2], [-0.3, -0.2, 0.0]])
    ref = torch.tensor([[-1.2, -1.8, -0.5], [-0.1, -0.7, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    c = cfg(epsilon=0.2, epsilon_high=0.28, beta=0.1)
    per_tok, st = sg.clipped_policy_loss(logp, old, adv, mask, c, ref)
    exp = torch.zeros(2, 3)
    for i in range(2):
        for t in range(3):
            r = math.exp(logp[i, t] - old[i, t])
            A = float(adv[i])
            surr = min(r * A, min(max(r, 0.8), 1.28) * A)
            d = float(ref[i, t] - logp[i, t])
            exp[i, t] = -surr + 0.1 * (math.exp(d) - d - 1)
    assert torch.allclose(per_tok * mask, exp * mask, atol=1e-6)  # padding positions carry no loss
    # ratios: e^0.5 = 1.65 > 1.28 with A > 0 (high clip); e^-0.5 = 0.61 < 0.8 with A < 0 (low clip)
    assert float(st["clip_high"]) == 1 and float(st["clip_low"]) == 1
    m = mask.float()
    tok_sum = float((exp * m).sum())
    assert math.isclose(float(sg.aggregate_loss(per_tok, mask, "dapo", 2, 5, 3, 1)), tok_sum / 5, rel_tol=1e-6)
    seq = float(((exp * m).sum(1) / m.sum(1)).sum() / 2)
    assert math.isclose(float(sg.aggregate_loss(per_tok, mask, "grpo", 2, 5, 3, 1)), seq, rel_tol=1e-6)
    assert math.isclose(float(sg.aggregate_loss(per_tok, mask, "dr_grpo", 2, 5, 3, 1)), tok_sum / (2 * 3), rel_tol=1e-6)


# --- task, checker, config -----------------------------------------------------------------------------

def test_answer_checker_and_garbage():
    assert arithmetic.extract_final_number("so 3 + 4 = 7.") == 7.0
    assert arithmetic.extract_final_number("step 12 ... #### 1,234") == 1234.0
    assert arithmetic.extract_final_number("-5 is it") == -5.0
    for junk in ["", "no digits here", "\x00\xff", None, 42, "1e999999 __import__('os')"]:
        r = arithmetic.reward_fn(junk, 7.0)
        assert r in (0.0, 1.0)
    assert arithmetic.reward_fn("The answer is 7", 7.0) == 1.0 and arithmetic.reward_fn("7 or 8", 7.0) == 0.0
    assert arithmetic.reward_fn("__import__('os').system('true') or 7", 7.0) == 1.0  # parsed, never evaluated


def test_builtin_task_is_seeded_and_held_out_is_disjoint():
    task = dict(min_terms=2, max_terms=3, digits=1, word_frac=0.3)
    tr = arithmetic.arithmetic_task(300, seed=0, held_out_split=False, **task)
    ev = arithmetic.arithmetic_task(50, seed=0, held_out_split=True, **task)
    assert tr == arithmetic.arithmetic_task(300, seed=0, held_out_split=False, **task)
    assert tr != arithmetic.arithmetic_task(300, seed=1, held_out_split=False, **task)
    nums = lambda rows: {tuple(int(x) for x in __import__("re").findall(r"\d+", r["prompt"])) for r in rows}
    assert not nums(tr) & nums(ev)
    for r in tr[:50] + ev:
        assert sum(int(x) for x in __import__("re").findall(r"\d+", r["prompt"])) == r["answer"]
    assert any("How many" in r["prompt"] for r in tr) and any(r["prompt"].startswith("What is") for r in tr)


def test_committed_task_files_are_the_generators_output(tmp_path):
    c = dict(arithmetic.COMMITTED)
    for new in arithmetic.write(tmp_path, c.pop("seed"), c.pop("train_size"), c.pop("test_size"), **c):
        assert new.read_bytes() == (arithmetic.FOLDER / new.name).read_bytes(), f"rerun python -m data.arithmetic"


def test_builtin_task_rows_are_the_generators_through_the_loader():
    for c in (cfg(), cfg(seed=1, task_size=40, eval_size=9, task_max_terms=3, task_word_frac=0.5)):
        kw = dict(min_terms=c.task_min_terms, max_terms=c.task_max_terms, digits=c.task_digits,
                  word_frac=c.task_word_frac)
        for rows, want in zip(sg.load_rows(c), (arithmetic.arithmetic_task(c.task_size, c.seed, False, **kw),
                                                arithmetic.arithmetic_task(c.eval_size, c.seed, True, **kw))):
            assert [(r["prompt"], arithmetic.extract_final_number(r["answer"])) for r in rows] == \
                [(w["prompt"], w["answer"]) for w in want]


def test_prompts_for_round_covers_epochs_without_repeats():
    seen = []
    for r in range(5):
        seen += harness.prompts_for_round(10, 4, r, seed=3)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_validation_errors():
    with pytest.raises(UserError, match="num_generations=1"):
        sg.validate(cfg(num_generations=1))
    with pytest.raises(UserError, match="not divisible"):
        sg.validate(cfg(prompts_per_step=3), num_processes=2)
    with pytest.raises(UserError, match="salt="):
        sg.validate(cfg(salt="bogus"))


def test_dataset_rows_errors_name_file_row_field(tmp_path):
    good = tmp_path / "gsm.jsonl"
    good.write_text(json.dumps({"question": "2+2?", "answer": "think... #### 4"}) + "\n" +
                    json.dumps({"question": "3+3?", "answer": "#### 6"}) + "\n" * 2 +
                    json.dumps({"question": "1+1?", "answer": 2}) + "\n")
    tr, ev = sg.load_rows(cfg(dataset=str(good), eval_size=1))
    assert sorted(arithmetic.extract_final_number(r["answer"]) for r in tr + ev) == [2.0, 4.0, 6.0]
    assert {r["prompt"] for r in tr + ev} == {"2+2?", "3+3?", "1+1?"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl row 2: missing field 'answer'"):
        sg.load_rows(cfg(dataset=str(bad), eval_size=0))
    with pytest.raises(UserError, match=r"missing field 'prompt_text'"):
        sg.load_rows(cfg(dataset=str(good), prompt_column="prompt_text", eval_size=1))
    junk = tmp_path / "junk.jsonl"
    junk.write_text(json.dumps({"question": "2+2?", "answer": "four"}) + "\n")
    with pytest.raises(UserError, match=r"junk.jsonl row 1: field 'answer' holds no number"):
        sg.load_rows(cfg(dataset=str(junk), eval_size=0))
    tr, ev = sg.load_rows(cfg(dataset=str(good), eval_dataset=str(good), eval_size=2))
    assert len(tr) == 3 and len(ev) == 2
    with pytest.raises(UserError, match="does not apply to the local file"):
        sg.load_rows(cfg(dataset=str(good), eval_split="test"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "2+2?", "answer": "4"}\n{"question": \n')
    with pytest.raises(UserError, match=r"broken.jsonl row 2: invalid JSON"):
        sg.load_rows(cfg(dataset=str(broken), eval_size=0))


def test_config_file_and_cli_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: smoke\nnum_generations: 6\nsalt: identity\n")
    c = sg.parse_config(["--config", str(f), "--salt", "amplify"])
    assert c.model == harness.TINY and c.num_generations == 6 and c.salt == "amplify"
    f.write_text("num_generation: 6\n")
    with pytest.raises(UserError, match="unknown field"):
        sg.parse_config(["--config", str(f)])


def test_report_to_tensorboard_without_it_installed_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed")
    with pytest.raises(UserError, match="tensorboard is not installed"):
        sg.build(cfg(**dict(sg.PRESETS["smoke"], report_to="tensorboard", output_dir=str(tmp_path))))


def test_gumbel_sampler_matches_softmax_and_top_p():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([int(harness.GumbelSampler([g], 1.0, 1.0)(None, z).argmax()) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.03)
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([int(harness.GumbelSampler([g], 1.0, 0.6)(None, z).argmax()) for _ in range(2000)])
    freq = torch.bincount(draws, minlength=4).double() / 2000  # nucleus {0, 1}, renormalised to 5/8, 3/8
    assert freq[2:].sum() == 0 and abs(float(freq[0]) - 0.625) < 0.04
