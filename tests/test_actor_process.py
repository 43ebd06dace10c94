"""``python -m actors`` as a real process against real Redis and the learner's real weight publisher.

One actor run walks through the life of an actor (one engine start for all of it):
waiting for the learner -> admits exactly the capacity -> idles at the staleness cap -> refuses a
tampered weight file (keeps its version) -> resumes when Control.version advances -> loads good
weights announced over ZMQ (new groups carry the new version) -> SIGTERM while producing: exit 0 and
only whole groups in the stream, the admission counter equal to what was streamed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from buffer.server import free_port
from configs.schema import load_config
from helpers import FAST_TINY, perturbed_model
from protocol.messages import Control, WeightsReady, decode_group

pytestmark = pytest.mark.slow  # starts an actor process on vLLM

ROOT = Path(__file__).resolve().parents[1]
G = 4


def wait_for(pred, timeout_s: float, what: str, log_path: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n--- actor log ---\n"
                         + log_path.read_text()[-5000:])


def start_actor(overrides: list[str], actor_id: str, log_f) -> subprocess.Popen:
    """``python -m actors`` (supervised) on the tiny preset with ``overrides``, its output to ``log_f``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCRL_")}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "actors", "--config", "tiny", "--actor-id", actor_id,
           *[a for o in overrides for a in ("--set", o)]]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_f, stderr=subprocess.STDOUT)


def test_actor_process_admission_weights_and_sigterm(tmp_path, redis_url, tiny_model_dir):
    from buffer import ControlPlane
    from learner.publisher import WeightPublisher, write_version_dir

    overrides = FAST_TINY + [
        f"model.path={tiny_model_dir}", f"redis.url={redis_url}", "redis.prefix=proc", "env.name=arithmetic",
        f"actor.group_size={G}", "actor.concurrency=8", "actor.status_interval_s=0.5",
        "actor.admission_poll_s=0.05", "actor.weights_poll_s=0.3", f"actor.weights_cache_dir={tmp_path / 'cache'}",
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
    ]
    cfg = load_config("tiny", overrides, env={})
    control = ControlPlane(cfg.redis)
    control.reset()
    run_dir = tmp_path / "run"
    publisher = WeightPublisher(cfg.learner, run_dir, tiny_model_dir)
    log_path = tmp_path / "actor.log"
    log_f = open(log_path, "w")
    proc = start_actor(overrides, "actor-3", log_f)
    log = lambda: log_path.read_text()  # noqa: E731
    streamed = lambda: control.client.xlen(control.keys.traj)  # noqa: E731

    def groups(current_version):
        return [decode_group(f[b"data"], current_version=current_version)
                for _, f in control.client.xrange(control.keys.traj)]

    def gen_versions(gs):
        return {int(v) for g in gs for t in g.trajectories for v in t.versions_np[t.mask_np == 1]}

    try:
        # 1. No Control yet: the engine starts and the actor idles without admitting anything.
        wait_for(lambda: "idle: waiting for learner" in log(), 240, "the idle status line", log_path)
        assert streamed() == 0 and control.counters()["produced"] == 0

        # 2. V=0, K=0, 2 groups per step: capacity 2. Exactly 2 groups, then it idles at the cap.
        control.write_control(Control(version=0, max_staleness=0, batch_groups=2))
        wait_for(lambda: streamed() == 2, 60, "2 groups", log_path)
        wait_for(lambda: "idle: at staleness cap K=0" in log(), 10, "the staleness-cap status line", log_path)
        time.sleep(1.0)
        assert streamed() == 2 and control.counters()["produced"] == 2
        first = groups(0)
        assert all(g.actor_id == "actor-3" and g.engine == "vllm-cpu/bf16" and len(g.trajectories) == G
                   for g in first)
        assert gen_versions(first) == {0}

        # 3. A tampered v1: announced with the digest of the file as written, then the file is corrupted.
        model1 = perturbed_model(tiny_model_dir, 0.05, seed=1)
        d1, sha1 = write_version_dir(model1, run_dir, 1, tiny_model_dir)
        publisher.files.remember(1, sha1)
        f = d1 / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        control.set_weights(WeightsReady(version=1, path=str(d1), sha256=sha1, url=cfg.learner.zmq_files))
        wait_for(lambda: "REFUSED weights v1" in log(), 30, "the refusal", log_path)

        # 4. The learner advances (V=1): capacity 4, two more groups, still sampled by version 0.
        control.write_control(Control(version=1, max_staleness=0, batch_groups=2))
        wait_for(lambda: streamed() == 4, 60, "4 groups", log_path)
        assert gen_versions(groups(1)[2:]) == {0}, "the refused weights were used"

        # 5. Good v2 over ZMQ (and Redis): loaded; groups admitted after it carry version 2.
        w2 = publisher.publish(perturbed_model(tiny_model_dir, 0.01, seed=2), 2)
        control.set_weights(w2)
        wait_for(lambda: "loaded weights v2" in log(), 30, "the v2 load", log_path)
        control.write_control(Control(version=2, max_staleness=0, batch_groups=2))
        wait_for(lambda: streamed() == 6, 60, "6 groups", log_path)
        assert gen_versions(groups(2)[4:]) == {2}

        # 6. Open the gate wide, then SIGTERM mid-production.
        control.write_control(Control(version=2, max_staleness=1000, batch_groups=2))
        wait_for(lambda: streamed() >= 8, 60, "production to resume", log_path)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_f.close()
        publisher.close()
    text = log_path.read_text()
    assert rc == 0, text[-5000:]
    assert "stopped (signal)" in text
    final = groups(2)  # every entry decodes and validates: nothing half-written
    assert all(len(g.trajectories) == G for g in final)
    assert len({g.group_id for g in final}) == len(final)
    counters = control.counters()
    assert counters["produced"] == len(final), f"admitted but never streamed: {counters} vs {len(final)}"
    assert control.held("actor-3") == 0
    for g in final:
        for t in g.trajectories:
            assert (t.logprobs_np[t.mask_np == 1] <= 0).all() and np.isfinite(t.logprobs_np).all()
    control.close()


def test_a_stop_signal_after_redis_went_ends_the_actor_within_its_stop_timeout(tmp_path, redis_server,
                                                                                tiny_model_dir):
    """Ctrl-C of ``make run`` stops redis-server and the actor at once; when Redis goes first, the actor must not
    wait out its Redis timeouts (10 s to give back slots, 10 s for the lease, 30 s to flush the writer), or honcho
    SIGKILLs its supervisor and the worker lingers as an orphan. It exits after ``actor.stop_timeout_s`` of
    waiting for Redis plus vLLM's own shutdown (about 5 s here), leaving its lease and slots to lapse."""
    from buffer import ControlPlane

    overrides = FAST_TINY + [
        f"model.path={tiny_model_dir}", f"redis.url={redis_server.url}", "redis.prefix=stop", "env.name=arithmetic",
        f"actor.group_size={G}", "actor.concurrency=8", "actor.status_interval_s=0.5", "actor.stop_timeout_s=2",
        "actor.admission_poll_s=0.05", f"actor.weights_cache_dir={tmp_path / 'cache'}",
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
    ]
    cfg = load_config("tiny", overrides, env={})
    control = ControlPlane(cfg.redis)
    control.reset()
    control.write_control(Control(version=0, max_staleness=1000, batch_groups=2))
    control.close()
    log_path = tmp_path / "actor.log"
    with open(log_path, "w") as log_f:
        proc = start_actor(overrides, "actor-5", log_f)
        try:
            wait_for(lambda: "generating" in log_path.read_text(), 240, "production", log_path)
            redis_server.stop(kill=True)  # gone before the signal, as under Ctrl-C when redis exits first
            proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            rc = proc.wait(timeout=90)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert "stopped (signal)" in text, text[-4000:]
    assert rc == 0, text[-4000:]
    # 2 s for Redis in all plus vLLM's own shutdown (~5 s here); before actor.stop_timeout_s the Redis timeouts
    # alone added up to 50 s. The bound leaves room for a loaded machine's slower engine shutdown.
    assert took < 30, f"the actor took {took:.1f} s to stop\n" + text[-4000:]
