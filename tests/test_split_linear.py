"""One-row products split over cores (echox/split_linear.py) and the threads that run them."""

import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from echox.config import LlamaConfig
from echox.cpu_threads import on_every_core, pin_threads, torch_threads, usable_cores
from echox.llama import LlamaBody
from echox.split_linear import SplitLinear, split_one_row_products, split_product, splits_exactly

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from random_engine import build_engine  # noqa: E402

SEVERAL_CORES = pytest.mark.skipif(usable_cores() < 2, reason="one core: nothing is split over threads")


@pytest.mark.parametrize("outputs, inputs", [
    (768, 512), (512, 512), (4096, 512), (512, 2048),  # the released "small" echo decoder's layers
    (5120, 3072), (3072, 8192), (6144, 4096),  # EchoX-3B qkv and down, EchoX-8B qkv
])
def test_a_split_product_has_f_linears_bits_on_any_thread_count(outputs, inputs):
    gen = torch.Generator().manual_seed(outputs + inputs)
    weight, x = torch.randn(outputs, inputs, generator=gen) * 0.02, torch.randn(1, 1, inputs, generator=gen)
    assert splits_exactly(weight)
    reference = F.linear(x, weight)
    for count in sorted({1, usable_cores()}):
        with torch_threads(count):
            assert torch.equal(split_product(x, weight), reference)


@pytest.mark.parametrize("outputs", [64, 1025, 1000])
def test_a_weight_whose_halves_are_not_whole_blocks_is_not_split(outputs):
    assert not splits_exactly(torch.zeros(outputs, 512))


def test_split_layers_keep_their_weights_and_names_and_longer_inputs_are_unchanged():
    body = LlamaBody(LlamaConfig(hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                                 intermediate_size=256, vocab_size=10, max_position_embeddings=64))
    before = dict(body.state_dict())
    assert split_one_row_products(body) == 4  # per layer wqkv (256 rows) and w_gate_up (512), not the 96-row ones
    after = body.state_dict()
    assert list(after) == list(before) and all(after[n].data_ptr() == before[n].data_ptr() for n in before)
    layer = body.layers[0].ffn.w_gate_up
    assert type(layer) is SplitLinear and type(body.layers[0].ffn.w_down) is nn.Linear
    rows = torch.randn(3, 5, 96)
    assert torch.equal(layer(rows), F.linear(rows, layer.weight))


@SEVERAL_CORES
def test_the_echo_decoders_split_step_on_every_core_is_the_plain_step_on_one():
    """A decode step of the released-size echo decoder: hidden states, bit for bit."""
    echo = build_engine("voice", "cpu", graphs=False).echo
    assert sum(type(m) is SplitLinear for m in echo.body.modules()) == 16  # every body product
    token, position = torch.tensor([echo.cfg.text_vocab_size + 5]), torch.tensor([[40]])
    valid = echo.one_valid_key.expand(1, 1)

    def step():
        return echo.body(echo.embed(token[:, None]), position, valid)
    with torch.inference_mode():
        with torch_threads(usable_cores()):
            split = step()
        for layer in echo.body.modules():
            if type(layer) is SplitLinear:
                layer.__class__ = nn.Linear
        with torch_threads(1):
            plain = step()
    assert torch.equal(split, plain)


def test_work_on_every_core_runs_in_a_thread_of_its_own_and_hands_back_its_result_or_error():
    caller, seen = threading.get_ident(), {}

    def work():
        seen.update(thread=threading.get_ident(), threads=torch.get_num_threads(),
                    inference=torch.is_inference_mode_enabled())
        return 42
    before = torch.get_num_threads()
    assert on_every_core(work) == 42
    assert seen == {"thread": seen["thread"], "threads": usable_cores(), "inference": True} and seen["thread"] != caller
    assert torch.get_num_threads() == before

    def failing():
        raise KeyError("from the worker")
    with pytest.raises(KeyError, match="from the worker"):
        on_every_core(failing)


@SEVERAL_CORES
def test_pinned_threads_keep_their_count_when_another_thread_raises_the_process_count():
    counts, raised, pinned = [], threading.Event(), threading.Event()

    def raiser():
        torch.set_num_threads(usable_cores())  # torch's count for threads that have not run an op yet
        raised.set()
        pinned.wait()

    def pinned_worker():
        raised.wait()
        pin_threads(1)
        pinned.set()
        counts.append(torch.get_num_threads())
        torch.ones(4).sum()
        counts.append(torch.get_num_threads())
    threads = [threading.Thread(target=raiser), threading.Thread(target=pinned_worker)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.set_num_threads(1)  # the test process's count (conftest.py)
    assert counts == [1, 1]


def test_an_interrupted_caller_waits_for_the_work_on_every_core_to_end():
    """Ctrl-C while the work runs: the work writes the caller's state, so it ends before the caller unwinds."""
    import _thread
    import time
    ended = []

    def work():
        _thread.interrupt_main()  # as if Ctrl-C came while the caller waits
        time.sleep(0.3)
        ended.append(True)
    with pytest.raises(KeyboardInterrupt):
        on_every_core(work)
    assert ended == [True]
