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
