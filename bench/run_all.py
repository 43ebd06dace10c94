"""``make bench``: every benchmark in turn, then one table of their RESULT lines (name, value, target, met).

Each benchmark runs as its own process (its output streams through) and prints ``RESULT <name> <value>``
as its last line. A benchmark that fails or prints no RESULT is listed as failed; the table is printed
anyway. The TRL comparison needs the ``bench`` extra; it is installed here when missing (not by the
README's two commands).

    python bench/run_all.py [--only NAME ...] [--quick]

``--quick``: shorter runs of the long benchmarks (a smoke run: the ratios are noisier).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = re.compile(r"^RESULT (\S+) (\S+)\s*$")


@dataclass(frozen=True)
class Bench:
    script: str
    result: str  # the RESULT name it prints
    target: float | None  # the value meets its target when >= this; None: informational
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    needs: str | None = None  # an importable module of the bench extra
    label: str = ""  # what tells two runs of one script apart in the table (e.g. the preset)


BENCHES = (
    Bench("buffer.py", "buffer_vs_raw", 0.9, quick=("--rounds", "5")),
    # Overhead, like for like: the small preset's 31-token answers, one request per turn on both sides. With the
    # default request shaping (a group's first turns as one n = G request) the actor beats the plain replay.
    Bench("rollout.py", "rollout_efficiency", 0.95, args=("--config", "small", "--set", "actor.coalesce_turns=false"),
          quick=("--repeats", "1"), label="small, one request per turn"),
    Bench("rollout.py", "rollout_efficiency", None, quick=("--repeats", "1"), label="tiny, default"),
    # The balanced case (T_gen ~ T_train): the tiny preset itself since vLLM's engine core runs in the actor's
    # process (T_gen 0.07 s, T_train 0.05 s); it used to take learner.micro_batch=2 to slow the learner to T_gen.
    Bench("async_speedup.py", "async_speedup_vs_ideal", 0.9, args=("--steps", "40"), quick=("--steps", "12")),
    Bench("weight_sync.py", "weight_sync_files_over_gloo", None, quick=("--repeats", "3")),
    Bench("peer_trl.py", "time_to_reward_vs_trl", 1.0, quick=("--steps", "200", "--window", "50", "--target", "0.42"),
          needs="trl", label="tiny"),
    Bench("peer_trl.py", "time_to_reward_vs_trl", 3.0, needs="trl", label="small",
          args=("--config", "small", "--steps", "300", "--window", "50", "--target", "0.33",
                "--out", "runs/bench/peer_trl_small"), quick=("--steps", "100")),
    Bench("faults.py", "faults_survived", 1.0, quick=("--quick",)),
)


def ensure_extra(module: str) -> None:
    """Install the ``bench`` extra of pyproject.toml into this interpreter when ``module`` is missing."""
    if importlib.util.find_spec(module) is not None:
        return
    reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    print(f"[bench] installing the bench extra: {' '.join(reqs)}", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *reqs])


def run(b: Bench, quick: bool) -> tuple[float | None, str]:
    if b.needs:
        ensure_extra(b.needs)
    cmd = [sys.executable, str(ROOT / "bench" / b.script), *b.args, *(b.quick if quick else ())]
    print(f"\n[bench] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    value = None
    for line in proc.stdout:
        sys.stdout.write(line)
        m = RESULT.match(line)
        if m and m.group(1) == b.result:
            value = float(m.group(2))
    rc = proc.wait()
    if rc != 0:
        return None, f"failed (exit {rc})"
    return value, "" if value is not None else "no RESULT line"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="RESULT names, script names or labels to run (default: all)")
    p.add_argument("--quick", action="store_true", help="shorter runs of the long benchmarks")
    args = p.parse_args()
    chosen = [b for b in BENCHES
              if not args.only or b.result in args.only or b.script in args.only or b.label in args.only]
    rows = [(b, *run(b, args.quick)) for b in chosen]
    print("\n| benchmark | RESULT | value | target | met |\n|---|---|---|---|---|")
    for b, value, why in rows:
        shown = why if value is None else f"{value:.3f}"
        if b.target is None:
            target, met = "(informational)", "-"
        else:
            target, met = f">= {b.target}", "no" if value is None or value < b.target else "yes"
        name = f"bench/{b.script}" + (f" ({b.label})" if b.label else "")
        print(f"| {name} | {b.result} | {shown} | {target} | {met} |")
    return 0 if all(v is not None for _, v, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
