"""Weight updates on the actor side: hear about a new version, find its verified file, hand it to the engine.

The actor's weight task drives this module::

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

import logging
import os
import shutil
from pathlib import Path

from learner.weights_io import WEIGHTS_FILE, sha256_file
from protocol.messages import ProtocolError, WeightsReady, decode

log = logging.getLogger("dcrl.actor.weights")


class WeightsRefused(RuntimeError):
    """The announced weights could not be obtained with the announced sha256; ``str()`` says why."""


def version_dirname(version: int) -> str:
    """Directory name of one version, the same as the learner's: ``v{version:06d}``."""
    return f"v{version:06d}"


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


def resolve_weights(w: WeightsReady, cache_dir: str | os.PathLike, *, chunk_bytes: int = 4 << 20,
                    timeout_s: float = 30.0) -> Path:
    """A directory holding ``model.safetensors`` whose sha256 equals ``w.sha256``; blocking (hashes, fetches).

    Tried in order: the learner's directory ``w.path`` (shared filesystem); a copy fetched earlier into
    ``cache_dir/vXXXXXX``; a fresh fetch from the learner's file server ``w.url``. Raises WeightsRefused
    naming every reason when none gives the announced digest (e.g. a tampered file on a shared disk whose
    server copy is tampered too).
    """
    reasons = []
    local = Path(w.path) / WEIGHTS_FILE
    if _matches(local, w.sha256):
        return Path(w.path)
    reasons.append(f"{local}: " + ("sha256 mismatch" if local.is_file() else "not on this machine"))
    cached_dir = Path(cache_dir) / version_dirname(w.version)
    if _matches(cached_dir / WEIGHTS_FILE, w.sha256):
        return cached_dir
    if not w.url:
        raise WeightsRefused(f"weights v{w.version}: {'; '.join(reasons)}; no file server announced")
    from learner.publisher import fetch_weights  # pulls zmq in; only actors without the learner's disk get here

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
        if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit() and int(p.name[1:]) not in keep:
            shutil.rmtree(p, ignore_errors=True)  # a half-deleted cache dir is only re-fetched later
            deleted.append(int(p.name[1:]))
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
