"""What a connection's `session.update` can set, checked, and how the session is reported back.

Supported (GA field names): `audio.input.format` / `audio.output.format` (only pcm16 at 24 kHz,
`{"type": "audio/pcm", "rate": 24000}`), `audio.input.turn_detection` (null or `server_vad` with
threshold, prefix_padding_ms, silence_duration_ms, create_response, interrupt_response),
`output_modalities` (["audio"]: spoken answers with their transcript, the default; ["text"]: text
only, which costs no echo decoder or vocoder work; the beta API's `modalities` is read the same
way), `max_output_tokens`, and two echox extensions for sampling, `temperature` and `top_p` (the GA
session has no sampling fields; EchoX's released sampling is temperature 0.2, top-p 0.9).
The beta API's `input_audio_format` / `output_audio_format` are checked too (only "pcm16"), so a
client never sends g711 that would be read as pcm16; so is `type` (only "realtime").
`instructions`, `voice`, `tools` and the other fields are accepted and ignored: the released EchoX
prompt has no system message and the vocoder has one voice. The reported session says so.
"""

from dataclasses import asdict, dataclass, field, replace

from ..sampling import MIN_TEMPERATURE, SamplingParams
from .protocol import ProtocolError, number_field, object_field, quoted

PCM_FORMAT = {"type": "audio/pcm", "rate": 24000}
MAX_OUTPUT_TOKENS = 4096  # the API's own upper bound for an integer max_output_tokens
MODALITIES = ("audio", "text")


@dataclass(frozen=True)
class TurnDetection:
    """server_vad settings (vad.py explains how `threshold` maps to a loudness)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    def updated(self, fields: dict, param: str) -> "TurnDetection":
        """These settings with `fields` applied; `param` is where they came from, for errors."""
        if fields.get("type") != "server_vad":
            raise ProtocolError("unsupported_turn_detection", f"{param} must be null or of type 'server_vad' "
                                "(echox has an energy-based VAD, no semantic_vad)", f"{param}.type")
        changes = {}
        for name, high in (("threshold", 1.0), ("prefix_padding_ms", 5000), ("silence_duration_ms", 10000)):
            value = number_field(fields, name, f"{param}.{name}", 0, high)
            if value is not None:
                changes[name] = value if name == "threshold" else int(value)
        for name in ("create_response", "interrupt_response"):
            if name in fields:
                if not isinstance(fields[name], bool):
                    raise ProtocolError("invalid_value", f"{param}.{name} must be true or false", f"{param}.{name}")
                changes[name] = fields[name]
        return replace(self, **changes)


@dataclass(frozen=True)
class SessionConfig:
    temperature: float
    top_p: float
    max_output_tokens: int
    turn_detection: TurnDetection | None = field(default=None)
    output_modality: str = "audio"  # or "text"

    @property
    def speaks(self) -> bool:
        return self.output_modality == "audio"

    def for_response(self, response: dict) -> "SessionConfig":
        """This config with the fields a response.create's `response` may set for that answer alone.
        An out-of-band response (its own `input`, or `conversation` "none") is refused: ignored, it
        answered the conversation's pending input instead, or said there was none."""
        if "input" in response:
            raise ProtocolError("unsupported_response", "response.input is not supported: a response answers the "
                                "conversation's pending input (committed audio and user items)", "response.input")
        if response.get("conversation") not in (None, "auto"):
            raise ProtocolError("unsupported_response", "response.conversation must be \"auto\" (echox has no "
                                f"out-of-band responses), got {quoted(response['conversation'])}",
                                "response.conversation")
        changes = {}
        if "max_output_tokens" in response:
            changes["max_output_tokens"] = parse_max_output_tokens(response["max_output_tokens"], "response")
        if (modality := parse_output_modality(response, "response")) is not None:
            changes["output_modality"] = modality
        return replace(self, **changes)

    def updated(self, session: dict) -> "SessionConfig":
        """This config with the fields of a session.update's `session` applied; all or nothing."""
        if session.get("type") not in (None, "realtime"):  # a transcription session would be answered instead
            raise ProtocolError("unsupported_session_type", "session.type must be \"realtime\" (echox has no "
                                f"transcription sessions), got {quoted(session['type'])}", "session.type")
        changes = {}
        for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 1e-6, 1.0)):
            value = number_field(session, name, f"session.{name}", low, high)
            if value is not None:
                changes[name] = value
        if 0 < changes.get("temperature", 0) < MIN_TEMPERATURE:  # here, not in every response it would fail
            raise ProtocolError("invalid_value", f"session.temperature must be 0 (greedy) or from "
                                f"{MIN_TEMPERATURE:g} to 2, got {changes['temperature']!r}", "session.temperature")
        if "max_output_tokens" in session:
            changes["max_output_tokens"] = parse_max_output_tokens(session["max_output_tokens"], "session")
        if (modality := parse_output_modality(session, "session")) is not None:
            changes["output_modality"] = modality
        for name in ("input_audio_format", "output_audio_format"):  # the beta API's names for the formats
            if session.get(name, "pcm16") != "pcm16":
                raise ProtocolError("unsupported_audio_format", f"session.{name} must be \"pcm16\" (24 kHz mono), "
                                    f"got {quoted(session[name])}", f"session.{name}")
        audio = object_field(session, "audio", "session.audio")
        for direction in ("input", "output"):
            check_format(object_field(audio, direction, f"session.audio.{direction}"), f"session.audio.{direction}")
        audio_input = object_field(audio, "input", "session.audio.input")
        # The beta API's place, then the GA's: ignored, a beta client's server_vad left it waiting forever.
        for holder, param in ((session, "session.turn_detection"), (audio_input, "session.audio.input.turn_detection")):
            if "turn_detection" in holder:
                changes["turn_detection"] = self.detection_from(holder["turn_detection"], param)
        return replace(self, **changes)

    def detection_from(self, detection: object, param: str) -> TurnDetection | None:
        if detection is not None and not isinstance(detection, dict):
            raise ProtocolError("invalid_value", f"{param} must be null or an object", param)
        return None if detection is None else (self.turn_detection or TurnDetection()).updated(detection, param)

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p)

    def as_dict(self, session_id: str) -> dict:
        """The session as session.created / session.updated report it (GA shape plus echox's fields)."""
        detection = None if self.turn_detection is None else {"type": "server_vad", **asdict(self.turn_detection)}
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": "echox",
            "output_modalities": [self.output_modality], "instructions": "", "tools": [],
            "audio": {"input": {"format": PCM_FORMAT, "turn_detection": detection},
                      "output": {"format": PCM_FORMAT, "voice": "echox"}},
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p,
        }


def parse_max_output_tokens(value: object, where: str) -> int:
    """An integer 1..4096, or "inf" (meaning the API's maximum)."""
    if value == "inf":
        return MAX_OUTPUT_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_TOKENS:
        raise ProtocolError("invalid_value", f"{where}.max_output_tokens must be an integer from 1 to "
                            f"{MAX_OUTPUT_TOKENS} or \"inf\", got {quoted(value)}", f"{where}.max_output_tokens")
    return value


def parse_output_modality(fields: dict, where: str) -> str | None:
    """"audio" or "text" from `output_modalities` (GA: ["audio"] or ["text"]) or `modalities` (beta:
    ["text"] or ["audio", "text"]): audio whenever it is asked for, as both APIs then also send its
    transcript; None when neither field is there."""
    for name in ("output_modalities", "modalities"):
        if name not in fields:
            continue
        values = fields[name]
        if not isinstance(values, list) or not values or not all(value in MODALITIES for value in values):
            raise ProtocolError("invalid_value", f"{where}.{name} must be [\"audio\"] or [\"text\"], got "
                                f"{quoted(values)}", f"{where}.{name}")
        return "audio" if "audio" in values else "text"
    return None


def check_format(direction: dict, param: str):
    """Only the API's default pcm16 at 24 kHz is served; g711 and other rates are refused."""
    fmt = direction.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm" or fmt.get("rate", 24000) != 24000:
        raise ProtocolError("unsupported_audio_format", f"{param}.format must be {{\"type\": \"audio/pcm\", "
                            f"\"rate\": 24000}} (pcm16 mono at 24 kHz), got {quoted(fmt)}", f"{param}.format")
