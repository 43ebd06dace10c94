"""Synthetic but valid TrajectoryGroups, shaped like real ones, for the buffer's tests and benchmark."""

from __future__ import annotations

import numpy as np

from protocol import Trajectory, TrajectoryGroup


def synthetic_trajectory(rng: np.random.Generator, n_tokens: int, vocab_size: int, version: int,
                         prompt_frac: float = 0.125) -> Trajectory:
    """One trajectory of ``n_tokens``: a prompt (mask 0, logprob 0, version -1) then generated tokens
    (mask 1, logprob in [-8, 0), ``version``). At least one generated token."""
    prompt_len = min(n_tokens - 1, int(n_tokens * prompt_frac))
    mask = np.zeros(n_tokens, dtype=np.uint8)
    mask[prompt_len:] = 1
    gen = mask.astype(bool)
    logprobs = np.where(gen, -rng.exponential(1.0, n_tokens).clip(1e-6, 8.0), 0.0)
    versions = np.where(gen, version, -1)
    return Trajectory.from_arrays(
        rng.integers(0, vocab_size, n_tokens), logprobs, versions, mask,
        reward=float(rng.random()), turn_starts=[prompt_len], finish_reason="stop", prompt_len=prompt_len,
    )


def synthetic_group(rng: np.random.Generator, group_id: str, *, n_traj: int = 8, n_tokens: int = 64,
                    vocab_size: int = 64, version: int = 0, actor_id: str = "synthetic") -> TrajectoryGroup:
    """A valid group of ``n_traj`` trajectories of ``n_tokens`` tokens each."""
    return TrajectoryGroup(
        group_id=group_id, actor_id=actor_id, engine="synthetic", env="synthetic", seed=int(rng.integers(1 << 30)),
        trajectories=[synthetic_trajectory(rng, n_tokens, vocab_size, version) for _ in range(n_traj)],
        created_at=0.0,
    )
