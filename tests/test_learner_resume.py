"""Crash safety of ``python -m learner``: SIGKILL between an optimizer step and its checkpoint, restart,
and check that no buffer entry is lost or trained twice and that versions stay monotone."""

from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from buffer.server import free_port
from learner.metrics import read_metrics
from test_learner import TINY, data_model, make_groups, push, stream_state  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # starts learner processes

ROOT = Path(__file__).resolve().parents[1]


def run_learner(overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCRL_")}
    cmd = [sys.executable, "-m", "learner", "--config", "tiny", "--log-level", "WARNING"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_learner_sigkill_before_checkpoint_then_restart_trains_each_entry_once(tmp_path, redis_url, random_tiny_dir,
                                                                                  data_model):
    from buffer import ControlPlane
    from configs.schema import load_config
    from learner.checkpoint import list_checkpoints

    overrides = [
        f"run.root={tmp_path / 'runs'}", "run.name=crash", f"redis.url={redis_url}", "redis.prefix=crash",
        f"model.path={random_tiny_dir}", *TINY,
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
        "learner.wandb_mode=disabled", "learner.progress=false", "learner.batch_groups=2", "learner.micro_batch=4",
        "learner.steps=4", "learner.checkpoint_every=2", "learner.keep_checkpoints=5",
    ]
    cfg = load_config("tiny", overrides, env={})
    ids = push(cfg, make_groups(data_model, 8, tag="crash"))
    assert len(ids) == 8

    # Run 1: checkpoint after step 2, SIGKILL right after step 3 (weights v3 published, Control at 3).
    r = run_learner([*overrides, "learner.crash_after_step=3"])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    cp = ControlPlane(cfg.redis)
    assert cp.read_control().version == 3
    assert [p.name for p in list_checkpoints(cfg.run.dir)] == ["step_000002"]
    assert stream_state(cfg) == (4, 2)  # steps 1-2 acked; step 3's two entries pending; two never read
    assert [row["step"] for row in read_metrics(cfg.run.dir / "metrics.jsonl")] == [1, 2, 3]

    # Run 2: resumes from step 2, keeps versions monotone (starts at 3, not 2), retrains step 3's entries.
    r = run_learner(overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "metrics.jsonl" in r.stdout
    c = cp.read_control()
    assert c.stop and c.version == 5  # 2 (checkpoint) -> 3 (Redis) -> two more steps
    w = cp.latest_weights()
    assert w.version == 5 and Path(w.path).name == "v000005"

    states = [json.loads((p / "state.json").read_text()) for p in list_checkpoints(cfg.run.dir)]
    assert [s["step"] for s in states] == [2, 4]
    trained = [i for s in states for i in s["trained_ids"]]
    assert sorted(trained) == sorted(ids), "an entry was lost or trained twice"
    assert states[-1]["trained_total"] == 8 and states[-1]["version"] == 5
    assert stream_state(cfg) == (0, 0)
    assert cp.counters()["consumed"] == 8
    cp.close()

    rows = read_metrics(cfg.run.dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # the crashed step-3 line was replaced
    assert [row["version"] for row in rows] == [1, 2, 4, 5]
    assert (cfg.run.dir / "report.png").exists()
