"""The ``tiny_math`` dataset: short arithmetic word problems in the tiny tokenizer's characters.

    python -m tiny.math_data            # (re)writes data/tiny_math/{train,test}.jsonl, deterministic

Rows are ``{"prompt": ..., "answer": ...}`` (the answer a decimal integer), read by ``envs.dataset.DatasetEnv``
and scored by the ``numeric`` verifier. Three kinds: adding (``gets 15 more``), taking away (``gives away
8``) and multiplying (``4 bags of 7``), so that the model has to read which operation the words ask for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ann", "Bob", "Sam", "Eva", "Tom", "Liz", "Max", "Ida"]
THINGS = ["apples", "pens", "cards", "coins", "books", "eggs"]
OUT = Path(__file__).resolve().parents[1] / "data" / "tiny_math"


def problem(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(10, 59), rng.randint(2, 39)
        return {"prompt": f"{name} has {a} {thing} and gets {b} more. How many now?", "answer": str(a + b)}
    if kind == 1:
        a = rng.randint(20, 99)
        b = rng.randint(2, a - 5)
        return {"prompt": f"{name} has {a} {thing} and gives away {b}. How many left?", "answer": str(a - b)}
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return {"prompt": f"{name} buys {a} bags of {b} {thing}. How many {thing}?", "answer": str(a * b)}


def write(n_train: int = 4000, n_test: int = 400, seed: int = 0, out: Path = OUT) -> None:
    """Train and test rows with no prompt in both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for split, n in (("test", n_test), ("train", n_train)):
        while len(splits[split]) < n:
            row = problem(rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                splits[split].append(row)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write()
    print(f"wrote {OUT}/train.jsonl and test.jsonl")
