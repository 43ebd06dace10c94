"""The learner over N ranks (``learner.world_size = N``): FSDP2 on one machine, with rank 0 the only rank that
talks to the rest of the system.

    python -m learner --config X --set learner.world_size=2      # honcho and the Ray launcher run it unchanged

Processes. The ``python -m learner`` process is rank 0. :func:`start` writes the validated config and a small
spec (world size, model dir, checkpoint to restore) into a temporary rendezvous directory and starts ranks
1..N-1 as ``python -m learner.distributed DIR RANK``; they die with rank 0 (``PR_SET_PDEATHSIG``), and rank 0
stops at once when one of them dies. All ranks join one process group through a ``FileStore`` in that directory
(no rendezvous socket at all); the collectives use gloo on CPU and nccl on GPU (rank r on ``cuda:r``), their
sockets on the loopback interface.

Model. Rank 0 loads the full model and restores a full checkpoint's weights into it; ranks 1..N-1 build it on
the meta device and receive rank 0's weights while it is sharded (``learner.meta_init``, :func:`shard_from_rank0`;
with it off every rank loads the full model). Sharding is FSDP2: ``fully_shard`` on each decoder layer, then on
the root (embedding, final norm and the tied head).
Gradients are reduced by SUM rather than FSDP's default mean, because each rank's loss is already divided by
the token count of the whole batch (token-level aggregation); the summed gradient is the world_size 1 one.

How a batch reaches the ranks. Rank 0 alone reads the Redis buffer (one consumer, ``learner.consumer``), owns
the controller, the control plane, the publisher, the metrics and the checkpoints, and collates the batch as
with one rank; it then broadcasts the collated tensors (token ids, behaviour logprobs, versions, mask,
advantages) over the process group. Delivery guarantees are those of one rank: the entries stay pending
under rank 0's consumer until the checkpoint that contains their effect is written, then rank 0 acks them.
Each rank trains a contiguous slice of the rows (:func:`row_range`, sizes within one of each other). One step,
all ranks in lockstep::

    rank 0: collect from Redis, collate            | ranks 1..N-1: wait for a command
    command TRAIN, broadcast the batch
    pi_prox of the own rows (no grad, or the fused training forward) -> gathered on rank 0
    rank 0: discrepancy statistics over the WHOLE batch -> controller -> broadcast (lambda, beta)
    loss of the own rows, divided by the batch's generated-token count; backward (FSDP reduce-scatter, SUM)
    clip_grad_norm_ (the global norm over all shards), AdamW on the own shards
    loss metrics gathered on rank 0, reduced as micro-batch metrics are (token-weighted)

So the controller sees the same D, lag buckets, ESS and max-token discrepancy as with one rank: they are
computed once, by the same function, on the gathered pi_prox of every row. Every rank runs the same number of
forward/backward passes (FSDP all-gathers per layer are collectives); a rank with fewer micro-batches runs
empty ones whose loss is zero.

Publishing and checkpoints (commands PUBLISH, CHECKPOINT). Every rank takes part in
``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` (and ``get_optimizer_state_dict`` for a
checkpoint); only rank 0 holds the result, in host memory. The publisher gets it through
:class:`FullWeights`. Checkpoints (``learner.checkpoint_format``):

- "full": the gathered state is written in the very layout of an unsharded learner (``learner.checkpoint``:
  parameters numbered in ``model.parameters()`` order, tied tensors once). The cost: rank 0 holds one full
  copy of the weights and of the AdamW moments in host memory while it writes.
- "sharded": nothing is gathered. Rank 0 creates the temporary checkpoint directory and broadcasts its path
  (:meth:`Ranks.broadcast_text`); every rank writes its own shards there with ``torch.distributed.checkpoint``
  (``learner.checkpoint.save_shards``), a collective that returns once all files and the metadata are
  written; rank 0 then adds ``state.json`` and renames the directory into place, as with the full format.

Either format resumes with any world size, 1 included: a full checkpoint's weights go into rank 0's full model
before sharding (and to the others as above), its AdamW state into every rank's shards; a sharded one is read
after sharding, each rank reading what its shards need.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from configs.schema import DcrlConfig
    from learner.checkpoint import GatheredState
    from learner.trainer import Batch

log = logging.getLogger("dcrl.learner.ranks")

CONFIG_FILE = "config.json"
SPEC_FILE = "spec.json"
STORE_FILE = "store"
RENDEZVOUS_PREFIX = "dcrl-learner-ranks-"  # + rank 0's pid: a temporary directory per sharded run
_PR_SET_PDEATHSIG = 1


class Command(IntEnum):
    """What rank 0 asks of the other ranks next; each is one collective sequence that all ranks run."""

    TRAIN = 1  # receive a batch, run one optimizer step on the own rows
    PUBLISH = 2  # take part in gathering the full weights (rank 0 publishes them)
    CHECKPOINT = 3  # full format: help gather weights and optimizer state on rank 0; sharded: write own shards
    STOP = 4  # leave the group and exit 0


def row_range(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a batch of ``n_rows`` that ``rank`` trains: contiguous slices whose sizes differ by
    at most one, the first ``n_rows % world`` ranks taking the extra row (a rank may get none)."""
    base, extra = divmod(n_rows, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def rank_device(name: str, rank: int) -> "torch.device":
    """The device of ``rank``: ``cuda:rank`` on a GPU learner (one GPU per rank), else the CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", rank) if name == "cuda" else torch.device(name)


def decoder_layers(model):
    """The decoder layers of a transformers causal LM (``model.model.layers``), each one FSDP unit."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"learner.world_size > 1: cannot find the decoder layers of {type(model).__name__} "
                         "(expected model.model.layers)")
    return layers


def shard_model(model, lcfg) -> None:
    """FSDP2 in place: ``fully_shard`` per decoder layer, then the root; gradients reduced by SUM.

    FSDP divides reduced gradients by the world size by default (a mean over data-parallel ranks); here each
    rank's loss already carries 1 / (the batch's token count), so the gradient of the batch is the sum.
    ``force_sum_reduction`` keeps the reduction a plain SUM (gloo has no pre-multiplied sum).
    ``lcfg`` (``LearnerConfig``): ``compute_dtype`` -> ``MixedPrecisionPolicy`` (reduction in ``dtype``),
    ``cpu_offload`` -> ``CPUOffloadPolicy``."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    compute = lcfg.dtype if lcfg.compute_dtype == "auto" else lcfg.compute_dtype
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, compute), reduce_dtype=getattr(torch, lcfg.dtype))
    offload = CPUOffloadPolicy() if lcfg.cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def shard_from_rank0(model, lcfg, ranks: "Ranks", device) -> None:
    """``shard_model``, with the weights taken from rank 0 (``learner.meta_init``): ranks 1..N-1 hold ``model``
    on the meta device; after sharding they allocate their shards on ``device`` and rank 0's full state
    dict is broadcast into every rank's shards. Buffers outside the state dict (the rotary embedding's
    ``inv_freq``) are not sharded; the empty ones get rank 0's values."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = model.state_dict() if ranks.is_main else {}  # rank 0's full tensors, referenced across the sharding
    shard_model(model, lcfg)
    if not ranks.is_main:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for _, buf in model.named_buffers():
        t = buf.to(ranks.device)
        dist.broadcast(t, src=0)
        if t is not buf:
            buf.copy_(t)


# ---------------------------------------------------------------- full state <-> sharded state


class FullWeights:
    """What the publisher reads of a model (``weights.format.published_tensors``: ``state_dict()`` and
    ``get_output_embeddings().weight``), backed by the full state dict gathered on rank 0."""

    def __init__(self, tensors: dict[str, "Tensor"], device=None):
        self._tensors = tensors if device is None else {k: v.to(device) for k, v in tensors.items()}

    def state_dict(self) -> dict[str, "Tensor"]:
        return self._tensors

    def get_output_embeddings(self):
        return SimpleNamespace(weight=self._tensors["lm_head.weight"])


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model) -> dict[str, "Tensor"]:
    """The full state dict as CPU tensors on rank 0 (empty on the others). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def stored_once(full: dict[str, "Tensor"], model) -> dict[str, "Tensor"]:
    """``full`` without the second names of tied parameters, as ``safetensors.torch.save_model`` stores an
    unsharded model: of the names sharing one parameter, the alphabetically first is kept."""
    names_of: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(t), []).append(name)
    dropped = {n for names in names_of.values() for n in sorted(names)[1:]}
    return {k: v for k, v in full.items() if k not in dropped}


def numbered_optimizer_state(named: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state keyed by parameter name (``get_optimizer_state_dict``) in the layout of
    ``optimizer.state_dict()``: parameters numbered 0.. in the order of the param groups."""
    ids: dict[str, int] = {}
    groups = []
    for g in named["param_groups"]:
        params = []
        for fqn in g["params"]:
            ids.setdefault(fqn, len(ids))
            params.append(ids[fqn])
        # Hyperparameters as the optimizer holds them: loading a state through torch.distributed.checkpoint
        # turns AdamW's betas tuple into a list.
        groups.append({**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()}, "params": params})
    return {"state": {ids[k]: v for k, v in named["state"].items()}, "param_groups": groups}


def named_optimizer_state(numbered: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`numbered_optimizer_state` for the parameters ``names`` (in optimizer order)."""
    n_saved = sum(len(g["params"]) for g in numbered["param_groups"])
    if n_saved != len(names):
        raise ValueError(f"the checkpoint's optimizer state covers {n_saved} parameters, the model has "
                         f"{len(names)}: it belongs to another model")
    return {"state": {names[int(i)]: v for i, v in numbered["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in numbered["param_groups"]]}


def gather_state(model, optimizer) -> "GatheredState | None":
    """Full weights and optimizer state on rank 0 in the checkpoint layout (None on the others). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from learner.checkpoint import GatheredState

    weights = full_model_state(model)
    optim = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not weights:
        return None
    return GatheredState(model=stored_once(weights, model), optimizer=numbered_optimizer_state(optim))


def load_optimizer_state(model, optimizer, numbered: dict[str, Any]) -> None:
    """Shard a checkpoint's full optimizer state (``optimizer.state_dict()`` layout) into ``optimizer`` of the
    sharded ``model``. Every rank calls it with the state it read from the checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, _ in model.named_parameters()]
    set_optimizer_state_dict(model, optimizer, named_optimizer_state(numbered, names),
                             options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------- the group


@dataclass
class Ranks:
    """This process's place in the learner's process group, and the collectives the training loop uses.

    On rank 0 it also owns the rendezvous directory and the other ranks' processes."""

    rank: int
    world: int
    device: "torch.device"
    rendezvous_dir: Path  # the FileStore lives here; rank 0 created it and removes it
    followers: list[subprocess.Popen] = field(default_factory=list)
    stopping: bool = False
    joined: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def join(self, timeout_s: float) -> None:
        """Join the default process group (every rank; blocks until all have joined)."""
        import torch
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair sockets on 127.0.0.1
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # nccl's bootstrap sockets likewise
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        store = dist.FileStore(str(self.rendezvous_dir / STORE_FILE), self.world)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.joined = True

    # -- commands and batches (rank 0 sends, the others receive)

    def send(self, cmd: Command) -> None:
        import torch
        import torch.distributed as dist

        dist.broadcast(torch.tensor([int(cmd)], dtype=torch.int64, device=self.device), src=0)

    def receive(self) -> Command:
        import torch
        import torch.distributed as dist

        t = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return Command(int(t))

    def share_batch(self, batch: "Batch | None") -> "Batch":
        """Rank 0's collated batch on every rank: rank 0 passes it (and gets it back), the others pass None and
        get a copy on the CPU, as ``collate`` returns it. A header, then one broadcast per tensor (no pickling)."""
        import torch
        import torch.distributed as dist

        from learner.trainer import Batch

        dev = self.device
        header = (torch.tensor([*batch.tokens.shape, batch.n_groups], dtype=torch.int64) if self.is_main
                  else torch.zeros(3, dtype=torch.int64)).to(dev)
        dist.broadcast(header, src=0)
        b, n, n_groups = (int(x) for x in header.tolist())
        fields = [("tokens", (b, n), torch.int64), ("logp_mu", (b, n), torch.float32),
                  ("versions", (b, n), torch.int64), ("mask", (b, n), torch.uint8),
                  ("advantages", (b,), torch.float32), ("rewards", (b,), torch.float32),
                  ("lengths", (b,), torch.int64)]
        got = {}
        for name, shape, dtype in fields:
            if self.is_main:
                src = torch.as_tensor(batch.lengths) if name == "lengths" else getattr(batch, name)
                t = src.to(dtype=dtype, device=dev).contiguous()
            else:
                t = torch.empty(shape, dtype=dtype, device=dev)
            dist.broadcast(t, src=0)
            got[name] = t
        if self.is_main:
            return batch
        return Batch(tokens=got["tokens"].cpu(), logp_mu=got["logp_mu"].cpu(), versions=got["versions"].cpu(),
                     mask=got["mask"].cpu().bool(), advantages=got["advantages"].cpu(), rewards=got["rewards"].cpu(),
                     lengths=got["lengths"].tolist(), n_groups=n_groups)

    def gather_rows(self, local: "Tensor", n_rows: int) -> "Tensor | None":
        """Every rank's rows ``row_range(n_rows, r, world)`` of a ``[rows, T]`` tensor, stacked in rank order on
        rank 0 (``[n_rows, T]``); None on the other ranks."""
        import torch
        import torch.distributed as dist

        chunk = -(-n_rows // self.world)
        padded = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.is_main else None
        dist.gather(padded, parts, dst=0)
        if not self.is_main:
            return None
        return torch.cat([p[:hi - lo] for r, p in enumerate(parts) for lo, hi in [row_range(n_rows, r, self.world)]])

    def broadcast_floats(self, values: list[float] | None, n: int) -> list[float]:
        """Rank 0's ``n`` floats on every rank (float64)."""
        import torch
        import torch.distributed as dist

        t = (torch.tensor(values, dtype=torch.float64) if self.is_main else torch.zeros(n, dtype=torch.float64))
        t = t.to(self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (the others pass None): its UTF-8 length, then its bytes."""
        import torch
        import torch.distributed as dist

        data = text.encode() if self.is_main else b""
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(n, src=0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main
               else torch.zeros(int(n), dtype=torch.uint8)).to(self.device)
        dist.broadcast(buf, src=0)
        return bytes(buf.cpu().tolist()).decode()

    def gather_floats(self, values: list[float]) -> list[list[float]] | None:
        """Each rank's ``values`` (same length everywhere) on rank 0, in rank order; None elsewhere."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(t) for _ in range(self.world)] if self.is_main else None
        dist.gather(t, parts, dst=0)
        return [p.tolist() for p in parts] if self.is_main else None

    # -- lifetime

    def finish(self, timeout_s: float = 60.0) -> None:
        """Rank 0, after the last step: send STOP and wait for the other ranks to exit."""
        if not self.is_main or self.stopping:
            return
        self.stopping = True
        self.send(Command.STOP)
        deadline = time.monotonic() + timeout_s
        for p in self.followers:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("learner rank pid %d did not exit after STOP; terminating it", p.pid)

    def close(self) -> None:
        """Leave the group; on rank 0 also end the other ranks still running (an error path) and remove the
        rendezvous directory. Safe to call twice."""
        self.stopping = True
        for p in self.followers:
            if p.poll() is None:
                p.terminate()
        for p in self.followers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.joined:
            import torch.distributed as dist

            self.joined = False
            dist.destroy_process_group()
        if self.is_main:
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)

    def _watch(self) -> None:
        """Rank 0's watchdog: a rank that exits before STOP ends rank 0 too (else it would wait in the next
        collective until the group's timeout). SIGTERM first, so that ``finally`` blocks run; if rank 0 is
        stuck inside a collective and cannot unwind, it exits hard 20 s later (nothing unacked is lost: the
        entries stay pending in Redis until a checkpoint holds them)."""
        while not self.stopping:
            for r, p in enumerate(self.followers, start=1):
                code = p.poll()
                if code is not None and not self.stopping:
                    log.error("learner rank %d (pid %d) exited with status %s before the run ended; stopping",
                              r, p.pid, code)
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(20.0)
                    if not self.stopping:
                        os._exit(3)
                    return
            time.sleep(0.5)


def _die_with_parent_hook():
    """``preexec_fn`` of a follower: SIGTERM when rank 0 dies, whatever the way (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # rank 0 died before the prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def remove_orphan_rendezvous() -> None:
    """Remove the rendezvous directories of rank-0 processes that are gone (killed before their cleanup)."""
    for d in Path(tempfile.gettempdir()).glob(f"{RENDEZVOUS_PREFIX}*"):
        try:
            pid = int(d.name[len(RENDEZVOUS_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def group_timeout_s(cfg: "DcrlConfig") -> float:
    """How long a rank may wait in one collective: the other ranks wait for the next command while rank 0
    waits for a batch (up to ``learner.wait_timeout_s``), plus room for a step and a checkpoint."""
    return cfg.learner.wait_timeout_s + 600.0


def start(cfg: "DcrlConfig", model_dir: Path, checkpoint: Path | None) -> Ranks:
    """Rank 0: start ranks 1..N-1 and join the group with them. ``checkpoint`` is what every rank restores."""
    import torch

    world = cfg.learner.world_size
    device = rank_device(cfg.learner.device, 0)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise RuntimeError(f"learner.world_size = {world} needs one GPU per rank; {torch.cuda.device_count()} "
                           "visible")
    remove_orphan_rendezvous()
    # mkdtemp makes the directory private (0700): the config may hold the Redis password
    rdv = Path(tempfile.mkdtemp(prefix=f"{RENDEZVOUS_PREFIX}{os.getpid()}-"))
    (rdv / CONFIG_FILE).write_text(cfg.model_dump_json())
    (rdv / SPEC_FILE).write_text(json.dumps({
        "world_size": world,
        "model_dir": str(model_dir),  # as given (a hub name stays one); the other ranks share rank 0's cwd
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "log_level": logging.getLogger().getEffectiveLevel()}))
    ranks = Ranks(rank=0, world=world, device=device, rendezvous_dir=rdv)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    hook = _die_with_parent_hook()
    try:
        for r in range(1, world):
            ranks.followers.append(subprocess.Popen([sys.executable, "-m", "learner.distributed", str(rdv), str(r)],
                                                    env=env, preexec_fn=hook))
        threading.Thread(target=ranks._watch, name="learner-ranks-watch", daemon=True).start()
        ranks.join(group_timeout_s(cfg))
    except BaseException:
        ranks.close()
        raise
    log.info("learner: %d ranks (%s), rank 0 pid %d, others %s", world, "nccl" if device.type == "cuda" else "gloo",
             os.getpid(), [p.pid for p in ranks.followers])
    return ranks


def follow(cfg: "DcrlConfig", ranks: Ranks, model_dir: Path, checkpoint: Path | None) -> None:
    """Ranks 1..N-1: build the sharded policy, then run rank 0's commands until STOP."""
    from learner.checkpoint import SHARDS_DIR, load_checkpoint, save_shards
    from learner.controller import DCMDPController
    from learner.trainer import Learner, build_policy

    ckpt = None if checkpoint is None else load_checkpoint(checkpoint)
    model, optimizer = build_policy(cfg, model_dir, ranks.device, ckpt, ranks)
    learner = Learner(cfg, model=model, optimizer=optimizer, controller=DCMDPController(cfg.controller),
                      reader=None, control=None, publisher=None, metrics=None, run_dir=cfg.run.dir,
                      device=ranks.device, ranks=ranks)
    while True:
        cmd = ranks.receive()
        if cmd is Command.TRAIN:
            learner.train_batch(ranks.share_batch(None))
        elif cmd is Command.PUBLISH:
            full_model_state(model)
        elif cmd is Command.CHECKPOINT and cfg.learner.checkpoint_format == "sharded":
            save_shards(Path(ranks.broadcast_text(None)) / SHARDS_DIR, model, optimizer, distributed=True)
        elif cmd is Command.CHECKPOINT:
            gather_state(model, optimizer)
        elif cmd is Command.STOP:
            return


def follower_main(argv: list[str]) -> int:
    """``python -m learner.distributed DIR RANK``: one of ranks 1..N-1, started by rank 0 (never by hand)."""
    from configs.schema import DcrlConfig

    rdv, rank = Path(argv[0]), int(argv[1])
    cfg = DcrlConfig.model_validate_json((rdv / CONFIG_FILE).read_text())
    spec = json.loads((rdv / SPEC_FILE).read_text())
    logging.basicConfig(level=int(spec.get("log_level", logging.INFO)), stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    import torch

    if cfg.learner.torch_threads:
        torch.set_num_threads(cfg.learner.torch_threads)
    ranks = Ranks(rank=rank, world=int(spec["world_size"]), device=rank_device(cfg.learner.device, rank),
                  rendezvous_dir=rdv)
    ranks.join(group_timeout_s(cfg))
    try:
        follow(cfg, ranks, Path(spec["model_dir"]), None if spec["checkpoint"] is None else Path(spec["checkpoint"]))
    finally:
        ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(follower_main(sys.argv[1:]))
