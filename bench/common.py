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


class Job:
    """One bounded job like ``make run`` (a fresh redis-server, the learner, ``actors`` actor processes), whose
    parts can be killed and restarted one by one (``bench/faults.py``). With ``pin_cores`` the learner runs
    on core 0 and actor i on core i+1 (mod the core count), so that timings do not depend on the scheduler;
    ``pin_cores="learner"`` pins the learner alone (the actors, with their vLLM engine processes, may use
    every core)."""

    def __init__(self, name: str, config: str, overrides: list[str], workdir: Path, *, actors: int = 1,
                 pin_cores: bool | str = True):
        self.name, self.workdir, self.n_actors, self.pin_cores = name, workdir, actors, pin_cores
        workdir.mkdir(parents=True, exist_ok=True)
        # A rerun starts from nothing: not from its old AOF, and not from the old run's metrics.jsonl, which
        # bench/faults.py polls for the step to inject its fault at (it read step 600 at once and struck at start).
        for old in (f"redis-{name}", name, f"actor-weights-{name}"):
            shutil.rmtree(workdir / old, ignore_errors=True)
        self.server = start_redis(workdir / f"redis-{name}")
        sets = overrides + [
            f"run.name={name}", f"run.root={workdir}",
            f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
            f"actor.weights_cache_dir={workdir / f'actor-weights-{name}'}",
            "learner.progress=false", "learner.wandb_mode=disabled",
        ]
        self.args = ["--config", config] + [x for s in sets for x in ("--set", s)]
        self.env = {**os.environ, "DCRL_REDIS_URL": self.server.url, "PYTHONUNBUFFERED": "1"}
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.run_dir = workdir / name
        self.learner: subprocess.Popen | None = None
        self.actors: list[subprocess.Popen] = []
        self.t0 = time.monotonic()

    def _spawn(self, core: int | None, argv: list[str]) -> subprocess.Popen:
        pinned = self.pin_cores is True or (self.pin_cores == "learner" and core == 0)
        return subprocess.Popen(pin(core if pinned else None) + [sys.executable, *argv], env=self.env,
                                cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def start_learner(self, fresh: bool = True) -> None:
        self.learner = self._spawn(0, ["-m", "learner", *(["--fresh"] if fresh else []), *self.args])

    def start_actors(self) -> None:
        self.actors = [self._spawn(i + 1, ["-m", "actors", *self.args, "--actor-id", f"actor-{i}"])
                       for i in range(self.n_actors)]

    def start(self) -> "Job":
        self.t0 = time.monotonic()
        self.start_learner()
        self.start_actors()
        return self

    def steps_done(self) -> int:
        """Rows in the learner's metrics.jsonl so far (its completed steps, as this run's files show them)."""
        path = self.run_dir / "metrics.jsonl"
        return path.read_text().count("\n") if path.exists() else 0

    def wait_learner(self, timeout_s: float) -> int:
        return self.learner.wait(timeout=timeout_s)

    def stop(self) -> None:
        for p in self.actors:
            if p.poll() is None:
                p.terminate()
        for p in self.actors:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.learner is not None and self.learner.poll() is None:
            self.learner.kill()
            self.learner.wait()
        self.server.stop()
        self._log.close()

    def rows(self) -> list[dict]:
        metrics = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def run_job(name: str, config: str, overrides: list[str], workdir: Path, *, actors: int = 1,
            pin_cores: bool | str = True, timeout_s: float = 3600.0) -> JobResult:
    """Run one bounded job to the learner's exit and return the learner's metrics (see :class:`Job`)."""
    job = Job(name, config, overrides, workdir, actors=actors, pin_cores=pin_cores).start()
    try:
        rc = job.wait_learner(timeout_s)
        wall = time.monotonic() - job.t0
    finally:
        job.stop()
    if rc != 0:
        raise SystemExit(f"{name}: learner exited with {rc}; see {job.log_path}")
    return JobResult(rows=job.rows(), process_wall_s=wall, log=job.log_path)


def time_to_reward(times: list[float], rewards: list[float], target: float, window: int) -> float | None:
    """The first time at which the mean reward of the last ``window`` steps reaches ``target`` (only once a
    full window exists), or None if it never does."""
    for i, m in enumerate(moving_mean(rewards, window)):
        if i + 1 >= window and m >= target:
            return times[i]
    return None
