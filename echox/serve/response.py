"""One answer: `Session.respond` run in the turn worker, its events sent as realtime server events.

    response.created                       (sent by the connection when the turn is queued)
    response.output_item.added, response.content_part.added      as the turn starts
    response.output_text.delta  ...        each TextDelta, and when spoken the same as
    response.output_audio_transcript.delta (the GA API's name for the text of a spoken answer)
    response.output_audio.delta ...        each AudioChunk, resampled 16 -> 24 kHz, base64 pcm16
    response.output_audio.done, response.output_audio_transcript.done      when spoken
    response.output_text.done, response.content_part.done, response.output_item.done
    response.done                          status, usage, and echox's timings and queue wait
A text-only answer (output_modalities ["text"]) has a text part and none of the audio events; the
engine then runs no echo decoder or vocoder for it.

A response cancelled while it waits in the queue never reaches the engine; one cancelled while it
runs is stopped by `Session.cancel()` within one decode step or vocoder push, and what was said
so far (text and audio already sent) stays in the conversation. Engine errors a user can fix
(`EchoXError`) become `error` events; anything else is logged with its traceback on the server
and reported to the client as a `server_error`. Either way an answer's part and item, once
announced, still get their .done events (the item incomplete), and the connection stays usable.
"""

import logging
from typing import Callable

import torch

from ..engine import AudioChunk, Session, TextDelta, TurnDone
from ..errors import ConversationFull, EchoXError
from .audio_edge import API_RATE, StreamingResampler, pcm16_base64
from .protocol import ProtocolError, error_event, new_id, server_event
from .session_config import SessionConfig

log = logging.getLogger("echox.serve")
# The cancel reason when the scheduler ends a turn on its own: a connection that cancels gives its
# reason first, so this is the server stopping (not the API's client_cancelled: the client did nothing).
SERVER_SHUTDOWN = "server_shutdown"


def too_long(full: ConversationFull, new_conversation: bool) -> ProtocolError:
    """The error for a turn that outgrew the KV cache. A new connection starts a new conversation,
    but where the conversation held nothing before, the turn itself is too long: a client told to
    reconnect would fail the same way, again and again."""
    if not new_conversation:
        return ProtocolError("conversation_full", "this conversation no longer fits its KV cache; a new connection "
                             "starts a new conversation")
    if full.prompt is not None:
        return ProtocolError("input_too_long", f"this turn's input is too long: it needs {full.prompt} positions, and "
                             f"a conversation holds {full.max_len}; send shorter speech or less text")
    return ProtocolError("input_too_long", f"this turn's input left its answer too little of the {full.max_len} "
                         "positions a conversation holds: send shorter speech or less text, or ask for a shorter "
                         "answer (max_output_tokens)")


class Response:
    def __init__(self, config: SessionConfig, audio: torch.Tensor | None, text: str,
                 open_session: Callable[[], Session], post: Callable[[dict], None], on_finished: Callable[[], None]):
        """`audio` is the user's speech at 24 kHz ([n] float) or None; `open_session` gives the
        connection's engine session (called in the worker thread); `post` sends an event from any thread."""
        self.id, self.item_id = new_id("resp"), new_id("item")
        self.config, self.audio, self.text = config, audio, text
        self.open_session, self.post, self.on_finished = open_session, post, on_finished
        self.session: Session | None = None
        # Why it was cancelled: the connection's reason ("client_cancelled", "turn_detected"), or
        # SERVER_SHUTDOWN from stop() or drop() when the connection gave none.
        self.cancel_reason: str | None = None
        # The response.done event, sent by finished() on the event loop as the connection frees
        # itself for the next response: a client that answers response.done at once is never refused.
        self.done_event: dict | None = None
        self.wait_ms = 0.0
        self.said: list[str] | None = None  # the answer's text deltas, once its item is announced

    # ---- the event loop's side ------------------------------------------------------------------

    def created_event(self, turns_ahead: int) -> dict:
        """response.created; its echox.turns_ahead says how many running turns must end before this
        one starts (0: it starts now), so a client can show that it waits."""
        response = self.describe("in_progress")
        response["echox"]["turns_ahead"] = turns_ahead
        return server_event("response.created", response=response)

    def stop(self):
        """Ask the engine to end this answer early (any thread). The reason is set before the session
        is read, and run() sets the session before reading the reason, so one of them sees the other."""
        self.cancel_reason = self.cancel_reason or SERVER_SHUTDOWN
        if self.session is not None:
            self.session.cancel()

    def drop(self):
        self.cancel_reason = self.cancel_reason or SERVER_SHUTDOWN
        self.done_event = server_event("response.done", response=self.describe("cancelled", self.cancel_reason))

    def finished(self):
        if self.done_event is None:  # run() never got going (its thread could not start, say)
            self.fail(ProtocolError("server_error", "the server could not run this turn; the server log has the "
                                    "details", kind="server_error"))
        self.post(self.done_event)
        self.on_finished()

    # ---- the worker thread's side ---------------------------------------------------------------

    def run(self):
        try:
            session = self.open_session()
            session.sampling = self.config.sampling()
            session.max_new_tokens = self.config.max_output_tokens
            session.speak = self.config.speaks
            self.session = session
            if self.cancel_reason is not None:  # cancelled between leaving the queue and now
                self.drop()
                return
            self.answer(session)
        except ConversationFull as e:
            log.info("response %s: %s", self.id, e)  # the engine's own advice (a reset) is not in the protocol
            # The history as before this turn: a turn that fails is taken back out of it.
            self.fail(too_long(e, new_conversation=not self.session.turns))
        except EchoXError as e:
            self.fail(ProtocolError("invalid_input", str(e)))
        except Exception:
            log.exception("response %s failed", self.id)
            self.fail(ProtocolError("server_error", "the engine failed on this turn; the server log has the "
                                    "details", kind="server_error"))

    def answer(self, session: Session):
        resampler, done = StreamingResampler(), None
        text = self.said = []  # fail() ends the item with it
        speaks = self.config.speaks
        text_events = ("response.output_text.delta",) + (("response.output_audio_transcript.delta",) if speaks else ())
        self.post(server_event("response.output_item.added", response_id=self.id, output_index=0,
                               item=self.item("in_progress")))
        self.post(self.part_event("response.content_part.added", part=self.part("")))
        for event in session.respond(audio=None if self.audio is None else (self.audio, API_RATE), text=self.text):
            if self.cancel_reason is not None:
                session.cancel()  # again: a cancel that came before respond() started was reset by it
            if isinstance(event, TextDelta) and event.text:
                text.append(event.text)
                for event_type in text_events:
                    self.post(self.part_event(event_type, delta=event.text))
            elif isinstance(event, AudioChunk):
                self.send_audio(resampler.push(event.samples))
            elif isinstance(event, TurnDone):
                done = event
        answer = "".join(text)
        status, reason = self.outcome(done.trace)
        if speaks:
            self.send_audio(resampler.flush())
            self.post(self.part_event("response.output_audio.done"))
            self.post(self.part_event("response.output_audio_transcript.done", transcript=answer))
        self.post(self.part_event("response.output_text.done", text=answer))
        self.end_item(status, answer)
        self.done_event = server_event("response.done", response=self.describe(status, reason, done.trace, answer))

    def send_audio(self, samples: torch.Tensor):
        if samples.numel():
            self.post(self.part_event("response.output_audio.delta", delta=pcm16_base64(samples)))

    def outcome(self, trace: dict) -> tuple[str, str | None]:
        """(status, reason) of a finished turn, in the API's terms."""
        if trace.get("cancelled"):
            return "cancelled", self.cancel_reason
        if len(trace["tokens"]) >= self.config.max_output_tokens:
            return "incomplete", "max_output_tokens"
        return "completed", None

    def end_item(self, status: str, text: str):
        """The answer's part and item are done: a client tracks both from their .added events on."""
        self.post(self.part_event("response.content_part.done", part=self.part(text)))
        self.post(server_event("response.output_item.done", response_id=self.id, output_index=0,
                               item=self.item(status, text)))

    def fail(self, error: ProtocolError):
        self.post(error_event(error))
        if self.said is not None:  # the item was announced: it ends (incomplete), with what was said
            self.end_item("failed", "".join(self.said))
        failed = self.describe("failed")
        failed["status_details"]["error"] = {"type": error.kind, "code": error.code, "message": error.message}
        self.done_event = server_event("response.done", response=failed)

    # ---- payloads -------------------------------------------------------------------------------

    def part_event(self, event_type: str, **fields) -> dict:
        return server_event(event_type, response_id=self.id, item_id=self.item_id, output_index=0,
                            content_index=0, **fields)

    def part(self, text: str) -> dict:
        """The answer's content part as the content_part events carry it: spoken, or text only."""
        return {"type": "audio", "transcript": text} if self.config.speaks else {"type": "text", "text": text}

    def item(self, status: str, text: str | None = None) -> dict:
        """The answer's conversation item: in progress, or once the turn is over (with its text) completed
        or incomplete (an item is never cancelled or failed: such an answer is incomplete)."""
        content = [] if text is None else [{"type": "output_audio", "transcript": text} if self.config.speaks
                                           else {"type": "output_text", "text": text}]
        item_status = status if status in ("in_progress", "completed") else "incomplete"
        return {"id": self.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": item_status, "content": content}

    def describe(self, status: str, reason: str | None = None, trace: dict | None = None, text: str = "") -> dict:
        """The response object of response.created / response.done; with the turn's trace once it has one."""
        details = None if status == "in_progress" else {"type": status} | ({"reason": reason} if reason else {})
        response = {"object": "realtime.response", "id": self.id, "status": status, "status_details": details,
                    "output_modalities": [self.config.output_modality],
                    "max_output_tokens": self.config.max_output_tokens, "output": [], "usage": None}
        if trace is not None:
            response["output"] = [self.item(status, text)]
            prompt, answer = len(trace["prompt_ids"]), len(trace["tokens"])
            response["usage"] = {"total_tokens": prompt + answer, "input_tokens": prompt, "output_tokens": answer}
        response["echox"] = {"queue_wait_ms": round(self.wait_ms, 3),
                             "timings_ms": trace["timings_ms"] if trace is not None else {}}
        return response
