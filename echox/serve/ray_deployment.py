"""`echox serve` replicas behind Ray Serve's HTTP/WebSocket proxy: one replica per GPU.

Each replica of `EchoXReplica` starts one `echox serve` in a child process on a free loopback
port (`launch.ServerProcess`, the same process a user starts by hand) and relays to it: every
plain GET (the browser page, /static/..., the 400 for plain HTTP on /v1/realtime) and every
WebSocket at /v1/realtime, frames in order both ways, close codes passed on. The relay adds
nothing to the Realtime events; the replica that answered is named in the response header
`x-echox-replica` (on the WebSocket handshake too), so a client or a test can see it.

Session pinning: Ray's proxy picks a replica once, when a WebSocket opens, and every frame of
that connection then flows through that replica until it closes. A connection is one
conversation (one `Session` in the child), so its history and KV cache stay in the one child
that holds them; no state ever moves between replicas. Ray balances new connections by the
replicas' open requests (an open WebSocket counts as one for its whole life).

One replica per GPU: with device cuda each replica asks Ray for `num_gpus=1`; Ray then sets
CUDA_VISIBLE_DEVICES for the replica, which its child inherits, so every child sees one GPU.
On the CPU a replica reserves as many Ray CPUs as its child's torch threads (`--threads`).
"""

import asyncio
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from fastapi import FastAPI, Request, Response, WebSocket
from ray import serve

from .launch import ServerProcess

REPLICA_HEADER = "x-echox-replica"
# An open WebSocket is one ongoing request to Ray. The child's own --max-connections is the real
# limit (it answers an `error` event and close 1013); Ray must not queue WebSockets ahead of it.
MAX_ONGOING_REQUESTS = 256
# A replica whose child died is replaced after three failed checks; Ray's default period is 10 s.
HEALTH_CHECK_PERIOD_S = 2.0
# Close codes that describe a closing but may not be sent in a close frame (RFC 6455, 7.4.1).
UNSENDABLE_CLOSE_CODES = {1005, 1006, 1015}


# The relay's functions come before the deployment class: `serve.ingress` pickles the app, routes
# and the globals they use, as they are when the class is decorated.
async def relay_both_ways(client: WebSocket, child: aiohttp.ClientWebSocketResponse):
    """Until either side closes; then the other side is closed with the same code. The direction
    still running is stopped first, so nothing is sent to a side that has already gone."""
    to_child = asyncio.create_task(client_to_child(client, child))
    to_client = asyncio.create_task(child_to_client(child, client))
    try:
        await asyncio.wait([to_child, to_client], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_child, to_client):
            task.cancel()
        client_code, _ = await asyncio.gather(to_child, to_client, return_exceptions=True)
        # The client's own close code when it left first (else an exception); a no-op when the child closed first.
        await child.close(code=client_code if isinstance(client_code, int) else 1000)


async def client_to_child(client: WebSocket, child: aiohttp.ClientWebSocketResponse) -> int:
    """The client's frames to the child, until the client leaves; returns its close code."""
    while True:
        message = await client.receive()
        if message["type"] == "websocket.disconnect":
            code = message.get("code", 1000)
            return 1000 if code in UNSENDABLE_CLOSE_CODES else code
        if message.get("text") is not None:
            await child.send_str(message["text"])
        else:
            await child.send_bytes(message["bytes"])


async def child_to_client(child: aiohttp.ClientWebSocketResponse, client: WebSocket):
    while True:
        message = await child.receive()
        if message.type == aiohttp.WSMsgType.TEXT:
            await client.send_text(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await client.send_bytes(message.data)
        else:  # CLOSE (code and reason from the child), CLOSED or ERROR (the child went away)
            code = child.close_code or 1011
            reason = message.extra if message.type == aiohttp.WSMsgType.CLOSE and message.extra else ""
            await client.close(code=1011 if code in UNSENDABLE_CLOSE_CODES else code, reason=reason)
            return


app = FastAPI(title="echox serve on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(app)
class EchoXReplica:
    def __init__(self, serve_args: list[str], start_timeout_s: float):
        """Start this replica's `echox serve` with `serve_args` (a port of its own on 127.0.0.1), and
        wait up to `start_timeout_s` for it to load its model and listen."""
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.child = ServerProcess(["--host", "127.0.0.1", *serve_args], start_timeout_s).__enter__()

    def __del__(self):
        """Ray calls this when the replica stops: the child (and its engine) stop with it."""
        if hasattr(self, "child"):
            self.child.__exit__(None, None, None)

    def check_health(self):
        """Ray's periodic health check: a replica whose child died is replaced by a fresh one."""
        code = self.child.process.poll()
        if code is not None:
            raise RuntimeError(f"echox serve exited with status {code}:\n" + self.child.tail(20))

    @app.websocket("/v1/realtime")
    async def realtime(self, client: WebSocket):
        """One conversation: relayed to this replica's child for the whole life of the connection."""
        query = f"?{client.url.query}" if client.url.query else ""
        async with aiohttp.ClientSession() as http:
            try:
                child = await http.ws_connect(self.child.ws_url + query, max_msg_size=0)
            except aiohttp.ClientError:  # its child died: Ray replaces the replica at its next health check
                await client.accept()  # a close before the accept reaches the client as HTTP 403
                await client.close(code=1013, reason="this replica's echox serve is not answering; try again")
                return
            await client.accept(headers=[(REPLICA_HEADER.encode(), self.replica_id.encode())])
            await relay_both_ways(client, child)

    @app.get("/{path:path}")
    async def get(self, path: str, request: Request) -> Response:
        """Plain GETs (the page, its static files) are the child's own answers, passed on."""
        url = f"{self.child.http_url}/{path}" + (f"?{request.url.query}" if request.url.query else "")
        async with aiohttp.ClientSession() as http, http.get(url) as answer:
            return Response(await answer.read(), status_code=answer.status, headers={REPLICA_HEADER: self.replica_id},
                            media_type=answer.headers.get("content-type"))


def build_app(replicas: int, model: str | None, demo: bool = False, device: str = "cpu", threads: int = 1,
              extra_args: Sequence[str] = (), start_timeout_s: float = 600.0) -> serve.Application:
    """The Serve application: `replicas` copies of `echox serve --model MODEL|--demo --device --threads
    EXTRA_ARGS`. The model path is made absolute: a replica's working folder is Ray's, not ours."""
    serve_args = ["--demo"] if demo else ["--model", str(Path(model).resolve())]
    serve_args += ["--device", device, "--threads", str(threads), *extra_args]
    resources = {"num_cpus": threads}
    if device == "cuda":
        resources["num_gpus"] = 1
    return EchoXReplica.options(num_replicas=replicas, ray_actor_options=resources,
                                max_ongoing_requests=MAX_ONGOING_REQUESTS,
                                health_check_period_s=HEALTH_CHECK_PERIOD_S).bind(serve_args, start_timeout_s)
