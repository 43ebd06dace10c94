"""The built-in tiny model: a Qwen3-architecture LM with a character tokenizer, warm-started on the envs.

``ensure_model(cfg)`` is what the learner and the actors call at start: it returns ``cfg.model.path``,
building it first when ``cfg.model.build_tiny`` is set and the directory is missing or was built from
a different ``model.tiny`` config. The directory is a plain HF model dir (config.json, tokenizer.json,
tokenizer_config.json, model.safetensors) that transformers and vLLM (CPU) both load.

Build = tokenizer (``tiny.tokenizer``) + random init + a short supervised warm start (teacher forcing on
the built-in environments' formats, ``tiny.data``: ``37+48=85<eos>`` and binary-search ``guess_number``
dialogues; or, with ``model.tiny.warmstart_task = "chain_sum"``, worked sums). It stops as soon as greedy
accuracy on that task's held-out seeds (``tiny.evaluate``) reaches
``model.tiny.warmstart_max_acc``: the model is left deliberately mediocre so RL has something to improve.

CLI: ``python -m tiny`` (see ``tiny/__main__.py``). Heavy imports (torch, transformers) happen inside
functions, so importing this module stays cheap for the learner's and the actor's entry points.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from envs.episode import chat_format
from protocol.errors import DcrlError
from tiny.data import TEACHERS, encode_segments, guess_segments, masked_nll, pad_batch
from tiny.evaluate import EVAL_SEED_BASE, evaluate_accuracy
from tiny.tokenizer import build_tokenizer, save_tokenizer, vocab_layout
from weights.format import sha256_file, write_weights

if TYPE_CHECKING:
    from configs.schema import DcrlConfig, TinyModelConfig

# Bump when the tokenizer, the data format or the build procedure changes: old caches become stale.
BUILD_FORMAT = 1
STAMP_FILE = "dcrl_tiny_stamp.json"


def build_model_config(tiny: "TinyModelConfig", vocab_size: int, tokenizer):
    """Qwen3 config for the tiny model: tied embeddings, fp32 weights, ids of the special tokens."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        head_dim=tiny.head_dim,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        architectures=["Qwen3ForCausalLM"],  # vLLM picks its model class from this list
    )


def check_vllm_cpu_constraints(tiny: "TinyModelConfig") -> None:
    """Shapes vLLM's CPU attention backend accepts: head_dim in its kernel list, GQA groups whole."""
    supported = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
    if tiny.head_dim not in supported:
        raise ValueError(f"model.tiny.head_dim={tiny.head_dim}: vLLM CPU attention supports {supported}")
    if tiny.num_heads % tiny.num_kv_heads:
        raise ValueError(f"model.tiny.num_heads ({tiny.num_heads}) must be a multiple of "
                         f"num_kv_heads ({tiny.num_kv_heads})")


class WarmStartError(RuntimeError):
    """The warm start could not land the model's held-out accuracy in its window; the message names the settings."""


def warm_start(model, tokenizer, tiny: "TinyModelConfig", seed: int, log=print, task_kwargs: dict | None = None,
               max_tokens: int = 8, max_turns: int = 12, max_seq_len: int | None = None,
               temperature: float = 0.0, chat=None) -> dict:
    """Supervised warm start (AdamW, teacher forcing) until held-out greedy accuracy on ``tiny.warmstart_task``
    (with ``task_kwargs``, turns of up to ``max_tokens`` tokens, up to ``max_turns`` turns in a context of up to
    ``max_seq_len`` tokens; sampled at ``temperature`` when > 0) lands in the window
    [``tiny.warmstart_min_acc``, ``tiny.warmstart_max_acc``]; returns {steps, accuracy, seconds}.

    Each step: ``warmstart_batch`` solved episodes of the task (``tiny.data.TEACHERS``) plus ``warmstart_guess_fraction`` as many
    binary-search guess_number dialogues (two forward passes, so short problems are not padded to
    dialogue length). Accuracy is checked every ``warmstart_eval_every`` steps; training stops at the first
    check inside the window. A check above the window means those steps overshot it (accuracy can jump by
    0.3 within ten steps for some seeds): model, optimizer and data stream go back to the previous check, and
    training resumes with a check after every step. Raises WarmStartError when ``warmstart_steps`` pass
    below the window, or a single step jumps over it. ``warmstart_steps = 0`` skips the warm start
    (random weights; the window is not checked).
    """
    import copy

    import torch

    rng = random.Random(seed)
    eval_seeds = [EVAL_SEED_BASE + i for i in range(tiny.warmstart_eval_episodes)]
    opt = torch.optim.AdamW(model.parameters(), lr=tiny.warmstart_lr, weight_decay=0.0)
    n_guess = round(tiny.warmstart_batch * tiny.warmstart_guess_fraction)
    if tiny.warmstart_guess_fraction > 0:
        n_guess = max(1, n_guess)
    lo, hi = tiny.warmstart_min_acc, tiny.warmstart_max_acc
    t0 = time.monotonic()
    task, kwargs = tiny.warmstart_task, dict(task_kwargs or {})
    teacher = TEACHERS[task]

    def accuracy() -> float:
        return evaluate_accuracy(model, tokenizer, task, eval_seeds, env_kwargs={**kwargs, **tiny.warmstart_eval_kwargs},
                                 max_turns=max_turns, max_tokens_per_turn=max_tokens, max_seq_len=max_seq_len,
                                 temperature=temperature, chat=chat)

    acc = accuracy()
    step, every = 0, tiny.warmstart_eval_every
    if tiny.warmstart_steps == 0:
        return {"steps": 0, "accuracy": acc, "seconds": round(time.monotonic() - t0, 1)}

    def snapshot() -> tuple:
        return (step, acc, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), rng.getstate())

    last = snapshot()
    while not lo <= acc <= hi:
        if acc > hi:
            if every == 1:
                raise WarmStartError(
                    f"warm start (run.seed {seed}): one step took held-out accuracy from {last[1]:.3f} to {acc:.3f}, "
                    f"over the window [{lo}, {hi}]: lower model.tiny.warmstart_lr or widen "
                    "model.tiny.warmstart_min_acc / warmstart_max_acc")
            log(f"[tiny] warm start step {step}: accuracy {acc:.3f} overshot the window [{lo}, {hi}]; "
                f"back to step {last[0]} ({last[1]:.3f}), checking after every step")
            step, acc = last[0], last[1]
            model.load_state_dict(last[2])
            opt.load_state_dict(last[3])
            rng.setstate(last[4])
            every = 1
            continue
        if step >= tiny.warmstart_steps:
            raise WarmStartError(
                f"warm start (run.seed {seed}): held-out accuracy {acc:.3f} after model.tiny.warmstart_steps={step} "
                f"steps, below model.tiny.warmstart_min_acc={lo}: raise warmstart_steps or warmstart_lr")
        last = snapshot()
        model.train()
        for _ in range(min(every, tiny.warmstart_steps - step)):
            arith = [encode_segments(teacher(rng.randrange(1 << 31), **kwargs), tokenizer, chat)
                     for _ in range(tiny.warmstart_batch)]
            loss = masked_nll(model, *pad_batch(arith, tokenizer.pad_token_id))
            if n_guess:
                dialogues = [encode_segments(guess_segments(rng.randrange(1 << 31)), tokenizer, chat)
                             for _ in range(n_guess)]
                loss = loss + masked_nll(model, *pad_batch(dialogues, tokenizer.pad_token_id))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
        acc = accuracy()
        log(f"[tiny] warm start step {step:4d}  loss {loss.item():.3f}  "
            f"held-out {task} acc {acc:.3f}  ({time.monotonic() - t0:.0f}s)")
    return {"steps": step, "accuracy": acc, "seconds": round(time.monotonic() - t0, 1)}


def config_digest(cfg: "DcrlConfig") -> str:
    """sha256 over everything the built model depends on: model.tiny, run.seed, BUILD_FORMAT."""
    tiny = cfg.model.tiny
    # fields added after builds were cached count only when set, so those caches hold
    unset = set() if tiny.warmstart_eval_kwargs else {"warmstart_eval_kwargs"}
    if tiny.warmstart_task == "arithmetic":  # the digest of arithmetic builds stays what it was: caches hold
        payload = {"tiny": tiny.model_dump(exclude={"warmstart_task"} | unset), "seed": cfg.run.seed,
                   "format": BUILD_FORMAT}
    else:
        payload = {"tiny": tiny.model_dump(exclude=unset), "seed": cfg.run.seed, "format": BUILD_FORMAT,
                   "task": [warmstart_task_kwargs(cfg), cfg.actor.max_tokens_per_turn]}
        if tiny.warmstart_task in MULTI_TURN_TASKS:  # graded over the run's turn limit (single-turn digests unchanged)
            payload["task"] += [cfg.actor.max_turns, cfg.model.max_seq_len, cfg.actor.temperature]
    if cfg.env.chat:  # a chat-formatted warm start is another model (plain builds keep their digest)
        payload["chat"] = [cfg.env.system_prompt, cfg.env.enable_thinking, cfg.env.chat_end_of_turn]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_stamp(model_dir: Path) -> dict | None:
    p = model_dir / STAMP_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def is_current(model_dir: Path, cfg: "DcrlConfig") -> bool:
    """The directory holds a complete build for this config (the stamp is written last)."""
    stamp = read_stamp(model_dir)
    return stamp is not None and stamp.get("config_sha256") == config_digest(cfg) and \
        (model_dir / "model.safetensors").is_file()


def build_tiny_model(cfg: "DcrlConfig", out_dir: Path, log=print) -> dict:
    """Build tokenizer + model, warm-start it, save the HF dir into ``out_dir``; returns the stamp."""
    tiny = cfg.model.tiny
    check_vllm_cpu_constraints(tiny)
    with torch_threads(tiny.warmstart_threads):
        return _build(cfg, out_dir, log)


@contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` intra-op torch threads, restoring the caller's setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Warm-start tasks of many model turns: graded as the actor plays them, within the run's ``actor.max_turns`` and
# ``model.max_seq_len`` and sampled at ``actor.temperature``. Greedy success is no guide there: over 20+ turns a
# model that solves 60% of layouts greedily solved none of 48 sampled at temperature 1 (every turn's small chance
# of a stray character compounds). Single-turn tasks keep evaluate's defaults: greedy, 12 turns, no context limit.
MULTI_TURN_TASKS = frozenset({"key_door"})


def eval_limits(cfg: "DcrlConfig") -> dict:
    """``max_turns``, ``max_seq_len`` and ``temperature`` of the warm start's held-out episodes (``warm_start``'s
    kwargs)."""
    if cfg.model.tiny.warmstart_task in MULTI_TURN_TASKS:
        return {"max_turns": cfg.actor.max_turns, "max_seq_len": cfg.model.max_seq_len,
                "temperature": cfg.actor.temperature}
    return {}


def warmstart_task_kwargs(cfg: "DcrlConfig") -> dict:
    """The task's kwargs: the run's ``env.kwargs`` when the run trains that task, else its defaults."""
    return dict(cfg.env.kwargs) if cfg.env.name == cfg.model.tiny.warmstart_task else {}


def _build(cfg: "DcrlConfig", out_dir: Path, log) -> dict:
    import torch
    from transformers import Qwen3ForCausalLM

    tiny = cfg.model.tiny
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    tokenizer = build_tokenizer()
    mcfg = build_model_config(tiny, len(vocab_layout()), tokenizer)
    model = Qwen3ForCausalLM(mcfg).float()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[tiny] building {n_params / 1e6:.2f}M-parameter Qwen3 (vocab {mcfg.vocab_size}) into {out_dir}")
    result = warm_start(model, tokenizer, tiny, cfg.run.seed, log=log, task_kwargs=warmstart_task_kwargs(cfg),
                        max_tokens=cfg.actor.max_tokens_per_turn, chat=chat_format(cfg, tokenizer, "the tiny tokenizer"),
                        **eval_limits(cfg))
    log(f"[tiny] warm start done: {result['steps']} steps, held-out {tiny.warmstart_task} accuracy "
        f"{result['accuracy']:.3f} in {result['seconds']}s")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    digest = write_weights(model, out_dir)
    assert digest == sha256_file(out_dir / "model.safetensors")
    stamp = {"config_sha256": config_digest(cfg), "sha256": digest, "params": n_params, **result,
             "created_at": time.time()}
    (out_dir / STAMP_FILE).write_text(json.dumps(stamp, indent=1))
    return stamp


@contextmanager
def _build_lock(model_dir: Path):
    """Exclusive lock beside the model dir: actor and learner starting together build it once."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(model_dir.parent / f".{model_dir.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ModelPathError(DcrlError, RuntimeError):
    """``model.path`` names no usable model; the message says which setting to change."""


# What transformers and vLLM take for a Hugging Face hub id rather than a local path: "org/name".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_path(cfg: "DcrlConfig") -> None:
    """With ``model.build_tiny`` false, ``model.path`` must be a directory holding a config.json, or a hub id
    (``org/name``; transformers and vLLM find it in their cache or download it, so it is not checked here).
    Raises ModelPathError otherwise: the entry points call this at start, before Redis, torch or vLLM, so that
    a typo in the path is one line instead of a loader's traceback minutes later. A relative path that looks
    like a hub id (``runs/model``) and does not exist is left to the loader."""
    if cfg.model.build_tiny:
        return  # ensure_model builds it
    raw = cfg.model.path
    path = Path(raw).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelPathError(f"model.path {raw}: no config.json there, so not a Hugging Face model "
                                 "directory (point model.path at one, or set model.build_tiny=true)")
        return
    if path.exists():
        raise ModelPathError(f"model.path {raw} is a file; it must be a Hugging Face model directory or hub id")
    if not HUB_ID.match(raw):
        raise ModelPathError(f"model.path {raw}: no such directory (point model.path at a Hugging Face model "
                             "directory or hub id org/name, or set model.build_tiny=true to build the tiny model)")


def ensure_model(cfg: "DcrlConfig", force: bool = False, log=print) -> Path:
    """The HF model dir of ``cfg.model.path``, built and warm-started first if needed.

    Without ``cfg.model.build_tiny`` the path is returned as is (a local dir or a hub name).
    With it, a dir carrying a stamp of this very config is reused; a missing or stale one is rebuilt
    into a temporary sibling and renamed into place (readers never see half a model). A non-empty dir
    without a stamp is somebody else's model and is never deleted: that is an error.
    """
    path = Path(cfg.model.path)
    if not cfg.model.build_tiny:
        return path
    with _build_lock(path):
        if not force and is_current(path, cfg):
            return path
        if path.exists() and any(path.iterdir()) and read_stamp(path) is None:
            raise ModelPathError(f"model.path {path} holds files not built by tiny.build; "
                                 "refusing to overwrite it (point model.path elsewhere or set "
                                 "model.build_tiny=false)")
        tmp = path.parent / f".{path.name}.build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_tiny_model(cfg, tmp, log=log)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-built dir left behind; the error goes on
            raise
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    return path
