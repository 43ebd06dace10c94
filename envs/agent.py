"""A long-horizon built-in environment: ``key_door``, a walk on a grid with two tool actions.

The agent starts somewhere on a ``size`` x ``size`` grid, must walk to a key, ``take`` it, walk to a door and
``open`` it. Start, key and door are drawn from the seed so that the shortest solution takes at least
``min_turns`` model turns (default 20), which makes this the task of long episodes and long contexts: about
8 tokens per turn, so a solved episode is 200-260 tokens and a wandering one runs into the token budget.

Every observation is self-contained: a compass to the current target (``k`` key or ``d`` door, then the steps
east or west and north or south still to go), so one turn's decision needs only the last observation, while
the context keeps growing with the whole history::

    maze 8x8: n s e w take open
    k4e4s:e              <- the key is 4 east and 4 south; the model answers "e" (x+1)
    k3e4s:e
    ...
    k0e1s:s              <- "s" is y-1
    k0e0n:take
    got d6w6n:w          <- key taken: the door is 6 west and 6 north
    ...
    d0e0n:open           <- done: reward 1.0 if no turn was wasted

Commands: ``n`` (y+1), ``s`` (y-1), ``e`` (x+1), ``w`` (x-1), ``take``, ``open``. A move off the grid answers
``wall`` and costs a turn. With ``invalid_ends`` (the default) anything else that does not apply ends the episode
with reward 0: a turn that is no command, ``take`` away from the key, ``open`` away from the door or without the
key. Without it they answer ``?``, ``nokey`` or ``locked`` and cost a turn. Why, measured on tiny_agent: with
token-level loss aggregation, failed episodes that ramble on to the token limit outweigh the successes token for
token, and their negative advantage lands mostly on the correct moves they also contain (reward 0.57 -> 0 in 12
steps); and with only junk turns ending an episode, RL taught the tiny model ``take``/``open`` where it should
turn (every success rewards both; a misplaced one cost only 0.05), and the reward fell from 0.9 to 0 in 30 steps.
Ending at the first turn that does not apply keeps failures short and puts their blame on that turn.
"""

from __future__ import annotations

import random

from envs import EnvError, StepResult

MOVES = {"n": (0, 1), "s": (0, -1), "e": (1, 0), "w": (-1, 0)}


def manhattan(a: tuple[int, int], b: tuple[int, int]) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def key_door_reward(turns: int, optimal: int, decay: float, floor: float) -> float:
    """Reward for opening the door on turn ``turns`` when ``optimal`` turns suffice:
    max(floor, 1 - decay * (turns - optimal)). Failing to open it pays 0 (not this function)."""
    return max(floor, 1.0 - decay * (turns - optimal))


def key_door_layout(seed: int, size: int, min_turns: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(start, key, door) of the episode ``seed``: three distinct cells whose shortest solution,
    |start - key| + 1 + |key - door| + 1 turns, is at least ``min_turns``. Redrawn until it is (the caller
    checks that ``min_turns`` is reachable on the grid)."""
    rng = random.Random(seed)
    while True:
        start, key, door = [(rng.randrange(size), rng.randrange(size)) for _ in range(3)]
        if len({start, key, door}) == 3 and manhattan(start, key) + manhattan(key, door) + 2 >= min_turns:
            return start, key, door


class KeyDoor:
    """Multi-turn, long horizon: walk to the key, ``take``, walk to the door, ``open`` (see the module docstring).

    Reward (on the final step only): ``key_door_reward(turns, optimal)`` for opening the door; 0.0 when
    ``max_turns`` model turns pass first (the actor's ``actor.max_turns`` and token budget also apply).

    kwargs: ``size`` (grid side, 3-10: coordinates are single digits; default 8), ``min_turns`` (shortest
    solution at least this many turns, default 20; at most 3 * size - 1), ``max_turns`` (default 48),
    ``decay`` (reward lost per wasted turn, default 0.05), ``floor`` (least reward for opening the door, 0.2),
    ``invalid_ends`` (a turn that does not apply ends the episode, reward 0; default true).
    """

    def __init__(self, size: int = 8, min_turns: int = 20, max_turns: int = 48, decay: float = 0.05,
                 floor: float = 0.2, invalid_ends: bool = True):
        size, min_turns, max_turns = int(size), int(min_turns), int(max_turns)
        if not 3 <= size <= 10:
            raise EnvError(f"key_door: size must be in [3, 10] (single-digit coordinates), got {size}")
        # Layouts are drawn by rejection: up to 3 (size - 1) + 2 turns about 1 draw in 1000 or more qualifies
        # (the longest layout, 4 (size - 1) + 1 turns, would take millions of draws).
        longest = 3 * (size - 1) + 2
        if not 2 <= min_turns <= longest:
            raise EnvError(f"key_door: min_turns must be in [2, {longest}] for size {size}, got {min_turns}")
        if max_turns < min_turns:
            raise EnvError(f"key_door: max_turns ({max_turns}) must be >= min_turns ({min_turns})")
        if not 0.0 <= float(decay) <= 1.0:
            raise EnvError(f"key_door: decay must be in [0, 1], got {decay}")
        if not 0.0 < float(floor) <= 1.0:
            raise EnvError(f"key_door: floor must be in (0, 1], got {floor}")
        self.size, self.min_turns, self.max_turns = size, min_turns, max_turns
        if not isinstance(invalid_ends, bool):
            raise EnvError(f"key_door: invalid_ends must be true or false, got {invalid_ends!r}")
        self.decay, self.floor, self.invalid_ends = float(decay), float(floor), invalid_ends
        self.pos: tuple[int, int] | None = None
        self.key = self.door = (0, 0)
        self.has_key = False
        self.turns = 0
        self.optimal = 0

    def target(self) -> tuple[str, tuple[int, int]]:
        """The current goal: ("k", key cell) until the key is taken, then ("d", door cell)."""
        return ("d", self.door) if self.has_key else ("k", self.key)

    def observation(self, note: str = "") -> str:
        """``[note ]g<|dx|><e|w><|dy|><n|s>:``: g is k (key) or d (door); e.g. ``k4e0n:`` is 4 steps east."""
        assert self.pos is not None
        goal, (tx, ty) = self.target()
        dx, dy = tx - self.pos[0], ty - self.pos[1]
        compass = f"{abs(dx)}{'w' if dx < 0 else 'e'}{abs(dy)}{'s' if dy < 0 else 'n'}"
        return f"{note + ' ' if note else ''}{goal}{compass}:"

    def reset(self, seed: int) -> str:
        start, self.key, self.door = key_door_layout(seed, self.size, self.min_turns)
        self.pos, self.has_key, self.turns = start, False, 0
        self.optimal = manhattan(start, self.key) + manhattan(self.key, self.door) + 2
        return f"maze {self.size}x{self.size}: n s e w take open\n" + self.observation()

    def step(self, action: str) -> StepResult:
        if self.pos is None:
            raise RuntimeError("key_door: step() before reset()")
        self.turns += 1
        cmd = action.strip().lower()
        note = ""
        if cmd in MOVES:
            dx, dy = MOVES[cmd]
            x, y = self.pos[0] + dx, self.pos[1] + dy
            if 0 <= x < self.size and 0 <= y < self.size:
                self.pos = (x, y)
            else:
                note = "wall"
        elif cmd == "take" and not self.has_key and self.pos == self.key:
            self.has_key = True
            note = "got"
        elif cmd == "open" and self.has_key and self.pos == self.door:
            reward = key_door_reward(self.turns, self.optimal, self.decay, self.floor)
            return StepResult(observation="open", reward=reward, done=True)
        elif self.invalid_ends:
            return StepResult(observation="invalid", reward=0.0, done=True)
        else:
            note = {"take": "nokey", "open": "locked"}.get(cmd, "?")
        if self.turns >= self.max_turns:
            return StepResult(observation="out of turns", reward=0.0, done=True)
        return StepResult(observation=self.observation(note), reward=0.0, done=False)

    def solution(self) -> list[str]:
        """The shortest command sequence from the current state (x first, then y; then take/open): the teacher."""
        assert self.pos is not None
        cmds: list[str] = []
        pos, has_key = self.pos, self.has_key
        for goal, cell in (("take", self.key), ("open", self.door)):
            if goal == "take" and has_key:
                continue
            cmds += walk(pos, cell)
            cmds.append(goal)
            pos = cell
        return cmds


def walk(src: tuple[int, int], dst: tuple[int, int]) -> list[str]:
    """Moves from ``src`` to ``dst``: along x first, then along y."""
    dx, dy = dst[0] - src[0], dst[1] - src[1]
    return ["e" if dx > 0 else "w"] * abs(dx) + ["n" if dy > 0 else "s"] * abs(dy)
