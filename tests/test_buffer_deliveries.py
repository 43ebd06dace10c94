"""``redis.max_deliveries`` against a real redis-server: an entry that never gets acked (it crashes the learner
on every restart) ends in the dead-letter stream after that many deliveries, and nothing else does."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pydantic import ValidationError

from buffer import ControlPlane, GroupReader, connect
from buffer.synthetic import synthetic_group
from configs.schema import RedisConfig
from protocol import encode

VOCAB = 64


def cfg_for(url: str, **over) -> RedisConfig:
    base = dict(url=url, pending_timeout_s=60.0, read_block_ms=200, retry_backoff_s=0.05,
                retry_backoff_max_s=0.2, connect_timeout_s=5.0, max_outage_s=20.0)
    return RedisConfig(**{**base, **over})


class Stream:
    """Raw XADDs of valid groups, remembering which group each id carries."""

    def __init__(self, cfg: RedisConfig):
        self.cfg = cfg
        self.client = connect(cfg)
        self.rng = np.random.default_rng(0)
        self.group_of: dict[str, str] = {}
        self.data_of: dict[str, bytes] = {}

    def add(self, name: str) -> str:
        data = encode(synthetic_group(self.rng, name, n_traj=2, n_tokens=16, vocab_size=VOCAB))
        sid = self.client.xadd(f"{self.cfg.prefix}:traj", {"data": data}).decode()
        self.group_of[sid], self.data_of[sid] = name, data
        return sid

    def times_delivered(self, sid: str) -> int:
        [row] = self.client.xpending_range(f"{self.cfg.prefix}:traj", self.cfg.consumer_group, min=sid, max=sid,
                                           count=1)
        return row["times_delivered"]

    def dead(self) -> list[dict]:
        return [{k.decode(): v for k, v in f.items()} for _, f in self.client.xrange(f"{self.cfg.prefix}:dead")]

    def assert_accounting(self) -> None:
        """Every entry ever added is consumed (acked), dead-lettered, or still in the stream."""
        plane = ControlPlane(self.cfg)
        counters = plane.counters()
        plane.close()
        added = self.client.xinfo_stream(f"{self.cfg.prefix}:traj")["entries-added"]
        length = self.client.xlen(f"{self.cfg.prefix}:traj")
        assert added == counters["consumed"] + counters["dead"] + length, (added, counters, length)


def receive_all(reader: GroupReader, want: set[str], timeout_s: float = 10.0) -> list:
    """Receive until every id in ``want`` came back (or fail); returns everything received."""
    got: list = []
    deadline = time.monotonic() + timeout_s
    while not want <= {e.id for e in got}:
        assert time.monotonic() < deadline, f"missing {want - {e.id for e in got}}"
        got += reader.receive(8, block_ms=100)
    return got


def test_max_deliveries_must_be_positive():
    with pytest.raises(ValidationError, match="max_deliveries"):
        RedisConfig(max_deliveries=0)
    assert RedisConfig().max_deliveries == 5


def test_entry_never_acked_across_restarts_is_dead_lettered_after_max_deliveries(redis_url):
    cfg = cfg_for(redis_url, max_deliveries=3)
    s = Stream(cfg)
    before = s.add("before")
    poison = s.add("poison")
    after = s.add("after")
    trained: list[str] = []
    # Three learner lives under one consumer name: each gets the poison entry (own pending first), acks what
    # it trained on except the poison one, and "crashes" (closes without acking it).
    expected = {before, poison, after}
    for life in range(3):
        fresh = {s.add(f"life{life}-{i}") for i in range(2)}
        reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
        got = receive_all(reader, expected | fresh)
        assert got[0].id == (poison if life else before)  # a restart re-reads its own pending first
        assert s.times_delivered(poison) == life + 1
        ok = [e.id for e in got if e.id != poison]
        reader.ack(ok)
        trained += ok
        reader.close()
        expected = {poison}

    # Fourth life: the poison entry is not delivered again; new entries still are.
    fresh = {s.add(f"life3-{i}") for i in range(2)}
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    got = receive_all(reader, fresh)
    assert poison not in {e.id for e in got}
    assert reader.receive(8, block_ms=50) == []
    reader.ack([e.id for e in got])
    trained += [e.id for e in got]
    assert reader.dead == 1

    assert sorted(trained) == sorted(sid for sid in s.group_of if sid != poison)  # each valid entry exactly once
    [dead] = s.dead()
    assert dead["source_id"].decode() == poison
    assert dead["reason"].decode() == "delivered 3 times without an ack (redis.max_deliveries=3); " \
                                      "last consumer 'learner-0'"
    assert dead["data"] == s.data_of[poison]  # raw bytes kept for the post-mortem
    assert s.client.xpending(f"{cfg.prefix}:traj", cfg.consumer_group)["pending"] == 0
    reader.close()
    s.assert_accounting()


def test_entry_reclaimed_after_pending_timeout_counts_each_claim(redis_url):
    cfg = cfg_for(redis_url, max_deliveries=3, pending_timeout_s=0.3)
    s = Stream(cfg)
    poison = s.add("poison")
    valid = s.add("valid")

    a = GroupReader(cfg, "learner-a", vocab_size=VOCAB)  # delivery 1 (new entry)
    got = receive_all(a, {poison, valid})
    a.ack([valid])
    a.close()
    a = GroupReader(cfg, "learner-a", vocab_size=VOCAB)  # delivery 2 (restart: own pending)
    assert [e.id for e in a.receive(8, block_ms=50)] == [poison]
    a.close()
    assert s.times_delivered(poison) == 2

    time.sleep(0.5)  # past pending_timeout_s: learner-a counts as dead
    b = GroupReader(cfg, "learner-b", vocab_size=VOCAB)  # delivery 3 (claimed from learner-a)
    got = receive_all(b, {poison})
    assert [e.id for e in got] == [poison]
    assert s.times_delivered(poison) == 3
    b.close()

    time.sleep(0.5)
    late = s.add("late")
    c = GroupReader(cfg, "learner-c", vocab_size=VOCAB)  # would be delivery 4: dead-lettered instead
    got = receive_all(c, {late})
    assert [e.id for e in got] == [late]
    assert c.receive(8, block_ms=50) == []
    c.ack([late])
    [dead] = s.dead()
    assert dead["source_id"].decode() == poison
    assert dead["reason"].decode() == "delivered 3 times without an ack (redis.max_deliveries=3); " \
                                      "last consumer 'learner-b'"
    assert c.dead == 1
    c.close()
    s.assert_accounting()


def test_holding_entries_past_pending_timeout_does_not_count_deliveries(redis_url):
    """A live learner holds its entries until its next checkpoint, possibly longer than pending_timeout_s;
    the reclaim scans must not count that as deliveries, or its next restart would dead-letter the batch."""
    cfg = cfg_for(redis_url, max_deliveries=2, pending_timeout_s=0.2)
    s = Stream(cfg)
    ids = [s.add(f"g{i}") for i in range(3)]
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    assert {e.id for e in receive_all(reader, set(ids))} == set(ids)
    for _ in range(4):  # several reclaim scans while the entries sit idle past pending_timeout_s
        time.sleep(0.25)
        assert reader.receive(8, block_ms=10) == []
    assert [s.times_delivered(sid) for sid in ids] == [1, 1, 1]
    reader.close()

    restarted = GroupReader(cfg, "learner-0", vocab_size=VOCAB)  # delivery 2 of 2: still delivered
    got = restarted.receive(8, block_ms=50)
    assert [e.id for e in got] == ids
    restarted.ack(ids)
    restarted.close()
    assert s.dead() == []
    s.assert_accounting()
