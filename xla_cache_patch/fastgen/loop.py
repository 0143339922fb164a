"""The static-shape decoding loop behind the XLA fast path of ``generate``.

Why each step compiles to the same graph: nothing in it changes shape or carries a Python value that
changes. The prompt is left-padded to a bucket (mask 0, so attention ignores the pad slots and the
positions of the real tokens stay those transformers uses); the attention mask and the output ids are
allocated once at their final length and written with ``index_copy`` at a device-side slot; positions,
the slot, the finished rows and the logits processors' parameters are device tensors (the processors
read the token history from the output buffer, with masks: ``fastgen.processors``). The host only reads the
"anything left to do?" flag every ``xla_eos_check_every`` steps, and then the flag of the previous step
(already computed), so it keeps queueing work while the device runs. Host-side stopping criteria and
streamers read the tokens themselves at those check points instead (``fastgen.stopping``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch
import torch_xla

from xla_cache_patch import compat
from xla_cache_patch.fastgen import beams as beam_search
from xla_cache_patch.fastgen import encdec, multimodal
from xla_cache_patch.fastgen.plan import GROWS_ATTR, STALE_ATTR, Plan
from xla_cache_patch.fastgen.processors import DeviceBank, StepView
from xla_cache_patch.fastgen.replay import StepReplay
from xla_cache_patch.fastgen.stopping import HostStops, initial_window, stop_string_hits
from xla_cache_patch.fastgen.swaps import explicit_masks, is_xla_cpu, xla_cpu_dots

log = logging.getLogger("xla_cache_patch.fastgen")


def _present(values: Any) -> list[torch.Tensor]:
    """The tensors of a state/outputs dataclass in field order, absent (None) ones left out, nested ones
    (a strategy's own state) flattened in place: the one place the by-name step values become the flat
    list the replay runs on."""
    flat: list[torch.Tensor] = []
    for value in (getattr(values, f.name) for f in fields(values)):
        if is_dataclass(value):
            flat.extend(_present(value))
        elif value is not None:
            flat.append(value)
    return flat


@dataclass
class _State:
    """Device tensors carried from one step to the next (their shapes never change)."""

    token: torch.Tensor  # [B, 1] last produced token, fed at the next step
    position: torch.Tensor  # [B, 1] its position id
    slot: torch.Tensor  # [1] cache slot it will be written to
    mask: torch.Tensor  # [B, C] attention mask over cache slots
    # [B, C + 1] token ids by slot: the user's whole input_ids at [F - L, F), produced tokens from F, the
    # first new slot (plan.first_slot). It is the history the logits processors read (masked to
    # [F - L, slot)) and the result (read from F).
    out: torch.Tensor
    unfinished: torch.Tensor | None  # [B] 1 while a row has not produced eos (None: no eos)
    produced: torch.Tensor | None  # [] steps transformers would have run (None: no eos)
    window: torch.Tensor | None = None  # [B, W] the last W tokens, for stop strings (None: none)
    stopped_at: torch.Tensor | None = None  # [B] slot of a row's last token, -1 while running (no eos: None)
    beams: beam_search.BeamState | None = None  # beam search: its own state (B above is batch x beams)

    def tensors(self) -> list[torch.Tensor]:
        """The state in field order (what a replayed step reads and writes, with the cache buffers)."""
        return _present(self)


@dataclass
class _StepOutputs:
    """What a step hands back besides the state, by name; the replay gets them flat (``tensors``) and
    gives them back in that order, read back by ``from_tensors`` with the names the plan implies."""

    alive: torch.Tensor | None = None  # [] any row unfinished (None: no eos)
    scores: torch.Tensor | None = None  # [B, V] processed scores (only if returned)
    logits: torch.Tensor | None = None  # [B, V] raw logits (only if returned)

    @staticmethod
    def names(plan: Plan) -> tuple[str, ...]:
        wanted = {
            "alive": bool(plan.eos_token_ids),
            "scores": plan.return_dict and plan.output_scores,
            "logits": plan.return_dict and plan.output_logits,
        }
        return tuple(f.name for f in fields(_StepOutputs) if wanted[f.name])

    @classmethod
    def build(cls, plan: Plan, **values: torch.Tensor | None) -> _StepOutputs:
        return cls(**{name: values[name] for name in cls.names(plan)})

    @classmethod
    def from_tensors(cls, plan: Plan, tensors: list[torch.Tensor]) -> _StepOutputs:
        return cls(**dict(zip(cls.names(plan), tensors, strict=True)))

    def tensors(self) -> list[torch.Tensor]:
        return _present(self)


@dataclass
class _Constants:
    """Per-call values; scalars are sent as small vectors, so new values reuse the compiled graphs.

    Not as 0-dim tensors: torch_xla shares one device buffer between 0-dim tensors of equal value,
    which changes the graph's parameter list (and so recompiles) when, say, temperature == top_p.
    """

    ints: torch.Tensor  # [2] int64: pad id, slot of the history's first token (F - L)
    eos: torch.Tensor | None  # [E] eos ids (None: no eos)
    bank: DeviceBank  # the logits processors' parameters
    encoded: encdec.Encoded | None = None  # encoder-decoder models: the encoder's output for this call
    beams: beam_search.BeamConstants | None = None  # beam search: its per-call values

    @property
    def pad(self) -> torch.Tensor:
        return self.ints[0]

    @property
    def first(self) -> torch.Tensor:
        return self.ints[1:2]


def _forward(
    model: Any,
    plan: Plan,
    cache: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    encoded: encdec.Encoded | None = None,
    media: dict[str, Any] | None = None,
) -> torch.Tensor:
    """One forward; returns the float32 logits of the last position, [B, V].

    ``media``: an image-and-text model's prefill inputs (pixel_values, ...: fastgen.multimodal).

    With ``encoded`` (an encoder-decoder model) ``ids`` and ``mask`` are the decoder's, over the encoder's
    output; its positions are the cache slots (the decoder is never padded), so ``positions`` is unused.
    """
    spec = plan.spec
    if encoded is not None:
        kwargs = encdec.decoder_inputs(encoded, ids, mask)
    else:
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if spec.logits_kwarg is not None:
            kwargs[spec.logits_kwarg] = 1
        kwargs.update(media or {})
    kwargs.update({spec.cache_kwarg: cache, "use_cache": True, "return_dict": True})
    if spec.cache_position:
        kwargs["cache_position"] = slots
    return model(**kwargs).logits[:, -1, :].float()


def _choose(
    logits: torch.Tensor, history: torch.Tensor, produced_slot: torch.Tensor, plan: Plan, consts: _Constants
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores as transformers reports them: after its processors and warpers, next tokens [B])."""
    view = StepView(history=history, slot=produced_slot, first=consts.first)
    scores = plan.logits(logits, view, consts.bank)
    if not plan.do_sample:
        return scores, scores.argmax(dim=-1)
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


def _select(
    logits: torch.Tensor, state: _State, produced_slot: torch.Tensor, plan: Plan, consts: _Constants
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Choose the tokens written at ``produced_slot`` (greedy / sampling, or a beam step); updates
    ``state``; returns (the scores transformers reports, the "anything left to do?" flag, for beams the
    row each beam continues, which the cache must follow)."""
    if plan.beams is not None:
        assert state.beams is not None and consts.beams is not None
        view = StepView(history=state.out, slot=produced_slot, first=consts.first)
        scores, state.out, tokens, origin, alive = beam_search.step(
            plan.beams,
            logits,
            state.out,
            produced_slot,
            state.beams,
            consts.beams,
            consts.eos,
            lambda values, v: plan.logits(values, v, consts.bank),
            view,
        )
        state.token = tokens[:, None]
        return scores, alive, origin
    scores, tokens = _choose(logits, state.out, produced_slot, plan, consts)
    tokens, alive = _finish(tokens, state, consts)
    alive = _device_stops(tokens, produced_slot, state, plan, alive)
    state.out = state.out.index_copy(1, produced_slot, tokens[:, None])
    state.token = tokens[:, None]
    return scores, alive, None


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


@dataclass
class _Collected:
    """Per-step outputs kept for the result: the stop flag and, if asked, scores and raw logits."""

    alive: torch.Tensor | None = None
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    def take(self, outputs: _StepOutputs) -> None:
        if outputs.alive is not None:
            self.alive = outputs.alive
        if outputs.scores is not None:
            self.scores.append(outputs.scores)
        if outputs.logits is not None:
            self.logits.append(outputs.logits)


def _prefill(
    model: Any, plan: Plan, cache: Any, device: torch.device, consts: _Constants
) -> tuple[_State, _StepOutputs]:
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
    out = torch.zeros((batch, width + 1), dtype=torch.int64)
    out[:, first - length : first] = plan.input_ids  # the history as transformers sees it
    mask = torch.zeros((batch, width), dtype=torch.int64)
    mask[:, :held] = plan.attention_mask[:, :held]
    mask[:, first - chunk : first] = plan.attention_mask[:, held:]
    user_positions = (plan.attention_mask.cumsum(-1) - 1).masked_fill(plan.attention_mask == 0, 1)
    positions = torch.ones((batch, bucket), dtype=torch.int64)
    positions[:, bucket - chunk :] = user_positions[:, held:]
    tracks = bool(plan.eos_token_ids) and plan.beams is None  # rows can finish (beams: the search says)
    window = None if plan.stop_strings is None else initial_window(plan.stop_strings, plan.input_ids)
    state = _State(
        token=torch.zeros((batch, 1), dtype=torch.int64, device=device),
        position=plan.attention_mask.sum(-1, keepdim=True).to(device),
        slot=torch.tensor([first], dtype=torch.int64).to(device),
        mask=mask.to(device),
        out=out.to(device),
        unfinished=torch.ones(batch, dtype=torch.int64, device=device) if tracks else None,
        produced=torch.zeros((), dtype=torch.int64, device=device) if tracks else None,
        window=None if window is None else window.to(device),
        stopped_at=torch.full((batch,), -1, dtype=torch.int64).to(device) if tracks else None,
    )
    if plan.beams is not None:
        groups = batch // plan.beams.num_beams
        state.beams = beam_search.initial_state(plan.beams, groups, width + 1, device)
    slots = torch.arange(held, first, dtype=torch.int64).to(device)  # device data: any held, one graph
    # Recurrent layers take the mask of the prefilled tokens as its last P columns (transformers'
    # create_recurrent_attention_mask): ours ends at the prompt, not at the cache's empty slots, or every
    # token would be masked out of the SSM. Attention pads a shorter mask with zeros: the same mask.
    mask = state.mask[:, :first] if plan.recurrent else state.mask
    media = None
    if plan.media is not None:
        media = plan.media.prefill_kwargs(bucket, device)
        rope = plan.media.rope_positions(bucket)
        if rope is not None:  # Qwen-VL's 3-D rope: the decode positions continue from its offsets
            positions = rope
            state.position = state.position + plan.media.rope_deltas.to(device)
    logits = _forward(
        model, plan, cache, ids.to(device), mask, positions.to(device), slots, consts.encoded, media
    )
    # beams: every beam of a prompt holds the same prompt, so the cache needs no reorder yet
    scores, alive, _ = _select(logits, state, state.slot, plan, consts)
    return state, _StepOutputs.build(plan, alive=alive, scores=scores, logits=logits)


def _decode(model: Any, plan: Plan, cache: Any, state: _State, consts: _Constants) -> _StepOutputs:
    """Trace one decode step: feed the last token at `slot`, write the next one at `slot + 1`."""
    ones = torch.ones_like(state.token)
    state.mask = state.mask.index_copy(1, state.slot, ones)
    logits = _forward(model, plan, cache, state.token, state.mask, state.position, state.slot, consts.encoded)
    produced_slot = state.slot + 1
    scores, alive, origin = _select(logits, state, produced_slot, plan, consts)
    if origin is not None:  # beams: the KV rows follow their beams, in place, in this graph
        beam_search.reorder_cache(compat.current().beam_buffers(cache), origin)
    state.position = state.position + 1
    state.slot = produced_slot
    return _StepOutputs.build(plan, alive=alive, scores=scores, logits=logits)


def _constants(plan: Plan, device: torch.device) -> _Constants:
    eos = torch.tensor(plan.eos_token_ids, dtype=torch.int64).to(device) if plan.eos_token_ids else None
    first = plan.first_slot - plan.input_ids.shape[1]
    ints = torch.tensor([plan.pad_token_id, first], dtype=torch.int64)
    beams = None
    if plan.beams is not None:
        beams = beam_search.constants(plan.beams, plan.first_slot, plan.max_new_tokens, device)
    return _Constants(ints=ints.to(device), eos=eos, bank=plan.logits.bank.upload(device), beams=beams)


def _seed_xla_rng(device: torch.device) -> None:
    """Make sampling follow torch.manual_seed: torch_xla's RNG ignores it (the seed is device data)."""
    import torch_xla.core.xla_model as xm

    xm.set_rng_state(int(torch.randint(0, 2**31 - 1, ()).item()), device=device)


def run(model: Any, plan: Plan) -> Any:
    """Generate with static shapes; returns what transformers' generate would return."""
    device = next(iter(model.parameters())).device
    batch = plan.input_ids.shape[0]
    adapter = compat.current()
    cache = plan.cache
    if plan.encoder is not None:  # its encoder runs once, here; the decoder is the loop's
        cache = encdec.make_cache(adapter, model, plan.cache_len, plan.encoder, device)
    elif cache is None:
        config = multimodal.cache_config(model.config)  # a wrapper's cache is its text model's
        cache = adapter.make_static_cache(
            config, plan.cache_len, batch_size=batch, device=device, dtype=model.dtype
        )
        setattr(cache, GROWS_ATTR, True)  # ours: a conversation continued on it grows it (plan._layout)
    elif plan.grow:
        adapter.grow_cache(cache, plan.cache_len)
    consts = _constants(plan, device)
    if plan.encoder is not None:
        with torch.no_grad(), explicit_masks(), xla_cpu_dots(device):
            consts.encoded = encdec.encode(model, plan.encoder, device)
    collected = _Collected()
    if plan.do_sample:
        _seed_xla_rng(device)
    host = HostStops(plan) if plan.host_stops else None  # puts the prompt into the streamer
    if plan.stop_strings is not None:  # its vocabulary table and target lengths become device data
        plan.stop_strings.embedding_vec = plan.stop_strings.embedding_vec.to(device)
        plan.stop_strings.target_lens = plan.stop_strings.target_lens.to(device)
    scores = collected.scores if plan.return_dict and plan.output_scores else None
    with torch.no_grad(), explicit_masks(), xla_cpu_dots(device):
        state, first_outputs = _prefill(model, plan, cache, device, consts)
        torch_xla.sync()
        collected.take(first_outputs)
        replay = StepReplay(
            lambda: state.tensors() + adapter.cache_state(cache),
            lambda: adapter.cache_numbers(cache),
            device,
            enabled=plan.replay,
            donor_order=is_xla_cpu(device),  # measured there (#19); TPU and GPU keep their graphs
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
            flat = replay.step(lambda: _decode(model, plan, cache, state, consts).tensors())
            collected.take(_StepOutputs.from_tensors(plan, flat))
            steps += 1
    new_tokens = None
    if host is not None:
        host.advance(state.out, state.stopped_at, steps, scores)
        new_tokens = host.finish()
        produced = new_tokens.shape[1]
    elif state.beams is not None:
        produced = int(state.beams.ran.item())  # steps transformers' search runs (scores kept)
    else:
        produced = steps if state.produced is None else int(state.produced.item())
    log.debug(
        "fast path done: %d steps run, %d replayed without tracing, %d tokens kept",
        steps,
        replay.replayed,
        produced,
    )
    # the cache reaches the user: make it continuable (an encoder-decoder cache is returned as it is)
    if plan.encoder is None and (plan.cache is not None or plan.return_dict):
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
    if plan.recurrent:
        setattr(cache, STALE_ATTR, _recurrent_reason(plan, produced))
        return
    windows = adapter.cache_windows(cache)
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


def _recurrent_reason(plan: Plan, produced: int) -> str:
    """Why a cache with recurrent-state layers that the fast path filled cannot be continued."""
    pad = plan.prompt_bucket - (plan.input_ids.shape[1] - plan.cache_start)
    return (
        f"its recurrent layers (SSM / convolution states) hold a state, not slots: it went through every "
        f"step the loop ran (up to {plan.eos_check_every} past the {produced} tokens kept) and its token "
        f"count includes the bucket's {pad} padding positions; a state cannot be shifted or rolled back "
        "as K/V slots are, so the fast path does not continue such caches"
    )


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
    if plan.beams is not None:
        return _beam_outputs(plan, state, cache, produced, collected)
    if new_tokens is None:
        start = plan.first_slot
        new_tokens = state.out.cpu()[:, start : start + produced]
    sequences = torch.cat([plan.input_ids, new_tokens], dim=1).to(plan.out_device)
    if not plan.return_dict:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerateEncoderDecoderOutput

    output_cls = GenerateDecoderOnlyOutput if plan.encoder is None else GenerateEncoderDecoderOutput

    def steps_of(name: str) -> tuple[torch.Tensor, ...] | None:
        values = getattr(collected, name)[:produced]
        if not values:
            return None
        return tuple(v.to(plan.out_device) if plan.out_device.type != "xla" else v for v in values)

    names = {f.name for f in fields(output_cls)}
    result: dict[str, Any] = {
        "sequences": sequences,
        "scores": steps_of("scores"),
        "logits": steps_of("logits"),
    }
    result["cache" if "cache" in names else "past_key_values"] = cache
    return output_cls(**{k: v for k, v in result.items() if k in names})


def _beam_outputs(plan: Plan, state: _State, cache: Any, produced: int, collected: _Collected) -> Any:
    """What generate returns after a beam search: the best hypotheses, as this era's transformers has them."""
    assert plan.beams is not None and state.beams is not None
    best = beam_search.finalize(plan.beams, state.beams, plan.first_slot, plan.eos_token_ids)
    k, count = plan.beams.num_beams, plan.beams.num_return
    prompts = plan.input_ids[::k].repeat_interleave(count, dim=0)
    sequences = torch.cat([prompts, best["tokens"]], dim=1).to(plan.out_device)
    if not plan.return_dict:
        return sequences
    from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateBeamEncoderDecoderOutput

    # the encoder_* / decoder_* / cross_attentions fields stay None: output_attentions and
    # output_hidden_states are refused at planning
    output_cls = GenerateBeamDecoderOnlyOutput if plan.encoder is None else GenerateBeamEncoderDecoderOutput
    indices = best["indices"]
    if plan.beams.best_of_candidates:  # BeamSearchScorer: one column per sequence slot, int64
        width = sequences.shape[1]
        indices = torch.cat([indices, indices.new_full((indices.shape[0], width - indices.shape[1]), -1)], 1)
    else:
        indices = indices.to(torch.int32)
    tracked = plan.output_scores or not plan.beams.best_of_candidates  # < 4.50 tracks them with scores

    def steps_of(name: str) -> tuple[torch.Tensor, ...] | None:
        values = getattr(collected, name)[:produced]
        return tuple(v.to(plan.out_device) for v in values) if values else None

    names = {f.name for f in fields(output_cls)}
    result: dict[str, Any] = {
        "sequences": sequences,
        "sequences_scores": best["scores"].to(plan.out_device) if plan.output_scores else None,
        "scores": steps_of("scores"),
        "logits": steps_of("logits"),
        "beam_indices": indices.to(plan.out_device) if tracked else None,
    }
    result["cache" if "cache" in names else "past_key_values"] = cache
    return output_cls(**{k: v for k, v in result.items() if k in names})
