"""Shared fixtures: a real redis-server on a free loopback port, GPU detection for `gpu` tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from buffer.server import RedisServer, start_redis

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


# Fast warm start for tests: stop at 5% held-out accuracy (~100 steps, seconds on one core).
FAST_TINY = ["model.tiny.warmstart_steps=400", "model.tiny.warmstart_eval_every=20",
             "model.tiny.warmstart_eval_episodes=100", "model.tiny.warmstart_max_acc=0.05"]
# No warm start at all: random weights, for tests of the training machinery rather than of learning.
RANDOM_TINY = ["model.tiny.warmstart_steps=0", "model.tiny.warmstart_eval_episodes=10"]


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


def load_model(path):
    """The HF model at ``path`` in fp32, eval mode (the reference the engines' logprobs are checked against)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def perturbed_model(src_dir, scale: float, seed: int):
    """The model at ``src_dir`` (fp32) plus N(0, scale^2) noise on every parameter: a stand-in for new
    trained weights."""
    import torch

    model = load_model(src_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def start_cpu_engine(loop, cfg, model_dir):
    """An actors.engine.Engine on vLLM CPU (1 GB KV cache, one thread), its processes given vLLM's CPU
    environment while this process keeps its own."""
    from actors.engine import Engine
    from actors.engine import vllm_cpu_env

    with pytest.MonkeyPatch.context() as mp:
        for k, v in vllm_cpu_env(kv_cache_gb=1, threads=1).items():
            mp.setenv(k, v)
        return loop.run_until_complete(Engine.start(cfg, model_dir))
