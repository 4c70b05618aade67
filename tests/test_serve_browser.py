"""The browser client, in headless Chromium with a fake microphone playing a WAV: the page records,
streams to `echox serve`, and shows the answer's text and the audio it received and scheduled."""

import shutil
from pathlib import Path

import pytest
import torch

from echox.audio import write_wav
from echox.cli import demo_question
from echox.serve.launch import ServerProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                "(apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ServerProcess(["--model", tiny_model_dir, "--threads", "1", "--temperature", "0",
                        "--max-new-tokens", 24, "--max-units", 60]) as running:
        yield running


def test_page_records_answers_and_plays_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright
    microphone = tmp_path / "question.wav"  # 1.5 s of voice, then silence for server VAD to end the turn
    write_wav(microphone, torch.cat([demo_question(1.5), torch.zeros(16000 * 4)]))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}%noloop", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page()
            page.goto(server.http_url + "/")
            page.click("#start")
            page.wait_for_function("Number(document.body.dataset.responses) >= 1", timeout=90_000)
            answer = page.inner_text(".turn span")
            outcome = page.inner_text(".turn small")
            audio_ms = int(page.evaluate("document.body.dataset.audioMs"))
            errors = page.inner_text("#errors")
        finally:
            browser.close()
    assert errors == ""
    assert answer.strip()  # the tiny model's (random) text is on the page
    assert outcome.startswith(("completed", "incomplete")) and "first audio after" in outcome
    assert audio_ms > 100  # and its speech arrived and was scheduled for playback
