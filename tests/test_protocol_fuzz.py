"""Fuzzing the decoders: whatever bytes arrive, decoding a message (``protocol.decode``) or a stream entry (the
reader's ``buffer.reader.decode_entry``) returns a valid object or raises ProtocolError, never anything else.

Two kinds of input: arbitrary bytes (mostly rejected by msgpack itself), and msgpack maps that carry the right
field names with values of the wrong type, or of the right type with wrong contents (lengths that disagree,
negative ids, NaN, unknown enum values), which get past the decoder into the validation code.
"""

from __future__ import annotations

import msgspec
import msgspec.inspect as mi
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buffer.reader import decode_entry, is_stale, newest_version
from protocol import ProtocolError, TrajectoryGroup, decode, validate_group
from protocol.messages import _MESSAGE_TYPES

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = 97

# Any msgpack value: what a buggy or hostile writer can put under a field name.
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=16) | st.binary(max_size=32))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=6)


def mostly(usual: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly ``usual``, sometimes ``other``: inputs must mostly get past one check to exercise the next. (A
    mid-range roll picks ``other``: hypothesis draws the bounds of a range more often than the rest.)"""
    return st.integers(0, 5).flatmap(lambda r: other if r == 2 else usual)


def packed(dtype: str, elements, n: int) -> st.SearchStrategy[bytes]:
    """A raw little-endian array as the wire carries it: mostly ``n`` entries (the trajectory's length), else
    any length, or bytes that are no whole number of entries."""
    arrays = mostly(st.lists(elements, min_size=n, max_size=n), st.lists(elements, max_size=12))
    return mostly(arrays.map(lambda xs: np.array(xs, dtype=dtype).tobytes()), st.binary(max_size=20))


def contents(name: str, n: int) -> st.SearchStrategy | None:
    """Right types with contents the validation must catch, for the fields it reads (by field name); ``n`` is
    the length the trajectory's arrays mostly share. None: no special contents for this field."""
    return {
        "token_ids": packed("<i4", mostly(st.integers(0, 100), st.integers(-3, 2**31 - 1)), n),
        "logprobs": packed("<f4", mostly(st.floats(-30, 0, width=32), st.floats(width=32)), n),
        "versions": packed("<i4", mostly(st.integers(0, 30), st.integers(-3, 100)), n),
        "loss_mask": packed("<u1", mostly(st.integers(0, 1), st.integers(0, 255)), n),
        "turn_starts": st.lists(st.integers(-3, n + 2), max_size=4),
        "prompt_len": st.integers(-3, n + 3),
        "version": st.integers(-3, 40),
        "max_staleness": st.integers(-3, 10),
        "batch_groups": st.integers(-3, 10),
        "sha256": mostly(st.text("0123456789abcdef", min_size=64, max_size=64), st.text(max_size=65)),
    }.get(name)


def typed(t: mi.Type, name: str = "", n: int = 4) -> st.SearchStrategy:
    """A value of msgspec type ``t`` (the field ``name``'s special contents when it has some), any contents."""
    special = contents(name, n)
    if special is not None:
        return special
    if isinstance(t, mi.StructType):
        return st.deferred(lambda: struct_maps(t.cls))
    if isinstance(t, mi.ListType):
        return st.lists(typed(t.item_type), min_size=name == "trajectories", max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(typed(t.key_type), typed(t.value_type), max_size=3)
    if isinstance(t, mi.LiteralType):  # protocol.vocab's enums: mostly allowed values
        return mostly(st.sampled_from(t.values), st.text(max_size=8))
    return {mi.IntType: mostly(st.integers(-3, 40), st.integers(-(2**63), 2**64 - 1)),
            mi.FloatType: mostly(st.floats(-1e6, 1e6), st.floats()), mi.StrType: st.text(max_size=12),
            mi.BytesType: st.binary(max_size=32), mi.BoolType: st.booleans()}[type(t)]


@st.composite
def struct_maps(draw, cls: type) -> dict:
    """A msgpack map for Struct ``cls``: every field under its name with a value of its type, except that each
    field is left out (1 in 40) or given any msgpack value instead (1 in 40), and an unknown key may be added."""
    n = draw(st.integers(1, 8))  # the length a trajectory's arrays mostly share
    out = {}
    for f in mi.type_info(cls).fields:
        roll = draw(st.integers(0, 39))  # mid-range values: hypothesis draws the bounds more often than 1 in 40
        if roll == 17:
            continue
        out[f.encode_name] = draw(VALUES if roll == 23 else typed(f.type, f.encode_name, n))
    if draw(st.integers(0, 9)) == 0:
        out.setdefault(draw(st.text(max_size=6)), draw(VALUES))
    return out


GROUP_MAPS = struct_maps(TrajectoryGroup)
MESSAGE_MAPS = st.sampled_from([t for t in _MESSAGE_TYPES if t is not TrajectoryGroup]).flatmap(
    lambda t: st.tuples(st.just(t), struct_maps(t)))


def decode_or_protocol_error(data, type_: type, **kw):
    """The decoded message, or None when it raised ProtocolError (anything else fails the test)."""
    try:
        msg = decode(data, type_, **kw)
    except ProtocolError as e:
        assert str(e)
        return None
    assert isinstance(msg, type_)
    return msg


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(_MESSAGE_TYPES))
def test_arbitrary_bytes_decode_to_a_message_or_protocol_error(data, type_):
    decode_or_protocol_error(data, type_)


@FUZZ
@given(MESSAGE_MAPS)
def test_maps_with_wrong_types_or_values_decode_to_a_message_or_protocol_error(case):
    type_, fields = case
    decode_or_protocol_error(msgspec.msgpack.encode(fields), type_)


@FUZZ
@given(GROUP_MAPS, st.none() | st.integers(0, 40))
def test_group_maps_with_wrong_types_or_values_decode_validly_or_raise_protocol_error(fields, current_version):
    group = decode_or_protocol_error(msgspec.msgpack.encode(fields), TrajectoryGroup, vocab_size=VOCAB,
                                     current_version=current_version)
    if group is not None:  # whatever got through satisfies every rule
        validate_group(group, vocab_size=VOCAB, current_version=current_version)
        assert all(len(t.logprobs_np) == len(t.versions_np) == len(t.mask_np) == len(t) > 0
                   for t in group.trajectories)


# The fields of a stream entry as redis-py returns them: the writer's ``data`` (a group's msgpack, or garbage
# written by something else), left out sometimes, beside any other fields.
ENTRY_FIELDS = st.tuples(
    st.fixed_dictionaries({}, optional={b"data": st.binary(max_size=64) | GROUP_MAPS.map(msgspec.msgpack.encode)}),
    st.dictionaries(st.binary(max_size=6), st.binary(max_size=16), max_size=2),
).map(lambda t: {**t[1], **t[0]})


@FUZZ
@given(ENTRY_FIELDS, st.integers(0, 40))
def test_stream_entries_decode_to_a_group_or_protocol_error(fields, current_version):
    """The reader's path for one entry: decode_entry, then the staleness rule on what it returned."""
    try:
        group = decode_entry(fields, vocab_size=VOCAB, current_version=current_version)
    except ProtocolError as e:
        assert str(e)
        return
    assert isinstance(group, TrajectoryGroup)
    newest = newest_version(group)
    assert 0 <= newest <= current_version
    assert is_stale(newest, current_version, 0) == (newest < current_version)
