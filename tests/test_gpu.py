"""GPU readiness: the same job on vLLM CUDA and a CUDA learner. Marked `gpu`: skipped without an NVIDIA GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from buffer.server import free_port

ROOT = Path(__file__).resolve().parents[1]


def _sets(tmp_path: Path, **extra: str) -> list[str]:
    sets = {
        "run.root": str(tmp_path / "runs"),
        "run.name": "gpu",
        "model.path": str(tmp_path / "tiny-model"),
        "learner.device": "cuda",
        "learner.steps": "3",
        "learner.batch_groups": "2",
        "learner.wandb_mode": "disabled",
        "learner.progress": "false",
        "learner.zmq_pub": f"tcp://127.0.0.1:{free_port()}",
        "learner.zmq_files": f"tcp://127.0.0.1:{free_port()}",
        "actor.weights_cache_dir": str(tmp_path / "actor-weights"),
        "actor.gpu_memory_utilization": "0.3",
        **extra,
    }
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


@pytest.mark.gpu
def test_gpu_job_runs_actor_on_vllm_cuda_and_learner_on_cuda(tmp_path, redis_url):
    env = {**os.environ, "DCRL_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    args = ["--config", "tiny", *_sets(tmp_path)]
    subprocess.run([sys.executable, "-m", "learner.tiny", *args], check=True, cwd=ROOT, env=env, timeout=600)
    learner = subprocess.Popen([sys.executable, "-m", "learner", *args], cwd=ROOT, env=env)
    actor = subprocess.Popen([sys.executable, "-m", "actors", *args, "--actor-id", "actor-0"], cwd=ROOT, env=env)
    try:
        assert learner.wait(timeout=900) == 0
    finally:
        actor.terminate()
        actor.wait(timeout=120)
        if learner.poll() is None:
            learner.kill()
    rows = [json.loads(x) for x in (tmp_path / "runs" / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert rows[-1]["version"] == 3
