"""Encoder-decoder models (T5, mT5, BART, Marian, mBART, Pegasus, BlenderBot) on the static loop: what
differs from decoder-only (NOT_FAST: the families refused, and why).

The encoder runs once per call, on the user's inputs padded on the right to a bucket (mask 0: the real
tokens keep the positions transformers gives them, left padding included), one graph per bucket. The
decoder is the static loop's: it starts from ``decoder_start_token_id`` (one token, no padding, so its
positions are the cache slots), with an ``EncoderDecoderCache`` of two static caches built by the era
adapter. The self-attention cache is written every step; the cross-attention cache (exactly the encoder
bucket long) is written at the first decoder step, after which the layers' ``is_updated`` flags make them
read it back: the first step is its own graph (the prefill), every later one the same (replayed).
``encoder_outputs=`` without input_ids skips the encoder: the given states are padded to the bucket.
With beams or ``num_return_sequences`` the encoder runs on the prompts once and its output is repeated
per row in the same graph (as transformers expands ``encoder_outputs``); a beam reorder moves the
self-attention cache only, the cross-attention one being the same in every beam of a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from xla_cache_patch import compat
from xla_cache_patch.fastgen.buckets import prompt_bucket

#: Model types with their own ``generate`` (a different loop), refused with what it would take.
OWN_GENERATE = {
    "whisper": "Whisper has its own generate (long-form chunking, timestamps, language detection and "
    "forced decoder prompts on the host); the fast path would need those as device-side processors",
}
_XLA_CAST = (
    "its decoder positions add the cache length (a device counter on a static cache) to int32 token "
    "counts, then cast to int64: torch_xla 2.9 cannot lower that cast (shift-left with s64 and s32)"
)
#: Model types the static loop cannot run or gets wrong, with why (measured by tests/xla_scripts/
#: gen_encdec.py families against CPU generate): refused before anything runs.
NOT_FAST = {
    "m2m_100": _XLA_CAST,  # NLLB's class
    "nllb-moe": _XLA_CAST,
    "led": "its decoder positions are torch.arange(cache_length, ...): a host read of the cache length "
    "that bakes each step's position into the step graph (a graph per step, other tokens than CPU's)",
    "fsmt": "its decoder positions compare the cache length with the position table on the host every "
    "step, and its tokens on the static loop differ from CPU generate's after some steps",
    "prophetnet": "its n-gram decoder does not run with a static cache (stock generate raises with "
    "cache_implementation='static' too)",
}


@dataclass
class EncoderInputs:
    """The encoder's inputs, right-padded to the bucket (CPU, int64), and the decoder's first token."""

    ids: torch.Tensor  # [B, E] the user's input_ids then pad ids
    mask: torch.Tensor  # [B, E] the user's mask then zeros
    length: int  # the user's input length (before the bucket padding)
    decoder_start: int
    repeat: int = 1  # decoder rows per prompt (num_beams or num_return_sequences)
    given: torch.Tensor | None = None  # [B, length, D] the user's encoder_outputs: the encoder does not run

    @classmethod
    def pad(
        cls, ids: torch.Tensor, mask: torch.Tensor, pad_id: int, decoder_start: int, repeat: int = 1
    ) -> EncoderInputs:
        batch, length = ids.shape
        bucket = prompt_bucket(length)
        padded = torch.full((batch, bucket), pad_id, dtype=torch.int64)
        padded[:, :length] = ids
        padded_mask = torch.zeros((batch, bucket), dtype=torch.int64)
        padded_mask[:, :length] = mask
        return cls(padded, padded_mask, length, decoder_start, repeat)

    @property
    def rows(self) -> int:
        """Decoder rows: every prompt ``repeat`` times."""
        return self.ids.shape[0] * self.repeat

    def decoder_ids(self) -> torch.Tensor:
        """[rows, 1] what transformers starts the decoder with (and returns first in ``sequences``)."""
        return torch.full((self.rows, 1), self.decoder_start, dtype=torch.int64)


@dataclass
class Encoded:
    """The encoder's output for this call, on the device (a per-call constant of the decoder steps)."""

    hidden: torch.Tensor  # [B, E, D]
    mask: torch.Tensor  # [B, E]


def decoder_start(model: Any, config: Any) -> int | None:
    """``decoder_start_token_id`` as transformers resolves it (falls back to bos); None if per row."""
    value = getattr(config, "decoder_start_token_id", None)
    if value is None:
        value = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if value is None:
        value = getattr(config, "bos_token_id", None)
    if value is None:
        return None
    flat = torch.as_tensor(value).flatten()
    return int(flat[0]) if flat.numel() == 1 else None


def make_cache(
    adapter: compat.Adapter, model: Any, cache_len: int, inputs: EncoderInputs, device: Any
) -> Any:
    """The call's EncoderDecoderCache (the plan only accepts eras that build one)."""
    assert adapter.make_encdec_cache is not None
    return adapter.make_encdec_cache(
        model.config,
        cache_len,
        inputs.ids.shape[1],
        batch_size=inputs.rows,
        device=device,
        dtype=model.dtype,
    )


def encode(model: Any, inputs: EncoderInputs, device: Any) -> Encoded:
    """Run the encoder once on the prompts (its own graph per bucket and repeat, executed here)."""
    import torch_xla

    ids, mask = inputs.ids.to(device), inputs.mask.to(device)
    if inputs.given is not None:  # padded to the bucket with zeros, masked out as the bucket's pad ids
        hidden = inputs.given.to(device)
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, ids.shape[1] - hidden.shape[1]))
    else:
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
    if inputs.repeat > 1:
        hidden = hidden.repeat_interleave(inputs.repeat, dim=0)
        mask = mask.repeat_interleave(inputs.repeat, dim=0)
    torch_xla.sync()
    return Encoded(hidden, mask)


def decoder_inputs(encoded: Encoded, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """One decoder forward's own arguments: the decoder tokens, over the encoder's output (the loop adds
    the cache and its positions)."""
    from transformers.modeling_outputs import BaseModelOutput

    return {
        "encoder_outputs": BaseModelOutput(last_hidden_state=encoded.hidden),
        "attention_mask": encoded.mask,
        "decoder_input_ids": ids,
        "decoder_attention_mask": mask,
    }
