"""The one episode loop: an environment played turn by turn by an engine, recorded token in / token out.

Used by the actor (``actors.actor``, vLLM ``AsyncLLM`` engine), by ``python -m actors.sample`` and by the
tiny model's greedy evaluation (``tiny.evaluate``, a batched transformers engine)::

    traj = await run_episode(engine, env, seed, codec, limits, request_id)

``engine`` is anything with ``async generate(context_ids, max_tokens, request_id) -> TurnOutput``.

Trajectory layout (protocol.Trajectory): ``obs_0 | turn_1 EOS | obs_1 | turn_2 EOS | ...``. Model tokens
have mask 1, their behaviour logprob and version; observation tokens mask 0, logprob 0, version -1.
The tokens recorded are exactly those the engine produced; earlier turns are never re-tokenised.
With ``env.chat`` (``TextCodec.chat``, envs/chat.py) observations are rendered as user messages by the model's
chat template and a turn ends at the template's end-of-turn token instead of EOS; the layout is otherwise
the same (``prompt | turn_1 EOT | between_1 | turn_2 EOT | ...``, ``between`` = template text + user message +
generation prompt, mask 0).
``finish_reason`` (``protocol.vocab.FinishReason``):

- ``stop``: the env ended the episode after a model turn that closed with EOS (the normal end);
- ``length``: the env ended it, but the last model turn was cut at its token budget (no EOS);
- ``turn_limit``: ``actor.max_turns`` model turns and the env had not ended it (reward 0);
- ``token_limit``: the episode's token budget ran out first (reward 0): ``actor.max_tokens_per_episode``
  tokens after the first observation, or the model context ``model.max_seq_len``.

Truncated episodes are returned like any other: dropping them would bias the batch toward short episodes.
An environment that fails (``reset``/``step`` raises, returns the wrong type, or takes longer than
``env.step_timeout_s``) ends the episode with ``envs.guard.EnvFault`` instead: no trajectory, since none of its
tokens can be trusted to follow the environment's rules; the actor drops the group (see ``envs/guard.py``).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from envs.guard import call_env, check_observation, check_step_result
from protocol.messages import Trajectory
from protocol.vocab import FinishReason

if TYPE_CHECKING:
    from configs.schema import DcrlConfig
    from envs.chat import ChatFormat


class TurnOutput(Protocol):
    """One model turn as an engine returns it (``actors.engine.TurnOutput`` is the vLLM one)."""

    token_ids: Sequence[int]  # generated tokens, the closing EOS included when ``stopped``
    logprobs: Sequence[float]  # behaviour logprob of each token
    versions: Sequence[int]  # policy version of the weights that sampled each token
    stopped: bool  # the turn ended with EOS (else it hit its token budget)


@dataclass(frozen=True)
class EpisodeLimits:
    """Token and turn limits of one episode (from ``actor.*`` and ``model.max_seq_len``), and the time limit of
    each environment call (``env.step_timeout_s``; None: calls run on the loop, unguarded against hangs)."""

    max_tokens_per_turn: int
    max_tokens_per_episode: int
    max_turns: int
    max_seq_len: int
    env_timeout_s: float | None = None

    @classmethod
    def from_config(cls, cfg: "DcrlConfig") -> "EpisodeLimits":
        """The run's limits. The built-in environments are this project's own pure, instant code: their calls
        run on the loop (still checked for exceptions and return types), since the worker-thread hop that
        enforces ``env.step_timeout_s`` cost 10% of the actor's episode throughput on the tiny preset."""
        from envs import BUILTIN_ENVS

        a = cfg.actor
        timeout = None if cfg.env.name in BUILTIN_ENVS else cfg.env.step_timeout_s
        return cls(a.max_tokens_per_turn, a.max_tokens_per_episode, a.max_turns, cfg.model.max_seq_len, timeout)


def turn_budget(limits: EpisodeLimits, context_len: int, prompt_len: int) -> int:
    """Tokens the next model turn may generate:
    min(max_tokens_per_turn, prompt_len + max_tokens_per_episode - context_len, max_seq_len - context_len)."""
    return min(limits.max_tokens_per_turn,
               prompt_len + limits.max_tokens_per_episode - context_len,
               limits.max_seq_len - context_len)


def episode_room(limits: EpisodeLimits, context_len: int, prompt_len: int) -> int:
    """Tokens the episode may still append (model or env): min(prompt_len + max_tokens_per_episode,
    max_seq_len) - context_len. An observation longer than this is cut and the episode ends."""
    return min(prompt_len + limits.max_tokens_per_episode, limits.max_seq_len) - context_len


class TokenLog:
    """The growing token sequence of one episode with its per-token mask, logprob and version."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.mask: list[int] = []
        self.turn_starts: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add_observation(self, ids: list[int]) -> None:
        """Environment (or prompt) tokens: mask 0, logprob 0, version -1."""
        self.ids += ids
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)
        self.mask += [0] * len(ids)

    def add_turn(self, ids: list[int], logprobs: list[float], versions: list[int]) -> None:
        """One model turn: mask 1 with the engine's behaviour logprobs and versions."""
        self.turn_starts.append(len(self.ids))
        self.ids += ids
        self.logprobs += logprobs
        self.versions += versions
        self.mask += [1] * len(ids)

    def to_trajectory(self, *, reward: float, finish_reason: str, prompt_len: int) -> Trajectory:
        return Trajectory.from_arrays(np.asarray(self.ids), np.asarray(self.logprobs), np.asarray(self.versions),
                                      np.asarray(self.mask), reward=reward, turn_starts=self.turn_starts,
                                      finish_reason=finish_reason, prompt_len=prompt_len)


class TextCodec:
    """Text <-> token ids for the env loop, from the model's HF tokenizer. No special tokens are added
    on encode; decode drops them (the EOS closing a turn is not part of the env action).

    Calls go to the Rust tokenizer directly when there is one (transformers' wrapper costs ~0.1 ms per
    call, a visible share of a short turn on CPU), and encodings are memoised: env texts repeat a lot
    (the G episodes of a group share their prompt; replies like "higher:" recur every turn).
    """

    def __init__(self, tokenizer, cache_size: int = 1 << 16, chat: "ChatFormat | None" = None):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.chat = chat
        # where a model turn ends: the chat template's end-of-turn token, else EOS
        self.stop_id = chat.end_of_turn_id if chat is not None else self.eos_id
        self._rust = getattr(tokenizer, "backend_tokenizer", None)
        self._encode_cached = functools.lru_cache(maxsize=cache_size)(self._encode)

    @classmethod
    def from_pretrained(cls, path) -> "TextCodec":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    @classmethod
    def from_config(cls, cfg: "DcrlConfig", path, tokenizer=None) -> "TextCodec":
        """The codec of a run: the tokenizer at ``path`` and, with ``env.chat``, its chat format."""
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(tokenizer, chat=chat_format(cfg, tokenizer, str(path)))

    @property
    def extra_stop_ids(self) -> list[int]:
        """Stop tokens an engine needs besides EOS: the chat end-of-turn token when it is not EOS."""
        return [self.stop_id] if self.stop_id != self.eos_id else []

    def prompt(self, observation: str) -> list[int]:
        """Token ids of the first observation (with chat: rendered as the first user message, generation
        prompt included)."""
        return self.encode(self.chat.first(observation) if self.chat is not None else observation)

    def observation(self, observation: str) -> list[int]:
        """Token ids appended after a model turn for a later observation (with chat: what the template writes
        after the turn's end-of-turn token, up to the next generation prompt)."""
        return self.encode(self.chat.next(observation) if self.chat is not None else observation)

    def _encode(self, text: str) -> tuple[int, ...]:
        if self._rust is not None:
            return tuple(self._rust.encode(text, add_special_tokens=False).ids)
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return list(self._encode_cached(text))

    def decode(self, ids: list[int]) -> str:
        if self._rust is not None:
            return self._rust.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def chat_format(cfg: "DcrlConfig", tokenizer, where: str = "model.path") -> "ChatFormat | None":
    """``env.chat``'s ChatFormat for ``tokenizer``, or None when the run is not chat-formatted."""
    if not cfg.env.chat:
        return None
    from envs.chat import ChatFormat

    kwargs = {} if cfg.env.enable_thinking is None else {"enable_thinking": cfg.env.enable_thinking}
    return ChatFormat(tokenizer, cfg.env.system_prompt, kwargs, cfg.env.chat_end_of_turn, where)


@dataclass
class EpisodeTimings:
    """Seconds an actor's episodes spent, summed over episodes (they overlap in wall time): in the environment
    (``reset``/``step``), turning text into tokens and back, and waiting for the engine's turns."""

    env_s: float = 0.0
    tokenize_s: float = 0.0
    generate_s: float = 0.0


async def run_episode(engine, env, seed: int, codec: TextCodec, limits: EpisodeLimits, request_id: str,
                      timings: EpisodeTimings | None = None) -> Trajectory:
    """Play one episode of ``env`` (reset with ``seed``) with ``engine``; see the module docstring for the
    layout and finish reasons. ``engine`` needs ``generate(context, max_tokens, request_id) -> TurnOutput``.
    ``timings``, when given, accumulates where the episode's time went. Raises EnvFault if the env fails."""
    t = timings if timings is not None else EpisodeTimings()
    clock = time.perf_counter
    t0 = clock()
    text = check_observation("reset", await call_env(env.reset, seed, "reset", limits.env_timeout_s))
    t1 = clock()
    first = codec.prompt(text)
    t.env_s += t1 - t0
    t.tokenize_s += clock() - t1
    if len(first) >= limits.max_seq_len:
        raise ValueError(f"first observation is {len(first)} tokens: no room to generate within "
                         f"model.max_seq_len={limits.max_seq_len}")
    toks = TokenLog()
    toks.add_observation(first)
    prompt_len = len(first)
    reward, turns = 0.0, 0
    reason: FinishReason
    while True:
        if turns >= limits.max_turns:
            reason = "turn_limit"
            break
        budget = turn_budget(limits, len(toks), prompt_len)
        if budget <= 0:
            reason = "token_limit"
            break
        t0 = clock()
        turn = await engine.generate(toks.ids, budget, f"{request_id}-t{turns}")
        t.generate_s += clock() - t0
        toks.add_turn(turn.token_ids, turn.logprobs, turn.versions)
        turns += 1
        action_ids = turn.token_ids[:-1] if turn.stopped else turn.token_ids
        t0 = clock()
        action = codec.decode(action_ids)
        t1 = clock()
        result = check_step_result(await call_env(env.step, action, "step", limits.env_timeout_s))
        t2 = clock()
        t.tokenize_s += t1 - t0
        t.env_s += t2 - t1
        if result.done:
            reward = float(result.reward)
            reason = "stop" if turn.stopped else "length"
            break
        obs = codec.observation(result.observation)
        t.tokenize_s += clock() - t2
        room = episode_room(limits, len(toks), prompt_len)
        if len(obs) > room:
            toks.add_observation(obs[:max(room, 0)])
            reason = "token_limit"
            break
        toks.add_observation(obs)
    return toks.to_trajectory(reward=reward, finish_reason=reason, prompt_len=prompt_len)
