"""Checks on network addresses made before anything slow starts (a model load, a Ray cluster)."""

import socket

from ..errors import EchoXError


def check_listenable(host: str, port: int):
    """Refuse a host and port that cannot be listened on now, before minutes of model loading (the
    server binds them again once the model is in). Bound as aiohttp binds, with SO_REUSEADDR, so a
    port whose last connections linger in TIME_WAIT counts as free, one being listened on does not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        raise EchoXError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def check_reachable(address: str, what: str, seconds: float = 5.0):
    """Refuse a host:port that does not accept a TCP connection within `seconds`."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except (OSError, ValueError) as e:
        raise EchoXError(f"{what} {address}: nothing answers there ({e})") from None
