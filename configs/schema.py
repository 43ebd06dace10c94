"""The one typed configuration of dcrl, loaded from TOML.

Every process (actor, learner, buffer tools, launchers) takes ``--config PATH`` and reads this schema.
Unknown keys are errors, ranges are checked, and a bad value fails at start naming the field, e.g.
``configs/tiny.toml: learner.lr: Input should be greater than 0 (got -1)``.

Environment overrides (so honcho's ``.env`` and Ray can point all processes at one server):
``DCRL_REDIS_URL`` replaces ``redis.url``; ``DCRL_REDIS_PASSWORD`` replaces ``redis.password``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocol.errors import DcrlError
from protocol.vocab import ControllerMode, Transport, WeightQuant

PRESET_DIR = Path(__file__).resolve().parent


class ConfigError(DcrlError, ValueError):
    """A configuration file is missing, unparsable or invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RunConfig(_Strict):
    name: str = Field("tiny", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    """Run name: outputs go to ``<root>/<name>/`` (metrics.jsonl, report.png, checkpoints, weights)."""
    root: str = "runs"
    """Directory holding all runs (relative paths are relative to the working directory)."""
    seed: int = Field(0, ge=0)

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


class RedisConfig(_Strict):
    url: str = "redis://127.0.0.1:6390/0"
    """Redis URL; ``DCRL_REDIS_URL`` overrides it."""
    password: str | None = None
    """Password (``requirepass``); ``DCRL_REDIS_PASSWORD`` overrides it. None = no AUTH."""
    prefix: str = Field("dcrl", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    """Key prefix: streams ``<prefix>:traj`` / ``<prefix>:dead``, hash ``<prefix>:control``."""
    consumer_group: str = "learners"
    """Consumer group of the learners on ``<prefix>:traj`` (created idempotently by the reader)."""
    pending_timeout_s: float = Field(60.0, gt=0)
    """Entries pending longer than this on a consumer are reclaimed by another one (XCLAIM)."""
    max_deliveries: int = Field(5, ge=1)
    """An entry handed to learners this many times without an ack (each restart of the consumer that held
    it, or a reclaim after ``pending_timeout_s``, delivers it again) is moved to ``<prefix>:dead`` instead
    of being delivered once more: a group that crashes the learner cannot crash it forever."""
    read_block_ms: int = Field(500, ge=1)
    """Longest wait of one ``GroupReader.receive`` call for new entries (XREADGROUP BLOCK)."""
    max_held_groups: int = Field(1024, ge=1)
    """Actor side: finished groups held in memory while Redis is unreachable."""
    retry_backoff_s: float = Field(0.2, gt=0)
    """First wait before retrying a lost Redis connection; doubles per attempt."""
    retry_backoff_max_s: float = Field(5.0, gt=0)
    """Cap of the doubling retry wait."""
    connect_timeout_s: float = Field(8.0, gt=0)
    """Give up (with a one-line error naming ``redis.url``) if Redis cannot be reached for this long at start:
    8 s, so that a process fails within 10 s of its start. Redis itself starts in well under a second (the
    Procfile starts it beside the learner and actors); raise this for a server replaying a large append-only file."""
    data_dir: str = "runs/redis"
    """Where the Procfile's redis-server keeps its append-only file."""
    max_outage_s: float = Field(300.0, gt=0)
    """Reader and control plane: give up (ConnectionError) after Redis has been unreachable this long
    during a run. The actors' writer never gives up: it holds groups and keeps retrying."""
    dead_maxlen: int = Field(10000, ge=1)
    """Approximate cap on the dead-letter stream ``<prefix>:dead`` (oldest dropped); the count is exact."""

    @model_validator(mode="after")
    def _backoff_order(self) -> "RedisConfig":
        if self.retry_backoff_s > self.retry_backoff_max_s:
            raise ValueError(f"retry_backoff_s ({self.retry_backoff_s}) must be <= retry_backoff_max_s ({self.retry_backoff_max_s})")
        return self


class TinyModelConfig(_Strict):
    """Architecture and warm start of the built-in tiny Qwen3 model (``python -m tiny``)."""

    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int = Field(32, ge=8)
    intermediate_size: int = Field(256, ge=16)
    max_position_embeddings: int = Field(512, ge=64)
    warmstart_steps: int = Field(2500, ge=0)
    """Most supervised warm-start steps; the build fails, naming this field, if accuracy is still below
    ``warmstart_min_acc`` by then. 0: no warm start at all (random weights)."""
    warmstart_lr: float = Field(3e-3, gt=0)
    warmstart_batch: int = Field(64, ge=1)
    warmstart_min_acc: float = Field(0.35, gt=0, le=1)
    """Stop the supervised warm start at the first check whose greedy accuracy on held-out prompts is in
    [warmstart_min_acc, warmstart_max_acc]: the model is left deliberately mediocre, so RL has signal and room."""
    warmstart_max_acc: float = Field(0.6, gt=0, le=1)
    """Top of the warm start's accuracy window: a check above it rolls back to the previous check and
    continues with a check after every step."""
    warmstart_eval_every: int = Field(10, ge=1)
    """Warm-start steps between two held-out accuracy checks (one check costs about 3 training steps)."""
    warmstart_eval_episodes: int = Field(200, ge=10)
    """Held-out arithmetic problems (seeds disjoint from training) in each accuracy check."""
    warmstart_task: Literal["arithmetic", "chain_sum", "dataset", "key_door"] = "arithmetic"
    """The task the warm start teaches and grades (``tiny.data.TEACHERS``), with the run's ``env.kwargs`` when
    ``env.name`` is that task: single-turn ``arithmetic``/``chain_sum``/``dataset`` (the rows' reference answers
    are the teacher), or the long multi-turn ``key_door`` (graded over up to ``actor.max_turns`` turns)."""
    warmstart_eval_kwargs: dict[str, Any] = {}
    """Env kwargs that override the task's for the held-out accuracy checks (e.g. a dataset's test file)."""
    warmstart_guess_fraction: float = Field(0.25, ge=0, le=4)
    """Binary-search guess_number dialogues per warm-start step, as a fraction of warmstart_batch."""
    warmstart_threads: int = Field(1, ge=1)
    """torch threads during the build. 1 by default: measured on a shared 2-core machine, 2 OpenMP
    threads competing with other processes made each step ~10x slower than 1 thread."""


class ModelConfig(_Strict):
    path: str = ".cache/tiny-qwen3"
    """HF model directory (config.json, tokenizer, safetensors), loaded by both vLLM and transformers."""
    build_tiny: bool = False
    """Build and warm-start the tiny model at ``path`` if it is not there yet."""
    tiny: TinyModelConfig = TinyModelConfig()
    max_seq_len: int = Field(512, ge=16)


class EnvConfig(_Strict):
    name: str = "arithmetic"
    """Built-in ``arithmetic`` / ``guess_number`` / ``chain_sum``, ``dataset`` (envs/dataset.py), ``reasoning_gym``
    (envs/reasoning_gym.py), or an import path ``package.module:Class``."""
    kwargs: dict[str, Any] = {}
    """Passed to the environment's constructor."""
    step_timeout_s: float = Field(30.0, gt=0)
    """Longest one ``reset`` or ``step`` call may take. The calls run in worker threads (about 0.1 ms per call
    on a 2-core CPU for the hop); a call past this ends its episode as an environment error (the group is
    dropped, ``episode/env_errors``) and is abandoned in its thread, so an environment that hangs never blocks
    the actor."""
    chat: bool = False
    """Chat-formatted episodes (envs/chat.py): observations are user messages and model turns assistant messages,
    rendered by the model's chat template token in / token out; generation stops at the end-of-turn token."""
    system_prompt: str = ""
    """chat only: a system message before the first observation (none when empty)."""
    enable_thinking: bool | None = None
    """chat only: passed to the chat template as ``enable_thinking`` (Qwen3's thinking switch) unless None."""
    chat_end_of_turn: str | None = None
    """chat only: the token closing assistant messages, where generation stops (default: the tokenizer's EOS)."""


class ActorConfig(_Strict):
    concurrency: int = Field(16, ge=1)
    """Episodes in flight per actor process."""
    group_size: int = Field(8, ge=1)
    """G: episodes per group (same prompt / environment seed)."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens_per_turn: int = Field(16, ge=1)
    max_tokens_per_episode: int = Field(256, ge=1)
    max_turns: int = Field(12, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "bfloat16"
    """vLLM compute dtype: bfloat16 vs the learner's float32 is the engine mismatch dcrl budgets."""
    weight_quant: WeightQuant = "none"
    """Heterogeneous rollout: the learner trains at full precision, the actors serve weights rounded to "int8" or
    "fp8" (e4m3), one absmax scale per output channel. Quantised then dequantised at publish (and for the actors'
    starting weights), so the engine computes with exactly the quantised values; vLLM's own low-precision
    kernels are not used (see weights/quant.py). The lag-0 discrepancy then carries the quantisation error."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    cpu_kv_cache_gb: int = Field(1, ge=1)
    """vLLM CPU only: KV cache size (VLLM_CPU_KVCACHE_SPACE)."""
    gpu: int | None = None
    """GPU index; default: the replica index (honcho/ray) modulo visible GPUs."""
    weights_cache_dir: str = "runs/actor_weights"
    """Where weights fetched over ZMQ are written (actors without the learner's filesystem)."""
    report_interval_s: float = Field(2.0, gt=0)
    """How often the actor stores its time breakdown (protocol.ActorReport) for the learner's metrics."""
    status_interval_s: float = Field(10.0, gt=0)
    max_groups: int | None = Field(None, ge=1)
    """Stop after this many groups (None: run until the learner says stop or SIGTERM)."""
    seed: int = Field(0, ge=0)
    enforce_eager: bool | None = None
    """vLLM eager mode (no torch.compile / CUDA graphs). None: eager on CPU (starts in seconds), graphs on GPU."""
    prefix_caching: bool = True
    """vLLM prefix caching: every multi-turn turn resubmits the whole context, so earlier turns hit the cache."""
    reload_budget: float = Field(0.15, gt=0, le=1)
    """Most of the actor's wall time that weight reloads the staleness cap does not force may take. After a
    reload of r seconds the next optional one waits r * (1 - reload_budget) / reload_budget: when the learner
    publishes faster than the engine can swap weights (tiny models, where one reload costs about a third of
    a learner step), the actor skips versions instead of spending its time reloading. A reload needed to stay
    within the cap K (a group may not start on weights more than K versions old) is never delayed, so K = 0
    stays exactly on-policy. 1.0: load every version as soon as it is announced."""
    coalesce_turns: bool = True
    """Turns asked for the same context within one event-loop iteration (the G first turns of a group) go to
    vLLM as one request with n = G samples (actors/engine.py): one prompt prefill and one request instead of G."""
    reload_clear_cache: bool = True
    """Clear vLLM's KV/prefix cache at each weight update: in-flight requests are re-prefilled with the new
    weights and no later turn reuses a prefix computed by the old ones (costs one prefill per update)."""
    cpu_threads: int = Field(1, ge=1)
    """vLLM CPU only: OpenMP threads of the engine (OMP_NUM_THREADS)."""
    fast_reload: bool = True
    """vLLM CPU only: weight updates from files load through the model's own loader and repack only the CPU GEMM
    weights (``actors/vllm_ext.py``), 5 ms instead of vLLM's generic ``reload_weights`` (12 ms) on the tiny model.
    Used where every layer is unquantized; otherwise, and with false, vLLM's reload."""
    cpu_executor: Literal["uni", "mp"] = "uni"
    """vLLM CPU only: "uni" runs the model inside vLLM's engine-core process; "mp" is vLLM's CPU default, a
    separate worker process that the engine core hands every step to over a shared-memory queue whose reader
    spins (``sched_yield``) for a second after each message. With the actor's processes on one core (the tiny
    preset), "mp" made every step a hand-over between three processes; "uni" ran the tiny peer benchmark at
    80-88 ms per step against 89-105 (``README.md``, "Speed against TRL"). vLLM picks "mp" on CPU because it sets
    the worker's OpenMP threads itself; dcrl sets them (``cpu_threads``) before vLLM starts."""
    engine_process: Literal["auto", "inline", "separate"] = "auto"
    """Where vLLM's engine core runs. "separate": its own process, vLLM's ``AsyncLLM`` (the front end's Python work
    overlaps the GPU's). "inline": inside the actor's process, stepped by the actor's event loop
    (``actors/inline_engine.py``): no messages between two processes. "auto": inline on CPU, separate on GPU. On
    the tiny preset's one shared core, 64 samples of 8 tokens took 30 ms inline against 45-50 ms separate."""
    admission_poll_s: float = Field(0.25, gt=0)
    """While idle (no control yet, or at the staleness cap): the longest wait between two admission attempts. The
    actor also wakes the moment the learner writes a newer Control (``ControlPlane.wait_control``), so this is the
    fallback (a learner that writes no control events, a Redis hiccup), and how often the Control is re-read."""
    weights_poll_s: float = Field(2.0, gt=0)
    """Seconds between reads of the latest WeightsReady in Redis, the fallback for missed ZMQ announcements."""
    weights_fetch_chunk_mb: int = Field(4, ge=1, le=16)
    """Chunk size when fetching weights from the learner's file server (it serves at most 16 MiB per chunk)."""
    weights_fetch_timeout_s: float = Field(30.0, gt=0)
    """Give up a weight fetch (the update is refused, current weights kept) if a chunk takes longer."""
    lease_s: float = Field(30.0, gt=0)
    """Liveness lease, renewed every lease_s / 3 by a thread of the actor. When it lapses (the actor died and no
    replica came back under its id), the learner gives the groups it had admitted but not sent back to the
    other actors; before that, they count against the admission capacity."""
    drain_timeout_s: float = Field(300.0, gt=0)
    """On Control.stop or max_groups: wait this long for in-flight groups to finish, then cancel the rest."""
    stop_timeout_s: float = Field(3.0, gt=0)
    """After a stop signal (SIGTERM, SIGINT, Ctrl-C of ``make run``): the most the actor waits for Redis, in all, to
    give back the slots of its unfinished groups, drop its lease and write the groups it holds, before it exits
    anyway. Below honcho's 5 s between its SIGTERM and its SIGKILL: a Ctrl-C also stops redis-server, and an actor
    that waited out its Redis timeouts (50 s in all) was orphaned by that SIGKILL. Slots it could not give back
    return when its lease lapses (``actor.lease_s``); groups it could not write were never in Redis, and the
    actors produce others in their place."""
    max_restarts: int = Field(5, ge=0)
    """``python -m actors`` restarts a crashed actor (killed by a signal, or an exit status other than 0 and 2)
    at most this many times, after a backoff of 1, 2, 4 ... 30 s (actors/supervisor.py). 0: never. Under Ray,
    Ray restarts replicas instead (``ray.max_restarts``) and the launcher sets this to 0."""


class LearnerConfig(_Strict):
    steps: int = Field(20, ge=1)
    batch_groups: int = Field(4, ge=1)
    """Groups consumed per optimizer step."""
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    clip_eps_low: float = Field(0.2, gt=0, lt=1)
    clip_eps_high: float = Field(0.28, gt=0)
    micro_batch: int = Field(16, ge=1)
    """Trajectories per forward/backward pass (gradient accumulation over the step's batch)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    publish_every: int = Field(1, ge=1)
    keep_versions: int = Field(3, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    zmq_pub: str = "tcp://127.0.0.1:5590"
    """PUB socket announcing WeightsReady."""
    zmq_files: str = "tcp://127.0.0.1:5591"
    """ROUTER socket serving weight files to actors without a shared filesystem."""
    weight_transfer: Transport = "files"
    """How actors get new weights. "files": a versioned safetensors directory per publish, read from a shared
    filesystem or fetched over ``zmq_files`` (works everywhere). "nccl": vLLM's native weight transfer, the
    learner broadcasting from its GPU into the actors' vLLM workers (GPU learner and actors; no files).
    "gloo": the same protocol over gloo (CPU learner and actors). See learner/transfer.py."""
    zmq_transfer: str = "tcp://127.0.0.1:5592"
    """ROUTER socket where actors join the weight transfer and ask for broadcasts (nccl/gloo only)."""
    transfer_host: str = "127.0.0.1"
    """Address of this learner that actors' workers reach for the nccl/gloo group rendezvous."""
    transfer_timeout_s: float = Field(120.0, gt=0)
    """nccl/gloo: the longest a group rendezvous (and, on gloo, one broadcast) may wait for the other side."""
    transfer_packed: bool = True
    """nccl only: broadcast through vLLM's packed double buffers instead of tensor by tensor."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "dcrl"
    progress: bool = True
    consumer: str = Field("learner-0", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    """Redis consumer name; stable across restarts so a restarted learner re-reads its own pending entries."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept under ``<run_dir>/checkpoints`` (the newest ones)."""
    wait_timeout_s: float = Field(600.0, gt=0)
    """Fail with a clear error if a step's batch is not complete after this long (actors dead?)."""
    torch_threads: int = Field(0, ge=0)
    """torch intra-op threads of the learner (0: torch's default)."""
    world_size: int = Field(1, ge=1, le=64)
    """Learner ranks. 1: one process, the model unsharded. N > 1: ``python -m learner`` starts N - 1 more ranks
    on this machine (127.0.0.1; gloo on CPU, nccl on GPU with one GPU per rank) and shards the model over all
    N with FSDP2 (per decoder layer, then the root). Rank 0 alone talks to Redis, the actors and the run
    directory; see learner/distributed.py."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """world_size > 1: the dtype of the forward and backward (FSDP2 ``MixedPrecisionPolicy.param_dtype``: the
    shards are gathered in it); "auto": ``learner.dtype``. Parameters, AdamW states and the gradient reduction
    stay in ``learner.dtype``: bfloat16 here with dtype float32 is bf16 compute over fp32 master weights.
    Logprobs are taken in fp32 either way."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them (transformers'
    gradient checkpointing, non-reentrant): about one more forward of compute for activations of one layer."""
    cpu_offload: bool = False
    """world_size > 1 on GPUs: keep the parameter shards, gradients and AdamW states in host memory (FSDP2
    ``CPUOffloadPolicy``; the optimizer step runs on the CPU); each layer is copied to the GPU for its
    forward and backward."""
    meta_init: bool = True
    """world_size > 1: ranks 1..N-1 build the model on the meta device (no memory) and receive rank 0's weights
    while they are sharded (``broadcast_from_rank0``), so only rank 0 ever holds the full model in host memory.
    False: every rank loads the full model from ``model.path`` and shards it (N full copies in host memory)."""
    checkpoint_format: Literal["full", "sharded"] = "full"
    """How checkpoints hold the weights and the AdamW state. "full": one ``model.safetensors`` and one
    ``optimizer.pt`` in the layout of a one-rank learner; with world_size > 1 they are gathered on rank 0 first,
    so rank 0 holds a full copy of both in host memory while it writes. "sharded": every rank writes its own
    shards with ``torch.distributed.checkpoint`` (DCP), so no rank ever holds more than its shards; with
    world_size 1 the one process writes them the same way. Either format resumes with any world size (DCP
    reshards on load); see learner/checkpoint.py."""
    crash_after_step: int | None = Field(None, ge=1)
    """Tests only: SIGKILL the learner right after this step's optimizer step, weight publish and control
    write, before its checkpoint (exercises resume and the exactly-once bookkeeping)."""
    log_group_ids: bool = False
    """Audit trail: each ``metrics.jsonl`` row also lists the ids of the groups its step trained (``groups``);
    a resumed run truncates the rows of redone steps, so the file names every group the model learned from
    exactly as often as it did (``bench/faults.py`` counts lost and twice-trained groups with it). Also
    ``episodes``: [turns, tokens] of every episode trained, checked against the actors' own counts
    (``ActorReport.episode_turns``/``episode_tokens``) by ``tests/test_agent_e2e.py``."""


class ControllerConfig(_Strict):
    mode: ControllerMode = "dcmdp"
    """Off-policy handling. dcmdp: adaptive (lambda drives penalty, IS bounds, K). Baselines on the same
    code path: none (mu taken as pi_old), tis (truncated IS), icepop (mask outside bounds), mis (masked IS,
    sequence level), fixed (TIS with K = k_max), sync (K = 0)."""
    metric: Literal["abs_prob", "k3", "k2"] = "abs_prob"
    penalty: Literal["advantage", "k2"] = "advantage"
    delta: float | Literal["auto"] = "auto"
    """Tolerance of the discrepancy constraint D <= delta; auto = (1 + auto_slack) * engine floor at warm-up."""
    auto_slack: float = Field(0.5, gt=-1)
    """delta = "auto": the tolerance is (1 + auto_slack) x the measured engine floor. Below 0 the tolerance is
    under the floor itself (a constraint the engine alone violates: the low end of a tolerance sweep)."""
    delta_min: float = Field(0.0, ge=0)
    """delta = "auto": the tolerance is at least this (0: no minimum). The auto tolerance scales with the engine
    mismatch alone; an actor that matches the learner (fp32 vLLM against an fp32 learner) measures a floor near
    0, and the tolerance then forbids any policy lag: DCMDP throttles K to 0 and the job runs synchronously. A
    minimum, in the units of ``metric``, keeps room for lag whatever the engine floor."""
    warmup_steps: int = Field(1, ge=1)
    """Observations with lag-0 tokens whose engine floor is averaged for delta = "auto" (see
    learner.controller.DCMDPController): one batch is a noisy estimate."""
    dual: Literal["ascent", "pid"] = "ascent"
    eta: float = Field(1.0, gt=0)
    """Dual ascent step on the normalised violation (D - delta) / delta."""
    lambda_init: float = Field(0.1, ge=0)
    lambda_max: float = Field(10.0, gt=0)
    kp: float = Field(0.5, ge=0)
    ki: float = Field(0.2, ge=0)
    kd: float = Field(0.1, ge=0)
    ema_alpha: float = Field(0.5, gt=0, le=1)
    """PID only: weight of the newest error in the EMA that feeds the proportional term."""
    d_alpha: float = Field(1.0, gt=0, le=1)
    """Weight of the newest batch in the running average of D that the dual update reacts to (1: each
    batch's own D). Small batches measure D with much noise, and a dual that follows each of them swings K
    between K_min and K_max from one step to the next."""
    fit_alpha: float = Field(0.3, gt=0, le=1)
    """Weight of the newest batch in the running engine-floor and lag-slope estimates behind K(lambda)."""
    beta_max: float = Field(5.0, gt=1)
    beta_min: float = Field(1.5, gt=1)
    k_max: int = Field(4, ge=0)
    k_min: int = Field(0, ge=0)
    k_step: int = Field(1, ge=0)
    """dcmdp: the most K may move from one step to the next (0: no limit). K(lambda) jumps from K_max to its
    formula as soon as lambda leaves 0, so a D hovering at delta flipped K between K_max and 0 from step to
    step (measured on the tiny preset): the actors then alternated between running free and idling. Moving
    K one version per step toward K(lambda) keeps the throttle's direction and removes the flapping."""
    tis_cap: float = Field(2.0, gt=0)
    icepop_low: float = Field(0.5, gt=0)
    icepop_high: float = Field(5.0, gt=1)
    mis_low: float = Field(0.5, gt=0)
    mis_high: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _ranges(self) -> "ControllerConfig":
        if isinstance(self.delta, float) and self.delta <= 0:
            raise ValueError("delta must be > 0 or 'auto'")
        if self.beta_min > self.beta_max:
            raise ValueError(f"beta_min ({self.beta_min}) must be <= beta_max ({self.beta_max})")
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must be <= k_max ({self.k_max})")
        if self.icepop_low >= self.icepop_high:
            raise ValueError("icepop_low must be < icepop_high")
        if self.mis_low >= self.mis_high:
            raise ValueError("mis_low must be < mis_high")
        return self


class RayConfig(_Strict):
    num_actors: int = Field(2, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    num_gpus_learner: float = Field(0.0, ge=0)
    max_restarts: int = Field(5, ge=0)
    address: str | None = None
    """Existing Ray cluster address; None starts a local single-node Ray on 127.0.0.1."""


class DcrlConfig(_Strict):
    run: RunConfig = RunConfig()
    redis: RedisConfig = RedisConfig()
    model: ModelConfig = ModelConfig()
    env: EnvConfig = EnvConfig()
    actor: ActorConfig = ActorConfig()
    learner: LearnerConfig = LearnerConfig()
    controller: ControllerConfig = ControllerConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _cross(self) -> "DcrlConfig":
        if self.actor.max_tokens_per_turn > self.actor.max_tokens_per_episode:
            raise ValueError("actor.max_tokens_per_turn must be <= actor.max_tokens_per_episode")
        if self.actor.max_tokens_per_episode >= self.model.max_seq_len:
            raise ValueError("actor.max_tokens_per_episode must be < model.max_seq_len (room for the prompt)")
        if self.model.tiny.warmstart_min_acc > self.model.tiny.warmstart_max_acc:
            raise ValueError("model.tiny.warmstart_min_acc must be <= model.tiny.warmstart_max_acc (the warm start's "
                             "accuracy window)")
        lcfg = self.learner
        if lcfg.world_size == 1 and lcfg.compute_dtype not in ("auto", lcfg.dtype):
            raise ValueError(f"learner.compute_dtype = {lcfg.compute_dtype!r} differs from learner.dtype: mixed "
                             "precision is FSDP2's, it needs learner.world_size > 1 (with one rank set learner.dtype)")
        if lcfg.cpu_offload and (lcfg.world_size == 1 or lcfg.device == "cpu"):
            raise ValueError("learner.cpu_offload moves FSDP2 shards off the GPUs: it needs learner.world_size > 1 "
                             "and a GPU learner (learner.device \"cuda\" or \"auto\")")
        if self.learner.weight_transfer == "nccl" and self.learner.device == "cpu":
            raise ValueError("learner.weight_transfer = \"nccl\" broadcasts from the learner's GPU: it needs "
                             "learner.device = \"cuda\" (or \"auto\" on a GPU machine); use \"gloo\" on CPU")
        return self


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {loc or '<root>'}: {e['msg']}{got_s}")
    return "invalid config\n  " + "\n  ".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a table")
    node[keys[-1]] = value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. learner.steps=5")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    return key.strip(), value


def resolve_preset(path: str | os.PathLike) -> Path:
    """A path as given, or the name of a bundled preset (``tiny`` -> configs/tiny.toml)."""
    p = Path(path)
    if p.is_file():  # a directory of the same name (e.g. the ``tiny`` package) is not a config
        return p
    for cand in (PRESET_DIR / p, PRESET_DIR / f"{p}.toml"):
        if cand.is_file():
            return cand
    presets = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.toml")))
    raise ConfigError(f"config file not found: {path} (--config takes a TOML file or a preset: {presets})")


def _env_overrides(env: dict[str, str]) -> list[str]:
    """``DCRL_SET="learner.steps=50 learner.weight_transfer=gloo"``: overrides every dcrl process of a job
    applies (shell-style words; quote a value with spaces), before the command line's ``--set``."""
    import shlex

    raw = env.get("DCRL_SET", "").strip()
    if not raw:
        return []
    try:
        return shlex.split(raw)
    except ValueError as e:
        raise ConfigError(f"DCRL_SET: {e}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                env: dict[str, str] | None = None) -> DcrlConfig:
    """Load and validate a TOML config; ``overrides`` are ``section.key=value`` strings applied on top.

    Precedence, lowest first: the file, ``DCRL_SET`` (env), ``overrides`` (``--set``), then
    ``DCRL_REDIS_URL`` / ``DCRL_REDIS_PASSWORD`` (env)."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = resolve_preset(path)
        source = str(path)
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
    from_env = _env_overrides(env)
    if from_env:
        source += " (with DCRL_SET)"
    for item in from_env + list(overrides or []):
        _set_dotted(data, *_parse_override(item))
    if env.get("DCRL_REDIS_URL"):
        _set_dotted(data, "redis.url", env["DCRL_REDIS_URL"])
    if env.get("DCRL_REDIS_PASSWORD"):
        _set_dotted(data, "redis.password", env["DCRL_REDIS_PASSWORD"])
    try:
        return DcrlConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None


def add_config_args(parser) -> None:
    """The two config flags every dcrl command accepts."""
    parser.add_argument("--config", "-c", default="tiny",
                        help="TOML config file or bundled preset name (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set learner.steps=5 (repeatable)")


def config_from_args(args) -> DcrlConfig:
    """Load the config named on the command line or exit(2) with the message naming the bad field."""
    import sys

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
