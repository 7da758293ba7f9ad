"""GRPO on Accelerate with the SALT plug-in (arXiv 2606.05800), one file, read top to bottom beside the paper.

    accelerate launch salt_grpo.py                    # SmolLM2-135M-Instruct, built-in arithmetic, SALT `official`
    python salt_grpo.py --preset smoke                # tiny random model, seconds
    python salt_grpo.py --salt off                    # plain GRPO (the matched baseline)
    python salt_grpo.py plot outputs/salt_grpo        # draw metrics.jsonl to metrics.png

GRPO: for each prompt draw G completions, score them with a verifiable reward, turn rewards into group-relative
advantages a_i = (r_i − mean_g r) / (std_g r + eps) and minimise the PPO clipped surrogate on token ratios.
SALT replaces a (one scalar per rollout) by a′ computed from the Gram K of per-rollout gradient features:
    PR = (tr K)² / ‖K‖_F²,  k = clip(round(ρ·PR), k_min, min(k_max, B−1)),  P = V_k V_kᵀ (top-k eigenvectors of K),
    n_eff = aᵀKa / Σ_i a_i² K_ii,  α = clip(1 − n_eff, α_min, α_max),  a′ = P a + α (I − P) relu(a).
Everything else (reward, sampler, loss, optimizer) is unchanged. The rule follows the authors' released code
(Chang-pw/SALT, advantage_decomposition.py); see docs/salt.md for the paper-to-code map and the deviations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import common
from common import UserError, option as _f

# ----------------------------------------------------------------------------------------------------------
# Config: one dataclass, every field a CLI flag with its checks; TRL's names where TRL has the concept
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # model and run
    model: str = _f(common.EMBEDDED, "`embedded` (SmolLM2-135M-Instruct), `tiny`, a local folder or a hub id")
    preset: str = _f("", "`smoke`: tiny random model and a few steps (seconds)", choices=["", "smoke"])
    config: str = _f("", "optional YAML/JSON file with any of these fields (CLI flags override it)")
    output_dir: str = _f("outputs/salt_grpo", "metrics.jsonl, checkpoints, final model, summary.json")
    seed: int = _f(0, "seed of data order, rollouts, projections", ge=0)
    bf16: bool = _f(True, "bf16 autocast for forwards and generation (loss math stays fp32)")
    trust_remote_code: bool = _f(False, "passed to from_pretrained")
    # data
    dataset: str = _f("", "empty: the built-in arithmetic task; else a hub id or a local .jsonl/.json/.parquet/.csv")
    dataset_config: Optional[str] = _f(None, "hub dataset config name (e.g. `main` for gsm8k)")
    dataset_split: str = _f("train", "split to train on")
    eval_split: str = _f("", "split to evaluate on (hub datasets); empty: hold out eval_size training rows")
    eval_dataset: str = _f("", "a separate evaluation file or hub id (same columns); overrides eval_split")
    prompt_column: str = _f("question", "column holding the prompt text")
    answer_column: str = _f("answer", "column holding the answer (a number, or text ending in `#### N`)")
    prompt_suffix: str = _f("", "appended to every dataset prompt (e.g. an answer-format instruction)")
    task_size: int = _f(4096, "built-in task: number of training problems", ge=1)
    task_min_terms: int = _f(2, "built-in task: fewest terms in a sum", ge=1)
    task_max_terms: int = _f(2, "built-in task: most terms in a sum", ge=1)
    task_digits: int = _f(1, "built-in task: digits per term", ge=1, le=6)
    task_word_frac: float = _f(0.25, "built-in task: fraction of short word problems", ge=0, le=1)
    eval_size: int = _f(64, "held-out problems for greedy evaluation", ge=0)
    # GRPO (TRL names)
    num_generations: int = _f(8, "G: completions per prompt")
    prompts_per_step: int = _f(4, "prompts per generation round, all processes together", ge=1)
    micro_batch_size: int = _f(0, "rollouts per forward/backward per process; 0: all of them at once", ge=0)
    num_iterations: int = _f(1, "optimizer steps per generation round (μ); >1 uses stored old log-probs", ge=1)
    max_steps: int = _f(32, "optimizer steps", ge=0)
    max_completion_length: int = _f(24, "new tokens per completion", ge=1)
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
    eval_every: int = _f(0, "greedy held-out accuracy every N steps (0: only at start and end)", ge=0)
    eval_batch_size: int = _f(64, "prompts per greedy generate call", ge=1)
    save_every: int = _f(0, "checkpoint every N steps (0: only the final model)", ge=0)
    resume_from: str = _f("", "checkpoint folder to continue from (output_dir/checkpoint-N)")
    report_to: str = _f("none", "accelerate trackers, e.g. tensorboard (when installed)")
    # SALT
    salt: str = _f("official", "off = GRPO; official = released rule; identity = GRPO through SALT (self-check); "
                   "random_subspace / amplify / positive_only = research controls, not the authors' rule",
                   choices=["off", "official", "identity", "random_subspace", "amplify", "positive_only"])
    salt_scope: str = _f("mini", "mini: all rollouts of an optimizer step (whole groups); "
                         "micro: each micro-batch on each process (the official code)", choices=["mini", "micro"])
    salt_features: str = _f("lm_head", "lm_head: LM-head score feature, factored projection; lm_head_exact: "
                            "unprojected (small vocab); layers: projected per-sample grads of salt_layers",
                            choices=["lm_head", "lm_head_exact", "layers"])
    salt_layers: str = _f("last:1", "layer spec for salt_features=layers (lm_head, last:N, lora, all, regex)")
    salt_k_out: int = _f(32, "projection rows on the output side (vocab for the LM head)", ge=1)
    salt_k_in: int = _f(32, "projection rows on the input side (hidden)", ge=1)
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
                  max_completion_length=8, eval_size=8, task_size=64, learning_rate=1e-3,
                  salt_features="lm_head_exact", output_dir="outputs/salt_grpo_smoke"),
}


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
    return cfg


def parse_config(argv: list[str]) -> Config:
    """Dataclass defaults < --preset < --config file < CLI flags, each value checked (common.parse_config)."""
    return common.parse_config(Config, argv, PRESETS)


# ----------------------------------------------------------------------------------------------------------
# Data: the built-in verifiable arithmetic task, datasets from files or the hub, the answer checker
# ----------------------------------------------------------------------------------------------------------

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
ITEMS = ["apples", "books", "coins", "pens", "stamps", "shells", "cards", "marbles"]


def _held_out(terms: tuple[int, ...]) -> bool:
    """One operand tuple in five is reserved for evaluation (stable across seeds and sizes)."""
    return zlib.crc32(repr(terms).encode()) % 5 == 0


def arithmetic_task(n: int, seed: int, held_out: bool, min_terms=2, max_terms=2, digits=1, word_frac=0.25):
    """n seeded problems {prompt, answer}: multi-term sums and short word problems.

    Train and eval draw from disjoint operand tuples (`_held_out`), so held-out accuracy measures generalisation.
    """
    rng = random.Random(seed * 2 + held_out)
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    if digits == 1 and max_terms == min_terms == 1:
        raise UserError("the built-in task needs at least 2 terms of 1 digit to have a held-out split")
    rows = []
    while len(rows) < n:
        terms = tuple(rng.randint(lo, hi) for _ in range(rng.randint(min_terms, max_terms)))
        if _held_out(terms) != held_out:
            continue
        if rng.random() < word_frac:
            name, item = rng.choice(NAMES), rng.choice(ITEMS)
            more = " and then ".join(f"gets {t} more" for t in terms[1:])
            q = f"{name} has {terms[0]} {item}, {more}. How many {item} does {name} have now?"
        else:
            q = "What is " + " + ".join(map(str, terms)) + "?"
        rows.append({"prompt": q + " Answer with just the number.", "answer": float(sum(terms))})
    return rows


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def extract_final_number(text: str) -> Optional[float]:
    """The last number in a text (after `####` when present, GSM8K style); None when there is none. Never eval()."""
    if not isinstance(text, str):
        return None
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    nums = _NUM.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))  # 1,234 -> 1234
    return float(nums[-1]) if nums else None


def reward_fn(completion: str, answer: float) -> float:
    """Verifiable reward: 1 when the completion's final number equals the answer, else 0 (garbage → 0)."""
    x = extract_final_number(completion)
    return float(x is not None and math.isfinite(x) and abs(x - answer) < 1e-6)


def load_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows {prompt, answer}; every row is validated up front, errors name file, row and field."""
    if not cfg.dataset:
        kw = dict(min_terms=cfg.task_min_terms, max_terms=cfg.task_max_terms, digits=cfg.task_digits,
                  word_frac=cfg.task_word_frac)
        return (arithmetic_task(cfg.task_size, cfg.seed, False, **kw),
                arithmetic_task(cfg.eval_size, cfg.seed, True, **kw))

    def convert(rows, label):
        out = []
        for i, row in enumerate(rows):
            q = common.require_str(label, i, row, cfg.prompt_column)
            a = common.require_str(label, i, row, cfg.answer_column)
            num = extract_final_number(a)
            if num is None:
                raise UserError(f"{common.row_location(label, i, row)}: field {cfg.answer_column!r} holds no number "
                                f"({a[:60]!r})", hint="answers must be a number or end in `#### N` (GSM8K)")
            out.append({"prompt": q + cfg.prompt_suffix, "answer": num})
        if not out:
            raise UserError(f"{label}: no rows")
        return out

    train = convert(*common.read_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config))
    if cfg.eval_dataset:
        ev = convert(*common.read_rows(cfg.eval_dataset, cfg.eval_split or None, cfg.dataset_config,
                                       default_split="test"))[: cfg.eval_size]
    elif cfg.eval_split:
        if Path(cfg.dataset).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"):
            raise UserError(f"--eval_split {cfg.eval_split!r} does not apply to the local file {cfg.dataset}",
                            hint="pass the evaluation file with --eval_dataset, or leave both empty to hold out rows")
        ev = convert(*common.read_rows(cfg.dataset, cfg.eval_split, cfg.dataset_config))[: cfg.eval_size]
    else:  # hold out eval_size rows, chosen by a seeded permutation, never trained on
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        if cfg.eval_size >= len(train):
            raise UserError(f"{cfg.dataset}: {len(train)} rows cannot hold out eval_size={cfg.eval_size}",
                            hint="lower --eval_size or pass --eval_split")
        ev = [train[i] for i in perm[: cfg.eval_size]]
        train = [train[i] for i in sorted(perm[cfg.eval_size:])]
    return train, ev


def format_prompt(tok, text: str) -> str:
    """The chat template (with the generation prompt) when the tokenizer has one, else the raw text."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text + "\n"


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
# Rollouts: `generate` with per-rollout seeded sampling, so results do not depend on the process count
# ----------------------------------------------------------------------------------------------------------

class GumbelSampler:
    """Exact sampling from softmax(z/τ) (after top-p) by the Gumbel-max trick, used as a logits processor of a
    greedy `generate`. Each rollout owns a seeded generator, so its tokens depend only on (seed, round, prompt, g),
    never on which process or batch it landed in (HF's own sampling draws from the global RNG)."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.gens, self.t, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids, scores):
        z = scores.float() / self.t
        if self.top_p < 1.0:
            s, idx = torch.sort(z, descending=True, dim=-1)
            drop = torch.softmax(s, -1).cumsum(-1) - torch.softmax(s, -1) > self.top_p  # keep the first past p
            z = z.scatter(-1, idx, s.masked_fill(drop, float("-inf")))
        u = torch.stack([torch.rand(z.shape[-1], generator=g, device=g.device) for g in self.gens])
        return z - torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))


def rollout_seed(seed: int, round_idx: int, prompt_idx: int, g: int) -> int:
    return zlib.crc32(f"{seed}/{round_idx}/{prompt_idx}/{g}".encode()) + (seed % 1000) * 2**32


def autocast(cfg: Config, device: torch.device):
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def generate(model, tok, prompts: list[str], cfg: Config, device, max_new_tokens: int, generators=None):
    """Left-padded batched `generate` (EOS stops a row). Returns prompt ids, completion ids and the completion
    mask (tokens up to and including the first EOS)."""
    from transformers import GenerationConfig, LogitsProcessorList

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not getattr(tok, "chat_template", None))
    ids, am = enc.input_ids.to(device), enc.attention_mask.to(device)
    # every sampling-related field explicit: generate fills unset ones from the model's generation_config (e.g. a
    # hub model's repetition_penalty), which would make the sampler differ from the policy being trained
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, top_k=None,
                          repetition_penalty=1.0, min_length=0, no_repeat_ngram_size=0, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    procs = LogitsProcessorList([GumbelSampler(generators, cfg.temperature, cfg.top_p)] if generators else [])
    with autocast(cfg, device):
        out = model.generate(input_ids=ids, attention_mask=am, generation_config=gc, logits_processor=procs)
    comp = out[:, ids.shape[1]:]
    is_eos = comp == tok.eos_token_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after).long()
    comp = comp.masked_fill(after, tok.pad_token_id)
    return ids, am, comp, mask


# ----------------------------------------------------------------------------------------------------------
# Featurization: per-rollout gradient features g_i (salt.md §1.2, §3.4)
# ----------------------------------------------------------------------------------------------------------
#
# Official: g_i = ∂ℓ_i/∂W_lm = Σ_t (softmax(z_t) − e_{y_t}) h_tᵀ with ℓ_i = −Σ_t log π(y_t), the full V×H matrix.
# Default here: the same feature through a factored projection (P_out δ_t)(P_in h_t)ᵀ, E<f_i,f_j> = <g_i,g_j>,
# computed analytically from the hidden states and logits of a forward we already run (no extra backward).

class FeatureSpec:
    """What a feature needs: the LM head and its projection pair, or a common.Featurizer for other layers."""

    def __init__(self, model, cfg: Config):
        self.kind = cfg.salt_features if cfg.salt != "off" else "none"
        head = common.select_linear_layers(model, "lm_head")
        self.head, self.p_out, self.p_in, self.featurizer = next(iter(head.values())), None, None, None
        if self.kind == "layers":
            self.featurizer = common.Featurizer(model, cfg.salt_layers, cfg.salt_k_out, cfg.salt_k_in,
                                                seed=cfg.seed, reduction="sum", temperature=cfg.temperature)
        elif self.kind == "lm_head_exact":
            V, H = self.head.out_features, self.head.in_features
            if V * H > 4_000_000:
                raise UserError(f"salt_features=lm_head_exact would store V·H = {V}×{H} floats per rollout",
                                hint="use --salt_features lm_head (projected) for large vocabularies")
        elif self.kind == "lm_head":
            proj = common.FactoredProjector(head, cfg.salt_k_out, cfg.salt_k_in, seed=cfg.seed)
            self.p_out, self.p_in = next(iter(proj.mats.values()))

    @property
    def from_forward(self) -> bool:  # LM-head features come free with the policy forward's hidden states and logits
        return self.kind != "layers"


@contextlib.contextmanager
def capture_lm_head_input(head, store: dict):
    """Forward hook keeping h_t, the LM-head input (after the final norm), detached."""
    h = head.register_forward_hook(lambda m, i, o: store.__setitem__("h", i[0].detach()))
    try:
        yield
    finally:
        h.remove()


def policy_forward(model, head, batch: dict, cfg: Config, device, want_hidden: bool):
    """Per-token log π(y_t) of the completion tokens (fp32) and, optionally, the LM-head inputs and logits.

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
    logp = common.token_logprobs(logits, batch["comp_ids"], cfg.temperature)
    hidden = store["h"][:, -(C + 1):-1] if want_hidden else None
    return logp, hidden, logits


def lm_head_features(spec: FeatureSpec, hidden, logits, batch, cfg: Config) -> torch.Tensor:
    return common.lm_head_score_features(hidden, logits, batch["comp_ids"], batch["comp_mask"], spec.p_out,
                                         spec.p_in, cfg.temperature)


@torch.no_grad()
def feature_pass(model, spec: FeatureSpec, batches: list[dict], cfg: Config, device) -> torch.Tensor:
    """Features of every local rollout before any backward (mini scope with several micro-batches, or layers)."""
    out = []
    for b in batches:
        if spec.from_forward:
            _, hidden, logits = policy_forward(model, spec.head, b, cfg, device, want_hidden=True)
            out.append(lm_head_features(spec, hidden, logits, b, cfg))
        else:
            ids = torch.cat([b["prompt_ids"], b["comp_ids"]], 1)
            am = torch.cat([b["prompt_mask"], b["comp_mask"]], 1)
            lm = torch.cat([torch.zeros_like(b["prompt_mask"]), b["comp_mask"]], 1)
            with autocast(cfg, device):
                out.append(spec.featurizer(ids, am, lm).float())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# The algorithm: group-relative advantages, SALT, the clipped policy loss
# ----------------------------------------------------------------------------------------------------------

def group_advantages(r: torch.Tensor, G: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantage a_i = (r_i − mean_g r) / (std + eps), groups of G consecutive rollouts.

    std: Bessel-corrected (unbiased) std of the rollout's group (`group`), of the whole batch (`batch`, LitePPO),
    or 1 (`none`, Dr. GRPO). eps guards zero-variance groups (their advantages are 0 either way).
    """
    g = r.double().view(-1, G)
    centred = (g - g.mean(1, keepdim=True)).flatten()
    if scale == "none":
        return centred
    std = g.std(1, keepdim=True).expand_as(g).flatten() if scale == "group" else r.double().std().expand_as(centred)
    return centred / (std + eps)


def subspace_size(pr: float, B: int, cfg: Config) -> int:
    """k = max(k_min, min(round(ρ·PR), k_max, B−1)) (Python's round: half to even, as the released code)."""
    return min(B, max(cfg.salt_k_min, min(int(round(cfg.salt_rho * pr)), cfg.salt_k_max, B - 1)))


def spectral_projector(K: torch.Tensor, k: int, random: bool = False, generator: torch.Generator | None = None):
    """P = V_k V_kᵀ, V_k the top-k eigenvectors of K (torch.linalg.eigh, ascending, exact and deterministic; the
    official code uses lobpcg when B ≥ 3k, which is iterative). random=True: a random k-dim subspace (control).
    Returns (P, the kept eigenvalues)."""
    evals, evecs = torch.linalg.eigh(K)
    B = K.shape[0]
    if random:
        Vk, _ = torch.linalg.qr(torch.randn(B, k, generator=generator, dtype=K.dtype))
    else:
        Vk = evecs[:, B - k:]
    return Vk @ Vk.T, evals[B - k:]


def mixing_alpha(n_eff: float, cfg: Config) -> float:
    """α = clip(1 − n_eff, α_min, α_max): the tail channel's weight grows with signed cancellation."""
    return min(max(1.0 - n_eff, cfg.salt_alpha_min), cfg.salt_alpha_max)


def salt_reweight(K: torch.Tensor, a: torch.Tensor, cfg: Config, generator: torch.Generator | None = None):
    """SALT's advantage reweighting (salt.md §3.1), a pure function of the Gram K (B×B) and advantages a (B,).

        PR   = (tr K)² / ‖K‖_F²                          spectral spread (effective rank)
        k    = max(k_min, min(round(ρ·PR), k_max, B−1))  adaptive subspace size
        P    = V_k V_kᵀ                                  top-k eigenvectors of K (float64 eigh)
        n_eff = aᵀKa / Σ_i a_i² K_ii                     signed-update effective sample size
        α    = clip(1 − n_eff, α_min, α_max)
        a′   = P a + α (I − P) φ(a),  φ = relu (or identity with --no_salt_relu); optional renorm of a′

    Modes: `official` as above; `identity` (φ = id, α ≡ 1) gives a′ = a exactly and checks it; `random_subspace`
    uses a random k-dim subspace instead of the top-k (control); `amplify` is a′ = P a + (1 + λ c)(I − P) a with
    c = clip(1 − n_eff, 0, 1), renormalised to ‖a‖ (a literal reading of the abstract, not the authors' rule);
    `positive_only` ignores K: a′_i = a⁺_i − mean_{j ∈ group(i)} a⁺_j (salt.md §5.3, the relu without the geometry;
    groups are G consecutive rows, so it needs the mini scope).
    B = 1 or a ≡ 0 returns a unchanged. Errors are raised, never replaced by GRPO. Returns (a′, diagnostics).
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

    pr = common.participation_ratio(K)
    k = subspace_size(pr, B, cfg)
    P, top = spectral_projector(K, k, cfg.salt == "random_subspace", generator)
    I = torch.eye(B, dtype=torch.float64)
    n_eff = common.signed_neff(K, a64)
    c = 1.0 - n_eff

    a_dom = P @ a64                                   # dominant ("shared") channel
    if cfg.salt == "amplify":
        alpha, a_tail = 1.0 + cfg.salt_lambda * min(max(c, 0.0), 1.0), (I - P) @ a64
    elif cfg.salt == "identity":
        alpha, a_tail = 1.0, (I - P) @ a64
    else:
        alpha = mixing_alpha(n_eff, cfg)
        a_tail = (I - P) @ (a64.clamp(min=0) if cfg.salt_relu else a64)   # spectral-tail ("residual") channel
    a_new = a_dom + alpha * a_tail
    if cfg.salt == "positive_only":
        pos = a64.clamp(min=0).view(-1, cfg.num_generations)
        a_new = (pos - pos.mean(1, keepdim=True)).flatten()

    renorm = "l2" if cfg.salt == "amplify" else ("none" if cfg.salt == "identity" else cfg.salt_renorm)
    if renorm == "std" and a_new.std() > 1e-8:      # official normalize_final
        a_new = a_new * (a64.std() / a_new.std())
    elif renorm == "l2" and a_new.norm() > 1e-8:
        a_new = a_new * (a64.norm() / a_new.norm())
    if cfg.salt == "identity" and (a_new - a64).abs().max() > 1e-9 * max(1.0, a64.abs().max().item()):
        raise RuntimeError(f"SALT identity self-check failed: max |a′ − a| = {(a_new - a64).abs().max():.3e}")

    e_dom, e_tail = float(a_dom @ a_dom), alpha ** 2 * float(a_tail @ a_tail)
    aKa, bKb, aKb = float(a64 @ K @ a64), float(a_new @ K @ a_new), float(a64 @ K @ a_new)
    zero = a64 == 0
    diag = {
        "B": B, "participation_ratio": pr, "pr_over_B": pr / B, "k": k, "alpha": alpha,
        "neff": n_eff, "neff_over_B": n_eff / B, "neff_after": common.signed_neff(K, a_new), "cancellation": c,
        "main_contrib_ratio": e_dom / max(e_dom + e_tail, 1e-30), "exp_contrib_ratio": e_tail / max(e_dom + e_tail, 1e-30),
        "cos_grpo_salt": aKb / math.sqrt(max(aKa * bKb, 1e-300)),  # cos(Gᵀa, Gᵀa′) from K alone
        "zero_adv_mass": float(a_new[zero].abs().sum() / a_new.abs().sum().clamp(min=1e-30)),
        "positive_adv_ratio": float((a64 > 0).double().mean()),
        "eigenvalue_max": float(top.max()), "eigenvalue_min": float(top.min()),
        "adv_change_norm": float((a_new - a64).norm() / a64.norm().clamp(min=1e-30)),
        "time_s": time.perf_counter() - t0,
    }
    if cfg.salt == "positive_only":  # no channels: the dominant/tail split does not apply
        diag.update(alpha=float("nan"), main_contrib_ratio=float("nan"), exp_contrib_ratio=float("nan"))
    return a_new.to(a.dtype), diag


def per_sample_advantage(A_tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Collapse token advantages to one per rollout: a_i = Σ_t A_it m_it / max(1, Σ_t m_it) (official)."""
    m = mask.to(A_tok.dtype)
    return (A_tok * m).sum(1) / m.sum(1).clamp(min=1)


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
# The loop: rollouts → advantages → (features → SALT) → loss → AdamW, on Accelerate
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Trainer:
    cfg: Config
    acc: object
    model: object        # as prepared by accelerate (DDP-wrapped when several processes)
    raw: object          # the unwrapped model (generation, no-grad forwards, features)
    ref: object
    tok: object
    opt: object
    sched: object
    spec: FeatureSpec
    train_rows: list
    eval_rows: list
    buffer: dict | None = None
    last_advantages: tuple | None = None  # (a, a′) of the last SALT scope, for inspection and tests


def slice_rows(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


def micro_batches(batch: dict, cfg: Config) -> list[dict]:
    n = batch["comp_ids"].shape[0]
    mb = cfg.micro_batch_size or n
    return [slice_rows(batch, i, min(i + mb, n)) for i in range(0, n, mb)]


def make_rollouts(t: Trainer, round_idx: int) -> dict:
    """Generate this process's share of the round's groups, score them, and compute advantages from the
    rewards of all processes (so `batch` scaling and the logged statistics are global)."""
    cfg, acc = t.cfg, t.acc
    G, per_proc = cfg.num_generations, cfg.prompts_per_step // acc.num_processes
    idx = prompts_for_round(len(t.train_rows), cfg.prompts_per_step, round_idx, cfg.seed)
    mine = idx[acc.process_index * per_proc:(acc.process_index + 1) * per_proc]
    texts = [format_prompt(t.tok, t.train_rows[i]["prompt"]) for i in mine for _ in range(G)]
    gens = [torch.Generator(device=acc.device).manual_seed(rollout_seed(cfg.seed, round_idx, i, g))
            for i in mine for g in range(G)]
    t0 = time.perf_counter()
    t.raw.eval()
    pids, pam, comp, cmask = generate(t.raw, t.tok, texts, cfg, acc.device, cfg.max_completion_length, gens)
    t_gen = time.perf_counter() - t0
    completions = t.tok.batch_decode(comp, skip_special_tokens=True)
    rewards = torch.tensor([reward_fn(c, t.train_rows[i]["answer"]) for c, i in
                            zip(completions, [i for i in mine for _ in range(G)])], dtype=torch.float64)
    all_r = common.gather_rows(acc, rewards.to(acc.device)).cpu()
    adv_all = group_advantages(all_r, G, cfg.scale_rewards, cfg.adv_eps)
    n_loc = len(texts)
    lo = acc.process_index * n_loc
    batch = {"prompt_ids": pids, "prompt_mask": pam, "comp_ids": comp, "comp_mask": cmask,
             "adv": adv_all[lo:lo + n_loc].float().to(acc.device), "round": round_idx}
    with torch.no_grad():  # old log-probs only when the batch is reused (μ > 1); μ = 1 uses logp.detach() as TRL
        if cfg.num_iterations > 1:
            batch["old_logp"] = torch.cat([policy_forward(t.raw, t.spec.head, b, cfg, acc.device, False)[0]
                                           for b in micro_batches(batch, cfg)])
        if cfg.beta > 0:
            batch["ref_logp"] = torch.cat([policy_forward(t.ref, t.spec.head, b, cfg, acc.device, False)[0]
                                           for b in micro_batches(batch, cfg)])
    lens = common.gather_rows(acc, cmask.sum(1).float()).cpu()
    trunc = common.gather_rows(acc, (cmask[:, -1] == 1).float() * (comp[:, -1] != t.tok.eos_token_id).float()).cpu()
    grp = all_r.view(-1, G)
    batch["metrics"] = {
        "reward": float(all_r.mean()), "reward_std": float(grp.std(1).mean()),
        "frac_reward_zero_std": float((grp.std(1) == 0).double().mean()),
        "completions/mean_length": float(lens.mean()), "completions/max_length": float(lens.max()),
        "completions/min_length": float(lens.min()), "completions/clipped_ratio": float(trunc.mean()),
        "time/generation_s": t_gen,
    }
    batch["sample"] = {"prompt": texts[0], "completion": completions[0], "reward": float(rewards[0])}
    return batch


def salt_on_scope(t: Trainer, F_local: torch.Tensor, a_local: torch.Tensor, step: int, gather: bool):
    """Gram over the scope (gathered across processes for `mini`), SALT, and this process's slice of a′."""
    acc = t.acc
    F = common.gather_rows(acc, F_local) if gather else F_local
    a = common.gather_rows(acc, a_local) if gather else a_local
    K = common.gram(F.detach().cpu().double()) / F.shape[0]  # K = G Gᵀ / B (the 1/B is immaterial: scale-invariant)
    gen = torch.Generator().manual_seed(rollout_seed(t.cfg.seed, step, -1, -1))
    a_new, diag = salt_reweight(K, a.detach().cpu().double(), t.cfg, gen)
    lo = acc.process_index * F_local.shape[0] if gather else 0
    return a_new[lo:lo + F_local.shape[0]].float().to(a_local.device), diag, (a.cpu(), a_new)


def accumulate_gradients(t: Trainer, batch: dict, step: int) -> dict:
    """One optimizer step's forward/backward over the local rollouts; leaves the summed gradient in .grad.

    With SALT in `mini` scope, features of all local rollouts are needed before the first backward: they come from
    the training forward itself when there is a single micro-batch (no extra cost), else from a no-grad pass.
    """
    cfg, acc = t.cfg, t.acc
    mbs = micro_batches(batch, cfg)
    salt_on = cfg.salt != "off"
    # whole-scope normalisers (all processes), so the loss does not depend on the split
    n_tok = int(common.gather_rows(acc, batch["comp_mask"].sum().view(1).float()).sum())
    n_seq = batch["comp_ids"].shape[0] * acc.num_processes
    timing = {"time/features_s": 0.0, "time/salt_s": 0.0, "time/backward_s": 0.0}  # backward_s: forward + backward
    diags, a_pair = [], None
    adv = batch["adv"]
    inline = salt_on and cfg.salt_scope == "mini" and len(mbs) == 1 and t.spec.from_forward
    if salt_on and cfg.salt_scope == "mini" and not inline:
        t0 = time.perf_counter()
        F = feature_pass(t.raw, t.spec, mbs, cfg, acc.device)
        timing["time/features_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        adv, d, a_pair = salt_on_scope(t, F, adv, step, gather=True)
        timing["time/salt_s"] += time.perf_counter() - t0
        diags.append(d)
    t.model.train()
    sums = {"clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "loss": 0.0}
    off = 0
    for j, b in enumerate(mbs):
        n = b["comp_ids"].shape[0]
        sync = j == len(mbs) - 1
        ctx = contextlib.nullcontext() if sync else acc.no_sync(t.model)
        with ctx:
            t0 = time.perf_counter()
            want = salt_on and (inline or (cfg.salt_scope == "micro" and t.spec.from_forward))
            logp, hidden, logits = policy_forward(t.model, t.spec.head, b, cfg, acc.device, want_hidden=want)
            a_b = adv[off:off + n]
            if salt_on and (inline or cfg.salt_scope == "micro"):
                t1 = time.perf_counter()
                if t.spec.from_forward:
                    F = lm_head_features(t.spec, hidden, logits.detach(), b, cfg)
                else:
                    F = feature_pass(t.raw, t.spec, [b], cfg, acc.device)
                t2 = time.perf_counter()
                a_b, d, pair = salt_on_scope(t, F, a_b, step, gather=inline)
                t3 = time.perf_counter()
                timing["time/features_s"] += t2 - t1
                timing["time/salt_s"] += t3 - t2
                t0 += t3 - t1  # keep features and SALT out of the forward/backward time
                diags.append(d)
                a_pair = pair if inline else a_pair
            old = b["old_logp"] if "old_logp" in b else logp.detach()
            per_tok, st = clipped_policy_loss(logp, old, a_b, b["comp_mask"], cfg, b.get("ref_logp"))
            loss = aggregate_loss(per_tok, b["comp_mask"], cfg.loss_type, n_seq, n_tok, cfg.max_completion_length)
            acc.backward(loss * acc.num_processes)  # DDP averages over processes; we want the scope's sum
            timing["time/backward_s"] += time.perf_counter() - t0
        for k in ("clip_low", "clip_high", "kl"):
            sums[k] += float(st[k])
        sums["loss"] += float(loss.detach())
        off += n
    tot = common.gather_rows(acc, torch.tensor([[sums[k] for k in sums]], device=acc.device)).sum(0).tolist()
    sums = dict(zip(sums, tot))
    m = {"loss": sums["loss"], "clip_ratio/low_mean": sums["clip_low"] / max(n_tok, 1),
         "clip_ratio/high_mean": sums["clip_high"] / max(n_tok, 1),
         "clip_ratio/region_mean": (sums["clip_low"] + sums["clip_high"]) / max(n_tok, 1),
         "num_tokens": n_tok, **timing}
    if cfg.beta > 0:
        m["kl"] = sums["kl"] / max(n_tok, 1)
    if diags:  # micro scope: mean over this process's micro-batches (a skipped one has fewer keys)
        for key in dict.fromkeys(k for d in diags for k in d):
            vals = [d[key] for d in diags if key in d]
            m[f"salt/{key}"] = sum(vals) / len(vals)
        m["salt/skipped"] = sum(d.get("skipped", 0.0) for d in diags) / len(diags)
    t.last_advantages = a_pair
    return m


def optimizer_step(t: Trainer) -> float:
    gn = t.acc.clip_grad_norm_(t.model.parameters(), t.cfg.max_grad_norm) if t.cfg.max_grad_norm > 0 else None
    t.opt.step()
    t.sched.step()
    t.opt.zero_grad(set_to_none=True)
    return float(gn) if gn is not None else float("nan")


@torch.no_grad()
def evaluate(t: Trainer) -> float:
    """Greedy accuracy on the held-out rows (each process scores its slice, then the counts are summed)."""
    cfg, acc = t.cfg, t.acc
    rows = t.eval_rows[acc.process_index::acc.num_processes]
    t.raw.eval()
    correct = 0.0
    for s in range(0, len(rows), cfg.eval_batch_size):
        chunk = rows[s:s + cfg.eval_batch_size]
        _, _, comp, _ = generate(t.raw, t.tok, [format_prompt(t.tok, r["prompt"]) for r in chunk], cfg, acc.device,
                                 cfg.max_completion_length)
        texts = t.tok.batch_decode(comp, skip_special_tokens=True)
        correct += sum(reward_fn(c, r["answer"]) for c, r in zip(texts, chunk))
    tot = common.gather_rows(acc, torch.tensor([[correct, len(rows)]], device=acc.device, dtype=torch.float64)).sum(0)
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors model + optimizer, scheduler, RNG, step, the current rollout buffer)
# ----------------------------------------------------------------------------------------------------------

def save_checkpoint(t: Trainer, step: int, path: Path) -> None:
    acc = t.acc
    acc.wait_for_everyone()
    sd = acc.get_state_dict(t.model)  # collective under FSDP/DeepSpeed: call it on every process
    if acc.is_main_process:
        tmp = path.parent / f".{path.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        common.save_safetensors(tmp / "model.safetensors", untie(sd))
        torch.save({"optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
        common.write_json(tmp / "state.json", {"step": step, "config": dataclasses.asdict(t.cfg)})
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if t.buffer is not None and (step % t.cfg.num_iterations) != 0:  # mid-round: the rollouts are state too
        tensors = {k: v for k, v in t.buffer.items() if torch.is_tensor(v)}
        acc.wait_for_everyone()
        common.save_safetensors(path / f"rollouts-{acc.process_index}.safetensors", tensors,
                                {"round": str(t.buffer["round"])})
    acc.wait_for_everyone()


def untie(sd: dict) -> dict:
    """Drop tensors that share storage with an earlier one (tied embeddings): safetensors refuses shared memory."""
    seen, out = set(), {}
    for k, v in sd.items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v
    return out


def load_checkpoint(t: Trainer, path: Path) -> int:
    from safetensors.torch import load_file

    if not (path / "state.json").exists() or not (path / "model.safetensors").exists():
        raise UserError(f"{path} is not a checkpoint (no state.json / model.safetensors)",
                        hint="pass an output_dir/checkpoint-N folder to --resume_from")
    state = json.loads((path / "state.json").read_text())
    sd = load_file(str(path / "model.safetensors"), device=str(t.acc.device))
    missing, unexpected = t.raw.load_state_dict(sd, strict=False)
    tied = {k for k, v in t.raw.state_dict().items() if k not in sd and any(
        v.data_ptr() == w.data_ptr() for n, w in t.raw.state_dict().items() if n in sd)}
    if unexpected or set(missing) - tied:
        raise UserError(f"{path}: checkpoint does not match the model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors)", hint="resume with the same --model")
    ts = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
    t.opt.load_state_dict(ts["optimizer"])
    t.sched.load_state_dict(ts["scheduler"])
    torch.set_rng_state(ts["torch_rng"])
    step = int(state["step"])
    rp = path / f"rollouts-{t.acc.process_index}.safetensors"
    if step % t.cfg.num_iterations:
        if not rp.exists():
            raise UserError(f"{path}: saved mid-round but {rp.name} is missing (resume with the same process count)")
        from safetensors import safe_open

        with safe_open(str(rp), "pt", device=str(t.acc.device)) as f:
            t.buffer = {k: f.get_tensor(k) for k in f.keys()}
            t.buffer["round"] = int(f.metadata()["round"])
        t.buffer["metrics"], t.buffer["sample"] = {}, {}
    return step


# ----------------------------------------------------------------------------------------------------------
# Setup, training run, summary
# ----------------------------------------------------------------------------------------------------------

def build(cfg: Config, accelerator=None) -> Trainer:
    from accelerate import Accelerator

    log_with = None if cfg.report_to in ("", "none") else cfg.report_to.split(",")
    if log_with and "tensorboard" in log_with:
        import importlib.util

        if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
            raise UserError("--report_to tensorboard: tensorboard is not installed", hint="pip install tensorboard")
    acc = accelerator or Accelerator(log_with=log_with, project_dir=cfg.output_dir)
    validate(cfg, acc.num_processes)
    train_rows, eval_rows = load_rows(cfg)
    dtype = torch.float32
    model, tok = common.load_model(cfg.model, dtype, cfg.trust_remote_code, seed=cfg.seed)
    ref = None
    if cfg.beta > 0:
        ref, _ = common.load_model(cfg.model, dtype, cfg.trust_remote_code, seed=cfg.seed)
        ref.requires_grad_(False).eval().to(acc.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)

    def lr_lambda(s):
        if s < cfg.warmup_steps:
            return (s + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, (cfg.max_steps - s) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)  # not prepared: accelerate would step it per process
    prepared, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(prepared)
    spec = FeatureSpec(raw, cfg)  # after prepare: projections live on the model's device
    return Trainer(cfg, acc, prepared, raw, ref, tok, opt, sched, spec, train_rows, eval_rows)


def train(cfg: Config, accelerator=None) -> dict:
    """The whole run; returns the summary (on every process)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    t = build(cfg, accelerator)
    acc, out = t.acc, Path(cfg.output_dir)
    start = load_checkpoint(t, Path(cfg.resume_from)) if cfg.resume_from else 0
    if log_with := (None if cfg.report_to in ("", "none") else cfg.report_to):
        acc.init_trackers("salt_grpo", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                               if isinstance(v, (int, float, str, bool))})
    logger = common.MetricsLogger(acc, out, resume=bool(cfg.resume_from))
    if cfg.resume_from and acc.is_main_process and logger.path.exists():  # drop steps the resumed run will redo
        common.write_jsonl(logger.path, [r for r in common.read_metrics(logger.path) if r["step"] <= start])
    acc0 = evaluate(t) if start == 0 and cfg.eval_size else None
    if acc0 is not None:
        logger.log({"eval/accuracy": acc0}, step=0)
    history, evals = [], ([(0, acc0)] if acc0 is not None else [])
    bar = tqdm(range(start, cfg.max_steps), desc=f"GRPO+SALT[{cfg.salt}]", disable=not acc.is_main_process,
               initial=start, total=cfg.max_steps, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        round_idx = step // cfg.num_iterations
        if t.buffer is None or t.buffer["round"] != round_idx:
            t.buffer = make_rollouts(t, round_idx)
        m = dict(t.buffer["metrics"]) if step % cfg.num_iterations == 0 else {}
        m.update(accumulate_gradients(t, t.buffer, step))
        m["learning_rate"] = t.sched.get_last_lr()[0]  # the rate this step uses
        t1 = time.perf_counter()
        m["grad_norm"] = optimizer_step(t)
        m["time/optimizer_s"] = time.perf_counter() - t1
        m["step_time"] = time.perf_counter() - t0
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            m["eval/accuracy"] = evaluate(t)
            evals.append((step + 1, m["eval/accuracy"]))
        logger.log(m, step=step + 1)
        history.append(m)
        if acc.is_main_process and t.buffer.get("sample"):
            common.write_json(out / "last_sample.json", t.buffer["sample"])
        bar.set_postfix(reward=f"{m.get('reward', float('nan')):.2f}",
                        neff=f"{m.get('salt/neff', float('nan')):.2f}", alpha=f"{m.get('salt/alpha', float('nan')):.2f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(t, step + 1, out / f"checkpoint-{step + 1}")
    bar.close()
    acc_end = evaluate(t) if cfg.eval_size else None
    final = out / "final"
    acc.wait_for_everyone()
    sd = acc.get_state_dict(t.model)
    if acc.is_main_process:
        if cfg.max_steps > start:
            logger.log({"eval/accuracy": acc_end}, step=cfg.max_steps)
        t.raw.save_pretrained(final, state_dict=sd)
        t.tok.save_pretrained(final)
        if getattr(t, "last_advantages", None) is not None:  # the last SALT scope: a and a′ (whole scope)
            a, a_new = t.last_advantages
            common.save_safetensors(out / "last_advantages.safetensors", {"a": a, "a_new": a_new})
    rewards = [h["reward"] for h in history if "reward" in h]
    k = max(1, min(8, len(rewards) // 4))  # reward is noisy per step: average the first / last quarter
    summary = {
        "salt": cfg.salt, "model": cfg.model, "steps": cfg.max_steps, "resumed_from_step": start,
        "processes": acc.num_processes,
        "reward_start": sum(rewards[:k]) / k if rewards else None, "reward_end": sum(rewards[-k:]) / k if rewards else None,
        "eval_accuracy_start": acc0, "eval_accuracy_end": acc_end, "eval_size": len(t.eval_rows),
        "eval_history": evals + ([(cfg.max_steps, acc_end)] if acc_end is not None else []), "reward_steps_averaged": k,
        "wall_time_s": time.perf_counter() - t_start,
        "outputs": {"dir": str(out), "metrics": str(out / "metrics.jsonl"), "final_model": str(final),
                    "summary": str(out / "summary.json")},
    }
    if acc.is_main_process:
        common.write_json(out / "summary.json", summary)
    if log_with:
        acc.end_training()
    acc.wait_for_everyone()
    return summary


PLOT_KEYS = ["reward", "reward_std", "frac_reward_zero_std", "eval/accuracy", "loss", "grad_norm",
             "completions/mean_length", "clip_ratio/region_mean", "kl", "step_time", "salt/participation_ratio",
             "salt/pr_over_B", "salt/neff", "salt/neff_after", "salt/alpha", "salt/k", "salt/main_contrib_ratio",
             "salt/cos_grpo_salt", "salt/zero_adv_mass"]


def plot(run_dir: str) -> Path:
    p = Path(run_dir)
    jsonl = p / "metrics.jsonl" if p.is_dir() else p
    if not jsonl.exists():
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
    cfg = parse_config(argv)
    s = train(cfg)
    if s["processes"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(f"SALT[{s['salt']}] GRPO on {s['model']}: {s['steps']} steps in {s['wall_time_s']:.0f} s "
              f"({s['processes']} process{'es' if s['processes'] > 1 else ''})")
        print(f"  train reward        {_fmt(s['reward_start'])} -> {_fmt(s['reward_end'])} "
              f"(sampled; mean over the first / last {s['reward_steps_averaged']} step(s))")
        print(f"  held-out accuracy   {_fmt(s['eval_accuracy_start'], True)} -> {_fmt(s['eval_accuracy_end'], True)} "
              f"(greedy, {s['eval_size']} problems)")
        print(f"  outputs             {s['outputs']['dir']}/ (metrics.jsonl, summary.json, final/; "
              f"plot: python salt_grpo.py plot {s['outputs']['dir']})")
    return s


if __name__ == "__main__":
    common.run_main(main)
