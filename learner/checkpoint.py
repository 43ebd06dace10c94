"""Learner checkpoints: ``<run_dir>/checkpoints/step_XXXXXX/`` written atomically, ``latest`` last.

A checkpoint directory holds

- ``model.safetensors``: the trainer's weights (tied tensors stored once, ``safetensors.torch.save_model``);
- ``optimizer.pt``: ``optimizer.state_dict()`` plus the torch RNG state (tensors only, loaded with
  ``weights_only=True``: nothing arbitrary is unpickled);

The layout does not depend on ``learner.world_size``: a sharded learner gathers the full model and the full
optimizer state on rank 0 and writes them in the same form (parameters numbered in ``model.parameters()``
order, tied tensors stored once), so a run resumes with any number of ranks (``learner.distributed``).
- ``state.json``: step, version, controller state, python/numpy RNG states, the metrics.jsonl offset and
  the buffer bookkeeping (``trained_ids``: the stream ids of the entries whose effect this checkpoint is
  the first to contain; ``trained_total``: all entries trained so far).

Durability protocol (the learner's at-least-once -> exactly-once step):

1. train steps, remembering the ids of the entries consumed;
2. :func:`save_checkpoint` writes a temp dir, fsyncs, renames it to ``step_XXXXXX``, then replaces the
   ``latest`` pointer (temp file + rename): a crash at any point leaves the previous ``latest`` valid;
3. only then the learner acks the ids (XACK + XDEL). A crash between 2 and 3 leaves them pending: the
   restarted learner acks the ``trained_ids`` of the checkpoint it loads before reading anything, so
   they are never trained twice; entries of steps after the checkpoint are re-read and retrained once.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps: ``step_{step:06d}``."""
    return f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def capture_rng() -> dict[str, Any]:
    """Python and numpy RNG states as JSON-able values (torch's goes to optimizer.pt as a tensor)."""
    import numpy as np

    py_version, py_state, py_gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    import numpy as np

    v, st, gauss = rng["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``state`` is state.json; :meth:`restore` puts weights/optimizer/RNG back."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def version(self) -> int:
        return int(self.state["version"])

    def optimizer_state(self) -> dict[str, Any]:
        """The saved ``optimizer.state_dict()`` (parameters numbered in ``model.parameters()`` order)."""
        import torch

        return torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)["optimizer"]

    def restore(self, model, optimizer=None) -> None:
        """Load weights into ``model`` (strict), optimizer state into ``optimizer``, and all RNG states."""
        import torch
        from safetensors.torch import load_model

        device = next(model.parameters()).device
        missing, unexpected = load_model(model, self.path / "model.safetensors", strict=True, device=str(device))
        extra = torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["torch_rng"])
        restore_rng(self.state["rng"])


@dataclass
class GatheredState:
    """A sharded learner's full state on rank 0, in the layout :func:`save_checkpoint` writes for an unsharded
    one: ``model`` the full state dict with each tied tensor under one name, ``optimizer`` an
    ``optimizer.state_dict()``-shaped dict (parameters numbered in ``model.parameters()`` order)."""

    model: dict[str, Any]
    optimizer: dict[str, Any]


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model, optimizer, state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` atomically, point ``latest`` at it, prune to the newest ``keep``.

    ``state`` is JSON-able (version, controller state, bookkeeping); ``step`` and the RNG states are added
    here. Returns the checkpoint directory. Called by the learner every ``checkpoint_every`` steps and at
    the end; the learner acks the consumed entries only after this returns.

    ``model`` and ``optimizer`` are either the live (unsharded) objects or, for a sharded learner, a
    :class:`GatheredState` holding the full tensors rank 0 gathered (``learner.distributed``).
    """
    import torch
    from safetensors.torch import save_file, save_model

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if isinstance(model, GatheredState):
        save_file(model.model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        optimizer_state = model.optimizer
    else:
        save_model(model, str(tmp / "model.safetensors"))
        optimizer_state = optimizer.state_dict()
    torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    full = dict(state, step=int(step), rng=capture_rng())
    (tmp / "state.json").write_text(json.dumps(full))
    _fsync_tree(tmp)
    if final.exists():
        # Only possible after a crash between this rename and the pointer update of an earlier try:
        # ``latest`` does not name it, so it is an orphan.
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_latest(root, final.name)
    _prune(root, keep, protect=final.name)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)
    _fsync_dir(root)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first (temp dirs of interrupted writes excluded)."""
    root = checkpoint_root(run_dir)
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _prune(root: Path, keep: int, protect: str) -> None:
    """Delete all but the newest ``keep`` checkpoints and leftover temp dirs of dead writers."""
    ckpts = list_checkpoints(root.parent)
    for p in ckpts[:-keep] if keep > 0 else ckpts:
        if p.name != protect:
            shutil.rmtree(p)
    for p in root.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir() and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint in directory ``path`` (its state.json read; tensors are read by ``restore``)."""
    path = Path(path)
    return Checkpoint(path=path, state=json.loads((path / "state.json").read_text()))


def load_latest(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint ``latest`` points at, or None for a fresh run (no pointer yet)."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    state_file = path / "state.json"
    if not state_file.exists():
        raise RuntimeError(f"{pointer} names {path.name}, which has no state.json: the checkpoint directory "
                           f"was removed by hand; restore it or start with --fresh")
    return Checkpoint(path=path, state=json.loads(state_file.read_text()))


def remove_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete every checkpoint of a run (``--fresh``)."""
    root = checkpoint_root(run_dir)
    if root.exists():
        shutil.rmtree(root)
