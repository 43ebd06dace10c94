"""End to end on CPU: ``python -m learner`` and one real vLLM actor (``python -m actors``) on the tiny preset.

Checks that a few learner steps train every parameter, advance the version, and that the actor follows
(with weights as files, and broadcast over gloo through vLLM's weight-transfer engine):
with a staleness cap of 0 it can only produce the next batch after a step, by which time the new weights
are announced, so later batches carry versions > 0 (tokens sampled by weights the learner published).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from buffer.server import free_port
from configs.schema import load_config
from helpers import child_pids, stop_processes
from learner.metrics import REQUIRED_KEYS, read_metrics

pytestmark = pytest.mark.slow  # starts learner and actor processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("transport", ["files", "gloo"])
def test_learner_with_vllm_actor_trains_and_actor_serves_new_weights(tmp_path, redis_url, transport):
    import torch
    from safetensors.torch import load_file

    from buffer import ControlPlane
    from tiny.build import ensure_model

    steps = 4
    overrides = [
        f"run.root={tmp_path / 'runs'}", "run.name=e2e", f"redis.url={redis_url}", "redis.prefix=e2e",
        f"model.path={ROOT / '.cache' / 'tiny-qwen3'}",  # the suite's shared warm-started tiny model
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
        "learner.wandb_mode=disabled", "learner.progress=false", f"learner.steps={steps}",
        "learner.batch_groups=2", "learner.micro_batch=16", "learner.checkpoint_every=2", "learner.lr=1e-3",
        "learner.wait_timeout_s=300", f"learner.weight_transfer={transport}",
        f"learner.zmq_transfer=tcp://127.0.0.1:{free_port()}",
        "actor.group_size=4", "actor.concurrency=8", "actor.status_interval_s=5", "actor.report_interval_s=0.1", "actor.weights_poll_s=0.5",
        f"actor.weights_cache_dir={tmp_path / 'actor_weights'}",
        "controller.k_max=0", "controller.k_min=0",
    ]
    cfg = load_config("tiny", overrides, env={})
    model_dir = ensure_model(cfg)  # built once here, not raced by the two processes
    initial = load_file(str(model_dir / "model.safetensors"))

    env = {k: v for k, v in os.environ.items() if not k.startswith("DCRL_")}
    env.update(PYTHONUNBUFFERED="1", VLLM_CPU_KVCACHE_SPACE="1")
    sets = [a for o in overrides for a in ("--set", o)]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("learner", "actor")}
    learner = subprocess.Popen([sys.executable, "-m", "learner", "--config", "tiny", *sets], cwd=ROOT, env=env,
                               stdout=logs["learner"], stderr=subprocess.STDOUT)
    actor = subprocess.Popen([sys.executable, "-m", "actors", "--config", "tiny", *sets, "--actor-id", "actor-0"],
                             cwd=ROOT, env=env, stdout=logs["actor"], stderr=subprocess.STDOUT)
    try:
        rc = learner.wait(timeout=420)
        # Control.stop ends the actor by itself (drain in-flight groups, exit 0).
        actor_rc = actor.wait(timeout=120)
    finally:
        stop_processes((learner, actor))
        for f in logs.values():
            f.close()
    tail = {n: (tmp_path / f"{n}.log").read_text()[-4000:] for n in logs}
    assert rc == 0, tail["learner"]
    assert actor_rc == 0, tail["actor"]

    rows = read_metrics(cfg.run.dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), tail["learner"]
    assert [r["version"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert not [k for k in REQUIRED_KEYS if k not in r]
        assert r["staleness/max_allowed"] == 0
        # K = 0: every group starts on the learner's current weights (the actor catches up before it
        # starts a group), so every trained token is on-policy up to the engine mismatch.
        assert r["staleness/max"] == 0, [x["staleness/max"] for x in rows]
    # The actor loaded weights the learner published: later batches were sampled by versions > 0.
    assert max(r["staleness/newest_version"] for r in rows) >= 1, tail["actor"]
    # The actor's ActorReports reached the learner's metrics as time fractions of the actor's wall time.
    busy = [r["actor/engine_busy_frac"] for r in rows if "actor/engine_busy_frac" in r]
    assert busy and all(0.0 <= b <= 1.0 + 1e-6 for b in busy) and max(busy) > 0, tail["actor"]  # 0: idle at K = 0

    cp = ControlPlane(cfg.redis)
    try:
        c, w = cp.read_control(), cp.latest_weights()
    finally:
        cp.close()
    assert c.stop and c.version == steps and w.version == steps and w.transport == transport
    # Every parameter was trained (the learner's own fp32 weights, from its last checkpoint).
    from learner.checkpoint import load_latest

    trained = load_file(str(load_latest(cfg.run.dir).path / "model.safetensors"))
    common = sorted(set(initial) & set(trained))
    assert len(common) >= len(initial) - 1  # the tied head is stored once in a checkpoint
    unchanged = [k for k in common if torch.equal(initial[k], trained[k])]
    assert not unchanged, f"parameters not trained: {unchanged}"
    if transport == "gloo":  # broadcast straight into vLLM: no weight file anywhere
        assert not (cfg.run.dir / "weights").exists() and not (tmp_path / "actor_weights").exists()
        assert "received weights v" in (tmp_path / "actor.log").read_text()
    else:  # the published file holds those weights in the actors' dtype (bf16), with the explicit head
        published = load_file(str(Path(w.path) / "model.safetensors"))
        assert "lm_head.weight" in published
        for k in common:
            assert published[k].dtype == torch.bfloat16 and torch.equal(published[k], trained[k].bfloat16()), k
    assert (cfg.run.dir / "report.png").stat().st_size > 10_000


def held_by(r, actor_id: str) -> int:
    """Admission slots ``actor_id`` holds in the ledger of the run with prefix ``lease`` (raw Redis, read-only)."""
    return sum(v.decode() == actor_id for v in r.hvals("lease:held"))


def test_actor_killed_holding_admissions_gives_them_back_when_its_lease_lapses(tmp_path, redis_url):
    """Two actors, synchronous admission (K = 0: one batch of slots at a time). actor-2 is SIGKILLed while it
    holds admitted groups and never comes back: without leases those slots would stay counted against the
    capacity and the learner would wait for them until learner.wait_timeout_s. The process killed is the actor
    itself, the worker of its supervisor (a SIGKILLed supervisor would let it stop gracefully and give its slots
    back), with actor.max_restarts=0 for actor-2: the supervisor then stops its vLLM processes and exits."""
    import signal
    import time

    import redis

    from tiny.build import ensure_model

    steps = 8
    overrides = [
        f"run.root={tmp_path / 'runs'}", "run.name=lease", f"redis.url={redis_url}", "redis.prefix=lease",
        f"model.path={ROOT / '.cache' / 'tiny-qwen3'}",
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
        "learner.wandb_mode=disabled", "learner.progress=false", f"learner.steps={steps}",
        "learner.batch_groups=2", "learner.checkpoint_every=4", "learner.wait_timeout_s=300",
        "actor.group_size=4", "actor.concurrency=8", "actor.weights_poll_s=0.5", "actor.lease_s=3",
        "actor.max_tokens_per_turn=8", f"actor.weights_cache_dir={tmp_path / 'actor_weights'}",
        "controller.mode=sync",
    ]
    cfg = load_config("tiny", overrides, env={})
    ensure_model(cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCRL_")}
    env.update(PYTHONUNBUFFERED="1", VLLM_CPU_KVCACHE_SPACE="1")
    sets = [a for o in overrides for a in ("--set", o)]
    log = open(tmp_path / "all.log", "w")
    procs = {"learner": subprocess.Popen([sys.executable, "-m", "learner", "--config", "tiny", *sets], cwd=ROOT,
                                         env=env, stdout=log, stderr=subprocess.STDOUT)}
    for a in ("actor-1", "actor-2"):
        no_restart = ["--set", "actor.max_restarts=0"] if a == "actor-2" else []
        procs[a] = subprocess.Popen([sys.executable, "-m", "actors", "--config", "tiny", *sets, *no_restart,
                                     "--actor-id", a], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    r = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 240
        # Once training is under way, kill actor-2 while it holds admitted groups.
        while time.monotonic() < deadline:
            if (cfg.run.dir / "metrics.jsonl").exists() and held_by(r, "actor-2") > 0:
                break
            time.sleep(0.02)
        held = held_by(r, "actor-2")
        assert held > 0, (tmp_path / "all.log").read_text()[-3000:]
        (worker,) = child_pids(procs["actor-2"].pid)
        os.kill(worker, signal.SIGKILL)
        assert procs["actor-2"].wait(timeout=60) == 128 + signal.SIGKILL  # not restarted; its vLLM stopped
        assert procs["learner"].wait(timeout=240) == 0, (tmp_path / "all.log").read_text()[-4000:]
        assert procs["actor-1"].wait(timeout=120) == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        log.close()
        r.close()
    text = (tmp_path / "all.log").read_text()
    assert "actor-2's lease expired: gave back" in text, text[-3000:]
    assert len(read_metrics(cfg.run.dir / "metrics.jsonl")) == steps
