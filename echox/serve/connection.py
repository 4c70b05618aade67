"""One WebSocket connection: a conversation held over the Realtime protocol.

Client events are handled on the event loop in arrival order; each either changes the
connection's state (session config, input audio buffer, pending user input) or queues a
`Response` with the scheduler. Everything the server says goes through one outbox, drained
by one sender task, so events from the loop and from the turn worker keep their order.

State, top to bottom of a spoken turn:
  input audio buffer   pcm16 bytes at 24 kHz since the last commit/clear (with server VAD, only
                       `prefix_padding_ms` of it is kept while nobody speaks)
  pending input        committed speech (more than one commit: at most 30 s together, what the model
                       hears in a turn) and user text items (at most 64 Ki characters), waiting for
                       response.create
  active response      at most one per connection (queued or running), as in the API
  engine session       created in the turn worker on the first turn; keeps history and KV cache
"""

import asyncio
import json
import logging
from typing import Callable, NamedTuple

import torch
from aiohttp import WSMsgType, web

from ..audio import MAX_SECONDS
from ..engine import Session
from ..errors import EchoXError
from ..tokenizer import user_text
from .audio_edge import API_RATE, pcm16_from_base64, samples_from_pcm16
from .protocol import (ProtocolError, check_event_type, error_event, new_id, object_field, parse_json_object,
                       quoted, server_event)
from .response import Response
from .scheduler import TurnScheduler
from .session_config import SessionConfig
from .vad import EnergyVad, VadEvent

PCM16_BYTES = 2
# A client that reads nothing while its events pile up is gone: past either bound its connection is
# dropped (the transport aborted), or it would hold memory without end and its connection slot
# for good (a send that cannot finish never lets the connection end).
SEND_TIMEOUT_S = 30.0  # one event's send
MAX_QUEUED_EVENTS = 8192  # events waiting to be sent (a 2-minute answer is ~1,500 audio deltas)
MAX_PENDING_SAMPLES = int(MAX_SECONDS * API_RATE)  # Whisper hears 30 s of a turn; more would be cut
MAX_PENDING_TEXT = 64 * 1024  # characters: far past what a conversation's KV cache holds, and
# tokenizing it takes milliseconds (the tokenizer holds the interpreter lock, stalling every connection)

log = logging.getLogger("echox.serve")


def ms(sample: int) -> int:
    """Milliseconds of input audio (at the API's rate) before `sample`."""
    return sample * 1000 // API_RATE


def user_item(item_id: str, content: list[dict]) -> dict:
    """A user message of the conversation (speech or text parts)."""
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": content}


def turn_text(texts: list[str]) -> str:
    """An item's text parts as the turn's text, checked here with the engine's own rules: refused at
    response.create, the error came late, named no field, and took the committed speech with it."""
    try:
        text = user_text("\n".join(texts), "item.content")
    except EchoXError as error:
        raise ProtocolError("invalid_value", f"{error}; this item was dropped", "item.content") from None
    if not text:  # the engine takes "" as no text; an item of it would be a turn of nothing
        raise ProtocolError("invalid_value", "item.content has no text; this item was dropped", "item.content")
    return text


class ServerClose(NamedTuple):
    """In the outbox: close the WebSocket here, after the events queued before."""
    code: int
    reason: str


class Connection:
    def __init__(self, ws: web.WebSocketResponse, config: SessionConfig, scheduler: TurnScheduler,
                 new_session: Callable[[], Session], max_buffer_bytes: int, idle_timeout_s: float,
                 transport: asyncio.BaseTransport | None = None):
        """`transport`: the connection's own, aborted to drop a client that reads nothing."""
        self.ws, self.config, self.scheduler, self.new_session = ws, config, scheduler, new_session
        self.transport, self.dropped = transport, False
        self.max_buffer_bytes, self.idle_timeout_s = max_buffer_bytes, idle_timeout_s
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.session_id = new_id("sess")
        self.session: Session | None = None
        self.buffer = bytearray()
        self.appended = 0  # samples appended since the connection opened
        self.vad: EnergyVad | None = None
        self.speech_item: str | None = None  # the item id of the speech VAD hears now
        self.pending_audio: list[torch.Tensor] = []  # committed speech, [n] at 24 kHz each
        self.pending_text: list[str] = []
        self.last_item: str | None = None
        self.active: Response | None = None
        self.answer_when_free = False  # server VAD heard a turn end while a response was active
        self.restart_idle_clock()
        self.handlers = {
            "session.update": self.session_update,
            "input_audio_buffer.append": self.append,
            "input_audio_buffer.commit": self.commit_event,
            "input_audio_buffer.clear": self.clear,
            "conversation.item.create": self.item_create,
            "response.create": self.response_create,
            "response.cancel": self.response_cancel,
        }

    # ---- the connection's life ------------------------------------------------------------------

    async def serve(self):
        sender = asyncio.create_task(self.send_all())
        self.post(server_event("session.created", session=self.config.as_dict(self.session_id)))
        try:
            await self.receive_all()
        finally:
            self.pending_audio, self.pending_text, self.answer_when_free = [], [], False  # nothing more to answer
            if self.active is not None:
                self.cancel("client_cancelled")
            # The handlers hold this connection (a reference cycle): without this, its engine session
            # and KV cache would wait for the cycle collector while new connections make new ones.
            self.handlers, self.session = {}, None
            self.post(None)  # the sender's last item
            await sender
            await self.ws.close()

    async def receive_all(self):
        while True:
            # While an answer runs nothing is idle; after one, the idle clock starts again.
            wait = self.idle_timeout_s if self.active is not None else self.quiet_until - self.loop.time()
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                message = await self.ws.receive(timeout=wait)
            except asyncio.TimeoutError:
                if self.active is not None or self.quiet_until > self.loop.time():
                    continue
                self.post(error_event(ProtocolError("idle_timeout", f"no client event for {self.idle_timeout_s:g} s; "
                                                    "closing the connection", kind="session_expired")))
                return
            self.restart_idle_clock()
            if message.type == WSMsgType.TEXT:
                self.handle(message.data)
            elif message.type == WSMsgType.BINARY:
                self.post(error_event(ProtocolError("invalid_event", "binary frames are not part of the protocol: "
                                                    "send JSON events as text frames")))
            else:  # close, closing, closed or a protocol error: the client is gone
                return

    def restart_idle_clock(self):
        """Idle from now on until a client event or an answer: the connection ends `idle_timeout_s` later."""
        self.quiet_until = self.loop.time() + self.idle_timeout_s

    def handle(self, message: str):
        try:
            event = parse_json_object(message)
        except ProtocolError as error:
            self.post(error_event(error))
            return
        client_event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        try:
            self.handlers[check_event_type(event)](event)
        except ProtocolError as error:
            self.post(error_event(error, client_event_id))
        except Exception:  # a bug of ours: the client hears of it and the connection goes on
            log.exception("client event %.200s failed", message)
            self.post(error_event(ProtocolError("server_error", "the server failed on this event; the server log "
                                                "has the details", kind="server_error"), client_event_id))

    def post(self, event: dict | ServerClose | None):
        """Queue an event for the client; safe from any thread (the worker posts through here too)."""
        try:
            self.loop.call_soon_threadsafe(self.enqueue, event)
        except RuntimeError:  # the event loop has closed (the server stopped): nobody is left to tell
            pass

    def enqueue(self, event: dict | ServerClose | None):
        self.outbox.put_nowait(event)
        if self.outbox.qsize() > MAX_QUEUED_EVENTS:
            self.drop(f"{MAX_QUEUED_EVENTS} events wait for it")

    def drop(self, why: str):
        """Abort the connection of a client that does not read: the receive side then ends and the
        queued events are drained unsent (the sends fail at once)."""
        if not self.dropped and self.transport is not None:
            self.dropped = True
            log.warning("dropping the connection of %s: it reads nothing (%s)", self.session_id, why)
            self.transport.abort()

    def close(self, code: int, reason: str):
        """Close the WebSocket from the server's side (at shutdown), once what is queued for the client
        is sent; `serve` then ends as when a client leaves."""
        self.post(ServerClose(code, reason))

    async def send_all(self):
        while (event := await self.outbox.get()) is not None:
            if self.ws.closed:
                continue  # the client left: drain without sending
            try:
                if isinstance(event, ServerClose):
                    await self.ws.close(code=event.code, message=event.reason.encode())
                    continue
                await asyncio.wait_for(self.ws.send_str(json.dumps(event)), SEND_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.drop(f"one event's send took over {SEND_TIMEOUT_S:g} s")
            except (ConnectionError, RuntimeError):  # closed under us; the receive side will notice
                continue

    # ---- session and input audio ----------------------------------------------------------------

    def session_update(self, event: dict):
        old_detection = self.config.turn_detection
        self.config = self.config.updated(object_field(event, "session", "session"))
        if self.config.turn_detection != old_detection:
            self.restart_vad()
        self.post(server_event("session.updated", session=self.config.as_dict(self.session_id)))

    def restart_vad(self):
        """A fresh detector from the current settings, counting from the samples appended so far. Speech
        the old one was hearing ends here, uncommitted (a clear, or turn detection changed), so that
        each speech_started has its speech_stopped: a client may show "speaking" until it comes."""
        if self.speech_item is not None:
            self.post(server_event("input_audio_buffer.speech_stopped", audio_end_ms=ms(self.appended),
                                   item_id=self.speech_item))
        detection = self.config.turn_detection
        self.speech_item = None
        self.vad = None if detection is None else EnergyVad(detection.threshold, detection.silence_duration_ms,
                                                            API_RATE, origin=self.appended)

    def append(self, event: dict):
        raw = pcm16_from_base64(event.get("audio"), "audio")
        if len(self.buffer) + len(raw) > self.max_buffer_bytes and self.vad is not None and self.vad.speaking:
            self.end_speech_here()
        if len(self.buffer) + len(raw) > self.max_buffer_bytes:
            seconds = self.max_buffer_bytes / (PCM16_BYTES * API_RATE)
            raise ProtocolError("input_audio_buffer_full", f"the input audio buffer holds at most "
                                f"{self.max_buffer_bytes} bytes ({seconds:g} s of 24 kHz pcm16); this append of "
                                f"{len(raw)} bytes was dropped: commit or clear the buffer first", "audio")
        self.buffer += raw
        samples = samples_from_pcm16(raw)
        self.appended += samples.numel()
        if self.vad is not None:
            for vad_event in self.vad.push(samples):
                self.on_vad(vad_event)
            if not self.vad.speaking:  # the padding before speech that may be starting, all of it
                self.keep_recent(self.config.turn_detection.prefix_padding_ms, before=self.vad.pending_onset())

    def on_vad(self, event: VadEvent):
        """The events say where the item's audio starts and ends, in ms of the session's input (as the
        API does): from the prefix padding kept before the onset to where the end was heard, after
        `silence_duration_ms` of quiet."""
        if event.kind == "started":
            self.speech_item = new_id("item")
            self.keep_recent(self.config.turn_detection.prefix_padding_ms, before=event.sample)
            self.post(server_event("input_audio_buffer.speech_started", audio_start_ms=ms(self.buffer_start()),
                                   item_id=self.speech_item))
            if self.active is not None and self.config.turn_detection.interrupt_response:
                self.cancel("turn_detected")  # barge-in
            return
        item = self.speech_item or new_id("item")  # a manual commit during the speech took the first id
        self.post(server_event("input_audio_buffer.speech_stopped", audio_end_ms=ms(event.heard), item_id=item))
        try:  # the speech up to where its end was heard; what came after it in the same append stays
            self.commit(item, until=event.heard)
        except ProtocolError as error:
            self.post(error_event(error))
            return
        if self.config.turn_detection.create_response:
            self.answer_when_free = True
            self.answer_if_free()

    def end_speech_here(self):
        """Speech as long as the buffer holds (30 s by default, or steady noise above the threshold) is
        a turn that ends here; the speech after it starts one of its own. Refusing the append instead
        kept the VAD from ever hearing the end, and every later append was refused."""
        self.on_vad(VadEvent("stopped", self.appended, self.appended))
        self.restart_vad()

    def keep_recent(self, padding_ms: int, before: int | None = None):
        """Drop buffered audio older than `padding_ms` before sample `before` (default: the end)."""
        end = self.appended if before is None else before
        first_kept = end - padding_ms * API_RATE // 1000
        if first_kept > (start := self.buffer_start()):
            del self.buffer[:(first_kept - start) * PCM16_BYTES]

    def buffer_start(self) -> int:
        """Where the buffer's first sample is in the session's input (samples appended so far)."""
        return self.appended - len(self.buffer) // PCM16_BYTES

    def commit_event(self, event: dict):
        if not self.buffer:
            raise ProtocolError("input_audio_buffer_commit_empty", "the input audio buffer is empty: append audio "
                                "before committing")
        self.commit(self.speech_item or new_id("item"))

    def commit(self, item_id: str, until: int | None = None):
        """Commit the buffer up to sample `until` (default: all of it) as a pending speech item."""
        end = len(self.buffer) if until is None else max(0, until - self.buffer_start()) * PCM16_BYTES
        speech = samples_from_pcm16(bytes(self.buffer[:end]))
        del self.buffer[:end]
        self.speech_item = None
        if not speech.numel():
            raise ProtocolError("input_audio_buffer_commit_empty", "no audio to commit")
        waiting = sum(samples.numel() for samples in self.pending_audio)
        # One commit longer than a turn hears is taken (the engine uses its first 30 s, with a warning);
        # what is refused is more speech on top of speech that already waits.
        if waiting and waiting + speech.numel() > MAX_PENDING_SAMPLES:
            seconds = speech.numel() / API_RATE
            raise ProtocolError("input_audio_pending_full", f"speech waiting for a response holds at most "
                                f"{MAX_SECONDS:g} s (what the model hears in a turn); these {seconds:.1f} s were "
                                "dropped: send response.create first")
        self.pending_audio.append(speech)
        self.post(server_event("input_audio_buffer.committed", previous_item_id=self.last_item, item_id=item_id))
        self.add_item(user_item(item_id, [{"type": "input_audio", "transcript": None}]))

    def clear(self, event: dict):
        self.buffer.clear()
        self.restart_vad()
        self.post(server_event("input_audio_buffer.cleared"))

    # ---- conversation items and responses -------------------------------------------------------

    def item_create(self, event: dict):
        item = object_field(event, "item", "item")
        if item.get("type", "message") != "message" or item.get("role") != "user":
            raise ProtocolError("unsupported_item", "echox accepts only user messages: {\"type\": \"message\", "
                                "\"role\": \"user\", \"content\": [{\"type\": \"input_text\", \"text\": ...}]}", "item")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise ProtocolError("invalid_value", "item.content must be a non-empty list of parts", "item.content")
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "input_text" or not isinstance(part.get("text"), str):
                raise ProtocolError("unsupported_content", "each item.content part must be {\"type\": \"input_text\", "
                                    "\"text\": \"...\"}; send speech with input_audio_buffer.append", "item.content")
            texts.append(part["text"])
        if sum(map(len, self.pending_text + texts)) > MAX_PENDING_TEXT:
            raise ProtocolError("input_text_too_long", f"user text waiting for a response holds at most "
                                f"{MAX_PENDING_TEXT} characters; this item was dropped", "item.content")
        self.pending_text.append(turn_text(texts))
        item_id = item["id"] if isinstance(item.get("id"), str) else new_id("item")
        self.add_item(user_item(item_id, [{"type": "input_text", "text": text} for text in texts]))

    def add_item(self, item: dict):
        """Announce an item of the conversation, after the last one (previous_item_id)."""
        self.post(server_event("conversation.item.added", previous_item_id=self.last_item, item=item))
        self.last_item = item["id"]

    def response_create(self, event: dict):
        if self.active is not None:
            raise ProtocolError("conversation_already_has_active_response", f"response {self.active.id} is still "
                                "in progress: wait for its response.done or send response.cancel")
        self.start_response(object_field(event, "response", "response"))

    def start_response(self, options: dict):
        """Answer the pending input: committed speech (joined) and user text (joined) make one turn. The
        options are checked first: a bad one is the error to name, whether or not input waits."""
        config = self.config.for_response(options)
        if not self.pending_audio and not self.pending_text:
            raise ProtocolError("no_input", "nothing to answer: commit input audio or create a user message first")
        audio = torch.cat(self.pending_audio) if self.pending_audio else None
        text = "\n".join(self.pending_text)
        self.pending_audio, self.pending_text = [], []
        self.active = Response(config, audio, text, self.engine_session, self.post, self.response_finished)
        self.scheduler.submit(self.active)
        self.post(self.active.created_event(self.scheduler.turns_ahead(self.active)))
        self.add_item(self.active.item("in_progress"))  # the answer, to come

    def engine_session(self) -> Session:
        """This connection's engine session; only the turn worker calls this, so no lock is needed."""
        if self.session is None:
            self.session = self.new_session()
        return self.session

    def response_finished(self):
        self.active = None
        self.restart_idle_clock()
        self.answer_if_free()

    def answer_if_free(self):
        """Start the response server VAD asked for, once no other response is active (after a barge-in
        the interrupted answer may still be stopping when the new speech ends)."""
        if self.active is None and self.answer_when_free:
            self.answer_when_free = False
            if self.pending_audio or self.pending_text:
                self.start_response({})

    def response_cancel(self, event: dict):
        wanted = event.get("response_id")
        if self.active is None or (wanted is not None and wanted != self.active.id):
            raise ProtocolError("response_cancel_not_active", "there is no active response to cancel"
                                + (f" with id {quoted(wanted)}" if wanted is not None else ""), "response_id")
        self.cancel("client_cancelled")

    def cancel(self, reason: str):
        self.active.cancel_reason = reason
        self.scheduler.cancel(self.active)
