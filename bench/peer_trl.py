"""dcrl against TRL's ``GRPOTrainer`` on the same work: time to a target reward.

Both sides start from the same warm-started model (``python -m tiny``: the config's run.seed), train on the
config's task with the same batch (learner.batch_groups prompts x actor.group_size samples), sampling
(temperature, actor.max_tokens_per_turn new tokens), optimizer (AdamW, learner.lr constant, no weight decay,
grad clip learner.grad_clip) and loss family (token-level clipped surrogate, group-normalised advantages, no
KL). TRL is synchronous (HF ``generate`` then train, one process, all cores); dcrl is the real job (a redis
server, the learner and a vLLM actor as separate processes, pinned one core each, as ``bench/common.run_job``).

The measure: the wall time at which the moving mean of the per-step reward over ``--window`` steps first
reaches ``--target``. Clocks: TRL's starts when ``train()`` begins (model loaded); dcrl's starts when the
learner's first batch arrives (after the one-off vLLM start-up, which is printed beside it, together with
the time from launch for both).

    python bench/peer_trl.py [--config tiny] [--steps 600] [--target 0.5] [--window 100]

Needs the ``bench`` extra (``pip install -e .[bench]``; ``make bench`` installs it). Writes
``runs/bench/peer_trl/curves.png`` (reward vs wall time, both systems) and ``curves.json``.
Last line: ``RESULT time_to_reward_vs_trl <t_trl / t_dcrl>`` (> 1: dcrl reaches the target sooner).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, moving_mean, run_job, time_to_reward  # noqa: E402

from configs import add_config_args, load_config  # noqa: E402


# ---------------------------------------------------------------- the TRL side (a child process)


def trl_child(config: str, overrides: list[str], steps: int, out: Path) -> None:
    """Train with TRL's GRPOTrainer and write one {step, t, reward} row per step to ``out`` (JSON)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from envs import make_env
    from tiny.build import ensure_model

    cfg = load_config(config, overrides)
    model_dir = ensure_model(cfg, log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if cfg.actor.max_turns != 1 or cfg.env.name not in ("arithmetic", "chain_sum"):
        raise SystemExit("peer_trl: the TRL side runs the single-turn built-in tasks (env.name = arithmetic, chain_sum)")

    # The prompts the actor would draw: env.reset(seed) for seeds of the run; the reward replays the env.
    n_prompts = steps * cfg.learner.batch_groups
    seeds = [cfg.run.seed * 1_000_003 + i for i in range(n_prompts)]
    prompts = [make_env(cfg.env.name, cfg.env.kwargs).reset(s) for s in seeds]
    ds = Dataset.from_dict({"prompt": prompts, "seed": seeds})

    def exact_match(completions, seed, **_):
        rewards = []
        for text, s in zip(completions, seed):
            env = make_env(cfg.env.name, cfg.env.kwargs)
            env.reset(s)
            rewards.append(env.step(text).reward)
        return rewards

    g = cfg.actor.group_size
    args = GRPOConfig(
        output_dir=str(out.parent / "trl"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=cfg.learner.batch_groups * g, num_generations=g,
        max_completion_length=cfg.actor.max_tokens_per_turn, temperature=cfg.actor.temperature,
        learning_rate=cfg.learner.lr, lr_scheduler_type="constant", weight_decay=cfg.learner.weight_decay,
        max_grad_norm=cfg.learner.grad_clip, epsilon=cfg.learner.clip_eps_low, epsilon_high=cfg.learner.clip_eps_high,
        beta=0.0, loss_type="dapo", max_steps=steps, logging_steps=1, seed=cfg.run.seed, shuffle_dataset=False,
        disable_tqdm=True)
    rows: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.monotonic()

        def on_log(self, _args, state, _control, logs=None, **k):
            if logs and "reward" in logs:
                rows.append({"step": state.global_step, "t": time.monotonic() - self.t0, "reward": logs["reward"]})

    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    out.write_text(json.dumps(rows))


def run_trl(config: str, overrides: list[str], steps: int, workdir: Path) -> tuple[list[dict], float]:
    out = workdir / "trl_rows.json"
    t0 = time.monotonic()
    cmd = [sys.executable, __file__, "--trl-child", "--config", config, "--steps", str(steps),
           "--out", str(workdir)] + [x for s in overrides for x in ("--set", s)]
    with open(workdir / "trl.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if rc != 0:
        raise SystemExit(f"TRL run failed ({rc}); see {workdir / 'trl.log'}")
    return json.loads(out.read_text()), time.monotonic() - t0


# ---------------------------------------------------------------- both, side by side


def plot(curves: dict[str, tuple[list[float], list[float]]], window: int, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (t, r) in curves.items():
        ax.plot(t, r, alpha=0.2)
        ax.plot(t, moving_mean(r, window), label=f"{name} ({window}-step mean)", color=ax.lines[-1].get_color())
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fmt(t: float | None) -> str:
    return "never" if t is None else f"{t:.1f}s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--target", type=float, default=0.5, help="moving-mean reward to reach")
    p.add_argument("--window", type=int, default=100, help="steps in the moving mean")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "peer_trl"))
    p.add_argument("--skip-trl", action="store_true", help="reuse the TRL rows of an earlier run in --out")
    p.add_argument("--pin", choices=("all", "learner", "none"), default="all",
                   help="dcrl's processes: one core each (all), the learner alone on core 0 (learner), or none")
    p.add_argument("--no-pin", action="store_const", const="none", dest="pin", help="same as --pin none")
    p.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    add_config_args(p)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trl_child:
        trl_child(args.config, args.overrides, args.steps, out / "trl_rows.json")
        return
    cfg = load_config(args.config, args.overrides)  # fail fast on a bad config
    subprocess.check_call([sys.executable, "-m", "tiny", "--config", args.config]
                          + [x for s in args.overrides for x in ("--set", s)], cwd=ROOT)

    if args.skip_trl:
        trl_rows, trl_launch = json.loads((out / "trl_rows.json").read_text()), float("nan")
    else:
        trl_rows, trl_launch = run_trl(args.config, args.overrides, args.steps, out)
    job = run_job("dcrl", args.config, args.overrides + [f"learner.steps={args.steps}"], out, pin_cores={"all": True, "learner": "learner", "none": False}[args.pin])
    rows = job.rows
    # dcrl's clock starts when the first batch arrives: elapsed at step 1 minus that step's train time.
    t_first = rows[0]["time/elapsed_s"] - rows[0]["time/step_s"] - rows[0].get("time/publish_s", 0.0)
    startup = rows[0]["time/wait_for_data_s"]
    d_t = [r["time/elapsed_s"] - t_first for r in rows]
    d_r = [r["reward/mean"] for r in rows]
    t_t = [r["t"] for r in trl_rows]
    t_r = [r["reward"] for r in trl_rows]
    tt_trl = time_to_reward(t_t, t_r, args.target, args.window)
    tt_dcrl = time_to_reward(d_t, d_r, args.target, args.window)
    plot({"TRL GRPOTrainer": (t_t, t_r), f"dcrl ({cfg.controller.mode})": (d_t, d_r)}, args.window, args.target,
         out / "curves.png")
    (out / "curves.json").write_text(json.dumps({"trl": trl_rows, "dcrl": [
        {"step": r["step"], "t": t, "reward": r["reward/mean"]} for r, t in zip(rows, d_t)]}))

    def block(r: list[float], a: int, b: int) -> float:
        seg = r[a:b]
        return sum(seg) / max(len(seg), 1)

    n = args.steps
    print(f"config {args.config} {' '.join(args.overrides)}: {n} steps, target {args.target} "
          f"({args.window}-step moving mean)")
    for name, t, r, extra in (("TRL ", t_t, t_r, f"launch to end {trl_launch:.1f}s"),
                              ("dcrl", d_t, d_r, f"launch to end {job.process_wall_s:.1f}s, vLLM start-up "
                                                 f"{startup:.1f}s before the clock starts")):
        print(f"{name}: {n} steps in {t[-1]:.1f}s ({t[-1] / n * 1000:.0f} ms/step), reward steps 1-100 "
              f"{block(r, 0, 100):.3f}, last 100 {block(r, n - 100, n):.3f}; time to target "
              f"{fmt(tt_trl if name == 'TRL ' else tt_dcrl)}; {extra}")
    print(f"curves: {out / 'curves.png'}")
    if tt_trl is None or tt_dcrl is None:
        ratio = 0.0 if tt_dcrl is None else float("inf")
    else:
        ratio = tt_trl / tt_dcrl
    print(f"RESULT time_to_reward_vs_trl {ratio:.3f}")


if __name__ == "__main__":
    main()
