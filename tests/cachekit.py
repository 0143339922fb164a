"""Era-portable cache construction and update scenarios for the tests (CPU eager or XLA)."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import cache_utils

from xla_cache_patch import compat


def buffers(cache: Any) -> list[torch.Tensor]:
    return compat.current().cache_buffers(cache)


HEADS, HEAD_DIM = 2, 4


def config(kind: str, layers: int = 2, window: int = 6) -> Any:
    common = dict(
        vocab_size=64,
        hidden_size=HEADS * HEAD_DIM * 2,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=HEADS * 2,
        num_key_value_heads=HEADS,
        max_position_embeddings=256,
    )
    if kind == "static":
        return transformers.LlamaConfig(**common)
    if kind == "sliding":
        return transformers.MistralConfig(sliding_window=window, **common)
    cfg = transformers.Gemma2Config(sliding_window=window, head_dim=HEAD_DIM, **common)
    return cfg


def _static_cache_kwargs(
    cls: type, batch: int, max_len: int, dtype: torch.dtype, device: Any
) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    if "max_batch_size" in params or "batch_size" in params or "max_cache_len" not in params:  # <= 4.55
        key = "batch_size" if "batch_size" in params and "max_batch_size" not in params else "max_batch_size"
        return {key: batch, "max_cache_len": max_len, "device": device, "dtype": dtype}
    return {"max_cache_len": max_len}


def make_cache(
    kind: str,
    batch: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
    device: Any = "cpu",
    layers: int = 2,
    window: int = 6,
) -> Any:
    """A static, sliding-window or hybrid cache of the installed era, buffers on ``device``."""
    cfg = config(kind, layers, window)
    cls = cache_utils.StaticCache
    if (
        kind == "sliding"
        and hasattr(cache_utils, "SlidingWindowCache")
        and not hasattr(cache_utils, "StaticLayer")
    ):
        cls = cache_utils.SlidingWindowCache
    if kind == "sliding" and hasattr(cache_utils, "SlidingWindowCache") and _eager_layers():
        cls = cache_utils.SlidingWindowCache
    if kind == "hybrid" and hasattr(cache_utils, "HybridCache") and not _lazy_layers():
        cls = cache_utils.HybridCache
    cache = cls(config=cfg, **_static_cache_kwargs(cls, batch, max_len, dtype, device))
    if hasattr(cache, "early_initialization"):  # lazy layers: allocate now so both runs start equal
        try:
            cache.early_initialization(batch, HEADS, HEAD_DIM, dtype, device)
        except TypeError:
            cache.early_initialization(
                batch_size=batch, num_heads=HEADS, head_dim=HEAD_DIM, dtype=dtype, device=device
            )
    return cache


def _eager_layers() -> bool:
    layer = getattr(cache_utils, "StaticLayer", None)
    return layer is not None and not hasattr(layer, "lazy_initialization")


def _lazy_layers() -> bool:
    layer = getattr(cache_utils, "StaticLayer", None)
    return layer is not None and hasattr(layer, "lazy_initialization")


def n_layers(cache: Any) -> int:
    return len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)


def is_sliding(cache: Any, layer: int) -> bool:
    if hasattr(cache, "layers"):
        return bool(getattr(cache.layers[layer], "is_sliding", False))
    flags = getattr(cache, "is_sliding", None)
    if isinstance(flags, bool):
        return flags
    if flags is not None:
        return bool(flags[layer])
    return isinstance(cache, getattr(cache_utils, "SlidingWindowCache", ()))


@dataclass
class Step:
    start: int
    length: int


def steps(prefill: int, decode: int) -> list[Step]:
    out = [Step(0, prefill)]
    out += [Step(prefill + i, 1) for i in range(decode)]
    return out


def run(
    cache: Any,
    plan: list[Step],
    batch: int,
    dtype: torch.dtype,
    seed: int = 0,
    pos_dtype: torch.dtype = torch.int64,
    device: Any = "cpu",
    window: int = 6,
) -> list[Any]:
    """Feed ``plan`` through every layer's update; return every result and length read."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Any] = []
    for step in plan:
        pos = torch.arange(step.start, step.start + step.length, dtype=pos_dtype)
        for layer in range(n_layers(cache)):
            k = torch.randn(batch, HEADS, step.length, HEAD_DIM, generator=gen).to(dtype)
            v = torch.randn(batch, HEADS, step.length, HEAD_DIM, generator=gen).to(dtype)
            kwargs = {"cache_position": pos.to(device)}
            if is_sliding(cache, layer):
                kwargs["sliding_window"] = window
            ko, vo = cache.update(k.to(device), v.to(device), layer, kwargs)
            out += [ko.cpu().clone(), vo.cpu().clone()]
        out.append(_length(cache))
    return out


def _length(cache: Any) -> Any:
    try:
        value = cache.get_seq_length()
    except Exception as exc:  # some eras' hybrid caches refuse; the refusal must match too
        return type(exc)
    return value.cpu().clone() if isinstance(value, torch.Tensor) else value


def same(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def clone(cache: Any) -> Any:
    return copy.deepcopy(cache)
