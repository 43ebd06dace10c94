"""The built-in tiny model: a Qwen3-architecture LM with a character tokenizer, warm-started on the envs.

``ensure_model(cfg)`` is what the learner and the actors call at start: it returns ``cfg.model.path``,
building it first when ``cfg.model.build_tiny`` is set and the directory is missing or was built from
a different ``model.tiny`` config. The directory is a plain HF model dir (config.json, tokenizer.json,
tokenizer_config.json, model.safetensors) that transformers and vLLM (CPU) both load.

Build = tokenizer + random init + a short supervised warm start (teacher forcing on the built-in
environments' formats: ``37+48=85<eos>`` and binary-search ``guess_number`` dialogues). It stops as
soon as greedy arithmetic accuracy on held-out seeds reaches ``model.tiny.warmstart_max_acc``: the
model is left deliberately mediocre so RL has something to improve.

CLI::

    python -m learner.tiny --config tiny            # build (or reuse) the model, print accuracy
    python -m learner.tiny --config tiny --force    # rebuild
    python -m learner.tiny --config tiny --sample 8 # + 8 episodes sampled by real vLLM, with rewards

Heavy imports (torch, transformers, vllm) happen inside functions: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.envs import Arithmetic, GuessNumber, make_env

if TYPE_CHECKING:
    from configs.schema import DcrlConfig, TinyModelConfig

# Bump when the tokenizer, the data format or the build procedure changes: old caches become stale.
BUILD_FORMAT = 1
STAMP_FILE = "dcrl_tiny_stamp.json"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Every character the tokenizer knows: newline and printable ASCII. Anything else maps to <unk>.
CHARSET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_MULTIPLE = 8
# Held-out evaluation seeds live far above the training seeds (drawn below 2**31).
EVAL_SEED_BASE = 1 << 40


def vocab_layout() -> list[str]:
    """Token strings by id: specials (pad=0, bos=1, eos=2, unk=3), the characters, then reserved
    specials padding the vocabulary to a multiple of VOCAB_MULTIPLE (a size both engines handle well)."""
    tokens = SPECIAL_TOKENS + list(CHARSET)
    n_reserved = -len(tokens) % VOCAB_MULTIPLE
    return tokens + [f"<reserved_{i}>" for i in range(n_reserved)]


def build_tokenizer():
    """A character-level fast tokenizer: one token per character, decoded by plain concatenation.

    It adds no special tokens when encoding (no BOS/EOS post-processor), so ``encode(text)`` gives
    the same ids whether or not a caller asks for special tokens: actors and learner cannot disagree.
    BPE without merges is exactly a character lookup; the Fuse decoder joins pieces with nothing
    in between, so ``decode(encode(s)) == s`` for every string over CHARSET, also through vLLM's
    incremental DecodeStream.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens = vocab_layout()
    vocab = {t: i for i, t in enumerate(tokens)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    specials = [t for t in tokens if t.startswith("<") and t.endswith(">") and len(t) > 1]
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json. The class is recorded as PreTrainedTokenizerFast, the
    name transformers 4.x (GPU installs) and 5.x both resolve; 5.x alone would write its new name."""
    tokenizer.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")


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


# ---------------------------------------------------------------- warm-start data


def arithmetic_segments(seed: int) -> list[tuple[str, bool]]:
    """One solved arithmetic episode as (text, is_model_turn) pieces; the model turn ends with EOS."""
    env = Arithmetic()
    prompt = env.reset(seed)
    return [(prompt, False), (str(env.answer), True)]


def binary_search_guess(lo: int, hi: int) -> int:
    """The teacher's guess for guess_number given the feasible range [lo, hi]: the midpoint (lo + hi) // 2."""
    return (lo + hi) // 2


def guess_segments(seed: int, hi: int = 100, max_turns: int = 12) -> list[tuple[str, bool]]:
    """One guess_number episode played by binary search, as (text, is_model_turn) pieces."""
    env = GuessNumber(hi=hi, max_turns=max_turns)
    pieces = [(env.reset(seed), False)]
    lo, top = 1, hi
    while True:
        guess = binary_search_guess(lo, top)
        pieces.append((str(guess), True))
        result = env.step(str(guess))
        if result.done:
            return pieces
        pieces.append((result.observation, False))
        if result.observation.startswith("higher"):
            lo = guess + 1
        else:
            top = guess - 1


def encode_segments(pieces: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of one episode: model turns get EOS appended and mask 1."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_model in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        if is_model:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        mask += [int(is_model)] * len(piece)
    return ids, mask


def pad_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (ids, loss mask, attention mask) tensors, shape [B, max_len]."""
    import torch

    n = max(len(ids) for ids, _ in seqs)
    ids_t = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    loss_t = torch.zeros((len(seqs), n), dtype=torch.float32)
    attn_t = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        loss_t[i, : len(ids)] = torch.tensor(mask, dtype=torch.float32)
        attn_t[i, : len(ids)] = 1
    return ids_t, loss_t, attn_t


def masked_nll(model, ids, loss_mask, attn):
    """Mean next-token NLL over positions whose TARGET token has loss_mask 1 (teacher forcing)."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    targets = ids[:, 1:]
    weights = loss_mask[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll * weights.reshape(-1)).sum() / weights.sum().clamp(min=1.0)


# ---------------------------------------------------------------- greedy evaluation (transformers)


def greedy_turn(model, histories: list[list[int]], eos_id: int, pad_id: int,
                max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each history until EOS (included) or max_new_tokens, batched.

    Left padding with explicit position ids, no KV cache: sequences are short and the model tiny,
    so recomputing the prefix is cheaper than managing a padded cache.
    """
    import torch

    out: list[list[int]] = [[] for _ in histories]
    active = list(range(len(histories)))
    for _ in range(max_new_tokens):
        if not active:
            break
        seqs = [histories[i] + out[i] for i in active]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), n), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, n - len(s):] = torch.tensor(s)
            attn[row, n - len(s):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1).tolist()
        still = []
        for row, i in enumerate(active):
            out[i].append(nxt[row])
            if nxt[row] != eos_id:
                still.append(i)
        active = still
    return out


def run_greedy_episodes(model, tokenizer, env_name: str, seeds: list[int], env_kwargs: dict | None = None,
                        max_turns: int = 12, max_tokens_per_turn: int = 8) -> list[dict]:
    """Play one greedy episode per seed with the transformers model; returns [{reward, turns, text}].

    The token layout is the actor's: obs_0 | turn EOS | obs_1 | ...; an episode also ends after
    ``max_turns`` model turns (reward 0 unless the env said done).
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    envs = [make_env(env_name, env_kwargs or {}) for _ in seeds]
    histories = [tokenizer.encode(env.reset(s), add_special_tokens=False) for env, s in zip(envs, seeds)]
    results: list[dict | None] = [None] * len(seeds)
    active = list(range(len(seeds)))
    for turn in range(1, max_turns + 1):
        if not active:
            break
        gen = greedy_turn(model, [histories[i] for i in active], eos, pad, max_tokens_per_turn)
        still = []
        for i, toks in zip(active, gen):
            histories[i] += toks
            action = tokenizer.decode([t for t in toks if t != eos], skip_special_tokens=True)
            step = envs[i].step(action)
            if step.done or turn == max_turns:
                reward = step.reward if step.done else 0.0
                results[i] = {"reward": reward, "turns": turn, "text": tokenizer.decode(histories[i])}
            else:
                histories[i] += tokenizer.encode(step.observation, add_special_tokens=False)
                still.append(i)
        active = still
    return results  # type: ignore[return-value]


def evaluate_accuracy(model, tokenizer, env_name: str, seeds: list[int], env_kwargs: dict | None = None,
                      max_turns: int = 12, max_tokens_per_turn: int = 8) -> float:
    """Fraction of greedy episodes (one per seed) that earn a positive reward.

    For ``arithmetic`` this is exact-answer accuracy; for ``guess_number`` the success rate.
    Used by the warm start's stopping rule and available to evaluation scripts.
    """
    if not seeds:
        raise ValueError("evaluate_accuracy: no seeds")
    was_training = model.training
    model.eval()
    try:
        res = run_greedy_episodes(model, tokenizer, env_name, seeds, env_kwargs, max_turns, max_tokens_per_turn)
    finally:
        model.train(was_training)
    return sum(r["reward"] > 0 for r in res) / len(res)


# ---------------------------------------------------------------- build + warm start


def warm_start(model, tokenizer, tiny: "TinyModelConfig", seed: int, log=print) -> dict:
    """Supervised warm start (AdamW, teacher forcing) until held-out greedy arithmetic accuracy reaches
    ``tiny.warmstart_max_acc`` or ``tiny.warmstart_steps`` steps; returns {steps, accuracy, seconds}.

    Each step: ``warmstart_batch`` arithmetic episodes plus ``warmstart_guess_fraction`` as many
    binary-search guess_number dialogues (two forward passes, so short problems are not padded to
    dialogue length). Accuracy is checked every ``warmstart_eval_every`` steps.
    """
    import torch

    rng = random.Random(seed)
    eval_seeds = [EVAL_SEED_BASE + i for i in range(tiny.warmstart_eval_episodes)]
    opt = torch.optim.AdamW(model.parameters(), lr=tiny.warmstart_lr, weight_decay=0.0)
    n_guess = round(tiny.warmstart_batch * tiny.warmstart_guess_fraction)
    if tiny.warmstart_guess_fraction > 0:
        n_guess = max(1, n_guess)
    t0 = time.monotonic()
    acc = evaluate_accuracy(model, tokenizer, "arithmetic", eval_seeds)
    step = 0
    while step < tiny.warmstart_steps and acc < tiny.warmstart_max_acc:
        model.train()
        arith = [encode_segments(arithmetic_segments(rng.randrange(1 << 31)), tokenizer)
                 for _ in range(tiny.warmstart_batch)]
        loss = masked_nll(model, *pad_batch(arith, tokenizer.pad_token_id))
        if n_guess:
            dialogues = [encode_segments(guess_segments(rng.randrange(1 << 31)), tokenizer)
                         for _ in range(n_guess)]
            loss = loss + masked_nll(model, *pad_batch(dialogues, tokenizer.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % tiny.warmstart_eval_every == 0 or step == tiny.warmstart_steps:
            acc = evaluate_accuracy(model, tokenizer, "arithmetic", eval_seeds)
            log(f"[tiny] warm start step {step:4d}  loss {loss.item():.3f}  "
                f"held-out arithmetic acc {acc:.3f}  ({time.monotonic() - t0:.0f}s)")
    return {"steps": step, "accuracy": acc, "seconds": round(time.monotonic() - t0, 1)}


def config_digest(cfg: "DcrlConfig") -> str:
    """sha256 over everything the built model depends on: model.tiny, run.seed, BUILD_FORMAT."""
    payload = {"tiny": cfg.model.tiny.model_dump(), "seed": cfg.run.seed, "format": BUILD_FORMAT}
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


def _build(cfg: "DcrlConfig", out_dir: Path, log) -> dict:
    import torch
    from transformers import Qwen3ForCausalLM

    from learner.weights_io import sha256_file, write_weights

    tiny = cfg.model.tiny
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    tokenizer = build_tokenizer()
    mcfg = build_model_config(tiny, len(vocab_layout()), tokenizer)
    model = Qwen3ForCausalLM(mcfg).float()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[tiny] building {n_params / 1e6:.2f}M-parameter Qwen3 (vocab {mcfg.vocab_size}) into {out_dir}")
    result = warm_start(model, tokenizer, tiny, cfg.run.seed, log=log)
    log(f"[tiny] warm start done: {result['steps']} steps, held-out arithmetic accuracy "
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
            raise RuntimeError(f"model.path {path} holds files not built by learner.tiny; "
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


# ---------------------------------------------------------------- vLLM (CPU)


def vllm_cpu_env(kv_cache_gb: int = 1, threads: int | None = None) -> dict[str, str]:
    """Environment variables for a vLLM CPU engine on a small shared machine (set before vLLM starts).

    - VLLM_CPU_KVCACHE_SPACE: KV cache in GiB (default 4 would be mostly wasted on the tiny model).
    - VLLM_CPU_OMP_THREADS_BIND=nobind: vLLM's default ``auto`` pins the worker's OpenMP threads to
      one core per NUMA node and reserves another for the scheduler; several engines plus a learner
      on 2 cores would then all pile onto the same pinned core. ``nobind`` leaves placement to the OS.
    - OMP_NUM_THREADS: with ``nobind`` vLLM does not set it; one thread per engine by default, since
      the tiny model's matmuls are too small to gain from more and the learner needs the other core.
    - TOKENIZERS_PARALLELISM=false: no tokenizer thread pool beside the engine.
    - VLLM_HOST_IP / VLLM_LOOPBACK_IP=127.0.0.1: vLLM otherwise advertises the machine's network
      address for its internal message queues; all traffic stays on loopback.
    """
    return {
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOOPBACK_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads or 1),
        "TOKENIZERS_PARALLELISM": "false",
    }


def vllm_engine_kwargs(cfg: "DcrlConfig", model_dir: str | os.PathLike,
                       dtype: str | None = None) -> dict[str, Any]:
    """Engine arguments for the tiny model on vLLM: eager mode (no compile/graph capture: seconds,
    not minutes, to start on CPU), behaviour logprobs after temperature, the run's context length."""
    return {
        "model": str(model_dir),
        "dtype": dtype or cfg.actor.dtype,
        "enforce_eager": True,
        "max_model_len": cfg.model.max_seq_len,
        "logprobs_mode": "processed_logprobs",
        "seed": cfg.actor.seed,
    }


def sample_with_vllm(cfg: "DcrlConfig", model_dir: Path, n: int, log=print) -> list[dict]:
    """Play ``n`` episodes of ``cfg.env`` with real vLLM (offline ``LLM``), printing each transcript
    and reward: the smallest end-to-end slice (model -> vLLM -> env -> reward) before the actor."""
    for k, v in vllm_cpu_env(cfg.actor.cpu_kv_cache_gb).items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams

    llm = LLM(**vllm_engine_kwargs(cfg, model_dir))
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=cfg.actor.temperature, top_p=cfg.actor.top_p,
                            max_tokens=cfg.actor.max_tokens_per_turn, logprobs=0, seed=cfg.actor.seed)
    max_turns = min(cfg.actor.max_turns, int(cfg.env.kwargs.get("max_turns", cfg.actor.max_turns)))
    envs = [make_env(cfg.env.name, cfg.env.kwargs) for _ in range(n)]
    seeds = [cfg.actor.seed + i for i in range(n)]
    histories = [tokenizer.encode(e.reset(s), add_special_tokens=False) for e, s in zip(envs, seeds)]
    prompts = [tokenizer.decode(h) for h in histories]
    results: list[dict | None] = [None] * n
    active = list(range(n))
    for turn in range(1, max_turns + 1):
        if not active:
            break
        outs = llm.generate([{"prompt_token_ids": histories[i]} for i in active], params, use_tqdm=False)
        still = []
        for i, out in zip(active, outs):
            comp = out.outputs[0]
            histories[i] += list(comp.token_ids)
            step = envs[i].step(comp.text)
            if step.done or turn == max_turns:
                results[i] = {"seed": seeds[i], "reward": step.reward if step.done else 0.0, "turns": turn,
                              "prompt": prompts[i], "completion": tokenizer.decode(histories[i])[len(prompts[i]):]}
            else:
                histories[i] += tokenizer.encode(step.observation, add_special_tokens=False)
                still.append(i)
        active = still
    for r in results:
        log(f"[sample] seed {r['seed']}  prompt {r['prompt']!r}  completion {r['completion']!r}  "
            f"reward {r['reward']:.2f}  turns {r['turns']}")
    mean = sum(r["reward"] for r in results) / max(1, n)
    log(f"[sample] {n} episodes of {cfg.env.name} on vLLM ({cfg.actor.dtype}): mean reward {mean:.3f}")
    return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    from configs.schema import add_config_args, config_from_args

    parser = argparse.ArgumentParser(prog="python -m learner.tiny", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--force", action="store_true", help="rebuild even if a current build exists")
    parser.add_argument("--sample", type=int, default=0, metavar="N",
                        help="then play N episodes of cfg.env with real vLLM and print them")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.model.build_tiny and not Path(cfg.model.path).exists():
        print(f"error: model.build_tiny is false and {cfg.model.path} does not exist", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    path = ensure_model(cfg, force=args.force)
    stamp = read_stamp(path)
    if stamp is not None:
        print(f"[tiny] model at {path}: warm-start accuracy {stamp['accuracy']:.3f} "
              f"after {stamp['steps']} steps ({time.monotonic() - t0:.1f}s this call)")
    if args.sample:
        sample_with_vllm(cfg, path, args.sample)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
