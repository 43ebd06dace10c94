"""Low-precision actor weights (``actor.weight_quant``): the rounding itself, and that every path an actor gets
weights from (published files, collective snapshots, its starting directory) carries the same rounding."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from configs import ConfigError, load_config
from learner.transfer import take_snapshot
from weights.format import WEIGHTS_FILE, published_tensors, write_weights
from weights.quant import FP8_E4M3_MAX, INT8_MAX, quantize_dequantize, quantized_model_dir


def test_int8_rounds_each_row_to_its_own_grid_of_255_levels():
    w = torch.randn(6, 50) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 100.0]).unsqueeze(1)
    q = quantize_dequantize(w, "int8")
    scale = w.abs().amax(dim=1, keepdim=True) / INT8_MAX
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # every value a whole number of steps
    assert levels.abs().max() <= INT8_MAX + 1e-3
    assert ((q - w).abs() <= scale / 2 + 1e-6).all()  # round to nearest
    assert q.dtype == w.dtype and not torch.equal(q, w)


def test_fp8_values_are_e4m3_numbers_times_the_row_scale():
    w = torch.randn(4, 64)
    q = quantize_dequantize(w, "fp8")
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_E4M3_MAX
    x = q / scale
    assert torch.allclose(x.to(torch.float8_e4m3fn).float(), x, rtol=1e-5, atol=1e-6)  # already on the grid
    assert ((q - w).abs() <= w.abs() / 16 + scale).all()  # 3 mantissa bits: relative error <= 2^-4


def test_vectors_integers_and_none_pass_through_unchanged():
    norm, ids, w = torch.randn(8), torch.arange(8).reshape(2, 4), torch.randn(3, 3)
    assert quantize_dequantize(norm, "int8") is norm
    assert quantize_dequantize(ids, "fp8") is ids
    assert quantize_dequantize(w, "none") is w


def test_published_file_and_snapshot_carry_the_rounding_and_the_learner_keeps_full_precision(random_tiny_dir,
                                                                                           tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_tiny_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_weights(model, tmp_path / "v1", quant="int8")
    published = load_file(str(tmp_path / "v1" / WEIGHTS_FILE))
    expected = dict(published_tensors(model, "int8"))
    assert published.keys() == expected.keys() and "lm_head.weight" in published
    for k, v in published.items():
        assert torch.equal(v, expected[k]), k
    q_proj = next(k for k in published if k.endswith("q_proj.weight"))
    assert not torch.equal(published[q_proj], before[q_proj])  # rounded ...
    norm = next(k for k in published if k.endswith("norm.weight"))
    assert torch.equal(published[norm], before[norm])  # ... but not the norms
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k}: the learner's own weights changed"
    snap = take_snapshot(model, 1, quant="int8")
    assert all(torch.equal(t, published[n]) for n, t in zip(snap.names, snap.tensors))


def test_actor_starts_from_a_rounded_copy_of_the_model_dir(random_tiny_dir, tmp_path):
    assert quantized_model_dir(random_tiny_dir, tmp_path / "none", "none") == random_tiny_dir
    start = quantized_model_dir(random_tiny_dir, tmp_path / "fp8", "fp8")
    assert (start / "config.json").is_file() and (start / "tokenizer.json").is_file()
    src, got = load_file(str(random_tiny_dir / WEIGHTS_FILE)), load_file(str(start / WEIGHTS_FILE))
    assert all(torch.equal(got[k], quantize_dequantize(v, "fp8")) for k, v in src.items())
    mtime = (start / WEIGHTS_FILE).stat().st_mtime_ns
    assert quantized_model_dir(random_tiny_dir, tmp_path / "fp8", "fp8") == start
    assert (start / WEIGHTS_FILE).stat().st_mtime_ns == mtime  # reused, not rewritten


def test_weight_quant_setting_is_checked_by_name():
    assert load_config("tiny", ["actor.weight_quant=int8"], env={}).actor.weight_quant == "int8"
    with pytest.raises(ConfigError, match="actor.weight_quant"):
        load_config("tiny", ["actor.weight_quant=int4"], env={})
