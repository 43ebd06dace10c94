"""Shared fixtures: a real redis-server on a free loopback port, the tiny model, GPU detection for `gpu` tests.

Plain helpers (model loading, engine start, warm-start settings) live in ``tests/helpers.py``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from buffer.server import RedisServer, start_redis
from helpers import FAST_TINY, RANDOM_TINY

# Keep vLLM, torch and tokenizers polite on a shared 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


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
