"""Ecosystem environments (the ``tasks`` extra, installed by scripts/setup.sh): reasoning-gym procedural tasks
and TextArena games behind dcrl's environment API, played through the real episode loop."""

from __future__ import annotations

import asyncio

import pytest

from envs import EnvError, make_env, resolve_env_class
from envs.episode import EpisodeLimits, TextCodec, run_episode
from envs.text_arena import drop_echo
from envs.verifiers import math_verify, resolve_verifier

LIMITS = EpisodeLimits(max_tokens_per_turn=8, max_tokens_per_episode=4096, max_turns=12, max_seq_len=8192)


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    from tiny.tokenizer import build_tokenizer

    return TextCodec(build_tokenizer())


class Turn:
    def __init__(self, ids):
        self.token_ids, self.logprobs, self.versions, self.stopped = ids, [-1.0] * len(ids), [0] * len(ids), True


class ScriptedAnswers:
    """Answers turn k with answers[k] (then EOS), like a policy that knows what it wants to say."""

    def __init__(self, codec, answers):
        self.codec, self.answers, self.k = codec, list(answers), 0

    async def generate(self, context, max_tokens, request_id):
        text = self.answers[min(self.k, len(self.answers) - 1)]
        self.k += 1
        return Turn(self.codec.encode(text) + [self.codec.eos_id])


def test_reasoning_gym_task_scores_with_its_own_verifier_and_draws_like_a_dataset():
    kwargs = {"task": "basic_arithmetic", "size": 30, "seed": 2, "task_kwargs": {"min_terms": 2, "max_terms": 2}}
    assert getattr(resolve_env_class("reasoning_gym"), "indexed", False)
    env = make_env("reasoning_gym", kwargs)
    questions = [env.reset(d) for d in range(30)]
    assert len(set(questions)) >= 25 and all(q.startswith("Calculate") for q in questions)  # one epoch
    env.reset(7)
    assert env.step(env.answer()).reward == 1.0 and env.step("no idea").reward == 0.0
    wrapped = make_env("reasoning_gym", {**kwargs, "prompt_format": "{question}\nAnswer:"})
    assert wrapped.reset(7).endswith("\nAnswer:")


@pytest.mark.parametrize("kwargs, match", [({"task": "no_such_task"}, "not registered"),
                                           ({"task": "basic_arithmetic", "task_kwargs": {"bogus": 1}}, "bogus"),
                                           ({"task": "basic_arithmetic", "prompt_format": "Q:"}, "{question}")])
def test_reasoning_gym_errors_name_the_problem(kwargs, match):
    with pytest.raises(EnvError, match=match):
        make_env("reasoning_gym", kwargs)


def binary_search(seed: int) -> tuple[list[str], list[str], float]:
    """GuessTheNumber-v0 (1-20) won by binary search on a fresh game: the guesses, the game's replies, reward."""
    env = make_env("textarena", {"game": "GuessTheNumber-v0"})
    assert "Guess The Number" in env.reset(seed)
    lo, hi, guesses, replies = 1, 20, [], []
    while True:
        guess = (lo + hi) // 2
        guesses.append(f"[{guess}]")
        res = env.step(guesses[-1])
        if res.done:
            return guesses, replies, res.reward
        replies.append(res.observation)
        lo, hi = (guess + 1, hi) if "higher" in res.observation else (lo, guess - 1)


def test_textarena_game_is_a_multi_turn_episode_with_the_games_reward(codec):
    """The game's replies (without its echo of the move) are the observations, the game's win the reward, and
    the same guesses through run_episode give the same game."""
    guesses, replies, reward = binary_search(11)
    assert reward == 1.0 and len(guesses) >= 2
    assert all("[Player]" not in r and ("higher" in r or "lower" in r) for r in replies)
    traj = asyncio.run(run_episode(ScriptedAnswers(codec, guesses), make_env("textarena", {"game": "GuessTheNumber-v0"}),
                                   11, codec, LIMITS, "ta"))
    assert traj.reward == 1.0 and len(traj.turn_starts) == len(guesses) and traj.finish_reason == "stop"
    text = codec.decode(traj.tokens_np.tolist())
    assert all(r.strip() in text for r in replies)


def test_textarena_errors_and_echo():
    with pytest.raises(EnvError, match="cannot make game 'NoSuchGame-v0'"):
        make_env("textarena", {"game": "NoSuchGame-v0"})
    assert drop_echo("\n[Player] [10]\n[GAME] higher.") == "\n[GAME] higher."
    short = make_env("textarena", {"game": "GuessTheNumber-v0", "first_observation": "guess 1-20 as [n]:"})
    assert short.reset(3) == "guess 1-20 as [n]:" and "[GAME]" in short.step("[10]").observation
    assert drop_echo("\n[GAME] higher.") == "\n[GAME] higher."


def test_math_verifier_accepts_equivalent_forms():
    assert resolve_verifier("math") is math_verify
    assert math_verify("the answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert math_verify("$x = 3$", "4") == 0.0
