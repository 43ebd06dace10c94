"""End to end on the long-horizon preset ``tiny_agent`` (key_door, >= 20 turns per episode): ``python -m learner``
and one real vLLM actor (``python -m actors``) on real Redis.

Nothing is discarded for being slow: every episode the actor finished (its own count, by turns and by tokens, in
its final ActorReport) was either trained by the learner (``learner.log_group_ids`` logs the [turns, tokens] of
every trained episode) or is still queued in the stream when the run ends (read back here straight from Redis),
so the length distribution trained is the one the actor produced. And the tokens of one episode carry several
policy versions: the learner publishes every step while the actor's episodes are still running.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from buffer.server import free_port
from configs.schema import load_config
from helpers import stop_processes
from learner.metrics import read_metrics

pytestmark = pytest.mark.slow  # starts learner and actor processes

ROOT = Path(__file__).resolve().parents[1]


def run_job(tmp_path: Path, sets: list[str], timeout_s: float) -> dict[str, str]:
    """Learner and one actor (``actor-0``) on the tiny_agent preset until the learner's last step; returns the
    tail of each log. Fails when either exits non-zero."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCRL_")}
    env.update(PYTHONUNBUFFERED="1", VLLM_CPU_KVCACHE_SPACE="1")
    args = [a for o in sets for a in ("--set", o)]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("learner", "actor")}
    procs = {
        "learner": subprocess.Popen([sys.executable, "-m", "learner", "--config", "tiny_agent", *args], cwd=ROOT,
                                    env=env, stdout=logs["learner"], stderr=subprocess.STDOUT),
        "actor": subprocess.Popen([sys.executable, "-m", "actors", "--config", "tiny_agent", *args,
                                   "--actor-id", "actor-0"], cwd=ROOT, env=env, stdout=logs["actor"],
                                  stderr=subprocess.STDOUT),
    }
    try:
        rcs = {"learner": procs["learner"].wait(timeout=timeout_s)}
        rcs["actor"] = procs["actor"].wait(timeout=120)  # Control.stop: drain in-flight groups, flush, exit 0
    finally:
        stop_processes(procs.values())
        for f in logs.values():
            f.close()
    tails = {n: (tmp_path / f"{n}.log").read_text()[-4000:] for n in logs}
    for name, rc in rcs.items():
        assert rc == 0, tails[name]
    return tails


def test_long_episodes_are_trained_whole_and_span_several_versions(tmp_path, redis_url):
    import redis

    from buffer import ControlPlane
    from protocol.messages import decode_group
    from tiny.build import ensure_model

    steps, batch_groups, group_size, prefix = 32, 1, 2, "agent-e2e"
    sets = [
        f"run.root={tmp_path / 'runs'}", "run.name=agent-e2e", f"redis.url={redis_url}", f"redis.prefix={prefix}",
        f"model.path={ROOT / '.cache' / 'tiny-qwen3-agent'}",  # the preset's warm-started model (make run's)
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
        f"learner.zmq_transfer=tcp://127.0.0.1:{free_port()}",
        "learner.wandb_mode=disabled", "learner.progress=false", f"learner.steps={steps}", f"learner.batch_groups={batch_groups}",
        "learner.checkpoint_every=3", "learner.wait_timeout_s=300", "learner.log_group_ids=true",
        f"actor.group_size={group_size}", "actor.concurrency=16", "actor.report_interval_s=0.2", "actor.status_interval_s=5",
        "actor.reload_budget=1.0",  # load every published version at once: episodes then straddle versions
        # K = 4 from the first step (dcmdp holds K = 0 while it measures the engine floor), small groups, one
        # per step: groups that start together end at different times (failures end early), and the learner
        # trains and publishes on each one that ends while the others are still playing.
        "controller.mode=fixed", "controller.k_max=4",
        f"actor.weights_cache_dir={tmp_path / 'actor_weights'}",
    ]
    cfg = load_config("tiny_agent", sets, env={})
    ensure_model(cfg)  # built once here (cached, shared with make run), not raced by the two processes
    tails = run_job(tmp_path, sets, timeout_s=420)

    rows = read_metrics(cfg.run.dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), tails["learner"]
    trained = [tuple(e) for r in rows for e in r["episodes"]]
    trained_groups = [g for r in rows for g in r["groups"]]
    assert len(trained) == steps * batch_groups * group_size
    # The learner's per-step quantiles describe exactly the episodes it logged for that step.
    for r in rows:
        assert r["episode/turns_max"] == max(t for t, _ in r["episodes"])
        assert r["episode/tokens_max"] == max(n for _, n in r["episodes"])

    client = redis.Redis.from_url(redis_url)
    try:
        queued = [decode_group(f[b"data"]) for _, f in client.xrange(f"{prefix}:traj")]
        dead = client.xlen(f"{prefix}:dead")
    finally:
        client.close()
    cp = ControlPlane(cfg.redis)
    try:
        report = {r.actor_id: r for r in cp.actor_reports()}["actor-0"]
    finally:
        cp.close()
    queued_eps = [(len(t.turn_starts), len(t)) for g in queued for t in g.trajectories]

    # Nothing dead-lettered (stale or otherwise), and every group the actor sent is trained or still queued.
    assert dead == 0
    assert report.groups_sent == len(trained_groups) + len(queued), (report.groups_sent, len(trained_groups), len(queued))
    assert not set(trained_groups) & {g.group_id for g in queued}
    # The same multiset of lengths on both sides: finished = trained + queued, by turns and by tokens.
    finished_turns, finished_tokens = Counter(report.episode_turns), Counter(report.episode_tokens)
    assert finished_turns == Counter(t for t, _ in trained) + Counter(t for t, _ in queued_eps)
    assert finished_tokens == Counter(n for _, n in trained) + Counter(n for _, n in queued_eps)

    # Long horizon: most episodes run 20+ model turns, and the longest contexts reach the model's limit.
    turns = sorted(t for t, _ in trained)
    assert turns[len(turns) // 2] >= 20, turns
    assert max(n for _, n in trained) >= 0.85 * cfg.model.max_seq_len
    assert len(set(trained)) > 5  # a spread of lengths, not one fixed episode shape
    # Several policy versions within one episode, in the tokens the learner trained or the groups still queued. How
    # often an episode straddles a publish depends on how fast episodes run against the learner's step (on a
    # quiet machine 16 steps once gave none), hence 32 steps and the queue too.
    spans = [r["episode/version_span_max"] for r in rows]
    queued_spans = [int(t.versions_np[t.mask_np == 1].max() - t.versions_np[t.mask_np == 1].min())
                    for g in queued for t in g.trajectories]
    assert max(spans + queued_spans) >= 1, (spans, queued_spans)
