"""The generator half of a vocoder push as one CUDA graph replay.

A push of the streaming vocoder runs about a hundred small convs, each a kernel launch. Once a
stream is in steady state (after its first push every cache and every wait between two paths
has its full length) and away from its segment's end, a generator push padded to a bucket's
length has the same shapes and kernels whatever its units: only how many of its frames are real
differs, and with those counts on the device (`streaming_vocoder.Counts`) the push needs nothing
from the host. So it is captured once per (bucket, streams) and replayed. A segment's first
push, its flush (the end padding) and the duration predictor (a few convs whose output, the
frame count, the host must know) stay eager.

The state goes into the graph as one flat tensor [B, N] (every cache of a stream, in a fixed
order) and comes out the same way, so a replay costs a copy in, one launch and a copy out.
A batched engine's pushes of B streams run at the graph width of its LLM steps (1, 2, 4, ...
up to its batch size, `capture.graph_widths`), the last stream repeated into the spare rows
(each row of a conv is computed on its own, so they change nothing in the others), so a batch
needs a graph per width and bucket, not per stream count. One stream's graphs are captured at
load; the wider ones when a push first needs them (all of them up front would hold about 1.5 GB
of state buffers at 16 streams, most never used).
"""

import math
import warnings

import torch

from .capture import GraphedStep, graph_widths, smallest_width
from .streaming_vocoder import (
    GeneratorState,
    Steps,
    bucket,
    initial_state,
    map_tree,
    split_rows,
    state_shape,
    stream_generator,
)
from .vocoder import Vocoder

SETTLING_FRAMES = 8  # frames per push while looking for the steady state


def steady_state(vocoder: Vocoder) -> GeneratorState:
    """A generator state in steady state (one stream), found by pushing frames of silence until
    the shapes of its caches stop changing."""
    state = initial_state(vocoder).generator
    silence = vocoder.conv_pre.weight.new_zeros(1, vocoder.conv_pre.in_channels, SETTLING_FRAMES)
    while True:
        _, pushed = stream_generator(vocoder, state, Steps(silence, (SETTLING_FRAMES,)), (False,))
        pushed = split_rows(pushed, 1)[0]
        if state_shape(pushed) == state_shape(state):
            return pushed
        state = pushed


def _leaves(state) -> list[torch.Tensor]:
    """The state's tensors in a fixed order; a leaf of Rows (one tensor per stream) is stacked."""
    leaves = []
    map_tree(lambda leaf: leaves.append(torch.cat(leaf) if isinstance(leaf, tuple) else leaf), state)
    return leaves


def pack(state) -> torch.Tensor:
    """A state of B streams -> one tensor [B, N]."""
    return torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in _leaves(state)], dim=1)


def _repeat_last(rows: torch.Tensor, spare: int) -> torch.Tensor:
    """rows [B, ...] and `spare` copies of its last row after them."""
    return torch.cat([rows, rows[-1:].expand(spare, *rows.shape[1:])]) if spare else rows


class SteadyPush:
    """Generator pushes of steady streams with device counts: `push` runs them as CUDA graph
    replays (`capture`, on a GPU) or eagerly (the same computation, what tests check on a CPU)."""

    def __init__(self, vocoder: Vocoder, capture: bool):
        self.vocoder, self.capture = vocoder, capture
        self.template = steady_state(vocoder)
        self.shape = state_shape(self.template)  # its leaves' shapes, [1, C, L] each
        self.sizes = [math.prod(shape[1:]) for shape in self.shape]  # their parts of a flat row
        self.graphs: dict[tuple[int, int], GraphedStep] = {}  # by (streams, frames)
        self.widths = [1]  # how many streams a push runs as (fewer are padded); more run at their own width
        self.pool = None  # one memory pool for all: pushes run one at a time, outputs are copied at once
        self.replays = 0  # pushes that ran here

    def takes(self, state: GeneratorState, final: tuple[bool, ...]) -> bool:
        """Whether a push of these streams (one's state stands for all: they have equal shapes) runs here."""
        return not any(final) and state_shape(state) == self.shape

    def unpack(self, flat: torch.Tensor) -> GeneratorState:
        """[B, N] -> a state of [B, C, L] views into it."""
        pieces = iter(flat.split(self.sizes, dim=1))
        return map_tree(lambda leaf: next(pieces).view(flat.shape[0], *leaf.shape[1:]), self.template)

    def step(self, features: torch.Tensor, valid: torch.Tensor, flat: torch.Tensor):
        """The captured function: frames [B, C, T] with `valid` [B] real ones, state [B, N] ->
        samples [B, T * hop] (valid * hop real per row, as in steady state) and the new state [B, N]."""
        samples, state = stream_generator(self.vocoder, self.unpack(flat), Steps(features, valid),
                                          (False,) * flat.shape[0])
        return samples.data, pack(state)

    def runner(self, features: torch.Tensor, valid: torch.Tensor, flat: torch.Tensor):
        """The graph for these shapes (captured now if new), or `step` itself. A capture that fails
        leaves every push eager, with a warning: the results are the same, only slower."""
        key = (features.shape[0], features.shape[-1])
        if self.capture and key not in self.graphs:
            try:
                self.pool = self.pool or torch.cuda.graph_pool_handle()
                self.graphs[key] = GraphedStep(self.step, features, valid, flat, pool=self.pool)
            except RuntimeError as error:
                warnings.warn(f"vocoder pushes run without CUDA graphs: capturing one failed ({error})",
                              stacklevel=2)
                self.capture = False
        return self.graphs[key] if self.capture else self.step

    def push(self, states: list[GeneratorState], features: Steps) -> tuple[Steps, list[GeneratorState]]:
        """Advance steady streams by frames `features` (host counts): their samples and new states."""
        streams = len(states)
        spare = (smallest_width(self.widths, streams) if streams <= self.widths[-1] else streams) - streams
        frames, flat = (_repeat_last(rows, spare)
                        for rows in (features.data, torch.cat([pack(state) for state in states])))
        valid = torch.tensor(features.valid + features.valid[-1:] * spare, device=flat.device)
        samples, new = self.runner(frames, valid, flat)(frames, valid, flat)
        self.replays += 1
        # A graph's outputs are overwritten by its next replay: keep copies.
        samples, new = samples[:streams].clone(), new.clone()
        hop = self.vocoder.cfg.hop_length
        return Steps(samples, tuple(v * hop for v in features.valid)), [self.unpack(new[b:b + 1])
                                                                        for b in range(streams)]

    def use_widths(self, slots: int):
        """Pushes of up to `slots` streams run at the graph widths for them (padded)."""
        self.widths = graph_widths(slots)

    def capture_buckets(self, largest: int):
        """Capture the one-stream graphs of every bucket up to `largest` frames now (at load)."""
        flat = pack(self.template)
        for frames in sorted({bucket(n) for n in range(1, largest + 1)}):
            features = flat.new_zeros(1, self.vocoder.conv_pre.in_channels, frames)
            valid = torch.full((1,), frames, device=flat.device)
            self.runner(features, valid, flat)
