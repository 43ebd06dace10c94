"""Collective-group primitives both ends of a weight transfer use: the learner's channel (rank 0) and the
vLLM workers of an actor (ranks 1..N, through ``actors.vllm_ext``).

- :class:`GlooGroup`: a gloo process group of its own, shaped like vLLM's ``PyNcclCommunicator``.
- :func:`open_group`: join the trainer<->workers group for ``"nccl"`` or ``"gloo"``.
- :data:`VLLM_BACKEND`: the ``WeightTransferConfig.backend`` an actor's engine uses for each transport.
- :func:`packed_defaults`: vLLM's packed-broadcast geometry, the same on both sides.

The pull protocol built on these is described in ``learner/transfer.py``.
"""

from __future__ import annotations

import datetime

from protocol.vocab import COLLECTIVE_TRANSPORTS, CollectiveTransport

VLLM_BACKEND: dict[CollectiveTransport, str] = {"nccl": "nccl", "gloo": "dcrl_gloo"}
"""``WeightTransferConfig.backend`` of the actor's engine for each ``learner.weight_transfer``."""
_GLOO_PREFIX = "dcrl-weights"


class GlooGroup:
    """A gloo process group of its own (no ``torch.distributed`` global state), with the two methods of
    vLLM's ``PyNcclCommunicator`` that weight transfer uses: ``broadcast`` and ``destroy``.

    Rank 0 hosts the rendezvous store on ``host:port``; every socket is on ``host`` (127.0.0.1 locally).
    """

    def __init__(self, store, pg, rank: int, world_size: int):
        self._store = store
        self._pg = pg
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def create(cls, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> "GlooGroup":
        from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

        timeout = datetime.timedelta(seconds=timeout_s)
        store = TCPStore(host, port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
        opts = ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
        pg = ProcessGroupGloo(PrefixStore(_GLOO_PREFIX, store), rank, world_size, opts)
        return cls(store, pg, rank, world_size)

    def broadcast(self, tensor, src: int, stream=None) -> None:
        """In place on every rank; blocks until done (``stream`` is accepted for NCCL parity, unused)."""
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self._pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        pg, store, self._pg, self._store = self._pg, self._store, None, None
        if pg is not None and hasattr(pg, "shutdown"):
            pg.shutdown()
        del pg, store


def open_group(backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float):
    """Join the trainer<->workers group as ``rank``: vLLM's PyNcclCommunicator (on the current CUDA
    device) for ``nccl``, a :class:`GlooGroup` for ``gloo``. Blocks until every rank has joined."""
    if backend == "gloo":
        return GlooGroup.create(host, port, rank, world_size, timeout_s)
    if backend == "nccl":
        import torch
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        return stateless_init_process_group(host, port, rank, world_size, torch.accelerator.current_device_index())
    raise ValueError(f"unknown weight transfer backend {backend!r} (expected one of {COLLECTIVE_TRANSPORTS})")


def packed_defaults() -> tuple[int, int]:
    """vLLM's packed-broadcast geometry (buffer bytes, number of buffers), used by both sides."""
    from vllm.distributed.weight_transfer.packed_tensor import (DEFAULT_PACKED_BUFFER_SIZE_BYTES,
                                                                DEFAULT_PACKED_NUM_BUFFERS)

    return DEFAULT_PACKED_BUFFER_SIZE_BYTES, DEFAULT_PACKED_NUM_BUFFERS
