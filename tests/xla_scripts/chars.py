"""An in-memory tokenizer for the tiny model's 256-token vocabulary: one character per token, no downloads.

Kept apart from the XLA scripts so CPU-only tests can build it without importing torch_xla.
"""

from __future__ import annotations

from typing import Any

VOCAB = 256

CHARS = [" ", "\n"] + [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0xA1 + 160)]
assert len(CHARS) == VOCAB


def tokenizer(space: int = 0, newline: int = 1) -> Any:
    """A WordLevel tokenizer of single characters (token i is CHARS[i]; ``space`` and ``newline`` are the
    tokens of " " and "\\n") with a Fuse decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = list(CHARS)
    chars[0], chars[space] = chars[space], chars[0]
    chars[1], chars[newline] = chars[newline], chars[1]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[-1]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    import transformers

    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
