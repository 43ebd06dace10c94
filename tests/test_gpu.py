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
@pytest.mark.parametrize("transport", ["files", "nccl", "files-2-ranks"])
def test_gpu_job_runs_actor_on_vllm_cuda_and_learner_on_cuda(tmp_path, redis_url, transport):
    extra = {}
    if transport == "nccl":
        if gpu_count() < 2:
            pytest.skip("NCCL weight transfer needs the learner and the actor on different GPUs (2+ GPUs)")
        extra = {"learner.weight_transfer": "nccl", "actor.gpu": "1",
                 "learner.zmq_transfer": f"tcp://127.0.0.1:{free_port()}"}
    if transport == "files-2-ranks":  # the FSDP2 learner over two GPUs (nccl between its ranks)
        if gpu_count() < 2:
            pytest.skip("learner.world_size = 2 on CUDA needs 2+ GPUs")
        extra = {"learner.world_size": "2"}
    run_gpu_job(tmp_path, redis_url, "tiny", extra, transport)


# Qwen3-0.6B's shape (hidden 1024, 28 layers, 16 query / 8 key-value heads of 128, MLP 3072), random weights, the
# tiny character tokenizer: no model hub is reachable, and the smoke run checks that the preset's settings fit.
QWEN3_0_6B_SHAPE = {"model.build_tiny": "true", "model.tiny.hidden_size": "1024", "model.tiny.num_layers": "28",
                    "model.tiny.num_heads": "16", "model.tiny.num_kv_heads": "8", "model.tiny.head_dim": "128",
                    "model.tiny.intermediate_size": "3072", "model.tiny.max_position_embeddings": "4096",
                    "model.tiny.warmstart_steps": "0"}


def qwen3_0_6b_smoke_sets(tmp_path: Path) -> dict[str, str]:
    """The qwen3_0.6b preset on one GPU (files transport, one actor beside the learner) with a random model of
    its shape and a 64-row GSM8K-style jsonl."""
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} plus {2 * a + 1}?", "answer": str(3 * a + 1)}) + "\n"
                            for a in range(64)))
    return {**QWEN3_0_6B_SHAPE, "run.name": "gpu", "learner.weight_transfer": "files", "learner.batch_groups": "2",
            "actor.max_tokens_per_turn": "32", "actor.max_tokens_per_episode": "256", "actor.concurrency": "32",
            "env.kwargs": f'{{path = "{data}", prompt_key = "question", answer_key = "answer", verifier = "numeric"}}'}


def test_qwen3_0_6b_smoke_settings_load_and_the_model_has_its_shape(tmp_path):
    """Without a GPU: the smoke run's settings pass validation and build a model of Qwen3-0.6B's shape."""
    import torch
    from transformers import AutoModelForCausalLM

    from configs import load_config
    from tiny.build import build_model_config
    from tiny.tokenizer import build_tokenizer

    sets = {**qwen3_0_6b_smoke_sets(tmp_path), "model.path": str(tmp_path / "model")}
    cfg = load_config("qwen3_0.6b", [f"{k}={v}" for k, v in sets.items()], env={})
    assert cfg.env.chat and cfg.learner.weight_transfer == "files"
    tok = build_tokenizer()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_model_config(cfg.model.tiny, len(tok), tok))
    layers = sum(p.numel() for p in model.model.layers.parameters())
    # Qwen3-0.6B: 0.60 B parameters, of which 0.16 B are its 151,936 x 1,024 embedding; the decoder layers hold 0.44 B
    assert 0.43e9 < layers < 0.45e9, layers


@pytest.mark.gpu
def test_qwen3_0_6b_preset_smoke_run_on_a_random_model_of_its_shape(tmp_path, redis_url):
    run_gpu_job(tmp_path, redis_url, "qwen3_0.6b", qwen3_0_6b_smoke_sets(tmp_path), "files")


def run_gpu_job(tmp_path: Path, redis_url: str, config: str, extra: dict[str, str], transport: str) -> None:
    """Build the model, run the learner for 3 steps with one actor beside it, check the actor served weights."""
    env = {**os.environ, "DCRL_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    args = ["--config", config, *_sets(tmp_path, **extra)]
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
