"""The static-shape decoding loop behind the XLA fast path of ``generate``.

Why each step compiles to the same graph: nothing in it changes shape or carries a Python value that
changes. The prompt is left-padded to a bucket (mask 0, so attention ignores the pad slots and the
positions of the real tokens stay those transformers uses); the attention mask and the output ids are
allocated once at their final length and written with ``index_copy`` at a device-side slot; positions,
the slot, the finished rows and the sampling parameters are device tensors. The host only reads the
"anything left to do?" flag every ``xla_eos_check_every`` steps, and then the flag of the previous step
(already computed), so it keeps queueing work while the device runs. Host-side stopping criteria and
streamers read the tokens themselves at those check points instead (``fastgen.stopping``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch_xla

from xla_cache_patch import compat
from xla_cache_patch.fastgen.plan import STALE_ATTR, Plan, Sampling
from xla_cache_patch.fastgen.replay import StepReplay, cache_numbers, cache_tensors
from xla_cache_patch.fastgen.stopping import HostStops, initial_window, stop_string_hits
from xla_cache_patch.fastgen.swaps import explicit_masks, xla_cpu_dots

log = logging.getLogger("xla_cache_patch.fastgen")


@dataclass
class _State:
    """Device tensors carried from one step to the next (their shapes never change)."""

    token: torch.Tensor  # [B, 1] last produced token, fed at the next step
    position: torch.Tensor  # [B, 1] its position id
    slot: torch.Tensor  # [1] cache slot it will be written to
    mask: torch.Tensor  # [B, C] attention mask over cache slots
    out: torch.Tensor  # [B, C + 1] produced tokens, by slot
    unfinished: torch.Tensor | None  # [B] 1 while a row has not produced eos (None: no eos)
    produced: torch.Tensor | None  # [] steps transformers would have run (None: no eos)
    window: torch.Tensor | None = None  # [B, W] the last W tokens, for stop strings (None: none)
    stopped_at: torch.Tensor | None = None  # [B] slot of a row's last token, -1 while running (no eos: None)

    def tensors(self) -> list[torch.Tensor]:
        """The state in a fixed order (what a replayed step reads and writes, with the cache buffers)."""
        fields_ = (self.token, self.position, self.slot, self.mask, self.out, self.unfinished, self.produced)
        return [t for t in (*fields_, self.window, self.stopped_at) if t is not None]


@dataclass
class _Constants:
    """Per-call values, sent as two small vectors: new values reuse the compiled graphs.

    Not as 0-dim tensors: torch_xla shares one device buffer between 0-dim tensors of equal value,
    which changes the graph's parameter list (and so recompiles) when, say, temperature == top_p.
    """

    ints: torch.Tensor  # [3] int64: pad id, slot from which eos is allowed, top-k (V when off)
    floats: torch.Tensor  # [2] float32: temperature, top-p
    eos: torch.Tensor | None  # [E] eos ids (None: no eos)
    eos_vocab: torch.Tensor | None  # [V] bool, only when min_length masks eos

    @property
    def pad(self) -> torch.Tensor:
        return self.ints[0]

    @property
    def block_eos_until(self) -> torch.Tensor:
        return self.ints[1]

    @property
    def top_k(self) -> torch.Tensor:
        return self.ints[2]

    @property
    def temperature(self) -> torch.Tensor:
        return self.floats[0]

    @property
    def top_p(self) -> torch.Tensor:
        return self.floats[1]


def _forward(
    model: Any,
    plan: Plan,
    cache: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """One forward; returns the float32 logits of the last position, [B, V]."""
    spec = plan.spec
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        spec.cache_kwarg: cache,
        "use_cache": True,
        "return_dict": True,
    }
    if spec.cache_position:
        kwargs["cache_position"] = slots
    if spec.logits_kwarg is not None:
        kwargs[spec.logits_kwarg] = 1
    return model(**kwargs).logits[:, -1, :].float()


def _warp(scores: torch.Tensor, consts: _Constants) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as transformers' warpers do, with device-tensor parameters."""
    scores = scores / consts.temperature
    sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
    vocab = scores.shape[-1]
    kth_index = (vocab - consts.top_k).clamp(0, vocab - 1).reshape(1, 1).expand(scores.shape[0], 1)
    kth = sorted_scores.gather(-1, kth_index)
    below_k = scores < kth  # ties with the k-th value are kept, like TopKLogitsWarper
    kept_sorted = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    cumulative = kept_sorted.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - consts.top_p)
    drop_sorted[..., -1:] = False  # min_tokens_to_keep=1
    drop_sorted = drop_sorted & (consts.top_p < 1.0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(below_k | drop, float("-inf"))


def _choose(
    logits: torch.Tensor, produced_slot: torch.Tensor, plan: Plan, consts: _Constants
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores as transformers reports them, next tokens [B])."""
    scores = logits
    if consts.eos_vocab is not None:
        blocked = consts.eos_vocab & (produced_slot < consts.block_eos_until)
        scores = scores.masked_fill(blocked, float("-inf"))
    if plan.sampling is None:
        return scores, scores.argmax(dim=-1)
    scores = _warp(scores, consts)
    probs = scores.softmax(dim=-1)
    # Exponential race == multinomial draw; uses the XLA RNG, seeded per call from torch's CPU generator.
    noise = -torch.log(torch.rand_like(probs).clamp_(min=1e-20))
    return scores, (probs / noise).argmax(dim=-1)


def _finish(
    tokens: torch.Tensor, state: _State, consts: _Constants
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pad finished rows, then mark rows that just produced eos (transformers' order).

    Returns the tokens and the "any row unfinished" flag (None without eos).
    """
    if state.unfinished is None:
        return tokens, None
    tokens = torch.where(state.unfinished.bool(), tokens, consts.pad)
    state.produced = state.produced + state.unfinished.max()
    hit = (tokens[:, None] == consts.eos[None, :]).any(dim=-1)
    state.unfinished = state.unfinished * (~hit).long()
    return tokens, state.unfinished.max()


def _device_stops(
    tokens: torch.Tensor, slot: torch.Tensor, state: _State, plan: Plan, alive: torch.Tensor | None
) -> torch.Tensor | None:
    """After eos: finish rows whose text now ends with a stop string, and note where rows finished."""
    if plan.stop_strings is not None and state.window is not None and state.unfinished is not None:
        state.window, hit = stop_string_hits(plan.stop_strings, state.window, tokens)
        state.unfinished = state.unfinished * (~hit).long()
        alive = state.unfinished.max()
    if state.stopped_at is not None and state.unfinished is not None:
        newly = (state.unfinished == 0) & (state.stopped_at < 0)
        state.stopped_at = torch.where(newly, slot, state.stopped_at)
    return alive


def _extras(
    alive: torch.Tensor | None, scores: torch.Tensor, logits: torch.Tensor, plan: Plan
) -> list[torch.Tensor]:
    """The step's outputs that are not state, in the order _Collected.take reads them."""
    extras = [] if alive is None else [alive]
    if plan.return_dict and plan.output_scores:
        extras.append(scores)
    if plan.return_dict and plan.output_logits:
        extras.append(logits)
    return extras


@dataclass
class _Collected:
    """Per-step outputs kept for the result: the stop flag and, if asked, scores and raw logits."""

    alive: torch.Tensor | None = None
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    def take(self, extras: list[torch.Tensor], plan: Plan) -> None:
        extras = list(extras)
        if plan.eos_token_ids:
            self.alive = extras.pop(0)
        if plan.return_dict and plan.output_scores:
            self.scores.append(extras.pop(0))
        if plan.return_dict and plan.output_logits:
            self.logits.append(extras.pop(0))


def _prefill(
    model: Any, plan: Plan, cache: Any, device: torch.device, consts: _Constants
) -> tuple[_State, list[torch.Tensor]]:
    """Prefill ``input_ids[:, held:]`` left-padded to the bucket, at cache slots ``held..held + P - 1``.

    ``held`` is 0 for a fresh cache, or the tokens a continued cache holds: their slots keep their mask
    (the first ``held`` columns of the user's mask) and the new tokens' positions continue from there.
    """
    batch, length = plan.input_ids.shape
    held, bucket, width = plan.cache_start, plan.prompt_bucket, plan.cache_len
    chunk = length - held
    first = plan.first_slot
    ids = torch.full((batch, bucket), plan.pad_token_id, dtype=torch.int64)
    ids[:, bucket - chunk :] = plan.input_ids[:, held:]
    mask = torch.zeros((batch, width), dtype=torch.int64)
    mask[:, :held] = plan.attention_mask[:, :held]
    mask[:, first - chunk : first] = plan.attention_mask[:, held:]
    user_positions = (plan.attention_mask.cumsum(-1) - 1).masked_fill(plan.attention_mask == 0, 1)
    positions = torch.ones((batch, bucket), dtype=torch.int64)
    positions[:, bucket - chunk :] = user_positions[:, held:]
    tracks = bool(plan.eos_token_ids)  # rows can finish
    window = None if plan.stop_strings is None else initial_window(plan.stop_strings, plan.input_ids)
    state = _State(
        token=torch.zeros((batch, 1), dtype=torch.int64, device=device),
        position=plan.attention_mask.sum(-1, keepdim=True).to(device),
        slot=torch.tensor([first], dtype=torch.int64).to(device),
        mask=mask.to(device),
        out=torch.zeros((batch, width + 1), dtype=torch.int64, device=device),
        unfinished=torch.ones(batch, dtype=torch.int64, device=device) if tracks else None,
        produced=torch.zeros((), dtype=torch.int64, device=device) if tracks else None,
        window=None if window is None else window.to(device),
        stopped_at=torch.full((batch,), -1, dtype=torch.int64).to(device) if tracks else None,
    )
    slots = torch.arange(held, first, dtype=torch.int64).to(device)  # device data: any held, one graph
    logits = _forward(model, plan, cache, ids.to(device), state.mask, positions.to(device), slots)
    scores, tokens = _choose(logits, state.slot, plan, consts)
    tokens, alive = _finish(tokens, state, consts)
    alive = _device_stops(tokens, state.slot, state, plan, alive)
    state.out = state.out.index_copy(1, state.slot, tokens[:, None])
    state.token = tokens[:, None]
    return state, _extras(alive, scores, logits, plan)


def _decode(model: Any, plan: Plan, cache: Any, state: _State, consts: _Constants) -> list[torch.Tensor]:
    """Trace one decode step: feed the last token at `slot`, write the next one at `slot + 1`."""
    ones = torch.ones_like(state.token)
    state.mask = state.mask.index_copy(1, state.slot, ones)
    logits = _forward(model, plan, cache, state.token, state.mask, state.position, state.slot)
    produced_slot = state.slot + 1
    scores, tokens = _choose(logits, produced_slot, plan, consts)
    tokens, alive = _finish(tokens, state, consts)
    alive = _device_stops(tokens, produced_slot, state, plan, alive)
    state.out = state.out.index_copy(1, produced_slot, tokens[:, None])
    state.token = tokens[:, None]
    state.position = state.position + 1
    state.slot = produced_slot
    return _extras(alive, scores, logits, plan)


def _constants(plan: Plan, device: torch.device, vocab: int) -> _Constants:
    length = plan.input_ids.shape[1]
    eos = torch.tensor(plan.eos_token_ids, dtype=torch.int64).to(device) if plan.eos_token_ids else None
    eos_vocab = None
    if plan.eos_token_ids and plan.min_length > length:
        flags = torch.zeros(vocab, dtype=torch.bool)
        flags[[i for i in plan.eos_token_ids if 0 <= i < vocab]] = True
        eos_vocab = flags.to(device)
    # token t is produced at slot first_slot + t; eos stays masked while L + t < min_length
    block_until = plan.first_slot + max(plan.min_length - length, 0)
    sampling: Sampling = plan.sampling or Sampling(1.0, 0, 1.0)
    ints = torch.tensor([plan.pad_token_id, block_until, sampling.top_k or vocab], dtype=torch.int64)
    floats = torch.tensor([sampling.temperature, sampling.top_p], dtype=torch.float32)
    return _Constants(ints=ints.to(device), floats=floats.to(device), eos=eos, eos_vocab=eos_vocab)


def _seed_xla_rng(device: torch.device) -> None:
    """Make sampling follow torch.manual_seed: torch_xla's RNG ignores it (the seed is device data)."""
    import torch_xla.core.xla_model as xm

    xm.set_rng_state(int(torch.randint(0, 2**31 - 1, ()).item()), device=device)


def _vocab_size(model: Any) -> int:
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def run(model: Any, plan: Plan) -> Any:
    """Generate with static shapes; returns what transformers' generate would return."""
    device = next(iter(model.parameters())).device
    batch = plan.input_ids.shape[0]
    adapter = compat.current()
    cache = plan.cache
    if cache is None:
        cache = adapter.make_static_cache(
            model.config, plan.cache_len, batch_size=batch, device=device, dtype=model.dtype
        )
    consts = _constants(plan, device, _vocab_size(model))
    collected = _Collected()
    if plan.sampling is not None:
        _seed_xla_rng(device)
    host = HostStops(plan) if plan.host_stops else None  # puts the prompt into the streamer
    if plan.stop_strings is not None:  # its vocabulary table and target lengths become device data
        plan.stop_strings.embedding_vec = plan.stop_strings.embedding_vec.to(device)
        plan.stop_strings.target_lens = plan.stop_strings.target_lens.to(device)
    scores = collected.scores if plan.return_dict and plan.output_scores else None
    with torch.no_grad(), explicit_masks(), xla_cpu_dots(device):
        state, extras = _prefill(model, plan, cache, device, consts)
        torch_xla.sync()
        collected.take(extras, plan)
        replay = StepReplay(
            lambda: state.tensors() + cache_tensors(cache),
            lambda: cache_numbers(cache),
            device,
            enabled=plan.replay,
        )
        steps = 1
        every = plan.eos_check_every
        last = plan.max_new_tokens if plan.stop_after is None else min(plan.max_new_tokens, plan.stop_after)
        # The device-only check reads the flag of the step before the last one queued (already computed,
        # so the host keeps the device fed); extra steps it costs are trimmed from the result. Host stops
        # need the tokens themselves, so they read up to the last step.
        alive_before_last_step = None
        while steps < last:
            if every and steps % every == 0:
                if host is not None:
                    if host.advance(state.out, state.stopped_at, steps, scores):
                        break
                elif alive_before_last_step is not None and not bool(alive_before_last_step.item()):
                    break
            alive_before_last_step = collected.alive
            collected.take(replay.step(lambda: _decode(model, plan, cache, state, consts)), plan)
            steps += 1
    new_tokens = None
    if host is not None:
        host.advance(state.out, state.stopped_at, steps, scores)
        new_tokens = host.finish()
        produced = new_tokens.shape[1]
    else:
        produced = steps if state.produced is None else int(state.produced.item())
    log.debug(
        "fast path done: %d steps run, %d replayed without tracing, %d tokens kept",
        steps,
        replay.replayed,
        produced,
    )
    if plan.cache is not None or plan.return_dict:  # the cache reaches the user: make it continuable
        _settle(adapter, cache, plan, produced, device)
    return _outputs(plan, state, cache, produced, collected, new_tokens)


def _settle(adapter: compat.Adapter, cache: Any, plan: Plan, produced: int, device: torch.device) -> None:
    """Give the cache the content and length transformers' loop would have left in it.

    Ours holds the held tokens (a continuation), then the new chunk left-padded to the bucket (slots
    shifted by ``P - chunk``), then the generated tokens, maybe a few steps past the last kept one (the
    stop check reads a flag one step late). Shift every full-attention buffer back, zero the rest and set
    the era's length counter: one small graph, compiled once per cache shape, and only for a cache the
    user keeps. A rolling sliding window cannot be rebuilt that way: such a cache is marked, and continuing
    it raises StaleCacheError (after ``cache.reset()`` it is usable again).
    """
    held, length = plan.cache_start, plan.input_ids.shape[1]
    shift = plan.prompt_bucket - (length - held)
    layers = getattr(cache, "layers", None) or ()
    windows = [int(layer.max_cache_len) for layer in layers if getattr(layer, "is_sliding", False)]
    if windows:
        setattr(cache, STALE_ATTR, _sliding_reason(min(windows), plan, produced))
        return
    total = length + produced - 1  # the last token is never fed back
    width = plan.cache_len
    slots = torch.arange(width)
    source = (slots + torch.where(slots >= held, shift, 0)).clamp_(max=width - 1)
    keep = (slots < total).reshape(1, 1, width, 1)
    source, keep = source.to(device), keep.to(device)
    for buf in adapter.cache_buffers(cache):
        buf.copy_(
            torch.where(keep, buf.index_select(2, source), torch.zeros((), dtype=buf.dtype, device=device))
        )
    adapter.set_length(cache, total)
    torch_xla.sync()


def _sliding_reason(window: int, plan: Plan, produced: int) -> str:
    """Why a sliding-window cache the fast path filled cannot be continued, with its numbers."""
    length = plan.input_ids.shape[1]
    pad = plan.prompt_bucket - (length - plan.cache_start)
    written = plan.first_slot + produced - 1
    return (
        f"its sliding-window layers (a rolling window of {window} slots) hold the last "
        f"{min(written, window)} of {written} slots written ({length + produced - 1} tokens after {pad} "
        "bucket-padding slots); the fast path does not rebuild a rolling window, and a bucket-padded new "
        "chunk would put padding slots inside the window, between the held tokens and the new ones, where "
        "transformers has none"
    )


def _outputs(
    plan: Plan,
    state: _State,
    cache: Any,
    produced: int,
    collected: _Collected,
    new_tokens: torch.Tensor | None = None,
) -> Any:
    """What generate returns; ``new_tokens`` are the host's (host stops), else read from the device."""
    if new_tokens is None:
        start = plan.first_slot
        new_tokens = state.out.cpu()[:, start : start + produced]
    sequences = torch.cat([plan.input_ids, new_tokens], dim=1).to(plan.out_device)
    if not plan.return_dict:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    def steps_of(name: str) -> tuple[torch.Tensor, ...] | None:
        values = getattr(collected, name)[:produced]
        if not values:
            return None
        return tuple(v.to(plan.out_device) if plan.out_device.type != "xla" else v for v in values)

    names = {f.name for f in fields(GenerateDecoderOnlyOutput)}
    result: dict[str, Any] = {
        "sequences": sequences,
        "scores": steps_of("scores"),
        "logits": steps_of("logits"),
    }
    result["cache" if "cache" in names else "past_key_values"] = cache
    return GenerateDecoderOnlyOutput(**{k: v for k, v in result.items() if k in names})
