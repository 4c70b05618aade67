"""The dispatch: torch on the CPU by default, overrides by argument or ECHOX_BACKEND, clear refusals."""

import pytest
import torch

from echox import backend
from echox.attention import decode_attention, decode_attention_reference
from echox.errors import EchoXError


def test_cpu_tensors_run_the_torch_reference(monkeypatch):
    monkeypatch.delenv("ECHOX_BACKEND", raising=False)
    assert backend.choose("op", torch.zeros(1)) == "torch"


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("ECHOX_BACKEND", "triton")
    assert backend.choose("op", torch.zeros(1), "torch") == "torch"
    assert backend.choose("op", torch.zeros(1)) == "triton"  # TRITON_INTERPRET=1 in tests


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("ECHOX_BACKEND", "cudnn")
    with pytest.raises(EchoXError, match="'cudnn' is not one of torch, triton, cuda"):
        backend.choose("op", torch.zeros(1))


def test_cuda_backend_needs_a_gpu_tensor_and_the_extension():
    with pytest.raises(EchoXError, match="decode_attention: the CUDA backend needs"):
        backend.choose("decode_attention", torch.zeros(1), "cuda")


def test_cpu_decode_attention_reads_only_the_used_cache():
    """The CPU path slices the static cache to the longest sequence: NaN past it (which the full
    read would carry into the output, 0 * NaN) leaves the result of the clean cache."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, generator=gen)
    k, v = torch.randn(2, 2, 64, 16, generator=gen), torch.randn(2, 2, 64, 16, generator=gen)
    lengths, valid = torch.tensor([10, 33]), torch.rand(2, 64, generator=gen) > 0.2
    valid[:, 0] = True
    clean = decode_attention_reference(q, k, v, lengths, valid)
    k[:, :, 33:], v[:, :, 33:] = float("nan"), float("nan")
    assert decode_attention_reference(q, k, v, lengths, valid).isnan().all()
    torch.testing.assert_close(decode_attention(q, k, v, lengths, valid, "torch"), clean, atol=1e-6, rtol=0)


def test_an_op_without_the_asked_kernel_falls_back(monkeypatch):
    monkeypatch.setenv("ECHOX_BACKEND", "cuda")
    assert backend.choose("prefill_attention", torch.zeros(1), kernels=("triton",)) == "torch"  # CPU tensor
    with pytest.raises(EchoXError, match="CUDA backend needs"):
        backend.choose("decode_attention", torch.zeros(1))
