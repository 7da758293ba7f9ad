"""Exact Grams without forming per-sample gradients (LM head and Linear layers) and the TensorSketch: each equals
(or, the sketch, is an unbiased estimate of) the Gram of the materialised per-sample gradients."""
import pytest
import torch

import common as C
import reference as R
from test_common import rel, tiny  # noqa: F401  (fixture)


def materialised(x, delta, rows, n):
    """G_i = Σ_{t∈i} δ_t x_tᵀ, flattened (n, d_out·d_in), fp32."""
    G = torch.zeros(n, delta.shape[1], x.shape[1])
    G.index_add_(0, rows, torch.einsum("no,ni->noi", delta.float(), x.float()))
    return G.flatten(1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lm_head_gram_equals_the_gram_of_exact_gradients(tiny, temperature):  # noqa: F811
    model, _, ids, am, lm = tiny  # left-padded rows of unequal length, unscored prompt tokens
    head = C.select_linear_layers(model, "lm_head")
    G = R.exact_per_sample_grads(model, R.linear_params(head), ids, am, lm, temperature=temperature)
    out = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
    h, z = out.hidden_states[-1][:, :-1], out.logits[:, :-1]
    K = C.lm_head_gram(h, z, ids[:, 1:], lm[:, 1:], temperature, chunk_tokens=5) / temperature ** 2  # 1/τ dropped
    assert rel(K, C.gram(G)) <= 1e-5
    # masked positions are ignored whatever they hold
    junk = ~lm[:, 1:].bool()
    K2 = C.lm_head_gram(h.masked_fill(junk[..., None], 3.0), z.masked_fill(junk[..., None], -7.0), ids[:, 1:],
                        lm[:, 1:], temperature, chunk_tokens=64) / temperature ** 2
    assert rel(K2, K) <= 1e-6
    # a wrong kernel (labels ignored, or a different temperature) fails the same check
    assert rel(C.lm_head_gram(h, z, ids[:, 1:].roll(1, 1), lm[:, 1:], temperature) / temperature ** 2,
               C.gram(G)) > 1e-2
    assert rel(C.lm_head_gram(h, z, ids[:, 1:], lm[:, 1:], temperature * 3) / temperature ** 2, C.gram(G)) > 1e-4


def test_lm_head_gram_at_full_vocabulary():
    """4 rollouts at V = 49152 (SmolLM2's vocabulary) with a random LM head: equals materialised V × H gradients."""
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 4, 6, 49152, 16
    hidden = torch.randn(B, T, H, generator=g)
    logits = hidden @ torch.randn(H, V, generator=g) * 0.5
    labels = torch.randint(V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, :2] = mask[3, 4:] = 0
    tok = C.lm_head_tokens(hidden, logits, labels, mask)
    G = materialised(tok["h"], C.score_delta(tok["z"], tok["y"]), tok["r"], B)
    assert rel(C.lm_head_gram(hidden, logits, labels, mask, chunk_tokens=7), C.gram(G)) <= 1e-5


def test_linear_gram_equals_the_gram_of_exact_layer_gradients(tiny):  # noqa: F811
    model, _, ids, am, lm = tiny
    layers = C.select_linear_layers(model, "last:2")
    G = R.exact_per_sample_grads(model, R.linear_params(layers), ids, am, lm)
    tok = C.linear_tokens(C.linear_io_grads(model, layers, ids, am, lm), am)
    K = sum(C.linear_gram(tok[f"x:{n}"], tok[f"d:{n}"], tok[f"r:{n}"], len(ids), chunk_tokens=9) for n in layers)
    assert rel(K, C.gram(G)) <= 1e-5
    one = next(iter(layers))  # one layer alone is not the Gram of both
    assert rel(C.linear_gram(tok[f"x:{one}"], tok[f"d:{one}"], tok[f"r:{one}"], len(ids)), C.gram(G)) > 1e-2


def synthetic(seed=0, B=8, T=32, d_out=64, d_in=48):
    """Rank-1 token terms summed over T tokens per row, rows sharing a common direction (non-trivial cosines)."""
    g = torch.Generator().manual_seed(seed)
    common_x = torch.randn(d_in, generator=g)
    x = torch.randn(B * T, d_in, generator=g) + common_x
    delta = torch.randn(B * T, d_out, generator=g)
    rows = torch.arange(B).repeat_interleave(T)
    return x, delta, rows, B


def test_tensor_sketch_is_unbiased_and_within_twice_dense_jl():
    x, delta, rows, B = synthetic()
    G = materialised(x, delta, rows, B)
    K = C.gram(G)
    assert rel(C.linear_gram(x, delta, rows, B, chunk_tokens=50), K) <= 1e-6
    d = 256
    Ks = [C.gram(C.tensor_sketch(x, delta, rows, B, d, seed=s, chunk_tokens=100)) for s in range(300)]
    single = sum(rel(k, K) for k in Ks[:30]) / 30
    jl = sum(rel(C.gram(R.dense_jl(G, d, seed=s)), K) for s in range(30)) / 30
    assert single <= 2 * jl  # the required quality: within 2× of a dense Gaussian JL at equal d
    mean_err = rel(torch.stack(Ks).mean(0), K)
    assert mean_err < single / 8  # unbiased: the average over 300 seeds converges (≈ 1/√300 of one)
    assert rel(torch.stack(Ks[:20]).mean(0), K) > mean_err
    # a callable δ (formed block by block) gives the same features as the tensor
    F1 = C.tensor_sketch(x, delta, rows, B, d, seed=3)
    F2 = C.tensor_sketch(x, lambda s, e: delta[s:e], rows, B, d, seed=3, chunk_tokens=33)
    assert torch.allclose(F1, F2, atol=1e-4)


def test_tensor_sketch_of_lm_head_matches_score_delta():
    g = torch.Generator().manual_seed(1)
    B, T, V, H = 4, 5, 300, 8
    hidden, logits = torch.randn(B, T, H, generator=g), torch.randn(B, T, V, generator=g)
    labels, mask = torch.randint(V, (B, T), generator=g), torch.ones(B, T)
    tok = C.lm_head_tokens(hidden, logits, labels, mask)
    F = C.lm_head_sketch(tok, B, 128, seed=2, temperature=0.5)
    ref = C.tensor_sketch(tok["h"], C.score_delta(tok["z"], tok["y"], 0.5), tok["r"], B, 128, seed=2)
    assert torch.allclose(F, ref, atol=1e-5)
