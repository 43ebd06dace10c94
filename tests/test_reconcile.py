"""The ledger's counters reconcile, ``produced == consumed_admitted + queued + held``, against a real redis-server
through faults: a garbage burst, a learner-like reader SIGKILLed holding entries, an actor-like writer SIGKILLed
mid-production and restarted under its id. Also what ``python -m buffer stats`` prints about it."""

from __future__ import annotations

import json
import random
import time

import msgspec
import numpy as np

from buffer import ControlPlane, GroupReader, GroupWriter
from buffer.admission import DELIVER_LUA
from buffer.stats import collect_stats, format_stats
from buffer.synthetic import synthetic_group
from configs.schema import RedisConfig
from helpers import LEDGER_ACTOR, sigkill, spawn_python
from protocol import Control, encode
from test_buffer import GARBAGE_REASONS, garbage_payload

VOCAB = 64
ACTOR = "actor-0"


def make_cfg(url: str) -> RedisConfig:
    return RedisConfig(url=url, connect_timeout_s=5.0, pending_timeout_s=0.5, read_block_ms=100,
                       retry_backoff_s=0.05, retry_backoff_max_s=0.2, max_outage_s=20.0)


def assert_reconciles(plane: ControlPlane, **expect: int) -> dict:
    """The identity on one atomic snapshot, and any expected values of its counters."""
    c = plane.counters()
    assert c["reconciles"], c
    assert c["produced"] == c["consumed_admitted"] + c["queued"] + c["held"], c
    assert {k: c[k] for k in expect} == expect, c
    return c


# -- (a) a garbage burst ---------------------------------------------------------------------------------------


def test_counters_reconcile_after_a_garbage_burst(redis_url):
    cfg = make_cfg(redis_url)
    plane = ControlPlane(cfg)
    plane.write_control(Control(version=3, max_staleness=2, batch_groups=4))  # capacity 24
    client = plane.client
    rng = np.random.default_rng(3)
    writer = GroupWriter(cfg, ACTOR)
    valid = [synthetic_group(rng, f"v{i}", n_traj=2, n_tokens=16, vocab_size=VOCAB, version=3) for i in range(6)]
    for g in valid:
        writer.send(g, plane.admit(ACTOR))
    stale = synthetic_group(rng, "stale", n_traj=2, n_tokens=16, vocab_size=VOCAB, version=0)
    writer.send(stale, plane.admit(ACTOR))  # admitted, but lag 3 > cap 1 when read
    assert writer.close() == 0
    held = [plane.admit(ACTOR) for _ in range(3)]  # admitted, never delivered (an actor still working)
    # Admitted garbage: an actor bug that writes bad bytes under a real slot (the deliver script, as the writer).
    deliver = client.register_script(DELIVER_LUA)
    deliver_keys = [plane.keys.traj, plane.keys.held, plane.keys.produced, plane.keys.delivered]
    for i in range(2):
        deliver(keys=deliver_keys, args=[random.Random(i).randbytes(40), plane.admit(ACTOR)])
    delivered_slot = next(iter(client.hvals(plane.keys.delivered))).decode()
    assert_reconciles(plane, produced=12, queued=9, held=3, consumed_admitted=0)

    # The burst: every kind of invalid entry, plus forged and copied slots, written straight into the stream.
    kinds = list(GARBAGE_REASONS)
    burst = [garbage_payload(kinds[i % len(kinds)], i, rng, 3) for i in range(120)]
    burst += [
        {"data": rng.bytes(64), "slot": f"{ACTOR}:{'ab' * 8}"},  # forged slot
        {"data": rng.bytes(64), "slot": held[0]},  # copied from a held slot
        {"data": encode(valid[0])[:30], "slot": delivered_slot},  # truncated copy, slot of a delivered entry
        {"data": msgspec.msgpack.encode([1, "two", {"3": 4.0}]), "slot": "x"},  # valid msgpack, wrong type
        {"data": encode(valid[1]), "slot": held[1]},  # a valid group under a copied slot
    ]
    pipe = client.pipeline(transaction=False)
    for fields in burst:
        pipe.xadd(plane.keys.traj, fields)
    pipe.execute()
    assert_reconciles(plane, produced=12, queued=9, held=3)

    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 7 and time.monotonic() < deadline:
        got += reader.receive(32, block_ms=100, current_version=3, max_lag=1)
        assert_reconciles(plane)  # between any two reads
    assert sorted(e.group.group_id for e in got) == sorted([g.group_id for g in valid] + ["v1"])
    assert reader.stale == 1 and reader.dead == 1 + 2 + len(burst) - 1
    # The stale group and the two admitted garbage entries gave their slots back; nothing else moved capacity.
    assert_reconciles(plane, produced=9, queued=6, held=3, consumed_admitted=0)
    assert [e.group.group_id for e in got[:4]] == ["v0", "v1", "v2", "v3"]  # stream order: admitted ones first
    reader.ack([e.id for e in got[:4]])
    assert_reconciles(plane, produced=9, queued=2, held=3, consumed_admitted=4)
    reader.ack([e.id for e in got])
    c = assert_reconciles(plane, produced=9, queued=0, held=3, consumed_admitted=6)
    assert c["consumed"] == 7  # the valid group under a copied slot was acked too, but never held capacity
    assert plane.give_back(ACTOR) == 3
    assert_reconciles(plane, produced=6, queued=0, held=0, consumed_admitted=6)
    reader.close()
    plane.close()


# -- (b) a learner-like reader SIGKILLed holding entries ------------------------------------------------------

READER_CHILD = r"""
import json, sys
from buffer import GroupReader
from configs.schema import RedisConfig

url, n, n_ack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = RedisConfig(url=url, connect_timeout_s=5.0, pending_timeout_s=0.5, read_block_ms=100)
reader = GroupReader(cfg, "learner-A", vocab_size=64)
got = []
while len(got) < n:
    got += reader.receive(n - len(got), block_ms=100, current_version=0, max_lag=4)
reader.ack([e.id for e in got[:n_ack]])
print(json.dumps([e.id for e in got[n_ack:]]), flush=True)
while True:  # holds the rest, as a learner between two checkpoints
    reader.receive(1, block_ms=100, current_version=0, max_lag=4)
"""


def test_counters_reconcile_after_a_reader_is_sigkilled_holding_entries_and_another_reclaims_them(redis_url):
    cfg = make_cfg(redis_url)
    plane = ControlPlane(cfg)
    plane.write_control(Control(version=0, max_staleness=4, batch_groups=4))  # capacity 20
    rng = np.random.default_rng(5)
    writer = GroupWriter(cfg, ACTOR)
    for i in range(10):
        writer.send(synthetic_group(rng, f"g{i}", n_traj=2, n_tokens=16, vocab_size=VOCAB), plane.admit(ACTOR))
    assert writer.close() == 0
    assert_reconciles(plane, produced=10, queued=10, held=0)

    proc = spawn_python(READER_CHILD, redis_url, "8", "3")
    try:
        held_ids = json.loads(proc.stdout.readline())
        assert len(held_ids) == 5
        assert_reconciles(plane, produced=10, consumed_admitted=3, queued=7)
    finally:
        sigkill(proc)
    assert_reconciles(plane, produced=10, consumed_admitted=3, queued=7)

    other = GroupReader(cfg, "learner-B", vocab_size=VOCAB)
    got = []
    deadline = time.monotonic() + 10
    while not set(held_ids) <= {e.id for e in got}:
        assert time.monotonic() < deadline, "the dead reader's entries were not reclaimed"
        got += other.receive(8, block_ms=100, current_version=0, max_lag=4)
        assert_reconciles(plane, produced=10)
    assert len({e.id for e in got}) == len(got) == 7  # its 5 (reclaimed) and the 2 never read
    assert other.ack([e.id for e in got]) == 7
    c = assert_reconciles(plane, produced=10, consumed_admitted=10, queued=0, held=0)
    assert c["consumed"] == 10 and c["dead"] == 0
    other.close()
    plane.close()


# -- (c) an actor-like writer SIGKILLed mid-production, restarted under its id -------------------------------

def test_counters_reconcile_after_a_writer_is_sigkilled_mid_production_and_restarted(redis_url):
    cfg = make_cfg(redis_url)
    plane = ControlPlane(cfg)
    batch, k = 8, 1
    plane.write_control(Control(version=0, max_staleness=k, batch_groups=batch))
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    rng = random.Random(7)
    acked = version = 0
    gave_back, produced = [], []
    for rnd in range(3):
        proc = spawn_python(LEDGER_ACTOR, redis_url, ACTOR, str(rnd))
        try:
            gave_back.append(int(proc.stdout.readline().split()[-1]))  # the predecessor's held slots
            deadline = time.monotonic() + rng.uniform(0.4, 0.9)
            while time.monotonic() < deadline:
                # A learner-like consumer: ack what arrives and move V to acked / batch, so that the capacity
                # (K + V + 1) * batch keeps the actor producing.
                got = reader.receive(16, block_ms=20, current_version=version, max_lag=2)
                acked += reader.ack([e.id for e in got])
                version = acked // batch
                plane.write_control(Control(version=version, max_staleness=k, batch_groups=batch))
                assert_reconciles(plane)  # at any instant, whatever the writer is doing
        finally:
            sigkill(proc)
        produced.append(assert_reconciles(plane)["produced"])  # at the moment of the kill, whatever it interrupted
    assert gave_back[0] == 0  # the first process had no predecessor
    assert produced[0] < produced[1] < produced[2]  # each process under the id produced
    c = plane.counters()
    assert plane.give_back(ACTOR) == c["held"]  # what the next restart would give back first
    while got := reader.receive(64, block_ms=50, current_version=version, max_lag=2):
        acked += reader.ack([e.id for e in got])
    c = assert_reconciles(plane, held=0, queued=0, dead=0)
    assert c["produced"] == c["consumed_admitted"] == c["consumed"] == acked
    assert acked > 3 * batch and version > 3  # the run advanced through the kills
    reader.close()
    plane.close()


# -- what stats prints ------------------------------------------------------------------------------------------


def test_stats_prints_the_reconcile_line_and_flags_a_mismatch(redis_url):
    cfg = make_cfg(redis_url)
    plane = ControlPlane(cfg)
    plane.write_control(Control(version=0, max_staleness=1, batch_groups=2))
    writer = GroupWriter(cfg, ACTOR)
    rng = np.random.default_rng(0)
    for i in range(2):
        writer.send(synthetic_group(rng, f"g{i}", n_traj=2, n_tokens=16, vocab_size=VOCAB), plane.admit(ACTOR))
    writer.send(synthetic_group(rng, "tool", n_traj=2, n_tokens=16, vocab_size=VOCAB))  # no slot
    assert writer.close() == 0
    assert plane.admit(ACTOR)
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    got = reader.receive(8, block_ms=100)
    reader.ack([e.id for e in got if e.group.group_id in ("g0", "tool")])
    st = collect_stats(plane.client, cfg)
    assert (st["produced"], st["consumed_admitted"], st["queued"], st["held"], st["reconciles"]) == (3, 1, 1, 1, True)
    out = format_stats(st)
    assert "ledger: produced = consumed + queued + held: 3 = 1 + 1 + 1 ok" in out
    assert "(1 more acked entries were written without a slot)" in out
    json.dumps(st, default=lambda o: {f: getattr(o, f) for f in o.__struct_fields__})  # what --json prints
    plane.client.incr(plane.keys.produced)  # a write outside the scripts
    st = collect_stats(plane.client, cfg)
    assert not st["reconciles"] and not plane.counters()["reconciles"]
    assert "4 = 1 + 1 + 1 MISMATCH" in format_stats(st)
    reader.close()
    plane.close()
