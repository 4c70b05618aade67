"""`echox serve` replicas behind Ray Serve: a local Ray on 127.0.0.1 (started and stopped here) with
2 replicas of the tiny model, driven through Ray's proxy by the official `openai` SDK and by plain
`websockets` clients (the SDK's own WebSocket library, whose handshake response shows the
x-echox-replica header); `echox serve-ray` itself, in a child process with a Ray of its own, as
Ctrl-C stops it; and its refusals, which need no Ray."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from echox.cli import main
from echox.serve.launch import ServerProcess
from echox.ctrl_c import REPEAT_S
from echox.serve.stopping import descendants

# The clients come with the test extras; where they are missing (the GPU machine's image, which cannot
# fetch them) these tests skip and the rest of the suite still runs.
AsyncOpenAI = pytest.importorskip("openai").AsyncOpenAI
connect = pytest.importorskip("websockets.asyncio.client").connect
ConnectionClosed = pytest.importorskip("websockets.exceptions").ConnectionClosed

REPLICAS, MAX_TOKENS, MAX_CONNECTIONS = 2, 24, 2  # MAX_CONNECTIONS per replica's `echox serve`
TEST_TIMEOUT_S = 120  # a hung relay fails the test instead of stalling the suite
REPLICA_HEADER = "x-echox-replica"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def replica_children(model_dir) -> list[int]:
    """The pids of the live `echox serve` processes started by this test's replicas (told apart by
    the model path; a zombie has no command line)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # the process ended while we looked
            continue
        if "echox.cli serve" in text and f"--host 127.0.0.1 --model {Path(model_dir).resolve()}" in text:
            found.append(int(cmdline.parent.name))
    return found


@pytest.fixture(scope="module")
def address(tiny_model_dir):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from echox.serve.ray_deployment import build_app
    port = free_port()
    ray.init(address="local", num_cpus=REPLICAS, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(REPLICAS, tiny_model_dir, threads=1, extra_args=[
            "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS), "--max-units", "60",
            "--max-connections", str(MAX_CONNECTIONS)]), name="echox", route_prefix="/")
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
    assert replica_children(tiny_model_dir) == []  # each replica stopped its `echox serve`


class ServeRayProcess(ServerProcess):
    """`echox serve-ray` with 1 replica of the demo model, on a local Ray of its own."""
    def command(self) -> list[str]:
        return [sys.executable, "-m", "echox.cli", "serve-ray", "--replicas", "1", "--demo", *self.args]


def still_running(pids: set[int], seconds: float) -> set[int]:
    """Those of `pids` that run on (not ended, nor a zombie left to be reaped) after up to `seconds`
    (a killed process takes a moment to give back its memory)."""
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
        except OSError:  # gone
            return False
    deadline = time.monotonic() + seconds
    while (left := {pid for pid in pids if running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# Before the tests that start this module's Ray: two local Rays at once would share the 2 CPUs of CI.
def test_a_second_ctrl_c_stops_serve_ray_at_once_with_every_process_it_started():
    """Ctrl-C stops serve-ray in seconds (Serve's replicas stop their `echox serve`, then Ray); a second
    one during that ends it at once, in one line and status 130, killing every process it started:
    Ray's own, the replica and its `echox serve`. A second Ctrl-C did nothing."""
    pytest.importorskip("ray.serve")
    with ServeRayProcess(["--port", free_port()]) as serve_ray:
        started = descendants(serve_ray.process.pid)
        serve_ray.process.send_signal(signal.SIGINT)
        assert serve_ray.printed("stopping", 10), serve_ray.tail(20)  # the first is handled (before the fix: unsaid)
        time.sleep(REPEAT_S)  # sooner, it would count as the same Ctrl-C
        serve_ray.process.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        try:
            status = serve_ray.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            status = None
        stopped_after = time.monotonic() - signalled
        serve_ray.printed("stopped at once", 2)  # its last lines, read by another thread
        output = serve_ray.tail(20)
    assert status == 128 + signal.SIGINT and stopped_after < 3, (status, stopped_after, output)
    assert ("echox serve-ray: stopped at once by a second SIGINT, with the local Ray instance and its replicas"
            in output and "Traceback" not in output), output
    left = still_running(started, 5)
    assert len(started) > 5 and not left, [Path(f"/proc/{pid}/stat").read_text() for pid in left]


def run(conversation):
    return asyncio.run(asyncio.wait_for(conversation, TEST_TIMEOUT_S))


def user_text(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def sdk_text_turn(connection, text: str) -> list:
    await connection.conversation.item.create(item=user_text(text))
    await connection.response.create()
    events = []
    async for event in connection:
        events.append(event)
        if event.type == "error":
            raise AssertionError(f"unexpected error event: {event.error}")
        if event.type == "response.done":
            return events
    raise AssertionError("connection closed before response.done")


def test_two_conversations_at_once_keep_their_history(address):
    async def conversation(words: str):
        client = AsyncOpenAI(api_key="unused-by-echox", websocket_base_url=f"ws://{address}/v1")
        async with client.realtime.connect(model="echox") as connection:
            return [await sdk_text_turn(connection, f"{words}, turn {turn}") for turn in (1, 2)]

    async def both():
        return await asyncio.gather(conversation("Hello"), conversation("Good evening"))

    for first, second in run(both()):
        for events in (first, second):
            done = events[-1].response
            assert done.status in ("completed", "incomplete") and done.usage.output_tokens <= MAX_TOKENS
            assert any(e.type == "response.output_audio.delta" and e.delta for e in events)
        # The second turn's prompt holds the whole first turn: the replica kept the session (KV cache).
        assert second[-1].response.usage.input_tokens > first[-1].response.usage.total_tokens


async def open_raw(address: str):
    """A WebSocket through Ray's proxy, the replica that took it, and its first event."""
    ws = await connect(f"ws://{address}/v1/realtime")
    return ws, ws.response.headers[REPLICA_HEADER], json.loads(await ws.recv())


async def raw_until(ws, event_type: str) -> dict:
    while (event := json.loads(await ws.recv()))["type"] != event_type:
        assert event["type"] != "error", event
    return event


async def short_turn(ws) -> dict:
    await ws.send(json.dumps({"type": "conversation.item.create", "item": user_text("Hi")}))
    await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
    return await raw_until(ws, "response.done")


def test_close_mid_answer_then_every_replica_serves_and_refuses_beyond_its_limit(address):
    """A client leaving mid-answer harms nothing; then one connection more than all replicas hold:
    the accepted ones cover both replicas and are answered, the extra one hears the child's own
    refusal (an error event, close code 1013) through the relay."""
    async def crowd():
        leaving, _, _ = await open_raw(address)
        await leaving.send(json.dumps({"type": "conversation.item.create", "item": user_text("Tell me more")}))
        await leaving.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 400}}))
        await raw_until(leaving, "response.output_audio.delta")
        await leaving.close()

        opened = [await open_raw(address) for _ in range(REPLICAS * MAX_CONNECTIONS + 1)]
        accepted = [(ws, replica) for ws, replica, first in opened if first["type"] == "session.created"]
        refused = [(ws, first) for ws, _, first in opened if first["type"] != "session.created"]
        answers = await asyncio.gather(*(short_turn(ws) for ws, _ in accepted))
        for ws, _ in refused:
            await ws.wait_closed()
        result = ({replica for _, replica in accepted}, answers,
                  [(first["error"]["code"], ws.close_code) for ws, first in refused])
        for ws, _, _ in opened:
            await ws.close()
        return result

    replicas, answers, refusals = run(crowd())
    assert len(replicas) == REPLICAS  # Ray spread the held connections over both replicas
    assert all(done["response"]["status"] in ("completed", "incomplete") for done in answers)
    assert refusals and all(refusal == ("too_many_connections", 1013) for refusal in refusals)


def test_page_and_static_files_through_the_proxy(address):
    with urllib.request.urlopen(f"http://{address}/") as page:
        assert page.headers.get_content_type() == "text/html" and page.headers[REPLICA_HEADER]
        assert "/v1/realtime" in page.read().decode()
    with urllib.request.urlopen(f"http://{address}/static/microphone-worklet.js") as script:
        assert "registerProcessor" in script.read().decode()


def test_start_serve_on_a_running_serve_says_where_its_proxy_listens(address):
    """Ray Serve runs (this module's, on its own port): serve-ray's start keeps it, and says where it is."""
    from ray import serve

    from echox.serve.ray_cli import start_serve
    host, port = address.split(":")
    assert start_serve(serve, "127.0.0.1", free_port(), on_existing_cluster=False) == (host, int(port))


# The last test on this module's Ray: it kills one replica's `echox serve`.
def test_a_replica_whose_echox_serve_died_says_try_again_until_ray_replaces_it(address, tiny_model_dir):
    """A WebSocket that Ray's proxy gives to a replica whose `echox serve` died is accepted and closed
    with 1013 (try again later) and why, not refused with HTTP 403; within seconds Ray replaces the
    replica (three failed health checks) and every connection is answered again."""
    from ray import serve
    dead = replica_children(tiny_model_dir)[0]
    os.kill(dead, signal.SIGKILL)

    async def until_refused() -> tuple[int, str]:
        """Connections, each kept open while it is served so that Ray sends the next one to the replica
        with fewer, until one is closed before it gets its first event."""
        held = []
        try:
            for _ in range(REPLICAS * MAX_CONNECTIONS):
                held.append(await connect(f"ws://{address}/v1/realtime"))
                try:
                    assert json.loads(await held[-1].recv())["type"] == "session.created"
                except ConnectionClosed:
                    return held[-1].close_code, held[-1].close_reason
            raise AssertionError("no connection reached the replica whose echox serve died")
        finally:
            for ws in held:
                await ws.close()

    assert run(until_refused()) == (1013, "this replica's echox serve is not answering; try again")

    def replaced() -> bool:
        children = replica_children(tiny_model_dir)
        states = serve.status().applications["echox"].deployments["EchoXReplica"].replica_states
        return len(children) == REPLICAS and dead not in children and states == {"RUNNING": REPLICAS}

    async def replicas_answering() -> set[str]:
        """The replicas that answer connections held at once (Ray sends each to the one with fewer)."""
        opened = [await open_raw(address) for _ in range(REPLICAS)]
        answers = await asyncio.gather(*(short_turn(ws) for ws, _, _ in opened))
        for ws, _, _ in opened:
            await ws.close()
        assert all(done["response"]["status"] in ("completed", "incomplete") for done in answers)
        return {replica for _, replica, _ in opened}

    wait_until(replaced, 60, "Ray replaces the replica")
    # Ray's proxy learns of the new replica a moment after it runs.
    wait_until(lambda: len(run(replicas_answering())) == REPLICAS, 10, "both replicas answer")


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds:g} s: {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0", "--demo"], "replicas must be a whole number >= 1"),
    (["--replicas", "1", "--demo", "--port", "70000"], "a port is a whole number 0..65535"),
    (["--replicas", "1", "--demo", "--port", "0"], "needs a fixed port"),  # Ray reported port 0 as its own
    (["--replicas", "1", "--demo", "--device", "cuda"], "--demo serves the tiny random model on the CPU"),
    (["--replicas", "1", "--demo", "--", "--idle-timeout", "nan"], "must be a finite number > 0"),
    (["--replicas", "1", "--demo", "--", "--temperature", "nan"], "temperature must be 0 (greedy) or a finite"),
    (["--replicas", "1", "--demo", "--", "--top-p", "2"], "top-p must be in (0, 1]"),  # refused once Ray ran
    (["--replicas", "1", "--model", "/no/such/folder"], "model folder not found"),
    (["--replicas", "1", "--demo", "--", "--port", "9000"], "give it to serve-ray itself"),
    (["--replicas", "1", "--demo", "--", "--frobnicate"], "not `echox serve` options"),
    (["--replicas", "64", "--model", "MODEL", "--device", "cuda"], "needs 64 GPUs (one each)"),
    (["--replicas", "4096", "--demo"], "needs 4096 CPUs (each replica reserves its threads)"),  # Ray waited forever
    (["--replicas", "1", "--demo", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: nothing answers there"),
    (["--replicas", "1", "--demo", "--port", "BUSY"], "cannot listen on 127.0.0.1"),
    (["--replicas", "1", "--demo", "--start-timeout", "0"], "start-timeout must be a finite number > 0"),
])
def test_serve_ray_refuses_bad_options_before_starting_ray(argv, message, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        given = {"MODEL": str(tmp_path), "BUSY": str(busy.getsockname()[1])}
        try:
            code = main(["serve-ray", *[given.get(arg, arg) for arg in argv]])
        except SystemExit as stop:  # a bad value is refused by argparse, which exits
            code = stop.code
    assert code == 2
    assert message in capsys.readouterr().err


class FakeServe:
    """Ray Serve as serve-ray uses it, on a cluster where Serve runs already at `running` (or not)."""
    def __init__(self, running: tuple[str, int] | None):
        self.proxy = running
        self.context = SimpleNamespace(_get_global_client=lambda: SimpleNamespace(
            http_config=SimpleNamespace(host=self.proxy[0], port=self.proxy[1])))

    def start(self, http_options: dict):
        self.proxy = self.proxy or (http_options["host"], http_options["port"])  # a running one keeps its own

    def status(self):
        return SimpleNamespace(applications={})

    def run(self, *args, **kwargs):
        pass
    delete = shutdown = run


@pytest.mark.parametrize("running, where, note", [
    (None, "127.0.0.1:8123", False),  # Serve did not run: it starts where asked
    (("127.0.0.1", 8123), "127.0.0.1:8123", False),  # it ran where asked
    (("0.0.0.0", 8000), "0.0.0.0:8000", True),  # it ran elsewhere, and stays there
], ids=["no-serve", "same-proxy", "other-proxy"])
def test_serve_ray_on_a_cluster_names_the_proxy_where_serve_runs(running, where, note, monkeypatch, capsys):
    """With --address, the listening line names the proxy of the cluster's Ray Serve, and the note that
    it kept its own host and port comes only when it did. The note came on every --address run, and
    the line named --host and --port even where no proxy listened."""
    from echox.serve import ray_cli
    monkeypatch.setattr(ray_cli, "import_ray_serve", lambda: (SimpleNamespace(init=lambda **_: None,
                                                                               shutdown=lambda: None),
                                                              FakeServe(running)))
    monkeypatch.setitem(sys.modules, "echox.serve.ray_deployment", SimpleNamespace(build_app=lambda *_: None))
    monkeypatch.setattr(ray_cli, "on_stop_signals", lambda *_: None)  # not in the test's own process
    monkeypatch.setattr(ray_cli, "wait_for_stop_signal", lambda: None)
    assert main(["serve-ray", "--replicas", "1", "--demo", "--address", "auto", "--port", "8123"]) == 0
    said = [f"echox serve-ray: listening on http://{where}/ (page) and ws://{where}/v1/realtime, 1 replica(s)"]
    if note:
        said.append("echox serve-ray: Ray Serve ran on this cluster already, and its proxy keeps the host and port "
                    "it started with, not --host 127.0.0.1 --port 8123")
    assert capsys.readouterr().out.splitlines() == said


def test_serve_ray_without_ray_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # how Python marks a package as not importable
    assert main(["serve-ray", "--replicas", "1", "--demo"]) == 2
    assert "pip install 'echox[ray]'" in capsys.readouterr().err


def test_serve_ray_waits_for_ctrl_c_where_signal_has_no_pause(monkeypatch):
    """Windows has no signal.pause: serve-ray still waits until Ctrl-C, and then returns."""
    import threading

    from echox.serve import ray_cli
    monkeypatch.delattr(signal, "pause")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    ctrl_c = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    try:
        ctrl_c.start()
        started = time.monotonic()
        ray_cli.wait_for_stop_signal()
        assert 0.25 < time.monotonic() - started < 30
    finally:
        ctrl_c.cancel()  # if the wait failed at once, no Ctrl-C is left to hit the next test
        signal.signal(signal.SIGINT, previous)
