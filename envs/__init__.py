"""Environment API and the built-in environments.

An environment is a text game played by the policy. One ``Env`` instance runs exactly one episode:
``reset(seed)`` returns the first observation, then every model turn goes to ``step(action)`` until
``done``. The actor drives the loop; the environment never sees tokens::

    env = make_env(cfg.env.name, cfg.env.kwargs)      # a fresh instance per episode
    text = env.reset(seed)                            # first observation, e.g. "37+48="
    while True:
        action = generate_one_turn(history + text)    # decoded model turn, EOS not included
        result = env.step(action)                     # StepResult(observation, reward, done)
        if result.done:                               # the episode return is result.reward
            break
        text = result.observation                     # appended with loss mask 0

Token layout the actor builds from this loop (the tiny model is warm-started on exactly this):
``obs_0 | turn_1 EOS | obs_1 | turn_2 EOS | ...``. The tokenizer adds no special tokens of its own;
the EOS closing each turn is a model token (loss mask 1), observations are mask 0.

Rewards are given once, on the final step (0.0 on earlier steps). Keep observations short and inside
the tiny tokenizer's character set (printable ASCII and newline): anything else becomes ``<unk>``.

Custom environments: any class with this interface, named by import path ``package.module:Class``
in ``env.name``; ``env.kwargs`` go to its constructor. The module is imported with ``importlib`` from
``sys.path`` (the working directory of ``python -m actors``, PYTHONPATH, installed packages). The episode loop
calls ``reset``/``step`` through ``envs.guard``: a call that raises, returns the wrong type or hangs past
``env.step_timeout_s`` ends its episode, not the actor.
"""

from __future__ import annotations

import importlib
import inspect
import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable


@dataclass(frozen=True)
class StepResult:
    """What ``Env.step`` returns: the next observation (ignored once done), the reward, and done."""

    observation: str
    reward: float
    done: bool


@runtime_checkable
class Env(Protocol):
    """One episode of a text environment; see the module docstring for the loop that drives it."""

    def reset(self, seed: int) -> str:
        """Start the episode determined by ``seed``; return the first observation."""
        ...

    def step(self, action: str) -> StepResult:
        """Apply one model turn (decoded text, no EOS) and return what happens next."""
        ...


class EnvError(ValueError):
    """An environment name or its kwargs cannot be resolved; the message names the culprit."""


def parse_int(action: str) -> int | None:
    """The integer the model answered, or None: ``action.strip()`` must be an optional '-' and digits."""
    s = action.strip()
    digits = s[1:] if s.startswith("-") else s
    if not digits.isdigit() or len(digits) > 12:
        return None
    return int(s)


class Arithmetic:
    """Single turn: ``reset`` shows a problem like ``37+48=``; reward 1.0 for the exact answer, else 0.0.

    kwargs: ``digits`` (operand digits, default 2: operands in [10, 99]), ``op`` (``+``, ``-`` or ``*``).
    """

    OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

    def __init__(self, digits: int = 2, op: str = "+"):
        if not 1 <= int(digits) <= 6:
            raise EnvError(f"arithmetic: digits must be in [1, 6], got {digits}")
        if op not in self.OPS:
            raise EnvError(f"arithmetic: op must be one of {sorted(self.OPS)}, got {op!r}")
        self.digits = int(digits)
        self.op = op
        self.answer: int | None = None

    @staticmethod
    def operands(seed: int, digits: int) -> tuple[int, int]:
        """The two operands for ``seed``: uniform in [10^(d-1), 10^d - 1] (d = 1 allows 0)."""
        rng = random.Random(seed)
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        hi = 10**digits - 1
        return rng.randint(lo, hi), rng.randint(lo, hi)

    def reset(self, seed: int) -> str:
        a, b = self.operands(seed, self.digits)
        self.answer = self.OPS[self.op](a, b)
        return f"{a}{self.op}{b}="

    def step(self, action: str) -> StepResult:
        if self.answer is None:
            raise RuntimeError("arithmetic: step() before reset()")
        reward = 1.0 if parse_int(action) == self.answer else 0.0
        return StepResult(observation="", reward=reward, done=True)


class ChainSum:
    """Single turn with a worked answer: ``reset`` shows ``12+34+56+78=``; the model writes the running sums
    out, ``12+34=46,46+56=102,102+78=180`` (about 9 tokens per step: generation is real work), and the
    reward is 1.0 when the number after the last ``=`` is the total, else 0.0 (the steps are not graded).

    kwargs: ``terms`` (numbers to add, 2-8, default 4), ``digits`` (operand digits, default 2).
    """

    def __init__(self, terms: int = 4, digits: int = 2):
        if not 2 <= int(terms) <= 8:
            raise EnvError(f"chain_sum: terms must be in [2, 8], got {terms}")
        if not 1 <= int(digits) <= 4:
            raise EnvError(f"chain_sum: digits must be in [1, 4], got {digits}")
        self.terms, self.digits = int(terms), int(digits)
        self.numbers: list[int] | None = None

    @staticmethod
    def draw(seed: int, terms: int, digits: int) -> list[int]:
        rng = random.Random(seed)
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        return [rng.randint(lo, 10**digits - 1) for _ in range(terms)]

    def reset(self, seed: int) -> str:
        self.numbers = self.draw(seed, self.terms, self.digits)
        return "+".join(map(str, self.numbers)) + "="

    def worked_answer(self) -> str:
        """The teacher's answer (the warm start's data): every partial sum written out."""
        if self.numbers is None:
            raise RuntimeError("chain_sum: worked_answer() before reset()")
        steps, acc = [], self.numbers[0]
        for x in self.numbers[1:]:
            steps.append(f"{acc}+{x}={acc + x}")
            acc += x
        return ",".join(steps)

    def step(self, action: str) -> StepResult:
        if self.numbers is None:
            raise RuntimeError("chain_sum: step() before reset()")
        final = action.rsplit("=", 1)[-1]
        reward = 1.0 if parse_int(final) == sum(self.numbers) else 0.0
        return StepResult(observation="", reward=reward, done=True)


def guess_reward(turns: int, decay: float = 0.05, floor: float = 0.1) -> float:
    """Reward for finding the number on turn ``turns`` (1-based): max(floor, 1 - decay * (turns - 1))."""
    return max(floor, 1.0 - decay * (turns - 1))


class GuessNumber:
    """Multi-turn: find a hidden number in [1, hi]; each wrong guess is answered ``higher:`` or ``lower:``.

    ``reset`` returns ``guess 1-100:``. A turn that is not a number gets ``number?:`` and counts as a turn.
    Success on turn t pays ``guess_reward(t)``; reaching ``max_turns`` without success pays 0.0.
    Binary search needs about log2(hi) - 1 ~ 5.8 turns on average for hi = 100.

    kwargs: ``hi`` (default 100), ``max_turns`` (default 12; the actor's ``actor.max_turns`` also applies).
    """

    def __init__(self, hi: int = 100, max_turns: int = 12):
        if int(hi) < 2:
            raise EnvError(f"guess_number: hi must be >= 2, got {hi}")
        if int(max_turns) < 1:
            raise EnvError(f"guess_number: max_turns must be >= 1, got {max_turns}")
        self.hi = int(hi)
        self.max_turns = int(max_turns)
        self.target: int | None = None
        self.turns = 0

    @staticmethod
    def hidden_number(seed: int, hi: int) -> int:
        return random.Random(seed).randint(1, hi)

    def reset(self, seed: int) -> str:
        self.target = self.hidden_number(seed, self.hi)
        self.turns = 0
        return f"guess 1-{self.hi}:"

    def step(self, action: str) -> StepResult:
        if self.target is None:
            raise RuntimeError("guess_number: step() before reset()")
        self.turns += 1
        guess = parse_int(action)
        if guess == self.target:
            return StepResult(observation="correct", reward=guess_reward(self.turns), done=True)
        if self.turns >= self.max_turns:
            return StepResult(observation=f"it was {self.target}", reward=0.0, done=True)
        if guess is None:
            return StepResult(observation="number?:", reward=0.0, done=False)
        return StepResult(observation="higher:" if guess < self.target else "lower:", reward=0.0, done=False)


BUILTIN_ENVS: dict[str, type] = {"arithmetic": Arithmetic, "guess_number": GuessNumber, "chain_sum": ChainSum}

from envs.agent import KeyDoor  # noqa: E402 (envs.agent imports EnvError and StepResult from here)

BUILTIN_ENVS["key_door"] = KeyDoor  # long horizon: >= 20 model turns per episode


# Environments shipped with dcrl in modules of their own, named like built-ins. Unlike BUILTIN_ENVS they run
# user-supplied parts (a verifier function, a task library), so their calls keep env.step_timeout_s's guard.
LIBRARY_ENVS: dict[str, str] = {"dataset": "envs.dataset:DatasetEnv",
                                "reasoning_gym": "envs.reasoning_gym:ReasoningGymEnv",
                                "textarena": "envs.text_arena:TextArenaEnv"}


def resolve_env_class(name: str) -> type:
    """A built-in name or ``package.module:Class`` -> the class. Raises EnvError naming the path."""
    if name in BUILTIN_ENVS:
        return BUILTIN_ENVS[name]
    name = LIBRARY_ENVS.get(name, name)
    if ":" not in name:
        raise EnvError(f"env {name!r}: not a built-in ({', '.join([*BUILTIN_ENVS, *LIBRARY_ENVS])}) "
                       "and not an import path 'package.module:Class'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        not_found = e.name is not None and (module_name == e.name or module_name.startswith(f"{e.name}."))
        hint = (" (it is imported from sys.path: run from the directory that holds it, or add that directory "
                "to PYTHONPATH)" if not_found else "")
        raise EnvError(f"env {name!r}: cannot import module {module_name!r}: {e}{hint}") from None
    except Exception as e:  # a bug in the module's top level: one line here, the chain for --debug
        raise EnvError(f"env {name!r}: importing module {module_name!r} raised {type(e).__name__}: {e}") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise EnvError(f"env {name!r}: module {module_name!r} has no attribute {attr!r}")
    has_api = callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))
    if not isinstance(cls, type) or not has_api:
        raise EnvError(f"env {name!r}: {attr!r} is not an Env class (needs reset(seed) and step(action))")
    return cls


def make_env(name: str, kwargs: dict[str, Any] | None = None) -> Env:
    """A fresh environment instance for one episode (actors call this once per episode)."""
    cls = resolve_env_class(name)
    kwargs = dict(kwargs or {})
    try:  # check the kwargs against the constructor so a TypeError raised inside it is not mislabelled
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise EnvError(f"env {name!r}: bad kwargs {kwargs!r}: {e}") from None
    return cls(**kwargs)


def env_factory(name: str, kwargs: dict[str, Any] | None = None) -> Callable[[], Env]:
    """A function making fresh instances of env ``name`` with ``kwargs``, checked once here (one instance is
    built, so a bad name or kwargs raises EnvError now); each call then costs only the constructor (make_env's
    check costs ~0.1 ms per episode)."""
    make_env(name, kwargs)
    cls, kw = resolve_env_class(name), dict(kwargs or {})
    return lambda: cls(**kw)
