"""Reward functions for the salt_grpo tests, loaded as `--reward_funcs tests/salt_rewards.py:NAME` (TRL's signature)."""
import zlib


def parity(completions, **_):
    """Mixed groups for a random model (the exact-match checker gives it 0): a hash bit of the completion."""
    return [float(zlib.crc32((c[-1]["content"] if isinstance(c, list) else c).encode()) % 2) for c in completions]


def length_bonus(completions, completion_ids, prompts, **columns):
    """Uses TRL's keyword arguments and a dataset column (`bonus`), to check they arrive as TRL passes them."""
    assert len(completion_ids) == len(prompts) == len(completions) == len(columns["bonus"])
    return [len(ids) / 10 + float(b) for ids, b in zip(completion_ids, columns["bonus"])]


def text(completions, **_):
    return ["1.0"] * len(completions)


def short(completions, **_):
    return [1.0] * (len(completions) - 1)


def nan(completions, **_):
    return [float("nan")] * len(completions)


def none(completions, **_):
    return None


def conversational(completions, prompts, **_):
    """Checks TRL's conversational format (prompts and completions as message lists), then scores like parity."""
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts), prompts[0]
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions), completions[0]
    return parity(completions)


def raises(completions, **_):
    raise ValueError("boom")


def no_kwargs(completions):
    return [0.0] * len(completions)


def needs_x(completions, x, **_):
    return [0.0] * len(completions)


def exits(completions, **_):
    import sys

    sys.exit(0)


def huge(completions, **_):
    """Finite, but two of them (weights 1, 1) overflow float64 when summed."""
    return [1e308] * len(completions)


_calls = {"n": 0}


def closeness_or_hang(completions, **kw):
    """`closeness`, until call number $SALT_TEST_HANG_AFTER + 1 (1: the check on one row before any work): then it
    sleeps, so that a test can kill the run at a known step (eval_size 0: call t + 1 generates step t)."""
    import os
    import time

    from data import arithmetic

    _calls["n"] += 1
    limit = os.environ.get("SALT_TEST_HANG_AFTER")
    if limit and _calls["n"] > int(limit) + 1:
        time.sleep(3600)
    return arithmetic.closeness(completions, **kw)
