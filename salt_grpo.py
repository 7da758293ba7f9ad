"""GRPO on Accelerate with the SALT plug-in (arXiv 2606.05800), one file, read top to bottom beside the paper.

    accelerate launch salt_grpo.py                    # SmolLM2-135M-Instruct, data/arithmetic, SALT `official`
    python salt_grpo.py --preset smoke                # tiny random model, seconds, SALT acting (partial-credit reward)
    python salt_grpo.py --salt off                    # plain GRPO (the matched baseline)
    python salt_grpo.py plot outputs/salt_grpo        # draw metrics.jsonl to metrics.png

GRPO: for each prompt draw G completions, score them with verifiable rewards, turn rewards into group-relative
advantages a_i = (r_i − mean_g r) / (std_g r + eps) and minimise the PPO clipped surrogate on token ratios.
SALT replaces a (one scalar per rollout) by a′ computed from the Gram K of per-rollout gradient features:
    PR = (tr K)² / ‖K‖_F²,  k = clip(round(ρ·PR), k_min, min(k_max, B−1)),  P = V_k V_kᵀ (top-k eigenvectors of K),
    n_eff = aᵀKa / Σ_i a_i² K_ii,  α = clip(1 − n_eff, α_min, α_max),  a′ = P a + α (I − P) relu(a).
Everything else (reward, sampler, loss, optimizer) is unchanged. The rule follows the authors' released code
(Chang-pw/SALT, advantage_decomposition.py); see docs/salt.md for the paper-to-code map and the deviations.

Sections, in reading order: config; the method (`group_advantages`, `salt_rule`, `clipped_policy_loss`); the
per-rollout features whose Gram SALT reads; rollouts; the training loop; data and rewards; checkpoints; the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import common
from common import UserError, option as _f
from data import arithmetic

# ----------------------------------------------------------------------------------------------------------
# Config: one dataclass, every field a CLI flag with its checks; TRL's names and meanings where they overlap
# ----------------------------------------------------------------------------------------------------------


SALT_MODES: dict = {"off": None}  # filled after the rules below; the `salt` field accepts each key


@dataclass
class Config:
    # model and run
    model: str = _f(common.EMBEDDED, "`embedded` (SmolLM2-135M-Instruct), `tiny`, a local folder or a hub id",
                    path=True)
    preset: str = _f("", "`smoke`: tiny random model, partial-credit reward, a few steps (seconds)",
                     choices=["", "smoke"])
    config: str = _f("", "optional YAML/JSON file with any of these fields (CLI flags override it)", path=True)
    output_dir: str = _f("outputs/salt_grpo", "metrics.jsonl, checkpoints, final model, summary.json", path=True)
    overwrite_output_dir: bool = _f(False, "replace the run in a non-empty output_dir (as HF Trainer), once the new "
                                    "run has a checkpoint or its final model; until then the old run stays whole")
    seed: int = _f(0, "seed of data order, rollouts, projections", ge=0, le=2**32 - 1)
    dtype: str = _f("float32", "weights dtype (TRL's ModelConfig.dtype); auto: the checkpoint's own",
                    choices=["auto", "float32", "bfloat16", "float16"])
    bf16: bool = _f(True, "bf16 autocast for forwards and generation (log-probs, ratios and the loss stay fp32)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward: less memory, more compute")
    use_peft: bool = _f(False, "train a LoRA adapter (peft) instead of every weight; the KL reference is the base")
    lora_r: int = _f(16, "LoRA rank", ge=1)
    lora_alpha: int = _f(32, "LoRA α (the update is scaled by α/r)", ge=1)
    lora_dropout: float = _f(0.05, "LoRA dropout (TRL's default; 0: rollouts and training use one function)",
                             ge=0, lt=1)
    lora_target_modules: str = _f("", "comma-separated module names or `all-linear`; empty: peft's default")
    trust_remote_code: bool = _f(False, "passed to from_pretrained")
    # data and rewards
    dataset: str = _f("", "empty: the built-in arithmetic task; else a hub id or a local .jsonl/.json/.parquet/.csv",
                      path=True)
    dataset_config: Optional[str] = _f(None, "hub dataset config name (e.g. `main` for gsm8k)")
    dataset_split: str = _f("train", "split or slice to train on (train[:1000]); a local file is the one split train")
    eval_split: str = _f("", "split to evaluate on (hub datasets); empty: hold out eval_size distinct prompts")
    eval_dataset: str = _f("", "a separate evaluation file or hub id (same columns); overrides eval_split",
                           path=True)
    prompt_column: str = _f("question", "column holding the prompt: text, or a [{role, content}] conversation")
    answer_column: str = _f("answer", "column the built-in rewards read (a number, or text ending in `#### N`)")
    prompt_suffix: str = _f("", "appended to every prompt (to the last message of a conversation)")
    system_prompt: str = _f("", "system message before every prompt that has none")
    max_prompt_length: int = _f(512, "prompt tokens kept; longer prompts are cut on the left (a warning says how "
                                "many)", ge=1)
    reward_funcs: str = _f("exact_match", "comma-separated: built-in `exact_match` / `closeness`, or "
                           "`module:function` / `path/file.py:function` with TRL's signature "
                           "f(completions, **columns) -> list[float]")
    reward_weights: str = _f("", "comma-separated weights, one per reward function (default: 1 each)")
    task_size: int = _f(4096, "built-in task: number of training problems", ge=1)
    task_min_terms: int = _f(2, "built-in task: fewest terms in a sum", ge=1)
    task_max_terms: int = _f(2, "built-in task: most terms in a sum", ge=1)
    task_digits: int = _f(1, "built-in task: digits per term", ge=1, le=6)
    task_word_frac: float = _f(0.25, "built-in task: fraction of short word problems", ge=0, le=1)
    eval_size: int = _f(64, "held-out problems for greedy evaluation", ge=0)
    # GRPO (TRL names)
    num_generations: int = _f(8, "G: completions per prompt")
    prompts_per_step: int = _f(4, "prompts per optimizer step, all processes together", ge=1)
    steps_per_generation: int = _f(1, "optimizer steps per generation round (a round samples prompts_per_step × "
                                   "this prompts once); TRL's name, counted here in optimizer steps", ge=1)
    micro_batch_size: int = _f(0, "rollouts per forward/backward per process; 0: all of a step's at once (CPU demo; "
                               "set it on GPUs)", ge=0)
    num_iterations: int = _f(1, "μ: passes over each generation round; >1 uses stored old log-probs", ge=1)
    max_steps: int = _f(32, "optimizer steps", ge=0)
    max_completion_length: int = _f(24, "new tokens per completion", ge=1)
    mask_truncated_completions: bool = _f(False, "leave completions that hit max_completion_length without EOS out "
                                          "of the loss (TRL)")
    temperature: float = _f(1.0, "sampling temperature (also used in the log-probs, as TRL does)", gt=0)
    top_p: float = _f(1.0, "nucleus sampling mass", gt=0, le=1)
    epsilon: float = _f(0.2, "lower clip ε of the ratio", gt=0, lt=1)
    epsilon_high: Optional[float] = _f(None, "upper clip ε_high (DAPO: 0.28); default ε", gt=0)
    beta: float = _f(0.0, "KL coefficient to a frozen reference (k3 estimator); 0 loads no reference", ge=0)
    scale_rewards: str = _f("group", "advantage std: per group, whole batch, or none",
                            choices=["group", "batch", "none"])
    adv_eps: float = _f(1e-4, "eps in (r − mean)/(std + eps); TRL uses 1e-4, verl/official SALT 1e-6", ge=0)
    loss_type: str = _f("dapo", "aggregation: grpo (seq mean), dr_grpo (/ B·L), dapo = token-mean",
                        choices=["grpo", "dr_grpo", "dapo", "token-mean"])
    learning_rate: float = _f(1e-5, "AdamW learning rate", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = _f(0.9, "AdamW β1", ge=0, lt=1)
    adam_beta2: float = _f(0.99, "AdamW β2", ge=0, lt=1)
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)", ge=0)
    warmup_steps: int = _f(0, "linear warm-up steps", ge=0)
    lr_scheduler_type: str = _f("constant", "after warm-up", choices=["constant", "linear"])
    # evaluation, logging, checkpoints
    eval_every: int = _f(0, "greedy held-out evaluation every N steps (0: only at start and end)", ge=0)
    eval_batch_size: int = _f(64, "prompts per greedy generate call", ge=1)
    save_every: int = _f(0, "checkpoint every N steps (0: only the final model)", ge=0)
    resume_from: str = _f("", "checkpoint folder to continue from (output_dir/checkpoint-N)", path=True)
    report_to: str = _f("none", "comma-separated accelerate trackers (tensorboard, wandb, ...) or none")
    # SALT
    salt: str = _f("official", "off = GRPO; official = released rule; identity = GRPO through SALT (self-check); "
                   "random_subspace / amplify / positive_only = research controls, not the authors' rule",
                   choices=SALT_MODES)
    salt_scope: str = _f("mini", "mini: all rollouts of an optimizer step (whole groups); "
                         "micro: each micro-batch on each process (the official code)", choices=["mini", "micro"])
    salt_features: str = _f("lm_head", "lm_head: exact Gram of the LM-head score gradients (official; sketch above "
                            "salt_exact_budget); sketch: TensorSketch; kronecker: factored projection; layers: exact "
                            "Gram of salt_layers' gradients (kronecker above the budget)",
                            choices=["lm_head", "sketch", "kronecker", "layers"])
    salt_layers: str = _f("last:1", "layer spec for salt_features=layers (lm_head, last:N, lora, all, regex)")
    salt_exact_budget: float = _f(1e11, "largest exact Gram, N²·Σ(d_out + d_in) multiply-adds over the N tokens of "
                                  "a SALT scope (LM head: V + H); above it lm_head uses the sketch", gt=0)
    salt_sketch_dim: int = _f(4096, "TensorSketch dimension d (sketch, or lm_head above the budget)", ge=2)
    salt_k_out: int = _f(32, "kronecker projection rows on the output side (vocab for the LM head)", ge=1)
    salt_k_in: int = _f(32, "kronecker projection rows on the input side (hidden)", ge=1)
    salt_rho: float = _f(1.0, "ρ: k = round(ρ·PR) (release yaml 1.0; the code's dataclass says 0.5)", gt=0)
    salt_k_min: int = _f(1, "k_min", ge=1)
    salt_k_max: int = _f(64, "k_max", ge=1)
    salt_alpha_min: float = _f(0.0, "α_min")
    salt_alpha_max: float = _f(1.0, "α_max")
    salt_relu: bool = _f(True, "φ = relu on the tail channel (official use_relu_exploration)")
    salt_renorm: str = _f("none", "rescale a′: std (official normalize_final), l2, or none",
                          choices=["none", "std", "l2"])
    salt_lambda: float = _f(1.0, "λ of the `amplify` control: a′ = P a + (1 + λ·c)(I − P) a", ge=0)


PRESETS = {
    "smoke": dict(model=common.TINY, bf16=False, max_steps=3, prompts_per_step=2, num_generations=4,
                  max_completion_length=8, eval_size=8, task_size=64, learning_rate=1e-3, reward_funcs="closeness",
                  output_dir="outputs/salt_grpo_smoke"),
}
# fields a resumed run may change: they do not alter the training trajectory (a linear schedule follows max_steps;
# eval_size is not one of them: it decides which prompts of a dataset are held out)
RESUMABLE = {"max_steps", "eval_every", "eval_batch_size", "save_every", "report_to", "output_dir",
             "overwrite_output_dir", "resume_from", "config", "preset"}


def validate(cfg: Config, num_processes: int = 1) -> Config:
    """Fail early, with the flag to change: every field's declared checks, then the settings that cannot work
    together."""
    common.check_config(cfg)

    def need(ok, msg, hint=None):
        if not ok:
            raise UserError(msg, hint=hint)

    need(cfg.num_generations >= 2, f"num_generations={cfg.num_generations}: GRPO needs at least 2 completions "
         "per prompt (a group of 1 has no baseline)", "pass --num_generations 2 or more")
    need(cfg.prompts_per_step % num_processes == 0,
         f"prompts_per_step={cfg.prompts_per_step} is not divisible by the {num_processes} processes",
         "each process generates whole groups: make prompts_per_step a multiple of the process count")
    need(cfg.task_min_terms <= cfg.task_max_terms, "need task_min_terms ≤ task_max_terms")
    need(cfg.salt_k_min <= cfg.salt_k_max, "need salt_k_min ≤ salt_k_max")
    need(cfg.salt_alpha_min <= cfg.salt_alpha_max, "need salt_alpha_min ≤ salt_alpha_max")
    need(cfg.salt != "positive_only" or cfg.salt_scope == "mini",
         "salt=positive_only recentres within groups, which needs whole groups", "pass --salt_scope mini")
    local = cfg.prompts_per_step // num_processes * cfg.num_generations
    need(cfg.salt == "off" or cfg.salt_scope == "mini" or min(cfg.micro_batch_size or local, local) >= 2,
         f"--salt_scope micro with --micro_batch_size {cfg.micro_batch_size} gives SALT one rollout per micro-batch "
         "(B = 1), so it could never act", "raise --micro_batch_size, use --salt_scope mini, or pass --salt off")
    need(reward_names(cfg), "--reward_funcs is empty", "pass exact_match, closeness or module:function")
    reward_weights(cfg)
    need(cfg.eval_size > 0 or not cfg.eval_every, f"--eval_every {cfg.eval_every} with --eval_size 0: there is nothing "
         "to evaluate", "pass --eval_size N, or drop --eval_every")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    lora_set = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules") if getattr(cfg, k) != defaults[k]]
    need(cfg.use_peft or not lora_set, f"--{lora_set[0] if lora_set else ''} is set but --use_peft is off, so no "
         "adapter would use it", "pass --use_peft to train a LoRA adapter, or drop the LoRA flags")
    check_trackers(cfg)
    return cfg


def check_trackers(cfg: Config) -> None:
    """--report_to names accelerate trackers that are installed (checked before the Accelerator, which takes them)."""
    trackers = {"tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio"}
    for name in report_to(cfg):
        if name not in trackers:
            raise UserError(f"--report_to {name!r} is not an accelerate tracker ({', '.join(sorted(trackers))})")
        mods = ["tensorboard", "tensorboardX"] if name == "tensorboard" else [name]
        if not any(importlib.util.find_spec(m) for m in mods):
            raise UserError(f"--report_to {name}: {name} is not installed", hint=f"pip install {name}")


def report_to(cfg: Config) -> list[str]:
    return [s.strip() for s in cfg.report_to.split(",") if s.strip() and s.strip() != "none"]


def reward_names(cfg: Config) -> list[str]:
    return [s.strip() for s in cfg.reward_funcs.split(",") if s.strip()]


def reward_weights(cfg: Config) -> list[float]:
    """--reward_weights as numbers, one per reward function (default: 1 each)."""
    names = reward_names(cfg)
    try:
        w = [float(x) for x in cfg.reward_weights.split(",")] if cfg.reward_weights.strip() else [1.0] * len(names)
    except ValueError:
        w = [math.nan]
    if len(w) != len(names) or not all(map(math.isfinite, w)):
        raise UserError(f"--reward_weights {cfg.reward_weights!r}: need {len(names)} finite numbers, one per reward "
                        f"function ({', '.join(names)})")
    return w


def parse_config(argv: list[str]) -> Config:
    """Dataclass defaults < --preset < --config file < CLI flags, each value checked (common.parse_config)."""
    return common.parse_config(Config, argv, PRESETS)


# ----------------------------------------------------------------------------------------------------------
# The method: group-relative advantages, SALT, the clipped policy loss
# ----------------------------------------------------------------------------------------------------------

def group_advantages(r: torch.Tensor, G: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantage a_i = (r_i − mean_g r) / (std + eps), groups of G consecutive rollouts.

    std: Bessel-corrected (unbiased) std of the rollout's group (`group`), of the whole batch (`batch`, LitePPO),
    or 1 (`none`, Dr. GRPO). A group whose rewards are all equal gets advantage 0 exactly, whatever eps (eps = 0
    included; its mean can differ from its rewards in the last bit, which eps alone would turn into ±1/eps·1e-17).
    """
    g = r.double().view(-1, G)
    constant = (g == g[:, :1]).all(1, keepdim=True).expand_as(g).flatten()
    centred = (g - g.mean(1, keepdim=True)).flatten().masked_fill(constant, 0.0)
    if scale == "none":
        return centred
    std = g.std(1, keepdim=True).expand_as(g).flatten() if scale == "group" else r.double().std().expand_as(centred)
    return torch.where(constant, 0.0, centred / (std + eps))


def salt_rule(K: torch.Tensor, a: torch.Tensor, cfg: Config, relu: bool, alpha_of, random_subspace: bool = False,
              generator: torch.Generator | None = None):
    """SALT's reweighting of the advantages a (B,) from the Gram K (B×B) of per-rollout gradients, float64:

        PR = (tr K)² / ‖K‖_F²,  k = max(k_min, min(round(ρ·PR), k_max, B−1)),  P = V_k V_kᵀ,
        n_eff = aᵀKa / Σ_i a_i² K_ii,  α = clip(1 − n_eff, α_min, α_max),  a′ = P a + α (I − P) φ(a).

    relu: φ = relu (else identity); alpha_of: n_eff ↦ α (the controls change it). Returns (a′, the rule's terms)."""
    B, I = a.numel(), torch.eye(a.numel(), dtype=torch.float64)
    pr = common.participation_ratio(K)                 # PR = (tr K)² / ‖K‖_F², the spectral spread
    k = subspace_size(pr, B, cfg)                      # k = max(k_min, min(round(ρ·PR), k_max, B−1))
    P, top = spectral_projector(K, k, random_subspace, generator)  # P = V_k V_kᵀ
    n_eff = common.signed_neff(K, a)                   # n_eff = aᵀKa / Σ_i a_i² K_ii, signed cancellation
    alpha = alpha_of(n_eff)                            # α = clip(1 − n_eff, α_min, α_max) (official)
    phi = a.clamp(min=0) if relu else a                # φ(a) = relu(a) (official)
    a_dom = P @ a                                      # the dominant ("shared") channel
    a_tail = (I - P) @ phi                             # the spectral-tail ("residual") channel
    a_new = a_dom + alpha * a_tail                     # a′ = P a + α (I − P) φ(a)
    return a_new, dict(pr=pr, k=k, top=top, n_eff=n_eff, alpha=alpha, a_dom=a_dom, a_tail=a_tail, p_diag=torch.diagonal(P))


def subspace_size(pr: float, B: int, cfg: Config) -> int:
    """k = max(k_min, min(round(ρ·PR), k_max, B−1)) (Python's round: half to even, as the released code)."""
    return min(B, max(cfg.salt_k_min, min(int(round(cfg.salt_rho * pr)), cfg.salt_k_max, B - 1)))


def spectral_projector(K: torch.Tensor, k: int, random_subspace: bool = False,
                       generator: torch.Generator | None = None):
    """P = V_k V_kᵀ, V_k the top-k eigenvectors of K (torch.linalg.eigh, ascending, exact and deterministic; the
    official code uses lobpcg when B ≥ 3k, which is iterative). random_subspace: a random k-dim subspace (control).
    Returns (P, the kept eigenvalues)."""
    evals, evecs = torch.linalg.eigh(K)
    B = K.shape[0]
    if random_subspace:
        Vk, _ = torch.linalg.qr(torch.randn(B, k, generator=generator, dtype=K.dtype))
    else:
        Vk = evecs[:, B - k:]
    return Vk @ Vk.T, evals[B - k:]


def mixing_alpha(n_eff: float, cfg: Config) -> float:
    """α = clip(1 − n_eff, α_min, α_max): the tail channel's weight grows with signed cancellation."""
    return min(max(1.0 - n_eff, cfg.salt_alpha_min), cfg.salt_alpha_max)


def positive_only(a: torch.Tensor, G: int) -> torch.Tensor:
    """Control: a′_i = a⁺_i − mean_{j ∈ group(i)} a⁺_j, SALT's relu without the geometry (K is not used); groups are
    G consecutive rows, so it needs the mini scope."""
    pos = a.clamp(min=0).view(-1, G)
    return (pos - pos.mean(1, keepdim=True)).flatten()


def renormalise(a_new: torch.Tensor, a: torch.Tensor, how: str) -> torch.Tensor:
    """std: a′ · std(a)/std(a′) (official normalize_final); l2: a′ · ‖a‖/‖a′‖; none: a′."""
    if how == "std" and a_new.std() > 1e-8:
        return a_new * (a.std() / a_new.std())
    if how == "l2" and a_new.norm() > 1e-8:
        return a_new * (a.norm() / a_new.norm())
    return a_new


def _official(K, a, cfg: Config, generator=None):
    """The released rule: φ = relu (--salt_relu), α = clip(1 − n_eff), then --salt_renorm."""
    a_new, terms = salt_rule(K, a, cfg, relu=cfg.salt_relu, alpha_of=functools.partial(mixing_alpha, cfg=cfg))
    return renormalise(a_new, a, cfg.salt_renorm), terms


def _identity(K, a, cfg: Config, generator=None):
    """Self-check: φ = id and α ≡ 1 give a′ = P a + (I − P) a = a exactly; a mismatch stops the run."""
    a_new, terms = salt_rule(K, a, cfg, relu=False, alpha_of=lambda n_eff: 1.0)
    if (a_new - a).abs().max() > 1e-9 * max(1.0, a.abs().max().item()):
        raise RuntimeError(f"SALT identity self-check failed: max |a′ − a| = {(a_new - a).abs().max():.3e}")
    return a_new, terms


def _random_subspace(K, a, cfg: Config, generator=None):
    """Control: the released rule with P a random k-dim subspace (seeded by `generator`)."""
    a_new, terms = salt_rule(K, a, cfg, relu=cfg.salt_relu, alpha_of=functools.partial(mixing_alpha, cfg=cfg),
                             random_subspace=True, generator=generator)
    return renormalise(a_new, a, cfg.salt_renorm), terms


def _amplify(K, a, cfg: Config, generator=None):
    """Control: a′ = P a + (1 + λ c)(I − P) a, c = clip(1 − n_eff, 0, 1), renormalised to ‖a‖ (a literal reading of
    the abstract, not the authors' rule)."""
    a_new, terms = salt_rule(K, a, cfg, relu=False,
                             alpha_of=lambda n_eff: 1.0 + cfg.salt_lambda * min(max(1.0 - n_eff, 0.0), 1.0))
    return renormalise(a_new, a, "l2"), terms


def _positive_only(K, a, cfg: Config, generator=None):
    """Control: a′ = relu(a) recentred per group, K unused (the rule still runs, for its diagnostics)."""
    _, terms = salt_rule(K, a, cfg, relu=cfg.salt_relu, alpha_of=functools.partial(mixing_alpha, cfg=cfg))
    return renormalise(positive_only(a, cfg.num_generations), a, cfg.salt_renorm), terms


# --salt mode → f(K, a, cfg, generator) → (a′, the rule's terms). Experiments may add their own arms here before
# building a Config (the `salt` field accepts every key of this table).
SALT_MODES.update(official=_official, identity=_identity, random_subspace=_random_subspace, amplify=_amplify,
                  positive_only=_positive_only)


def salt_reweight(K: torch.Tensor, a: torch.Tensor, cfg: Config, generator: torch.Generator | None = None):
    """a′ for the --salt mode, a pure function of the Gram K (B×B) and the advantages a (B,). Returns (a′, diagnostics).

    `official`: salt_rule with φ = relu (--salt_relu) and --salt_renorm. Controls (docs/salt.md#paper-to-code-map):
    `identity` (φ = id, α ≡ 1) gives a′ = a exactly and checks it; `random_subspace` uses a random k-dim subspace
    (seeded by `generator`); `amplify` is a′ = P a + (1 + λ c)(I − P) a, c = clip(1 − n_eff, 0, 1), renormalised to
    ‖a‖ (a literal reading of the abstract, not the authors' rule); `positive_only` does not use K (the rule still
    runs, for its diagnostics). SALT_MODES maps each mode to its function.
    B = 1 or a ≡ 0 returns a unchanged. Errors are raised, never replaced by GRPO.
    """
    t0 = time.perf_counter()
    K = K.detach().to("cpu", torch.float64)
    K = (K + K.T) / 2
    a64 = a.detach().to("cpu", torch.float64)
    B = a64.numel()
    if K.shape != (B, B):
        raise ValueError(f"salt_reweight: K is {tuple(K.shape)} but a has {B} entries")
    if not torch.isfinite(K).all() or not torch.isfinite(a64).all():
        raise FloatingPointError("salt_reweight: non-finite Gram matrix or advantages")
    if cfg.salt == "off" or B == 1 or not (a64 != 0).any():
        return a.clone(), {"B": B, "skipped": 1.0, "time_s": time.perf_counter() - t0}
    a_new, terms = SALT_MODES[cfg.salt](K, a64, cfg, generator)
    diag = salt_diagnostics(K, a64, a_new, terms, cfg)
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
        "pii_pos": mean_on(terms["p_diag"], pos), "pii_neg": mean_on(terms["p_diag"], neg),
        "cos_within_abs": float(common.cosine_matrix(K)[same].abs().mean())  # mean |cos(g_i, g_j)|, i ≠ j in a group
        if (B % G == 0 or G % B == 0) and same.any() else float("nan"),
        "eigenvalue_max": float(terms["top"].max()), "eigenvalue_min": float(terms["top"].min()),
        "adv_change_norm": float((a_new - a).norm() / a.norm().clamp(min=1e-30)),
    }
    if cfg.salt == "positive_only":  # no channels: the dominant/tail split does not apply
        diag.update(alpha=float("nan"), main_contrib_ratio=float("nan"), exp_contrib_ratio=float("nan"))
    return diag


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
    stats = {"clip_low": (((ratio < 1 - cfg.epsilon) & (A < 0)).to(m.dtype) * m).sum(),
             "clip_high": (((ratio > 1 + eps_hi) & (A > 0)).to(m.dtype) * m).sum(), "kl": torch.zeros(())}
    if cfg.beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + cfg.beta * kl
        stats["kl"] = (kl.detach() * m).sum()
    return per_tok, stats


def aggregate_loss(per_tok, mask, loss_type: str, n_seq: int, n_tok: int, max_len: int) -> torch.Tensor:
    """The loss of this micro-batch's share of the scope; normalisers are over the whole scope (all processes),
    so summing micro-batches and processes gives the loss of the full batch, whatever the split.
      grpo:     (1/N_seq) Σ_i (Σ_t ℓ_it m_it / Σ_t m_it)
      dr_grpo:  (1/(N_seq·L_max)) Σ_it ℓ_it m_it
      dapo / token-mean: (1/N_tok) Σ_it ℓ_it m_it
    """
    m = mask.to(per_tok.dtype)
    if loss_type == "grpo":
        return ((per_tok * m).sum(1) / m.sum(1).clamp(min=1)).sum() / n_seq
    if loss_type == "dr_grpo":
        return (per_tok * m).sum() / (n_seq * max_len)
    return (per_tok * m).sum() / max(n_tok, 1)


# ----------------------------------------------------------------------------------------------------------
# Features: the Gram K_ij = <g_i, g_j> of per-rollout gradients (docs/salt.md#paper-to-code-map)
# ----------------------------------------------------------------------------------------------------------
#
# Official: g_i = ∂ℓ_i/∂W_lm = Σ_t (softmax(z_t) − e_{y_t}) h_tᵀ with ℓ_i = −Σ_t log π(y_t), the full V×H matrix.
# Default here: its exact Gram from the hidden states and logits of a forward we already run, by token-pair
# ("ghost") inner products (common.lm_head_gram), never forming V×H. A scope part is either features F (rows ×
# d: sketch, kronecker) or the scope's flattened tokens (a dict) for an exact Gram.

class FeatureSpec:
    """What the Gram needs: the LM head (and a kronecker projection pair), or the salt_layers and a Featurizer."""

    def __init__(self, model, cfg: Config):
        self.kind, self.cfg = (cfg.salt_features if cfg.salt != "off" else "none"), cfg
        self.head = next(iter(common.select_linear_layers(model, "lm_head").values()))
        self.p_out = self.p_in = self.featurizer = None
        self.width = self.head.out_features + self.head.in_features  # Σ (d_out + d_in) of an exact Gram
        if self.kind == "layers":
            self.featurizer = common.Featurizer(model, cfg.salt_layers, cfg.salt_k_out, cfg.salt_k_in,
                                                seed=cfg.seed, reduction="sum", temperature=cfg.temperature)
            self.width = sum(m.out_features + m.in_features + (m.bias is not None)
                             for m in self.featurizer.layers.values())
        elif self.kind == "kronecker":
            proj = common.FactoredProjector({"lm_head": self.head}, cfg.salt_k_out, cfg.salt_k_in, seed=cfg.seed)
            self.p_out, self.p_in = proj.mats["lm_head"]

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
    with ctx, autocast(cfg, device):
        logits = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp(min=0),
                       logits_to_keep=C + 1, use_cache=False).logits[:, :-1]
    logp, entropy = common.token_logprobs(logits, batch["comp_ids"], cfg.temperature, with_entropy=True)
    hidden = store["h"][:, -(C + 1):-1] if want_hidden else None
    return logp, entropy, hidden, logits


def gram_part(model, spec: FeatureSpec, b: dict, hidden, logits, cfg: Config, exact: bool):
    """One micro-batch's share of the scope: its tokens (exact) or its features (sketch, kronecker, projected)."""
    n = b["comp_ids"].shape[0]
    if spec.kind == "layers":
        ids, am = torch.cat([b["prompt_ids"], b["comp_ids"]], 1), torch.cat([b["prompt_mask"], b["comp_mask"]], 1)
        lm = torch.cat([torch.zeros_like(b["prompt_mask"]), b["comp_mask"]], 1)
        if exact:
            io = common.linear_io_grads(model, spec.featurizer.layers, ids, am, lm, reduction="sum",
                                        temperature=cfg.temperature)
            return {"n": n, **common.linear_tokens(io, am)}
        return spec.featurizer(ids, am, lm).float()
    if spec.kind == "kronecker":
        return common.lm_head_score_features(hidden, logits, b["comp_ids"], b["comp_mask"], p_out=spec.p_out,
                                             p_in=spec.p_in, temperature=cfg.temperature)
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
        with autocast(cfg, device) if spec.kind == "layers" else contextlib.nullcontext():  # LM head: fp32 matmuls
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


# ----------------------------------------------------------------------------------------------------------
# Rollouts: `generate` with per-rollout seeded sampling, so results do not depend on the process count
# ----------------------------------------------------------------------------------------------------------

class GumbelSampler:
    """Exact sampling from softmax(z/τ) (after top-p) by the Gumbel-max trick, used as a logits processor of a
    greedy `generate`. Each rollout owns a seeded generator, so its tokens depend only on (seed, round, prompt, g),
    never on which process or batch it landed in (HF's own sampling draws from the global RNG)."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids, scores):
        z = scores.float() / self.temperature
        if self.top_p < 1.0:
            s, idx = torch.sort(z, descending=True, dim=-1)
            drop = torch.softmax(s, -1).cumsum(-1) - torch.softmax(s, -1) > self.top_p  # keep the first past p
            z = z.scatter(-1, idx, s.masked_fill(drop, float("-inf")))
        u = torch.stack([torch.rand(z.shape[-1], generator=g, device=g.device) for g in self.generators])
        return z - torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))


def rollout_seed(seed: int, round_idx: int, prompt_idx: int, g: int) -> int:
    """The seed of rollout g of a prompt in a round: a function of these four numbers alone."""
    return zlib.crc32(f"{seed}/{round_idx}/{prompt_idx}/{g}".encode()) + (seed % 1000) * 2**32


def bf16_native(device: torch.device) -> bool:
    """bf16 autocast pays only with bf16 matmuls in hardware: CUDA, or a CPU with AVX512-BF16/AMX (oneDNN). Elsewhere
    the CPU emulates it: one demo step measured 878 s in bf16 against 58 s in fp32 on an AVX2-only CPU."""
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(cfg: Config, device: torch.device):
    if not cfg.bf16 or not bf16_native(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def eos_ids(model, tok) -> list[int]:
    """Every id that ends a completion: generation_config.eos_token_id (an int or a list, e.g. Qwen2.5 and Llama-3
    instruct models list two) and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys(ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])))


@torch.no_grad()
def generate(model, tok, prompts: list[str], cfg: Config, device, max_new_tokens: int, generators=None,
             eos: list[int] | None = None, synced: bool = False):
    """Left-padded batched `generate`; any EOS id stops a row. Prompts keep their last max_prompt_length tokens.
    synced: every process runs the same number of forwards (FSDP and ZeRO-3 gather weights inside each forward).
    Returns prompt ids, prompt mask, completion ids and the completion mask (tokens up to and including EOS)."""
    from transformers import GenerationConfig, LogitsProcessorList

    eos = eos or [tok.eos_token_id]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not getattr(tok, "chat_template", None))
    L = cfg.max_prompt_length  # left padding: the last L columns keep every prompt's end
    ids, am = enc.input_ids[:, -L:].to(device), enc.attention_mask[:, -L:].to(device)
    # every sampling-related field explicit: generate fills unset ones from the model's generation_config (e.g. a
    # hub model's repetition_penalty), which would make the sampler differ from the policy being trained
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, top_k=None,
                          repetition_penalty=1.0, min_length=0, no_repeat_ngram_size=0, pad_token_id=tok.pad_token_id,
                          eos_token_id=eos, bos_token_id=tok.bos_token_id)
    procs = LogitsProcessorList([GumbelSampler(generators, cfg.temperature, cfg.top_p)] if generators else [])
    with autocast(cfg, device):
        out = model.generate(input_ids=ids, attention_mask=am, generation_config=gc, logits_processor=procs,
                             synced_gpus=synced)
    comp = out[:, ids.shape[1]:]
    is_eos = torch.isin(comp, torch.tensor(eos, device=comp.device))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after).long()
    comp = comp.masked_fill(after, tok.pad_token_id)
    return ids, am, comp, mask


def truncated(comp: torch.Tensor, mask: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """Rows that used every new token without emitting an EOS."""
    return (mask[:, -1] == 1) & ~torch.isin(comp[:, -1], torch.tensor(eos, device=comp.device))


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
    history: list = field(default_factory=list)  # every logged row of the run, resumed runs included
    folder: common.OutputFolder | None = None  # where the run writes (folder.path: in place, or staged until commit)
    resume: dict | None = None  # state.json of --resume_from, checked in build


def micro_batches(batch: dict, cfg: Config) -> list[dict]:
    n = batch["comp_ids"].shape[0]
    mb = cfg.micro_batch_size or n
    return [{k: v[i:i + mb] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
            for i in range(0, n, mb)]


def score(trainer: Trainer, rows: list[dict], comp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rewards (n, n_funcs): each function called as TRL calls it, f(prompts=, completions=, completion_ids=,
    **every other column), completions as text or, for conversational prompts, [{"role": "assistant", ...}]."""
    texts = trainer.tok.batch_decode(comp, skip_special_tokens=True)
    kw = reward_kwargs(rows, texts, [c[m.bool()].tolist() for c, m in zip(comp, mask)])
    return torch.tensor([call_reward(name, fn, kw, len(rows)) for name, fn in trainer.rewards], dtype=torch.float64).T


# The keywords every reward function receives besides the dataset's columns (TRL's names); a column of the same name
# would be passed twice.
REWARD_KEYWORDS = ("prompts", "completions", "completion_ids")


def reward_kwargs(rows: list[dict], texts: list[str], completion_ids: list[list[int]]) -> dict:
    conv = isinstance(rows[0]["prompt"], list)
    return dict(prompts=[r["prompt"] for r in rows], completion_ids=completion_ids,
                completions=[[{"role": "assistant", "content": c}] for c in texts] if conv else texts,
                **{k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"})


def call_reward(name: str, fn, kw: dict, n: int) -> list:
    """fn(**kw), checked: it runs (an exception, or sys.exit inside it, stops the run with one line naming it) and
    returns a list of n finite numbers."""
    try:
        v = fn(**kw)
    except SystemExit as e:
        raise UserError(f"reward function {name!r} called sys.exit({e.code!r}); a reward must return its list",
                        hint="return a list of numbers instead of exiting") from None
    except Exception as e:
        raise UserError(f"reward function {name!r} raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                        hint="fix the function (called as TRL calls it: prompts=, completions=, completion_ids=, "
                             "and every dataset column as a keyword)") from None
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise UserError(f"reward function {name!r} returned {type(v).__name__}"
                        f"{f' of length {len(v)}' if isinstance(v, (list, tuple)) else ''}, expected a list "
                        f"of {n} numbers (one per completion)")
    bad = [x for x in v if not isinstance(x, numbers.Real) or not math.isfinite(x)]
    if bad:
        raise UserError(f"reward function {name!r} returned {bad[0]!r}; every reward must be a finite number")
    return list(v)


def probe_rewards(cfg: Config, rewards: list, tok, row: dict) -> None:
    """Before any work: each reward function accepts the keywords it will get and runs on one row (an empty
    completion), so that a bad function stops the run before the output folder is touched."""
    import inspect

    kw = reward_kwargs([row], [""], [[tok.eos_token_id]])
    for name, fn in rewards:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # a builtin or C function: no signature to read
            params = None
        if params is not None:
            missing = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                    p.KEYWORD_ONLY) and p.name not in kw]
            if missing:
                raise UserError(f"reward function {name!r} needs argument {missing[0]!r}, which salt_grpo does not "
                                f"pass (it passes {', '.join(kw)})",
                                hint="give it a default, or add the column to the dataset")
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                extra = [k for k in kw if k not in {p.name for p in params}]
                if extra:
                    raise UserError(f"reward function {name!r} does not accept the keyword {extra[0]!r}, which every "
                                    "reward function receives (TRL's contract)", hint="add **kwargs to its signature")
        call_reward(name, fn, kw, 1)


def make_rollouts(trainer: Trainer, round_idx: int) -> dict:
    """One generation round: prompts_per_step × steps_per_generation prompts, G rollouts each. Every process
    generates its share of each step's groups (slice j is optimizer step j of the round), scores them, and the
    advantages come from the rewards of all processes (so `batch` scaling and the logged statistics are global)."""
    cfg, accelerator, tok, device = trainer.cfg, trainer.accelerator, trainer.tok, trainer.accelerator.device
    G, S, P, rank = cfg.num_generations, cfg.steps_per_generation, cfg.prompts_per_step, accelerator.process_index
    per = P // accelerator.num_processes
    idx = prompts_for_round(len(trainer.train_rows), P * S, round_idx, cfg.seed)
    generation_start = time.perf_counter()
    trainer.raw.eval()
    slices = []
    for j in range(S):  # one generate call per optimizer step's share: memory stays that of one step
        pos = [j * P + rank * per + k for k in range(per)]  # positions in the round, as if on one process
        rows = [trainer.train_rows[idx[p]] for p in pos for _ in range(G)]
        generators = [torch.Generator(device=device).manual_seed(rollout_seed(cfg.seed, round_idx, idx[p], g))
                      for p in pos for g in range(G)]
        prompts = [format_prompt(tok, r["prompt"], cfg.system_prompt) for r in rows]
        pids, pam, comp, cmask = generate(trainer.raw, tok, prompts, cfg, device, cfg.max_completion_length,
                                          generators=generators, eos=trainer.eos, synced=trainer.synced)
        slices.append({"prompt_ids": pids, "prompt_mask": pam, "comp_ids": comp, "comp_mask": cmask,
                       "rewards": score(trainer, rows, comp, cmask)})
    generation_s = time.perf_counter() - generation_start

    def gather(column):  # a per-rollout quantity of every slice, all processes: step by step, process by process
        return torch.cat([common.gather_rows(accelerator, column(s).to(device)).cpu() for s in slices])

    per_func = gather(lambda s: s["rewards"])
    total = per_func @ trainer.reward_weights
    adv = group_advantages(total, G, cfg.scale_rewards, cfg.adv_eps)
    if not (torch.isfinite(total).all() and torch.isfinite(adv).all()):  # each reward is finite, their sum or std not
        raise UserError(f"generation round {round_idx}: the weighted rewards overflow (largest |reward| "
                        f"{float(per_func.abs().max()):.3g}, weights {trainer.reward_weights.tolist()}), so the "
                        "advantages are not finite", hint="rescale the reward functions or --reward_weights "
                                                          "(advantages do not depend on a common scale)")
    lens = gather(lambda s: s["comp_mask"].sum(1).float())
    trunc = gather(lambda s: truncated(s["comp_ids"], s["comp_mask"], trainer.eos).float())
    trainer.num_tokens += int(gather(lambda s: (s["prompt_mask"].sum(1) + s["comp_mask"].sum(1)).float()).sum())
    n = per * G
    reuse = S * cfg.num_iterations > 1  # a slice trained after an update needs the log-probs it was sampled with
    for j, s in enumerate(slices):
        s["adv"] = adv[j * P * G + rank * n:][:n].float().to(device)
        if cfg.mask_truncated_completions:  # TRL: such completions carry no EOS signal, leave them out of the loss
            s["comp_mask"] = s["comp_mask"] * ~truncated(s["comp_ids"], s["comp_mask"], trainer.eos)[:, None]

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
    metrics = {
        "reward": float(total.mean()), "reward_std": float(total.std()),  # TRL: std over the whole batch
        "reward_std_within_group": float(grp.std(1).mean()),
        "frac_reward_zero_std": float(torch.isclose(grp.std(1), torch.zeros((), dtype=grp.dtype)).double().mean()),
        **{f"rewards/{name}/{k}": float(getattr(per_func[:, i], k)()) for i, (name, _) in enumerate(trainer.rewards)
           for k in ("mean", "std")},
        "completions/mean_length": float(lens.mean()), "completions/max_length": float(lens.max()),
        "completions/min_length": float(lens.min()), "completions/clipped_ratio": float(trunc.mean()),
        "time/generation_s": generation_s,
    }
    s0 = slices[0]
    sample = {"prompt": format_prompt(tok, trainer.train_rows[idx[rank * per]]["prompt"], cfg.system_prompt),
              "completion": tok.decode(s0["comp_ids"][0], skip_special_tokens=True),
              "reward": float(s0["rewards"][0] @ trainer.reward_weights)}
    return {"round": round_idx, "slices": slices, "metrics": metrics, "sample": sample}


@contextlib.contextmanager
def timed(timing: dict, key: str):
    """Adds the seconds spent inside the block to timing[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[key] += time.perf_counter() - start


def salt_on_scope(trainer: Trainer, batches: list[dict], a_local: torch.Tensor, step: int, timing: dict,
                  gather: bool, exact: bool, forward=None):
    """SALT over one scope: the Gram parts of `batches` (from the training forward's (hidden, logits) when given,
    else a no-grad pass), K over the scope (gathered across processes for `mini`), a′, and this process's slice.

    Returns (a′ slice, diagnostics, (a, a′) of the whole scope). Non-finite features (the weights diverged) leave a
    unchanged and are reported, so that every process reaches the step's gathered check and stops there together."""
    cfg, accelerator, spec = trainer.cfg, trainer.accelerator, trainer.spec
    try:
        with timed(timing, "time/features_s"):
            if forward is None:
                parts = feature_pass(trainer.raw, spec, batches, cfg, accelerator.device, exact)
            else:
                with torch.no_grad():
                    hidden, logits = forward
                    parts = [gram_part(trainer.raw, spec, batches[0], hidden=hidden, logits=logits.detach(), cfg=cfg,
                                       exact=exact)]
        with timed(timing, "time/salt_s"):
            a = common.gather_rows(accelerator, a_local) if gather else a_local
            K = scope_gram(accelerator, spec, parts, gather) / a.shape[0]  # K = G Gᵀ / B (scale-invariant anyway)
            generator = torch.Generator().manual_seed(rollout_seed(cfg.seed, step, -1, -1))
            a_new, diag = salt_reweight(K, a.detach().cpu().double(), cfg, generator)
    except FloatingPointError:
        return a_local, {"nonfinite": 1.0}, None
    diag["gram"] = float(exact)  # salt/gram: 1 exact Gram, 0 an approximation (sketch, kronecker, projected layers)
    lo = accelerator.process_index * a_local.shape[0] if gather else 0
    return a_new[lo:lo + a_local.shape[0]].float().to(a_local.device), diag, (a.cpu(), a_new)


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
    sums = {"clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "loss": 0.0, "entropy": 0.0, "nonfinite": 0.0,
            "bad_logp": 0.0}
    off = 0
    for b in mbs:
        n = b["comp_ids"].shape[0]
        a_b = adv[off:off + n]
        salt_here = salt_on and (inline or not mini)
        with accelerator.accumulate(trainer.model):
            with timed(timing, "time/backward_s"):
                logp, ent, hidden, logits = policy_forward(trainer.model, spec.head, b, cfg, accelerator.device,
                                                           want_hidden=salt_here and spec.from_forward)
            if salt_here:
                a_b, d, pair = salt_on_scope(trainer, [b], a_b, step, timing, gather=inline,
                                             exact=exact if inline else spec.exact(accelerator, [b], False),
                                             forward=(hidden, logits) if spec.from_forward else None)
                diags.append(d)
                a_pair = pair if inline else a_pair
            with timed(timing, "time/backward_s"):
                old = b["old_logp"] if "old_logp" in b else logp.detach()
                per_tok, st = clipped_policy_loss(logp, old, a_b, b["comp_mask"], cfg, b.get("ref_logp"))
                loss = aggregate_loss(per_tok, b["comp_mask"], cfg.loss_type, n_seq, n_tok, cfg.max_completion_length)
                # DDP / FSDP / DeepSpeed average over processes and accelerate divides by the accumulation steps;
                # undo both, so .grad is the scope's summed gradient whatever the split
                accelerator.backward(loss * accelerator.num_processes * accelerator.gradient_accumulation_steps)
        for k in ("clip_low", "clip_high", "kl"):
            sums[k] += float(st[k])
        sums["loss"] += float(loss.detach())
        sums["entropy"] += float((ent * b["comp_mask"]).sum())
        sums["bad_logp"] += float((~torch.isfinite(logp.detach()) & b["comp_mask"].bool()).sum())
        off += n
    sums["nonfinite"] = float(sum(d.get("nonfinite", 0) for d in diags))
    local = torch.tensor([list(sums.values())], device=accelerator.device)
    sums = dict(zip(sums, common.gather_rows(accelerator, local).sum(0).tolist()))
    m = {"loss": sums["loss"], "clip_ratio/low_mean": sums["clip_low"] / max(n_tok, 1),
         "clip_ratio/high_mean": sums["clip_high"] / max(n_tok, 1),
         "clip_ratio/region_mean": (sums["clip_low"] + sums["clip_high"]) / max(n_tok, 1),
         "entropy": sums["entropy"] / max(n_tok, 1), **timing}  # entropy: TRL's, mean over completion tokens
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
        m["kl"] = sums["kl"] / max(n_tok, 1)
    if diags:
        m.update(salt_metrics(diags))
    trainer.last_advantages = a_pair
    return m


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
    return "eval/accuracy" if reward_names(cfg) == ["exact_match"] else "eval/reward"


@torch.no_grad()
def evaluate(trainer: Trainer) -> float:
    """Mean total reward of greedy completions on the held-out rows. Every process runs the same number of generate
    calls of the same size (its block padded with row 0, not counted), as FSDP and ZeRO-3 need; sums are gathered."""
    cfg, accelerator = trainer.cfg, trainer.accelerator
    per = -(-len(trainer.eval_rows) // accelerator.num_processes)
    mine = trainer.eval_rows[accelerator.process_index * per:][:per]
    rows = mine + trainer.eval_rows[:1] * (per - len(mine))
    trainer.raw.eval()
    total = 0.0
    for s in range(0, per, cfg.eval_batch_size):
        chunk = rows[s:s + cfg.eval_batch_size]
        texts = [format_prompt(trainer.tok, r["prompt"], cfg.system_prompt) for r in chunk]
        _, _, comp, cmask = generate(trainer.raw, trainer.tok, texts, cfg, accelerator.device,
                                     cfg.max_completion_length, eos=trainer.eos,
                                     synced=trainer.synced)
        total += float((score(trainer, chunk, comp, cmask) @ trainer.reward_weights)[: max(0, len(mine) - s)].sum())
    local = torch.tensor([[total, len(mine)]], device=accelerator.device, dtype=torch.float64)
    tot = common.gather_rows(accelerator, local).sum(0)
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Data and rewards: datasets from files or the hub (the built-in task is data/arithmetic), reward functions
# ----------------------------------------------------------------------------------------------------------

_N = r"[-−‒–]?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?(?:[eE][-+]?\d+)?"  # -1,234.5e3; a comma only before groups of three
_MINUS = str.maketrans("−‒–", "---")  # U+2212 minus, figure dash, en dash before a number: a minus sign
_NUM = re.compile(rf"\\d?frac\{{\s*({_N})\s*\}}\{{\s*({_N})\s*\}}|({_N})(?:\s*/\s*({_N}))?")


def extract_final_number(text) -> Optional[float]:
    """The last number in a text (after `####` when present, GSM8K style): integers, decimals, 1e3, thousands
    separators, fractions 3/4 and \\frac{3}{4} (as 0.75); None when there is none. Parsed, never eval()-ed."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        return None
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    m = None
    for m in _NUM.finditer(text):
        pass
    if m is None:
        return None
    num, den = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
    with contextlib.suppress(ZeroDivisionError, OverflowError):
        x = float(num.replace(",", "").translate(_MINUS)) / (float(den.replace(",", "").translate(_MINUS)) if den else 1.0)
        return x if math.isfinite(x) else None
    return None


def _text(c) -> str:
    """A completion as text: TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    return c[-1]["content"] if isinstance(c, list) else c


def reward_fn(completion: str, answer) -> float:
    """Verifiable reward: 1 when the completion's final number equals the answer, else 0 (garbage → 0)."""
    x, y = extract_final_number(completion), extract_final_number(answer)
    return float(x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y)))


def exact_match(completions, answer_column="answer", **columns) -> list[float]:
    """Built-in reward (the default): 1 when the final number of the completion equals the answer, else 0."""
    return [reward_fn(_text(c), a) for c, a in zip(completions, columns[answer_column])]


def closeness(completions, answer_column="answer", **columns) -> list[float]:
    """Built-in partial credit 1 / (1 + |x − answer|) for the completion's final number x (0 without a number). Dense,
    so even a random model gets mixed groups: `--preset smoke` uses it to exercise SALT end to end."""
    out = []
    for c, a in zip(completions, columns[answer_column]):
        x, y = extract_final_number(_text(c)), extract_final_number(a)
        out.append(0.0 if x is None or y is None else 1.0 / (1.0 + min(abs(x - y), 1e300)))
    return out


BUILTIN_REWARDS = {"exact_match": exact_match, "closeness": closeness}


def load_reward_funcs(cfg: Config) -> list[tuple[str, object]]:
    """(name, function) for each --reward_funcs entry: a built-in, `module:function` (importable from the working
    directory) or `path/to/file.py:function`. Each is called as TRL calls it (see `score`)."""
    out = []
    for spec in reward_names(cfg):
        if spec in BUILTIN_REWARDS:
            out.append((spec, functools.partial(BUILTIN_REWARDS[spec], answer_column=cfg.answer_column)))
            continue
        mod_name, _, fn_name = spec.rpartition(":")
        if not mod_name or not fn_name:
            raise UserError(f"--reward_funcs {spec!r}: expected a built-in ({', '.join(BUILTIN_REWARDS)}) or "
                            "module:function")
        try:
            if mod_name.endswith(".py"):
                path = common.expand_path(mod_name)
                if not Path(path).is_file():
                    raise FileNotFoundError(f"no file {path}")
                ispec = importlib.util.spec_from_file_location(Path(path).stem, path)
                mod = importlib.util.module_from_spec(ispec)
                ispec.loader.exec_module(mod)
            else:
                sys.path[:0] = [] if os.getcwd() in sys.path else [os.getcwd()]
                mod = importlib.import_module(mod_name)
        except SystemExit as e:
            raise UserError(f"--reward_funcs {spec!r}: importing {mod_name} called sys.exit({e.code!r})") from None
        except Exception as e:  # ImportError, a SyntaxError or any error the module raises while it loads
            raise UserError(f"--reward_funcs {spec!r}: cannot import {mod_name} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise UserError(f"--reward_funcs {spec!r}: {mod_name} has no function {fn_name!r}")
        out.append((fn_name, fn))
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"--reward_funcs {cfg.reward_funcs!r}: two reward functions are named {dup!r}; their "
                        f"rewards/{dup}/* metrics would be one", hint="rename one of the functions")
    return out


def _is_local(source: str) -> bool:
    return Path(source).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv") or Path(source).exists()


def check_prompt(label: str, i: int, row: dict, cfg: Config):
    """The prompt of a row: non-empty text, or a conversation [{role, content}, ...]; with the suffix appended."""
    v = row.get(cfg.prompt_column)
    if isinstance(v, list):
        if not v or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in v):
            raise UserError(f"{common.row_location(label, i, row)}: field {cfg.prompt_column!r} must be text or a "
                            "non-empty list of {role, content} messages")
        return v[:-1] + [dict(v[-1], content=v[-1]["content"] + cfg.prompt_suffix)] if cfg.prompt_suffix else v
    return common.require_str(label, i, row, cfg.prompt_column) + cfg.prompt_suffix


class Row(dict):
    """A dataset row (every column, plus `prompt`) that knows where it came from (`where`: file and row)."""
    where = "a row"


def check_prompts(cfg: Config, tok, train_rows: list[Row], eval_rows: list[Row]) -> None:
    """Every prompt through the tokenizer's chat template (with --system_prompt) before any work: a template that
    rejects a role or a system message stops the run here, naming the row."""
    for r in train_rows + eval_rows:
        try:
            format_prompt(tok, r["prompt"], cfg.system_prompt)
        except Exception as e:  # jinja2's TemplateError, or any error a template raises
            raise UserError(f"{r.where}: the chat template of --model {cfg.model} rejects this prompt"
                            f"{' with --system_prompt' if cfg.system_prompt else ''} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})",
                            hint="drop --system_prompt, or pass prompts with the roles this template accepts") from None


def load_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows: every column of the dataset plus `prompt` (text or conversation), validated up front;
    errors name file, row and field. The built-in rewards need a numeric answer in answer_column."""
    if not cfg.dataset:
        return builtin_task_rows(cfg)
    builtin = any(n in BUILTIN_REWARDS for n in reward_names(cfg))

    reserved = REWARD_KEYWORDS + (("answer_column",) if builtin else ())

    def convert(rows, label):
        out = []
        for i, row in enumerate(rows):
            clash = [c for c in reserved if c in row]
            if clash:
                raise UserError(f"{common.row_location(label, i, row)}: column {clash[0]!r} has the name of a keyword "
                                "every reward function receives, so it would be passed twice",
                                hint="rename the column in the data")
            if builtin and extract_final_number(common.require_str(label, i, row, cfg.answer_column)) is None:
                raise UserError(f"{common.row_location(label, i, row)}: field {cfg.answer_column!r} holds no number "
                                f"({str(row[cfg.answer_column])[:60]!r})",
                                hint="answers must be a number or end in `#### N` (GSM8K)")
            r = Row({**{k: v for k, v in row.items() if k != "_line"}, "prompt": check_prompt(label, i, row, cfg)})
            r.where = common.row_location(label, i, row)
            if out and isinstance(r["prompt"], list) != isinstance(out[0]["prompt"], list):
                kinds = ("a conversation", "text") if isinstance(r["prompt"], list) else ("text", "a conversation")
                raise UserError(f"{r.where}: field {cfg.prompt_column!r} is {kinds[0]}, but {out[0].where}'s is "
                                f"{kinds[1]}", hint="a dataset holds text prompts or conversations, not both")
            out.append(r)
        if not out:
            raise UserError(f"{label}: no rows")
        return out

    train = convert(*common.read_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config))
    if cfg.eval_dataset:
        ev = convert(*common.read_rows(cfg.eval_dataset, cfg.eval_split or None, cfg.dataset_config,
                                       default_split="test"))[: cfg.eval_size]
    elif cfg.eval_split:
        if _is_local(cfg.dataset):
            raise UserError(f"--eval_split {cfg.eval_split!r} does not apply to the local file {cfg.dataset}",
                            hint="pass the evaluation file with --eval_dataset, or leave both empty to hold out rows")
        ev = convert(*common.read_rows(cfg.dataset, cfg.eval_split, cfg.dataset_config))[: cfg.eval_size]
    else:  # hold out eval_size distinct prompts (seeded); no row with a held-out prompt is trained on
        keys = list(dict.fromkeys(json.dumps(r["prompt"]) for r in train))
        if cfg.eval_size >= len(keys):
            raise UserError(f"{cfg.dataset}: {len(keys)} distinct prompts cannot hold out eval_size={cfg.eval_size}",
                            hint="lower --eval_size or pass --eval_dataset")
        perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held = {keys[i] for i in perm[: cfg.eval_size]}
        first = {}
        for r in train:
            first.setdefault(json.dumps(r["prompt"]), r)
        ev = [first[keys[i]] for i in perm[: cfg.eval_size]]
        train = [r for r in train if json.dumps(r["prompt"]) not in held]
    return train, ev


def builtin_task_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The built-in task through the loader above: data/arithmetic/{train,test}.jsonl as committed or, for another
    --seed or --task_* setting, the same generator's files (data/arithmetic.py) written to a temporary folder."""
    task = dict(min_terms=cfg.task_min_terms, max_terms=cfg.task_max_terms, digits=cfg.task_digits,
                word_frac=cfg.task_word_frac)
    committed = arithmetic.COMMITTED
    as_committed = (cfg.seed == committed["seed"] and all(task[k] == committed[k] for k in task)
                    and cfg.task_size <= committed["train_size"] and cfg.eval_size <= committed["test_size"])
    with tempfile.TemporaryDirectory(prefix="salt-arithmetic-") as tmp:
        if as_committed:  # the files hold the first rows of any smaller draw
            train_file, test_file = arithmetic.FOLDER / "train.jsonl", arithmetic.FOLDER / "test.jsonl"
        else:
            try:
                train_file, test_file = arithmetic.write(Path(tmp), cfg.seed, cfg.task_size, max(cfg.eval_size, 1),
                                                         **task)
            except ValueError as e:
                raise UserError(str(e)) from None
        # the built-in prompts carry their own instruction, and its columns are GSM8K's
        builtin = dataclasses.replace(cfg, dataset=str(train_file), dataset_split="train", eval_dataset=str(test_file),
                                      eval_split="", prompt_column="question", prompt_suffix="")
        train, test = load_rows(builtin)
    return train[: cfg.task_size], test


def format_prompt(tok, prompt, system_prompt: str = "") -> str:
    """The chat template (with the generation prompt) when the tokenizer has one; else the messages' contents, one
    per line. A text prompt is one user message; the system prompt goes first unless the prompt has its own."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] + "\n" for m in msgs)


def prompts_for_round(n_rows: int, per_round: int, round_idx: int, seed: int) -> list[int]:
    """Global prompt indices of a generation round: epochs of seeded permutations, identical on every process."""
    out, pos = [], round_idx * per_round
    while len(out) < per_round:
        epoch, off = divmod(pos, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(per_round - len(out), n_rows - off)
        out += perm[off: off + take].tolist()
        pos += take
    return out


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: accelerate's save_state (model, optimizer, RNG; sharded under FSDP2 / DeepSpeed) + our state
# ----------------------------------------------------------------------------------------------------------

def save_checkpoint(trainer: Trainer, step: int, path: Path) -> None:
    """save_state into a temporary folder, plus state.json (step, schedule, data fingerprint, config), the run's
    metrics so far and, mid-round, each process's rollouts; then renamed, so a checkpoint-N folder is always
    complete. A write error (disk full, a folder turned read-only) stops the run with one line, the temporary
    folder removed."""
    try:
        _save_checkpoint(trainer, step, path)
    except OSError as e:
        common.remove(path.parent / f".{path.name}.tmp")
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}",
                        hint="free disk space or make the output folder writable, then --resume_from the last "
                             "checkpoint") from None


def _save_checkpoint(trainer: Trainer, step: int, path: Path) -> None:
    accelerator, tmp = trainer.accelerator, path.parent / f".{path.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # collective: every process writes its part
    if step % (trainer.cfg.steps_per_generation * trainer.cfg.num_iterations):  # mid-round: the rollouts are state too
        tensors = {f"{j}.{k}": v for j, s in enumerate(trainer.buffer["slices"]) for k, v in s.items()
                   if torch.is_tensor(v)}
        common.save_safetensors(tmp / f"rollouts-{accelerator.process_index}.safetensors", tensors,
                                {"round": str(trainer.buffer["round"])})
    if accelerator.is_main_process:
        common.write_jsonl(tmp / "metrics.jsonl", trainer.history)
        common.write_json(tmp / "state.json", {"step": step, "num_tokens": trainer.num_tokens,
                                               "processes": accelerator.num_processes,
                                               "scheduler": trainer.sched.state_dict(), "data": trainer.data_sha,
                                               "config": dataclasses.asdict(trainer.cfg)})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        common.replace_path(tmp, path)  # an older checkpoint-N (a resumed run's) stays until the new one is whole
    accelerator.wait_for_everyone()


def read_checkpoint(cfg: Config, num_processes: int) -> dict:
    """state.json of --resume_from, checked before any work: the same hyper-parameters (only RESUMABLE fields may
    change), the same process count, and max_steps not below the checkpoint's step."""
    path = Path(cfg.resume_from)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        step, old = int(state["step"]), dict(state["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume_from {path}: not a readable checkpoint (state.json: {type(e).__name__})",
                        hint="pass an output_dir/checkpoint-N folder written by salt_grpo.py") from None
    now = dataclasses.asdict(cfg)
    diff = [k for k in now if k in old and k not in RESUMABLE and old[k] != now[k]]
    if diff:
        raise UserError(f"--resume_from {path}: the checkpoint was trained with other settings: " +
                        ", ".join(f"{k}={old[k]!r} (now {now[k]!r})" for k in diff),
                        hint=f"resume with the same settings; only {', '.join(sorted(RESUMABLE))} may change")
    if state.get("processes", num_processes) != num_processes:
        raise UserError(f"--resume_from {path}: written by {state['processes']} processes, resumed with "
                        f"{num_processes}", hint="resume with the same process count (each process saved its state)")
    if cfg.max_steps < step:
        raise UserError(f"--max_steps {cfg.max_steps} is below the checkpoint's step {step} ({path})",
                        hint=f"pass --max_steps {step} or more to continue the run")
    return state


def data_fingerprint(train_rows: list[dict], eval_rows: list[dict]) -> str:
    """A hash of the rows a run trains and evaluates on, kept in each checkpoint's state.json."""
    import hashlib

    h = hashlib.sha1()
    for rows in (train_rows, eval_rows):
        for r in rows:
            h.update(json.dumps(r, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def check_same_data(cfg: Config, state: dict, train_rows: list[dict], eval_rows: list[dict]) -> None:
    """A run resumes on the data it started with (same rows, same held-out split)."""
    if state.get("data") and state["data"] != data_fingerprint(train_rows, eval_rows):
        raise UserError(f"--resume_from {cfg.resume_from}: the dataset changed since the checkpoint was written "
                        f"({cfg.dataset or 'the built-in task'} now gives other rows)",
                        hint="resume with the data the run started with, or start a new run")


def load_checkpoint(trainer: Trainer, path: Path, state: dict) -> int:
    """load_state (weights_only loading), then the schedule, token count, metrics and mid-round rollouts."""
    from safetensors import safe_open

    try:
        trainer.accelerator.load_state(str(path))
        trainer.history = common.read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else []
        step, S = int(state["step"]), trainer.cfg.steps_per_generation
        if step % (S * trainer.cfg.num_iterations):
            rollouts = path / f"rollouts-{trainer.accelerator.process_index}.safetensors"
            with safe_open(str(rollouts), "pt", device="cpu") as f:
                slices = [{} for _ in range(S)]
                for key in f.keys():
                    j, k = key.split(".", 1)
                    slices[int(j)][k] = f.get_tensor(key).to(trainer.accelerator.device)
                trainer.buffer = {"round": int(f.metadata()["round"]), "slices": slices, "metrics": {}, "sample": {}}
    except Exception as e:  # truncated or foreign files: safetensors, torch.load, load_state_dict, JSON errors
        raise UserError(f"--resume_from {path}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                        hint="it is incomplete or from another model; pass an intact checkpoint-N") from None
    trainer.sched.load_state_dict(state["scheduler"])
    trainer.num_tokens = int(state["num_tokens"])
    return step


def save_final(trainer: Trainer, final: Path) -> None:
    """The trained model (all weights, or the LoRA adapter) and tokenizer, written to a temporary folder, then put in
    place of an old final/ in one step (common.replace_path): at every instant final/ is the old model or the new
    one. A write error stops the run with one line; the temporary folder never stays."""
    accelerator = trainer.accelerator
    sd = accelerator.get_state_dict(trainer.model)  # collective under FSDP/DeepSpeed: call it on every process
    err = None
    if accelerator.is_main_process:
        tmp = final.parent / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with common._quiet_transformers():
                trainer.raw.save_pretrained(tmp, state_dict=sd)
                trainer.tok.save_pretrained(tmp)
            common.replace_path(tmp, final)
        except OSError as e:
            err = f"cannot write the final model to {final}: {e.strerror or e}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    err = common.broadcast_object(accelerator, err)
    if err:
        raise UserError(err, hint="free disk space or make the output folder writable; the last checkpoint (if "
                                  "--save_every) can be resumed")
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------
# Setup, training run, summary
# ----------------------------------------------------------------------------------------------------------

# What a run of salt_grpo.py writes in its output folder (what --overwrite_output_dir replaces; nothing else there is
# touched), the folder being the contract of common.OutputFolder.
OWNED = ["checkpoint-*", ".checkpoint-*.tmp", "final", ".final.tmp", "metrics.jsonl", "summary.json",
         "last_sample.json", "last_advantages.safetensors", "metrics.png"]


def output_folder(cfg: Config) -> common.OutputFolder:
    """The run's output folder, with every input it must not hold: local data files, a local model, the checkpoint
    resumed (whose own run folder is written in place)."""
    local = [("--dataset", cfg.dataset), ("--eval_dataset", cfg.eval_dataset), ("--model", cfg.model)]
    inputs = [(flag, p) for flag, p in local if p and Path(p).exists()]
    if cfg.resume_from:
        inputs.append(("--resume_from", cfg.resume_from))
    return common.OutputFolder(cfg.output_dir, overwrite=cfg.overwrite_output_dir, owned=OWNED, inputs=inputs,
                               resume_dir=Path(cfg.resume_from).parent if cfg.resume_from else None)


def build(cfg: Config, accelerator=None) -> Trainer:
    """Everything before the first step. The Accelerator comes first (it alone decides the process count); then
    every check that can fail (settings, output paths, reward functions, the checkpoint, the data, the model, the
    chat template on every prompt, each reward function called on one row). Nothing is written: train() opens the
    output folder after this, so a run that cannot start leaves it as it was."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if accelerator is not None:
        accelerator.free_memory()  # a reused Accelerator must not save or load the previous run's model
    check_trackers(cfg)  # the Accelerator takes them: a bad name must be our one-line error, not accelerate's
    accelerator = accelerator or Accelerator(log_with=report_to(cfg) or None, project_dir=cfg.output_dir)
    n_proc = accelerator.num_processes
    validate(cfg, n_proc)
    folder = output_folder(cfg)
    folder.check()
    rewards = load_reward_funcs(cfg)
    resume = read_checkpoint(cfg, n_proc) if cfg.resume_from else None
    train_rows, eval_rows = load_rows(cfg)
    if resume is not None:
        check_same_data(cfg, resume, train_rows, eval_rows)
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
    model, tok, ref = load_policy(cfg, accelerator.device, zero3)
    check_prompts(cfg, tok, train_rows, eval_rows)
    probe_rewards(cfg, rewards, tok, train_rows[0])
    if accelerator.is_main_process:
        warn_about(cfg, tok, train_rows + eval_rows, accelerator.device, n_local)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)

    def lr_lambda(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)  # not prepared: accelerate would step it per process
    prepared, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(prepared)
    spec = FeatureSpec(raw, cfg)  # after prepare: projections live on the model's device
    synced = accelerator.num_processes > 1 and dt in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return Trainer(cfg=cfg, accelerator=accelerator, model=prepared, raw=raw, ref=ref, tok=tok, opt=opt, sched=sched,
                   spec=spec, train_rows=train_rows, eval_rows=eval_rows, rewards=rewards,
                   reward_weights=torch.tensor(reward_weights(cfg), dtype=torch.float64), eos=eos_ids(raw, tok),
                   synced=synced, folder=folder, resume=resume, data_sha=data_fingerprint(train_rows, eval_rows))


def load_policy(cfg: Config, device, zero3: bool):
    """(policy, tokenizer, frozen reference or None): the model, with a seeded LoRA adapter under --use_peft (whose
    KL reference is the base with the adapter disabled, so no second copy), else a reference copy when β > 0."""
    model, tok = common.load_model(cfg.model, cfg.dtype, cfg.trust_remote_code, seed=cfg.seed)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref = None
    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        targets = [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()]
        try:
            with torch.random.fork_rng(devices=[]):  # seeded adapter init, whatever ran before
                torch.manual_seed(cfg.seed)
                model = get_peft_model(model, LoraConfig(
                    r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                    target_modules="all-linear" if targets == ["all-linear"] else targets or None),
                    autocast_adapter_dtype=not zero3)  # ZeRO-3 gathers in one dtype (as TRL does)
        except (ValueError, TypeError, KeyError) as e:  # peft's "Target modules ... not found", bad values
            raise UserError(f"--lora_target_modules {cfg.lora_target_modules or '(peft default)'}: "
                            f"{str(e).splitlines()[0][:200]}",
                            hint="name Linear modules of the model (e.g. q_proj,v_proj) or `all-linear`") from None
        except (RuntimeError, MemoryError) as e:  # an adapter too large to allocate
            raise UserError(f"--lora_r {cfg.lora_r}: the LoRA adapter cannot be built ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})", hint="pass a smaller --lora_r") from None
    elif cfg.beta > 0:
        ref, _ = common.load_model(cfg.model, cfg.dtype, cfg.trust_remote_code, seed=cfg.seed)
        ref.requires_grad_(False).eval().to(device)
    return model, tok, ref


def warn_about(cfg: Config, tok, rows: list[dict], device, n_local: int) -> None:
    """Warnings (stderr) for settings that run, but not as the user likely expects."""
    texts = [format_prompt(tok, r["prompt"], cfg.system_prompt) for r in rows]
    long = sum(len(x) > cfg.max_prompt_length for x in tok(texts, add_special_tokens=not tok.chat_template).input_ids)
    if long:
        print(f"warning: {long} of {len(texts)} prompts are longer than --max_prompt_length {cfg.max_prompt_length} "
              "tokens; they are cut on the left (TRL's rule)", file=sys.stderr)
    if cfg.bf16 and not bf16_native(device):
        print("warning: this CPU has no native bf16 matmul (about 15x slower emulated), so --bf16 runs in fp32 here",
              file=sys.stderr)
    if cfg.micro_batch_size == 0 and device.type != "cpu":
        print(f"warning: --micro_batch_size 0 puts all {n_local} rollouts of a step through one forward/backward per "
              "process; set it (e.g. 16) if memory runs out", file=sys.stderr)


def train(cfg: Config, accelerator=None) -> dict:
    """The whole run; returns the summary (on every process). The output folder is released however it ends."""
    run_start = time.perf_counter()
    trainer = build(cfg, accelerator)
    trainer.folder.open_on_all(trainer.accelerator)  # the first write: every check has passed
    try:
        return training_loop(trainer, run_start)
    finally:
        trainer.folder.close()


def training_loop(trainer: Trainer, run_start: float) -> dict:
    """Resume or evaluate, then step to max_steps: rollouts, gradients, AdamW, metrics, checkpoints; the final model."""
    from tqdm.auto import tqdm

    cfg, accelerator, folder, key = trainer.cfg, trainer.accelerator, trainer.folder, eval_key(trainer.cfg)
    start = load_checkpoint(trainer, Path(cfg.resume_from), trainer.resume) if cfg.resume_from else 0
    if report_to(cfg):  # the trackers write where the run writes (staged with it until the first commit)
        accelerator.project_configuration.project_dir = str(folder.path)
        accelerator.project_configuration.logging_dir = str(folder.path)
        accelerator.init_trackers("salt_grpo", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                                       if isinstance(v, (int, float, str, bool))})
    logger = common.MetricsLogger(accelerator, folder, resume=bool(cfg.resume_from))
    if cfg.resume_from and accelerator.is_main_process:  # the run up to the checkpoint, not a killed run's later lines
        common.write_jsonl(logger.path, trainer.history)

    def log(m: dict, step: int):
        logger.log(m, step=step)
        trainer.history.append({"step": step, **m})

    if start == 0 and cfg.eval_size:
        log({key: evaluate(trainer)}, 0)
    per_round, S = cfg.steps_per_generation * cfg.num_iterations, cfg.steps_per_generation
    bar = tqdm(range(start, cfg.max_steps), desc=f"GRPO+SALT[{cfg.salt}]", disable=not accelerator.is_main_process,
               initial=start, total=cfg.max_steps, dynamic_ncols=True)
    for step in bar:
        timing = {"time/optimizer_s": 0.0, "step_time": 0.0}
        with timed(timing, "step_time"):
            round_idx, pos = divmod(step, per_round)
            if trainer.buffer is None or trainer.buffer["round"] != round_idx:
                trainer.buffer = make_rollouts(trainer, round_idx)
            m = dict(trainer.buffer["metrics"]) if pos == 0 else {}
            m.update(accumulate_gradients(trainer, trainer.buffer["slices"][pos % S], step))
            m["learning_rate"] = trainer.sched.get_last_lr()[0]  # the rate this step uses
            with timed(timing, "time/optimizer_s"):
                m["grad_norm"] = optimizer_step(trainer, step)
        m.update({**timing, "num_tokens": trainer.num_tokens})
        if torch.cuda.is_available():
            m["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            m[key] = evaluate(trainer)
        log(m, step + 1)
        if accelerator.is_main_process and trainer.buffer.get("sample"):
            common.write_json(folder.path / "last_sample.json", trainer.buffer["sample"])
        bar.set_postfix({k: f"{m.get(name, math.nan):.2f}" for k, name in
                         (("reward", "reward"), ("neff", "salt/neff"), ("alpha", "salt/alpha"))})
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(trainer, step + 1, folder.path / f"checkpoint-{step + 1}")
            folder.commit(accelerator)  # something to keep: a replaced run's files go now, not before
    bar.close()
    end = evaluate(trainer) if cfg.eval_size else None
    if end is not None:
        log({key: end}, cfg.max_steps)
    save_final(trainer, folder.path / "final")
    folder.commit(accelerator)
    if accelerator.is_main_process and trainer.last_advantages is not None:  # a and a′ of the last SALT scope
        a, a_new = trainer.last_advantages
        common.save_safetensors(folder.path / "last_advantages.safetensors", {"a": a, "a_new": a_new})
    summary = summarise(trainer, start, end, wall_time_s=time.perf_counter() - run_start)
    if accelerator.is_main_process:
        common.write_json(folder.path / "summary.json", summary)
    if report_to(cfg):
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return summary


def summarise(trainer: Trainer, start: int, end: float | None, wall_time_s: float) -> dict:
    """summary.json: the run's settings, reward and held-out score at the start and the end, and its outputs."""
    cfg, out, key = trainer.cfg, Path(trainer.cfg.output_dir), eval_key(trainer.cfg)
    rewards = [h["reward"] for h in trainer.history if "reward" in h]
    evals = [(h["step"], h[key]) for h in trainer.history if key in h]
    k = max(1, min(8, len(rewards) // 4))  # reward is noisy per step: average the first / last quarter
    return {
        "salt": cfg.salt, "model": cfg.model, "steps": cfg.max_steps, "resumed_from_step": start,
        "processes": trainer.accelerator.num_processes, "eval_metric": key,
        "reward_start": sum(rewards[:k]) / k if rewards else None,
        "reward_end": sum(rewards[-k:]) / k if rewards else None,
        "eval_accuracy_start": evals[0][1] if evals and evals[0][0] == 0 else None, "eval_accuracy_end": end,
        "eval_size": len(trainer.eval_rows), "eval_history": evals, "reward_steps_averaged": k,
        "wall_time_s": wall_time_s,
        "outputs": {"dir": str(out), "metrics": str(out / "metrics.jsonl"), "final_model": str(out / "final"),
                    "summary": str(out / "summary.json")},
    }


PLOT_KEYS = ["reward", "reward_std", "frac_reward_zero_std", "eval/accuracy", "eval/reward", "loss", "entropy",
             "grad_norm", "completions/mean_length", "clip_ratio/region_mean", "kl", "step_time",
             "salt/participation_ratio", "salt/pr_over_B", "salt/neff", "salt/neff_after", "salt/alpha", "salt/k",
             "salt/main_contrib_ratio", "salt/cos_grpo_salt", "salt/zero_adv_mass"]


def plot(run_dir: str) -> Path:
    p = Path(run_dir)
    jsonl = p / "metrics.jsonl" if p.is_dir() else p
    if not jsonl.is_file():
        raise UserError(f"{jsonl} does not exist", hint="pass a run folder (output_dir) holding metrics.jsonl")
    return common.plot_metrics(jsonl, PLOT_KEYS, jsonl.parent / "metrics.png")


def _fmt(x, pct=False):
    return "n/a" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.3f}")


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        if len(argv) != 2:
            raise UserError("usage: python salt_grpo.py plot RUN_DIR")
        print(f"wrote {plot(argv[1])}")
        return None
    s = train(parse_config(argv))
    if s["processes"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        pct = s["eval_metric"] == "eval/accuracy"
        print(f"SALT[{s['salt']}] GRPO on {s['model']}: {s['steps']} steps in {s['wall_time_s']:.0f} s "
              f"({s['processes']} process{'es' if s['processes'] > 1 else ''})")
        print(f"  train reward        {_fmt(s['reward_start'])} -> {_fmt(s['reward_end'])} "
              f"(sampled; mean over the first / last {s['reward_steps_averaged']} step(s))")
        print(f"  held-out {'accuracy  ' if pct else 'reward    '} {_fmt(s['eval_accuracy_start'], pct)} -> "
              f"{_fmt(s['eval_accuracy_end'], pct)} (greedy, {s['eval_size']} problems)")
        print(f"  outputs             {s['outputs']['dir']}/ (metrics.jsonl, summary.json, final/; "
              f"plot: python salt_grpo.py plot {s['outputs']['dir']})")
    return s


if __name__ == "__main__":
    common.run_main(main)
