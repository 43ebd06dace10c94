"""The replay queue against a real redis-server: delivery, reclaim, persistence, validation, outages, AUTH."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import redis

from buffer import ControlPlane, GroupReader, GroupWriter, connect
from buffer.server import free_port, start_redis
from buffer.synthetic import synthetic_group
from configs.schema import RedisConfig
from protocol import Control, Trajectory, TrajectoryGroup, encode

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


def fast_cfg(url: str, **over) -> RedisConfig:
    """Small timeouts so reclaim and retries happen within a test."""
    base = dict(url=url, pending_timeout_s=0.5, read_block_ms=200, retry_backoff_s=0.05,
                retry_backoff_max_s=0.2, connect_timeout_s=5.0, max_outage_s=20.0)
    return RedisConfig(**{**base, **over})


def groups(n: int, seed: int = 0, prefix: str = "g", **kw) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(seed)
    return [synthetic_group(rng, f"{prefix}{i}", n_traj=2, n_tokens=16, vocab_size=VOCAB, **kw) for i in range(n)]


def xadd_all(cfg: RedisConfig, payloads: list[dict]) -> list[str]:
    """Raw XADDs (what a buggy or hostile producer could write), returning the stream ids."""
    client = connect(cfg)
    try:
        pipe = client.pipeline(transaction=False)
        for fields in payloads:
            pipe.xadd(f"{cfg.prefix}:traj", fields)
        return [i.decode() for i in pipe.execute()]
    finally:
        client.close()


def drain(reader: GroupReader, want: int, timeout_s: float = 15.0, batch: int = 16, **kw) -> list:
    """Receive until ``want`` entries came back or ``timeout_s`` passed (then returns what it has)."""
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += reader.receive(min(batch, want - len(got)), block_ms=100, **kw)
    return got


def test_writer_reader_round_trip_delivers_each_group_once(redis_url):
    cfg = fast_cfg(redis_url)
    sent = groups(30)
    writer = GroupWriter(cfg, "actor-0")
    for g in sent:
        writer.send(g)
    assert writer.close() == 0
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    got = drain(reader, 30)
    assert [e.group for e in got] == sent  # same content, stream order
    assert reader.receive(8, block_ms=50) == []
    assert reader.ack([e.id for e in got]) == 30
    assert reader.ack([e.id for e in got]) == 0  # acking twice counts once
    counters = ControlPlane(cfg).counters()
    assert counters["consumed"] == 30 and counters["dead"] == 0
    assert reader.client.xlen(f"{cfg.prefix}:traj") == 0  # acked entries are deleted: memory stays bounded
    reader.close()


def test_writer_reuses_its_encode_buffers_without_corrupting_written_entries(redis_url):
    """The sender encodes each batch into the buffers of the batches before it: groups of changing sizes, one
    batch at a time, must reach Redis byte for byte as ``encode`` writes them."""
    cfg = fast_cfg(redis_url)
    rng = np.random.default_rng(3)
    sent = [synthetic_group(rng, f"g{i}", n_traj=4, n_tokens=n, vocab_size=VOCAB, version=0)
            for i, n in enumerate([64, 900, 8, 300, 2000, 16, 700, 5, 1200, 40])]
    writer = GroupWriter(cfg, "actor-0")
    for i in range(0, len(sent), 2):  # batches of 2: each after the previous one is written
        writer.send(sent[i])
        writer.send(sent[i + 1])
        assert writer.flush(10.0) == 0
    assert 0 < len(writer._buffers) <= 2  # the buffers came back for reuse
    assert writer.close() == 0
    stored = [f[b"data"] for _, f in connect(cfg).xrange(f"{cfg.prefix}:traj")]
    assert stored == [encode(g) for g in sent]
    assert writer.sent_bytes == sum(len(b) for b in stored)


def test_reader_holds_unacked_entries_without_redelivering_them(redis_url):
    cfg = fast_cfg(redis_url, pending_timeout_s=0.2)
    writer = GroupWriter(cfg, "actor-0")
    for g in groups(6):
        writer.send(g)
    writer.close()
    reader = GroupReader(cfg, "learner-0")
    first = reader.receive(4)
    time.sleep(0.4)  # longer than pending_timeout_s: XAUTOCLAIM sees our own unacked entries as idle
    rest = drain(reader, 2) + reader.receive(8, block_ms=50)
    ids = [e.id for e in first + rest]
    assert len(ids) == len(set(ids)) == 6
    assert reader.held == 6
    reader.ack(ids)
    assert reader.held == 0


def test_reader_reclaims_every_entry_of_a_killed_consumer(redis_url):
    cfg = fast_cfg(redis_url)
    sent = {g.group_id for g in groups(20)}
    writer = GroupWriter(cfg, "actor-0")
    for g in groups(20):
        writer.send(g)
    writer.close()
    code = (
        "import sys, time\n"
        "from configs.schema import RedisConfig\n"
        "from buffer import GroupReader\n"
        "r = GroupReader(RedisConfig(url=sys.argv[1]), 'doomed')\n"
        "got = r.receive(8, block_ms=2000)\n"
        "print(' '.join(e.id for e in got), flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, redis_url], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        doomed_ids = proc.stdout.readline().split()
        assert len(doomed_ids) == 8, "the doomed consumer should hold a batch when it is killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    survivor = GroupReader(cfg, "survivor", vocab_size=VOCAB)
    got = drain(survivor, 20)
    ids = [e.id for e in got]
    assert len(ids) == len(set(ids)) == 20  # nothing twice
    assert set(doomed_ids) <= set(ids)  # the killed consumer's batch came back
    assert {e.group.group_id for e in got} == sent  # nothing lost
    survivor.ack(ids)
    info = survivor.client.xpending(f"{cfg.prefix}:traj", cfg.consumer_group)
    assert info["pending"] == 0


def test_restarted_consumer_rereads_its_own_pending_entries_first(redis_url):
    cfg = fast_cfg(redis_url, pending_timeout_s=60.0)  # no reclaim: only the own-pending path can return them
    writer = GroupWriter(cfg, "actor-0")
    for g in groups(10):
        writer.send(g)
    writer.close()
    crashed = GroupReader(cfg, "learner-0")
    held = crashed.receive(4)
    crashed.close()  # a crash: nothing acked
    restarted = GroupReader(cfg, "learner-0")
    again = restarted.receive(4, block_ms=50)
    assert [e.id for e in again] == [e.id for e in held]
    rest = drain(restarted, 6)
    assert {e.id for e in rest}.isdisjoint(e.id for e in held)
    assert len({e.id for e in rest}) == 6


def test_redis_restart_keeps_unacked_entries(redis_server):
    cfg = fast_cfg(redis_server.url, pending_timeout_s=60.0)
    sent = groups(12)
    writer = GroupWriter(cfg, "actor-0")
    for g in sent:
        writer.send(g)
    assert writer.close() == 0
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    held = reader.receive(5)
    assert len(held) == 5

    redis_server.restart()  # SIGTERM: redis-server writes its append-only file; the new one replays it

    rest = drain(reader, 7)  # the same client reconnects; held entries are not handed out twice
    assert {e.group.group_id for e in held + rest} == {g.group_id for g in sent}
    reader.ack([e.id for e in rest])
    restarted = GroupReader(cfg, "learner-0", vocab_size=VOCAB)  # a learner restarted after the restart
    assert [e.id for e in restarted.receive(8, block_ms=50)] == [e.id for e in held]


def test_writer_holds_groups_while_redis_is_down_and_delivers_them(redis_server, caplog):
    cfg = fast_cfg(redis_server.url)
    writer = GroupWriter(cfg, "actor-0")
    sent = groups(20)
    caplog.set_level(logging.INFO, logger="dcrl.buffer")
    redis_server.stop()
    t0 = time.monotonic()
    for g in sent:
        writer.send(g)  # must neither raise nor wait
    assert time.monotonic() - t0 < 1.0
    time.sleep(0.5)  # the sender retries a few times meanwhile
    assert writer.held == 20
    redis_server.start()
    assert writer.flush(15.0) == 0
    writer.close()
    outage_lines = [r for r in caplog.records if "writer actor-0" in r.getMessage() and "unreachable" in r.getMessage()]
    assert len(outage_lines) == 1  # one line per outage, not one per retry
    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    got = drain(reader, 20)
    assert sorted(e.group.group_id for e in got) == sorted(g.group_id for g in sent)


def test_writer_send_blocks_at_max_held_groups_instead_of_dropping(redis_server):
    cfg = fast_cfg(redis_server.url, max_held_groups=3)
    writer = GroupWriter(cfg, "actor-0")
    sent = groups(4)
    redis_server.stop()
    for g in sent[:3]:
        writer.send(g)
    assert not writer.try_send(sent[3])  # the event loop's non-blocking form refuses, queueing nothing
    assert writer.held == 3
    fourth = threading.Thread(target=writer.send, args=(sent[3],))
    fourth.start()
    fourth.join(0.5)
    assert fourth.is_alive()  # blocked: the fourth group is neither dropped nor held beyond the cap
    assert writer.held == 3
    redis_server.start()
    fourth.join(15.0)
    assert not fourth.is_alive()
    assert writer.flush(15.0) == 0
    fifth = groups(1, prefix="late")[0]
    assert writer.try_send(fifth)  # under the cap again: queued without blocking
    assert writer.close() == 0
    reader = GroupReader(cfg, "learner-0")
    assert sorted(e.group.group_id for e in drain(reader, 5)) == sorted(g.group_id for g in [*sent, fifth])


def test_reader_waits_out_a_short_redis_outage(redis_server):
    cfg = fast_cfg(redis_server.url)
    reader = GroupReader(cfg, "learner-0")
    writer = GroupWriter(cfg, "actor-0")
    redis_server.stop()
    restarter = threading.Timer(0.5, redis_server.start)
    restarter.start()
    try:
        assert reader.receive(4, block_ms=50) == []  # retried through the outage instead of raising
        assert reader._retry.outages == 1
        writer.send(groups(1)[0])
        assert writer.flush(10.0) == 0
        assert len(drain(reader, 1)) == 1
    finally:
        restarter.join()
        writer.close()


def _traj(n=8, **over) -> dict:
    """Fields of a valid trajectory as numpy arrays, with overrides."""
    arrays = dict(token_ids=np.arange(n) % VOCAB, logprobs=np.full(n, -0.5), versions=np.zeros(n),
                  loss_mask=np.ones(n), reward=1.0)
    arrays.update(over)
    return arrays


def _group_with(gid: str, **over) -> bytes:
    a = _traj(**over)
    t = Trajectory.from_arrays(a["token_ids"], a["logprobs"], a["versions"], a["loss_mask"], reward=a["reward"])
    return encode(TrajectoryGroup(group_id=gid, actor_id="bad", engine="e", env="x", seed=0, trajectories=[t]))


def garbage_payload(kind: str, i: int, rng: np.random.Generator, current_version: int) -> dict:
    """One invalid stream entry of the given kind (the fields dict for XADD)."""
    valid = encode(groups(1, seed=10_000 + i)[0])
    if kind == "random_bytes":
        return {"data": rng.bytes(int(rng.integers(0, 300)))}
    if kind == "truncated":
        return {"data": valid[: int(rng.integers(0, len(valid)))]}
    if kind == "wrong_types":
        bad = msgspec.msgpack.encode({"group_id": i, "actor_id": ["x"], "engine": 1, "env": None,
                                      "seed": "s", "trajectories": "none"})
        return {"data": bad if i % 2 else encode(Control(version=1, max_staleness=1))}
    if kind == "nan_logprobs":
        lp = np.full(8, -0.5)
        lp[int(rng.integers(8))] = np.nan
        return {"data": _group_with(f"nan{i}", logprobs=lp)}
    if kind == "future_version":
        return {"data": _group_with(f"fut{i}", versions=np.full(8, current_version + 1 + i % 3))}
    if kind == "id_out_of_vocab":
        ids = np.arange(8)
        ids[int(rng.integers(8))] = VOCAB + i % 5
        return {"data": _group_with(f"voc{i}", token_ids=ids)}
    if kind == "length_mismatch":
        return {"data": _group_with(f"len{i}", logprobs=np.full(7, -0.5))}
    if kind == "missing_field":
        return {"payload": valid}
    raise ValueError(kind)


# The reason the dead-letter entry must carry, by kind (None: any non-empty decode error).
GARBAGE_REASONS = {
    "random_bytes": None,
    "truncated": None,
    "wrong_types": None,
    "nan_logprobs": "non-finite logprob",
    "future_version": "from the future",
    "id_out_of_vocab": ">= vocab size",
    "length_mismatch": "length mismatch",
    "missing_field": "no 'data' field",
}


def test_garbage_goes_to_dead_letters_and_valid_entries_arrive_exactly_once(redis_url):
    cfg = fast_cfg(redis_url)
    rng = np.random.default_rng(7)
    current_version = 3
    kinds = list(GARBAGE_REASONS)
    valid = groups(100, seed=1, version=current_version)
    items = [("valid", {"data": encode(g)}) for g in valid]
    items += [(kinds[i % len(kinds)], garbage_payload(kinds[i % len(kinds)], i, rng, current_version))
              for i in range(1000)]
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    ids = xadd_all(cfg, [fields for _, fields in items])
    kind_of = dict(zip(ids, (k for k, _ in items)))
    payload_of = dict(zip(ids, (f for _, f in items)))

    reader = GroupReader(cfg, "learner-0", vocab_size=VOCAB)
    got = []
    while True:
        batch = reader.receive(16, block_ms=50, current_version=current_version)
        if not batch:
            break
        got += batch
        reader.ack([e.id for e in batch])

    assert sorted(e.group.group_id for e in got) == sorted(g.group_id for g in valid)  # each exactly once
    assert all(kind_of[e.id] == "valid" for e in got)
    client = reader.client
    assert int(client.get(f"{cfg.prefix}:dead_count")) == 1000
    dead = client.xrange(f"{cfg.prefix}:dead")
    assert len(dead) == 1000
    assert client.xlen(f"{cfg.prefix}:traj") == 0
    for _, fields in dead:
        source = fields[b"source_id"].decode()
        kind = kind_of[source]
        reason = fields[b"reason"].decode()
        assert kind != "valid"
        assert reason, kind
        if GARBAGE_REASONS[kind]:
            assert GARBAGE_REASONS[kind] in reason, (kind, reason)
        if kind != "missing_field":
            assert fields[b"data"] == payload_of[source]["data"]  # raw bytes kept for post-mortems
    assert {kind_of[f[b"source_id"].decode()] for _, f in dead} == set(kinds)


def test_dead_letter_gives_back_the_admission_slot_of_admitted_entries_only(redis_url):
    cfg = fast_cfg(redis_url)
    control = ControlPlane(cfg)
    control.write_control(Control(version=0, max_staleness=0, batch_groups=2))
    a, b = control.admit("actor-0"), control.admit("actor-0")
    assert a and b and not control.admit("actor-0")
    # Garbage written straight into the stream, without a slot or with one copied from a live admission:
    # dead-lettered without moving capacity.
    xadd_all(cfg, [{"data": b"\x00garbage"}, {"data": b"\x00garbage", "slot": b}])
    reader = GroupReader(cfg, "learner-0")
    assert reader.receive(4, block_ms=50) == []
    assert control.counters() == {"produced": 2, "consumed": 0, "dead": 2, "held": 2, "capacity": 2,
                                  "consumed_admitted": 0, "queued": 0, "reconciles": True}
    # An admitted group the learner rejects (from a future version) gives its slot back.
    writer = GroupWriter(cfg, "actor-0")
    writer.send(groups(1, version=3)[0], a)
    assert writer.close() == 0
    assert reader.receive(4, block_ms=200, current_version=0) == []
    assert control.counters() == {"produced": 1, "consumed": 0, "dead": 3, "held": 1, "capacity": 2,
                                  "consumed_admitted": 0, "queued": 0, "reconciles": True}
    assert control.admit("actor-0") and not control.admit("actor-0")


def test_reset_deletes_stream_counters_and_control_and_reader_recovers(redis_url):
    cfg = fast_cfg(redis_url)
    control = ControlPlane(cfg)
    control.write_control(Control(version=2, max_staleness=1, batch_groups=1))
    slot = control.admit("actor-0")
    assert slot and control.admit("actor-0")  # one delivered, one still held at the reset
    reader = GroupReader(cfg, "learner-0")
    writer = GroupWriter(cfg, "actor-0")
    writer.send(groups(1)[0], slot)
    writer.flush()
    assert len(drain(reader, 1)) == 1
    control.reset()
    assert control.read_control() is None
    assert control.counters() == {"produced": 0, "consumed": 0, "dead": 0, "held": 0, "capacity": -1,
                                  "consumed_admitted": 0, "queued": 0, "reconciles": True}
    assert not reader.client.exists(f"{cfg.prefix}:held", f"{cfg.prefix}:delivered")
    writer.send(groups(1, prefix="new")[0])
    writer.close()
    assert [e.group.group_id for e in drain(reader, 1)] == ["new0"]  # group recreated after the reset


def test_wrong_or_missing_password_fails_at_start_naming_the_setting(tmp_path):
    server = start_redis(tmp_path / "r", password="s3cret")
    try:
        for password in (None, "wrong"):
            cfg = fast_cfg(server.url, password=password)
            for make in (connect, lambda c: GroupWriter(c, "a"), lambda c: GroupReader(c, "l"), ControlPlane):
                with pytest.raises(RuntimeError, match="redis.password") as err:
                    make(cfg)
                assert "DCRL_REDIS_PASSWORD" in str(err.value)
                assert "s3cret" not in str(err.value)
        assert connect(fast_cfg(server.url, password="s3cret")).ping()
    finally:
        server.stop()


def test_redis_server_gets_its_password_on_stdin_not_in_its_command_line(tmp_path):
    password = 'hunter2 "quoted" \\ \xe9'
    server = start_redis(tmp_path / "r", password=password)
    try:
        assert password not in server.proc.args and not any("requirepass" in a for a in server.proc.args)
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline and password.encode() not in cmdline
        assert connect(fast_cfg(server.url, password=password)).ping()
        with pytest.raises(RuntimeError, match="redis.password"):
            connect(fast_cfg(server.url, password="hunter2"))
        server.restart()  # the password is given again on every start
        assert connect(fast_cfg(server.url, password=password)).ping()
    finally:
        server.stop()


def test_connect_gives_up_after_connect_timeout_when_no_server(tmp_path):
    cfg = fast_cfg(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError, match="unreachable"):
        connect(cfg)
    assert time.monotonic() - t0 < 5.0


def test_writer_close_during_an_outage_reports_what_was_not_delivered(redis_server):
    writer = GroupWriter(fast_cfg(redis_server.url), "actor-0")
    redis_server.stop()
    for g in groups(3):
        writer.send(g)
    t0 = time.monotonic()
    assert writer.close(timeout_s=0.3) == 3
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(RuntimeError, match="after close"):
        writer.send(groups(1)[0])


def test_writer_surfaces_a_non_outage_error_to_the_caller(redis_url):
    cfg = fast_cfg(redis_url)
    connect(cfg).set(f"{cfg.prefix}:traj", "not a stream")  # XADD now fails with WRONGTYPE: not an outage
    writer = GroupWriter(cfg, "actor-0")
    writer.send(groups(1)[0])
    with pytest.raises(RuntimeError, match="WRONGTYPE"):
        writer.flush(5.0)
    with pytest.raises(RuntimeError, match="WRONGTYPE"):
        writer.send(groups(1)[0])
    with pytest.raises(RuntimeError, match="WRONGTYPE"):
        writer.close()


def test_reader_gives_up_after_max_outage_s(redis_server):
    reader = GroupReader(fast_cfg(redis_server.url, max_outage_s=0.5), "learner-0")
    redis_server.stop()
    t0 = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError, match="unreachable for"):
        reader.receive(4, block_ms=50)
    assert time.monotonic() - t0 < 5.0
