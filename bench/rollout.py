"""Rollout efficiency: the actor's generated tokens/s (episodes through the env, into Redis) over standalone
vLLM tokens/s on the same work, measured side by side on one engine in one run.

Each repeat runs two phases on the same vLLM engine (same model, sampling settings, concurrency, cores):

1. actor: the real ``Actor`` plays ``--groups`` groups of ``cfg.env`` and streams them to a real
   redis-server (admission wide open); tokens/s = model tokens in the streamed groups / wall time.
2. standalone: the very generation requests of phase 1 replayed straight on ``AsyncLLM.generate``
   (each turn's context, the same number of tokens with ``ignore_eos``, the turns of one episode in
   order, ``actor.concurrency`` requests in flight); no env, no tokenizer, no Redis.

The prefix cache is reset before each phase, so the replay gains nothing from the actor's cache. The replay
sends one request per turn, the plain way to drive vLLM; with ``actor.coalesce_turns`` (default on) the actor
sends a group's first turns as one request with n = G samples, so a ratio above 1 means that request shaping
gains more than the environment, tokenizer and Redis work cost (``--set actor.coalesce_turns=false`` compares
like with like).
efficiency = actor tokens/s / standalone tokens/s (target >= 0.9); the median over repeats is reported,
with the episode statistics (turns, tokens, finish reasons, reward) of the env.

    python bench/rollout.py [--config tiny] [--set env.name=guess_number] [--groups 32] [--repeats 3]

Last line: ``RESULT rollout_efficiency <median ratio>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import add_config_args, load_config  # noqa: E402


def turn_requests(traj) -> list[tuple[list[int], int]]:
    """(context ids, generated count) of every model turn of a trajectory: the requests the actor made."""
    ids, mask = traj.tokens_np.tolist(), traj.mask_np
    out = []
    for k, s in enumerate(traj.turn_starts):
        end = traj.turn_starts[k + 1] if k + 1 < len(traj.turn_starts) else len(ids)
        n = 0
        while s + n < end and mask[s + n]:
            n += 1
        out.append((ids[:s], n))
    return out


async def run_actor_phase(cfg, engine, codec, groups: int, rep: int) -> tuple[list, float]:
    """Phase 1: the real actor for ``groups`` groups; returns (decoded groups, wall seconds)."""
    from actors.actor import Actor
    from buffer import ControlPlane, GroupWriter
    from protocol.messages import Control, decode_group

    pcfg = cfg.model_copy(deep=True)
    pcfg.actor.max_groups = groups
    control = ControlPlane(pcfg.redis, who="bench")
    control.reset()
    control.write_control(Control(version=0, max_staleness=1_000_000, batch_groups=1))
    writer = GroupWriter(pcfg.redis, f"bench-{rep}")
    actor = Actor(pcfg, f"bench-{rep}", engine, codec, writer, control)
    await engine.llm.reset_prefix_cache()
    t0 = time.perf_counter()
    reason = await actor.run()
    wall = time.perf_counter() - t0
    writer.close()
    assert reason == "max_groups", reason
    got = [decode_group(f[b"data"]) for _, f in control.client.xrange(control.keys.traj)]
    control.close()
    assert len(got) == groups, f"{len(got)} groups streamed, {groups} expected"
    return got, wall


async def run_standalone_phase(engine, episodes: list[list[tuple[list[int], int]]], concurrency: int, rep: int) -> float:
    """Phase 2: replay the actor's requests on AsyncLLM directly; returns wall seconds."""
    from vllm.inputs import TokensPrompt

    queue = list(reversed(episodes))

    async def worker(w: int) -> None:
        while queue:
            turns = queue.pop()
            for k, (context, n) in enumerate(turns):
                async for _ in engine.llm.generate(TokensPrompt(prompt_token_ids=context),
                                                   engine.sampling_params(n, ignore_eos=True),
                                                   f"replay-{rep}-{w}-{len(queue)}-{k}"):
                    pass

    await engine.llm.reset_prefix_cache()
    t0 = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    return time.perf_counter() - t0


def episode_stats(groups) -> dict:
    trajs = [t for g in groups for t in g.trajectories]
    return {
        "episodes": len(trajs),
        "mean_turns": statistics.mean(len(t.turn_starts) for t in trajs),
        "mean_model_tokens": statistics.mean(int(t.mask_np.sum()) for t in trajs),
        "mean_total_tokens": statistics.mean(len(t) for t in trajs),
        "mean_reward": statistics.mean(t.reward for t in trajs),
        "finish": dict(Counter(t.finish_reason for t in trajs)),
    }


async def bench(cfg, groups: int, repeats: int) -> list[float]:
    from envs.episode import EpisodeLimits, TextCodec, run_episode
    from actors.engine import Engine
    from envs import make_env
    from tiny.build import ensure_model

    model_dir = ensure_model(cfg)
    engine = await Engine.start(cfg, model_dir)
    codec = TextCodec.from_pretrained(model_dir)
    ratios = []
    try:
        # Warm-up: the first batches of a fresh engine are slow (lazy initialisation), for both phases.
        lim = EpisodeLimits.from_config(cfg)
        await asyncio.gather(*[run_episode(engine, make_env(cfg.env.name, cfg.env.kwargs), i, codec, lim, f"warm-{i}")
                               for i in range(2 * cfg.actor.concurrency)])
        print(f"engine {engine.tag}, model {model_dir}, env {cfg.env.name}, G={cfg.actor.group_size}, "
              f"concurrency {cfg.actor.concurrency}, {groups} groups per phase", flush=True)
        for rep in range(repeats):
            got, t_actor = await run_actor_phase(cfg, engine, codec, groups, rep)
            episodes = [turn_requests(t) for g in got for t in g.trajectories]
            t_std = await run_standalone_phase(engine, episodes, cfg.actor.concurrency, rep)
            tokens = sum(int(t.mask_np.sum()) for g in got for t in g.trajectories)
            assert tokens == sum(n for ep in episodes for _, n in ep)
            actor_tps, std_tps = tokens / t_actor, tokens / t_std
            ratios.append(actor_tps / std_tps)
            print(f"repeat {rep}: actor {actor_tps:8.0f} tok/s ({t_actor:.2f} s)   standalone vLLM "
                  f"{std_tps:8.0f} tok/s ({t_std:.2f} s)   ratio {ratios[-1]:.3f}   [{tokens} tokens]", flush=True)
            stats = episode_stats(got)
        print("episodes: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in stats.items()))
    finally:
        await engine.shutdown()
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    ap.add_argument("--groups", type=int, default=32, help="groups per actor phase")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from buffer.server import free_port, start_redis

    workdir = Path(tempfile.mkdtemp(prefix="dcrl-bench-rollout-"))
    server = start_redis(workdir / "redis", appendonly=False)
    try:
        cfg = load_config(args.config, args.overrides + [
            f"redis.url={server.url}", "redis.prefix=bench-rollout", "actor.status_interval_s=3600",
            f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"actor.weights_cache_dir={workdir / 'weights'}"],
            env={})
        from actors.engine import prepare_device_env

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        prepare_device_env(cfg, replica=0)
        ratios = asyncio.run(bench(cfg, args.groups, args.repeats))
    finally:
        server.stop()
    print(f"median: {statistics.median(ratios):.3f} over {len(ratios)} repeats "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"RESULT rollout_efficiency {statistics.median(ratios):.3f}")


if __name__ == "__main__":  # vLLM starts its engine with multiprocessing spawn: the guard is required
    main()
