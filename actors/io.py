"""Blocking work off the actor's event loop: an ordered I/O thread, the liveness lease, and the stop signal.

The actor runs every Redis call, hash and file fetch in an :class:`IoThread` (one per kind of work, so a
Redis outage never delays a weight fetch and vice versa) and awaits the returned future, racing it
against a stop request (:class:`Stopping`). The :class:`LeaseKeeper` renews the lease that tells the
learner this actor still owns its admitted slots.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("dcrl.actor")


class IoThread:
    """One daemon thread running blocking calls (Redis through outages, hashing) for the asyncio loop.

    Calls run in submission order. Daemon, unlike asyncio's default executor: a call stuck retrying
    during a Redis outage must not keep the process alive after the actor has decided to exit.
    """

    def __init__(self, name: str):
        self._queue: list = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            self._queue.append((loop, fut, fn, args))
            self._cond.notify()
        return fut

    @staticmethod
    def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
        if fut.done():  # the awaiting side gave up (cancelled); nobody reads the result
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                loop, fut, fn, args = self._queue.pop(0)
            try:
                value, ok = fn(*args), True
            except BaseException as e:  # handed to the awaiting coroutine, which re-raises it
                value, ok = e, False
            try:
                loop.call_soon_threadsafe(self._settle, fut, ok, value)
            except RuntimeError:  # the loop closed (process exit) while this call ran: nobody waits for it
                pass


class LeaseKeeper:
    """Renews the actor's liveness lease (``ControlPlane.keep_lease``) every ``lease_s / 3`` from a thread of
    its own, so a busy event loop never lets it lapse; :meth:`stop` ends it and deletes the lease."""

    def __init__(self, control, actor_id: str, lease_s: float):
        self.control, self.actor_id, self.lease_s = control, actor_id, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dcrl-{actor_id}-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.control.keep_lease(self.actor_id, self.lease_s)
            except Exception as e:  # noqa: BLE001 - an outage must not kill the renewals; the next one retries
                log.warning("%s: lease renewal failed: %s", self.actor_id, e)
            if self._stop.wait(self.lease_s / 3):
                return

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the renewals and delete the lease, waiting at most ``timeout_s`` in all: a Redis that does not
        answer is left behind (the call goes on in a daemon thread) and the lease lapses by itself."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._thread.join(timeout=timeout_s)

        def drop() -> None:
            try:
                self.control.drop_lease(self.actor_id)
            except Exception as e:  # noqa: BLE001 - it expires by itself
                log.warning("%s: could not drop the lease: %s", self.actor_id, e)

        dropper = threading.Thread(target=drop, name=f"dcrl-{self.actor_id}-lease-drop", daemon=True)
        dropper.start()
        dropper.join(timeout=max(deadline - time.monotonic(), 0.1))
        if dropper.is_alive():
            log.warning("%s: redis did not answer within %.1f s; the lease is left to lapse (actor.lease_s)",
                        self.actor_id, timeout_s)


class Stopping(Exception):
    """request_stop() was called while the actor waited on Redis."""
