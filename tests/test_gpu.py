"""GPU readiness: the same job on vLLM CUDA and a CUDA learner, with weights as files and over vLLM's native
NCCL weight transfer. Marked `gpu`: skipped without an NVIDIA GPU.

NCCL cannot put two ranks of one group on the same GPU, so the NCCL variant runs the learner on GPU 0 and
the actor on GPU 1 and skips on a one-GPU machine (there the files transport is the way).
"""

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


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["files", "nccl"])
def test_gpu_job_runs_actor_on_vllm_cuda_and_learner_on_cuda(tmp_path, redis_url, transport):
    extra = {}
    if transport == "nccl":
        if gpu_count() < 2:
            pytest.skip("NCCL weight transfer needs the learner and the actor on different GPUs (2+ GPUs)")
        extra = {"learner.weight_transfer": "nccl", "actor.gpu": "1",
                 "learner.zmq_transfer": f"tcp://127.0.0.1:{free_port()}"}
    env = {**os.environ, "DCRL_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    args = ["--config", "tiny", *_sets(tmp_path, **extra)]
    subprocess.run([sys.executable, "-m", "tiny", *args], check=True, cwd=ROOT, env=env, timeout=600)
    learner = subprocess.Popen([sys.executable, "-m", "learner", *args], cwd=ROOT, env=env)
    actor_log = open(tmp_path / "actor.log", "w")
    actor = subprocess.Popen([sys.executable, "-m", "actors", *args, "--actor-id", "actor-0"], cwd=ROOT, env=env,
                             stdout=actor_log, stderr=subprocess.STDOUT)
    try:
        assert learner.wait(timeout=900) == 0
    finally:
        actor.terminate()
        actor.wait(timeout=120)
        actor_log.close()
        if learner.poll() is None:
            learner.kill()
    rows = [json.loads(x) for x in (tmp_path / "runs" / "gpu" / "metrics.jsonl").read_text().splitlines()]
    log = (tmp_path / "actor.log").read_text()
    print(log[-3000:])
    assert len(rows) == 3
    assert rows[-1]["version"] == 3
    assert max(r["staleness/newest_version"] for r in rows) >= 1, "the actor never served published weights"
    if transport == "nccl":
        assert "received weights v" in log and "over nccl" in log
        assert not (tmp_path / "runs" / "gpu" / "weights").exists()
