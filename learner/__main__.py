"""``python -m learner``: train (default) or regenerate a run's report.

    python -m learner --config tiny [--set learner.steps=5] [--resume | --fresh]
    python -m learner report --run-dir runs/tiny

torch, transformers and the trainer are imported after argument parsing, so ``--help`` is instant. A missing
model directory, an unreachable Redis or a refused password is found before them (``preflight``) and said in
one ``error:`` line, exit status 2 (``protocol.errors.run_main``; ``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from configs.schema import add_config_args, config_from_args
from protocol.errors import add_debug_arg, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m learner",
        description="dcrl learner: consume trajectory groups from Redis, train with the DCMDP controller, "
                    "publish weights. 'report' regenerates <run_dir>/report.png from metrics.jsonl.")
    p.add_argument("command", nargs="?", default="train", choices=("train", "report"),
                   help="train (default) or report")
    add_config_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="fresh", action="store_false",
                      help="continue from the latest checkpoint of the run if there is one (default)")
    mode.add_argument("--fresh", dest="fresh", action="store_true",
                      help="discard this run's checkpoints, weights and metrics and start at version 0")
    p.set_defaults(fresh=False)
    p.add_argument("--run-dir", default=None,
                   help="report: the run directory (default: run.root/run.name of the config)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_debug_arg(p)
    return p


def _terminate(signum, frame):
    # SIGTERM (honcho, Ray, kill) unwinds like Ctrl-C: sockets and the wandb run are closed in finally
    # blocks; un-checkpointed entries stay pending in Redis and are re-read on restart.
    raise SystemExit(128 + signum)


def preflight(cfg) -> None:
    """The checks that are cheap now and expensive later: the model path (before torch and the model load)
    and Redis (before minutes of loading a large model). Each raises a DcrlError naming the setting."""
    from buffer.connection import check_reachable
    from tiny.build import check_model_path

    check_model_path(cfg)
    check_reachable(cfg.redis, "learner")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.command == "report":
        from learner.metrics import write_report

        run_dir = Path(args.run_dir) if args.run_dir else config_from_args(args).run.dir
        try:
            out = write_report(run_dir)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"report: {out}")
        return 0

    cfg = config_from_args(args)
    signal.signal(signal.SIGTERM, _terminate)
    preflight(cfg)
    from learner.trainer import train

    run_dir = train(cfg, fresh=args.fresh)
    print(f"learner done: metrics {run_dir / 'metrics.jsonl'}  report {run_dir / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
