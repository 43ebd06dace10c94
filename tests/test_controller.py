"""DCMDP controller: the dual update rules, beta(lambda), K(lambda), warm-up, baselines, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from configs.schema import ControllerConfig
from learner import controller as ctl
from learner.discrepancy import DiscrepancyStats, summarize

DELTA = 0.02


def _stats(d: float, engine: float | None = 0.01, kappa: float | None = 0.004, n: int = 100) -> DiscrepancyStats:
    by_lag = {} if engine is None else {0: (engine, n // 2)}
    return DiscrepancyStats(metric="abs_prob", total=d, engine=engine, engine_fit=engine, kappa=kappa,
                            max_token=3 * d, ess=0.9, k1=0.0, k2=0.0, k3=0.0, abs_prob=d, mean_lag=1.0,
                            n_tokens=n, by_lag=by_lag)


def _cfg(**kw) -> ControllerConfig:
    base = dict(mode="dcmdp", delta=DELTA, k_min=0, k_max=4, lambda_init=0.1, warmup_steps=1)
    base.update(kw)
    return ControllerConfig(**base)


def test_normalised_violation_sign():
    assert ctl.normalised_violation(0.03, 0.02) == pytest.approx(0.5)
    assert ctl.normalised_violation(0.01, 0.02) == pytest.approx(-0.5)
    assert ctl.normalised_violation(0.0, 0.02) == -1.0


def test_dual_ascent_clips_to_range():
    assert ctl.dual_ascent(0.5, 0.25, 2.0, 10.0) == pytest.approx(1.0)
    assert ctl.dual_ascent(0.1, -0.5, 1.0, 10.0) == 0.0
    assert ctl.dual_ascent(9.9, 1.0, 1.0, 10.0) == 10.0


def test_pid_step_matches_formula():
    state = ctl.PIDState(integral=0.3, ema_err=0.1, prev_d=0.02)
    lam, new = ctl.pid_step(state, 0.5, 0.25, kp=0.5, ki=0.2, kd=0.1, ema_alpha=0.5, lam_max=10.0)
    integral = 0.3 + 0.2 * 0.5
    ema = 0.5 * 0.5 + 0.5 * 0.1
    assert new.integral == pytest.approx(integral) and new.ema_err == pytest.approx(ema)
    assert lam == pytest.approx(0.5 * ema + integral + 0.1 * 0.25)
    # A falling D adds no derivative term; the integral never goes below 0.
    lam, new = ctl.pid_step(ctl.PIDState(integral=0.05), -1.0, -3.0, kp=0.5, ki=0.2, kd=0.1,
                            ema_alpha=0.5, lam_max=10.0)
    assert new.integral == 0.0 and lam == 0.0
    lam, new = ctl.pid_step(ctl.PIDState(integral=2.0), -0.1, -3.0, kp=0.5, ki=0.2, kd=0.1,
                            ema_alpha=0.5, lam_max=10.0)
    assert lam == pytest.approx(0.5 * -0.05 + 1.98)


def test_beta_of_lambda_monotone_from_beta_max_to_beta_min():
    lams = [0.0, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 1e6]
    betas = [ctl.beta_of_lambda(lam, 5.0, 1.5) for lam in lams]
    assert betas[0] == 5.0
    assert all(a > b for a, b in zip(betas, betas[1:]))
    assert betas[-1] == pytest.approx(1.5, abs=1e-5)
    assert min(betas) > 1.5


def _brute_force_cap(lam, delta, d_engine, kappa, k_min, k_max):
    """Largest K in [k_min, k_max] whose predicted D(K) = D_engine + kappa K fits delta / (1 + lam);
    k_max while the constraint is slack (lam = 0)."""
    if lam == 0:
        return k_max
    fitting = [k for k in range(k_min, k_max + 1) if d_engine + kappa * k <= delta / (1 + lam) + 1e-15]
    return max(fitting) if fitting else k_min


def test_staleness_cap_matches_brute_force():
    for lam in (0.0, 0.2, 1.0, 4.0):
        for d_engine in (0.0, 0.005, 0.019, 0.03):
            for kappa in (1e-9, 0.001, 0.003, 0.02):
                for k_min, k_max in ((0, 4), (1, 8), (2, 2)):
                    got = ctl.staleness_cap(lam, DELTA, d_engine, kappa, k_min, k_max)
                    assert got == _brute_force_cap(lam, DELTA, d_engine, kappa, k_min, k_max), (
                        lam, d_engine, kappa, k_min, k_max)


def test_staleness_cap_without_slope_is_k_max_at_zero_lambda_and_shrinks():
    for kappa in (None, 0.0, -0.01):
        assert ctl.staleness_cap(0.0, DELTA, 0.01, kappa, 0, 8) == 8
        caps = [ctl.staleness_cap(lam, DELTA, 0.01, kappa, 1, 8) for lam in (0.0, 0.5, 1.0, 3.0, 100.0)]
        assert caps == sorted(caps, reverse=True) and caps[-1] == 1 and caps[2] == 4
    assert ctl.staleness_cap(1.0, DELTA, None, 0.003, 0, 8) == 4


@pytest.mark.parametrize("dual", ["ascent", "pid"])
def test_controller_above_delta_raises_lambda_tightens_beta_lowers_k(dual):
    c = ctl.DCMDPController(_cfg(dual=dual))
    outs = [c.observe(_stats(2 * DELTA)) for _ in range(12)]
    assert outs[0].phase == "warmup" and outs[0].lam == 0.1 and outs[0].k == 0  # warm-up runs synchronously
    active = outs[1:]
    assert all(o.phase == "active" and o.err == pytest.approx(1.0) for o in active)
    lams = [o.lam for o in active]
    assert all(b > a or b == 10.0 for a, b in zip(lams, lams[1:]))  # rises until lambda_max
    assert lams[0] > 0.1
    betas = [o.beta for o in active]
    assert all(b < a or lam == 10.0 for a, b, lam in zip(betas, betas[1:], lams[1:]))
    ks = [o.k for o in active]
    assert ks == sorted(ks, reverse=True) and ks[0] < 4 and ks[-1] == 0


@pytest.mark.parametrize("dual", ["ascent", "pid"])
def test_controller_below_delta_lambda_decays_to_zero_and_k_returns_to_max(dual):
    c = ctl.DCMDPController(_cfg(dual=dual))
    for _ in range(8):
        c.observe(_stats(2 * DELTA))
    assert c.lam > 1.0
    outs = [c.observe(_stats(0.5 * DELTA)) for _ in range(40)]
    lams = [o.lam for o in outs]
    assert all(b <= a for a, b in zip(lams, lams[1:]))
    assert outs[-1].lam == 0.0
    assert outs[-1].beta == 5.0
    assert outs[-1].k == 4


def _closed_loop(dual: str, eta: float, steps: int = 120, step_at: int = 10, drop_at: int = 80):
    """A plant whose discrepancy responds to lambda with a lag: D' = D + 0.5 (d_dist / (1 + lam) - D).

    The disturbance d_dist steps from 0.75 delta to 2 delta at ``step_at`` and back at ``drop_at``;
    the equilibrium multiplier of the raised phase is lambda* = 1."""
    c = ctl.DCMDPController(_cfg(dual=dual, eta=eta, lambda_init=0.0))
    d, lams, ds = 0.75 * DELTA, [], []
    for t in range(steps):
        dist = 2 * DELTA if step_at <= t < drop_at else 0.75 * DELTA
        out = c.observe(_stats(d))
        lams.append(out.lam)
        ds.append(d)
        d += 0.5 * (dist / (1 + out.lam) - d)
    return lams, ds


def _sign_changes(xs: list[float]) -> int:
    inc = [b - a for a, b in zip(xs, xs[1:]) if abs(b - a) > 1e-9]
    return sum(1 for a, b in zip(inc, inc[1:]) if a * b < 0)


def test_pid_step_change_settles_without_oscillation():
    lams, ds = _closed_loop("pid", eta=1.0)
    raised = lams[10:80]
    assert _sign_changes(raised) == 0
    assert max(raised) <= 1.0 + 1e-6  # no overshoot of lambda* = 1
    assert raised[-1] == pytest.approx(1.0, abs=0.02)
    assert ds[79] == pytest.approx(DELTA, rel=0.02)
    assert lams[-1] == 0.0  # back inside the tolerance region after the drop


def test_ascent_step_change_overshoots_at_large_eta():
    """The plant of the PID test is hard enough: plain ascent at eta = 1 rings on it."""
    lams, _ = _closed_loop("ascent", eta=1.0)
    raised = lams[10:80]
    assert max(raised) > 1.1
    assert _sign_changes(raised) >= 2
    assert raised[-1] == pytest.approx(1.0, abs=0.02)


def test_controller_auto_delta_from_warmup_engine_floor():
    c = ctl.DCMDPController(_cfg(delta="auto", auto_slack=0.5, warmup_steps=3, lambda_init=0.2))
    floors = [0.010, 0.020, 0.030]
    outs = [c.observe(_stats(5 * f, engine=f)) for f in floors]
    assert [o.phase for o in outs] == ["warmup"] * 3
    assert all(o.lam == 0.2 and o.k == 0 for o in outs)
    assert outs[0].delta == pytest.approx(0.015)  # provisional, from the first floor only
    assert outs[-1].delta == pytest.approx(1.5 * 0.02)
    nxt = c.observe(_stats(0.03, engine=0.5))  # a later floor no longer moves delta
    assert nxt.phase == "active" and nxt.delta == pytest.approx(0.03) and nxt.err == pytest.approx(0.0)
    assert nxt.lam == pytest.approx(0.2)


def test_controller_warmup_averages_lag0_floors_and_skips_batches_without_lag0():
    c = ctl.DCMDPController(_cfg(delta="auto", auto_slack=1.0, warmup_steps=2))
    outs = [c.observe(_stats(0.05, engine=None)),  # policy lag only: not an engine floor
            c.observe(_stats(0.02, engine=0.004)),
            c.observe(_stats(0.07, engine=None)),
            c.observe(_stats(0.03, engine=0.008))]
    assert [o.phase for o in outs] == ["warmup"] * 4
    assert outs[0].delta == pytest.approx(0.10)  # provisional, from the total while no floor exists
    assert outs[1].delta == pytest.approx(0.008)  # the first floor replaces it
    assert outs[-1].delta == pytest.approx(2 * 0.006)  # mean of the two lag-0 floors
    assert c.observe(_stats(0.01, engine=0.5)).phase == "active" and c.delta == pytest.approx(0.012)


def test_controller_warmup_floor_is_weighted_by_lag0_tokens():
    c = ctl.DCMDPController(_cfg(delta="auto", auto_slack=0.0, warmup_steps=2))
    c.observe(_stats(0.004, engine=0.004, n=100))  # 50 lag-0 tokens
    c.observe(_stats(0.010, engine=0.010, n=20))  # 10 lag-0 tokens
    assert c.observe(_stats(0.01)).phase == "active"
    assert c.delta == pytest.approx((0.004 * 50 + 0.010 * 10) / 60)


def test_controller_warmup_without_any_lag0_ends_at_its_limit_on_totals():
    c = ctl.DCMDPController(_cfg(delta="auto", auto_slack=1.0, warmup_steps=2))
    limit = ctl.WARMUP_LIMIT * 2
    outs = [c.observe(_stats(0.01 * (i + 1), engine=None)) for i in range(limit)]
    assert [o.phase for o in outs] == ["warmup"] * limit
    nxt = c.observe(_stats(0.01, engine=None))
    assert nxt.phase == "active" and c.delta == pytest.approx(2 * 0.01 * (limit + 1) / 2)  # 2 x mean total


def test_controller_auto_delta_without_lag0_uses_total():
    c = ctl.DCMDPController(_cfg(delta="auto", auto_slack=1.0))
    out = c.observe(_stats(0.01, engine=None, kappa=None))
    assert out.delta == pytest.approx(0.02)


def test_controller_measured_stats_end_to_end():
    """From token logprobs: a lag-driven discrepancy gives a positive slope and a K below K_max."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    logp_mu = -torch.rand(n, generator=g, dtype=torch.float64) * 2
    lag = torch.randint(0, 4, (n,), generator=g)
    logp_prox = (logp_mu + torch.randn(n, generator=g, dtype=torch.float64) * (0.02 + 0.1 * lag)).clamp(max=0)
    stats = summarize(logp_prox, logp_mu, lag, torch.ones(n, dtype=torch.bool), "abs_prob")
    c = ctl.DCMDPController(_cfg(delta="auto", auto_slack=0.5, k_max=8))
    first = c.observe(stats)
    assert first.k == 0 and first.delta == pytest.approx(1.5 * stats.engine)
    out = c.observe(stats)  # total D is far above 1.5x the lag-0 floor
    assert out.err > 0 and out.lam > 0.1
    assert out.kappa == pytest.approx(stats.kappa) and stats.kappa > 0
    assert out.k == ctl.staleness_cap(out.lam, out.delta, stats.engine, stats.kappa, 0, 8)
    assert out.k < 8


@pytest.mark.parametrize("mode,k,beta", [("none", 4, math.inf), ("tis", 4, 2.0), ("fixed", 4, 2.0),
                                         ("sync", 0, 2.0), ("icepop", 4, 5.0), ("mis", 4, 2.0)])
def test_baseline_modes_hold_lambda_zero(mode, k, beta):
    c = ctl.DCMDPController(_cfg(mode=mode))
    for d in (0.1, 0.5, 0.001):
        out = c.observe(_stats(d))
        assert out.lam == 0.0 and out.k == k and out.beta == beta


@pytest.mark.parametrize("dual,d_alpha", [("ascent", 1.0), ("pid", 1.0), ("ascent", 0.3)])
def test_controller_checkpoint_round_trip_continues_identically(dual, d_alpha):
    cfg = _cfg(dual=dual, delta="auto", warmup_steps=2, d_alpha=d_alpha)
    seq = [_stats(0.01 + 0.004 * math.sin(i) + 0.002 * (i % 5), engine=0.01 + 0.001 * (i % 3),
                  kappa=None if i % 4 == 0 else 0.002 + 0.001 * (i % 2)) for i in range(30)]
    a = ctl.DCMDPController(cfg)
    for s in seq[:12]:
        a.observe(s)
    b = ctl.DCMDPController(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for s in seq[12:]:
        assert a.observe(s) == b.observe(s)
    assert a.state_dict() == b.state_dict()
    assert a.n_observed == 30


def test_controller_load_state_refuses_other_mode():
    a = ctl.DCMDPController(_cfg(mode="tis"))
    a.observe(_stats(0.01))
    with pytest.raises(ValueError, match="mode 'tis'"):
        ctl.DCMDPController(_cfg(mode="dcmdp")).load_state_dict(a.state_dict())


def test_controller_empty_observation_changes_nothing():
    c = ctl.DCMDPController(_cfg())
    first = c.observe(_stats(0.05))
    state = c.state_dict()
    assert c.observe(_stats(0.05, n=0)) == first
    assert c.state_dict() == state


def test_controller_initial_output_before_any_observation():
    out = ctl.DCMDPController(_cfg(delta="auto")).initial_output()
    assert out.k == 0 and out.lam == 0.1 and out.phase == "warmup" and math.isnan(out.delta)


def test_controller_throttle_estimates_are_smoothed_and_kept():
    c = ctl.DCMDPController(_cfg(fit_alpha=0.3))
    assert c.observe(_stats(0.01, engine=0.010, kappa=0.004)).kappa == pytest.approx(0.004)
    out = c.observe(_stats(0.01, engine=0.020, kappa=0.002))
    assert out.kappa == pytest.approx(0.3 * 0.002 + 0.7 * 0.004)
    assert out.engine == pytest.approx(0.3 * 0.020 + 0.7 * 0.010)
    kept = c.observe(_stats(0.01, engine=None, kappa=None))  # a batch with one lag bucket, not lag 0
    assert kept.kappa == out.kappa and kept.engine == out.engine
    # No lag-0 token but a fitted intercept: the intercept (clipped at 0) stands in for the floor.
    fitted = DiscrepancyStats(**{**_stats(0.01, kappa=0.004).__dict__, "engine": None, "engine_fit": -0.5})
    assert c.observe(fitted).engine == pytest.approx(0.7 * out.engine)


def test_controller_auto_delta_zero_floor_raises():
    c = ctl.DCMDPController(_cfg(delta="auto"))
    with pytest.raises(ValueError, match="set controller.delta explicitly"):
        c.observe(_stats(0.0, engine=0.0))


def test_controller_auto_delta_has_a_minimum_that_keeps_room_for_lag():
    """An fp32 actor against an fp32 learner: the floor is ~0, so (1 + slack) x floor forbids any lag and K
    falls to 0 (measured on the small preset); delta_min keeps the tolerance, and with it K, where lag fits."""
    floor, lagged = 1e-5, _stats(0.008, engine=1e-5, kappa=0.002)  # lag costs 0.002 of D per version
    bare = ctl.DCMDPController(_cfg(delta="auto", auto_slack=11.0, k_step=0))
    kept = ctl.DCMDPController(_cfg(delta="auto", auto_slack=11.0, k_step=0, delta_min=0.01))
    for c in (bare, kept):
        c.observe(_stats(floor, engine=floor))  # warm-up
    bare_out = [bare.observe(lagged) for _ in range(5)][-1]
    kept_out = [kept.observe(lagged) for _ in range(5)][-1]
    assert bare.delta == pytest.approx(12 * floor) and bare_out.lam > 1 and bare_out.k == 0
    assert kept.delta == pytest.approx(0.01) and kept_out.lam == 0 and kept_out.k == 4
    # a floor whose own tolerance is larger than the minimum is left as it is
    big = ctl.DCMDPController(_cfg(delta="auto", auto_slack=11.0, delta_min=0.01))
    big.observe(_stats(0.002, engine=0.002))
    big.observe(lagged)
    assert big.delta == pytest.approx(0.024)
    # and a zero floor no longer needs an explicit delta
    zero = ctl.DCMDPController(_cfg(delta="auto", delta_min=0.01))
    assert zero.observe(_stats(0.0, engine=0.0)).delta == pytest.approx(0.01)


def test_controller_fits_lag_slope_across_batches_of_single_lags():
    # Each batch holds one lag only (no slope of its own); the lag curve across batches still gives kappa.
    c = ctl.DCMDPController(ControllerConfig(delta=0.02, warmup_steps=1, fit_alpha=1.0))
    for lag, d in ((0, 0.004), (1, 0.010), (2, 0.016), (1, 0.010)):
        stats = DiscrepancyStats(metric="abs_prob", total=d, engine=d if lag == 0 else None, engine_fit=None,
                                 kappa=None, max_token=d, ess=1.0, k1=0.0, k2=0.0, k3=0.0, abs_prob=d,
                                 mean_lag=float(lag), n_tokens=100, by_lag={lag: (d, 100)})
        out = c.observe(stats)
    assert out.kappa == pytest.approx(0.006)
    restored = ctl.DCMDPController(ControllerConfig(delta=0.02, warmup_steps=1, fit_alpha=1.0))
    restored.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert restored.lag_curve == c.lag_curve


def test_controller_d_average_damps_batch_noise():
    """Batches whose D alternates 0.2 x delta / 1.8 x delta (mean on the tolerance): each raw batch moves
    lambda by 0.8 x eta; the running average (d_alpha = 0.2) keeps it within a narrow band."""
    seq = [_stats(DELTA * (1.8 if i % 2 else 0.2)) for i in range(60)]

    def lambdas(d_alpha):
        c = ctl.DCMDPController(_cfg(d_alpha=d_alpha, lambda_init=2.0))
        return [c.observe(s).lam for s in seq][20:]

    raw, avg = lambdas(1.0), lambdas(0.2)
    assert max(raw) - min(raw) == pytest.approx(0.8, abs=1e-9)
    assert max(avg) - min(avg) < 0.3
    # Errors are of the average: the first active step after warm-up sees (0.2 + 0.2 * 1.6) x delta.
    c = ctl.DCMDPController(_cfg(d_alpha=0.2))
    c.observe(seq[0])
    out = c.observe(seq[1])
    assert out.d == pytest.approx(1.8 * DELTA) and out.err == pytest.approx((0.2 + 0.2 * 1.6) - 1.0)


@pytest.mark.parametrize("k_step", [0, 1])
def test_k_moves_at_most_k_step_per_step_when_d_hovers_at_delta(k_step):
    """D alternating just above and below delta moves lambda across 0 every step; K(lambda) then jumps
    between K_max and ~0. controller.k_step = 1 limits every change to one version (0: the old flapping)."""
    c = ctl.DCMDPController(_cfg(k_step=k_step, lambda_init=0.0, eta=1.0, d_alpha=1.0))
    outs = [c.observe(_stats(DELTA * (1.3 if t % 2 else 0.7), engine=0.015, kappa=0.004)) for t in range(40)]
    ks = [o.k for o in outs[1:]]
    jumps = [abs(b - a) for a, b in zip(ks, ks[1:])]
    if k_step:
        assert max(jumps) <= 1 and 0 < max(ks)
    else:
        assert max(jumps) >= 3  # the flapping the rate limit removes
    assert ctl.rate_limited(4, 0, 1) == 1 and ctl.rate_limited(0, 4, 2) == 2 and ctl.rate_limited(3, 2, 0) == 3
