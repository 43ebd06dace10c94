"""The benchmark tools: the time-to-reward measure (bench/common.py), and smoke runs of bench/ablation.py
and bench/faults.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import moving_mean, time_to_reward  # noqa: E402


def test_moving_mean_uses_the_last_window_values():
    assert moving_mean([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert moving_mean([0, 0, 3], 5) == [0, 0, 1]


def test_time_to_reward_waits_for_a_full_window_and_the_target():
    t = [1.0, 2.0, 3.0, 4.0, 5.0]
    # The first value alone reaches the target, but no full window exists before t = 2.
    assert time_to_reward(t, [1.0, 0.0, 1.0, 1.0, 1.0], target=0.5, window=2) == 2.0
    assert time_to_reward(t, [0.0, 0.0, 0.0, 1.0, 1.0], target=1.0, window=2) == 5.0
    assert time_to_reward(t, [0.0] * 5, target=0.1, window=2) is None


@pytest.mark.slow
def test_ablation_quick_runs_real_jobs_and_reports(tmp_path):
    """--quick: two modes through real redis + learner + vLLM actor jobs, the table, the plot, the RESULT."""
    out = tmp_path / "ablation"
    proc = subprocess.run([sys.executable, "bench/ablation.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT dcmdp_minus_best_baseline -?\d+\.\d{3}", last), last
    md = (out / "ablation.md").read_text()
    assert "| default | dcmdp |" in md and "| default | none |" in md
    assert (out / "ablation.png").stat().st_size > 0


@pytest.mark.slow
def test_fault_suite_quick_loses_nothing_and_trains_nothing_twice(tmp_path):
    """bench/faults.py --quick on two faults: real jobs, a garbage burst into the live stream and a learner
    SIGKILLed and resumed; each run completes with no group lost or trained twice (the bench exits 1 otherwise)."""
    out = tmp_path / "faults"
    proc = subprocess.run([sys.executable, "bench/faults.py", "--quick", "--faults", "garbage,learner_kill",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "RESULT faults_survived 1.000"
    results = {r["fault"]: r for r in json.loads((out / "faults.json").read_text())}
    assert results["garbage"]["dead"] == 25 and results["garbage"]["undecodable"] >= 15
    assert results["learner_kill"]["steps"] == 60 and results["learner_kill"]["seen"] >= 480
