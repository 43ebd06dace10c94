"""Weight publishing: versioned weight directories, a ZMQ announcement, and a ZMQ file server.

The learner drives it::

    pub = WeightPublisher(cfg.learner, run_dir, model_dir)     # binds PUB + starts the file server
    w = pub.publish(model, version)                            # dir v{version:06d}, announce, return
    control_plane.set_weights(w)                               # late joiners read it from Redis
    ...
    pub.close()

- ``<run_dir>/weights/v{version:06d}/`` is a complete HF directory (``model.safetensors`` via
  ``weights.format.write_weights``, plus config.json, generation_config.json and tokenizer files copied
  from the model directory). It is built under a temp name and renamed, so an actor never sees a half
  written version; the newest ``keep_versions`` are kept.
- PUB socket at ``cfg.zmq_pub``: one frame, ``encode(WeightsReady)``.
- ``weights.fileserver.WeightFileServer`` at ``cfg.zmq_files`` serves the files to actors that do not share
  the learner's disk (``weights.fileserver.fetch_weights`` is the client); with a collective transport the
  learner's ``learner.transfer.TransferServer`` broadcasts snapshots instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from protocol.messages import WeightsReady, encode
from protocol.vocab import WeightQuant
from weights.fileserver import WeightFileServer, kept_versions, version_dir
from weights.format import companion_files, write_weights

log = logging.getLogger("dcrl.publisher")

def write_version_dir(model, run_dir: str | os.PathLike, version: int, model_dir: str | os.PathLike,
                      dtype: str | None = None, quant: WeightQuant = "none") -> tuple[Path, str]:
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
    sha = write_weights(model, tmp, dtype, quant)
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


class WeightPublisher:
    """Writes each published version, announces it on ZMQ PUB, and serves its bytes.

    Owned by the learner; ``publish`` is called from the training thread only.
    """

    def __init__(self, lcfg, run_dir: str | os.PathLike, model_dir: str | os.PathLike, *,
                 actor_dtype: str = "auto", weight_quant: WeightQuant = "none"):
        import zmq

        self.cfg = lcfg
        self.run_dir = Path(run_dir)
        self.model_dir = Path(model_dir)
        # Published weights are in the actors' compute dtype (half the bytes of fp32 for bf16), files and
        # broadcasts alike: vLLM would round them to it on load anyway, so the actors serve the same values.
        self.wire_dtype = None if actor_dtype == "auto" else actor_dtype
        self.weight_quant = weight_quant  # heterogeneous rollout: actors serve int8/fp8-rounded weights
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
        path, sha = write_version_dir(model, self.run_dir, version, self.model_dir, self.wire_dtype,
                                      self.weight_quant)
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
        snap = take_snapshot(model, version, wire_dtype=self.wire_dtype, quant=self.weight_quant,
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
