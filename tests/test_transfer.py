"""Collective weight transfer (learner.weight_transfer = "gloo") into a real vLLM CPU engine.

The worker side is vLLM's own NCCL weight-transfer engine with only the communicator swapped for gloo
(actors.vllm_ext), so this exercises the same join / pull / start -> update -> finish path that the
"nccl" transport runs on GPUs (tests/test_gpu.py). Correctness is measured on logprobs against
transformers fp32 with the published weights, as for file reloads (tests/test_actor_engine.py).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq

from buffer.server import free_port
from configs.schema import load_config
from helpers import FAST_TINY, load_model, perturbed_model, start_cpu_engine
from protocol.messages import ProtocolError, TransferReply, TransferRequest, WeightsReady, decode, encode
from test_actor_engine import reference_logprobs

PROMPT = list(range(20, 32))


def gloo_cfg(model_dir, *extra: str):
    return load_config("tiny", FAST_TINY + [
        f"model.path={model_dir}", "learner.weight_transfer=gloo", "learner.transfer_timeout_s=60",
        f"learner.zmq_transfer=tcp://127.0.0.1:{free_port()}", f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}",
        *extra], env={})


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return gloo_cfg(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(loop, cfg, tiny_model_dir):
    eng = start_cpu_engine(loop, cfg, tiny_model_dir)
    yield eng
    loop.run_until_complete(eng.shutdown())


@pytest.fixture
def publisher(tiny_model_dir, tmp_path):
    from learner.publisher import WeightPublisher

    cfg = gloo_cfg(tiny_model_dir)  # fresh endpoints: the engine takes them from each WeightsReady
    pub = WeightPublisher(cfg.learner, tmp_path / "run", tiny_model_dir, actor_dtype=cfg.actor.dtype)
    yield pub
    pub.close()


def sample_and_compare(loop, engine, model, old, tag: str, n: int = 6, length: int = 40) -> tuple[float, float]:
    """Sample ``n`` sequences on the engine; mean |dlogp| of vLLM against ``model`` and against ``old``."""
    async def sample():
        return await asyncio.gather(*[engine.generate(PROMPT, length, f"{tag}-{i}", ignore_eos=True)
                                      for i in range(n)])

    outs = loop.run_until_complete(sample())
    seqs = [PROMPT + o.token_ids for o in outs]
    starts = [len(PROMPT)] * n
    lp = [np.array(o.logprobs) for o in outs]
    match = float(np.mean(np.concatenate([np.abs(a - b) for a, b in zip(lp, reference_logprobs(model, seqs, starts))])))
    cross = float(np.mean(np.concatenate([np.abs(a - b) for a, b in zip(lp, reference_logprobs(old, seqs, starts))])))
    assert {v for o in outs for v in o.versions} == {engine.version}
    return match, cross


@pytest.mark.slow
def test_gloo_pull_serves_the_published_weights_without_files(loop, engine, publisher, tiny_model_dir, tmp_path):
    from actors.transfer import TransferClient

    v = engine.version + 1
    model = perturbed_model(tiny_model_dir, 0.05, seed=v)
    w = publisher.publish(model, v)
    assert (w.transport, w.path, w.sha256, w.url) == ("gloo", "", "", publisher.cfg.zmq_transfer)
    assert decode(encode(w), WeightsReady) == w  # a valid announcement for actors (Redis copy included)
    assert not (tmp_path / "run" / "weights").exists(), "a collective publish wrote weight files"
    client = TransferClient(w.url, "actor-t", timeout_s=60)
    try:
        got, seconds = loop.run_until_complete(client.pull_into(engine, v))
    finally:
        client.close()
    assert got == v == engine.version
    match, cross = sample_and_compare(loop, engine, model, load_model(tiny_model_dir), f"gloo-{v}")
    ch = publisher.transfer.channels["actor-t"]
    print(f"gloo pull {1000 * seconds:.0f} ms ({ch.stats.bytes / 1e6:.2f} MB); mean |dlogp| vs published "
          f"{match:.4f}, vs the original weights {cross:.4f}")
    assert ch.stats.broadcasts == 1 and ch.stats.last_version == v
    assert match < 0.08, f"vLLM does not serve the broadcast weights: {match:.4f}"
    assert cross > 4 * match, f"the broadcast changed nothing measurable: {cross:.4f} vs {match:.4f}"


@pytest.mark.slow
def test_pull_gets_the_newest_snapshot_and_survives_actor_and_learner_restarts(loop, engine, publisher,
                                                                            tiny_model_dir, tmp_path):
    from actors.transfer import TransferClient
    from learner.publisher import WeightPublisher

    base = engine.version
    models = {base + k: perturbed_model(tiny_model_dir, 0.05, seed=100 + base + k) for k in (1, 2, 3)}
    publisher.publish(models[base + 1], base + 1)
    w2 = publisher.publish(models[base + 2], base + 2)
    first = TransferClient(w2.url, "actor-r", timeout_s=60)
    # An actor that heard of v+1 late still gets the newest snapshot, v+2.
    assert loop.run_until_complete(first.pull_into(engine, base + 1))[0] == base + 2
    # The actor restarts under the same id: a fresh client joins again and the learner replaces its channel.
    old_channel = publisher.transfer.channels["actor-r"]
    first.close()
    second = TransferClient(w2.url, "actor-r", timeout_s=60)
    w3 = publisher.publish(models[base + 3], base + 3)
    try:
        assert loop.run_until_complete(second.pull_into(engine, base + 3))[0] == base + 3
        assert publisher.transfer.channels["actor-r"] is not old_channel
        old_channel.join(timeout=10)
        assert not old_channel._thread.is_alive()
        # The learner restarts on the same endpoints: it has no channel for the actor, which joins again.
        publisher.close()
        restarted = rebind(lambda: WeightPublisher(publisher.cfg, tmp_path / "run2", tiny_model_dir,
                                                  actor_dtype="bfloat16"))
        try:
            model = perturbed_model(tiny_model_dir, 0.05, seed=999)
            w4 = restarted.publish(model, base + 4)
            assert w4.url == w3.url
            assert loop.run_until_complete(second.pull_into(engine, base + 4))[0] == base + 4
            match, cross = sample_and_compare(loop, engine, model, models[base + 3], f"restart-{base}")
            assert match < 0.08 and cross > 4 * match, (match, cross)
        finally:
            restarted.close()
    finally:
        second.close()


def rebind(make, timeout_s: float = 5.0):
    """``make()``, retried while the endpoints just closed in this process are still being released
    (pyzmq closes sockets asynchronously)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return make()
        except RuntimeError as e:
            if "bind" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_transfer_server_refuses_bad_requests_by_name(tmp_path):
    """No engine: the server's answers to malformed, unknown and premature requests."""
    from learner.transfer import TransferServer

    server = TransferServer(f"tcp://127.0.0.1:{free_port()}", "gloo", timeout_s=5)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)

    def ask(payload: bytes) -> TransferReply:
        sock.send(payload)
        assert sock.poll(5000), "no reply"
        return decode(sock.recv(), TransferReply)

    try:
        assert "bad request" in ask(b"\x93garbage").error
        assert "expected 'join' or 'pull'" in ask(encode(TransferRequest(op="push", actor_id="a"))).error
        r = ask(encode(TransferRequest(op="pull", actor_id="a", version=1)))
        assert r.rejoin and "has not joined" in r.error
        assert "world_size 0" in ask(encode(TransferRequest(op="join", actor_id="a", world_size=0))).error
        assert server.refused == 4
        assert server.channels == {}  # nothing was started for refused requests
    finally:
        sock.close()
        server.close()


def test_weights_ready_transport_contract():
    ok = WeightsReady(version=3, path="", sha256="", url="tcp://127.0.0.1:1", transport="nccl")
    assert decode(encode(ok), WeightsReady) == ok
    with pytest.raises(ProtocolError, match="transport 'ucx'"):
        decode(encode(WeightsReady(version=3, path="", sha256="", url="tcp://x", transport="ucx")), WeightsReady)
    with pytest.raises(ProtocolError, match="url is empty"):
        decode(encode(WeightsReady(version=3, path="", sha256="", transport="gloo")), WeightsReady)
    with pytest.raises(ProtocolError, match="sha256"):  # files still need the digest
        decode(encode(WeightsReady(version=3, path="/p", sha256="")), WeightsReady)


def test_config_rejects_nccl_on_a_cpu_learner():
    from configs.schema import ConfigError

    with pytest.raises(ConfigError, match="learner.weight_transfer = \"nccl\".*learner.device"):
        load_config("tiny", ["learner.weight_transfer=nccl", "learner.device=cpu"], env={})
    with pytest.raises(ConfigError, match="learner.weight_transfer"):
        load_config("tiny", ["learner.weight_transfer=rdma"], env={})


def test_workers_drop_only_the_rotary_reload_warning():
    import logging

    import actors.vllm_ext  # noqa: F401 - installs the filter, as in every vLLM worker

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        logger.warning("%s: Failed to load weights", "Linear")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Linear: Failed to load weights"]
