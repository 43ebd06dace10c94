"""Chat-formatted episodes, token in / token out.

With ``env.chat = true`` every observation is a user message and every model turn an assistant message,
rendered by the model's own chat template (``tokenizer.chat_template``). The episode's tokens are built
incrementally and never re-rendered:

* the first observation becomes ``render([system?, user(obs_0)], add_generation_prompt=True)``;
* a model turn is kept exactly as the engine produced it (its content, then the end-of-turn token the template
  closes assistant messages with: the engine's stop token);
* each later observation appends only the template's text *between* that end-of-turn token and the next
  assistant turn: whatever the template writes after an assistant message, the user message, the generation
  prompt.

That in-between text is cut, for each observation, from a stand-in conversation (one user message, one
assistant reply, then the observation), right after the stand-in reply's end-of-turn token; the real history
is never rendered, so templates that rewrite earlier turns when they render a whole conversation (Qwen3 drops
the reasoning of earlier assistant turns) cannot change tokens already sampled. A template that does not
close assistant messages with the end-of-turn token is refused at start-up.

Why not render the whole conversation each turn and tokenise it: the tokens trained must be the tokens the
engine sampled. Decoding a turn and encoding it again can give other ids (a merge the sampler never made, or
text that spells a special token), and the behaviour logprobs would then belong to tokens that were never
generated.
"""

from __future__ import annotations

from typing import Any

# The tiny tokenizer's template: role tokens, no separators (every token counts in a 64-256 token context);
# assistant messages end with <eos>, which is therefore the end-of-turn token and the engine's stop token.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# A stand-in exchange: the reply is a string no template writes itself, so it can be found in the rendering.
_STAND_IN_USER, _STAND_IN_REPLY = "?", "dcrl-stand-in-reply"


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or its template cannot be rendered incrementally."""


class ChatFormat:
    """Renders observations into the text that goes between model turns (see the module docstring).

    ``end_of_turn`` is the token string closing an assistant message (default: the tokenizer's EOS); the actor
    stops generation there. ``template_kwargs`` go to ``apply_chat_template`` (e.g. ``enable_thinking``).
    """

    def __init__(self, tokenizer, system_prompt: str = "", template_kwargs: dict[str, Any] | None = None,
                 end_of_turn: str | None = None, where: str = "model.path"):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"env.chat = true, but the tokenizer of {where} has no chat template "
                                    "(tokenizer_config.json 'chat_template'); set env.chat = false or use a chat model")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.template_kwargs = dict(template_kwargs or {})
        self.end_of_turn = end_of_turn or tokenizer.eos_token
        ids = tokenizer.convert_tokens_to_ids([self.end_of_turn])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ChatTemplateError(f"chat end-of-turn token {self.end_of_turn!r} is not a token of {where}")
        self.end_of_turn_id = int(ids[0])
        self._head = self._system()
        self.next("x")  # a template that cannot be rendered incrementally fails now, not mid-episode

    def _system(self) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **self.template_kwargs)

    def first(self, observation: str) -> str:
        """The prompt: system message (if any), the first observation as the user, the generation prompt."""
        return self._render(self._head + [{"role": "user", "content": observation}], True)

    def next(self, observation: str) -> str:
        """The text after a model turn's end-of-turn token up to the next model turn (``observation`` as the
        user message): cut from a stand-in conversation right after its assistant message's end of turn, so
        how the template renders earlier messages does not matter."""
        full = self._render(self._head + [{"role": "user", "content": _STAND_IN_USER},
                                          {"role": "assistant", "content": _STAND_IN_REPLY},
                                          {"role": "user", "content": observation}], True)
        reply = full.find(_STAND_IN_REPLY)
        cut = full.find(self.end_of_turn, reply + len(_STAND_IN_REPLY)) if reply >= 0 else -1
        if cut < 0:
            raise ChatTemplateError(f"the chat template does not close assistant messages with {self.end_of_turn!r}: "
                                    "set env.chat_end_of_turn to the token it uses")
        return full[cut + len(self.end_of_turn):]

    def messages(self, observations: list[str], replies: list[str]) -> list[dict]:
        """The conversation as messages (for logs and tests): system, then user/assistant in turn."""
        out = self._head[:]
        for i, obs in enumerate(observations):
            out.append({"role": "user", "content": obs})
            if i < len(replies):
                out.append({"role": "assistant", "content": replies[i]})
        return out
