"""The actor: many concurrent episodes on one vLLM engine, streamed to the replay queue as groups.

``python -m actors`` wires it (see ``actors/__main__.py``)::

    actor = Actor(cfg, actor_id, engine, codec, writer, control, subscriber)
    reason = await actor.run()      # until Control.stop, actor.max_groups, or request_stop() (SIGTERM)

Inside ``run``:

- admission: a group of G = ``actor.group_size`` episodes (one env seed) starts only when
  ``ControlPlane.try_admit()`` says the learner can take it (staleness cap); otherwise the actor idles
  ("waiting for learner" before any Control, "at staleness cap K=.." at capacity) and re-checks every
  ``actor.admission_poll_s``. Up to ``actor.concurrency`` episodes run at once.
- episodes: :func:`run_episode` plays the env turn by turn, each model turn one ``engine.generate`` on
  the whole context (prefix caching makes the resubmission cheap). A finished group goes to the
  GroupWriter at once.
- weights: a task listens for WeightsReady (ZMQ, plus the copy in Redis), verifies the file and has
  the engine reload it between two scheduler steps; every token keeps the version that sampled it.
- stop: Control.stop or max_groups -> no new groups, in-flight ones finish and are sent;
  request_stop() -> in-flight episodes are cancelled and their admission slots given back; only whole
  groups ever reach Redis.

Trajectory layout (protocol.Trajectory): ``obs_0 | turn_1 EOS | obs_1 | turn_2 EOS | ...``. Model tokens
have mask 1, their behaviour logprob and version; observation tokens mask 0, logprob 0, version -1.
``finish_reason`` of an episode:

- ``stop``: the env ended the episode after a model turn that closed with EOS (the normal end);
- ``length``: the env ended it, but the last model turn was cut at its token budget (no EOS);
- ``turn_limit``: ``actor.max_turns`` model turns and the env had not ended it (reward 0);
- ``token_limit``: the episode's token budget ran out first (reward 0): ``actor.max_tokens_per_episode``
  tokens after the first observation, or the model context ``model.max_seq_len``.
Truncated episodes are sent like any other: dropping them would bias the batch toward short episodes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import redis

from protocol.messages import Trajectory, TrajectoryGroup

if TYPE_CHECKING:
    from configs.schema import DcrlConfig

log = logging.getLogger("dcrl.actor")


# ---------------------------------------------------------------- identity


def resolve_actor_id(cli_id: str | None, environ: Mapping[str, str]) -> str:
    """``--actor-id``, else ``DCRL_ACTOR_ID``, else the Procfile process name that honcho
    (``HONCHO_PROCESS_NAME``) or foreman (``PS``) sets (``actor.2`` -> ``actor-2``), else ``actor-0``.

    Distinct ids matter: an actor's admission ledger (``held:<actor_id>``) is given back when the same
    id starts again, so two live actors sharing an id would free each other's slots."""
    if cli_id:
        return cli_id
    if environ.get("DCRL_ACTOR_ID"):
        return environ["DCRL_ACTOR_ID"]
    ps = environ.get("HONCHO_PROCESS_NAME") or environ.get("PS", "")
    if ps:
        return ps.replace(".", "-")
    return "actor-0"


def weights_behind_cap(engine_version: int, learner_version: int, max_staleness: int) -> bool:
    """True when a group started now would sample from weights staler than the cap allows:
    engine_version < V - K (the learner at version V, staleness cap K)."""
    return engine_version < learner_version - max_staleness


def replica_index(actor_id: str) -> int:
    """The trailing number of an actor id (``actor-3`` -> 3; none -> 0): picks the GPU and the engine seed."""
    m = re.search(r"(\d+)$", actor_id)
    return int(m.group(1)) if m else 0


def group_seed(base_seed: int, actor_id: str, session: str, n: int) -> int:
    """Env seed of this actor's ``n``-th group: a 31-bit hash of (actor.seed, actor id, session, n), so
    replicas and restarts of one replica (new ``session``) do not replay the same prompts."""
    h = hashlib.blake2b(f"{base_seed}:{actor_id}:{session}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 33


def groups_in_flight_limit(concurrency: int, group_size: int) -> int:
    """Groups admitted at once: ceil(concurrency / G) + 2. The two extra groups wait on the episode
    semaphore and fill slots as soon as episodes of the others end, so neither stragglers in one group
    nor the Redis round trips of the next admission leave the engine short of requests (measured on
    the tiny preset: 29 of 32 requests in flight on average with +2, 28.2 with +1; 30 for plain vLLM)."""
    return math.ceil(concurrency / group_size) + 2


# ---------------------------------------------------------------- episodes


@dataclass(frozen=True)
class EpisodeLimits:
    """Token and turn limits of one episode (from ``actor.*`` and ``model.max_seq_len``)."""

    max_tokens_per_turn: int
    max_tokens_per_episode: int
    max_turns: int
    max_seq_len: int

    @classmethod
    def from_config(cls, cfg: "DcrlConfig") -> "EpisodeLimits":
        a = cfg.actor
        return cls(a.max_tokens_per_turn, a.max_tokens_per_episode, a.max_turns, cfg.model.max_seq_len)


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

    def __init__(self, tokenizer, cache_size: int = 1 << 16):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self._rust = getattr(tokenizer, "backend_tokenizer", None)
        self._encode_cached = functools.lru_cache(maxsize=cache_size)(self._encode)

    @classmethod
    def from_pretrained(cls, path) -> "TextCodec":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

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


async def run_episode(engine, env, seed: int, codec: TextCodec, limits: EpisodeLimits, request_id: str) -> Trajectory:
    """Play one episode of ``env`` (reset with ``seed``) with ``engine``; see the module docstring for the
    layout and finish reasons. ``engine`` needs ``generate(context, max_tokens, request_id) -> TurnOutput``."""
    first = codec.encode(env.reset(seed))
    if len(first) >= limits.max_seq_len:
        raise ValueError(f"first observation is {len(first)} tokens: no room to generate within "
                         f"model.max_seq_len={limits.max_seq_len}")
    toks = TokenLog()
    toks.add_observation(first)
    prompt_len = len(first)
    reward, turns = 0.0, 0
    while True:
        if turns >= limits.max_turns:
            reason = "turn_limit"
            break
        budget = turn_budget(limits, len(toks), prompt_len)
        if budget <= 0:
            reason = "token_limit"
            break
        turn = await engine.generate(toks.ids, budget, f"{request_id}-t{turns}")
        toks.add_turn(turn.token_ids, turn.logprobs, turn.versions)
        turns += 1
        action_ids = turn.token_ids[:-1] if turn.stopped else turn.token_ids
        result = env.step(codec.decode(action_ids))
        if result.done:
            reward = float(result.reward)
            reason = "stop" if turn.stopped else "length"
            break
        obs = codec.encode(result.observation)
        room = episode_room(limits, len(toks), prompt_len)
        if len(obs) > room:
            toks.add_observation(obs[:max(room, 0)])
            reason = "token_limit"
            break
        toks.add_observation(obs)
    return toks.to_trajectory(reward=reward, finish_reason=reason, prompt_len=prompt_len)


# ---------------------------------------------------------------- blocking calls off the event loop


class IoThread:
    """One daemon thread running blocking calls (Redis through outages, hashing) for the asyncio loop.

    Calls run in submission order. Daemon, unlike asyncio's default executor: a call stuck retrying
    during a Redis outage must not keep the process alive after the actor has decided to exit.
    """

    def __init__(self, name: str):
        self._queue: list = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            self._queue.append((loop, fut, fn, args))
            self._cond.notify()
        return fut

    @staticmethod
    def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
        if fut.done():  # the awaiting side gave up (cancelled); nobody reads the result
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                loop, fut, fn, args = self._queue.pop(0)
            try:
                value, ok = fn(*args), True
            except BaseException as e:  # handed to the awaiting coroutine, which re-raises it
                value, ok = e, False
            try:
                loop.call_soon_threadsafe(self._settle, fut, ok, value)
            except RuntimeError:  # the loop closed (process exit) while this call ran: nobody waits for it
                pass


class LeaseKeeper:
    """Renews the actor's liveness lease (``ControlPlane.keep_lease``) every ``lease_s / 3`` from a thread of
    its own, so a busy event loop never lets it lapse; :meth:`stop` ends it and deletes the lease."""

    def __init__(self, control, actor_id: str, lease_s: float):
        self.control, self.actor_id, self.lease_s = control, actor_id, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dcrl-{actor_id}-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.control.keep_lease(self.actor_id, self.lease_s)
            except Exception as e:  # noqa: BLE001 - an outage must not kill the renewals; the next one retries
                log.warning("%s: lease renewal failed: %s", self.actor_id, e)
            if self._stop.wait(self.lease_s / 3):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.control.drop_lease(self.actor_id)
        except Exception as e:  # noqa: BLE001 - it expires by itself
            log.warning("%s: could not drop the lease: %s", self.actor_id, e)


class Stopping(Exception):
    """request_stop() was called while the actor waited on Redis."""


# ---------------------------------------------------------------- the actor


@dataclass
class GroupJob:
    """One admitted group: its task, and whether it was handed to the writer (then its slot is used)."""

    n: int
    seed: int
    group_id: str
    task: asyncio.Task | None = None
    handed_off: bool = False  # the group went to the writer: its slot is used, never released
    send: asyncio.Future | None = None  # the writer.send call (shielded: it completes even if cancelled)
    unheld: bool = False  # the held:<actor_id> note was taken back


@dataclass
class ActorStats:
    groups_sent: int = 0
    episodes_done: int = 0
    episodes_in_flight: int = 0
    refused_updates: int = 0
    weight_loads: list = field(default_factory=list)  # (version, seconds) per successful load


class Actor:
    """One actor process's loop; components are passed in (see the module docstring for the wiring)."""

    def __init__(self, cfg: "DcrlConfig", actor_id: str, engine, codec: TextCodec, writer, control,
                 subscriber=None):
        from actors.envs import make_env, resolve_env_class

        self.cfg = cfg
        self.actor_id = actor_id
        self.engine = engine
        self.codec = codec
        self.writer = writer
        self.control = control
        self.subscriber = subscriber
        self.limits = EpisodeLimits.from_config(cfg)
        self.session = secrets.token_hex(3)
        self.stats = ActorStats()
        self.last_control = None
        self.idle_reason: str | None = "starting"
        self.stop_reason: str | None = None
        self.refused: set[tuple[int, str]] = set()
        self.cache_dir = os.path.join(cfg.actor.weights_cache_dir, actor_id)
        make_env(cfg.env.name, cfg.env.kwargs)  # a bad env name or kwargs fails here, with its reason
        env_cls, env_kwargs = resolve_env_class(cfg.env.name), dict(cfg.env.kwargs)
        self._make_env = lambda: env_cls(**env_kwargs)  # checked once above; make_env's check costs ~0.1 ms
        self._held_field = f"held:{actor_id}"
        from buffer.connection import Retrier

        # The held:<actor_id> notes ride out outages like ControlPlane's own calls, but never give up:
        # they run in the control thread, and a stop request does not wait for them.
        self._ledger_retry = Retrier(cfg.redis, f"{actor_id} admissions", give_up_s=None)
        self._control_io = IoThread(f"dcrl-{actor_id}-control")
        self._writer_io = IoThread(f"dcrl-{actor_id}-writer")
        self._files_io = IoThread(f"dcrl-{actor_id}-weights")
        self._redis_wait_since: float | None = None
        self._stop: asyncio.Event | None = None
        self._stop_waiter: asyncio.Task | None = None
        self._episodes: asyncio.Semaphore | None = None
        self._late_admits: list[asyncio.Future] = []
        self._admitted_unstarted = 0  # admitted, group not started yet (weights catch-up in between)
        self._weights_lock: asyncio.Lock | None = None  # one reload at a time (weights loop vs admission)
        self._transfer = None  # actors.transfer.TransferClient, on the first collective WeightsReady

    # -------------------------------------------------------- public

    def request_stop(self) -> None:
        """Stop soon (signal handlers call this): cancel in-flight episodes, flush finished groups, return."""
        if self._stop is not None and not self._stop.is_set():
            log.info("%s: stop requested: cancelling %d in-flight episodes", self.actor_id,
                     self.stats.episodes_in_flight)
            self._stop.set()

    async def run(self) -> str:
        """Produce groups until Control.stop ("learner stop"), max_groups ("max_groups") or request_stop()
        ("signal"); returns which. Background failures (engine, weight reload) propagate from here."""
        self._stop = asyncio.Event()
        self._stop_waiter = asyncio.create_task(self._stop.wait())
        self._episodes = asyncio.Semaphore(self.cfg.actor.concurrency)
        background: list[asyncio.Task] = []
        lease = LeaseKeeper(self.control, self.actor_id, self.cfg.actor.lease_s)
        try:
            await self._give_back_predecessor_slots()
            await self._sync_weights(await self._redis(self.control.latest_weights))
            background = [asyncio.create_task(self._weights_loop(), name="weights"),
                          asyncio.create_task(self._status_loop(), name="status")]
            self.stop_reason = await self._produce(background)
        except Stopping:
            self.stop_reason = "signal"
        finally:
            for t in background:
                t.cancel()
            ended = await asyncio.gather(*background, return_exceptions=True)
            self._stop_waiter.cancel()
            await asyncio.to_thread(lease.stop)  # nothing is held any more (or we failed): let it go now
            if self._transfer is not None:
                self._transfer.close()
                self._transfer = None
        # A weight reload that failed while the actor drained must still fail the actor.
        failures = [e for e in ended if isinstance(e, Exception) and not isinstance(e, Stopping)]
        if failures:
            raise failures[0]
        log.info("%s: stopped (%s): %s", self.actor_id, self.stop_reason, self.status_line(0.0))
        return self.stop_reason

    def status_line(self, tokens_per_s: float) -> str:
        """The periodic one-line status: episodes in flight, groups sent, tokens/s, version, K, idle reason."""
        c = self.last_control
        k = f"K={c.max_staleness} V={c.version}" if c is not None else "K=? V=?"
        idle = self.idle_reason
        if self._redis_wait_since is not None and time.monotonic() - self._redis_wait_since > 2.0:
            idle = "waiting for redis"
        return (f"{self.actor_id}: {self.stats.episodes_in_flight} episodes in flight, "
                f"{self.stats.groups_sent} groups sent ({self.writer.held} held), {tokens_per_s:.0f} tok/s, "
                f"weights v{self.engine.version}, {k}, " + (f"idle: {idle}" if idle else "generating"))

    # -------------------------------------------------------- redis and other blocking calls

    async def _race(self, fut: asyncio.Future):
        """Await ``fut`` unless a stop is requested first (then Stopping; the call finishes unobserved)."""
        done, _ = await asyncio.wait({fut, self._stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        raise Stopping()

    async def _redis(self, fn: Callable[..., Any], *args: Any):
        """A control-plane call in the control thread. ControlPlane retries through outages there and gives
        up after ``redis.max_outage_s``; the actor then keeps waiting (like its writer, which never gives
        up): finished groups stay held and are delivered when Redis is back."""
        self._redis_wait_since = time.monotonic()
        try:
            while True:
                try:
                    return await self._race(self._control_io.submit(fn, *args))
                except redis.exceptions.ConnectionError as e:
                    log.warning("%s: %s; the actor keeps waiting for redis", self.actor_id, e)
                    await asyncio.sleep(self.cfg.redis.retry_backoff_max_s)
        finally:
            self._redis_wait_since = None

    def _note_held(self, delta: int) -> None:
        self._ledger_retry.call(self.control.client.hincrby, self.control.keys.control, self._held_field, delta)

    def _admit_blocking(self) -> bool:
        """try_admit, and on success note the slot under this actor's id (see _give_back_predecessor_slots)."""
        if not self.control.try_admit():
            return False
        self._note_held(1)
        return True

    def _unhold_blocking(self, release: bool) -> None:
        """A held slot ends: its group reached the writer (release=False) or was cancelled (release=True)."""
        if release:
            self.control.release()
        self._note_held(-1)

    def _give_back_blocking(self) -> int:
        client, key = self.control.client, self.control.keys.control
        held = int(self._ledger_retry.call(client.hget, key, self._held_field) or 0)
        for _ in range(held):
            self.control.release()
        self._ledger_retry.call(client.hdel, key, self._held_field)
        return held

    async def _give_back_predecessor_slots(self) -> None:
        """A replica restarted after a crash (same actor id) gives back the slots its predecessor had
        admitted and never delivered. They are counted in the control hash field ``held:<actor_id>``,
        which ControlPlane.reset() deletes with the hash for a fresh run. Actor ids must be unique."""
        n = await self._redis(self._give_back_blocking)
        if n:
            log.warning("%s: gave back %d admission slots held by a previous run of this actor id", self.actor_id, n)

    # -------------------------------------------------------- production

    async def _produce(self, background: list[asyncio.Task]) -> str:
        jobs: dict[asyncio.Task, GroupJob] = {}
        reason = "signal"
        try:
            reason = await self._admit_loop(jobs, background)
            if reason != "signal":
                self.idle_reason = f"draining ({reason})"
                await self._drain(jobs)
        except Stopping:
            reason = "signal"
        finally:  # also on a failure: finished groups still reach Redis, unfinished ones give their slots back
            await self._cancel(jobs)
            await self._flush()
        return reason

    async def _admit_loop(self, jobs: dict[asyncio.Task, GroupJob], background: list[asyncio.Task]) -> str:
        """Admit and start groups until a stop condition; returns it. Raises Stopping on request_stop()."""
        max_jobs = groups_in_flight_limit(self.cfg.actor.concurrency, self.cfg.actor.group_size)
        admitted = 0
        control_read_at = 0.0
        while True:
            for t in background:  # a dead weight task must kill the actor, not leave it serving stale weights
                if t.done():
                    t.result()
                    raise RuntimeError(f"background task {t.get_name()} ended unexpectedly")
            self._reap(jobs)
            if self._stop.is_set():
                return "signal"
            if self.cfg.actor.max_groups is not None and admitted >= self.cfg.actor.max_groups:
                return "max_groups"
            # try_admit is authoritative (capacity lives in Redis); the Control itself (stop flag, K for the
            # status line) is re-read at most every admission_poll_s, not once per admitted group.
            if self.last_control is None or time.monotonic() - control_read_at >= self.cfg.actor.admission_poll_s:
                self.last_control = await self._redis(self.control.read_control)
                control_read_at = time.monotonic()
            ctrl = self.last_control
            if ctrl is not None and ctrl.stop:
                return "learner stop"
            if len(jobs) < max_jobs:
                if ctrl is None:
                    self.idle_reason = "waiting for learner"
                elif await self._try_admit():
                    # Until the group task exists, _cancel gives this slot back (a stop or a failed reload
                    # during the catch-up would otherwise leave it admitted and never streamed).
                    self._admitted_unstarted += 1
                    await self._catch_up_weights()
                    self._admitted_unstarted -= 1
                    job = self._start_group(admitted)
                    jobs[job.task] = job
                    admitted += 1
                    self.idle_reason = None
                    continue  # fill every free slot before waiting
                else:
                    self.idle_reason = f"at staleness cap K={ctrl.max_staleness}"
            else:
                self.idle_reason = None
            await asyncio.wait({*jobs, self._stop_waiter, *background}, timeout=self.cfg.actor.admission_poll_s,
                               return_when=asyncio.FIRST_COMPLETED)

    async def _try_admit(self) -> bool:
        fut = self._control_io.submit(self._admit_blocking)
        try:
            return await self._race(fut)
        except Stopping:
            self._late_admits.append(fut)  # it may still admit: _cancel releases it then
            raise

    def _start_group(self, n: int) -> GroupJob:
        seed = group_seed(self.cfg.actor.seed, self.actor_id, self.session, n)
        job = GroupJob(n=n, seed=seed, group_id=f"{self.actor_id}-{self.session}-{n}")
        job.task = asyncio.create_task(self._group_job(job), name=job.group_id)
        return job

    async def _group_job(self, job: GroupJob) -> None:
        """Run the G episodes of one group; hand the whole group to the writer; note the slot as used."""
        async with asyncio.TaskGroup() as tg:  # one failing episode cancels its siblings and fails the group
            tasks = [tg.create_task(self._episode(job, i)) for i in range(self.cfg.actor.group_size)]
        group = TrajectoryGroup(group_id=job.group_id, actor_id=self.actor_id, engine=self.engine.tag,
                                env=self.cfg.env.name, seed=job.seed, trajectories=[t.result() for t in tasks],
                                created_at=time.time())
        job.handed_off = True  # from here the group counts as sent even if this task is cancelled
        job.send = self._writer_io.submit(self.writer.send, group)
        await asyncio.shield(job.send)
        self.stats.groups_sent += 1
        job.unheld = True
        await asyncio.shield(self._control_io.submit(self._unhold_blocking, False))

    async def _episode(self, job: GroupJob, i: int) -> Trajectory:
        async with self._episodes:
            self.stats.episodes_in_flight += 1
            try:
                traj = await run_episode(self.engine, self._make_env(), job.seed, self.codec, self.limits,
                                         f"{job.group_id}-e{i}")
            finally:
                self.stats.episodes_in_flight -= 1
        self.stats.episodes_done += 1
        return traj

    def _reap(self, jobs: dict[asyncio.Task, GroupJob]) -> None:
        """Forget finished group tasks; a failed one re-raises here (the actor dies with its error)."""
        for t in [t for t in jobs if t.done()]:
            del jobs[t]
            t.result()

    async def _drain(self, jobs: dict[asyncio.Task, GroupJob]) -> None:
        """Graceful end: let in-flight groups finish (up to actor.drain_timeout_s, or until a signal)."""
        deadline = time.monotonic() + self.cfg.actor.drain_timeout_s
        while jobs and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%s: %d groups still running after actor.drain_timeout_s; cancelling them",
                            self.actor_id, len(jobs))
                break
            await asyncio.wait({*jobs, self._stop_waiter}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            self._reap(jobs)

    async def _cancel(self, jobs: dict[asyncio.Task, GroupJob]) -> None:
        """Cancel what still runs and give back the slots of groups that never reached the writer."""
        for t in jobs:
            t.cancel()
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        calls: list[bool] = []  # one per slot still noted under held:<actor_id>: release it too?
        for job in jobs.values():
            if not job.handed_off:
                calls.append(True)
            elif not job.unheld:  # sent (or being sent) when cancelled: the slot is used, only the note goes
                await asyncio.wait({job.send}, timeout=30.0)
                calls.append(False)
        calls.extend([True] * self._admitted_unstarted)
        self._admitted_unstarted = 0
        for fut in self._late_admits:  # an admission that was in flight when the stop came
            done, _ = await asyncio.wait({fut}, timeout=5.0)
            if done and fut.exception() is None and fut.result():
                calls.append(True)
        for release in calls:
            fut = self._control_io.submit(self._unhold_blocking, release)
            done, _ = await asyncio.wait({fut}, timeout=10.0)
            if not done or fut.exception() is not None:
                log.warning("%s: redis did not answer (%s); admission slots not given back "
                            "(a restart of this actor id gives them back)", self.actor_id,
                            fut.exception() if done else "timeout")
                break
        if calls.count(True):
            log.info("%s: cancelled %d unfinished groups and gave back their admission slots",
                     self.actor_id, calls.count(True))
        if errors:
            raise errors[0]

    async def _flush(self) -> None:
        """Wait until the writer has delivered every finished group (bounded; the writer logs what is left)."""
        fut = self._writer_io.submit(self.writer.flush, 30.0)
        held = await fut
        if held:
            log.warning("%s: %d finished groups still held (redis unreachable)", self.actor_id, held)

    # -------------------------------------------------------- weights

    async def _weights_loop(self) -> None:
        """Follow the learner's announcements (ZMQ) and its copy in Redis; load whatever is newer."""
        from actors.weights import newest

        poll = self.cfg.actor.weights_poll_s
        while True:
            heard = await self.subscriber.latest(poll) if self.subscriber is not None else None
            if self.subscriber is None:
                await asyncio.sleep(poll)
            stored = await self._redis(self.control.latest_weights)
            await self._sync_weights(newest(heard, stored))

    async def _catch_up_weights(self) -> None:
        """Before an admitted group starts: if the engine's weights are older than the staleness cap allows
        (engine version < V - K), load the newest published weights first.

        The learner publishes weights V before it raises capacity in the control hash, but the announcement
        and the capacity reach this actor by different paths; without this check a synchronous run (K = 0)
        could start a group on V - 1 when the new capacity is seen before the WeightsReady."""
        ctrl = self.last_control = await self._redis(self.control.read_control)
        if ctrl is None or not weights_behind_cap(self.engine.version, ctrl.version, ctrl.max_staleness):
            return
        stored = await self._redis(self.control.latest_weights)
        if stored is not None:
            await self._sync_weights(stored)

    async def _sync_weights(self, w) -> None:
        """Load ``w`` if it is newer than the engine's weights and not refused before; refuse it (one log
        line, current weights kept) if no file with its sha256 can be had."""
        if self._weights_lock is None:
            self._weights_lock = asyncio.Lock()
        async with self._weights_lock:
            await self._sync_weights_locked(w)

    async def _sync_weights_locked(self, w) -> None:
        from actors.weights import WeightsRefused, prune_cache, refusal_key, resolve_weights, should_load

        if not should_load(w, self.engine.version, self.refused):
            return
        if w.transport != "files":
            await self._pull_weights(w)
            return
        a = self.cfg.actor
        try:
            path = await self._race(self._files_io.submit(
                lambda: resolve_weights(w, self.cache_dir, chunk_bytes=a.weights_fetch_chunk_mb << 20,
                                        timeout_s=a.weights_fetch_timeout_s)))
        except WeightsRefused as e:
            self.refused.add(refusal_key(w))
            self.stats.refused_updates += 1
            log.warning("%s: REFUSED weights v%d (keeping v%d): %s", self.actor_id, w.version,
                        self.engine.version, e)
            return
        previous = self.engine.version
        seconds = await self.engine.load_weights(path, w.version)
        self.stats.weight_loads.append((w.version, seconds))
        log.info("%s: loaded weights v%d from %s (pause -> reload -> resume %.0f ms)", self.actor_id, w.version,
                 path, 1000 * seconds)
        await self._files_io.submit(prune_cache, self.cache_dir, {w.version, previous})

    async def _pull_weights(self, w) -> None:
        """``w`` is announced over a collective transport: have the learner broadcast its newest weights
        into the engine (``actors.transfer``). A refusal (learner busy restarting, no answer) is logged and
        retried at the next announcement or poll; a transfer that fails half-way raises (the engine is
        left paused rather than serving a half-loaded model)."""
        from actors.transfer import TransferClient, TransferRefused

        configured = self.cfg.learner.weight_transfer
        if w.transport != configured:
            raise RuntimeError(f"the learner publishes weights v{w.version} over {w.transport!r}, but this actor "
                               f"runs with learner.weight_transfer={configured!r}: start both with the same config")
        if self._transfer is None or self._transfer.endpoint != w.url:
            if self._transfer is not None:
                self._transfer.close()
            self._transfer = TransferClient(w.url, self.actor_id, timeout_s=self.cfg.actor.weights_fetch_timeout_s,
                                            world_size=self.engine.world_size)
        pull = asyncio.ensure_future(self._transfer.pull_into(self.engine, w.version))
        try:
            version, seconds = await self._race(pull)
        except Stopping:  # e.g. waiting for a learner that is gone: stopping must not wait for the timeout
            pull.cancel()
            raise
        except TransferRefused as e:
            self.stats.refused_updates += 1
            log.warning("%s: weights v%d not received (keeping v%d, will retry): %s", self.actor_id, w.version,
                        self.engine.version, e)
            return
        self.stats.weight_loads.append((version, seconds))
        log.info("%s: received weights v%d over %s (pause -> receive -> resume %.0f ms)", self.actor_id, version,
                 w.transport, 1000 * seconds)

    # -------------------------------------------------------- status

    async def _status_loop(self) -> None:
        interval = self.cfg.actor.status_interval_s
        last_tokens, last_t = self.engine.generated_tokens, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now, tokens = time.monotonic(), self.engine.generated_tokens
            log.info(self.status_line((tokens - last_tokens) / max(now - last_t, 1e-9)))
            last_tokens, last_t = tokens, now
