"""Wire protocol: round trips of random valid groups, hostile bytes, and one case per validation rule."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protocol import (
    FINISH_REASONS,
    ChunkHeader,
    Control,
    FetchChunk,
    ProtocolError,
    Trajectory,
    TrajectoryGroup,
    WeightsReady,
    decode,
    decode_group,
    encode,
)

VOCAB = 97
MAX_VERSION = 20
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def trajectories(draw) -> Trajectory:
    n = draw(st.integers(1, 48))
    mask = draw(arrays(np.uint8, n, elements=st.integers(0, 1)))
    mask[draw(st.integers(0, n - 1))] = 1  # at least one generated token
    gen = mask.astype(bool)
    ids = draw(arrays(np.int32, n, elements=st.integers(0, VOCAB - 1)))
    logprobs = draw(arrays(np.float32, n, elements=st.floats(-60.0, 0.0, width=32)))
    versions = draw(arrays(np.int32, n, elements=st.integers(0, MAX_VERSION)))
    starts = sorted(draw(st.sets(st.integers(0, n - 1), max_size=4)))
    return Trajectory.from_arrays(
        ids, np.where(gen, logprobs, 0.0), np.where(gen, versions, -1), mask,
        reward=draw(st.floats(-1e6, 1e6)), turn_starts=starts,
        finish_reason=draw(st.sampled_from(FINISH_REASONS)), prompt_len=draw(st.integers(0, n)),
    )


@st.composite
def groups(draw) -> TrajectoryGroup:
    return TrajectoryGroup(
        group_id=draw(st.text(min_size=1, max_size=20)),
        actor_id=draw(st.text(max_size=10)),
        engine=draw(st.sampled_from(["vllm-cpu/bf16", "vllm/fp8", ""])),
        env=draw(st.text(max_size=10)),
        seed=draw(st.integers(-(2**62), 2**62)),
        trajectories=draw(st.lists(trajectories(), min_size=1, max_size=4)),
        created_at=draw(st.floats(0, 2e9)),
    )


@PROPERTY
@given(groups())
def test_group_round_trip_is_lossless(g):
    back = decode_group(encode(g), vocab_size=VOCAB, current_version=MAX_VERSION)
    assert back == g
    for a, b in zip(back.trajectories, g.trajectories):
        assert np.array_equal(a.tokens_np, b.tokens_np)
        assert np.array_equal(a.logprobs_np, b.logprobs_np)
        assert np.array_equal(a.versions_np, b.versions_np)
        assert np.array_equal(a.mask_np, b.mask_np)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([TrajectoryGroup, WeightsReady, Control, FetchChunk, ChunkHeader]))
def test_random_bytes_only_ever_raise_protocol_error(data, type_):
    try:
        decode(data, type_)
    except ProtocolError as e:
        assert str(e)


@PROPERTY
@given(groups(), st.data())
def test_corrupted_group_bytes_decode_validly_or_raise_protocol_error(g, data):
    raw = bytearray(encode(g))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        back = decode_group(bytes(raw[:cut]), vocab_size=VOCAB, current_version=MAX_VERSION)
    except ProtocolError as e:
        assert str(e)
    else:  # whatever survives corruption must still satisfy every rule
        for t in back.trajectories:
            assert len(t.logprobs_np) == len(t) and np.isfinite(t.logprobs_np).all()
            assert (t.tokens_np < VOCAB).all()


# -- one case per rule ---------------------------------------------------------------------------------


def traj(n: int = 6, **over) -> Trajectory:
    """A valid trajectory (2 prompt tokens, then generated ones at version 1) with fields replaced."""
    mask = np.array([0, 0] + [1] * (n - 2), dtype=np.uint8)
    base = Trajectory.from_arrays(np.arange(n), np.where(mask, -0.5, 0.0), np.where(mask, 1, -1), mask,
                                  reward=1.0, turn_starts=[2], prompt_len=2)
    return msgspec.structs.replace(base, **over)


def group(*ts: Trajectory, **over) -> TrajectoryGroup:
    fields = dict(group_id="a-0", actor_id="a", engine="e", env="arithmetic", seed=1, trajectories=list(ts) or [traj()])
    fields.update(over)
    return TrajectoryGroup(**fields)


def _f32(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


def _i32(*values: int) -> bytes:
    return np.array(values, dtype="<i4").tobytes()


PERTURBATIONS = ("none", "prompt_logprob_positive", "gen_logprob_positive", "gen_logprob_rounding", "nan", "inf",
                 "prompt_version_future", "gen_version_future", "gen_version_negative", "prompt_version_negative",
                 "id_negative", "id_at_vocab", "mask_2", "no_generated_token")


@st.composite
def perturbed_trajectories(draw) -> Trajectory:
    """A valid trajectory with up to two rule-edge changes, on prompt or generated tokens: the cases the
    joint check could get wrong (a rule over all tokens standing in for one over generated tokens)."""
    n = draw(st.integers(2, 24))
    mask = draw(arrays(np.uint8, n, elements=st.integers(0, 1)))
    mask[draw(st.integers(0, n - 1))] = 1
    mask[draw(st.integers(0, n - 1))] = 0  # a prompt token too (unless it was the only generated one)
    if not mask.any():
        mask[0] = 1
    gen = mask.astype(bool)
    ids = draw(arrays(np.int32, n, elements=st.integers(0, VOCAB - 1)))
    lp = np.where(gen, draw(arrays(np.float32, n, elements=st.floats(-60.0, 0.0, width=32))), 0.0).astype(np.float32)
    ver = np.where(gen, draw(arrays(np.int32, n, elements=st.integers(0, MAX_VERSION))), -1).astype(np.int32)
    for change in draw(st.lists(st.sampled_from(PERTURBATIONS), max_size=2)):
        on_gen = np.flatnonzero(gen)[draw(st.integers(0, int(gen.sum()) - 1))]
        on_prompt = np.flatnonzero(~gen)[draw(st.integers(0, int((~gen).sum()) - 1))] if (~gen).any() else None
        at = draw(st.integers(0, n - 1))
        if change == "prompt_logprob_positive" and on_prompt is not None:
            lp[on_prompt] = 3.0
        elif change == "gen_logprob_positive":
            lp[on_gen] = 2e-4
        elif change == "gen_logprob_rounding":
            lp[on_gen] = 5e-5
        elif change == "nan":
            lp[at] = np.nan
        elif change == "inf":
            lp[at] = -np.inf
        elif change == "prompt_version_future" and on_prompt is not None:
            ver[on_prompt] = MAX_VERSION + 5
        elif change == "gen_version_future":
            ver[on_gen] = MAX_VERSION + 1
        elif change == "gen_version_negative":
            ver[on_gen] = -1
        elif change == "prompt_version_negative" and on_prompt is not None:
            ver[on_prompt] = -7
        elif change == "id_negative":
            ids[at] = -1
        elif change == "id_at_vocab":
            ids[at] = VOCAB
        elif change == "mask_2":
            mask[at] = 2
        elif change == "no_generated_token":
            mask[:] = 0
    return Trajectory.from_arrays(ids, lp, ver, mask, reward=0.0, turn_starts=[], finish_reason="stop",
                                  prompt_len=0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(perturbed_trajectories(), min_size=1, max_size=4), st.sampled_from([None, VOCAB]),
       st.sampled_from([None, MAX_VERSION]))
def test_joint_group_check_agrees_with_the_per_trajectory_rules(trajs, vocab_size, current_version):
    """The reader's one-pass check over the joined arrays (messages._group_ok) accepts exactly the groups whose
    every trajectory passes validate_trajectory."""
    from protocol.messages import _group_ok, validate_trajectory

    g = TrajectoryGroup(group_id="g", actor_id="a", engine="e", env="x", seed=0, trajectories=trajs, created_at=0.0)
    try:
        for t in trajs:
            validate_trajectory(t, vocab_size=vocab_size, current_version=current_version)
        each_ok = True
    except ProtocolError:
        each_ok = False
    assert _group_ok(g, vocab_size, current_version) == each_ok


def test_valid_group_passes_every_rule():
    g = group()
    assert decode_group(encode(g), vocab_size=6, current_version=1) == g


def test_truncated_message_is_rejected():
    raw = encode(group())
    for cut in (0, 1, len(raw) // 2, len(raw) - 1):
        with pytest.raises(ProtocolError, match="TrajectoryGroup"):
            decode_group(raw[:cut])


@pytest.mark.parametrize("bad, field", [
    ({"group_id": 7}, "group_id"),
    ({"seed": "one"}, "seed"),
    ({"trajectories": "none"}, "trajectories"),
    ({"trajectories": [{"token_ids": [1, 2, 3]}]}, "token_ids"),
])
def test_wrong_types_are_rejected_naming_the_field(bad, field):
    fields = msgspec.to_builtins(group())
    fields.update(bad)
    with pytest.raises(ProtocolError, match=field):
        decode_group(msgspec.msgpack.encode(fields))


def test_non_bytes_input_is_rejected():
    with pytest.raises(ProtocolError, match="expected bytes"):
        decode_group("a string")


@pytest.mark.parametrize("over, reason", [
    ({"logprobs": _f32(-0.1, -0.1, -0.1)}, "length mismatch: logprobs"),
    ({"versions": _i32(1, 1, 1, 1, 1, 1, 1)}, "length mismatch: versions"),
    ({"loss_mask": b"\x00\x01"}, "length mismatch: loss_mask"),
    ({"logprobs": _f32(0, 0, -1, -1, -1, -1)[:-1]}, "not a multiple of 4"),
])
def test_length_mismatch_is_rejected(over, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_group(encode(group(traj(**over))))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_logprob_is_rejected(value):
    bad = traj(logprobs=_f32(0, 0, -0.5, value, -0.5, -0.5))
    with pytest.raises(ProtocolError, match="non-finite logprob"):
        decode_group(encode(group(bad)))


def test_positive_logprob_is_rejected_but_rounding_of_log1_is_not():
    with pytest.raises(ProtocolError, match="positive logprob"):
        decode_group(encode(group(traj(logprobs=_f32(0, 0, -0.5, 0.3, -0.5, -0.5)))))
    decode_group(encode(group(traj(logprobs=_f32(0, 0, -0.5, 1e-6, -0.5, -0.5)))))


def test_version_from_the_future_is_rejected():
    g = group(traj(versions=_i32(-1, -1, 1, 1, 5, 1)))
    with pytest.raises(ProtocolError, match="from the future"):
        decode_group(encode(g), current_version=4)
    assert decode_group(encode(g), current_version=5) == g  # the learner's own version is not the future
    assert decode_group(encode(g)) == g  # no current version given: not checked


def test_token_id_at_or_above_vocab_is_rejected():
    g = group(traj(token_ids=_i32(0, 1, 2, 3, 4, 50)))
    with pytest.raises(ProtocolError, match="token id 50 >= vocab size 50"):
        decode_group(encode(g), vocab_size=50)
    assert decode_group(encode(g), vocab_size=51) == g


@pytest.mark.parametrize("over, reason", [
    ({"token_ids": _i32(0, 1, -3, 3, 4, 5)}, "negative token id"),
    ({"loss_mask": bytes([0, 0, 1, 2, 1, 1])}, "only 0 and 1"),
    ({"loss_mask": bytes(6)}, "no generated token"),
    ({"versions": _i32(-1, -1, 1, -2, 1, 1)}, "negative version"),
    ({"reward": math.nan}, "reward is not finite"),
    ({"finish_reason": "bored"}, "finish_reason"),
    ({"prompt_len": 7}, "prompt_len"),
    ({"turn_starts": [4, 2]}, "turn_starts"),
    ({"turn_starts": [6]}, "turn_starts"),
    ({"token_ids": b"", "logprobs": b"", "versions": b"", "loss_mask": b""}, "empty trajectory"),
])
def test_other_trajectory_rules(over, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_group(encode(group(traj(**over))))


def test_group_rules():
    with pytest.raises(ProtocolError, match="no trajectories"):
        decode_group(encode(TrajectoryGroup(group_id="x", actor_id="a", engine="e", env="v", seed=0, trajectories=[])))
    with pytest.raises(ProtocolError, match="group_id is empty"):
        decode_group(encode(group(group_id="")))
    # the reason names the offending trajectory inside the group
    with pytest.raises(ProtocolError, match="trajectory 1"):
        decode_group(encode(group(traj(), traj(reward=math.inf))))


def test_control_and_weights_ready_rules():
    with pytest.raises(ProtocolError, match="max_staleness"):
        decode(encode(Control(version=1, max_staleness=-1)), Control)
    with pytest.raises(ProtocolError, match="batch_groups"):
        decode(encode(Control(version=1, max_staleness=1, batch_groups=0)), Control)
    with pytest.raises(ProtocolError, match="sha256"):
        decode(encode(WeightsReady(version=1, path="/p", sha256="xyz")), WeightsReady)
    w = WeightsReady(version=1, path="/p", sha256="0" * 64)
    assert decode(encode(w), WeightsReady) == w


def test_group_with_long_trajectories_is_valid():
    # 300 generated tokens per trajectory: the joint check must not overflow a uint8 reduction.
    n = 300
    t = Trajectory.from_arrays(np.arange(n) % 50, np.full(n, -0.1), np.zeros(n), np.ones(n), reward=1.0)
    g = TrajectoryGroup(group_id="long", actor_id="a", engine="e", env="x", seed=0, trajectories=[t, t])
    assert decode_group(encode(g), vocab_size=64, current_version=0) == g


def test_group_error_names_the_bad_trajectory():
    good = Trajectory.from_arrays([1, 2], [0.0, -0.1], [-1, 0], [0, 1], reward=0.0)
    bad = Trajectory.from_arrays([1, 2], [0.0, 0.5], [-1, 0], [0, 1], reward=0.0)
    g = TrajectoryGroup(group_id="g", actor_id="a", engine="e", env="x", seed=0, trajectories=[good, bad])
    with pytest.raises(ProtocolError, match="trajectory 1: positive logprob"):
        decode_group(encode(g))
