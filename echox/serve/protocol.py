"""The Realtime protocol's envelope: client events parsed and checked, server events stamped, errors.

Every message is one JSON object with a `type`; the server stamps each of its events with an
`event_id`. A client mistake raises `ProtocolError`, which the connection turns into an `error`
event ({type, code, message, param, event_id of the client event}) and then carries on: bad
input never closes a connection and never reaches the engine.
"""

import json
import uuid

CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "response.create",
    "response.cancel",
)
QUOTE_CHARS = 100  # enough of a value to recognise it by


class ProtocolError(Exception):
    """A client event the server cannot act on; `code` is machine-readable, `message` says why."""

    def __init__(self, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.kind = code, message, param, kind


def quoted(value: object) -> str:
    """A client's value as an error message quotes it: its repr, cut to QUOTE_CHARS. Quoted whole, an
    8 MiB value came back as an 8 MiB error, past the client library's own frame limit."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


def new_id(prefix: str) -> str:
    """Ids in the API's style: a prefix and random hex (`event_...`, `item_...`, `resp_...`)."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def server_event(event_type: str, **fields) -> dict:
    return {"type": event_type, "event_id": new_id("event"), **fields}


def error_event(error: ProtocolError, client_event_id: str | None = None) -> dict:
    return server_event("error", error={"type": error.kind, "code": error.code, "message": error.message,
                                        "param": error.param, "event_id": client_event_id})


def parse_json_object(message: str) -> dict:
    """A text frame -> the JSON object it holds, or ProtocolError."""
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        raise ProtocolError("invalid_json", "the message is not valid JSON") from None
    if not isinstance(event, dict):
        raise ProtocolError("invalid_event", "an event must be a JSON object with a 'type'")
    return event


def check_event_type(event: dict) -> str:
    """The event's type, or ProtocolError unless it is one of CLIENT_EVENTS."""
    event_type = event.get("type")
    if not isinstance(event_type, str):
        raise ProtocolError("invalid_event", "the event has no string 'type'", "type")
    if event_type not in CLIENT_EVENTS:
        raise ProtocolError("unknown_event", f"unknown or unsupported event type {quoted(event_type)}; echox "
                            f"serves {', '.join(CLIENT_EVENTS)}", "type")
    return event_type


def object_field(event: dict, name: str, param: str) -> dict:
    """An optional sub-object (absent means empty); anything but an object is a ProtocolError."""
    value = event.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError("invalid_value", f"{param} must be an object", param)
    return value


def number_field(obj: dict, name: str, param: str, low: float, high: float) -> float | None:
    """An optional number in [low, high]; None when absent."""
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ProtocolError("invalid_value", f"{param} must be a number from {low:g} to {high:g}, got {quoted(value)}",
                            param)
    return float(value)
