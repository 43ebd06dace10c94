"""Checkpoints: atomic write, ``latest`` pointer, pruning, full round trip of weights/optimizer/RNG/state."""

from __future__ import annotations

import json
import random

import numpy as np

from learner.checkpoint import list_checkpoints, load_latest, save_checkpoint



def _model_and_opt(random_tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(random_tiny_dir), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train_a_bit(model, opt, steps=2):
    import torch

    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def test_checkpoint_round_trip_restores_weights_optimizer_rng_state(random_tiny_dir, tmp_path):
    import torch

    model, opt = _model_and_opt(random_tiny_dir)
    _train_a_bit(model, opt)
    torch.manual_seed(5), random.seed(6), np.random.seed(7)
    state = {"version": 9, "controller": {"lam": 0.25}, "metrics_offset": 123, "trained_ids": ["1-0", "2-0"]}
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state=state)
    expected_draws = (torch.rand(3), random.random(), np.random.rand())

    model2, opt2 = _model_and_opt(random_tiny_dir)  # fresh weights, empty optimizer, other RNG positions
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ck = load_latest(tmp_path)
    assert ck.path == path and ck.step == 2 and ck.version == 9
    assert ck.state["controller"] == {"lam": 0.25} and ck.state["trained_ids"] == ["1-0", "2-0"]
    ck.restore(model2, opt2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    # Tied embedding survives: the head is still the embedding, not a separate copy.
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert random.random() == expected_draws[1]
    assert np.random.rand() == expected_draws[2]
    # Training continues identically from the restored state (Adam moments and step count included).
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(1)
        _train_a_bit(m, o, 1)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_latest_pointer_and_pruning(random_tiny_dir, tmp_path):
    model, opt = _model_and_opt(random_tiny_dir)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, state={"version": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert load_latest(tmp_path).step == 4
    # A writer killed mid-checkpoint leaves a temp dir: ignored by load_latest, removed by the next save.
    dead = tmp_path / "checkpoints" / ".tmp-step_000005-999999"
    dead.mkdir()
    (dead / "state.json").write_text(json.dumps({"step": 5, "version": 5}))
    assert load_latest(tmp_path).step == 4
    save_checkpoint(tmp_path, 5, model=model, optimizer=opt, state={"version": 5}, keep=2)
    assert not dead.exists()
    assert load_latest(tmp_path).step == 5


def test_checkpoint_load_latest_none_for_fresh_run(tmp_path):
    assert load_latest(tmp_path) is None
