"""Capture a fixed-shape step once, then replay it: a CUDA graph on a GPU, a trace on a CPU.

On a GPU a decode step is dominated by launch overhead at batch 1 (hundreds of small kernels per
token); a CUDA graph replays them all as one launch. On a CPU the same step spends most of its
time in Python between its small ops, and every op called from Python lets go of the interpreter
lock and takes it back, so the engine's threads (LLM, echo decoder, vocoder) make each other's
ops wait (bench/interpreter_lock.py). A TorchScript trace records the step's ATen ops once; a
replay runs them from C++, taking the lock only to enter and leave. It runs the same ops on the
same tensors as the eager step, so it gives the same bits (it runs unoptimised: no fusion, no
folding; tests compare replays with eager steps).

So the LLM and echo-decoder steps (and on a GPU the steady vocoder push) are captured. A step must
have static shapes; for a CUDA graph also no host sync, and for a trace no Python decision on a
tensor's value (a value that must stay live, like the CPU decode attention's used cache length,
stays a tensor). A CUDA graph's inputs are copied into static buffers and its outputs are static
buffers that the next replay overwrites; a trace returns new tensors. Callers clone what they keep.
A trace also drops an in-place write that nothing after it in the step reads (a KV cache write
is read by the attention after it; a sampling counter's bump is the caller's). And a trace is
never freed (torch.jit's global compilation unit keeps it, with the tensors it holds), so the
engine makes a bounded number: per batch width, per echo-decoder head, per KV cache that
sessions pass on to each other (engine.py), not per session or sampling setting. On a GPU an
unbatched step is a graph per sampling setting too (the setting is baked into its kernels): the
last few are kept (RecentCaptures), so a graph and its memory go with a setting nobody uses.
"""

import collections
import threading
import warnings

import torch

# The tracer warns where a step branches on a shape (`length == 1` in llama.py): a shape is fixed
# for its trace, and what depends on values is checked against eager steps by tests. Said once
# here, as torch says it for its own modules: catch_warnings around each trace is not thread-safe,
# and the engine's threads trace. DeprecationWarnings (torch.jit's) are hidden by default.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"echox\.")


def can_capture(device: torch.device) -> bool:
    """Whether steps on `device` can be captured (torch.jit, which traces, is deprecated upstream)."""
    return device.type == "cuda" or (device.type == "cpu" and hasattr(torch.jit, "trace"))


def capture_step(fn, *example_inputs: torch.Tensor, pool=None):
    """`fn` captured for inputs shaped as `example_inputs` (which it runs on: their writes must go
    where no real step reads before writing). `pool`: see GraphedStep."""
    if example_inputs[0].is_cuda:
        return GraphedStep(fn, *example_inputs, pool=pool)
    return TracedStep(fn, *example_inputs)


def graph_widths(slots: int) -> list[int]:
    """The batch widths captured for up to `slots` rows: 1, 2, 4, ... and `slots` itself. A step
    over w rows runs at the smallest of them >= w, so a batch needs log2(slots) + 1 graphs."""
    return sorted({1 << i for i in range(slots.bit_length()) if 1 << i <= slots} | {slots})


def capture_widths(slots: int, device: torch.device) -> list[int]:
    """The widths a batched step runs at: graph_widths on a GPU (each graph holds memory of its
    own); every width on a CPU, where a trace costs nothing to keep and spare rows cost compute."""
    return graph_widths(slots) if device.type == "cuda" else list(range(1, slots + 1))


def smallest_width(widths, used: int) -> int:
    return min(w for w in widths if w >= used)


class CapturedWidths:
    """A batched step captured once per batch width (`capture_widths`), so a step over w rows
    replays the capture of the smallest width >= w; the rows past w are idle slots. CUDA graphs
    are captured now (a capture allocates and syncs); traces when a width is first used."""

    def __init__(self, fn, slots: int, example_inputs, device: torch.device):
        """`example_inputs(width)`: inputs of that width whose runs write only where no real step
        reads before writing (the spare positions of every slot)."""
        self.fn, self.example_inputs = fn, example_inputs
        self.widths = capture_widths(slots, device)
        self.steps = {}
        if device.type == "cuda":
            for width in self.widths:
                self.captured(width)

    def width(self, used: int) -> int:
        return smallest_width(self.widths, used)

    def captured(self, width: int):
        if width not in self.steps:
            self.steps[width] = capture_step(self.fn, *self.example_inputs(width))
        return self.steps[width]

    def __call__(self, *inputs: torch.Tensor):
        return self.captured(inputs[0].shape[0])(*inputs)


class RecentCaptures:
    """At most `limit` captures by key, the least recently used dropped first (its CUDA graph and
    memory pool go once no caller holds it): for captures keyed by what clients choose, such as
    a sampling setting, which a server's clients may change without end."""

    def __init__(self, limit: int):
        self.limit, self.captures = limit, collections.OrderedDict()

    def get(self, key, make):
        """The capture for `key`, made by make() if it is not kept."""
        if key in self.captures:
            self.captures.move_to_end(key)
            return self.captures[key]
        capture = self.captures[key] = make()
        if len(self.captures) > self.limit:
            self.captures.popitem(last=False)
        return capture

    def __len__(self) -> int:
        return len(self.captures)


class TracedStep:
    def __init__(self, fn, *example_inputs: torch.Tensor):
        # torch.jit is deprecated in favour of torch.compile and torch.export, which generate
        # fused code (other bits) and take minutes to build; a trace only replays the eager ops.
        self.trace = torch.jit.trace(fn, example_inputs, check_trace=False)

    def __call__(self, *inputs: torch.Tensor):
        # Unoptimised: the optimiser folds ops on tensors the trace holds as constants, and those
        # change between calls (KV caches, sampling counters). Only this thread's flag is set.
        with torch.jit.optimized_execution(False):
            return self.trace(*inputs)


# Graphs are captured one at a time, each on a high-priority stream of its own. torch hands out
# ordinary streams round-robin from a pool of 32 per device, and its default capture stream is one
# of them, so in an engine with many threads it is also some worker's stream, whose work would go
# into the graph (or fail) during a capture; nothing else here asks for high-priority streams.
# Captures happen while the engine serves (a batched vocoder's wider pushes, a new session's step).
_capturing = threading.Lock()


class GraphedStep:
    def __init__(self, fn, *example_inputs: torch.Tensor, warmup: int = 2, pool=None):
        """`pool`: a memory pool shared with other graphs that never replay at the same time and
        whose outputs are copied before another one replays (torch.cuda.graph_pool_handle)."""
        self.fn = fn
        self.inputs = [x.clone() for x in example_inputs]
        with _capturing:
            stream = torch.cuda.Stream(priority=-1)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up runs allocate workspaces and autotune outside the graph
                for _ in range(warmup):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the engine's other threads may sync or allocate while this one captures.
            with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor):
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return self.outputs
