"""The CUDA kernels of echox_cuda against their torch references, at EchoX shapes (GPU only).

Uses the installed extension (`pip install --no-build-isolation -e .`), or builds it on the fly
from csrc/ when nvcc and ninja are there. Attention must match within the rounding of its
dtype; selection must pick the very same rows: greedy always, sampling for the same seed/step.
"""

import importlib
import shutil
from pathlib import Path

import pytest
import torch

from echox.attention import decode_attention_reference
from echox.sampling import SamplingParams, head_select

pytestmark = pytest.mark.gpu

CSRC = Path(__file__).resolve().parent.parent / "csrc"
DTYPES = [torch.bfloat16, torch.float16]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def ext():
    try:
        return importlib.import_module("echox_cuda")
    except ImportError:
        pass
    from torch.utils.cpp_extension import is_ninja_available, load
    if shutil.which("nvcc") is None or not is_ninja_available():
        pytest.skip("echox_cuda is not installed (pip install --no-build-isolation -e .) "
                    "and cannot be built here (needs nvcc and ninja)")
    sources = [str(p) for p in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))]
    return load("echox_cuda", sources, extra_cuda_cflags=["-O3"], extra_cflags=["-O3"])


def attention_inputs(batch, q_heads, kv_heads, dim, max_len, dtype, lengths, length_dtype=torch.int32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, q_heads, dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, max_len, dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, max_len, dim, device="cuda", generator=g).to(dtype)
    key_valid = torch.rand(batch, max_len, device="cuda", generator=g) > 0.1  # eot keys are masked (SPEC §5)
    key_valid[:, 0] = True
    return q, k, v, torch.tensor(lengths, device="cuda", dtype=length_dtype), key_valid


# (batch, q heads, kv heads, head dim, cache size, lengths): EchoX-8B and 3B LLM layers, the echo
# decoder bodies (MHA at head dim 64), a group of 8 (two head tiles) and the tiny test model.
ATTENTION_SHAPES = {
    "8b": (1, 32, 8, 128, 4096, [3001]),
    "8b-batch": (4, 32, 8, 128, 2048, [1, 77, 2048, 1500]),
    "3b": (2, 24, 8, 128, 1024, [1024, 513]),
    "echo-small": (1, 8, 8, 64, 2048, [700]),
    "echo-12": (2, 12, 12, 64, 512, [5, 300]),
    "group-8": (1, 16, 2, 128, 256, [200]),
    "tiny": (3, 4, 2, 16, 64, [1, 33, 64]),
}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES.values(), ids=ATTENTION_SHAPES.keys())
def test_decode_attention_matches_reference(ext, shape, dtype):
    q, k, v, lengths, key_valid = attention_inputs(*shape, dtype=dtype)
    out = ext.decode_attention(q, k, v, lengths, key_valid)
    ref = decode_attention_reference(q, k, v, lengths, key_valid)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_decode_attention_int64_lengths_and_garbage_past_length(ext):
    q, k, v, lengths, key_valid = attention_inputs(2, 32, 8, 128, 512, torch.bfloat16, [100, 400], torch.int64)
    expected = ext.decode_attention(q, k, v, lengths.int(), key_valid)
    k[0, :, 100:] = float("nan")  # slots past the length are never read
    v[1, :, 400:] = float("nan")
    out = ext.decode_attention(q, k, v, lengths, key_valid)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_decode_attention_replays_in_a_cuda_graph(ext):
    """No host sync: the launch captures, and lengths changed in place take effect on replay."""
    q, k, v, lengths, key_valid = attention_inputs(1, 32, 8, 128, 1024, torch.bfloat16, [10])
    ext.decode_attention(q, k, v, lengths, key_valid)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ext.decode_attention(q, k, v, lengths, key_valid)
    for n in (10, 511, 1024):
        lengths.fill_(n)
        graph.replay()
        ref = decode_attention_reference(q, k, v, lengths, key_valid)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def head_inputs(batch, width, rows, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(batch, width, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(rows, width, device="cuda", generator=g) * 0.02).to(dtype)
    return hidden, weight


def select(ext, hidden, weight, params, step):
    return ext.head_select(hidden, weight, params.temperature, params.top_p, params.top_k, params.seed, step)


def expected(hidden, weight, params, step):
    return head_select(hidden, weight, params, step, backend_name="torch")


# (batch, hidden width, head rows): the EchoX-8B and 3B LM heads (V = 128257), the echo decoder's
# full head (V + U) and a restricted unit head, a batch beyond one batch tile, a tiny head.
HEAD_SHAPES = {
    "8b-lm": (1, 4096, 128257),
    "3b-lm": (2, 3072, 128257),
    "echo-full": (1, 4096, 136449),
    "unit-head": (1, 512, 8193),
    "batch-5": (5, 768, 8193),
    "tiny": (2, 64, 300),
}
SAMPLING = {
    "released": SamplingParams(temperature=0.2, top_p=0.9, seed=7),
    "plain": SamplingParams(temperature=1.0, seed=1),
    "top-k": SamplingParams(temperature=0.8, top_k=50, seed=2),
    "top-k-p": SamplingParams(temperature=1.0, top_p=0.8, top_k=20, seed=3),
    "hot-top-p": SamplingParams(temperature=4.0, top_p=0.95, seed=4),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HEAD_SHAPES.values(), ids=HEAD_SHAPES.keys())
def test_greedy_is_identical(ext, shape, dtype):
    hidden, weight = head_inputs(*shape, dtype=dtype)
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    params = SamplingParams()
    assert torch.equal(select(ext, hidden, weight, params, step), expected(hidden, weight, params, step))


def test_greedy_ties_go_to_the_lowest_row(ext):
    hidden, weight = head_inputs(1, 256, 5000, torch.bfloat16)
    weight[[4000, 17, 2500]] = hidden[0] * 0.1  # three equal, largest logits
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    assert select(ext, hidden, weight, SamplingParams(), step).tolist() == [17]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", SAMPLING.values(), ids=SAMPLING.keys())
@pytest.mark.parametrize("shape", HEAD_SHAPES.values(), ids=HEAD_SHAPES.keys())
def test_sampling_is_identical_for_a_seed_and_step(ext, shape, params, dtype):
    hidden, weight = head_inputs(*shape, dtype=dtype)
    for n in (0, 1, 12345):
        step = torch.tensor([n], dtype=torch.int64, device="cuda")
        got, want = select(ext, hidden, weight, params, step), expected(hidden, weight, params, step)
        assert torch.equal(got, want), f"step {n}: kernel drew {got.tolist()}, reference {want.tolist()}"


def test_top_k_one_is_greedy(ext):
    hidden, weight = head_inputs(3, 1024, 20000, torch.float16)
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    picked = select(ext, hidden, weight, SamplingParams(temperature=1.0, top_k=1), step)
    assert torch.equal(picked, select(ext, hidden, weight, SamplingParams(), step))


@pytest.mark.parametrize("params", [SAMPLING["released"], SAMPLING["plain"]], ids=["released", "plain"])
def test_head_select_replays_in_a_cuda_graph(ext, params):
    """The step counter lives on the GPU: bumping it in place changes the draw on replay."""
    hidden, weight = head_inputs(1, 4096, 128257, torch.bfloat16)
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    select(ext, hidden, weight, params, step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token = select(ext, hidden, weight, params, step)
    for n in range(4):
        step.fill_(n)
        graph.replay()
        assert torch.equal(token, expected(hidden, weight, params, step))
