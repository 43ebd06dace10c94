"""Example environments for the README's "Bring your own task" (``env.name = "examples.my_envs:Reverse"``)."""

from __future__ import annotations

import asyncio
import random

from envs import StepResult


class Reverse:
    """Single turn: ``reset`` shows ``reverse abc:``; reward 1.0 when the model writes ``cba``.

    kwargs: ``length`` (letters, default 3)."""

    def __init__(self, length: int = 3):
        self.length = int(length)
        self.word = ""

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        self.word = "".join(rng.choice("abcdefgh") for _ in range(self.length))
        return f"reverse {self.word}:"

    def step(self, action: str) -> StepResult:
        return StepResult(observation="", reward=float(action.strip() == self.word[::-1]), done=True)


class SlowOracle:
    """Multi-turn and async: each step awaits a (simulated) remote tool for ``latency_s`` before it answers
    ``higher:``/``lower:`` about a hidden number in 1-20, like an environment calling a service over HTTP.
    ``async def`` methods run on the actor's event loop: hundreds of episodes can wait at once, no threads."""

    def __init__(self, latency_s: float = 0.05, max_turns: int = 8):
        self.latency_s, self.max_turns = float(latency_s), int(max_turns)
        self.target, self.turns = 0, 0

    async def reset(self, seed: int) -> str:
        await asyncio.sleep(self.latency_s)
        self.target, self.turns = random.Random(seed).randint(1, 20), 0
        return "guess 1-20:"

    async def step(self, action: str) -> StepResult:
        await asyncio.sleep(self.latency_s)
        self.turns += 1
        guess = int(action) if action.strip().isdigit() else None
        if guess == self.target:
            return StepResult("correct", 1.0, True)
        if self.turns >= self.max_turns:
            return StepResult("", 0.0, True)
        return StepResult("higher:" if guess is not None and guess < self.target else "lower:", 0.0, False)
