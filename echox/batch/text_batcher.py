"""Continuous batching of the LLM: every active turn is one row of one decode step.

A turn joins with its prompt slots. Between two decode steps the loop takes it into a KV slot
(slots.py) and prefills it there as a batch of one, so each prefill delays the other rows' next
token by its own length (on a CPU it takes every core while the engine makes no speech, which
gives the same bits: cpu_threads.py); the row then decodes with the others until eot, `max_new_tokens` or
a full cache, and leaves without stopping them. A step covers rows 0..w-1, w one past the last
busy slot (on a GPU, w rounded up to a captured graph's size); a row in that range with no turn
runs a dummy step at the first position its slot does not use, which the next prefill or
decode there overwrites, so it costs compute but never changes a cache.

Every row has its own sampling settings and counter (the conversation's). Rows with the same
settings select in one head_select call, so the output head is read once for them: greedy rows
ignore the counter, and sampled rows pass one counter each, which hashes every row as a batch of
one, so each draws the token it would draw without batching.
"""

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..cpu_threads import every_core
from ..capture import CapturedWidths
from ..generate import (
    Slot,
    TextDecoder,
    Token,
    cache_full,
    period_direction,
    period_score,
)
from ..llama import DecoderState, LlamaLM
from ..sampling import SamplingParams, head_select
from .slots import SlotTable
from .worker import BatchWorker, Request


class TextRequest(Request):
    def __init__(self, owner, slots: list[Slot], speech: dict[int, torch.Tensor], sampling: SamplingParams,
                 max_new_tokens: int, counter: torch.Tensor, ready=None):
        super().__init__(ready)
        self.owner, self.slots, self.speech = owner, slots, speech
        self.sampling, self.max_new_tokens, self.counter = sampling, max_new_tokens, counter
        self.queued_at = time.perf_counter()
        self.wait_ms = self.prefill_ms = 0.0  # set when the turn joins


@dataclass
class Row:
    request: TextRequest
    slot: int
    token: int  # the token fed at the next step
    position: int  # where it goes
    count: int  # tokens handed out so far


class TextBatcher(BatchWorker):
    # One prefill between two decode steps: the rows decoding wait for one prefill at a time, and
    # a turn that joined decodes (and reaches its first segment, which the speech workers can
    # start on) while the turns queued after it prefill.
    joins_per_step = 1

    def __init__(self, lm: LlamaLM, pad_id: int, eot_id: int, period_id: int, max_batch: int, max_len: int,
                 use_graphs: bool = False, speech_busy: Callable[[], bool] = lambda: False):
        """`speech_busy`: whether the engine's echo decoder or vocoder has work; while neither does,
        a prefill on the CPU runs on every core (cpu_threads.py)."""
        super().__init__("echox-text-batch", lm.lm_head.weight.device)
        self.speech_busy = speech_busy
        self.lm, self.eot_id, self.pad_id, self.max_len = lm, eot_id, pad_id, max_len
        # One position more than a conversation may use: where a full slot's dummy steps write.
        self.state = lm.body.allocate_state(max_batch, max_len + 1)
        self.decoders = [TextDecoder(lm, pad_id, eot_id, period_id, max_len, use_graphs=False,
                                     state=self.state.rows(i, i + 1)) for i in range(max_batch)]
        self.table = SlotTable(max_batch)
        self.rows: dict[int, Row] = {}
        self.steps = self.rows_stepped = 0  # decode steps run, and active rows summed over them
        self.step_seconds = 0.0  # wall time inside decode steps (tokens out included)
        self.views: dict[int, DecoderState] = {}  # slots 0..w-1 of the cache, by width w
        self.period_row = period_direction(lm, period_id)
        self.graphs = CapturedWidths(self.decode, max_batch, self.idle_inputs, self.device) if use_graphs else None

    # ---- the callers' side ----------------------------------------------------------------------

    def answer(self, request: TextRequest) -> Iterator[Token]:
        """Queue a turn; yield its tokens (eot excluded) as the batch decodes them."""
        self.submit(request)
        for token in request.items():
            if token.hidden.is_cuda:  # made on the batch's stream, read on the caller's
                token.hidden.record_stream(torch.cuda.current_stream())
            yield token

    def forget(self, owner):
        """`owner`'s conversation starts over: its slot's cached history no longer counts."""
        with self.arrived:
            slot = self.table.forget(owner)
            if slot is not None and not self.table.busy[slot]:
                self.decoders[slot].cached = []

    # ---- the loop's side ------------------------------------------------------------------------

    def active(self) -> bool:
        return bool(self.rows)

    def admit(self, request: TextRequest) -> bool:
        with self.arrived:
            taken = self.table.take(request.owner)
        if taken is None:
            return False
        slot, kept = taken
        decoder = self.decoders[slot]
        if not kept:
            decoder.cached = []
        request.wait_ms = (time.perf_counter() - request.queued_at) * 1000
        started = time.perf_counter()
        cores = every_core() if self.device.type == "cpu" and not self.speech_busy() else contextlib.nullcontext()
        try:
            with cores:
                hidden = decoder.prefill(request.slots, request.speech)
            token = self.select(hidden, [request])
            request.prefill_ms = (time.perf_counter() - started) * 1000
            row = Row(request, slot, 0, len(request.slots), 0)
            self.hand_out(row, hidden[0], *torch.stack([token.float(), period_score(hidden, self.period_row)])
                          .view(-1).tolist())
        except BaseException:
            self.release(slot)
            raise
        return True

    def select(self, hidden: torch.Tensor, requests: list[TextRequest]) -> torch.Tensor:
        """Next token [B] of hidden [B, H], each row with its request's sampling; bumps the counters."""
        weight = self.lm.lm_head.weight
        groups: dict[SamplingParams, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.sampling, []).append(i)
        if len(groups) == 1:
            tokens = head_select(hidden, weight, requests[0].sampling, self.counters(requests))
        else:
            tokens = torch.empty(len(requests), dtype=torch.int64, device=hidden.device)
            for sampling, rows in groups.items():
                group = [requests[i] for i in rows]
                tokens[rows] = head_select(hidden[rows], weight, sampling, self.counters(group))
        torch._foreach_add_([request.counter for request in requests], 1)
        return tokens

    def counters(self, requests: list[TextRequest]) -> torch.Tensor:
        """The sampling counters of rows with the same settings: [1] for one row or greedy rows
        (which ignore it), else one per row."""
        if len(requests) == 1 or requests[0].sampling.greedy:
            return requests[0].counter
        return torch.cat([request.counter for request in requests])

    def step(self):
        started = time.perf_counter()
        width = self.width()
        rows = [self.rows.get(i) for i in range(width)]
        feed = torch.tensor([row.token if row else self.pad_id for row in rows], device=self.device)
        at = torch.tensor([[row.position if row else min(len(self.decoders[i].cached), self.max_len)]
                           for i, row in enumerate(rows)], device=self.device)
        hidden = self.body_step(feed, at)  # [width, H]
        active = [row for row in rows if row is not None]
        self.steps, self.rows_stepped = self.steps + 1, self.rows_stepped + len(active)
        where = [row.slot for row in active]
        # A copy of the active rows (indexing copies), made before the read below waits for this
        # stream: the callers use the rows on theirs, and a CUDA graph's output is overwritten by
        # its next replay.
        chosen = hidden.clone() if len(active) == width else hidden[where]
        tokens = self.select(chosen, [row.request for row in active])
        tokens, scores = torch.stack([tokens.float(), period_score(chosen, self.period_row)]).tolist()
        for row, token, score, slot, own in zip(active, tokens, scores, where, chosen):
            self.decoders[slot].cached.append(row.token)  # its keys and values are in the cache now
            row.position += 1
            self.hand_out(row, own, token, score)
        self.courier.dispatch()  # the loop would next; here, so that the step's time counts the handover
        self.step_seconds += time.perf_counter() - started

    def hand_out(self, row: Row, hidden: torch.Tensor, token: float, score: float):
        """Give the row's request its next token, or finish it (eot, its limit, a full cache, cancelled)."""
        request, token = row.request, int(token)
        if request.cancelled or token == self.eot_id:
            return self.leave(row)
        request.put(Token(token, hidden, score))
        row.token, row.count = token, row.count + 1
        if row.count == request.max_new_tokens:
            return self.leave(row)
        if row.position >= self.max_len:
            return self.leave(row, cache_full(self.max_len, row.count))
        self.rows[row.slot] = row

    def leave(self, row: Row, error: BaseException | None = None):
        self.rows.pop(row.slot, None)
        self.release(row.slot)
        row.request.finish(error)

    def release(self, slot: int):
        with self.arrived:
            self.table.release(slot)

    def fail_active(self, error: BaseException):
        for row in list(self.rows.values()):
            self.leave(row, error)

    # ---- the batched step -----------------------------------------------------------------------

    def width(self) -> int:
        used = self.table.width()
        return used if self.graphs is None else self.graphs.width(used)

    def body_step(self, feed: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Tokens [w] at positions [w, 1] through the LLM over slots 0..w-1 -> hidden [w, H]."""
        return (self.graphs or self.decode)(feed, at)

    def decode(self, feed: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        width = len(feed)  # an int even while tracing (a traced shape is a tensor)
        if width not in self.views:
            self.views[width] = self.state.rows(0, width)
        self.lm.body.use_state(self.views[width])
        valid = torch.ones(width, 1, dtype=torch.bool, device=self.device)
        return self.lm(self.lm.embed_tokens(feed)[:, None], at, valid)[:, 0]

    def idle_inputs(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad tokens at the spare last position of slots 0..width-1 (graph warm-up and capture)."""
        return (torch.full((width,), self.pad_id, device=self.device),
                torch.full((width, 1), self.max_len, device=self.device))
