"""dcrl buffer: the Redis replay queue between actors and learner.

- :class:`GroupWriter` (actors): ``send(group, slot)`` never raises on a Redis outage; groups are held and
  resent.
- :class:`GroupReader` (learner): ``receive`` / ``ack``; at-least-once, reclaims from dead consumers,
  validates every entry and dead-letters the invalid ones.
- :class:`ControlPlane`: the learner's Control and WeightsReady, the admission ledger (``admit`` ->
  slot token, settled by ``GroupWriter.send(group, slot)``, or ``cancel`` / ``give_back`` /
  ``reclaim_expired``), counters.
- :func:`admission_capacity`: (K + V + 1) * batch_groups.
- :func:`connect`: a client with AUTH and backoff.

Names are imported on first use so that ``import buffer.server`` (tests, launchers) stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "admission_capacity": "buffer.admission",
    "connect": "buffer.connection",
    "ControlPlane": "buffer.control",
    "Entry": "buffer.reader",
    "GroupReader": "buffer.reader",
    "GroupWriter": "buffer.writer",
    "Keys": "buffer.keys",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'buffer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
