"""Run one dcrl job on a Ray cluster: the learner and N actor replicas as Ray actors.

    python -m actors.ray_launcher --config configs/qwen3_8b.toml --num-actors 7
    python -m actors.ray_launcher --config tiny --num-actors 2 --start-redis     # one machine, CPU

Each role runs the same command line as under honcho (``python -m learner`` / ``python -m actors``) as
the child process of a Ray actor that holds its resources (``ray.num_gpus_per_actor`` GPUs per actor
replica, ``ray.num_gpus_learner`` for the learner). The child dies with its Ray worker (PDEATHSIG; an actor's
supervisor then stops the actor and its vLLM processes, see actors/supervisor.py), and Ray restarts a crashed
replica (``ray.max_restarts``; the actors run with ``actor.max_restarts=0``, so that Ray is the one to restart
them); the new replica keeps its actor id, gives back the
admission slots its predecessor held, and loads the latest published weights from the control hash
before it generates. The data plane is Redis at ``redis.url`` (or ``DCRL_REDIS_URL``); with
``--start-redis`` the launcher runs a loopback redis-server itself. The job ends when the learner exits.

On one machine Ray is started on 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes the
local node register the loopback address instead of the network interface's).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from configs import add_config_args, config_from_args


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the Ray worker that started it dies (Linux)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class RoleProcess:
    """A Ray actor body owning one dcrl role process (learner or actor replica)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str):
        self.argv = argv
        self.log = open(log_path, "ab", buffering=0)
        self.log.write(f"[ray] starting {' '.join(argv)}\n".encode())
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)

    def pids(self) -> tuple[int, int]:
        """(Ray worker pid, role process pid)."""
        return os.getpid(), self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def role_argv(module: str, args: argparse.Namespace, extra: list[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", module, "--config", str(args.config)]
    for item in args.overrides:
        argv += ["--set", item]
    return argv + list(extra)


def learner_gpus(cfg) -> float:
    """GPUs Ray reserves for the learner: ``ray.num_gpus_learner``, raised to one per rank
    (``learner.world_size``) when the learner trains on CUDA (``learner.device = "cuda"``, or "auto" with GPUs
    asked for), so an N-rank learner is never placed on fewer."""
    lcfg = cfg.learner
    on_gpu = lcfg.device == "cuda" or (lcfg.device == "auto" and cfg.ray.num_gpus_learner > 0)
    per_rank = lcfg.world_size if on_gpu else 0
    return max(cfg.ray.num_gpus_learner, float(per_rank))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m actors.ray_launcher", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--num-actors", type=int, default=None, help="actor replicas (default: ray.num_actors)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: ray.address, else local)")
    p.add_argument("--start-redis", action="store_true", help="run a loopback redis-server for this job")
    p.add_argument("--timeout-s", type=float, default=None, help="give up (exit 1) after this long")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from buffer.server import start_redis

    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    child_env = {"PYTHONUNBUFFERED": "1"}
    redis_server = None
    if args.start_redis:
        redis_server = start_redis(run_dir / "redis", password=cfg.redis.password)
        child_env["DCRL_REDIS_URL"] = redis_server.url
        print(f"[ray] redis-server on {redis_server.url}", flush=True)
    elif os.environ.get("DCRL_REDIS_URL"):
        child_env["DCRL_REDIS_URL"] = os.environ["DCRL_REDIS_URL"]

    address = args.address or cfg.ray.address
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, 1 + (args.num_actors or cfg.ray.num_actors)),
                 include_dashboard=False, log_to_driver=False)
    n = args.num_actors or cfg.ray.num_actors
    Role = ray.remote(RoleProcess)
    gpus = learner_gpus(cfg)
    if gpus > cfg.ray.num_gpus_learner:
        print(f"[ray] reserving {gpus:g} GPUs for the learner (learner.world_size = {cfg.learner.world_size} on "
              f"{cfg.learner.device}; ray.num_gpus_learner = {cfg.ray.num_gpus_learner:g})", flush=True)
    learner = Role.options(name=f"{cfg.run.name}-learner", num_cpus=1, num_gpus=gpus,
                           max_restarts=0).remote(role_argv("learner", args), child_env,
                                                  str(run_dir / "logs" / "learner.log"))
    actors = [
        Role.options(name=f"{cfg.run.name}-actor-{i}", num_cpus=0, num_gpus=cfg.ray.num_gpus_per_actor,
                     max_restarts=cfg.ray.max_restarts, max_task_retries=-1)
        .remote(role_argv("actors", args, ["--actor-id", f"actor-{i}", "--set", "actor.max_restarts=0"]), child_env,
                str(run_dir / "logs" / f"actor-{i}.log"))
        for i in range(n)
    ]
    pids = {"learner": ray.get(learner.pids.remote())}
    pids.update({f"actor-{i}": ray.get(a.pids.remote()) for i, a in enumerate(actors)})
    # (Ray worker pid, role pid) per replica: what an operator (or the restart test) kills.
    (run_dir / "logs" / "pids.json").write_text(json.dumps(pids))
    print(f"[ray] learner + {n} actor replicas started; logs in {run_dir / 'logs'}", flush=True)
    deadline = None if args.timeout_s is None else time.monotonic() + args.timeout_s
    rc = None
    try:
        while rc is None:
            rc = ray.get(learner.wait.remote(5.0))
            if deadline is not None and time.monotonic() > deadline:
                print("[ray] timed out waiting for the learner", file=sys.stderr, flush=True)
                rc = 1
    finally:
        for a in actors:
            try:
                ray.get(a.stop.remote(), timeout=60)
            except Exception as e:  # a replica that is mid-restart cannot be stopped politely
                print(f"[ray] stopping an actor replica: {type(e).__name__}: {e}", file=sys.stderr)
        if rc is None or rc != 0:
            ray.get(learner.stop.remote(), timeout=60)
        ray.shutdown()
        if redis_server is not None:
            redis_server.stop()
    print(f"[ray] learner exited with {rc}; metrics in {run_dir / 'metrics.jsonl'}", flush=True)
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(main())
