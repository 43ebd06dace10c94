"""The Ray launcher on a local single-node Ray (127.0.0.1): learner + 2 CPU actor replicas, one killed
mid-run and restarted by Ray; the run completes and no buffer entry is lost. With weights as files and
broadcast over gloo (the restarted replica joins the learner's weight transfer again)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from buffer.server import free_port
from helpers import wait_until

pytestmark = pytest.mark.slow  # starts a Ray job

ROOT = Path(__file__).resolve().parents[1]
# Long enough (synchronous, 4 groups of 8 per step) for the killed replica to restart (Ray worker + vLLM
# start, 20-25 s here) and rejoin before the learner finishes, even when the other replica trains alone at
# full speed (measured: 60 steps in ~29 s, too close).
STEPS = 240  # runway for the killed replica to restart (~30 s of vLLM start) and load weights before the end
BATCH = 4


def _wait_for(pred, timeout_s: float, what: str):
    return wait_until(pred, timeout_s, what, poll_s=0.5)


@pytest.mark.parametrize("transport", ["files", "gloo"])
def test_ray_launcher_restarts_killed_actor_and_loses_no_entry(tmp_path, redis_server, transport):
    run_dir = tmp_path / "runs" / "ray"
    sets = {
        "run.root": str(tmp_path / "runs"), "run.name": "ray",
        "learner.steps": str(STEPS), "learner.batch_groups": str(BATCH), "learner.checkpoint_every": "2",
        "learner.wandb_mode": "disabled", "learner.progress": "false", "learner.torch_threads": "1",
        "learner.zmq_pub": f"tcp://127.0.0.1:{free_port()}", "learner.zmq_files": f"tcp://127.0.0.1:{free_port()}",
        "actor.group_size": "8", "actor.concurrency": "16", "actor.status_interval_s": "2",
        "actor.weights_cache_dir": str(tmp_path / "actor-weights"),
        "controller.mode": "sync", "redis.pending_timeout_s": "5",
        "redis.prefix": f"ray-{transport}", "learner.weight_transfer": transport,
        "learner.zmq_transfer": f"tcp://127.0.0.1:{free_port()}",
    }
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, "DCRL_REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "actors.ray_launcher", "--config", "tiny", "--num-actors", "2",
         "--timeout-s", "600", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        pids_file = run_dir / "logs" / "pids.json"
        pids = _wait_for(lambda: pids_file.exists() and json.loads(pids_file.read_text()), 180, "pids.json")
        metrics = run_dir / "metrics.jsonl"
        # Kill actor-1's Ray worker once training is under way (at least one step done).
        _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 300, "the first learner step")
        worker_pid, role_pid = pids["actor-1"]
        os.kill(worker_pid, signal.SIGKILL)
        out, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, out[-4000:]
    # The killed replica's role process died with its worker, and Ray started a new one.
    _wait_for(lambda: not Path(f"/proc/{role_pid}").exists(), 30, "the killed replica's process to exit")
    log1 = (run_dir / "logs" / "actor-1.log").read_text()
    assert log1.count("[ray] starting") >= 2, log1[-3000:]
    # The new replica rejoined at published weights newer than the initial model.
    after_restart = log1.split("[ray] starting")[-1]
    assert re.search(r"(loaded|received) weights v[1-9]", after_restart), after_restart[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # No entry lost: everything ever added to the stream was consumed (acked) or is still there, none dead.
    r = redis.Redis.from_url(redis_server.url)
    p = f"ray-{transport}"
    info = r.xinfo_stream(f"{p}:traj")
    consumed = int(r.get(f"{p}:consumed") or 0)
    assert int(r.get(f"{p}:dead_count") or 0) == 0
    assert info["entries-added"] == consumed + info["length"]
    assert consumed == STEPS * BATCH


def test_learner_gets_a_gpu_per_rank_under_ray_when_it_trains_on_cuda():
    from actors.ray_launcher import learner_gpus
    from configs import load_config

    def gpus(*sets):
        return learner_gpus(load_config("tiny", list(sets), env={}))

    assert gpus() == 0  # CPU learner: nothing reserved
    assert gpus("learner.world_size=2") == 0  # gloo ranks on CPU
    assert gpus("learner.device=cuda", "learner.world_size=4") == 4  # raised to one per rank
    assert gpus("learner.device=cuda", "ray.num_gpus_learner=8", "learner.world_size=4") == 8  # more stays
    assert gpus("learner.device=auto", "ray.num_gpus_learner=1", "learner.world_size=2") == 2  # a GPU asked for
    assert learner_gpus(load_config("qwen3_8b", [], env={})) == 4
