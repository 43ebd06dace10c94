"""Learner metrics: metrics.jsonl rows, resume truncation, report.png, CLI, wandb never imported when disabled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from learner.metrics import (REQUIRED_KEYS, MetricsLogger, plot_report, progress_postfix, read_metrics,
                             truncate_metrics)

ROOT = Path(__file__).resolve().parents[1]


def _row(step: int) -> dict:
    row = {k: 0.1 * step for k in REQUIRED_KEYS}
    row.update({"step": step, "version": step, "staleness/max_allowed": 4 - step % 3,
                "discrepancy/engine": float("nan") if step == 2 else 0.01})
    return row


def test_metrics_logger_appends_json_lines_and_truncates_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path, wandb_mode="disabled")
    logger.log(_row(1))
    logger.log(_row(2))
    offset = logger.offset()  # what a checkpoint after step 2 records
    logger.log(_row(3))
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["discrepancy/engine"] is None  # NaN -> null: the file stays strict JSON
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    # Resume from the step-2 checkpoint: the step-3 line is dropped, then the redone step 3 appended.
    truncate_metrics(tmp_path / "metrics.jsonl", offset)
    logger = MetricsLogger(tmp_path, wandb_mode="disabled")
    logger.log(_row(3))
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_metrics_read_ignores_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps(_row(1)) + "\n" + '{"step": 2, "rew')
    assert [r["step"] for r in read_metrics(p)] == [1]


def test_metrics_report_png_is_written(tmp_path):
    rows = [_row(s) for s in range(1, 8)]
    out = plot_report(rows, tmp_path / "report.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_metrics_report_cli_regenerates_plot(tmp_path):
    logger = MetricsLogger(tmp_path, wandb_mode="disabled")
    for s in (1, 2, 3):
        logger.log(_row(s))
    logger.close()
    r = subprocess.run([sys.executable, "-m", "learner", "report", "--run-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "report.png").stat().st_size > 10_000
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "learner", "report", "--run-dir", str(empty)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no metrics rows" in r.stderr


def test_metrics_disabled_wandb_is_never_imported(tmp_path):
    code = (
        "import sys\n"
        "from learner.metrics import MetricsLogger\n"
        f"m = MetricsLogger({str(tmp_path)!r}, wandb_mode='disabled', progress=True, total_steps=2)\n"
        "m.log({'step': 1, 'reward/mean': 0.5}); m.close()\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_metrics_progress_postfix_shows_reward_d_lambda_k():
    post = progress_postfix({"reward/mean": 0.25, "discrepancy/total": 0.0123, "dcmdp/lambda": 1.5,
                             "staleness/max_allowed": 3})
    assert post == {"reward": "0.250", "D": "0.0123", "lam": "1.500", "K": "3"}
    assert progress_postfix({})["D"] == "-"


def test_metrics_help_is_fast():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "learner", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--fresh" in r.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert imported, "no -X importtime output"
    assert not imported & {"torch", "transformers", "vllm", "wandb", "matplotlib"}, "--help imported heavy modules"


def test_metrics_wandb_offline_writes_under_run_dir_and_resumes_same_id(tmp_path):
    for step in (1, 2):  # a second logger = a resumed learner
        logger = MetricsLogger(tmp_path, wandb_mode="offline", run_name="t", config={"learner": {"steps": 2}})
        logger.log(_row(step))
        logger.close()
    run_id = (tmp_path / "wandb_id").read_text().strip()
    runs = sorted(p.name for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run-"))
    assert runs and all(name.endswith(run_id) for name in runs)


def test_metrics_lag_share_uses_step_floor_else_running_floor():
    from learner.metrics import lag_share

    rows = [{"step": 1, "discrepancy/total": 0.05, "discrepancy/engine": 0.01},
            {"step": 2, "discrepancy/total": 0.08, "discrepancy/engine": None, "dcmdp/engine_floor": 0.02},
            {"step": 3, "discrepancy/total": 0.01, "discrepancy/engine": 0.03},
            {"step": 4, "discrepancy/total": 0.02}]
    xs, ys = lag_share(rows)
    assert xs == [1, 2, 3]
    assert [round(y, 6) for y in ys] == [0.04, 0.06, 0.0]
