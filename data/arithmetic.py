"""The built-in task of salt_grpo.py as data: seeded one-digit sums and short word problems in GSM8K's format
(`question`, `answer` = "3 + 4 = 7\\n#### 7"), written to data/arithmetic/{train,test}.jsonl.

    python -m data.arithmetic          # rewrite the committed files (tests/test_salt.py checks they match)

Train and test draw from disjoint operand tuples (`held_out`), so test accuracy measures generalisation.
Standard library only.
"""
import json
import random
import zlib
from pathlib import Path

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


if __name__ == "__main__":
    c = dict(COMMITTED)
    print("wrote", *write(FOLDER, c.pop("seed"), c.pop("train_size"), c.pop("test_size"), **c))
