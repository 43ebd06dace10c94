"""A single-turn environment fed from a local dataset file, rewarded by a verifier.

    [env]
    name = "dataset"
    kwargs = { path = "data/tiny_math/train.jsonl", prompt_key = "prompt", answer_key = "answer",
               verifier = "numeric" }

* ``path``: a ``.jsonl`` file (one JSON object per line) or, with ``pyarrow`` installed, a ``.parquet`` file;
  relative paths are taken from the working directory of the actor. Rows are read once per process.
* ``prompt_key`` / ``answer_key``: the fields holding the prompt (the observation) and the reference answer;
  ``prompt_format``, when given, builds the prompt from the row instead (``"Q: {question}\\nA:"``).
* ``verifier``: ``exact``, ``numeric``, ``math`` or ``package.module:function`` (``envs.verifiers``).
* ``shuffle_seed``: the order of each epoch is a permutation drawn from (shuffle_seed, epoch).

Prompts are sampled without replacement per epoch across all actors: the class is *indexed*, so the actor
passes ``reset`` the next value of the run's shared draw counter in Redis (``ControlPlane.next_draw``) instead
of a random seed; draw ``i`` is row ``perm(epoch = i // n)[i % n]``. The counter is part of the learner's
checkpoint, so a resumed run goes on where it was (see ``ControlPlane.restore_draws``).
"""

from __future__ import annotations

import json
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from envs import EnvError, StepResult
from envs.verifiers import resolve_verifier

_LOCK = threading.Lock()
_ROWS: dict[tuple[str, float], list[dict]] = {}


def load_rows(path: str) -> list[dict]:
    """The rows of a jsonl or parquet file, read once per process (keyed by path and modification time)."""
    p = Path(path)
    if not p.is_file():
        raise EnvError(f"dataset: no file {path!r} (env.kwargs.path; relative paths start at the working "
                       f"directory, {os.getcwd()})")
    key = (str(p.resolve()), p.stat().st_mtime)
    with _LOCK:
        rows = _ROWS.get(key)
        if rows is None:
            rows = _ROWS[key] = _read(p)
    return rows


def _read(p: Path) -> list[dict]:
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EnvError(f"dataset {p}: reading parquet needs pyarrow (pip install pyarrow, or the project's "
                           "'tasks' extra); jsonl needs nothing") from None
        return pq.read_table(p).to_pylist()
    if p.suffix not in (".jsonl", ".json"):
        raise EnvError(f"dataset {p}: expected a .jsonl or .parquet file")
    rows = []
    with open(p) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EnvError(f"dataset {p} line {i}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise EnvError(f"dataset {p} line {i}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    if not rows:
        raise EnvError(f"dataset {p}: no rows")
    return rows


@lru_cache(maxsize=8)
def epoch_order(n: int, shuffle_seed: int, epoch: int) -> np.ndarray:
    """Row order of one epoch: a permutation of range(n) determined by (shuffle_seed, epoch)."""
    return np.random.default_rng([int(shuffle_seed), int(epoch)]).permutation(n)


def row_of_draw(draw: int, n: int, shuffle_seed: int) -> int:
    """Row index of draw number ``draw``: every row once per epoch of ``n`` draws."""
    return int(epoch_order(n, shuffle_seed, draw // n)[draw % n])


class DatasetEnv:
    """Single turn: ``reset(draw)`` shows the prompt of the row the draw picks; ``step`` scores the answer."""

    indexed = True  # reset() takes the run's shared draw counter, not a random seed (see the module docstring)

    def __init__(self, path: str, prompt_key: str = "prompt", answer_key: str = "answer", verifier: str = "exact",
                 prompt_format: str | None = None, shuffle_seed: int = 0):
        self.rows = load_rows(path)
        first = self.rows[0]
        for key, name in ((answer_key, "answer_key"),) + (() if prompt_format else ((prompt_key, "prompt_key"),)):
            if key not in first:
                raise EnvError(f"dataset {path}: rows have no field {key!r} ({name}); fields: {sorted(first)}")
        if prompt_format is not None:
            try:
                prompt_format.format(**first)
            except (KeyError, IndexError, ValueError) as e:
                raise EnvError(f"dataset {path}: prompt_format {prompt_format!r} does not fit the rows: {e!r}") from None
        self.path, self.prompt_key, self.answer_key = path, prompt_key, answer_key
        self.prompt_format, self.shuffle_seed = prompt_format, int(shuffle_seed)
        self.verify = resolve_verifier(verifier)
        self.row: dict[str, Any] | None = None

    def reset(self, seed: int) -> str:
        self.row = self.rows[row_of_draw(int(seed), len(self.rows), self.shuffle_seed)]
        if self.prompt_format is not None:
            return self.prompt_format.format(**self.row)
        return str(self.row[self.prompt_key])

    def answer(self) -> str:
        """The reference answer of the current row (the warm start's teacher writes it)."""
        if self.row is None:
            raise RuntimeError("dataset: answer() before reset()")
        return str(self.row[self.answer_key])

    def step(self, action: str) -> StepResult:
        if self.row is None:
            raise RuntimeError("dataset: step() before reset()")
        return StepResult(observation="", reward=float(self.verify(action, self.row[self.answer_key])), done=True)
