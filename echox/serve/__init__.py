"""`echox serve`: EchoX behind a WebSocket that speaks a subset of the OpenAI Realtime API.

How a spoken turn travels through the server, one file per step:
  server.py      aiohttp app: the page at `/`, WebSockets at `/v1/realtime`, the limits
  connection.py  one WebSocket: client events in, server events out, its own `Session`
  protocol.py    event parsing, ids, `error` events        session_config.py  session.update
  audio_edge.py  base64 pcm16 at 24 kHz <-> the engine's float samples at 16 kHz
  vad.py         energy-based voice activity detection (server_vad turn detection)
  scheduler.py   the fair queue and admission control: up to --max-batch turns at once, in worker threads
  response.py    one answer: `Session.respond` events -> realtime server events
  cli.py         the `echox serve` subcommand;  launch.py  a server in a child process (tests, bench)
  ray_deployment.py, ray_cli.py   `echox serve-ray`: `echox serve` replicas behind Ray Serve's proxy
  static/        the browser client (one page and its microphone worklet)
"""
