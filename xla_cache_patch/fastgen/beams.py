"""Beam search with static shapes, inside the prefill and decode graphs (decoder-only models).

The layout is the one TensorFlow and Flax generate used: the batch is ``B * K`` rows (K beams per prompt),
the running sequences are the loop's output buffer ``[B * K, W]`` (slots, as the greedy loop keeps them),
the finished hypotheses live in their own buffer ``[B, K, W]`` with their scores, and every step picks the
best ``T = max(2, 1 + n_eos) * K`` continuations over beams x vocabulary. The cache is reordered by beam on
the device, in place, in the same graph (``index_select`` on the batch dim of every KV buffer, written back
with ``copy_``); nothing is read by the host per step but the loop's "anything left?" flag.

What is matched: transformers' vectorized ``_beam_search`` (>= 4.50) step by step, and the
``BeamSearchScorer`` of earlier releases, which gives the same hypotheses save one detail, the score its
early-stopping test starts from (``Beams.best_of_candidates``). Length penalty is device data (new values
compile nothing); ``early_stopping`` (True / False / "never") is part of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from xla_cache_patch.fastgen.processors import StepView

_NEG = -1.0e9  # transformers' "never pick this" score


@dataclass(frozen=True)
class Beams:
    """The beam-search options of one call (host values; length_penalty goes to the device)."""

    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    num_return: int
    # < 4.50 (BeamSearchScorer): the early-stopping test starts from the best of all candidates of the step;
    # >= 4.50: from the best running beam after it.
    best_of_candidates: bool
    # Value of output slots after a hypothesis ends (transformers' fill / pad token).
    # (best_of_candidates also marks the era whose hypotheses end with eos_token_id[0]: see finalize.)
    fill: int
    # do_sample=True: the T candidates are drawn without replacement (transformers' multinomial over
    # softmax(beam scores + processed log-probs)), then sorted by score.
    sample: bool = False

    def keep(self, n_eos: int) -> int:
        """T: candidates kept per prompt and step (transformers' beams_to_keep / n_tokens_to_keep)."""
        return max(2, 1 + n_eos) * self.num_beams


@dataclass
class BeamState:
    """Device tensors of the search carried from step to step (fixed shapes)."""

    running_scores: torch.Tensor  # [B, K] summed log-probs of the running beams
    # [B, K, W] flat parent beam per generated step (-1: not yet). W, the output buffer's width, bounds the
    # steps of any max_new_tokens of the cache bucket: a max_new_tokens-shaped buffer would be a new graph
    # for every new max_new_tokens (the user trial's 2 graphs per call).
    running_indices: torch.Tensor
    seqs: torch.Tensor  # [B, K, W] finished hypotheses by slot
    scores: torch.Tensor  # [B, K] their length-penalized scores (-1e9: empty)
    finished: torch.Tensor  # [B, K] bool, slot holds a hypothesis
    indices: torch.Tensor  # [B, K, W] their beam indices
    improvable: torch.Tensor  # [B, 1] bool, transformers' is_early_stop_heuristic_unsatisfied
    ran: torch.Tensor  # [] steps transformers would have run
    running: torch.Tensor  # [] bool, transformers' loop has not stopped yet


@dataclass
class BeamConstants:
    """Per-call device values of the search (new values reuse the graphs)."""

    floats: torch.Tensor  # [1] length_penalty
    ints: torch.Tensor  # [2] first new slot, max_new_tokens

    @property
    def length_penalty(self) -> torch.Tensor:
        return self.floats[0:1]


def constants(beams: Beams, first_slot: int, max_new: int, device: torch.device) -> BeamConstants:
    floats = torch.tensor([beams.length_penalty], dtype=torch.float32).to(device)
    return BeamConstants(floats, torch.tensor([first_slot, max_new], dtype=torch.int64).to(device))


def initial_state(beams: Beams, batch: int, width: int, device: torch.device) -> BeamState:
    """The search before its first step; every shape is the bucket's (``width``), none ``max_new_tokens``'s
    (that one is device data: ``BeamConstants.ints``)."""
    k = beams.num_beams
    running_scores = torch.zeros((batch, k), dtype=torch.float32)
    running_scores[:, 1:] = _NEG  # only the first beam's tokens count at the first step
    return BeamState(
        running_scores=running_scores.to(device),
        running_indices=torch.full((batch, k, width), -1, dtype=torch.int64).to(device),
        seqs=torch.zeros((batch, k, width), dtype=torch.int64).to(device),
        scores=torch.full((batch, k), _NEG, dtype=torch.float32).to(device),
        finished=torch.zeros((batch, k), dtype=torch.bool).to(device),
        indices=torch.full((batch, k, width), -1, dtype=torch.int64).to(device),
        improvable=torch.ones((batch, 1), dtype=torch.bool).to(device),
        ran=torch.zeros((), dtype=torch.int64).to(device),
        running=torch.ones((), dtype=torch.bool).to(device),
    )


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor[b, index[b, j], ...]: transformers' _gather_beams."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _candidates(total: torch.Tensor, keep: int, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The T best continuations [B, T] by score, or T drawn without replacement in proportion to
    softmax(total), best first (torch's own multinomial without replacement is this exponential race:
    top-k of p / Exp(1); here in log space, on the XLA RNG)."""
    if not sample:
        return total.topk(keep, dim=-1)
    race = (-torch.log(torch.rand_like(total).clamp(min=1e-20))).clamp(min=1e-20)  # Exp(1)
    drawn = (total - torch.log(race)).topk(keep, dim=-1).indices
    scores, order = torch.take_along_dim(total, drawn, dim=-1).sort(dim=-1, descending=True)
    return scores, torch.take_along_dim(drawn, order, dim=-1)


def step(
    beams: Beams,
    logits: torch.Tensor,
    out: torch.Tensor,
    produced_slot: torch.Tensor,
    state: BeamState,
    consts: BeamConstants,
    eos: torch.Tensor | None,
    process: Any,
    view: StepView,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam step on the logits ``[B * K, V]``; updates ``state`` in place.

    Returns (processed log-probs [B*K, V] as transformers reports them, the new running sequences
    [B*K, W] with their token at ``produced_slot``, their tokens [B*K], the flat parent of each running
    beam [B*K] (to reorder the cache by), the "search goes on" flag []).
    """
    k = beams.num_beams
    rows, vocab = logits.shape
    batch = rows // k
    width = out.shape[1]
    device = logits.device
    log_probs = process(torch.log_softmax(logits, dim=-1), view)
    total = (log_probs.view(batch, k, vocab) + state.running_scores[:, :, None]).view(batch, k * vocab)
    keep = beams.keep(0 if eos is None else eos.shape[0])
    top_scores, top = _candidates(total, keep, beams.sample)
    parent, tokens = top // vocab, top % vocab  # [B, T]
    length = produced_slot - consts.ints[0:1] + 1  # [1] tokens generated with this one
    column = length - 1
    offsets = (torch.arange(batch, device=device) * k)[:, None]
    # candidates: their sequences and beam indices
    cand_seqs = _gather(out.view(batch, k, width), parent)
    slot_mask = (torch.arange(width, device=device) == produced_slot)[None, None, :]
    cand_seqs = torch.where(slot_mask, tokens[:, :, None], cand_seqs)
    cand_indices = _gather(state.running_indices, parent)
    col_mask = (torch.arange(cand_indices.shape[2], device=device) == column)[None, None, :]
    cand_indices = torch.where(col_mask, (parent + offsets)[:, :, None], cand_indices)
    last = length >= consts.ints[1:2]  # [1] max_length reached: every candidate stops
    hits = last.expand(batch, keep)
    if eos is not None:
        hits = hits | (tokens[:, :, None] == eos[None, None, :]).any(dim=-1)
    # running beams for the next step: the best K that did not stop
    running = top_scores + hits.float() * _NEG
    chosen = running.topk(k, dim=-1).indices  # [B, K]
    new_scores = _gather(running, chosen)
    new_seqs = _gather(cand_seqs, chosen)
    new_indices = _gather(cand_indices, chosen)
    origin = (_gather(parent, chosen) + offsets).view(-1)
    new_tokens = _gather(tokens, chosen).view(-1)
    # finished hypotheses: the stopped candidates among the top K join the pool if they beat it
    penalty = consts.length_penalty
    normalized = top_scores / length.float().pow(penalty)
    top_k = torch.arange(keep, device=device) < k
    full = state.finished.all(dim=-1, keepdim=True) & (beams.early_stopping is True)
    blocked = full | ~state.improvable | ~(hits & top_k[None, :])
    normalized = normalized + blocked.float() * _NEG
    merged = torch.cat([state.scores, normalized], dim=1).topk(k, dim=-1).indices
    state.seqs = _gather(torch.cat([state.seqs, cand_seqs], dim=1), merged)
    state.scores = _gather(torch.cat([state.scores, normalized], dim=1), merged)
    state.indices = _gather(torch.cat([state.indices, cand_indices], dim=1), merged)
    state.finished = _gather(torch.cat([state.finished, hits & top_k[None, :]], dim=1), merged)
    state.running_scores, state.running_indices = new_scores, new_indices
    # transformers' early-stopping heuristic, with the tokens generated so far
    if beams.early_stopping == "never":
        best_length = torch.where(penalty > 0, consts.ints[1:2], length)
    else:
        best_length = length
    best = top_scores[:, :1] if beams.best_of_candidates else new_scores[:, :1]
    best_possible = best / best_length.float().pow(penalty)
    worst = torch.where(state.finished, state.scores.min(dim=1, keepdim=True).values, _NEG)
    state.improvable = state.improvable & (best_possible > worst).any(dim=-1, keepdim=True)
    alive = state.improvable.any() & ~hits.all()
    if beams.early_stopping is True:
        alive = alive & ~state.finished.all()
    state.ran = state.ran + state.running.long()
    state.running = state.running & alive
    return log_probs, new_seqs.view(rows, width), new_tokens, origin, alive


def reorder_cache(buffers: list[torch.Tensor], origin: torch.Tensor) -> None:
    """Every KV buffer's rows follow their beams: in place, in the step's graph."""
    for buf in buffers:
        buf.copy_(buf.index_select(0, origin))


def finalize(
    beams: Beams, state: BeamState, first_slot: int, eos: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """The host's view of the best ``num_return`` hypotheses per prompt: new tokens, scores, beam indices.

    New tokens are cropped to the longest returned hypothesis and filled after each one's end. The
    BeamSearchScorer (< 4.50) keeps a hypothesis without its eos and writes ``eos_token_id[0]`` after it:
    with several eos ids, that era ends every such hypothesis with the first one.
    """
    n = beams.num_return  # whole tensors to the host, sliced there: slicing on the device is a graph
    seqs = state.seqs.cpu()[:, :n].flatten(0, 1)
    scores = state.scores.cpu()[:, :n].flatten()
    indices = state.indices.cpu()[:, :n].flatten(0, 1)
    lengths = (indices >= 0).sum(dim=1)
    longest = int(lengths.max())
    new = seqs[:, first_slot : first_slot + longest]
    keep = torch.arange(longest)[None, :] < lengths[:, None]
    new = torch.where(keep, new, torch.full_like(new, beams.fill))
    if beams.best_of_candidates and len(eos) > 1:
        end = (lengths - 1).clamp(min=0)[:, None]
        last = new.gather(1, end)
        ended = torch.isin(last, torch.tensor(eos)) & (lengths[:, None] > 0)
        new = new.scatter(1, end, torch.where(ended, torch.full_like(last, eos[0]), last))
    return {"tokens": new, "scores": scores, "indices": indices[:, :longest], "lengths": lengths}
