"""Names of the Redis keys of one run. Every buffer component derives its keys here, from ``redis.prefix``.

Admission slots move between ``produced``, ``held``, the ``traj`` stream and ``delivered`` only through the
Lua scripts of :mod:`buffer.admission`, which describes the ledger and its invariant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """The keys under one prefix (default ``dcrl``); two runs with different prefixes share nothing."""

    prefix: str

    @property
    def traj(self) -> str:
        """Stream of trajectory groups: field ``data`` = encode(TrajectoryGroup), and ``slot`` = the admission
        token for admitted groups. Written by actors (``GroupWriter``: DELIVER_LUA, or a plain XADD without a
        slot for tools and benchmarks); read, acked and deleted by learners (``GroupReader``)."""
        return f"{self.prefix}:traj"

    @property
    def dead(self) -> str:
        """Dead-letter stream: fields ``reason``, ``source_id`` (id in ``traj``), ``data`` (raw bytes), capped at
        ``redis.dead_maxlen``. Written by learners (``GroupReader``: DEAD_LETTER_LUA); read by
        ``python -m buffer dead`` / ``stats``."""
        return f"{self.prefix}:dead"

    @property
    def control(self) -> str:
        """Hash: ``control`` = encode(Control), ``capacity`` = admission capacity, ``weights`` = encode(WeightsReady).
        Written by the learner (``ControlPlane.write_control`` / ``set_weights``); read by actors (and by
        ADMIT_LUA for ``capacity``) and ``python -m buffer stats``."""
        return f"{self.prefix}:control"

    @property
    def control_events(self) -> str:
        """Stream: one entry per ``write_control`` (field ``version``), written in the same script as the control
        hash, whose ``event`` field holds the entry's id; capped near 64 entries. Actors at the staleness cap block
        on it (``ControlPlane.wait_control``) instead of polling the hash."""
        return f"{self.prefix}:control_events"

    @property
    def produced(self) -> str:
        """Counter of admission slots in use: held by actors, or delivered and not dead-lettered. Changed only by
        the ledger's scripts: INCR by ADMIT_LUA (and DELIVER_LUA for a slot no longer held), DECR by
        CANCEL_LUA, GIVE_BACK_LUA, RECLAIM_LUA and DEAD_LETTER_LUA (admitted entries only). Read by ADMIT_LUA
        against ``capacity`` and by ``ControlPlane.counters``."""
        return f"{self.prefix}:produced"

    @property
    def held(self) -> str:
        """Hash of admitted slots not yet delivered: field = slot token ``<actor_id>:<hex>``, value = actor id.
        HSET by ADMIT_LUA; HDEL by DELIVER_LUA (the writer), CANCEL_LUA, GIVE_BACK_LUA (an actor restarted
        under the same id) and RECLAIM_LUA (the learner, for actors whose lease expired). Read by those and by
        ``ControlPlane.held`` / ``python -m buffer stats``."""
        return f"{self.prefix}:held"

    @property
    def delivered(self) -> str:
        """Hash of admitted entries still in ``traj``: field = stream id, value = slot token. HSET by DELIVER_LUA
        (only there: garbage XADDed by hand is never in it); HDEL by ACK_LUA and DEAD_LETTER_LUA, which gives
        the slot back (DECR ``produced``) only when its HDEL removed the id, so once per admitted entry."""
        return f"{self.prefix}:delivered"

    @property
    def consumed(self) -> str:
        """Counter of entries acked by learners, admitted or written without a slot (INCRBY in ACK_LUA); read by
        ``ControlPlane.counters``."""
        return f"{self.prefix}:consumed"

    @property
    def consumed_admitted(self) -> str:
        """Counter of admitted entries acked by learners: INCRBY in ACK_LUA by the number of acked ids its HDEL
        removed from ``delivered``. The ledger's identity ``produced == consumed_admitted + HLEN delivered +
        HLEN held`` (:mod:`buffer.admission`) uses it; read by ``ControlPlane.counters`` and ``buffer stats``."""
        return f"{self.prefix}:consumed_admitted"

    @property
    def dead_count(self) -> str:
        """Counter of entries moved to the dead-letter stream (exact, unlike the capped stream): INCR in
        DEAD_LETTER_LUA; read by ``ControlPlane.counters``."""
        return f"{self.prefix}:dead_count"

    @property
    def actors(self) -> str:
        """Hash: field actor id = encode(ActorReport), written by each actor every ``actor.report_interval_s``,
        read by the learner for the actor-side time breakdown of its metrics."""
        return f"{self.prefix}:actors"

    @property
    def actors_seen(self) -> str:
        """Hash: field actor id = the Redis server's clock (``TIME``, seconds as a decimal string) at that actor's
        latest report, written in one script with the ``actors`` field (``ControlPlane.report_actor``); read by
        ``ControlPlane.live_actors`` ("last report N s ago" in the learner's wait messages)."""
        return f"{self.prefix}:actors_seen"

    @property
    def draws(self) -> str:
        """Counter of prompts drawn from an indexed environment (a dataset): INCR by each actor per group
        (``ControlPlane.next_draw``), so that all actors walk one shared order; the learner's checkpoint records it
        (``ControlPlane.draws`` / ``restore_draws``)."""
        return f"{self.prefix}:draws"

    def lease(self, actor_id: str) -> str:
        """An actor's liveness lease, with a TTL: set by the actor (``ControlPlane.keep_lease``, every lease_s / 3;
        deleted by ``drop_lease`` on a clean exit). While it exists, the slots of ``held`` whose value is
        ``actor_id`` are that actor's; once it is gone RECLAIM_LUA (the learner) gives them back."""
        return f"{self.prefix}:lease:{actor_id}"

    def all(self) -> tuple[str, ...]:
        """Every key of the run but the leases (they expire), for ``ControlPlane.reset``."""
        return (self.traj, self.dead, self.control, self.control_events, self.produced, self.held, self.delivered,
                self.consumed, self.consumed_admitted, self.dead_count, self.actors, self.actors_seen, self.draws)
