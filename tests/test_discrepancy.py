"""Discrepancy metrics and their one-pass summary, against plain Python loops over tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner import discrepancy as disc


def _batch(n: int = 400, max_lag: int = 5, seed: int = 0, garbage: bool = True):
    """Random logprobs where discrepancy grows with lag; masked-out positions hold garbage."""
    g = torch.Generator().manual_seed(seed)
    logp_mu = -torch.rand(n, generator=g, dtype=torch.float64) * 4.0
    lag = torch.randint(0, max_lag + 1, (n,), generator=g)
    noise = torch.randn(n, generator=g, dtype=torch.float64) * (0.05 + 0.1 * lag)
    logp_prox = (logp_mu + noise).clamp(max=0.0)
    mask = torch.rand(n, generator=g) < 0.7
    if garbage:
        logp_prox = torch.where(mask, logp_prox, float("-inf"))
        logp_mu = torch.where(mask, logp_mu, float("nan"))
        lag = torch.where(mask, lag, -7)  # prompt tokens carry version -1: their lag means nothing
    return logp_prox, logp_mu, lag, mask


def _ref_token(lp: float, lm: float) -> dict[str, float]:
    lr = lp - lm
    return {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.exp(lr) - 1.0 - lr,
            "abs_prob": abs(math.exp(lp) - math.exp(lm))}


def _ref_summary(logp_prox, logp_mu, lag, mask, metric):
    toks = [(float(a), float(b), int(c)) for a, b, c, m in zip(logp_prox, logp_mu, lag, mask) if m]
    vals = [_ref_token(a, b) for a, b, _ in toks]
    n = len(toks)
    means = {k: sum(v[k] for v in vals) / n for k in ("k1", "k2", "k3", "abs_prob")}
    d = [v[metric] for v in vals]
    w = [math.exp(a - b) for a, b, _ in toks]
    ess = sum(w) ** 2 / (n * sum(x * x for x in w))
    by_lag: dict[int, list[float]] = {}
    for (_, _, l), x in zip(toks, d):
        by_lag.setdefault(l, []).append(x)
    return {"total": sum(d) / n, "max_token": max(d), "ess": ess, "means": means, "n": n,
            "mean_lag": sum(l for _, _, l in toks) / n,
            "by_lag": {l: (sum(xs) / len(xs), len(xs)) for l, xs in by_lag.items()}}


def test_per_token_metrics_match_loop_reference():
    logp_prox, logp_mu, _, _ = _batch(garbage=False)
    got = {"k1": disc.k1(logp_prox, logp_mu), "k2": disc.k2(logp_prox, logp_mu),
           "k3": disc.k3(logp_prox, logp_mu), "abs_prob": disc.abs_prob(logp_prox, logp_mu)}
    for t in range(len(logp_prox)):
        ref = _ref_token(float(logp_prox[t]), float(logp_mu[t]))
        for name, values in got.items():
            assert values[t].item() == pytest.approx(ref[name], rel=1e-9, abs=1e-12), (name, t)
    for metric in disc.METRICS:
        assert torch.equal(disc.per_token_discrepancy(logp_prox, logp_mu, metric), got[metric])


def test_per_token_discrepancy_unknown_metric_raises():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="unknown discrepancy metric"):
        disc.per_token_discrepancy(x, x, "kl")


def test_k3_nonnegative_near_equal_logprobs():
    lp = torch.tensor([-1.0, -1.0 + 1e-7, -1.0 - 1e-7, -3.0], dtype=torch.float32)
    lm = torch.full_like(lp, -1.0)
    assert (disc.k3(lp, lm) >= 0).all()


@pytest.mark.parametrize("metric", disc.METRICS)
def test_summarize_matches_loop_reference(metric):
    logp_prox, logp_mu, lag, mask = _batch(seed=1)
    stats = disc.summarize(logp_prox, logp_mu, lag, mask, metric)
    ref = _ref_summary(logp_prox, logp_mu, lag, mask, metric)
    assert stats.metric == metric
    assert stats.n_tokens == ref["n"]
    assert stats.total == pytest.approx(ref["total"], rel=1e-9)
    assert stats.max_token == pytest.approx(ref["max_token"], rel=1e-9)
    assert stats.ess == pytest.approx(ref["ess"], rel=1e-9)
    assert stats.mean_lag == pytest.approx(ref["mean_lag"], rel=1e-12)
    for name, value in ref["means"].items():
        assert getattr(stats, name) == pytest.approx(value, rel=1e-9), name
    assert stats.by_lag.keys() == ref["by_lag"].keys()
    for l, (mean, count) in ref["by_lag"].items():
        assert stats.by_lag[l][1] == count
        assert stats.by_lag[l][0] == pytest.approx(mean, rel=1e-9)
    assert stats.engine == pytest.approx(ref["by_lag"][0][0], rel=1e-9)
    # Built so that discrepancy grows with lag: the fitted slope must see it.
    assert stats.kappa is not None and stats.kappa > 0
    flat = stats.to_metrics()
    assert flat["disc/total"] == stats.total and flat["disc/lag0"] == stats.engine


def test_summarize_float32_close_to_float64():
    logp_prox, logp_mu, lag, mask = _batch(seed=2, garbage=False)
    s64 = disc.summarize(logp_prox, logp_mu, lag, mask, "k3")
    s32 = disc.summarize(logp_prox.float(), logp_mu.float(), lag.int(), mask, "k3")
    assert s32.total == pytest.approx(s64.total, rel=1e-4)
    assert s32.ess == pytest.approx(s64.ess, rel=1e-4)


def test_discrepancy_by_lag_matches_loop_reference():
    logp_prox, logp_mu, lag, mask = _batch(seed=3)
    d = disc.per_token_discrepancy(logp_prox, logp_mu, "k2")
    got = disc.discrepancy_by_lag(d, lag, mask)
    ref: dict[int, list[float]] = {}
    for x, l, m in zip(d.tolist(), lag.tolist(), mask.tolist()):
        if m:
            ref.setdefault(l, []).append(x)
    assert got.keys() == ref.keys()
    for l, xs in ref.items():
        assert got[l][1] == len(xs)
        assert got[l][0] == pytest.approx(sum(xs) / len(xs), rel=1e-12)


def test_discrepancy_by_lag_pools_lags_above_cap():
    d = torch.tensor([1.0, 2.0, 3.0, 4.0])
    lag = torch.tensor([0, 3, 9, 40])
    mask = torch.ones(4, dtype=torch.bool)
    got = disc.discrepancy_by_lag(d, lag, mask, max_lag_bucket=3)
    assert got == {0: (1.0, 1), 3: (3.0, 3)}


def test_summarize_negative_lag_raises():
    lp = torch.full((4,), -1.0)
    with pytest.raises(ValueError, match="negative policy lag"):
        disc.summarize(lp, lp, torch.tensor([0, 1, -1, 2]), torch.ones(4, dtype=torch.bool))
    # The same negative lag on a prompt token (mask 0) is ignored.
    stats = disc.summarize(lp, lp, torch.tensor([0, 1, -1, 2]), torch.tensor([1, 1, 0, 1], dtype=torch.bool))
    assert stats.n_tokens == 3


def test_summarize_ignores_garbage_at_masked_positions():
    logp_prox, logp_mu, lag, mask = _batch(seed=4, garbage=False)
    clean = disc.summarize(logp_prox, logp_mu, lag, mask, "k3")
    dirty = disc.summarize(torch.where(mask, logp_prox, float("inf")), torch.where(mask, logp_mu, float("nan")),
                           torch.where(mask, lag, 10_000), mask, "k3")
    assert clean == dirty


def test_summarize_empty_mask_gives_nan_and_zero_tokens():
    lp = torch.full((3,), -1.0)
    stats = disc.summarize(lp, lp - 0.1, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool))
    assert stats.n_tokens == 0 and math.isnan(stats.total) and stats.by_lag == {}
    assert stats.engine is None and stats.kappa is None


def test_summarize_reads_back_to_host_once(count_host_syncs):
    logp_prox, logp_mu, lag, mask = _batch(seed=5)
    calls = count_host_syncs()
    disc.summarize(logp_prox, logp_mu, lag, mask, "abs_prob")
    assert calls["tolist"] == 1


def test_fit_lag_slope_matches_weighted_polyfit():
    rng = np.random.default_rng(0)
    by_lag = {l: (float(0.01 + 0.004 * l + rng.normal(0, 0.002)), int(rng.integers(1, 200))) for l in range(6)}
    engine, kappa = disc.fit_lag_slope(by_lag)
    lags = np.array(list(by_lag))
    means = np.array([m for m, _ in by_lag.values()])
    counts = np.array([c for _, c in by_lag.values()], dtype=float)
    # np.polyfit weights multiply residuals before squaring: sqrt(count) gives count-weighted LS.
    slope, intercept = np.polyfit(lags, means, 1, w=np.sqrt(counts))
    assert kappa == pytest.approx(slope, rel=1e-9)
    assert engine == pytest.approx(intercept, rel=1e-9)


def test_fit_lag_slope_recovers_exact_line():
    engine, kappa = disc.fit_lag_slope({0: (0.02, 10), 2: (0.05, 3), 5: (0.095, 100)})
    assert engine == pytest.approx(0.02) and kappa == pytest.approx(0.015)


def test_fit_lag_slope_single_bucket_has_no_slope():
    assert disc.fit_lag_slope({0: (0.03, 50)}) == (0.03, None)
    assert disc.fit_lag_slope({3: (0.03, 50)}) == (None, None)
    assert disc.fit_lag_slope({}) == (None, None)


def test_effective_sample_size_bounds():
    mask = torch.ones(100, dtype=torch.bool)
    assert disc.effective_sample_size(torch.full((100,), 0.7), mask).item() == pytest.approx(1.0)
    one_heavy = torch.full((100,), -50.0)
    one_heavy[3] = 0.0
    assert disc.effective_sample_size(one_heavy, mask).item() == pytest.approx(0.01, rel=1e-6)
    # Shift invariance: huge log weights do not overflow.
    x = torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert disc.effective_sample_size(x + 800.0, mask).item() == pytest.approx(
        disc.effective_sample_size(x, mask).item(), rel=1e-9)


def test_masked_mean_and_max_token_ignore_masked_out():
    x = torch.tensor([1.0, float("inf"), 3.0, float("nan")])
    mask = torch.tensor([True, False, True, False])
    assert disc.masked_mean(x, mask).item() == 2.0
    assert disc.max_token(x, mask).item() == 3.0
    assert disc.masked_mean(x, torch.zeros(4, dtype=torch.bool)).item() == 0.0
