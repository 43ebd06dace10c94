"""What ``python -m buffer stats`` and ``python -m buffer dead`` show: a snapshot of one run's Redis state."""

from __future__ import annotations

import redis

from configs.schema import RedisConfig
from protocol import Control, ProtocolError, WeightsReady, decode

from buffer.admission import ledger_reconciles
from buffer.keys import Keys


def _s(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _int(v) -> int:
    return int(v) if v is not None else 0


def dead_letters(client: redis.Redis, cfg: RedisConfig, n: int) -> list[dict]:
    """The last ``n`` dead-letter entries, newest first: ``{"id", "source_id", "reason", "bytes"}``."""
    rows = client.xrevrange(Keys(cfg.prefix).dead, count=n)
    return [{"id": _s(rid), "source_id": _s(f.get(b"source_id", b"")), "reason": _s(f.get(b"reason", b"")),
             "bytes": len(f.get(b"data", b""))} for rid, f in rows]


def collect_stats(client: redis.Redis, cfg: RedisConfig, n_dead: int = 5) -> dict:
    """Stream length, consumer group and per-consumer pending counts, dead letters, counters, control.

    Counters (one atomic MULTI/EXEC snapshot): ``produced``, ``held`` (admitted slots not yet delivered),
    ``queued`` (admitted entries in the stream, not yet acked nor dead-lettered), ``consumed`` (entries acked)
    and ``consumed_admitted`` (admitted entries acked), ``dead_count``; ``reconciles`` is the ledger's
    identity ``produced == consumed_admitted + queued + held`` (:mod:`buffer.admission`)."""
    keys = Keys(cfg.prefix)
    pipe = client.pipeline(transaction=True)
    pipe.xlen(keys.traj)
    pipe.xlen(keys.dead)
    pipe.mget(keys.produced, keys.consumed, keys.consumed_admitted, keys.dead_count)
    pipe.hgetall(keys.control)
    pipe.hlen(keys.held)
    pipe.hlen(keys.delivered)
    (stream_len, dead_len, (produced, consumed, consumed_admitted, dead_count), control_hash, held,
     queued) = pipe.execute()

    group: dict | None = None
    consumers: list[dict] = []
    try:
        for g in client.xinfo_groups(keys.traj):
            if _s(g["name"]) == cfg.consumer_group:
                group = {"pending": g["pending"], "lag": g.get("lag"), "last_delivered": _s(g["last-delivered-id"])}
                consumers = [{"name": _s(c["name"]), "pending": c["pending"], "idle_s": c["idle"] / 1000.0}
                             for c in client.xinfo_consumers(keys.traj, cfg.consumer_group)]
    except redis.exceptions.ResponseError as exc:  # the stream does not exist yet: nothing written or read
        if "no such key" not in str(exc):
            raise

    control = weights = None
    capacity = None
    if b"control" in control_hash:
        try:
            control = decode(control_hash[b"control"], Control)
        except ProtocolError as exc:
            control = f"undecodable: {exc}"
    if b"weights" in control_hash:
        try:
            weights = decode(control_hash[b"weights"], WeightsReady)
        except ProtocolError as exc:
            weights = f"undecodable: {exc}"
    if b"capacity" in control_hash:
        capacity = int(control_hash[b"capacity"])
    return {
        "prefix": cfg.prefix,
        "stream": keys.traj,
        "stream_len": stream_len,
        "group_name": cfg.consumer_group,
        "group": group,
        "consumers": consumers,
        "dead_len": dead_len,
        "dead_count": _int(dead_count),
        "dead_last": dead_letters(client, cfg, n_dead) if n_dead > 0 else [],
        "produced": _int(produced),
        "consumed": _int(consumed),
        "consumed_admitted": _int(consumed_admitted),
        "queued": _int(queued),
        "held": _int(held),
        "reconciles": ledger_reconciles(_int(produced), _int(consumed_admitted), _int(queued), _int(held)),
        "capacity": capacity,
        "control": control,
        "weights": weights,
    }


def ledger_line(st: dict) -> str:
    """``produced = consumed + queued + held`` with the numbers and ``ok`` or ``MISMATCH``; consumed counts
    the admitted entries acked (entries written without a slot never held capacity and are left out)."""
    verdict = "ok" if st["reconciles"] else "MISMATCH"
    line = (f"ledger: produced = consumed + queued + held: {st['produced']} = {st['consumed_admitted']} + "
            f"{st['queued']} + {st['held']} {verdict}")
    unslotted = st["consumed"] - st["consumed_admitted"]
    if unslotted > 0:
        line += f" ({unslotted} more acked entries were written without a slot)"
    return line


def format_stats(st: dict) -> str:
    """Human-readable lines for :func:`collect_stats`' snapshot."""
    lines = [f"stream {st['stream']}: {st['stream_len']} entries"]
    g = st["group"]
    if g is None:
        lines.append(f"group {st['group_name']}: not created yet (no reader has started)")
    else:
        lines.append(f"group {st['group_name']}: pending {g['pending']}, lag {g['lag']}, "
                     f"last delivered {g['last_delivered']}")
        for c in st["consumers"]:
            lines.append(f"  consumer {c['name']}: pending {c['pending']}, idle {c['idle_s']:.1f} s")
    lines.append(f"counters: produced {st['produced']}, consumed {st['consumed']}, dead {st['dead_count']}, "
                 f"held {st['held']} (admitted, not yet streamed)")
    lines.append(ledger_line(st))
    c = st["control"]
    if c is None:
        lines.append("control: none yet (no learner has written it; actors admit nothing)")
    elif isinstance(c, str):
        lines.append(f"control: {c}")
    else:
        cap = st["capacity"]
        room = "no capacity field: actors admit nothing" if cap is None else f"headroom {cap - st['produced']}"
        lines.append(f"control: version {c.version}, K (max_staleness) {c.max_staleness}, lambda {c.lam:.4g}, "
                     f"beta {c.beta:.4g}, batch_groups {c.batch_groups}, stop {c.stop}, "
                     f"capacity {cap} ({room})")
    w = st["weights"]
    if w is not None:
        lines.append(f"weights: {w}" if isinstance(w, str) else f"weights: version {w.version} at {w.path}")
    lines.append(f"dead letters: {st['dead_count']} total, {st['dead_len']} kept")
    for d in st["dead_last"]:
        lines.append(f"  {d['source_id']}: {d['reason']}")
    return "\n".join(lines)
