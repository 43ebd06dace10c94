"""Weight publishing: versioned weight directories, a ZMQ announcement, and a ZMQ file server.

The learner drives it::

    pub = WeightPublisher(cfg.learner, run_dir, model_dir)     # binds PUB + starts the file server
    w = pub.publish(model, version)                            # dir v{version:06d}, announce, return
    control_plane.set_weights(w)                               # late joiners read it from Redis
    ...
    pub.close()

- ``<run_dir>/weights/v{version:06d}/`` is a complete HF directory (``model.safetensors`` via
  ``learner.weights_io.write_weights``, plus config.json, generation_config.json and tokenizer files copied
  from the model directory). It is built under a temp name and renamed, so an actor never sees a half
  written version; the newest ``keep_versions`` are kept.
- PUB socket at ``cfg.zmq_pub``: one frame, ``encode(WeightsReady)``.
- ROUTER socket at ``cfg.zmq_files`` (``learner.router.RouterServer``: its own thread): a DEALER sends
  ``encode(FetchChunk)`` and receives ``[encode(ChunkHeader), bytes]``; unknown or pruned versions and
  malformed requests get a header with ``error`` set and an empty data frame. :func:`fetch_weights` is the
  client.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

from learner.router import RouterServer
from learner.weights_io import WEIGHTS_FILE, sha256_file, write_weights
from protocol.messages import ChunkHeader, FetchChunk, ProtocolError, WeightsReady, decode, encode

log = logging.getLogger("dcrl.publisher")

WEIGHTS_DIR = "weights"
MAX_CHUNK_BYTES = 16 << 20
"""Largest chunk the file server sends in one reply (bounds its memory per request)."""
_VERSION_RE = re.compile(r"^v(\d{6,})$")
# Files of a model directory that are weights (never copied: the published file replaces them).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def weights_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / WEIGHTS_DIR


def version_dir(run_dir: str | os.PathLike, version: int) -> Path:
    """``<run_dir>/weights/v{version:06d}``: where version ``version`` is published."""
    return weights_root(run_dir) / f"v{version:06d}"


def kept_versions(run_dir: str | os.PathLike) -> list[int]:
    """Published versions present on disk, ascending."""
    root = weights_root(run_dir)
    if not root.exists():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name)) and p.is_dir())


def companion_files(model_dir: str | os.PathLike) -> list[Path]:
    """Files of the model directory to copy beside each published weight file: config, generation
    config, tokenizer files (everything that is a regular file and not weights or a weight index)."""
    out = []
    for p in sorted(Path(model_dir).iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        out.append(p)
    return out


def write_version_dir(model, run_dir: str | os.PathLike, version: int, model_dir: str | os.PathLike,
                      dtype: str | None = None) -> tuple[Path, str]:
    """Write version ``version`` as a loadable HF directory (floating tensors in ``dtype`` when given),
    atomically; return (dir, sha256).

    Built in ``weights/.tmp-vXXXXXX-<pid>`` then renamed. Re-publishing an existing version (a restarted
    learner whose Redis version ran ahead of its checkpoint) swaps the old directory out first.
    """
    final = version_dir(run_dir, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    sha = write_weights(model, tmp, dtype)
    for f in companion_files(model_dir):
        shutil.copy2(f, tmp / f.name)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    return final, sha


def prune_versions(run_dir: str | os.PathLike, keep: int, current: int) -> list[int]:
    """Delete all published versions but the newest ``keep`` (never ``current``); return those deleted."""
    versions = kept_versions(run_dir)
    doomed = [v for v in versions[:-keep] if v != current]
    for v in doomed:
        shutil.rmtree(version_dir(run_dir, v), ignore_errors=True)  # a concurrent prune is harmless
    return doomed


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


class WeightPublisher:
    """Writes each published version, announces it on ZMQ PUB, and serves its bytes.

    Owned by the learner; ``publish`` is called from the training thread only.
    """

    def __init__(self, lcfg, run_dir: str | os.PathLike, model_dir: str | os.PathLike, *,
                 actor_dtype: str = "auto"):
        import zmq

        self.cfg = lcfg
        self.run_dir = Path(run_dir)
        self.model_dir = Path(model_dir)
        # Published weights are in the actors' compute dtype (half the bytes of fp32 for bf16), files and
        # broadcasts alike: vLLM would round them to it on load anyway, so the actors serve the same values.
        self.wire_dtype = None if actor_dtype == "auto" else actor_dtype
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 1000)
        try:
            self._pub.bind(lcfg.zmq_pub)
        except zmq.ZMQError as e:
            self._pub.close()
            raise RuntimeError(f"learner.zmq_pub: cannot bind {lcfg.zmq_pub}: {e}") from None
        self.files = self.transfer = None
        try:
            if lcfg.weight_transfer == "files":
                self.files = WeightFileServer(lcfg.zmq_files, self.run_dir)
            else:
                self.transfer = self._transfer_server(lcfg)
        except (RuntimeError, ValueError):
            self._pub.close()
            raise

    @staticmethod
    def _transfer_server(lcfg):
        import torch

        from learner.transfer import TransferServer

        on_gpu = lcfg.weight_transfer == "nccl"
        if on_gpu and not torch.cuda.is_available():
            raise RuntimeError("learner.weight_transfer = \"nccl\" needs a CUDA learner: no GPU is visible "
                               "(use \"gloo\" or \"files\" on CPU)")
        return TransferServer(lcfg.zmq_transfer, lcfg.weight_transfer, host=lcfg.transfer_host,
                              timeout_s=lcfg.transfer_timeout_s, packed=on_gpu and lcfg.transfer_packed,
                              device_index=torch.cuda.current_device() if on_gpu else None)

    def publish(self, model, version: int) -> WeightsReady:
        """Publish version ``version`` and announce it; return the announcement.

        files: write its directory and prune old ones. nccl/gloo: swap in a new snapshot of the weights
        (on the learner's GPU for nccl, on CPU for gloo) that the transfer server broadcasts on pulls.
        """
        if self.transfer is not None:
            return self._publish_snapshot(model, version)
        t0 = time.perf_counter()
        path, sha = write_version_dir(model, self.run_dir, version, self.model_dir, self.wire_dtype)
        self.files.remember(version, sha)
        prune_versions(self.run_dir, self.cfg.keep_versions, version)
        msg = WeightsReady(version=version, path=str(path.resolve()), sha256=sha, url=self.cfg.zmq_files,
                           created_at=time.time())
        self._pub.send(encode(msg))
        log.debug("published v%d (%.0f ms) at %s", version, 1000 * (time.perf_counter() - t0), path)
        return msg

    def _publish_snapshot(self, model, version: int) -> WeightsReady:
        from learner.transfer import take_snapshot

        t0 = time.perf_counter()
        snap = take_snapshot(model, version, wire_dtype=self.wire_dtype,
                             device="cpu" if self.cfg.weight_transfer == "gloo" else None)
        self.transfer.set_snapshot(snap)
        msg = WeightsReady(version=version, path="", sha256="", url=self.cfg.zmq_transfer, created_at=time.time(),
                           transport=self.cfg.weight_transfer)
        self._pub.send(encode(msg))
        log.debug("snapshot v%d (%.1f MB, %.0f ms)", version, snap.nbytes / 1e6, 1000 * (time.perf_counter() - t0))
        return msg

    def close(self) -> None:
        if self.files is not None:
            self.files.close()
        if self.transfer is not None:
            self.transfer.close()
        self._pub.close()


def fetch_weights(url: str, version: int, dest_dir: str | os.PathLike, *, chunk_bytes: int = 4 << 20,
                  timeout_s: float = 30.0, expected_sha256: str | None = None) -> tuple[Path, str]:
    """Download ``model.safetensors`` of ``version`` from a :class:`WeightFileServer` into ``dest_dir``.

    Written to a temp file, checked against the digest the server reports (and ``expected_sha256`` when
    given, e.g. from WeightsReady), then renamed. Returns (path, sha256). Raises RuntimeError with the
    server's reason for refused requests, a digest mismatch, or no answer within ``timeout_s`` per chunk.
    """
    import hashlib

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
