"""A tiny Llama and a one-token decode loop, shared by the bench, doctor, examples and tests.

Everything here is built from a config with random weights (no downloads), so a probe on any
machine measures the cache code and not the network. torch and transformers are imported inside
the functions: importing this module stays as cheap as importing the package.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xla_cache_patch import compat

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_LAYERS = 2
DEFAULT_HIDDEN = 64
DEFAULT_VOCAB = 256
DEFAULT_PROMPT_LEN = 8
DEFAULT_SEED = 0
NUM_HEADS = 4
NUM_KV_HEADS = 2


def tiny_config(
    layers: int = DEFAULT_LAYERS,
    hidden: int = DEFAULT_HIDDEN,
    vocab: int = DEFAULT_VOCAB,
    *,
    kv_heads: int = NUM_KV_HEADS,
    sliding_window: int | None = None,
) -> Any:
    """Config of the project's reference model; ``hidden`` must split into 4 heads.

    ``kv_heads=4`` gives a cache that splits over 4 devices (SPMD); the default 2 is grouped-query.
    ``sliding_window`` makes it a Mistral, whose static cache rolls a window of that many slots.
    """
    if hidden % (2 * NUM_HEADS):
        raise ValueError(f"hidden={hidden} must be a multiple of {2 * NUM_HEADS} (4 heads, even head_dim)")
    from transformers import LlamaConfig, MistralConfig

    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )
    if sliding_window is not None:
        return MistralConfig(sliding_window=sliding_window, **fields)
    return LlamaConfig(**fields)


#: Real model shapes with random weights (no downloads): the architectures and sizes of the published
#: configs of HuggingFaceTB/SmolLM2-135M and Qwen/Qwen2.5-0.5B, for measurements at a real size. One column
#: per checkpoint.
_DECODER_SHAPES = """
field                    smollm2-135m  qwen2.5-0.5b
model_type               llama         qwen2
vocab_size               49152         151936
hidden_size              576           896
intermediate_size        1536          4864
num_hidden_layers        30            24
num_attention_heads      9             14
num_key_value_heads      3             2
tie_word_embeddings      True          True
rope_theta               100000.0      1000000.0
rms_norm_eps             1e-5          1e-6
max_position_embeddings  8192          32768
bos_token_id             0             151643
eos_token_id             0             151643
"""


def _columns(table: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """``preset -> (model_type, config fields)`` from a table with one column per preset."""
    import ast

    (_, *names), (_, *types), *rows = (line.split() for line in table.strip().splitlines())
    return {
        name: (types[i], {row[0]: ast.literal_eval(row[1 + i]) for row in rows})
        for i, name in enumerate(names)
    }


PRESETS: dict[str, tuple[str, dict[str, Any]]] = _columns(_DECODER_SHAPES)


#: Encoder-decoder presets (built with AutoModelForSeq2SeqLM): the published config of google-t5/t5-small.
_SEQ2SEQ_SHAPES = """
field                           t5-small
model_type                      t5
vocab_size                      32128
d_model                         512
d_kv                            64
d_ff                            2048
num_layers                      6
num_decoder_layers              6
num_heads                       8
relative_attention_num_buckets  32
feed_forward_proj               "relu"
tie_word_embeddings             True
pad_token_id                    0
eos_token_id                    1
decoder_start_token_id          0
"""
SEQ2SEQ_PRESETS: dict[str, tuple[str, dict[str, Any]]] = _columns(_SEQ2SEQ_SHAPES)


def preset_model(name: str, seed: int = DEFAULT_SEED) -> Any:
    """A random-weight model with the shapes of a published checkpoint (see PRESETS), in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if name in SEQ2SEQ_PRESETS:
        model_type, fields = SEQ2SEQ_PRESETS[name]
        torch.manual_seed(seed)
        return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(model_type, **fields)).eval()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join([*PRESETS, *SEQ2SEQ_PRESETS])}")
    model_type, fields = PRESETS[name]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields)).eval()


#: Tiny encoder-decoder configs (random weights): T5 v1.0 (ReLU FFN, tied embeddings), T5 v1.1 / Flan
#: (gated GELU, untied), mT5, BART, Marian, mBART (mBART-50 is the same class), M2M100 (NLLB's class),
#: Pegasus, BlenderBot (and Small), LED, FSMT and ProphetNet. Token ids: pad 1 (T5 family: 0), eos 2
#: (T5: 1). The BART family is untied: with transformers' small initialisation a tied tiny model repeats
#: its last token forever.
TINY_SEQ2SEQ: dict[str, tuple[str, dict[str, Any]]] = {
    "t5": ("t5", dict(feed_forward_proj="relu", tie_word_embeddings=True)),
    "t5-v1.1": ("t5", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mt5": ("mt5", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "bart": ("bart", dict(tie_word_embeddings=False)),
    "marian": ("marian", dict(tie_word_embeddings=False)),
    "mbart": ("mbart", dict(tie_word_embeddings=False)),
    "m2m100": ("m2m_100", dict(tie_word_embeddings=False)),
    "pegasus": ("pegasus", dict(tie_word_embeddings=False)),
    "blenderbot": ("blenderbot", dict(tie_word_embeddings=False)),
    "blenderbot-small": ("blenderbot-small", dict(tie_word_embeddings=False)),
    "led": ("led", dict(tie_word_embeddings=False)),
    "fsmt": ("fsmt", dict(tie_word_embeddings=False)),
    "prophetnet": ("prophetnet", dict(tie_word_embeddings=False)),
}
#: Weight matrices are redrawn with this std: varied tokens (transformers' init gives one token repeated).
SEQ2SEQ_STD = 0.5


def _seq2seq_fields(model_type: str, vocab: int) -> dict[str, Any]:
    """The tiny shape in each family's own field names."""
    if model_type in ("t5", "mt5"):
        return dict(
            vocab_size=vocab,
            d_model=DEFAULT_HIDDEN,
            d_kv=16,
            d_ff=2 * DEFAULT_HIDDEN,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=NUM_HEADS,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ids = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    if model_type == "prophetnet":
        return dict(
            vocab_size=vocab,
            hidden_size=DEFAULT_HIDDEN,
            encoder_ffn_dim=2 * DEFAULT_HIDDEN,
            decoder_ffn_dim=2 * DEFAULT_HIDDEN,
            num_encoder_layers=2,
            num_decoder_layers=2,
            num_encoder_attention_heads=NUM_HEADS,
            num_decoder_attention_heads=NUM_HEADS,
            max_position_embeddings=128,
            num_buckets=8,
            relative_max_distance=16,
            **ids,
        )
    fields: dict[str, Any] = dict(
        d_model=DEFAULT_HIDDEN,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=NUM_HEADS,
        decoder_attention_heads=NUM_HEADS,
        encoder_ffn_dim=2 * DEFAULT_HIDDEN,
        decoder_ffn_dim=2 * DEFAULT_HIDDEN,
        forced_eos_token_id=2,
        **ids,
    )
    if model_type == "led":  # Longformer attention in the encoder: windows of 4 tokens
        fields.update(max_encoder_position_embeddings=128, max_decoder_position_embeddings=128)
        fields.update(attention_window=4)
    else:
        fields.update(max_position_embeddings=128)
    if model_type == "fsmt":
        return dict(fields, langs=["en", "de"], src_vocab_size=vocab, tgt_vocab_size=vocab)
    if model_type == "marian":
        fields.update(decoder_start_token_id=1, forced_eos_token_id=None)
    return dict(fields, vocab_size=vocab)


def tiny_seq2seq(kind: str = "t5", seed: int = DEFAULT_SEED, vocab: int = DEFAULT_VOCAB) -> Any:
    """A random-weight tiny encoder-decoder model of ``kind`` (TINY_SEQ2SEQ), 2+2 layers, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    model_type, extra = TINY_SEQ2SEQ[kind]
    config = AutoConfig.for_model(model_type, **_seq2seq_fields(model_type, vocab), **extra)
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * SEQ2SEQ_STD)
    return model


def load_model(name: str | None = None) -> Any:
    """The model a command names: None for the tiny Llama, a preset (PRESETS), or a local checkpoint
    directory (``local_files_only``: the tools never download), in eval mode."""
    if name is None:
        return tiny_model()
    if name in PRESETS or name in SEQ2SEQ_PRESETS:
        return preset_model(name)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, local_files_only=True).eval()


def tiny_model(*config_args: Any, seed: int = DEFAULT_SEED, **config_kwargs: Any) -> Any:
    """Random-weight Llama (or Mistral) for causal LM in eval mode, built from ``tiny_config(*config_args,
    **config_kwargs)``; the seed makes tokens reproducible."""
    import torch
    from transformers import LlamaForCausalLM, MistralForCausalLM

    config = tiny_config(*config_args, **config_kwargs)
    torch.manual_seed(seed)
    sliding = config_kwargs.get("sliding_window") is not None
    return (MistralForCausalLM if sliding else LlamaForCausalLM)(config).eval()


def prompt_ids(
    vocab: int = DEFAULT_VOCAB, length: int = DEFAULT_PROMPT_LEN, seed: int = DEFAULT_SEED
) -> torch.Tensor:
    """A (1, length) int64 prompt on CPU, drawn from its own generator so models don't shift it."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=gen)


@dataclass
class DecodeResult:
    """New tokens (CPU, shape (batch, n)), per-step host wall time and compile counts, and the cache."""

    tokens: torch.Tensor
    step_seconds: list[float] = field(default_factory=list)
    step_compiles: list[int] = field(default_factory=list)
    cache: Any = None


def padded_prompts(
    vocab: int = DEFAULT_VOCAB, length: int = DEFAULT_PROMPT_LEN, seed: int = DEFAULT_SEED, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of 2 (lengths ``length`` and ``length - 3``) and its attention mask, on CPU."""
    import torch

    ids = prompt_ids(vocab, length, seed).repeat(2, 1)
    ids[1] = prompt_ids(vocab, length, seed + 1)[0]
    mask = torch.ones_like(ids)
    short = min(3, length - 1)
    ids[1, :short], mask[1, :short] = pad, 0
    return ids, mask


def decode_loop(
    model: Any,
    input_ids: torch.Tensor,
    new_tokens: int,
    *,
    cache: Any = None,
    max_cache_len: int | None = None,
    sync: Callable[[], None] | None = None,
    compiles: Callable[[], int] | None = None,
) -> DecodeResult:
    """Greedy decode one token per forward, passing ``cache_position`` as a device tensor.

    The position stays on the device (``pos[-1:] + 1``) so each step is the same graph; a Python
    int position would bake a new constant into every step. The first step is the prefill.
    ``sync`` cuts the lazy graph each step (``torch_xla.sync`` on XLA); ``compiles`` returns a
    running compile count to record per step.
    """
    import torch

    device = next(model.parameters()).device
    if cache is None:
        length = max_cache_len or input_ids.shape[1] + new_tokens
        cache = compat.current().make_static_cache(
            model.config,
            length,
            batch_size=input_ids.shape[0],
            device=device,
            dtype=next(model.parameters()).dtype,
        )
    name = compat.cache_kwarg(getattr(model, "_orig_mod", model))  # a torch.compile'd model too
    x = input_ids.to(device)
    pos = torch.arange(x.shape[1], device=device)
    out: list[torch.Tensor] = []
    result = DecodeResult(tokens=torch.empty(1, 0, dtype=torch.long), cache=cache)
    with torch.no_grad():
        for _ in range(new_tokens):
            before = compiles() if compiles else 0
            start = time.perf_counter()
            logits = model(input_ids=x, cache_position=pos, use_cache=True, **{name: cache}).logits
            x = logits[:, -1].argmax(-1, keepdim=True)
            pos = pos[-1:] + 1
            if sync is not None:
                sync()
            out.append(x)
            result.step_seconds.append(time.perf_counter() - start)
            result.step_compiles.append((compiles() - before) if compiles else 0)
    result.tokens = torch.cat([t.cpu() for t in out], dim=-1) if out else result.tokens
    return result
