"""The project's vocabulary: every closed set of names that crosses a module or process boundary, defined once.

Each set is a ``Literal`` alias (what configs, msgspec Structs and signatures annotate with; msgspec and
pydantic both reject other values at decode time) and a tuple of its values (for membership checks and
error messages). Nothing else in the tree spells these lists out.
"""

from __future__ import annotations

from typing import Literal, get_args

Transport = Literal["files", "nccl", "gloo"]
"""How the learner's new weights reach the actors (``learner.weight_transfer``, ``WeightsReady.transport``):
versioned safetensors files, or a broadcast into the actors' vLLM workers over NCCL or gloo."""
CollectiveTransport = Literal["nccl", "gloo"]
"""The transports that broadcast (no file): ``learner.transfer`` and ``weights.collective``."""

ControllerMode = Literal["dcmdp", "none", "tis", "icepop", "mis", "fixed", "sync"]
"""Off-policy handling of the learner (``controller.mode``); see ``configs.schema.ControllerConfig``."""

FinishReason = Literal["stop", "length", "turn_limit", "token_limit"]
"""Why an episode ended (``Trajectory.finish_reason``), as ``envs.episode.run_episode`` reports it:
stop (env done after a turn that closed with EOS), length (env done, last turn cut at its token budget),
turn_limit / token_limit (the episode's turn or token budget ran out before the env ended it; reward 0)."""

WeightQuant = Literal["none", "int8", "fp8"]
"""Precision of the weights the actors serve (``actor.weight_quant``): as trained, or rounded to int8 / fp8 per
output channel at publish (``weights.quant``)."""

TRANSPORTS: tuple[str, ...] = get_args(Transport)
COLLECTIVE_TRANSPORTS: tuple[str, ...] = get_args(CollectiveTransport)
CONTROLLER_MODES: tuple[str, ...] = get_args(ControllerMode)
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)
WEIGHT_QUANTS: tuple[str, ...] = get_args(WeightQuant)
TRUNCATED_FINISH_REASONS: tuple[str, ...] = ("length", "turn_limit", "token_limit")
"""Finish reasons of episodes cut by a budget rather than ended by the environment after an EOS."""
