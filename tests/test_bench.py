"""The benchmark harness on the CPU: the tiny random engine through one e2e measurement, and the
report's speed-ups, target checks and Markdown. Timings are not asserted, only their presence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # bench/ holds scripts, not a package

import e2e  # noqa: E402
import report  # noqa: E402
from random_engine import SIZES, build_engine, model_folder  # noqa: E402

E2E_KEYS = {"size", "device", "dtype", "settings", "prompt_length", "speech_frames", "encoder_ms", "adapter_ms",
            "prefill_ms", "turn_decode_ms_per_token", "llm_ms_per_token", "llm_tokens_timed", "llm_context_mean",
            "llm_bytes_per_step", "llm_hbm_roofline_pct", "peak_bandwidth_bytes_per_s", "echo_ms_per_unit",
            "echo_prefill_ms", "echo_units_timed", "vocoder_x_realtime", "vocoder_audio_s",
            "vocoder_units_before_first_chunk", "vocoder_lookahead_units", "ttfa"}
TTFA_KEYS = {"ms", "cold_ms", "answer_tokens", "segments", "audio_segment", "timings_ms", "prompt_length",
             "speech_frames"}


@pytest.fixture(scope="module")
def tiny_result():
    engine = build_engine("tiny", "cpu")
    settings = e2e.Settings(repeats=1, max_new_tokens=40, max_units=32, echo_units=8, vocoder_units=40)
    return e2e.measure(engine, "tiny", settings)


def test_random_engine_uses_released_ids_at_real_sizes():
    folder = model_folder(SIZES["8b"], seed=0)
    tok = folder.tokenizer
    assert (tok.bos, tok.eot, tok.audio_patch) == (128000, 128009, 128256)
    assert tok.echo_prefixes()[0][-1] == 12800  # the released prefix quirk
    assert (folder.config.echo.body.num_layers, folder.config.echo.body.hidden_size) == (8, 768)
    assert folder.config.echo.unit_vocab_size == 8000


def test_e2e_reports_every_key(tiny_result):
    assert E2E_KEYS <= tiny_result.keys()
    assert set(tiny_result["ttfa"]) == set(e2e.POLICIES)
    for policy in tiny_result["ttfa"].values():
        assert TTFA_KEYS <= policy.keys()
    assert tiny_result["llm_ms_per_token"] > 0 and tiny_result["vocoder_x_realtime"] > 0
    assert tiny_result["llm_hbm_roofline_pct"] is None  # CPU: ms/token only
    for target in report.TARGETS:  # every key a target reads exists
        target.read(tiny_result)


def test_markdown_has_every_target(tiny_result):
    micro = report.micro_rows({"benchmarks": [
        {"name": f"test_{impl}[case]", "fullname": f"bench/bench_op.py::test_{impl}[case]",
         "stats": {"median": seconds}} for impl, seconds in
        (("torch_reference", 4e-3), ("torch_sdpa", 2e-3), ("triton", 1e-3))]})
    triton = next(r for r in micro if r["implementation"] == "triton")
    assert triton["vs_reference"] == pytest.approx(4) and triton["vs_best_baseline"] == pytest.approx(2)
    assert triton["best_baseline"] == "torch_sdpa"
    env = report.environment("cpu")
    targets = report.evaluate_targets([tiny_result], micro, 0, env)
    rendered = report.render_markdown({"environment": env, "command": "test",
                                       "micro_exit_code": 0, "micro": micro, "e2e": [tiny_result],
                                       "targets": targets})
    for text in [t.text for t in report.TARGETS] + [report.KERNEL_TARGET]:
        assert text in rendered
    assert next(t for t in targets if t["target"] == report.KERNEL_TARGET)["status"] == "met"
    assert all(t["status"].startswith("not measured") for t in targets[:-1])  # no 8b/3b run on the CPU


def test_a_report_cut_short_keeps_what_it_measured(tiny_result, tmp_path, monkeypatch):
    """bench/gpu.sh stops a phase at its time limit: the report is written after each stage, the
    first size's turns first, then each microbenchmark file, then the other sizes."""
    stages = []

    def microbenchmarks(json_path, file):
        stages.append(file)
        if file != "bench_head_select.py":  # that one fails before timing anything: no json
            json_path.write_text(json.dumps({"benchmarks": []}))
        return 0 if file != "bench_head_select.py" else 2

    def e2e_run(device, size, repeats, jsonl_path):
        stages.append(size)
        if size != "tiny":
            raise subprocess.CalledProcessError(-15, "bench/e2e.py")  # killed at the limit
        return [tiny_result]

    monkeypatch.setattr(report, "run_microbenchmarks", microbenchmarks)
    monkeypatch.setattr(report, "run_e2e", e2e_run)
    with pytest.raises(subprocess.CalledProcessError):
        report.main(["--device", "cpu", "--sizes", "tiny", "mid", "--out-dir", str(tmp_path)])
    assert stages == ["tiny", *report.MICRO_FILES, "mid"]
    assert set(report.MICRO_FILES) == {path.name for path in BENCH.glob("bench_*.py")}
    written = json.loads(next(tmp_path.glob("*-cpu.json")).read_text())
    assert [result["size"] for result in written["e2e"]] == ["tiny"] and written["complete"] is False
    assert written["micro_exit_code"] == 2  # a failed file is not hidden by the ones after it
    markdown = next(tmp_path.glob("*-cpu.md")).read_text()
    assert "| tiny |" in markdown and "**Incomplete**" in markdown
    report.main(["--device", "cpu", "--sizes", "tiny", "--out-dir", str(tmp_path), "--overwrite"])
    assert json.loads(next(tmp_path.glob("*-cpu.json")).read_text())["complete"] is True
    assert "**Incomplete**" not in next(tmp_path.glob("*-cpu.md")).read_text()


def run_gpu_sh(tmp_path: Path, phases: str, budget: int) -> subprocess.CompletedProcess:
    """A copy of bench/gpu.sh in a checkout of its own (tmp_path/repo), with stand-ins for python3
    and nvidia-smi that succeed at once; python3 notes each call, with ECHOX_CUDA_NO_REBUILD, in
    calls.txt, and a report.py call writes a results file. $OUT is tmp_path."""
    stubs, bench = tmp_path / "bin", tmp_path / "repo" / "bench"
    stubs.mkdir()
    (bench / "results").mkdir(parents=True, exist_ok=True)
    (bench / "gpu.sh").write_text((BENCH / "gpu.sh").read_text())
    (stubs / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "python3").write_text(f'#!/bin/sh\necho "$* [${{ECHOX_CUDA_NO_REBUILD:-}}]" >> {tmp_path}/calls.txt\n'
                                   'case "$1" in bench/report.py) echo measured > bench/results/new-report.md;; esac\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "OUT": str(tmp_path), "GPU_SH_PHASES": phases,
           "GPU_SH_SECONDS": str(budget)}
    return subprocess.run(["bash", str(bench / "gpu.sh")], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("budget,exit_code,last_line", [
    (100, 0, "every phase ran and passed"), (30, 1, "INCOMPLETE: failed or skipped: report")])
def test_gpu_sh_fails_a_run_with_a_phase_skipped_for_time(tmp_path, budget, exit_code, last_line):
    """A phase the budget has no time for is SKIPPED, and the script then exits nonzero."""
    run = run_gpu_sh(tmp_path, "report", budget)
    assert run.returncode == exit_code, run.stdout + run.stderr
    log = (tmp_path / "gpu_sh.log").read_text()
    assert log.strip().splitlines()[-1] == last_line
    assert ("report: SKIPPED (status 200)" in run.stdout) == (exit_code == 1)


def test_gpu_sh_brings_back_this_runs_results_in_one_archive(tmp_path):
    """The device tool brings back at most 8 files from $OUT: the results come as one archive,
    with only what this run wrote."""
    import tarfile
    old = tmp_path / "repo" / "bench" / "results" / "2026-01-01-old.md"
    old.parent.mkdir(parents=True)
    old.write_text("an earlier run's")
    os.utime(old, (0, 0))
    run = run_gpu_sh(tmp_path, "report", 100)
    assert run.returncode == 0, run.stdout + run.stderr
    with tarfile.open(tmp_path / "results.tar") as archive:
        assert archive.getnames() == ["bench/results/new-report.md"]
        assert archive.extractfile("bench/results/new-report.md").read() == b"measured\n"


def test_gpu_sh_tests_do_not_rebuild_what_its_build_phase_could_not(tmp_path):
    """tests/test_cuda_kernels.py compiles csrc/ on the fly when echox_cuda is missing, unless told
    not to: in gpu.sh a failed build must not cost the tests' time limit once more."""
    run = run_gpu_sh(tmp_path, "gpu-tests", 200)
    assert run.returncode == 0, run.stdout + run.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert "-m pytest -q -m gpu -n 4 --dist loadfile tests/ [1]" in calls  # the stand-in has xdist, too
    assert all(call.endswith("[]") for call in calls if "pytest" not in call)  # the install builds as usual


def test_speech_path_reports_a_turn_beside_its_critical_path(tmp_path):
    import speech_path
    out, table = tmp_path / "speech.jsonl", tmp_path / "speech.md"
    speech_path.main(["--size", "tiny", "--threads", "1", "--repeats", "1", "--max-new-tokens", "30",
                      "--max-units", "16", "--out", str(out), "--markdown", str(table)])
    row = speech_path.json.loads(out.read_text())
    assert row["segments"] >= 1 and row["audio_s"] > 0 and row["vocoder_alone"]["units"] > 0
    assert row["turn_ms"] >= row["pre_llm_ms"]
    assert row["underruns"] >= 0 and row["stall_ms"] >= 0
    # The vocoder's timeline: it starts after the pipeline fills and ends, busy or idle, within the turn.
    assert row["fill_ms"] > 0 and row["vocoder_idle_ms"] >= 0
    assert row["pre_llm_ms"] + row["fill_ms"] + row["vocoder_ms"] + row["vocoder_idle_ms"] <= row["turn_ms"] + 1e-6
    assert "| this checkout | 1 | 32 |" in table.read_text()


def test_a_turns_numbers_from_its_trace():
    """Pre-LLM work is encoder + adapter + prefill; the LLM's time is its tokens' (10 x 2 ms); the
    critical path adds the longest of LLM, echo decoder and vocoder; the fill runs from the end of
    the pre-LLM work to the first push, and the vocoder idles between its pushes."""
    import speech_path
    timings = {"encoder": 30.0, "adapter": 5.0, "prefill": 15.0, "decode_per_token": 2.0, "echo_decoder": 400.0,
               "vocoder": 300.0, "time_to_first_audio": 250.0, "vocoder_start": 200.0, "vocoder_end": 620.0}
    numbers = speech_path.turn_numbers({"timings_ms": timings, "tokens": list(range(10))}, wall_ms=700.0)
    assert numbers == {"turn_ms": 700.0, "critical_path_ms": 450.0, "pre_llm_ms": 50.0, "llm_ms": 20.0,
                       "echo_ms": 400.0, "vocoder_ms": 300.0, "time_to_first_audio_ms": 250.0, "fill_ms": 150.0,
                       "vocoder_idle_ms": 120.0}


def test_playback_counts_every_wait_for_a_late_chunk():
    from report import playback
    # 0.1 s plays until 0.1; the next comes at 0.3 (0.2 s wait), plays to 0.5; the third is early.
    assert playback([(0.0, 0.1), (0.3, 0.2), (0.4, 0.5)]) == (1, pytest.approx(200.0), pytest.approx(1.0))
    assert playback([]) == (0, 0.0, 0.0)


@pytest.fixture
def rounds_join_together(monkeypatch):
    """The first turn of each batched round joins the LLM's batch only once all the round's
    conversations have queued (or after 60 s). Left to the machine, a slow or busy one can finish a
    12-token turn before the next question is heard, and the round then never batches two rows."""
    import batch_engine
    from echox.batch.text_batcher import TextBatcher
    expected = {"conversations": 1}
    one_round, admit = batch_engine.one_round, TextBatcher.admit

    def counting_round(engine, conversations, *args):
        expected["conversations"] = conversations
        return one_round(engine, conversations, *args)

    def gated_admit(self, request):
        with self.arrived:  # submit() notifies it as each turn queues
            self.arrived.wait_for(lambda: self.active() or len(self.waiting) >= expected["conversations"], 60)
        return admit(self, request)

    monkeypatch.setattr(batch_engine, "one_round", counting_round)
    monkeypatch.setattr(TextBatcher, "admit", gated_admit)


@pytest.mark.parametrize("sampling,suffix", [("greedy", ""), ("released", "-released")])
def test_batch_engine_reports_rounds_of_concurrent_conversations(tmp_path, sampling, suffix, rounds_join_together):
    import batch_engine
    batch_engine.main(["--size", "tiny", "--conversations", "1", "3", "--repeats", "1", "--max-new-tokens", "12",
                       "--sampling", sampling, "--out", str(tmp_path)])
    report = batch_engine.json.loads(next(tmp_path.glob(f"*-cpu-batch-tiny{suffix}.json")).read_text())
    assert report["settings"]["sampling"] == sampling
    rows = [(r["engine"], r["conversations"], r["tokens"]) for r in report["rounds"]]
    assert rows == [("unbatched", 1, 12), ("batched (3)", 1, 12), ("batched (3)", 3, 36)]
    three = report["rounds"][-1]
    assert 1 < three["rows_per_step"] <= 3 and three["ttfa_p95_ms"] >= three["ttfa_p50_ms"] > 0
    assert three["text_tokens_per_s"] >= three["turn_tokens_per_s"] > 0
    assert three["pushes_per_call"] >= 1 and three["vocoder_ms_per_unit"] > 0
    assert report["rounds"][0]["vocoder_ms_per_unit"] is None  # the unbatched engine has no batched vocoder
    # CPU time over wall time: a share of what the machine's cores could give, each loop at most one core
    assert 0 < three["cores_busy"] <= (os.cpu_count() or 1) + 0.1 and "llm_loop_busy" not in report["rounds"][0]
    assert all(0 < three[f"{loop}_loop_busy"] <= 1.05 for loop in ("llm", "echo", "vocoder"))
    # the step alone mid-answer (the rounds' prompt plus half the answer) and at a short prompt
    mid_answer = int(three["prompt_positions"] + 12 / 2)
    assert three["prompt_positions"] > 1 and [(r["position"], r["width"], r["tokens_per_s"] > 0)
                                              for r in report["steps"]] == \
        [(mid_answer, 1, True), (mid_answer, 3, True), (128, 1, True), (128, 3, True)]
    assert [r["decode_timed"] for r in report["rounds"]] == [batch_engine.DECODE_TIMED["unbatched"]] + \
        [batch_engine.DECODE_TIMED["batched"]] * 2
    markdown = next(tmp_path.glob(f"*-cpu-batch-tiny{suffix}.md")).read_text()
    assert f"(body and head selection, {sampling} sampling)" in markdown
    assert f"| {batch_engine.DECODE_TIMED['unbatched']} |" in markdown


def test_a_batch_run_cut_short_keeps_its_rounds(tmp_path, monkeypatch):
    """bench/gpu.sh stops the batch phase at its time limit: the report is written after each round."""
    import batch_engine

    def killed(*args):
        raise KeyboardInterrupt  # as the limit's SIGTERM or SIGKILL would end it, mid-way
    monkeypatch.setattr(batch_engine, "step_times", killed)
    with pytest.raises(KeyboardInterrupt):
        batch_engine.main(["--size", "tiny", "--conversations", "1", "2", "--repeats", "1", "--max-new-tokens", "4",
                           "--text-only", "--written-question", "--out", str(tmp_path)])
    written = json.loads(next(tmp_path.glob("*-cpu-batch-tiny-text-only-written-question.json")).read_text())
    assert [r["conversations"] for r in written["rounds"]] == [1, 1, 2] and written["complete"] is False
    assert written["steps"] == [] and "**Incomplete**" in next(tmp_path.glob("*.md")).read_text()
    assert not [path for path in tmp_path.iterdir() if ".tmp" in path.name]  # atomic writes leave no leftovers


def test_batch_engine_written_rounds_make_no_speech_and_short_prompts(tmp_path):
    import batch_engine
    batch_engine.main(["--size", "tiny", "--conversations", "1", "2", "--repeats", "1", "--max-new-tokens", "8",
                       "--text-only", "--written-question", "--out", str(tmp_path)])
    name = "*-cpu-batch-tiny-text-only-written-question"
    report = batch_engine.json.loads(next(tmp_path.glob(name + ".json")).read_text())
    assert report["settings"]["text_only"] and [r["tokens"] for r in report["rounds"]] == [8, 8, 16]
    for row in report["rounds"]:
        assert row["ttfa_p50_ms"] is None and row["vocoder_ms_per_unit"] is None and row["decode_tokens_per_s"] > 0
        assert row["prompt_positions"] < 750  # a spoken question's prompt holds ~750 speech rows alone
    assert "--text-only --written-question`" in next(tmp_path.glob(name + ".md")).read_text()
    assert report["complete"] is True and "**Incomplete**" not in next(tmp_path.glob(name + ".md")).read_text()


def test_voice_size_has_the_released_speech_output():
    from echox.config import VocoderConfig
    folder = model_folder(SIZES["voice"], seed=0)
    assert SIZES["voice"].vocoder == VocoderConfig()
    assert (folder.config.echo.body.num_layers, folder.config.echo.body.hidden_size) == (4, 512)


def test_serve_load_paces_conversations(tmp_path):
    """Two paced conversations of two turns each through a real server: every turn is answered,
    and each second question comes only once the first answer has played out."""
    import serve_load
    serve_load.main(["--clients", "2", "--max-batch", "2", "--turns", "2", "--stagger", "0.2", "--pause", "0",
                     "--question-seconds", "1", "--max-new-tokens", "8", "--max-units", "16", "--out", str(tmp_path)])
    result = serve_load.json.loads(next(tmp_path.glob("*-cpu-batch2-paced.json")).read_text())
    (paced,) = result["rounds"]
    assert (paced["turns"], paced["answered"], paced["errors"]) == (4, 4, 0)
    turns = paced["per_turn"]  # client by client, in order
    for first, second in (turns[0:2], turns[2:4]):
        assert first["audio_s"] > 0
        assert second["asked_s"] >= first["done_s"] + first["still_playing_s"]


def test_interpreter_lock_times_the_decode_step_beside_each_neighbour(tmp_path):
    import interpreter_lock
    interpreter_lock.main(["--size", "tiny", "--rows", "2", "--steps", "5", "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("*-cpu-interpreter-lock-tiny.json")).read_text())
    cases = report["cases"]
    assert [c["neighbour"] for c in cases] == ["nothing", "a vocoder thread", "an echo-decoder thread",
                                               "a matrix-product thread", "16 threads woken every 5 ms",
                                               "a vocoder process"]
    assert all(c[mode]["step_ms"] > 0 and c[mode]["cpu_ms"] > 0 and c[mode]["waits_per_step"] >= 0
               for c in cases for mode in ("eager", "captured"))


def test_cpu_roofline_holds_the_speech_path_against_the_machines_limits(tmp_path):
    import cpu_roofline
    cpu_roofline.main(["--size", "tiny", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("*-cpu-roofline-tiny.json")).read_text())
    echo, vocoder, machine = report["echo"], report["vocoder"], report["machine"]
    body = model_folder(SIZES["tiny"], seed=0).config.echo.body
    q, kv = body.num_heads * body.head_dim, body.num_kv_heads * body.head_dim
    layer = body.hidden_size * (q + 2 * kv) + q * body.hidden_size + 3 * body.hidden_size * body.intermediate_size
    adapter, unit_head = body.hidden_size * SIZES["tiny"].llm.hidden_size, (1 + SIZES["tiny"].unit_vocab_size) * body.hidden_size
    assert echo["step_bytes"] == 4 * (body.num_layers * layer + adapter + unit_head)  # every matrix a step reads
    assert machine["peak_gflops"] > 0 and machine["read_gbs"] > 0 and echo["linear_gbs"] > 0
    assert 0 < echo["floor_ms_any_kernel"] and 0 < echo["floor_ms_engine_kernel"] and vocoder["gflop_per_unit"] > 0
    assert report["fill_floor_ms"] == pytest.approx(
        echo["prefill_ms"] + (vocoder["lookahead_units"] + 1) * echo["floor_ms_engine_kernel"])
    markdown = next(tmp_path.glob("*-cpu-roofline-tiny.md")).read_text()
    assert "| echo decoder step (ms / unit) |" in markdown and "| vocoder, streamed (ms / unit) |" in markdown


def test_the_readme_table_reads_the_newest_report_among_other_benches_results():
    """bench/results also holds batch, speech-path and roofline results, which have no e2e part."""
    table = report.readme_table()
    assert table.startswith("Measured on") and "| tiny |" in table


def load_bench_conftest():
    """bench/conftest.py under a name of its own (tests/conftest.py is `conftest`)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_conftest", BENCH / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_clock_counts_the_calls_device_time_only(monkeypatch):
    """On a fake device: the hold (sleep) and the L2 flush before each call take device time too,
    but a round's reading is only its calls' event intervals; a hold the GPU got past before the
    round was queued is counted and doubled."""
    bench_conftest = load_bench_conftest()
    device = {"ms": 0.0, "hold_over": False}

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = device["ms"]

        def query(self):
            return device["hold_over"]

        def elapsed_time(self, end):
            return end.at - self.at

    class Flush:
        def zero_(self):
            device["ms"] += 50.0

    def sleep(cycles):
        device["ms"] += 100.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "_sleep", sleep)
    monkeypatch.setattr(bench_conftest, "l2_flush_buffer", Flush)
    clock = bench_conftest.DeviceClock()
    call = clock.wrap(lambda ms: device.__setitem__("ms", device["ms"] + ms))
    start = clock()
    for _ in range(3):
        call(2.0)
    assert clock() - start == pytest.approx(0.006)
    assert (clock.rounds_not_held, clock.hold_cycles) == (0, 1 << 21)
    device["hold_over"] = True
    clock()
    call(1.0)
    assert clock() == pytest.approx(0.001)
    assert (clock.rounds_not_held, clock.hold_cycles) == (1, 1 << 22)


def test_decode_attention_baselines_read_only_the_filled_cache():
    """The torch baselines get the cache cut to its filled length, and answer as over the whole cache."""
    import bench_decode_attention as bench
    args = bench.make_inputs(1, 4, 2, 16, 256, 200)
    cut = bench.filled_part(*args)
    assert cut[1].shape[2] == cut[2].shape[2] == cut[4].shape[1] == 200
    whole = bench.decode_attention_reference(*args)
    torch.testing.assert_close(bench.decode_attention_reference(*cut), whole)
    torch.testing.assert_close(bench.sdpa(*cut), whole, atol=1e-5, rtol=1e-5)


def micro_of(cases: dict[str, dict[str, float]]) -> list[dict]:
    """Microbenchmark rows from {"file[case]": {implementation: median ms}}."""
    return report.micro_rows({"benchmarks": [
        {"name": f"test_{impl}[{name.partition('[')[2]}", "fullname": f"bench/bench_{name.partition('[')[0]}.py::x",
         "stats": {"median": ms / 1000}} for name, impls in cases.items() for impl, ms in impls.items()]})


GPU_ENV = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda"}
EVERY_KERNEL_FASTER = {f"{file}[a]": {"torch_reference": 2.0, **{kernel: 1.0 for kernel in kernels}}
                       for file, kernels in report.EXPECTED_KERNELS.items()}


def test_the_kernel_target_is_met_only_when_every_kernel_case_ran_and_won():
    assert report.evaluate_kernels(micro_of(EVERY_KERNEL_FASTER), 0, GPU_ENV)["status"] == "met"
    failed = report.evaluate_kernels(micro_of(EVERY_KERNEL_FASTER), 1, GPU_ENV)
    assert failed["status"] == "missed (pytest exit code 1)" and failed["measured"] == pytest.approx(2)
    without_cuda_head = EVERY_KERNEL_FASTER | {"head_select[a]": {"torch_reference": 2.0, "triton": 1.0}}
    status = report.evaluate_kernels(micro_of(without_cuda_head), 0, GPU_ENV)["status"]
    assert status == "missed (1 kernel case(s) not timed: head_select[a] cuda)"
    slower = EVERY_KERNEL_FASTER | {"head_select[a]": {"torch_reference": 2.0, "triton": 1.0, "cuda": 3.0}}
    assert report.evaluate_kernels(micro_of(slower), 0, GPU_ENV)["status"] == "missed (6 of 7 kernel cases faster)"
    assert report.evaluate_kernels([], 0, {"device": "CPU", "device_type": "cpu"})["status"].startswith("not measured")


def test_absolute_targets_are_judged_only_on_the_gpu_they_are_set_for(tiny_result):
    e2e = [tiny_result | {"size": "8b", "llm_ms_per_token": 5.0, "llm_hbm_roofline_pct": 70.0}]
    for device, step_status in (("NVIDIA H100 80GB HBM3", "met"), ("NVIDIA H200", "set for an H100 SXM; measured "
                                                                   "on NVIDIA H200: within the limit there")):
        targets = report.evaluate_targets(e2e, [], 0, {"device": device, "device_type": "cuda"})
        by_text = {t["target"]: t for t in targets}
        assert by_text[report.TARGETS[0].text]["status"] == step_status
        assert by_text[report.TARGETS[2].text]["status"] == "missed"  # a share of the GPU's own roofline
        assert all(t["device"] == device for t in targets)
        rendered = report.targets_table(targets)
        assert rendered[0] == "| target | measured | measured on | status |" and device in rendered[2]


def test_gpu_tests_are_collected_without_the_server_tests_clients(tmp_path):
    """The GPU machine's image has neither `openai` nor `websockets` and cannot fetch them: the
    gpu-tests phase of bench/gpu.sh (`pytest -m gpu tests/`) must still collect every gpu test,
    not stop at the server tests' imports."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in ("openai", "websockets"):
        (hidden / f"{name}.py").write_text(f"raise ModuleNotFoundError('hidden', name={name!r})\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          "tests/"], cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    collected = {line.split("::")[0] for line in run.stdout.splitlines() if "::" in line}
    assert {"tests/test_gpu_engine.py", "tests/test_cuda_kernels.py", "tests/test_vocoder_graphs.py"} <= collected
