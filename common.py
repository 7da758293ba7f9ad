"""The geometry of per-sample gradients, which both papers read; no file, flag or run plumbing (harness.py has it).

1. Features: per-sample gradient features and exact per-sample Grams from ONE batched forward + backward, never a
   backward per sample (the slow references the tests compare against live in tests/reference.py).
2. Geometry: Gram matrix, participation ratio, signed-update n_eff, cancellation, cosine statistics.
3. Distributed: gather rows of variable-size batches across Accelerate processes; broadcast a result.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn


class UserError(Exception):
    """Bad input or environment: shown to the user as one line plus a hint, never as a traceback (harness.run_main)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

# ----------------------------------------------------------------------------------------------------------
# 1. Per-sample gradient features
# ----------------------------------------------------------------------------------------------------------
#
# For a Linear layer y = W x (+ b), sample i's loss gradient is G_i = Σ_t δ_t x_tᵀ, δ_t = ∂ℓ_i/∂y_t (a bias is
# folded in by x → [x, 1]). Every feature below is built from the (x_t, δ_t) of one batched forward + backward:
# - kronecker: f_i = vec(P_out G_i P_inᵀ) = vec(Σ_t (P_out δ_t)(P_in x_t)ᵀ), P entries N(0, 1/k), E[PᵀP] = I, so
#   E⟨f_i, f_j⟩ = ⟨G_i, G_j⟩ at O(T·(out·k_o + in·k_i)) per sample instead of O(out·in);
# - CountSketch: G_i formed per layer by batched matmul, then hashed (S vec G_i);
# - exact Gram: ⟨G_i, G_j⟩ = Σ_{t∈i,s∈j} (δ_t·δ_s)(x_t·x_s) from token pairs, never forming G_i;
# - TensorSketch: a CountSketch of δ_t ⊗ x_t summed over tokens in the Fourier domain.


def select_linear_layers(model: nn.Module, spec: str | Sequence[str] = "last:4") -> dict[str, nn.Linear]:
    """Resolve a layer spec to {name: nn.Linear}, in model order.

    spec (comma-separated or a list), each item one of:
      `lm_head`     the output embedding (the LM-head "score" feature of SALT);
      `last:N`      every Linear inside the last N transformer blocks;
      `lora`        every LoRA adapter Linear (peft's lora_A / lora_B);
      `all`         every Linear of the model;
      anything else a regular expression matched against module names.
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    lm_head = model.get_output_embeddings()

    def blocks(name):  # the transformer block ids in a module name: model.layers.3.mlp.up_proj → {3}
        return {int(b) for b in re.findall(r"\.layers\.(\d+)\.", name)}

    chosen: dict[str, nn.Linear] = {}
    for item in items:
        if item == "lm_head":
            hits = [(n, m) for n, m in linears if m is lm_head]
        elif item == "all":
            hits = linears
        elif item == "lora":
            hits = [(n, m) for n, m in linears if re.search(r"\.lora_[AB]\.", n + ".")]
        elif item.startswith("last:"):
            n_blocks = int(item.split(":", 1)[1])
            block_ids = sorted(set().union(*(blocks(n) for n, _ in linears)))
            keep = set(block_ids[-n_blocks:]) if n_blocks > 0 else set()
            hits = [(n, m) for n, m in linears if blocks(n) & keep]
        else:
            try:
                rx = re.compile(item)
            except re.error as e:
                raise UserError(f"bad layer pattern {item!r}: {e}") from None
            hits = [(n, m) for n, m in linears if rx.search(n)]
        if not hits:
            raise UserError(f"layer spec {item!r} matches no Linear layer of the model",
                            hint="use lm_head, last:N, lora, all, or a regex over module names")
        chosen.update(hits)
    order = {n: i for i, (n, _) in enumerate(linears)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))


def _stable_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def _gaussian(rows: int, cols: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) / math.sqrt(rows)).to(device)


def _count_sketch_params(n: int, d: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash h: [n] → [d] and sign s: [n] → ±1 of a CountSketch."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    bins = torch.randint(d, (n,), generator=g)
    signs = torch.randint(2, (n,), generator=g).float() * 2 - 1
    return bins.to(device), signs.to(device)


class FactoredProjector:
    """Seeded per-layer projections (P_out, P_in) with E[PᵀP] = I; `None` sides are the identity (exact).

    k_out / k_in: rows of P_out / P_in per layer (feature dim k_out·k_in per layer). A side whose k is None, or not
    smaller than the layer's width, is left unprojected, so `k_out=None, k_in=None` gives the exact per-sample
    gradient. The matrices depend only on (seed, layer name, shape), never on the global RNG.
    """

    def __init__(self, layers: dict[str, nn.Linear], k_out: int | None = 16, k_in: int | None = 16, seed: int = 0):
        self.mats: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.dims: dict[str, int] = {}
        for name, lin in layers.items():
            dev = lin.weight.device
            n_in = lin.in_features + (lin.bias is not None)
            s = _stable_seed(seed, name)
            p_out = None if k_out is None or k_out >= lin.out_features else _gaussian(k_out, lin.out_features, s, dev)
            p_in = None if k_in is None or k_in >= n_in else _gaussian(k_in, n_in, s + 1, dev)
            self.mats[name] = (p_out, p_in)
            self.dims[name] = (lin.out_features if p_out is None else k_out) * (n_in if p_in is None else k_in)
        self.dim = sum(self.dims.values())


class CountSketch:
    """Sparse JL (CountSketch, Charikar et al. 2002) of the exact per-sample gradient: f_i = S vec(G_i) ∈ R^d.

    Coordinate j of layer l goes to bucket h_l(j) with sign s_l(j), seeded by layer name: E⟨Sx, Sy⟩ = ⟨x, y⟩ and
    Var⟨Sx, Sy⟩ = (⟨x,y⟩² + ‖x‖²‖y‖² − 2 Σ_j x_j² y_j²)/d, never above a dense Gaussian JL's. Error and cost
    against the exact gradients and the per-sample loop: docs/spice.md#features (bench/featurize.py).
    """

    def __init__(self, layers: dict[str, nn.Linear], d: int = 8192, seed: int = 0):
        self.dim, self.seeds = d, {n: _stable_seed(seed, n) for n in layers}
        self.mats = {n: (None, None) for n in layers}  # per_sample_features forms the exact G_i first
        self._hash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """S_l vec(G_i) for one layer's exact per-sample gradients g (B × D_l) → (B × d)."""
        if name not in self._hash:  # drawn once per layer, never from the global RNG
            self._hash[name] = _count_sketch_params(g.shape[1], self.dim, self.seeds[name], g.device)
        h, sign = self._hash[name]
        return torch.zeros(g.shape[0], self.dim, device=g.device).index_add_(1, h, g * sign)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(z/τ)[y] and the entropy of softmax(z/τ), in fp32 over chunks of tokens, the backward recomputing
    softmax from the saved logits and log-sum-exp: O(chunk·V) memory beyond the logits, where
    `logits.float().log_softmax(-1)` would keep a full fp32 (B, T, V) copy, a long-completion step's largest tensor."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk):
        z2, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        lse, ent = (torch.empty(y.shape, dtype=torch.float32, device=logits.device) for _ in range(2))
        for s in range(0, len(y), chunk):
            z = z2[s:s + chunk].float() / temperature
            lse[s:s + chunk] = torch.logsumexp(z, -1)
            ent[s:s + chunk] = lse[s:s + chunk] - (torch.softmax(z, -1) * z).sum(-1)  # H = lse − Σ p z
        lp = z2.gather(-1, y[:, None]).squeeze(-1).float() / temperature - lse
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return lp.view(labels.shape), ent.view(labels.shape)

    @staticmethod
    def backward(ctx, g, _):
        logits, labels, lse = ctx.saved_tensors
        z2, y, g = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), g.reshape(-1).float()
        grad = torch.empty_like(z2)
        for s in range(0, len(y), ctx.chunk):  # ∂ log p_y / ∂z = (e_y − softmax(z/τ)) / τ
            d = -torch.exp(z2[s:s + ctx.chunk].float() / ctx.temperature - lse[s:s + ctx.chunk, None])
            d[torch.arange(d.shape[0], device=d.device), y[s:s + ctx.chunk]] += 1
            grad[s:s + ctx.chunk] = d * (g[s:s + ctx.chunk, None] / ctx.temperature)
        return grad.view_as(logits), None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                   chunk_elems: int = 2**25):
    """log π(y_t | y_<t) (B, T) fp32 from logits (B, T, V) already aligned with the labels, any dtype, never copied
    to fp32 whole. with_entropy: also the per-token entropy of softmax(z/τ) (no grad)."""
    chunk = max(1, chunk_elems // logits.shape[-1])
    with torch.autocast(logits.device.type, enabled=False):
        lp, ent = _SelectiveLogSoftmax.apply(logits, labels, float(temperature), chunk)
    return (lp, ent.detach()) if with_entropy else lp


def sequence_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                 reduction: str = "sum", temperature: float = 1.0) -> torch.Tensor:
    """Per-sample loss ℓ_i = −Σ_t m_{i,t} log π(x_{i,t} | x_{i,<t}) (or its mean over masked tokens). (B,)

    loss_mask (B, T) marks the tokens whose prediction is scored (response tokens; padding is 0). Positions count
    real tokens only (cumsum of the mask − 1), so a left-padded row sees the RoPE angles it has alone.
    """
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False)
    lp = token_logprobs(out.logits[:, :-1], input_ids[:, 1:], temperature)
    m = loss_mask[:, 1:].to(lp.dtype)
    nll = -(lp * m).sum(1)
    return nll / m.sum(1).clamp(min=1) if reduction == "mean" else nll


def linear_io_grads(model: nn.Module, layers: dict[str, nn.Linear], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, loss_mask: torch.Tensor, reduction: str = "sum",
                    temperature: float = 1.0) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each chosen layer's inputs x (B, T, d_in [+1 ones column for a bias], padding zeroed) and output gradients
    δ = ∂(Σ_i ℓ_i)/∂y (B, T, d_out), fp32, one pair per call, from ONE batched forward + backward.

    Per-sample losses are independent, so δ_{i,t} is sample i's own; prompt tokens contribute through attention
    exactly as in the true gradient. Only autograd.grad w.r.t. the captured outputs: parameter .grad is never
    touched, so this can run mid-training.
    """
    store: dict[str, list] = {n: [] for n in layers}

    def keep_io(name):
        def hook(mod, inputs, output):
            if not output.requires_grad:  # first chosen layers: make y a graph leaf so δ = ∂ℓ/∂y exists
                output = output.detach().requires_grad_(True)
            store[name].append((inputs[0], output))
            return output
        return hook

    flags = [p.requires_grad for p in model.parameters()]
    handles = [m.register_forward_hook(keep_io(n)) for n, m in layers.items()]
    model.requires_grad_(False)  # autograd then keeps activations from the first chosen layer on, not the whole net
    try:
        with torch.enable_grad():
            loss = sequence_nll(model, input_ids, attention_mask, loss_mask, reduction, temperature).sum()
            outs = [y for n in layers for _, y in store[n]]
            deltas = iter(torch.autograd.grad(loss, outs, allow_unused=True))
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    pad, out = attention_mask.unsqueeze(-1).float(), {}
    for name, lin in layers.items():
        out[name] = []
        for x, _ in store[name]:  # a module called twice (e.g. shared weights) sums its contributions
            d = next(deltas)
            x = x.detach().float() * pad
            if lin.bias is not None:
                x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
            if d is not None:
                out[name].append((x, d.float()))
    return out


def per_sample_features(model: nn.Module, layers: dict[str, nn.Linear], projector: FactoredProjector | CountSketch,
                        input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                        reduction: str = "sum", temperature: float = 1.0) -> torch.Tensor:
    """Features F (B × d, fp32): f_i = Σ_t (P_out δ_t)(P_in x_t)ᵀ per layer, the flattened per-sample gradient with
    identity projections; a CountSketch hashes each layer's exact G_i as soon as it is formed (O(B·out·in) memory)."""
    io = linear_io_grads(model, layers, input_ids, attention_mask, loss_mask, reduction, temperature)
    sketch = projector if isinstance(projector, CountSketch) else None
    B, feats = input_ids.shape[0], []
    for name, lin in layers.items():
        p_out, p_in = projector.mats[name]
        width = (projector.dims[name] if sketch is None
                 else lin.out_features * (lin.in_features + (lin.bias is not None)))
        G = torch.zeros(B, width, device=input_ids.device)
        for x, d in io[name]:
            xp = x if p_in is None else x @ p_in.T
            dp = d if p_out is None else d @ p_out.T
            G += torch.einsum("bto,bti->boi", dp, xp).flatten(1)
        feats.append(G if sketch is None else sketch(name, G))
    if sketch is None:
        return torch.cat(feats, 1)
    return sum(feats, torch.zeros(B, sketch.dim, device=input_ids.device))


def linear_tokens(io: dict[str, list], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`linear_io_grads` flattened over the non-padding tokens of every call: {x:name, d:name, r:name} (row ids)."""
    sel = attention_mask.bool()
    rows = torch.arange(sel.shape[0], device=sel.device)[:, None].expand_as(sel)[sel]
    out = {}
    for name, pairs in io.items():
        out[f"x:{name}"] = torch.cat([x[sel] for x, _ in pairs]) if pairs else torch.zeros(0, 1)
        out[f"d:{name}"] = torch.cat([d[sel] for _, d in pairs]) if pairs else torch.zeros(0, 1)
        out[f"r:{name}"] = rows.repeat(len(pairs))
    return out


class Featurizer:
    """Per-sample projected gradient features for a model and a layer spec: `Featurizer(model)(ids, am, lm)`.

    layers: see `select_linear_layers`; k_out / k_in: projection rows per side (None: exact); sketch_dim: a
    CountSketch of the exact gradient to this many dims instead (k_out / k_in then unused). reduction: per-sample
    loss as a `sum` over scored tokens (SALT's score feature) or a `mean` (SFT loss).
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str] = "last:4", k_out: int | None = 16,
                 k_in: int | None = 16, seed: int = 0, reduction: str = "sum", temperature: float = 1.0,
                 sketch_dim: int | None = None):
        self.model, self.reduction, self.temperature = model, reduction, temperature
        self.layers = select_linear_layers(model, layers)
        self.projector = (CountSketch(self.layers, sketch_dim, seed) if sketch_dim else
                          FactoredProjector(self.layers, k_out, k_in, seed))
        self.dim = self.projector.dim

    def __call__(self, input_ids, attention_mask, loss_mask) -> torch.Tensor:
        return per_sample_features(self.model, self.layers, self.projector, input_ids, attention_mask, loss_mask,
                                   self.reduction, self.temperature)


# ---- The LM head without a backward: δ_t = softmax(z_t/τ) − e_{y_t} from the policy forward's logits ----------

def lm_head_tokens(hidden, logits, labels, mask) -> dict[str, torch.Tensor]:
    """The scored tokens of a batch, flattened: h (N, H), z (N, V), y (N,) and their row ids r (N,), detached.
    hidden (B, T, H), logits (B, T, V), labels and mask (B, T) aligned: position t predicts labels[:, t]."""
    sel = mask.bool()
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(sel)
    return {"h": hidden.detach()[sel], "z": logits.detach()[sel], "y": labels[sel], "r": rows[sel]}


def score_delta(z: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """δ_t = softmax(z_t/τ) − e_{y_t} (N, V) fp32: ∂(−log π(y_t))/∂z_t without its global factor 1/τ (SALT is
    invariant to a global feature scale)."""
    p = torch.softmax(z.float() / temperature, -1)
    return p.index_put_((torch.arange(len(y), device=p.device), y), torch.tensor(-1.0, device=p.device),
                        accumulate=True)


# ---- Exact Grams and the TensorSketch, from flattened tokens (x_t, δ_t, row of t) ------------------------------

def _delta_blocks(delta) -> Callable[[int, int], torch.Tensor]:
    """δ of tokens [s, e): a slice of a tensor, or a function (s, e) → δ, so that δ can be formed one block at a time
    (memory O(chunk·d_out))."""
    return delta if callable(delta) else (lambda s, e: delta[s:e].float())


def linear_gram(x: torch.Tensor, delta, rows: torch.Tensor, n_rows: int, chunk_tokens: int = 512) -> torch.Tensor:
    """Exact Gram of per-sample gradients G_i = Σ_{t∈i} δ_t x_tᵀ without forming any G_i ("ghost" inner products,
    Li et al. 2021): K_ij = Σ_{t∈i,s∈j} (δ_t·δ_s)(x_t·x_s) = R_aᵀ (Δ_a Δ_bᵀ ∘ X_a X_bᵀ) R_b over token blocks a ≤ b,
    R the token → row one-hot. (B, B) float64 in N²(d_in + d_out)/2 multiply-adds.

    x (N, d_in; a ones column appended for a bias), delta (N, d_out) or a function (start, stop) → δ, rows (N,).
    """
    get, N = _delta_blocks(delta), x.shape[0]
    R = torch.nn.functional.one_hot(rows.long(), n_rows).double()
    K = torch.zeros(n_rows, n_rows, dtype=torch.float64, device=x.device)
    starts = range(0, N, chunk_tokens)
    for a in starts:
        da, xa = get(a, a + chunk_tokens), x[a:a + chunk_tokens].float()
        for b in starts:
            if b < a:
                continue
            db = da if b == a else get(b, b + chunk_tokens)
            M = ((da @ db.T) * (xa @ x[b:b + chunk_tokens].float().T)).double()
            blk = R[a:a + chunk_tokens].T @ M @ R[b:b + chunk_tokens]
            K += blk if a == b else blk + blk.T
    return (K + K.T) / 2


def lm_head_gram(hidden: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 temperature: float = 1.0, chunk_tokens: int = 512) -> torch.Tensor:
    """Exact Gram K_ij = ⟨g_i, g_j⟩ of the LM-head score gradients g_i = Σ_{t∈i} δ_t h_tᵀ (V × H, the official
    ManualLmHeadProxy feature) by `linear_gram`, δ_t = `score_delta`; shapes as `lm_head_tokens`; (B, B) float64.

    Memory O(chunk·V) beyond the logits. = the Gram of the materialised gradients to ≤ 1e-5 in fp32
    (tests/test_gram.py); its cost: docs/salt.md#gram-options-accuracy-and-cost (bench/featurize.py).
    """
    return lm_head_gram_tokens(lm_head_tokens(hidden, logits, labels, mask), mask.shape[0], temperature, chunk_tokens)


def _score_deltas(tok: dict, temperature: float) -> Callable[[int, int], torch.Tensor]:
    return lambda s, e: score_delta(tok["z"][s:e], tok["y"][s:e], temperature)  # V-wide: formed a block at a time


def lm_head_gram_tokens(tok: dict, n_rows: int, temperature: float = 1.0, chunk_tokens: int = 512) -> torch.Tensor:
    """`lm_head_gram` from flattened tokens {h, z, y, r} (`lm_head_tokens`, possibly gathered across processes)."""
    return linear_gram(tok["h"], _score_deltas(tok, temperature), tok["r"], n_rows, chunk_tokens)


def tensor_sketch(x: torch.Tensor, delta, rows: torch.Tensor, n_rows: int, d: int, seed: int = 0,
                  chunk_tokens: int = 512) -> torch.Tensor:
    """TensorSketch (Pham & Pagh 2013) of G_i = Σ_{t∈i} δ_t x_tᵀ: f_i = IFFT(Σ_{t∈i} FFT(C_1 δ_t) ∘ FFT(C_2 x_t)),
    C_1, C_2 CountSketches, so E[f_i·f_j] = ⟨G_i, G_j⟩; (B, d) fp32 in O(N(d_out + d_in + d log d)). Inputs as
    `linear_gram`.

    Its error against the exact Gram and its cost, next to a dense Gaussian JL's: docs/salt.md#gram-options-accuracy-
    and-cost (bench/featurize.py --consumer salt).
    """
    get, N = _delta_blocks(delta), x.shape[0]
    d_out = get(0, 1).shape[1] if N else 1
    h1, s1 = _count_sketch_params(d_out, d, seed * 2 + 1, x.device)
    h2, s2 = _count_sketch_params(x.shape[1], d, seed * 2 + 2, x.device)
    acc = torch.zeros(n_rows, d // 2 + 1, dtype=torch.complex64, device=x.device)
    for s in range(0, N, chunk_tokens):
        dl, xs = get(s, s + chunk_tokens), x[s:s + chunk_tokens].float()
        cd = torch.zeros(dl.shape[0], d, device=x.device).index_add_(1, h1, dl * s1)
        cx = torch.zeros(xs.shape[0], d, device=x.device).index_add_(1, h2, xs * s2)
        acc.index_add_(0, rows[s:s + chunk_tokens].long(), torch.fft.rfft(cd) * torch.fft.rfft(cx))
    return torch.fft.irfft(acc, n=d)


def lm_head_sketch(tok: dict, n_rows: int, d: int, seed: int = 0, temperature: float = 1.0,
                   chunk_tokens: int = 512) -> torch.Tensor:
    """`tensor_sketch` of the LM-head score gradients from flattened tokens {h, z, y, r} (`lm_head_tokens`)."""
    return tensor_sketch(tok["h"], _score_deltas(tok, temperature), tok["r"], n_rows, d, seed, chunk_tokens)


# ----------------------------------------------------------------------------------------------------------
# 2. Geometry and signed-cancellation diagnostics
# ----------------------------------------------------------------------------------------------------------

def gram(F: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """K = F Fᵀ (B × B), accumulated in `dtype`, exactly symmetric; over column blocks of 2¹⁶, so that a wide F
    (exact LoRA gradients, D = 2.4 M) is never copied to `dtype` whole."""
    K = sum((b @ b.T for b in (c.to(dtype) for c in F.split(2**16, dim=1))), F.new_zeros(len(F), len(F), dtype=dtype))
    return (K + K.T) / 2


def participation_ratio(K: torch.Tensor, eps: float = 1e-30) -> float:
    """PR = (tr K)² / ‖K‖_F² = (Σλ_j)² / Σλ_j²  ∈ [1, rank K]: the effective number of directions."""
    return float(torch.trace(K) ** 2 / (K.pow(2).sum() + eps))


def signed_neff(K: torch.Tensor, a: torch.Tensor, eps: float = 1e-30) -> float:
    """Signed-update effective sample size n_eff = aᵀKa / Σ_i a_i² K_ii = ‖Σ_i a_i g_i‖² / Σ_i ‖a_i g_i‖² ∈ [0, B]:
    B when all signed updates agree, 1 when they are orthogonal, 0 when they cancel exactly."""
    a = a.to(K.dtype)
    return float(a @ K @ a / ((a * a * torch.diagonal(K)).sum() + eps))


def cancellation(K: torch.Tensor, a: torch.Tensor) -> float:
    """Signed cancellation c = 1 − n_eff (negative when the signed updates reinforce)."""
    return 1.0 - signed_neff(K, a)


def cosine_matrix(K: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """C_ij = K_ij / √(K_ii K_jj): pairwise cosines from a Gram matrix."""
    s = torch.diagonal(K).clamp(min=0).sqrt()
    return K / (s[:, None] * s[None, :] + eps)


# ----------------------------------------------------------------------------------------------------------
# 3. Distributed
# ----------------------------------------------------------------------------------------------------------

def gather_rows(accelerator, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows (n_p × ...) in rank order; n_p may differ between processes."""
    if accelerator.num_processes == 1:
        return rows
    sizes = accelerator.gather(torch.tensor([rows.shape[0]], device=rows.device)).tolist()
    allrows = accelerator.gather(accelerator.pad_across_processes(rows, dim=0))
    m = max(sizes)
    return torch.cat([allrows[r * m: r * m + s] for r, s in enumerate(sizes)])


def broadcast_object(accelerator, obj: Any = None) -> Any:
    """The main process's `obj`, on every process (picklable objects)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(accelerator, fn: Callable[[], Any]) -> None:
    """fn() on the main process only; a UserError it raises is raised on every process (none waits forever)."""
    err = None
    if accelerator.is_main_process:
        try:
            fn()
        except UserError as e:
            err = (str(e), e.hint)
    err = broadcast_object(accelerator, err)
    if err:
        raise UserError(*err)
