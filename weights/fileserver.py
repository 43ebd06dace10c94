"""Weight files over ZMQ: the learner serves ``<run_dir>/weights/vXXXXXX/model.safetensors`` in chunks, an
actor without the learner's disk fetches them.

Server (learner)::

    files = WeightFileServer(cfg.learner.zmq_files, run_dir)   # ROUTER socket, thread of its own
    files.remember(version, sha256)                           # digest known from the write
    files.close()

Client (actor)::

    path, sha = fetch_weights(url, version, dest_dir, expected_sha256=w.sha256)

A DEALER sends ``encode(FetchChunk)`` and receives ``[encode(ChunkHeader), bytes]``; unknown or pruned
versions and malformed requests get a header with ``error`` set and an empty data frame.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from protocol.messages import ChunkHeader, FetchChunk, ProtocolError, decode, encode
from weights.format import WEIGHTS_FILE, parse_version_dirname, sha256_file, version_dirname
from weights.router import RouterServer

WEIGHTS_DIR = "weights"
MAX_CHUNK_BYTES = 16 << 20
"""Largest chunk the file server sends in one reply (bounds its memory per request)."""


def weights_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / WEIGHTS_DIR


def version_dir(run_dir: str | os.PathLike, version: int) -> Path:
    """``<run_dir>/weights/v{version:06d}``: where version ``version`` is published."""
    return weights_root(run_dir) / version_dirname(version)


def kept_versions(run_dir: str | os.PathLike) -> list[int]:
    """Published versions present on disk, ascending."""
    root = weights_root(run_dir)
    if not root.exists():
        return []
    return sorted(v for p in root.iterdir() if (v := parse_version_dirname(p.name)) is not None and p.is_dir())


class WeightFileServer(RouterServer):
    """ROUTER thread serving chunks of ``weights/vXXXXXX/model.safetensors`` for any kept version.

    :meth:`close` stops it. Digests are cached per (version, inode, mtime) so a re-published version
    is re-hashed.
    """

    def __init__(self, endpoint: str, run_dir: str | os.PathLike, poll_ms: int = 100):
        self.run_dir = Path(run_dir)
        self._lock = threading.Lock()
        self._sha: dict[tuple[int, int, int], str] = {}
        super().__init__(endpoint, "learner.zmq_files (weight file server)", thread_name="dcrl-weight-files",
                         poll_ms=poll_ms)

    def remember(self, version: int, sha256: str) -> None:
        """Seed the digest cache (the publisher just computed it while writing)."""
        st = (version_dir(self.run_dir, version) / WEIGHTS_FILE).stat()
        with self._lock:
            self._sha[(version, st.st_ino, st.st_mtime_ns)] = sha256

    def _digest(self, version: int, path: Path, st: os.stat_result) -> str:
        key = (version, st.st_ino, st.st_mtime_ns)
        with self._lock:
            sha = self._sha.get(key)
        if sha is None:
            sha = sha256_file(path)
            with self._lock:
                self._sha[key] = sha
        return sha

    def serve_chunk(self, req: FetchChunk) -> tuple[ChunkHeader, bytes]:
        """The reply to one request (pure apart from reading the file)."""
        if req.offset < 0 or req.size <= 0:
            return ChunkHeader(version=req.version, offset=req.offset, total=0, sha256="",
                               error=f"bad request: offset {req.offset}, size {req.size}"), b""
        path = version_dir(self.run_dir, req.version) / WEIGHTS_FILE
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                f.seek(req.offset)
                data = f.read(min(req.size, MAX_CHUNK_BYTES))
        except FileNotFoundError:
            kept = kept_versions(self.run_dir)
            return ChunkHeader(version=req.version, offset=req.offset, total=0, sha256="",
                               error=f"version {req.version} is not kept (kept: {kept})"), b""
        sha = self._digest(req.version, path, st)
        return ChunkHeader(version=req.version, offset=req.offset, total=st.st_size, sha256=sha), data

    def reply(self, payload: bytes) -> list[bytes]:
        try:
            req = decode(payload, FetchChunk)
        except ProtocolError as e:
            return [encode(ChunkHeader(version=-1, offset=0, total=0, sha256="", error=f"bad request: {e}")), b""]
        header, data = self.serve_chunk(req)
        return [encode(header), data]


def fetch_weights(url: str, version: int, dest_dir: str | os.PathLike, *, chunk_bytes: int = 4 << 20,
                  timeout_s: float = 30.0, expected_sha256: str | None = None) -> tuple[Path, str]:
    """Download ``model.safetensors`` of ``version`` from a :class:`WeightFileServer` into ``dest_dir``.

    Written to a temp file, checked against the digest the server reports (and ``expected_sha256`` when
    given, e.g. from WeightsReady), then renamed. Returns (path, sha256). Raises RuntimeError with the
    server's reason for refused requests, a digest mismatch, or no answer within ``timeout_s`` per chunk.
    """
    import zmq

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / WEIGHTS_FILE
    tmp = dest / f".{WEIGHTS_FILE}.fetch-{os.getpid()}"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    h = hashlib.sha256()
    offset, total, server_sha = 0, None, None
    try:
        with open(tmp, "wb") as f:
            while total is None or offset < total:
                sock.send(encode(FetchChunk(version=version, offset=offset, size=chunk_bytes)))
                if not sock.poll(int(timeout_s * 1000)):
                    raise RuntimeError(f"weight server {url} did not answer within {timeout_s}s (version {version})")
                header_b, data = sock.recv_multipart()
                header = decode(header_b, ChunkHeader)
                if header.error:
                    raise RuntimeError(f"weight server {url} refused version {version}: {header.error}")
                if server_sha is not None and header.sha256 != server_sha:
                    raise RuntimeError(f"version {version} changed on the server during the fetch")
                server_sha, total = header.sha256, header.total
                f.write(data)
                h.update(data)
                offset += len(data)
                if not data and offset < total:
                    raise RuntimeError(f"weight server {url} sent an empty chunk at {offset}/{total}")
            f.flush()
            os.fsync(f.fileno())
        sha = h.hexdigest()
        for want in (server_sha, expected_sha256):
            if want is not None and sha != want:
                raise RuntimeError(f"sha256 mismatch for version {version}: got {sha}, expected {want}")
        os.replace(tmp, final)
        return final, sha
    finally:
        sock.close()
        if tmp.exists():
            tmp.unlink()
