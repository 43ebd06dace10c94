"""Names of the Redis keys of one run. Every buffer component derives its keys here, from ``redis.prefix``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """The keys under one prefix (default ``dcrl``); two runs with different prefixes share nothing."""

    prefix: str

    @property
    def traj(self) -> str:
        """Stream of trajectory groups: field ``data`` = encode(TrajectoryGroup). Actors XADD, learners read."""
        return f"{self.prefix}:traj"

    @property
    def dead(self) -> str:
        """Dead-letter stream: fields ``reason``, ``source_id`` (id in ``traj``), ``data`` (raw bytes)."""
        return f"{self.prefix}:dead"

    @property
    def control(self) -> str:
        """Hash: ``control`` = encode(Control), ``capacity`` = admission capacity, ``weights`` = encode(WeightsReady)."""
        return f"{self.prefix}:control"

    @property
    def produced(self) -> str:
        """Counter of groups admitted (actors INCR through try_admit, DECR through release / dead letters)."""
        return f"{self.prefix}:produced"

    @property
    def consumed(self) -> str:
        """Counter of entries acked by learners."""
        return f"{self.prefix}:consumed"

    @property
    def dead_count(self) -> str:
        """Counter of entries moved to the dead-letter stream (exact, unlike the capped stream)."""
        return f"{self.prefix}:dead_count"

    def lease(self, actor_id: str) -> str:
        """An actor's liveness lease (``ControlPlane.keep_lease``): while it exists, the admission slots noted
        under ``held:<actor_id>`` in the control hash are that actor's; once it expires they are reclaimed."""
        return f"{self.prefix}:lease:{actor_id}"

    def all(self) -> tuple[str, ...]:
        """Every key of the run, for ``ControlPlane.reset``."""
        return (self.traj, self.dead, self.control, self.produced, self.consumed, self.dead_count)
