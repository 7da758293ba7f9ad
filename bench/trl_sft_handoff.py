"""SPICE → TRL SFT handoff: does TRL's SFTTrainer, given selected.jsonl unchanged, train the tokens SPICE scored?

Runs spice_select.py on the demo pool with the embedded SmolLM2 (or reads --selected), then builds TRL's
SFTTrainer on selected.jsonl as written (TRL defaults: prompt/completion rows, completion-only loss), trains two
steps, and prints per row the tokens SFTTrainer trains (its completion_mask) against the tokens SPICE scored
(spice_select.tokenize's loss mask), and, for comparison, what it would train on the `messages` column alone (the
whole chat-template sequence, what selected.jsonl gave TRL before issue 24). TRL is optional (not a dependency):
without it the bench says so and exits 0. To try it: pip install trl==1.16.0 (or --no-deps beside this venv).

    python bench/trl_sft_handoff.py                  # about a minute on a 2-core CPU
    python bench/trl_sft_handoff.py --selected outputs/spice/selected.jsonl
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
import spice_select as ss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selected", help="a selected.jsonl (default: select 8 rows of the demo pool now)")
    ap.add_argument("--model", default=str(harness.embedded_model_dir()), help="proxy and SFT model")
    ap.add_argument("--prompt_format", default="auto", choices=["auto", "chat", "plain"])
    a = ap.parse_args()
    try:
        import trl
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        print("trl is not installed: skipped (pip install trl==1.16.0 to run this bench)")
        return
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="sft_handoff-"))
    selected = a.selected
    if not selected:  # a cheap selection: sketched last-layer features, enough to produce rows
        ss.run(ss.parse_config(["--model", a.model, "--budget", "8", "--features", "sketch", "--sketch_dim", "512",
                                "--layers", "last:1", "--lora", "false", "--compare", "false", "--dtype", "float32",
                                "--prompt_format", a.prompt_format, "--output_dir", str(tmp / "spice")]))
        selected = str(tmp / "spice" / "selected.jsonl")
    ds = datasets.load_dataset("json", data_files=selected, split="train")
    tok = AutoTokenizer.from_pretrained(a.model)
    cfg = ss.Config(model=a.model, prompt_format=a.prompt_format, max_length=10_000)
    scored = [len(ids) - n for ids, n in ss.tokenize([harness.Example(r["instruction"], r["response"]) for r in ds],
                                                     tok, cfg)]

    def trainer(train):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        args = SFTConfig(output_dir=str(tmp / "sft"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-5,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False)
        return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)

    t = trainer(ds)
    cols = t.train_dataset.column_names  # TRL folds completion_mask into labels (-100 = not trained)
    trained = ([sum(m) for m in t.train_dataset["completion_mask"]] if "completion_mask" in cols else
               [sum(x != -100 for x in lab) for lab in t.train_dataset["labels"]])
    lengths = [len(x) for x in t.train_dataset["input_ids"]]
    losses = [h["loss"] for h in (t.train() and t.state.log_history) if "loss" in h]
    msgs = trainer(ds.remove_columns([c for c in ("prompt", "completion") if c in ds.column_names]))
    mcols = msgs.train_dataset.column_names
    whole = ([sum(x != -100 for x in lab) for lab in msgs.train_dataset["labels"]] if "labels" in mcols else
             [len(x) for x in msgs.train_dataset["input_ids"]])
    print(f"trl {trl.__version__}, {len(ds)} rows of {selected}, prompt_format {a.prompt_format}")
    print("row  sequence  SFTTrainer trains  SPICE scored  equal  | messages only: trains")
    for i, (n, tr, sc, w) in enumerate(zip(lengths, trained, scored, whole)):
        print(f"{i:>3}  {n:>8}  {tr:>17}  {sc:>12}  {str(tr == sc):>5}  | {w:>21}")
    print(f"rows where the trained tokens equal the scored tokens: {sum(t_ == s for t_, s in zip(trained, scored))} "
          f"of {len(ds)}; SFT loss over 2 steps: {', '.join(f'{x:.3f}' for x in losses)}")


if __name__ == "__main__":
    main()
