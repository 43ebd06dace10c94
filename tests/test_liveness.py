"""Who is alive, as the learner says it while it waits for data: ``ControlPlane.live_actors`` /
``describe_actors`` (actor leases, the age of their latest report on the Redis server's clock, the slots they
hold) and the wait messages of ``Learner.collect``. A real redis-server; the actor is faked through the public
ControlPlane calls a real actor makes (keep_lease, report_actor, admit)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from buffer import ControlPlane
from configs.schema import RedisConfig, load_config
from protocol import ActorReport, Control


def plane(redis_url: str, prefix: str = "live") -> ControlPlane:
    return ControlPlane(RedisConfig(url=redis_url, prefix=prefix, connect_timeout_s=5.0))


def test_live_actors_are_those_holding_a_lease(redis_url):
    cp, other = plane(redis_url), plane(redis_url, prefix="other-run")
    try:
        assert cp.live_actors() == []
        assert cp.describe_actors() == (
            f"no actor holds a lease under redis.prefix 'live' at {redis_url}: start one (python -m actors) or "
            "check that it uses the same redis.url and redis.prefix")
        other.keep_lease("actor-9", 60)  # another prefix: another run
        cp.keep_lease("actor-0", 60)
        cp.keep_lease("actor-1", 0.2)
        cp.write_control(Control(version=0, max_staleness=0, batch_groups=4))
        assert cp.admit("actor-0") is not None
        cp.report_actor(ActorReport(actor_id="actor-0", wall_s=1.0, engine_busy_s=0.5))
        actors = cp.live_actors()
        assert [a.actor_id for a in actors] == ["actor-0", "actor-1"]
        a0, a1 = actors
        assert 59 < a0.lease_left_s <= 60 and 0 <= a0.report_age_s < 5 and a0.held == 1
        assert a1.report_age_s is None and a1.held == 0
        assert re.fullmatch(r"live actors: actor-0 \(lease (59|60) s left, last report [0-4] s ago, 1 admitted "
                            r"group not yet sent\), actor-1 \(lease 0 s left, no report yet\)", cp.describe_actors())
        time.sleep(0.3)  # actor-1's lease lapses: it is no longer alive
        assert [a.actor_id for a in cp.live_actors()] == ["actor-0"]
        cp.reset()  # a fresh run forgets the report times with the reports (leases expire by themselves)
        assert cp.client.exists(cp.keys.actors_seen) == 0
    finally:
        cp.close()
        other.close()


class FakeClock:
    """Stands in for the ``time`` module of learner.trainer: each monotonic() call is 5 s later."""

    def __init__(self):
        self.now = time.monotonic()

    def monotonic(self) -> float:
        self.now += 5.0
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def bare_learner(tmp_path, redis_url):
    """A Learner with a real reader and control plane on an empty run, a one-layer model, no publisher."""
    import torch

    from buffer import GroupReader
    from learner.controller import DCMDPController
    from learner.trainer import Learner, pick_device

    cfg = load_config("tiny", [f"run.root={tmp_path / 'runs'}", f"redis.url={redis_url}", "redis.prefix=lw",
                               "learner.batch_groups=2", "learner.wait_timeout_s=100", "redis.read_block_ms=10"],
                      env={})
    model = torch.nn.Linear(1, 1)
    learner = Learner(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                      controller=DCMDPController(cfg.controller), reader=GroupReader(cfg.redis, "learner-0"),
                      control=ControlPlane(cfg.redis), publisher=None, metrics=None, run_dir=Path("."),
                      device=pick_device("cpu"))
    yield learner
    learner.reader.close()
    learner.control.close()


def test_collect_names_the_live_actors_while_it_waits_and_when_it_gives_up(bare_learner, monkeypatch, caplog):
    """Every 30 s (of a fake clock) of waiting an INFO line names the live actors; at learner.wait_timeout_s the
    error names them too."""
    import learner.trainer as trainer

    bare_learner.control.keep_lease("actor-0", 60)
    bare_learner.control.report_actor(ActorReport(actor_id="actor-0", wall_s=1.0, engine_busy_s=0.5))
    monkeypatch.setattr(trainer, "time", FakeClock())
    caplog.set_level(logging.INFO, logger="dcrl.learner")
    with pytest.raises(RuntimeError) as err:
        bare_learner.collect()
    live = r"live actors: actor-0 \(lease (59|60) s left, last report [0-4] s ago\)"
    assert re.fullmatch(rf"learner: only 0/2 groups after 100s \(learner.wait_timeout_s\): {live}", str(err.value))
    waits = [r.getMessage() for r in caplog.records if "after waiting" in r.getMessage()]
    assert 1 <= len(waits) <= 3, waits  # at most one per 30 s of the 100 s
    assert all(re.fullmatch(rf"learner: 0/2 groups after waiting \d+ s; {live}", m) for m in waits), waits


def test_collect_with_no_actor_says_which_settings_to_check(bare_learner, redis_url, monkeypatch):
    import learner.trainer as trainer

    monkeypatch.setattr(trainer, "time", FakeClock())
    with pytest.raises(RuntimeError, match=r"^learner: only 0/2 groups after 100s \(learner.wait_timeout_s\): no "
                                           r"actor holds a lease under redis.prefix 'lw' at redis://127\.0\.0\.1:"):
        bare_learner.collect()
