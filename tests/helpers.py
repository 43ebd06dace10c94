"""Helpers the tests import (``from helpers import ...``): warm-start settings, model loading, a CPU engine.

Fixtures live in ``conftest.py``; this module holds plain functions and constants, so that test modules
never import ``conftest``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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


# An actor's admission bookkeeping with nothing else: admit, then cancel (1 in 5) or send the group with its slot,
# as fast as the ledger allows, renewing a 0.3 s lease. Prints "gave back N" once it has given back what a
# predecessor under the same id held, as a restarted actor does first.
LEDGER_ACTOR = r"""
import sys, threading, time
import numpy as np
from buffer import ControlPlane, GroupWriter
from buffer.synthetic import synthetic_group
from configs.schema import RedisConfig

url, actor, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = RedisConfig(url=url, connect_timeout_s=5.0)
plane = ControlPlane(cfg)
print("gave back", plane.give_back(actor), flush=True)
def lease():
    while True:
        plane.keep_lease(actor, 0.3)
        time.sleep(0.1)
threading.Thread(target=lease, daemon=True).start()
writer = GroupWriter(cfg, actor)
rng = np.random.default_rng(seed)
i = 0
while True:
    slot = plane.admit(actor)
    if slot is None:  # at capacity: wait for the learner
        time.sleep(0.005)
        continue
    if rng.random() < 0.2:
        plane.cancel(slot)  # abandoned before it reached the writer
    else:
        version = plane.read_control().version  # the weights it would sample with
        writer.send(synthetic_group(rng, f"{actor}-{seed}-{i}", n_traj=2, n_tokens=16, vocab_size=64,
                                    version=version), slot)
    i += 1
"""


def spawn_python(code: str, *args: str) -> subprocess.Popen:
    """``python -c code args...`` from the repo root, stdout piped (text)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` (if it still runs), reap it and close its stdout pipe."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def stop_processes(procs) -> None:
    """SIGTERM every process still running, wait up to 30 s for each, SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def child_pids(pid: int) -> list[int]:
    """The pids of ``pid``'s children (Linux /proc): e.g. the worker of a supervised ``python -m actors``."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited: no such process, or a zombie waiting for its (new) parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(pred, timeout_s: float, what: str, poll_s: float = 0.05):
    """``pred()``'s first truthy value, polled every ``poll_s``; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
