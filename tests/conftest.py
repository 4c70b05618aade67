"""Test setup: the `gpu` and `nvcc` markers, and the Triton interpreter where no GPU exists.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here,
at conftest import time, before test modules are collected.
"""

import os
import shutil

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CPU tests use small tensors, and the engine runs two Python threads (LLM and speech): a
    # second intra-op thread per op costs more in hand-offs than it saves on a 2-core machine.
    torch.set_num_threads(1)


def _patch_triton_interpreter_index():
    """Triton < 3.7's interpreter turns a scalar into an index with int() on its shape-(1,) array,
    which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"); triton 3.7 squeezes
    the array first. Do the same on the older versions (the GPU machine's image has triton 3.6)."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_squeezed_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_squeezed_index


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_interpreter_index()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where there is none)")
    config.addinivalue_line("markers", "nvcc: needs nvcc on the PATH (skipped where there is none)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU")
    skip_nvcc = pytest.mark.skip(reason="nvcc not on the PATH")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "nvcc" in item.keywords and shutil.which("nvcc") is None:
            item.add_marker(skip_nvcc)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """One tiny random checkpoint (seed 0) shared by the whole test session."""
    from echox.tiny import write_tiny_checkpoint
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(root)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_root):
    return tiny_root / "EchoX-tiny"


@pytest.fixture
def exact_fp32_convs():
    """cuDNN may run fp32 convs in TF32 (and the dispatch then picks the Triton conv, which does
    too): too coarse for a reference, or the offline vocoder, at 1e-4. Off for the test."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def kernel_calls(monkeypatch):
    """kernel_calls(module, name) -> a list that grows by one at each call of `module.name`, which
    still runs: a dispatch test asserts that its kernel ran (a silent fallback to the torch path
    would match the reference and pass)."""
    def counted(module, name: str) -> list:
        calls, kernel = [], getattr(module, name)

        def call(*args, **kwargs):
            calls.append(name)
            return kernel(*args, **kwargs)
        monkeypatch.setattr(module, name, call)
        return calls
    return counted
