"""The tiny model's character-level tokenizer: one token per printable ASCII character, plus specials.

Built locally (no hub): a BPE model without merges is exactly a character lookup, so transformers and vLLM
load it as a plain ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Every character the tokenizer knows: newline and printable ASCII. Anything else maps to <unk>.
CHARSET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_MULTIPLE = 8


# Chat roles (envs.chat.TINY_CHAT_TEMPLATE), in what were the first reserved slots: ids and vocabulary size are
# unchanged, so models built before they existed still load.
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


def vocab_layout() -> list[str]:
    """Token strings by id: specials (pad=0, bos=1, eos=2, unk=3), the characters, the chat role tokens, then
    reserved specials padding the vocabulary to a multiple of VOCAB_MULTIPLE (a size both engines handle well)."""
    tokens = SPECIAL_TOKENS + list(CHARSET) + ROLE_TOKENS
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
    from envs.chat import TINY_CHAT_TEMPLATE

    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        chat_template=TINY_CHAT_TEMPLATE,
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
