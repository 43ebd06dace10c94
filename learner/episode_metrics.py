"""Per-step spread of the episodes a learner step trains: lengths (turns, tokens) and policy versions per episode.

Long episodes are never discarded for being slow (``buffer.reader.is_stale`` looks at the newest token of a
group), so a batch mixes short and long episodes, and one long episode carries tokens of several policy versions
(the actor loads new weights between turns). These metrics make both visible in ``metrics.jsonl``::

    episode/turns_p50, _p90, _max          model turns per episode
    episode/tokens_p50, _p90, _max         tokens per episode (prompt, model turns and observations)
    episode/version_span, _span_max        mean / max over episodes of max(version) - min(version) of its
                                           generated tokens (0: one policy wrote the whole episode)
    episode/multi_version_frac             share of episodes whose generated tokens span >= 2 versions
"""

from __future__ import annotations

import numpy as np


def version_span(versions: np.ndarray, mask: np.ndarray) -> int:
    """max(version) - min(version) over the generated tokens (mask 1) of one trajectory; 0 without any."""
    v = versions[mask.astype(bool)]
    return int(v.max() - v.min()) if v.size else 0


def episode_length_stats(groups) -> dict[str, float]:
    """Quantiles of turns and tokens per episode, and version span per episode, over a batch of groups."""
    trajs = [t for g in groups for t in g.trajectories]
    if not trajs:
        return {}
    turns = np.array([len(t.turn_starts) for t in trajs], dtype=np.float64)
    tokens = np.array([len(t) for t in trajs], dtype=np.float64)
    spans = np.array([version_span(t.versions_np, t.mask_np) for t in trajs], dtype=np.float64)
    row: dict[str, float] = {}
    for name, x in (("turns", turns), ("tokens", tokens)):
        p50, p90 = np.quantile(x, [0.5, 0.9])
        row.update({f"episode/{name}_p50": float(p50), f"episode/{name}_p90": float(p90),
                    f"episode/{name}_max": float(x.max())})
    row.update({"episode/version_span": float(spans.mean()), "episode/version_span_max": float(spans.max()),
                "episode/multi_version_frac": float((spans >= 1).mean())})
    return row


def episode_lengths(groups) -> list[list[int]]:
    """[turns, tokens] of every episode of ``groups``, in order: what ``learner.log_group_ids`` logs per step
    beside the group ids, so that a run's trained length distribution can be checked against the actors'."""
    return [[len(t.turn_starts), len(t)] for g in groups for t in g.trajectories]
