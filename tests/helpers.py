"""Helpers the tests import (``from helpers import ...``): warm-start settings, model loading, a CPU engine.

Fixtures live in ``conftest.py``; this module holds plain functions and constants, so that test modules
never import ``conftest``.
"""

from __future__ import annotations

import pytest

# Fast warm start for tests: stop at 5% held-out accuracy (~100 steps, seconds on one core).
FAST_TINY = ["model.tiny.warmstart_steps=400", "model.tiny.warmstart_eval_every=20",
             "model.tiny.warmstart_eval_episodes=100", "model.tiny.warmstart_min_acc=0.05"]
# No warm start at all: random weights, for tests of the training machinery rather than of learning.
RANDOM_TINY = ["model.tiny.warmstart_steps=0", "model.tiny.warmstart_eval_episodes=10"]


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
    from actors.engine import Engine, vllm_cpu_env

    with pytest.MonkeyPatch.context() as mp:
        for k, v in vllm_cpu_env(kv_cache_gb=1, threads=1).items():
            mp.setenv(k, v)
        return loop.run_until_complete(Engine.start(cfg, model_dir))
