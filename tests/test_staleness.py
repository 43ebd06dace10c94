"""The read-side staleness guard: ``buffer.reader.is_stale`` (newest generated token vs the learner's version),
applied by GroupReader.receive(max_lag=...) against a real redis-server, and the ceiling the learner passes."""

from __future__ import annotations

import numpy as np
import pytest

from buffer import ControlPlane, GroupReader, GroupWriter
from buffer.reader import is_stale, newest_version
from buffer.synthetic import synthetic_group
from configs import load_config
from configs.schema import RedisConfig
from learner.trainer import stale_cap
from protocol import Control, Trajectory, TrajectoryGroup

VOCAB = 64


def make_cfg(url: str) -> RedisConfig:
    return RedisConfig(url=url, connect_timeout_s=5.0, pending_timeout_s=0.5, read_block_ms=100,
                       retry_backoff_s=0.05, retry_backoff_max_s=0.2, max_outage_s=20.0)


def episode(turn_versions: list[int], turn_len: int = 4, prompt_len: int = 3) -> Trajectory:
    """A multi-turn trajectory: a prompt, then per model turn ``turn_len`` generated tokens sampled by the given
    version, each followed by two environment tokens (mask 0, version -1)."""
    ids, lp, ver, mask, starts = [1] * prompt_len, [0.0] * prompt_len, [-1] * prompt_len, [0] * prompt_len, []
    for v in turn_versions:
        starts.append(len(ids))
        ids += [5] * turn_len + [7, 7]
        lp += [-0.5] * turn_len + [0.0, 0.0]
        ver += [v] * turn_len + [-1, -1]
        mask += [1] * turn_len + [0, 0]
    return Trajectory.from_arrays(ids, lp, ver, mask, reward=1.0, turn_starts=starts, prompt_len=prompt_len)


def group_of(gid: str, *trajs: Trajectory) -> TrajectoryGroup:
    return TrajectoryGroup(group_id=gid, actor_id="actor-0", engine="e", env="x", seed=0, trajectories=list(trajs))


# -- the rule ---------------------------------------------------------------------------------------------------


def test_is_stale_compares_the_lag_of_the_newest_token_with_the_cap():
    assert not is_stale(6, 10, 4)  # lag 4 == cap: kept
    assert is_stale(5, 10, 4)  # lag 5 > cap
    assert not is_stale(10, 10, 0) and is_stale(9, 10, 0)  # sync: only the current version
    assert not is_stale(3, 2, 0)  # ahead of the learner is no lag (the future check is the decoder's)
    with pytest.raises(ValueError):
        is_stale(0, 1, -1)


def test_newest_version_is_the_newest_generated_token_of_the_whole_group():
    g = group_of("g", episode([0, 1, 2]), episode([3]), episode([1, 9, 4]))
    assert newest_version(g) == 9
    assert newest_version(group_of("p", episode([2]))) == 2  # prompt / env tokens (version -1) never count


def test_stale_cap_is_twice_the_ceiling_of_k_plus_the_publish_interval_slack():
    assert stale_cap(load_config("tiny", ["controller.mode=sync"], env={})) == 0
    for mode in ("dcmdp", "fixed", "tis", "none"):
        cfg = load_config("tiny", [f"controller.mode={mode}", "controller.k_max=3", "controller.k_min=0"], env={})
        assert stale_cap(cfg) == 6, mode  # start up to K behind, then wait up to K in the queue
    cfg = load_config("tiny", ["controller.mode=sync", "learner.publish_every=3"], env={})
    assert stale_cap(cfg) == 2  # weights published every 3 versions: the newest token may trail by 2


# -- the reader applies it ---------------------------------------------------------------------------------


@pytest.fixture
def plane(redis_url):
    cfg = make_cfg(redis_url)
    p = ControlPlane(cfg)
    p.write_control(Control(version=10, max_staleness=2, batch_groups=1))  # capacity (2 + 10 + 1) * 1 = 13
    yield p
    p.close()


def send(cfg: RedisConfig, plane: ControlPlane, gs: list[TrajectoryGroup]) -> None:
    writer = GroupWriter(cfg, "actor-0")
    for g in gs:
        slot = plane.admit("actor-0")
        assert slot is not None
        writer.send(g, slot)
    assert writer.close() == 0


def test_a_stale_group_is_dead_lettered_and_gives_its_slot_back_once(plane):
    cfg = plane.cfg
    rng = np.random.default_rng(0)
    fresh = synthetic_group(rng, "fresh", n_traj=2, n_tokens=16, vocab_size=VOCAB, version=8)  # lag 2: kept
    stale = synthetic_group(rng, "stale", n_traj=2, n_tokens=16, vocab_size=VOCAB, version=1)  # lag 9
    send(cfg, plane, [stale, fresh])
    assert plane.counters()["produced"] == 2
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    got = reader.receive(4, block_ms=100, current_version=10, max_lag=2)
    assert [e.group.group_id for e in got] == ["fresh"]
    assert (reader.stale, reader.dead) == (1, 1)
    [(_, dead)] = reader.client.xrange(f"{cfg.prefix}:dead")
    reason = dead[b"reason"].decode()
    assert reason.startswith("stale:") and "lag 9 > cap 2" in reason and "'stale'" in reason, reason
    c = plane.counters()
    assert (c["produced"], c["queued"], c["dead"], c["reconciles"]) == (1, 1, 1, True)  # the slot came back
    stale_id = dead[b"source_id"].decode()
    reader._send_to_dead(stale_id, "stale: again", b"")  # a second consumer racing the first: nothing more
    assert plane.counters()["produced"] == 1 and reader.stale == 1
    reader.ack([e.id for e in got])
    c = plane.counters()
    assert (c["produced"], c["consumed_admitted"], c["queued"], c["held"], c["reconciles"]) == (1, 1, 0, 0, True)
    # Capacity 13, one slot in use: the stale group's slot is free for a replacement.
    assert sum(plane.admit("actor-0") is not None for _ in range(13)) == 12
    reader.close()


def test_a_long_episode_with_old_tokens_but_a_fresh_newest_token_is_not_stale(plane):
    cfg = plane.cfg
    long_episode = group_of("long", episode([0, 1, 3, 6, 9]))  # oldest token lag 10, newest lag 1
    mixed = group_of("mixed", episode([0]), episode([2, 10]))  # one old trajectory, the group's newest lag 0
    old = group_of("old", episode([0, 2, 4]))  # newest lag 6 > cap 2: stale however many turns it has
    send(cfg, plane, [long_episode, mixed, old])
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    got = reader.receive(4, block_ms=100, current_version=10, max_lag=2)
    assert [e.group.group_id for e in got] == ["long", "mixed"]
    assert reader.stale == 1
    [(_, dead)] = reader.client.xrange(f"{cfg.prefix}:dead")
    assert dead[b"reason"].decode().startswith("stale: lag 6 > cap 2")
    assert plane.counters()["reconciles"]
    reader.close()


def test_without_max_lag_nothing_is_stale_and_max_lag_needs_a_version(plane):
    cfg = plane.cfg
    send(cfg, plane, [group_of("ancient", episode([0]))])
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="max_lag"):
        reader.receive(1, max_lag=2)
    with pytest.raises(ValueError, match="max_lag"):
        reader.receive(1, current_version=10, max_lag=-1)
    assert [e.group.group_id for e in reader.receive(1, block_ms=100, current_version=10)] == ["ancient"]
    assert reader.stale == 0
    reader.close()


def test_a_restarted_learner_applies_the_rule_to_its_own_pending_entries(plane):
    cfg = plane.cfg
    send(cfg, plane, [group_of("held", episode([7]))])
    first = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    assert len(first.receive(1, block_ms=100, current_version=8, max_lag=2)) == 1  # lag 1 then
    first.close()  # dies holding it; the restart finds the learner far ahead (version 12: lag 5)
    again = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    assert again.receive(1, block_ms=100, current_version=12, max_lag=2) == []
    assert again.stale == 1
    c = plane.counters()
    assert (c["produced"], c["queued"], c["dead"], c["reconciles"]) == (0, 0, 1, True)
    again.close()
