"""Actor-side weight sync without an engine: verified local files, ZMQ fetches, refusals, the subscriber.

The learner's real file server (``learner.publisher.WeightFileServer``) serves the bytes; the payload is
any byte string (the actor checks digests, not tensors). Reload correctness on a real vLLM engine is in
test_actor_engine.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time

import pytest
import zmq

from actors.weight_sync import (WeightsRefused, WeightSubscriber, newest, prune_cache, refusal_key, resolve_weights, should_load)
from weights.format import version_dirname
from buffer.server import free_port
from weights.fileserver import WeightFileServer, version_dir
from weights.format import WEIGHTS_FILE
from protocol.messages import WeightsReady, encode


def publish_bytes(run_dir, version: int, payload: bytes) -> WeightsReady:
    """Lay out ``run_dir/weights/vXXXXXX/model.safetensors`` as the learner would; its announcement."""
    d = version_dir(run_dir, version)
    d.mkdir(parents=True, exist_ok=True)
    (d / WEIGHTS_FILE).write_bytes(payload)
    return WeightsReady(version=version, path=str(d), sha256=hashlib.sha256(payload).hexdigest())


@pytest.fixture
def file_server(tmp_path):
    server = WeightFileServer(f"tcp://127.0.0.1:{free_port()}", tmp_path / "learner")
    yield server
    server.close()


def test_resolve_links_the_learners_file_privately_so_a_prune_cannot_pull_it_away(tmp_path):
    payload = os.urandom(1000)
    w = publish_bytes(tmp_path / "learner", 3, payload)
    got = resolve_weights(w, tmp_path / "cache")  # no file server: nothing was fetched
    assert got == tmp_path / "cache" / version_dirname(3)
    shutil.rmtree(version_dir(tmp_path / "learner", 3))  # the learner prunes v3 before the engine reloads
    assert (got / WEIGHTS_FILE).read_bytes() == payload  # what was hashed is still there to load


def test_resolve_of_a_version_pruned_before_the_actor_got_to_it_is_a_refusal_not_a_crash(tmp_path, file_server):
    w = publish_bytes(tmp_path / "learner", 4, os.urandom(1000))
    shutil.rmtree(version_dir(tmp_path / "learner", 4))
    with pytest.raises(WeightsRefused, match="not on this machine.*not kept"):
        resolve_weights(WeightsReady(version=4, path=w.path, sha256=w.sha256, url=file_server.endpoint),
                        tmp_path / "cache")


def test_resolve_fetches_over_zmq_when_dir_is_elsewhere(tmp_path, file_server):
    payload = os.urandom(300_000)
    w = publish_bytes(tmp_path / "learner", 2, payload)
    remote = WeightsReady(version=2, path="/nonexistent/learner/v000002", sha256=w.sha256, url=file_server.endpoint)
    got = resolve_weights(remote, tmp_path / "cache", chunk_bytes=64 << 10)  # many chunks
    assert got == tmp_path / "cache" / version_dirname(2)
    assert (got / WEIGHTS_FILE).read_bytes() == payload
    # A second resolve (restart) reuses the verified cached copy without the server.
    file_server.close()
    assert resolve_weights(remote, tmp_path / "cache") == got


def test_resolve_refuses_tampered_file_locally_and_from_server(tmp_path, file_server):
    w = publish_bytes(tmp_path / "learner", 1, os.urandom(50_000))
    f = version_dir(tmp_path / "learner", 1) / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[1234] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsRefused, match="sha256 mismatch.*no file server"):
        resolve_weights(w, tmp_path / "cache")
    # The server serves the same tampered bytes: the fetched copy fails the announced digest too.
    with pytest.raises(WeightsRefused, match="fetch from .*sha256 mismatch"):
        resolve_weights(WeightsReady(version=1, path=w.path, sha256=w.sha256, url=file_server.endpoint),
                        tmp_path / "cache")
    assert not (tmp_path / "cache" / version_dirname(1) / WEIGHTS_FILE).exists()


def test_resolve_refuses_version_the_server_does_not_keep(tmp_path, file_server):
    w = WeightsReady(version=9, path="/nonexistent", sha256="0" * 64, url=file_server.endpoint)
    with pytest.raises(WeightsRefused, match="not kept"):
        resolve_weights(w, tmp_path / "cache")


def test_should_load_newer_unrefused_only():
    a = WeightsReady(version=2, path="/a", sha256="a" * 64)
    b = WeightsReady(version=3, path="/b", sha256="b" * 64)
    assert newest(None, a, b, None) is b and newest(None) is None
    assert should_load(b, loaded_version=2, refused=set())
    assert not should_load(a, loaded_version=2, refused=set())
    assert not should_load(b, loaded_version=2, refused={refusal_key(b)})
    republished = WeightsReady(version=3, path="/b", sha256="c" * 64)
    assert should_load(republished, loaded_version=2, refused={refusal_key(b)})
    assert not should_load(None, loaded_version=0, refused=set())


def test_prune_cache_keeps_named_versions(tmp_path):
    for v in (1, 2, 3, 4):
        (tmp_path / version_dirname(v)).mkdir()
    (tmp_path / "other").mkdir()
    assert prune_cache(tmp_path, {3, 4}) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "v000003", "v000004"]


def test_subscriber_returns_newest_announcement_and_skips_garbage():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    sub = WeightSubscriber(endpoint)

    async def scenario():
        # PUB drops messages until the subscription is through: repeat until the first one arrives.
        first = None
        deadline = time.monotonic() + 10
        while first is None and time.monotonic() < deadline:
            pub.send(encode(WeightsReady(version=1, path="/p", sha256="1" * 64)))
            first = await sub.latest(0.1)
        assert first is not None and first.version == 1
        await sub.latest(0.2)  # drain repeats
        pub.send(encode(WeightsReady(version=3, path="/p", sha256="3" * 64)))
        pub.send(b"not msgpack")
        pub.send(encode(WeightsReady(version=2, path="/p", sha256="2" * 64)))
        await asyncio.sleep(0.2)
        return await sub.latest(1.0), await sub.latest(0.05)

    try:
        best, nothing = asyncio.run(scenario())
    finally:
        sub.close()
        pub.close()
    assert best.version == 3 and nothing is None
