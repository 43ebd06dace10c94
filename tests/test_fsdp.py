"""The learner over N ranks (``learner.world_size``, ``learner.distributed``): FSDP2 with real gloo ranks on
127.0.0.1, checked step by step against the one-process learner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from buffer.server import free_port
from configs.schema import ConfigError, load_config
from learner.metrics import read_metrics
from test_learner import TINY, data_model, make_groups, push, stream_state  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- pure pieces


def test_row_range_covers_every_row_once_with_sizes_within_one():
    from learner.distributed import row_range

    for n_rows in range(0, 12):
        for world in range(1, 5):
            ranges = [row_range(n_rows, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n_rows
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_world_size_must_be_positive_and_names_the_field():
    assert load_config("tiny", ["learner.world_size=2"], env={}).learner.world_size == 2
    assert load_config("tiny", env={}).learner.world_size == 1
    with pytest.raises(ConfigError, match=r"learner\.world_size"):
        load_config("tiny", ["learner.world_size=0"], env={})


def test_optimizer_state_by_name_and_by_number_round_trip(random_tiny_dir):
    """The checkpoint layout of a sharded learner: the name-keyed full optimizer state, numbered in param-group
    order, is exactly ``optimizer.state_dict()`` of the unsharded model, and numbering back gives the names."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.distributed import named_optimizer_state, numbered_optimizer_state

    model = AutoModelForCausalLM.from_pretrained(str(random_tiny_dir), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.square().mean().backward()
    opt.step()
    numbered = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    by_name = named_optimizer_state(numbered, names)
    assert set(by_name["state"]) == set(names) and by_name["param_groups"][0]["params"] == names
    emb = names.index("model.embed_tokens.weight")
    assert torch.equal(by_name["state"]["model.embed_tokens.weight"]["exp_avg"], numbered["state"][emb]["exp_avg"])
    back = numbered_optimizer_state(by_name)
    assert back["param_groups"] == numbered["param_groups"]
    assert back["state"].keys() == numbered["state"].keys()
    with pytest.raises(ValueError, match="covers"):
        named_optimizer_state(numbered, names[:-1])


def test_memory_options_are_checked_against_the_world_size():
    ok = load_config("tiny", ["learner.world_size=2", "learner.compute_dtype=bfloat16",
                              "learner.activation_checkpointing=true"], env={})
    assert ok.learner.compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"learner\.compute_dtype"):
        load_config("tiny", ["learner.compute_dtype=bfloat16"], env={})
    with pytest.raises(ConfigError, match=r"learner\.cpu_offload"):
        load_config("tiny", ["learner.world_size=2", "learner.cpu_offload=true"], env={})  # tiny: device cpu


def test_activation_checkpointing_leaves_the_step_unchanged(tmp_path, random_tiny_dir, data_model):
    """Recomputing layer activations in the backward gives the same gradient and loss (one process)."""
    import torch

    from learner.controller import DCMDPController
    from learner.trainer import Learner, build_policy, pick_device

    groups = make_groups(data_model, 2, group_size=4, versions=(0, 1), seed=4)
    grads, losses = [], []
    for ac in ("false", "true"):
        cfg = load_config("tiny", [f"model.path={random_tiny_dir}", *TINY, "learner.micro_batch=3",
                                   f"learner.activation_checkpointing={ac}"], env={})
        model, optimizer = build_policy(cfg, random_tiny_dir, pick_device("cpu"), None)
        assert model.is_gradient_checkpointing == (ac == "true")
        learner = Learner(cfg, model=model, optimizer=optimizer, controller=DCMDPController(cfg.controller),
                          reader=None, control=None, publisher=None, metrics=None, run_dir=tmp_path,
                          device=pick_device("cpu"), version=1)
        losses.append(learner.train_step(groups).row["loss"])
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)
    for k, g in grads[0].items():
        assert torch.allclose(g, grads[1][k], rtol=1e-5, atol=1e-8), k


# ---------------------------------------------------------------- end to end, against one process


def start_learner(overrides: list[str]) -> subprocess.Popen:
    """``python -m learner`` of this checkout (first on PYTHONPATH), output captured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCRL_") or k == "DCRL_TEST_SESSION"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "learner", "--config", "tiny", "--log-level", "WARNING"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_learner(overrides: list[str], timeout: float = 300) -> tuple[int, str, int]:
    """(exit status, stderr, pid) of one learner run."""
    p = start_learner(overrides)
    try:
        _, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err, p.pid


def ranks_of(rank0_pid: int) -> list[int]:
    """Pids of the live ranks 1..N-1 that rank 0 ``rank0_pid`` started (their command line names its
    rendezvous directory)."""
    from learner.distributed import RENDEZVOUS_PREFIX

    found = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if f"{RENDEZVOUS_PREFIX}{rank0_pid}-" in cmd and "learner.distributed" in cmd and state != "Z":
            found.append(int(d.name))
    return found


def reference_step(cfg, model_dir, ckpt_dir, groups, version: int):
    """The world_size 1 step from checkpoint ``ckpt_dir`` (None: the initial model) on ``groups`` at policy
    version ``version``, in this process: (model, optimizer, metrics row)."""
    from learner.checkpoint import load_checkpoint
    from learner.controller import DCMDPController
    from learner.trainer import Learner, build_policy, pick_device

    ckpt = None if ckpt_dir is None else load_checkpoint(ckpt_dir)
    model, optimizer = build_policy(cfg, model_dir, pick_device("cpu"), ckpt)
    controller = DCMDPController(cfg.controller)
    if ckpt is not None:
        controller.load_state_dict(ckpt.state["controller"])
    learner = Learner(cfg, model=model, optimizer=optimizer, controller=controller, reader=None, control=None,
                      publisher=None, metrics=None, run_dir=Path("."), device=pick_device("cpu"),
                      version=version)
    row = learner.train_step(groups).row
    return model, optimizer, row


def compare_with_checkpoint(model, optimizer, ckpt_dir) -> tuple[float, float]:
    """(max |weight difference|, max |AdamW second-moment difference|) between live objects and a checkpoint."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(ckpt_dir / "model.safetensors"))
    live = model.state_dict()
    assert saved.keys() <= live.keys() and len(saved) >= len(live) - 1  # tied head stored once
    w_diff = max(float((saved[k] - live[k]).abs().max()) for k in saved)
    saved_opt = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)["optimizer"]
    live_opt = optimizer.state_dict()
    assert saved_opt["param_groups"] == live_opt["param_groups"]
    assert saved_opt["state"].keys() == live_opt["state"].keys()
    m_diff = max(float((saved_opt["state"][i]["exp_avg_sq"] - s["exp_avg_sq"]).abs().max())
                 for i, s in live_opt["state"].items())
    steps = {int(s["step"]) for s in saved_opt["state"].values()}
    assert steps == {int(s["step"]) for s in live_opt["state"].values()}
    return w_diff, m_diff


@pytest.mark.slow  # four learner runs, three of them with two ranks (~70 s on 2 cores)
def test_two_ranks_train_like_one_survive_a_kill_and_resume_across_world_sizes(tmp_path, redis_url, random_tiny_dir,
                                                                               data_model):
    """One run of four steps in four pieces, every step checkpointed:

    1. world_size 2, SIGKILL of rank 0 right after step 2, before its checkpoint: rank 1 must not outlive it;
    2. world_size 1 resumes the two-rank checkpoint and retrains step 2's entries;
    3. world_size 2 (activation checkpointing on; every rank loads the model, ``learner.meta_init`` off)
       resumes the one-rank checkpoint: step 3 (the other two-rank runs build rank 1's model on the meta device);
    4. world_size 2 with bf16 compute over fp32 master weights: step 4.

    Each checkpoint must equal, within fp32 tolerance (step 4: bf16's), the one-process step from the previous
    checkpoint on the same groups (weights, AdamW state, loss, discrepancy, gradient norm), and the buffer
    bookkeeping must be that of one learner: every entry trained exactly once, acked after its checkpoint."""
    import time

    import torch

    from learner.checkpoint import list_checkpoints

    overrides = [
        f"run.root={tmp_path / 'runs'}", "run.name=fsdp", f"redis.url={redis_url}", "redis.prefix=fsdp",
        f"model.path={random_tiny_dir}", *TINY,
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
        "learner.wandb_mode=disabled", "learner.progress=false", "learner.batch_groups=2", "learner.micro_batch=64",
        "learner.checkpoint_every=1", "learner.keep_checkpoints=10", "learner.lr=1e-3",
    ]
    cfg = load_config("tiny", overrides, env={})
    groups = make_groups(data_model, 8, group_size=4, versions=(0,), seed=11, tag="fsdp")
    ids = push(cfg, groups)
    by_id = dict(zip(ids, groups))

    rc, err, pid = run_learner([*overrides, "learner.world_size=2", "learner.steps=3", "learner.crash_after_step=2"])
    assert rc == -9, err[-4000:]
    deadline = time.monotonic() + 15
    while left := ranks_of(pid):
        assert time.monotonic() < deadline, f"rank 1 (pid {left}) outlived rank 0"
        time.sleep(0.2)
    assert [p.name for p in list_checkpoints(cfg.run.dir)] == ["step_000001"]
    assert stream_state(cfg) == (6, 2)  # step 1 acked; step 2's entries pending; four never read

    for world, steps, extra in [(1, 2, []), (2, 3, ["learner.activation_checkpointing=true", "learner.meta_init=false"]),
                                (2, 4, ["learner.compute_dtype=bfloat16"])]:
        rc, err, _ = run_learner([*overrides, f"learner.world_size={world}", f"learner.steps={steps}", *extra])
        assert rc == 0, err[-4000:]

    ckpts = list_checkpoints(cfg.run.dir)
    assert [p.name for p in ckpts] == ["step_000001", "step_000002", "step_000003", "step_000004"]
    states = [json.loads((p / "state.json").read_text()) for p in ckpts]
    assert sorted(i for s in states for i in s["trained_ids"]) == sorted(ids), "an entry was lost or trained twice"
    assert stream_state(cfg) == (0, 0)
    rows = read_metrics(cfg.run.dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # the killed run's step-2 row was replaced

    # The two-rank publish (weights gathered on rank 0) is the one-rank file: the state in the actors' dtype,
    # the tied head written out explicitly.
    from safetensors.torch import load_file

    from weights.fileserver import version_dir

    # one layout whatever the world size that wrote the checkpoint (ckpt 2: one rank; the others: two)
    assert len({frozenset(load_file(str(p / "model.safetensors"))) for p in ckpts}) == 1
    assert [s["version"] for s in states] == [1, 3, 4, 5]  # the killed run had published version 2
    published = load_file(str(version_dir(cfg.run.dir, states[-1]["version"]) / "model.safetensors"))
    final = load_file(str(ckpts[-1] / "model.safetensors"))
    wire = getattr(torch, cfg.actor.dtype)
    head = final.get("lm_head.weight", final.get("model.embed_tokens.weight"))
    assert published.keys() == final.keys() | {"lm_head.weight", "model.embed_tokens.weight"}
    assert torch.equal(published["lm_head.weight"], head.to(wire))
    assert all(torch.equal(published[k], t.to(wire)) for k, t in final.items())

    figures = []
    for k, ckpt in enumerate(ckpts):
        prev = None if k == 0 else ckpts[k - 1]
        step_groups = [by_id[i] for i in states[k]["trained_ids"]]
        # the version the run trained this step at (after the kill: Redis's, ahead of the checkpoint's)
        model, optimizer, ref = reference_step(cfg, random_tiny_dir, prev, step_groups, states[k]["version"] - 1)
        w_diff, v_diff = compare_with_checkpoint(model, optimizer, ckpt)
        assert rows[k]["tokens/generated"] == ref["tokens/generated"]
        assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
        figures.append({
            "step": k + 1, "world_size": [2, 1, 2, 2][k], "loss": ref["loss"],
            "loss_diff": abs(rows[k]["loss"] - ref["loss"]),
            "discrepancy_rel_diff": abs(rows[k]["discrepancy/total"] / ref["discrepancy/total"] - 1),
            "grad_norm_rel_diff": abs(rows[k]["grad_norm"] / ref["grad_norm"] - 1),
            "max_weight_diff": w_diff, "max_adam_v_diff": v_diff, "step_s": rows[k]["time/step_s"],
            "ref_step_s": ref["time/step_s"]})
    print("\nworld_size 2 vs 1, per step:", json.dumps(figures, indent=1))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    lr = cfg.learner.lr
    for f in figures[:3]:
        assert f["loss_diff"] <= 1e-6 and f["discrepancy_rel_diff"] <= 1e-5 and f["grad_norm_rel_diff"] <= 1e-5, f
        # AdamW moves each weight by about lr * m / sqrt(v), which turns the rounding differences of a gradient
        # entry near zero into a difference of up to a good fraction of lr; a wrong gradient (a missing rank's
        # rows, a mean instead of a sum over ranks) moves many weights by the whole lr.
        assert f["max_weight_diff"] <= 0.05 * lr and f["max_adam_v_diff"] <= 1e-9, f
    bf16 = figures[3]
    assert bf16["loss_diff"] <= 0.05 * abs(bf16["loss"]) + 1e-3 and bf16["grad_norm_rel_diff"] <= 0.1, bf16


# ---------------------------------------------------------------- sharded checkpoints (learner.checkpoint_format)


def test_checkpoint_format_must_be_full_or_sharded_and_names_the_field():
    assert load_config("tiny", env={}).learner.checkpoint_format == "full"
    assert load_config("tiny", ["learner.checkpoint_format=sharded"], env={}).learner.checkpoint_format == "sharded"
    with pytest.raises(ConfigError, match=r"learner\.checkpoint_format"):
        load_config("tiny", ["learner.checkpoint_format=dcp"], env={})


def restored(cfg, model_dir, ckpt_dir):
    """An unsharded model and AdamW restored in this process from checkpoint ``ckpt_dir`` (either format)."""
    from learner.checkpoint import load_checkpoint
    from learner.trainer import build_policy, pick_device

    return build_policy(cfg, model_dir, pick_device("cpu"), load_checkpoint(ckpt_dir))


def max_differences(model, optimizer, other_model, other_optimizer) -> tuple[float, float]:
    """(max |weight difference|, max |AdamW second-moment difference|) of two unsharded learners; their
    parameter names, optimizer hyperparameters and step counts must agree."""
    a, b = model.state_dict(), other_model.state_dict()
    assert a.keys() == b.keys()
    w_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    sa, sb = optimizer.state_dict(), other_optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    assert [int(s["step"]) for s in sa["state"].values()] == [int(sb["state"][i]["step"]) for i in sa["state"]]
    v_diff = max(float((s["exp_avg_sq"] - sb["state"][i]["exp_avg_sq"]).abs().max()) for i, s in sa["state"].items())
    return w_diff, v_diff


def shard_files(ckpt_dir: Path) -> dict[str, int]:
    """Name -> size of the files of a sharded checkpoint's DCP directory."""
    from learner.checkpoint import SHARDS_DIR

    return {p.name: p.stat().st_size for p in (ckpt_dir / SHARDS_DIR).iterdir()}


def test_sharded_checkpoint_of_one_process_restores_like_a_full_one(tmp_path, random_tiny_dir, data_model):
    """World size 1, no process group: after an AdamW step, a sharded checkpoint restores exactly the state a
    full one does; old ones are pruned; an unknown format or a missing file is a clear error."""
    import torch

    from learner import checkpoint as ckpt_io
    from learner.controller import DCMDPController
    from learner.trainer import Learner, build_policy, pick_device

    cfg = load_config("tiny", [f"model.path={random_tiny_dir}", *TINY, "learner.lr=1e-3"], env={})
    model, optimizer = build_policy(cfg, random_tiny_dir, pick_device("cpu"), None)
    learner = Learner(cfg, model=model, optimizer=optimizer, controller=DCMDPController(cfg.controller),
                      reader=None, control=None, publisher=None, metrics=None, run_dir=tmp_path,
                      device=pick_device("cpu"), version=1)
    learner.train_step(make_groups(data_model, 2, group_size=4, versions=(0, 1), seed=5))
    full = ckpt_io.save_checkpoint(tmp_path / "full", 1, model=model, optimizer=optimizer, state={"version": 2})
    sharded = None
    for step in (1, 2, 3):
        sharded = ckpt_io.save_checkpoint(tmp_path / "sharded", step, model=ckpt_io.ShardedState(model, optimizer),
                                          optimizer=None, state={"version": 2}, keep=2)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "sharded")] == ["step_000002", "step_000003"]
    assert sorted(p.name for p in sharded.iterdir()) == ["rng.pt", "shards", "state.json"]
    assert sorted(shard_files(sharded)) == [".metadata", "__0_0.distcp"]
    assert ckpt_io.load_latest(tmp_path / "sharded").format == "sharded"
    assert ckpt_io.load_checkpoint(full).format == "full"

    from_full = restored(cfg, random_tiny_dir, full)
    from_shards = restored(cfg, random_tiny_dir, sharded)
    assert max_differences(*from_full, *from_shards) == (0.0, 0.0)
    assert max_differences(model, optimizer, *from_shards) == (0.0, 0.0)
    assert from_shards[0].lm_head.weight is from_shards[0].model.embed_tokens.weight  # still tied
    assert isinstance(from_shards[1].param_groups[0]["betas"], tuple)  # as AdamW makes it, not DCP's list
    assert torch.equal(torch.get_rng_state(), torch.load(sharded / "rng.pt", weights_only=True)["torch_rng"])

    state = json.loads((sharded / "state.json").read_text())
    (sharded / "state.json").write_text(json.dumps({**state, "format": "zarr"}))
    with pytest.raises(RuntimeError, match="format 'zarr'; this learner reads 'full' and 'sharded'"):
        restored(cfg, random_tiny_dir, sharded)
    (sharded / "state.json").write_text(json.dumps(state))
    (sharded / "shards" / ".metadata").unlink()
    with pytest.raises(RuntimeError, match=r"lacks shards/\.metadata"):
        restored(cfg, random_tiny_dir, sharded)


def sharded_overrides(tmp_path, redis_url, random_tiny_dir, name: str) -> list[str]:
    return [
        f"run.root={tmp_path / 'runs'}", f"run.name={name}", f"redis.url={redis_url}", f"redis.prefix={name}",
        f"model.path={random_tiny_dir}", *TINY,
        f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}", f"learner.zmq_files=tcp://127.0.0.1:{free_port()}",
        "learner.wandb_mode=disabled", "learner.progress=false", "learner.batch_groups=2", "learner.micro_batch=64",
        "learner.checkpoint_every=1", "learner.lr=1e-3", "learner.checkpoint_format=sharded",
    ]


@pytest.mark.slow  # one learner run with two ranks (~20 s on 2 cores)
def test_sharded_checkpoint_holds_per_rank_shards_and_no_gathered_weights(tmp_path, redis_url, random_tiny_dir,
                                                                          data_model):
    """World size 2, sharded format, three steps keeping one checkpoint: the checkpoint holds one DCP file per
    rank, each with about half the state (no rank wrote it all), and no full weight or optimizer file; older
    checkpoints and temporary directories are gone, and every entry is acked once its checkpoint is written."""
    from learner.checkpoint import checkpoint_root, list_checkpoints

    overrides = [*sharded_overrides(tmp_path, redis_url, random_tiny_dir, "shardfiles"), "learner.keep_checkpoints=1"]
    cfg = load_config("tiny", overrides, env={})
    push(cfg, make_groups(data_model, 6, group_size=4, versions=(0,), seed=12, tag="shardfiles"))
    rc, err, _ = run_learner([*overrides, "learner.world_size=2", "learner.steps=3"])
    assert rc == 0, err[-4000:]

    (ckpt,) = list_checkpoints(cfg.run.dir)
    assert ckpt.name == "step_000003"
    assert sorted(p.name for p in checkpoint_root(cfg.run.dir).iterdir()) == ["latest", "step_000003"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["rng.pt", "shards", "state.json"]
    files = shard_files(ckpt)
    assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    rank_bytes = [files["__0_0.distcp"], files["__1_0.distcp"]]
    assert max(rank_bytes) < 0.7 * sum(rank_bytes), rank_bytes  # each rank wrote its own half, not everything
    state = json.loads((ckpt / "state.json").read_text())
    assert state["format"] == "sharded" and state["step"] == 3 and state["trained_total"] == 6
    assert stream_state(cfg) == (0, 0)


@pytest.mark.slow  # four learner runs, three of them with two ranks (~70 s on 2 cores)
def test_sharded_checkpoints_resume_across_world_sizes_like_full_ones(tmp_path, redis_url, random_tiny_dir,
                                                                      data_model):
    """``learner.checkpoint_format = "sharded"``, one run of four steps in four pieces, every step checkpointed:
    world_size 2; 2 again (same world size); 1 (two ranks' shards read without a process group into the
    unsharded model); 2 (one process's shards resharded over two ranks).

    Each checkpoint, read into an unsharded model, must equal the one-process step from the previous
    checkpoint on the same groups (weights, AdamW state, loss, discrepancy, gradient norm) within the
    tolerances of the full-format test above, and the buffer bookkeeping must be that of one learner."""
    from torch.distributed.checkpoint import FileSystemReader

    from learner.checkpoint import SHARDS_DIR, list_checkpoints

    overrides = [*sharded_overrides(tmp_path, redis_url, random_tiny_dir, "sharded"), "learner.keep_checkpoints=10"]
    cfg = load_config("tiny", overrides, env={})
    groups = make_groups(data_model, 8, group_size=4, versions=(0,), seed=13, tag="sharded")
    ids = push(cfg, groups)
    by_id = dict(zip(ids, groups))
    worlds = [2, 2, 1, 2]
    for steps, world in enumerate(worlds, start=1):
        rc, err, _ = run_learner([*overrides, f"learner.world_size={world}", f"learner.steps={steps}"])
        assert rc == 0, err[-4000:]

    ckpts = list_checkpoints(cfg.run.dir)
    assert [p.name for p in ckpts] == ["step_000001", "step_000002", "step_000003", "step_000004"]
    states = [json.loads((p / "state.json").read_text()) for p in ckpts]
    assert {s["format"] for s in states} == {"sharded"}
    assert [sorted(f for f in shard_files(p) if f.endswith(".distcp")) for p in ckpts] == [
        ["__0_0.distcp", "__1_0.distcp"] if w == 2 else ["__0_0.distcp"] for w in worlds]
    # one global layout (names and shapes), whatever the world size that wrote it
    layouts = [{k: getattr(m, "size", None) for k, m in
                FileSystemReader(p / SHARDS_DIR).read_metadata().state_dict_metadata.items()} for p in ckpts]
    assert all(layout == layouts[0] for layout in layouts)
    assert not any((p / "model.safetensors").exists() or (p / "optimizer.pt").exists() for p in ckpts)
    assert sorted(i for s in states for i in s["trained_ids"]) == sorted(ids), "an entry was lost or trained twice"
    assert stream_state(cfg) == (0, 0)
    rows = read_metrics(cfg.run.dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]

    figures = []
    for k, ckpt in enumerate(ckpts):
        prev = None if k == 0 else ckpts[k - 1]
        step_groups = [by_id[i] for i in states[k]["trained_ids"]]
        model, optimizer, ref = reference_step(cfg, random_tiny_dir, prev, step_groups, states[k]["version"] - 1)
        w_diff, v_diff = max_differences(model, optimizer, *restored(cfg, random_tiny_dir, ckpt))
        assert rows[k]["tokens/generated"] == ref["tokens/generated"]
        figures.append({
            "step": k + 1, "world_size": worlds[k], "loss_diff": abs(rows[k]["loss"] - ref["loss"]),
            "discrepancy_rel_diff": abs(rows[k]["discrepancy/total"] / ref["discrepancy/total"] - 1),
            "grad_norm_rel_diff": abs(rows[k]["grad_norm"] / ref["grad_norm"] - 1),
            "max_weight_diff": w_diff, "max_adam_v_diff": v_diff})
    print("\nsharded checkpoints, world size of each step vs one process:", json.dumps(figures, indent=1))
    lr = cfg.learner.lr
    for f in figures:
        assert f["loss_diff"] <= 1e-6 and f["discrepancy_rel_diff"] <= 1e-5 and f["grad_norm_rel_diff"] <= 1e-5, f
        assert f["max_weight_diff"] <= 0.05 * lr and f["max_adam_v_diff"] <= 1e-9, f
