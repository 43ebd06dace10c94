"""The control plane in Redis: the learner's Control and latest WeightsReady, and the admission ledger.

Learner:  write_control(Control) after every step; set_weights(WeightsReady) after every publish;
          reset() once at the start of a fresh (not resumed) run; reclaim_expired() while it waits for data.
Actors:   give_back(actor_id) once at start (slots a predecessor under the same id held when it died);
          loop { c = read_control(); if c.stop: drain; slot = admit(actor_id); if slot: run a group, then
          writer.send(group, slot) (or cancel(slot) if the group never reaches the writer) };
          latest_weights() when joining late; keep_lease() every few seconds (from a thread of its own)
          while they may hold admitted slots.
Tools:    counters() and held() for ``python -m buffer stats`` and tests; live_actors() / describe_actors()
          (who holds a lease, for how long, when it last reported) for the learner's wait messages.

The ledger (see :mod:`buffer.admission` for the scripts): an admission is a slot token, and every change of
its state is one atomic Lua script, so that a process killed between any two steps leaks no slot and
mints none:

    admitted -> held         admit()            ADMIT_LUA      INCR produced, HSET held token actor
    held -> delivered        GroupWriter.send   DELIVER_LUA    XADD traj {data, slot}, HDEL held token
                                                               (INCR produced if it was not held)
    held -> cancelled        cancel(slot)       CANCEL_LUA     HDEL held token, DECR produced if it was held
    held -> given back       give_back(actor)   GIVE_BACK_LUA  HDEL the actor's tokens, DECRBY produced
                             reclaim_expired()  RECLAIM_LUA    same, for actors whose lease key expired
    delivered -> consumed    GroupReader.ack    ACK_LUA        HDEL delivered ids, INCRBY consumed_admitted
    delivered -> dead        GroupReader        DEAD_LETTER_LUA  DECR produced once per admitted entry

Invariant: ``produced == held() + admitted entries written and not dead-lettered``; with no reader,
``produced == XLEN traj + held()``. As an identity of counters (``counters()["reconciles"]``):
``produced == consumed_admitted + queued + held``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import NamedTuple

from configs.schema import RedisConfig
from protocol import ActorReport, Control, ProtocolError, WeightsReady, decode, encode

from buffer.admission import (ADMIT_LUA, CANCEL_LUA, GIVE_BACK_LUA, RECLAIM_LUA, WRITE_CONTROL_LUA,
                              admission_capacity, ledger_reconciles)
from buffer.connection import SOCKET_TIMEOUT_S, Retrier, connect, redact_url
from buffer.keys import Keys

# An actor's report and the Redis server's clock at that moment, in one step: KEYS[1] the actors hash, KEYS[2]
# the actors_seen hash; ARGV[1] actor id, ARGV[2] encode(ActorReport). The server's clock (not the actor's)
# so that the learner, on another machine, measures the report's age on the same clock.
REPORT_LUA = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
return 1
"""

# A counter raised to ARGV[1] if it is lower, in one step (never lowered); returns the value in force.
RAISE_TO_LUA = """
local c = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = tonumber(ARGV[1])
if c < n then redis.call('SET', KEYS[1], n) return n end
return c
"""


class Admissions(NamedTuple):
    """One admission attempt for several groups (``ControlPlane.admit_many``): the slots admitted (in order; fewer
    than asked, maybe none), why not more ("capacity", "weights", "no control"; "" when all were), the Control it
    was decided under and the id of that Control's entry in the control-events stream (both None before the first
    write_control)."""

    slots: tuple[str, ...]
    why: str
    control: Control | None
    event: str | None


class Admission(NamedTuple):
    """One admission attempt (``ControlPlane.admit_with_control``): the slot (None: not admitted), why not
    ("capacity", "weights", "no control"; "" when admitted), the Control it was decided under and the id of
    that Control's entry in the control-events stream (both None before the first write_control)."""

    slot: str | None
    why: str
    control: Control | None
    event: str | None


@dataclass(frozen=True)
class ActorLiveness:
    """One actor that holds a lease now (``ControlPlane.live_actors``)."""

    actor_id: str
    lease_left_s: float  # until the lease lapses unless renewed (every actor.lease_s / 3)
    report_age_s: float | None  # since its latest ActorReport (None: none yet, e.g. still starting vLLM)
    held: int  # admitted slots it holds (groups admitted, not yet sent)

    def describe(self) -> str:
        report = "no report yet" if self.report_age_s is None else f"last report {self.report_age_s:.0f} s ago"
        held = f", {self.held} admitted group{'s' if self.held != 1 else ''} not yet sent" if self.held else ""
        return f"{self.actor_id} (lease {self.lease_left_s:.0f} s left, {report}{held})"


def describe_live_actors(actors: list[ActorLiveness], cfg: RedisConfig) -> str:
    """One phrase for a message: who is alive under ``cfg.prefix``, or what to check when nobody is."""
    if not actors:
        return (f"no actor holds a lease under redis.prefix {cfg.prefix!r} at {redact_url(cfg.url)}: start one "
                "(python -m actors) or check that it uses the same redis.url and redis.prefix")
    return f"live actors: {', '.join(a.describe() for a in actors)}"


def control_capacity(c: Control) -> int:
    """Capacity stored beside a Control: ``admission_capacity(V, K, batch_groups)``, or 0 once ``stop`` is set
    (a finished learner admits no new work; actors drain what they have)."""
    return 0 if c.stop else admission_capacity(c.version, c.max_staleness, c.batch_groups)


class ControlPlane:
    """Control hash and counters of one run (``cfg.prefix``). Thread-safe (redis-py pools connections)."""

    def __init__(self, cfg: RedisConfig, who: str = "control"):
        self.cfg = cfg
        self.keys = Keys(cfg.prefix)
        self.client = connect(cfg, who)
        self._retry = Retrier(cfg, who, give_up_s=cfg.max_outage_s)
        self._admit = self.client.register_script(ADMIT_LUA)
        self._cancel = self.client.register_script(CANCEL_LUA)
        self._give_back = self.client.register_script(GIVE_BACK_LUA)
        self._reclaim = self.client.register_script(RECLAIM_LUA)
        self._report = self.client.register_script(REPORT_LUA)
        self._restore_draws = self.client.register_script(RAISE_TO_LUA)
        self._write_control = self.client.register_script(WRITE_CONTROL_LUA)

    def read_control(self) -> Control | None:
        """The learner's last Control, or None before the first write_control."""
        raw = self._retry.call(self.client.hget, self.keys.control, "control")
        return None if raw is None else decode(raw, Control)

    def write_control(self, c: Control) -> str:
        """Store ``c`` and its admission capacity in one step, so admit never sees one without the other, and
        announce it on the control-events stream (actors blocked in :meth:`wait_control` wake). Returns the
        event id."""
        ev = self._retry.call(self._write_control, keys=[self.keys.control, self.keys.control_events],
                              args=[encode(c), control_capacity(c), c.version, c.batch_groups])
        return ev.decode() if isinstance(ev, bytes) else str(ev)

    def wait_control(self, after_event: str | None, timeout_ms: int) -> bool:
        """Block until a Control newer than the one of event ``after_event`` is written (None: any Control), at
        most ``timeout_ms``; True if one was. One XREAD BLOCK on the control-events stream: an actor at the
        staleness cap wakes the moment the learner raises the capacity instead of at its next poll."""
        # Capped below the socket timeout: a longer BLOCK would look like an outage.
        block = max(1, min(int(timeout_ms), int((SOCKET_TIMEOUT_S - 5.0) * 1000)))
        reply = self._retry.call(self.client.xread, {self.keys.control_events: after_event or "0-0"}, count=1,
                                 block=block)
        return bool(reply)

    def set_weights(self, w: WeightsReady) -> None:
        """Store the latest WeightsReady for actors that join after its ZMQ announcement."""
        self._retry.call(self.client.hset, self.keys.control, "weights", encode(w))

    def latest_weights(self) -> WeightsReady | None:
        raw = self._retry.call(self.client.hget, self.keys.control, "weights")
        return None if raw is None else decode(raw, WeightsReady)

    def admit(self, actor_id: str, weights_version: int | None = None) -> str | None:
        """Atomically: if produced < capacity, INCR produced and hold a new slot token for ``actor_id``; returns
        the token (pass it to ``GroupWriter.send`` or ``cancel``), or None at capacity or before any control.
        With ``weights_version`` (the weights the group will be sampled with) the capacity is that of those
        weights (``admission.weights_capacity``): see :meth:`admit_at`.

        The token ``"<actor_id>:<16 hex digits>"`` is drawn here (``secrets``), so no other writer can guess
        it; a retry of the same call after a lost reply finds it held and counts it once."""
        return self.admit_at(actor_id, weights_version)[0]

    def admit_at(self, actor_id: str, weights_version: int | None) -> tuple[str | None, str]:
        """:meth:`admit` and why not: ``(slot, "")``, or ``(None, reason)`` with reason ``"capacity"`` (the
        learner's cap K), ``"weights"`` (only the caller's weights are too old: newer ones would be admitted)
        or ``"no control"`` (no learner yet)."""
        a = self.admit_with_control(actor_id, weights_version)
        return a.slot, a.why

    def admit_with_control(self, actor_id: str, weights_version: int | None) -> Admission:
        """:meth:`admit_at` with the Control the decision was made under and its event id, read in the same
        script: one round trip where the actor needs all three."""
        a = self.admit_many(actor_id, weights_version, 1)
        return Admission(a.slots[0] if a.slots else None, a.why, a.control, a.event)

    def admit_many(self, actor_id: str, weights_version: int | None, n: int) -> Admissions:
        """Up to ``n`` slots in one script (one round trip), admitted in order while capacity allows, each as
        :meth:`admit_with_control` admits one: an actor with room for several groups starts them together."""
        if n < 1:
            raise ValueError(f"admit_many: n must be >= 1, got {n}")
        slots = [f"{actor_id}:{secrets.token_hex(8)}" for _ in range(n)]
        w = -1 if weights_version is None else int(weights_version)
        reply = self._retry.call(self._admit, keys=[self.keys.control, self.keys.produced, self.keys.held],
                                 args=[slots[0], actor_id, w, *slots[1:]])
        ok, raw, ev, admitted = int(reply[0]), reply[1], reply[2], int(reply[3])
        ctrl = None if raw is None else decode(raw, Control)
        ev = ev.decode() if isinstance(ev, bytes) else ev
        why = "" if ok == 1 else {0: "capacity", 2: "weights"}.get(ok, "no control")
        return Admissions(tuple(slots[:admitted]), why, ctrl, ev)

    def cancel(self, slot: str) -> bool:
        """Give back the admission ``slot`` of a group that will never reach the writer. True if it was held;
        False (nothing given back) if it is unknown or already settled (delivered, cancelled, reclaimed)."""
        return self._retry.call(self._cancel, keys=[self.keys.held, self.keys.produced], args=[slot]) == 1

    def give_back(self, actor_id: str) -> int:
        """Give back every slot ``actor_id`` holds (admitted, never delivered or cancelled): an actor restarting
        under the id of a dead predecessor calls it before it admits anything. Returns the slots given back."""
        return int(self._retry.call(self._give_back, keys=[self.keys.held, self.keys.produced], args=[actor_id]))

    def held(self, actor_id: str | None = None) -> int:
        """Admitted slots not yet delivered nor given back: all of them, or those of ``actor_id``."""
        if actor_id is None:
            return int(self._retry.call(self.client.hlen, self.keys.held))
        owner = actor_id.encode()
        return sum(v == owner for v in self._retry.call(self.client.hvals, self.keys.held))

    def report_actor(self, report: ActorReport) -> None:
        """Store an actor's latest time breakdown (actors, every ``actor.report_interval_s``)."""
        self._retry.call(self._report, keys=[self.keys.actors, self.keys.actors_seen],
                         args=[report.actor_id, encode(report)])

    def actor_reports(self) -> list[ActorReport]:
        """Every actor's latest report; malformed ones are skipped (the learner's metrics must not fail on them)."""
        out = []
        for raw in self._retry.call(self.client.hvals, self.keys.actors):
            try:
                out.append(decode(raw, ActorReport))
            except ProtocolError:
                continue
        return out

    def keep_lease(self, actor_id: str, lease_s: float) -> None:
        """Renew ``actor_id``'s liveness lease for ``lease_s`` seconds (actors, every ``lease_s / 3``)."""
        self._retry.call(self.client.set, self.keys.lease(actor_id), b"1", px=max(int(lease_s * 1000), 1))

    def drop_lease(self, actor_id: str) -> None:
        self._retry.call(self.client.delete, self.keys.lease(actor_id))

    def live_actors(self) -> list[ActorLiveness]:
        """The actors holding a lease now, by id: the lease's time left, the age of their latest report (on the
        Redis server's clock) and the slots they hold. Not one atomic snapshot (a SCAN of the lease keys, then
        one pipeline); for messages and tools, not for decisions."""
        def read() -> list[ActorLiveness]:
            lease_keys = sorted(self.client.scan_iter(match=self.keys.lease("*"), count=1000))
            pipe = self.client.pipeline(transaction=False)
            for key in lease_keys:
                pipe.pttl(key)
            pipe.hgetall(self.keys.actors_seen)
            pipe.hvals(self.keys.held)
            pipe.time()
            *ttls, seen, held, (now_s, now_us) = pipe.execute()
            now = now_s + now_us / 1e6
            start = len(self.keys.lease(""))
            out = []
            for key, ttl_ms in zip(lease_keys, ttls):
                if ttl_ms == -2:  # expired between the SCAN and the PTTL
                    continue
                actor = key[start:]
                at = seen.get(actor)
                out.append(ActorLiveness(
                    actor_id=actor.decode(errors="replace"),
                    lease_left_s=max(ttl_ms, 0) / 1000.0,  # -1 (no TTL: set by hand) reads as 0
                    report_age_s=None if at is None else max(now - float(at), 0.0),
                    held=sum(v == actor for v in held)))
            return out

        return self._retry.call(read)

    def describe_actors(self) -> str:
        """:func:`describe_live_actors` of :meth:`live_actors`: "live actors: actor-0 (lease 12 s left, last
        report 3 s ago)", or which settings to check when no actor holds a lease."""
        return describe_live_actors(self.live_actors(), self.cfg)

    def reclaim_expired(self) -> list[tuple[str, int]]:
        """Give back the held slots of actors whose lease expired (dead without a restart under the same id);
        returns (actor_id, slots given back) per such actor (learner, while it waits for data)."""
        flat = self._retry.call(self._reclaim, keys=[self.keys.held, self.keys.produced],
                                args=[self.keys.lease("")])
        return [(flat[i].decode(errors="replace"), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    def next_draw(self) -> int:
        """The next index (0, 1, 2, ...) in the run's shared order of prompts: one per group of an indexed
        environment, however many actors draw at once."""
        return int(self._retry.call(self.client.incr, self.keys.draws)) - 1

    def draws(self) -> int:
        """Prompts drawn so far (what a learner checkpoint records)."""
        return int(self._retry.call(self.client.get, self.keys.draws) or 0)

    def restore_draws(self, n: int) -> int:
        """Raise the draw counter to ``n`` if it is lower (a resume after Redis lost its data); returns the value
        now in force. Never lowers it: prompts drawn after the checkpoint may be in the stream, to be trained."""
        return int(self._retry.call(self._restore_draws, keys=[self.keys.draws], args=[int(n)]))

    def counters(self) -> dict:
        """The run's counters as ints, read in one atomic snapshot (MULTI/EXEC, so no script runs between the
        reads):

        * ``produced``: admission slots in use; ``held``: admitted slots not yet delivered nor given back;
        * ``queued``: admitted entries in the stream, not yet acked nor dead-lettered (HLEN delivered);
        * ``consumed``: entries acked (with or without a slot); ``consumed_admitted``: admitted entries acked;
        * ``dead``: entries dead-lettered; ``capacity``: -1 before the first control;
        * ``reconciles``: the ledger's identity ``produced == consumed_admitted + queued + held`` (a bool).

        Absent keys read 0."""
        def read() -> list:
            # A fresh pipeline per attempt: redis-py empties a pipeline whose execute() failed.
            pipe = self.client.pipeline(transaction=True)
            pipe.get(self.keys.produced)
            pipe.get(self.keys.consumed)
            pipe.get(self.keys.consumed_admitted)
            pipe.get(self.keys.dead_count)
            pipe.hlen(self.keys.held)
            pipe.hlen(self.keys.delivered)
            pipe.hget(self.keys.control, "capacity")
            return pipe.execute()

        produced, consumed, consumed_admitted, dead, held, queued, cap = self._retry.call(read)
        out = {
            "produced": int(produced or 0),
            "consumed": int(consumed or 0),
            "consumed_admitted": int(consumed_admitted or 0),
            "queued": int(queued or 0),
            "dead": int(dead or 0),
            "held": int(held or 0),
            "capacity": -1 if cap is None else int(cap),
        }
        out["reconciles"] = ledger_reconciles(out["produced"], out["consumed_admitted"], out["queued"], out["held"])
        return out

    def reset(self) -> None:
        """Delete this prefix's streams (and so the consumer group), counters, ledger and control: a fresh run."""
        self._retry.call(self.client.delete, *self.keys.all())

    def close(self) -> None:
        self.client.close()

