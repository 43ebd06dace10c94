"""Warm-start data for the tiny model: solved episodes of the built-in environments, as token ids and loss masks.

The layout is the actor's (``envs.episode``): ``obs_0 | turn_1 EOS | obs_1 | ...``, loss on model turns only.
"""

from __future__ import annotations

from envs import Arithmetic, ChainSum, GuessNumber


def arithmetic_segments(seed: int) -> list[tuple[str, bool]]:
    """One solved arithmetic episode as (text, is_model_turn) pieces; the model turn ends with EOS."""
    env = Arithmetic()
    prompt = env.reset(seed)
    return [(prompt, False), (str(env.answer), True)]


def chain_sum_segments(seed: int, **kwargs) -> list[tuple[str, bool]]:
    """One solved chain_sum episode: the problem, then the worked answer (every partial sum) as the model turn."""
    env = ChainSum(**kwargs)
    prompt = env.reset(seed)
    return [(prompt, False), (env.worked_answer(), True)]


def dataset_segments(seed: int, **kwargs) -> list[tuple[str, bool]]:
    """One row of a dataset environment (draw ``seed``): its prompt, then its reference answer as the model turn."""
    from envs.dataset import DatasetEnv

    env = DatasetEnv(**kwargs)
    prompt = env.reset(seed)
    return [(prompt, False), (env.answer(), True)]


# The single-turn tasks the warm start can teach (model.tiny.warmstart_task): env name -> solved episode.
TEACHERS = {"arithmetic": lambda seed, **kw: arithmetic_segments(seed), "chain_sum": chain_sum_segments,
            "dataset": dataset_segments}


def key_door_segments(seed: int, **kwargs) -> list[tuple[str, bool]]:
    """One key_door episode solved by the shortest walk (x first, then y; ``KeyDoor.solution``), as
    (text, is_model_turn) pieces: 20+ model turns, each a command closed by EOS."""
    from envs.agent import KeyDoor

    env = KeyDoor(**kwargs)
    pieces = [(env.reset(seed), False)]
    for cmd in env.solution():
        pieces.append((cmd, True))
        result = env.step(cmd)
        if result.done:
            return pieces
        pieces.append((result.observation, False))
    raise AssertionError(f"key_door seed {seed}: the shortest walk did not open the door")


# The multi-turn task the warm start can teach and grade (model.tiny.warmstart_task = "key_door").
TEACHERS["key_door"] = key_door_segments


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


def encode_segments(pieces: list[tuple[str, bool]], tokenizer, chat=None) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of one episode: model turns get EOS appended and mask 1. With ``chat``
    (envs.chat.ChatFormat) the layout is the chat-formatted actor's: observations rendered as user messages
    (``first`` / ``next``), model turns closed by the end-of-turn token."""
    ids: list[int] = []
    mask: list[int] = []
    stop = chat.end_of_turn_id if chat is not None else tokenizer.eos_token_id
    for text, is_model in pieces:
        if chat is not None and not is_model:
            text = chat.next(text) if ids else chat.first(text)
        piece = tokenizer.encode(text, add_special_tokens=False)
        if is_model:
            piece = piece + [stop]
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
