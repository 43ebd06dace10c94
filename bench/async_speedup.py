"""Async vs sync on the same job: wall time of N learner steps with K = 0 (synchronous) and with DCMDP.

One actor process pinned to one core and the learner pinned to another (``taskset``), a fresh
redis-server per mode, the same config otherwise. The ideal async speedup comes from the synchronous
run's own timings: in sync mode every step first waits for the actor's generation (T_gen, the
learner's ``time/wait_for_data_s``) and then trains (T_train, ``time/step_s`` + ``time/publish_s``), so a perfect overlap
gives (T_gen + T_train) / max(T_gen, T_train).

    python bench/async_speedup.py [--steps 12] [--config tiny] [--set KEY=VALUE ...] [--async-mode fixed]

The async run's mean staleness cap K is printed: DCMDP lowers K when the discrepancy budget is spent,
and then the async run is nearly synchronous by design (``--async-mode fixed`` shows the overlap alone).

Last line: ``RESULT async_speedup_vs_ideal <speedup / ideal>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from buffer.server import free_port, start_redis  # noqa: E402
from configs import add_config_args, load_config  # noqa: E402


def _pin(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def run_mode(mode: str, steps: int, config: str, overrides: list[str], workdir: Path,
             async_mode: str = "dcmdp") -> dict:
    """Run one bounded job (redis + learner + actor) and return its wall time and metrics rows."""
    server = start_redis(workdir / f"redis-{mode}")
    sets = overrides + [
        f"run.name=bench-{mode}", f"run.root={workdir}", f"learner.steps={steps}",
        f"controller.mode={'sync' if mode == 'sync' else async_mode}",
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
        f"actor.weights_cache_dir={workdir / f'actor-weights-{mode}'}",
        "learner.progress=false", "learner.wandb_mode=disabled", "learner.checkpoint_every=1000",
    ]
    args = ["--config", config] + [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "DCRL_REDIS_URL": server.url, "PYTHONUNBUFFERED": "1"}
    log = open(workdir / f"{mode}.log", "w")
    t0 = time.monotonic()
    learner = subprocess.Popen(_pin(0) + [sys.executable, "-m", "learner", *args], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    actor = subprocess.Popen(_pin(1) + [sys.executable, "-m", "actors", *args, "--actor-id", "actor-0"], env=env,
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        rc = learner.wait(timeout=3600)
        wall = time.monotonic() - t0
    finally:
        actor.terminate()
        try:
            actor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            actor.kill()
        if learner.poll() is None:
            learner.kill()
        server.stop()
        log.close()
    if rc != 0:
        raise SystemExit(f"{mode} learner exited with {rc}; see {workdir / f'{mode}.log'}")
    rows = [json.loads(line) for line in (workdir / f"bench-{mode}" / "metrics.jsonl").read_text().splitlines()]
    # Wall time of the steps after the first: start-up (model load, vLLM start) is the same in both
    # modes and is no part of the overlap being measured.
    return {"wall_s": rows[-1]["time/elapsed_s"] - rows[0]["time/elapsed_s"], "process_wall_s": wall, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    add_config_args(p)
    p.add_argument("--async-mode", default="dcmdp", choices=["dcmdp", "fixed"],
                   help="controller of the async run: dcmdp (K from the discrepancy budget) or fixed "
                        "(K = controller.k_max always: the pipeline's overlap without the throttle)")
    args = p.parse_args()
    load_config(args.config, args.overrides)  # fail fast on a bad config
    workdir = Path(tempfile.mkdtemp(prefix="dcrl-bench-async-"))
    res = {m: run_mode(m, args.steps, args.config, args.overrides, workdir, args.async_mode)
           for m in ("sync", "async")}

    # Skip the first step of each run: it includes model load and compile-like warm-up on both sides.
    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in res[mode]["rows"][1:])

    for rows in (res["sync"]["rows"], res["async"]["rows"]):
        for r in rows:
            r["time/train_s"] = r["time/step_s"] + r.get("time/publish_s", 0.0)
    t_gen, t_train = med("sync", "time/wait_for_data_s"), med("sync", "time/train_s")
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    speedup = res["sync"]["wall_s"] / res["async"]["wall_s"]
    for m in ("sync", "async"):
        toks = sum(r["tokens/generated"] for r in res[m]["rows"][1:])
        print(f"{m:5s}: wall {res[m]['wall_s']:.1f}s for steps 2..{args.steps} "
              f"(process {res[m]['process_wall_s']:.1f}s), {toks / res[m]['wall_s']:.0f} generated tokens/s trained, "
              f"median train {med(m, 'time/train_s'):.2f}s, median wait {med(m, 'time/wait_for_data_s'):.2f}s")
    a_rows = res["async"]["rows"][1:]
    print(f"async: mean staleness cap K {statistics.mean(r['staleness/max_allowed'] for r in a_rows):.2f}, "
          f"mean lag {statistics.mean(r['staleness/mean'] for r in a_rows):.2f}, steps that waited > 10 ms for data "
          f"{sum(r['time/wait_for_data_s'] > 0.01 for r in a_rows)}/{len(a_rows)}")
    print(f"sync timings: T_gen {t_gen:.2f}s  T_train {t_train:.2f}s  -> ideal speedup {ideal:.2f}")
    print(f"async speedup {speedup:.2f}  (ideal {ideal:.2f})")
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"RESULT async_speedup_vs_ideal {speedup / ideal:.3f}")


if __name__ == "__main__":
    main()
