"""Weight updates on the actor side: hear about a new version, find its verified file, hand it to the engine.

:class:`WeightSync` is the actor's weights loop (and its catch-up before a group starts). In outline::

    sub = WeightSubscriber(cfg.learner.zmq_pub)          # ZMQ SUB, connected once
    while running:
        w = await sub.latest(timeout_s)                  # newest WeightsReady heard, or None
        w = newest(w, control.latest_weights())          # Redis copy: late joiners, missed PUB messages
        if should_load(w, engine.version, refused):
            try:
                d = resolve_weights(w, cache_dir)        # in a thread: hashing and fetching block
            except WeightsRefused as e:                  # bad checksum, server refusal: keep current weights
                refused.add(refusal_key(w)); log(e)
            else:
                await engine.load_weights(d, w.version)  # pause(keep) -> reload_weights -> resume

Where the bytes come from: the learner's own directory when this machine sees it (shared filesystem)
and its sha256 matches the announcement; otherwise the learner's ZMQ file server (``WeightsReady.url``)
into ``<weights_cache_dir>/vXXXXXX/``, verified against the announced digest. A file that does not
match the announced digest is never loaded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from actors.io import IoThread, Stopping
from protocol.messages import Control, ProtocolError, WeightsReady, decode
from weights.fileserver import fetch_weights
from weights.format import WEIGHTS_FILE, parse_version_dirname, sha256_file, version_dirname

if TYPE_CHECKING:
    from configs.schema import DcrlConfig

log = logging.getLogger("dcrl.actor.weights")


class WeightsRefused(RuntimeError):
    """The announced weights could not be obtained with the announced sha256; ``str()`` says why."""


def refusal_key(w: WeightsReady) -> tuple[int, str]:
    """Identity of an announcement for the refused set: (version, sha256). A re-publication of the same
    version with another digest is a new announcement and gets a new chance."""
    return (w.version, w.sha256)


def newest(*candidates: WeightsReady | None) -> WeightsReady | None:
    """The announcement with the highest version among ``candidates`` (None entries ignored)."""
    present = [w for w in candidates if w is not None]
    return max(present, key=lambda w: w.version) if present else None


def should_load(w: WeightsReady | None, loaded_version: int, refused: set[tuple[int, str]]) -> bool:
    """Load ``w`` iff it exists, is newer than what the engine serves, and was not refused before."""
    return w is not None and w.version > loaded_version and refusal_key(w) not in refused


def _matches(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _link_private(src: Path, dest_dir: Path) -> bool:
    """Make ``dest_dir/model.safetensors`` this actor's own name for ``src``: a hard link (instant; the
    learner's prune then only drops its own name), or a copy where links cannot cross filesystems. False
    when ``src`` does not exist (not on this machine, or already pruned)."""
    if not src.is_file():
        return False
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f".{WEIGHTS_FILE}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except FileNotFoundError:
            raise
        except OSError:  # another filesystem, or no hard links there
            shutil.copyfile(src, tmp)
    except FileNotFoundError:  # pruned between the check and the link
        tmp.unlink(missing_ok=True)
        return False
    os.replace(tmp, dest_dir / WEIGHTS_FILE)
    return True


def resolve_weights(w: WeightsReady, cache_dir: str | os.PathLike, *, chunk_bytes: int = 4 << 20,
                    timeout_s: float = 30.0) -> Path:
    """This actor's private directory ``cache_dir/vXXXXXX`` holding a ``model.safetensors`` whose sha256 equals
    ``w.sha256``; blocking (hashes, links, fetches).

    The engine always loads from that private directory, never from the learner's: the learner prunes old
    versions (``learner.keep_versions``) whenever it likes, and a file hashed in one place and loaded from
    another could change in between. Tried in order: a verified copy already there (a restart); the
    learner's file ``w.path`` (shared filesystem), hard-linked in (copied across filesystems) and hashed
    there; a fresh fetch from the learner's file server ``w.url``. Raises WeightsRefused naming every reason
    when none gives the announced digest (e.g. a tampered file on a shared disk whose server copy is tampered
    too, or a version pruned before this actor got to it and no longer served).
    """
    reasons = []
    cached_dir = Path(cache_dir) / version_dirname(w.version)
    if _matches(cached_dir / WEIGHTS_FILE, w.sha256):
        return cached_dir
    local = Path(w.path) / WEIGHTS_FILE
    if _link_private(local, cached_dir):
        if _matches(cached_dir / WEIGHTS_FILE, w.sha256):
            return cached_dir
        (cached_dir / WEIGHTS_FILE).unlink(missing_ok=True)
        reasons.append(f"{local}: sha256 mismatch")
    else:
        reasons.append(f"{local}: not on this machine")
    if not w.url:
        raise WeightsRefused(f"weights v{w.version}: {'; '.join(reasons)}; no file server announced")
    try:
        fetch_weights(w.url, w.version, cached_dir, chunk_bytes=chunk_bytes, timeout_s=timeout_s,
                      expected_sha256=w.sha256)
    except (RuntimeError, ProtocolError) as e:  # refusal, digest mismatch, no answer, garbled reply
        reasons.append(f"fetch from {w.url}: {e}")
        raise WeightsRefused(f"weights v{w.version}: {'; '.join(reasons)}") from None
    return cached_dir


def prune_cache(cache_dir: str | os.PathLike, keep: set[int]) -> list[int]:
    """Delete fetched versions under ``cache_dir`` except those in ``keep``; return the deleted versions.

    Called after a successful load with {new version, previous version}: vLLM has read the file by
    then, and the previous one is kept for a quick look when debugging a bad update.
    """
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    deleted = []
    for p in root.iterdir():
        version = parse_version_dirname(p.name)
        if p.is_dir() and version is not None and version not in keep:
            shutil.rmtree(p, ignore_errors=True)  # a half-deleted cache dir is only re-fetched later
            deleted.append(version)
    return sorted(deleted)


class WeightSubscriber:
    """ZMQ SUB socket on the learner's announcements (``learner.zmq_pub``), read from the asyncio loop.

    PUB/SUB drops messages sent before the connection is up and while nobody listens; that is why the
    actor also reads the latest announcement from Redis (``ControlPlane.latest_weights``).
    """

    def __init__(self, endpoint: str):
        import zmq
        import zmq.asyncio

        self.endpoint = endpoint
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)  # zmq reconnects by itself while the learner is not up yet

    async def latest(self, timeout_s: float) -> WeightsReady | None:
        """Wait up to ``timeout_s`` for announcements; return the newest of all queued ones (older ones are
        superseded: only the newest version is worth loading). Malformed messages are logged and skipped."""
        import zmq

        best: WeightsReady | None = None
        wait_ms = int(timeout_s * 1000)
        while await self._sock.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0  # after the first message only drain what is already queued
            frame = await self._sock.recv()
            try:
                best = newest(best, decode(frame, WeightsReady))
            except ProtocolError as e:
                log.warning("ignoring a malformed WeightsReady from %s: %s", self.endpoint, e)
        return best

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()


def next_optional_load(now: float, reload_s: float, budget: float) -> float:
    """When the next reload that the staleness cap does not force may start, after one that took
    ``reload_s`` and ended at ``now``: reloads then take at most ``budget`` of the actor's time
    (``actor.reload_budget``). With budget 1 that is ``now``: every version as soon as it is announced."""
    return now + reload_s * (1.0 - budget) / budget


def weights_behind_cap(engine_version: int, learner_version: int, max_staleness: int) -> bool:
    """True when a group started now would sample from weights staler than the cap allows:
    engine_version < V - K (the learner at version V, staleness cap K)."""
    return engine_version < learner_version - max_staleness


class WeightSync:
    """One actor's weights: follows the learner's announcements and loads newer verified weights into the
    engine, one load at a time (the weights loop and the admission's catch-up share a lock).

    ``redis(fn, *args)`` runs a control-plane call off the loop and ``race(fut)`` awaits a future unless the
    actor is asked to stop (then :class:`actors.io.Stopping`): both are the actor's, so a stop request never
    waits on Redis, a fetch or a silent transfer server.
    """

    def __init__(self, cfg: "DcrlConfig", actor_id: str, engine, control, subscriber, stats, *,
                 redis: Callable[..., Awaitable[Any]], race: Callable[[asyncio.Future], Awaitable[Any]]):
        self.cfg = cfg
        self.actor_id = actor_id
        self.engine = engine
        self.control = control
        self.subscriber = subscriber
        self.stats = stats  # ActorStats: refused_updates, weight_loads
        self.refused: set[tuple[int, str]] = set()
        self.cache_dir = os.path.join(cfg.actor.weights_cache_dir, actor_id)
        self._redis = redis
        self._race = race
        self._files_io = IoThread(f"dcrl-{actor_id}-weights")
        self._lock: asyncio.Lock | None = None
        self._transfer = None  # actors.transfer.TransferClient, on the first collective WeightsReady
        self._next_optional_load = 0.0  # time.monotonic() before which the weights loop does not reload

    async def loop(self) -> None:
        """Follow the learner's announcements (ZMQ) and its copy in Redis; load whatever is newer, but no
        sooner than the reload budget allows (:func:`next_optional_load`; ``catch_up`` is not bound by it)."""
        poll = self.cfg.actor.weights_poll_s
        while True:
            heard = await self.subscriber.latest(poll) if self.subscriber is not None else None
            if self.subscriber is None:
                await asyncio.sleep(poll)
            w = newest(heard, await self._redis(self.control.latest_weights))
            wait = self._next_optional_load - time.monotonic()
            if wait > 0 and should_load(w, self.engine.version, self.refused):
                self.stats.deferred_loads += 1
                pause = asyncio.ensure_future(asyncio.sleep(wait))
                try:
                    await self._race(pause)
                finally:
                    pause.cancel()
                w = newest(w, await self._redis(self.control.latest_weights))  # newer ones came meanwhile
            await self.sync(w)

    async def catch_up(self, ctrl: Control | None) -> Control | None:
        """Before an admitted group starts: if the engine's weights are older than the staleness cap allows
        (engine version < V - K), load the newest published weights first. ``ctrl`` is the Control the admission
        was decided under (read in the same script, so no second read); returned as it is.

        The learner publishes weights V before it raises capacity in the control hash, but the announcement
        and the capacity reach this actor by different paths; without this check a synchronous run (K = 0)
        could start a group on V - 1 when the new capacity is seen before the WeightsReady."""
        if ctrl is None or not weights_behind_cap(self.engine.version, ctrl.version, ctrl.max_staleness):
            return ctrl
        stored = await self._redis(self.control.latest_weights)
        if stored is not None:
            await self.sync(stored)
        return ctrl

    async def refresh(self) -> bool:
        """Load the newest published weights now, whatever the reload budget (admission refused a group only
        because the engine's weights are too old). True if the engine's version moved."""
        before = self.engine.version
        await self.sync(await self._redis(self.control.latest_weights))
        return self.engine.version > before

    async def sync(self, w: WeightsReady | None) -> None:
        """Load ``w`` if it is newer than the engine's weights and not refused before; refuse it (one log
        line, current weights kept) if no file with its sha256 can be had."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._sync_locked(w)

    async def _sync_locked(self, w: WeightsReady | None) -> None:
        if not should_load(w, self.engine.version, self.refused):
            return
        if w.transport != "files":
            await self._pull(w)
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
        self._next_optional_load = next_optional_load(time.monotonic(), seconds, self.cfg.actor.reload_budget)
        log.info("%s: loaded weights v%d from %s (pause -> reload -> resume %.0f ms)", self.actor_id, w.version,
                 path, 1000 * seconds)
        await self._files_io.submit(prune_cache, self.cache_dir, {w.version, previous})

    async def _pull(self, w: WeightsReady) -> None:
        """``w`` is announced over a collective transport: have the learner broadcast its newest weights
        into the engine (``actors.transfer``). A refusal (learner busy restarting, no answer) is logged and
        retried at the next announcement or poll; a transfer that fails half-way raises (the engine is
        left paused rather than serving a half-loaded model)."""
        from actors.transfer import TransferClient, TransferRefused  # zmq.asyncio: only collective transports

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
        self._next_optional_load = next_optional_load(time.monotonic(), seconds, self.cfg.actor.reload_budget)
        log.info("%s: received weights v%d over %s (pause -> receive -> resume %.0f ms)", self.actor_id, version,
                 w.transport, 1000 * seconds)

    def close(self) -> None:
        if self._transfer is not None:
            self._transfer.close()
            self._transfer = None
