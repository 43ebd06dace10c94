"""Environment faults are contained: a reset/step that raises, returns the wrong type or hangs ends its episode
with EnvFault (envs.guard), and the actor drops that group, gives its slot back, counts it and goes on.

The engine here is a stand-in (``FixedAnswerEngine``): what is under test is the episode loop's and the actor's
handling of a broken environment, which no engine output can change; the real tokenizer, Redis and admission
ledger are used throughout. The vLLM path of the same loop is covered by tests/test_actor_engine.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import pytest

from configs import load_config
from envs import Arithmetic, StepResult
from envs.episode import EpisodeLimits, TextCodec, run_episode
from envs.guard import EnvFault, call_env, check_step_result
from protocol import Control

LIMITS = EpisodeLimits(max_tokens_per_turn=8, max_tokens_per_episode=32, max_turns=4, max_seq_len=64,
                       env_timeout_s=0.5)


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    from tiny.tokenizer import build_tokenizer

    return TextCodec(build_tokenizer())


class Turn:
    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids
        self.logprobs = [-0.5] * len(token_ids)
        self.versions = [0] * len(token_ids)
        self.stopped = True


class FixedAnswerEngine:
    """Answers every turn with ``answer`` + EOS: the interface run_episode and the Actor need, nothing else."""

    tag = "fixed/test"
    version = 0
    busy_s = 0.0
    generated_tokens = 0

    def __init__(self, codec: TextCodec, answer: str = "42"):
        self.ids = codec.encode(answer) + [codec.eos_id]

    async def generate(self, context_ids, max_tokens: int, request_id: str) -> Turn:
        await asyncio.sleep(0)
        self.generated_tokens += len(self.ids)
        return Turn(self.ids[:max_tokens])


class StepRaises(Arithmetic):
    def step(self, action):
        raise ValueError(f"cannot parse {action!r}")


class ResetReturnsInt(Arithmetic):
    def reset(self, seed):
        return 37


class StepHangs(Arithmetic):
    release = threading.Event()  # set at the end of the test so the abandoned thread ends too

    def step(self, action):
        self.release.wait()
        return super().step(action)


class StepReturnsTuple(Arithmetic):
    def step(self, action):
        return "", 1.0, True


class StepRaisesTimeoutError(Arithmetic):
    def step(self, action):
        raise TimeoutError("the environment's own backend timed out")


def play(env, codec, limits=LIMITS):
    return asyncio.run(run_episode(FixedAnswerEngine(codec), env, 3, codec, limits, "r"))


def test_step_that_raises_ends_the_episode_with_an_env_fault(codec):
    with pytest.raises(EnvFault) as err:
        play(StepRaises(), codec)
    assert err.value.key == ("step", "raised ValueError")
    assert "cannot parse '42'" in str(err.value) and "test_env_faults.py:" in str(err.value)  # where it failed
    assert isinstance(err.value.__cause__, ValueError)


@pytest.mark.parametrize("timeout_s", [0.5, None])  # in a worker thread, and inline on the loop
def test_reset_returning_an_int_is_an_env_fault(codec, timeout_s):
    limits = dataclasses.replace(LIMITS, env_timeout_s=timeout_s)
    with pytest.raises(EnvFault) as err:
        play(ResetReturnsInt(), codec, limits)
    assert err.value.key == ("reset", "returned int") and "37" in str(err.value)


def test_step_that_hangs_times_out_without_blocking_the_loop(codec):
    """A step that never returns: the episode ends after env.step_timeout_s (0.5 s here) and an episode of a
    healthy env running beside it on the same loop finishes meanwhile."""
    engine = FixedAnswerEngine(codec)

    async def both():
        t0 = time.monotonic()
        hung = asyncio.create_task(run_episode(engine, StepHangs(), 1, codec, LIMITS, "hung"))
        healthy = await run_episode(engine, Arithmetic(), 2, codec, LIMITS, "ok")
        healthy_at = time.monotonic() - t0
        with pytest.raises(EnvFault) as err:
            await hung
        return healthy, healthy_at, time.monotonic() - t0, err.value

    try:
        healthy, healthy_at, elapsed, fault = asyncio.run(both())
    finally:
        StepHangs.release.set()
    assert fault.key == ("step", "timed out") and "env.step_timeout_s=0.5" in str(fault)
    assert healthy.finish_reason == "stop" and healthy_at < 0.4  # not held up by the hung call
    assert 0.5 <= elapsed < 3.0


@pytest.mark.parametrize("env, kind", [(StepReturnsTuple(), "returned tuple"),
                                       (StepRaisesTimeoutError(), "raised TimeoutError")])  # not "timed out"
def test_other_step_faults_are_named_by_kind(codec, env, kind):
    with pytest.raises(EnvFault) as err:
        play(env, codec)
    assert err.value.key == ("step", kind)


def test_step_result_check_accepts_step_results_and_refuses_bad_fields():
    assert check_step_result(StepResult("higher:", 0.0, False)).observation == "higher:"
    assert check_step_result(StepResult(None, 1, True)).done  # the observation is not read once done
    for bad in (StepResult("", float("nan"), True), StepResult(None, 0.0, False), StepResult("", "1", True),
                StepResult("", 0.0, "yes"), None):
        with pytest.raises(EnvFault, match="returned"):
            check_step_result(bad)


def test_healthy_env_in_a_worker_thread_plays_as_before(codec):
    inline = play(Arithmetic(), codec, dataclasses.replace(LIMITS, env_timeout_s=None))
    threaded = play(Arithmetic(), codec)
    assert inline == threaded and threaded.finish_reason == "stop"


def test_call_env_reuses_idle_worker_threads():
    async def calls():
        return [await call_env(lambda _: threading.current_thread().name, None, "step", 1.0) for _ in range(20)]

    names = asyncio.run(calls())
    assert len(set(names)) == 1 and names[0].startswith("dcrl-env")


def test_step_timeout_reaches_the_episode_limits():
    cfg = load_config("tiny", ["env.step_timeout_s=2.5", "env.name=my_envs:Maze"], env={})
    assert EpisodeLimits.from_config(cfg).env_timeout_s == 2.5
    # The built-ins are called on the loop: no thread hop, no timeout.
    assert EpisodeLimits.from_config(load_config("tiny", ["env.step_timeout_s=2.5"], env={})).env_timeout_s is None
    assert load_config("tiny", env={}).env.step_timeout_s == 30.0


# -- the actor: drop the group, give its slot back, count, log once, go on --------------------------------------


class FailFirstGroup(Arithmetic):
    """Every episode of the first group that resets (one env seed) raises in step; later groups are fine."""

    bad_seed: int | None = None

    def reset(self, seed):
        if FailFirstGroup.bad_seed is None:
            FailFirstGroup.bad_seed = seed
        self.seed = seed
        return super().reset(seed)

    def step(self, action):
        if self.seed == FailFirstGroup.bad_seed:
            raise RuntimeError("broken tool backend")
        return super().step(action)


def test_actor_drops_the_group_of_a_failed_env_and_goes_on(codec, redis_url, caplog):
    from actors.actor import Actor
    from buffer import ControlPlane, GroupWriter

    cfg = load_config("tiny", [f"redis.url={redis_url}", "redis.prefix=envfault", "env.name=test_env_faults:FailFirstGroup",
                               "actor.group_size=4", "actor.concurrency=8", "actor.max_groups=4",
                               "actor.admission_poll_s=0.05", "env.step_timeout_s=5"], env={})
    control = ControlPlane(cfg.redis, who="actor-f")
    control.reset()
    control.write_control(Control(version=0, max_staleness=100, batch_groups=1))
    writer = GroupWriter(cfg.redis, "actor-f")
    FailFirstGroup.bad_seed = None
    actor = Actor(cfg, "actor-f", FixedAnswerEngine(codec), codec, writer, control)
    try:
        with caplog.at_level(logging.WARNING, logger="dcrl.actor"):
            reason = asyncio.run(asyncio.wait_for(actor.run(), 60))
        writer.flush(10)
        counters, held, streamed = control.counters(), control.held("actor-f"), control.client.xlen(control.keys.traj)
    finally:
        writer.close()
        control.close()
    assert reason == "max_groups"
    assert actor.stats.groups_sent == 3 == streamed == counters["produced"]  # the dropped group's slot came back
    assert held == 0
    assert 1 <= actor.stats.env_errors <= 4 and actor.report().env_errors == actor.stats.env_errors
    logged = [r.getMessage() for r in caplog.records if "broken tool backend" in r.getMessage()]
    assert len(logged) == 1, logged  # once per kind, however many episodes failed
    assert "step raised RuntimeError" in logged[0] and "test_env_faults:FailFirstGroup" in logged[0]


class AsyncArithmetic(Arithmetic):
    """Arithmetic with ``async def`` reset/step, each awaiting like a tool call over the network would."""

    in_flight = 0
    peak = 0

    async def reset(self, seed):
        await asyncio.sleep(0.05)
        return super().reset(seed)

    async def step(self, action):
        cls = type(self)
        cls.in_flight += 1
        cls.peak = max(cls.peak, cls.in_flight)
        try:
            await asyncio.sleep(0.2)
            return super().step(action)
        finally:
            cls.in_flight -= 1


class AsyncStepHangs(Arithmetic):
    cancelled = 0

    async def step(self, action):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            type(self).cancelled += 1
            raise


class AsyncStepRaises(Arithmetic):
    async def step(self, action):
        raise ConnectionError("tool server refused")


def test_async_env_runs_many_episodes_at_once_on_the_loop_without_threads(codec):
    """64 episodes of an async env overlap on one loop (each step awaits 0.2 s: 64 in a row would take 13 s),
    no environment thread is started, and the rewards are the synchronous env's."""
    engine = FixedAnswerEngine(codec, "109")  # right for the seeds whose operands sum to 109
    threads_before = threading.active_count()

    async def many():
        return await asyncio.gather(*(run_episode(engine, AsyncArithmetic(), s, codec, LIMITS, f"a{s}")
                                      for s in range(64)))

    t0 = time.monotonic()
    trajs = asyncio.run(many())
    elapsed = time.monotonic() - t0
    assert AsyncArithmetic.peak == 64 and elapsed < 5.0
    assert threading.active_count() == threads_before
    expected = [1.0 if sum(Arithmetic.operands(s, 2)) == 109 else 0.0 for s in range(64)]
    assert [t.reward for t in trajs] == expected and all(t.finish_reason == "stop" for t in trajs)


def test_async_env_hang_times_out_and_is_cancelled(codec):
    with pytest.raises(EnvFault) as err:
        play(AsyncStepHangs(), codec)
    assert err.value.key == ("step", "timed out") and AsyncStepHangs.cancelled == 1


def test_async_env_exception_is_an_env_fault(codec):
    with pytest.raises(EnvFault) as err:
        play(AsyncStepRaises(), codec)
    assert err.value.key == ("step", "raised ConnectionError") and "tool server refused" in str(err.value)
