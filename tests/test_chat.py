"""Chat-formatted episodes (envs/chat.py): the rendering between turns, token in / token out, and the errors.

The episode loop is driven here by a scripted engine (it returns chosen token ids): what is under test is
that the trajectory keeps exactly the ids an engine produced, which needs ids that re-tokenisation would
change. The same loop on real vLLM is in tests/test_actor_engine.py (test_chat_episodes_on_vllm_...).
"""

from __future__ import annotations

import asyncio

import pytest

from configs import load_config
from envs import GuessNumber
from envs.chat import TINY_CHAT_TEMPLATE, ChatFormat, ChatTemplateError
from envs.episode import EpisodeLimits, TextCodec, chat_format, run_episode
from tiny.data import encode_segments

LIMITS = EpisodeLimits(max_tokens_per_turn=16, max_tokens_per_episode=200, max_turns=3, max_seq_len=256)

# A template in the manner of Qwen3's: earlier assistant turns lose their <think> block once a later user
# message exists, so rendering the whole conversation again changes tokens that were already sampled.
THINK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and not loop.last %}<|assistant|>{{ m['content'].split('</think>')[-1] }}<eos>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<eos>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if not enable_thinking %}<think></think>{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from tiny.tokenizer import build_tokenizer

    return build_tokenizer()


class Turn:
    def __init__(self, ids):
        self.token_ids, self.logprobs, self.versions, self.stopped = ids, [-1.0] * len(ids), [0] * len(ids), True


class ScriptedEngine:
    """Returns the given turns in order (each closed by ``stop_id``) and records every context it was given."""

    def __init__(self, turns: list[list[int]], stop_id: int):
        self.turns, self.stop_id, self.contexts = list(turns), stop_id, []

    async def generate(self, context, max_tokens, request_id):
        self.contexts.append(list(context))
        return Turn(self.turns.pop(0) + [self.stop_id])


def chars(tokenizer, text: str) -> list[int]:
    """``text`` as one token per character, special-token spellings included (what a sampler can produce)."""
    return [tokenizer.convert_tokens_to_ids(c) for c in text]


def test_tiny_template_renders_roles_as_single_tokens(tokenizer):
    chat = ChatFormat(tokenizer, system_prompt="be brief")
    assert chat.first("12+3=") == "<|system|>be brief<|user|>12+3=<|assistant|>"
    assert chat.next("higher:") == "<|user|>higher:<|assistant|>"
    ids = tokenizer.encode(chat.next("hi"), add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>") and len(ids) == 4
    assert chat.end_of_turn_id == tokenizer.eos_token_id
    # the whole conversation, rendered by the template, is what first() + turns + next() build
    full = tokenizer.apply_chat_template(chat.messages(["12+3=", "hi"], ["15"]), tokenize=False,
                                         add_generation_prompt=True)
    assert full == chat.first("12+3=") + "15<eos>" + chat.next("hi")


def test_trained_tokens_are_the_engine_tokens_even_where_retokenising_differs(tokenizer):
    """The engine's second turn spells "<|user|>" in single characters: decoding and re-encoding would turn
    them into one special token. The trajectory must keep the engine's ids, and its contexts must be
    exactly the trajectory's prefixes (token in)."""
    codec = TextCodec(tokenizer, chat=ChatFormat(tokenizer))
    turns = [chars(tokenizer, "50"), chars(tokenizer, "<|user|>75"), chars(tokenizer, "62")]
    engine = ScriptedEngine(turns, codec.stop_id)
    traj = asyncio.run(run_episode(engine, GuessNumber(), 1, codec, LIMITS, "r"))
    ids, mask = traj.tokens_np.tolist(), traj.mask_np.tolist()
    assert len(traj.turn_starts) == len(engine.contexts)
    for i, start in enumerate(traj.turn_starts):
        assert engine.contexts[i] == ids[:start]  # token in: the engine saw exactly the recorded prefix
        sent = turns[i] + [codec.stop_id]
        assert ids[start:start + len(sent)] == sent and all(mask[start:start + len(sent)])  # token out
    # Re-rendering the conversation and tokenising it is NOT the same sequence: the check above has teeth.
    replies = [tokenizer.decode(t, skip_special_tokens=False) for t in turns[:len(traj.turn_starts)]]
    env = GuessNumber()
    observations = [env.reset(1)] + [env.step(r).observation for r in replies[:-1]]
    rendered = tokenizer.apply_chat_template(codec.chat.messages(observations, replies), tokenize=False)
    assert tokenizer.encode(rendered, add_special_tokens=False) != ids


def test_incremental_rendering_survives_a_template_that_rewrites_earlier_turns(tokenizer):
    tokenizer.chat_template = THINK_TEMPLATE
    try:
        chat = ChatFormat(tokenizer, template_kwargs={"enable_thinking": False})
        assert chat.first("guess 1-100:") == "<|user|>guess 1-100:\n<|assistant|><think></think>"
        # after "...<eos>": the template's newline, the user message, the generation prompt
        assert chat.next("higher:") == "\n<|user|>higher:\n<|assistant|><think></think>"
        codec = TextCodec(tokenizer, chat=chat)
        turns = [chars(tokenizer, "<think>mid</think>50"), chars(tokenizer, "75"), chars(tokenizer, "62")]
        engine = ScriptedEngine(turns, codec.stop_id)
        traj = asyncio.run(run_episode(engine, GuessNumber(), 1, codec, LIMITS, "r"))
        first_turn = traj.tokens_np[traj.turn_starts[0]:traj.turn_starts[0] + len(turns[0])].tolist()
        assert first_turn == turns[0]  # the reasoning stays in what was trained, though a re-render drops it
    finally:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE


def test_chat_errors_name_the_setting(tokenizer):
    tokenizer.chat_template = None
    try:
        with pytest.raises(ChatTemplateError, match="no chat template.*env.chat"):
            ChatFormat(tokenizer)
    finally:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    with pytest.raises(ChatTemplateError, match="env.chat_end_of_turn"):
        ChatFormat(tokenizer, end_of_turn="<pad>")  # a real token the template never writes
    with pytest.raises(ChatTemplateError, match="not a token"):
        ChatFormat(tokenizer, end_of_turn="<|im_end|>")


def test_chat_config_reaches_the_codec_and_the_warm_start_layout(tokenizer):
    cfg = load_config("tiny", ["env.chat=true", "env.system_prompt=add", "env.name=arithmetic"], env={})
    chat = chat_format(cfg, tokenizer)
    codec = TextCodec(tokenizer, chat=chat)
    assert codec.prompt("1+2=") == tokenizer.encode("<|system|>add<|user|>1+2=<|assistant|>", add_special_tokens=False)
    assert codec.extra_stop_ids == []  # the tiny template ends turns with EOS, vLLM's default stop
    ids, mask = encode_segments([("1+2=", False), ("3", True)], tokenizer, chat)
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|system|>add<|user|>1+2=<|assistant|>3<eos>"
    assert mask == [0] * (len(ids) - 2) + [1, 1]
    assert chat_format(load_config("tiny", [], env={}), tokenizer) is None
