"""Start and stop a real ``redis-server`` bound to 127.0.0.1 (tests, the Procfile, the Ray launcher)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import DcrlError


class ServeError(DcrlError, RuntimeError):
    """redis-server cannot be started here (not installed, port taken); the message names the fix."""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, never one this process was given before: the kernel may hand
    the same ephemeral port to two calls in a row when nothing bound it in between (a test asking for
    ``zmq_pub`` and ``zmq_transfer`` once got 43273 twice, and its learner could not bind the second)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("free_port: no new free port on 127.0.0.1 after 100 tries")


def check_port_free(port: int) -> None:
    """Raise ServeError naming ``redis.url`` if 127.0.0.1:``port`` cannot be bound (another server listens
    there), instead of letting redis-server fail with a line of its own after the exec. SO_REUSEADDR as
    redis-server sets it, so a port merely in TIME_WAIT counts as free. Racy by nature: a check, not a lock."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            what = ("is already in use (another redis-server, e.g. an earlier run still going?)"
                    if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})")
            raise ServeError(f"127.0.0.1:{port} {what}: stop what holds it, or pick a free port in "
                             "redis.url / DCRL_REDIS_URL") from None


def redis_server_command(port: int, data_dir: str | os.PathLike, password: str | None = None,
                         appendonly: bool = True) -> tuple[list[str], bytes]:
    """Command line of a loopback-only redis-server with append-only persistence in ``data_dir``, and the
    config it must be given on stdin (the ``-`` argument): ``requirepass`` goes there, never into argv,
    where ``ps`` and /proc/<pid>/cmdline would show it (redis-server retitles itself, but only once started)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServeError("redis-server not found on PATH: run `make setup` (installs Debian's redis-server)")
    args = [
        exe,
        "-",  # read a config from stdin first; the options below are applied after it
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
        "--save", "",
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]
    config = f"requirepass {config_quote(password)}\n".encode() if password else b""
    return args, config


def config_quote(value: str) -> str:
    """``value`` as one double-quoted redis.conf argument: bytes other than printable ASCII, ``"`` and ``\\``
    are written as ``\\xHH``, which redis-server decodes back to the same bytes (UTF-8 for non-ASCII)."""
    out = []
    for b in value.encode():
        out.append(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}")
    return '"' + "".join(out) + '"'


def stdin_pipe(data: bytes) -> int:
    """Read end of a pipe that holds ``data`` and is closed for writing: a child's stdin that needs nobody to
    feed it (and no write that could race the child's exit). ``data`` must fit the pipe buffer."""
    if len(data) > 4096:
        raise ValueError(f"{len(data)} bytes for a child's stdin; at most 4096 fit the pipe buffer")
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    return r


def exec_with_stdin(args: list[str], stdin: bytes) -> None:
    """Replace this process with ``args`` reading ``stdin`` (same pid: signals reach the new program directly)."""
    r = stdin_pipe(stdin)
    os.dup2(r, 0)
    os.close(r)
    os.execv(args[0], args)


@dataclass
class RedisServer:
    """A redis-server child process. ``url`` points at it; ``restart()`` keeps its data directory."""

    port: int
    data_dir: Path
    password: str | None = None
    appendonly: bool = True
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args, config = redis_server_command(self.port, self.data_dir, self.password, self.appendonly)
        stdin = stdin_pipe(config)
        try:
            self.proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            os.close(stdin)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{self.port} within {timeout_s}s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()


def start_redis(data_dir: str | os.PathLike, port: int | None = None, password: str | None = None,
                appendonly: bool = True) -> RedisServer:
    return RedisServer(port or free_port(), Path(data_dir), password, appendonly).start()
