"""The actor: many concurrent episodes on one vLLM engine, streamed to the replay queue as groups.

``python -m actors`` wires it (see ``actors/__main__.py``)::

    actor = Actor(cfg, actor_id, engine, codec, writer, control, subscriber)
    reason = await actor.run()      # until Control.stop, actor.max_groups, or request_stop() (SIGTERM)

Inside ``run`` (this module is the admit loop; the other ideas live beside it):

- admission: a group of G = ``actor.group_size`` episodes (one env seed) starts only when the admission
  ledger (``ControlPlane.admit``, one atomic script in ``buffer``) issues it a slot: the learner can take
  it within the staleness cap. Otherwise the actor idles ("waiting for learner" before any Control,
  "at staleness cap K=.." at capacity) and re-checks every ``actor.admission_poll_s``. Up to
  ``actor.concurrency`` episodes run at once.
- episodes: ``envs.episode.run_episode`` plays the env turn by turn, each model turn one
  ``engine.generate`` on the whole context (prefix caching makes the resubmission cheap). A finished
  group goes to the GroupWriter with its slot; the write settles the slot in the same script. An
  environment fault (``envs.guard.EnvFault``: reset/step raised, returned the wrong type or hung past
  ``env.step_timeout_s``) drops the episode's whole group and gives its slot back; the actor goes on,
  counting it (``ActorReport.env_errors``) and logging each kind of fault once.
- weights: ``actors.weight_sync.WeightSync`` listens for WeightsReady (ZMQ, plus the copy in Redis),
  verifies the file and has the engine reload it between two scheduler steps; every token keeps the
  version that sampled it.
- blocking calls (Redis, hashing, fetches) run in ``actors.io`` threads, raced against a stop request.
- stop: Control.stop or max_groups -> no new groups, in-flight ones finish and are sent;
  request_stop() -> in-flight episodes are cancelled and their slots cancelled in the ledger; only whole
  groups ever reach Redis. A killed actor's slots come back when it restarts under the same id, or when
  its lease lapses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import redis

from actors.io import IoThread, LeaseKeeper, Stopping
from actors.weight_sync import WeightSync
from buffer.control import Admissions
from envs import env_factory, resolve_env_class
from envs.episode import EpisodeLimits, EpisodeTimings, TextCodec, run_episode
from envs.guard import EnvFault
from protocol.messages import ActorReport, Trajectory, TrajectoryGroup

if TYPE_CHECKING:
    from configs.schema import DcrlConfig

log = logging.getLogger("dcrl.actor")


# ---------------------------------------------------------------- identity


def resolve_actor_id(cli_id: str | None, environ: Mapping[str, str]) -> str:
    """``--actor-id``, else ``DCRL_ACTOR_ID``, else the Procfile process name that honcho
    (``HONCHO_PROCESS_NAME``) or foreman (``PS``) sets (``actor.2`` -> ``actor-2``), else ``actor-0``.

    Distinct ids matter: the slots an actor id holds in the admission ledger are given back when the
    same id starts again, so two live actors sharing an id would free each other's slots."""
    if cli_id:
        return cli_id
    if environ.get("DCRL_ACTOR_ID"):
        return environ["DCRL_ACTOR_ID"]
    ps = environ.get("HONCHO_PROCESS_NAME") or environ.get("PS", "")
    if ps:
        return ps.replace(".", "-")
    return "actor-0"


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
    """Groups admitted at once: n = ceil(concurrency / G), plus max(2, ceil(n / 2)). The extra groups wait on the
    episode semaphore and fill places as soon as episodes of the others end, so neither stragglers in one group
    nor the Redis round trip of the next admission leave the engine short of requests. Measured with the engine
    core in the actor's process (bench/rollout.py, small preset, one request per turn, 64 episodes in flight):
    51-61 requests per engine step and 0.83-0.89 of plain vLLM's tokens/s with +2; 0.91 with +4; 0.93 with +8."""
    n = math.ceil(concurrency / group_size)
    return n + max(2, math.ceil(n / 2))


# ---------------------------------------------------------------- the actor


@dataclass
class GroupJob:
    """One admitted group: its ledger slot, its task, and whether it was handed to the writer (from then on
    the writer settles the slot when it writes the group)."""

    n: int
    seed: int
    group_id: str
    slot: str
    task: asyncio.Task | None = None
    handed_off: bool = False


async def slots_admitted_late(futs: list[asyncio.Future], timeout_s: float = 5.0) -> list[str]:
    """The slots that ``ControlPlane.admit_many`` calls overtaken by a stop went on to admit (each future's
    result starts with the tuple of slots): the caller must give them back. A call still unanswered after
    ``timeout_s`` (Redis down) is left to the lease: its slots come back when this actor id restarts or lapses."""
    slots = []
    for fut in futs:
        done, _ = await asyncio.wait({fut}, timeout=timeout_s)
        if done and fut.exception() is None:
            slots.extend(fut.result()[0])
    return slots


@dataclass
class ActorStats:
    groups_sent: int = 0
    episodes_done: int = 0
    episodes_in_flight: int = 0
    refused_updates: int = 0
    weight_loads: list = field(default_factory=list)  # (version, seconds) per successful load
    deferred_loads: int = 0  # newer weights announced but not loaded yet: actor.reload_budget spent
    episodes: EpisodeTimings = field(default_factory=EpisodeTimings)  # env, tokenizer, generate seconds
    redis_s: float = 0.0  # awaiting control-plane calls
    idle_s: dict = field(default_factory=dict)  # no group admitted although a slot was free, by reason
    env_errors: int = 0  # episodes ended by an environment fault (their groups dropped)
    env_fault_kinds: set = field(default_factory=set)  # (call, kind) of the faults logged so far
    episode_turns: Counter = field(default_factory=Counter)  # episodes of the groups sent, by model turns
    episode_tokens: Counter = field(default_factory=Counter)  # the same, by tokens


def idle_kind(reason: str) -> str:
    """The key an idle reason is accounted under: "at staleness cap K=2" -> "staleness_cap"."""
    return reason.split(" K=")[0].removeprefix("at ").replace(" ", "_")


class Actor:
    """One actor process's loop; components are passed in (see the module docstring for the wiring)."""

    def __init__(self, cfg: "DcrlConfig", actor_id: str, engine, codec: TextCodec, writer, control,
                 subscriber=None):
        self.cfg = cfg
        self.actor_id = actor_id
        self.engine = engine
        self.codec = codec
        self.writer = writer
        self.control = control
        self.limits = EpisodeLimits.from_config(cfg)
        self.session = secrets.token_hex(3)
        self.stats = ActorStats()
        self.last_control = None
        self.idle_reason: str | None = "starting"
        self.stop_reason: str | None = None
        self._make_env = env_factory(cfg.env.name, cfg.env.kwargs)  # a bad env name or kwargs fails here
        # An indexed environment (a dataset) is reset with the run's shared draw counter: prompts without
        # replacement per epoch across actors. Others get a seed from (actor.seed, actor id, session, n).
        self._indexed = bool(getattr(resolve_env_class(cfg.env.name), "indexed", False))
        self._control_io = IoThread(f"dcrl-{actor_id}-control")
        # Blocks in ControlPlane.wait_control while the actor is at the staleness cap: a thread of its own, so
        # that the control thread's calls (weight announcements' reads, reports) never queue behind it.
        self._wakeup_io = IoThread(f"dcrl-{actor_id}-wakeup")
        self._wakeup: asyncio.Future | None = None  # the wait_control call in flight
        # GroupWriter calls that may block: send() once the writer holds redis.max_held_groups, flush() at stop.
        self._writer_io = IoThread(f"dcrl-{actor_id}-writer")
        self.weights = WeightSync(cfg, actor_id, engine, control, subscriber, self.stats,
                                  redis=self._redis, race=self._race)
        self._redis_wait_since: float | None = None
        self._stop: asyncio.Event | None = None
        self._stop_waiter: asyncio.Task | None = None
        self._episodes: asyncio.Semaphore | None = None
        self._late_admits: list[asyncio.Future] = []  # admit calls a stop overtook: (slot | None, why, ctrl)
        self._unstarted: list[str] = []  # slots admitted whose group has not started (weights catch-up)
        self._started = time.monotonic()  # reset when run() starts producing (ActorReport.wall_s)
        self._stop_deadline: float | None = None  # set by request_stop(): the end of actor.stop_timeout_s

    # -------------------------------------------------------- public

    def request_stop(self) -> None:
        """Stop soon (signal handlers call this): cancel in-flight episodes, flush finished groups, return."""
        if self._stop is not None and not self._stop.is_set():
            log.info("%s: stop requested: cancelling %d in-flight episodes", self.actor_id,
                     self.stats.episodes_in_flight)
            self._stop_deadline = time.monotonic() + self.cfg.actor.stop_timeout_s
            self._stop.set()

    def stop_budget(self, default_s: float) -> float:
        """How long a shutdown step may wait for Redis: ``default_s``, or after a stop signal what is left of
        ``actor.stop_timeout_s`` (at least 0.1 s, so a step that Redis answers at once still runs)."""
        if self._stop_deadline is None:
            return default_s
        return min(default_s, max(self._stop_deadline - time.monotonic(), 0.1))

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
            await self.weights.sync(await self._redis(self.control.latest_weights))
            self._started = time.monotonic()
            background = [asyncio.create_task(self.weights.loop(), name="weights"),
                          asyncio.create_task(self._status_loop(), name="status"),
                          asyncio.create_task(self._report_loop(), name="report")]
            self.stop_reason = await self._produce(background)
            await self._redis(self.control.report_actor, self.report())  # final counts: groups sent while draining
        except Stopping:
            self.stop_reason = "signal"
        finally:
            for t in background:
                t.cancel()
            ended = await asyncio.gather(*background, return_exceptions=True)
            self._stop_waiter.cancel()
            # Nothing is held any more (or we failed): let it go now (after a stop signal, only if Redis answers
            # within what is left of actor.stop_timeout_s; otherwise it lapses by itself).
            await asyncio.to_thread(lease.stop, self.stop_budget(10.0))
            self.weights.close()
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
                f"weights v{self.engine.version} ({len(self.stats.weight_loads)} loads, {self.stats.deferred_loads} "
                f"deferred by actor.reload_budget), {k}, " + (f"idle: {idle}" if idle else "generating"))

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
        self._redis_wait_since = t0 = time.monotonic()
        try:
            while True:
                try:
                    return await self._race(self._control_io.submit(fn, *args))
                except redis.exceptions.ConnectionError as e:
                    log.warning("%s: %s; the actor keeps waiting for redis", self.actor_id, e)
                    await asyncio.sleep(self.cfg.redis.retry_backoff_max_s)
        finally:
            self._redis_wait_since = None
            self.stats.redis_s += time.monotonic() - t0

    async def _give_back_predecessor_slots(self) -> None:
        """A replica restarted after a crash (same actor id) gives back the slots its predecessor had
        admitted and never delivered (``ControlPlane.give_back``). Actor ids must be unique."""
        n = await self._redis(self.control.give_back, self.actor_id)
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
        event: str | None = None  # control event of the last refused admission (None: no control seen yet)
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
            # admit is authoritative (capacity lives in Redis); the Control itself (stop flag, K for the
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
                else:
                    # Every free place at once, in one round trip: the groups start together (one step of the
                    # engine sees them all) instead of one per reply.
                    room = max_jobs - len(jobs)
                    if self.cfg.actor.max_groups is not None:
                        room = min(room, self.cfg.actor.max_groups - admitted)
                    a = await self._admit(room)
                    if not a.slots and a.why == "weights":
                        # Capacity is free, but only for newer weights than the engine's: load them now. If
                        # none can be had (none published yet, or refused), admit under the learner's cap
                        # rather than stall the run (the read side still bounds the lag).
                        if await self.weights.refresh():
                            continue
                        a = await self._admit(room, weights_bound=False)
                    if a.control is not None:  # the Control admission was decided under: the freshest there is
                        self.last_control, control_read_at = a.control, time.monotonic()
                    event = a.event
                    if a.slots:
                        # Until its group task exists, _cancel gives a slot back (a stop or a failed reload
                        # during the catch-up would otherwise leave it admitted and never streamed).
                        self._unstarted.extend(a.slots)
                        self.last_control = await self.weights.catch_up(a.control)
                        for slot in a.slots:
                            seed = (await self._redis(self.control.next_draw) if self._indexed else
                                    group_seed(self.cfg.actor.seed, self.actor_id, self.session, admitted))
                            self._unstarted.remove(slot)
                            job = self._start_group(admitted, slot, seed)
                            jobs[job.task] = job
                            admitted += 1
                        self.idle_reason = None
                        continue  # fill every free slot before waiting
                    self.idle_reason = f"at staleness cap K={self.last_control.max_staleness}"
            else:
                self.idle_reason = None
            idle, t0 = self.idle_reason, time.monotonic()
            wake = {*jobs, self._stop_waiter, *background}
            if idle is not None:  # at the cap or no learner yet: also wake the moment a newer Control is written
                wake |= self._control_wakeup(event)
            await asyncio.wait(wake, timeout=self.cfg.actor.admission_poll_s, return_when=asyncio.FIRST_COMPLETED)
            if idle is not None:
                kind = idle_kind(idle)
                self.stats.idle_s[kind] = self.stats.idle_s.get(kind, 0.0) + time.monotonic() - t0

    def _control_wakeup(self, event: str | None) -> set[asyncio.Future]:
        """A future that completes when a Control newer than ``event``'s is written (``ControlPlane.wait_control``,
        blocking for at most ``actor.admission_poll_s``); the one still waiting is reused (it was started after an
        event no newer than ``event``, so it returns at the next Control too). Empty once a wait failed (Redis
        down: the admission's own retries take over, and the loop polls)."""
        if self._wakeup is not None:
            if not self._wakeup.done():
                return {self._wakeup}
            failed = not self._wakeup.cancelled() and self._wakeup.exception() is not None
            self._wakeup = None
            if failed:
                return set()
        self._wakeup = self._wakeup_io.submit(self.control.wait_control, event,
                                              int(self.cfg.actor.admission_poll_s * 1000))
        return {self._wakeup}

    async def _admit(self, n: int, weights_bound: bool = True) -> Admissions:
        """Up to ``n`` slots from the admission ledger for groups sampled with the engine's weights, and why not
        more, with the Control the ledger decided under: ``ControlPlane.admit_many``. With ``weights_bound`` the
        capacity is that of the engine's weights, so that a group is trained at most K versions after them
        (``buffer.admission.weights_capacity``); without, the learner's."""
        fut = self._control_io.submit(self.control.admit_many, self.actor_id,
                                      self.engine.version if weights_bound else None, n)
        try:
            return await self._race(fut)
        except Stopping:
            self._late_admits.append(fut)  # it may still admit: _cancel gives the slot back then
            raise

    def _start_group(self, n: int, slot: str, seed: int) -> GroupJob:
        job = GroupJob(n=n, seed=seed, group_id=f"{self.actor_id}-{self.session}-{n}", slot=slot)
        job.task = asyncio.create_task(self._group_job(job), name=job.group_id)
        return job

    async def _group_job(self, job: GroupJob) -> None:
        """Run the G episodes of one group and hand the whole group, with its slot, to the writer; a group
        whose environment failed is dropped instead (:meth:`_drop_group`)."""
        faults: list[EnvFault] = []
        try:
            async with asyncio.TaskGroup() as tg:  # one failing episode cancels its siblings and fails the group
                tasks = [tg.create_task(self._episode(job, i)) for i in range(self.cfg.actor.group_size)]
        except* EnvFault as eg:  # any other failure still propagates: it kills the actor
            faults = list(eg.exceptions)
        if faults:
            await self._drop_group(job, faults)
            return
        group = TrajectoryGroup(group_id=job.group_id, actor_id=self.actor_id, engine=self.engine.tag,
                                env=self.cfg.env.name, seed=job.seed, trajectories=[t.result() for t in tasks],
                                created_at=time.time())
        job.handed_off = True  # from here the writer owns the slot, even if this task is cancelled
        if not self.writer.try_send(group, job.slot):  # the writer holds max_held_groups: wait in a thread
            await asyncio.shield(self._writer_io.submit(self.writer.send, group, job.slot))
        self.stats.groups_sent += 1
        self.stats.episode_turns.update(len(t.turn_starts) for t in group.trajectories)
        self.stats.episode_tokens.update(len(t) for t in group.trajectories)

    async def _drop_group(self, job: GroupJob, faults: list[EnvFault]) -> None:
        """A group whose environment failed: count the faults, log each kind once (a broken environment fails
        the same way in every episode), and give the group's slot back so that another group replaces it.
        The group is not sent: its other episodes were cancelled, and a partial group would skew GRPO's
        per-group advantages."""
        self.stats.env_errors += len(faults)
        for f in faults:
            if f.key not in self.stats.env_fault_kinds:
                self.stats.env_fault_kinds.add(f.key)
                log.warning("%s: env %r %s; the episode's group is dropped and the actor goes on (logged once per "
                            "kind of fault; all are counted in episode/env_errors)", self.actor_id, self.cfg.env.name,
                            f)
        try:  # not raced against a stop: if this task is cancelled meanwhile, _cancel cancels the slot again
            await asyncio.shield(self._control_io.submit(self.control.cancel, job.slot))
        except redis.exceptions.ConnectionError as e:
            log.warning("%s: could not give back the slot of dropped group %s (%s); it comes back when this "
                        "actor stops or restarts", self.actor_id, job.group_id, e)

    async def _episode(self, job: GroupJob, i: int) -> Trajectory:
        async with self._episodes:
            self.stats.episodes_in_flight += 1
            try:
                traj = await run_episode(self.engine, self._make_env(), job.seed, self.codec, self.limits,
                                         f"{job.group_id}-e{i}", self.stats.episodes)
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
        """Cancel what still runs and cancel the slots of groups that never reached the writer."""
        for t in jobs:
            t.cancel()
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        slots = [job.slot for job in jobs.values() if not job.handed_off] + self._unstarted
        self._unstarted = []
        slots += await slots_admitted_late(self._late_admits, self.stop_budget(5.0))
        self._late_admits = []
        for slot in slots:
            fut = self._control_io.submit(self.control.cancel, slot)
            done, _ = await asyncio.wait({fut}, timeout=self.stop_budget(10.0))
            if not done or fut.exception() is not None:
                log.warning("%s: redis did not answer (%s); admission slots not given back "
                            "(a restart of this actor id, or its lease lapsing, gives them back)", self.actor_id,
                            fut.exception() if done else "timeout")
                break
        if slots:
            log.info("%s: cancelled %d unfinished groups and gave back their admission slots",
                     self.actor_id, len(slots))
        if errors:
            raise errors[0]

    async def _flush(self) -> None:
        """Wait until the writer has delivered every finished group (bounded, after a stop signal by what is left of
        ``actor.stop_timeout_s``; the writer logs what is left)."""
        fut = self._writer_io.submit(self.writer.flush, self.stop_budget(30.0))
        held = await fut
        if held:
            log.warning("%s: %d finished groups still held (redis unreachable)", self.actor_id, held)

    # -------------------------------------------------------- status

    async def _status_loop(self) -> None:
        interval = self.cfg.actor.status_interval_s
        last_tokens, last_t = self.engine.generated_tokens, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now, tokens = time.monotonic(), self.engine.generated_tokens
            log.info(self.status_line((tokens - last_tokens) / max(now - last_t, 1e-9)))
            last_tokens, last_t = tokens, now

    def report(self) -> ActorReport:
        """Where this actor's time went since it started producing (cumulative; see protocol.ActorReport)."""
        e = self.stats.episodes
        return ActorReport(actor_id=self.actor_id, wall_s=time.monotonic() - self._started,
                           engine_busy_s=self.engine.busy_s, env_s=e.env_s, tokenize_s=e.tokenize_s,
                           generate_s=e.generate_s, redis_s=self.stats.redis_s,
                           reload_s=sum(s for _, s in self.stats.weight_loads), idle_s=dict(self.stats.idle_s),
                           generated_tokens=self.engine.generated_tokens, groups_sent=self.stats.groups_sent,
                           env_errors=self.stats.env_errors, episode_turns=dict(self.stats.episode_turns),
                           episode_tokens=dict(self.stats.episode_tokens))

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.actor.report_interval_s)
            await self._redis(self.control.report_actor, self.report())
