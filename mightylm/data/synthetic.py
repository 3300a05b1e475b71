"""Synthetic tasks with exact answers: small, checkable datasets for fine-tuning and evaluation.

Every generator is seeded and reproducible: the same (task, seed, n) gives the same examples.
Each example is {"instruction", "input", "output"} (the alpaca shape `data.sft` reads).
"""

from __future__ import annotations

import random
import string

from mightylm.errors import UsageError

TASKS = ("addition", "multiplication", "reverse", "sort")


def addition(rng: random.Random, digits: int = 3) -> dict:
    a, b = (rng.randrange(10 ** (digits - 1), 10**digits) for _ in range(2))
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def multiplication(rng: random.Random, digits: int = 2) -> dict:
    a, b = (rng.randrange(10 ** (digits - 1), 10**digits) for _ in range(2))
    return {"instruction": "Multiply the two numbers.", "input": f"{a} * {b}", "output": str(a * b)}


def reverse(rng: random.Random, length: int = 6) -> dict:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
    return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}


def sort(rng: random.Random, length: int = 5) -> dict:
    numbers = [rng.randrange(100) for _ in range(length)]
    return {"instruction": "Sort the numbers in ascending order.", "input": " ".join(map(str, numbers)),
            "output": " ".join(map(str, sorted(numbers)))}


_GENERATORS = {"addition": addition, "multiplication": multiplication, "reverse": reverse, "sort": sort}


def generate_task(task: str, n: int, *, seed: int = 0, size: int | None = None) -> list[dict]:
    """`n` examples of `task`; `size` is the number of digits (arithmetic) or items (reverse, sort)."""
    if task not in _GENERATORS:
        raise UsageError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if n < 0 or (size is not None and size < 1):
        raise UsageError(f"n must be >= 0 and size >= 1, got n={n}, size={size}")
    rng = random.Random(f"{task}:{seed}:{size}")
    make = _GENERATORS[task]
    return [make(rng) if size is None else make(rng, size) for _ in range(n)]
