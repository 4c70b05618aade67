"""Exact streaming of the unit vocoder: units in a few at a time, waveform chunks out.

Every layer of the vocoder looks ahead ("same" padding), so a sample is final only once its
right receptive field has arrived. Here each layer keeps the few inputs its kernel still needs
(its left context) and emits exactly the outputs whose inputs are all present; at the end of a
segment each layer gets its own right zero padding, as the offline convs do. Where two paths
meet (a residual add, the mean of a stage's resblocks) the one that ran ahead is held back.
So each push costs work proportional to the new units, and the chunks of a segment concatenate
to the offline waveform of the same units. The duration predictor streams the same way: a
unit's frames go to the generator once its duration's right context has arrived.

The per-layer ops `stream_conv1d`, `stream_conv_transpose1d` and `stream_residual_step` take
their cache in and hand the new one back, and the per-stream state is one plain object, so
many streams run side by side. Their arithmetic is the two ops of echox/vocoder_ops.py (torch
reference, Triton or CUDA kernel): a valid conv over cache + new inputs, and the window of a
transposed conv that is complete. The leaky relu before a conv runs inside the op, so caches
hold raw inputs; that is exact, because the zero padding stays zero: leaky_relu(0) = 0.
Tensors are [B, C, T], one row per stream.

Each push is padded to one of a few lengths (`bucket`) and every op carries how many of its
steps are real in each row (`Steps`), so pushes of one length run every conv at the same shapes
whatever their units: shape-keyed plans (oneDNN's on a CPU) are built once and reused.

Several streams advance in one call (`advance_streams`, as a batched engine's vocoder does):
their pushes are padded to a common length and every conv runs once over all of them. Rows
must then enter each op with caches of equal length, which holds for streams whose states have
the same shapes (every stream in steady state does: a conv cache is full after the first push);
`advance_streams` groups the streams by that and runs each group as one batch.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .vocoder import DURATION_DTYPE, FINAL_SLOPE, STAGE_SLOPE, ResBlock1, Vocoder, durations_from_log
from .vocoder_ops import conv1d_valid, conv_transpose1d_window

if TYPE_CHECKING:  # vocoder_graphs.py builds on this module
    from .vocoder_graphs import SteadyPush

Rows = tuple[torch.Tensor, ...]  # one tensor per stream, [1, C, L_b]: what each stream keeps
# Valid steps per row: host ints, or a [B] int64 tensor on the device in a push that must not
# sync with the host (a CUDA graph's, vocoder_graphs.py), which runs only in steady state.
Counts = tuple[int, ...] | torch.Tensor


def conv1d_left_pad(kernel: int, dilation: int) -> int:
    """"Same" padding of an odd kernel: the zeros before the first input (and after the last)."""
    return (kernel - 1) * dilation // 2


def conv_transpose1d_context(kernel: int, stride: int) -> tuple[int, int]:
    """(left, right): inputs before and after input i that outputs i*stride .. i*stride+stride-1 use,
    with padding (kernel - stride) / 2."""
    pad = (kernel - stride) // 2
    return (kernel - 1 - pad) // stride, (stride - 1 + pad) // stride


def _with_zeros(x: torch.Tensor, count: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(*x.shape[:-1], count)], dim=-1)


@dataclass
class Steps:
    """New time steps of B streams: `data` [B, C, T], of which row b's first `valid[b]` are real.

    The rest is padding: every op computes its outputs too and marks them invalid, so a push
    padded up to a fixed length runs every layer at the same shapes as any other push of that
    length (on a CPU, oneDNN then reuses its convolution plans instead of building new ones).
    No valid output ever depends on padding: each op's outputs are complete only from inputs
    before `valid`, and at the end of a segment the right zero padding is written over it."""

    data: torch.Tensor
    valid: Counts

    @classmethod
    def padded(cls, rows: Sequence[torch.Tensor], length: int) -> "Steps":
        """Rows [1, C, n_b] (or [n_b] ids) zero-padded on the right to `length` >= every n_b, stacked."""
        data = torch.cat([_with_zeros(x, length - x.shape[-1])[None] if x.dim() == 1 else
                          _with_zeros(x, length - x.shape[-1]) for x in rows])
        return cls(data, tuple(x.shape[-1] for x in rows))

    def ending(self, zeros: int, final: tuple[bool, ...]) -> "Steps":
        """Each `final` row's steps followed by its segment's right zero padding: `zeros` more
        valid steps (the other rows only get `zeros` more steps of padding)."""
        data = _with_zeros(self.data, zeros)  # a copy, so the padding can be zeroed in place
        for row, (valid, ends) in enumerate(zip(self.valid, final)):
            if ends:
                data[row, ..., valid:] = 0
        return Steps(data, tuple(v + zeros * ends for v, ends in zip(self.valid, final)))

    def row(self, b: int) -> torch.Tensor:
        """Row b's valid steps, [C, valid[b]] (or [valid[b]] for ids)."""
        return self.data[b, ..., :self.valid[b]]


def _plus(counts: Counts, steps: int) -> Counts:
    """counts + steps per row, at least 0."""
    if isinstance(counts, torch.Tensor):
        return (counts + steps).clamp(min=0)
    return tuple(max(0, c + steps) for c in counts)


def _times(counts: Counts, factor: int) -> Counts:
    return counts * factor if isinstance(counts, torch.Tensor) else tuple(c * factor for c in counts)


def _least(paths: list[Counts]) -> Counts:
    """Per row, the smallest count over the paths."""
    if isinstance(paths[0], torch.Tensor):
        return torch.stack(paths).amin(0)
    return tuple(min(column) for column in zip(*paths))


def _keep(buffer: torch.Tensor, starts: Counts, stops: Counts, steady: int) -> Rows:
    """What each stream keeps of its row of buffer [B, C, L]: steps start_b .. stop_b - 1.

    With device counts the stream is in steady state, where every cache keeps its length:
    `steady` steps from start_b, gathered on the device (no host sync)."""
    if isinstance(starts, torch.Tensor):
        at = starts[:, None, None] + torch.arange(steady, device=buffer.device)
        kept = buffer.gather(-1, at.expand(*buffer.shape[:-1], steady))
        return tuple(kept[b:b + 1] for b in range(kept.shape[0]))
    # Copies, not views: a view would keep the whole buffer, every activation of the push, alive
    # with the stream (hundreds of MB at the released shape, where the copies take under 1 MB).
    if len(starts) == 1:  # one stream: one slice
        return (buffer[..., starts[0]:stops[0]].clone(),)
    return tuple(buffer[b:b + 1, ..., start:stop].clone() for b, (start, stop) in enumerate(zip(starts, stops)))


def stream_conv1d(cache: torch.Tensor, x: Steps, weight: torch.Tensor, bias: torch.Tensor,
                  dilation: int, final: tuple[bool, ...], input_slope: float = 1.0,
                  skip: Steps | None = None) -> tuple[Steps, Rows]:
    """A "same"-padded dilated Conv1d of leaky_relu(inputs, input_slope) over B streams.

    cache [B, C_in, <= span] holds the raw inputs still needed (starts as the left zero padding),
    as long in every row; x are new inputs; rows with `final` get the right zero padding. Returns
    the outputs that are now complete, [B, C_out, *] with valid counts m_b, plus the first m_b
    steps of `skip` (a residual path, at least m_b valid steps per row) if given, and each
    stream's new cache.
    """
    span = (weight.shape[-1] - 1) * dilation
    if any(final):
        x = x.ending(span // 2, final)
    buffer = torch.cat([cache, x.data], dim=-1)  # [B, C_in, L]
    real = _plus(x.valid, cache.shape[-1])
    ready = _plus(real, -span)
    length = max(0, buffer.shape[-1] - span)
    residual = None if skip is None or length == 0 else _fit(skip.data, length)
    y = conv1d_valid(buffer, weight, bias, dilation, input_slope, residual) if length else \
        buffer.new_zeros(buffer.shape[0], weight.shape[0], 0)
    return Steps(y, ready), _keep(buffer, ready, real, cache.shape[-1])


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    """x cut or zero-padded to `length` steps (only its valid steps matter)."""
    return x[..., :length] if x.shape[-1] >= length else _with_zeros(x, length - x.shape[-1])


def stream_conv_transpose1d(cache: torch.Tensor, x: Steps, weight: torch.Tensor, bias: torch.Tensor,
                            stride: int, final: tuple[bool, ...],
                            input_slope: float = 1.0) -> tuple[Steps, Rows]:
    """ConvTranspose1d of leaky_relu(inputs, input_slope), padding (kernel - stride) / 2, over B
    streams; weight [C_in, C_out, k].

    Input i yields outputs i*stride .. i*stride + stride - 1, complete once inputs i - left ..
    i + right are present. cache [B, C_in, <= left + right] starts as `left` zeros; `final`
    rows get `right` zeros. Returns [B, C_out, *] with stride * m_b valid, and the new caches.
    """
    kernel = weight.shape[-1]
    left, right = conv_transpose1d_context(kernel, stride)
    if any(final):
        x = x.ending(right, final)
    buffer = torch.cat([cache, x.data], dim=-1)  # [B, C_in, L]
    real = _plus(x.valid, cache.shape[-1])
    ready = _plus(real, -left - right)
    length = max(0, buffer.shape[-1] - left - right)
    if length == 0:
        y = buffer.new_zeros(buffer.shape[0], weight.shape[1], 0)
    else:  # of the unpadded output [B, C_out, (L - 1) * stride + k], the steps of inputs left .. left + length - 1
        start = left * stride + (kernel - stride) // 2
        y = conv_transpose1d_window(buffer, weight, bias, stride, start, length * stride, input_slope)
    return Steps(y, _times(ready, stride)), _keep(buffer, ready, real, cache.shape[-1])


def release_aligned(waiting: list[torch.Tensor], new: list[Steps]) -> tuple[list[torch.Tensor], Counts, list[Rows]]:
    """Paths that produce the same time steps at different lags: release the steps all have reached.

    waiting: per path [B, C, L_p] (as long in every row). Returns (per path [B, C, L] whose first
    m_b steps are released in row b, m, per path what each stream keeps waiting).
    """
    joined = [torch.cat([w, n.data], dim=-1) for w, n in zip(waiting, new)]
    real = [_plus(n.valid, w.shape[-1]) for w, n in zip(waiting, new)]
    ready = _least(real)
    length = min(j.shape[-1] for j in joined)
    return [j[..., :length] for j in joined], ready, [_keep(j, ready, r, w.shape[-1])
                                                      for j, r, w in zip(joined, real, waiting)]


def _conv(cache: torch.Tensor, x: Steps, conv: nn.Conv1d, final: tuple[bool, ...], input_slope: float = 1.0,
          skip: Steps | None = None):
    return stream_conv1d(cache, x, conv.weight, conv.bias, conv.dilation[0], final, input_slope, skip)


def _conv_pad(conv: nn.Conv1d) -> int:
    return conv1d_left_pad(conv.kernel_size[0], conv.dilation[0])


def _conv_cache(conv: nn.Conv1d) -> torch.Tensor:
    """The empty cache of `conv`: its left zero padding, [1, C_in, pad]."""
    return conv.weight.new_zeros(1, conv.in_channels, _conv_pad(conv))


# A stream's state is a tree of these dataclasses whose tensors are [1, C, L] (one stream). To
# advance B streams at once their states are stacked into one tree of [B, C, L] tensors; the ops
# hand back `Rows` (a tuple, one tensor per stream) where the stream's new tensor goes, and
# `split_rows` turns that tree back into B states.

@dataclass
class ResidualStepState:
    """One step x + conv2(lrelu(conv1_d(lrelu(x)))) of a ResBlock1."""

    conv1: torch.Tensor  # [1, C, <= (k-1)d] raw conv1 inputs still needed
    conv2: torch.Tensor  # [1, C, <= k-1] raw conv2 inputs (conv1 outputs)
    skip: torch.Tensor  # [1, C, <= (k-1)(d+1)/2] inputs waiting for their residual branch


@dataclass
class StageState:
    """One upsampling stage: the transposed conv, then the mean of its resblocks."""

    up: torch.Tensor  # [1, C_in, <= left + right] raw transposed-conv inputs still needed
    blocks: list[list[ResidualStepState]]  # [resblock][dilation]
    waiting: list[torch.Tensor]  # per resblock [1, C, *]: outputs waiting for the slowest resblock


@dataclass
class GeneratorState:
    conv_pre: torch.Tensor  # [1, E (+ S), <= 6]
    stages: list[StageState]
    conv_post: torch.Tensor  # [1, C_last, <= 6]


@dataclass
class DurationState:
    units: torch.Tensor  # [1, n] pushed unit ids whose durations still wait for right context
    conv1: torch.Tensor  # [1, E, <= k-1]
    conv2: torch.Tensor  # [1, hidden, <= k-1]


@dataclass
class VocoderStreamState:
    """Everything one stream (one segment being spoken) carries between pushes."""

    durations: DurationState
    generator: GeneratorState


@functools.cache
def _field_names(kind: type) -> tuple[str, ...] | None:
    """A state dataclass's field names in order; None for a leaf type."""
    return tuple(f.name for f in dataclasses.fields(kind)) if dataclasses.is_dataclass(kind) else None


def map_tree(fn: Callable, *trees):
    """fn over the leaves (tensors, or Rows tuples) of same-shaped state trees. (Each batched
    push walks its streams' trees several times, so the field lookup is cached per class.)"""
    first = trees[0]
    if isinstance(first, list):
        return [map_tree(fn, *nodes) for nodes in zip(*trees)]
    names = _field_names(type(first))
    if names is None:
        return fn(*trees)
    return type(first)(*[map_tree(fn, *[getattr(t, name) for t in trees]) for name in names])


def stack_rows(states: list):
    """B one-stream states (equal shapes) -> one state of [B, ...] tensors."""
    return states[0] if len(states) == 1 else map_tree(lambda *rows: torch.cat(rows), *states)


def split_rows(state, count: int) -> list:
    """A state whose leaves are Rows (one tensor per stream) -> `count` one-stream states."""
    return [map_tree(lambda rows, b=b: rows[b], state) for b in range(count)]


def state_shape(state) -> tuple:
    """The shapes of a state's tensors: streams of equal shape can be stacked."""
    shapes = []
    map_tree(lambda leaf: shapes.append(tuple(leaf.shape)), state)
    return tuple(shapes)


def stream_residual_step(state: ResidualStepState, x: Steps, conv1: nn.Conv1d, conv2: nn.Conv1d,
                         final: tuple[bool, ...]) -> tuple[Steps, ResidualStepState]:
    h, conv1_cache = _conv(state.conv1, x, conv1, final, STAGE_SLOPE)
    skip_data = torch.cat([state.skip, x.data], dim=-1)
    skip = Steps(skip_data, _plus(x.valid, state.skip.shape[-1]))
    # The branch lags the skip path, so the skip has every step conv2 completes; conv2 adds them.
    y, conv2_cache = _conv(state.conv2, h, conv2, final, STAGE_SLOPE, skip)
    return y, ResidualStepState(conv1_cache, conv2_cache, _keep(skip_data, y.valid, skip.valid, state.skip.shape[-1]))


def stream_resblock(states: list[ResidualStepState], x: Steps, block: ResBlock1,
                    final: tuple[bool, ...]) -> tuple[Steps, list[ResidualStepState]]:
    new_states = []
    for state, conv1, conv2 in zip(states, block.convs1, block.convs2):
        x, state = stream_residual_step(state, x, conv1, conv2, final)
        new_states.append(state)
    return x, new_states


def stream_stage(vocoder: Vocoder, stage: int, state: StageState, x: Steps,
                 final: tuple[bool, ...]) -> tuple[Steps, StageState]:
    up = vocoder.ups[stage]
    x, up_cache = stream_conv_transpose1d(state.up, x, up.weight, up.bias, up.stride[0], final, STAGE_SLOPE)
    outputs, block_states = [], []
    for block, states in zip(vocoder.stage_blocks(stage), state.blocks):
        out, states = stream_resblock(states, x, block, final)
        outputs.append(out)
        block_states.append(states)
    released, ready, waiting = release_aligned(state.waiting, outputs)
    total = released[0]
    for out in released[1:]:  # summed in the offline order, for the same rounding
        total = total + out
    return Steps(total / len(released), ready), StageState(up_cache, block_states, waiting)


def stream_generator(vocoder: Vocoder, state: GeneratorState, features: Steps,
                     final: tuple[bool, ...]) -> tuple[Steps, GeneratorState]:
    """conv_pre input frames of B streams [B, E (+ S), n] (their states stacked) -> the newly
    final samples, [B, *] of which m_b per row, and the new state (leaves: Rows)."""
    x, conv_pre = _conv(state.conv_pre, features, vocoder.conv_pre, final)
    stages = []
    for stage, stage_state in enumerate(state.stages):
        x, stage_state = stream_stage(vocoder, stage, stage_state, x, final)
        stages.append(stage_state)
    y, conv_post = _conv(state.conv_post, x, vocoder.conv_post, final, FINAL_SLOPE)
    return Steps(torch.tanh(y.data[:, 0]), y.valid), GeneratorState(conv_pre, stages, conv_post)


def stream_durations(vocoder: Vocoder, state: DurationState, units: Steps,
                     final: tuple[bool, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor], DurationState]:
    """New unit ids of B streams (Steps of [B, n] ids) -> (per stream the units whose durations
    are now known [m_b], their durations [m_b], the new state)."""
    predictor = vocoder.dur_predictor
    embedded = Steps(vocoder.dict(units.data).transpose(1, 2).to(DURATION_DTYPE), units.valid)
    h, conv1 = _conv(state.conv1, embedded, predictor.conv1[0], final)
    h, conv2 = _conv(state.conv2, Steps(predictor.after_conv1(h.data), h.valid), predictor.conv2[0], final)
    log_durations = predictor.after_conv2(h.data)  # [B, T]
    waiting = [torch.cat([state.units[b], units.row(b)]) for b in range(len(units.valid))]
    ready = [w[:m] for w, m in zip(waiting, h.valid)]
    durations = [durations_from_log(log_durations[b, :m]) for b, m in enumerate(h.valid)]
    kept = tuple(w[None, m:].clone() for w, m in zip(waiting, h.valid))  # not views: see _keep
    return ready, durations, DurationState(kept, conv1, conv2)


def initial_state(vocoder: Vocoder) -> VocoderStreamState:
    """The state of a stream that has seen nothing: every cache holds its left zero padding."""
    device = vocoder.dict.weight.device
    stages = []
    for stage, up in enumerate(vocoder.ups):
        left, _ = conv_transpose1d_context(up.kernel_size[0], up.stride[0])
        blocks = vocoder.stage_blocks(stage)
        stages.append(StageState(
            up=up.weight.new_zeros(1, up.in_channels, left),
            blocks=[[ResidualStepState(_conv_cache(c1), _conv_cache(c2), up.weight.new_zeros(1, up.out_channels, 0))
                     for c1, c2 in zip(block.convs1, block.convs2)] for block in blocks],
            waiting=[up.weight.new_zeros(1, up.out_channels, 0) for _ in blocks]))
    predictor = vocoder.dur_predictor
    return VocoderStreamState(
        DurationState(torch.zeros(1, 0, dtype=torch.int64, device=device),
                      _conv_cache(predictor.conv1[0]), _conv_cache(predictor.conv2[0])),
        GeneratorState(_conv_cache(vocoder.conv_pre), stages, _conv_cache(vocoder.conv_post)))


def generator_right_context(vocoder: Vocoder) -> int:
    """Frames after frame f that must have arrived before the last sample of frame f is released.

    Walks from that sample back through the layers, each needing inputs as far right as the
    stream ops above wait for; a stage's resblocks wait for the slowest one.
    """
    needed = vocoder.cfg.hop_length - 1  # last sample of frame 0
    needed += _conv_pad(vocoder.conv_post)
    for stage in reversed(range(len(vocoder.ups))):
        needed += max(sum(_conv_pad(c1) + _conv_pad(c2) for c1, c2 in zip(block.convs1, block.convs2))
                      for block in vocoder.stage_blocks(stage))
        up = vocoder.ups[stage]
        _, right = conv_transpose1d_context(up.kernel_size[0], up.stride[0])
        needed = needed // up.stride[0] + right
    return needed + _conv_pad(vocoder.conv_pre)


def duration_right_context(vocoder: Vocoder) -> int:
    """Units after unit i that must have arrived before unit i's duration is known."""
    predictor = vocoder.dur_predictor
    return _conv_pad(predictor.conv1[0]) + _conv_pad(predictor.conv2[0])


def lookahead_units(vocoder: Vocoder) -> int:
    """Units after unit i to push before all of unit i's samples are out.

    Every unit lasts at least one frame, so the generator's right context in frames is at most
    that many units, each of which must first have its own duration.
    """
    return duration_right_context(vocoder) + generator_right_context(vocoder)


# Pushes are padded to a few lengths (units into the duration predictor, frames into the
# generator), so that a handful of shapes serve every push: up to 8 steps exactly, above that
# the next multiple of a quarter of the power of two below (9..16 by 2, 17..32 by 4, ... 256),
# so padding adds at most a quarter and on average about a tenth. Longer pushes go in pieces.
LARGEST_PIECE = 256


def bucket(steps: int) -> int:
    """The padded length of a piece of `steps` <= LARGEST_PIECE steps."""
    if steps <= 8:
        return steps
    step = 1 << (steps - 1).bit_length() - 3  # a quarter of the power of two below `steps`
    return -(-steps // step) * step


def pieces(steps: int) -> list[tuple[int, int]]:
    """[start, stop) pieces of at most LARGEST_PIECE steps covering 0..steps; one empty piece for 0."""
    return [(start, min(start + LARGEST_PIECE, steps)) for start in range(0, max(steps, 1), LARGEST_PIECE)]


@dataclass
class Push:
    """One stream's part of `advance_streams`: its state and new units in, its samples out."""

    state: VocoderStreamState
    units: torch.Tensor  # [n] checked unit ids
    final: bool  # the segment ends with these units
    speaker: torch.Tensor | None  # [S] for a multi-speaker vocoder
    samples: list[torch.Tensor] = dataclasses.field(default_factory=list)
    frames: torch.Tensor | None = None  # conv_pre input of the piece of units in progress


def advance_streams(vocoder: Vocoder, pushes: list[Push], steady: "SteadyPush | None" = None):
    """Advance each push's stream by its units: updates `push.state` and fills `push.samples`.

    Units go through the duration predictor and the frames they make through the generator, in
    bucket-padded pieces of at most LARGEST_PIECE steps; only a segment's last piece is final.
    Streams whose states have the same shapes run each piece as one batch; `steady` (on a GPU:
    CUDA graphs, vocoder_graphs.py) runs the generator pieces of streams in steady state."""
    unit_pieces = [pieces(push.units.shape[0]) for push in pushes]
    for i in range(max(len(p) for p in unit_pieces)):
        rows = [(push, p[i], push.final and i == len(p) - 1) for push, p in zip(pushes, unit_pieces) if i < len(p)]
        for group in _same_shape(rows, lambda row: row[0].state.durations):
            _durations(vocoder, group)
        frame_pieces = [pieces(push.frames.shape[-1]) for push, _, _ in rows]
        for j in range(max(len(p) for p in frame_pieces)):
            due = [(push, p[j], last_units and j == len(p) - 1)
                   for (push, _, last_units), p in zip(rows, frame_pieces) if j < len(p)]
            due = [row for row in due if row[1][1] > row[1][0] or row[2]]  # no frames, not the end: nothing to do
            for group in _same_shape(due, lambda row: row[0].state.generator):
                _generator(vocoder, group, steady)


def _same_shape(rows: list[tuple], state_of: Callable) -> list[list[tuple]]:
    """Rows grouped by the shapes of their stream's state (those can be stacked into one batch)."""
    if len(rows) <= 1:
        return [rows] if rows else []
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault(state_shape(state_of(row)), []).append(row)
    return list(groups.values())


def _durations(vocoder: Vocoder, rows: list[tuple[Push, tuple[int, int], bool]]):
    state = stack_rows([push.state.durations for push, _, _ in rows])
    units = [push.units[start:stop] for push, (start, stop), _ in rows]
    steps = Steps.padded(units, bucket(max(u.shape[0] for u in units)))
    ready, durations, state = stream_durations(vocoder, state, steps, tuple(last for _, _, last in rows))
    for b, ((push, _, _), new) in enumerate(zip(rows, split_rows(state, len(rows)))):
        push.state = VocoderStreamState(new, push.state.generator)
        push.frames = vocoder.frame_features(torch.repeat_interleave(ready[b], durations[b]), push.speaker)


def _generator(vocoder: Vocoder, rows: list[tuple[Push, tuple[int, int], bool]], steady: "SteadyPush | None"):
    states = [push.state.generator for push, _, _ in rows]
    frames = [push.frames[..., first:end] for push, (first, end), _ in rows]
    steps = Steps.padded(frames, bucket(max(f.shape[-1] for f in frames)))
    final = tuple(last for _, _, last in rows)
    if steady is not None and steady.takes(states[0], final):
        samples, states = steady.push(states, steps)
    else:
        samples, state = stream_generator(vocoder, stack_rows(states), steps, final)
        states = split_rows(state, len(rows))
    for b, ((push, _, _), new) in enumerate(zip(rows, states)):
        push.state = VocoderStreamState(push.state.durations, new)
        push.samples.append(samples.row(b))


class StreamingVocoder:
    """One stream: `push` units as they are decoded, `flush` at the end of a segment.

    The chunks returned between two flushes concatenate to `vocoder(units)` of all units pushed.
    `advance` runs the stream's pushes: `advance_streams` right here, or a batched engine's
    vocoder batch, which advances several streams in one call.
    """

    def __init__(self, vocoder: Vocoder, speaker: int | None = None,
                 advance: Callable[[Vocoder, list[Push]], None] = advance_streams):
        self.vocoder, self.advance = vocoder, advance
        self.speaker = vocoder.speaker_embedding(speaker)  # [S] or None
        self.lookahead_units = lookahead_units(vocoder)
        self.reset()

    def reset(self):
        """Drop everything pushed since the last flush."""
        self.state = initial_state(self.vocoder)
        self.fresh = True  # nothing pushed since the last flush

    def push(self, units: torch.Tensor) -> torch.Tensor:
        """New unit ids [n] -> the samples that are now final [m] (possibly none)."""
        return self._advance(self.vocoder.check_units(units), final=False)

    def flush(self, units: torch.Tensor | None = None) -> torch.Tensor:
        """The segment's last units [n] (if any) -> all its remaining samples; the stream is then
        ready for the next segment. One call instead of a push and a flush: a call of the
        generator costs about a hundred conv launches whatever its length."""
        if units is None:
            units = torch.zeros(0, dtype=torch.int64, device=self.vocoder.dict.weight.device)
        units = self.vocoder.check_units(units)
        if self.fresh and units.numel() == 0:  # a segment that got no units is silent: no generator
            return self.vocoder.dict.weight.new_zeros(0)  # pass over its end padding (a hundred convs)
        samples = self._advance(units, final=True)
        self.reset()
        return samples

    def _advance(self, units: torch.Tensor, final: bool) -> torch.Tensor:
        push = Push(self.state, units, final, self.speaker)
        self.advance(self.vocoder, [push])
        self.state, self.fresh = push.state, False
        return torch.cat(push.samples) if push.samples else self.vocoder.dict.weight.new_zeros(0)
