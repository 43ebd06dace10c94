"""``python -m buffer``: inspect the replay queue, or run the Procfile's redis-server.

    python -m buffer stats --config tiny [--json] [-n 5]   stream, pending per consumer, counters, control, dead letters
    python -m buffer dead  --config tiny [-n 20]           the last dead-letter reasons
    python -m buffer serve --config tiny                   exec redis-server on 127.0.0.1:<port of redis.url>
                                                           (the password reaches it on stdin, not in argv)

``--config``/``--set``/``--debug`` are accepted before or after the command. Nothing heavy is imported here.
An expected failure (Redis unreachable or refusing the password, the port taken) is one ``error:`` line and
exit status 2 (``protocol.errors.run_main``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.parse
from pathlib import Path

from configs.schema import RedisConfig, add_config_args, config_from_args
from protocol.errors import DcrlError, add_debug_arg, run_main

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def serve_command(cfg: RedisConfig) -> tuple[list[str], bytes]:
    """redis-server command line for ``cfg`` and the config to give it on stdin: bound to 127.0.0.1 on the port
    of ``redis.url``, password from ``redis.password`` (or the URL) in the stdin config only (not visible in
    ``ps``), append-only persistence in ``redis.data_dir``. Refuses a non-loopback URL."""
    from buffer.server import redis_server_command

    u = urllib.parse.urlsplit(cfg.url)
    if u.scheme != "redis":
        raise ValueError(f"redis.url {cfg.url!r}: serve runs a plain redis:// server")
    if u.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"redis.url host {u.hostname!r}: serve binds 127.0.0.1 only; point redis.url at "
                         "127.0.0.1, or run the server yourself where the config says")
    password = cfg.password or (urllib.parse.unquote(u.password) if u.password else None)
    return redis_server_command(u.port or 6379, Path(cfg.data_dir).resolve(), password)


def serve(cfg: RedisConfig) -> None:
    """exec redis-server for ``cfg`` (same pid: honcho's SIGTERM/SIGINT reach redis-server directly), after
    the checks that would otherwise end in redis-server's own less telling message."""
    from buffer.server import check_port_free, exec_with_stdin

    try:
        cmd, config = serve_command(cfg)
    except ValueError as exc:
        raise DcrlError(str(exc)) from None
    port = int(cmd[cmd.index("--port") + 1])
    check_port_free(port)
    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    print(f"[buffer] exec redis-server on 127.0.0.1:{port}, append-only file in {Path(cfg.data_dir).resolve()}",
          file=sys.stderr, flush=True)
    exec_with_stdin(cmd, config)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m buffer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    add_debug_arg(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="{stats,dead,serve}")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        # Same flags after the command; merged with those before it in main().
        sp.add_argument("--config", "-c", dest="sub_config", default=None, metavar="CONFIG", help="TOML config or preset name")
        sp.add_argument("--set", dest="sub_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field (repeatable)")
        sp.add_argument("--debug", dest="sub_debug", action="store_true", help=argparse.SUPPRESS)
        return sp

    st = command("stats", "stream length, pending per consumer, counters, current version and K, dead letters")
    st.add_argument("-n", type=int, default=5, help="dead-letter reasons to show (default 5)")
    st.add_argument("--json", action="store_true", help="one JSON object instead of text")
    dead = command("dead", "list the newest dead-letter entries and their reasons")
    dead.add_argument("-n", type=int, default=20, help="entries to list (default 20)")
    command("serve", "exec redis-server on 127.0.0.1 (port from redis.url, AOF in redis.data_dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.config = args.sub_config or args.config
    args.overrides = list(args.overrides) + list(args.sub_overrides)
    cfg = config_from_args(args).redis
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.command == "serve":
        serve(cfg)  # replaces this process; returns only by raising

    from buffer.connection import connect
    from buffer.stats import collect_stats, dead_letters, format_stats

    # An inspection command should not hang for the learner's full connect timeout.
    cfg = cfg.model_copy(update={"connect_timeout_s": min(cfg.connect_timeout_s, 5.0)})
    client = connect(cfg, "buffer cli")  # unreachable or a refused password: DcrlError, one line
    try:
        if args.command == "stats":
            st = collect_stats(client, cfg, n_dead=args.n)
            if args.json:
                print(json.dumps(st, default=lambda o: {f: getattr(o, f) for f in o.__struct_fields__}))
            else:
                print(format_stats(st))
        elif args.command == "dead":
            rows = dead_letters(client, cfg, args.n)
            print(f"{len(rows)} newest dead letters in {cfg.prefix}:dead (newest first)")
            for d in rows:
                print(f"{d['id']}  source {d['source_id']}  {d['bytes']} bytes  {d['reason']}")
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
