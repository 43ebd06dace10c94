"""Low-precision actor weights: the learner trains at full precision, the actors serve weights rounded to int8
or fp8 (``actor.weight_quant``), the seed's "train high-fidelity, infer low-cost" setting.

dcrl quantises and dequantises at publish time: every weight matrix (2-D floating tensor: linear layers,
embeddings, the output head) is rounded to the grid of the format with one absmax scale per output channel
(row), and published dequantised in the wire dtype. Norm weights and other 1-D tensors are kept as they are.
So the numbers an actor computes with are exactly the quantised ones, on any engine and any transport, but
the speed and memory savings of real low-precision kernels are not had: vLLM's own quantised serving is not
used (its weight-only int8/fp8 paths are GPU kernels; the CPU build runs bf16/fp32 models). The discrepancy
the learner measures at lag 0 then carries the quantisation error, and the budget decides how much of it to
tolerate.

- int8: q = clamp(round(w / s), -127, 127), s = max|w_row| / 127, w' = q s.
- fp8 (e4m3): w' = fp8(w / s) s with s = max|w_row| / 448 (the largest e4m3 value).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from protocol.vocab import WeightQuant

FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0


def quantize_dequantize(t, kind: WeightQuant):
    """``t`` rounded to the ``kind`` grid with one absmax scale per row, as a new tensor of ``t``'s dtype and
    device; 1-D and non-floating tensors (and ``kind == "none"``) come back unchanged (the same object)."""
    import torch

    if kind == "none" or t.ndim != 2 or not t.is_floating_point():
        return t
    w = t.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if kind == "int8":
        scale = amax / INT8_MAX
        q = torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX)
    elif kind == "fp8":
        scale = amax / FP8_E4M3_MAX
        q = (w / scale).to(torch.float8_e4m3fn).float()
    else:
        raise ValueError(f"actor.weight_quant: unknown format {kind!r}")
    return (q * scale).to(t.dtype)


def quantize_state_dict(tensors: dict, kind: WeightQuant) -> dict:
    """Every tensor of a state dict through :func:`quantize_dequantize` (new dict; unchanged ones shared)."""
    return {k: quantize_dequantize(v, kind) for k, v in tensors.items()}


def quantized_model_dir(src_dir: str | os.PathLike, dest_dir: str | os.PathLike, kind: WeightQuant) -> Path:
    """The model directory an actor starts its engine from: ``src_dir`` itself for ``"none"``, else a copy in
    ``dest_dir`` whose ``model.safetensors`` went through :func:`quantize_state_dict` (the learner publishes
    every later version the same way). Rebuilt when the source file changed; written atomically."""
    from safetensors.torch import load_file, save_file

    from weights.format import WEIGHTS_FILE, companion_files, sha256_file

    src, dest = Path(src_dir), Path(dest_dir)
    if kind == "none":
        return src
    source_sha = sha256_file(src / WEIGHTS_FILE)
    stamp = dest / ".source"
    if stamp.is_file() and stamp.read_text() == f"{kind} {source_sha}" and (dest / WEIGHTS_FILE).is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    save_file(quantize_state_dict(load_file(str(src / WEIGHTS_FILE)), kind), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, dest / WEIGHTS_FILE)
    for f in companion_files(src):
        shutil.copy2(f, dest / f.name)
    stamp.write_text(f"{kind} {source_sha}")
    return dest
