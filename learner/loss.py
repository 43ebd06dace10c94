"""Policy-gradient loss: GRPO advantages, behaviour (importance) weights per mode, decoupled PPO clip.

Per generated token t, with pi_theta the policy being trained, pi_prox the learner's weights at the start
of the step (no grad), mu the actor's behaviour policy, rho_t = pi_prox(a_t) / mu(a_t):

    advantage  A_i = (r_i - mean_g r) / (std_g r + eps) over the G samples of a group, A_t = A_i
    ratio      r_t = pi_theta(a_t) / pi_prox(a_t)          (mode none: pi_theta / mu, mu as pi_old)
    objective  L = -1/N sum_{t kept} w_t min(r_t A'_t, clip(r_t, 1 - eps_lo, 1 + eps_hi) A'_t)

Behaviour weight w_t and kept tokens by mode (``controller.mode``):

    none            w = 1
    tis/fixed/sync  w = min(rho, C)
    icepop          w = rho, tokens with rho outside [low, high] dropped
    mis             w = min(rho, high); a sequence whose geometric-mean rho is outside [low, high] dropped
    dcmdp           w = min(rho, beta), tokens with rho outside [1/beta, beta] dropped

dcmdp penalty (``controller.penalty``): ``advantage`` shapes A'_t = A_t - lambda * delta_t (delta_t the
per-token discrepancy, detached); ``k2`` adds lambda/N sum_{t generated} 1/2 (log pi_theta - log mu)^2.
The dcmdp total is divided by (1 + lambda), so lambda trades reward for discrepancy without scaling the
step. N = ``n_tokens_total``: the generated tokens of the whole optimizer step, so the losses of its
micro-batches add up to the full-batch loss (token-level aggregation).

All inputs are flat Tensor[T] over the tokens of a micro-batch; gradients reach only ``logp_new``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.vocab import CONTROLLER_MODES

if TYPE_CHECKING:
    from torch import Tensor

    from configs.schema import ControllerConfig

def grpo_advantages(rewards: "Tensor", eps: float = 1e-6) -> "Tensor":
    """A_i = (r_i - mean r) / (std r + eps) over one group's G rewards, Tensor[G] -> Tensor[G].

    Population std (correction 0): a group of one gets A = 0 instead of NaN. Equal rewards carry no
    signal and give exactly zero advantages."""
    r = rewards if rewards.is_floating_point() else rewards.float()
    return (r - r.mean()) / (r.std(correction=0) + eps)


def sequence_geo_mean_ratio(log_rho: "Tensor", mask: "Tensor", seq_index: "Tensor") -> "Tensor":
    """Geometric-mean rho of each sequence, exp(sum_t m_t log rho_t / sum_t m_t), broadcast back to
    Tensor[T] (every token gets its sequence's value; 1 for a sequence without generated tokens).

    ``seq_index`` Tensor[T] int: which sequence each token belongs to (0..S-1). Sized by T, not by
    max(seq_index), so no host sync is needed."""
    import torch

    idx = seq_index.long()
    n_slots = idx.numel()
    sums = torch.zeros(n_slots, dtype=log_rho.dtype, device=log_rho.device)
    counts = torch.zeros_like(sums)
    sums.scatter_add_(0, idx, torch.where(mask, log_rho, 0.0))
    counts.scatter_add_(0, idx, mask.to(sums.dtype))
    return (sums / counts.clamp_min(1)).exp()[idx]


def behaviour_weights(logp_prox: "Tensor", logp_mu: "Tensor", mask: "Tensor", mode: str, lam: float,
                      beta: float, cfg: "ControllerConfig",
                      seq_index: "Tensor | None" = None) -> tuple["Tensor", "Tensor", dict[str, "Tensor"]]:
    """Per-token weights w Tensor[T] (detached), kept-token mask Tensor[T] bool, and 0-dim metric tensors.

    ``policy_loss`` calls this; ``lam`` is accepted for symmetry with the loss (the bound ``beta`` already
    carries it). ``seq_index`` is required for ``mis``. Weights are 0 at tokens that are not kept."""
    import torch

    if mode not in CONTROLLER_MODES:
        raise ValueError(f"unknown controller mode {mode!r}; expected one of {CONTROLLER_MODES}")
    mask = mask.bool()
    log_rho = torch.where(mask, logp_prox.detach() - logp_mu.detach(), 0.0)
    rho = log_rho.exp()
    keep = mask
    if mode == "none":
        w = torch.ones_like(rho)
    elif mode in ("tis", "fixed", "sync"):
        w = rho.clamp(max=cfg.tis_cap)
    elif mode == "icepop":
        keep = mask & (rho >= cfg.icepop_low) & (rho <= cfg.icepop_high)
        w = rho
    elif mode == "mis":
        if seq_index is None:
            raise ValueError("mode 'mis' needs seq_index (the sequence of each token)")
        geo = sequence_geo_mean_ratio(log_rho, mask, seq_index)
        keep = mask & (geo >= cfg.mis_low) & (geo <= cfg.mis_high)
        w = rho.clamp(max=cfg.mis_high)
    else:  # dcmdp
        keep = mask & (rho >= 1.0 / beta) & (rho <= beta)
        w = rho.clamp(max=beta)
    w = torch.where(keep, w, 0.0)
    n_mask = mask.sum().clamp_min(1)
    metrics = {
        "masked_frac": (mask & ~keep).sum() / n_mask,
        "mean_w": w.sum() / keep.sum().clamp_min(1),
        "mean_rho": torch.where(mask, rho, 0.0).sum() / n_mask,
    }
    return w, keep, metrics


def policy_loss(logp_new: "Tensor", logp_prox: "Tensor", logp_mu: "Tensor", advantages_tok: "Tensor",
                mask: "Tensor", *, mode: str, lam: float, beta: float, per_token_d: "Tensor | None",
                cfg: "ControllerConfig", clip_low: float, clip_high: float, n_tokens_total: int,
                seq_index: "Tensor | None" = None) -> tuple["Tensor", dict[str, float]]:
    """Decoupled PPO clip loss of one micro-batch (see the module docstring) and its metrics as floats.

    The learner calls it per micro-batch and backpropagates each loss; ``n_tokens_total`` is the step's
    count of generated tokens, so the micro-batch losses (and gradients) sum to the full-batch ones.
    ``per_token_d`` Tensor[T] is required for dcmdp with the advantage penalty. One host sync (metrics)."""
    import torch

    if n_tokens_total < 1:
        raise ValueError(f"n_tokens_total must be >= 1, got {n_tokens_total}")
    mask = mask.bool()
    w, keep, metrics = behaviour_weights(logp_prox, logp_mu, mask, mode, lam, beta, cfg, seq_index)
    adaptive = mode == "dcmdp"
    adv = advantages_tok.detach()
    if adaptive and cfg.penalty == "advantage":
        if per_token_d is None:
            raise ValueError("dcmdp with penalty 'advantage' needs per_token_d")
        adv = adv - lam * per_token_d.detach()

    old = logp_mu if mode == "none" else logp_prox
    # where() before exp: masked-out positions may hold -inf/garbage, and a 0 there keeps their gradient 0.
    log_ratio = torch.where(mask, logp_new - old.detach(), 0.0)
    ratio = log_ratio.exp()
    surr = ratio * adv
    surr_clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -w * torch.minimum(surr, surr_clipped)
    pg_loss = torch.where(keep, per_token, 0.0).sum() / n_tokens_total

    penalty = torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)
    if adaptive and cfg.penalty == "k2":
        # Over all generated tokens, IS-dropped ones included: those are the ones to pull back toward mu.
        diff = torch.where(mask, logp_new - logp_mu.detach(), 0.0)
        penalty = lam * (0.5 * diff.square()).sum() / n_tokens_total
    scale = 1.0 / (1.0 + lam) if adaptive else 1.0
    loss = (pg_loss + penalty) * scale

    with torch.no_grad():
        n_keep = keep.sum()
        clipped = keep & (surr_clipped < surr)
        names = ["loss", "pg_loss", "penalty", "clip_frac", "mean_ratio", "mean_adv", "n_tokens", "n_kept",
                 *metrics]
        values = [loss.detach(), pg_loss.detach(), penalty.detach(), clipped.sum() / n_keep.clamp_min(1),
                  torch.where(keep, ratio, 0.0).sum() / n_keep.clamp_min(1),
                  torch.where(keep, adv, 0.0).sum() / n_keep.clamp_min(1), mask.sum(), n_keep,
                  *metrics.values()]
        host = torch.stack([v.double() for v in values]).tolist()  # the one host sync
    return loss, dict(zip(names, host))
