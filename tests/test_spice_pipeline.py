"""spice_select.py end to end on the tiny model: pool loading and errors, masks, config, cache resume,
2 processes == 1 process, the CLI, pool-by-pool and online modes; one slow run on the embedded SmolLM2."""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import harness
import spice_select as S
from common import UserError
from data import spice_pool

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def demo_rows(n):
    """The first n rows of the demo pool (= data.spice_pool.generate(n)), read as any file is."""
    return dict(pool=str(S.DEMO_POOL), split=f"train[:{n}]")


def tiny_cfg(tmp, rows=48, **kw):
    base = dict(model="tiny", dtype="float32", **demo_rows(rows), max_length=48, batch_size=8,
                shard_batches=2, budget=0.25, output_dir=str(tmp), compare=False)
    base.update(kw)
    return S.validate(S.Config(**base))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------- pool

def test_demo_pool_is_seeded_and_tagged():
    a, b = spice_pool.generate(800, 0.2, 0.1, seed=3), spice_pool.generate(800, 0.2, 0.1, seed=3)
    assert a == b and a != spice_pool.generate(800, 0.2, 0.1, seed=4)
    assert {r["family"] for r in a} == set(spice_pool.FAMILIES)
    corrupt = [r for r in a if r["corrupted"] and r["duplicate_of"] is None]
    dups = [r for r in a if r["duplicate_of"] is not None]
    assert 0.12 < len(corrupt) / 800 < 0.25 and 0.05 < len(dups) / 800 < 0.15
    for r in dups:  # a near-duplicate repeats its source's response and tags with a reworded prompt
        src = a[r["duplicate_of"]]
        assert r["response"] == src["response"] and r["instruction"].endswith(src["instruction"])
        assert r["family"] == src["family"] and r["corrupted"] == src["corrupted"]
    clean = [r for r in a if not r["corrupted"] and r["family"] == "arithmetic"]
    for r in clean[:20]:  # clean responses are right
        q = r["instruction"].removeprefix("What is ").rstrip("?")
        assert r["response"] == f"{q} = {eval(q)}."


def test_demo_pool_files_regenerate_byte_for_byte(tmp_path):
    """The committed files are what `python -m data.spice_pool` writes; a pool is a prefix of a larger one."""
    for path, n in spice_pool.FILES.items():
        assert spice_pool.write(tmp_path / path.name, spice_pool.generate(n)).read_bytes() == path.read_bytes()
    assert set(spice_pool.FILES) == {S.DEMO_POOL, S.SMOKE_POOL}
    assert spice_pool.generate(500)[:64] == spice_pool.generate(64)
    cli = tmp_path / "cli.jsonl"
    spice_pool.main(["--rows", "64", "--out", str(cli)])  # the command line and pool_file write the same bytes
    assert cli.read_bytes() == spice_pool.pool_file(tmp_path, 64).read_bytes() == S.SMOKE_POOL.read_bytes()


def test_default_and_smoke_configs_read_the_demo_pools():
    """No --pool: the 500 seeded rows the script generated in memory before they became a file; smoke: 64."""
    rows, examples, label, skipped = S.load_pool(S.Config())
    assert rows == spice_pool.generate(500, 0.15, 0.15, seed=0) and label == str(S.DEMO_POOL) and not skipped
    assert [(e.prompt, e.response) for e in examples] == [(r["instruction"], r["response"]) for r in rows]
    assert S.load_pool(S.parse_config(["--preset", "smoke"]))[0] == spice_pool.generate(64)
    assert S.load_pool(S.Config(**demo_rows(48)))[0] == spice_pool.generate(48)


def test_field_conventions(tmp_path):
    cases = [
        ([{"instruction": "a", "response": "b"}], ("a", "b")),
        ([{"input": "a", "output": "b"}], ("a", "b")),
        ([{"instruction": "a", "input": "ctx", "output": "b"}], ("a\n\nInput:\nctx", "b")),
        ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
         ([{"role": "user", "content": "a"}], "b")),
    ]
    for rows, (prompt, response) in cases:
        cfg = S.Config(pool=write_jsonl(tmp_path / "p.jsonl", rows))
        kept, ex, label, skipped = S.load_pool(cfg)
        assert (ex[0].prompt, ex[0].response) == (prompt, response) and not skipped
    cfg = S.Config(pool=write_jsonl(tmp_path / "q.jsonl", [{"q": "a", "a": "b"}]), instruction_field="q",
                   response_field="a")
    assert S.load_pool(cfg)[1][0].response == "b"


@pytest.mark.parametrize("rows, match", [
    ([{"instruction": "a", "response": "b"}, {"instruction": "c"}], r"p\.jsonl row 2: missing field 'response'"),
    ([{"instruction": "a", "response": "b"}, {"instruction": "c", "response": ["x"]}],
     r"p\.jsonl row 2: field 'response' must be a string, got list"),
    ([{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "  "}], r"p\.jsonl row 2: field 'response' is empty"),
    ([{"messages": [{"role": "user", "content": "a"}]}], r"p\.jsonl row 1: .*last message must be .*assistant"),
    ([{"messages": "hello"}], r"p\.jsonl row 1: field 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}], r"needs string `role` and `content`"),
    (["[1, 2]"], r"p\.jsonl row 1: expected a JSON object"),
    (["{broken"], r"p\.jsonl row 1: invalid JSON"),
])
def test_malformed_rows_name_file_row_field(tmp_path, rows, match):
    cfg = S.Config(pool=write_jsonl(tmp_path / "p.jsonl", rows))
    with pytest.raises(UserError, match=match):
        S.load_pool(cfg)


def test_empty_pool_and_skip_malformed(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        S.load_pool(S.Config(pool=str(tmp_path / "e.jsonl")))
    rows = [{"instruction": "a", "response": "b"}, {"instruction": "c"}, {"instruction": "d", "response": "e"}]
    kept, ex, _, skipped = S.load_pool(S.Config(pool=write_jsonl(tmp_path / "p.jsonl", rows), skip_malformed=True))
    assert kept == [rows[0], rows[2]] and len(skipped) == 1 and skipped[0]["index"] == 1
    assert "p.jsonl row 2" in skipped[0]["error"]
    with pytest.raises(UserError, match="every row is malformed"):
        S.load_pool(S.Config(pool=write_jsonl(tmp_path / "m.jsonl", [{"x": 1}]), skip_malformed=True))


def test_parquet_rows_of_the_wrong_type(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"instruction": "a", "response": 3.5}, {"instruction": "b", "response": None}]) \
        .to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(UserError, match=r"p\.parquet row 2: field 'response' is empty"):
        S.load_pool(S.Config(pool=str(tmp_path / "p.parquet")))


def test_loss_mask_scores_response_tokens_only():
    from harness import char_tokenizer

    tok = char_tokenizer()
    ex = [harness.Example("2+2", "4"), harness.Example("say hi", "hi there")]
    for mask_prompt in (True, False):
        cfg = S.Config(max_length=64, mask_prompt=mask_prompt)
        toks = S.tokenize(ex, tok, cfg)
        ids, am, lm = S.collate(toks, tok.pad_token_id, mask_prompt)
        for b, (x, n_prompt) in enumerate(toks):
            scored = ids[b][lm[b].bool()].tolist()
            expect = x[n_prompt:] if mask_prompt else x[1:]
            assert scored == expect and tok.decode(x[:n_prompt]).startswith("Instruction:\n")
        assert (lm <= am).all() and toks[1][0][-1] == tok.eos_token_id
    long = S.tokenize([harness.Example("x" * 100, "y" * 100)], tok, S.Config(max_length=40))[0]
    assert len(long[0]) == 40 and long[1] == 20  # half the window stays scored


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("lam: 0.5\nbudget: 20\nmodel: tiny\n")
    cfg = S.parse_config(["--config", str(tmp_path / "c.yaml"), "--budget", "30", "--mask_prompt", "false"])
    assert (cfg.lam, cfg.budget, cfg.model, cfg.mask_prompt) == (0.5, 30, "tiny", False)
    (tmp_path / "c.json").write_text(json.dumps({"lamda": 1}))
    with pytest.raises(UserError, match="unknown field"):
        S.parse_config(["--config", str(tmp_path / "c.json")])
    with pytest.raises(UserError, match="--method"):
        S.parse_config(["--method", "best"])


# ---------------------------------------------------------------------------------------------- features

def test_cache_resume_gives_the_same_selection(tmp_path, monkeypatch):
    from accelerate import Accelerator

    fresh = S.run(tiny_cfg(tmp_path / "a", cache_dir="none"), Accelerator(cpu=True))
    cfg = tiny_cfg(tmp_path / "b", cache_dir=str(tmp_path / "cache"))

    class Killed(Exception):
        pass

    def save_then_die(path, tensors):  # the run is killed right after its first shard is written
        save(path, tensors)
        raise Killed

    save = S.harness.save_safetensors
    monkeypatch.setattr(S.harness, "save_safetensors", save_then_die)
    with pytest.raises(Killed):
        S.run(cfg, Accelerator(cpu=True))
    monkeypatch.undo()
    shards = list((tmp_path / "cache").glob("*/shard_*.safetensors"))
    assert len(shards) == 1
    stamp = shards[0].stat().st_mtime_ns
    resumed = S.run(cfg, Accelerator(cpu=True))
    assert resumed["indices"] == fresh["indices"] and resumed["log_det"] == pytest.approx(fresh["log_det"], abs=1e-9)
    assert shards[0].stat().st_mtime_ns == stamp  # loaded, not recomputed
    assert len(list((tmp_path / "cache").glob("*/shard_*.safetensors"))) == 3  # 48 rows / (8 × 2)
    other = tiny_cfg(tmp_path / "c", cache_dir=str(tmp_path / "cache"), features="kronecker")  # another key, another folder
    S.run(other, Accelerator(cpu=True))
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("flags, mode, dim", [
    ([], "exact", "D"), (["--feature_memory_gb", "1e-6"], "sketch", 512), (["--features", "exact"], "exact", "D"),
    (["--features", "sketch"], "sketch", 512), (["--features", "kronecker", "--k_out", "2", "--k_in", "3"],
                                                "kronecker", 28 * 2 * 3)])
def test_feature_modes_end_to_end(tmp_path, flags, mode, dim):
    """--features on the smoke preset: auto takes exact while rows × D × 4 bytes fit the budget, else the sketch."""
    res = S.main(["--preset", "smoke", "--output_dir", str(tmp_path), "--cache_dir", "none", "--sketch_dim", "512",
                  "--compare", "false"] + flags)
    model = S.build_proxy(S.parse_config(["--preset", "smoke"]), True)[0]
    D = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)  # every adapter weight, once
    assert res["gradient_dim"] == D
    assert res["features"] == mode and res["feature_dim"] == (D if dim == "D" else dim)
    assert res["layers"] and all(".lora_" in n for n in res["layers"]) and len(res["layers"]) == 2 * 7 * 2
    assert len(res["indices"]) == round(0.1 * 64)


def test_cache_key_covers_the_feature_options(tmp_path):
    cfg = tiny_cfg(tmp_path, rows=8)
    rows, ex, _, _ = S.load_pool(cfg)

    def key(**kw):
        c = S.validate(S.Config(**{**dataclasses.asdict(cfg), **kw}))
        model, tok, fz = S.build_proxy(c, c.lora, 8)
        return S.feature_cache_key(c, fz, S.tokenize(ex, tok, c))

    base = key()
    assert base == key() == key(features="exact") == key(k_out=4)  # auto → exact; k_out unused by exact
    keys = [base, key(features="sketch"), key(features="sketch", sketch_dim=64), key(features="kronecker"),
            key(features="kronecker", k_out=4), key(feature_memory_gb=1e-9), key(lora=False), key(lora_r=4)]
    assert len(set(keys[:-3] + keys[-2:])) == 7 and keys[-3] == keys[1]  # a tiny budget makes auto the sketch


def test_features_do_not_depend_on_batch_neighbours():
    """Each row's feature is the same alone and inside a padded batch (the cache and sharding rely on it)."""
    from accelerate import Accelerator

    cfg = tiny_cfg("/tmp", batch_size=8)
    rows, ex, _, _ = S.load_pool(cfg)
    model, tok, fz = S.build_proxy(cfg, False)
    toks = S.tokenize(ex, tok, cfg)
    G = S.compute_features(fz, tok, toks, cfg, Accelerator(cpu=True))
    one = torch.cat([fz(*S.collate([toks[i]], tok.pad_token_id, True)) for i in (0, 5, 17)])
    assert torch.allclose(G[[0, 5, 17]], one, rtol=1e-4, atol=1e-5)


def _two_proc_worker(out_dir, cache_dir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a parent that already made one
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2
    torch.set_num_threads(1)
    cfg = tiny_cfg(Path(out_dir) / f"r{acc.process_index}", cache_dir=cache_dir, rows=40)
    res = S.run(cfg, acc)
    Path(out_dir, f"idx{acc.process_index}.json").write_text(json.dumps(res["indices"]))


def test_two_processes_select_exactly_what_one_selects(tmp_path):
    from accelerate import Accelerator, debug_launcher

    single = S.run(tiny_cfg(tmp_path / "one", cache_dir="none", rows=40), Accelerator(cpu=True))
    debug_launcher(_two_proc_worker, args=(str(tmp_path), str(tmp_path / "cache2")), num_processes=2)
    i0 = json.loads((tmp_path / "idx0.json").read_text())
    i1 = json.loads((tmp_path / "idx1.json").read_text())
    assert i0 == i1 == single["indices"]
    # the two processes each wrote their own shards: 40 rows / 16 = 3 shards, shard s by process s mod 2
    assert len(list((tmp_path / "cache2").glob("*/shard_*.safetensors"))) == 3


# ---------------------------------------------------------------------------------------------- script

def test_cli_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "spice_select.py"), "--model", "tiny", "--dtype", "float32",
                        "--pool", str(S.SMOKE_POOL), "--max_length", "48", "--output_dir", str(out),
                        "--save_to_disk", str(tmp_path / "ds")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    for m in S.METHODS:  # the comparison table
        assert f"\n{m} " in p.stdout
    assert "frac_corrupted" in p.stdout and "families_covered" in p.stdout
    picked = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(picked) == summary["k"] == 6 and [r["spice_index"] for r in picked] == summary["indices"]
    assert {"instruction", "response", "family", "corrupted", "messages", "spice_score", "spice_t"} <= set(picked[0])
    assert summary["log_det"] == pytest.approx(sum(summary["gains"]), abs=1e-9)
    assert {s["method"] for s in summary["comparison"]} == set(S.METHODS)
    assert 0 <= summary["curvature_pool"] <= 1 and summary["config"]["lam"] == 0.1
    import datasets

    assert datasets.load_from_disk(str(tmp_path / "ds")).num_rows == 6
    bad = subprocess.run([sys.executable, str(ROOT / "spice_select.py"), "--model", "tiny", "--pool",
                          write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a"}]), "--output_dir", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "bad.jsonl row 1: missing field 'response'" in bad.stderr


def test_pool_by_pool_and_budget_errors(tmp_path):
    from accelerate import Accelerator

    res = S.run(tiny_cfg(tmp_path, cache_dir="none", pool_size=20, select_k=2), Accelerator(cpu=True))
    assert len(res["indices"]) == 2 + 2 + 1 and len(set(res["indices"])) == 5  # 48 rows: 20, 20, 8
    with pytest.raises(UserError, match="larger than the pool"):
        S.run(tiny_cfg(tmp_path, cache_dir="none", budget=100), Accelerator(cpu=True))


def test_online_mode_trains_the_proxy(tmp_path):
    from accelerate import Accelerator

    cfg = tiny_cfg(tmp_path, mode="online", pool_size=12, select_k=3, update_every=2, lr=1e-2,
                   cache_dir="none", rows=48)
    res = S.run(cfg, Accelerator(cpu=True))
    assert len(res["indices"]) == 12 and len(set(res["indices"])) == 12
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["buffer"] for m in metrics if "proxy_loss" in m] == [6, 6]  # T = 2 pools × 3 picks, then cleared
    assert res["form"] == "online" and res["log_det"] > 0
    # pool 0 is selected with the initial proxy; pool 3's gains come from the proxy after 1 update
    model, tok, fz = S.build_proxy(cfg, True)
    rows, ex, _, _ = S.load_pool(cfg)
    toks = S.tokenize(ex, tok, cfg)
    wins = S.pool_windows(48, 12, cfg.seed)
    G0 = S.compute_features(fz, tok, [toks[i] for i in wins[0]], cfg, Accelerator(cpu=True))
    assert res["indices"][:3] == [wins[0][i] for i in S.spice_select(G0, 3).indices]
    G3 = S.compute_features(fz, tok, [toks[i] for i in wins[3]], cfg, Accelerator(cpu=True))
    stale = S.spice_select(G3, 3)
    picks = json.loads((tmp_path / "summary.json").read_text())["gains"]
    assert abs(stale.records[0]["delta"] - picks[9]) > 1e-3


@pytest.mark.slow
def test_embedded_smollm2_small_run(tmp_path):
    from accelerate import Accelerator

    cfg = S.validate(S.Config(**demo_rows(32), budget=0.25, output_dir=str(tmp_path), cache_dir="none",
                              batch_size=16))
    res = S.run(cfg, Accelerator(cpu=True))
    assert res["k"] == 8 and res["features"] == "exact"  # 32 rows × D fit the 2 GB budget
    assert res["feature_dim"] == res["gradient_dim"] == 30 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112)  # LoRA r = 8, 30 blocks
    by = {s["method"]: s for s in res["comparison"]}
    assert by["spice"]["log_det"] >= by["random"]["log_det"]
