"""dcrl wire protocol: msgspec Structs, msgpack encoding, one ProtocolError for every bad input."""

from protocol.messages import (
    ActorReport,
    ChunkHeader,
    FetchChunk,
    Control,
    ProtocolError,
    Trajectory,
    TrajectoryGroup,
    TransferReply,
    TransferRequest,
    WeightsReady,
    decode,
    decode_group,
    encode,
    encode_group,
    encoded_size_hint,
    validate_group,
    validate_trajectory,
)
from protocol.vocab import FINISH_REASONS

__all__ = [
    "ActorReport",
    "ChunkHeader",
    "FetchChunk",
    "FINISH_REASONS",
    "Control",
    "ProtocolError",
    "Trajectory",
    "TrajectoryGroup",
    "TransferReply",
    "TransferRequest",
    "WeightsReady",
    "decode",
    "decode_group",
    "encode",
    "encode_group",
    "encoded_size_hint",
    "validate_group",
    "validate_trajectory",
]
