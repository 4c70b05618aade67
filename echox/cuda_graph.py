"""Capture a fixed-shape step function once as a CUDA graph; each replay is one launch.

Decode steps are dominated by launch overhead at batch 1 (hundreds of small kernels per token),
so the LLM and echo-decoder steps are captured. The step must have static shapes and no host
sync; its inputs are copied into static buffers and its outputs are static buffers that the
next replay overwrites (callers clone what they keep).
"""

import torch


def graph_widths(slots: int) -> list[int]:
    """The batch widths captured for up to `slots` rows: 1, 2, 4, ... and `slots` itself. A step
    over w rows runs at the smallest of them >= w, so a batch needs log2(slots) + 1 graphs."""
    return sorted({1 << i for i in range(slots.bit_length()) if 1 << i <= slots} | {slots})


def smallest_width(widths, used: int) -> int:
    return min(w for w in widths if w >= used)


class GraphedWidths:
    """A batched step captured once per batch width (`graph_widths`), so a step over w rows
    replays the smallest graph of width >= w; the rows past w are idle slots."""

    def __init__(self, fn, slots: int, example_inputs):
        """`example_inputs(width)`: inputs of that width whose warm-up and capture runs write only
        where no real step reads before writing (the spare positions of every slot)."""
        self.graphs = {width: GraphedStep(fn, *example_inputs(width)) for width in graph_widths(slots)}

    def width(self, used: int) -> int:
        return smallest_width(self.graphs, used)

    def __call__(self, *inputs: torch.Tensor):
        return self.graphs[inputs[0].shape[0]](*inputs)


class GraphedStep:
    def __init__(self, fn, *example_inputs: torch.Tensor, warmup: int = 2, pool=None):
        """`pool`: a memory pool shared with other graphs that never replay at the same time and
        whose outputs are copied before another one replays (torch.cuda.graph_pool_handle)."""
        self.fn = fn
        self.inputs = [x.clone() for x in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs allocate workspaces and autotune outside the graph
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's other thread may sync or allocate while this one captures.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor):
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return self.outputs
