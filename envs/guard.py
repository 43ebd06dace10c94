"""Environment calls with their faults contained: the episode loop's only way to call ``reset`` and ``step``.

An environment is user code, and one that raises, returns the wrong type or hangs must cost one episode, not
the actor. :func:`call_env` runs the call and turns every such failure into :class:`EnvFault`; the actor then
drops the episode's group, counts it (``ActorReport.env_errors`` -> ``episode/env_errors``) and goes on::

    text = check_observation("reset", await call_env(env.reset, seed, "reset", timeout_s))
    result = check_step_result(await call_env(env.step, action, "step", timeout_s))

With a timeout the call runs in a worker thread (:class:`EnvThreads`) so the event loop can stop waiting for it;
calls of different episodes may then overlap, so state that environment instances share must be thread-safe.
An environment whose ``reset``/``step`` are ``async def`` (tool calls over HTTP, a sandbox) is awaited on the
actor's event loop instead: no thread per call, any number of episodes in flight; past the timeout the call
is cancelled.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import queue
import threading
import traceback
from typing import Any, Callable

import numpy as np

from envs import StepResult


class EnvFault(Exception):
    """An environment call failed: ``call`` is "reset" or "step", ``kind`` what went wrong ("raised
    ValueError", "returned int", "timed out"); (call, kind) is what the actor logs once."""

    def __init__(self, call: str, kind: str, detail: str):
        super().__init__(f"{call} {kind}: {detail}")
        self.call = call
        self.kind = kind

    @property
    def key(self) -> tuple[str, str]:
        return self.call, self.kind


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():  # the episode stopped waiting (timeout, cancelled): nobody reads the result
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class EnvThreads:
    """Daemon threads running environment calls for event loops.

    A worker is reused for the next call once its call returns (no thread start per call; the hop itself costs
    about 0.1 ms on a 2-core CPU). A worker whose call never returns is abandoned: nothing can stop a thread from the
    outside, but it is a daemon, so it blocks neither the loop (the awaiting episode gave up at its timeout)
    nor the process's exit; the next call starts another worker. asyncio's default executor would do neither:
    its threads are joined at exit, and a few hung calls would exhaust it.
    """

    MAX_IDLE = 64  # workers kept waiting for work; more end when their call returns

    def __init__(self, name: str = "dcrl-env"):
        self.name = name
        self._idle: list[queue.SimpleQueue] = []  # inboxes of idle workers
        self._lock = threading.Lock()
        self._started = 0

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> asyncio.Future:
        """``fn(arg)`` on a worker; the returned future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                self._started += 1
                n = self._started
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(inbox,), name=f"{self.name}-{n}", daemon=True).start()
        inbox.put((loop, fut, fn, arg))
        return fut

    def _work(self, inbox: queue.SimpleQueue) -> None:
        while True:
            loop, fut, fn, arg = inbox.get()
            try:
                value, ok = fn(arg), True
            except BaseException as e:  # handed to the awaiting episode, which re-raises it
                # (a future refuses StopIteration: the episode would wait for its timeout instead)
                value, ok = (RuntimeError(f"StopIteration: {e}") if isinstance(e, StopIteration) else e), False
            # Idle again before the result is visible: the episode's next call then finds this worker.
            with self._lock:
                retire = len(self._idle) >= self.MAX_IDLE
                if not retire:
                    self._idle.append(inbox)
            try:
                loop.call_soon_threadsafe(_settle, fut, ok, value)
            except RuntimeError:  # the loop closed while the call ran: nobody waits for it
                pass
            if retire:
                return
            del loop, fut, fn, arg, value  # an idle worker must not keep the episode's objects alive


_THREADS = EnvThreads()


def _where(e: BaseException) -> str:
    """``file:line`` of the innermost frame of ``e``'s traceback: where in the environment it failed."""
    frames = traceback.extract_tb(e.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


async def call_env(fn: Callable[[Any], Any], arg: Any, call: str, timeout_s: float | None) -> Any:
    """``fn(arg)`` (an environment's ``reset`` or ``step``), or EnvFault if it raises or, with ``timeout_s``,
    takes longer than that (it is then abandoned in its worker thread). Without ``timeout_s`` the call runs
    on the event loop: no thread hop, no protection against a hang (for trusted built-in environments)."""
    try:
        if inspect.iscoroutinefunction(fn):  # an async environment: awaited on the loop, no thread
            if timeout_s is None:
                return await fn(arg)
            task = asyncio.ensure_future(fn(arg))
            try:  # asyncio.wait, not wait_for: the environment's own TimeoutError must not read as a hang
                done, _ = await asyncio.wait({task}, timeout=timeout_s)
            finally:
                task.cancel()  # no-op once done; otherwise (a hang, or this episode cancelled) the call ends here
            if not done:
                raise EnvFault(call, "timed out", f"no answer within env.step_timeout_s={timeout_s:g} s; the call "
                                                  "was cancelled")
            return task.result()
        if timeout_s is None:
            return fn(arg)
        fut = _THREADS.submit(fn, arg)
        try:
            # asyncio.wait, not wait_for: a TimeoutError the environment raises itself must not read as a hang.
            done, _ = await asyncio.wait({fut}, timeout=timeout_s)
        finally:
            fut.cancel()  # no-op once done; otherwise the worker's late result is dropped
        if not done:
            raise EnvFault(call, "timed out", f"no answer within env.step_timeout_s={timeout_s:g} s; the call is "
                                              "abandoned in its thread")
        return fut.result()
    except EnvFault:
        raise
    except Exception as e:
        raise EnvFault(call, f"raised {type(e).__name__}", f"{e}{_where(e)}") from e


def check_observation(call: str, value: Any) -> str:
    """``value`` if it is an observation (a str), else EnvFault naming the type returned."""
    if not isinstance(value, str):
        raise EnvFault(call, f"returned {type(value).__name__}",
                       f"expected the observation as str, got {value!r:.80}")
    return value


def check_step_result(value: Any) -> StepResult:
    """``value`` if it has what the loop reads from a step (``reward`` a finite number, ``done`` a bool, and
    ``observation`` a str while not done; envs.StepResult or any object with those attributes), else EnvFault.
    A non-finite reward is refused here: it would only be dead-lettered later by the learner's validation."""
    done = getattr(value, "done", None)
    reward = getattr(value, "reward", None)
    is_flag = isinstance(done, (bool, np.bool_)) or (isinstance(done, numbers.Integral) and done in (0, 1))
    ok = (is_flag and isinstance(reward, numbers.Real) and math.isfinite(reward)
          and (done or isinstance(getattr(value, "observation", None), str)))
    if not ok:
        raise EnvFault("step", f"returned {type(value).__name__}",
                       f"expected envs.StepResult(observation: str, reward: finite float, done: bool), "
                       f"got {value!r:.80}")
    return value
