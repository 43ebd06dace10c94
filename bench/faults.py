"""The fault suite: real tiny-preset jobs with one fault injected mid-run, and what each fault cost.

Faults (each its own job, from the same warm-started model and seed):

* ``clean``: no fault; the reference reward.
* ``garbage``: a burst of ``--garbage`` bad entries XADDed to the live trajectory stream (random bytes,
  truncated real entries, maps of the wrong types, NaN logprobs, tokens from a future version).
* ``learner_kill``: SIGKILL the learner mid-run, start it again (it resumes from its last checkpoint).
* ``actor_kill``: SIGKILL the actor's worker process (the one that owns vLLM); its supervisor restarts it.
* ``redis_restart``: stop redis-server mid-run and start it again on the same port and data directory
  (AOF on), ``--redis-down-s`` seconds later. Learner and actor ride the outage out.

Per fault, one table row: run completed (the learner reached ``learner.steps`` and exited 0), groups lost,
groups trained twice, entries dead-lettered, the reward of the last 100 steps against the clean run's, and
the wall time. The accounting is independent of the learner's own counters:

* a watcher thread follows the trajectory stream (plain XREAD, no consumer group, so it takes nothing) and
  notes the id of every group that decodes; the learner logs the ids each step trained
  (``learner.log_group_ids``: rows of steps a resumed run redoes are truncated with the metrics);
* lost = groups seen in the stream - trained - dead-lettered - still in the stream at the end;
* trained twice = ids that appear in more than one step's batch of the final metrics.

``python bench/faults.py [--faults garbage,learner_kill] [--steps 600] [--quick]``; prints the table (also
written to ``<out>/faults.md``), ``RESULT faults_reward_gap <largest |reward - clean| over the faults>`` and
last ``RESULT faults_survived <fraction of runs that completed with no group lost or trained twice>`` (exit 1
when that is below 1).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Job  # noqa: E402

from buffer.keys import Keys  # noqa: E402
from buffer.synthetic import synthetic_group  # noqa: E402
from protocol import Control, ProtocolError, decode_group, encode  # noqa: E402

FAULTS = ("clean", "garbage", "learner_kill", "actor_kill", "redis_restart")
WINDOW = 100  # reward of the last WINDOW steps


def redis_client(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)


def group_id_of(data: bytes | None) -> str | None:
    """The group id in an entry's ``data``, or None when it does not decode (garbage)."""
    if data is None:
        return None
    try:
        return decode_group(data).group_id
    except ProtocolError:
        return None


class StreamWatcher(threading.Thread):
    """Follows ``<prefix>:traj`` with plain XREAD and notes every decodable group id (through Redis restarts)."""

    def __init__(self, url: str, keys: Keys):
        super().__init__(name="stream-watcher", daemon=True)
        self.url, self.keys = url, keys
        self.seen: set[str] = set()
        self.undecodable = 0
        self._halt = threading.Event()
        self._last = b"0-0"

    def run(self) -> None:
        client = None
        while not self._halt.is_set():
            try:
                client = client or redis_client(self.url)
                for _, entries in client.xread({self.keys.traj: self._last}, count=512, block=100) or []:
                    for sid, fields in entries:
                        self._last = sid
                        gid = group_id_of(fields.get(b"data"))
                        if gid is None:
                            self.undecodable += 1
                        else:
                            self.seen.add(gid)
            except Exception:  # noqa: BLE001 - redis down (the restart fault): try again
                client = None
                time.sleep(0.2)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def garbage_entries(n: int, rng: np.random.Generator, version: int) -> list[dict]:
    """``n`` bad entries, five kinds in turn: each must be dead-lettered with its reason, none trained."""
    out = []
    for i in range(n):
        good = synthetic_group(rng, f"garbage-{i}", n_traj=2, n_tokens=12, vocab_size=16, version=version)
        kind = i % 5
        if kind == 0:
            out.append({"data": rng.bytes(int(rng.integers(1, 300)))})
        elif kind == 1:
            raw = encode(good)
            out.append({"data": raw[: len(raw) // 2]})
        elif kind == 2:
            bad = {"group_id": i, "actor_id": ["x"], "trajectories": "none"}
            out.append({"data": msgspec.msgpack.encode(bad) if i % 2 else encode(Control(version=1, max_staleness=1))})
        elif kind == 3:
            t = good.trajectories[0]
            lp = np.frombuffer(t.logprobs, dtype=np.float32).copy()
            lp[-1] = np.nan
            out.append({"data": encode(msgspec.structs.replace(
                good, trajectories=[msgspec.structs.replace(t, logprobs=lp.tobytes())]))})
        else:
            out.append({"data": encode(synthetic_group(rng, f"garbage-{i}", n_traj=2, n_tokens=12, vocab_size=16,
                                                       version=version + 1000))})
    return out


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def inject(job: Job, fault: str, args, keys: Keys) -> str:
    """Inject ``fault`` into the running job; returns a short description of what was done."""
    if fault == "garbage":
        client = redis_client(job.server.url)
        version = int(client.hget(keys.control, "version") or 0)
        pipe = client.pipeline(transaction=False)
        for fields in garbage_entries(args.garbage, np.random.default_rng(7), version):
            pipe.xadd(keys.traj, fields)
        pipe.execute()
        client.close()
        return f"{args.garbage} garbage entries at version {version}"
    if fault == "learner_kill":
        job.learner.send_signal(signal.SIGKILL)
        job.learner.wait()
        job.start_learner(fresh=False)
        return "learner SIGKILLed and restarted (resume)"
    if fault == "actor_kill":
        workers = children(job.actors[0].pid)  # python -m actors supervises the real actor
        if not workers:
            raise SystemExit("actor_kill: the actor has no worker process (is it supervised?)")
        for w in workers:
            os.kill(w, signal.SIGKILL)
        return f"actor worker {workers} SIGKILLed (the supervisor restarts it)"
    if fault == "redis_restart":
        job.server.stop()
        time.sleep(args.redis_down_s)
        job.server.start()
        return f"redis-server stopped for {args.redis_down_s:.0f} s and restarted (AOF)"
    raise ValueError(fault)


def leftovers(url: str, keys: Keys) -> tuple[set[str], set[str], int]:
    """Group ids still in the trajectory stream, group ids in the dead-letter stream, and its length."""
    client = redis_client(url)
    left = {g for _, f in client.xrange(keys.traj) if (g := group_id_of(f.get(b"data")))}
    dead_entries = client.xrange(keys.dead)
    dead = {g for _, f in dead_entries if (g := group_id_of(f.get(b"data")))}
    client.close()
    return left, dead, len(dead_entries)


def run_fault(fault: str, args, out: Path) -> dict:
    prefix = "dcrl"
    keys = Keys(prefix)
    sets = [f"learner.steps={args.steps}", "learner.log_group_ids=true", f"redis.prefix={prefix}",
            *args.overrides]
    job = Job(fault, args.config, sets, out, pin_cores=not args.no_pin)
    watcher = StreamWatcher(job.server.url, keys)
    what, completed = "", False
    try:
        watcher.start()
        job.start()
        deadline = time.monotonic() + args.timeout_s
        if fault != "clean":
            at = int(args.steps * args.at)
            while job.steps_done() < at and job.learner.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            what = inject(job, fault, args, keys)
            print(f"[{fault}] step {job.steps_done()}: {what}", flush=True)
        try:
            completed = job.wait_learner(max(1.0, deadline - time.monotonic())) == 0
        except subprocess.TimeoutExpired:
            what += f" (learner still running after {args.timeout_s:.0f} s)"
        wall = time.monotonic() - job.t0
        time.sleep(0.5)  # the watcher catches up with the last entries
        watcher.stop()
        left, dead, dead_n = leftovers(job.server.url, keys)
    finally:
        watcher.stop()
        job.stop()
    rows = job.rows()
    trained = [g for r in rows for g in r.get("groups", [])]
    lost = watcher.seen - set(trained) - dead - left
    rewards = [r["reward/mean"] for r in rows]
    return {
        "fault": fault, "what": what, "completed": completed and len(rows) == args.steps, "steps": len(rows),
        "seen": len(watcher.seen), "trained": len(trained), "lost": len(lost), "lost_ids": sorted(lost)[:10],
        "twice": len(trained) - len(set(trained)), "dead": dead_n, "undecodable": watcher.undecodable,
        "reward_last": statistics.fmean(rewards[-WINDOW:]) if rewards else float("nan"), "wall_s": wall,
    }


def table(results: list[dict]) -> str:
    clean = next((r["reward_last"] for r in results if r["fault"] == "clean"), None)
    lines = [f"| fault | completed | groups seen | lost | trained twice | dead letters | reward, last {WINDOW} "
             "| vs clean | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        gap = "" if clean is None or r["fault"] == "clean" else f"{r['reward_last'] - clean:+.3f}"
        lines.append(f"| {r['fault']} | {'yes' if r['completed'] else 'NO'} | {r['seen']} | {r['lost']} | "
                     f"{r['twice']} | {r['dead']} | {r['reward_last']:.3f} | {gap} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset of " + ", ".join(FAULTS))
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--at", type=float, default=0.4, help="inject at this fraction of the steps")
    ap.add_argument("--garbage", type=int, default=125)
    ap.add_argument("--redis-down-s", type=float, default=3.0)
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per job")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-faults")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 60 steps, 25 garbage entries")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.garbage = min(args.steps, 60), min(args.garbage, 25)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        ap.error(f"--faults: unknown {unknown}; choose from {', '.join(FAULTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for fault in faults:
        r = run_fault(fault, args, args.out)
        results.append(r)
        print(f"[{fault}] completed={r['completed']} lost={r['lost']} twice={r['twice']} dead={r['dead']} "
              f"reward_last={r['reward_last']:.3f} wall={r['wall_s']:.0f}s", flush=True)
    md = table(results)
    (args.out / "faults.md").write_text(md + "\n")
    (args.out / "faults.json").write_text(json.dumps(results, indent=1))
    print(md)
    clean = next((r["reward_last"] for r in results if r["fault"] == "clean"), None)
    gaps = [abs(r["reward_last"] - clean) for r in results if clean is not None and r["fault"] != "clean"]
    survived = [r["completed"] and r["lost"] == 0 and r["twice"] == 0 for r in results]
    print(f"RESULT faults_reward_gap {max(gaps) if gaps else 0.0:.3f}")
    print(f"RESULT faults_survived {sum(survived) / len(survived):.3f}")
    return 0 if all(survived) else 1


if __name__ == "__main__":
    raise SystemExit(main())
