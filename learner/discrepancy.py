"""Train/inference discrepancy of a batch of generated tokens: per-token metrics and their summary.

For each generated token t (loss mask m_t = 1) the learner has log pi_prox(a_t) (its current weights,
no grad), log mu(a_t) (the actor engine's behaviour logprob) and the token's policy lag
l_t = V - v_t. With log rho_t = log pi_prox(a_t) - log mu(a_t):

    k1_t       = -log rho_t                          (unbiased KL(mu || pi_prox) estimator, signed)
    k2_t       = 1/2 (log rho_t)^2
    k3_t       = rho_t - 1 - log rho_t               (>= 0, low-variance KL estimator)
    abs_prob_t = |pi_prox(a_t) - mu(a_t)|           (the paper's per-token |delta p|)

D = masked mean of the chosen metric. log rho mixes engine mismatch (lag 0) and policy lag, so D is
also split by lag bucket, D(l) = mean over tokens of lag l, and fitted as D(l) ~ D_engine + kappa * l.
ESS = (sum_t rho_t)^2 / (n sum_t rho_t^2) over the n masked tokens, in (0, 1].

Inputs are flat 1-D tensors over the tokens of a batch, ``Tensor[T]``. ``summarize`` is what the learner
calls once per step; it reads every statistic back to the host in one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor

METRICS = ("abs_prob", "k3", "k2")
DEFAULT_MAX_LAG_BUCKET = 64


def log_ratio(logp_prox: "Tensor", logp_mu: "Tensor") -> "Tensor":
    """log rho_t = log pi_prox(a_t) - log mu(a_t), Tensor[T]."""
    return logp_prox - logp_mu


def k1(logp_prox: "Tensor", logp_mu: "Tensor") -> "Tensor":
    """k1_t = -log rho_t, Tensor[T]."""
    return logp_mu - logp_prox


def k2(logp_prox: "Tensor", logp_mu: "Tensor") -> "Tensor":
    """k2_t = 1/2 (log rho_t)^2, Tensor[T]."""
    return 0.5 * log_ratio(logp_prox, logp_mu).square()


def k3(logp_prox: "Tensor", logp_mu: "Tensor") -> "Tensor":
    """k3_t = rho_t - 1 - log rho_t, Tensor[T]; expm1 keeps it accurate (and >= 0) for rho near 1."""
    lr = log_ratio(logp_prox, logp_mu)
    return (lr.expm1() - lr).clamp_min(0.0)


def abs_prob(logp_prox: "Tensor", logp_mu: "Tensor") -> "Tensor":
    """abs_prob_t = |pi_prox(a_t) - mu(a_t)|, Tensor[T]."""
    return (logp_prox.exp() - logp_mu.exp()).abs()


_METRIC_FNS: dict[str, Callable[["Tensor", "Tensor"], "Tensor"]] = {"abs_prob": abs_prob, "k3": k3, "k2": k2}


def per_token_discrepancy(logp_prox: "Tensor", logp_mu: "Tensor", metric: str) -> "Tensor":
    """delta_t of the configured metric (``controller.metric``), Tensor[T]. Used for D and by the
    advantage-shaping penalty A_t - lambda * delta_t in ``learner.loss``."""
    if metric not in _METRIC_FNS:
        raise ValueError(f"unknown discrepancy metric {metric!r}; expected one of {METRICS}")
    return _METRIC_FNS[metric](logp_prox, logp_mu)


def masked_mean(x: "Tensor", mask: "Tensor") -> "Tensor":
    """sum_t m_t x_t / max(1, sum_t m_t), a 0-dim tensor (0 when nothing is masked in).

    ``torch.where`` instead of ``x * mask`` so non-finite values at masked-out positions (padding)
    cannot leak in as NaN."""
    import torch

    mask = mask.bool()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)


def max_token(d: "Tensor", mask: "Tensor") -> "Tensor":
    """max_t {d_t : m_t = 1}, 0-dim tensor; -inf when no token is masked in."""
    import torch

    return torch.where(mask.bool(), d, float("-inf")).max()


def effective_sample_size(log_w: "Tensor", mask: "Tensor") -> "Tensor":
    """Normalised ESS = (sum w)^2 / (n sum w^2) over the n masked tokens, with w_t = exp(log_w_t).

    Invariant to a common scale of w, so the weights are shifted by their max before exp (no overflow
    for large log rho). 1 = all weights equal; 1/n = one token carries all the weight. NaN if n = 0."""
    import torch

    mask = mask.bool()
    shift = torch.where(mask, log_w, float("-inf")).max().detach()
    w = torch.where(mask, (log_w - shift).exp(), 0.0)
    n = mask.sum()
    return w.sum().square() / (n * w.square().sum())


def _lag_buckets(d: "Tensor", lag: "Tensor", mask: "Tensor", max_lag_bucket: int) -> tuple["Tensor", "Tensor"]:
    """Per-lag sums of d and token counts, two Tensor[max_lag_bucket + 1] in float64 on d's device.

    A fixed bucket count keeps this free of host syncs (``bincount`` would read max(lag) back);
    lags above ``max_lag_bucket`` are pooled in the last bucket."""
    import torch

    mask = mask.bool()
    idx = torch.where(mask, lag.long().clamp(0, max_lag_bucket), 0)
    sums = torch.zeros(max_lag_bucket + 1, dtype=torch.float64, device=d.device)
    counts = torch.zeros_like(sums)
    sums.scatter_add_(0, idx, torch.where(mask, d.double(), 0.0))
    counts.scatter_add_(0, idx, mask.double())
    return sums, counts


def discrepancy_by_lag(d: "Tensor", lag: "Tensor", mask: "Tensor",
                       max_lag_bucket: int = DEFAULT_MAX_LAG_BUCKET) -> dict[int, tuple[float, int]]:
    """{lag l: (mean of d over masked tokens of lag l, their count)} for every lag present.

    Lags above ``max_lag_bucket`` are pooled under ``max_lag_bucket``. Negative lags (a token from a
    version newer than the learner's) are a protocol violation: ValueError. One host sync."""
    import torch

    sums, counts = _lag_buckets(d, lag, mask, max_lag_bucket)
    min_lag = torch.where(mask.bool(), lag.long(), 0).min().double().reshape(1)
    host = torch.cat([min_lag, sums, counts]).tolist()  # the one host sync
    _check_min_lag(host[0])
    return _buckets_from_host(host[1:max_lag_bucket + 2], host[max_lag_bucket + 2:])


def _check_min_lag(min_lag: float) -> None:
    if min_lag < 0:
        raise ValueError(f"negative policy lag {int(min_lag)}: a token claims a version newer than the "
                         "learner's (actor and learner disagree on versions)")


def _buckets_from_host(sums: list[float], counts: list[float]) -> dict[int, tuple[float, int]]:
    return {lag: (s / c, int(c)) for lag, (s, c) in enumerate(zip(sums, counts)) if c > 0}


def fit_lag_slope(by_lag: dict[int, tuple[float, int]]) -> tuple[float | None, float | None]:
    """(D_engine, kappa) of the count-weighted least-squares line D(l) = D_engine + kappa * l.

    With n_l tokens at lag l, N = sum n_l, lbar = sum n_l l / N, Dbar = sum n_l D(l) / N:
        kappa = sum n_l (l - lbar)(D(l) - Dbar) / sum n_l (l - lbar)^2,   D_engine = Dbar - kappa * lbar.
    Fewer than two lag buckets determine no slope: kappa = None, and D_engine is the lag-0 mean if
    the single bucket is lag 0, else None. No buckets: (None, None). The intercept is an extrapolation
    when lag 0 is absent and may come out negative; callers prefer the measured lag-0 mean."""
    if not by_lag:
        return None, None
    if len(by_lag) == 1:
        (lag, (mean, _)), = by_lag.items()
        return (mean if lag == 0 else None), None
    n_total = sum(n for _, n in by_lag.values())
    lbar = sum(n * lag for lag, (_, n) in by_lag.items()) / n_total
    dbar = sum(n * mean for mean, n in by_lag.values()) / n_total
    sxx = sum(n * (lag - lbar) ** 2 for lag, (_, n) in by_lag.items())
    sxy = sum(n * (lag - lbar) * (mean - dbar) for lag, (mean, n) in by_lag.items())
    kappa = sxy / sxx
    return dbar - kappa * lbar, kappa


@dataclass(frozen=True)
class DiscrepancyStats:
    """One learner step's discrepancy summary; ``DCMDPController.observe`` reads it, the learner logs it."""

    metric: str  # which per-token metric ``total``, ``engine``, ``max_token`` and ``by_lag`` use
    total: float  # D: masked mean of the metric over all generated tokens (NaN if none)
    engine: float | None  # D(lag 0): pure engine mismatch; None if no lag-0 token in the batch
    engine_fit: float | None  # intercept D_engine of the lag fit (see fit_lag_slope)
    kappa: float | None  # fitted lag slope; None with fewer than two lag buckets
    max_token: float  # largest per-token metric value
    ess: float  # normalised effective sample size of rho
    k1: float  # masked means of each metric, whatever ``metric`` is
    k2: float
    k3: float
    abs_prob: float
    mean_lag: float
    n_tokens: int  # masked (generated) tokens summarised
    by_lag: dict[int, tuple[float, int]] = field(default_factory=dict)  # lag -> (mean, count)

    def to_metrics(self, prefix: str = "disc/") -> dict[str, float]:
        """Flat {name: float} for metrics.jsonl / wandb (None -> NaN, one entry per lag bucket)."""
        nan = float("nan")
        out = {f"{prefix}{k}": (nan if v is None else float(v)) for k, v in (
            ("total", self.total), ("engine", self.engine), ("engine_fit", self.engine_fit),
            ("kappa", self.kappa), ("max_token", self.max_token), ("ess", self.ess), ("k1", self.k1),
            ("k2", self.k2), ("k3", self.k3), ("abs_prob", self.abs_prob), ("mean_lag", self.mean_lag),
            ("n_tokens", self.n_tokens))}
        out.update({f"{prefix}lag{lag}": mean for lag, (mean, _) in self.by_lag.items()})
        return out


def summarize(logp_prox: "Tensor", logp_mu: "Tensor", lag: "Tensor", mask: "Tensor",
              metric: str = "abs_prob", max_lag_bucket: int = DEFAULT_MAX_LAG_BUCKET) -> DiscrepancyStats:
    """All discrepancy statistics of one batch, Tensor[T] inputs (lag = V - v_t, integer; mask bool).

    Called by the learner once per step, after recomputing ``logp_prox`` under no_grad. Every scalar is
    computed on the tensors' device and read back with a single ``.tolist()`` (one device->host sync
    per step, not one per metric). Raises ValueError on a negative lag among masked tokens."""
    import torch

    mask = mask.bool()
    # Neutralise masked-out positions once: prompt/env tokens carry logprob 0 from the actor and padding
    # may carry anything, which must not reach exp().
    lp_prox = torch.where(mask, logp_prox.detach(), 0.0)
    lp_mu = torch.where(mask, logp_mu.detach(), 0.0)
    lr = log_ratio(lp_prox, lp_mu)
    per_metric = {"k1": k1(lp_prox, lp_mu), "k2": k2(lp_prox, lp_mu), "k3": k3(lp_prox, lp_mu),
                  "abs_prob": abs_prob(lp_prox, lp_mu)}
    if metric not in METRICS:
        raise ValueError(f"unknown discrepancy metric {metric!r}; expected one of {METRICS}")
    d = per_metric[metric]
    means = [masked_mean(per_metric[name], mask) for name in ("k1", "k2", "k3", "abs_prob")]
    lag_long = lag.long()
    scalars = torch.stack([
        masked_mean(d, mask).double(), max_token(d, mask).double(), effective_sample_size(lr, mask).double(),
        *(m.double() for m in means),
        masked_mean(lag_long.double(), mask).double(),
        mask.sum().double(),
        torch.where(mask, lag_long, 0).min().double(),
    ])
    sums, counts = _lag_buckets(d, lag_long, mask, max_lag_bucket)
    host = torch.cat([scalars, sums, counts]).tolist()  # the one host sync of this function
    total, max_tok, ess, mk1, mk2, mk3, mabs, mean_lag, n_tokens, min_lag = host[:10]
    _check_min_lag(min_lag)
    by_lag = _buckets_from_host(host[10:10 + max_lag_bucket + 1], host[10 + max_lag_bucket + 1:])
    engine_fit, kappa = fit_lag_slope(by_lag)
    n = int(n_tokens)
    nan = float("nan")
    return DiscrepancyStats(
        metric=metric, total=total if n else nan, engine=by_lag[0][0] if 0 in by_lag else None,
        engine_fit=engine_fit, kappa=kappa, max_token=max_tok if n else nan, ess=ess,
        k1=mk1 if n else nan, k2=mk2 if n else nan, k3=mk3 if n else nan, abs_prob=mabs if n else nan,
        mean_lag=mean_lag if n else nan, n_tokens=n, by_lag=by_lag)
