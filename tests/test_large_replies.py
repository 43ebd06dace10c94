"""The learner's stream reader receives large bulk strings in place (buffer.connection.LargeReplyBuffer): same
bytes as redis-py's stock parser, the connection stays usable after them, and socket failures in the middle
of one become the redis errors the Retrier knows."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import redis

from buffer import GroupReader, GroupWriter, connect
from buffer.connection import LARGE_REPLY_BYTES, LargeReplyBuffer
from buffer.synthetic import synthetic_group
from configs.schema import RedisConfig

VOCAB = 151_936
SIZES = [0, 5, LARGE_REPLY_BYTES - 1, LARGE_REPLY_BYTES, LARGE_REPLY_BYTES + 1, 65_534, 65_536 + 7, 3 << 20]


@pytest.mark.parametrize("query", ["", "?protocol=2"], ids=["default", "resp2"])
def test_large_bulk_strings_arrive_as_the_stock_parser_reads_them(redis_url, query):
    """redis-py's default (RESP3 on the wire since redis-py 6) and RESP2 (the default of redis-py 5)."""
    cfg = RedisConfig(url=redis_url + query, prefix="lr")
    fast, stock = connect(cfg, "fast", large_replies=True), connect(cfg, "stock")
    try:
        rng = np.random.default_rng(0)
        blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in SIZES]
        # CRLF inside and at the edges of a payload must not confuse the length-framed read.
        blobs.append(b"\r\n" * (LARGE_REPLY_BYTES // 2 + 3))
        for i, b in enumerate(blobs):
            stock.xadd("lr:s", {"data": b, "n": str(i)})
        for client in (fast, stock):
            client.xgroup_create("lr:s", f"g-{id(client)}", id="0")
        got_fast = fast.xreadgroup(f"g-{id(fast)}", "c", {"lr:s": ">"}, count=100)[0][1]
        got_stock = stock.xreadgroup(f"g-{id(stock)}", "c", {"lr:s": ">"}, count=100)[0][1]
        assert len(got_fast) == len(got_stock) == len(blobs)
        for (fid, ffields), (sid, sfields), blob in zip(got_fast, got_stock, blobs):
            assert fid == sid and bytes(ffields[b"data"]) == sfields[b"data"] == blob
            if len(blob) >= LARGE_REPLY_BYTES:
                assert isinstance(ffields[b"data"], memoryview) and ffields[b"data"].readonly
            else:
                assert isinstance(ffields[b"data"], bytes)
        # The same connection, afterwards: small replies, a big one alone, an error reply.
        assert fast.ping() and fast.set("lr:k", b"v") and fast.get("lr:k") == b"v"
        fast.set("lr:big", blobs[-2])
        assert bytes(fast.get("lr:big")) == blobs[-2]
        with pytest.raises(redis.exceptions.ResponseError):
            fast.xreadgroup("no-such-group", "c", {"lr:s": ">"})
        assert fast.ping()
        conn = fast.connection_pool.get_connection()
        try:
            stock_conn = stock.connection_pool.get_connection()
            stock_parser = type(stock_conn._parser)
            stock.connection_pool.release(stock_conn)
            assert type(conn._parser).__bases__ == (stock_parser,)
            assert isinstance(conn._parser._buffer, LargeReplyBuffer)
        finally:
            fast.connection_pool.release(conn)
    finally:
        fast.close()
        stock.close()


def test_reader_delivers_large_groups_and_dead_letters_large_garbage_byte_for_byte(redis_url):
    cfg = RedisConfig(url=redis_url, prefix="lg", read_block_ms=100)
    rng = np.random.default_rng(1)
    sent = [synthetic_group(rng, f"big{i}", n_traj=8, n_tokens=2048, vocab_size=VOCAB, version=0) for i in range(12)]
    garbage = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    writer = GroupWriter(cfg, "a")
    reader = GroupReader(cfg, "learner", vocab_size=VOCAB)
    try:
        for g in sent[:6]:
            writer.send(g)
        assert writer.flush(30.0) == 0
        raw = connect(cfg)
        raw.xadd("lg:traj", {"data": garbage})
        raw.close()
        for g in sent[6:]:
            writer.send(g)
        assert writer.flush(30.0) == 0
        got = []
        deadline = time.monotonic() + 20
        while len(got) < len(sent) and time.monotonic() < deadline:
            entries = reader.receive(5, block_ms=100)
            reader.ack([e.id for e in entries])
            got += [e.group for e in entries]
        assert [g.group_id for g in got] == [g.group_id for g in sent]
        for a, b in zip(got, sent):
            for ta, tb in zip(a.trajectories, b.trajectories):
                assert np.array_equal(ta.tokens_np, tb.tokens_np) and np.array_equal(ta.logprobs_np, tb.logprobs_np)
                assert not ta.tokens_np.flags.writeable  # views of the received reply, read-only
        assert reader.dead == 1
        dead = connect(cfg).xrange("lg:dead")
        assert len(dead) == 1 and dead[0][1][b"data"] == garbage
    finally:
        writer.close()
        reader.close()


def _bulk(payload: bytes) -> bytes:
    return b"$%d\r\n" % len(payload) + payload + b"\r\n"


def test_large_read_assembles_a_reply_sent_in_pieces_and_keeps_what_follows():
    a, b = socket.socketpair()
    a.settimeout(5.0)
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    wire = _bulk(big) + b"+OK\r\n"

    def send_in_pieces():
        pos = 0
        while pos < len(wire):
            n = int(rng.integers(1, 40_000))
            b.sendall(wire[pos:pos + n])
            pos += n
            time.sleep(0.001)

    t = threading.Thread(target=send_in_pieces)
    t.start()
    try:
        buf = LargeReplyBuffer(a, 65_536, 5.0)
        assert buf.readline() == b"$300001"
        out = buf.read(300_001)
        assert isinstance(out, memoryview) and out.readonly and bytes(out) == big
        assert buf.readline() == b"+OK"
    finally:
        t.join()
        a.close()
        b.close()


def test_large_read_that_stalls_or_is_cut_raises_the_redis_errors_the_retrier_handles():
    for cut in (False, True):
        a, b = socket.socketpair()
        a.settimeout(0.3)
        try:
            b.sendall(b"$200000\r\n" + b"x" * 100_000)
            if cut:
                b.close()
            buf = LargeReplyBuffer(a, 65_536, 0.3)
            assert buf.readline() == b"$200000"
            with pytest.raises(redis.exceptions.ConnectionError if cut else redis.exceptions.TimeoutError):
                buf.read(200_000)
        finally:
            a.close()
            b.close()
