"""Learner training loop on hand-built groups through the real Redis buffer (no actor: fast).

Groups are "sampled" by the tiny model itself: behaviour logprobs are the model's own logprobs plus a
little noise (an engine mismatch), so importance ratios are near 1 as with a real actor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from buffer.server import free_port
from configs.schema import load_config
from learner.metrics import REQUIRED_KEYS, read_metrics
from protocol.messages import Control, Trajectory, TrajectoryGroup

TINY = ["model.tiny.warmstart_steps=0", "model.tiny.warmstart_eval_episodes=10"]



@pytest.fixture(scope="module")
def data_model(random_tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(random_tiny_dir), dtype=torch.float32)


def learner_cfg(tmp_path, redis_url, model_dir, *extra):
    return load_config("tiny", [
        f"run.root={tmp_path / 'runs'}", "run.name=t", f"redis.url={redis_url}", "redis.prefix=lt",
        f"model.path={model_dir}", *TINY,
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
        "learner.wandb_mode=disabled", "learner.progress=false", "learner.batch_groups=2",
        "learner.micro_batch=3", "learner.steps=3", "learner.checkpoint_every=2", *extra], env={})


def make_groups(model, n_groups: int, *, group_size: int = 4, versions=(0,), seed: int = 0,
                tag: str = "g") -> list[TrajectoryGroup]:
    """Groups of random continuations whose behaviour logprobs are the model's own (+ N(0, 0.02) noise)."""
    import torch

    from learner.trainer import forward_logprobs

    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    groups = []
    for gi in range(n_groups):
        trajs = []
        for ti in range(group_size):
            n_prompt, n_gen = 5, int(rng.integers(3, 9))
            n = n_prompt + n_gen
            ids = rng.integers(4, vocab, n)
            with torch.no_grad():
                lp = forward_logprobs(model, torch.as_tensor(ids)[None])[0].numpy()
            mask = np.r_[np.zeros(n_prompt), np.ones(n_gen)].astype(np.uint8)
            mu = np.minimum(lp + rng.normal(0, 0.02, n), 0.0)
            ver = rng.choice(versions, n)
            trajs.append(Trajectory.from_arrays(
                ids, np.where(mask, mu, 0.0), np.where(mask, ver, -1), mask,
                reward=float(ti % 2 if ti < 2 else rng.integers(0, 2)),  # never all equal: signal in every group
                turn_starts=[n_prompt], prompt_len=n_prompt))
        groups.append(TrajectoryGroup(group_id=f"{tag}-{seed}-{gi}", actor_id="test", engine="test",
                                      env="arithmetic", seed=gi, trajectories=trajs))
    return groups


def push(cfg, groups) -> list[str]:
    """Send groups with the real GroupWriter; return the stream ids they got, in order."""
    from buffer import GroupWriter, connect

    w = GroupWriter(cfg.redis, "test-actor")
    for g in groups:
        w.send(g)
    assert w.flush(10) == 0
    w.close()
    client = connect(cfg.redis)
    try:
        return [i.decode() for i, _ in client.xrange(f"{cfg.redis.prefix}:traj")]
    finally:
        client.close()


def stream_state(cfg) -> tuple[int, int]:
    """(entries in the stream, entries pending in the learners' group)."""
    from buffer import connect

    client = connect(cfg.redis)
    try:
        key = f"{cfg.redis.prefix}:traj"
        return client.xlen(key), client.xpending(key, cfg.redis.consumer_group)["pending"]
    finally:
        client.close()


# ---------------------------------------------------------------- pure pieces


def test_token_logprobs_match_plain_loop():
    import torch

    from learner.trainer import token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (2, 6))
    got = token_logprobs(logits, tokens)
    for b in range(2):
        assert got[b, 0] == 0
        for t in range(1, 6):
            want = torch.log_softmax(logits[b, t - 1], -1)[tokens[b, t]]
            assert torch.allclose(got[b, t].double(), want, atol=1e-6)


def test_collate_right_pads_and_normalises_advantages_per_group(data_model):
    import torch

    from learner.trainer import collate, micro_batches

    groups = make_groups(data_model, 2, group_size=3)
    b = collate(groups)
    trajs = [t for g in groups for t in g.trajectories]
    assert b.tokens.shape == (6, max(len(t) for t in trajs))
    for i, t in enumerate(trajs):
        n = len(t)
        assert b.tokens[i, :n].tolist() == t.tokens_np.tolist()
        assert not b.mask[i, n:].any() and not b.mask[i, 0]
        assert b.mask[i, 1:n].tolist() == t.mask_np[1:].astype(bool).tolist()
    for g in range(2):
        a = b.advantages[3 * g:3 * g + 3]
        assert abs(float(a.sum())) < 1e-5 and torch.all(a.abs() > 0)
    assert micro_batches([3, 5, 2, 7, 4], 2) == [(0, 2, 5), (2, 4, 7), (4, 5, 4)]


def _bare_learner(cfg, model, optimizer):
    from learner.controller import DCMDPController
    from learner.trainer import Learner, pick_device

    return Learner(cfg, model=model, optimizer=optimizer, controller=DCMDPController(cfg.controller), reader=None,
                   control=None, publisher=None, metrics=None, run_dir=Path("."), device=pick_device("cpu"))


@pytest.mark.parametrize("mode", ["dcmdp", "mis"])
def test_train_step_micro_batching_gives_full_batch_gradient(tmp_path, random_tiny_dir, data_model, mode):
    """Token-level aggregation: gradients accumulated over micro-batches equal the one-pass gradient. The
    one-pass case (micro_batch 64) also takes pi_prox from the training forward instead of a separate no-grad
    pass (``has_no_dropout``): the discrepancy it reports and the gradient must not change."""
    import torch
    from transformers import AutoModelForCausalLM

    groups = make_groups(data_model, 2, group_size=4, versions=(0, 1), seed=3)
    grads, discrepancy = [], []
    for mb in (1, 3, 64):
        cfg = learner_cfg(tmp_path, "redis://127.0.0.1:1/0", random_tiny_dir, f"learner.micro_batch={mb}",
                          f"controller.mode={mode}")
        model = AutoModelForCausalLM.from_pretrained(str(random_tiny_dir), dtype=torch.float32)
        learner = _bare_learner(cfg, model, torch.optim.SGD(model.parameters(), lr=0.0))
        learner.version = 2
        res = learner.train_step(groups)
        assert learner.version == 3 and res.row["tokens/generated"] > 0
        assert res.row["staleness/max"] == 2 and 1 <= res.row["staleness/mean"] <= 2
        assert learner.dropout_free
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        discrepancy.append(res.row["discrepancy/total"])
    assert discrepancy[0] > 0 and discrepancy == pytest.approx([discrepancy[0]] * 3, rel=1e-5)
    for other in grads[1:]:
        for k, g in grads[0].items():
            assert torch.allclose(g, other[k], rtol=1e-4, atol=1e-7), k
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_has_no_dropout_sees_dropout_modules_and_attention_dropout(random_tiny_dir):
    """The fused pi_prox is only taken when train-mode and eval-mode forwards agree."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.trainer import has_no_dropout

    model = AutoModelForCausalLM.from_pretrained(str(random_tiny_dir), dtype=torch.float32)
    assert has_no_dropout(model)
    model.config.attention_dropout = 0.1
    assert not has_no_dropout(model)
    model.config.attention_dropout = 0.0
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert not has_no_dropout(model)


# ---------------------------------------------------------------- the loop through Redis


def test_learner_steps_change_every_parameter_publish_checkpoint_and_ack(tmp_path, redis_url, random_tiny_dir, data_model):
    import torch
    from safetensors.torch import load_file

    from buffer import ControlPlane
    from learner.checkpoint import list_checkpoints, load_latest
    from learner.metrics import write_report
    from learner.trainer import setup
    from weights.format import sha256_file

    cfg = learner_cfg(tmp_path, redis_url, random_tiny_dir)
    push(cfg, make_groups(data_model, 6))
    learner = setup(cfg)
    before = {k: p.detach().clone() for k, p in learner.model.named_parameters()}
    cp = ControlPlane(cfg.redis)
    try:
        w0 = cp.latest_weights()
        assert w0.version == 0 and cp.read_control().version == 0  # version 0 published at start
        learner.run()
    finally:
        learner.close()
    after = dict(learner.model.named_parameters())
    unchanged = [k for k, p in before.items() if torch.equal(p, after[k].detach())]
    assert not unchanged, f"parameters not trained: {unchanged}"
    assert (learner.step, learner.version) == (3, 3)

    c = cp.read_control()
    assert c.version == 3 and c.stop and c.batch_groups == 2
    w = cp.latest_weights()
    assert w.version == 3 and sha256_file(Path(w.path) / "model.safetensors") == w.sha256
    published = load_file(str(Path(w.path) / "model.safetensors"))
    wire = getattr(torch, cfg.actor.dtype)  # published in the actors' compute dtype
    for k, p in learner.model.state_dict().items():
        assert published[k].dtype == wire and torch.equal(published[k], p.to(wire)), k
    assert torch.equal(published["lm_head.weight"], learner.model.get_input_embeddings().weight.detach().to(wire))

    # Every entry trained once, acked only through checkpoints: the stream is empty, nothing pending.
    assert stream_state(cfg) == (0, 0)
    assert cp.counters()["consumed"] == 6
    ckpts = list_checkpoints(cfg.run.dir)
    assert [p.name for p in ckpts] == ["step_000002", "step_000003"]
    assert load_latest(cfg.run.dir).state["trained_total"] == 6
    cp.close()

    rows = read_metrics(cfg.run.dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["version"] for r in rows] == [1, 2, 3]
    for r in rows:
        missing = [k for k in REQUIRED_KEYS if k not in r]
        assert not missing, missing
        assert r["tokens/generated"] > 0 and r["grad_norm"] > 0
    assert write_report(cfg.run.dir).stat().st_size > 10_000


def test_learner_resume_continues_steps_versions_and_optimizer(tmp_path, redis_url, random_tiny_dir, data_model):
    from buffer import ControlPlane
    from learner.trainer import setup

    cfg = learner_cfg(tmp_path, redis_url, random_tiny_dir, "learner.steps=2")
    push(cfg, make_groups(data_model, 4))
    learner = setup(cfg)
    try:
        learner.run()
    finally:
        learner.close()
    lam_after_2 = learner.controller.lam

    cfg = learner_cfg(tmp_path, redis_url, random_tiny_dir, "learner.steps=4")
    push(cfg, make_groups(data_model, 4, seed=1))
    learner = setup(cfg)
    assert (learner.step, learner.version) == (2, 2)
    assert learner.controller.lam == lam_after_2 and learner.controller.n_observed == 2
    adam_steps = {int(s["step"]) for s in learner.optimizer.state_dict()["state"].values()}
    assert adam_steps == {2}
    try:
        learner.run()
    finally:
        learner.close()
    assert (learner.step, learner.version) == (4, 4)
    rows = read_metrics(cfg.run.dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    cp = ControlPlane(cfg.redis)
    assert cp.read_control().version == 4 and cp.counters()["consumed"] == 8
    cp.close()
    assert stream_state(cfg) == (0, 0)


def test_learner_fresh_start_resets_leftover_control_of_older_run(tmp_path, redis_url, random_tiny_dir, data_model):
    from buffer import ControlPlane
    from learner.trainer import setup

    cfg = learner_cfg(tmp_path, redis_url, random_tiny_dir)
    push(cfg, make_groups(data_model, 1))
    cp = ControlPlane(cfg.redis)
    cp.write_control(Control(version=7, max_staleness=2))
    learner = setup(cfg)
    learner.close()
    c = cp.read_control()
    cp.close()
    assert c.version == 0 and learner.version == 0
    assert stream_state(cfg)[0] == 0  # the older run's entries went with the reset


def test_learner_cli_fresh_discards_checkpoints(tmp_path, redis_url, random_tiny_dir, data_model):
    """``--fresh`` removes the run's checkpoints and metrics: setup(fresh=True) starts at step 0."""
    from learner.checkpoint import list_checkpoints
    from learner.trainer import setup

    cfg = learner_cfg(tmp_path, redis_url, random_tiny_dir, "learner.steps=1")
    push(cfg, make_groups(data_model, 2))
    learner = setup(cfg)
    try:
        learner.run()
    finally:
        learner.close()
    assert list_checkpoints(cfg.run.dir)
    learner = setup(cfg, fresh=True)
    learner.close()
    assert learner.step == 0 and learner.version == 0
    assert not list_checkpoints(cfg.run.dir)
    assert read_metrics(cfg.run.dir / "metrics.jsonl") == []


def test_learner_collect_fails_clearly_when_no_data_arrives(tmp_path, redis_url, random_tiny_dir, data_model):
    import torch

    from buffer import ControlPlane, GroupReader

    cfg = learner_cfg(tmp_path, redis_url, random_tiny_dir, "learner.wait_timeout_s=0.5", "redis.read_block_ms=100")
    push(cfg, make_groups(data_model, 1))  # one group of the two a step needs
    learner = _bare_learner(cfg, data_model, torch.optim.SGD(data_model.parameters(), lr=0.0))
    learner.reader = GroupReader(cfg.redis, "learner-0")
    learner.control = ControlPlane(cfg.redis)
    try:  # no actor ever held a lease (tests/test_liveness.py: the message with live actors)
        with pytest.raises(RuntimeError, match=r"only 1/2 groups .*learner.wait_timeout_s\): no actor holds a lease "
                                               r"under redis.prefix 'lt'"):
            learner.collect()
    finally:
        learner.reader.close()
        learner.control.close()


def test_learner_collect_dead_letters_groups_whose_newest_token_is_past_the_cap(tmp_path, redis_url,
                                                                                 random_tiny_dir, data_model):
    import torch

    from buffer import ControlPlane, GroupReader

    cfg = learner_cfg(tmp_path, redis_url, random_tiny_dir, "controller.k_max=2", "redis.read_block_ms=100")
    stale = make_groups(data_model, 2, versions=(0, 5), tag="stale")  # newest 5: lag 5 at version 10
    mixed = make_groups(data_model, 1, versions=(0, 9), seed=1, tag="mixed")  # oldest lag 10, newest lag 1
    fresh = make_groups(data_model, 1, versions=(8,), seed=2, tag="fresh")
    push(cfg, stale + mixed + fresh)
    learner = _bare_learner(cfg, data_model, torch.optim.SGD(data_model.parameters(), lr=0.0))
    learner.version = 10
    learner.reader = GroupReader(cfg.redis, "learner-0")
    learner.control = ControlPlane(cfg.redis)
    try:
        entries, _ = learner.collect()
        assert [e.group.group_id for e in entries] == ["mixed-1-0", "fresh-2-0"]
        assert learner.reader.stale == 2
        reasons = [f[b"reason"].decode() for _, f in learner.reader.client.xrange(f"{cfg.redis.prefix}:dead")]
        assert all(r.startswith("stale: lag 5 > cap 4") for r in reasons) and len(reasons) == 2
    finally:
        learner.reader.close()
        learner.control.close()


def test_episode_stats_counts_turns_tokens_and_truncation():
    from learner.trainer import episode_stats

    def traj(turns, n, gen, reason):
        mask = [0] * (n - gen) + [1] * gen
        return Trajectory.from_arrays(list(range(n)), [0.0] * n, [0 if m else -1 for m in mask], mask, reward=0.0,
                                      turn_starts=list(range(n - gen, n - gen + turns)), finish_reason=reason)

    g = TrajectoryGroup(group_id="g", actor_id="a", engine="e", env="x", seed=0,
                        trajectories=[traj(2, 10, 4, "stop"), traj(4, 20, 8, "token_limit")])
    st = episode_stats([g])
    assert st == {"episode/turns": 3.0, "episode/tokens": 15.0, "episode/generated_tokens": 6.0,
                  "episode/truncated_frac": 0.5}
