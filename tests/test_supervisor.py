"""actors.supervisor with tiny Python children instead of the actor (no vLLM, no Redis): restarts, final exit
statuses, signal forwarding, and that no process of the worker's group outlives it -- nor, through
PR_SET_PDEATHSIG and watch_supervisor, outlives a SIGKILLed supervisor.

Every process a test starts is SIGKILLed (with its process group) at teardown, whatever the test's outcome.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.supervisor import supervise
from helpers import ROOT, child_pids, process_gone, wait_until

# The supervisor as its own process (a test must be able to signal it): argv[1] the worker's argv (JSON),
# argv[2] max_restarts.
SUPERVISOR = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from actors.supervisor import supervise
sys.exit(supervise(json.loads(sys.argv[1]), name="t", max_restarts=int(sys.argv[2]), backoff_s=0.01,
                   kill_grace_s=0.5, poll_s=0.02))
"""

# Appends its pid to argv[1] on start.
RECORD = "import os, sys\nopen(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\n"

# A worker that starts a grandchild ignoring SIGTERM (only the supervisor's SIGKILL ends it), writes
# {"worker": pid, "grandchild": pid} to argv[1], then sleeps. argv[2] == "ignore-term": the worker ignores
# SIGTERM too and runs actors.supervisor.watch_supervisor (0.5 s of grace).
TREE = """
import json, os, signal, subprocess, sys, time
if sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from actors.supervisor import watch_supervisor
    watch_supervisor(0.5, poll_s=0.05)
g = subprocess.Popen([sys.executable, "-c", "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                      "print('ready', flush=True)\\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
g.stdout.readline()
tmp = sys.argv[1] + ".tmp"
open(tmp, "w").write(json.dumps({"worker": os.getpid(), "grandchild": g.pid}))
os.rename(tmp, sys.argv[1])
time.sleep(60)
"""


def py(code: str, *args) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def wait_for(pred, timeout_s: float, what: str):
    return wait_until(pred, timeout_s, what, poll_s=0.02)


def read_json(path: Path):
    return path.exists() and json.loads(path.read_text())


@pytest.fixture
def reap():
    """Register pids; at teardown each is SIGKILLed with its process group when it leads one."""
    pids: list[int] = []
    yield pids.append
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def start_supervisor(reap, tmp_path):
    procs: list[subprocess.Popen] = []

    def start(worker_argv: list[str], max_restarts: int = 0) -> subprocess.Popen:
        err = open(tmp_path / f"supervisor-{len(procs)}.log", "w")
        proc = subprocess.Popen(py(SUPERVISOR, json.dumps(worker_argv), max_restarts), cwd=ROOT, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        err.close()
        reap(proc.pid)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def test_a_sigkilled_worker_is_restarted_up_to_max_restarts(tmp_path, caplog, reap):
    runs = tmp_path / "runs"
    caplog.set_level(logging.INFO, logger="dcrl.supervisor")
    code = RECORD + "os.kill(os.getpid(), 9)\n"
    rc = supervise(py(code, runs), name="t", max_restarts=2, backoff_s=0.01, kill_grace_s=0.5, poll_s=0.02)
    pids = [int(x) for x in runs.read_text().split()]
    for pid in pids:
        reap(pid)
    assert rc == 128 + signal.SIGKILL
    assert len(pids) == 3  # the first run and 2 restarts
    text = caplog.text
    assert "was killed by SIGKILL; restart 1/2" in text and "restart 2/2" in text
    assert "not restarted (2 restarts done, max_restarts=2)" in text


@pytest.mark.parametrize("status, runs_expected", [(0, 1), (2, 1), (1, 3)])
def test_exit_0_and_2_are_final_other_statuses_restart(tmp_path, reap, status, runs_expected):
    runs = tmp_path / "runs"
    rc = supervise(py(RECORD + f"sys.exit({status})\n", runs), max_restarts=2, backoff_s=0.01, poll_s=0.02)
    pids = runs.read_text().split()
    for pid in pids:
        reap(int(pid))
    assert rc == status
    assert len(pids) == runs_expected


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_supervisor_reaches_the_worker_and_its_status_is_the_exit_status(tmp_path, reap,
                                                                                         start_supervisor, sig):
    """The worker exits 3 on the signal: not restarted (a stop was asked), and 3 is the supervisor's status."""
    out = tmp_path / "out"
    code = ("import os, signal, sys, time\n"
            "def stop(signum, frame):\n"
            "    open(sys.argv[1], 'a').write(f'got {signal.Signals(signum).name}\\n')\n"
            "    sys.exit(3)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "signal.signal(signal.SIGINT, stop)\n"
            "open(sys.argv[1], 'a').write(f'ready {os.getpid()}\\n')\n"
            "time.sleep(60)\n")
    sup = start_supervisor(py(code, out), max_restarts=5)
    ready = wait_for(lambda: out.exists() and out.read_text().startswith("ready"), 10, "the worker")
    worker = int(out.read_text().split()[1])
    reap(worker)
    assert ready and child_pids(sup.pid) == [worker]
    assert os.getpgid(worker) == worker != os.getpgid(sup.pid)  # a process group of its own
    sup.send_signal(sig)
    assert sup.wait(timeout=10) == 3
    assert out.read_text().splitlines() == [f"ready {worker}", f"got {sig.name}"]  # once, never restarted


def test_the_worker_group_dies_with_the_worker_even_what_ignores_sigterm(tmp_path, reap, start_supervisor):
    pids_file = tmp_path / "pids.json"
    sup = start_supervisor(py(TREE, pids_file, "plain"), max_restarts=0)
    pids = wait_for(lambda: read_json(pids_file), 10, "the worker and its grandchild")
    reap(pids["worker"])
    reap(pids["grandchild"])
    os.kill(pids["worker"], signal.SIGKILL)
    assert sup.wait(timeout=10) == 128 + signal.SIGKILL
    # SIGTERM to the group, then (the grandchild ignores it) SIGKILL after kill_grace_s = 0.5 s.
    wait_for(lambda: process_gone(pids["grandchild"]), 5, "the grandchild to die")


def test_a_sigkilled_supervisor_sends_the_worker_sigterm(tmp_path, reap, start_supervisor):
    """PR_SET_PDEATHSIG: the kernel tells the worker; it stops as on any SIGTERM."""
    out = tmp_path / "out"
    code = ("import os, signal, sys, time\n"
            "def stop(signum, frame):\n"
            "    open(sys.argv[1], 'a').write('got SIGTERM\\n')\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "open(sys.argv[1], 'a').write(f'ready {os.getpid()}\\n')\n"
            "time.sleep(60)\n")
    sup = start_supervisor(py(code, out))
    wait_for(lambda: out.exists() and out.read_text().startswith("ready"), 10, "the worker")
    worker = int(out.read_text().split()[1])
    reap(worker)
    sup.kill()
    sup.wait(timeout=10)
    wait_for(lambda: "got SIGTERM" in out.read_text(), 5, "the worker's SIGTERM")
    wait_for(lambda: process_gone(worker), 5, "the worker to exit")


def test_a_worker_that_ignores_its_dead_supervisor_is_killed_with_its_group(tmp_path, reap, start_supervisor):
    """watch_supervisor: the worker and its grandchild both ignore SIGTERM; 0.5 s after the supervisor's death
    the worker SIGKILLs its own process group."""
    pids_file = tmp_path / "pids.json"
    sup = start_supervisor(py(TREE, pids_file, "ignore-term"))
    pids = wait_for(lambda: read_json(pids_file), 10, "the worker and its grandchild")
    reap(pids["worker"])
    reap(pids["grandchild"])
    sup.kill()
    sup.wait(timeout=10)
    wait_for(lambda: process_gone(pids["worker"]) and process_gone(pids["grandchild"]), 5,
             "the worker and its grandchild to die")
