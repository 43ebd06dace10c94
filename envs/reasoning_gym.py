"""reasoning-gym procedural tasks as a dcrl environment (optional: ``pip install reasoning-gym``, or the
project's ``tasks`` extra).

    [env]
    name = "reasoning_gym"
    kwargs = { task = "basic_arithmetic", size = 10000, seed = 0, task_kwargs = { min_terms = 2, max_terms = 3 } }

Single turn: the observation is the task's question (``prompt_format`` can wrap it, e.g.
``"{question}\\nAnswer:"``), the reward is the task's own ``score_answer`` (0-1) on the model's turn. The
task's dataset of ``size`` items is generated once per process from ``seed``; like a dataset environment the
class is indexed, so prompts are drawn without replacement per epoch across actors (``envs.dataset``).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from envs import EnvError, StepResult
from envs.dataset import row_of_draw

_LOCK = threading.Lock()
_DATASETS: dict[str, Any] = {}


def load_task(task: str, size: int, seed: int, task_kwargs: dict[str, Any]):
    """The reasoning-gym dataset (cached per process); EnvError naming the problem when it cannot be made."""
    try:
        import reasoning_gym
    except ImportError:
        raise EnvError("env 'reasoning_gym' needs the reasoning-gym package: pip install reasoning-gym "
                       "(or the project's 'tasks' extra)") from None
    key = json.dumps([task, size, seed, task_kwargs], sort_keys=True, default=str)
    with _LOCK:
        ds = _DATASETS.get(key)
        if ds is None:
            try:
                ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **task_kwargs)
            except Exception as e:  # an unknown task or a bad task kwarg: one line naming it
                raise EnvError(f"reasoning_gym: cannot create task {task!r} with {task_kwargs}: "
                               f"{type(e).__name__}: {e}") from None
            _DATASETS[key] = ds
    return ds


class ReasoningGymEnv:
    """Single turn over one reasoning-gym task; see the module docstring."""

    indexed = True

    def __init__(self, task: str, size: int = 10000, seed: int = 0, task_kwargs: dict[str, Any] | None = None,
                 prompt_format: str = "{question}"):
        if int(size) < 1:
            raise EnvError(f"reasoning_gym: size must be >= 1, got {size}")
        if "{question}" not in prompt_format:
            raise EnvError(f"reasoning_gym: prompt_format must contain {{question}}, got {prompt_format!r}")
        self.size, self.seed, self.prompt_format = int(size), int(seed), prompt_format
        self.dataset = load_task(task, self.size, self.seed, dict(task_kwargs or {}))
        self.entry: dict[str, Any] | None = None

    def reset(self, seed: int) -> str:
        self.entry = self.dataset[row_of_draw(int(seed), self.size, self.seed)]
        return self.prompt_format.format(question=self.entry["question"])

    def answer(self) -> str:
        """The task's reference answer for the current item (a teacher for a warm start)."""
        if self.entry is None:
            raise RuntimeError("reasoning_gym: answer() before reset()")
        return str(self.entry["answer"])

    def step(self, action: str) -> StepResult:
        if self.entry is None:
            raise RuntimeError("reasoning_gym: step() before reset()")
        score = self.dataset.score_answer(action.strip(), self.entry)
        return StepResult(observation="", reward=float(score or 0.0), done=True)
