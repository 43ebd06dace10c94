"""Learner checkpoints: ``<run_dir>/checkpoints/step_XXXXXX/`` written atomically, ``latest`` last.

A checkpoint directory holds ``state.json`` and the tensors in one of two formats
(``learner.checkpoint_format``; ``state.json`` says which, ``"format"``, absent in older checkpoints: full).

- ``state.json``: step, version, controller state, python/numpy RNG states, the metrics.jsonl offset and
  the buffer bookkeeping (``trained_ids``: the stream ids of the entries whose effect this checkpoint is
  the first to contain; ``trained_total``: all entries trained so far). Written by rank 0 alone, the same
  in both formats.

Full:

- ``model.safetensors``: the trainer's weights (tied tensors stored once, ``safetensors.torch.save_model``);
- ``optimizer.pt``: ``optimizer.state_dict()`` plus the torch RNG state (tensors only, loaded with
  ``weights_only=True``: nothing arbitrary is unpickled).

  The layout does not depend on ``learner.world_size``: a sharded learner gathers the full model and the full
  optimizer state on rank 0 and writes them in the same form (parameters numbered in ``model.parameters()``
  order, tied tensors stored once), so a run resumes with any number of ranks (``learner.distributed``).
  The cost: rank 0 holds a full copy of the weights and AdamW moments in host memory while it writes.

Sharded:

- ``shards/``: ``torch.distributed.checkpoint`` (DCP) files: ``__<rank>_0.distcp``, written by each rank from
  its own shards of the weights and AdamW state (keyed by parameter name, ``get_model_state_dict`` /
  ``get_optimizer_state_dict``), and ``.metadata``, the global layout rank 0 writes once all have written;
- ``rng.pt``: rank 0's torch RNG state (every rank restores it, as with the full format).

  DCP reshards on load, so this format too resumes with any world size: ranks read the pieces of their own
  shards, and a world_size 1 learner reads it without a process group into the unsharded model.

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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
FORMATS = ("full", "sharded")  # learner.checkpoint_format; state.json "format"
SHARDS_DIR = "shards"  # sharded: the DCP directory
RNG_FILE = "rng.pt"  # sharded: torch RNG state (the full format keeps it in optimizer.pt)
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
        if p.is_dir():
            _fsync_tree(p)
        elif p.is_file():
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

    @property
    def format(self) -> str:
        """"full" or "sharded" (see the module docstring); raises for anything this learner cannot read."""
        fmt = self.state.get("format", "full")
        if fmt not in FORMATS:
            raise RuntimeError(f"checkpoint {self.path} has format {fmt!r}; this learner reads "
                               f"{' and '.join(map(repr, FORMATS))} (written by a newer dcrl?)")
        needed = ["model.safetensors", "optimizer.pt"] if fmt == "full" else [f"{SHARDS_DIR}/.metadata", RNG_FILE]
        missing = [n for n in needed if not (self.path / n).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {self.path} (format {fmt!r}) lacks {', '.join(missing)}: it is "
                               "incomplete or was changed by hand; restore it or start with --fresh")
        return fmt

    def optimizer_state(self, *, with_rng: bool = False) -> dict[str, Any]:
        """The saved ``optimizer.state_dict()`` (parameters numbered in ``model.parameters()`` order; full format).
        ``with_rng``: also restore the RNG states from the same read (a rank that got its weights from rank 0)."""
        import torch

        extra = torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)
        if with_rng:
            torch.set_rng_state(extra["torch_rng"])
            restore_rng(self.state["rng"])
        return extra["optimizer"]

    def restore(self, model, optimizer=None, *, distributed: bool = False) -> None:
        """Load weights into ``model`` (strict), optimizer state into ``optimizer``, and all RNG states.

        Full format: ``model`` is the unsharded model. Sharded format: ``model`` is the FSDP2-sharded model and
        the load a collective over the default group (``distributed``: every rank calls it), or the unsharded
        model of a one-process learner (``distributed`` False: no process group)."""
        import torch
        from safetensors.torch import load_model

        if self.format == "sharded":
            load_shards(self.path / SHARDS_DIR, model, optimizer, distributed=distributed)
            torch.set_rng_state(torch.load(self.path / RNG_FILE, map_location="cpu", weights_only=True)["torch_rng"])
            restore_rng(self.state["rng"])
            return
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


@dataclass
class ShardedState:
    """What a learner writing the sharded format passes to :func:`save_checkpoint`: its live model and
    optimizer (FSDP2-sharded, or unsharded with one process).

    ``share_dir`` (world_size > 1, rank 0): tells ranks 1..N-1 the temporary directory, which they then pass to
    :func:`save_shards` as rank 0 does; the save is a collective and returns on rank 0 only once every rank's
    files are written, so ``latest`` never names a checkpoint with a missing shard."""

    model: Any
    optimizer: Any
    share_dir: Callable[[Path], None] | None = None


@contextmanager
def _one_process_is_meant(distributed: bool):
    """Silence DCP's warning that it saves or loads in a single process where that is what was asked."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_shards(directory: Path, model, optimizer, *, distributed: bool) -> None:
    """Write this process's shards of the weights and the optimizer state into ``directory`` with DCP: one file
    per rank, plus ``.metadata`` by rank 0 once every rank has written. ``distributed``: a collective over the
    default group (every rank calls it with the same directory); else one process writes it all."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with _one_process_is_meant(distributed):
        dcp.save(state, checkpoint_id=directory, no_dist=not distributed)


def load_shards(directory: Path, model, optimizer, *, distributed: bool) -> None:
    """Read a :func:`save_shards` directory into ``model`` and ``optimizer`` (None: weights only), whatever the
    world size that wrote it: each rank reads the pieces of its own shards (``distributed``, a collective), or
    one process reads everything into an unsharded model. Every parameter must be in the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    # The optimizer's state dict first: on a fresh optimizer it is created by a step with zero gradients
    # and lr 0, which must not run after the weights are loaded in place.
    state = {} if optimizer is None else {"optimizer": get_optimizer_state_dict(model, optimizer)}
    state["model"] = get_model_state_dict(model)
    with _one_process_is_meant(distributed):
        dcp.load(state, checkpoint_id=directory, no_dist=not distributed)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        # DCP hands hyperparameters back as lists (AdamW's betas); keep them as the optimizer makes them, so
        # that a later full checkpoint's param_groups do not depend on the format it was resumed from.
        for group in optimizer.param_groups:
            for k, v in group.items():
                if k != "params" and isinstance(v, list):
                    group[k] = tuple(v)


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model, optimizer, state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` atomically, point ``latest`` at it, prune to the newest ``keep``.

    ``state`` is JSON-able (version, controller state, bookkeeping); ``step`` and the RNG states are added
    here. Returns the checkpoint directory. Called by the learner every ``checkpoint_every`` steps and at
    the end; the learner acks the consumed entries only after this returns.

    ``model`` and ``optimizer`` are either the live (unsharded) objects or, for a sharded learner, a
    :class:`GatheredState` holding the full tensors rank 0 gathered (``learner.distributed``): the full
    format. A :class:`ShardedState` (``optimizer`` None) writes the sharded format.
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
    if isinstance(model, ShardedState):
        if model.share_dir is not None:
            model.share_dir(tmp)
        save_shards(tmp / SHARDS_DIR, model.model, model.optimizer, distributed=model.share_dir is not None)
        torch.save({"torch_rng": torch.get_rng_state()}, tmp / RNG_FILE)
        fmt = "sharded"
    else:
        if isinstance(model, GatheredState):
            save_file(model.model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            optimizer_state = model.optimizer
        else:
            save_model(model, str(tmp / "model.safetensors"))
            optimizer_state = optimizer.state_dict()
        torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        fmt = "full"
    full = dict(state, step=int(step), format=fmt, rng=capture_rng())
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
