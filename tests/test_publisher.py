"""Weight publisher: versioned HF dirs, ZMQ announcement, ZMQ file server (real sockets on 127.0.0.1)."""

from __future__ import annotations

import time

import pytest
import zmq

from buffer.server import free_port
from configs.schema import load_config
from learner.publisher import WeightPublisher
from weights.fileserver import fetch_weights, kept_versions, version_dir
from weights.format import WEIGHTS_FILE, sha256_file
from protocol.messages import ChunkHeader, FetchChunk, WeightsReady, decode, encode



@pytest.fixture(scope="module")
def model(random_tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(random_tiny_dir), dtype=torch.float32)


@pytest.fixture
def publisher(tmp_path, random_tiny_dir):
    lcfg = load_config("tiny", [f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}",
                                f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
                                "learner.keep_versions=2"]).learner
    pub = WeightPublisher(lcfg, tmp_path / "run", random_tiny_dir)
    yield pub
    pub.close()


def test_publish_fetch_returns_same_bytes_and_sha(publisher, model, tmp_path):
    w = publisher.publish(model, 0)
    local = version_dir(publisher.run_dir, 0) / WEIGHTS_FILE
    assert w.sha256 == sha256_file(local)
    # Small chunks: the transfer takes many round trips and must reassemble exactly.
    path, sha = fetch_weights(w.url, 0, tmp_path / "fetched", chunk_bytes=100_000, expected_sha256=w.sha256)
    assert sha == w.sha256
    assert path.read_bytes() == local.read_bytes()


def test_publish_dir_is_loadable_hf_dir_with_lm_head(publisher, model, random_tiny_dir):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    w = publisher.publish(model, 1)
    d = version_dir(publisher.run_dir, 1)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (d / name).read_bytes() == (random_tiny_dir / name).read_bytes()
    with safe_open(str(d / WEIGHTS_FILE), "pt") as f:
        assert "lm_head.weight" in f.keys()
    reloaded = AutoModelForCausalLM.from_pretrained(w.path, dtype=torch.float32)
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(p.name.startswith(".") for p in d.parent.iterdir()), "temp dirs left behind"


def test_file_server_unknown_version_gets_error_header(publisher, model):
    publisher.publish(model, 3)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(publisher.cfg.zmq_files)
    try:
        sock.send(encode(FetchChunk(version=99, offset=0, size=10)))
        assert sock.poll(5000)
        header_b, data = sock.recv_multipart()
        header = decode(header_b, ChunkHeader)
        assert "99" in header.error and "not kept" in header.error
        assert data == b""
        # A garbled request is answered (with an error), not dropped: the client never hangs.
        sock.send(b"\x00garbage")
        assert sock.poll(5000)
        header = decode(sock.recv_multipart()[0], ChunkHeader)
        assert header.error.startswith("bad request")
        # And a good one on the same socket still works.
        sock.send(encode(FetchChunk(version=3, offset=0, size=10)))
        assert sock.poll(5000)
        header_b, data = sock.recv_multipart()
        header = decode(header_b, ChunkHeader)
        assert header.error == "" and len(data) == 10 and header.total > 10
    finally:
        sock.close()
    with pytest.raises(RuntimeError, match="not kept"):
        fetch_weights(publisher.cfg.zmq_files, 99, publisher.run_dir / "x", timeout_s=5)


def test_publish_keeps_last_versions_and_announces_on_pub(publisher, model):
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(publisher.cfg.zmq_pub)
    try:
        time.sleep(0.3)  # PUB/SUB slow joiner: let the subscription reach the publisher
        sent = [publisher.publish(model, v) for v in (4, 5, 6)]
        got = []
        while len(got) < 3 and sub.poll(5000):
            got.append(decode(sub.recv(), WeightsReady))
    finally:
        sub.close()
    assert [g.version for g in got] == [4, 5, 6]
    assert [g.sha256 for g in got] == [s.sha256 for s in sent]
    assert kept_versions(publisher.run_dir) == [5, 6]  # keep_versions = 2


def test_republish_same_version_replaces_dir_and_server_rehashes(publisher, model, tmp_path):
    import torch

    first = publisher.publish(model, 7)
    fetch_weights(first.url, 7, tmp_path / "a")  # warms the server's digest cache for v7
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    try:
        second = publisher.publish(model, 7)
    finally:
        with torch.no_grad():
            model.model.norm.weight.sub_(1.0)
    assert second.sha256 != first.sha256
    _, sha = fetch_weights(second.url, 7, tmp_path / "b")
    assert sha == second.sha256
