"""Collective weight transfer: the learner broadcasts its weights straight into the actors' vLLM workers.

``learner.weight_transfer = "nccl"`` (GPU learner, GPU actors) or ``"gloo"`` (CPU, and the CPU test of the
same protocol). The worker side is vLLM's own weight-transfer engine (``WeightTransferConfig``): NCCL is
vLLM's ``NCCLWeightTransferEngine`` unchanged; gloo is a subclass that only swaps the communicator
(``actors.vllm_ext``). No weight file is written or read. ``"files"`` (the default) keeps the versioned
safetensors directories of ``learner.publisher``.

Pull protocol, one ROUTER socket at ``learner.zmq_transfer`` (this module's :class:`TransferServer`)::

    actor                                             learner
    TransferRequest(op="join", actor_id, world_size) ->  pick a free port, open a Channel thread that
                                                      <- TransferReply(master_address, master_port, ...)
    engine.init_weight_transfer_engine(...)    ...... rendezvous: the Channel is rank 0, vLLM workers 1..N
    (WeightsReady with transport="nccl"/"gloo" is published on ZMQ PUB and in Redis as before)
    TransferRequest(op="pull", actor_id, version) ->  the newest snapshot (version >= asked)
                                                      <- TransferReply(version, names, dtype_names, shapes)
    pause(keep) -> start_weight_update ->              the Channel broadcasts the snapshot's tensors
      update_weights(names, dtypes, shapes)  ......   (packed into fixed buffers on NCCL)
      -> finish_weight_update -> label -> resume

The actor decides when to load, as with files; the learner never blocks its training step on an actor.
One channel (process group of 1 + the actor's inference ranks, and one thread) per actor: an actor that
dies breaks only its own channel, and when it comes back it joins again and replaces it.

Snapshot: at each publish the learner copies its weights (on its device, in the wire dtype) into a new
snapshot and swaps it in; a channel broadcasting an older one keeps its reference until done. Memory:
up to two copies of the weights in the wire dtype on the learner's device.

Failure handling: a broadcast that fails or times out (gloo: ``learner.transfer_timeout_s``) marks the
channel broken and the actor's next pull is told to join again. NCCL has no timeout of its own: a
channel whose actor died in the middle of a broadcast keeps its thread blocked until the learner exits,
and with ``learner.transfer_packed`` (vLLM's packed producer shares its CUDA streams across channels, so
packed broadcasts go one at a time) it blocks the other actors' broadcasts too. Where actors die often,
``transfer_packed = false`` keeps each channel on its own stream and independent of the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from buffer.server import free_port
from protocol.messages import ProtocolError, TransferReply, TransferRequest, decode, encode
from protocol.vocab import COLLECTIVE_TRANSPORTS, WeightQuant
from weights.collective import open_group, packed_defaults
from weights.format import published_tensors, wire_tensor
from weights.router import RouterServer

log = logging.getLogger("dcrl.transfer")

_NCCL_PACKED_LOCK = threading.Lock()
"""One packed NCCL broadcast at a time in the learner: vLLM's packed producer shares its CUDA streams
process-wide, and serialising keeps two channels' collectives from interleaving on them. Unpacked
broadcasts use a stream per channel and run side by side."""


# ------------------------------------------------------------------ snapshots


@dataclass(frozen=True)
class Snapshot:
    """One published version's tensors, in the order and with the names the actors load them."""

    version: int
    names: list[str]
    tensors: list  # torch.Tensor, contiguous, on the learner's device
    nbytes: int

    @property
    def dtype_names(self) -> list[str]:
        return [str(t.dtype).removeprefix("torch.") for t in self.tensors]

    @property
    def shapes(self) -> list[list[int]]:
        return [list(t.shape) for t in self.tensors]


def take_snapshot(model, version: int, wire_dtype: str | None = None, device=None,
                  quant: WeightQuant = "none") -> Snapshot:
    """Copy the model's published tensors (``weights.format.published_tensors``: the state dict plus
    an explicit ``lm_head.weight``), floating ones cast to ``wire_dtype`` (a torch dtype name) when given,
    onto ``device`` when given (else they stay on the model's device).

    Returns only once the copies exist: on a GPU the copy kernels are waited for, so a channel that
    broadcasts the snapshot from its own CUDA stream never reads a half-written tensor."""
    import torch

    with torch.no_grad():
        pairs = [(name, wire_tensor(t, wire_dtype, device, copy=True)) for name, t in published_tensors(model, quant)]
    if any(t.is_cuda for _, t in pairs):
        torch.cuda.synchronize()
    tensors = [t for _, t in pairs]
    return Snapshot(version, [n for n, _ in pairs], tensors, sum(t.numel() * t.element_size() for t in tensors))


# ------------------------------------------------------------------ channels


@dataclass
class ChannelStats:
    broadcasts: int = 0
    bytes: int = 0
    last_seconds: float = 0.0
    last_version: int = -1


class Channel:
    """The learner's end (rank 0) of one actor's group, driven by its own thread.

    The thread opens the group (blocking until the actor's workers join, at most ``timeout_s``), then
    broadcasts each snapshot handed to :meth:`send`, in order. Any error marks the channel broken.
    """

    def __init__(self, actor_id: str, backend: str, host: str, port: int, world_size: int, *, timeout_s: float,
                 packed: bool, device_index: int | None = None):
        self.actor_id = actor_id
        self.backend = backend
        self.host, self.port, self.world_size = host, port, world_size
        self.timeout_s = timeout_s
        self.packed = packed
        self.device_index = device_index
        self.stats = ChannelStats()
        self.error: str = ""
        self._jobs: queue.Queue = queue.Queue()
        self._group = None
        self._stream = None  # NCCL: this channel's CUDA stream
        self._thread = threading.Thread(target=self._run, name=f"dcrl-transfer-{actor_id}", daemon=True)
        self._thread.start()

    @property
    def broken(self) -> bool:
        return bool(self.error)

    def send(self, snap: Snapshot) -> None:
        self._jobs.put(snap)

    def close(self) -> None:
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            if self.device_index is not None:
                import torch

                torch.cuda.set_device(self.device_index)
            self._group = open_group(self.backend, self.host, self.port, 0, self.world_size, self.timeout_s)
            log.info("%s joined the %s weight transfer group (port %d, world %d)", self.actor_id, self.backend,
                     self.port, self.world_size)
            while (snap := self._jobs.get()) is not None:
                t0 = time.perf_counter()
                self._broadcast(snap)
                dt = time.perf_counter() - t0
                s = self.stats
                s.broadcasts, s.bytes, s.last_seconds, s.last_version = s.broadcasts + 1, s.bytes + snap.nbytes, dt, snap.version
                log.debug("v%d -> %s: %.1f MB in %.0f ms", snap.version, self.actor_id, snap.nbytes / 1e6, 1000 * dt)
        except BaseException as e:  # noqa: BLE001 - a broken channel must say why, whatever broke it
            self.error = f"{type(e).__name__}: {e}"
            log.warning("weight transfer channel of %s broke: %s", self.actor_id, self.error)
        finally:
            group, self._group = self._group, None
            if group is not None:
                try:
                    group.destroy()
                except Exception as e:  # noqa: BLE001 - teardown of a broken group may fail too
                    log.debug("destroying %s's group: %s", self.actor_id, e)

    def _broadcast(self, snap: Snapshot) -> None:
        if self.backend == "gloo":
            for t in snap.tensors:
                self._group.broadcast(t, src=0)
            return
        # NCCL: on a stream of this channel, so that the broadcast (which waits for the actor) never
        # stalls the training kernels on the default stream. take_snapshot waited for the copies.
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream()
        if self.packed:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            size, num = packed_defaults()
            with _NCCL_PACKED_LOCK, torch.cuda.stream(self._stream):
                packed_nccl_broadcast_producer(iterator=iter(zip(snap.names, snap.tensors)), group=self._group,
                                               src=0, post_iter_func=lambda item: item[1], buffer_size_bytes=size,
                                               num_buffers=num)
                self._stream.synchronize()
            return
        with torch.cuda.stream(self._stream):
            for t in snap.tensors:
                self._group.broadcast(t, src=0, stream=self._stream)
            self._stream.synchronize()


# ------------------------------------------------------------------ server


class TransferServer(RouterServer):
    """ROUTER thread at ``endpoint`` answering join and pull requests; see the module docstring.

    ``set_snapshot`` is called by the training thread at each publish; everything else runs in the
    server thread and the channels' threads.
    """

    def __init__(self, endpoint: str, backend: str, *, host: str = "127.0.0.1", timeout_s: float = 120.0,
                 packed: bool = False, device_index: int | None = None, poll_ms: int = 100):
        if backend not in COLLECTIVE_TRANSPORTS:
            raise ValueError(f"learner.weight_transfer: unknown backend {backend!r} "
                             f"(expected one of {COLLECTIVE_TRANSPORTS})")
        if packed and backend != "nccl":
            raise ValueError("packed weight transfer needs the nccl backend")
        self.backend, self.host, self.timeout_s = backend, host, timeout_s
        self.packed, self.device_index = packed, device_index
        self.channels: dict[str, Channel] = {}  # touched by the server thread only (and close)
        self.refused = 0  # malformed or refused requests answered with an error
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()
        super().__init__(endpoint, "learner.zmq_transfer", thread_name="dcrl-transfer-server", poll_ms=poll_ms)

    def set_snapshot(self, snap: Snapshot) -> None:
        with self._lock:
            self._snapshot = snap

    @property
    def snapshot(self) -> Snapshot | None:
        with self._lock:
            return self._snapshot

    def handle(self, req: TransferRequest) -> TransferReply:
        """The reply to one decoded request (starts a channel on join, queues a broadcast on pull)."""
        if req.op == "join":
            return self._join(req)
        if req.op == "pull":
            return self._pull(req)
        return TransferReply(op=req.op, error=f"unknown op {req.op!r} (expected 'join' or 'pull')")

    def _join(self, req: TransferRequest) -> TransferReply:
        if req.world_size < 1:
            return TransferReply(op="join", error=f"world_size {req.world_size} < 1")
        old = self.channels.pop(req.actor_id, None)
        if old is not None:  # a restarted actor: its old group is dead
            old.close()
        port = free_port()
        self.channels[req.actor_id] = Channel(req.actor_id, self.backend, self.host, port, 1 + req.world_size,
                                              timeout_s=self.timeout_s, packed=self.packed,
                                              device_index=self.device_index)
        return TransferReply(op="join", backend=self.backend, master_address=self.host, master_port=port,
                             world_size=1 + req.world_size, packed=self.packed, timeout_s=self.timeout_s)

    def _pull(self, req: TransferRequest) -> TransferReply:
        ch = self.channels.get(req.actor_id)
        if ch is None:
            return TransferReply(op="pull", rejoin=True, error=f"{req.actor_id} has not joined (or the learner "
                                                                "restarted): join again")
        if ch.broken:
            self.channels.pop(req.actor_id, None)
            return TransferReply(op="pull", rejoin=True, error=f"channel broken ({ch.error}): join again")
        snap = self.snapshot
        if snap is None:
            return TransferReply(op="pull", error="no weights published yet")
        if snap.version < req.version:
            return TransferReply(op="pull", error=f"version {req.version} is not published (newest {snap.version})")
        ch.send(snap)
        return TransferReply(op="pull", version=snap.version, names=snap.names, dtype_names=snap.dtype_names,
                             shapes=snap.shapes)

    def reply(self, payload: bytes) -> list[bytes]:
        try:
            reply = self.handle(decode(payload, TransferRequest))
        except ProtocolError as e:
            reply = TransferReply(op="", error=f"bad request: {e}")
        if reply.error:
            self.refused += 1
            log.warning("weight transfer request refused: %s", reply.error)
        return [encode(reply)]

    def close(self) -> None:
        super().close()
        for ch in self.channels.values():
            ch.close()
        for ch in self.channels.values():
            ch.join(timeout=5)
        self.channels.clear()
