"""The step-time breakdown: learner phases per step, and the actor-side fractions built from ActorReports."""

from __future__ import annotations

import math

import pytest

from buffer import ControlPlane
from configs.schema import RedisConfig
from learner.metrics import Laps, actor_time_fractions
from protocol import ActorReport, decode, encode


def report(actor: str, wall: float, **kw) -> ActorReport:
    base = dict(engine_busy_s=0.0, env_s=0.0, tokenize_s=0.0, generate_s=0.0, redis_s=0.0, reload_s=0.0, idle_s={})
    base.update(kw)
    return ActorReport(actor_id=actor, wall_s=wall, **base)


def test_actor_fractions_are_deltas_over_the_wall_time_between_reports_averaged_over_actors():
    before = {"a": report("a", 10.0, engine_busy_s=5.0, redis_s=1.0, idle_s={"staleness_cap": 2.0},
                          env_s=1.0, tokenize_s=1.0, generate_s=8.0),
              "b": report("b", 10.0, engine_busy_s=9.0)}
    now = [report("a", 20.0, engine_busy_s=13.0, redis_s=1.5, reload_s=0.5, idle_s={"staleness_cap": 3.0},
                  env_s=2.0, tokenize_s=3.0, generate_s=24.0),
           report("b", 15.0, engine_busy_s=14.0),
           report("c", 3.0, engine_busy_s=1.0)]  # no earlier report: not counted yet
    f = actor_time_fractions(before, now)
    assert f["actor/engine_busy_frac"] == pytest.approx((0.8 + 1.0) / 2)
    assert f["actor/redis_frac"] == pytest.approx((0.05 + 0.0) / 2)
    assert f["actor/reload_frac"] == pytest.approx(0.025)
    assert f["actor/idle_staleness_cap_frac"] == pytest.approx(0.1)  # only actor a ever idled
    assert f["actor/episode_generate_frac"] == pytest.approx(16 / 19)
    assert f["actor/episode_env_frac"] + f["actor/episode_tokenize_frac"] == pytest.approx(3 / 19)


def test_actor_fractions_skip_a_restarted_actor_and_are_empty_without_new_reports():
    before = {"a": report("a", 50.0, engine_busy_s=40.0)}
    assert actor_time_fractions(before, [report("a", 5.0, engine_busy_s=4.0)]) == {}  # restarted: clock reset
    assert actor_time_fractions(before, [before["a"]]) == {}


def test_env_errors_are_summed_over_actors_as_counts_since_the_last_reports():
    before = {"a": report("a", 10.0, env_errors=2), "b": report("b", 10.0, env_errors=5)}
    now = [report("a", 20.0, env_errors=3),  # 1 new
           report("b", 10.0, env_errors=5),  # no new report
           report("c", 4.0, env_errors=4)]  # first report: all of its errors are new
    assert actor_time_fractions(before, now)["episode/env_errors"] == 5
    # A restarted actor (clock went back) counts its errors from its new start; no fractions for it yet.
    assert actor_time_fractions(before, [report("a", 1.0, env_errors=1)]) == {"episode/env_errors": 1}
    assert actor_time_fractions(before, [report("a", 20.0, env_errors=2)])["episode/env_errors"] == 0


def test_laps_charge_time_to_the_phase_that_ended():
    laps = Laps("cpu")
    laps("a")
    sum(range(200_000))
    laps("b")
    laps("a")
    assert set(laps.seconds) == {"a", "b"} and laps.seconds["b"] > 0 and all(v >= 0 for v in laps.seconds.values())


def test_actor_reports_round_trip_through_redis_and_malformed_ones_are_skipped(redis_url):
    plane = ControlPlane(RedisConfig(url=redis_url, connect_timeout_s=5.0))
    r = report("actor-1", 12.5, engine_busy_s=10.0, idle_s={"waiting_for_learner": 1.5}, generated_tokens=900)
    assert decode(encode(r), ActorReport) == r
    plane.report_actor(r)
    plane.client.hset(plane.keys.actors, "garbage", b"\x00not msgpack")
    assert plane.actor_reports() == [r]
    plane.reset()
    assert plane.actor_reports() == []
    assert not math.isnan(r.wall_s)
    plane.close()
