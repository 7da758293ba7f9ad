"""The SPICE demo pool: seeded instruction rows from 8 task families, with corrupted responses and near-duplicates,
every row tagged so a selection can be scored (how many corrupted rows, duplicates, families it picked).

spice_select.py reads the files this writes like any user's dataset (`--pool`); nothing here is imported by it.

    python -m data.spice_pool           # rewrites spice_pool.jsonl (500 rows) and spice_pool_smoke.jsonl (64)
    python -m data.spice_pool --rows 2000 --seed 1 --corrupt_frac 0 --out my_pool.jsonl

Stdlib only. A pool of n rows is the first n rows of any larger pool with the same seed and fractions.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "spice_pool.jsonl"  # spice_select.py's pool when --pool is not given
SMOKE = HERE / "spice_pool_smoke.jsonl"  # its --preset smoke pool
FILES = {DEFAULT: 500, SMOKE: 64}  # file → rows, both with the defaults below (seed 0, 15 % corrupted, 15 % dups)

_WORDS = ("apple river garden window pencil orange silver planet rocket button candle forest guitar island "
          "jacket kitten ladder marble needle ocean pepper quartz rabbit saddle tiger umbrella violin walnut "
          "yellow zebra bridge castle dragon engine feather glider harbor igloo jungle kettle lemon mirror").split()
_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Canada": "Ottawa",
             "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens",
             "Poland": "Warsaw", "Chile": "Santiago", "Cuba": "Havana", "Ireland": "Dublin", "Austria": "Vienna",
             "Portugal": "Lisbon", "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest",
             "Thailand": "Bangkok", "Vietnam": "Hanoi", "Germany": "Berlin", "Russia": "Moscow", "India": "New Delhi"}
_OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "light": "dark", "happy": "sad", "open": "closed",
              "early": "late", "full": "empty", "hard": "soft", "high": "low", "old": "new", "rich": "poor",
              "strong": "weak", "wet": "dry", "loud": "quiet", "thick": "thin", "near": "far", "up": "down"}
_UNITS = [("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
          ("minutes", "seconds", 60), ("meters", "centimeters", 100), ("liters", "milliliters", 1000),
          ("days", "hours", 24), ("feet", "inches", 12)]
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()

FAMILIES = ("arithmetic", "string", "units", "capitals", "opposites", "sorting", "counting", "days")


def family_row(family: str, rng: random.Random) -> tuple[str, str]:
    """One clean (instruction, response) pair of a task family."""
    if family == "arithmetic":
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"What is {a} {op} {b}?", f"{a} {op} {b} = {val}."
    if family == "string":
        w, kind = rng.choice(_WORDS), rng.choice(["reverse", "upper", "first"])
        if kind == "reverse":
            return f"Reverse the letters of the word '{w}'.", f"'{w}' reversed is '{w[::-1]}'."
        if kind == "upper":
            return f"Write the word '{w}' in capital letters.", w.upper()
        return f"What is the first letter of '{w}'?", f"The first letter of '{w}' is '{w[0]}'."
    if family == "units":
        big, small, factor = rng.choice(_UNITS)
        x = rng.randint(2, 40)
        return f"Convert {x} {big} to {small}.", f"{x} {big} is {x * factor} {small}."
    if family == "capitals":
        c = rng.choice(sorted(_CAPITALS))
        return f"What is the capital of {c}?", f"The capital of {c} is {_CAPITALS[c]}."
    if family == "opposites":
        w = rng.choice(sorted(_OPPOSITES))
        return f"What is the opposite of '{w}'?", f"The opposite of '{w}' is '{_OPPOSITES[w]}'."
    if family == "sorting":
        xs = rng.sample(range(1, 60), rng.randint(3, 5))
        return (f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}.",
                ", ".join(map(str, sorted(xs))))
    if family == "counting":
        w = rng.choice(_WORDS)
        return f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters."
    if family == "days":
        i, n = rng.randrange(7), rng.randint(1, 6)
        return f"What day is {n} days after {_DAYS[i]}?", f"{n} days after {_DAYS[i]} is {_DAYS[(i + n) % 7]}."
    raise ValueError(family)


def _corrupt(response: str, rng: random.Random, other: str) -> tuple[str, str]:
    """A wrong response: another row's answer, scrambled characters, or a truncated answer."""
    kind = rng.choice(["swap", "scramble", "truncate"])
    if kind == "swap":
        return other, kind
    if kind == "scramble":
        chars = list(response)
        rng.shuffle(chars)
        return "".join(chars), kind
    return response[: max(1, len(response) // 3)], kind


def generate(n: int = 500, corrupt_frac: float = 0.15, dup_frac: float = 0.15, seed: int = 0) -> list[dict]:
    """n seeded rows: instruction, response, family, corrupted (bool), corruption (kind or None), duplicate_of.

    Corrupted rows get a wrong response (another family's answer, scrambled, or truncated); a near-duplicate
    repeats an earlier row (duplicate_of: its index) with a slightly reworded prompt.
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    for _ in range(n):
        if rows and rng.random() < dup_frac:
            j = rng.randrange(len(rows))
            src = rows[j]
            prefix = rng.choice(["Please answer: ", "Quick question. ", "Q: ", "Tell me: "])
            rows.append({**src, "instruction": prefix + src["instruction"], "duplicate_of": j})
            continue
        family = FAMILIES[rng.randrange(len(FAMILIES))]
        instruction, response = family_row(family, rng)
        row = {"instruction": instruction, "response": response, "family": family, "corrupted": False,
               "corruption": None, "duplicate_of": None}
        if rng.random() < corrupt_frac:
            # a wrong answer from one of the 7 other families
            other = family_row(FAMILIES[(FAMILIES.index(family) + 1 + rng.randrange(7)) % 8], rng)[1]
            row["response"], row["corruption"] = _corrupt(response, rng, other)
            row["corrupted"] = True
        rows.append(row)
    return rows


def write(path: str | Path, rows: list[dict]) -> Path:
    """rows as JSON Lines (one object a line, keys in generation order, UTF-8)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def pool_file(folder: str | Path, n: int, corrupt_frac: float = 0.15, dup_frac: float = 0.15, seed: int = 0) -> Path:
    """generate(n, …) written under folder, named by its arguments: a pool of another size or seed for --pool."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"spice_pool_n{n}_c{corrupt_frac:g}_d{dup_frac:g}_s{seed}.jsonl"
    return write(folder / name, generate(n, corrupt_frac, dup_frac, seed))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=None, help="rows of one pool written to --out (default: the files)")
    p.add_argument("--corrupt_frac", type=float, default=0.15, help="fraction of corrupted responses")
    p.add_argument("--dup_frac", type=float, default=0.15, help="fraction of near-duplicates")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    p.add_argument("--out", default=None, help="output .jsonl of --rows rows")
    args = p.parse_args(argv)
    if args.rows is None and args.out is None:
        for path, n in FILES.items():
            print(write(path, generate(n)))
        return
    if args.rows is None or args.out is None or args.rows < 1:
        p.error("--rows (≥ 1) and --out go together")
    print(write(args.out, generate(args.rows, args.corrupt_frac, args.dup_frac, args.seed)))


if __name__ == "__main__":
    main()
