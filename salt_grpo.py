"""SALT (arXiv 2606.05800), a plug-in to GRPO, in one file, read top to bottom beside the paper.

GRPO: for each prompt draw G completions, score them with verifiable rewards, turn the rewards into group-relative
advantages a_i = (r_i − mean_g r) / (std_g r + ε), and minimise the PPO clipped surrogate on token ratios.
SALT replaces a (one scalar per rollout) by a′, computed from the Gram K of per-rollout gradient features g_i:

    K = G Gᵀ / B,   PR = (tr K)² / ‖K‖_F²,   k = clip(round(ρ·PR), k_min, min(k_max, B − 1)),
    P = V_k V_kᵀ (the top-k eigenvectors of K),   n_eff = aᵀKa / Σ_i a_i² K_ii,   α = clip(1 − n_eff, α_min, α_max),
    a′ = P a + α (I − P) relu(a).

Everything else (reward, sampler, loss, optimizer) is GRPO's. The rule follows the authors' released code
(Chang-pw/SALT, advantage_decomposition.py); docs/salt.md maps the paper to this code and lists the deviations.

Reading order: the method (group_advantages, salt_rule, the clipped loss), the --salt modes and their diagnostics,
where a′ enters a step (per-rollout features, the Gram of a scope), rollouts, the training loop, the Config, main().
What a run needs that is not the method (config layer, data, reward functions, checkpoints, outputs) is harness.py.

    accelerate launch salt_grpo.py --preset demo      # SmolLM2-135M-Instruct, data/arithmetic, SALT `official`
    python salt_grpo.py --preset smoke                # tiny random model, seconds
    python salt_grpo.py --salt off                    # plain GRPO (the matched baseline)
    python salt_grpo.py plot outputs/salt_grpo        # draw metrics.jsonl to metrics.png
    python salt_grpo.py plot 'outputs/salt_s*' 'outputs/grpo_s*' --out salt_vs_grpo.png   # compare arms (mean ± std)
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import common
import harness
from common import UserError
from data import arithmetic
from harness import option

# ----------------------------------------------------------------------------------------------------------
# The method: group-relative advantages, the SALT rule, the clipped policy loss
# ----------------------------------------------------------------------------------------------------------

def group_advantages(r: torch.Tensor, G: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantage a_i = (r_i − mean_g r) / (std + ε), groups of G consecutive rollouts.

    std: Bessel-corrected (unbiased) std of the rollout's group (`group`), of the whole batch (`batch`, LitePPO),
    or 1 (`none`, Dr. GRPO). A group whose rewards are all equal gets advantage 0 exactly, whatever ε (ε = 0
    included; its mean can differ from its rewards in the last bit, which ε alone would turn into ±1/ε·1e-17).
    """
    if torch.isnan(r).any():
        return nan_group_advantages(r, G, scale, eps)
    g = r.double().view(-1, G)
    constant = (g == g[:, :1]).all(1, keepdim=True).expand_as(g).flatten()
    centred = (g - g.mean(1, keepdim=True)).flatten().masked_fill(constant, 0.0)
    if scale == "none":
        return centred
    std = g.std(1, keepdim=True).expand_as(g).flatten() if scale == "group" else r.double().std().expand_as(centred)
    return torch.where(constant, 0.0, centred / (std + eps))


def nan_group_advantages(r: torch.Tensor, G: int, scale: str, eps: float) -> torch.Tensor:
    """group_advantages when some rollouts have no reward (every reward function returned None, TRL's contract): they
    are left out of the group's mean and std and get advantage 0, as in TRL."""
    g = r.double().view(-1, G)
    mean = torch.nanmean(g, 1, keepdim=True)
    std = nanstd(g, 1) if scale != "batch" else nanstd(r.double().view(1, -1), 1).expand(g.shape[0], 1)
    centred = g - mean
    a = centred if scale == "none" else centred / (std + eps)
    return torch.where(torch.isclose(std, torch.zeros_like(std)).expand_as(g) | torch.isnan(g), 0.0, a).flatten()


def nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bessel-corrected std along dim over the non-NaN entries (TRL's nanstd), keepdim."""
    n = (~torch.isnan(x)).sum(dim, keepdim=True)
    var = torch.nanmean((x - torch.nanmean(x, dim, keepdim=True)) ** 2, dim, keepdim=True) * n / (n - 1).clamp(min=1)
    return var.sqrt()


def subspace_size(pr: float, B: int, rho: float, k_min: int, k_max: int) -> int:
    """k = max(k_min, min(round(ρ·PR), k_max, B − 1)) (Python's round: half to even, as the released code), ≤ B."""
    return min(B, max(k_min, min(int(round(rho * pr)), k_max, B - 1)))


def top_eigenspace(K: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P = V_k V_kᵀ, V_k the top-k eigenvectors of K, and their eigenvalues (torch.linalg.eigh: exact and
    deterministic; the official code uses lobpcg when B ≥ 3k, which is iterative)."""
    evals, evecs = torch.linalg.eigh(K)
    Vk = evecs[:, K.shape[0] - k:]
    return Vk @ Vk.T, evals[K.shape[0] - k:]


def mixing_alpha(n_eff: float, alpha_min: float, alpha_max: float) -> float:
    """α = clip(1 − n_eff, α_min, α_max): the tail channel's weight grows with signed cancellation."""
    return min(max(1.0 - n_eff, alpha_min), alpha_max)


def channels(a: torch.Tensor, P: torch.Tensor, alpha: float, phi: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """a′ = P a + α (I − P) φ(a): the dominant ("shared") channel P a plus α times the spectral-tail ("residual")
    channel (I − P) φ(a). Returns (a′, both channels)."""
    a_dom, a_tail = P @ a, (torch.eye(a.numel(), dtype=a.dtype) - P) @ phi
    return a_dom + alpha * a_tail, {"a_dom": a_dom, "a_tail": a_tail}


def salt_rule(K: torch.Tensor, a: torch.Tensor, rho: float = 1.0, k_min: int = 1, k_max: int = 64,
              alpha_min: float = 0.0, alpha_max: float = 1.0, relu: bool = True) -> tuple[torch.Tensor, dict]:
    """SALT's a′ from the Gram K (B×B, symmetric) of per-rollout gradients and the advantages a (B,), float64.
    relu: φ = relu, the official use_relu_exploration (False: φ = identity). Returns (a′, the rule's terms)."""
    pr = common.participation_ratio(K)                   # PR = (tr K)² / ‖K‖_F², the spectral spread
    k = subspace_size(pr, a.numel(), rho, k_min, k_max)  # k = clip(round(ρ·PR), k_min, min(k_max, B − 1))
    P, top = top_eigenspace(K, k)                        # P = V_k V_kᵀ
    n_eff = common.signed_neff(K, a)                     # n_eff = aᵀKa / Σ_i a_i² K_ii, signed cancellation
    alpha = mixing_alpha(n_eff, alpha_min, alpha_max)    # α = clip(1 − n_eff, α_min, α_max)
    phi = a.clamp(min=0) if relu else a                  # φ(a) = relu(a)
    a_new, parts = channels(a, P, alpha, phi)            # a′ = P a + α (I − P) φ(a)
    return a_new, dict(pr=pr, k=k, top=top, P=P, n_eff=n_eff, alpha=alpha, **parts)


def broadcast_advantage(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A′_it = a′_i · m_it."""
    return a[:, None] * mask.to(a.dtype)


def clipped_policy_loss(logp, old_logp, adv, mask, cfg: Config, ref_logp=None):
    """Per-token PPO surrogate −min(ρ_t A, clip(ρ_t, 1−ε, 1+ε_high) A), ρ_t = exp(log π − log π_old), plus
    β·KL_k3 with KL_k3 = exp(q − p) − (q − p) − 1 (q = log π_ref, p = log π) when β > 0. All fp32.
    Returns (per-token loss (B, T), stats of summed counts for logging)."""
    eps_hi = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    ratio = torch.exp(logp - old_logp)
    A = broadcast_advantage(adv.to(logp.dtype), mask)  # A_it = a_i m_it
    per_tok = -torch.min(ratio * A, ratio.clamp(1 - cfg.epsilon, 1 + eps_hi) * A)
    m = mask.to(logp.dtype)
    low, high = ((ratio < 1 - cfg.epsilon) & (A < 0)).to(m.dtype) * m, ((ratio > 1 + eps_hi) & (A > 0)).to(m.dtype) * m
    stats = {"clip_low": low.sum(), "clip_high": high.sum(), "kl": torch.zeros(()),
             "low_seq": low.sum(1) / m.sum(1), "high_seq": high.sum(1) / m.sum(1)}  # per sequence (NaN if empty)
    if cfg.beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + cfg.beta * kl
        stats["kl"] = (kl.detach() * m).sum()
    return per_tok, stats


def aggregate_loss(per_tok, mask, loss_type: str, n_seq: int, n_tok: int, max_len: int, n_mb: int) -> torch.Tensor:
    """The loss of this micro-batch's share of the scope; normalisers are over the whole scope (all processes; n_mb
    micro-batches in all), so summing micro-batches and processes gives the loss of the full batch (TRL's):
      grpo:     (1/N_seq) Σ_i (Σ_t ℓ_it m_it / Σ_t m_it)
      bnpo:     (1/n_mb) Σ_mb (Σ_it∈mb ℓ_it m_it / Σ_it∈mb m_it)   (each micro-batch's own token mean)
      dr_grpo:  (1/(N_seq·L_max)) Σ_it ℓ_it m_it
      dapo:     (1/N_tok) Σ_it ℓ_it m_it   (verl's token-mean)
    """
    m = mask.to(per_tok.dtype)
    if loss_type == "grpo":
        return ((per_tok * m).sum(1) / m.sum(1).clamp(min=1)).sum() / n_seq
    if loss_type == "bnpo":
        return (per_tok * m).sum() / m.sum().clamp(min=1) / n_mb
    if loss_type == "dr_grpo":
        return (per_tok * m).sum() / (n_seq * max_len)
    return (per_tok * m).sum() / max(n_tok, 1)


# ----------------------------------------------------------------------------------------------------------
# The --salt modes: the released rule, and research controls beside it (not the authors' rule)
# ----------------------------------------------------------------------------------------------------------

def rule_constants(cfg: Config) -> dict:
    """salt_rule's constants from the Config."""
    return dict(rho=cfg.salt_rho, k_min=cfg.salt_k_min, k_max=cfg.salt_k_max, alpha_min=cfg.salt_alpha_min,
                alpha_max=cfg.salt_alpha_max, relu=cfg.salt_relu)


def renormalise(a_new: torch.Tensor, a: torch.Tensor, how: str) -> torch.Tensor:
    """std: a′ · std(a)/std(a′) (official normalize_final); l2: a′ · ‖a‖/‖a′‖; none: a′."""
    if how == "std" and a_new.std() > 1e-8:
        return a_new * (a.std() / a_new.std())
    if how == "l2" and a_new.norm() > 1e-8:
        return a_new * (a.norm() / a_new.norm())
    return a_new


def official(K, a, cfg: Config, generator=None):
    """The released rule with the Config's constants, then --salt_renorm."""
    a_new, terms = salt_rule(K, a, **rule_constants(cfg))
    return renormalise(a_new, a, cfg.salt_renorm), terms


def identity(K, a, cfg: Config, generator=None):
    """Self-check: φ = id and α ≡ 1 give a′ = P a + (I − P) a = a exactly; a mismatch stops the run."""
    _, terms = salt_rule(K, a, **rule_constants(cfg))
    a_new, parts = channels(a, terms["P"], 1.0, a)
    if (a_new - a).abs().max() > 1e-9 * max(1.0, a.abs().max().item()):
        raise RuntimeError(f"SALT identity self-check failed: max |a′ − a| = {(a_new - a).abs().max():.3e}")
    return a_new, {**terms, "alpha": 1.0, **parts}


def random_subspace(K, a, cfg: Config, generator=None):
    """Control: the released rule with P a random k-dim subspace (seeded by `generator`) instead of K's top one."""
    _, terms = salt_rule(K, a, **rule_constants(cfg))
    Q, _ = torch.linalg.qr(torch.randn(a.numel(), terms["k"], generator=generator, dtype=K.dtype))
    a_new, parts = channels(a, Q @ Q.T, terms["alpha"], a.clamp(min=0) if cfg.salt_relu else a)
    return renormalise(a_new, a, cfg.salt_renorm), {**terms, "P": Q @ Q.T, **parts}


def amplify(K, a, cfg: Config, generator=None):
    """Control: a′ = P a + (1 + λ c)(I − P) a, c = clip(1 − n_eff, 0, 1), renormalised to ‖a‖ (a literal reading of
    the abstract, not the authors' rule)."""
    _, terms = salt_rule(K, a, **rule_constants(cfg))
    alpha = 1.0 + cfg.salt_lambda * min(max(1.0 - terms["n_eff"], 0.0), 1.0)
    a_new, parts = channels(a, terms["P"], alpha, a)
    return renormalise(a_new, a, "l2"), {**terms, "alpha": alpha, **parts}


def positive_only(K, a, cfg: Config, generator=None):
    """Control: a′_i = a⁺_i − mean_{j ∈ group(i)} a⁺_j, SALT's relu without the geometry (K unused; the rule still runs,
    for its diagnostics). Groups are G consecutive rows, so it needs the mini scope."""
    _, terms = salt_rule(K, a, **rule_constants(cfg))
    pos = a.clamp(min=0).view(-1, cfg.num_generations)
    return renormalise((pos - pos.mean(1, keepdim=True)).flatten(), a, cfg.salt_renorm), terms


def unit_diagonal(K: torch.Tensor) -> torch.Tensor:
    """--salt_gram cosine: C_ij = K_ij / √(K_ii K_jj), every rollout's feature at length 1, so that no row leads the top
    eigenvectors by its norm alone (docs/RESULTS.md, experiment 12: with the raw K, P keeps the largest-‖g‖ rows and
    correct rollouts have the smaller ones). A departure from the paper and the authors' code, not the default. A row
    with K_ii ≤ 0 (a zero feature: its row of a PSD K is 0) is left as is."""
    d = torch.diagonal(K)
    s = torch.where(d > 0, d.clamp(min=0).sqrt(), torch.ones_like(d))
    return K / (s[:, None] * s[None, :])


# --salt mode → f(K, a, cfg, generator) → (a′, the rule's terms). Experiments may add arms of their own here before
# building a Config: the `salt` field accepts every key of this table.
SALT_MODES = {"off": None, "official": official, "identity": identity, "random_subspace": random_subspace,
              "amplify": amplify, "positive_only": positive_only}


def salt_reweight(K: torch.Tensor, a: torch.Tensor, cfg: Config, generator: torch.Generator | None = None):
    """a′ for the --salt mode, a pure function of the Gram K (B×B) and the advantages a (B,). Returns (a′, diagnostics).

    SALT_MODES maps each mode to its function (official, identity, random_subspace, amplify, positive_only above).
    B = 1 or a ≡ 0 returns a unchanged. Errors are raised, never replaced by GRPO. K must be symmetric (every Gram
    here is: common.gram and common.linear_gram symmetrise theirs)."""
    t0 = time.perf_counter()
    K = K.detach().to("cpu", torch.float64)
    a64 = a.detach().to("cpu", torch.float64)
    B = a64.numel()
    if K.shape != (B, B):
        raise ValueError(f"salt_reweight: K is {tuple(K.shape)} but a has {B} entries")
    if not torch.isfinite(K).all() or not torch.isfinite(a64).all():
        raise FloatingPointError("salt_reweight: non-finite Gram matrix or advantages")
    if cfg.salt == "off" or B == 1 or not (a64 != 0).any():
        return a.clone(), {"B": B, "skipped": 1.0, "time_s": time.perf_counter() - t0}
    a_new, terms = SALT_MODES[cfg.salt](unit_diagonal(K) if cfg.salt_gram == "cosine" else K, a64, cfg, generator)
    diag = salt_diagnostics(K, a64, a_new, terms, cfg)  # K_ii and the kept masses read the raw Gram either way
    diag["time_s"] = time.perf_counter() - t0
    return a_new.to(a.dtype), diag


def salt_diagnostics(K: torch.Tensor, a: torch.Tensor, a_new: torch.Tensor, terms: dict, cfg: Config) -> dict:
    """The salt/* metrics of one scope (docs/salt.md#metrics-metricsjsonl-and-accelerate-trackers)."""
    B, n_eff, alpha, a_dom, a_tail = a.numel(), terms["n_eff"], terms["alpha"], terms["a_dom"], terms["a_tail"]
    e_dom, e_tail = float(a_dom @ a_dom), alpha ** 2 * float(a_tail @ a_tail)
    aKa, bKb, aKb = float(a @ K @ a), float(a_new @ K @ a_new), float(a @ K @ a_new)

    def kept(v, rows):  # advantage mass kept on some rows: Σ_rows v_i / Σ_rows a_i
        return float(v[rows].sum() / a[rows].sum()) if rows.any() else float("nan")

    def mean_on(v, rows):
        return float(v[rows].mean()) if rows.any() else float("nan")

    kii, pos, neg = torch.diagonal(K), a > 0, a < 0  # K_ii = ‖g_i‖²/B: the leverage of row i on the top eigenvectors

    G = cfg.num_generations  # groups: G consecutive rows; a scope holds whole groups or lies inside one
    same = (torch.arange(B)[:, None] // G == torch.arange(B)[None, :] // G) & ~torch.eye(B, dtype=torch.bool)
    diag = {
        "B": B, "participation_ratio": terms["pr"], "pr_over_B": terms["pr"] / B, "k": terms["k"], "alpha": alpha,
        "neff": n_eff, "neff_over_B": n_eff / B, "neff_after": common.signed_neff(K, a_new),
        "cancellation": 1.0 - n_eff, "main_contrib_ratio": e_dom / max(e_dom + e_tail, 1e-30),
        "exp_contrib_ratio": e_tail / max(e_dom + e_tail, 1e-30),
        "cos_grpo_salt": aKb / math.sqrt(max(aKa * bKb, 1e-300)),  # cos(Gᵀa, Gᵀa′) from K alone
        "zero_adv_mass": float(a_new[a == 0].abs().sum() / a_new.abs().sum().clamp(min=1e-30)),
        "positive_adv_ratio": float((a > 0).double().mean()),
        "pos_mass_kept": kept(a_dom, a > 0), "neg_mass_kept": kept(a_dom, a < 0),
        "pos_mass_after": kept(a_new, a > 0), "neg_mass_after": kept(a_new, a < 0),
        # squared feature norm of positive- / negative-advantage rows relative to the scope's mean, their ratio, and
        # the mean diagonal of P on each (P_ii: how much of e_i the kept subspace holds)
        "kii_pos": mean_on(kii, pos) / max(float(kii.mean()), 1e-300),
        "kii_neg": mean_on(kii, neg) / max(float(kii.mean()), 1e-300),
        "kii_pos_over_neg": mean_on(kii, pos) / max(mean_on(kii, neg), 1e-300) if pos.any() and neg.any() else float("nan"),
        "pii_pos": mean_on(torch.diagonal(terms["P"]), pos), "pii_neg": mean_on(torch.diagonal(terms["P"]), neg),
        "cos_within_abs": float(common.cosine_matrix(K)[same].abs().mean())  # mean |cos(g_i, g_j)|, i ≠ j in a group
        if (B % G == 0 or G % B == 0) and same.any() else float("nan"),
        "eigenvalue_max": float(terms["top"].max()), "eigenvalue_min": float(terms["top"].min()),
        "adv_change_norm": float((a_new - a).norm() / a.norm().clamp(min=1e-30)),
    }
    if cfg.salt == "positive_only":  # no channels: the dominant/tail split does not apply
        diag.update(alpha=float("nan"), main_contrib_ratio=float("nan"), exp_contrib_ratio=float("nan"))
    return diag


# ----------------------------------------------------------------------------------------------------------
# Where a′ enters a step: the Gram K_ij = <g_i, g_j> of per-rollout gradients over a scope (docs/salt.md)
# ----------------------------------------------------------------------------------------------------------
#
# Official: g_i = ∂ℓ_i/∂W_lm = Σ_t (softmax(z_t) − e_{y_t}) h_tᵀ with ℓ_i = −Σ_t log π(y_t), the full V×H matrix.
# Default here: its exact Gram from the hidden states and logits of a forward we already run, by token-pair
# ("ghost") inner products (common.lm_head_gram), never forming V×H. A scope part is either features F (rows ×
# d: sketch, projected layers) or the scope's flattened tokens (a dict) for an exact Gram.

class FeatureSpec:
    """What the Gram needs: the LM head, or the salt_layers and a Featurizer."""

    def __init__(self, model, cfg: Config):
        self.kind, self.cfg = (cfg.salt_features if cfg.salt != "off" else "none"), cfg
        self.head = next(iter(common.select_linear_layers(model, "lm_head").values()))
        self.featurizer = None
        self.width = self.head.out_features + self.head.in_features  # Σ (d_out + d_in) of an exact Gram
        if self.kind == "layers":
            self.featurizer = common.Featurizer(model, cfg.salt_layers, cfg.salt_k_out, cfg.salt_k_in,
                                                seed=cfg.seed, reduction="sum", temperature=cfg.temperature)
            self.width = sum(m.out_features + m.in_features + (m.bias is not None)
                             for m in self.featurizer.layers.values())

    @property
    def from_forward(self) -> bool:  # LM-head features come free with the policy forward's hidden states and logits
        return self.kind != "layers"

    def exact(self, accelerator, batches: list[dict], gather: bool) -> bool:
        """Exact Gram for this scope: N²·Σ(d_out + d_in) ≤ salt_exact_budget, N its scored completion tokens (LM
        head) or non-padding tokens (layers), summed over processes when `gather` (the same answer on each)."""
        with_prompt = self.kind == "layers"
        n = sum(float(b["comp_mask"].sum() + (b["prompt_mask"].sum() if with_prompt else 0)) for b in batches)
        n = float(common.gather_rows(accelerator, torch.tensor([n], device=accelerator.device)).sum()) if gather else n
        return self.kind in ("lm_head", "layers") and n ** 2 * self.width <= self.cfg.salt_exact_budget


@contextlib.contextmanager
def capture_lm_head_input(head, store: dict):
    """Forward hook keeping h_t, the LM-head input (after the final norm), detached."""
    handle = head.register_forward_hook(lambda module, args, out: store.__setitem__("h", args[0].detach()))
    try:
        yield
    finally:
        handle.remove()


def policy_forward(model, head, batch: dict, cfg: Config, device, want_hidden: bool):
    """Per-token log π(y_t) of the completion tokens and the entropy of π (fp32), the logits and, optionally, the
    LM-head inputs.

    Only the completion positions go through the LM head (logits_to_keep), which saves a V-wide matmul per
    prompt token. Position t of the kept logits predicts completion token t.
    """
    ids = torch.cat([batch["prompt_ids"], batch["comp_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["comp_mask"]], 1)  # position ids as in generate (left padding)
    C = batch["comp_ids"].shape[1]
    store: dict = {}
    ctx = capture_lm_head_input(head, store) if want_hidden else contextlib.nullcontext()
    with ctx, harness.autocast(cfg, device):
        logits = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp(min=0),
                       logits_to_keep=C + 1, use_cache=False).logits[:, :-1]
    logp, entropy = common.token_logprobs(logits, batch["comp_ids"], cfg.temperature, with_entropy=True)
    hidden = store["h"][:, -(C + 1):-1] if want_hidden else None
    return logp, entropy, hidden, logits


def gram_part(model, spec: FeatureSpec, b: dict, hidden, logits, cfg: Config, exact: bool):
    """One micro-batch's share of the scope: its tokens (exact) or its features (sketch, projected layers)."""
    n = b["comp_ids"].shape[0]
    if spec.kind == "layers":
        ids, am = torch.cat([b["prompt_ids"], b["comp_ids"]], 1), torch.cat([b["prompt_mask"], b["comp_mask"]], 1)
        lm = torch.cat([torch.zeros_like(b["prompt_mask"]), b["comp_mask"]], 1)
        if exact:
            io = common.linear_io_grads(model, spec.featurizer.layers, ids, am, lm, reduction="sum",
                                        temperature=cfg.temperature)
            return {"n": n, **common.linear_tokens(io, am)}
        return spec.featurizer(ids, am, lm).float()
    tok = common.lm_head_tokens(hidden, logits, b["comp_ids"], b["comp_mask"])
    return {"n": n, **tok} if exact else common.lm_head_sketch(tok, n, cfg.salt_sketch_dim, cfg.seed, cfg.temperature)


@torch.no_grad()
def feature_pass(model, spec: FeatureSpec, batches: list[dict], cfg: Config, device, exact: bool = False) -> list:
    """Gram parts of every local rollout before any backward (mini scope with several micro-batches, or layers)."""
    out = []
    for b in batches:
        hidden = logits = None
        if spec.from_forward:
            _, _, hidden, logits = policy_forward(model, spec.head, b, cfg, device, want_hidden=True)
        with harness.autocast(cfg, device) if spec.kind == "layers" else contextlib.nullcontext():  # LM head: fp32 matmuls
            out.append(gram_part(model, spec, b, hidden=hidden, logits=logits, cfg=cfg, exact=exact))
    return out


def scope_gram(accelerator, spec: FeatureSpec, parts: list, gather: bool) -> torch.Tensor:
    """K (float64, CPU) of the scope from its parts; `gather`: the scope spans every process (rows in rank order)."""
    if torch.is_tensor(parts[0]):
        F = torch.cat(parts)
        return common.gram((common.gather_rows(accelerator, F) if gather else F).detach().cpu().double())
    n, tok, off = sum(p["n"] for p in parts), {}, 0
    for p in parts:  # rows of later micro-batches (and processes) follow the earlier ones
        for k, v in p.items():
            if k != "n":
                tok.setdefault(k, []).append(v + off if k.startswith("r") else v)
        off += p["n"]
    tok = {k: torch.cat(v) for k, v in tok.items()}
    if gather:
        offset = accelerator.process_index * n
        tok = {k: common.gather_rows(accelerator, v + offset if k.startswith("r") else v) for k, v in tok.items()}
        n *= accelerator.num_processes
    if "z" in tok:
        return common.lm_head_gram_tokens(tok, n, spec.cfg.temperature).cpu()
    return sum(common.linear_gram(tok[f"x:{m}"], tok[f"d:{m}"], tok[f"r:{m}"], n) for m in spec.featurizer.layers).cpu()


def salt_on_scope(trainer: Trainer, batches: list[dict], a_local: torch.Tensor, step: int, timing: dict,
                  gather: bool, exact: bool, forward=None):
    """SALT over one scope: the Gram parts of `batches` (from the training forward's (hidden, logits) when given,
    else a no-grad pass), K over the scope (gathered across processes for `mini`), a′, and this process's slice.

    Returns (a′ slice, diagnostics, (a, a′) of the whole scope). Non-finite features (the weights diverged) leave a
    unchanged and are reported, so that every process reaches the step's gathered check and stops there together."""
    cfg, accelerator, spec = trainer.cfg, trainer.accelerator, trainer.spec
    try:
        with harness.timed(timing, "time/features_s"):
            if forward is None:
                parts = feature_pass(trainer.raw, spec, batches, cfg, accelerator.device, exact)
            else:
                with torch.no_grad():
                    hidden, logits = forward
                    parts = [gram_part(trainer.raw, spec, batches[0], hidden=hidden, logits=logits.detach(), cfg=cfg,
                                       exact=exact)]
        with harness.timed(timing, "time/salt_s"):
            a = common.gather_rows(accelerator, a_local) if gather else a_local
            K = scope_gram(accelerator, spec, parts, gather) / a.shape[0]  # K = G Gᵀ / B (scale-invariant anyway)
            generator = torch.Generator().manual_seed(harness.rollout_seed(cfg.seed, step, -1, -1))
            a_new, diag = salt_reweight(K, a.detach().cpu().double(), cfg, generator)
    except FloatingPointError:
        return a_local, {"nonfinite": 1.0}, None
    diag["gram"] = float(exact)  # salt/gram: 1 exact Gram, 0 an approximation (sketch, kronecker, projected layers)
    lo = accelerator.process_index * a_local.shape[0] if gather else 0
    return a_new[lo:lo + a_local.shape[0]].float().to(a_local.device), diag, (a.cpu(), a_new)


# ----------------------------------------------------------------------------------------------------------
# The loop: rollouts → advantages → (features → SALT) → loss → AdamW, on Accelerate
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Trainer:
    cfg: Config
    accelerator: object
    model: object        # as prepared by accelerate (DDP / FSDP2 / DeepSpeed)
    raw: object          # the unwrapped model (generation, no-grad forwards, features)
    ref: object          # frozen reference for β > 0 (None: none, or the LoRA base with the adapter disabled)
    tok: object
    opt: object
    sched: object
    spec: FeatureSpec
    train_rows: list
    eval_rows: list
    rewards: list        # (name, function) pairs
    reward_weights: torch.Tensor
    eos: list            # every EOS id
    synced: bool         # generation must run the same number of forwards on every process (sharded weights)
    buffer: dict | None = None
    last_advantages: tuple | None = None  # (a, a′) of the last SALT scope, saved as last_advantages.safetensors
    num_tokens: int = 0  # TRL's num_tokens: prompt + completion tokens generated so far (all processes)
    data_sha: str = ""   # data_fingerprint of the rows, kept in checkpoints
    reward_log: harness.RewardLog = field(default_factory=harness.RewardLog)  # TRL's log_metric / log_extra
    history: list = field(default_factory=list)  # every logged row of the run, resumed runs included
    folder: harness.OutputFolder | None = None  # where the run writes (folder.path: in place, or staged until commit)
    resume: dict | None = None  # state.json of --resume_from, checked in build


def micro_batches(batch: dict, cfg: Config) -> list[dict]:
    n = batch["comp_ids"].shape[0]
    mb = cfg.micro_batch_size or n
    return [{k: v[i:i + mb] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
            for i in range(0, n, mb)]


def score(trainer: Trainer, rows: list[dict], comp: torch.Tensor, mask: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Rewards (n, n_funcs), NaN where a function returned None: each function called as TRL calls it
    (harness.reward_kwargs: with trainer_state at `step`, log_metric and log_extra), checked."""
    from transformers import TrainerState

    cfg = trainer.cfg
    texts = trainer.tok.batch_decode(comp, skip_special_tokens=True)
    state = TrainerState(global_step=step, max_steps=cfg.max_steps, num_train_epochs=cfg.num_train_epochs,
                         epoch=step * cfg.prompts_per_step / len(trainer.train_rows), logging_steps=cfg.logging_steps,
                         save_steps=cfg.save_every, eval_steps=cfg.eval_every,
                         train_batch_size=cfg.micro_batch_size, num_input_tokens_seen=trainer.num_tokens)
    kw = harness.reward_kwargs(rows, texts, [c[m.bool()].tolist() for c, m in zip(comp, mask)], state,
                               trainer.reward_log)
    return torch.tensor([harness.call_reward(name, fn, kw, len(rows)) for name, fn in trainer.rewards],
                        dtype=torch.float64).T


def weighted(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_f w_f r_f per rollout; TRL's None (NaN) rewards left out of the sum, NaN where every function returned
    None."""
    if not torch.isnan(per_func).any():
        return per_func @ weights
    total = torch.nansum(per_func * weights, 1)
    return total.masked_fill(torch.isnan(per_func).all(1), float("nan"))


def make_rollouts(trainer: Trainer, round_idx: int) -> dict:
    """One generation round: prompts_per_step × optimizer_steps_per_generation prompts, G rollouts each. Every process
    generates its share of each step's groups (slice j is optimizer step j of the round), scores them, and the
    advantages come from the rewards of all processes (so `batch` scaling and the logged statistics are global)."""
    cfg, accelerator, tok, device = trainer.cfg, trainer.accelerator, trainer.tok, trainer.accelerator.device
    G, S, P, rank = cfg.num_generations, cfg.optimizer_steps_per_generation, cfg.prompts_per_step, accelerator.process_index
    per = P // accelerator.num_processes
    idx = harness.prompts_for_round(len(trainer.train_rows), P * S, round_idx, cfg.seed)
    generation_start = time.perf_counter()
    trainer.raw.eval()
    slices = []
    for j in range(S):  # one generate call per optimizer step's share: memory stays that of one step
        pos = [j * P + rank * per + k for k in range(per)]  # positions in the round, as if on one process
        rows = [trainer.train_rows[idx[p]] for p in pos for _ in range(G)]
        generators = [torch.Generator(device=device).manual_seed(harness.rollout_seed(cfg.seed, round_idx, idx[p], g))
                      for p in pos for g in range(G)]
        prompts = [harness.format_prompt(tok, r["prompt"], cfg.system_prompt, cfg.chat_template_kwargs) for r in rows]
        pids, pam, comp, cmask = harness.generate(trainer.raw, tok, prompts, cfg, device, cfg.max_completion_length,
                                          generators=generators, eos=trainer.eos, synced=trainer.synced)
        slices.append({"prompt_ids": pids, "prompt_mask": pam, "comp_ids": comp, "comp_mask": cmask,
                       "rewards": score(trainer, rows, comp, cmask, step=round_idx * S * cfg.num_iterations + j)})
    generation_s = time.perf_counter() - generation_start

    def gather(column):  # a per-rollout quantity of every slice, all processes: step by step, process by process
        return torch.cat([common.gather_rows(accelerator, column(s).to(device)).cpu() for s in slices])

    per_func = gather(lambda s: s["rewards"])
    total = weighted(per_func, trainer.reward_weights)
    adv = group_advantages(total, G, cfg.scale_rewards, cfg.adv_eps)
    if torch.isinf(total).any() or not torch.isfinite(adv).all():  # each reward is finite, their sum or std not
        raise UserError(f"generation round {round_idx}: the weighted rewards overflow (largest |reward| "
                        f"{float(per_func.abs().max()):.3g}, weights {trainer.reward_weights.tolist()}), so the "
                        "advantages are not finite", hint="rescale the reward functions or --reward_weights "
                                                          "(advantages do not depend on a common scale)")
    lens = gather(lambda s: s["comp_mask"].sum(1).float())
    trunc = gather(lambda s: harness.truncated(s["comp_ids"], s["comp_mask"], trainer.eos).float())
    trainer.num_tokens += int(gather(lambda s: (s["prompt_mask"].sum(1) + s["comp_mask"].sum(1)).float()).sum())
    n = per * G
    reuse = S * cfg.num_iterations > 1  # a slice trained after an update needs the log-probs it was sampled with
    for j, s in enumerate(slices):
        s["adv"] = adv[j * P * G + rank * n:][:n].float().to(device)
        if cfg.mask_truncated_completions:  # TRL: such completions carry no EOS signal, leave them out of the loss
            s["comp_mask"] = s["comp_mask"] * ~harness.truncated(s["comp_ids"], s["comp_mask"], trainer.eos)[:, None]

        def logprobs(model):  # log π(y_t) of the slice's completions under `model`, micro-batch by micro-batch
            return torch.cat([policy_forward(model, trainer.spec.head, b, cfg, device, want_hidden=False)[0]
                              for b in micro_batches(s, cfg)])

        with torch.no_grad():
            if reuse:
                s["old_logp"] = logprobs(trainer.raw)
            if cfg.beta > 0:  # the frozen reference, or the LoRA base with the adapter disabled
                with trainer.raw.disable_adapter() if trainer.ref is None else contextlib.nullcontext():
                    s["ref_logp"] = logprobs(trainer.ref or trainer.raw)
    grp = total.view(-1, G)
    logged, extra = trainer.reward_log.flush()
    metrics = {
        "reward": float(torch.nanmean(total)), "reward_std": float(nanstd(total.view(1, -1), 1)),  # TRL's: the batch
        "reward_std_within_group": float(torch.nanmean(nanstd(grp, 1))),
        "frac_reward_zero_std": frac_zero_std(total, G, cfg.scale_rewards),
        **{f"rewards/{name}/{k}": float(f(per_func[:, i].view(1, -1)).squeeze()) for i, (name, _) in
           enumerate(trainer.rewards) for k, f in (("mean", lambda x: torch.nanmean(x, 1)), ("std", lambda x: nanstd(x, 1)))},
        **logged,
        "completions/mean_length": float(lens.mean()), "completions/max_length": float(lens.max()),
        "completions/min_length": float(lens.min()), "completions/clipped_ratio": float(trunc.mean()),
        "time/generation_s": generation_s,
    }
    if cfg.log_completions:
        log_completions(trainer, round_idx, slices, per_func, adv, extra)
    s0 = slices[0]
    sample = {"prompt": harness.format_prompt(tok, trainer.train_rows[idx[rank * per]]["prompt"], cfg.system_prompt,
                                                cfg.chat_template_kwargs),
              "completion": tok.decode(s0["comp_ids"][0], skip_special_tokens=True),
              "reward": float(s0["rewards"][0] @ trainer.reward_weights)}
    return {"round": round_idx, "slices": slices, "metrics": metrics, "sample": sample}


def log_completions(trainer: Trainer, round_idx: int, slices: list[dict], per_func, adv, extra: dict) -> None:
    """TRL's log_completions: every completion of the round, with its prompt, rewards and advantage (and the columns
    reward functions added through log_extra), appended to completions.jsonl by the main process."""
    from accelerate.utils import gather_object

    acc, tok = trainer.accelerator, trainer.tok
    texts = [t for s in slices for t in gather_object(tok.batch_decode(s["comp_ids"], skip_special_tokens=True))]
    prompts = [t for s in slices for t in gather_object(tok.batch_decode(s["prompt_ids"], skip_special_tokens=True))]
    extra = {k: gather_object(list(v)) for k, v in extra.items()}
    if not acc.is_main_process:
        return
    step0 = round_idx * trainer.cfg.optimizer_steps_per_generation * trainer.cfg.num_iterations
    names = [n for n, _ in trainer.rewards]
    rows = [{"step": step0 + 1, "prompt": p, "completion": c, "advantage": float(a),
             **{f"rewards/{n}": float(per_func[i, j]) for j, n in enumerate(names)},
             **{k: v[i] for k, v in extra.items() if i < len(v)}} for i, (p, c, a) in enumerate(zip(prompts, texts, adv))]
    with open(trainer.folder.path / "completions.jsonl", "a", encoding="utf-8") as f:
        f.writelines(harness.dumps(r) + "\n" for r in rows)


def accumulate_gradients(trainer: Trainer, batch: dict, step: int) -> dict:
    """One optimizer step's forward/backward over the local rollouts, inside `accelerator.accumulate` (one
    gradient sync, and one DeepSpeed step, per optimizer step); leaves the scope's summed gradient in .grad.

    With SALT in `mini` scope, features of all local rollouts are needed before the first backward: they come from
    the training forward itself when there is a single micro-batch (no extra cost), else from a no-grad pass.
    """
    cfg, accelerator, spec = trainer.cfg, trainer.accelerator, trainer.spec
    mbs = micro_batches(batch, cfg)
    accelerator.gradient_accumulation_steps, accelerator.step = len(mbs), 0  # sync on the last micro-batch
    # whole-scope normalisers (all processes), so the loss does not depend on the split
    n_tok = int(common.gather_rows(accelerator, batch["comp_mask"].sum().view(1).float()).sum())
    n_seq = batch["comp_ids"].shape[0] * accelerator.num_processes
    timing = {"time/features_s": 0.0, "time/salt_s": 0.0, "time/backward_s": 0.0}  # backward_s: forward + backward
    salt_on, mini = cfg.salt != "off", cfg.salt_scope == "mini"
    inline = salt_on and mini and len(mbs) == 1 and spec.from_forward  # SALT on the training forward's features
    exact = salt_on and mini and spec.exact(accelerator, [batch], True)  # one decision per scope
    diags, a_pair, adv = [], None, batch["adv"]
    if salt_on and mini and not inline:
        adv, d, a_pair = salt_on_scope(trainer, mbs, adv, step, timing, gather=True, exact=exact)
        diags.append(d)
    trainer.model.train()
    sums = {"loss": 0.0, "nonfinite": 0.0, "bad_logp": 0.0}
    per_mb, per_seq = [], []  # TRL's metrics: each micro-batch's token means over all processes, then their mean
    off = 0
    for i, b in enumerate(mbs):
        n = b["comp_ids"].shape[0]
        a_b = adv[off:off + n]
        salt_here = salt_on and (inline or not mini)
        # LoRA dropout, the only randomness of the forward, seeded per micro-batch: reruns and resumes repeat it
        with accelerator.accumulate(trainer.model), harness.seeded_rng("dropout", cfg.seed, step, i,
                                                                       accelerator.process_index,
                                                                       device=accelerator.device):
            with harness.timed(timing, "time/backward_s"):
                logp, ent, hidden, logits = policy_forward(trainer.model, spec.head, b, cfg, accelerator.device,
                                                           want_hidden=salt_here and spec.from_forward)
            if salt_here:
                a_b, d, pair = salt_on_scope(trainer, [b], a_b, step, timing, gather=inline,
                                             exact=exact if inline else spec.exact(accelerator, [b], False),
                                             forward=(hidden, logits) if spec.from_forward else None)
                diags.append(d)
                a_pair = pair if inline else a_pair
            with harness.timed(timing, "time/backward_s"):
                old = b["old_logp"] if "old_logp" in b else logp.detach()
                per_tok, st = clipped_policy_loss(logp, old, a_b, b["comp_mask"], cfg, b.get("ref_logp"))
                loss = aggregate_loss(per_tok, b["comp_mask"], cfg.loss_type, n_seq, n_tok, cfg.max_completion_length,
                                      len(mbs) * accelerator.num_processes)
                # DDP / FSDP / DeepSpeed average over processes and accelerate divides by the accumulation steps;
                # undo both, so .grad is the scope's summed gradient whatever the split
                accelerator.backward(loss * accelerator.num_processes * accelerator.gradient_accumulation_steps)
        per_mb.append(torch.stack([st["clip_low"], st["clip_high"], st["kl"], (ent * b["comp_mask"]).sum(),
                                   b["comp_mask"].sum()]).double())
        per_seq.append(torch.stack([torch.full_like(st["low_seq"], i), st["low_seq"], st["high_seq"]], 1).double())
        sums["loss"] += float(loss.detach())
        sums["bad_logp"] += float((~torch.isfinite(logp.detach()) & b["comp_mask"].bool()).sum())
        off += n
    sums["nonfinite"] = float(sum(d.get("nonfinite", 0) for d in diags))
    local = torch.tensor([list(sums.values())], device=accelerator.device)
    sums = dict(zip(sums, common.gather_rows(accelerator, local).sum(0).tolist()))
    mb_sums = common.gather_rows(accelerator, torch.stack(per_mb).to(accelerator.device)).cpu()
    mb_sums = mb_sums.view(accelerator.num_processes, len(mbs), -1).sum(0)  # (micro-batch, stat) over processes
    low, high, kl, ent = (mb_sums[:, k] for k in range(4))
    seqs = common.gather_rows(accelerator, torch.cat(per_seq).to(accelerator.device)).cpu()
    by_mb = [seqs[seqs[:, 0] == i] for i in range(len(mbs))]
    mean = lambda num: micro_batch_mean(num, mb_sums[:, 4])  # noqa: E731
    m = {"loss": sums["loss"], "clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
         "clip_ratio/region_mean": mean(low + high), "entropy": mean(ent),
         "clip_ratio/low_min": micro_batch_extreme([t[:, 1] for t in by_mb], torch.min),
         "clip_ratio/high_max": micro_batch_extreme([t[:, 2] for t in by_mb], torch.max), **timing}
    if sums["bad_logp"]:  # the cause, where it can be named: the log-probs themselves
        raise UserError(f"step {step + 1}: log π of {int(sums['bad_logp'])} completion tokens is non-finite (logits / "
                        f"--temperature {cfg.temperature:g} overflow, or the weights diverged); stopped before saving "
                        "anything of this step",
                        hint="use a --temperature of 0.01 or more, a lower --learning_rate, or --dtype float32")
    if not math.isfinite(sums["loss"]) or sums["nonfinite"]:
        raise UserError(f"step {step + 1}: the loss is {sums['loss']} or the SALT features are non-finite; stopped "
                        "before saving anything of this step",
                        hint="lower --learning_rate, check the rewards, or use --dtype float32")
    if cfg.beta > 0:
        m["kl"] = mean(kl)
    if diags:
        m.update(salt_metrics(diags))
    trainer.last_advantages = a_pair
    return m


def frac_zero_std(r: torch.Tensor, G: int, scale: str) -> float:
    """TRL's frac_reward_zero_std: the share of rollouts whose advantage std is 0 (isclose): each group's std, or under
    scale_rewards=batch the batch's (so 0 unless the whole batch is constant)."""
    std = nanstd(r.view(1, -1), 1) if scale == "batch" else nanstd(r.view(-1, G), 1)
    return float(torch.isclose(std, torch.zeros_like(std)).double().mean())


def micro_batch_mean(num: torch.Tensor, den: torch.Tensor) -> float:
    """TRL's per-micro-batch metrics (clip_ratio/*_mean, kl, entropy): each micro-batch's token mean pooled over
    processes (Σ num / Σ den, one entry per micro-batch), then the mean over the step's micro-batches (TRL logs one
    value per micro-batch and averages them)."""
    return float((num / den.clamp(min=1)).mean())


def micro_batch_extreme(per_seq: list[torch.Tensor], reduce) -> float:
    """TRL's clip_ratio/low_min and high_max: the min (max) per-sequence ratio of each micro-batch over processes,
    then the mean over micro-batches."""
    return float(torch.stack([harness.nanreduce(t, reduce) for t in per_seq]).mean())


def salt_metrics(diags: list[dict]) -> dict:
    """salt/* of a step: each diagnostic's mean over this process's SALT scopes (micro scope: its micro-batches)
    where defined; a skipped scope has fewer keys, and NaN (e.g. α of positive_only) is left out of the mean."""
    m = {}
    for key in dict.fromkeys(k for d in diags for k in d):
        vals = [d[key] for d in diags if key in d and d[key] == d[key]]
        m[f"salt/{key}"] = sum(vals) / len(vals) if vals else float("nan")
    m["salt/skipped"] = sum(d.get("skipped", 0.0) for d in diags) / len(diags)
    return m


def optimizer_step(trainer: Trainer, step: int = -1) -> float:
    """Clip (max_grad_norm 0: only measure), refuse a non-finite gradient before the update and anything is saved
    (DeepSpeed's engine has stepped inside the last backward already), step AdamW and the schedule."""
    gn = trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.cfg.max_grad_norm or math.inf)
    if gn is not None and not math.isfinite(float(gn)):  # None: DeepSpeed reports no norm before its first step
        raise UserError(f"step {step + 1}: the gradient norm is {float(gn)} (non-finite); stopped before the update "
                        "and before saving anything of this step",
                        hint="lower --learning_rate, check the rewards, or use --dtype float32")
    trainer.opt.step()
    trainer.sched.step()
    trainer.opt.zero_grad(set_to_none=True)
    return float("nan") if gn is None else float(gn)


def eval_key(cfg: Config) -> str:
    """eval/accuracy for the default exact-match reward (mean reward = accuracy), else eval/reward."""
    return "eval/accuracy" if harness.reward_names(cfg) == ["exact_match"] else "eval/reward"


@torch.no_grad()
def evaluate(trainer: Trainer) -> float:
    """Mean total reward of greedy completions on the held-out rows. Every process runs the same number of generate
    calls of the same size (its block padded with row 0, not counted), as FSDP and ZeRO-3 need; sums are gathered."""
    cfg, accelerator = trainer.cfg, trainer.accelerator
    per = -(-len(trainer.eval_rows) // accelerator.num_processes)
    mine = trainer.eval_rows[accelerator.process_index * per:][:per]
    rows = mine + trainer.eval_rows[:1] * (per - len(mine))
    trainer.raw.eval()
    total, counted = 0.0, 0
    for s in range(0, per, cfg.eval_batch_size):
        chunk = rows[s:s + cfg.eval_batch_size]
        texts = [harness.format_prompt(trainer.tok, r["prompt"], cfg.system_prompt, cfg.chat_template_kwargs)
                 for r in chunk]
        _, _, comp, cmask = harness.generate(trainer.raw, trainer.tok, texts, cfg, accelerator.device,
                                             cfg.max_completion_length, eos=trainer.eos, synced=trainer.synced)
        r = weighted(score(trainer, chunk, comp, cmask), trainer.reward_weights)[: max(0, len(mine) - s)]
        total, counted = total + float(torch.nansum(r)), counted + int((~torch.isnan(r)).sum())  # None: not scored
    trainer.reward_log.flush()  # what reward functions log while evaluating is not a training step's
    local = torch.tensor([[total, counted]], device=accelerator.device, dtype=torch.float64)
    tot = common.gather_rows(accelerator, local).sum(0)
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


def save_checkpoint(trainer: Trainer, step: int, path: Path) -> None:
    """harness.save_checkpoint with this run's state (step, schedule, token count, data fingerprint, config) and,
    mid-round, each process's rollouts: a resumed run then trains on exactly the rollouts it would have."""
    cfg, acc = trainer.cfg, trainer.accelerator
    mid_round = bool(step % (cfg.optimizer_steps_per_generation * cfg.num_iterations))
    rollouts = ({f"{j}.{k}": v for j, s in enumerate(trainer.buffer["slices"]) for k, v in s.items()
                 if torch.is_tensor(v)} if mid_round else None)
    state = {"step": step, "num_tokens": trainer.num_tokens, "processes": acc.num_processes,
             "scheduler": trainer.sched.state_dict(), "data": trainer.data_sha, "config": dataclasses.asdict(cfg)}
    harness.save_checkpoint(acc, path, state, trainer.history, rollouts, trainer.buffer["round"] if mid_round else None)


def load_checkpoint(trainer: Trainer, path: Path, state: dict) -> int:
    """harness.load_checkpoint, then this run's schedule, token count and mid-round rollouts; returns the step."""
    trainer.history, rollouts, round_idx = harness.load_checkpoint(trainer.accelerator, path)
    if rollouts is not None:
        slices = [{} for _ in range(trainer.cfg.optimizer_steps_per_generation)]
        for key, v in rollouts.items():
            j, k = key.split(".", 1)
            slices[int(j)][k] = v
        trainer.buffer = {"round": round_idx, "slices": slices, "metrics": {}, "sample": {}}
    trainer.sched.load_state_dict(state["scheduler"])
    trainer.num_tokens = int(state["num_tokens"])
    return int(state["step"])


def training_loop(trainer: Trainer, run_start: float) -> dict:
    """Resume or evaluate, then step to max_steps: rollouts, gradients, AdamW, metrics, checkpoints; the final model."""
    from tqdm.auto import tqdm

    cfg, accelerator, folder, key = trainer.cfg, trainer.accelerator, trainer.folder, eval_key(trainer.cfg)
    start = load_checkpoint(trainer, Path(cfg.resume_from), trainer.resume) if cfg.resume_from else 0
    if harness.report_to(cfg):  # the trackers write where the run writes (staged with it until the first commit)
        accelerator.project_configuration.project_dir = str(folder.path)
        accelerator.project_configuration.logging_dir = str(folder.path)
        accelerator.init_trackers("salt_grpo", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                                       if isinstance(v, (int, float, str, bool))})
    logger = harness.MetricsLogger(accelerator, folder, resume=bool(cfg.resume_from), every=cfg.logging_steps)
    if accelerator.is_main_process:  # the settings the run used (the plot labels its lines from them)
        harness.write_json(folder.path / "config.json", dataclasses.asdict(cfg))
    if cfg.resume_from and accelerator.is_main_process:  # the run up to the checkpoint, not a killed run's later lines
        harness.write_jsonl(logger.path, trainer.history)

    def log(m: dict, step: int):
        logger.log(m, step=step)
        trainer.history.append({"step": step, **m})

    if start == 0 and cfg.eval_size:
        log({key: evaluate(trainer)}, 0)
    per_round, S = cfg.optimizer_steps_per_generation * cfg.num_iterations, cfg.optimizer_steps_per_generation
    bar = tqdm(range(start, cfg.max_steps), desc=f"GRPO+SALT[{cfg.salt}]", disable=not accelerator.is_main_process,
               initial=start, total=cfg.max_steps, dynamic_ncols=True)
    for step in bar:
        timing = {"time/optimizer_s": 0.0, "step_time": 0.0}
        with harness.timed(timing, "step_time"):
            round_idx, pos = divmod(step, per_round)
            if trainer.buffer is None or trainer.buffer["round"] != round_idx:
                trainer.buffer = make_rollouts(trainer, round_idx)
            m = dict(trainer.buffer["metrics"]) if pos == 0 else {}
            m.update(accumulate_gradients(trainer, trainer.buffer["slices"][pos % S], step))
            m["learning_rate"] = trainer.sched.get_last_lr()[0]  # the rate this step uses
            with harness.timed(timing, "time/optimizer_s"):
                m["grad_norm"] = optimizer_step(trainer, step)
        m.update({**timing, "num_tokens": trainer.num_tokens})
        if torch.cuda.is_available():
            m["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            m[key] = evaluate(trainer)
        log(m, step + 1)
        if accelerator.is_main_process and trainer.buffer.get("sample"):
            harness.write_json(folder.path / "last_sample.json", trainer.buffer["sample"])
        bar.set_postfix({k: f"{m.get(name, math.nan):.2f}" for k, name in
                         (("reward", "reward"), ("neff", "salt/neff"), ("alpha", "salt/alpha"))})
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(trainer, step + 1, folder.path / f"checkpoint-{step + 1}")
            folder.commit(accelerator)  # something to keep: a replaced run's files go now, not before
            if accelerator.is_main_process and cfg.save_total_limit:  # TRL's: the newest N checkpoints stay
                done = sorted(folder.path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                for old in done[:-cfg.save_total_limit]:
                    harness.remove(old)
    bar.close()
    end = evaluate(trainer) if cfg.eval_size else None
    if end is not None:
        log({key: end}, cfg.max_steps)
    logger.flush(cfg.max_steps)
    harness.save_final(accelerator, trainer.model, trainer.raw, trainer.tok, folder.path / "final")
    folder.commit(accelerator)
    if accelerator.is_main_process and trainer.last_advantages is not None:  # a and a′ of the last SALT scope
        a, a_new = trainer.last_advantages
        harness.save_safetensors(folder.path / "last_advantages.safetensors", {"a": a, "a_new": a_new})
    summary = harness.summarise_run(trainer.history, eval_key=key, start=start, end=end, steps=cfg.max_steps,
                                    wall_time_s=time.perf_counter() - run_start, model=cfg.model, out=folder.root,
                                    processes=accelerator.num_processes, eval_size=len(trainer.eval_rows),
                                    salt=cfg.salt)
    if accelerator.is_main_process:
        harness.write_json(folder.path / "summary.json", summary)
    if harness.report_to(cfg):
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return summary


# ----------------------------------------------------------------------------------------------------------
# Config: the method's settings (GRPO, SALT); the run's (model, data, LoRA, evaluation, outputs, resume, trackers)
# come from harness.TrainRunConfig. Every field is a flag with its checks; TRL's names where TRL has the concept.
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Config(harness.TrainRunConfig):
    output_dir: str = option("outputs/salt_grpo", "metrics.jsonl, checkpoints, final model, summary.json", path=True)
    # GRPO: TRL's names, meanings and defaults; the batch in TRL's terms (per-device micro-batch × accumulation) or
    # in this project's (prompts_per_step, all processes together)
    num_generations: int = option(8, "G: completions per prompt")
    micro_batch_size: Optional[int] = option(None, "completions per forward/backward per process (TRL's "
                                                   "per_device_train_batch_size, default 8 when the batch is given in "
                                                   "TRL's terms); 0: all of a step's at once", ge=0,
                                             aliases=("per_device_train_batch_size",))
    gradient_accumulation_steps: Optional[int] = option(None, "micro-batches per optimizer step (TRL's, default 1); "
                                                              "derived when prompts_per_step is given", ge=1)
    prompts_per_step: Optional[int] = option(None, "this project's batch: prompts per optimizer step, all processes "
                                                   "together (overrides TRL's terms; micro-batches then default to "
                                                   "all of a step's)", ge=1)
    steps_per_generation: Optional[int] = option(None, "TRL's: micro-batch steps per generation round (default: "
                                                       "gradient_accumulation_steps, one round per optimizer step)",
                                                 ge=1)
    optimizer_steps_per_generation: Optional[int] = option(None, "this project's: optimizer steps per generation "
                                                                 "round (= TRL's steps_per_generation / "
                                                                 "gradient_accumulation_steps; default 1)", ge=1)
    num_iterations: int = option(1, "μ: passes over each generation round; >1 uses stored old log-probs", ge=1)
    max_steps: int = option(-1, "optimizer steps; -1: num_train_epochs passes over the training prompts (TRL's)",
                            ge=-1)
    num_train_epochs: float = option(3.0, "passes over the training prompts when max_steps is -1 (TRL's)", gt=0)
    max_prompt_length: int = option(512, "prompt tokens kept; longer prompts are cut on the left (a warning says how "
                                         "many)", ge=1)
    max_completion_length: int = option(512, "new tokens per completion (TRL 1.16's default 512)", ge=1)
    mask_truncated_completions: bool = option(False, "leave completions that hit max_completion_length without EOS "
                                                     "out of the loss (TRL)")
    temperature: float = option(1.0, "sampling temperature (also used in the log-probs, as TRL does)", gt=0)
    top_p: float = option(1.0, "nucleus sampling mass", gt=0, le=1)
    top_k: int = option(0, "sample among the k most likely tokens only (0: all; TRL's)", ge=0)
    min_p: Optional[float] = option(None, "drop tokens below min_p × the top probability (TRL's)", gt=0, le=1)
    repetition_penalty: float = option(1.0, "generation only, as TRL: logits of tokens already in the sequence "
                                            "divided (if > 0) or multiplied by it", gt=0)
    generation_kwargs: Optional[dict] = option(None, "TRL's: sampling keywords (top_k, min_p, repetition_penalty, "
                                                     "top_p, temperature) overriding the flags")
    reward_funcs: Optional[list[str]] = option(None, "reward functions (a list or comma-separated): built-in "
                                                     "`exact_match` / `closeness` (data/arithmetic.py), "
                                                     "`module:function`, a dotted `pkg.module.function` or "
                                                     "`path/file.py:function`, with TRL's signature; none: the "
                                                     "built-in task's exact_match")
    reward_weights: Optional[list[float]] = option(None, "one weight per reward function (default: 1 each)")
    scale_rewards: str = option("group", "advantage std: per group, whole batch, or none",
                                choices=["group", "batch", "none"])
    adv_eps: float = option(1e-4, "ε in (r − mean)/(std + ε); TRL uses 1e-4, verl/official SALT 1e-6", ge=0)
    epsilon: float = option(0.2, "lower clip ε of the ratio", gt=0, lt=1)
    epsilon_high: Optional[float] = option(None, "upper clip ε_high (DAPO: 0.28); default ε", gt=0)
    beta: float = option(0.0, "KL coefficient to a frozen reference (k3 estimator); 0 loads no reference", ge=0)
    loss_type: str = option("dapo", "aggregation (TRL's): grpo (sequence mean), bnpo (token mean of each "
                                    "micro-batch), dr_grpo (/ B·L), dapo (token mean over the optimizer step; verl's "
                                    "token-mean)", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    learning_rate: float = option(1e-6, "AdamW learning rate (TRL's default 1e-6)", ge=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = option(0.9, "AdamW β1", ge=0, lt=1)
    adam_beta2: float = option(0.999, "AdamW β2 (TRL's default 0.999)", ge=0, lt=1)
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", ge=0)
    warmup_steps: int = option(0, "warm-up steps (transformers.get_scheduler); 0: warmup_ratio × max_steps", ge=0)
    warmup_ratio: float = option(0.0, "warm-up as a fraction of max_steps (TRL's)", ge=0, le=1)
    lr_scheduler_type: str = option("linear", "transformers' schedule (TRL's default linear)",
                                    choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                             "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
                                             "warmup_stable_decay"])
    lr_scheduler_kwargs: Optional[dict] = option(None, "more keywords for the schedule (TRL's), e.g. "
                                                       "{\"num_cycles\": 1}")
    # SALT
    salt: str = option("official", "off = GRPO; official = released rule; identity = GRPO through SALT (self-check); "
                                   "random_subspace / amplify / positive_only = research controls, not the authors' "
                                   "rule", choices=SALT_MODES)
    salt_scope: str = option("mini", "mini: all rollouts of an optimizer step (whole groups); micro: each "
                                     "micro-batch on each process (the official code)", choices=["mini", "micro"])
    salt_gram: str = option("raw", "the Gram the rule reads: raw = K (the paper, the authors' code); cosine = "
                                   "K_ij/√(K_ii K_jj) (a departure from both: experiment 12, docs/RESULTS.md)",
                            choices=["raw", "cosine"])
    salt_features: str = option("lm_head", "lm_head: exact Gram of the LM-head score gradients (official; the sketch "
                                           "above salt_exact_budget); sketch: TensorSketch; layers: exact Gram of "
                                           "salt_layers' gradients (a Kronecker projection above the budget)",
                                choices=["lm_head", "sketch", "layers"])
    salt_layers: str = option("last:1", "layer spec for salt_features=layers (lm_head, last:N, lora, all, regex)")
    salt_exact_budget: float = option(1e11, "largest exact Gram, N²·Σ(d_out + d_in) multiply-adds over the N tokens "
                                            "of a SALT scope (LM head: V + H); above it lm_head uses the sketch", gt=0)
    salt_sketch_dim: int = option(4096, "TensorSketch dimension d (sketch, or lm_head above the budget)", ge=2)
    salt_k_out: int = option(32, "layers above the budget: Kronecker projection rows, output side", ge=1)
    salt_k_in: int = option(32, "layers above the budget: Kronecker projection rows, input side", ge=1)
    salt_rho: float = option(1.0, "ρ: k = round(ρ·PR) (release yaml 1.0; the code's dataclass says 0.5)", gt=0)
    salt_k_min: int = option(1, "k_min", ge=1)
    salt_k_max: int = option(64, "k_max", ge=1)
    salt_alpha_min: float = option(0.0, "α_min")
    salt_alpha_max: float = option(1.0, "α_max")
    salt_relu: bool = option(True, "φ = relu on the tail channel (official use_relu_exploration)")
    salt_renorm: str = option("none", "rescale a′: std (official normalize_final), l2, or none",
                              choices=["none", "std", "l2"])
    salt_lambda: float = option(1.0, "λ of the `amplify` control: a′ = P a + (1 + λ·c)(I − P) a", ge=0)


# The built-in demo's own settings (it used to hold the defaults): what `bash run.sh` runs.
DEMO = dict(seed=0, learning_rate=1e-5, adam_beta2=0.99, lr_scheduler_type="constant", gradient_checkpointing=False,
            max_completion_length=24, prompts_per_step=4, micro_batch_size=0, max_steps=32, save_every=0,
            reward_funcs=["exact_match"], logging_steps=1, output_dir="outputs/salt_grpo")
PRESETS = {
    "demo": DEMO,
    "smoke": dict(DEMO, model=harness.TINY, bf16=False, max_steps=3, prompts_per_step=2, num_generations=4,
                  max_completion_length=8, eval_size=8, task_size=64, learning_rate=1e-3, reward_funcs=["closeness"],
                  output_dir="outputs/salt_grpo_smoke"),
}


def demo_config(**kw) -> Config:
    """The built-in demo's Config (TRL's defaults overridden by DEMO) with kw on top: what experiments/ and bench/ run."""
    return Config(**{**DEMO, **kw})


# fields a resumed run may change: they do not alter the training trajectory (a linear schedule follows max_steps;
# eval_size is not one of them: it decides which prompts of a dataset are held out)
RESUMABLE = {"max_steps", "num_train_epochs", "eval_every", "eval_strategy", "eval_batch_size", "save_every",
             "save_strategy", "save_total_limit", "report_to", "logging_steps", "log_completions", "output_dir",
             "overwrite_output_dir", "resume_from", "config", "preset"}
# What a run of salt_grpo.py writes in its output folder (what --overwrite_output_dir replaces; nothing else there is
# touched), the folder being the contract of harness.OutputFolder.
OWNED = ["checkpoint-*", ".checkpoint-*.tmp", "final", ".final.tmp", "metrics.jsonl", "summary.json", "config.json",
         "last_sample.json", "last_advantages.safetensors", "metrics.png", "completions.jsonl", "salt_grpo"]
# (salt_grpo: the trackers' folder, accelerate's logging_dir/project name; --overwrite_output_dir replaces it too)


def parse_config(argv: list[str]) -> Config:
    """Dataclass defaults < --preset < --config file < CLI flags (harness.parse_config); the values are checked once,
    by validate(), when the run starts."""
    return harness.parse_config(Config, argv, PRESETS, check=False)


def resolve_batch(cfg: Config, n_proc: int) -> None:
    """The batch in both terms, written back to cfg (so that a second call, and a checkpoint, see one consistent set):
    prompts_per_step P (all processes), micro_batch_size mb (completions per forward per process),
    gradient_accumulation_steps GA, optimizer_steps_per_generation S and TRL's steps_per_generation S·GA. Given P
    (this project's terms), each process's P/n_proc·G completions split into micro-batches of mb (default all);
    else TRL's: mb (default 8) × GA (default 1) completions per process per step, whole groups per process."""
    G = cfg.num_generations
    if cfg.prompts_per_step is not None:
        if cfg.prompts_per_step % n_proc:
            raise UserError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the {n_proc} processes",
                            hint="each process generates whole groups: make prompts_per_step a multiple of the "
                                 "process count")
        n = cfg.prompts_per_step // n_proc * G
        mb = min(cfg.micro_batch_size or n, n)
        ga = -(-n // mb)
        if cfg.gradient_accumulation_steps not in (None, ga):
            raise UserError(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} disagrees with "
                            f"prompts_per_step={cfg.prompts_per_step}: {n} completions per process in micro-batches "
                            f"of {mb} make {ga}", hint="size the batch in one of the two terms")
    else:
        mb = 8 if cfg.micro_batch_size is None else cfg.micro_batch_size
        ga = cfg.gradient_accumulation_steps or 1
        if mb == 0 or (mb * ga) % G:
            raise UserError(f"--per_device_train_batch_size {mb} × --gradient_accumulation_steps {ga} = {mb * ga} "
                            f"completions per process and step is not a multiple of num_generations={G}",
                            hint="each process generates whole groups of G completions; or give --prompts_per_step")
        n = mb * ga
        cfg.prompts_per_step = n * n_proc // G
    if cfg.steps_per_generation is not None:
        if cfg.steps_per_generation % ga:
            raise UserError(f"--steps_per_generation {cfg.steps_per_generation} (TRL's: micro-batch steps per "
                            f"generation round) is not a multiple of gradient_accumulation_steps={ga}",
                            hint="or give this project's --optimizer_steps_per_generation")
        if cfg.optimizer_steps_per_generation not in (None, cfg.steps_per_generation // ga):
            raise UserError(f"--steps_per_generation {cfg.steps_per_generation} and --optimizer_steps_per_generation "
                            f"{cfg.optimizer_steps_per_generation} disagree (gradient_accumulation_steps={ga})")
        cfg.optimizer_steps_per_generation = cfg.steps_per_generation // ga
    cfg.optimizer_steps_per_generation = cfg.optimizer_steps_per_generation or 1
    cfg.micro_batch_size, cfg.gradient_accumulation_steps = mb, ga
    cfg.steps_per_generation = cfg.optimizer_steps_per_generation * ga


def validate(cfg: Config, num_processes: int = 1) -> Config:
    """Fail early, with the flag to change: every field's declared checks, the run settings that cannot work
    together (harness.check_run), then the method's."""
    def need(ok, msg, hint=None):
        if not ok:
            raise UserError(msg, hint=hint)

    gen = harness.typed_value("--generation_kwargs", cfg.generation_kwargs, dict) or {}
    bad = sorted(set(gen) - {"top_k", "min_p", "repetition_penalty", "top_p", "temperature"})
    need(not bad, f"--generation_kwargs {', '.join(bad)}: not supported here (the sampler is exact, seeded per "
         "rollout)", "use top_k, min_p, repetition_penalty, top_p or temperature")
    for k, v in gen.items():  # TRL: generation_kwargs override the sampling flags (checked below with them)
        setattr(cfg, k, v)
    cfg.generation_kwargs = None
    harness.check_config(cfg)
    harness.check_run(cfg)

    need(cfg.num_generations >= 2, f"num_generations={cfg.num_generations}: GRPO needs at least 2 completions "
         "per prompt (a group of 1 has no baseline)", "pass --num_generations 2 or more")
    resolve_batch(cfg, num_processes)
    if cfg.reward_funcs is None:  # the built-in task carries its verifier; a dataset needs the user's
        need(not cfg.dataset, "--reward_funcs: none given for --dataset", "pass reward functions (TRL's "
             "reward_funcs), e.g. exact_match or module:function")
        cfg.reward_funcs = ["exact_match"]

    need(cfg.salt_k_min <= cfg.salt_k_max, "need salt_k_min ≤ salt_k_max")
    need(cfg.salt_alpha_min <= cfg.salt_alpha_max, "need salt_alpha_min ≤ salt_alpha_max")
    need(cfg.salt != "positive_only" or cfg.salt_scope == "mini",
         "salt=positive_only recentres within groups, which needs whole groups", "pass --salt_scope mini")
    local = cfg.prompts_per_step // num_processes * cfg.num_generations
    need(cfg.salt == "off" or cfg.salt_scope == "mini" or min(cfg.micro_batch_size or local, local) >= 2,
         f"--salt_scope micro with --micro_batch_size {cfg.micro_batch_size} gives SALT one rollout per micro-batch "
         "(B = 1), so it could never act", "raise --micro_batch_size, use --salt_scope mini, or pass --salt off")
    need(harness.reward_names(cfg), "--reward_funcs is empty", "pass exact_match, closeness or module:function")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# The run: build (every check, then the model), train (the output folder, the loop), main
# ----------------------------------------------------------------------------------------------------------

def load_rows(cfg: Config) -> tuple[list[harness.Row], list[harness.Row]]:
    """(train, held-out) rows of the run's dataset (harness.load_rows); with a built-in reward the answer column must
    hold numbers."""
    return harness.load_rows(cfg, any(n in arithmetic.REWARDS for n in harness.reward_names(cfg)))


def output_folder(cfg: Config) -> harness.OutputFolder:
    """The run's output folder, with every input it must not hold: local data files, a local model, the checkpoint
    resumed (whose own run folder is written in place)."""
    local = [("--dataset", cfg.dataset), ("--eval_dataset", cfg.eval_dataset), ("--model", cfg.model)]
    inputs = [(flag, p) for flag, p in local if p and Path(p).exists()]
    if cfg.resume_from:
        inputs.append(("--resume_from", cfg.resume_from))
    return harness.OutputFolder(cfg.output_dir, overwrite=cfg.overwrite_output_dir, owned=OWNED, inputs=inputs,
                                resume_dir=Path(cfg.resume_from).parent if cfg.resume_from else None)


def build(cfg: Config, accelerator=None) -> Trainer:
    """Everything before the first step. The Accelerator comes first (it alone decides the process count); then
    every check that can fail (settings, output paths, reward functions, the checkpoint, the data, the model, the
    chat template on every prompt, each reward function called on one row). Nothing is written: train() opens the
    output folder after this, so a run that cannot start leaves it as it was."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import get_scheduler

    if accelerator is not None:
        accelerator.free_memory()  # a reused Accelerator must not save or load the previous run's model
    harness.check_trackers(harness.report_to(cfg))  # the Accelerator takes them: a bad name is our one-line error
    accelerator = accelerator or Accelerator(log_with=harness.report_to(cfg) or None, project_dir=cfg.output_dir)
    n_proc = accelerator.num_processes
    validate(cfg, n_proc)
    weights = harness.reward_weights(cfg)
    folder = output_folder(cfg)
    folder.check()
    rewards = harness.load_reward_funcs(cfg, arithmetic.REWARDS)
    train_rows, eval_rows = load_rows(cfg)
    if cfg.max_steps < 0:  # TRL: num_train_epochs passes over the prompts (each drawn once per epoch)
        cfg.max_steps = math.ceil(cfg.num_train_epochs * len(train_rows) / cfg.prompts_per_step)
    resume = (harness.read_checkpoint(cfg.resume_from, dataclasses.asdict(cfg), RESUMABLE, n_proc, cfg.max_steps)
              if cfg.resume_from else None)
    data_sha = harness.data_fingerprint(train_rows, eval_rows)
    if resume is not None:
        harness.check_same_data(cfg.resume_from, resume, data_sha, cfg.dataset)
    dt = accelerator.distributed_type
    if dt == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise UserError("FSDP1 is not supported: generation needs FSDP2's per-forward gathering",
                        hint="set fsdp_version: 2 in the accelerate config's fsdp_config")
    n_local = cfg.prompts_per_step // accelerator.num_processes * cfg.num_generations
    mb = min(cfg.micro_batch_size or n_local, n_local)
    accelerator.gradient_accumulation_steps = -(-n_local // mb)
    if dt == DistributedType.DEEPSPEED:  # our flags own the batch shape and the clipping
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
            train_batch_size=mb * accelerator.gradient_accumulation_steps * accelerator.num_processes,
            gradient_clipping=cfg.max_grad_norm)
    zero3 = dt == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    model, tok, ref = harness.load_policy(cfg, accelerator.device, zero3, reference=cfg.beta > 0)
    texts = harness.check_prompts(cfg, tok, train_rows + eval_rows)
    harness.probe_rewards(rewards, tok, train_rows[0])
    if accelerator.is_main_process:
        harness.warn_about_run(cfg, tok, texts, accelerator.device, n_local)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    # not prepared (accelerate would step it once per process); its state is in each checkpoint's state.json
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_training_steps=cfg.max_steps,
                          num_warmup_steps=cfg.warmup_steps or math.ceil(cfg.warmup_ratio * cfg.max_steps),
                          scheduler_specific_kwargs=cfg.lr_scheduler_kwargs)
    prepared, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(prepared)
    spec = FeatureSpec(raw, cfg)  # after prepare: projections live on the model's device
    synced = accelerator.num_processes > 1 and dt in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return Trainer(cfg=cfg, accelerator=accelerator, model=prepared, raw=raw, ref=ref, tok=tok, opt=opt, sched=sched,
                   spec=spec, train_rows=train_rows, eval_rows=eval_rows, rewards=rewards,
                   reward_weights=torch.tensor(weights, dtype=torch.float64), eos=harness.eos_ids(raw, tok),
                   synced=synced, folder=folder, resume=resume, data_sha=data_sha)


def train(cfg: Config, accelerator=None) -> dict:
    """The whole run; returns the summary (on every process). The output folder is released however it ends."""
    run_start = time.perf_counter()
    trainer = build(cfg, accelerator)
    trainer.folder.open_on_all(trainer.accelerator)  # the first write: every check has passed
    try:
        return training_loop(trainer, run_start)
    finally:
        trainer.folder.close()


PLOT_KEYS = ["reward", "reward_std", "frac_reward_zero_std", "eval/accuracy", "eval/reward", "loss", "entropy",
             "grad_norm", "completions/mean_length", "clip_ratio/region_mean", "kl", "step_time",
             "salt/participation_ratio", "salt/pr_over_B", "salt/neff", "salt/neff_after", "salt/alpha", "salt/k",
             "salt/main_contrib_ratio", "salt/cos_grpo_salt", "salt/zero_adv_mass"]


COMPARE_PANELS = [("reward", "mean reward (train)", True), ("eval/accuracy", "held-out accuracy", False),
                  ("eval/reward", "held-out reward", False), ("salt/alpha", "α (tail weight)", True),
                  ("salt/neff", "n_eff (signed-update)", True), ("salt/k", "k (kept directions)", True),
                  ("salt/participation_ratio", "participation ratio PR", True)]


def run_label(run: Path) -> str:
    """A run's legend label from its config.json: GRPO for --salt off, else SALT's mode and scope."""
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    if not cfg:
        return run.name
    if cfg.get("salt") == "off":
        return "GRPO (--salt off)"
    return f"SALT {cfg.get('salt')} ({cfg.get('salt_scope')} scope)"


def plot_command(argv: list[str]) -> None:
    """`plot RUN`: every metric of one run to RUN/metrics.png. `plot RUN [RUN ...]` (a quoted glob is one arm, its runs
    drawn as mean ± std): one figure comparing them, smoothed reward and held-out accuracy, α, n_eff, k and PR."""
    import argparse

    ap = argparse.ArgumentParser(prog="salt_grpo.py plot", description=plot_command.__doc__)
    ap.add_argument("runs", nargs="+", help="run folders (output_dir), or quoted globs, one arm each")
    ap.add_argument("--out", help="the PNG to write (default: RUN/metrics.png for one run, else runs.png)")
    ap.add_argument("--labels", nargs="+", help="one legend label per RUN (default: from each run's config.json)")
    ap.add_argument("--smooth", type=int, default=5, help="moving-mean window of the smoothed panels (steps)")
    ap.add_argument("--title", default="", help="figure title")
    a = ap.parse_args(argv)
    if len(a.runs) == 1 and not glob.has_magic(a.runs[0]) and not a.out and not a.labels:
        print(f"wrote {harness.plot_run(a.runs[0], PLOT_KEYS)}")
        return
    if a.labels and len(a.labels) != len(a.runs):
        raise UserError(f"--labels gives {len(a.labels)} labels for {len(a.runs)} runs", hint="one label per RUN")
    if a.smooth < 1:
        raise UserError(f"--smooth {a.smooth}: the window must be ≥ 1")
    arms: dict[str, list[Path]] = {}
    for i, pattern in enumerate(a.runs):
        runs = harness.run_folders(pattern)
        label = a.labels[i] if a.labels else run_label(runs[0])
        while label in arms:  # two arms with one label (e.g. two GRPO runs): tell them apart by folder
            label = f"{label} [{pattern}]"
        arms[label] = runs
    title = a.title or " vs ".join(arms)
    print(f"wrote {harness.plot_runs(arms, COMPARE_PANELS, a.out or 'runs.png', title, window=a.smooth)}")


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        plot_command(argv[1:])
        return None
    s = train(parse_config(argv))
    harness.print_run_summary(s, f"SALT[{s['salt']}] GRPO", "python salt_grpo.py plot")
    return s


if __name__ == "__main__":
    harness.run_main(main)
