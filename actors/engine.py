"""The actor's inference engine: one vLLM engine serving model turns, with versioned weight reloads.

Used by the actor (and ``bench/rollout.py``) as::

    device = prepare_device_env(cfg, replica)                  # before vLLM is imported: GPU pick / CPU env
    engine = await Engine.start(cfg, model_dir, device=device, replica=replica)
    turn = await engine.generate(context_ids, max_tokens, request_id)   # one model turn
    turn.token_ids, turn.logprobs, turn.versions, turn.stopped
    await engine.load_weights(weights_dir, version)            # pause(keep) -> reload -> relabel -> resume
    await engine.shutdown()

Version invariant: ``turn.versions[i]`` is the version of the weights that sampled ``turn.token_ids[i]``.
The label is stamped by vLLM's engine core on the outputs of every scheduler step (its
``weight_version``), and this class changes that label only while the scheduler is paused, between
the reload and the resume. So a token sampled before the pause but delivered to Python after the
reload still carries the old label: outputs are tagged where they are produced, not where they are
read, and no drain-then-switch race exists on the client side. vLLM returns the labels as spans over
the request's output tokens (``CompletionOutput.weight_versions``); a turn that straddles an update
has two spans, and an episode that straddles several turns can hold several versions.

Cache invariant (``actor.reload_clear_cache``, default on): the pause clears the KV and prefix caches,
so running requests are re-prefilled under the new weights and no later turn reuses a prefix computed
by the old ones. Cost: one prefill of every in-flight context per update. Off, in-flight requests keep
their old-weight KV (faster, but tokens after the update attend to old activations).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from weights.collective import VLLM_BACKEND
from weights.format import WEIGHTS_FILE

if TYPE_CHECKING:
    from configs.schema import DcrlConfig

log = logging.getLogger("dcrl.actor.engine")

WORKER_EXTENSION = "actors.vllm_ext.WorkerExtension"
"""vLLM's ``worker_extension_cls``: imported by every worker (and registers the gloo transfer backend)."""

UNIPROC_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"
"""``actor.cpu_executor = "uni"``: the model runs in vLLM's engine-core process (no worker process)."""

DTYPE_TAGS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "auto"}


def engine_tag(device_type: str, dtype: str, weight_quant: str = "none") -> str:
    """Engine label stored in every TrajectoryGroup, e.g. ``vllm-cpu/bf16``, ``vllm-cuda/bf16`` or, with
    ``actor.weight_quant``, ``vllm-cpu/bf16+int8w`` (int8-rounded weights computed in bf16)."""
    tag = f"vllm-{device_type}/{DTYPE_TAGS.get(dtype, dtype)}"
    return tag if weight_quant == "none" else f"{tag}+{weight_quant}w"


def visible_gpus(environ: Mapping[str, str]) -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set (Ray sets it per replica), else
    one id per line of ``nvidia-smi -L``, else none (a CPU machine)."""
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [d.strip() for d in cvd.split(",") if d.strip()]
        return [] if ids in ([], ["-1"]) else ids
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def pick_gpu(replica: int, override: int | None, visible: Sequence[str]) -> str:
    """The GPU id for actor replica ``replica``: ``visible[override]`` when ``actor.gpu`` is set, else
    ``visible[replica % len(visible)]`` (honcho's actor.N on an N-GPU box gets GPU N; a Ray replica sees one)."""
    if not visible:
        raise ValueError("pick_gpu: no visible GPU")
    if override is not None:
        if not 0 <= override < len(visible):
            raise ValueError(f"actor.gpu={override} but only {len(visible)} GPU(s) are visible: {list(visible)}")
        return visible[override]
    return visible[replica % len(visible)]


def vllm_cpu_env(kv_cache_gb: int = 1, threads: int | None = None) -> dict[str, str]:
    """Environment variables for a vLLM CPU engine on a small shared machine (set before vLLM starts).

    - VLLM_CPU_KVCACHE_SPACE: KV cache in GiB (default 4 would be mostly wasted on the tiny model).
    - VLLM_CPU_OMP_THREADS_BIND=nobind: vLLM's default ``auto`` pins the worker's OpenMP threads to
      one core per NUMA node and reserves another for the scheduler; several engines plus a learner
      on 2 cores would then all pile onto the same pinned core. ``nobind`` leaves placement to the OS.
    - OMP_NUM_THREADS: with ``nobind`` vLLM does not set it; one thread per engine by default, since
      the tiny model's matmuls are too small to gain from more and the learner needs the other core.
    - TOKENIZERS_PARALLELISM=false: no tokenizer thread pool beside the engine.
    - VLLM_HOST_IP / VLLM_LOOPBACK_IP=127.0.0.1: vLLM otherwise advertises the machine's network
      address for its internal message queues; all traffic stays on loopback.
    """
    return {
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOOPBACK_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads or 1),
        "TOKENIZERS_PARALLELISM": "false",
    }


def prepare_device_env(cfg: "DcrlConfig", replica: int, environ: dict[str, str] | None = None) -> str:
    """Set the environment vLLM reads at import, return the device type ("cuda" or "cpu").

    GPU machine: ``CUDA_VISIBLE_DEVICES`` = the one GPU :func:`pick_gpu` chose. CPU machine: the vLLM
    CPU settings of :func:`vllm_cpu_env` (KV cache ``actor.cpu_kv_cache_gb``, ``actor.cpu_threads``
    OpenMP threads, no core pinning). Must run before ``import vllm`` (and torch) in this process.
    """
    env = os.environ if environ is None else environ
    gpus = visible_gpus(env)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = pick_gpu(replica, cfg.actor.gpu, gpus)
        return "cuda"
    for k, v in vllm_cpu_env(cfg.actor.cpu_kv_cache_gb, cfg.actor.cpu_threads).items():
        env[k] = v
    return "cpu"


def cpu_bf16_is_emulated(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU lacks native bf16 matmuls (no ``avx512_bf16`` / ``amx_bf16`` flag in ``cpuinfo``,
    default ``/proc/cpuinfo``). There, vLLM's CPU kernels widen every bf16 weight to fp32 per matmul: on the
    2-core AVX2 machine of the README, ``bench/rollout.py --config small`` made 450-490 tokens/s in bf16 against
    2,100-2,260 in fp32. False where the flags cannot be read (not Linux, not x86)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return flags is not None and "avx2" in flags and not {"avx512_bf16", "amx_bf16"} & set(flags)


def dtype_warning(dtype: str, device: str, cpuinfo: str | None = None) -> str | None:
    """The warning the actor logs at engine start for ``actor.dtype`` on this device, or None."""
    if device == "cpu" and dtype == "bfloat16" and cpu_bf16_is_emulated(cpuinfo):
        return ("actor.dtype = bfloat16 on a CPU without native bf16 (no avx512_bf16/amx_bf16): vLLM generated "
                "~4x slower than with actor.dtype = float32 on such a CPU (bench/rollout.py, README)")
    return None


def engine_args(cfg: "DcrlConfig", model_path: str | os.PathLike, device: str, replica: int = 0) -> dict[str, Any]:
    """``AsyncEngineArgs`` for the actor: behaviour logprobs after temperature (``processed_logprobs``),
    prefix caching (each multi-turn turn resubmits the whole context), the run's context length.

    Eager mode (``actor.enforce_eager``, default: on CPU only) starts in seconds instead of compiling.
    ``seed`` differs per replica so that actors do not sample identical episodes.
    """
    eager = cfg.actor.enforce_eager if cfg.actor.enforce_eager is not None else device == "cpu"
    args: dict[str, Any] = {
        "model": str(model_path),
        "dtype": cfg.actor.dtype,
        "max_model_len": cfg.model.max_seq_len,
        "logprobs_mode": "processed_logprobs",
        "enable_prefix_caching": cfg.actor.prefix_caching,
        "enforce_eager": eager,
        "seed": cfg.actor.seed + replica,
        "max_num_seqs": max(cfg.actor.concurrency, 1),
        "disable_log_stats": True,
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if cfg.learner.weight_transfer != "files":
        args["weight_transfer_config"] = {"backend": VLLM_BACKEND[cfg.learner.weight_transfer]}
    if device == "cuda":
        args["gpu_memory_utilization"] = cfg.actor.gpu_memory_utilization
    if device == "cpu" and cfg.actor.cpu_executor == "uni":
        # vLLM's CPU platform turns "uni" into "mp"; named by its class, the in-process executor stays.
        args["distributed_executor_backend"] = UNIPROC_EXECUTOR
    return args


def engine_inline(cfg: "DcrlConfig", device: str) -> bool:
    """Whether vLLM's engine core runs inside the actor's process (``actor.engine_process``; "auto": on CPU)."""
    mode = cfg.actor.engine_process
    return mode == "inline" or (mode == "auto" and device == "cpu")


def sampled_logprobs(ids: list[int], logprobs) -> list[float]:
    """The logprob of each sampled token in ``ids`` from a completion's ``logprobs``, vLLM's flat form
    (``flat_logprobs=True``; asked with logprobs=0, it holds exactly the sampled token's entry at each position)."""
    if logprobs.token_ids != ids:
        raise RuntimeError(f"vLLM returned logprobs for tokens other than the {len(ids)} sampled ones")
    return list(logprobs.logprobs)


def spans_to_versions(spans: Sequence[Any] | None, n_tokens: int) -> np.ndarray:
    """Per-token int32 versions from vLLM's ``WeightVersionSpan(version, start, end)`` list.

    The spans must tile ``[0, n_tokens)`` in order; anything else means the engine did not label the
    tokens (e.g. a vLLM without weight-version tracking) and raises RuntimeError rather than guess.
    """
    out = np.empty(n_tokens, dtype=np.int32)
    if n_tokens == 0:
        return out
    if not spans:
        raise RuntimeError("vLLM returned no weight-version spans for generated tokens "
                           "(needs a vLLM with CompletionOutput.weight_versions, >= 0.32)")
    pos = 0
    for s in spans:
        if s.start != pos or s.end < s.start:
            raise RuntimeError(f"weight-version spans do not tile the output: {spans}")
        out[s.start:s.end] = int(s.version)
        pos = s.end
    if pos != n_tokens:
        raise RuntimeError(f"weight-version spans cover {pos} of {n_tokens} tokens: {spans}")
    return out


@dataclass(frozen=True)
class TurnOutput:
    """One model turn: sampled ids, their behaviour logprobs and weight versions, and whether it ended
    with EOS (``stopped``; False = cut at ``max_tokens``)."""

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    stopped: bool


class Engine:
    """A vLLM engine plus the weight version it serves. One per actor process. The engine is vLLM's ``AsyncLLM``
    (engine core in a process of its own) or, with ``actor.engine_process`` inline (the default on CPU),
    :class:`actors.inline_engine.InlineLLM` (engine core stepped by this process's event loop)."""

    def __init__(self, llm, *, tag: str, temperature: float, top_p: float, clear_cache_on_reload: bool,
                 version: int = 0, coalesce: bool = False, fast_reload: bool = False):
        self.llm = llm
        self.tag = tag
        self._in_flight = 0  # requests in the engine now (see busy_s)
        self._busy_since = 0.0
        self._busy_s = 0.0
        self.temperature = temperature
        self.top_p = top_p
        self.clear_cache_on_reload = clear_cache_on_reload
        self.version = version  # weights the engine serves now (its output label)
        self.generated_tokens = 0  # model tokens returned so far, for tokens/s
        self.reloads = 0
        self._reload_lock = None  # created lazily inside the running loop
        self._params_cache: dict[tuple[int, bool], Any] = {}
        self._transfer_joined = False
        self.world_size = 1  # inference ranks (TP x PP) that join a weight transfer group; dcrl runs TP 1
        self.stop_token_ids: list[int] = []  # besides EOS: a chat template's end-of-turn token (set before use)
        self.coalesce = coalesce  # identical turns asked in one loop iteration -> one request with n samples
        self._pending: dict[tuple, list[tuple[str, asyncio.Future]]] = {}
        self.coalesced_requests = 0  # requests that carried more than one turn (for status and tests)
        self.fast_reload = fast_reload  # CPU: dcrl_reload_weights where the model allows it (checked at start)
        # vLLM without async scheduling (its CPU build) runs the engine core's utility calls in the order they
        # were sent, between two steps and with no batch in flight: see _swap_weights.
        sched = getattr(getattr(llm, "vllm_config", None), "scheduler_config", None)
        self.ordered_utilities = sched is not None and sched.async_scheduling is False

    @classmethod
    async def start(cls, cfg: "DcrlConfig", model_path: str | os.PathLike, *, device: str = "cpu",
                    replica: int = 0) -> "Engine":
        """Start vLLM on ``model_path`` (policy version 0) and label its outputs "0".

        Blocks the loop while the engine starts (tens of seconds on CPU); nothing else runs yet.
        """
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        import actors.vllm_ext  # noqa: F401 - registers the gloo transfer backend in this process too
        from actors.inline_engine import InlineLLM

        t0 = time.monotonic()
        args = engine_args(cfg, model_path, device, replica)
        if warning := dtype_warning(cfg.actor.dtype, device):
            log.warning(warning)
        inline = engine_inline(cfg, device)
        # The engine lives only on the Engine (no local name): Engine.shutdown() can then free it while
        # the interpreter is intact, instead of its __del__ running (and failing) at interpreter teardown.
        build = InlineLLM.from_engine_args if inline else (lambda a: AsyncLLM.from_engine_args(AsyncEngineArgs(**a)))
        engine = cls(build(args), tag=engine_tag(device, cfg.actor.dtype, cfg.actor.weight_quant),
                     temperature=cfg.actor.temperature, top_p=cfg.actor.top_p,
                     clear_cache_on_reload=cfg.actor.reload_clear_cache, coalesce=cfg.actor.coalesce_turns)
        if device == "cpu":
            await engine.llm.collective_rpc("dcrl_init_amx")
            if cfg.actor.fast_reload:
                why = [w for w in await engine.llm.collective_rpc("dcrl_fast_reload_supported") if w]
                engine.fast_reload = not why
                if why:
                    log.info("actor.fast_reload: not for this model (%s); weight updates use vLLM's reload", why[0])
        await engine.llm.update_weight_version("0")
        log.info("vLLM engine up on %s (%s, engine core %s) in %.1f s", model_path, engine.tag,
                 "in this process" if inline else "in its own process", time.monotonic() - t0)
        return engine

    def sampling_params(self, max_tokens: int, ignore_eos: bool = False, n: int = 1):
        """The SamplingParams of every model turn (also used by bench/rollout.py's standalone baseline).

        Built once per (max_tokens, ignore_eos, n) and shared: building one costs ~0.1 ms of Python, and
        vLLM clones the params of every request it accepts, so sharing is safe.
        """
        key = (max_tokens, ignore_eos, n)
        params = self._params_cache.get(key)
        if params is None:
            params = self._params_cache[key] = self._build_params(max_tokens, ignore_eos, n)
        return params

    def _build_params(self, max_tokens: int, ignore_eos: bool, n: int = 1):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # FINAL_ONLY: one output per turn instead of one per token (the Python side is the bottleneck on
        # small models); versions come from the engine's spans, so streaming buys nothing here.
        # flat_logprobs: the sampled tokens' logprobs as one list per sample, not a dict and a Logprob object
        # per token in vLLM's front end (the actor process's core is the one the engine core shares).
        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens, logprobs=0,
                              ignore_eos=ignore_eos, detokenize=False, stop_token_ids=self.stop_token_ids or None,
                              output_kind=RequestOutputKind.FINAL_ONLY, flat_logprobs=True)

    async def generate(self, context: Sequence[int], max_tokens: int, request_id: str, *,
                       ignore_eos: bool = False) -> TurnOutput:
        """Sample one model turn after ``context`` (token ids): up to ``max_tokens`` tokens, stopping at
        EOS (which is returned as the last token). Cancelling the caller aborts the vLLM request.

        With ``coalesce`` (``actor.coalesce_turns``), turns asked for the same context and budget within one
        iteration of the event loop (the G first turns of a group start together) go to vLLM as one request
        with ``n`` samples: one prompt to process instead of G, and G fewer requests through vLLM's Python
        front end. Each caller still gets its own sample, logprobs and version labels; the request is aborted
        only when every caller has gone."""
        if not self.coalesce:
            return (await self._request(context, max_tokens, request_id, ignore_eos, 1))[0]
        key = (tuple(context), max_tokens, ignore_eos)
        waiters = self._pending.get(key)
        if waiters is None:
            waiters = self._pending[key] = []
            asyncio.get_running_loop().call_soon(self._flush, key)
        fut = asyncio.get_running_loop().create_future()
        waiters.append((request_id, fut))
        return await fut

    def _flush(self, key: tuple) -> None:
        """Send the turns waiting on ``key`` as one request (n = their number) and hand each its sample."""
        waiters = self._pending.pop(key)
        context, max_tokens, ignore_eos = key
        task = asyncio.ensure_future(self._request(context, max_tokens, waiters[0][0], ignore_eos, len(waiters)))

        def abandoned(_):  # every caller cancelled (its episode stopped): abort the vLLM request
            if all(f.cancelled() for _, f in waiters):
                task.cancel()

        def deliver(t: asyncio.Task) -> None:
            for i, (_, f) in enumerate(waiters):
                if f.done():
                    continue
                if t.cancelled():
                    f.cancel()
                elif t.exception() is not None:
                    f.set_exception(t.exception())
                else:
                    f.set_result(t.result()[i])

        for _, f in waiters:
            f.add_done_callback(abandoned)
        task.add_done_callback(deliver)
        if len(waiters) > 1:
            self.coalesced_requests += 1

    async def _request(self, context: Sequence[int], max_tokens: int, request_id: str, ignore_eos: bool,
                       n: int) -> list[TurnOutput]:
        """One vLLM request with ``n`` samples; one TurnOutput per sample, in vLLM's index order."""
        from vllm.inputs import TokensPrompt

        final = None
        self._enter_request()
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(context)),
                                               self.sampling_params(max_tokens, ignore_eos, n), request_id):
                final = out
        finally:
            self._leave_request()
        if final is None or len(final.outputs) != n:
            raise RuntimeError(f"vLLM request {request_id} ended without its {n} output(s)")
        turns = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lps = sampled_logprobs(ids, c.logprobs)
            versions = spans_to_versions(c.weight_versions, len(ids)).tolist()
            self.generated_tokens += len(ids)
            turns.append(TurnOutput(ids, lps, versions, stopped=c.finish_reason == "stop"))
        return turns

    def _enter_request(self) -> None:
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1

    def _leave_request(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._busy_s += time.perf_counter() - self._busy_since

    @property
    def busy_s(self) -> float:
        """Seconds during which at least one request was in the engine (running, queued or paused)."""
        return self._busy_s + (time.perf_counter() - self._busy_since if self._in_flight else 0.0)

    async def load_weights(self, weights_dir: str | os.PathLike, version: int) -> float:
        """Serve ``weights_dir/model.safetensors`` as ``version``; returns the pause-to-resume seconds.

        In-flight requests are frozen (``pause_generation(mode="keep")``), the worker reloads in place
        (``reload_weights``: on vLLM CPU ``model.load_weights`` on a loaded model fails, the worker's
        reload re-runs the post-load repacking; with ``actor.fast_reload`` the worker extension's
        ``dcrl_reload_weights`` does the same in 5 ms instead of 12), the output label becomes ``version``, then generation
        resumes. If the reload raises, generation stays paused and the error propagates: the engine
        would otherwise serve half-loaded weights under the old label.
        """
        async def reload() -> None:
            if self.fast_reload:
                await self.llm.collective_rpc("dcrl_reload_weights",
                                              kwargs={"weights_path": str(Path(weights_dir) / WEIGHTS_FILE)})
            else:
                await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(Path(weights_dir))})

        return await self._swap_weights(reload, version)

    async def _swap_weights(self, load, version: int) -> float:
        """The frame of every weight update: one at a time, pause(keep), ``await load()``, relabel the
        outputs ``version``, resume; returns the pause-to-resume seconds. If ``load`` raises, generation
        stays paused and the label unchanged, and the error propagates."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            t0 = time.perf_counter()
            if self.ordered_utilities:
                # The engine core takes these calls in order, between steps, none in flight (no async
                # scheduling): nothing runs between the pause and the load, or between the relabel and the
                # resume, whether or not the client waits for each reply. So two round trips instead of four
                # (each costs milliseconds when the actor and vLLM share one core).
                await asyncio.gather(self._pause(), load())
                await asyncio.gather(self.llm.update_weight_version(str(version)), self.llm.resume_generation())
                self.version = version
            else:
                await self._pause()
                await load()
                await self.llm.update_weight_version(str(version))
                self.version = version
                await self.llm.resume_generation()
            self.reloads += 1
            return time.perf_counter() - t0

    async def _pause(self) -> None:
        """Freeze in-flight requests (mode "keep") and, with ``clear_cache_on_reload``, drop the KV/prefix cache.

        ``AsyncLLM.pause_generation`` ends with a fixed 20 ms sleep so that outputs finished before the pause
        reach their callers first; vLLM documents it as cosmetic (ordering, not correctness), and it was half
        of every weight update on the tiny model (pause 22 ms, reload 16 ms). The scheduler pause it wraps is
        called directly; the version labels come from the engine's spans, so they do not depend on that
        ordering. Text-only engines have no multimodal cache to clear. Falls back to the public call where the
        engine client lacks the method."""
        core = getattr(self.llm, "engine_core", None)
        pause = getattr(core, "pause_scheduler_async", None)
        if pause is None:
            await self.llm.pause_generation(mode="keep", clear_cache=self.clear_cache_on_reload)
            return
        await pause(mode="keep", clear_cache=self.clear_cache_on_reload)

    async def join_transfer(self, init_info: dict) -> None:
        """Join the learner's weight transfer group (``learner.transfer``); blocks until the learner's
        channel is there too. A second join replaces the first group."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        if self._transfer_joined:
            await self.llm.shutdown_weight_transfer_engine()
            self._transfer_joined = False
        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))
        self._transfer_joined = True

    async def receive_weights(self, update_info: dict, version: int) -> float:
        """Serve the weights the learner is broadcasting now as ``version``; returns pause-to-resume seconds.

        Same frame as :meth:`load_weights`: pause(keep), vLLM's start_weight_update ->
        update_weights (the receiving side of the broadcast described by ``update_info``: names,
        dtype_names, shapes) -> finish_weight_update, relabel, resume. If the transfer fails, generation
        stays paused and the error propagates (half-received weights must not serve under any label).
        """
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        async def receive() -> None:
            await self.llm.start_weight_update()
            await self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))
            await self.llm.finish_weight_update()

        return await self._swap_weights(receive, version)

    async def shutdown(self) -> None:
        """Stop the engine processes and let vLLM's output task finish on this loop (idempotent).

        The task must end while the loop still runs: left pending on a closed loop it keeps vLLM's ZMQ
        sockets open, and the garbage collector then blocks forever in ``zmq.Context.term``.
        """
        llm, self.llm = self.llm, None
        if llm is None:
            return
        # A generous grace period: on a busy 2-core machine the engine core needs more than vLLM's
        # default 5 s to exit, and a force-killed one leaks its shared-memory segments.
        llm.shutdown(timeout=30.0)
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            await asyncio.wait({handler}, timeout=10.0)
        del llm, handler
        gc.collect()  # free vLLM's objects now: their __del__ fails at interpreter teardown
