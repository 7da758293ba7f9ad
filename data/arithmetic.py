"""The built-in task of salt_grpo.py as data: seeded one-digit sums and short word problems in GSM8K's format
(`question`, `answer` = "3 + 4 = 7\\n#### 7"), written to data/arithmetic/{train,test}.jsonl.

    python -m data.arithmetic          # rewrite the committed files (tests/test_salt.py checks they match)

Train and test draw from disjoint operand tuples (`held_out`), so test accuracy measures generalisation.
The task's verifier lives here too: `extract_final_number` and the reward functions salt_grpo.py names `exact_match`
and `closeness` (TRL's signature). Standard library only.
"""
import contextlib
import json
import math
import random
import re
import zlib
from pathlib import Path
from typing import Optional

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
ITEMS = ["apples", "books", "coins", "pens", "stamps", "shells", "cards", "marbles"]
FOLDER = Path(__file__).resolve().parent / "arithmetic"
# what the committed files hold: salt_grpo's defaults (--seed 0, --task_*), and more test rows than --eval_size
COMMITTED = dict(seed=0, train_size=4096, test_size=512, min_terms=2, max_terms=2, digits=1, word_frac=0.25)


def held_out(terms: tuple[int, ...]) -> bool:
    """One operand tuple in five is reserved for evaluation (stable across seeds and sizes)."""
    return zlib.crc32(repr(terms).encode()) % 5 == 0


def arithmetic_task(n: int, seed: int, held_out_split: bool, min_terms=2, max_terms=2, digits=1, word_frac=0.25):
    """n seeded problems {prompt, answer (a float)}; the first n of a longer draw are the same n."""
    rng = random.Random(seed * 2 + held_out_split)
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    if digits == 1 and max_terms == min_terms == 1:  # ten tuples, two held out: a split this small never fills
        raise ValueError("the built-in task needs at least 2 terms of 1 digit to have a held-out split")
    rows = []
    while len(rows) < n:
        terms = tuple(rng.randint(lo, hi) for _ in range(rng.randint(min_terms, max_terms)))
        if held_out(terms) != held_out_split:
            continue
        if rng.random() < word_frac:
            name, item = rng.choice(NAMES), rng.choice(ITEMS)
            more = " and then ".join(f"gets {t} more" for t in terms[1:])
            q = f"{name} has {terms[0]} {item}, {more}. How many {item} does {name} have now?"
        else:
            q = "What is " + " + ".join(map(str, terms)) + "?"
        rows.append({"prompt": q + " Answer with just the number.", "answer": float(sum(terms))})
    return rows


def gsm8k_rows(rows: list[dict]) -> list[dict]:
    """{question, answer "… #### N"} rows; the worked sum is read back from the question's numbers."""
    out = []
    for r in rows:
        terms = [int(w.strip(",.?")) for w in r["prompt"].split() if w.strip(",.?").isdigit()]
        out.append({"question": r["prompt"], "answer": f"{' + '.join(map(str, terms))} = {int(r['answer'])}\n"
                                                       f"#### {int(r['answer'])}"})
    return out


def write(folder: Path, seed: int, train_size: int, test_size: int, **task) -> tuple[Path, Path]:
    """train.jsonl and test.jsonl of the task under `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, n, split in zip(paths, (train_size, test_size), (False, True)):
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in gsm8k_rows(arithmetic_task(n, seed, split, **task))]
        path.write_text("".join(lines), encoding="utf-8")
    return paths


# ---- the verifier: the answer parser and the built-in reward functions ----

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


def completion_text(c) -> str:
    """A completion as text: TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    return c[-1]["content"] if isinstance(c, list) else c


def reward_fn(completion: str, answer) -> float:
    """Verifiable reward: 1 when the completion's final number equals the answer, else 0 (garbage → 0)."""
    x, y = extract_final_number(completion), extract_final_number(answer)
    return float(x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y)))


def exact_match(completions, answer_column="answer", **columns) -> list[float]:
    """Built-in reward (the default): 1 when the final number of the completion equals the answer, else 0."""
    return [reward_fn(completion_text(c), a) for c, a in zip(completions, columns[answer_column])]


def closeness(completions, answer_column="answer", **columns) -> list[float]:
    """Built-in partial credit 1 / (1 + |x − answer|) for the completion's final number x (0 without a number). Dense,
    so even a random model gets mixed groups: `--preset smoke` uses it to exercise SALT end to end."""
    out = []
    for c, a in zip(completions, columns[answer_column]):
        x, y = extract_final_number(completion_text(c)), extract_final_number(a)
        out.append(0.0 if x is None or y is None else 1.0 / (1.0 + min(abs(x - y), 1e300)))
    return out


REWARDS = {"exact_match": exact_match, "closeness": closeness}  # --reward_funcs names


if __name__ == "__main__":
    c = dict(COMMITTED)
    print("wrote", *write(FOLDER, c.pop("seed"), c.pop("train_size"), c.pop("test_size"), **c))
