"""Learner side of the replay queue: a consumer in the group ``redis.consumer_group`` on ``<prefix>:traj``.

The learner loop drives it as::

    reader = GroupReader(cfg.redis, consumer="learner-0", vocab_size=vocab)
    while step < steps:
        entries = reader.receive(batch_groups - len(batch), current_version=version, max_lag=cap)
        ...train on [e.group for e in entries] ...; save checkpoint
        reader.ack([e.id for e in entries])    # only now XACK + XDEL: a crash before re-delivers them

Delivery is at least once. ``receive`` returns, in this order:

1. this consumer's own pending entries (read once, from id 0): a learner restarted under the same
   consumer name gets back everything it had received and not acked;
2. entries that another consumer has left pending longer than ``redis.pending_timeout_s`` (a dead
   learner), found with XPENDING IDLE and taken over with XCLAIM, so that value must exceed the longest
   time a live learner holds entries before acking them. Entries this reader holds are never claimed
   (XAUTOCLAIM would claim them too and count a delivery each time);
3. new entries (XREADGROUP ``>``), waiting up to ``block_ms`` only when 1 and 2 gave nothing.

Every entry is validated with :func:`decode_entry` (``protocol.decode_group``: vocab size, current version).
An invalid one is moved to ``<prefix>:dead`` with its reason and raw bytes, acked, deleted and counted, and never
returned; if it was written with an admission slot (``<prefix>:delivered``), that slot is given back, once;
garbage written straight into the stream moves no capacity. A valid one is never dropped, except a stale one
or a poison one.

Stale (:func:`is_stale`, when ``receive`` is given ``max_lag``): a group whose *newest* generated token is
more than ``max_lag`` versions behind ``current_version`` is dead-lettered with a reason ``stale: lag L >
cap C ...``, like an invalid one (its admission slot comes back, so the actors produce a replacement),
counted in ``stale`` (and ``dead``) and logged. The newest token, not the oldest: a long multi-turn episode
legitimately carries tokens of old versions, and a group that was merely slow is never discarded. The
learner passes the ceiling of its staleness cap (``learner.trainer.stale_cap``).

Poison: Redis counts the deliveries of each pending entry (XPENDING's times-delivered: 1 for XREADGROUP ``>``,
+1 for each re-read of the consumer's own pending entries and each XCLAIM). An entry that comes back
through 1 or 2 after ``redis.max_deliveries`` deliveries without an ack (say it crashes the learner on
every restart) is dead-lettered like an invalid one, with a reason naming the count and the consumer
that last held it, instead of being delivered again. Every entry of a batch that keeps crashing the
learner shares that fate, not only the culprit; their bytes stay in ``<prefix>:dead``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from configs.schema import RedisConfig
from protocol import ProtocolError, TrajectoryGroup, decode_group

from buffer.admission import ACK_CHUNK, ACK_LUA, DEAD_LETTER_LUA
from buffer.connection import SOCKET_TIMEOUT_S, Retrier, connect
from buffer.keys import Keys

log = logging.getLogger("dcrl.buffer")

# Pending entries one reclaim step looks at (at least): the entries this reader holds are skipped.
RECLAIM_SCAN = 100


@dataclass(frozen=True, slots=True)
class Entry:
    """One valid stream entry: ``id`` is what the learner acks once it is done with ``group``."""

    id: str
    group: TrajectoryGroup


def newest_version(group: TrajectoryGroup) -> int:
    """The newest policy version among the generated tokens (loss mask 1) of ``group``'s trajectories; -1 if
    it has none (a validated group has at least one per trajectory)."""
    newest = -1
    for t in group.trajectories:
        gen = t.mask_np.astype(bool)
        if gen.any():
            newest = max(newest, int(t.versions_np[gen].max()))
    return newest


def is_stale(newest_version: int, learner_version: int, cap: int) -> bool:
    """The read-side staleness rule: a group read by the learner at ``learner_version`` is stale when
    ``learner_version - newest_version > cap``, ``newest_version`` being the newest policy version among its
    generated tokens (:func:`newest_version`) and ``cap`` the ceiling of the staleness cap in force.

    Measured on the newest token, not the oldest: a long multi-turn episode carries tokens of old versions
    by design and must never be discarded for being slow; only a group with nothing recent in it (a backlog
    left behind, a learner that jumped ahead) is stale."""
    if cap < 0:
        raise ValueError(f"is_stale: cap must be >= 0 (got {cap})")
    return learner_version - newest_version > cap


def decode_entry(fields: dict[bytes, bytes], *, vocab_size: int | None = None,
                 current_version: int | None = None) -> TrajectoryGroup:
    """The validated group in the fields of one stream entry (the writer puts it under ``data``). Raises only
    ProtocolError, whatever the fields hold: the reader dead-letters the entry with ``str(err)`` as reason."""
    data = fields.get(b"data")
    if data is None:
        names = ", ".join(sorted(k.decode(errors="replace") if isinstance(k, bytes) else repr(k) for k in fields))
        raise ProtocolError(f"entry has no 'data' field (fields: {names})")
    return decode_group(data, vocab_size=vocab_size, current_version=current_version)


def clamp_block_ms(block_ms: int | None, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> int | None:
    """Blocking wait for XREADGROUP: ``block_ms`` capped at ``socket_timeout_s - 5 s`` (a longer BLOCK would
    hit the client's socket timeout and look like an outage); None or <= 0 means do not block."""
    if block_ms is None or block_ms <= 0:
        return None
    return min(int(block_ms), int((socket_timeout_s - 5.0) * 1000))


class GroupReader:
    """Consumer ``consumer`` of the learners' group; see the module docstring for the loop that drives it."""

    def __init__(self, cfg: RedisConfig, consumer: str, vocab_size: int | None = None):
        self.cfg = cfg
        self.consumer = consumer
        self.vocab_size = vocab_size
        self.keys = Keys(cfg.prefix)
        self.client = connect(cfg, f"reader {consumer}", large_replies=True)
        self._retry = Retrier(cfg, f"reader {consumer}", give_up_s=cfg.max_outage_s)
        self._ack = self.client.register_script(ACK_LUA)
        self._dead_letter = self.client.register_script(DEAD_LETTER_LUA)
        self._held: set[str] = set()  # ids returned by receive() and not acked yet
        self._own_cursor: str | None = "0"  # id after which to read our own pending entries; None once done
        self._claim_cursor = "0-0"  # reclaim scan position: last pending id looked at ("0-0": start over)
        self._last_scan_end = float("-inf")  # when the last full reclaim scan finished
        self.dead = 0  # entries this reader dead-lettered (stale ones included)
        self.stale = 0  # of which stale (is_stale)
        self._retry.call(self._ensure_group)

    # -- public API ---------------------------------------------------------------------------------

    def receive(self, max_groups: int, block_ms: int | None = None, current_version: int | None = None,
                max_lag: int | None = None) -> list[Entry]:
        """Up to ``max_groups`` valid entries (own pending, then reclaimed, then new); may return fewer or none
        after waiting ``block_ms`` (default ``redis.read_block_ms``) for new ones.

        ``current_version``: the learner's version V (groups with tokens from a later version are invalid).
        ``max_lag`` (needs ``current_version``): groups whose newest generated token is more than ``max_lag``
        versions behind V are dead-lettered as stale (:func:`is_stale`)."""
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1 (got {max_groups})")
        if max_lag is not None and (current_version is None or max_lag < 0):
            raise ValueError(f"max_lag needs current_version and must be >= 0 (got max_lag={max_lag}, "
                             f"current_version={current_version})")
        block = clamp_block_ms(self.cfg.read_block_ms if block_ms is None else block_ms)
        out: list[Entry] = []
        while self._own_cursor is not None and len(out) < max_groups:
            out += self._valid(*self._retry.call(self._read_own_pending, max_groups - len(out)), current_version,
                               max_lag)
        if len(out) < max_groups and self._reclaim_due():
            out += self._valid(*self._retry.call(self._reclaim, max_groups - len(out)), current_version, max_lag)
        while len(out) < max_groups:
            raw = self._retry.call(self._read_new, max_groups - len(out), None if out else block)
            if not raw:
                break
            out += self._valid(raw, {}, current_version, max_lag)
            block = None  # wait at most once per call
        return out

    def ack(self, ids: list[str]) -> int:
        """XACK + XDEL ``ids`` and add them to the consumed counter, the admitted ones also to consumed_admitted
        (entries acked earlier count once). Call after the step (or checkpoint) that used them. Returns how many
        were newly acked."""
        acked = 0
        for i in range(0, len(ids), ACK_CHUNK):
            acked += self._retry.call(self._ack, keys=[self.keys.traj, self.keys.consumed, self.keys.delivered,
                                                       self.keys.consumed_admitted],
                                      args=[self.cfg.consumer_group, *ids[i:i + ACK_CHUNK]])
        self._held.difference_update(ids)
        return int(acked)

    @property
    def held(self) -> int:
        """Entries returned by receive() and not acked yet."""
        return len(self._held)

    def close(self) -> None:
        """Close the connection. Unacked entries stay pending under this consumer name (re-read on restart,
        or reclaimed by another consumer after ``redis.pending_timeout_s``)."""
        self.client.close()

    # -- Redis reads ---------------------------------------------------------------------------------

    def _ensure_group(self) -> None:
        """Create the consumer group at the start of the stream (MKSTREAM); an existing group is kept."""
        try:
            self.client.xgroup_create(self.keys.traj, self.cfg.consumer_group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _xreadgroup(self, start: str, count: int, block: int | None) -> list:
        """XREADGROUP that recreates the group if it vanished (stream deleted by a reset, or a Redis that
        lost its data), then reads once more."""
        args = dict(groupname=self.cfg.consumer_group, consumername=self.consumer,
                    streams={self.keys.traj: start}, count=count, block=block)
        try:
            reply = self.client.xreadgroup(**args)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("reader %s: consumer group %s on %s is gone; recreating it", self.consumer,
                        self.cfg.consumer_group, self.keys.traj)
            self._ensure_group()
            reply = self.client.xreadgroup(**args)
        return reply[0][1] if reply else []

    def _read_own_pending(self, count: int) -> tuple[list, dict[str, tuple[int, str]]]:
        """Next page of this consumer's pending entries and their delivery counts (this read included);
        marks the history done when a page comes back empty."""
        page = self._xreadgroup(self._own_cursor, count, None)
        if not page:
            self._own_cursor = None
            return [], {}
        # The page is a contiguous run of our own pending list: XPENDING over its id range lists exactly it.
        rows = self.client.xpending_range(self.keys.traj, self.cfg.consumer_group, min=page[0][0],
                                          max=page[-1][0], count=len(page), consumername=self.consumer)
        self._own_cursor = page[-1][0].decode()
        return page, {r["message_id"].decode(): (int(r["times_delivered"]), self.consumer) for r in rows}

    def _reclaim_due(self) -> bool:
        """Scan for abandoned entries while a scan is under way, else at most every ``pending_timeout_s / 4``
        (an entry becomes claimable only after ``pending_timeout_s``; this saves a round trip per receive)."""
        return self._claim_cursor != "0-0" or (
            time.monotonic() - self._last_scan_end >= self.cfg.pending_timeout_s / 4)

    def _reclaim(self, count: int) -> tuple[list, dict[str, tuple[int, str]]]:
        """One scan step: up to ``count`` entries idle longer than ``pending_timeout_s`` that this reader does
        not hold become ours (XPENDING IDLE lists them with their consumer and delivery count, XCLAIM takes
        them unless another consumer got there first). Returns them and their delivery counts after the claim.

        Not XAUTOCLAIM: it would also claim the entries we hold (idle while the learner trains towards its
        next checkpoint) and count a delivery each time, so a learner that restarted after holding a batch
        for a few ``pending_timeout_s`` would find it over ``max_deliveries``."""
        idle_ms = int(self.cfg.pending_timeout_s * 1000)
        page = max(count, RECLAIM_SCAN)
        start = "-" if self._claim_cursor == "0-0" else "(" + self._claim_cursor
        try:
            rows = self.client.xpending_range(self.keys.traj, self.cfg.consumer_group, min=start, max="+",
                                              count=page, idle=idle_ms)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._ensure_group()
            return [], {}
        candidates: dict[str, tuple[int, str]] = {}  # id -> (delivery count once claimed, consumer it left)
        looked = 0
        for r in rows:
            if len(candidates) == count:
                break
            looked += 1
            sid = r["message_id"].decode()
            if sid not in self._held:
                candidates[sid] = (int(r["times_delivered"]) + 1, r["consumer"].decode(errors="replace"))
        done = looked == len(rows) < page  # the scan reached the end of the pending list
        claimed = []
        if candidates:
            # min_idle_time again: an entry its consumer touched (or another reader claimed) since the XPENDING
            # is left alone. Entries deleted from the stream are dropped from the pending list (Redis >= 7).
            claimed = self.client.xclaim(self.keys.traj, self.cfg.consumer_group, self.consumer,
                                         min_idle_time=idle_ms, message_ids=list(candidates))
        self._claim_cursor = "0-0" if done else rows[looked - 1]["message_id"].decode()
        if done:
            self._last_scan_end = time.monotonic()
        if claimed:
            log.info("reader %s: reclaimed %d entries left pending by another consumer", self.consumer, len(claimed))
        return claimed, candidates

    def _read_new(self, count: int, block: int | None) -> list:
        return self._xreadgroup(">", count, block)

    # -- validation ----------------------------------------------------------------------------------

    def _valid(self, raw: list, deliveries: dict[str, tuple[int, str]], current_version: int | None,
               max_lag: int | None = None) -> list[Entry]:
        """Decode and validate raw (id, fields) pairs; dead-letter the invalid ones, the stale ones (with
        ``max_lag``) and those delivered more than ``max_deliveries`` times (``deliveries``: id -> (count, last
        consumer) of re-deliveries), return the rest."""
        out = []
        for rid, fields in raw:
            sid = rid.decode()
            if not fields:
                # Still pending but deleted from the stream (by hand, or trimmed): nothing to deliver. Dead-letter
                # it (no data) so that it leaves our pending list and, if it was admitted, gives its slot back
                # instead of staying counted in delivered (queued) forever.
                self._send_to_dead(sid, "deleted from the stream before it was acked", b"")
                continue
            times, last = deliveries.get(sid, (1, self.consumer))
            if times > self.cfg.max_deliveries:
                # Checked before decoding: the decode itself may be what crashes the learner.
                self._send_to_dead(sid, f"delivered {times - 1} times without an ack (redis.max_deliveries="
                                   f"{self.cfg.max_deliveries}); last consumer {last!r}", fields.get(b"data", b""))
                continue
            try:
                group = decode_entry(fields, vocab_size=self.vocab_size, current_version=current_version)
            except ProtocolError as exc:
                self._send_to_dead(sid, str(exc), fields.get(b"data", b""))
                continue
            if max_lag is not None and is_stale(newest := newest_version(group), current_version, max_lag):
                self._send_to_dead(sid, f"stale: lag {current_version - newest} > cap {max_lag} (newest token "
                                   f"version {newest}, learner at {current_version}; group {group.group_id!r})",
                                   fields[b"data"], stale=True)
                continue
            self._held.add(sid)
            out.append(Entry(sid, group))
        return out

    def _send_to_dead(self, sid: str, reason: str, data: bytes, stale: bool = False) -> None:
        moved = self._retry.call(
            self._dead_letter,
            keys=[self.keys.traj, self.keys.dead, self.keys.dead_count, self.keys.produced, self.keys.delivered],
            args=[self.cfg.consumer_group, sid, reason, data, self.cfg.dead_maxlen])
        if moved:
            self.dead += 1
            self.stale += int(stale)
            log.warning("reader %s: entry %s moved to %s: %s", self.consumer, sid, self.keys.dead, reason)
