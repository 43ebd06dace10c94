"""One dcrl actor process: a vLLM engine playing episodes, streaming groups to Redis, following weight updates.

    python -m actors --config tiny [--set actor.concurrency=16] [--actor-id actor-1]

Actor id: ``--actor-id``, else ``DCRL_ACTOR_ID``, else the Procfile process name (``HONCHO_PROCESS_NAME`` / ``PS``) (``actor.2`` -> ``actor-2``), else
``actor-0``; its trailing number picks the GPU on GPU machines (``actor.gpu`` overrides). SIGTERM or
SIGINT: in-flight episodes are cancelled, finished groups flushed, exit 0. vLLM, torch and
transformers are imported only after the arguments are parsed (``--help`` answers at once), and after the
checks that fail fast: a bad ``env.name``/``env.kwargs``, a missing model directory, an unreachable Redis or a
refused password is one ``error:`` line, exit status 2 (``protocol.errors.run_main``; ``--debug`` adds the
traceback).

Supervision (``actors/supervisor.py``): this process is a small supervisor; the actor itself runs in a child
process (the same command line plus ``--no-supervise``) in a process group of its own, with vLLM's processes.
Whenever that child ends, even by SIGKILL, its whole group (vLLM's EngineCore and Workers) is stopped, so
nothing is left holding a GPU; a crash (a signal, or a status other than 0 and 2) restarts it, after a backoff,
at most ``actor.max_restarts`` times. SIGTERM and SIGINT are passed on to the actor, and the supervisor then
exits with its status. ``--no-supervise`` runs the actor in this process instead (a debugger, a profiler).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from protocol.errors import DcrlError, add_debug_arg, run_main


def build_parser() -> argparse.ArgumentParser:
    from configs.schema import add_config_args

    parser = argparse.ArgumentParser(prog="python -m actors", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_debug_arg(parser)
    parser.add_argument("--actor-id", default=None,
                        help="actor id (default: $DCRL_ACTOR_ID, else honcho's $HONCHO_PROCESS_NAME or foreman's $PS, else actor-0)")
    parser.add_argument("--no-supervise", action="store_true",
                        help="run the actor in this process: no restarts (actor.max_restarts), and vLLM's processes "
                             "outlive a SIGKILL of it")
    return parser


async def serve(cfg, actor_id: str, replica: int, device: str) -> int:
    """Wire the components, run the actor until it stops, close everything. Returns the exit code."""
    from actors.actor import Actor
    from envs.episode import TextCodec
    from actors.engine import Engine
    from actors.weight_sync import WeightSubscriber
    from buffer import ControlPlane, GroupWriter
    from tiny.build import ensure_model
    from weights.quant import quantized_model_dir

    log = logging.getLogger("dcrl.actor")
    loop = asyncio.get_running_loop()
    early_stop = asyncio.Event()
    holder: dict = {}

    def on_signal(signum: int) -> None:
        if "actor" in holder:
            holder["actor"].request_stop()
        else:
            log.info("%s: %s before start; exiting", actor_id, signal.Signals(signum).name)
            early_stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    model_dir = ensure_model(cfg, log=log.info)
    # Low-precision actors start from the same rounding the learner applies to every published version.
    engine_dir = quantized_model_dir(model_dir, os.path.join(cfg.actor.weights_cache_dir, actor_id,
                                                             f"start-{cfg.actor.weight_quant}"), cfg.actor.weight_quant)
    control = ControlPlane(cfg.redis, who=actor_id)
    writer = GroupWriter(cfg.redis, actor_id)
    engine = subscriber = None
    try:
        codec = TextCodec.from_config(cfg, model_dir)  # a chat config the tokenizer cannot serve fails before vLLM
        engine = await Engine.start(cfg, engine_dir, device=device, replica=replica)
        engine.stop_token_ids = codec.extra_stop_ids
        if early_stop.is_set():
            return 0
        subscriber = WeightSubscriber(cfg.learner.zmq_pub)
        actor = holder["actor"] = Actor(cfg, actor_id, engine, codec, writer, control, subscriber)
        log.info("%s: %s on %s, env %s, G=%d, concurrency %d", actor_id, engine.tag, model_dir, cfg.env.name,
                 cfg.actor.group_size, cfg.actor.concurrency)
        await actor.run()
    finally:
        if subscriber is not None:
            subscriber.close()
        if engine is not None:
            await engine.shutdown()
        actor = holder.get("actor")
        writer.close(actor.stop_budget(30.0) if actor is not None else 30.0)
        control.close()
    return 0


def preflight(cfg, actor_id: str) -> None:
    """What fails in well under a second here but after Redis, the model or vLLM (tens of seconds) otherwise:
    the environment (a config error), the model path, then Redis. Each raises a DcrlError naming the setting."""
    from buffer.connection import check_reachable
    from envs import EnvError, make_env
    from tiny.build import check_model_path

    try:
        make_env(cfg.env.name, cfg.env.kwargs)
    except EnvError as e:
        raise DcrlError(f"env.name / env.kwargs: {e}") from e
    check_model_path(cfg)
    check_reachable(cfg.redis, actor_id)


# A supervised actor whose supervisor died (and so sent it SIGTERM) gets this long to stop by itself before its
# process group, vLLM's processes with it, is SIGKILLed (actors.supervisor.watch_supervisor).
ORPHAN_GRACE_S = 30.0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from configs.schema import config_from_args

    cfg = config_from_args(args)
    from actors.actor import replica_index, resolve_actor_id

    actor_id = resolve_actor_id(args.actor_id, os.environ)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from actors.supervisor import supervise, watch_supervisor

    if not args.no_supervise:
        return supervise([sys.executable, "-m", "actors", *argv, "--no-supervise"], name=actor_id,
                         max_restarts=cfg.actor.max_restarts)
    watch_supervisor(ORPHAN_GRACE_S)
    preflight(cfg, actor_id)
    # vLLM's per-request INFO lines would drown the status line; its warnings stay visible.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from actors.engine import prepare_device_env

    replica = replica_index(actor_id)
    device = prepare_device_env(cfg, replica)  # before anything imports vllm or torch
    return asyncio.run(serve(cfg, actor_id, replica, device))


if __name__ == "__main__":  # vLLM starts its engine with multiprocessing spawn: the guard is required
    sys.exit(run_main(main))
