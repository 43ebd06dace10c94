"""GRPO advantages, behaviour weights per mode and the decoupled PPO loss, against plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from configs.schema import ControllerConfig
from learner import loss as L
from learner.discrepancy import per_token_discrepancy
from protocol.vocab import CONTROLLER_MODES

CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def _cfg(**kw) -> ControllerConfig:
    return ControllerConfig(**kw)


def _batch(n_seq: int = 6, seq_len: int = 20, seed: int = 0, spread: float = 0.6):
    """A micro-batch of n_seq sequences flattened to tokens, with prompt tokens (mask 0) at the start of
    each sequence holding garbage logprobs, and per-sequence drift so that some sequences are far off."""
    g = torch.Generator().manual_seed(seed)
    n = n_seq * seq_len
    seq_index = torch.arange(n_seq).repeat_interleave(seq_len)
    pos = torch.arange(seq_len).repeat(n_seq)
    mask = (pos >= 4) & (torch.rand(n, generator=g) < 0.9)
    logp_mu = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    seq_shift = (torch.randn(n_seq, generator=g, dtype=torch.float64) * 1.2)[seq_index]
    logp_prox = (logp_mu + seq_shift + torch.randn(n, generator=g, dtype=torch.float64) * spread).clamp(max=0)
    logp_new = (logp_prox + torch.randn(n, generator=g, dtype=torch.float64) * 0.3).clamp(max=0)
    adv = torch.randn(n_seq, generator=g, dtype=torch.float64)[seq_index]
    garbage = float("-inf")
    return dict(logp_new=torch.where(mask, logp_new, garbage), logp_prox=torch.where(mask, logp_prox, garbage),
                logp_mu=torch.where(mask, logp_mu, 0.0), adv=adv, mask=mask, seq_index=seq_index)


def _ref_weights(b, mode, beta, cfg):
    """(w, keep) lists by a loop over tokens."""
    lp, lm, mask, seq = (b["logp_prox"].tolist(), b["logp_mu"].tolist(), b["mask"].tolist(),
                         b["seq_index"].tolist())
    geo: dict[int, list[float]] = {}
    for t in range(len(lp)):
        if mask[t]:
            geo.setdefault(seq[t], []).append(lp[t] - lm[t])
    ws, keeps = [], []
    for t in range(len(lp)):
        if not mask[t]:
            ws.append(0.0)
            keeps.append(False)
            continue
        rho = math.exp(lp[t] - lm[t])
        keep = True
        if mode == "none":
            w = 1.0
        elif mode in ("tis", "fixed", "sync"):
            w = min(rho, cfg.tis_cap)
        elif mode == "icepop":
            keep = cfg.icepop_low <= rho <= cfg.icepop_high
            w = rho
        elif mode == "mis":
            g = math.exp(sum(geo[seq[t]]) / len(geo[seq[t]]))
            keep = cfg.mis_low <= g <= cfg.mis_high
            w = min(rho, cfg.mis_high)
        else:
            keep = 1.0 / beta <= rho <= beta
            w = min(rho, beta)
        ws.append(w if keep else 0.0)
        keeps.append(keep)
    return ws, keeps


def _ref_loss(b, mode, lam, beta, cfg, n_total, per_token_d=None):
    """The loss built token by token with torch scalars (so its gradient can be compared too)."""
    ws, keeps = _ref_weights(b, mode, beta, cfg)
    new = b["logp_new"]
    pg = new.new_zeros(())
    pen = new.new_zeros(())
    for t in range(len(ws)):
        if not b["mask"][t]:
            continue
        a = float(b["adv"][t])
        if mode == "dcmdp" and cfg.penalty == "advantage":
            a -= lam * float(per_token_d[t])
        if mode == "dcmdp" and cfg.penalty == "k2":
            pen = pen + lam * 0.5 * (new[t] - float(b["logp_mu"][t])) ** 2
        if not keeps[t]:
            continue
        old = float(b["logp_mu"][t]) if mode == "none" else float(b["logp_prox"][t])
        ratio = torch.exp(new[t] - old)
        clipped = torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
        pg = pg - ws[t] * torch.minimum(ratio * a, clipped * a)
    total = (pg + pen) / n_total
    return total / (1 + lam) if mode == "dcmdp" else total


def _call(b, mode, lam, beta, cfg, n_total, per_token_d=None, logp_new=None):
    return L.policy_loss(b["logp_new"] if logp_new is None else logp_new, b["logp_prox"], b["logp_mu"],
                         b["adv"], b["mask"], mode=mode, lam=lam, beta=beta, per_token_d=per_token_d, cfg=cfg,
                         clip_low=CLIP_LOW, clip_high=CLIP_HIGH, n_tokens_total=n_total,
                         seq_index=b["seq_index"])


def _ptd(b, metric="abs_prob"):
    return per_token_discrepancy(torch.where(b["mask"], b["logp_prox"], 0.0), b["logp_mu"], metric)


def test_grpo_advantages_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(8, generator=g, dtype=torch.float64)
    got = L.grpo_advantages(rewards)
    r = rewards.tolist()
    mean = sum(r) / len(r)
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / len(r))
    for a, x in zip(got.tolist(), r):
        assert a == pytest.approx((x - mean) / (std + 1e-6), rel=1e-12)


def test_grpo_advantages_equal_rewards_give_zeros():
    assert torch.equal(L.grpo_advantages(torch.full((8,), 0.75)), torch.zeros(8))
    assert torch.equal(L.grpo_advantages(torch.tensor([1.0])), torch.zeros(1))
    assert torch.allclose(L.grpo_advantages(torch.tensor([1, 0, 0, 1])), torch.tensor([1.0, -1, -1, 1]), atol=1e-5)


@pytest.mark.parametrize("mode", CONTROLLER_MODES)
def test_behaviour_weights_match_loop_reference(mode):
    b = _batch(seed=1)
    cfg = _cfg()
    beta = 2.5
    w, keep, metrics = L.behaviour_weights(b["logp_prox"], b["logp_mu"], b["mask"], mode, 0.3, beta, cfg,
                                           b["seq_index"])
    ref_w, ref_keep = _ref_weights(b, mode, beta, cfg)
    assert keep.tolist() == ref_keep
    assert w.tolist() == pytest.approx(ref_w, rel=1e-12)
    n_mask = int(b["mask"].sum())
    assert metrics["masked_frac"].item() == pytest.approx((n_mask - sum(ref_keep)) / n_mask)
    if mode in ("icepop", "mis", "dcmdp"):
        assert 0 < sum(ref_keep) < n_mask  # the batch exercises the masking


def test_behaviour_weights_mis_needs_seq_index():
    b = _batch()
    with pytest.raises(ValueError, match="seq_index"):
        L.behaviour_weights(b["logp_prox"], b["logp_mu"], b["mask"], "mis", 0.0, 2.0, _cfg())


@pytest.mark.parametrize("mode,penalty,lam", [("dcmdp", "advantage", 0.7), ("dcmdp", "k2", 0.7),
                                              ("dcmdp", "advantage", 0.0), ("none", "advantage", 0.0),
                                              ("tis", "advantage", 0.0), ("icepop", "advantage", 0.0),
                                              ("mis", "advantage", 0.0), ("sync", "advantage", 0.0)])
def test_policy_loss_matches_loop_reference(mode, penalty, lam):
    b = _batch(seed=2)
    cfg = _cfg(penalty=penalty)
    beta = 2.0
    n_total = int(b["mask"].sum()) + 17  # other micro-batches of the step hold more tokens
    ptd = _ptd(b)
    new = b["logp_new"].clone().requires_grad_(True)
    loss, metrics = _call(b, mode, lam, beta, cfg, n_total, ptd, logp_new=new)
    loss.backward()
    new_ref = b["logp_new"].clone().requires_grad_(True)
    ref = _ref_loss(dict(b, logp_new=new_ref), mode, lam, beta, cfg, n_total, ptd)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-14)
    assert torch.allclose(new.grad, new_ref.grad, rtol=1e-10, atol=1e-14)
    assert metrics["loss"] == pytest.approx(ref.item(), rel=1e-10, abs=1e-14)
    assert metrics["n_tokens"] == int(b["mask"].sum())
    assert 0.0 <= metrics["clip_frac"] <= 1.0 and 0.0 <= metrics["masked_frac"] <= 1.0


def test_policy_loss_gradient_reaches_only_logp_new():
    b = _batch(seed=3)
    leaves = {k: b[k].clone().requires_grad_(True) for k in ("logp_new", "logp_prox", "logp_mu", "adv")}
    ptd = _ptd(b).requires_grad_(True)
    for mode, penalty in (("dcmdp", "advantage"), ("dcmdp", "k2"), ("none", "advantage"), ("mis", "advantage")):
        for x in (*leaves.values(), ptd):
            x.grad = None
        loss, _ = L.policy_loss(leaves["logp_new"], leaves["logp_prox"], leaves["logp_mu"], leaves["adv"],
                                b["mask"], mode=mode, lam=0.5, beta=2.0, per_token_d=ptd,
                                cfg=_cfg(penalty=penalty), clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                                n_tokens_total=100, seq_index=b["seq_index"])
        loss.backward()
        assert leaves["logp_new"].grad is not None and leaves["logp_new"].grad.abs().sum() > 0
        for name in ("logp_prox", "logp_mu", "adv"):
            assert leaves[name].grad is None, (mode, name)
        assert ptd.grad is None


def test_policy_loss_masked_tokens_get_zero_gradient():
    b = _batch(seed=4)
    for mode, penalty in (("dcmdp", "advantage"), ("dcmdp", "k2"), ("icepop", "advantage"), ("none", "k2")):
        new = b["logp_new"].clone().requires_grad_(True)  # -inf at every prompt token
        loss, _ = _call(b, mode, 0.5, 2.0, _cfg(penalty=penalty), 100, _ptd(b), logp_new=new)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(new.grad).all()
        assert (new.grad[~b["mask"]] == 0).all()
        assert (new.grad[b["mask"]] != 0).any()
    # IS-dropped tokens get no policy gradient (penalty 'advantage' adds none either).
    new = b["logp_new"].clone().requires_grad_(True)
    _, keep, _ = L.behaviour_weights(b["logp_prox"], b["logp_mu"], b["mask"], "dcmdp", 0.5, 2.0, _cfg())
    loss, _ = _call(b, "dcmdp", 0.5, 2.0, _cfg(), 100, _ptd(b), logp_new=new)
    loss.backward()
    assert (b["mask"] & ~keep).any() and (new.grad[b["mask"] & ~keep] == 0).all()


@pytest.mark.parametrize("mode,penalty", [("dcmdp", "advantage"), ("dcmdp", "k2"), ("mis", "advantage"),
                                          ("none", "advantage")])
def test_policy_loss_micro_batches_sum_to_full_batch(mode, penalty):
    b = _batch(n_seq=8, seed=5)
    cfg = _cfg(penalty=penalty)
    n_total = int(b["mask"].sum())
    ptd = _ptd(b)
    full_new = b["logp_new"].clone().requires_grad_(True)
    full, _ = _call(b, mode, 0.4, 2.0, cfg, n_total, ptd, logp_new=full_new)
    full.backward()
    micro_new = b["logp_new"].clone().requires_grad_(True)
    total = 0.0
    seq_len = 20
    for lo, hi in ((0, 3), (3, 4), (4, 8)):  # uneven micro-batches, split at sequence boundaries
        sl = slice(lo * seq_len, hi * seq_len)
        part = {k: v[sl] for k, v in b.items()}
        part["seq_index"] = part["seq_index"] - lo
        loss, _ = L.policy_loss(micro_new[sl], part["logp_prox"], part["logp_mu"], part["adv"], part["mask"],
                                mode=mode, lam=0.4, beta=2.0, per_token_d=ptd[sl], cfg=cfg,
                                clip_low=CLIP_LOW, clip_high=CLIP_HIGH, n_tokens_total=n_total,
                                seq_index=part["seq_index"])
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full.item(), rel=1e-10)
    assert torch.allclose(micro_new.grad, full_new.grad, rtol=1e-10, atol=1e-15)


def test_policy_loss_none_mode_equals_plain_ppo_with_mu_as_old():
    b = _batch(seed=6)
    n = int(b["mask"].sum())
    m = b["mask"]
    new = b["logp_new"][m].clone().requires_grad_(True)
    # Plain PPO over the generated tokens only, mu as pi_old: what an on-policy trainer would compute.
    ratio = torch.exp(new - b["logp_mu"][m])
    adv = b["adv"][m]
    plain = -torch.min(ratio * adv, ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) * adv).mean()
    plain.backward()
    for prox in (b["logp_prox"], b["logp_prox"] - 5.0):  # pi_prox must not matter in this mode
        full_new = b["logp_new"].clone().requires_grad_(True)
        loss, _ = L.policy_loss(full_new, prox, b["logp_mu"], b["adv"], m, mode="none", lam=0.0, beta=2.0,
                                per_token_d=None, cfg=_cfg(), clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                                n_tokens_total=n, seq_index=b["seq_index"])
        loss.backward()
        assert loss.item() == pytest.approx(plain.item(), rel=1e-12)
        assert torch.allclose(full_new.grad[m], new.grad, rtol=1e-10)


def test_policy_loss_dcmdp_lambda_zero_is_bounded_is_ppo():
    """lambda = 0: no shaping, no penalty, no (1 + lambda) scaling; beta alone decides the weights."""
    b = _batch(seed=7)
    ptd = _ptd(b)
    n = int(b["mask"].sum())
    for penalty in ("advantage", "k2"):
        a, _ = _call(b, "dcmdp", 0.0, 3.0, _cfg(penalty=penalty), n, ptd)
        ref = _ref_loss(b, "dcmdp", 0.0, 3.0, _cfg(penalty=penalty), n, ptd)
        assert a.item() == pytest.approx(ref.item(), rel=1e-12)
    shaped, _ = _call(b, "dcmdp", 2.0, 3.0, _cfg(), n, ptd)
    assert shaped.item() != pytest.approx(a.item(), rel=1e-6)


def test_policy_loss_advantage_penalty_needs_per_token_d():
    b = _batch()
    with pytest.raises(ValueError, match="per_token_d"):
        _call(b, "dcmdp", 0.5, 2.0, _cfg(penalty="advantage"), 10, None)
    with pytest.raises(ValueError, match="n_tokens_total"):
        _call(b, "tis", 0.0, 2.0, _cfg(), 0, None)


def test_policy_loss_reads_back_to_host_once(count_host_syncs):
    b = _batch(seed=8)
    ptd = _ptd(b)
    calls = count_host_syncs()
    _, metrics = _call(b, "mis", 0.5, 2.0, _cfg(penalty="k2"), 100, ptd)
    assert calls["tolist"] == 1
    assert all(isinstance(v, float) for v in metrics.values())
