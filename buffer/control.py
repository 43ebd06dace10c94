"""The control plane in Redis: the learner's Control and latest WeightsReady, and the admission counters.

Learner:  write_control(Control) after every step; set_weights(WeightsReady) after every publish;
          reset() once at the start of a fresh (not resumed) run.
Actors:   loop { c = read_control(); if c.stop: drain; if try_admit(): run a group, send it
          (or release() if it was cancelled) }; latest_weights() when joining late; keep_lease() every
          few seconds (from a thread of its own) while they may hold admitted slots.
Learner:  reclaim_expired() while it waits for data: the slots of an actor whose lease expired come back.
Tools:    counters() for ``python -m buffer stats``.
"""

from __future__ import annotations

from configs.schema import RedisConfig
from protocol import Control, WeightsReady, decode, encode

from buffer.admission import RECLAIM_LUA, RELEASE_LUA, TRY_ADMIT_LUA, admission_capacity
from buffer.connection import Retrier, connect
from buffer.keys import Keys


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
        self._try_admit = self.client.register_script(TRY_ADMIT_LUA)
        self._release = self.client.register_script(RELEASE_LUA)
        self._reclaim = self.client.register_script(RECLAIM_LUA)

    def read_control(self) -> Control | None:
        """The learner's last Control, or None before the first write_control."""
        raw = self._retry.call(self.client.hget, self.keys.control, "control")
        return None if raw is None else decode(raw, Control)

    def write_control(self, c: Control) -> None:
        """Store ``c`` and its admission capacity in one HSET, so try_admit never sees one without the other."""
        self._retry.call(self.client.hset, self.keys.control,
                         mapping={"control": encode(c), "capacity": control_capacity(c)})

    def set_weights(self, w: WeightsReady) -> None:
        """Store the latest WeightsReady for actors that join after its ZMQ announcement."""
        self._retry.call(self.client.hset, self.keys.control, "weights", encode(w))

    def latest_weights(self) -> WeightsReady | None:
        raw = self._retry.call(self.client.hget, self.keys.control, "weights")
        return None if raw is None else decode(raw, WeightsReady)

    def try_admit(self) -> bool:
        """Atomically: if produced < capacity then INCR produced and return True. False before any control."""
        return self._retry.call(self._try_admit, keys=[self.keys.control, self.keys.produced]) == 1

    def release(self) -> None:
        """Give back one admission (a group admitted, then cancelled and never sent). Never below 0."""
        self._retry.call(self._release, keys=[self.keys.produced])

    def keep_lease(self, actor_id: str, lease_s: float) -> None:
        """Renew ``actor_id``'s liveness lease for ``lease_s`` seconds (actors, every ``lease_s / 3``)."""
        self._retry.call(self.client.set, self.keys.lease(actor_id), b"1", px=max(int(lease_s * 1000), 1))

    def drop_lease(self, actor_id: str) -> None:
        self._retry.call(self.client.delete, self.keys.lease(actor_id))

    def reclaim_expired(self) -> list[tuple[str, int]]:
        """Give back the admission slots of actors whose lease expired (dead without a restart under the
        same id); returns (actor_id, slots given back) per such actor (learner, while it waits for data)."""
        flat = self._retry.call(self._reclaim, keys=[self.keys.control, self.keys.produced],
                                args=[self.keys.lease("")])
        return [(flat[i].decode(errors="replace"), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    def counters(self) -> dict:
        """``{"produced", "consumed", "dead", "capacity"}`` as ints (0 when absent; capacity -1 before control)."""
        def read() -> list:
            # A fresh pipeline per attempt: redis-py empties a pipeline whose execute() failed.
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.keys.produced)
            pipe.get(self.keys.consumed)
            pipe.get(self.keys.dead_count)
            pipe.hget(self.keys.control, "capacity")
            return pipe.execute()

        produced, consumed, dead, cap = self._retry.call(read)
        return {
            "produced": int(produced or 0),
            "consumed": int(consumed or 0),
            "dead": int(dead or 0),
            "capacity": -1 if cap is None else int(cap),
        }

    def reset(self) -> None:
        """Delete this prefix's streams (and so the consumer group), counters and control: a fresh run."""
        self._retry.call(self.client.delete, *self.keys.all())

    def close(self) -> None:
        self.client.close()

