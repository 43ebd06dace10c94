"""Supervision of one process tree on one machine: nothing outlives the worker, and a crashed worker restarts.

``python -m actors`` runs :func:`supervise` around the real actor (``python -m actors ... --no-supervise``, the
*worker*). The supervisor is this module only (standard library, no vLLM, no torch, no Redis):

- **No orphans.** The worker starts in a session, and so a process group, of its own; vLLM's EngineCore and
  Worker processes, which the worker starts with multiprocessing, inherit that group. Whenever the worker
  ends -- a clean exit, a crash, SIGKILL -- the supervisor sends SIGTERM to the whole group, waits up to
  ``kill_grace_s`` for it to empty (vLLM's EngineCore shuts down on SIGTERM) and SIGKILLs what is left. vLLM
  0.32 does not do this by itself: its EngineCore does not watch the process that started it (only the
  Worker processes of a multi-GPU executor watch the EngineCore, through a pipe), so after a SIGKILL of the
  actor the EngineCore, and the GPU memory it holds, stay.
- **Restarts.** A worker that ends with a signal or a nonzero status other than 2 is started again after a
  backoff (``backoff_s``, doubling, at most ``backoff_max_s``), at most ``max_restarts`` times, one log line each.
  Status 0 (stopped as asked: the learner said stop, ``max_groups``, a signal) and 2 (an expected failure,
  already said in one ``error:`` line) are final.
- **Signals.** SIGTERM and SIGINT are forwarded to the worker (the actor stops gracefully on both); the supervisor
  then exits with the worker's status (-N, killed by signal N, as 128 + N) and restarts nothing. A worker still
  running ``stop_timeout_s`` after the first forwarded signal is SIGKILLed (then its group as above).

**The supervisor's own death** (SIGKILL, the OOM killer, honcho's SIGKILL to its process group after its 5 s of
grace, Ray's PDEATHSIG): the kernel sends the worker SIGTERM (``PR_SET_PDEATHSIG``, set between fork and exec), so
it stops gracefully and its engine shutdown stops vLLM's processes; :func:`watch_supervisor`, a thread of the
worker, SIGKILLs the worker's whole group if it is still running ``grace_s`` after the supervisor went.

**Remaining gaps**, all of them needing two failures at once or an escape from the group:

- the supervisor and the worker both SIGKILLed (``kill -9`` of both pids, the OOM killer twice) before the worker's
  group is stopped: vLLM's processes stay, still in the worker's process group (``ps -o pid,pgid,cmd``), and
  ``kill -- -<worker pid>`` ends them. (A kill of the whole container or cgroup takes them too.)
- a process that leaves the group (``setsid``/``setpgid``) is not followed; vLLM's engine processes do not
  (in 0.32 only its separate ``dp_supervisor`` launcher calls ``setpgrp``, and dcrl does not use it).
- a worker that exits cleanly after the supervisor died while some of its vLLM children hang on: nobody is left
  to kill them (the worker's engine shutdown normally joins or kills them itself).
- ``PR_SET_PDEATHSIG`` is Linux only; elsewhere the supervisor's death leaves the worker to
  :func:`watch_supervisor` alone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

log = logging.getLogger("dcrl.supervisor")

FINAL_STATUSES = (0, 2)  # 0: stopped as asked; 2: an expected failure (protocol.errors.EXIT_EXPECTED_FAILURE)
SUPERVISOR_ENV = "DCRL_SUPERVISOR_PID"  # set for the worker: the pid it watches (watch_supervisor)
FORWARDED = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


def _load_prctl():
    """libc's prctl (Linux), or None. Resolved in the parent: the child only calls it between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def exit_status(returncode: int) -> int:
    """A Popen returncode as a shell exit status: -N (killed by signal N) becomes 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def group_alive(pgid: int) -> bool:
    """Whether any process (zombies included) is in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the number: not ours to wait for
        return False
    return True


def kill_group(pgid: int, grace_s: float, poll_s: float = 0.05) -> bool:
    """SIGTERM process group ``pgid``, wait up to ``grace_s`` for it to empty, SIGKILL what is left. Returns
    whether any process was there. Called after the group's leader is reaped: Linux does not reuse the number
    while a process of the group lives, so the signal reaches the worker's descendants or nobody."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + grace_s
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            break
        time.sleep(poll_s)
    return True


def _start(argv: Sequence[str], env: Mapping[str, str] | None, prctl) -> subprocess.Popen:
    supervisor = os.getpid()

    def in_child() -> None:  # between fork and exec, in the child
        for sig in FORWARDED:  # not the supervisor's handler: a signal in this window must act, not be recorded
            signal.signal(sig, signal.SIG_DFL)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != supervisor:  # the supervisor died before the prctl: it cannot fire any more
            os.kill(os.getpid(), signal.SIGTERM)

    child_env = dict(os.environ if env is None else env)
    child_env[SUPERVISOR_ENV] = str(supervisor)
    return subprocess.Popen(list(argv), env=child_env, start_new_session=True, preexec_fn=in_child)


def supervise(argv: Sequence[str], *, max_restarts: int, name: str = "worker", env: Mapping[str, str] | None = None,
              backoff_s: float = 1.0, backoff_max_s: float = 30.0, kill_grace_s: float = 10.0,
              stop_timeout_s: float = 60.0, poll_s: float = 0.1) -> int:
    """Run ``argv`` as the worker until it ends for good (see the module docstring); returns its exit status.

    Call from the main thread (it installs SIGTERM and SIGINT handlers, restored on return). ``name`` prefixes
    the log lines; ``env`` defaults to this process's environment (``DCRL_SUPERVISOR_PID`` is added)."""
    prctl = _load_prctl()
    pending: list[int] = []  # signals received, forwarded by the loop below (never from the handler: the
    #                          worker may just have been reaped, and its pid is then no longer ours)

    def on_signal(signum: int, frame) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in FORWARDED}
    stop_at: float | None = None
    restarts = 0
    try:
        while True:
            proc = _start(argv, env, prctl)
            killed = False
            try:
                while proc.poll() is None:
                    while pending and proc.returncode is None:
                        if stop_at is None:
                            stop_at = time.monotonic()
                        proc.send_signal(pending.pop(0))  # send_signal polls first: never a reaped pid
                    if stop_at is not None and not killed and time.monotonic() - stop_at > stop_timeout_s:
                        log.warning("%s: worker pid %d still runs %.0f s after the stop signal: SIGKILL", name,
                                    proc.pid, stop_timeout_s)
                        proc.kill()
                        killed = True
                    time.sleep(poll_s)
            finally:
                if proc.poll() is None:  # only if this loop failed (a KeyboardInterrupt cannot reach it)
                    proc.kill()
                    proc.wait()
                if kill_group(proc.pid, kill_grace_s):
                    log.info("%s: stopped what worker pid %d left running (its process group)", name, proc.pid)
            rc = proc.returncode
            if pending or stop_at is not None or rc in FINAL_STATUSES:
                return exit_status(rc)
            if restarts >= max_restarts:
                log.error("%s: worker pid %d %s; not restarted (%d restarts done, max_restarts=%d)", name,
                          proc.pid, describe_exit(rc), restarts, max_restarts)
                return exit_status(rc)
            restarts += 1
            delay = min(backoff_max_s, backoff_s * 2.0 ** (restarts - 1))
            log.warning("%s: worker pid %d %s; restart %d/%d in %.1f s", name, proc.pid, describe_exit(rc),
                        restarts, max_restarts, delay)
            deadline = time.monotonic() + delay
            while not pending and time.monotonic() < deadline:
                time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
            if pending:  # asked to stop while waiting to restart
                return exit_status(rc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch_supervisor(grace_s: float, poll_s: float = 1.0) -> threading.Thread | None:
    """In the worker: if :func:`supervise` started this process (``DCRL_SUPERVISOR_PID``, removed from the
    environment here so that vLLM's processes do not inherit it), a daemon thread that, once the supervisor is
    gone, sends this process SIGTERM (again: ``PR_SET_PDEATHSIG`` did already, where it works) and, if the
    process is still running ``grace_s`` later, SIGKILLs its whole process group (itself and vLLM's processes).
    Returns the thread, or None when not supervised."""
    raw = os.environ.pop(SUPERVISOR_ENV, None)
    if raw is None:
        return None
    supervisor = int(raw)
    own_group = os.getpgid(0) == os.getpid()  # supervise() makes the worker a session (and group) leader

    def run() -> None:
        while os.getppid() == supervisor:
            time.sleep(poll_s)
        log.warning("the supervisor (pid %d) is gone: stopping; SIGKILL to this process group in %.0f s",
                    supervisor, grace_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        if own_group:
            os.killpg(os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=run, name="dcrl-watch-supervisor", daemon=True)
    thread.start()
    return thread
