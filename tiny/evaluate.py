"""Greedy evaluation of a transformers model on the environments, through the one episode loop.

:class:`GreedyEngine` gives a transformers causal LM the engine interface of ``envs.episode.run_episode``
(``async generate(context_ids, max_tokens, request_id)``). Requests of episodes that run concurrently on
one event loop are answered together, one left-padded batch per model turn, so evaluating N episodes
costs about as many forward passes as the longest episode has tokens::

    acc = evaluate_accuracy(model, tokenizer, "arithmetic", seeds)   # fraction with reward > 0

The token layout, turn and token limits and the reward are the actor's, since the loop is the same.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from envs import env_factory
from envs.episode import EpisodeLimits, TextCodec, run_episode

# Held-out evaluation seeds live far above the training seeds (drawn below 2**31).
EVAL_SEED_BASE = 1 << 40
# Budgets of an evaluation episode beyond the turn and per-turn limits: none in practice.
_NO_LIMIT = 1 << 30


@dataclass(frozen=True)
class GreedyTurn:
    """One greedy model turn (``envs.episode.TurnOutput``): logprobs and versions are placeholders (0)."""

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    stopped: bool


def greedy_turn(model, histories: list[list[int]], eos_id: int, pad_id: int,
                max_new_tokens: list[int], temperature: float = 0.0, generator=None) -> list[list[int]]:
    """Greedy continuation of each history until EOS (included) or its ``max_new_tokens``, batched; with
    ``temperature`` > 0, sampled at that temperature instead (from ``generator``, a seeded torch.Generator).

    Left padding with explicit position ids, no KV cache: sequences are short and the model tiny,
    so recomputing the prefix is cheaper than managing a padded cache.
    """
    import torch

    out: list[list[int]] = [[] for _ in histories]
    active = [i for i in range(len(histories)) if max_new_tokens[i] > 0]
    while active:
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
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()
        else:
            nxt = logits.argmax(-1).tolist()
        still = []
        for row, i in enumerate(active):
            out[i].append(nxt[row])
            if nxt[row] != eos_id and len(out[i]) < max_new_tokens[i]:
                still.append(i)
        active = still
    return out


class GreedyEngine:
    """A transformers model behind ``run_episode``'s engine interface: greedy decoding, and every request
    made in the same turn of the event loop decoded as one batch. With ``temperature`` > 0 it samples instead, from
    a generator seeded with ``seed`` (the same requests in the same order give the same tokens)."""

    def __init__(self, model, eos_id: int, pad_id: int, temperature: float = 0.0, seed: int = 0):
        import torch

        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
        self._pending: list[tuple[list[int], int, asyncio.Future]] = []

    async def generate(self, context_ids: list[int], max_tokens: int, request_id: str) -> GreedyTurn:
        loop = asyncio.get_running_loop()
        if not self._pending:
            # Runs after every episode task already scheduled has reached its own generate call.
            loop.call_soon(self._decode_pending)
        fut = loop.create_future()
        self._pending.append((list(context_ids), max_tokens, fut))
        return await fut

    def _decode_pending(self) -> None:
        batch, self._pending = self._pending, []
        try:
            outs = greedy_turn(self.model, [c for c, _, _ in batch], self.eos_id, self.pad_id,
                               [m for _, m, _ in batch], self.temperature, self.generator)
        except Exception as e:  # noqa: BLE001 - handed to every waiting episode, which re-raises it
            for _, _, fut in batch:
                fut.set_exception(e)
            return
        for (_, _, fut), toks in zip(batch, outs):
            stopped = bool(toks) and toks[-1] == self.eos_id
            fut.set_result(GreedyTurn(toks, [0.0] * len(toks), [0] * len(toks), stopped))


def run_greedy_episodes(model, tokenizer, env_name: str, seeds: list[int], env_kwargs: dict | None = None,
                        max_turns: int = 12, max_tokens_per_turn: int = 8, max_seq_len: int | None = None,
                        temperature: float = 0.0, chat=None) -> list[dict]:
    """Play one greedy episode per seed with the transformers model; returns [{reward, turns, text}].

    An episode ends when the env says done, or after ``max_turns`` model turns (reward 0), or, with
    ``max_seq_len``, when its context reaches that many tokens (reward 0, as in the actor); ``text`` is
    the whole episode decoded with its special tokens. ``temperature`` > 0 samples (seeded) instead of greedy.
    """
    new_env = env_factory(env_name, env_kwargs)  # a bad name or kwargs fails here, with its reason
    codec = TextCodec(tokenizer, chat=chat)  # chat: envs.chat.ChatFormat for chat-formatted episodes
    engine = GreedyEngine(model, codec.stop_id, tokenizer.pad_token_id, temperature)
    limits = EpisodeLimits(max_tokens_per_turn=max_tokens_per_turn, max_tokens_per_episode=_NO_LIMIT,
                           max_turns=max_turns, max_seq_len=max_seq_len or _NO_LIMIT)

    async def play() -> list:
        return await asyncio.gather(*(run_episode(engine, new_env(), s, codec, limits, f"eval-{i}")
                                      for i, s in enumerate(seeds)))

    trajs = run_to_completion(play)
    return [{"reward": t.reward, "turns": len(t.turn_starts), "text": tokenizer.decode(t.tokens_np.tolist())}
            for t in trajs]


def run_to_completion(coro_fn):
    """``asyncio.run(coro_fn())``, also when the caller is inside a running event loop (the actor's entry
    point builds the tiny model from its loop): then on a loop of its own in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    with ThreadPoolExecutor(1, thread_name_prefix="dcrl-eval") as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


def evaluate_accuracy(model, tokenizer, env_name: str, seeds: list[int], env_kwargs: dict | None = None,
                      max_turns: int = 12, max_tokens_per_turn: int = 8, max_seq_len: int | None = None,
                      temperature: float = 0.0, chat=None) -> float:
    """Fraction of greedy episodes (one per seed) that earn a positive reward.

    For ``arithmetic`` this is exact-answer accuracy; for ``guess_number`` the success rate.
    Used by the warm start's stopping rule and available to evaluation scripts.
    """
    if not seeds:
        raise ValueError("evaluate_accuracy: no seeds")
    was_training = model.training
    model.eval()
    try:
        res = run_greedy_episodes(model, tokenizer, env_name, seeds, env_kwargs, max_turns, max_tokens_per_turn,
                                  max_seq_len, temperature, chat)
    finally:
        model.train(was_training)
    return sum(r["reward"] > 0 for r in res) / len(res)
