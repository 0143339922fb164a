"""transformers' logits processors and warpers as static-shape functions on the XLA device.

Which processors run, in which order and with which parameters is read from transformers itself: the plan
calls the model's own ``_get_logits_processor`` on the host (CPU tensors, no model work) and maps every
processor it builds to the class here that reproduces it (``hf_class``). A processor with no counterpart
here makes the call fall back. So the order and the era's details (5.x's repetition penalty skips the left
padding, 4.46's sequence bias needs the whole sequence in the context) come from the running release.

Every function here is a pure function of (scores, the token history, the step) whose parameters are
device tensors: new values reuse the compiled graphs. Scalars go into two small vectors (``Bank``), not
0-dim tensors: torch_xla shares one device buffer between equal 0-dim tensors, which would change the
graph's parameter list. What changes the graph is only what changes shapes: which processors run, the
n of ``no_repeat_ngram_size``, and the table shape of multi-token ``bad_words_ids`` / ``sequence_bias``.

The history is ``[B, W]`` token ids by cache slot: the prompt exactly as the user passed it (their pad
tokens included, as transformers' ``input_ids``) at slots ``[P - L, P)``, the produced tokens from ``P``
(padding for finished rows, as transformers writes). Slots before ``P - L`` (the bucket padding, which
transformers never saw) and from the current slot on are masked, never sliced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

_NEG = float("-inf")


class Unsupported(Exception):
    """transformers built a processor that has no static-shape counterpart here."""


# --- parameters -----------------------------------------------------------------------------------


@dataclass
class Bank:
    """Host-side parameters of one call, packed so that new values never change the graph."""

    ints: list[int] = field(default_factory=list)
    floats: list[float] = field(default_factory=list)
    arrays: list[torch.Tensor] = field(default_factory=list)

    def add_int(self, value: int) -> int:
        self.ints.append(int(value))
        return len(self.ints) - 1

    def add_float(self, value: float) -> int:
        self.floats.append(float(value))
        return len(self.floats) - 1

    def add_array(self, value: torch.Tensor) -> int:
        self.arrays.append(value)
        return len(self.arrays) - 1

    def upload(self, device: torch.device) -> DeviceBank:
        # one unused element when empty: no zero-size graph inputs
        ints = torch.tensor(self.ints or [0], dtype=torch.int64).to(device)
        floats = torch.tensor(self.floats or [0.0], dtype=torch.float32).to(device)
        return DeviceBank(ints, floats, [a.to(device) for a in self.arrays])


@dataclass
class DeviceBank:
    """A Bank on the device; processors read it by the indices their constructor got."""

    ints: torch.Tensor  # [n] int64
    floats: torch.Tensor  # [m] float32
    arrays: list[torch.Tensor]  # masks and tables, never 0-dim


@dataclass
class StepView:
    """What a processor may read at one step (device tensors, fixed shapes)."""

    history: torch.Tensor  # [B, W] token ids by slot
    slot: torch.Tensor  # [1] slot the token being chosen goes to
    first: torch.Tensor  # [1] slot of the prompt's first token (P - L)

    @property
    def length(self) -> torch.Tensor:
        """[1] transformers' ``input_ids.shape[-1]`` at this step."""
        return self.slot - self.first

    def slots(self) -> torch.Tensor:
        return torch.arange(self.history.shape[1], device=self.history.device)

    def last(self, count: int) -> torch.Tensor:
        """[B, count] the ``count`` tokens before ``slot`` (clamped at slot 0: mask what you read)."""
        offsets = torch.arange(count, device=self.history.device) - count
        index = (self.slot + offsets).clamp(min=0)
        return self.history.index_select(1, index)


@dataclass(frozen=True)
class Context:
    """Host facts a processor may need to build its parameters."""

    vocab: int
    batch: int


def _vocab_mask(tokens: Any, vocab: int) -> torch.Tensor:
    ids = [int(t) for t in torch.as_tensor(tokens).flatten().tolist()]
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[[i for i in ids if 0 <= i < vocab]] = True
    return mask


# --- processors -----------------------------------------------------------------------------------


class Processor:
    """One transformers processor: ``option`` is the generation-config option that makes transformers build
    it, ``inactive`` its values for which it does not (the plan accepts an option a processor declares; the
    list transformers then builds says which ones run)."""

    hf_class: ClassVar[str]
    option: ClassVar[str]
    inactive: ClassVar[tuple[Any, ...]]

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        raise NotImplementedError

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        raise NotImplementedError


def _eos_block(scores: torch.Tensor, eos: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(eos & blocked, _NEG)


class MinLength(Processor):
    hf_class = "MinLengthLogitsProcessor"
    option = "min_length"
    inactive = (None, 0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.min_length = bank.add_int(hf.min_length)
        self.eos = bank.add_array(_vocab_mask(hf.eos_token_id, ctx.vocab))

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        return _eos_block(scores, bank.arrays[self.eos], view.length < bank.ints[self.min_length])


class MinNewTokens(Processor):
    hf_class = "MinNewTokensLengthLogitsProcessor"
    option = "min_new_tokens"
    inactive = (None, 0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.until = bank.add_int(hf.prompt_length_to_skip + hf.min_new_tokens)
        self.eos = bank.add_array(_vocab_mask(hf.eos_token_id, ctx.vocab))

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        return _eos_block(scores, bank.arrays[self.eos], view.length < bank.ints[self.until])


class RepetitionPenalty(Processor):
    """Every token of the history (from the row's start) is divided (positive) / multiplied by the penalty.

    5.x passes ``prompt_ignore_length``: the left padding of the user's mask is not penalized; 4.46 does not.
    """

    hf_class = "RepetitionPenaltyLogitsProcessor"
    option = "repetition_penalty"
    inactive = (None, 1.0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.penalty = bank.add_float(hf.penalty)
        skip = getattr(hf, "prompt_ignore_length", None)
        if skip is None:
            skip = torch.zeros(ctx.batch, dtype=torch.int64)
        elif isinstance(skip, int):
            skip = torch.full((ctx.batch,), skip, dtype=torch.int64)
        if tuple(skip.shape) != (ctx.batch,):
            raise Unsupported("repetition_penalty with a prompt_ignore_length of another batch size")
        self.skip = bank.add_array(skip.to("cpu", torch.int64))

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        vocab = scores.shape[-1]
        start = view.first + bank.arrays[self.skip]  # [B]
        slots = view.slots()[None, :]
        seen = (slots >= start[:, None]) & (slots < view.slot)
        ids = torch.where(seen, view.history.clamp(max=vocab), vocab)
        present = torch.zeros((scores.shape[0], vocab + 1), dtype=scores.dtype, device=scores.device)
        present = present.scatter(1, ids, torch.ones_like(ids, dtype=scores.dtype))[:, :vocab] > 0
        penalty = bank.floats[self.penalty]
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(present, penalized, scores)


class NoRepeatNGram(Processor):
    """A [B, W] history compared window by window with its last n-1 tokens (n is part of the graph)."""

    hf_class = "NoRepeatNGramLogitsProcessor"
    option = "no_repeat_ngram_size"
    inactive = (None, 0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.n = int(hf.ngram_size)

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        n, vocab = self.n, scores.shape[-1]
        if view.history.shape[1] < n:
            return scores
        windows = view.history.unfold(1, n, 1)  # [B, W - n + 1, n]
        starts = torch.arange(windows.shape[1], device=scores.device)
        inside = (starts >= view.first) & (starts + n <= view.slot)  # [W - n + 1]
        prefix = view.last(n - 1)  # [B, n - 1]
        matches = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1) & inside[None, :]
        banned_ids = torch.where(matches, windows[..., -1].clamp(max=vocab), vocab)
        banned = torch.zeros((scores.shape[0], vocab + 1), dtype=scores.dtype, device=scores.device)
        banned = banned.scatter(1, banned_ids, torch.ones_like(banned_ids, dtype=scores.dtype))
        return scores.masked_fill(banned[:, :vocab] > 0, _NEG)


class SequenceBias(Processor):
    """Single tokens: a [V] bias. Longer sequences: a [S, M] prefix table matched against the last M tokens.

    ``bad_words_ids`` is transformers' NoBadWordsLogitsProcessor, a sequence bias of -inf.
    """

    hf_class = "SequenceBiasLogitsProcessor"
    option = "sequence_bias"
    inactive = (None,)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        biases: dict[tuple[int, ...], float] = dict(hf.sequence_bias)
        bad = [ids for ids in biases if any(not 0 <= t < ctx.vocab for t in ids)]
        if bad:  # transformers raises on its first call; let it
            raise Unsupported(f"biased tokens outside the vocabulary: {bad}")
        single = torch.zeros(ctx.vocab, dtype=torch.float32)
        for ids, bias in biases.items():
            if len(ids) == 1:
                single[ids[0]] = bias
        self.single = bank.add_array(single)
        multi = [(ids, bias) for ids, bias in biases.items() if len(ids) > 1]
        self.width = max((len(ids) - 1 for ids, _ in multi), default=0)
        self.count = len(multi)
        if multi:
            table = torch.zeros((len(multi), self.width), dtype=torch.int64)
            lengths = torch.zeros(len(multi), dtype=torch.int64)
            for row, (ids, _) in enumerate(multi):
                table[row, self.width - (len(ids) - 1) :] = torch.tensor(ids[:-1])
                lengths[row] = len(ids) - 1
            # 5.x matches a prefix once it fits in the context; 4.46 only once the whole sequence does.
            needs = 0 if hasattr(hf, "multi_token_biases") else 1
            self.table = bank.add_array(table)
            self.lengths = bank.add_array(lengths + needs)  # context length a sequence needs to count
            self.prefix_lengths = bank.add_array(lengths)
            self.last_tokens = bank.add_array(torch.tensor([ids[-1] for ids, _ in multi], dtype=torch.int64))
            self.biases = bank.add_array(torch.tensor([bias for _, bias in multi], dtype=torch.float32))

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        scores = scores + bank.arrays[self.single]
        if not self.count:
            return scores
        arrays = bank.arrays
        recent = view.last(self.width)  # [B, M]
        columns = torch.arange(self.width, device=scores.device)
        counted = columns[None, :] >= (self.width - arrays[self.prefix_lengths])[:, None]  # [S, M]
        same = (recent[:, None, :] == arrays[self.table][None]) | ~counted[None]
        matching = same.all(dim=-1) & (arrays[self.lengths] <= view.length)[None, :]  # [B, S]
        bias = torch.where(matching, arrays[self.biases][None, :], 0.0)
        index = arrays[self.last_tokens][None, :].expand(scores.shape[0], -1)
        return scores + torch.zeros_like(scores).scatter_add(1, index, bias)


class NoBadWords(SequenceBias):
    hf_class = "NoBadWordsLogitsProcessor"
    option = "bad_words_ids"
    inactive = (None,)


class ForcedBOS(Processor):
    hf_class = "ForcedBOSTokenLogitsProcessor"
    option = "forced_bos_token_id"
    inactive = (None,)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.token = bank.add_array(_vocab_mask(hf.bos_token_id, ctx.vocab))

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        forced = torch.where(bank.arrays[self.token], 0.0, _NEG).to(scores.dtype)
        return torch.where(view.length == 1, forced, scores)


class ForcedEOS(Processor):
    hf_class = "ForcedEOSTokenLogitsProcessor"
    option = "forced_eos_token_id"
    inactive = (None,)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.at = bank.add_int(hf.max_length - 1)
        self.eos = bank.add_array(_vocab_mask(hf.eos_token_id, ctx.vocab))

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        forced = torch.where(bank.arrays[self.eos], 0.0, _NEG).to(scores.dtype)
        return torch.where(view.length == bank.ints[self.at], forced, scores)


class InfNanRemove(Processor):
    hf_class = "InfNanRemoveLogitsProcessor"
    option = "remove_invalid_values"
    inactive = (None, False)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        pass

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        info = torch.finfo(scores.dtype)
        out = torch.where(scores != scores, 0.0, scores)
        out = torch.where(scores == float("inf"), info.max, out)
        return torch.where(scores == _NEG, info.min, out)


class ExponentialDecay(Processor):
    hf_class = "ExponentialDecayLengthPenalty"
    option = "exponential_decay_length_penalty"
    inactive = (None,)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.start = bank.add_int(hf.regulation_start)
        self.factor = bank.add_float(hf.regulation_factor)
        self.eos = bank.add_array(_vocab_mask(hf.eos_token_id, ctx.vocab))

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        steps = (view.length - bank.ints[self.start]).to(scores.dtype)
        growth = torch.pow(bank.floats[self.factor], steps) - 1
        penalty = (scores.abs() * growth).masked_fill(~torch.isfinite(scores), 0.0)
        active = bank.arrays[self.eos] & (steps > 0)
        return scores + torch.where(active, penalty, 0.0)


class SuppressTokens(Processor):
    hf_class = "SuppressTokensLogitsProcessor"
    option = "suppress_tokens"
    inactive = (None,)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.tokens = bank.add_array(_vocab_mask(hf.suppress_tokens, ctx.vocab))

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        return scores.masked_fill(bank.arrays[self.tokens], _NEG)


class SuppressTokensAtBegin(Processor):
    hf_class = "SuppressTokensAtBeginLogitsProcessor"
    option = "begin_suppress_tokens"
    inactive = (None,)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.tokens = bank.add_array(_vocab_mask(hf.begin_suppress_tokens, ctx.vocab))
        self.at = bank.add_int(hf.begin_index)

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        return scores.masked_fill(bank.arrays[self.tokens] & (view.length == bank.ints[self.at]), _NEG)


class LogitNormalization(Processor):
    hf_class = "LogitNormalization"
    option = "renormalize_logits"
    inactive = (None, False)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        pass

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        return scores.log_softmax(dim=-1)


# --- warpers (sampling only) ------------------------------------------------------------------------


def _keep_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[B, 1] the ``count``-th largest score of each row (``count`` is static: min_tokens_to_keep)."""
    return torch.topk(scores, min(count, scores.shape[-1]), dim=-1).values[..., -1:]


class Temperature(Processor):
    hf_class = "TemperatureLogitsWarper"
    option = "temperature"
    inactive = (None, 1.0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.temperature = bank.add_float(hf.temperature)

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        return scores / bank.floats[self.temperature]


class TopK(Processor):
    """The k-th value by a sort (k is a device value: new k, same graph); ties with it are kept."""

    hf_class = "TopKLogitsWarper"
    option = "top_k"
    inactive = (None, 0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.k = bank.add_int(min(int(hf.top_k), ctx.vocab))

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        vocab = scores.shape[-1]
        ordered = torch.sort(scores, dim=-1).values  # ascending
        index = (vocab - bank.ints[self.k]).clamp(0, vocab - 1).reshape(1, 1).expand(scores.shape[0], 1)
        return scores.masked_fill(scores < ordered.gather(-1, index), _NEG)


class TopP(Processor):
    hf_class = "TopPLogitsWarper"
    option = "top_p"
    inactive = (None, 1.0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.top_p = bank.add_float(hf.top_p)
        self.keep = int(hf.min_tokens_to_keep)

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        ordered, order = torch.sort(scores, dim=-1)  # ascending
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - bank.floats[self.top_p])
        drop[..., -self.keep :] = False
        return scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), _NEG)


class MinP(Processor):
    hf_class = "MinPLogitsWarper"
    option = "min_p"
    inactive = (None,)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.min_p = bank.add_float(hf.min_p)
        self.keep = int(hf.min_tokens_to_keep)

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        drop = probs < bank.floats[self.min_p] * probs.amax(dim=-1, keepdim=True)
        drop = drop & (probs < _keep_top(probs, self.keep))
        return scores.masked_fill(drop, _NEG)


class Typical(Processor):
    hf_class = "TypicalLogitsWarper"
    option = "typical_p"
    inactive = (None, 1.0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.mass = bank.add_float(hf.mass)
        self.keep = int(hf.min_tokens_to_keep)

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        normalized = scores.log_softmax(dim=-1)
        p_log_p = normalized * normalized.exp()
        entropy = -torch.where(p_log_p != p_log_p, 0.0, p_log_p).sum(-1, keepdim=True)  # nansum
        shifted = (-normalized - entropy).abs()
        ordered, order = torch.sort(shifted, dim=-1)
        cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < bank.floats[self.mass]).sum(dim=1).clamp(max=ordered.shape[-1] - 1)
        drop = ordered > ordered.gather(1, last.view(-1, 1))
        drop[..., : self.keep] = False
        return scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), _NEG)


class Epsilon(Processor):
    hf_class = "EpsilonLogitsWarper"
    option = "epsilon_cutoff"
    inactive = (None, 0.0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.epsilon = bank.add_float(hf.epsilon)
        self.keep = int(hf.min_tokens_to_keep)

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        drop = scores.softmax(dim=-1) < bank.floats[self.epsilon]
        return scores.masked_fill(drop & (scores < _keep_top(scores, self.keep)), _NEG)


class Eta(Processor):
    hf_class = "EtaLogitsWarper"
    option = "eta_cutoff"
    inactive = (None, 0.0)

    def __init__(self, hf: Any, ctx: Context, bank: Bank) -> None:
        self.epsilon = bank.add_float(float(hf.epsilon))
        self.keep = int(hf.min_tokens_to_keep)

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        logp = scores.log_softmax(dim=-1).clamp(min=torch.finfo(scores.dtype).min)  # Categorical.entropy
        entropy = -(logp * probs).sum(-1)
        epsilon = bank.floats[self.epsilon]
        eta = torch.minimum(epsilon, torch.sqrt(epsilon) * torch.exp(-entropy))[..., None]
        return scores.masked_fill((probs < eta) & (scores < _keep_top(scores, self.keep)), _NEG)


REGISTERED: tuple[type[Processor], ...] = (
    SequenceBias,
    NoBadWords,
    RepetitionPenalty,
    NoRepeatNGram,
    MinLength,
    MinNewTokens,
    ForcedBOS,
    ForcedEOS,
    InfNanRemove,
    ExponentialDecay,
    SuppressTokens,
    SuppressTokensAtBegin,
    LogitNormalization,
    Temperature,
    TopK,
    TopP,
    MinP,
    Typical,
    Epsilon,
    Eta,
)
_BY_CLASS = {cls.hf_class: cls for cls in REGISTERED}


def handled_options() -> dict[str, tuple[Any, ...]]:
    """Generation options a registered processor serves, with the values that leave it out."""
    return {cls.option: cls.inactive for cls in REGISTERED}


@dataclass
class Pipeline:
    """The processors of one call, in transformers' order, and their parameters."""

    steps: tuple[Processor, ...]
    bank: Bank
    names: tuple[str, ...]  # transformers' class names, for logs and tests

    def __call__(self, scores: torch.Tensor, view: StepView, bank: DeviceBank) -> torch.Tensor:
        for step in self.steps:
            scores = step(scores, view, bank)
        return scores


def build(built: Sequence[Any], ctx: Context) -> Pipeline:
    """Our counterparts of the processors transformers built, or Unsupported naming the first missing."""
    bank = Bank()
    steps = []
    for hf in built:
        name = type(hf).__name__
        cls = _BY_CLASS.get(name)
        if cls is None:
            raise Unsupported(name)
        steps.append(cls(hf, ctx, bank))
    return Pipeline(tuple(steps), bank, tuple(type(hf).__name__ for hf in built))
