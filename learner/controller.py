"""The DCMDP controller: from measured discrepancy D to the Lagrange multiplier lambda and its three uses.

Constraint D <= delta, normalised violation e = (D_avg - delta) / delta, where D_avg is a running average
of the per-batch D (``controller.d_alpha``; 1 = the raw batch value). The multiplier follows either

    dual ascent:  lambda <- clip(lambda + eta * e, 0, lambda_max)
    PID:          I <- clip(I + Ki * e, 0, lambda_max);  E <- a * e + (1 - a) * E
                  lambda = clip(Kp * E + I + Kd * max(0, D - D_prev) / delta, 0, lambda_max)

Inside the tolerance region e < 0 drives lambda down to 0. lambda then sets (``learner.loss`` applies
the first two):

    penalty   A_t - lambda * delta_t  or  + lambda * k2 term, total loss / (1 + lambda)
    IS bound  beta(lambda) = beta_min + (beta_max - beta_min) / (1 + lambda)
    throttle  K(lambda) = clamp(floor((delta / (1 + lambda) - D_engine) / kappa), K_min, K_max) for
              lambda > 0; K = K_max at lambda = 0 (see staleness_cap); K moves toward it by at most
              controller.k_step per step (rate_limited), from K = 0 at the end of warm-up

The learner drives it once per optimizer step::

    stats = discrepancy.summarize(logp_prox, logp_mu, lag, mask, cfg.controller.metric)
    out = controller.observe(stats)                  # lambda, beta, K for this step
    loss, m = loss.policy_loss(..., lam=out.lam, beta=out.beta, ...)
    control_plane.write_control(Control(version=V + 1, max_staleness=out.k, lam=out.lam, beta=out.beta, ...))

Everything here is host-side Python floats: no tensors, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from learner.discrepancy import fit_lag_slope

if TYPE_CHECKING:
    from configs.schema import ControllerConfig
    from learner.discrepancy import DiscrepancyStats

STATE_FORMAT = 1


def normalised_violation(d: float, delta: float) -> float:
    """e = (D - delta) / delta: > 0 outside the tolerance region, in [-1, 0] inside it."""
    return (d - delta) / delta


def dual_ascent(lam: float, err: float, eta: float, lam_max: float) -> float:
    """lambda' = clip(lambda + eta * e, 0, lambda_max): projected gradient ascent on the dual."""
    return min(max(lam + eta * err, 0.0), lam_max)


@dataclass
class PIDState:
    """Memory of the PID dual update: integral I, EMA E of the error, previous D (None before the first)."""

    integral: float
    ema_err: float = 0.0
    prev_d: float | None = None


def pid_step(state: PIDState, err: float, d_change_norm: float, *, kp: float, ki: float, kd: float,
             ema_alpha: float, lam_max: float) -> tuple[float, PIDState]:
    """One PID Lagrangian update (Stooke et al. 2020); returns (lambda, new state).

        I' = clip(I + Ki * e, 0, lambda_max)
        E' = a * e + (1 - a) * E
        lambda = clip(Kp * E' + I' + Kd * max(0, dD), 0, lambda_max)

    ``d_change_norm`` = (D - D_prev) / delta. The derivative term only reacts to a rising D: it damps
    the overshoot of the integral after a step up without slowing the decay once D is back in budget.
    ``state.prev_d`` is carried for the caller and left as it is."""
    integral = min(max(state.integral + ki * err, 0.0), lam_max)
    ema = ema_alpha * err + (1.0 - ema_alpha) * state.ema_err
    lam = min(max(kp * ema + integral + kd * max(0.0, d_change_norm), 0.0), lam_max)
    return lam, PIDState(integral=integral, ema_err=ema, prev_d=state.prev_d)


def beta_of_lambda(lam: float, beta_max: float, beta_min: float) -> float:
    """IS bound beta(lambda) = beta_min + (beta_max - beta_min) / (1 + lambda).

    beta_max at lambda = 0 (widest trust region: rho in [1/beta_max, beta_max] kept), strictly
    decreasing in lambda toward beta_min, halfway there at lambda = 1."""
    return beta_min + (beta_max - beta_min) / (1.0 + lam)


def staleness_cap(lam: float, delta: float, d_engine: float | None, kappa: float | None,
                  k_min: int, k_max: int) -> int:
    """Largest policy lag K the actors may run ahead, from the fitted line D(l) = D_engine + kappa * l.

    lambda = 0 (constraint slack, inside the tolerance region): K = K_max, full asynchrony.
    lambda > 0 with a known slope kappa > 0 and engine floor:
        K = clamp(floor((delta / (1 + lambda) - D_engine) / kappa), K_min, K_max)
    i.e. the lag at which the predicted discrepancy reaches the lambda-shrunk budget delta / (1 + lambda)
    (a budget already spent by the engine floor gives K_min).
    lambda > 0 without a usable slope (kappa unknown or <= 0: lag adds no measurable discrepancy) or floor:
        K = clamp(floor(K_max / (1 + lambda)), K_min, K_max)

    Why the throttle waits for lambda > 0: D is a mean over tokens of all lags, so D <= delta can hold
    while the line predicts that the stalest tokens alone exceed delta; applying the formula at
    lambda = 0 would throttle a run that meets its constraint (typical: a floor at delta / 1.5 and a
    steep slope give K ~ 2 forever). K jumps from K_max to the formula when lambda leaves 0."""
    if lam <= 0:
        return k_max
    if kappa is None or kappa <= 0 or d_engine is None:
        return min(max(math.floor(k_max / (1.0 + lam)), k_min), k_max)
    lags = (delta / (1.0 + lam) - d_engine) / kappa
    if lags >= k_max:  # also guards floor() of inf for a vanishing kappa
        return k_max
    return min(max(math.floor(lags), k_min), k_max)


def rate_limited(k: int, previous: int, step: int) -> int:
    """``k`` moved at most ``step`` from ``previous`` (``controller.k_step``; 0: ``k`` unchanged)."""
    if step <= 0:
        return k
    return min(max(k, previous - step), previous + step)


def ema_update(old: float | None, new: float | None, alpha: float) -> float | None:
    """alpha * new + (1 - alpha) * old; the first value is taken as is; a missing new value keeps old."""
    if new is None or not math.isfinite(new):
        return old
    return new if old is None else alpha * new + (1.0 - alpha) * old


WARMUP_LIMIT = 4
"""Warm-up ends after this many times ``controller.warmup_steps`` observations even if too few held lag-0 tokens."""


def auto_delta(engine_floors: list[float], slack: float, weights: list[float] | None = None,
               minimum: float = 0.0) -> float:
    """delta = (1 + slack) * the mean of the engine floors measured during warm-up, weighted by ``weights``
    (the lag-0 token count behind each floor) when given, and at least ``minimum`` (``controller.delta_min``).

    A zero floor (actor and learner bit-identical) with no minimum leaves no tolerance to normalise by:
    ValueError."""
    w = weights if weights is not None else [1.0] * len(engine_floors)
    delta = max((1.0 + slack) * sum(f * x for f, x in zip(engine_floors, w)) / sum(w), minimum)
    if not delta > 0:
        raise ValueError(f"controller.delta = 'auto' measured an engine floor of {delta / (1.0 + slack)!r}; "
                         "set controller.delta explicitly or a controller.delta_min > 0")
    return delta


def baseline_beta(mode: str, cfg: "ControllerConfig") -> float:
    """The upper IS-weight bound a baseline mode applies (reported as beta; inf for ``none``)."""
    return {"none": math.inf, "tis": cfg.tis_cap, "fixed": cfg.tis_cap, "sync": cfg.tis_cap,
            "icepop": cfg.icepop_high, "mis": cfg.mis_high}[mode]


@dataclass(frozen=True)
class ControllerOutput:
    """What the learner uses for one step: lambda and beta in the loss, K in the control hash."""

    lam: float
    beta: float
    k: int  # staleness cap K (Control.max_staleness)
    delta: float  # tolerance in force (provisional while an auto delta is still being measured)
    err: float  # normalised violation (D_avg - delta) / delta that the dual update used
    phase: str  # 'warmup' | 'active'
    d: float  # the D observed
    engine: float | None  # smoothed engine floor used by the throttle
    kappa: float | None  # smoothed lag slope used by the throttle

    def to_metrics(self, prefix: str = "ctl/") -> dict[str, float]:
        nan = float("nan")
        return {f"{prefix}{k}": (nan if v is None else float(v)) for k, v in asdict(self).items()
                if k != "phase"} | {f"{prefix}warmup": float(self.phase == "warmup")}


class DCMDPController:
    """Turns each step's DiscrepancyStats into lambda, beta(lambda) and K(lambda).

    Warm-up: the engine floor is measured over ``warmup_steps`` observations that hold lag-0 tokens, as the
    token-weighted mean of their lag-0 D. The adaptive controller runs warm-up synchronously (K = 0), so every
    warm-up batch is all lag 0 and the floor is measured on whole batches; observations without lag-0 tokens
    (a backlog from before a restart) do not count, and their total D is kept only as a fallback for when
    none of the first ``WARMUP_LIMIT x warmup_steps`` observations has one. (Measured on the tiny preset:
    the lag-0 D of single batches ranges 0.002-0.008 around a median of 0.0035, so a one-batch floor moved
    delta by 2x from run to run, and the throttle's K and the wall time with it.) With ``delta = "auto"``
    the tolerance becomes (1 + auto_slack) * that floor, at least ``delta_min``, when warm-up ends
    (provisional before). During
    warm-up lambda stays at ``lambda_init``, K = 0 and the dual does not move: with no tolerance
    yet there is no violation to react to. The dual updates start with the next observation, from
    lambda_init (the PID integral starts there too).

    The throttle uses exponential averages (weight ``fit_alpha`` on the newest batch) of the engine floor
    (lag-0 mean, else the fitted intercept clipped at 0) and of the lag slope. A batch whose lags fit no
    slope (a single lag bucket) contributes the slope fitted across recent batches' per-lag averages.

    Baseline modes never move: lambda = 0, K = K_max (``sync``: K = 0), beta = the mode's fixed bound.
    An observation with no tokens changes nothing and returns the last output.
    """

    def __init__(self, cfg: "ControllerConfig"):
        self.cfg = cfg
        self.adaptive = cfg.mode == "dcmdp"
        self.n_observed = 0
        self.lam = cfg.lambda_init if self.adaptive else 0.0
        self.warmup_floors: list[float] = []
        self.warmup_weights: list[float] = []  # lag-0 tokens behind each warm-up floor
        self.warmup_totals: list[float] = []  # total D of warm-up observations without lag-0 tokens (fallback)
        self.delta: float | None = None if cfg.delta == "auto" else float(cfg.delta)
        self.pid = PIDState(integral=self.lam)
        self.engine: float | None = None
        self.kappa: float | None = None
        self.lag_curve: dict[int, tuple[float, float]] = {}  # lag -> (averaged D, averaged token count)
        self.d_avg: float | None = None  # running average of D that the dual update reacts to
        self.last: ControllerOutput | None = None

    @property
    def in_warmup(self) -> bool:
        return (len(self.warmup_floors) < self.cfg.warmup_steps
                and self.n_observed < WARMUP_LIMIT * self.cfg.warmup_steps)

    def _tolerance(self) -> float:
        """delta in force: explicit, resolved auto, or the provisional auto value during warm-up."""
        if self.delta is not None:
            return self.delta
        if self.warmup_floors:
            return auto_delta(self.warmup_floors, self.cfg.auto_slack, self.warmup_weights, self.cfg.delta_min)
        return auto_delta(self.warmup_totals, self.cfg.auto_slack, minimum=self.cfg.delta_min)

    def _update_estimates(self, stats: "DiscrepancyStats") -> None:
        floor = stats.engine
        if floor is None and stats.engine_fit is not None:
            floor = max(stats.engine_fit, 0.0)
        self.engine = ema_update(self.engine, floor, self.cfg.fit_alpha)
        self._remember_lags(stats.by_lag)
        kappa = stats.kappa
        if kappa is None:
            # A batch usually holds one or two lags (the actors run at one version most of the time), so
            # its own fit often has no slope; fit across the recent batches' per-lag averages instead.
            kappa = fit_lag_slope({lag: (m, n) for lag, (m, n) in self.lag_curve.items()})[1]
        self.kappa = ema_update(self.kappa, kappa, self.cfg.fit_alpha)

    def _remember_lags(self, by_lag: dict[int, tuple[float, int]]) -> None:
        """Exponential averages (weight ``fit_alpha`` on the newest batch) of D and token count per lag."""
        a = self.cfg.fit_alpha
        for lag, (mean, count) in by_lag.items():
            if count <= 0 or not math.isfinite(mean):
                continue
            old = self.lag_curve.get(lag)
            self.lag_curve[lag] = (mean, float(count)) if old is None else (
                a * mean + (1 - a) * old[0], a * count + (1 - a) * old[1])

    def _dual_update(self, d: float, err: float, delta: float) -> float:
        cfg = self.cfg
        if cfg.dual == "ascent":
            return dual_ascent(self.lam, err, cfg.eta, cfg.lambda_max)
        d_change = 0.0 if self.pid.prev_d is None else (d - self.pid.prev_d) / delta
        lam, self.pid = pid_step(self.pid, err, d_change, kp=cfg.kp, ki=cfg.ki, kd=cfg.kd,
                                 ema_alpha=cfg.ema_alpha, lam_max=cfg.lambda_max)
        return lam

    def observe(self, stats: "DiscrepancyStats") -> ControllerOutput:
        """Take one step's statistics, update the multiplier, return what this step uses."""
        if stats.n_tokens == 0:
            return self.last if self.last is not None else self._output(math.nan, math.nan, "warmup")
        d = stats.total
        phase = "warmup" if self.in_warmup else "active"
        if phase == "warmup":
            if stats.engine is not None:
                self.warmup_floors.append(stats.engine)
                self.warmup_weights.append(float(stats.by_lag.get(0, (0.0, 1))[1]) or 1.0)
            else:
                self.warmup_totals.append(d)
        self._update_estimates(stats)
        self.n_observed += 1
        delta = self._tolerance()
        if self.delta is None and not self.in_warmup:
            self.delta = delta  # warm-up over: freeze the auto tolerance
        # The dual reacts to a running average of D (weight d_alpha on this batch): see ControllerConfig.
        self.d_avg = ema_update(self.d_avg, d, self.cfg.d_alpha)
        err = normalised_violation(self.d_avg, delta)
        if self.adaptive and phase == "active":
            self.lam = self._dual_update(self.d_avg, err, delta)
        self.pid.prev_d = self.d_avg
        self.last = self._output(d, err, phase)
        return self.last

    def _output(self, d: float, err: float, phase: str) -> ControllerOutput:
        cfg = self.cfg
        delta = self._tolerance() if (self.delta is not None or self.warmup_floors or self.warmup_totals) else math.nan
        if not self.adaptive:
            beta, k = baseline_beta(cfg.mode, cfg), (0 if cfg.mode == "sync" else cfg.k_max)
        elif phase == "warmup":  # synchronous: the floor is measured on all-lag-0 batches
            beta, k = beta_of_lambda(self.lam, cfg.beta_max, cfg.beta_min), 0
        else:
            beta = beta_of_lambda(self.lam, cfg.beta_max, cfg.beta_min)
            k = staleness_cap(self.lam, delta, self.engine, self.kappa, cfg.k_min, cfg.k_max)
            if self.last is not None:
                k = rate_limited(k, self.last.k, cfg.k_step)
        return ControllerOutput(lam=self.lam, beta=beta, k=k, delta=delta, err=err, phase=phase, d=d,
                                engine=self.engine, kappa=self.kappa)

    def initial_output(self) -> ControllerOutput:
        """What to publish before the first observation (the Control hash at version 0)."""
        return self.last if self.last is not None else self._output(math.nan, math.nan, "warmup")

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state for checkpoints (``json.dumps`` works on it)."""
        return {"format": STATE_FORMAT, "mode": self.cfg.mode, "n_observed": self.n_observed,
                "lam": self.lam, "delta": self.delta, "warmup_floors": list(self.warmup_floors),
                "warmup_totals": list(self.warmup_totals), "warmup_weights": list(self.warmup_weights),
                "pid": asdict(self.pid), "engine": self.engine, "kappa": self.kappa,
                "lag_curve": [[lag, m, n] for lag, (m, n) in sorted(self.lag_curve.items())], "d_avg": self.d_avg,
                "last": None if self.last is None else asdict(self.last)}

    @staticmethod
    def last_d(state: dict[str, Any]) -> float | None:
        """The D of a checkpoint's last output (the running average of checkpoints written before it existed)."""
        last = state.get("last")
        return None if last is None or not math.isfinite(last.get("d", math.nan)) else float(last["d"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; the run then continues exactly as if never interrupted.

        An explicit ``delta`` in the current config wins over the checkpoint's (an operator retune);
        with ``delta = "auto"`` the measured one is restored. A checkpoint of another mode is refused."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"controller state format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state["mode"] != self.cfg.mode:
            raise ValueError(f"controller checkpoint is for mode {state['mode']!r} but controller.mode is "
                             f"{self.cfg.mode!r}")
        self.n_observed = int(state["n_observed"])
        self.lam = float(state["lam"])
        self.delta = float(self.cfg.delta) if self.cfg.delta != "auto" else state["delta"]
        self.warmup_floors = [float(x) for x in state["warmup_floors"]]
        self.warmup_totals = [float(x) for x in state.get("warmup_totals", [])]
        self.warmup_weights = [float(x) for x in state.get("warmup_weights", [1.0] * len(self.warmup_floors))]
        self.pid = PIDState(**state["pid"])
        self.engine = state["engine"]
        self.kappa = state["kappa"]
        self.lag_curve = {int(lag): (float(m), float(n)) for lag, m, n in state.get("lag_curve", [])}
        self.d_avg = state.get("d_avg", self.last_d(state))
        self.last = None if state["last"] is None else ControllerOutput(**state["last"])
