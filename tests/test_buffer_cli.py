"""``python -m buffer stats | dead | serve`` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from buffer import ControlPlane, GroupReader, GroupWriter, connect
from buffer.__main__ import serve_command
from buffer.server import free_port
from buffer.synthetic import synthetic_group
from configs.schema import RedisConfig
from protocol import Control

ROOT = Path(__file__).resolve().parents[1]
# The environment overrides redis.url/password over --set: keep a developer's .env out of these runs.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("DCRL_REDIS_")}


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "buffer", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=CLEAN_ENV)


def _populate(url: str) -> RedisConfig:
    """1 garbage entry, 5 valid ones; learner-0 holds 2 of them; control at version 3, K 2."""
    cfg = RedisConfig(url=url, connect_timeout_s=5.0)
    client = connect(cfg)
    client.xadd(f"{cfg.prefix}:traj", {"data": b"not msgpack"})
    client.close()
    writer = GroupWriter(cfg, "actor-0")
    rng = np.random.default_rng(0)
    for i in range(5):
        writer.send(synthetic_group(rng, f"g{i}", n_traj=2, n_tokens=16))
    assert writer.close() == 0
    reader = GroupReader(cfg, "learner-0")
    assert len(reader.receive(2, block_ms=100)) == 2
    reader.close()
    plane = ControlPlane(cfg)
    plane.write_control(Control(version=3, max_staleness=2, lam=0.5, batch_groups=4))
    for _ in range(7):
        assert plane.admit("actor-1") is not None
    plane.close()
    return cfg


def test_stats_cli_prints_stream_pending_counters_version_and_dead_letters(redis_url):
    _populate(redis_url)
    proc = run_cli("stats", "--config", "tiny", "--set", f"redis.url={redis_url}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "stream dcrl:traj: 5 entries" in out
    assert "consumer learner-0: pending 2" in out
    assert "produced 7, consumed 0, dead 1" in out
    assert "ledger: produced = consumed + queued + held: 7 = 0 + 0 + 7 ok" in out
    assert "version 3, K (max_staleness) 2" in out
    assert "capacity 24 (headroom 17)" in out  # (2 + 3 + 1) * 4 - 7
    assert "dead letters: 1 total" in out and "TrajectoryGroup" in out


def test_stats_cli_json_and_config_before_command(redis_url):
    _populate(redis_url)
    proc = run_cli("--config", "tiny", "--set", f"redis.url={redis_url}", "stats", "--json")
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["stream_len"] == 5 and st["group"]["pending"] == 2
    assert st["control"]["version"] == 3 and st["control"]["max_staleness"] == 2
    assert st["dead_count"] == 1 and st["produced"] == 7
    assert (st["consumed_admitted"], st["queued"], st["held"], st["reconciles"]) == (0, 0, 7, True)


def test_stats_cli_on_an_empty_redis(redis_url):
    proc = run_cli("stats", "--set", f"redis.url={redis_url}")
    assert proc.returncode == 0, proc.stderr
    assert "0 entries" in proc.stdout and "not created yet" in proc.stdout and "control: none yet" in proc.stdout


def test_dead_cli_lists_reasons(redis_url):
    _populate(redis_url)
    proc = run_cli("dead", "--set", f"redis.url={redis_url}", "-n", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("1 newest dead letters")
    assert "11 bytes" in lines[1] and "TrajectoryGroup" in lines[1]


def test_serve_cli_runs_loopback_redis_with_password_and_append_only_file(tmp_path):
    port = free_port()
    data_dir = tmp_path / "redis-data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "buffer", "serve", "--config", "tiny", "--set", f"redis.url=redis://127.0.0.1:{port}/0",
         "--set", "redis.password=pw", "--set", f"redis.data_dir={data_dir}"],
        cwd=ROOT, env=CLEAN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        cfg = RedisConfig(url=f"redis://127.0.0.1:{port}/0", password="pw", connect_timeout_s=10.0)
        client = connect(cfg)
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.set("k", "v")
        client.close()
        with pytest.raises(RuntimeError, match="redis.password"):
            connect(RedisConfig(url=cfg.url, connect_timeout_s=2.0))
        assert any(data_dir.rglob("*.aof")), "append-only file in redis.data_dir"
    finally:
        proc.terminate()  # exec'd: this is redis-server itself, which shuts down cleanly on SIGTERM
        proc.wait(timeout=10)
        proc.stderr.close()


class CmdlineWatcher:
    """Samples /proc/<pid>/cmdline in a tight loop from before the process execs redis-server until stopped."""

    def __init__(self, pid: int):
        self.pid, self.samples, self._stop = pid, set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.add(Path(f"/proc/{self.pid}/cmdline").read_bytes())
            except OSError:
                return

    def stop(self) -> set[bytes]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


# Quote, backslash, space, newline and non-ASCII: all must survive the trip through redis.conf quoting.
NASTY_PASSWORD = 'p@ss "w\\ord"\nwith spaces é'


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_keeps_the_password_out_of_the_command_line_and_stops_on_signal(tmp_path, sig):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {**CLEAN_ENV, "DCRL_REDIS_PASSWORD": NASTY_PASSWORD}  # as the Procfile's .env passes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "buffer", "serve", "--config", "tiny", "--set", f"redis.url={url}",
         "--set", f"redis.data_dir={tmp_path / 'redis-data'}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watcher = CmdlineWatcher(proc.pid)
    try:
        client = connect(RedisConfig(url=url, password=NASTY_PASSWORD, connect_timeout_s=10.0))
        assert client.ping()
        info = client.info("server")
        assert info["process_id"] == proc.pid  # exec'd: the pid honcho signals is redis-server's
        client.close()
        for wrong in (None, "wrong", NASTY_PASSWORD[:-1]):
            with pytest.raises(RuntimeError, match="redis.password"):
                connect(RedisConfig(url=url, password=wrong, connect_timeout_s=2.0))
        samples = watcher.stop()
        assert any(b"redis-server" in s for s in samples)
        secret = NASTY_PASSWORD.encode()
        assert not any(secret in s or b"requirepass" in s for s in samples), samples
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0  # redis-server shuts down cleanly on SIGTERM and SIGINT
    finally:
        watcher.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_serve_refuses_a_non_loopback_url():
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        serve_command(RedisConfig(url="redis://10.1.2.3:6379/0"))
    cmd, config = serve_command(RedisConfig(url="redis://localhost:6400/0", password="x", data_dir="/tmp/d"))
    assert cmd[cmd.index("--bind") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "6400"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[1] == "-" and "--requirepass" not in cmd and "x" not in cmd  # the password goes on stdin
    assert config == b'requirepass "x"\n'


def test_stats_cli_without_a_server_fails_with_one_clear_line():
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_cli("stats", "--set", f"redis.url={url}", "--set", "redis.connect_timeout_s=0.5")
    assert proc.returncode == 2
    assert "unreachable" in proc.stderr and url in proc.stderr and "Traceback" not in proc.stderr
