"""What the benchmarks share: one bounded dcrl job (redis + learner + actors as real processes), its metrics,
and the moving-mean "time to reward" measure.

Not a package module: benchmark scripts import it as ``from common import ...`` (``bench/`` is on sys.path
when a script in it runs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from buffer.server import free_port, start_redis  # noqa: E402
from learner.metrics import moving_mean  # noqa: E402,F401 - re-exported for the benchmarks


def pin(core: int | None) -> list[str]:
    """``taskset -c core`` where it exists and the machine has more than one core; nothing otherwise."""
    if core is None or not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        return []
    return ["taskset", "-c", str(core % (os.cpu_count() or 1))]


@dataclass
class JobResult:
    rows: list[dict]  # metrics.jsonl rows of the learner, one per step
    process_wall_s: float  # launch of the processes to the learner's exit
    log: Path


def run_job(name: str, config: str, overrides: list[str], workdir: Path, *, actors: int = 1,
            pin_cores: bool = True, timeout_s: float = 3600.0) -> JobResult:
    """Run one bounded job like ``make run`` does (fresh redis-server, learner, ``actors`` actor processes)
    and return the learner's metrics. With ``pin_cores`` the learner runs on core 0 and actor i on core i+1
    (mod the core count), so that their timings do not depend on the scheduler's mood."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = start_redis(workdir / f"redis-{name}")
    sets = overrides + [
        f"run.name={name}", f"run.root={workdir}",
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
        f"actor.weights_cache_dir={workdir / f'actor-weights-{name}'}",
        "learner.progress=false", "learner.wandb_mode=disabled",
    ]
    args = ["--config", config] + [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "DCRL_REDIS_URL": server.url, "PYTHONUNBUFFERED": "1"}
    log_path = workdir / f"{name}.log"
    log = open(log_path, "w")
    t0 = time.monotonic()
    learner = subprocess.Popen(pin(0 if pin_cores else None) + [sys.executable, "-m", "learner", "--fresh", *args],
                               env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    procs = [subprocess.Popen(pin(i + 1 if pin_cores else None)
                              + [sys.executable, "-m", "actors", *args, "--actor-id", f"actor-{i}"],
                              env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT) for i in range(actors)]
    try:
        rc = learner.wait(timeout=timeout_s)
        wall = time.monotonic() - t0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if learner.poll() is None:
            learner.kill()
            learner.wait()
        server.stop()
        log.close()
    if rc != 0:
        raise SystemExit(f"{name}: learner exited with {rc}; see {log_path}")
    metrics = workdir / name / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return JobResult(rows=rows, process_wall_s=wall, log=log_path)


def time_to_reward(times: list[float], rewards: list[float], target: float, window: int) -> float | None:
    """The first time at which the mean reward of the last ``window`` steps reaches ``target`` (only once a
    full window exists), or None if it never does."""
    for i, m in enumerate(moving_mean(rewards, window)):
        if i + 1 >= window and m >= target:
            return times[i]
    return None
