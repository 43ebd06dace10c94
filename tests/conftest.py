"""Shared fixtures: a real redis-server on a free loopback port, the tiny model, GPU detection for `gpu` tests.

Plain helpers (model loading, engine start, warm-start settings) live in ``tests/helpers.py``."""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest

from buffer.server import RedisServer, start_redis
from helpers import FAST_TINY, RANDOM_TINY

# Keep vLLM, torch and tokenizers polite on a shared 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Every process this session starts (servers, jobs, vLLM's EngineCore and workers, their children) inherits
# this variable, even after its parent died and it was re-parented: the session-end check finds them by it.
SESSION_MARK = "DCRL_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


# Helpers that libraries start for this very process and that end with it (they watch its pid or a pipe of
# it): multiprocessing's resource tracker, wandb's service. Not leaks, as long as their parent is this process.
LIFETIME_HELPERS = ("multiprocessing.resource_tracker", "wandb-core")


def marked_processes(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes, this one and its lifetime helpers excepted, whose environment
    holds ``mark``."""
    needle = f"{SESSION_MARK}={mark}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie has exited; its parent merely has not reaped it
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if ppid == os.getpid() and any(h in cmd for h in LIFETIME_HELPERS):
            continue
        found.append((int(d.name), cmd[:160]))
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Fail the session when a process it started outlives it (after the fixtures' teardown, with 15 s of
    grace for processes still on their way out); the leftovers are listed, then killed."""
    if not Path("/proc").is_dir():
        return
    mark = os.environ[SESSION_MARK]
    deadline = time.monotonic() + 15.0
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in left)
    session.config.get_terminal_writer().line(
        f"\nERROR: {len(left)} process(es) started by the tests outlived the session (killed now):\n{lines}", red=True)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model, briefly warm-started, built once per test session."""
    from configs import load_config
    from tiny.build import ensure_model

    cfg = load_config("tiny", FAST_TINY + [f"model.path={tmp_path_factory.getbasetemp() / 'tiny-fast'}"], env={})
    return ensure_model(cfg, log=lambda *a: None)


@pytest.fixture(scope="session")
def random_tiny_dir(tmp_path_factory) -> Path:
    """The tiny model with random weights (no warm start), built once per test session."""
    from configs import load_config
    from tiny.build import ensure_model

    cfg = load_config("tiny", RANDOM_TINY + [f"model.path={tmp_path_factory.getbasetemp() / 'tiny-random'}"],
                      env={})
    return ensure_model(cfg, log=lambda *a: None)


@pytest.fixture
def count_host_syncs(monkeypatch):
    """Call it to start counting: Tensor.tolist calls are counted (the returned dict), and the per-value
    host syncs (.item(), float(), bool()) fail the test. For code that must read back to the host once."""
    import torch

    def install() -> dict[str, int]:
        calls = {"tolist": 0}
        real_tolist = torch.Tensor.tolist

        def counting_tolist(self):
            calls["tolist"] += 1
            return real_tolist(self)

        def forbidden(self, *args):
            raise AssertionError("per-metric host sync")

        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
        for name in ("item", "__float__", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, forbidden)
        return calls

    return install


@pytest.fixture
def redis_server(tmp_path) -> RedisServer:
    """A fresh redis-server (append-only) on 127.0.0.1; stopped after the test."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="module")
def loop():
    """One event loop per test module: vLLM's output handler task lives on the loop of the first request,
    so every test of a module that shares one engine must run on the same loop."""
    import asyncio

    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
