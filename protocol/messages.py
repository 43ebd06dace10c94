"""Wire contracts of dcrl: every message that crosses a process boundary.

msgspec Structs, msgpack-encoded. Per-token arrays travel as raw little-endian bytes (no per-element
msgpack overhead, zero-copy ``np.frombuffer`` on the reader): token ids int32, logprobs float32,
versions int32, loss mask uint8. Nothing is ever pickled.

Each Struct says who writes it and who reads it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
import numpy as np

from protocol.vocab import FINISH_REASONS, TRANSPORTS, FinishReason, Transport

TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")
VERSION_DTYPE = np.dtype("<i4")
MASK_DTYPE = np.dtype("<u1")



class ProtocolError(ValueError):
    """A message could not be decoded or failed validation. ``str(err)`` is a readable reason."""


# Actor -> Redis -> learner
class Trajectory(msgspec.Struct, kw_only=True, frozen=True):
    """One episode: the whole token sequence the policy saw, prompt and environment tokens included.

    Arrays all have length ``n`` (the number of tokens). Position t holds token ``token_ids[t]``;
    for generated tokens (``loss_mask[t] == 1``) ``logprobs[t]`` is the behaviour log-probability
    log mu(a_t) after temperature, and ``versions[t]`` the policy version of the weights that sampled
    it. Prompt and environment tokens have mask 0, logprob 0 and version -1.
    """

    # Typed memoryview so that decoding is zero-copy: a decoded trajectory's arrays are read-only views of the
    # entry's bytes (msgspec), ~25x cheaper than copying 2k-token arrays out. The actor builds them from bytes.
    token_ids: memoryview  # int32 LE, written by the actor
    logprobs: memoryview  # float32 LE, behaviour logprobs (0 where loss_mask == 0)
    versions: memoryview  # int32 LE, policy version per token (-1 where loss_mask == 0)
    loss_mask: memoryview  # uint8, 1 = model-generated (trained on), 0 = prompt / environment
    reward: float  # episode return from the environment
    turn_starts: list[int] = []  # token index where each model turn begins
    finish_reason: FinishReason = "stop"  # protocol.vocab.FinishReason
    prompt_len: int = 0  # tokens of the first observation

    @classmethod
    def from_arrays(
        cls,
        token_ids: Any,
        logprobs: Any,
        versions: Any,
        loss_mask: Any,
        *,
        reward: float,
        turn_starts: list[int] | None = None,
        finish_reason: FinishReason = "stop",
        prompt_len: int = 0,
    ) -> "Trajectory":
        return cls(
            token_ids=np.asarray(token_ids, dtype=TOKEN_DTYPE).tobytes(),
            logprobs=np.asarray(logprobs, dtype=LOGPROB_DTYPE).tobytes(),
            versions=np.asarray(versions, dtype=VERSION_DTYPE).tobytes(),
            loss_mask=np.asarray(loss_mask, dtype=MASK_DTYPE).tobytes(),
            reward=float(reward),
            turn_starts=list(turn_starts or []),
            finish_reason=finish_reason,
            prompt_len=int(prompt_len),
        )

    # Readers: zero-copy views (read-only) over the message bytes.
    @property
    def tokens_np(self) -> np.ndarray:
        return np.frombuffer(self.token_ids, dtype=TOKEN_DTYPE)

    @property
    def logprobs_np(self) -> np.ndarray:
        return np.frombuffer(self.logprobs, dtype=LOGPROB_DTYPE)

    @property
    def versions_np(self) -> np.ndarray:
        return np.frombuffer(self.versions, dtype=VERSION_DTYPE)

    @property
    def mask_np(self) -> np.ndarray:
        return np.frombuffer(self.loss_mask, dtype=MASK_DTYPE)

    def __len__(self) -> int:
        return len(self.token_ids) // TOKEN_DTYPE.itemsize


# Actor -> Redis stream <prefix>:traj -> learner
class TrajectoryGroup(msgspec.Struct, kw_only=True, frozen=True):
    """G trajectories sharing one prompt or environment seed: the unit of GRPO advantage normalisation."""

    group_id: str  # unique, written by the actor ("<actor_id>-<session>-<n>", session: 6 hex digits per start)
    actor_id: str  # which actor process produced it
    engine: str  # inference engine tag, e.g. "vllm-cpu/bf16"
    env: str  # environment name (import path or built-in name)
    seed: int  # environment seed / prompt index shared by the group
    trajectories: list[Trajectory]
    created_at: float = 0.0  # unix time the group was finished


# Learner -> actors (ZMQ PUB, and the control hash for late joiners)
class WeightsReady(msgspec.Struct, kw_only=True, frozen=True):
    """Weights of policy ``version`` are ready.

    ``transport == "files"``: at ``path`` (a directory holding model.safetensors with digest ``sha256``),
    and served by the ZMQ file server at ``url``. ``"nccl"``/``"gloo"``: no file; the actor pulls the
    weights from the learner's transfer server at ``url`` (``learner.transfer``), ``path``/``sha256`` empty.
    """

    version: int
    path: str  # directory on the learner's filesystem
    sha256: str  # hex digest of model.safetensors
    url: str = ""  # ZMQ endpoint that serves the file (files) or answers pulls (collective transports)
    created_at: float = 0.0
    transport: Transport = "files"  # protocol.vocab.Transport


# Learner -> actors (control hash <prefix>:control)
class Control(msgspec.Struct, kw_only=True, frozen=True):
    """The learner's current state as far as actors need it."""

    version: int  # learner policy version V (number of optimizer steps taken)
    max_staleness: int  # staleness cap K from the DCMDP controller
    lam: float = 0.0  # Lagrange multiplier lambda (for logging / status lines)
    beta: float = 0.0  # current IS bound beta(lambda)
    batch_groups: int = 1  # groups per learner step, for admission control
    stop: bool = False  # learner finished: actors drain and exit


# Actor -> learner (the hash <prefix>:actors, field = actor id), every actor.report_interval_s
class ActorReport(msgspec.Struct, kw_only=True, frozen=True):
    """Where one actor's time went since it started: cumulative seconds, so that the learner turns two
    reports into fractions of the wall time between them (``learner.trainer.actor_time_fractions``).

    Episode seconds (env, tokenize, generate) are summed over concurrent episodes and can exceed the wall
    time; engine busy, redis, reload and idle seconds are wall time of the actor process."""

    actor_id: str
    wall_s: float  # since the actor started producing
    engine_busy_s: float  # at least one request in the engine
    env_s: float = 0.0  # in env.reset / env.step, summed over episodes
    tokenize_s: float = 0.0  # text <-> token ids, summed over episodes
    generate_s: float = 0.0  # awaiting the engine's turns, summed over episodes
    redis_s: float = 0.0  # control-plane calls (admission, control, weights announcements)
    reload_s: float = 0.0  # weight updates, pause to resume
    idle_s: dict[str, float] = {}  # no new group admitted, by reason ("staleness_cap", "waiting_for_learner", ...)
    generated_tokens: int = 0
    groups_sent: int = 0
    env_errors: int = 0  # episodes an environment fault ended (envs.guard.EnvFault); their groups were dropped
    # Finished episodes of the groups sent, by model turns and by tokens (prompt, turns, observations): what the
    # learner's trained lengths (learner.log_group_ids) are checked against; nothing is dropped for being long.
    episode_turns: dict[int, int] = {}
    episode_tokens: dict[int, int] = {}


# Actor -> learner weight file server (ZMQ DEALER -> ROUTER), for actors without the learner's filesystem.
class FetchChunk(msgspec.Struct, kw_only=True, frozen=True):
    """Ask for ``size`` bytes at ``offset`` of model.safetensors of ``version``."""

    version: int
    offset: int
    size: int


# Learner file server -> actor: reply frames are [encode(ChunkHeader), raw bytes of the chunk].
class ChunkHeader(msgspec.Struct, kw_only=True, frozen=True):
    version: int
    offset: int
    total: int  # file size in bytes
    sha256: str  # digest of the whole file, to verify after the last chunk
    error: str = ""  # non-empty: the request was refused (e.g. version no longer kept); no data frame content


# Actor -> learner transfer server (DEALER -> ROUTER at WeightsReady.url) when the transport is collective.
class TransferRequest(msgspec.Struct, kw_only=True, frozen=True):
    """``join``: open a weight transfer group with this actor's ``world_size`` inference ranks.
    ``pull``: broadcast the newest weights (version >= ``version``) into that group now."""

    op: str  # "join" | "pull"
    actor_id: str
    world_size: int = 1  # join: the engine's TP x PP ranks
    version: int = -1  # pull: the version the actor heard of


# Learner transfer server -> actor: one reply per request.
class TransferReply(msgspec.Struct, kw_only=True, frozen=True):
    op: str
    error: str = ""  # non-empty: refused, nothing happens on the learner's side
    rejoin: bool = False  # pull refused because the actor's group is gone: join again first
    # join: where the group meets (the learner is rank 0, the actor's workers 1..world_size-1)
    backend: str = ""
    master_address: str = ""
    master_port: int = 0
    world_size: int = 0
    packed: bool = False
    timeout_s: float = 0.0
    # pull: what the broadcast that starts now carries, in order
    version: int = -1
    names: list[str] = []
    dtype_names: list[str] = []
    shapes: list[list[int]] = []


_MESSAGE_TYPES = (TrajectoryGroup, WeightsReady, Control, ActorReport, FetchChunk, ChunkHeader, TransferRequest,
                  TransferReply)
_encoder = msgspec.msgpack.Encoder()
_decoders = {t: msgspec.msgpack.Decoder(t) for t in _MESSAGE_TYPES}


def encode(msg: msgspec.Struct) -> bytes:
    """msgpack bytes of any protocol message."""
    return _encoder.encode(msg)


def encoded_size_hint(group: TrajectoryGroup) -> int:
    """About the size of ``encode(group)`` in bytes (a little more): its arrays plus framing."""
    return 256 + sum(len(t.token_ids) + len(t.logprobs) + len(t.versions) + len(t.loss_mask)
                     + 9 * len(t.turn_starts) + 128 for t in group.trajectories)


def encode_group(group: TrajectoryGroup, into: bytearray | None = None) -> memoryview:
    """``encode(group)`` written into ``into`` (a buffer to reuse; resized to the message) or into a new buffer
    sized up front; returns a view of the message (release it before the buffer is reused).

    Encoding into fresh memory is mostly page faults: for 8 x 2,048-token trajectories (214 kB) ~150 us against
    ~20 us into a buffer already in use (bench/buffer.py), so the writer keeps its buffers."""
    buf = bytearray(encoded_size_hint(group)) if into is None else into
    _encoder.encode_into(group, buf)  # grows the buffer if needed; truncates it to the message
    return memoryview(buf)


_ENUM_ERROR = re.compile(r"^Invalid enum value (?P<value>.*) - at `\$\.(?P<path>[\w.\[\]]+)`$")


def _readable(msg: str) -> str:
    """msgspec's message for a value outside a ``Literal`` (protocol.vocab), said with the field's name first:
    "transport 'ucx' is not an allowed value (at $.transport)"."""
    m = _ENUM_ERROR.match(msg)
    if m is None:
        return msg
    field = m.group("path").split(".")[-1].split("[")[0]
    return f"{field} {m.group('value')} is not an allowed value (at $.{m.group('path')})"


def decode(data: bytes, type_: type, **validate_kw: Any) -> Any:
    """Decode ``data`` as ``type_`` and validate it. Raises only ProtocolError.

    For TrajectoryGroup, ``vocab_size`` and ``current_version`` (optional) tighten the checks.
    """
    if type_ not in _decoders:
        raise ProtocolError(f"unknown message type {type_!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    try:
        msg = _decoders[type_].decode(data)
    except msgspec.DecodeError as e:  # covers ValidationError (a subclass)
        raise ProtocolError(f"{type_.__name__}: {_readable(str(e))}") from None
    except Exception as e:  # msgspec may raise others on pathological input; keep one error type
        raise ProtocolError(f"{type_.__name__}: undecodable ({type(e).__name__}: {e})") from None
    if type_ is TrajectoryGroup:
        validate_group(msg, **validate_kw)
    elif type_ is WeightsReady:
        validate_weights_ready(msg)
    elif type_ is Control:
        validate_control(msg)
    return msg


def decode_group(data: bytes, *, vocab_size: int | None = None, current_version: int | None = None) -> TrajectoryGroup:
    return decode(data, TrajectoryGroup, vocab_size=vocab_size, current_version=current_version)


_DTYPES = {"token_ids": TOKEN_DTYPE, "logprobs": LOGPROB_DTYPE, "versions": VERSION_DTYPE, "loss_mask": MASK_DTYPE}


def validate_trajectory(t: Trajectory, *, vocab_size: int | None = None, current_version: int | None = None, where: str = "") -> None:
    """Raise ProtocolError naming the first field that breaks the contract."""
    p = f"{where}: " if where else ""
    for name, dt in (("token_ids", TOKEN_DTYPE), ("logprobs", LOGPROB_DTYPE), ("versions", VERSION_DTYPE)):
        if len(getattr(t, name)) % dt.itemsize:
            raise ProtocolError(f"{p}{name} has {len(getattr(t, name))} bytes, not a multiple of {dt.itemsize}")
    n = len(t)
    for name in ("logprobs", "versions", "loss_mask"):
        m = len(getattr(t, name)) // np.dtype(_DTYPES[name]).itemsize
        if m != n:
            raise ProtocolError(f"{p}length mismatch: {name} has {m} entries, token_ids has {n}")
    if n == 0:
        raise ProtocolError(f"{p}empty trajectory")
    ids, lp, ver, mask = t.tokens_np, t.logprobs_np, t.versions_np, t.mask_np
    if ids.min() < 0:
        raise ProtocolError(f"{p}negative token id {int(ids.min())}")
    if vocab_size is not None and ids.max() >= vocab_size:
        raise ProtocolError(f"{p}token id {int(ids.max())} >= vocab size {vocab_size}")
    if mask.max() > 1:
        raise ProtocolError(f"{p}loss_mask holds {int(mask.max())}; only 0 and 1 are allowed")
    if not mask.any():
        raise ProtocolError(f"{p}no generated token (loss_mask is all 0)")
    gen = mask.astype(bool)
    if not np.isfinite(lp).all():
        raise ProtocolError(f"{p}non-finite logprob (NaN or inf)")
    if (lp[gen] > 1e-4).any():  # tolerate float rounding of log(1)
        raise ProtocolError(f"{p}positive logprob {float(lp[gen].max()):.4g}")
    if (ver[gen] < 0).any():
        raise ProtocolError(f"{p}generated token with negative version {int(ver[gen].min())}")
    if current_version is not None and gen.any() and ver[gen].max() > current_version:
        raise ProtocolError(f"{p}version {int(ver[gen].max())} is from the future (learner is at {current_version})")
    if not math.isfinite(t.reward):
        raise ProtocolError(f"{p}reward is not finite")
    if t.finish_reason not in FINISH_REASONS:
        raise ProtocolError(f"{p}finish_reason {t.finish_reason!r} not in {FINISH_REASONS}")
    if not 0 <= t.prompt_len <= n:
        raise ProtocolError(f"{p}prompt_len {t.prompt_len} outside [0, {n}]")
    if any(not 0 <= s < n for s in t.turn_starts) or t.turn_starts != sorted(t.turn_starts):
        raise ProtocolError(f"{p}turn_starts must be increasing indices in [0, {n})")


def validate_group(g: TrajectoryGroup, *, vocab_size: int | None = None, current_version: int | None = None) -> None:
    """Validate all trajectories of a group in one vectorised pass over the joined arrays.

    The reader validates every entry, so this is the data plane's hot path: a handful of numpy calls
    per group instead of per trajectory. Only when the joint check fails does the per-trajectory
    validation run, to name the trajectory and field at fault.
    """
    if not g.group_id:
        raise ProtocolError("group_id is empty")
    if not g.trajectories:
        raise ProtocolError(f"group {g.group_id!r}: no trajectories")
    if not _group_ok(g, vocab_size, current_version):
        for i, t in enumerate(g.trajectories):
            validate_trajectory(t, vocab_size=vocab_size, current_version=current_version,
                                where=f"group {g.group_id!r} trajectory {i}")
        raise ProtocolError(f"group {g.group_id!r}: invalid")  # unreachable unless the two checks disagree


def _group_ok(g: TrajectoryGroup, vocab_size: int | None, current_version: int | None) -> bool:
    """True when every trajectory satisfies validate_trajectory's rules (checked jointly).

    The reader's hot path, so each array is read as few times as the rules allow: plain reductions where a
    rule over all tokens implies the rule over the generated ones (the masked form runs only when it does
    not), the mask multiplied in where it must be, and no boolean indexing."""
    trajs = g.trajectories
    lens = []
    for t in trajs:
        nb = len(t.token_ids)
        if (nb == 0 or nb % 4 or len(t.logprobs) != nb or len(t.versions) != nb or len(t.loss_mask) * 4 != nb
                or t.finish_reason not in FINISH_REASONS or not math.isfinite(t.reward)
                or not 0 <= t.prompt_len <= nb // 4):
            return False
        if t.turn_starts and (t.turn_starts != sorted(t.turn_starts) or t.turn_starts[0] < 0
                              or t.turn_starts[-1] >= nb // 4):
            return False
        lens.append(nb // 4)
    ids = np.frombuffer(b"".join(t.token_ids for t in trajs), dtype=TOKEN_DTYPE)
    lp = np.frombuffer(b"".join(t.logprobs for t in trajs), dtype=LOGPROB_DTYPE)
    ver = np.frombuffer(b"".join(t.versions for t in trajs), dtype=VERSION_DTYPE)
    mask = np.frombuffer(b"".join(t.loss_mask for t in trajs), dtype=MASK_DTYPE)
    if mask.max() > 1:
        return False
    starts = np.zeros(len(lens), dtype=np.intp)
    np.cumsum(lens[:-1], out=starts[1:])
    if not np.maximum.reduceat(mask, starts).all():  # every trajectory needs a generated token
        return False
    if vocab_size is not None:
        if ids.view(np.uint32).max() >= vocab_size:  # a negative id reads as >= 2**31
            return False
    elif ids.min() < 0:
        return False
    lo, hi = lp.min(), lp.max()  # NaN propagates through both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    if hi > 1e-4 and (lp * mask).max() > 1e-4:  # positive logprob on a generated token (prompt ones may be > 0)
        return False
    ver_gen = ver * mask  # generated tokens keep their version, the others read 0
    if ver_gen.min() < 0:
        return False
    return current_version is None or ver.max() <= current_version or ver_gen.max() <= current_version


def validate_weights_ready(w: WeightsReady) -> None:
    if w.version < 0:
        raise ProtocolError(f"WeightsReady.version {w.version} < 0")
    if w.transport not in TRANSPORTS:
        raise ProtocolError(f"WeightsReady.transport {w.transport!r} is not one of {TRANSPORTS}")
    if w.transport != "files":
        if not w.url:
            raise ProtocolError(f"WeightsReady.url is empty (transport {w.transport} pulls from it)")
        return
    if len(w.sha256) != 64 or any(c not in "0123456789abcdef" for c in w.sha256):
        raise ProtocolError("WeightsReady.sha256 is not a 64-digit lowercase hex digest")


def validate_control(c: Control) -> None:
    if c.version < 0:
        raise ProtocolError(f"Control.version {c.version} < 0")
    if c.max_staleness < 0:
        raise ProtocolError(f"Control.max_staleness {c.max_staleness} < 0")
    if c.batch_groups < 1:
        raise ProtocolError(f"Control.batch_groups {c.batch_groups} < 1")
    if not (math.isfinite(c.lam) and c.lam >= 0):
        raise ProtocolError(f"Control.lam {c.lam} must be finite and >= 0")
