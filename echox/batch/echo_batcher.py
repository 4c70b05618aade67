"""Continuous batching of the echo decoder: the segments being spoken decode as rows of one step.

A segment joins with its LLM hidden states: between two batched blocks the loop prefills its
prompt in a free slot (a batch of one), then its row decodes `units_per_read` greedy steps
per block with the other rows, and leaves at eot or at its unit budget. Rows in the step's range
with no segment decode at position 0 of their slot, which holds nothing worth keeping (a
segment's cache lives only as long as its decode). A block is captured per batch width
(capture.py: a CUDA graph on a GPU, a trace on a CPU), as the LLM's step is. Each row's units
go back to its caller a block at a time, as `EchoDecoder.generate` yields them without batching.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..capture import CapturedWidths
from ..echo import EchoDecoder, UnitTally
from .slots import SlotTable
from .worker import BatchWorker, Request


class SegmentRequest(Request):
    def __init__(self, segment: torch.Tensor, max_units: int | None, ready=None):
        super().__init__(ready)
        self.segment, self.max_units = segment, max_units


@dataclass
class EchoRow:
    request: SegmentRequest
    slot: int
    tally: UnitTally
    token: int  # the last token chosen, fed at the next block
    position: int


class EchoBatcher(BatchWorker):
    def __init__(self, echo: EchoDecoder, max_batch: int, use_graphs: bool = False):
        super().__init__("echox-echo-batch", echo.adapter.weight.device)
        self.echo = echo
        self.state = echo.body.allocate_state(max_batch, echo.cache_len)
        self.views = {width: self.state.rows(0, width) for width in range(1, max_batch + 1)}
        self.table = SlotTable(max_batch)
        self.rows: dict[int, EchoRow] = {}
        self.graphs = CapturedWidths(self.block, max_batch, self.idle_inputs, self.device) if use_graphs else None

    def generate(self, segment: torch.Tensor, max_units: int | None = None, ready=None,
                 on_stop: Callable[[Callable[[], None]], None] | None = None) -> Iterator[int]:
        """`EchoDecoder.generate`, decoded in the batch: unit token ids of segment [n, H] as they come.
        `ready` (GPU): an event after which `segment` is written. `on_stop` is handed the request's
        `withdraw`, which the caller's stop runs (from any thread) to end a wait for a slot at once."""
        request = self.submit(SegmentRequest(segment, max_units, ready))
        if on_stop is not None:
            on_stop(request.withdraw)
        for units in request.items():
            yield from units

    def active(self) -> bool:
        return bool(self.rows)

    def admit(self, request: SegmentRequest) -> bool:
        taken = self.table.take(request)
        if taken is None:
            return False
        slot, _ = taken
        try:
            prompt = self.echo.prompt_embeddings(request.segment)
            tally = self.echo.tally(prompt.shape[0], request.max_units)
            self.echo.body.use_state(self.state.rows(slot, slot + 1))
            first = self.echo.prefill(prompt)
            self.hand_out(EchoRow(request, slot, tally, 0, prompt.shape[0]), first.tolist())
        except BaseException:
            self.table.release(slot)
            raise
        return True

    def step(self):
        used = self.table.width()
        width = used if self.graphs is None else self.graphs.width(used)
        rows = [self.rows.get(i) for i in range(width)]
        feed = torch.tensor([row.token if row else self.echo.vocab.eot for row in rows], device=self.device)
        at = torch.tensor([[row.position if row else 0] for row in rows], device=self.device)
        tokens = (self.graphs or self.block)(feed, at).tolist()  # [width][K]
        for row in rows:
            if row is not None:
                row.position += self.echo.units_per_read
                self.hand_out(row, tokens[row.slot])

    def block(self, feed: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """`units_per_read` steps of slots 0..w-1 from tokens [w] at positions [w, 1] -> tokens [w, K]."""
        self.echo.body.use_state(self.views[len(feed)])  # len: an int even while tracing
        return self.echo.decode_block(feed, at)

    def idle_inputs(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """eot at the block overrun's room of slots 0..width-1 (graph warm-up and capture)."""
        return (torch.full((width,), self.echo.vocab.eot, device=self.device),
                torch.full((width, 1), self.echo.max_len, device=self.device))

    def hand_out(self, row: EchoRow, tokens: list[int]):
        units = list(row.tally.take(tokens))
        if units:
            row.request.put(units)
        if row.tally.done or row.request.cancelled:
            self.rows.pop(row.slot, None)
            self.table.release(row.slot)
            row.request.finish()
            return
        row.token = tokens[-1]
        self.rows[row.slot] = row

    def fail_active(self, error: BaseException):
        for row in list(self.rows.values()):
            self.rows.pop(row.slot)
            self.table.release(row.slot)
            row.request.finish(error)
