"""The aiohttp application: the browser page at `/`, the Realtime WebSocket at `/v1/realtime`.

One engine serves every connection through one `TurnScheduler`, which runs as many turns at
once as the engine batches (`--max-batch`, 1 without batching). The limits below end a
connection with an `error` event first and then a clean WebSocket close, never a reset (only a
client that reads nothing is cut off, connection.py: it would not read the error either):
  max_connections    more simultaneous WebSockets are told so and closed (code 1013, try again later);
  max_buffer_bytes   the input audio buffer of one connection (an oversize append is refused with
                     an error event and dropped; the connection stays);
  idle_timeout_s     a connection with no client event and no answer in progress for this long is
                     closed (code 1000);
  max_message_bytes  larger WebSocket messages are refused by aiohttp (close code 1009); derived from
                     the limits on what a client may send, not set on its own.
"""

import asyncio
import logging
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from aiohttp import WSCloseCode, hdrs, web

from ..engine import Engine
from ..errors import EchoXError
from .connection import MAX_PENDING_TEXT, Connection
from .protocol import ProtocolError, error_event
from .scheduler import TurnScheduler
from .session_config import SessionConfig
from .stopping import on_stop_signals

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("echox.serve")
SCHEDULER_TASK = web.AppKey("scheduler_task", asyncio.Task)
# At SIGINT/SIGTERM the turns are stopped and every WebSocket is closed (1001, going away); this
# long is waited for the turns to end (one LLM step or vocoder push each), and for the handlers.
SHUTDOWN_WAIT_S = 10.0
# The WebSocket subprotocol of OpenAI's browser clients, which refuse a handshake that names none.
SUBPROTOCOL = "realtime"
ESCAPED_CHAR_BYTES = 12  # the most JSON bytes one character of text takes
ENVELOPE_BYTES = 64 * 1024  # room for an event's other fields (type, event_id, unused ones such as instructions)


@dataclass(frozen=True)
class Limits:
    max_connections: int = 8
    max_buffer_bytes: int = 30 * 24000 * 2  # 30 s of 24 kHz pcm16: all Whisper hears of one turn
    idle_timeout_s: float = 300.0

    @property
    def max_message_bytes(self) -> int:
        """The largest legitimate client event and some room: an append that fills the input buffer
        (base64, 4 bytes per 3), or a user item of MAX_PENDING_TEXT characters, each escaped at worst
        (an astral character is \\ud83d\\ude00 in ASCII JSON). Every text frame is parsed on the event
        loop, which holds up all connections meanwhile: at 16 MiB, a flood of big frames stalled every
        other client's audio for seconds (0.43 s a frame). 1.9 MiB by default."""
        largest_append = 4 * -(-self.max_buffer_bytes // 3)
        return max(largest_append, MAX_PENDING_TEXT * ESCAPED_CHAR_BYTES) + ENVELOPE_BYTES


class Server:
    def __init__(self, engine: Engine, defaults: SessionConfig, limits: Limits, session_options: dict):
        """`defaults` is each connection's starting session; `session_options` go to `engine.session`."""
        self.engine, self.defaults, self.limits, self.session_options = engine, defaults, limits, session_options
        self.open: set[Connection] = set()
        self.scheduler: TurnScheduler | None = None

    def new_session(self):
        return self.engine.session(**self.session_options)

    async def start(self, app: web.Application):
        self.scheduler = TurnScheduler(self.engine.max_batch)
        app[SCHEDULER_TASK] = asyncio.create_task(self.scheduler.serve())

    async def shutdown(self, app: web.Application):
        """Before aiohttp waits for the handlers: end every turn (each client gets its response.done,
        cancelled) and then close every WebSocket, so the server stops in seconds and no turn thread
        is inside a torch op when the interpreter ends."""
        self.scheduler.close()
        await self.scheduler.drained(SHUTDOWN_WAIT_S)
        for connection in list(self.open):
            connection.close(WSCloseCode.GOING_AWAY, "the server is shutting down")

    async def stop(self, app: web.Application):
        app[SCHEDULER_TASK].cancel()
        self.scheduler.close()

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def realtime(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.limits.max_message_bytes, heartbeat=30.0, protocols=(SUBPROTOCOL,))
        request = without_foreign_subprotocols(request)
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text=not_a_handshake(request))
        try:
            await ws.prepare(request)
        except ConnectionError:  # the client left before the 101 reply (a tab closed mid-connect, a probe)
            return client_gone()
        if len(self.open) >= self.limits.max_connections:
            with suppress(ConnectionError):  # gone by now: the close below finds that out quietly
                await ws.send_json(error_event(ProtocolError(
                    "too_many_connections", f"the server holds its limit of {self.limits.max_connections} "
                    "connections; try again later", kind="server_busy")))
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too many connections")
            return ws
        connection = Connection(ws, self.defaults, self.scheduler, self.new_session, self.limits.max_buffer_bytes,
                                self.limits.idle_timeout_s, request.transport)
        self.open.add(connection)
        try:
            await connection.serve()
        finally:
            self.open.discard(connection)
        return ws


def without_foreign_subprotocols(request: web.Request) -> web.Request:
    """The request as the handshake should see it: where the client offers subprotocols but not ours,
    without them. aiohttp logs such a client's list at warning level, and OpenAI's browser clients
    carry their API key in one (`openai-insecure-api-key.<key>`): the log would hold it. (Beside
    `realtime` that entry is merely not chosen, and goes unlogged.)"""
    offered = request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL)
    if offered is None or SUBPROTOCOL in (entry.strip() for entry in offered.split(",")):
        return request
    headers = request.headers.copy()
    del headers[hdrs.SEC_WEBSOCKET_PROTOCOL]
    return request.clone(headers=headers)


def not_a_handshake(request: web.Request) -> str:
    """Why /v1/realtime refused the request: a plain HTTP client's, or a WebSocket client's handshake
    that aiohttp found malformed (its key or version)."""
    if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        return "/v1/realtime is a WebSocket endpoint (the OpenAI Realtime protocol); connect with a WebSocket client\n"
    return ("/v1/realtime: malformed WebSocket handshake (it needs Connection: Upgrade, Sec-WebSocket-Version: 13 "
            "and a Sec-WebSocket-Key of 16 base64-encoded bytes)\n")


def client_gone() -> web.Response:
    """What a handler returns for a client that left before its reply: aiohttp's attempt to send it
    fails as a premature disconnection, which it takes quietly (an exception out of the handler
    would be logged with its traceback, once per such client: a cheap way to flood the log). 499
    is the access log's usual status for a request the client closed."""
    return web.Response(status=499, reason="Client Closed Request")


def build_app(server: Server) -> web.Application:
    app = web.Application()
    app.router.add_get("/", server.page)
    app.router.add_get("/v1/realtime", server.realtime)
    app.router.add_static("/static/", STATIC)
    app.on_startup.append(server.start)
    app.on_shutdown.append(server.shutdown)
    app.on_cleanup.append(server.stop)
    return app


async def serve_forever(server: Server, host: str, port: int):
    """Listen until SIGINT/SIGTERM (a second one during the shutdown ends the process at once);
    port 0 picks a free port. The first stdout line says where."""
    runner = web.AppRunner(build_app(server), shutdown_timeout=SHUTDOWN_WAIT_S)
    await runner.setup()
    # Before the listening line, which a launcher may answer with a signal at once. A signal after
    # the loop has closed (the exit hook may wait for a turn) finds nothing left to stop gracefully.
    stopped, loop = asyncio.Event(), asyncio.get_running_loop()
    on_stop_signals(lambda: loop.is_closed() or loop.call_soon_threadsafe(stopped.set), "echox serve",
                    "; answers in progress were cut off")
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise EchoXError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    port = runner.addresses[0][1]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address goes in brackets
    print(f"echox serve: listening on http://{where}/ (page) and ws://{where}/v1/realtime", flush=True)
    try:
        await stopped.wait()
    finally:
        await runner.cleanup()
