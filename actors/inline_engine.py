"""vLLM's engine core inside the actor's own process, stepped by the actor's event loop (``actor.engine_process``).

vLLM's ``AsyncLLM`` runs the engine core (scheduler and, with the "uni" executor, the model) in a second process
and talks to it over ZMQ: every request is serialised there, every step's outputs serialised back, and two I/O
threads on each side move the messages. That buys overlap of the Python front end with a GPU. On a CPU machine
where the actor and its engine share one core (the tiny preset) it buys nothing and costs the messaging: 64
samples of 8 tokens from the tiny model took 45-50 ms through ``AsyncLLM`` and 30 ms through an in-process
``LLMEngine`` stepped in a loop, both pinned to one core.

:class:`InlineLLM` gives the actor's :class:`actors.engine.Engine` the part of ``AsyncLLM``'s interface it uses
(``generate``, pause/resume, version label, ``collective_rpc``, the weight-transfer calls, ``reset_prefix_cache``,
``shutdown``) over an in-process ``LLMEngine``:

- one task on the actor's loop calls ``LLMEngine.step()`` while requests are unfinished and the scheduler is not
  paused, hands each request's outputs to its caller, and yields to the loop after every step, so episodes add
  their next turns between two engine steps (where ``AsyncLLM``'s engine core would read its input queue);
- every other call into the engine core waits for the step in progress (an asyncio lock), as the engine-core
  process handles utility calls between steps; calls into the model's worker (``collective_rpc``: weight
  reloads and transfers) run on a thread, so the loop goes on serving Redis and the control plane meanwhile;
- a step that raises fails every waiting request with that error and the engine stays dead (as ``AsyncLLM``
  does when its engine-core process dies): the actor exits and its supervisor restarts it.

The weight-version labels are stamped by the engine core on each step's outputs, exactly as in the separate
process, so the version invariant of :mod:`actors.engine` holds unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator


class InlineLLM:
    """The subset of vLLM's ``AsyncLLM`` that :class:`actors.engine.Engine` calls, over an in-process
    ``LLMEngine``. Use from one event loop (the first call starts the stepping task on it)."""

    def __init__(self, engine):
        self._engine = engine  # vllm.v1.engine.llm_engine.LLMEngine with its EngineCore in this process
        self._core = engine.engine_core.engine_core
        self.vllm_config = engine.vllm_config
        self._outputs: dict[str, asyncio.Queue] = {}  # external request id -> its outputs (or the step's error)
        self._paused = False
        self._dead: BaseException | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self.output_handler: asyncio.Task | None = None  # the stepping task; Engine.shutdown waits for it to end
        self.steps = 0

    @classmethod
    def from_engine_args(cls, engine_args: dict[str, Any]) -> "InlineLLM":
        """Build the engine from ``actors.engine.engine_args`` (loads the model in this process)."""
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        vllm_config = EngineArgs(**engine_args).create_engine_config(UsageContext.ENGINE_CONTEXT)
        return cls(LLMEngine(vllm_config, Executor.get_class(vllm_config),
                             log_stats=not engine_args.get("disable_log_stats", True), multiprocess_mode=False))

    def _started(self) -> None:
        if self._dead is not None:
            raise RuntimeError(f"the in-process vLLM engine is dead: {self._dead!r}")
        if self.output_handler is None:
            self._wake, self._lock = asyncio.Event(), asyncio.Lock()
            self.output_handler = asyncio.get_running_loop().create_task(self._run(), name="vllm-inline-steps")

    async def _run(self) -> None:
        engine, outputs, wake = self._engine, self._outputs, self._wake
        try:
            while True:
                if self._paused or not engine.has_unfinished_requests():
                    wake.clear()
                    await wake.wait()
                    continue
                async with self._lock:
                    step = engine.step()
                self.steps += 1
                for out in step:
                    queue = outputs.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                await asyncio.sleep(0)  # the callers' next turns join the next step
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._dead = e
            for queue in outputs.values():
                queue.put_nowait(RuntimeError(f"vLLM engine step failed: {e!r}"))
            raise

    async def generate(self, prompt, sampling_params, request_id: str) -> AsyncIterator[Any]:
        """Yield the request's ``RequestOutput``s until the finished one (just that one with FINAL_ONLY).
        Leaving early (the caller cancelled or stopped iterating) aborts the request."""
        self._started()
        if request_id in self._outputs:
            raise ValueError(f"request id {request_id!r} is already running")
        queue = self._outputs[request_id] = asyncio.Queue()
        finished = False
        try:
            self._engine.add_request(request_id, prompt, sampling_params)
            self._wake.set()
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    finished = True  # nothing left to abort in a dead engine
                    raise out
                finished = out.finished
                yield out
        finally:
            del self._outputs[request_id]
            if not finished and self._dead is None:
                self._engine.abort_request([request_id])

    async def pause_generation(self, *, mode: str = "keep", clear_cache: bool = True) -> None:
        """Stop stepping; requests in flight keep their state (mode "keep", the only one the actor uses)."""
        if mode != "keep":
            raise ValueError(f"InlineLLM.pause_generation: mode {mode!r} is not supported, only 'keep'")
        self._started()
        async with self._lock:
            self._paused = True
            self._core.pause_scheduler(mode="keep", clear_cache=clear_cache)

    async def resume_generation(self) -> None:
        self._started()
        async with self._lock:
            self._core.resume_scheduler()
            self._paused = False
            self._wake.set()

    async def update_weight_version(self, new_version: str) -> None:
        self._started()
        async with self._lock:
            self._engine.set_weight_version(new_version)

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self._started()
        async with self._lock:
            return self._engine.reset_prefix_cache(reset_running_requests, reset_connector)

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None) -> list:
        """Call ``method`` on the model's worker between two steps, on a thread (the loop keeps running)."""
        self._started()
        async with self._lock:
            return await asyncio.to_thread(self._engine.collective_rpc, method, timeout, args, kwargs)

    async def init_weight_transfer_engine(self, request) -> None:
        await self.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": request.init_info})

    async def shutdown_weight_transfer_engine(self) -> None:
        await self.collective_rpc("shutdown_weight_transfer_engine")

    async def start_weight_update(self) -> None:
        await self.collective_rpc("start_weight_update")

    async def update_weights(self, request) -> None:
        await self.collective_rpc("update_weights", kwargs={"update_info": request.update_info})

    async def finish_weight_update(self) -> None:
        await self.collective_rpc("finish_weight_update")

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop stepping and release the engine core (idempotent). Waiting requests fail."""
        if self.output_handler is not None:
            self.output_handler.cancel()
        if self._dead is None:
            self._dead = RuntimeError("engine shut down")
            for queue in self._outputs.values():
                queue.put_nowait(RuntimeError("the in-process vLLM engine was shut down"))
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.engine_core.shutdown(timeout=timeout)
