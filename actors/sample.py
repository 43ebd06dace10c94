"""Play a few episodes of ``cfg.env`` on the actor's real vLLM engine and print each transcript and reward:
the smallest end-to-end slice (model -> vLLM -> env -> reward), without Redis or a learner.

    python -m actors.sample --config tiny -n 8      # also: python -m tiny --config tiny --sample 8

Same engine settings and the same episode loop (``envs.episode.run_episode``) as ``python -m actors``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from configs.schema import add_config_args, config_from_args

if TYPE_CHECKING:
    from configs.schema import DcrlConfig


async def _play(cfg: "DcrlConfig", model_dir: Path, n: int, device: str) -> list:
    from actors.engine import Engine
    from envs import env_factory
    from envs.episode import EpisodeLimits, TextCodec, run_episode

    new_env = env_factory(cfg.env.name, cfg.env.kwargs)  # a bad env fails before vLLM starts
    codec, limits = TextCodec.from_config(cfg, model_dir), EpisodeLimits.from_config(cfg)
    engine = await Engine.start(cfg, model_dir, device=device)
    engine.stop_token_ids = codec.extra_stop_ids
    try:
        return await asyncio.gather(*(run_episode(engine, new_env(), cfg.actor.seed + i,
                                                  codec, limits, f"sample-{i}") for i in range(n)))
    finally:
        await engine.shutdown()


def sample(cfg: "DcrlConfig", model_dir: str | os.PathLike, n: int, log=print) -> list[dict]:
    """Play ``n`` episodes (env seeds ``actor.seed + i``) and log one line each; returns
    [{seed, reward, turns, finish_reason, text}]. Must run before anything else imported vLLM."""
    from actors.engine import prepare_device_env

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    device = prepare_device_env(cfg, replica=0)
    trajs = asyncio.run(_play(cfg, Path(model_dir), n, device))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    results = []
    for i, t in enumerate(trajs):
        ids = t.tokens_np.tolist()
        results.append({"seed": cfg.actor.seed + i, "reward": t.reward, "turns": len(t.turn_starts),
                        "finish_reason": t.finish_reason, "prompt": tok.decode(ids[:t.prompt_len]),
                        "completion": tok.decode(ids[t.prompt_len:])})
    for r in results:
        log(f"[sample] seed {r['seed']}  prompt {r['prompt']!r}  completion {r['completion']!r}  "
            f"reward {r['reward']:.2f}  turns {r['turns']}  ({r['finish_reason']})")
    mean = sum(r["reward"] for r in results) / max(1, n)
    log(f"[sample] {n} episodes of {cfg.env.name} on vLLM ({cfg.actor.dtype}): mean reward {mean:.3f}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.sample", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("-n", type=int, default=8, help="episodes to play (default 8)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    from tiny.build import ensure_model

    sample(cfg, ensure_model(cfg), args.n)
    return 0


if __name__ == "__main__":  # vLLM starts its engine with multiprocessing spawn: the guard is required
    sys.exit(main())
