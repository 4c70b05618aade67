"""`echox serve --max-batch 2`: turns of different connections run together, the rest wait
with a clear status, and every client hears what a batch-1 session says."""

import asyncio
import subprocess
import sys

import pytest
import torch
from test_serve_realtime import (
    MAX_TOKENS,
    MAX_UNITS,
    expected_turns,
    question_pcm16,
    received_audio,
    received_text,
    run,
    sdk,
    spoken_turn,
    until,
)

from echox.serve.launch import ServerProcess


@pytest.fixture(scope="module")
def batched_server(tiny_model_dir):
    with ServerProcess(["--model", tiny_model_dir, "--threads", "1", "--temperature", "0", "--max-batch", 2,
                        "--max-new-tokens", MAX_TOKENS, "--max-units", MAX_UNITS]) as running:
        yield running


def test_two_turns_run_at_once_a_third_waits_and_all_equal_batch_one(batched_server, tiny_model_dir):
    question, follow_up = question_pcm16(), "And then?"
    (text, audio), _ = expected_turns(tiny_model_dir, question, follow_up)

    async def client():
        async with sdk(batched_server).realtime.connect(model="echox") as connection:
            await until(connection, "session.created")
            return await spoken_turn(connection, question)

    async def together():
        return await asyncio.gather(*(client() for _ in range(3)))

    results = run(together())
    ahead = sorted(next(e for e in events if e.type == "response.created").response.model_extra["echox"]
                   ["turns_ahead"] for events in results)
    assert ahead == [0, 0, 1]  # two rows of the batch, and one turn waiting for either to end
    for events in results:
        assert events[-1].response.status in ("completed", "incomplete")
        assert received_text(events) == text
        got = received_audio(events)
        assert got.numel() == audio.numel() > 0
        torch.testing.assert_close(got, audio, atol=2 / 32768, rtol=0)  # pcm16 on both sides of the wire


def test_batch_rows_beyond_the_connection_limit_are_not_allocated(tiny_model_dir):
    with ServerProcess(["--model", tiny_model_dir, "--threads", "1", "--max-batch", 9,
                        "--max-connections", 2]) as server:
        assert any("batching 2 turns" in line for line in server.log)


def test_a_batch_size_below_one_is_a_clear_error(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "echox.cli", "serve", "--model", str(tiny_model_dir),
                             "--max-batch", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--max-batch" in result.stderr and "Traceback" not in result.stderr
