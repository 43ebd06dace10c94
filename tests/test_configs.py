"""The typed config: every preset parses, bad values fail naming the field, env overrides win."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from configs import PRESET_DIR, ConfigError, DcrlConfig, load_config

PRESETS = sorted(PRESET_DIR.glob("*.toml"))


def test_presets_exist_for_cpu_and_gpu():
    names = {p.stem for p in PRESETS}
    assert "tiny" in names
    assert any(load_config(p).learner.device == "cuda" for p in PRESETS)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_parses(path):
    cfg = load_config(path, env={})
    assert isinstance(cfg, DcrlConfig)
    assert cfg.redis.prefix


def test_load_config_accepts_preset_name():
    assert load_config("tiny", env={}).run.name == "tiny"


@pytest.mark.parametrize(
    "override, field",
    [
        ("learner.lr=-1", "learner.lr"),
        ("actor.group_size=0", "actor.group_size"),
        ("controller.mode='magic'", "controller.mode"),
        ("controller.eta=0", "controller.eta"),
        ("learner.no_such_key=3", "learner.no_such_key"),
        ("redis.prefix='has space'", "redis.prefix"),
    ],
)
def test_bad_value_names_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override], env={})
    assert field in str(err.value)


def test_cross_field_check_names_both_fields():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["actor.max_tokens_per_turn=500", "actor.max_tokens_per_episode=100"], env={})
    assert "max_tokens_per_turn" in str(err.value)


def test_unknown_section_is_rejected(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[learnr]\nsteps = 3\n")
    with pytest.raises(ConfigError, match="learnr"):
        load_config(p, env={})


def test_invalid_toml_is_reported_with_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[learner\nsteps = 3\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(p, env={})


def test_missing_file_is_reported():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/dcrl.toml", env={})


def test_env_overrides_redis_url_and_password():
    cfg = load_config("tiny", env={"DCRL_REDIS_URL": "redis://127.0.0.1:7777/0", "DCRL_REDIS_PASSWORD": "s3"})
    assert cfg.redis.url == "redis://127.0.0.1:7777/0"
    assert cfg.redis.password == "s3"
    assert load_config("tiny", env={}).redis.prefix == "dcrl"


def test_overrides_parse_toml_values():
    cfg = load_config("tiny", ["learner.steps=7", "controller.delta=0.01", "env.name=guess_number"], env={})
    assert cfg.learner.steps == 7 and cfg.controller.delta == 0.01 and cfg.env.name == "guess_number"


@pytest.mark.parametrize("module", ["actors", "learner", "buffer"])
def test_cli_bad_config_fails_fast_naming_field(module):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module, "--config", "tiny", "--set", "learner.lr=-1"]
                          + (["stats"] if module == "buffer" else []),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "learner.lr" in proc.stderr
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("module", ["actors", "learner", "buffer"])
def test_cli_help_is_fast_and_light(module):
    # --help must not import torch or vllm: measured by the modules loaded, not by a wall-clock bound.
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['{module}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('{module}', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout
    assert "HEAVY []" in proc.stdout


def test_dcrl_set_env_overrides_below_the_command_line():
    env = {"DCRL_SET": "learner.weight_transfer=gloo learner.steps=7 'env.kwargs={hint = \"a b\"}'"}
    cfg = load_config("tiny", env=env)
    assert (cfg.learner.weight_transfer, cfg.learner.steps, cfg.env.kwargs) == ("gloo", 7, {"hint": "a b"})
    assert load_config("tiny", ["learner.steps=9"], env=env).learner.steps == 9  # --set wins
    with pytest.raises(ConfigError, match=r"with DCRL_SET\): learner.stepz"):
        load_config("tiny", env={"DCRL_SET": "learner.stepz=3"})
    with pytest.raises(ConfigError, match="DCRL_SET: No closing quotation"):
        load_config("tiny", env={"DCRL_SET": "run.name='open"})
