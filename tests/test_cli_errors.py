"""Expected failures of the entry points, run as a user runs them: one short ``error:`` line naming the setting
to change, exit status 2, no traceback (unless ``--debug`` / ``DCRL_DEBUG=1``), and quickly.

Every Redis here is a real redis-server on 127.0.0.1 (or a closed port there); the commands run as subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from buffer.server import free_port, start_redis

ROOT = Path(__file__).resolve().parents[1]
# A developer's DCRL_* variables (.env: Redis URL and password, DCRL_SET, DCRL_DEBUG) must not reach these runs.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("DCRL_")}
COMMANDS = {"learner": ["learner"], "actors": ["actors"], "buffer": ["buffer", "stats"]}


def run_all(commands: dict[str, list[str]], *args: str, env: dict | None = None) -> dict[str, tuple[int, str, float]]:
    """Run ``python -m <command> <args>`` for every command at once (most of their time is a wait on a socket);
    returns name -> (exit status, stderr, seconds)."""
    t0 = time.monotonic()
    procs = {name: subprocess.Popen([sys.executable, "-m", *cmd, *args], cwd=ROOT, env=env or CLEAN_ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    out = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=60)
        out[name] = (p.returncode, err, time.monotonic() - t0)
    return out


def assert_one_error_line(name: str, rc: int, stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert rc == 2, f"{name}: exit {rc}\n{stderr}"
    assert "Traceback" not in stderr and len(lines) <= 3, f"{name}:\n{stderr}"
    error = [line for line in lines if line.startswith("error: ")]
    assert len(error) == 1, f"{name}:\n{stderr}"
    for f in fragments:
        assert f in stderr, f"{name}: {f!r} not in\n{stderr}"


@pytest.fixture
def redis_with_password(tmp_path):
    server = start_redis(tmp_path / "redis-pw", password="the-right-one")
    yield server
    server.stop()


def test_unreachable_redis_fails_within_the_default_wait_naming_redis_url():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    for name, (rc, err, seconds) in run_all(COMMANDS, "--set", f"redis.url={url}").items():
        assert_one_error_line(name, rc, err, "unreachable", url, "redis.url / DCRL_REDIS_URL",
                              "redis.connect_timeout_s")
        assert seconds < 15, f"{name} took {seconds:.1f} s"


def test_refused_password_fails_at_once_naming_the_password_settings(redis_with_password):
    results = run_all(COMMANDS, "--set", f"redis.url={redis_with_password.url}", "--set", "redis.password=wrong")
    for name, (rc, err, seconds) in results.items():
        assert_one_error_line(name, rc, err, "refused authentication", "redis.password", "DCRL_REDIS_PASSWORD")
        assert seconds < 15, f"{name} took {seconds:.1f} s"


def test_serve_on_a_port_in_use_names_redis_url(redis_server, tmp_path):
    data_dir = tmp_path / "never-created"
    results = run_all({"serve": ["buffer", "serve"]}, "--set", f"redis.url={redis_server.url}",
                      "--set", f"redis.data_dir={data_dir}")
    rc, err, _ = results["serve"]
    assert_one_error_line("serve", rc, err, f"127.0.0.1:{redis_server.port} is already in use",
                          "redis.url / DCRL_REDIS_URL")
    assert not data_dir.exists()  # nothing was started or written


@pytest.mark.parametrize("args, fragment", [(["--set", "learner.no_such_key=1"], "learner.no_such_key"),
                                            (["--config", "no_such_preset"], "no_such_preset")])
def test_bad_config_is_one_error(args, fragment):
    for name, (rc, err, _) in run_all(COMMANDS, *args).items():
        assert_one_error_line(name, rc, err, fragment)


def test_missing_model_directory_is_one_error_before_redis(tmp_path):
    missing = tmp_path / "no-model-here"
    commands = {"learner": ["learner"], "actors": ["actors"], "tiny": ["tiny"]}
    closed = f"redis://127.0.0.1:{free_port()}/0"  # checked after the model, so never waited for
    results = run_all(commands, "--set", "model.build_tiny=false", "--set", f"model.path={missing}",
                      "--set", f"redis.url={closed}")
    for name, (rc, err, seconds) in results.items():
        assert_one_error_line(name, rc, err, f"model.path {missing}: no such directory", "model.build_tiny")
        assert seconds < 15


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_an_expected_failure(how, redis_with_password):
    args = ["--set", f"redis.url={redis_with_password.url}", "--set", "redis.password=wrong"]
    env = CLEAN_ENV
    if how == "flag":
        args.append("--debug")
    else:
        env = {**CLEAN_ENV, "DCRL_DEBUG": "1"}
    for name, (rc, err, _) in run_all(COMMANDS, *args, env=env).items():
        assert rc == 2 and "Traceback" in err and "RedisAuthError" in err, f"{name}:\n{err}"
        assert err.strip().splitlines()[-1].startswith("error: Redis at"), f"{name}:\n{err}"
