"""Learner observability: ``metrics.jsonl``, wandb, a progress bar and ``report.png``.

The training loop owns one :class:`MetricsLogger`::

    logger = MetricsLogger(run_dir, wandb_mode=lcfg.wandb_mode, wandb_project=lcfg.wandb_project,
                           run_name=cfg.run.name, config=cfg.model_dump(), progress=lcfg.progress,
                           total_steps=lcfg.steps, start_step=step)
    for each step:
        logger.log(row)            # one JSON line, one wandb point, one progress-bar tick
        ... checkpoint stores logger.offset() (bytes of metrics.jsonl that belong to it)
    logger.close()
    write_report(run_dir)          # report.png from metrics.jsonl

A resumed run first calls :func:`truncate_metrics` with the checkpoint's offset, so the lines of steps
that are redone after a crash are not duplicated, then appends.

This module imports no torch; matplotlib, tqdm and wandb are imported only when used, and
``wandb_mode = "disabled"`` never imports wandb.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocol.messages import ActorReport

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.png"

# Keys every step row carries (a test checks them; the report plots most of them).
REQUIRED_KEYS = (
    "step", "version",
    "reward/mean", "reward/std",
    "discrepancy/total", "discrepancy/engine", "discrepancy/lag_slope", "discrepancy/max_token",
    "discrepancy/ess",
    "dcmdp/lambda", "dcmdp/beta", "dcmdp/delta",
    "staleness/max_allowed", "staleness/mean", "staleness/max", "buffer/stale_groups",
    "is/masked_frac", "loss", "grad_norm",
    "time/wait_for_data_s", "time/step_s", "throughput/tokens_per_s",
)


def json_safe(value: Any) -> Any:
    """Strict-JSON value: non-finite floats become None (json.dumps would write the invalid ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def truncate_metrics(path: str | os.PathLike, offset: int) -> None:
    """Cut ``metrics.jsonl`` back to ``offset`` bytes: drop lines of steps a resumed run will redo.

    A file shorter than ``offset`` is left alone (its lines up to the checkpoint were fsynced, so this
    only happens when the file was deleted by hand).
    """
    p = Path(path)
    if p.exists() and p.stat().st_size > offset:
        with open(p, "r+b") as f:
            f.truncate(offset)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a ``metrics.jsonl``; a torn last line (the process died mid-write) is ignored."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    with open(p) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def progress_postfix(row: dict) -> dict[str, str]:
    """The short status the progress bar shows: reward, discrepancy D, lambda and staleness cap K."""
    def fmt(key: str, spec: str) -> str:
        v = row.get(key)
        return "-" if v is None else format(int(v) if spec == "d" else v, spec)

    return {
        "reward": fmt("reward/mean", ".3f"),
        "D": fmt("discrepancy/total", ".4f"),
        "lam": fmt("dcmdp/lambda", ".3f"),
        "K": fmt("staleness/max_allowed", "d"),
    }


class MetricsLogger:
    """One JSON line per learner step to ``<run_dir>/metrics.jsonl`` (appending), plus wandb and tqdm.

    Created by ``learner.trainer.Learner`` after the checkpoint (if any) is loaded; ``start_step`` is the
    step the progress bar starts from.
    """

    def __init__(self, run_dir: str | os.PathLike, *, wandb_mode: str = "disabled", wandb_project: str = "dcrl",
                 run_name: str = "run", config: dict | None = None, progress: bool = False,
                 total_steps: int = 0, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one line
        self._wandb_run = None
        if wandb_mode != "disabled":
            self._wandb_run = _init_wandb(self.run_dir, wandb_mode, wandb_project, run_name, config or {})
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="learner", unit="step", dynamic_ncols=True)

    def log(self, row: dict) -> None:
        """Append ``row`` (must hold ``step``) as one JSON line; mirror it to wandb and the progress bar."""
        row = json_safe(row)
        self._file.write(json.dumps(row, sort_keys=False) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(row["step"]))
        if self._bar is not None:
            self._bar.set_postfix(progress_postfix(row), refresh=False)
            self._bar.update(1)

    def offset(self) -> int:
        """Bytes of ``metrics.jsonl`` written so far, made durable: what a checkpoint records."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if not self._file.closed:
            self._file.close()


class Laps:
    """Named lap times of one training step: ``lap("prox")`` charges the time since the previous lap (or the
    start) to "prox". On CUDA each lap waits for the device first (one synchronisation per phase, a handful
    per step), so that the time lands on the phase that launched the kernels."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", "") == "cuda"
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now


def actor_time_fractions(before: dict[str, "ActorReport"], now: list["ActorReport"]) -> dict[str, float]:
    """The actor-side time breakdown between two sets of ActorReports, averaged over the actors that reported
    since ``before``: fractions of each actor's wall time (engine busy, redis, weight reload, idle by reason)
    and shares of its episodes' time (env, tokenizer, generate). Empty when no actor reported anew.

    Also ``episode/env_errors``: episodes that environment faults ended since ``before``, summed over actors
    (a count, not a fraction). An actor seen for the first time or restarted (its clock went back) counts all
    of its errors, so that the per-step counts add up to the total; present when an actor reported anew or
    when the count is not zero."""
    fracs: dict[str, list[float]] = {}
    env_errors = 0
    for r in now:
        b = before.get(r.actor_id)
        if b is None or r.wall_s < b.wall_s:
            env_errors += r.env_errors
            continue
        if r.wall_s == b.wall_s:
            continue
        env_errors += r.env_errors - b.env_errors
        wall = r.wall_s - b.wall_s
        add = lambda k, v: fracs.setdefault(k, []).append(v)  # noqa: E731
        add("actor/engine_busy_frac", (r.engine_busy_s - b.engine_busy_s) / wall)
        add("actor/redis_frac", (r.redis_s - b.redis_s) / wall)
        add("actor/reload_frac", (r.reload_s - b.reload_s) / wall)
        for kind in set(r.idle_s) | set(b.idle_s):
            add(f"actor/idle_{kind}_frac", (r.idle_s.get(kind, 0.0) - b.idle_s.get(kind, 0.0)) / wall)
        episode = {"env": r.env_s - b.env_s, "tokenize": r.tokenize_s - b.tokenize_s,
                   "generate": r.generate_s - b.generate_s}
        total = sum(episode.values())
        if total > 0:
            for k, v in episode.items():
                add(f"actor/episode_{k}_frac", v / total)
    out = {k: sum(v) / len(v) for k, v in fracs.items()}
    if out or env_errors:
        out["episode/env_errors"] = env_errors
    return out


def _init_wandb(run_dir: Path, mode: str, project: str, name: str, config: dict):
    """A wandb run writing under ``<run_dir>/wandb``; a resumed learner continues the same run id."""
    import wandb

    id_file = run_dir / "wandb_id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id)
    (run_dir / "wandb").mkdir(exist_ok=True)
    return wandb.init(project=project, name=name, id=run_id, resume="allow", mode=mode,
                      dir=str(run_dir), config=config)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where ``key`` has a number."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def lag_share(rows: list[dict]) -> tuple[list[int], list[float]]:
    """Per step, the part of D the engine floor does not explain: max(D - floor, 0), attributed to policy lag.

    The floor is the step's own lag-0 mean when the batch has lag-0 tokens, else the controller's running
    estimate (``dcmdp/engine_floor``); steps with neither are left out."""
    xs, ys = [], []
    for r in rows:
        total = r.get("discrepancy/total")
        floor = r.get("discrepancy/engine")
        if floor is None:
            floor = r.get("dcmdp/engine_floor")
        if isinstance(total, (int, float)) and isinstance(floor, (int, float)):
            xs.append(r["step"])
            ys.append(max(float(total) - float(floor), 0.0))
    return xs, ys


TIME_PHASES = ("time/wait_for_data_s", "time/prox_s", "time/controller_s", "time/forward_backward_s",
               "time/optimizer_s", "time/publish_s", "time/checkpoint_s")
"""The learner's step-time breakdown, in the order of a step (the report stacks them)."""


def moving_mean(xs: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values."""
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x
        if i >= window:
            total -= xs[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_report(rows: list[dict], out_png: str | os.PathLike) -> Path:
    """Write the run's summary figure: reward, discrepancy (engine floor vs lag part), lambda,
    staleness (cap K and measured lag), the masked-token fraction, the learner's step time by phase
    (stacked, 20-step moving mean) and the actors' time fractions, each over learner steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(7, 1, figsize=(8, 18), sharex=True)
    ax = axes[0]
    xs, mean = _series(rows, "reward/mean")
    _, std = _series(rows, "reward/std")
    ax.plot(xs, mean, label="reward mean")
    if len(std) == len(mean):
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_ylabel("reward")

    ax = axes[1]
    xs, total = _series(rows, "discrepancy/total")
    ax.plot(xs, total, label="D total")
    xe, engine = _series(rows, "discrepancy/engine")
    ax.plot(xe, engine, ".-", label="D engine (lag-0 tokens)")
    xl, lag_part = lag_share(rows)
    ax.plot(xl, lag_part, label="D lag part")
    xd, delta = _series(rows, "dcmdp/delta")
    ax.plot(xd, delta, "k--", label="delta (tolerance)")
    ax.set_ylabel("discrepancy")

    ax = axes[2]
    ax.plot(*_series(rows, "dcmdp/lambda"), label="lambda")
    ax.set_ylabel("lambda")

    ax = axes[3]
    ax.step(*_series(rows, "staleness/max_allowed"), where="post", label="K (cap)")
    ax.plot(*_series(rows, "staleness/mean"), label="lag mean")
    ax.plot(*_series(rows, "staleness/max"), ".", label="lag max")
    ax.set_ylabel("staleness (versions)")

    ax = axes[4]
    ax.plot(*_series(rows, "is/masked_frac"), label="masked fraction")
    ax.set_ylabel("IS masked")

    ax = axes[5]
    phases = [k for k in TIME_PHASES if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if phases:
        xs = [r["step"] for r in rows]
        ys = [moving_mean([float(r.get(k) or 0.0) for r in rows], 20) for k in phases]
        ax.stackplot(xs, *ys, labels=[k.removeprefix("time/").removesuffix("_s") for k in phases], alpha=0.8)
        totals = sorted(sum(col) for col in zip(*ys))
        ax.set_ylim(0, 1.5 * totals[int(0.95 * (len(totals) - 1))] or None)  # the first steps wait for vLLM to start
    ax.set_ylabel("seconds per step")

    ax = axes[6]
    for k in sorted({k for r in rows for k in r if k.startswith("actor/") and k.endswith("_frac")}):
        ax.plot(*_series(rows, k), label=k.removeprefix("actor/").removesuffix("_frac"))
    ax.set_ylabel("actor time fraction")
    ax.set_xlabel("learner step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def write_report(run_dir: str | os.PathLike) -> Path:
    """Regenerate ``<run_dir>/report.png`` from ``<run_dir>/metrics.jsonl`` (``python -m learner report``)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_FILE)
    if not rows:
        raise FileNotFoundError(f"no metrics rows in {run_dir / METRICS_FILE}")
    return plot_report(rows, run_dir / REPORT_FILE)
