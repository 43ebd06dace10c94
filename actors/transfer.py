"""Actor side of the collective weight transfer (``learner.weight_transfer = "nccl"`` or ``"gloo"``).

The actor's weight task drives it when a WeightsReady with ``transport != "files"`` arrives::

    client = TransferClient(w.url, actor_id, timeout_s)
    v = await client.pull_into(engine, w.version)   # join if needed, ask, receive, relabel: the served version

The protocol and the learner's side are described in ``learner/transfer.py``.
"""

from __future__ import annotations

import logging

from protocol.messages import ProtocolError, TransferReply, TransferRequest, decode, encode

log = logging.getLogger("dcrl.actor.transfer")


class TransferRefused(RuntimeError):
    """The learner refused a join or pull (``str()`` gives its reason); the engine's weights are unchanged."""


class TransferClient:
    """One DEALER socket to the learner's transfer server, used from the actor's asyncio loop."""

    def __init__(self, endpoint: str, actor_id: str, *, timeout_s: float = 30.0, world_size: int = 1):
        import zmq.asyncio

        self.endpoint = endpoint
        self.actor_id = actor_id
        self.timeout_s = timeout_s
        self.world_size = world_size
        self.joined = False
        self._ctx = zmq.asyncio.Context()
        self._sock = None

    def _socket(self):
        import zmq

        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.endpoint)
        return self._sock

    async def request(self, req: TransferRequest) -> TransferReply:
        """Send one request and wait up to ``timeout_s`` for its reply. A timeout drops the socket (a late
        reply must not be read as the answer to the next request) and raises TransferRefused."""
        import zmq

        sock = self._socket()
        await sock.send(encode(req))
        if not await sock.poll(int(self.timeout_s * 1000), zmq.POLLIN):
            sock.close()
            self._sock = None
            raise TransferRefused(f"learner transfer server {self.endpoint} did not answer {req.op} "
                                  f"within {self.timeout_s}s")
        try:
            return decode(await sock.recv(), TransferReply)
        except ProtocolError as e:
            raise TransferRefused(f"garbled reply from {self.endpoint}: {e}") from None

    async def join(self, engine) -> TransferReply:
        """Open this actor's group with the learner and have the engine's workers join it."""
        reply = await self.request(TransferRequest(op="join", actor_id=self.actor_id, world_size=self.world_size))
        if reply.error:
            raise TransferRefused(f"join refused by {self.endpoint}: {reply.error}")
        info = {"master_address": reply.master_address, "master_port": reply.master_port, "rank_offset": 1,
                "world_size": reply.world_size, "packed": reply.packed}
        if reply.backend == "gloo":
            info["timeout_s"] = reply.timeout_s
        await engine.join_transfer(info)
        self.joined = True
        log.info("%s: joined the learner's %s weight transfer (%s:%d)", self.actor_id, reply.backend,
                 reply.master_address, reply.master_port)
        return reply

    async def pull_into(self, engine, version: int) -> tuple[int, float]:
        """Receive the learner's newest weights (>= ``version``) into ``engine``; returns (version served,
        pause-to-resume seconds). Joins first when needed, and once more if the learner lost the group."""
        for attempt in (0, 1):
            if not self.joined:
                await self.join(engine)
            reply = await self.request(TransferRequest(op="pull", actor_id=self.actor_id, version=version))
            if reply.rejoin and attempt == 0:
                log.warning("%s: %s", self.actor_id, reply.error)
                self.joined = False
                continue
            if reply.error:
                raise TransferRefused(f"pull of v{version} refused by {self.endpoint}: {reply.error}")
            info = {"names": reply.names, "dtype_names": reply.dtype_names, "shapes": reply.shapes}
            return reply.version, await engine.receive_weights(info, reply.version)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._ctx.term()
