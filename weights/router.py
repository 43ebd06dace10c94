"""A ZMQ ROUTER socket served by a thread of its own: the learner's weight file server and its weight
transfer server are both one of these.

The socket is created, used and closed inside the thread (ZMQ sockets are not thread-safe). Each request
is one frame; :meth:`RouterServer.reply` turns it into the reply's frames, sent on the request's envelope.
"""

from __future__ import annotations

import threading


class RouterServer:
    """Subclasses implement :meth:`reply`; ``what`` names the server in the bind error (e.g. the config
    field holding the endpoint)."""

    def __init__(self, endpoint: str, what: str, *, thread_name: str, poll_ms: int = 100):
        self.endpoint = endpoint
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError(f"{what}: cannot bind {endpoint}: {self._error}") from None

    def reply(self, payload: bytes) -> list[bytes]:
        raise NotImplementedError

    def _run(self) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            self._error = e
            sock.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(self._poll_ms):
                    continue
                frames = sock.recv_multipart()
                # [identity, (empty delimiter,) payload]: reply on the same envelope.
                envelope, payload = frames[:-1], frames[-1]
                sock.send_multipart([*envelope, *self.reply(payload)])
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
