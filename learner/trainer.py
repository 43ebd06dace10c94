"""The learner's training loop: buffer -> pi_prox -> discrepancy -> DCMDP controller -> loss -> step -> publish.

One optimizer step at learner version V::

    entries = reader.receive(...)                  # until learner.batch_groups groups (own pending first);
                                                   # stale ones (newest token > stale_cap behind V) dead-lettered
    batch = collate(groups)                        # GRPO advantages per group, right-padded [B, T]
    logp_prox = no-grad logprobs under the current weights (micro-batched)
    stats = summarize(logp_prox, logp_mu, lag = V - versions, mask)
    out = controller.observe(stats)                # lambda, beta(lambda), K(lambda)
    for each micro-batch: policy_loss(...).backward()   # token-level: every loss is / N_step_tokens
    clip grads, AdamW step, V += 1
    publish weights v{V} (every publish_every), Control{V, K, lambda, beta} -> actors admit more
    metrics row; every checkpoint_every steps: checkpoint, then ack the entries it contains

``setup(cfg, fresh)`` wires the components (model, optimizer, controller, reader, control plane,
publisher, metrics) and restores a checkpoint; :class:`Learner` only drives them. ``python -m learner``
calls :func:`train`. With ``learner.world_size = N > 1`` the same loop runs on rank 0 of N FSDP2 ranks; the
other ranks take part in each step's collectives (``learner.distributed`` describes how batches, statistics,
weights and checkpoints move between them).

Versions stay monotone across restarts: a restarted learner takes max(checkpoint version, Control.version
in Redis) and re-publishes its restored weights under it, because actors may already hold (and tag tokens
with) a version published after the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learner import checkpoint as ckpt_io
from learner.episode_metrics import episode_length_stats, episode_lengths
from learner.metrics import (METRICS_FILE, REPORT_FILE, Laps, MetricsLogger, actor_time_fractions, truncate_metrics,
                             write_report)
from protocol.messages import Control
from protocol.vocab import TRUNCATED_FINISH_REASONS

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from configs.schema import DcrlConfig
    from protocol.messages import ActorReport

log = logging.getLogger("dcrl.learner")


# ---------------------------------------------------------------- batch preparation (pure)


@dataclass
class Batch:
    """One optimizer step's trajectories, right-padded to the longest: all tensors ``[B, T]`` unless noted.

    Position t holds token t; ``logp_mu[b, t]`` is the actor's log mu of token t (generated tokens only),
    ``versions[b, t]`` the version that sampled it, ``mask[b, t]`` True for trained (generated) tokens.
    Padding has mask False.
    """

    tokens: "Tensor"  # int64
    logp_mu: "Tensor"  # float32
    versions: "Tensor"  # int64, -1 at prompt / environment / padding
    mask: "Tensor"  # bool
    advantages: "Tensor"  # float32 [B]: GRPO advantage of each trajectory
    rewards: "Tensor"  # float32 [B]
    lengths: list[int]  # true length of each row
    n_groups: int


def group_advantages(groups) -> "Tensor":
    """GRPO advantages of every trajectory, groups concatenated in order: Tensor[sum_g G_g].

    A_i = (r_i - mean_g r) / (std_g r + eps), normalised within each group (``loss.grpo_advantages``)."""
    import torch

    from learner.loss import grpo_advantages

    parts = [grpo_advantages(torch.tensor([t.reward for t in g.trajectories], dtype=torch.float32)) for g in groups]
    return torch.cat(parts)


def collate(groups, pad_id: int = 0) -> Batch:
    """Right-pad the trajectories of ``groups`` into one :class:`Batch` (CPU tensors).

    Position 0 is never trained: nothing precedes it, so the learner has no logprob for it."""
    import numpy as np
    import torch

    trajs = [t for g in groups for t in g.trajectories]
    lengths = [len(t) for t in trajs]
    b, n = len(trajs), max(lengths)
    tokens = np.full((b, n), pad_id, dtype=np.int64)
    logp_mu = np.zeros((b, n), dtype=np.float32)
    versions = np.full((b, n), -1, dtype=np.int64)
    mask = np.zeros((b, n), dtype=bool)
    for i, t in enumerate(trajs):
        m = lengths[i]
        tokens[i, :m] = t.tokens_np
        logp_mu[i, :m] = t.logprobs_np
        versions[i, :m] = t.versions_np
        mask[i, :m] = t.mask_np.astype(bool)
    mask[:, 0] = False
    return Batch(
        tokens=torch.from_numpy(tokens), logp_mu=torch.from_numpy(logp_mu), versions=torch.from_numpy(versions),
        mask=torch.from_numpy(mask), advantages=group_advantages(groups),
        rewards=torch.tensor([t.reward for t in trajs], dtype=torch.float32), lengths=lengths, n_groups=len(groups),
    )


def micro_batches(lengths: list[int], size: int) -> list[tuple[int, int, int]]:
    """Row ranges ``(start, stop, width)`` of at most ``size`` rows; ``width`` = the longest row in the
    range, so each forward pass trims the batch padding it does not need."""
    return [(s, min(s + size, len(lengths)), max(lengths[s:s + size])) for s in range(0, len(lengths), size)]


def token_logprobs(logits: "Tensor", tokens: "Tensor") -> "Tensor":
    """log pi(token_t | tokens_<t) at every position t, ``[B, T]`` float32 (position 0: 0).

    ``logits[:, t]`` predicts token t+1, so position t reads ``logits[:, t-1]`` at ``tokens[:, t]``.
    Computed as gathered logit minus logsumexp in fp32: no [B, T, V] log-softmax tensor is kept."""
    import torch

    lg = logits[:, :-1].float()
    picked = lg.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    lp = picked - torch.logsumexp(lg, dim=-1)
    return torch.nn.functional.pad(lp, (1, 0))


def forward_logprobs(model, tokens: "Tensor") -> "Tensor":
    """Token logprobs of a right-padded ``[B, T]`` batch under ``model``.

    No attention mask: attention is causal, so padding after a row's last token cannot change the
    logits of its real positions, and the mask-free path is the fastest one."""
    logits = model(input_ids=tokens, use_cache=False).logits
    return token_logprobs(logits, tokens)


def has_no_dropout(model) -> bool:
    """True when no dropout is active in ``model`` (no ``nn.Dropout`` with p > 0, no attention dropout in its
    config): its forward in train mode then equals its forward in eval mode."""
    import torch

    cfg = getattr(model, "config", None)
    if any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout", "dropout")):
        return False
    return not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def lag_of(versions: "Tensor", version: int) -> "Tensor":
    """Policy lag of each token, V - v_t (meaningful where the loss mask is set)."""
    return version - versions


def reduce_loss_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine ``policy_loss`` metrics of the micro-batches of one step.

    Losses add up (each micro-batch loss is already divided by the step's token count); fractions and
    means are weighted by the tokens they were taken over (``n_tokens`` generated, ``n_kept`` kept)."""
    n_tok = sum(p["n_tokens"] for p in parts)
    n_keep = sum(p["n_kept"] for p in parts)
    out = {k: sum(p[k] for p in parts) for k in ("loss", "pg_loss", "penalty", "n_tokens", "n_kept")}
    for k in ("masked_frac", "mean_rho"):
        out[k] = sum(p[k] * p["n_tokens"] for p in parts) / max(n_tok, 1)
    for k in ("clip_frac", "mean_ratio", "mean_adv", "mean_w"):
        out[k] = sum(p[k] * p["n_kept"] for p in parts) / max(n_keep, 1)
    return out


LOSS_METRICS = ("loss", "pg_loss", "penalty", "n_tokens", "n_kept", "masked_frac", "mean_rho", "clip_frac",
                "mean_ratio", "mean_adv", "mean_w")
"""The keys of ``reduce_loss_metrics``' result (what ranks send to rank 0, in this order)."""


def episode_stats(groups) -> dict[str, float]:
    """Per-episode means over a batch: model turns, tokens (all / generated), truncated fraction."""
    trajs = [t for g in groups for t in g.trajectories]
    n = max(len(trajs), 1)
    return {
        "episode/turns": sum(len(t.turn_starts) for t in trajs) / n,
        "episode/tokens": sum(len(t) for t in trajs) / n,
        "episode/generated_tokens": sum(int(t.mask_np.sum()) for t in trajs) / n,
        "episode/truncated_frac": sum(t.finish_reason in TRUNCATED_FINISH_REASONS for t in trajs) / n,
    }


def stale_cap(cfg: "DcrlConfig") -> int:
    """The read-side staleness ceiling the learner passes to ``GroupReader.receive(max_lag=...)``: a group
    whose newest generated token is more than this many versions behind the learner is dead-lettered as stale
    (``buffer.reader.is_stale``).

    Admission bounds the lag of an honest group by 2 K: an actor may start a group on weights up to K versions
    behind the learner (``actors.weight_sync.weights_behind_cap``), and the admitted group may then wait up
    to K more versions in the queue (``buffer.admission.admission_capacity``). K moves in [k_min, k_max]
    (baselines use k_max; ``sync`` has K = 0, where the bound is exact). Plus ``learner.publish_every - 1``:
    weights are published only every publish_every versions, so even a group generated on the newest
    published weights may carry that many versions of lag. Anything beyond is not something admission let
    through: a backlog left by a fault, or a writer that skipped admission."""
    ccfg = cfg.controller
    ceiling = 0 if ccfg.mode == "sync" else 2 * ccfg.k_max
    return ceiling + cfg.learner.publish_every - 1


def nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)


# ---------------------------------------------------------------- the loop


@dataclass
class StepResult:
    row: dict[str, Any]  # the metrics row of the step
    out: Any  # ControllerOutput used for the step


class Learner:
    """Drives the wired components; created by :func:`setup`. ``run()`` trains until ``learner.steps``.

    State: ``step`` (optimizer steps done), ``version`` (policy version, >= step after a restart),
    ``unacked`` (stream ids trained since the last checkpoint, acked once one is durable).
    """

    def __init__(self, cfg: "DcrlConfig", *, model, optimizer, controller, reader, control, publisher,
                 metrics: MetricsLogger, run_dir: Path, device: "torch.device", step: int = 0, version: int = 0,
                 trained_total: int = 0, ranks=None):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.controller = controller
        self.reader = reader
        self.control = control
        self.publisher = publisher
        self.metrics = metrics
        self.run_dir = run_dir
        self.device = device
        self.step = step
        self.version = version
        self.trained_total = trained_total
        self.unacked: list[str] = []
        self.last_out = controller.initial_output()
        self.last_checkpoint_step = step
        self.actor_reports: dict[str, "ActorReport"] = {}  # latest ActorReport per actor, for the time breakdown
        self.dropout_free = has_no_dropout(model)  # then train-mode and eval-mode forwards agree (fused pi_prox)
        self.ranks = ranks  # learner.distributed.Ranks when learner.world_size > 1, else None

    # -- control plane

    def write_control(self, out, *, stop: bool = False) -> None:
        """Tell actors the version, the staleness cap K and (for status lines) lambda and beta."""
        self.control.write_control(Control(
            version=self.version, max_staleness=int(out.k), lam=float(out.lam), beta=float(out.beta),
            batch_groups=self.cfg.learner.batch_groups, stop=stop))

    def publish(self) -> None:
        """Publish the current weights as ``version`` (files + ZMQ) and store the announcement in Redis.
        Sharded: the other ranks help gather the full weights on rank 0 first."""
        weights = self.model
        if self.ranks is not None:
            from learner.distributed import Command, FullWeights, full_model_state

            self.ranks.send(Command.PUBLISH)
            # nccl transfer broadcasts from the GPU: the gathered (host) weights go back to rank 0's GPU
            on_gpu = self.cfg.learner.weight_transfer == "nccl"
            weights = FullWeights(full_model_state(self.model), device=self.device if on_gpu else None)
        w = self.publisher.publish(weights, self.version)
        self.control.set_weights(w)

    # -- data

    def collect(self) -> tuple[list, float]:
        """Entries for one step (``batch_groups`` of them) and the seconds spent waiting for them.

        An id already trained since the last checkpoint is skipped, as a guard: the reader never hands back
        entries it holds (its reclaim skips them), and an entry must not be trained twice whatever happens.
        Groups whose newest token is more than :func:`stale_cap` versions behind ``version`` are dead-lettered
        by the reader (their slots come back to the actors); ``reader.stale`` counts them."""
        need = self.cfg.learner.batch_groups
        cap = stale_cap(self.cfg)
        t0 = time.monotonic()
        deadline = t0 + self.cfg.learner.wait_timeout_s
        seen = set(self.unacked)
        entries = []
        reclaimed_at = told_at = t0
        while len(entries) < need:
            got = self.reader.receive(need - len(entries), block_ms=self.cfg.redis.read_block_ms,
                                      current_version=self.version, max_lag=cap)
            if len(entries) + len(got) < need and time.monotonic() - reclaimed_at >= 1.0:
                # Still short: an actor that died holding admitted slots (and did not come back under its
                # id) must not keep them from the others once its lease has lapsed.
                reclaimed_at = time.monotonic()
                for actor_id, n in self.control.reclaim_expired():
                    log.warning("%s's lease expired: gave back %d admitted groups it never sent", actor_id, n)
            for e in got:
                if e.id in seen:
                    log.debug("skipping %s: already trained, waiting for its checkpoint", e.id)
                    continue
                seen.add(e.id)
                entries.append(e)
            if len(entries) < need and time.monotonic() > deadline:
                raise RuntimeError(
                    f"learner: only {len(entries)}/{need} groups after {self.cfg.learner.wait_timeout_s:.0f}s "
                    f"(learner.wait_timeout_s): {self.control.describe_actors()}")
            if len(entries) < need and time.monotonic() - told_at >= 30.0:
                # A long wait says why: which actors are alive (their leases), or that none is.
                told_at = time.monotonic()
                log.info("learner: %d/%d groups after waiting %.0f s; %s", len(entries), need, told_at - t0,
                         self.control.describe_actors())
        return entries, time.monotonic() - t0

    # -- one optimizer step

    def train_step(self, groups) -> StepResult:
        """One optimizer step on ``groups``; advances ``version``. Returns the metrics row (no I/O; sharded,
        the batch is broadcast to the other ranks, which then run :meth:`train_batch` with rank 0)."""
        t0 = time.perf_counter()
        batch = collate(groups)
        if self.ranks is not None:
            from learner.distributed import Command

            self.ranks.send(Command.TRAIN)
            self.ranks.share_batch(batch)
        return self.train_batch(batch, groups, t0)

    def _forward(self, tokens: "Tensor", rows: tuple[int, int, int] | None) -> "Tensor":
        """Token logprobs of the micro-batch ``rows`` = (start, stop, width) of ``tokens``; ``None`` is an empty
        pass (one row of padding) that a rank with fewer micro-batches than the others runs, so that every rank
        takes part in the same sequence of FSDP collectives."""
        if rows is None:
            import torch

            return forward_logprobs(self.model, torch.zeros((1, 2), dtype=torch.int64, device=self.device))
        s, e, w = rows
        return forward_logprobs(self.model, tokens[s:e, :w])

    def train_batch(self, batch: Batch, groups=None, t0: float | None = None) -> StepResult | None:
        """One optimizer step on a collated batch. With one rank: all rows, returns the metrics row. Sharded
        (``learner.distributed``): every rank calls it with the same batch and trains its own rows; the
        discrepancy statistics and the controller run on rank 0 over the gathered pi_prox of all rows, the
        loss is normalised by the token count of the whole batch; rank 0 returns the row, the others None."""
        import torch

        from learner.discrepancy import per_token_discrepancy, summarize
        from learner.loss import policy_loss

        cfg, ccfg = self.cfg.learner, self.cfg.controller
        t0 = time.perf_counter() if t0 is None else t0
        ranks = self.ranks
        main = ranks is None or ranks.is_main
        n_rows = len(batch.lengths)
        if ranks is None:
            lo, hi, n_passes = 0, n_rows, None
        else:
            from learner.distributed import row_range

            lo, hi = row_range(n_rows, ranks.rank, ranks.world)
            n_passes = max(-(-(b - a) // cfg.micro_batch)
                           for a, b in (row_range(n_rows, r, ranks.world) for r in range(ranks.world)))
        dev = self.device
        tokens = batch.tokens[lo:hi].to(dev)
        logp_mu = batch.logp_mu[lo:hi].to(dev)
        mask = batch.mask[lo:hi].to(dev)
        version = self.version  # V: the weights pi_prox is computed with; lags are V - v_t
        lag = lag_of(batch.versions, version).to(dev)  # all rows: the statistics are over the whole batch
        adv_tok = batch.advantages[lo:hi].to(dev)[:, None].expand_as(logp_mu)
        mbs: list = micro_batches(batch.lengths[lo:hi], cfg.micro_batch) if hi > lo else []
        passes = mbs if n_passes is None else mbs + [None] * (n_passes - len(mbs))

        lap = Laps(dev)
        # pi_prox: the weights at the start of the step, no grad (decoupled PPO's proximal policy). One
        # optimizer step per batch means pi_prox is pi_theta before the step: with a single micro-batch and
        # no dropout, the training forward itself gives it (detached), and the extra forward is skipped.
        fused = None
        logp_prox = torch.zeros_like(logp_mu)
        if len(passes) == 1 and self.dropout_free:
            self.model.train()
            fused = self._forward(tokens, passes[0])
            if passes[0] is not None:
                s, e, w = passes[0]
                logp_prox[s:e, :w] = fused.detach()
        else:
            self.model.eval()
            with torch.no_grad():
                for p in passes:
                    out_p = self._forward(tokens, p)
                    if p is not None:
                        s, e, w = p
                        logp_prox[s:e, :w] = out_p
        lap("prox")

        stats = out = None
        if ranks is None:
            stats = summarize(logp_prox.flatten(), logp_mu.flatten(), lag.flatten(), mask.flatten(), ccfg.metric)
        else:
            all_prox = ranks.gather_rows(logp_prox, n_rows)  # rank 0: every row's pi_prox, in row order
            if main:
                stats = summarize(all_prox.flatten(), batch.logp_mu.to(dev).flatten(), lag.flatten(),
                                  batch.mask.to(dev).flatten(), ccfg.metric)
        if main:
            out = self.controller.observe(stats)
        lam, beta = (out.lam, out.beta) if ranks is None else ranks.broadcast_floats(
            [out.lam, out.beta] if main else None, 2)
        per_token_d = per_token_discrepancy(torch.where(mask, logp_prox, 0.0), torch.where(mask, logp_mu, 0.0),
                                            ccfg.metric)
        n_tokens_total = int(batch.mask.sum())  # generated tokens of the whole batch (all ranks' rows)
        seq_index = torch.arange(tokens.shape[0], device=dev)[:, None].expand_as(tokens)
        lap("controller")

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = []
        for p in passes:
            logp_new = fused if fused is not None else self._forward(tokens, p)
            if p is None:
                (logp_new.sum() * 0.0).backward()  # an empty pass: no gradient, but the same FSDP collectives
                continue
            s, e, w = p
            sl = (slice(s, e), slice(0, w))
            loss, m = policy_loss(
                logp_new.flatten(), logp_prox[sl].flatten(), logp_mu[sl].flatten(), adv_tok[sl].flatten(),
                mask[sl].flatten(), mode=ccfg.mode, lam=lam, beta=beta,
                per_token_d=per_token_d[sl].flatten(), cfg=ccfg, clip_low=cfg.clip_eps_low,
                clip_high=cfg.clip_eps_high, n_tokens_total=max(n_tokens_total, 1),
                seq_index=(seq_index[sl] - s).flatten())
            loss.backward()
            parts.append(m)
        lap("forward_backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # sharded parameters: the norm is a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        lap("optimizer")
        self.version += 1
        self.step += 1
        lm = reduce_loss_metrics(parts)
        if ranks is not None:
            per_rank = ranks.gather_floats([lm[k] for k in LOSS_METRICS])
            if not main:
                return None
            lm = reduce_loss_metrics([dict(zip(LOSS_METRICS, v)) for v in per_rank])
        step_s = time.perf_counter() - t0

        # Newest/oldest sampling version in the batch: shows which published weights the actors served.
        v_gen = batch.versions[batch.mask]
        lag_max = int(version - v_gen.min()) if v_gen.numel() else 0
        rewards = batch.rewards
        n_gen = int(stats.n_tokens)
        row: dict[str, Any] = {
            "step": self.step, "version": self.version,
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(correction=0)),
            "reward/zero_signal_groups": float(sum(
                len({t.reward for t in g.trajectories}) == 1 for g in groups) / len(groups)),
            "discrepancy/total": stats.total, "discrepancy/engine": nan_if_none(stats.engine),
            "discrepancy/engine_fit": nan_if_none(stats.engine_fit),
            "discrepancy/lag_slope": nan_if_none(stats.kappa), "discrepancy/max_token": stats.max_token,
            "discrepancy/ess": stats.ess, "discrepancy/k3": stats.k3, "discrepancy/abs_prob": stats.abs_prob,
            **{f"discrepancy/lag{k}": mean for k, (mean, _) in sorted(stats.by_lag.items())},
            "dcmdp/lambda": out.lam, "dcmdp/beta": out.beta, "dcmdp/delta": out.delta, "dcmdp/err": out.err,
            "dcmdp/warmup": float(out.phase == "warmup"),
            "dcmdp/engine_floor": nan_if_none(out.engine), "dcmdp/kappa": nan_if_none(out.kappa),
            "staleness/max_allowed": int(out.k), "staleness/mean": stats.mean_lag, "staleness/max": lag_max,
            "staleness/newest_version": int(v_gen.max()) if v_gen.numel() else -1,
            "staleness/oldest_version": int(v_gen.min()) if v_gen.numel() else -1,
            "is/masked_frac": lm["masked_frac"], "is/mean_rho": lm["mean_rho"], "is/mean_w": lm["mean_w"],
            "loss": lm["loss"], "loss/pg": lm["pg_loss"], "loss/penalty": lm["penalty"],
            "loss/clip_frac": lm["clip_frac"], "loss/mean_ratio": lm["mean_ratio"],
            "grad_norm": float(grad_norm),
            **episode_stats(groups),
            **episode_length_stats(groups),
            "batch/groups": batch.n_groups, "batch/trajectories": len(batch.lengths),
            "tokens/generated": n_gen, "tokens/total": int(sum(batch.lengths)),
            "time/step_s": step_s,
            **{f"time/{k}_s": v for k, v in lap.seconds.items()},
        }
        return StepResult(row=row, out=out)

    # -- durability

    def checkpoint(self) -> Path:
        """Checkpoint, then ack what it contains (never the other way round: see ``learner.checkpoint``).
        Several ranks: the other ranks help gather the full weights and optimizer state on rank 0 first
        (``learner.checkpoint_format = "full"``), or write their own shards beside rank 0's ("sharded")."""
        model, optimizer = self.model, self.optimizer
        ranks = self.ranks
        if ranks is not None:
            from learner.distributed import Command, gather_state

            ranks.send(Command.CHECKPOINT)
        if self.cfg.learner.checkpoint_format == "sharded":
            share = None if ranks is None else (lambda tmp: ranks.broadcast_text(str(tmp)))
            model, optimizer = ckpt_io.ShardedState(self.model, self.optimizer, share_dir=share), None
        elif ranks is not None:
            model, optimizer = gather_state(self.model, self.optimizer), None
        self.trained_total += len(self.unacked)
        path = ckpt_io.save_checkpoint(
            self.run_dir, self.step, model=model, optimizer=optimizer, keep=self.cfg.learner.keep_checkpoints,
            state={"version": self.version, "controller": self.controller.state_dict(),
                   "metrics_offset": self.metrics.offset(), "trained_ids": list(self.unacked),
                   "trained_total": self.trained_total, "consumer": self.cfg.learner.consumer,
                   "draws": self.control.draws()})
        if self.unacked:
            self.reader.ack(self.unacked)
        self.unacked = []
        self.last_checkpoint_step = self.step
        return path

    def run(self) -> None:
        """Train until ``learner.steps``, checkpoint, write Control(stop=True), write the report."""
        cfg = self.cfg.learner
        t_start = time.monotonic()
        checkpoint_s = 0.0
        while self.step < cfg.steps:
            stale0, dead0 = self.reader.stale, self.reader.dead
            entries, wait_s = self.collect()
            stale, dead = self.reader.stale - stale0, self.reader.dead - dead0
            if stale:
                log.warning("step %d: dead-lettered %d stale groups (newest token more than %d versions behind "
                            "version %d); their slots went back to the actors", self.step + 1, stale,
                            stale_cap(self.cfg), self.version)
            res = self.train_step([e.group for e in entries])
            self.unacked.extend(e.id for e in entries)
            self.last_out = res.out
            row = res.row
            if self.step % cfg.publish_every == 0 or self.step == cfg.steps:
                t0 = time.perf_counter()
                self.publish()
                row["time/publish_s"] = time.perf_counter() - t0
            self.write_control(res.out)
            row["time/wait_for_data_s"] = wait_s
            row["buffer/stale_groups"] = stale  # dead-lettered as stale while collecting this step's batch
            row["buffer/dead_groups"] = dead  # all dead letters while collecting it (stale ones included)
            row["time/elapsed_s"] = time.monotonic() - t_start  # since this process started training
            if cfg.log_group_ids:
                row["groups"] = [e.group.group_id for e in entries]
                row["episodes"] = episode_lengths([e.group for e in entries])  # [turns, tokens] per episode
            row["time/checkpoint_s"] = checkpoint_s  # the previous step's checkpoint (it runs after the row is written)
            reports = self.control.actor_reports()
            row.update(actor_time_fractions(self.actor_reports, reports))
            self.actor_reports = {r.actor_id: r for r in reports}  # a restarted actor's first pair is skipped
            row["throughput/tokens_per_s"] = row["tokens/generated"] / max(wait_s + row["time/step_s"], 1e-9)
            row["throughput/learner_tokens_per_s"] = row["tokens/total"] / max(row["time/step_s"], 1e-9)
            self.metrics.log(row)
            if cfg.crash_after_step is not None and self.step == cfg.crash_after_step:
                log.warning("learner.crash_after_step=%d: SIGKILL before the checkpoint (test hook)", self.step)
                os.kill(os.getpid(), signal.SIGKILL)
            checkpoint_s = 0.0
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                t0 = time.perf_counter()
                self.checkpoint()
                checkpoint_s = time.perf_counter() - t0
        if self.last_checkpoint_step != self.step:
            self.checkpoint()
        self.write_control(self.last_out, stop=True)
        if self.ranks is not None:
            self.ranks.finish()

    def close(self) -> None:
        try:
            self.metrics.close()
            self.publisher.close()
            self.reader.close()
            self.control.close()
        finally:
            if self.ranks is not None:
                self.ranks.close()  # after an error: ends the other ranks, which may wait in a collective


# ---------------------------------------------------------------- wiring


def pick_device(name: str) -> "torch.device":
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_policy(model_dir: Path, dtype: str, device: "torch.device"):
    """The trainable policy: transformers causal LM in ``learner.dtype`` on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return model.to(device)


def empty_policy(model_dir: Path, dtype: str):
    """The policy's architecture on the meta device: shapes and dtypes, no storage (``learner.meta_init``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def build_policy(cfg: "DcrlConfig", model_dir: Path, device: "torch.device", ckpt, ranks=None):
    """The policy and its AdamW, restored from ``ckpt`` (a ``learner.checkpoint.Checkpoint``) when given.

    Sharded (``ranks``): rank 0 loads the full model, and a full checkpoint's weights into it; with
    ``learner.meta_init`` the other ranks build it on the meta device and get rank 0's weights as it is sharded
    (``learner.distributed.shard_model``), otherwise every rank loads it. Then the checkpoint's full optimizer
    state is sharded into each rank's AdamW; a sharded-format checkpoint is read after sharding instead, each
    rank reading its own shards (DCP). The checkpoint may come from any world size."""
    import torch

    lcfg = cfg.learner
    torch.manual_seed(cfg.run.seed)
    # CPU offload: the full model never visits the GPU; fully_shard leaves each shard in (pinned) host memory
    home = torch.device("cpu") if lcfg.cpu_offload else device
    on_meta = ranks is not None and lcfg.meta_init and not ranks.is_main
    model = empty_policy(model_dir, lcfg.dtype) if on_meta else load_policy(model_dir, lcfg.dtype, home)
    if lcfg.activation_checkpointing:
        # Non-reentrant: composes with FSDP2's hooks; active in train mode only (the no-grad pi_prox pass is
        # in eval mode and keeps nothing anyway).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ranks is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lcfg.lr, weight_decay=lcfg.weight_decay)
        if ckpt is not None:
            ckpt.restore(model, optimizer)
        return model, optimizer
    from learner.distributed import load_optimizer_state, shard_model

    full = ckpt is not None and ckpt.format == "full"
    if full and not on_meta:  # (on the meta device the weights come from rank 0, the RNG states below)
        ckpt.restore(model)  # weights and RNG states, into the full model
    if lcfg.meta_init:
        from learner.distributed import shard_from_rank0

        shard_from_rank0(model, lcfg, ranks, home)
    else:
        shard_model(model, lcfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lcfg.lr, weight_decay=lcfg.weight_decay)
    if full:
        load_optimizer_state(model, optimizer, ckpt.optimizer_state(with_rng=on_meta))
    elif ckpt is not None:
        ckpt.restore(model, optimizer, distributed=True)  # a collective: every rank reads its own shards
    return model, optimizer


def clear_run_outputs(run_dir: Path) -> None:
    """``--fresh``: remove what an earlier run of this name left (checkpoints, weights, metrics, report)."""
    from weights.fileserver import weights_root

    ckpt_io.remove_checkpoints(run_dir)
    if weights_root(run_dir).exists():
        shutil.rmtree(weights_root(run_dir))
    for name in (METRICS_FILE, REPORT_FILE, "wandb_id"):
        (run_dir / name).unlink(missing_ok=True)


def setup(cfg: "DcrlConfig", fresh: bool = False) -> Learner:
    """Wire the learner: model, optimizer, controller, buffer reader, control plane, publisher, metrics.

    Resume (default): the latest checkpoint restores weights, optimizer, controller, RNG and step; the
    version becomes max(checkpoint version, Control.version in Redis); metrics.jsonl is cut back to the
    checkpoint; the checkpoint's ``trained_ids`` are acked (they may have been left pending by a crash
    right after the checkpoint). Fresh (``fresh`` or no checkpoint): a leftover control hash of version
    > 0 under this prefix belongs to an older run and is reset. Either way the current weights are
    published under the current version and Control is written before the first step.
    """
    import torch

    from tiny.build import ensure_model

    lcfg = cfg.learner
    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if lcfg.torch_threads:
        torch.set_num_threads(lcfg.torch_threads)
    if fresh:
        log.info("--fresh: removing checkpoints, weights and metrics of %s", run_dir)
        clear_run_outputs(run_dir)
    ckpt = ckpt_io.load_latest(run_dir)

    model_dir = ensure_model(cfg, log=log.info)
    device = pick_device(lcfg.device)
    ranks = None
    if lcfg.world_size > 1:
        from learner import distributed

        ranks = distributed.start(cfg, model_dir, None if ckpt is None else ckpt.path)
        device = ranks.device
    try:
        return _wire(cfg, run_dir, ckpt, model_dir, device, ranks)
    except BaseException:
        if ranks is not None:
            ranks.close()
        raise


def _wire(cfg: "DcrlConfig", run_dir: Path, ckpt, model_dir: Path, device: "torch.device", ranks) -> Learner:
    """``setup`` from the model on; ``ranks`` (rank 0 of a sharded learner) have already joined."""
    from buffer import ControlPlane, GroupReader
    from learner.controller import DCMDPController
    from learner.publisher import WeightPublisher

    lcfg = cfg.learner
    model, optimizer = build_policy(cfg, model_dir, device, ckpt, ranks)
    controller = DCMDPController(cfg.controller)

    control = ControlPlane(cfg.redis)
    leftover = control.read_control()
    step = version = trained_total = 0
    if ckpt is None:
        if leftover is not None and leftover.version > 0:
            log.warning("fresh start but %s:control holds version %d from an earlier run: resetting the "
                        "prefix (stream, counters, control)", cfg.redis.prefix, leftover.version)
            control.reset()
        truncate_metrics(run_dir / METRICS_FILE, 0)
    else:
        controller.load_state_dict(ckpt.state["controller"])
        step = ckpt.step
        trained_total = int(ckpt.state.get("trained_total", 0))
        version = max(ckpt.version, leftover.version if leftover is not None else 0)
        truncate_metrics(run_dir / METRICS_FILE, int(ckpt.state["metrics_offset"]))
        control.restore_draws(int(ckpt.state.get("draws", 0)))  # the dataset position, if Redis lost it
        log.info("resumed %s at step %d, version %d (checkpoint version %d, Redis version %s)", ckpt.path.name,
                 step, version, ckpt.version, None if leftover is None else leftover.version)

    vocab = model.get_input_embeddings().num_embeddings
    reader = GroupReader(cfg.redis, lcfg.consumer, vocab_size=vocab)
    if ckpt is not None and ckpt.state.get("trained_ids"):
        reader.ack(list(ckpt.state["trained_ids"]))
    publisher = WeightPublisher(lcfg, run_dir, model_dir, actor_dtype=cfg.actor.dtype,
                                weight_quant=cfg.actor.weight_quant)
    metrics = MetricsLogger(run_dir, wandb_mode=lcfg.wandb_mode, wandb_project=lcfg.wandb_project,
                            run_name=cfg.run.name, config=cfg.model_dump(mode="json"), progress=lcfg.progress,
                            total_steps=lcfg.steps, start_step=step)
    learner = Learner(cfg, model=model, optimizer=optimizer, controller=controller, reader=reader, control=control,
                      publisher=publisher, metrics=metrics, run_dir=run_dir, device=device, step=step,
                      version=version, trained_total=trained_total, ranks=ranks)
    learner.publish()
    learner.write_control(learner.last_out)
    return learner


def train(cfg: "DcrlConfig", fresh: bool = False) -> Path:
    """``python -m learner``: set up, run ``learner.steps`` steps, write the report; returns the run dir."""
    learner = setup(cfg, fresh=fresh)
    try:
        learner.run()
    finally:
        learner.close()
    write_report(learner.run_dir)
    return learner.run_dir
