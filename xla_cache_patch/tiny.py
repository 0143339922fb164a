"""A tiny Llama and a one-token decode loop, shared by the bench, doctor, examples and tests.

Everything here is built from a config with random weights (no downloads), so a probe on any
machine measures the cache code and not the network. torch and transformers are imported inside
the functions: importing this module stays as cheap as importing the package.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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


def tiny_model(
    layers: int = DEFAULT_LAYERS,
    hidden: int = DEFAULT_HIDDEN,
    seed: int = DEFAULT_SEED,
    *,
    kv_heads: int = NUM_KV_HEADS,
    sliding_window: int | None = None,
) -> Any:
    """Random-weight Llama (or Mistral) for causal LM in eval mode; the seed makes tokens reproducible."""
    import torch
    from transformers import LlamaForCausalLM, MistralForCausalLM

    config = tiny_config(layers, hidden, kv_heads=kv_heads, sliding_window=sliding_window)
    torch.manual_seed(seed)
    return (LlamaForCausalLM if sliding_window is None else MistralForCausalLM)(config).eval()


def prompt_ids(
    vocab: int = DEFAULT_VOCAB, length: int = DEFAULT_PROMPT_LEN, seed: int = DEFAULT_SEED
) -> torch.Tensor:
    """A (1, length) int64 prompt on CPU, drawn from its own generator so models don't shift it."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=gen)


def make_static_cache(
    config: Any,
    max_cache_len: int,
    *,
    batch_size: int = 1,
    device: Any = None,
    dtype: Any = None,
) -> Any:
    """Build a ``StaticCache`` on any supported transformers, reading the constructor's signature.

    >= 4.56 takes keywords only (a positional third argument silently means ``offloading``) and
    allocates lazily on the device of the first write; older ones need batch size, device, dtype.
    """
    import torch
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs: dict[str, Any] = {"config": config, "max_cache_len": max_cache_len}
    eager = "max_cache_len" not in params  # 4.54-4.55: StaticCache(*args, **kwargs), keywords only
    if "max_batch_size" in params or eager:
        kwargs["max_batch_size"] = batch_size
    elif "batch_size" in params:
        kwargs["batch_size"] = batch_size
    if "device" in params or eager:
        kwargs["device"] = device if device is not None else "cpu"
    if "dtype" in params or eager:
        kwargs["dtype"] = dtype if dtype is not None else torch.float32
    return StaticCache(**kwargs)


def drop_model_cache(model: Any) -> None:
    """Forget the static cache transformers < 5.15 keeps on the model between ``generate`` calls.

    Without this, generate on CPU then ``.to(xla)`` then generate fails with
    ``Expected XLA tensor. Got: torch.FloatTensor``.
    """
    model.__dict__.pop("_cache", None)
    modules = getattr(model, "_modules", None)
    if isinstance(modules, dict):
        modules.pop("_cache", None)


def cache_buffers(cache: Any) -> list[torch.Tensor]:
    """The K and V buffers of every layer: ``layers[i].keys/.values`` (4.54+) or ``key_cache`` lists.

    Lazily allocated layers (4.56+) that have not been written yet have none and are skipped.
    """
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    return [*cache.key_cache, *cache.value_cache]


def returned_cache(out: Any) -> Any:
    """The cache of a ``return_dict_in_generate`` output: 5.24 renamed ``past_key_values`` to ``cache``."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_argument(model: Any) -> str:
    """Name of the forward's cache argument: 5.24 renamed ``past_key_values`` to ``cache``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


@dataclass
class DecodeResult:
    """New tokens (CPU, shape (1, n)), per-step host wall time and compile counts, and the cache."""

    tokens: torch.Tensor
    step_seconds: list[float] = field(default_factory=list)
    step_compiles: list[int] = field(default_factory=list)
    cache: Any = None


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
        cache = make_static_cache(model.config, length, device=device, dtype=next(model.parameters()).dtype)
    name = cache_argument(model)
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
