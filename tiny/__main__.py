"""Build (or reuse) the built-in tiny model and print its warm-start accuracy.

    python -m tiny --config tiny            # build (or reuse) the model, print accuracy
    python -m tiny --config tiny --force    # rebuild
    python -m tiny --config tiny --sample 8 # + 8 episodes sampled by real vLLM, with rewards

``--help`` answers without importing torch, transformers or vLLM.
"""

from __future__ import annotations

import argparse
import time

from configs.schema import add_config_args, config_from_args
from protocol.errors import add_debug_arg, run_main
from tiny.build import check_model_path, ensure_model, read_stamp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiny", description=__doc__.split("\n")[0])
    add_config_args(parser)
    add_debug_arg(parser)
    parser.add_argument("--force", action="store_true", help="rebuild even if a current build exists")
    parser.add_argument("--sample", type=int, default=0, metavar="N",
                        help="then play N episodes of cfg.env with real vLLM and print them "
                             "(python -m actors.sample)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    check_model_path(cfg)
    t0 = time.monotonic()
    path = ensure_model(cfg, force=args.force)
    stamp = read_stamp(path)
    if stamp is not None:
        print(f"[tiny] model at {path}: warm-start accuracy {stamp['accuracy']:.3f} "
              f"after {stamp['steps']} steps ({time.monotonic() - t0:.1f}s this call)")
    if args.sample:
        from actors.sample import sample  # vLLM: only when asked for

        sample(cfg, path, args.sample)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
