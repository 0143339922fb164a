"""Stopping criteria and streamers on the fast path: stop strings on the device, the rest on the host.

transformers evaluates its stopping criteria on the whole ``input_ids`` after every step and hands every
new token to the streamer. Here:

- ``stop_strings``: transformers' ``StopStringCriteria`` is tensor-only (a vocabulary table built once,
  then an embedding, a cumsum and a max over the last ``maximum_token_len`` tokens). The step graph
  calls it on a rolling ``[B, W]`` window of the last W tokens, so the table is device data: other stop
  strings with a table of the same shape (and the same W) run the graphs already compiled.
- ``stopping_criteria`` (any Python, e.g. lm-evaluation-harness' decode-and-compare) and ``max_time``:
  ``HostStops`` runs them at the loop's check points, once per step since the last check, on the
  ``input_ids`` transformers would pass at that step, so a row stops at the step where transformers stops
  it. The streamer gets the same ``put`` calls as from transformers, in a burst at each check point.
"""

from __future__ import annotations

from typing import Any

import torch


def window_filler(criteria: Any) -> int | None:
    """A token id that neither ends nor continues any stop string (its table row is all -1 but its length).

    It fills the window before the first token of ``input_ids`` when the prompt is shorter than the window:
    there transformers' ``input_ids[:, -W:]`` is just shorter, and a token that matches nothing masks
    those positions the same way.
    """
    table = criteria.embedding_vec.cpu()
    free = (table[:, :-1] == -1).all(dim=1).nonzero().flatten()
    return int(free[-1]) if free.numel() else None


def initial_window(criteria: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, W] the last W tokens of ``input_ids`` (left padding included, as transformers sees them)."""
    width = int(criteria.maximum_token_len)
    window = torch.full((input_ids.shape[0], width), window_filler(criteria), dtype=torch.int64)
    tail = input_ids[:, -width:]
    window[:, width - tail.shape[1] :] = tail
    return window


def stop_string_hits(criteria: Any, window: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(window with ``tokens`` appended, rows whose text now ends with a stop string): inside the graph."""
    window = torch.cat([window[:, 1:], tokens[:, None]], dim=1)
    return window, criteria(window, None)


class HostStops:
    """The host side of stopping and streaming: called at each check point with the tokens so far.

    Rows finished on the device (eos, stop strings) are read from the device's ``stopped_at`` (the slot
    of each row's last token); the host criteria are evaluated step by step after them. A row finished
    here is padded in the result from the next step on, as transformers pads it (only when eos is set,
    as transformers does); the device keeps generating for it until the call ends.
    """

    def __init__(self, plan: Any) -> None:
        from transformers.generation.stopping_criteria import MaxTimeCriteria, StoppingCriteriaList

        criteria = list(plan.host_criteria)
        if plan.max_time is not None:  # created when transformers creates it: before the prefill
            criteria.append(MaxTimeCriteria(max_time=plan.max_time))
        self.criteria = StoppingCriteriaList(criteria) if criteria else None
        self.ids = plan.input_ids.clone()  # transformers' input_ids, grown by one column per step
        self.prompt_length = plan.input_ids.shape[1]
        self.unfinished = torch.ones(plan.input_ids.shape[0], dtype=torch.bool)
        self.pad = plan.pad_token_id if plan.eos_token_ids else None
        self.first_slot = plan.first_slot
        self.length: int | None = None  # new tokens in the result, once every row has finished
        self.streamer = plan.streamer
        self.streamed = 0
        if self.streamer is not None:
            self.streamer.put(plan.input_ids.cpu())

    @property
    def evaluated(self) -> int:
        return self.ids.shape[1] - self.prompt_length

    def advance(
        self, out: torch.Tensor, stopped_at: torch.Tensor | None, steps: int, scores: list[Any] | None
    ) -> bool:
        """Evaluate the steps run since the last call (``steps`` in all); True once every row finished."""
        if self.length is not None:
            return True
        out = out.cpu()
        stopped = None if stopped_at is None else stopped_at.cpu()
        for step in range(self.evaluated, steps):
            slot = self.first_slot + step
            token = out[:, slot]
            if self.pad is not None:
                token = torch.where(self.unfinished, token, torch.full_like(token, self.pad))
            self.ids = torch.cat([self.ids, token[:, None]], dim=1)
            done = torch.zeros_like(self.unfinished) if stopped is None else stopped == slot
            if self.criteria is not None:
                so_far = None if scores is None else tuple(scores[: step + 1])
                done = done | self.criteria(self.ids, so_far)
            self.unfinished = self.unfinished & ~done
            if not bool(self.unfinished.any()):
                self.length = step + 1
                break
        self._stream()
        return self.length is not None

    def _stream(self) -> None:
        if self.streamer is None:
            return
        for step in range(self.streamed, self.evaluated):
            self.streamer.put(self.ids[:, self.prompt_length + step])
        self.streamed = self.evaluated

    def finish(self) -> torch.Tensor:
        """The new tokens of the result, [B, length]; the streamer is ended."""
        self._stream()
        if self.streamer is not None:
            self.streamer.end()
        return self.ids[:, self.prompt_length :]
