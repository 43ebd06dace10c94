"""Redis connections that ride out outages: AUTH from the config, exponential backoff, one log line per outage.

Every buffer component opens its client with :func:`connect` and runs each Redis call through a
:class:`Retrier`. Two kinds of failure are told apart:

- an outage (connection refused or dropped, socket timeout, server still loading its append-only file):
  retried with waits ``retry_backoff_s, 2x, 4x, ... <= retry_backoff_max_s``; the first failure logs one
  warning line, the first success after it one info line;
- a wrong or missing password: never retried; a :class:`RedisAuthError` that names ``redis.password`` and
  ``DCRL_REDIS_PASSWORD``.

An outage that outlasts its limit (``redis.connect_timeout_s`` at start, ``redis.max_outage_s`` later) raises
:class:`RedisUnavailable`, which names ``redis.url`` / ``DCRL_REDIS_URL`` and the limit. Both are
``protocol.errors.DcrlError``: the entry points print them as one line, without a traceback. Anything else
(a Lua error, OOM, a wrong type) propagates unchanged.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from typing import Callable, TypeVar

import redis
from redis._parsers import _RESP2Parser, _RESP3Parser
from redis._parsers.socket import SENTINEL, SocketBuffer
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, BusyLoadingError, ResponseError
from redis.retry import Retry

from configs.schema import RedisConfig
from protocol.errors import DcrlError

log = logging.getLogger("dcrl.buffer")

T = TypeVar("T")

# A blocking XREADGROUP must return before the socket times out; receive() clamps its wait below this.
SOCKET_TIMEOUT_S = 30.0

# redis.exceptions.ConnectionError covers refused/dropped sockets and BusyLoadingError (AOF replay);
# TimeoutError is a socket timeout. AuthenticationError subclasses ConnectionError: checked first.
OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Wait before retry number ``attempt`` (0-based): ``min(max_s, base_s * 2**attempt)``."""
    return min(max_s, base_s * 2.0 ** min(attempt, 62))


def is_auth_error(exc: BaseException) -> bool:
    """True for a refused password: AUTH failed, or the server demands one the client did not send."""
    if isinstance(exc, AuthenticationError):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS", "invalid password"))


class RedisAuthError(DcrlError, RuntimeError):
    """Redis refused the password (or demands one): never retried. Also a RuntimeError, as callers catch it."""


class RedisUnavailable(DcrlError, redis.exceptions.ConnectionError):
    """Redis stayed unreachable past the caller's limit. Still a redis ConnectionError, so code that waits
    through outages (the actor's control calls) treats it as one."""


def auth_error(cfg: RedisConfig, exc: BaseException) -> RedisAuthError:
    """The one error a bad password gives, naming the setting to fix."""
    given = "no password was given" if not cfg.password else "the given password was refused"
    return RedisAuthError(
        f"Redis at {redact_url(cfg.url)} refused authentication ({given}: {exc}). "
        "Set redis.password in the config or DCRL_REDIS_PASSWORD in the environment "
        "to the server's requirepass."
    )


def redact_url(url: str) -> str:
    """``url`` without a password it may embed (for log lines)."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("redis", url)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


class Retrier:
    """Runs Redis calls through outages for one component (``who`` names it in the log lines).

    ``give_up_s``: raise RedisUnavailable once an outage has lasted this long (None: retry forever); the
    last retry is made at that deadline, not after it. ``limit_name`` is the setting ``give_up_s`` comes from,
    for the message. ``stop``: an Event that aborts the waiting (the writer's close()); the call then raises
    ConnectionError. The outage state is per instance, so concurrent calls during one outage log it once.
    """

    def __init__(self, cfg: RedisConfig, who: str, give_up_s: float | None,
                 stop: threading.Event | None = None, limit_name: str = "redis.max_outage_s"):
        self.cfg = cfg
        self.who = who
        self.give_up_s = give_up_s
        self.limit_name = limit_name
        self.stop = stop
        self._down_since: float | None = None
        self.outages = 0  # outages seen (for tests and stats)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        attempt = 0
        while True:
            try:
                out = fn(*args, **kwargs)
            except redis.exceptions.RedisError as exc:  # anything not auth or an outage re-raises unchanged
                if is_auth_error(exc):
                    raise auth_error(self.cfg, exc) from None
                if not isinstance(exc, OUTAGE_ERRORS):
                    raise
                self._wait_out(exc, attempt)
                attempt += 1
                continue
            if self._down_since is not None:
                log.info("%s: redis at %s reachable again after %.1f s", self.who, redact_url(self.cfg.url),
                         time.monotonic() - self._down_since)
                self._down_since = None
            return out

    def _wait_out(self, exc: BaseException, attempt: int) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self.outages += 1
            what = "loading its data" if isinstance(exc, BusyLoadingError) else "unreachable"
            limit = "forever" if self.give_up_s is None else f"for up to {self.give_up_s:g} s"
            log.warning("%s: redis at %s %s (%s); retrying every %g..%g s %s", self.who,
                        redact_url(self.cfg.url), what, exc, self.cfg.retry_backoff_s,
                        self.cfg.retry_backoff_max_s, limit)
        down_for = now - self._down_since
        if self.give_up_s is not None and down_for >= self.give_up_s:
            raise RedisUnavailable(
                f"{self.who}: redis at {redact_url(self.cfg.url)} unreachable for {down_for:.0f} s ({exc}); "
                f"start it (python -m buffer serve) or point redis.url / DCRL_REDIS_URL at a running server "
                f"({self.limit_name}={self.give_up_s:g} s sets this wait)") from exc
        delay = backoff_delay(attempt, self.cfg.retry_backoff_s, self.cfg.retry_backoff_max_s)
        if self.give_up_s is not None:  # one last try at the deadline rather than a sleep past it
            delay = min(delay, self.give_up_s - down_for)
        if self.stop is not None:
            if self.stop.wait(delay):
                raise redis.exceptions.ConnectionError(f"{self.who}: closed during a redis outage") from exc
        else:
            time.sleep(delay)


# Bulk strings at least this long are read straight from the socket into their own buffer (LargeReplyBuffer).
LARGE_REPLY_BYTES = 32 << 10


class LargeReplyBuffer(SocketBuffer):
    """redis-py's socket buffer, except that a bulk string of ``LARGE_REPLY_BYTES`` or more is received with
    ``recv_into`` into memory allocated once at its final size and returned as a read-only memoryview of it.

    The stock path receives 64 kB chunks into a BytesIO, copies the string out, appends the tail and slices
    off the CRLF: four copies and a growing buffer per stream entry. For 214 kB entries (8 x 2,048 tokens)
    that made XREADGROUP cost ~320 us per entry on this machine against ~120 us this way (bench/buffer.py),
    about what the hiredis parser gets. Smaller replies take the stock path unchanged."""

    def read(self, length: int, timeout: float | object = SENTINEL):
        if length < LARGE_REPLY_BYTES:
            return super().read(length, timeout)
        want = length + 2  # the string and its CRLF
        out = bytearray(want)
        view = memoryview(out)
        got = self._buffer.readinto(view)  # what an earlier recv already brought
        sock = self._sock
        if timeout is not SENTINEL:
            sock.settimeout(timeout)
        try:
            while got < want:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise redis.exceptions.ConnectionError("Connection closed by server.")
                got += n
        except socket.timeout:
            raise redis.exceptions.TimeoutError("Timeout reading from socket") from None
        except OSError as exc:
            raise redis.exceptions.ConnectionError(f"Error while reading from socket: {exc.args}") from None
        finally:
            if timeout is not SENTINEL:
                sock.settimeout(self.socket_timeout)
        return view[:length].toreadonly()


# redis-py's pure-Python parsers, which read through a SocketBuffer (hiredis reads on its own).
_SOCKET_BUFFER_PARSERS = (_RESP2Parser, _RESP3Parser)


@functools.cache
def _large_reply_parser(base: type) -> type:
    """``base`` (a redis-py pure-Python parser class) reading through a LargeReplyBuffer."""

    class LargeReplyParser(base):
        def on_connect(self, connection):
            super().on_connect(connection)
            self._buffer = LargeReplyBuffer(self._sock, self.socket_read_size, connection.socket_timeout)

    LargeReplyParser.__name__ = LargeReplyParser.__qualname__ = f"LargeReply{base.__name__}"
    return LargeReplyParser


def make_client(cfg: RedisConfig, large_replies: bool = False) -> redis.Redis:
    """A client for ``cfg.url`` (no I/O yet). Binary responses: stream payloads are raw msgpack bytes.

    redis-py retries a failed command once at once: that transparently replaces a pooled socket the
    server closed (e.g. after a restart); real outages are handled by :class:`Retrier`.

    ``large_replies`` (the learner's stream reader): bulk strings of ``LARGE_REPLY_BYTES`` or more come back
    as read-only memoryviews received in place (:class:`LargeReplyBuffer`); with the hiredis parser installed,
    which already reads them in C, nothing changes.
    """
    kwargs = {}
    if cfg.password:
        kwargs["password"] = cfg.password
    client = redis.Redis.from_url(
        cfg.url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=min(5.0, cfg.connect_timeout_s),
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 1),
        decode_responses=False,
        **kwargs,
    )
    if large_replies:
        pool = client.connection_pool
        parser = pool.connection_class(**pool.connection_kwargs)._parser  # the parser redis-py would pick
        if isinstance(parser, _SOCKET_BUFFER_PARSERS):
            pool.connection_kwargs["parser_class"] = _large_reply_parser(type(parser))
    return client


def connect(cfg: RedisConfig, who: str = "buffer", large_replies: bool = False) -> redis.Redis:
    """Open a client and PING until Redis answers.

    Retries with backoff for up to ``cfg.connect_timeout_s`` (then RedisUnavailable naming the URL and the
    settings); a refused password raises RedisAuthError at once. Called by GroupWriter/GroupReader/ControlPlane
    constructors and the ``python -m buffer`` commands.
    """
    client = make_client(cfg, large_replies)
    try:
        Retrier(cfg, f"{who} connect", give_up_s=cfg.connect_timeout_s,
                limit_name="redis.connect_timeout_s").call(client.ping)
    except BaseException:
        client.close()
        raise
    return client


def check_reachable(cfg: RedisConfig, who: str) -> None:
    """Connect, PING and close: the entry points' check at start, so that an unreachable Redis or a refused
    password fails in ``redis.connect_timeout_s`` rather than after the model is loaded or vLLM has started."""
    connect(cfg, who).close()
