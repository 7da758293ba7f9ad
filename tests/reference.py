"""Reference implementations the shipped code must agree with: slow, by the definition, used by tests and bench only.

Import as `import reference` from a test (pytest puts tests/ on sys.path) or `from tests import reference` from
bench/ (the repository root on sys.path).
"""
import torch
import torch.nn as nn

import common


def exact_per_sample_grads(model: nn.Module, params: dict[str, nn.Parameter], input_ids, attention_mask, loss_mask,
                           reduction: str = "sum", temperature: float = 1.0) -> torch.Tensor:
    """Exact per-sample gradients (B × Σ|θ|) by one backward per sample on its unpadded sequence, as LESS and the
    official SPICE code do before projecting densely."""
    rows = []
    for i in range(input_ids.shape[0]):
        keep = attention_mask[i].bool()
        ids, am, lm = input_ids[i, keep][None], attention_mask[i, keep][None], loss_mask[i, keep][None]
        with torch.enable_grad():
            loss = common.sequence_nll(model, ids, am, lm, reduction, temperature).sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten()
                               for p, g in zip(params.values(), grads)]))
    return torch.stack(rows)


def linear_params(layers: dict[str, nn.Linear]) -> dict[str, nn.Parameter]:
    """The weights whose flattened gradients have the layout of a Featurizer's identity-projected features.

    That layout is vec([W, b]) row-major per layer, so only bias-free layers match; the tests use bias-free models.
    """
    return {f"{n}.weight": m.weight for n, m in layers.items()}


def dense_jl(x: torch.Tensor, d: int, seed: int = 0, chunk: int = 65536) -> torch.Tensor:
    """Plain Gaussian JL projection x (B × D) → (B × d), entries N(0, 1/d), regenerated per column chunk."""
    out = torch.zeros(x.shape[0], d, dtype=torch.float32, device=x.device)
    for c, start in enumerate(range(0, x.shape[1], chunk)):
        block = x[:, start:start + chunk].float()
        out += block @ common._gaussian(d, block.shape[1], seed * 7919 + c, x.device).T
    return out


def signed_neff_direct(G: torch.Tensor, a: torch.Tensor, eps: float = 1e-30) -> float:
    """n_eff = ‖Σ_i a_i g_i‖² / Σ_i ‖a_i g_i‖² from the features themselves (the definition; common.signed_neff
    computes it from the Gram)."""
    G, a = G.double(), a.double()
    return float((a @ G).pow(2).sum() / ((a[:, None] * G).pow(2).sum() + eps))
