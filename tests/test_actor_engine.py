"""The actor on a real vLLM CPU engine, in this process: episodes, versioned reloads, the actor loop on Redis.

One engine serves the whole module (starting one costs ~20 s on 2 cores); every test starts from whatever
version the engine serves and publishes the next one, so the tests do not depend on their order.
Reload correctness is checked against transformers fp32 on the very tokens vLLM sampled (DESIGN.md:
"the call returned" proves nothing; a stale output head is only visible in the logprobs).
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from actors.actor import Actor, groups_in_flight_limit
from envs.episode import EpisodeLimits, TextCodec, run_episode
from buffer.admission import admission_capacity
from envs import GuessNumber, make_env
from buffer.server import free_port
from configs.schema import load_config
from helpers import FAST_TINY, load_model, perturbed_model, start_cpu_engine
from protocol.messages import Control, decode_group

pytestmark = pytest.mark.slow  # starts vLLM engines


def actor_cfg(tiny_model_dir, *extra: str):
    return load_config("tiny", FAST_TINY + [
        f"model.path={tiny_model_dir}", "actor.concurrency=16", "actor.group_size=4", "actor.max_turns=12",
        "actor.admission_poll_s=0.05", "actor.status_interval_s=1", "actor.weights_poll_s=0.2",
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", *extra], env={})


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """version -> directory of the weights the module's engine has been given (version 0: the model dir)."""
    return {0: tiny_model_dir}


@pytest.fixture(scope="module", params=["inline", "separate"])
def engine(request, loop, tiny_model_dir):
    """Every test runs on both places of vLLM's engine core (actor.engine_process): this process, stepped by the
    loop (the CPU default), and its own process behind vLLM's AsyncLLM (the GPU default)."""
    eng = start_cpu_engine(loop, actor_cfg(tiny_model_dir, f"actor.engine_process={request.param}"), tiny_model_dir)
    yield eng
    loop.run_until_complete(eng.shutdown())


@pytest.fixture(scope="module")
def codec(tiny_model_dir):
    return TextCodec.from_pretrained(tiny_model_dir)


def publish_perturbed(src_dir, run_dir, version: int, scale: float, seed: int):
    """A new published version: the weights of ``src_dir`` plus N(0, scale^2) noise on every parameter,
    written by the learner's own writer (HF dir, explicit lm_head). Returns (dir, fp32 model)."""
    from learner.publisher import write_version_dir

    model = perturbed_model(src_dir, scale, seed)
    d, _ = write_version_dir(model, run_dir, version, src_dir)
    return d, model


def reference_logprobs(model, seqs: list[list[int]], starts: list[int]) -> list[np.ndarray]:
    """fp32 transformers log p(token_t | tokens_<t) for positions ``start:`` of each sequence."""
    import torch

    out = []
    with torch.no_grad():
        for seq, s in zip(seqs, starts):
            ids = torch.tensor([seq])
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            out.append(logp[torch.arange(s - 1, len(seq) - 1), ids[0, s:]].numpy())
    return out


def run_all(loop, coros):
    """Run coroutines concurrently on the module's loop; their results in order."""
    async def together():
        return await asyncio.gather(*coros)

    return loop.run_until_complete(together())


def check_layout(t, codec, env_name: str):
    """Every rule of the trajectory layout (module docstring of actors.actor) on one decoded trajectory."""
    ids, mask, ver, lp = t.tokens_np, t.mask_np, t.versions_np, t.logprobs_np
    assert t.prompt_len > 0 and not mask[:t.prompt_len].any()
    assert (ver[mask == 0] == -1).all() and (lp[mask == 0] == 0).all()
    assert (ver[mask == 1] >= 0).all() and (lp[mask == 1] <= 0).all() and np.isfinite(lp).all()
    starts = t.turn_starts + [len(t)]
    assert t.turn_starts[0] == t.prompt_len
    for k, s in enumerate(t.turn_starts):
        assert mask[s] == 1 and (s == 0 or mask[s - 1] == 0), "a turn starts right after env tokens"
        end = s + int(np.argmin(np.append(mask[s:starts[k + 1]], 0)))  # first env token after the turn
        assert mask[s:end].all() and not mask[end:starts[k + 1]].any()
        if ids[end - 1] != codec.eos_id:  # only a cut turn may lack its EOS
            assert end - s == 8 or t.finish_reason in ("length", "token_limit"), (env_name, t)
    assert t.finish_reason in ("stop", "length", "turn_limit", "token_limit")
    if t.finish_reason == "stop":
        assert ids[-1] == codec.eos_id


def test_single_turn_arithmetic_episodes(engine, loop, codec, tiny_model_dir):
    cfg = actor_cfg(tiny_model_dir, "env.name=arithmetic")
    lim = EpisodeLimits.from_config(cfg)
    envs = [make_env("arithmetic", {}) for _ in range(12)]
    trajs = run_all(loop, [run_episode(engine, e, 100 + i, codec, lim, f"arith-{i}") for i, e in enumerate(envs)])
    for i, t in enumerate(trajs):
        check_layout(t, codec, "arithmetic")
        assert len(t.turn_starts) == 1 and t.finish_reason in ("stop", "length")
        assert set(t.versions_np[t.mask_np == 1]) == {engine.version}
        prompt = make_env("arithmetic", {}).reset(100 + i)
        assert codec.decode(t.tokens_np[:t.prompt_len].tolist()) == prompt
        # The reward is the env's verdict on the decoded answer (EOS excluded).
        gen = t.tokens_np[t.prompt_len:].tolist()
        answer = codec.decode(gen[:-1] if t.finish_reason == "stop" else gen)
        env = make_env("arithmetic", {})
        env.reset(100 + i)
        assert t.reward == env.step(answer).reward


def test_multi_turn_guess_number_episodes(engine, loop, codec, tiny_model_dir):
    cfg = actor_cfg(tiny_model_dir, "env.name=guess_number")
    lim = EpisodeLimits.from_config(cfg)
    trajs = run_all(loop, [run_episode(engine, GuessNumber(), 200 + i, codec, lim, f"guess-{i}") for i in range(12)])
    for t in trajs:
        check_layout(t, codec, "guess_number")
        assert len(t) <= t.prompt_len + cfg.actor.max_tokens_per_episode
        # Env tokens between turns are exactly the env's replies.
        for a, b in zip(t.turn_starts, t.turn_starts[1:]):
            seg = t.mask_np[a:b]
            reply = codec.decode(t.tokens_np[a + int(np.argmin(seg)):b].tolist())
            assert reply in ("higher:", "lower:", "number?:"), reply
    assert max(len(t.turn_starts) for t in trajs) >= 2, "no multi-turn episode"


def test_reload_mid_generation_is_real_and_tokens_keep_their_version(engine, loop, served, tmp_path):
    v_old = engine.version
    old = load_model(served[v_old])
    new_dir, new = publish_perturbed(served[v_old], tmp_path / "run", v_old + 1, scale=0.05, seed=1)
    prompt = list(range(20, 32))
    n, length = 12, 100

    async def scenario():
        gens = [asyncio.create_task(engine.generate(prompt, length, f"long-{v_old}-{i}", ignore_eos=True))
                for i in range(n)]
        # A 1-token request queued after them finishes once they are prefilled and decoding.
        await engine.generate(prompt, 1, f"probe-{v_old}")
        seconds = await engine.load_weights(new_dir, v_old + 1)
        return await asyncio.gather(*gens), seconds

    outs, seconds = loop.run_until_complete(scenario())
    served[v_old + 1] = new_dir
    assert engine.version == v_old + 1
    seqs = [prompt + o.token_ids for o in outs]
    ref_old = reference_logprobs(old, seqs, [len(prompt)] * n)
    ref_new = reference_logprobs(new, seqs, [len(prompt)] * n)
    d_match, d_cross = [], []
    straddling = 0
    for o, r_old, r_new in zip(outs, ref_old, ref_new):
        v = np.array(o.versions)
        lp = np.array(o.logprobs)
        assert len(v) == length and (np.diff(v) >= 0).all() and set(v) <= {v_old, v_old + 1}
        straddling += len(set(v)) == 2
        is_new = v == v_old + 1
        d_match += list(np.abs(lp - np.where(is_new, r_new, r_old)))
        d_cross += list(np.abs(lp[is_new] - r_old[is_new]))
    assert straddling >= 1, "no generation straddled the reload"
    match, cross = float(np.mean(d_match)), float(np.mean(d_cross))
    print(f"reload {1000 * seconds:.0f} ms; mean |dlogp| vs the weights of each token's version {match:.4f}, "
          f"new-version tokens vs old weights {cross:.4f}")
    assert match < 0.08, f"vLLM logprobs do not match the weights their version names: {match:.4f}"
    assert cross > 4 * match, f"the reload changed nothing measurable: {cross:.4f} vs {match:.4f}"


def test_weight_update_between_turns_gives_one_episode_two_versions(engine, loop, codec, served, tmp_path,
                                                                   tiny_model_dir):
    v_old = engine.version
    new_dir, _ = publish_perturbed(served[v_old], tmp_path / "run", v_old + 1, scale=0.005, seed=2)

    class UpdateAfterFirstTurn:
        """The real engine; the learner's update lands right after the episode's first model turn."""

        calls = 0

        async def generate(self, context, max_tokens, request_id):
            out = await engine.generate(context, max_tokens, request_id)
            self.calls += 1
            if self.calls == 1:
                await engine.load_weights(new_dir, v_old + 1)
            return out

    # A hidden number far from the model's usual first guess (50): the episode needs several turns.
    seed = next(s for s in range(1000) if GuessNumber.hidden_number(s, 100) <= 10)
    cfg = actor_cfg(tiny_model_dir, "env.name=guess_number")
    t = loop.run_until_complete(run_episode(UpdateAfterFirstTurn(), GuessNumber(), seed, codec,
                                            EpisodeLimits.from_config(cfg), f"two-versions-{v_old}"))
    served[v_old + 1] = new_dir
    check_layout(t, codec, "guess_number")
    assert len(t.turn_starts) >= 2
    gen_versions = t.versions_np[t.mask_np == 1]
    first_turn = t.versions_np[t.turn_starts[0]:t.turn_starts[1]]
    assert set(gen_versions) == {v_old, v_old + 1}
    assert set(first_turn[first_turn >= 0]) == {v_old}
    assert set(t.versions_np[t.turn_starts[1]:][t.mask_np[t.turn_starts[1]:] == 1]) == {v_old + 1}


def make_actor(cfg, engine, codec, actor_id="actor-t"):
    from buffer import ControlPlane, GroupWriter

    control = ControlPlane(cfg.redis, who=actor_id)
    control.reset()
    writer = GroupWriter(cfg.redis, actor_id)
    return Actor(cfg, actor_id, engine, codec, writer, control), control, writer


def stream_groups(control, vocab_size, current_version):
    entries = control.client.xrange(control.keys.traj)
    return [decode_group(f[b"data"], vocab_size=vocab_size, current_version=current_version) for _, f in entries]


def test_actor_control_stop_drains_in_flight_groups(engine, loop, codec, tiny_model_dir, redis_url):
    cfg = actor_cfg(tiny_model_dir, f"redis.url={redis_url}", "redis.prefix=drain", "env.name=guess_number")
    actor, control, writer = make_actor(cfg, engine, codec)
    v = engine.version
    try:
        async def scenario():
            task = asyncio.create_task(actor.run())
            await asyncio.sleep(1.0)
            assert control.counters()["produced"] == 0 and actor.idle_reason == "waiting for learner"
            control.write_control(Control(version=v, max_staleness=5, batch_groups=1))
            deadline = time.monotonic() + 60
            while not control.client.xlen(control.keys.traj) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            control.write_control(Control(version=v, max_staleness=5, batch_groups=1, stop=True))
            return await asyncio.wait_for(task, 120)

        reason = loop.run_until_complete(scenario())
        groups = stream_groups(control, len(codec.tokenizer), v)
    finally:
        writer.close()
    assert reason == "learner stop"
    produced = control.counters()["produced"]
    capacity = admission_capacity(v, 5, 1)
    assert 1 <= len(groups) == produced <= capacity, "every admitted group is finished and streamed, none lost"
    assert control.held("actor-t") == 0
    for g in groups:
        assert g.env == "guess_number" and len(g.trajectories) == 4 and g.engine == "vllm-cpu/bf16"
        for t in g.trajectories:
            check_layout(t, codec, "guess_number")
    control.close()


def test_actor_at_the_cap_admits_as_soon_as_the_learner_raises_capacity(engine, loop, codec, tiny_model_dir,
                                                                         redis_url):
    """An actor at the staleness cap blocks on the control-events stream, so the learner's next Control wakes it
    at once, not at its next poll (actor.admission_poll_s, 20 s here: a polling actor fails this). With the
    0.25 s poll alone, the tiny preset stalled 250-650 ms at every step on which the controller cut K."""
    cfg = actor_cfg(tiny_model_dir, f"redis.url={redis_url}", "redis.prefix=wake", "actor.admission_poll_s=20",
                    "actor.max_groups=2")
    actor, control, writer = make_actor(cfg, engine, codec)
    control.write_control(Control(version=0, max_staleness=0, batch_groups=1))  # capacity: one group
    try:
        async def scenario():
            task = asyncio.create_task(actor.run())
            deadline = time.monotonic() + 60
            while not control.client.xlen(control.keys.traj) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # the first group is streamed: the actor now waits at the cap
            assert actor.idle_reason.startswith("at staleness cap") and control.counters()["produced"] == 1
            t0 = time.monotonic()
            control.write_control(Control(version=1, max_staleness=0, batch_groups=1))  # capacity: two groups
            while control.counters()["produced"] < 2 and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.01)
            waited = time.monotonic() - t0
            return waited, await asyncio.wait_for(task, 60)

        waited, reason = loop.run_until_complete(scenario())
    finally:
        writer.close()
    assert reason == "max_groups"
    assert waited < 5.0, f"the second group was admitted {waited:.1f} s after the capacity rose"
    assert control.client.xlen(control.keys.traj) == 2 and control.held("actor-t") == 0
    control.close()


def test_actor_redis_outage_holds_groups_and_resends(engine, loop, codec, tiny_model_dir, redis_server):
    cfg = actor_cfg(tiny_model_dir, f"redis.url={redis_server.url}", "redis.prefix=outage", "env.name=arithmetic",
                    "actor.max_groups=6", "redis.retry_backoff_s=0.05", "redis.retry_backoff_max_s=0.3")
    actor, control, writer = make_actor(cfg, engine, codec)
    v = engine.version
    control.write_control(Control(version=v, max_staleness=100, batch_groups=1))
    try:
        async def scenario():
            task = asyncio.create_task(actor.run())
            deadline = time.monotonic() + 60
            while actor.stats.groups_sent == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            redis_server.stop()
            await asyncio.sleep(1.5)  # groups finish meanwhile and are held by the writer
            held_during_outage = writer.held
            redis_server.start()
            return await asyncio.wait_for(task, 120), held_during_outage

        reason, held = loop.run_until_complete(scenario())
        writer.flush(30)
        groups = stream_groups(control, None, v)
    finally:
        writer.close()
    assert reason == "max_groups"
    assert len(groups) == 6 == control.counters()["produced"], "a group was lost or duplicated in the outage"
    assert len({g.group_id for g in groups}) == 6
    print(f"groups held by the writer during the outage: {held}")
    control.close()


def test_actor_refuses_weights_announced_over_another_transport(engine, loop, codec, tiny_model_dir, redis_url):
    """A learner broadcasting over gloo and an actor configured for files: the actor stops at once with a
    message naming the setting, instead of waiting on weights it cannot receive."""
    from protocol.messages import WeightsReady

    cfg = actor_cfg(tiny_model_dir, f"redis.url={redis_url}", "redis.prefix=mismatch")
    actor, control, writer = make_actor(cfg, engine, codec)
    control.write_control(Control(version=engine.version + 1, max_staleness=0, batch_groups=1))
    control.set_weights(WeightsReady(version=engine.version + 1, path="", sha256="", url="tcp://127.0.0.1:1",
                                     transport="gloo"))
    try:
        with pytest.raises(RuntimeError, match="over 'gloo'.*learner.weight_transfer='files'"):
            loop.run_until_complete(asyncio.wait_for(actor.run(), 60))
    finally:
        writer.close()
        control.close()


def test_actor_stopped_during_weights_catch_up_gives_its_admission_back(engine, loop, codec, tiny_model_dir, redis_url):
    """A SIGTERM between the admission and the groups' start (the actor is catching up on weights) used to leave
    a slot admitted and never streamed (seen in CI as produced 9 vs 8 streamed). Every slot of that admission
    (it admits all the free places at once) goes back."""
    cfg = actor_cfg(tiny_model_dir, f"redis.url={redis_url}", "redis.prefix=catchup")
    actor, control, writer = make_actor(cfg, engine, codec)
    control.write_control(Control(version=engine.version, max_staleness=0, batch_groups=3))  # capacity >= 3
    room = min(admission_capacity(engine.version, 0, 3),
               groups_in_flight_limit(cfg.actor.concurrency, cfg.actor.group_size))
    caught_up = []

    async def stop_while_catching_up(ctrl):  # the stop lands while the catch-up waits on something slow
        caught_up.append(control.counters()["produced"])
        actor.request_stop()
        await actor._race(asyncio.get_running_loop().create_future())

    actor.weights.catch_up = stop_while_catching_up
    try:
        reason = loop.run_until_complete(asyncio.wait_for(actor.run(), 60))
    finally:
        writer.close()
    assert reason == "signal" and len(caught_up) == 1, "the stop did not land during the catch-up"
    assert caught_up == [room], "the actor did not admit every free place in one call"
    assert control.counters()["produced"] == 0 == control.client.xlen(control.keys.traj)
    assert control.held("actor-t") == 0
    control.close()


def test_actor_stop_does_not_wait_for_a_silent_transfer_server(engine, loop, codec, tiny_model_dir, redis_url):
    """Weights announced over gloo by a learner that is gone (nothing answers the join): a stop request ends
    the actor at once instead of after actor.weights_fetch_timeout_s (a Ray run once waited 25 s here)."""
    from protocol.messages import WeightsReady

    cfg = actor_cfg(tiny_model_dir, f"redis.url={redis_url}", "redis.prefix=silent", "learner.weight_transfer=gloo",
                    "actor.weights_fetch_timeout_s=120")
    actor, control, writer = make_actor(cfg, engine, codec)
    version = engine.version
    control.set_weights(WeightsReady(version=version + 1, path="", sha256="", transport="gloo",
                                     url=f"tcp://127.0.0.1:{free_port()}"))

    async def scenario():
        task = asyncio.create_task(actor.run())
        await asyncio.sleep(1.5)
        assert not task.done() and actor.weights._transfer is not None, "the actor is not waiting on the join"
        t0 = time.monotonic()
        actor.request_stop()
        return await asyncio.wait_for(task, 30), time.monotonic() - t0

    try:
        reason, seconds = loop.run_until_complete(scenario())
    finally:
        writer.close()
        control.close()
    assert reason == "signal" and seconds < 10, seconds
    assert engine.version == version


class RecordingEngine:
    """The module's vLLM engine, recording each turn's context and output ids (what vLLM saw and returned)."""

    def __init__(self, engine):
        self.engine, self.turns = engine, {}

    async def generate(self, context, max_tokens, request_id):
        out = await self.engine.generate(context, max_tokens, request_id)
        self.turns[request_id] = (list(context), list(out.token_ids))
        return out


def test_chat_episodes_on_vllm_train_exactly_the_tokens_vllm_produced(engine, loop, tiny_model_dir):
    """guess_number, chat-formatted by the tiny tokenizer's template, on real vLLM: each model turn in the
    trajectory is vLLM's output id for id, each context vLLM got is the trajectory's prefix, and the decoded
    episode is the template's rendering of the conversation (user observations, assistant replies)."""
    cfg = actor_cfg(tiny_model_dir, "env.name=guess_number", "env.chat=true", "env.system_prompt=find it")
    codec = TextCodec.from_config(cfg, tiny_model_dir)
    tok = codec.tokenizer
    rec = RecordingEngine(engine)
    lim = EpisodeLimits.from_config(cfg)
    trajs = run_all(loop, [run_episode(rec, GuessNumber(), 300 + i, codec, lim, f"chat-{i}") for i in range(24)])
    checked, multi = 0, 0
    for i, t in enumerate(trajs):
        ids = t.tokens_np.tolist()
        assert tok.decode(ids[:t.prompt_len], skip_special_tokens=False).startswith("<|system|>find it<|user|>guess")
        replies, written, ends = [], [], []
        for k, start in enumerate(t.turn_starts):
            context, out = rec.turns[f"chat-{i}-t{k}"]
            assert context == ids[:start] and ids[start:start + len(out)] == out
            assert t.mask_np[start:start + len(out)].all()
            if out[-1] != codec.stop_id:
                break  # a cut turn has no end-of-turn token, which the template would write
            replies.append(codec.decode(out[:-1]))  # what the environment reads: special tokens dropped
            written.append(tok.decode(out[:-1], skip_special_tokens=False))  # what the model wrote, verbatim
            ends.append(start + len(out))
        # The episode up to its last closed turn is the template's rendering of that conversation, the model's
        # replies as written (a sampled reserved token stays in the trajectory; the environment never sees it).
        env = GuessNumber()
        observations = [env.reset(300 + i)] + [env.step(r).observation for r in replies[:-1]]
        if replies:
            rendered = tok.apply_chat_template(codec.chat.messages(observations, written), tokenize=False)
            assert tok.decode(ids[:ends[-1]], skip_special_tokens=False) == rendered
            checked += 1
            multi += len(replies) >= 2
    assert checked >= 3 and multi >= 1, (checked, multi)


def test_actor_draws_dataset_prompts_without_replacement(engine, loop, tiny_model_dir, redis_url, tmp_path):
    """An indexed environment (a dataset) gets the run's shared draw counter: 12 groups over 12 rows see each
    row once (one epoch), whatever order they finish in."""
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 22)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = actor_cfg(tiny_model_dir, f"redis.url={redis_url}", "redis.prefix=draws", "env.name=dataset",
                    f'env.kwargs={{path = "{path}", verifier = "numeric"}}', "actor.max_turns=1",
                    "actor.max_groups=12", "env.chat=true")
    codec = TextCodec.from_config(cfg, tiny_model_dir)
    actor, control, writer = make_actor(cfg, engine, codec)
    try:
        control.write_control(Control(version=engine.version, max_staleness=100, batch_groups=4))
        reason = loop.run_until_complete(asyncio.wait_for(actor.run(), 120))
        groups = stream_groups(control, len(codec.tokenizer), engine.version)
    finally:
        writer.close()
    assert reason == "max_groups" and len(groups) == 12 and control.draws() == 12
    prompts = [codec.tokenizer.decode(g.trajectories[0].tokens_np[:g.trajectories[0].prompt_len].tolist(),
                                      skip_special_tokens=True) for g in groups]
    assert sorted(prompts) == sorted(r["prompt"] for r in rows)
    for g in groups:  # the G episodes of a group share their prompt
        assert len({bytes(t.tokens_np[:t.prompt_len]) for t in g.trajectories}) == 1
    control.close()


def test_turns_of_one_context_share_one_request_and_keep_their_own_samples(engine, loop, served):
    """actor.coalesce_turns: 8 turns asked for one context in one loop iteration are one vLLM request with n = 8;
    each caller gets its own sample, whose logprobs are the fp32 model's on that sample and whose tokens carry
    the engine's version. A turn for another context in the same iteration is a request of its own."""
    v = engine.version
    model = load_model(served[v])
    prompt = list(range(40, 52))
    before = engine.coalesced_requests
    outs = run_all(loop, [engine.generate(prompt, 12, f"co-{v}-{i}", ignore_eos=True) for i in range(8)]
                   + [engine.generate(prompt[1:], 12, f"co-{v}-other", ignore_eos=True)])
    assert engine.coalesced_requests == before + 1
    assert len({tuple(o.token_ids) for o in outs[:8]}) >= 4, "the 8 callers got copies of one sample"
    ref = reference_logprobs(model, [prompt + o.token_ids for o in outs[:8]], [len(prompt)] * 8)
    d = float(np.mean([np.abs(np.array(o.logprobs) - r) for o, r in zip(outs[:8], ref)]))
    assert d < 0.08, f"coalesced samples' logprobs do not match the model: {d:.4f}"
    assert all(set(o.versions) == {v} and len(o.token_ids) == 12 for o in outs)


def test_fast_reload_serves_exactly_what_vllms_own_reload_serves(engine, loop, served, tmp_path):
    """actor.fast_reload (the worker extension's dcrl_reload_weights): the tiny model takes the fast path, and the
    engine then computes bit for bit what it computes after vLLM's generic reload_weights of the same file: the
    same greedy tokens and the same logprobs, different from those of the weights before."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    assert engine.fast_reload, "the tiny model should take the fast reload path"
    v = engine.version
    new_dir, _ = publish_perturbed(served[v], tmp_path / "run", v + 1, scale=0.05, seed=3)
    greedy = SamplingParams(temperature=0, max_tokens=10, logprobs=0, ignore_eos=True, detokenize=False)

    def probe(tag: str) -> list[tuple]:
        async def one(i: int):
            final = None
            async for out in engine.llm.generate(TokensPrompt(prompt_token_ids=list(range(30 + i, 40 + i))), greedy,
                                                 f"fast-{tag}-{v}-{i}"):
                final = out
            c = final.outputs[0]
            return tuple(c.token_ids), tuple(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs))
        return run_all(loop, [one(i) for i in range(4)])

    before = probe("before")
    loop.run_until_complete(engine.load_weights(new_dir, v + 1))
    fast = probe("fast")
    engine.fast_reload = False
    try:
        loop.run_until_complete(engine.load_weights(new_dir, v + 2))
        generic = probe("generic")
    finally:
        engine.fast_reload = True
    served[v + 1] = served[v + 2] = new_dir
    assert fast == generic
    assert fast != before, "the reload changed nothing measurable"


def test_cpu_engine_runs_the_model_where_actor_engine_process_says(engine):
    """actor.engine_process = "separate": vLLM's engine core is this process's one vLLM child and, with
    actor.cpu_executor = "uni" (default), starts no worker process of its own (vLLM's CPU default, "mp", would).
    "inline": no vLLM process at all, the engine core has stepped in this one. Without async scheduling, weight
    updates send their engine-core calls in pairs (Engine.ordered_utilities)."""
    import psutil

    from actors.inline_engine import InlineLLM

    cores = [p for p in psutil.Process().children() if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    if isinstance(engine.llm, InlineLLM):
        assert cores == [] and engine.llm.steps > 0
    else:
        assert len(cores) == 1, [p.cmdline() for p in psutil.Process().children()]
        assert cores[0].children(recursive=True) == [], [p.cmdline() for p in cores[0].children(recursive=True)]
    assert engine.ordered_utilities


def test_a_cancelled_turn_leaves_no_request_in_the_engine(engine, loop):
    """Cancelling the caller of a turn aborts its vLLM request: inline, the engine core then holds no unfinished
    request and stops stepping (the stepping task would otherwise run the abandoned request to its end)."""
    from actors.inline_engine import InlineLLM

    async def cancel_mid_turn():
        turn = asyncio.create_task(engine.generate(list(range(20, 30)), 240, f"cancel-{engine.version}",
                                                   ignore_eos=True))
        await asyncio.sleep(0.15)  # 240 tokens one step at a time take ~0.6 s here
        assert not turn.done(), "the turn ended before it could be cancelled"
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
        await asyncio.sleep(0.1)

    llm = engine.llm
    steps = getattr(llm, "steps", 0)
    loop.run_until_complete(cancel_mid_turn())
    if isinstance(llm, InlineLLM):
        assert not llm._engine.has_unfinished_requests() and llm._outputs == {}
        idle = llm.steps
        loop.run_until_complete(asyncio.sleep(0.2))
        assert llm.steps == idle > steps, "the engine kept stepping after the abort"


def test_an_inline_engine_whose_step_fails_fails_every_waiting_turn_and_stays_dead(loop, tiny_model_dir):
    """A vLLM step that raises (inline): every turn waiting on the engine fails with that error, later turns fail at
    once naming it, and shutdown still releases the engine (as AsyncLLM does when its engine-core process dies)."""
    eng = start_cpu_engine(loop, actor_cfg(tiny_model_dir, "actor.engine_process=inline"), tiny_model_dir)
    real_step = eng.llm._engine.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated engine failure")
        return real_step()

    eng.llm._engine.step = failing_step

    async def scenario():
        turns = [asyncio.create_task(eng.generate(list(range(20, 30)), 50, f"dead-{i}", ignore_eos=True))
                 for i in range(3)]
        return await asyncio.wait_for(asyncio.gather(*turns, return_exceptions=True), 60)  # not left waiting

    try:
        results = loop.run_until_complete(scenario())
        assert all(isinstance(r, RuntimeError) and "simulated engine failure" in str(r) for r in results), results
        with pytest.raises(RuntimeError, match="engine is dead.*simulated engine failure"):
            loop.run_until_complete(eng.generate([20, 21], 5, "after"))
    finally:
        loop.run_until_complete(eng.shutdown())
