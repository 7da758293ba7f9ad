"""experiments/salt_attribution.py (issue 25, part 1): its --smoke command, and its two SALT modes on hand batches:
`signmass` keeps exactly the per-sign mass of the released rule's P a, `cosine` is the released rule on the
unit-diagonal Gram (the rule itself on a Gram that already has one, and blind to row rescaling K → DKD)."""
import math

import pytest
import torch

import harness
import salt_grpo as sg
from experiments import salt_attribution as exp


def cfg(**kw):
    return sg.Config(**{**dict(model="tiny", salt_scope="micro", micro_batch_size=4), **kw})


def gram(B=6, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(B, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, B, dtype=torch.float64)[:, None]
    return F @ F.T / B


def test_modes_registered_and_accepted_by_the_config():
    assert sg.SALT_MODES["signmass"] is exp.signmass and sg.SALT_MODES["cosine"] is exp.cosine
    for mode in ("signmass", "cosine"):
        c = cfg(salt=mode)
        assert c.salt == mode
        harness.check_config(c)  # `salt` has choices=SALT_MODES


def test_signmass_keeps_the_rules_mass_per_sign_exactly():
    K = gram()
    a = torch.tensor([1.2, -0.4, 0.7, -1.1, 0.0, -0.4], dtype=torch.float64)
    c = cfg(salt="signmass")
    a_new, terms = exp.signmass(K, a, c)
    _, ref = sg.salt_rule(K, a, **sg.rule_constants(c))
    pos, neg = a > 0, a < 0
    kept_pos = float(ref["a_dom"][pos].sum() / a[pos].sum())
    kept_neg = float(ref["a_dom"][neg].sum() / a[neg].sum())
    assert terms["kept_pos"] == kept_pos and terms["kept_neg"] == kept_neg
    assert torch.equal(a_new.clamp(min=0), a.clamp(min=0) * kept_pos)  # a′⁺ = kept_pos · a⁺ exactly
    assert torch.equal(a_new.clamp(max=0), a.clamp(max=0) * kept_neg)
    assert a_new[4] == 0 and kept_pos != kept_neg
    # through salt_reweight: the logged kept mass of a′ is the rule's P a's
    out, diag = sg.salt_reweight(K, a, c)
    assert torch.equal(out, a_new)
    assert math.isclose(diag["pos_mass_after"], kept_pos, rel_tol=1e-12)
    assert math.isclose(diag["pos_mass_kept"], kept_pos, rel_tol=1e-12)
    assert math.isclose(diag["neg_mass_after"], kept_neg, rel_tol=1e-12)


def test_signmass_with_one_sign_only():
    K = gram(B=4)
    a = torch.tensor([0.5, 0.0, 1.5, 0.0], dtype=torch.float64)
    a_new, terms = exp.signmass(K, a, cfg(salt="signmass"))
    assert terms["kept_neg"] == 1.0 and torch.isfinite(a_new).all()
    assert torch.equal(a_new, a * terms["kept_pos"])


def test_cosine_is_the_rule_on_a_unit_diagonal_gram():
    K = gram()
    C = exp.unit_diagonal(K)
    assert torch.allclose(torch.diagonal(C), torch.ones(6, dtype=torch.float64), atol=1e-15)
    C.fill_diagonal_(1.0)  # exactly 1 (the division leaves the last bit)
    a = torch.tensor([1.0, -0.5, 0.3, -0.9, 0.6, -0.5], dtype=torch.float64)
    c = cfg(salt="cosine")
    got, _ = exp.cosine(C, a, c)
    want, _ = sg.official(C, a, c)
    assert torch.equal(got, want)  # already unit diagonal: the rule itself
    # invariant to K → D K D (row rescaling), D positive diagonal
    D = torch.diag(torch.tensor([0.1, 3.0, 1.7, 0.4, 8.0, 1.0], dtype=torch.float64))
    scaled, _ = exp.cosine(D @ K @ D, a, c)
    base, _ = exp.cosine(K, a, c)
    assert torch.allclose(scaled, base, atol=1e-10)
    # and not the rule on K itself (row norms differ here)
    assert not torch.allclose(base, sg.official(K, a, c)[0], atol=1e-6)


def test_cosine_guards_a_zero_row():
    K = gram(B=4)
    K[2, :] = 0
    K[:, 2] = 0
    C = exp.unit_diagonal(K)
    assert torch.isfinite(C).all() and C[2].abs().sum() == 0
    a = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    a_new, _ = exp.cosine(K, a, cfg(salt="cosine"))
    assert torch.isfinite(a_new).all()


def test_smoke_command(tmp_path):
    res = exp.main(["--smoke", "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")])
    assert [r["arm"] for r in res["runs"]] == ["grpo", "micro4", "signmass", "cosine"]
    assert (tmp_path / "out/results.json").exists() and (tmp_path / "out/attribution.png").stat().st_size > 10_000
    by = {r["arm"]: r for r in res["runs"]}
    assert not any("salt/alpha" in m for m in by["grpo"]["trace"])
    for arm in ("micro4", "signmass", "cosine"):
        steps = [m for m in by[arm]["trace"] if "salt/B" in m]
        assert steps and all(m["salt/B"] == 4 for m in steps)
        assert all(k in steps[0] for k in ("salt/kii_pos_over_neg", "salt/pii_pos", "salt/pos_mass_kept"))
    s = res["summary"]
    assert s["cosine"]["auc_minus_grpo"]["n"] == 1 and "auc_minus_micro4" in s["signmass"]
    assert set(s["decisions"]) >= {"D1", "D2", "D3"}
    # the cache: a second call reads every run back
    again = exp.main(["--smoke", "--out", str(tmp_path / "out2"), "--cache_dir", str(tmp_path / "cache")])
    assert [r["eval_end"] for r in again["runs"]] == [r["eval_end"] for r in res["runs"]]


@pytest.mark.parametrize("n", [3])
def test_false_positive_rate_is_reported(n):
    from experiments.shared import false_positive_rate
    assert 0.15 < false_positive_rate(n) < 0.2
