"""Actor rules as pure functions (no vLLM): identity, GPU pick, token budgets, version spans, the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from envs.episode import EpisodeLimits, TokenLog, episode_room, turn_budget
from actors.actor import group_seed, groups_in_flight_limit, replica_index, resolve_actor_id
from actors.engine import (UNIPROC_EXECUTOR, engine_args, engine_tag, pick_gpu, sampled_logprobs, spans_to_versions,
                           visible_gpus)
from buffer.server import free_port
from configs.schema import load_config
from protocol.messages import decode_group, encode, TrajectoryGroup

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_actor_id_precedence_cli_env_honcho_default():
    env = {"DCRL_ACTOR_ID": "from-env", "PS": "actor.2"}
    assert resolve_actor_id("cli-7", env) == "cli-7"
    assert resolve_actor_id(None, env) == "from-env"
    assert resolve_actor_id(None, {"PS": "actor.2"}) == "actor-2"
    assert resolve_actor_id(None, {"HONCHO_PROCESS_NAME": "actor.3"}) == "actor-3"
    assert resolve_actor_id(None, {}) == "actor-0"


def test_honcho_scaled_actors_get_distinct_ids(tmp_path):
    # The real honcho, as `honcho start -c actor=2` runs the Procfile: each replica must get its own id.
    # (Flushed, then kept alive a moment: honcho stops the others when one exits, and a replica still starting
    # then would be killed before it printed.)
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        f"actor: {sys.executable} -c \"import os, time; from actors.actor import resolve_actor_id; "
        f"print('ID=' + resolve_actor_id(None, os.environ), flush=True); time.sleep(3)\"\n")
    honcho = Path(sys.executable).parent / "honcho"
    proc = subprocess.run([str(honcho), "start", "-f", str(procfile), "-d", str(ROOT), "-c", "actor=2"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    ids = sorted(set(re.findall(r"ID=(\S+)", proc.stdout)))
    assert ids == ["actor-1", "actor-2"], proc.stdout + proc.stderr


def test_replica_index_is_trailing_number_or_zero():
    assert replica_index("actor-3") == 3
    assert replica_index("actor-12") == 12
    assert replica_index("worker") == 0


def test_pick_gpu_uses_replica_modulo_visible_and_override():
    assert pick_gpu(0, None, ["0", "1", "2", "3"]) == "0"
    assert pick_gpu(5, None, ["0", "1", "2", "3"]) == "1"
    assert pick_gpu(3, None, ["6"]) == "6"  # a Ray replica sees exactly its own GPU
    assert pick_gpu(0, 2, ["4", "5", "6"]) == "6"
    with pytest.raises(ValueError, match="actor.gpu=3"):
        pick_gpu(0, 3, ["0", "1"])
    with pytest.raises(ValueError):
        pick_gpu(0, None, [])


def test_visible_gpus_reads_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_engine_tag_and_args_follow_config():
    cfg = load_config("tiny", ["actor.dtype=bfloat16", "actor.concurrency=12", "actor.seed=5"], env={})
    assert engine_tag("cpu", "bfloat16") == "vllm-cpu/bf16"
    assert engine_tag("cuda", "float32") == "vllm-cuda/fp32"
    assert engine_tag("cpu", "bfloat16", "int8") == "vllm-cpu/bf16+int8w"  # low-precision actor weights
    cpu = engine_args(cfg, "/m", "cpu", replica=2)
    assert cpu["logprobs_mode"] == "processed_logprobs" and cpu["enable_prefix_caching"]
    assert cpu["enforce_eager"] is True and cpu["seed"] == 7 and cpu["max_num_seqs"] == 12
    assert cpu["max_model_len"] == cfg.model.max_seq_len and "gpu_memory_utilization" not in cpu
    # actor.cpu_executor: "uni" names vLLM's in-process executor by its class (the string "uni" becomes "mp" on CPU)
    assert cpu["distributed_executor_backend"] == UNIPROC_EXECUTOR
    mp = load_config("tiny", ["actor.cpu_executor=mp"], env={})
    assert "distributed_executor_backend" not in engine_args(mp, "/m", "cpu")
    gpu = engine_args(cfg, "/m", "cuda")
    assert gpu["enforce_eager"] is False and gpu["gpu_memory_utilization"] == cfg.actor.gpu_memory_utilization
    assert "distributed_executor_backend" not in gpu


def test_turn_budget_is_min_of_turn_episode_and_context_limits():
    lim = EpisodeLimits(max_tokens_per_turn=8, max_tokens_per_episode=20, max_turns=5, max_seq_len=30)
    assert turn_budget(lim, context_len=6, prompt_len=6) == 8  # per-turn limit binds
    assert turn_budget(lim, context_len=21, prompt_len=6) == 5  # episode budget: 6 + 20 - 21
    assert turn_budget(lim, context_len=26, prompt_len=12) == 4  # model context: 30 - 26
    assert turn_budget(lim, context_len=26, prompt_len=6) == 0
    assert episode_room(lim, context_len=21, prompt_len=6) == 5
    assert episode_room(lim, context_len=21, prompt_len=12) == 9


def test_token_log_layout_masks_logprobs_versions():
    log = TokenLog()
    log.add_observation([5, 6, 7])
    log.add_turn([8, 2], [-0.5, -0.1], [0, 1])
    log.add_observation([9])
    log.add_turn([10, 2], [-1.0, -0.2], [1, 1])
    t = log.to_trajectory(reward=0.5, finish_reason="stop", prompt_len=3)
    # The trajectory must survive the wire format's validation.
    group = decode_group(encode(TrajectoryGroup(group_id="g", actor_id="a", engine="e", env="x", seed=0,
                                                trajectories=[t])), vocab_size=16, current_version=1)
    t = group.trajectories[0]
    assert t.tokens_np.tolist() == [5, 6, 7, 8, 2, 9, 10, 2]
    assert t.mask_np.tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    assert t.versions_np.tolist() == [-1, -1, -1, 0, 1, -1, 1, 1]
    np.testing.assert_allclose(t.logprobs_np, [0, 0, 0, -0.5, -0.1, 0, -1.0, -0.2], rtol=1e-6)
    assert t.turn_starts == [3, 6] and t.prompt_len == 3 and t.reward == 0.5


def test_group_seed_differs_across_actors_sessions_and_groups():
    seeds = {group_seed(0, a, s, n) for a in ("actor-0", "actor-1") for s in ("aa", "bb") for n in range(50)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**31 for s in seeds)
    assert group_seed(0, "actor-0", "aa", 3) == group_seed(0, "actor-0", "aa", 3)


def test_groups_in_flight_limit_keeps_half_again_as_many_spare_groups_and_at_least_two():
    assert groups_in_flight_limit(32, 8) == 6
    assert groups_in_flight_limit(12, 8) == 4
    assert groups_in_flight_limit(4, 8) == 3
    assert groups_in_flight_limit(64, 8) == 12
    assert groups_in_flight_limit(100, 8) == 13 + 7


def test_spans_to_versions_tiles_or_raises():
    span = lambda v, s, e: SimpleNamespace(version=v, start=s, end=e)  # noqa: E731 - vLLM's WeightVersionSpan
    assert spans_to_versions([span("3", 0, 2), span("4", 2, 5)], 5).tolist() == [3, 3, 4, 4, 4]
    assert spans_to_versions(None, 0).tolist() == []
    with pytest.raises(RuntimeError, match="no weight-version spans"):
        spans_to_versions(None, 3)
    with pytest.raises(RuntimeError, match="cover 2 of 3"):
        spans_to_versions([span("0", 0, 2)], 3)
    with pytest.raises(RuntimeError, match="tile"):
        spans_to_versions([span("0", 0, 1), span("1", 2, 3)], 3)


def test_actor_cli_help_is_fast_and_imports_no_engine():
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "actors", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0 and "--actor-id" in out.stdout
    assert elapsed < 2.0, f"--help took {elapsed:.2f}s"
    probe = subprocess.run([sys.executable, "-c", "import sys, actors.__main__, actors.actor, actors.engine, "
                            "actors.weight_sync, envs.episode, tiny.build; print(sorted(m for m in ('torch', 'vllm', 'transformers') "
                            "if m in sys.modules))"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stderr


@pytest.mark.parametrize("override, culprit", [("env.name=nope", "'nope'"),
                                               ("env.kwargs={digits=2, colour=1}", "colour")])
def test_actor_cli_bad_env_fails_before_redis_model_or_vllm(override, culprit):
    env = {**os.environ, "DCRL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "actors", "--set", override], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 2 and "env.name / env.kwargs" in out.stderr and culprit in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert time.monotonic() - t0 < 10  # not after a 30 s Redis timeout or a vLLM start


def test_actor_cli_bad_config_names_field():
    out = subprocess.run([sys.executable, "-m", "actors", "--set", "actor.concurrency=0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "actor.concurrency" in out.stderr


def test_next_optional_load_keeps_reloads_within_the_budget():
    """actor.reload_budget: after a reload of r seconds, optional reloads wait r (1 - b) / b, so reloads take at
    most the fraction b of the actor's time; b = 1 reloads every version at once."""
    from actors.weight_sync import next_optional_load

    assert next_optional_load(100.0, 0.02, 1.0) == 100.0
    assert next_optional_load(100.0, 0.02, 0.2) == pytest.approx(100.08)
    # One reload per (r + wait): the time share spent reloading is exactly the budget.
    r, b = 0.05, 0.15
    assert r / (r + next_optional_load(0.0, r, b)) == pytest.approx(b)


def test_weights_behind_cap_only_past_the_staleness_cap():
    from actors.weight_sync import weights_behind_cap

    assert weights_behind_cap(engine_version=2, learner_version=3, max_staleness=0)
    assert not weights_behind_cap(engine_version=3, learner_version=3, max_staleness=0)
    assert not weights_behind_cap(engine_version=1, learner_version=3, max_staleness=2)
    assert weights_behind_cap(engine_version=0, learner_version=3, max_staleness=2)


def test_sampled_logprobs_reads_vllms_flat_form():
    from vllm.logprobs import FlatLogprobs, Logprob

    ids = [5, 9, 5, 2]
    values = [-0.5, -1.25, -0.0, -3.0]
    per_position = [{t: Logprob(logprob=v, rank=1, decoded_token=None)} for t, v in zip(ids, values)]
    flat = FlatLogprobs()
    for pos in per_position:
        flat.append(pos)
    # the flat form agrees with the per-position dicts it replaces
    assert sampled_logprobs(ids, flat) == [float(pos[t].logprob) for t, pos in zip(ids, per_position)] == values
    with pytest.raises(RuntimeError, match="other than the 4 sampled"):
        sampled_logprobs([5, 9, 5, 3], flat)


def test_cpu_bf16_is_emulated_reads_the_cpu_flags():
    from actors.engine import cpu_bf16_is_emulated
    avx2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
    assert cpu_bf16_is_emulated(avx2)
    assert not cpu_bf16_is_emulated(avx2.replace("fma", "fma avx512f avx512_bf16"))
    assert not cpu_bf16_is_emulated(avx2.replace("fma", "fma amx_bf16 amx_tile"))
    assert not cpu_bf16_is_emulated("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # no x86 flags line
    assert not cpu_bf16_is_emulated("")
    # this machine's answer agrees with its own flags
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cpu_bf16_is_emulated() == cpu_bf16_is_emulated(flags)


def test_the_engine_start_warns_of_bf16_only_on_a_cpu_that_emulates_it():
    from actors.engine import dtype_warning
    avx2 = "flags\t\t: fpu sse sse2 avx avx2 fma\n"
    native = avx2.replace("fma", "fma avx512f avx512_bf16")
    assert "actor.dtype = bfloat16" in dtype_warning("bfloat16", "cpu", avx2)
    assert "actor.dtype = float32" in dtype_warning("bfloat16", "cpu", avx2)
    assert dtype_warning("float32", "cpu", avx2) is None
    assert dtype_warning("bfloat16", "cpu", native) is None
    assert dtype_warning("bfloat16", "cuda", avx2) is None
