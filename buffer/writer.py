"""Actor side of the replay queue: finished groups go to a sender thread that XADDs them to ``<prefix>:traj``.

The actor loop drives it as::

    writer = GroupWriter(cfg.redis, actor_id)
    control.give_back(actor_id)                  # slots a dead predecessor under this id still held
    while running:
        if slot := control.admit(actor_id):
            writer.send(run_group(...), slot)    # returns at once; never raises on a Redis outage
            # (or control.cancel(slot) if the group is abandoned before it reaches send)
    writer.close()                               # flushes what is held, then stops the thread

An entry sent with its admission ``slot`` is written by :data:`buffer.admission.DELIVER_LUA`, one atomic
script per entry: the XADD (fields ``data`` and ``slot``) and the settling of the slot (out of
``<prefix>:held``) cannot be separated by a crash, so the ledger's invariant ``produced == written + held``
holds whenever the actor dies. Without a slot (benchmarks, tools) it is a plain XADD of ``data``.

During an outage the sender keeps retrying with backoff (forever) and send() keeps accepting groups
into memory; once ``redis.max_held_groups`` are held, send() blocks (one log line) until Redis takes
them again, so nothing is dropped and the actor stops producing instead of growing without bound.

Delivery is at least once: if a connection drops in the middle of a pipelined batch, the retry may
write some of that batch a second time (the deliver script then counts the duplicate's slot again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import redis

from configs.schema import RedisConfig
from protocol import TrajectoryGroup, encode_group, encoded_size_hint

from buffer.admission import DELIVER_LUA
from buffer.connection import Retrier, connect
from buffer.keys import Keys

log = logging.getLogger("dcrl.buffer")

# One pipelined round trip carries at most this much; larger batches only add latency.
MAX_BATCH_GROUPS = 64
MAX_BATCH_BYTES = 32 << 20


# A queued group: the group, its admission slot token (None: no slot) and about its encoded size in bytes.
Item = tuple[TrajectoryGroup, str | None, int]


def take_batch(queue: deque[Item], max_groups: int, max_bytes: int) -> list[Item]:
    """Pop from the left of ``queue`` up to ``max_groups`` items whose payloads total at most ``max_bytes``
    (always at least one, however large)."""
    batch: list[Item] = []
    size = 0
    while queue and len(batch) < max_groups and (not batch or size + queue[0][2] <= max_bytes):
        size += queue[0][2]
        batch.append(queue.popleft())
    return batch


class GroupWriter:
    """Sends TrajectoryGroups to Redis from a background thread; holds them in memory while Redis is down."""

    def __init__(self, cfg: RedisConfig, actor_id: str):
        self.cfg = cfg
        self.actor_id = actor_id
        self.keys = Keys(cfg.prefix)
        self.client = connect(cfg, f"writer {actor_id}")  # fails here on a bad password or no server at start
        self._stop = threading.Event()
        self._retry = Retrier(cfg, f"writer {actor_id}", give_up_s=None, stop=self._stop)
        self._cond = threading.Condition()
        self._deliver = self.client.register_script(DELIVER_LUA)
        self._deliver_keys = [self.keys.traj, self.keys.held, self.keys.produced, self.keys.delivered]
        self._queue: deque[Item] = deque()  # groups not yet handed to Redis
        self._buffers: list[bytearray] = []  # encode buffers of written batches, reused (sender thread only)
        self._inflight = 0  # groups in the batch being written right now
        self._error: BaseException | None = None
        self._closed = False
        self.sent = 0  # groups confirmed written
        self.sent_bytes = 0
        self._thread = threading.Thread(target=self._run, name=f"dcrl-writer-{actor_id}", daemon=True)
        self._thread.start()

    @property
    def held(self) -> int:
        """Groups accepted by send() and not yet confirmed written to Redis."""
        with self._cond:
            return len(self._queue) + self._inflight

    def try_send(self, group: TrajectoryGroup, slot: str | None = None) -> bool:
        """:meth:`send` if it would not block (fewer than ``redis.max_held_groups`` groups held): True once
        queued; False, queueing nothing, otherwise. For an event loop, which must not block but need not pay a
        thread hand-off per group while Redis keeps up."""
        with self._cond:
            if self._held_locked() >= self.cfg.max_held_groups:
                return False
            self.send(group, slot)  # the condition's lock is re-entrant: it cannot block now
            return True

    def send(self, group: TrajectoryGroup, slot: str | None = None) -> None:
        """Queue ``group`` for Redis, with the admission ``slot`` it was admitted under (``ControlPlane.admit``;
        the write settles it) or None. Blocks only while ``redis.max_held_groups`` groups are already held."""
        size = encoded_size_hint(group)
        with self._cond:
            self._raise_if_failed()
            if self._closed:
                raise RuntimeError("GroupWriter.send() after close()")
            if self._held_locked() >= self.cfg.max_held_groups:
                log.warning("writer %s: holding %d groups (redis.max_held_groups) while redis is slow or down; "
                            "send() waits for it", self.actor_id, self._held_locked())
                t0 = time.monotonic()
                while self._held_locked() >= self.cfg.max_held_groups:
                    self._cond.wait()
                    self._raise_if_failed()
                log.info("writer %s: redis accepts groups again after %.1f s", self.actor_id, time.monotonic() - t0)
            self._queue.append((group, slot, size))
            self._cond.notify_all()

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait until every held group is written, or ``timeout_s`` passed; returns the groups still held."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._held_locked() and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._raise_if_failed()
            return self._held_locked()

    def close(self, timeout_s: float = 30.0) -> int:
        """Flush for up to ``timeout_s``, stop the sender, close the connection. Returns groups not delivered
        (logged as a warning when > 0)."""
        with self._cond:
            if self._closed:
                return self._held_locked()
        try:
            self.flush(timeout_s)
        finally:
            with self._cond:
                self._closed = True
                self._stop.set()
                self._cond.notify_all()
            self._thread.join()
            self.client.close()
        lost = self.held
        if lost:
            log.warning("writer %s: closed with %d groups not delivered (redis unreachable)", self.actor_id, lost)
        return lost

    def _held_locked(self) -> int:
        return len(self._queue) + self._inflight

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writer {self.actor_id}: sender thread failed: {self._error}") from self._error

    def _xadd_batch(self, batch: list[Item]) -> int:
        """Encode and write ``batch`` in one pipelined round trip; returns the bytes written.

        Groups are encoded here, in the sender thread, into the buffers of earlier batches (encoding into fresh
        memory costs ~7x more, in page faults; see ``protocol.encode_group``), and the buffers are kept once
        Redis has the batch. A fresh pipeline per attempt: redis-py empties a pipeline whose execute() failed.
        Each entry is one command (XADD, or one EVALSHA of the deliver script, atomic on its own); redis-py
        loads the script first if the server lacks it (a restarted Redis)."""
        views = [self._encode(group) for group, _, _ in batch]
        try:
            pipe = self.client.pipeline(transaction=False)
            for data, (_, slot, _) in zip(views, batch):
                if slot is None:
                    pipe.xadd(self.keys.traj, {"data": data})
                else:
                    self._deliver(keys=self._deliver_keys, args=[data, slot], client=pipe)
            pipe.execute()
            del pipe
            return sum(len(v) for v in views)
        finally:
            for v in views:
                buf = v.obj
                try:
                    v.release()
                except BufferError:  # something still holds a view of it: leave the buffer to it
                    continue
                if len(self._buffers) < MAX_BATCH_GROUPS:
                    self._buffers.append(buf)

    def _encode(self, group: TrajectoryGroup) -> memoryview:
        while self._buffers:
            try:
                return encode_group(group, self._buffers.pop())
            except BufferError:  # still exported (a failed write's leftovers): take another
                continue
        return encode_group(group)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                batch = take_batch(self._queue, MAX_BATCH_GROUPS, MAX_BATCH_BYTES)
                self._inflight = len(batch)
            try:
                written = self._retry.call(self._xadd_batch, batch)
            except Exception as exc:  # recorded for the actor thread, which re-raises it from send()/flush()
                with self._cond:
                    self._queue.extendleft(reversed(batch))
                    self._inflight = 0
                    if not (self._stop.is_set() and isinstance(exc, redis.exceptions.ConnectionError)):
                        self._error = exc
                        log.error("writer %s: sender thread stopped: %s", self.actor_id, exc)
                    self._cond.notify_all()
                return
            with self._cond:
                self._inflight = 0
                self.sent += len(batch)
                self.sent_bytes += written
                self._cond.notify_all()
