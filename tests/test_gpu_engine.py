"""The engine on a GPU (skipped without one): CUDA graphs change nothing, kernels match torch."""

import pytest
import torch

import echox
from echox.cli import demo_question
from echox.sampling import GREEDY, SamplingParams
from echox.segmenter import SegmenterParams

pytestmark = pytest.mark.gpu
SHORT = SegmenterParams(min_len=12, min_len_confident=6)


def turn(engine, sampling=GREEDY):
    session = engine.session(sampling=sampling, segmenter=SHORT, max_new_tokens=40, max_units=64)
    trace = list(session.respond(audio=demo_question(2.0)))[-1].trace
    return trace["tokens"], [s["units"] for s in trace["segments"]]


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.8, top_p=0.9, seed=3)])
def test_cuda_graphs_give_the_eager_result(tiny_model_dir, sampling):
    graphed = echox.load(tiny_model_dir, device="cuda", dtype="float32", graphs=True)
    eager = echox.load(tiny_model_dir, device="cuda", dtype="float32", graphs=False)
    assert turn(graphed, sampling) == turn(eager, sampling)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_every_backend_gives_the_same_greedy_turn(tiny_model_dir, monkeypatch, kernel_calls, backend):
    """...and runs on that backend's kernels (a silent fallback to torch would give the same turn)."""
    from echox import backend as dispatch
    if backend == "cuda" and not dispatch.cuda_extension_available():
        pytest.skip("echox_cuda is not built")
    reference = turn(echox.load(tiny_model_dir, device="cuda", dtype="float32"))
    monkeypatch.setenv("ECHOX_BACKEND", backend)
    calls = [kernel_calls(module, name) for module, name in backend_kernels(backend)]
    assert turn(echox.load(tiny_model_dir, device="cuda", dtype="float32")) == reference
    assert all(calls), [len(c) for c in calls]


def backend_kernels(backend: str) -> list:
    """(module, function) of each kernel a turn runs on `backend` (none for torch)."""
    if backend == "triton":
        from echox_kernels import decode_attention, head_select, prefill_attention, vocoder_conv
        return [(prefill_attention, "prefill_attention"), (decode_attention, "decode_attention"),
                (head_select, "head_select"), (vocoder_conv, "conv1d_valid"), (vocoder_conv, "conv_transpose1d_window")]
    if backend == "cuda":
        import echox_cuda
        return [(echox_cuda, name) for name in ("decode_attention", "head_select", "conv1d_valid",
                                                "conv_transpose1d_window")]
    return []


def test_bf16_turn_runs_and_streams(tiny_model_dir):
    engine = echox.load(tiny_model_dir, device="cuda")
    assert engine.dtype == torch.bfloat16
    tokens, units = turn(engine)
    assert len(tokens) == 40 and sum(map(len, units)) > 0
