"""Batched engine (echox/batch/): concurrent conversations give what each gets alone."""

import contextlib
import subprocess
import sys
import threading
import time

import pytest
import torch

import echox.engine as echox_engine
from echox.batch import text_batcher
from echox.batch.slots import SlotTable
from echox.batch.text_batcher import TextRequest
from echox.batch.worker import BatchWorker, Courier, Request
from echox.cli import demo_question
from echox.cpu_threads import torch_threads, usable_cores
from echox.engine import AudioChunk, TextDelta, TurnDone
from echox.errors import EchoXError
from echox.sampling import GREEDY, SamplingParams, head_select
from echox.segmenter import SegmenterParams
from echox.tokenizer import Turn

SHORT = SegmenterParams(min_len=12, min_len_confident=6)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
# (sampling, answer length, two turns): more conversations than the batched engine has slots.
CONVERSATIONS = [
    (GREEDY, 30, [{"audio": demo_question(2.0)}, {"text": "And then?"}]),
    (GREEDY, 12, [{"text": "Hello there."}, {"audio": demo_question(1.5)}]),
    (SAMPLED, 24, [{"audio": demo_question(1.0), "text": "Briefly."}, {"text": "More."}]),
    (SAMPLED, 5, [{"text": "Yes or no?"}, {"text": "Why?"}]),
]


@pytest.fixture(scope="module")
def solo(tiny_model_dir):
    return echox_engine.load(tiny_model_dir)


@pytest.fixture(scope="module")
def batched(tiny_model_dir):
    return echox_engine.load(tiny_model_dir, max_batch=3)


def session(engine, sampling, max_new_tokens):
    return engine.session(sampling=sampling, segmenter=SHORT, max_new_tokens=max_new_tokens, max_units=30,
                          push_units=4)


def converse(engine, sampling, max_new_tokens, turns) -> list[tuple[dict, torch.Tensor]]:
    """Each turn's trace (timings dropped) and its audio."""
    talk = session(engine, sampling, max_new_tokens)
    results = []
    for turn in turns:
        events = list(talk.respond(**turn))
        trace = events[-1].trace
        del trace["timings_ms"]
        results.append((trace, torch.cat([e.samples for e in events if isinstance(e, AudioChunk)])))
    return results


def together(engine, conversations) -> list:
    """Run the conversations at once, one thread each; re-raise the first failure."""
    results = [None] * len(conversations)

    def run(i):
        try:
            results[i] = converse(engine, *conversations[i])
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            results[i] = error
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def assert_same_turns(got, expected):
    for (trace, audio), (want_trace, want_audio) in zip(got, expected):
        # A batched matmul may sum in another order: the scores agree to float rounding, and every
        # decision taken from them (tokens, segment cuts, units) is the same.
        torch.testing.assert_close(trace.pop("scores"), want_trace["scores"], atol=1e-5, rtol=0)
        assert trace == {k: v for k, v in want_trace.items() if k != "scores"}
        torch.testing.assert_close(audio, want_audio, atol=1e-5, rtol=0)


def test_concurrent_conversations_equal_each_alone(solo, batched):
    alone = [converse(solo, *c) for c in CONVERSATIONS]
    before = batched.text_batcher.rows_stepped, batched.text_batcher.steps
    for got, expected in zip(together(batched, CONVERSATIONS), alone):
        assert_same_turns(got, expected)
    rows, steps = (now - then for now, then in zip((batched.text_batcher.rows_stepped, batched.text_batcher.steps),
                                                    before))
    assert rows > steps  # turns really shared decode steps
    assert batched.vocoder_batcher.calls < batched.vocoder_batcher.pushes  # and vocoder calls


def test_a_batched_turn_that_does_not_speak_leaves_the_speech_batches_alone(solo, batched, monkeypatch):
    """A text-only row gets the tokens it gets alone; the echo decoder's and the vocoder's batches
    never see it."""
    expected, _ = converse(solo, GREEDY, 20, [{"audio": demo_question(1.5)}])[0]
    monkeypatch.setattr(batched, "echo_units", lambda *a, **k: pytest.fail("the echo decoder ran"))
    pushes = batched.vocoder_batcher.pushes
    talk = batched.session(sampling=GREEDY, segmenter=SHORT, max_new_tokens=20, speak=False)
    events = list(talk.respond(audio=demo_question(1.5)))
    assert events[-1].trace["tokens"] == expected["tokens"] and expected["segments"]
    assert not any(isinstance(e, AudioChunk) for e in events)
    assert batched.vocoder_batcher.pushes == pushes


def test_rows_with_the_same_sampling_read_the_head_once(batched, monkeypatch):
    """Sampled rows of one setting select in one call, each with its own counter, and draw what each
    draws alone; the counters all move on by one."""
    batcher = batched.text_batcher
    hidden = torch.randn(5, batcher.lm.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(0))
    settings = [SAMPLED, SAMPLED, GREEDY, SAMPLED, SamplingParams(temperature=0.8, top_p=0.9, seed=4)]

    def requests():
        return [TextRequest(None, [], {}, sampling, 1, torch.tensor([count]))
                for sampling, count in zip(settings, [3, 0, 5, 9, 2])]
    rows_per_call = []
    monkeypatch.setattr(text_batcher, "head_select", lambda h, *a: rows_per_call.append(len(h)) or head_select(h, *a))
    together = requests()
    tokens = batcher.select(hidden, together)
    assert sorted(rows_per_call) == [1, 1, 3]
    alone = [batcher.select(hidden[i:i + 1], [request]) for i, request in enumerate(requests())]
    assert torch.equal(tokens, torch.cat(alone))
    assert [request.counter.item() for request in together] == [4, 1, 6, 10, 3]


def test_cancelling_one_row_leaves_the_others_as_they_were(solo, batched):
    expected = converse(solo, *CONVERSATIONS[0])
    other = {}
    thread = threading.Thread(target=lambda: other.setdefault("result", converse(batched, *CONVERSATIONS[0])))
    thread.start()
    talk = session(batched, GREEDY, 40)
    events = []
    for event in talk.respond(text="Talk for a while."):
        events.append(event)
        if sum(isinstance(e, TextDelta) for e in events) == 3:
            talk.cancel()
    thread.join()
    assert events[-1].trace["cancelled"] and len(events[-1].trace["tokens"]) < 40
    assert_same_turns(other["result"], expected)
    assert [t.role for t in talk.turns] == ["user", "assistant"]  # what was said stays in the history
    assert isinstance(list(talk.respond(text="Again."))[-1], TurnDone)  # its slot serves its next turn


def test_a_turn_abandoned_by_its_caller_frees_its_row(batched):
    turn = session(batched, GREEDY, 40).respond(text="Start.")
    next(turn)
    turn.close()
    waited = [converse(batched, GREEDY, 5, [{"text": "Hi."}]) for _ in range(4)]  # more turns than slots
    assert all(len(w[0][0]["tokens"]) <= 5 for w in waited)


def test_a_batched_turn_given_up_after_its_prefill_leaves_the_next_speech_turn_as_unbatched(solo, batched):
    """Its speech rows stay in the slot's cache: the next turn's speech must be read anew, not matched to them."""
    other = (torch.randn(48000, generator=torch.Generator().manual_seed(3)) * 0.1, 16000)
    talk = session(batched, GREEDY, 12)
    given_up = talk.respond(audio=demo_question(2.0))
    next(given_up)
    given_up.close()
    reused = list(talk.respond(audio=other))[-1].trace
    alone = list(session(solo, GREEDY, 12).respond(audio=other))[-1].trace
    assert reused["tokens"] == alone["tokens"]


def test_a_seeded_batched_session_after_reset_samples_as_a_new_one(batched):
    talk = session(batched, SAMPLED, 8)
    first = list(talk.respond(text="Hi."))[-1].trace["tokens"]
    talk.reset()
    assert list(talk.respond(text="Hi."))[-1].trace["tokens"] == first


def test_a_seeded_batched_turn_given_up_leaves_the_next_turn_as_if_it_never_was(batched):
    talk = session(batched, SAMPLED, 8)
    given_up = talk.respond(text="Tell me a story.")
    for _ in zip(range(3), given_up):
        pass
    given_up.close()
    after = list(talk.respond(text="Hi."))[-1].trace["tokens"]
    assert after == list(session(batched, SAMPLED, 8).respond(text="Hi."))[-1].trace["tokens"]


def test_a_session_made_in_inference_mode_can_be_reset(batched):
    """Its sampling counter is then an inference tensor, which only inference mode may change."""
    with torch.inference_mode():
        talk = session(batched, SAMPLED, 4)
    list(talk.respond(text="Hi."))
    talk.reset()
    assert talk.turns == []


def respond_in_thread(talk, **turn) -> tuple[threading.Thread, list]:
    events = []
    thread = threading.Thread(target=lambda: events.extend(talk.respond(**turn)), daemon=True)
    thread.start()
    return thread, events


@pytest.mark.parametrize("waits_for", ["text_batcher", "echo_batcher"])
def test_cancel_reaches_a_turn_waiting_for_a_slot(batched, monkeypatch, waits_for):
    """A turn queued for a KV slot (or its segment for an echo-decoder slot) ends at once when
    cancelled: it is not prefilled when a slot frees, long after."""
    talk = session(batched, GREEDY, 8)
    batcher = getattr(batched, waits_for)
    monkeypatch.setattr(batcher.table, "take", lambda owner: None)  # every slot is in another turn
    thread, events = respond_in_thread(talk, text="Hello?")
    deadline = time.monotonic() + 30
    while not batcher.queued() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.queued() == 1
    talk.cancel()
    thread.join(10)
    assert not thread.is_alive(), "the cancelled turn still waits for a slot"
    assert events[-1].trace["cancelled"] and not any(isinstance(e, AudioChunk) for e in events)
    assert bool(events[-1].trace["tokens"]) == (waits_for == "echo_batcher")  # queued before any, or after all
    time.sleep(0.05)
    assert batcher.queued() == 0  # dropped from the queue, never admitted


def test_reset_during_a_turn_is_refused_and_the_turn_goes_on(batched):
    talk = session(batched, GREEDY, 6)
    turn = talk.respond(text="One.")
    next(turn)
    with pytest.raises(EchoXError, match="answering a turn"):
        talk.reset()
    assert isinstance(list(turn)[-1], TurnDone) and [t.role for t in talk.turns] == ["user", "assistant"]
    talk.reset()
    assert talk.turns == []
    for event in talk.respond(text="Two."):
        if isinstance(event, TurnDone):  # the turn is history: starting over is allowed from here
            talk.reset()
    assert talk.turns == []


@pytest.mark.parametrize("limit,cancel_at,pause", [(40, 3, 0.0), (40, 3, 0.3), (5, 5, 0.0), (5, 99, 0.0)])
def test_after_a_cancel_a_seeded_session_goes_on_as_unbatched_however_slow_its_reader(
        solo, batched, limit, cancel_at, pause):
    """A cancelled batched row may step on until the batch sees it go; the session's sampling
    counter moves on as an unbatched session's does: after a cancel mid-answer, one after the last
    token of a full answer, and none."""
    def two_turns(engine):
        talk = session(engine, SAMPLED, limit)
        deltas = 0
        for event in talk.respond(text="Talk for a while."):
            deltas += isinstance(event, TextDelta)
            if deltas == cancel_at:
                talk.cancel()
            if isinstance(event, TurnDone):
                time.sleep(pause)  # the caller reads the end late
        return [list(talk.respond(text="Again."))[-1].trace["tokens"], event.trace["tokens"]]
    assert two_turns(batched) == two_turns(solo)


def test_after_an_answer_that_fills_the_kv_cache_a_seeded_session_samples_as_unbatched(tiny_model_dir):
    """An answer stopped by the end of its cache queued no step past it: the session's counter moves by
    the tokens taken, batched as unbatched (it moved 2 further batched, and every later draw differed)."""
    engine = echox_engine.load(tiny_model_dir)
    room = len(engine.tokenizer.prompt([Turn("user", "Hello there.")])) + 2  # the answer fills it after 3 tokens

    def next_answer(talk):
        with pytest.raises(EchoXError, match="KV cache"):
            list(talk.respond(text="Hello there."))
        return list(talk.respond(text="A."))[-1].trace["tokens"]
    options = {"sampling": SAMPLED, "max_new_tokens": 5, "max_units": 2}
    alone = next_answer(engine.session(max_len=room, **options))
    batched = echox_engine.load(tiny_model_dir).batched(2, max_len=room)
    assert next_answer(batched.session(**options)) == alone


CANCEL_THEN_EXIT = """
import sys
import echox.engine as E
from echox.engine import TextDelta
talk = E.load(sys.argv[1], max_batch=3).session(max_new_tokens=40, max_units=30)
deltas = 0
for event in talk.respond(text="Talk for a while."):
    deltas += isinstance(event, TextDelta)
    if deltas == 3:
        talk.cancel()
"""


def test_a_program_that_ends_right_after_a_cancel_exits_cleanly(tiny_model_dir):
    """The batch loops may still be finishing the cancelled rows' steps: they are stopped between two
    steps at exit, not frozen inside a torch op (which aborted the process with exit code 134)."""
    done = subprocess.run([sys.executable, "-c", CANCEL_THEN_EXIT, str(tiny_model_dir)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "terminate" not in done.stderr, done.stderr[-2000:]


TURN_AFTER_THE_LOOPS_STOPPED = """
import atexit, sys
def late_turn():  # registered before echox is imported, so it runs after echox's exit hooks
    try:
        list(talk.respond(text="Hello there."))
    except Exception as error:
        print(type(error).__name__, error)
atexit.register(late_turn)
import echox.engine as E
talk = E.load(sys.argv[1], max_batch=2).session(max_new_tokens=10, max_units=30)
"""


def test_a_turn_after_the_batch_loops_stopped_is_refused_not_left_waiting(tiny_model_dir):
    """At exit the batch loops stop; a turn that comes after that (from an exit handler that runs
    later) gets a clear error at once instead of waiting for ever on a loop that is gone."""
    done = subprocess.run([sys.executable, "-c", TURN_AFTER_THE_LOOPS_STOPPED, str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "EchoXError the engine has stopped: the program is exiting"


def test_limits_of_a_batched_engine_are_clear_errors(tiny_model_dir):
    engine = echox_engine.load(tiny_model_dir)
    with pytest.raises(EchoXError, match="max_batch must be"):
        engine.batched(0)
    with pytest.raises(EchoXError, match="max_len must be a whole number"):
        engine.batched(2, max_len=0)
    earlier = engine.session()
    room = len(engine.tokenizer.prompt([Turn("user", "Hi.")])) + 10  # a slot with room for 10 answer tokens
    engine.batched(2, max_len=room)
    with pytest.raises(EchoXError, match="batched already"):
        engine.batched(4)
    with pytest.raises(EchoXError, match="created before its engine was batched"):
        list(earlier.respond(text="Hi."))
    with pytest.raises(EchoXError, match="cannot ask for max_len=100"):
        engine.session(max_len=100)
    talk = session(engine, GREEDY, 40)
    with pytest.raises(EchoXError, match=f"positions but its KV cache holds {room}"):
        list(talk.respond(text="word " * 60))
    assert talk.turns == []
    with pytest.raises(EchoXError, match=f"reached the KV cache size {room}"):
        list(talk.respond(text="Hi."))
    assert talk.turns == []
    assert len(list(session(engine, GREEDY, 3).respond(text="Hi."))[-1].trace["tokens"]) == 3


def test_slots_keep_a_conversation_evict_the_idlest_and_fill_from_the_front():
    class Conversation:  # slots hold their conversations weakly
        pass
    table = SlotTable(2)
    a, b, c = Conversation(), Conversation(), Conversation()
    assert table.take(a) == (0, False) and table.take(b) == (1, False)
    assert table.take(c) is None  # both in turns: c waits
    table.release(0)
    table.release(1)
    assert table.take(a) == (0, True)  # a's history is still in slot 0
    table.release(0)
    assert table.take(c) == (1, False)  # slot 1 was idle longest: b loses its cache
    assert table.width() == 2
    table.release(1)
    assert table.take(b) == (0, False) and table.width() == 1
    assert table.forget(b) == 0 and table.holder(0) is None
    del c
    assert table.holder(1) is None  # a conversation that is gone holds nothing


def test_batched_sessions_answer_one_turn_at_a_time_each(batched):
    talk = session(batched, GREEDY, 20)
    first = talk.respond(text="One.")
    next(first)
    with pytest.raises(EchoXError, match="answering a turn already"):
        next(talk.respond(text="Two."))
    first.close()


@pytest.mark.gpu
def test_graphed_batched_steps_equal_eager_ones(tiny_model_dir):
    eager = echox_engine.load(tiny_model_dir, device="cuda", dtype="float32", graphs=False, max_batch=4)
    graphed = echox_engine.load(tiny_model_dir, device="cuda", dtype="float32", max_batch=4)
    assert graphed.text_batcher.graphs
    for got, expected in zip(together(graphed, CONVERSATIONS), together(eager, CONVERSATIONS)):
        for (trace, _), (want, _) in zip(got, expected):
            assert trace["tokens"] == want["tokens"]


class StepLedger(BatchWorker):
    """A batch whose rows each last two steps; it writes down every join and step."""

    def __init__(self, joins_per_step):
        super().__init__("echox-test-ledger", torch.device("cpu"))
        self.joins_per_step = joins_per_step
        self.events, self.steps_left = [], {}

    def admit(self, request) -> bool:
        self.events.append("join")
        self.steps_left[request] = 2
        return True

    def active(self) -> bool:
        return bool(self.steps_left)

    def step(self):
        self.events.append("step")
        for request in list(self.steps_left):
            self.steps_left[request] -= 1
            if not self.steps_left[request]:
                del self.steps_left[request]
                request.finish()

    def fail_active(self, error):
        for request in self.steps_left:
            request.finish(error)
        self.steps_left.clear()


@pytest.mark.parametrize("joins_per_step, expected", [
    (1, "join step join step join step step"),  # the LLM's: rows wait for one prefill at a time
    (None, "join join join step step"),
])
def test_joins_between_two_steps_are_limited_while_rows_decode(joins_per_step, expected):
    ledger = StepLedger(joins_per_step)
    requests = [ledger.submit(Request()) for _ in range(3)]  # all waiting before the loop starts
    ledger.start()
    for request in requests:
        list(request.items())
    assert " ".join(ledger.events) == expected
    assert text_batcher.TextBatcher.joins_per_step == 1


def test_a_stopped_loop_ends_what_it_holds_and_what_comes_later_with_an_error():
    class StopsAfterOneStep(StepLedger):
        def step(self):
            super().step()
            self.stop()
    ledger = StopsAfterOneStep(joins_per_step=1)
    requests = [ledger.submit(Request()) for _ in range(3)]  # one joins; two still wait when it stops
    ledger.start()
    ledger.thread.join(timeout=10)
    requests.append(ledger.submit(Request()))
    assert ledger.events == ["join", "step"]
    for request in requests:  # what `items()` raises, read with a time limit
        error = request.results.get(timeout=10)
        assert isinstance(error, EchoXError) and "the engine has stopped" in str(error)


def test_a_batched_prefill_takes_every_core_only_while_no_speech_is_made(batched, monkeypatch):
    prefills_on_every_core = []

    @contextlib.contextmanager
    def every_core():
        prefills_on_every_core.append(True)
        yield
    monkeypatch.setattr(text_batcher, "every_core", every_core)
    speech_busy = [False]
    monkeypatch.setattr(batched.text_batcher, "speech_busy", lambda: speech_busy[0])
    talk = session(batched, GREEDY, 4)
    list(talk.respond(text="Hello there."))
    assert len(prefills_on_every_core) == 1
    speech_busy[0] = True
    list(talk.respond(text="And then?"))
    assert len(prefills_on_every_core) == 1


def test_courier_keeps_each_callers_results_in_order():
    """Handovers of many results and lone results put by the loop itself interleave, while the
    courier may still be putting an earlier handover: every caller still reads its own in order."""
    courier = Courier("test-courier")
    callers = [Request() for _ in range(3)]
    for request in callers:
        request.courier = courier
    sent = {id(request): [] for request in callers}
    for step in range(300):
        # Some steps give every caller a result, some only one (the loop may put that itself).
        for request in callers if step % 3 else callers[step % 2:step % 2 + 1]:
            request.put(step)
            sent[id(request)].append(step)
        courier.dispatch()
    for request in callers:
        request.finish()
        courier.dispatch()
        assert list(request.items()) == sent[id(request)]


@pytest.mark.skipif(usable_cores() < 2, reason="one core: no thread counts to choose from")
def test_batch_loops_run_on_their_engines_thread_count_whatever_torch_hands_new_threads(tiny_model_dir, monkeypatch):
    engine = echox_engine.load(tiny_model_dir, max_batch=2)  # loops not yet run: no count handed out
    counts = set()
    for batcher in (engine.echo_batcher, engine.vocoder_batcher):
        def counted(step=batcher.step):
            counts.add(torch.get_num_threads())
            return step()
        monkeypatch.setattr(batcher, "step", counted)
    with torch_threads(usable_cores()):  # torch's count for threads that have not run an op yet
        units = list(engine.echo_units(torch.randn(6, engine.echo.cfg.llm_hidden_size), 30))
        engine.voice().flush(torch.tensor(engine.echo.units_of(units) or [1, 2, 3]))
    assert engine.threads == 1 and counts == {1}
