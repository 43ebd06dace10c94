"""The published weight format: one ``model.safetensors`` per version in a directory ``vXXXXXX``, with its sha256.

Written by the learner's publisher for every version and by ``tiny.build`` for version 0; read and
verified by the actors (``actors.weight_sync``) before ``reload_weights``. The tensors a collective
transfer broadcasts are the same (``published_tensors``).

Tied embeddings: the file always holds ``lm_head.weight`` explicitly (a copy of the input embedding).
Measured on vLLM CPU: a reload from a file without it keeps the OLD output head (vLLM repacks the
head after loading and the tie is not re-applied by ``reload_weights``), so the actors silently serve
a model the learner never had. A fresh load ignores the extra tensor, so writing it is always safe.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from protocol.vocab import WeightQuant
from weights.quant import quantize_dequantize

WEIGHTS_FILE = "model.safetensors"
_HASH_BLOCK = 1 << 20
_VERSION_RE = re.compile(r"^v(\d{6,})$")

# Files of a model directory that are weights (never copied: the published file replaces them).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def version_dirname(version: int) -> str:
    """Directory name of one published version: ``v{version:06d}`` (learner's run dir and actors' caches alike)."""
    return f"v{version:06d}"


def parse_version_dirname(name: str) -> int | None:
    """The version of a directory named by :func:`version_dirname`, else None."""
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def published_tensors(model, quant: WeightQuant = "none") -> list[tuple[str, "object"]]:
    """(name, tensor) of everything an actor loads, on the model's device: the state dict with
    ``lm_head.weight`` always present, last (the tied head explicitly, see the module docstring). No copy,
    except that with ``quant`` the weight matrices are new quantised-dequantised tensors (``weights.quant``)."""
    items = [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    items.append(("lm_head.weight", model.get_output_embeddings().weight))
    return [(k, quantize_dequantize(v, quant)) for k, v in items]


def wire_tensor(t, dtype: str | None = None, device=None, copy: bool = False):
    """``t`` detached and contiguous, on ``device`` (default: where it is), a floating tensor cast to
    ``dtype`` (a torch dtype name) when given; ``copy`` forces a new tensor even when nothing changes."""
    import torch

    cast = getattr(torch, dtype) if dtype and t.is_floating_point() else t.dtype
    return t.detach().to(device=device or t.device, dtype=cast, copy=copy).contiguous()


def export_state_dict(model, dtype: str | None = None, quant: WeightQuant = "none") -> dict:
    """The tensors to publish: contiguous CPU copies, ``lm_head.weight`` always present and unshared,
    floating ones cast to ``dtype`` (a torch dtype name) when given.

    safetensors refuses tensors that share storage, so the tied head is a separate copy (a copy even
    when untied: cheap next to the write, and never aliases the embedding).
    """
    return {k: wire_tensor(v, dtype, "cpu", copy=k == "lm_head.weight") for k, v in published_tensors(model, quant)}


def write_weights(model, out_dir: str | os.PathLike, dtype: str | None = None, quant: WeightQuant = "none") -> str:
    """Write ``out_dir/model.safetensors`` atomically (floating tensors in ``dtype`` when given) and return
    its sha256 hex digest.

    The file is written to a temporary name in the same directory, fsynced, then renamed over the
    final name, so a reader sees either the previous complete file or the new complete one.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / WEIGHTS_FILE
    tmp = out / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    save_file(export_state_dict(model, dtype, quant), str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # readable by actors running as other users on a shared filesystem
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, final)
    return digest


def companion_files(model_dir: str | os.PathLike) -> list[Path]:
    """Files of the model directory to copy beside each published weight file: config, generation
    config, tokenizer files (everything that is a regular file and not weights or a weight index)."""
    out = []
    for p in sorted(Path(model_dir).iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        out.append(p)
    return out
