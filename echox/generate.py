"""LLM decoding for EchoX: prompt with speech rows in, tokens with their hidden states out.

The prompt is a list of *slots*: a text slot holds a token id, an audio slot holds one row of
a turn's speech embeddings (its token id in traces is `<audio_patch>`). The KV cache of a
conversation keeps the slots it has seen, so a new turn prefills only from the first slot
that differs (the released model re-reads the whole history; the result is the same).

Each decoding step yields the token t, the final-norm hidden state h_t that chose it, and
s_t = cos(h_t, lm_head row of "."), the score the segmenter uses. The step itself has no host
sync; the loop reads one small tensor per token back (token id and score) to stream text, and
queues the next step before it waits for that read, so the device never idles on the host.

The KV cache holds `max_len` positions for the whole conversation (system prompt, every turn,
every speech row, every answer). A prompt that does not fit is refused before the prefill runs
(`require_room`, which a caller may also ask earlier, before encoding speech); an answer that
reaches the end of the cache stops with an error naming the limit, as no position is left for
its next token.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .capture import RecentCaptures, capture_step
from .errors import ConversationFull
from .llama import DecoderState, LlamaLM
from .sampling import SamplingParams, head_select

KV_BLOCK = 1024  # an unbatched conversation's KV cache holds a multiple of this many positions


def kv_capacity(max_len: int) -> int:
    """Positions allocated for a conversation limited to `max_len`: rounded up to a multiple of
    KV_BLOCK, so that sessions asking for nearby limits share caches, and with them their captured
    steps (a trace is never freed: one per distinct limit would pile up)."""
    return -(-max_len // KV_BLOCK) * KV_BLOCK


# CUDA graphs of an unbatched decode step kept per KV cache, one per sampling setting: each holds
# GPU memory of its own, and a server's clients set temperature and top-p as they please.
SAMPLING_GRAPHS = 4


@dataclass(frozen=True)
class AudioSlot:
    # Which speech input of the session: numbers are never reused, so a cached slot that equals a
    # prompt's holds that very speech (a turn given up after its prefill leaves its rows cached).
    speech: int
    row: int  # which of its embedding rows


Slot = int | AudioSlot


@dataclass
class Token:
    id: int
    hidden: torch.Tensor  # [H] final-norm hidden state that produced this token (on the device)
    score: float  # cosine with the "." row of the output head


def period_direction(lm: LlamaLM, period_id: int) -> torch.Tensor:
    """[H] unit-norm lm_head row of ".": a token's segmenter score is one dot product with it."""
    period = lm.lm_head.weight[period_id].float()
    return period / period.norm()


def period_score(hidden: torch.Tensor, period_row: torch.Tensor) -> torch.Tensor:
    """s_t = cos(h_t, lm_head row of "."), for hidden [B, H] -> [B] fp32."""
    return F.normalize(hidden.float(), dim=-1) @ period_row


def cache_full(max_len: int, tokens: int) -> ConversationFull:
    return ConversationFull(f"the answer reached the KV cache size {max_len} (max_len) after {tokens} tokens: "
                            f"reset the session or start a new one, or raise max_len", max_len=max_len)


def common_prefix(a: list[Slot], b: list[Slot]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TextDecoder:
    """Owns the LLM's KV cache for one conversation and decodes one turn at a time."""

    def __init__(self, lm: LlamaLM, pad_id: int, eot_id: int, period_id: int, max_len: int,
                 use_graphs: bool | None = None, state: DecoderState | None = None):
        """`state`: a KV cache of one sequence to use (a slot of a batched engine's cache, with room
        for at least `max_len` positions); by default this decoder allocates its own, of
        kv_capacity(max_len) positions. `max_len` is the conversation's limit: a decoder handed on
        to another session may get another one (of the same capacity)."""
        self.lm, self.pad_id, self.eot_id = lm, pad_id, eot_id
        self.device = lm.lm_head.weight.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.graphs = RecentCaptures(SAMPLING_GRAPHS)  # CUDA graphs of the step, by sampling setting
        self.traced_body = None  # on a CPU: the trace of decode_step, for every setting
        self.state = state or lm.body.allocate_state(1, kv_capacity(max_len))  # this conversation's KV cache
        self.max_len = max_len
        self.cached: list[Slot] = []  # what the KV cache holds, position by position
        self.period_row = period_direction(lm, period_id)
        self.step = torch.zeros((), dtype=torch.int64, device=self.device)  # sampling counter
        # Two pinned host buffers for reading tokens back without blocking the queue (GPU only).
        self.host_buffers = torch.empty(2, 2, pin_memory=True) if self.device.type == "cuda" else None

    def embed(self, slots: list[Slot], speech: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, n, H] embeddings and [1, n] key flags for `slots` (eot/pad keys are masked, SPEC §5)."""
        ids = torch.tensor([s if isinstance(s, int) else self.pad_id for s in slots], device=self.device)
        x = self.lm.embed_tokens(ids)
        audio = [(i, s) for i, s in enumerate(slots) if isinstance(s, AudioSlot)]
        if audio:
            where = torch.tensor([i for i, _ in audio], device=self.device)
            rows = torch.stack([speech[s.speech][s.row] for _, s in audio]).to(x.dtype)
            x = x.index_copy(0, where, rows)
        is_audio = torch.zeros(len(slots), dtype=torch.bool, device=self.device)
        is_audio[[i for i, _ in audio]] = True
        return x[None], ((ids != self.pad_id) | is_audio)[None]

    def prefill(self, slots: list[Slot], speech: dict[int, torch.Tensor]) -> torch.Tensor:
        """Bring the cache to `slots`; return the last position's hidden state [1, H].

        The engine runs one turn at a time: a turn points the LLM's layers at this conversation's
        cache here, and decodes with it until the turn ends."""
        self.require_room(len(slots))
        start = min(common_prefix(self.cached, slots), len(slots) - 1)
        x, valid = self.embed(slots[start:], speech)
        positions = torch.arange(start, len(slots), device=self.device)[None]
        with self.lm.body.state_lock:  # a session being made meanwhile captures on its own cache
            self.lm.body.use_state(self.state)
            hidden = self.lm(x, positions, valid, kv_len=len(slots))[:, -1]
        self.cached = list(slots)
        return hidden

    def require_room(self, positions: int):
        """Refuse a prompt of `positions` slots that this conversation's KV cache cannot hold."""
        if positions > self.max_len:
            raise ConversationFull(f"the conversation needs {positions} positions but its KV cache holds {self.max_len} "
                             f"(max_len): reset the session or start a new one, or create it with a larger max_len",
                             max_len=self.max_len, prompt=positions)

    def decode_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token [1] int64 at position [1] -> hidden [1, H]. Static shapes, no host sync."""
        x = self.lm.embed_tokens(token)[:, None]
        valid = torch.ones(1, 1, dtype=torch.bool, device=self.device)  # eot ends a turn, so never fed
        return self.lm(x, position[:, None], valid)[:, 0]

    def choose(self, hidden: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token [1] and its score [1] from hidden [1, H], at the sampling counter's value."""
        return head_select(hidden, self.lm.lm_head.weight, sampling, self.step), period_score(hidden, self.period_row)

    def select(self, hidden: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """`choose`, then bump the sampling counter on the device."""
        choice = self.choose(hidden, sampling)
        self.step += 1
        return choice

    def step_function(self, sampling: SamplingParams):
        """(token [1], position [1]) -> (hidden [1, H], next token [1], score [1]): eager, or
        captured (capture.py). The caller bumps the sampling counter after each call: a trace
        would drop the bump, an in-place write that nothing after it in the step reads."""
        body = self.decode_step
        if self.use_graphs and self.device.type != "cuda":
            # A trace of the body alone serves every setting: torch.jit never frees a trace (its
            # global compilation unit keeps it), and the settings a server's clients may choose
            # are countless.
            if self.traced_body is None:
                self.traced_body = self.capture(self.decode_step)
            body = self.traced_body

        def step(token, position):
            hidden = body(token, position)
            return (hidden, *self.choose(hidden, sampling))

        if not (self.use_graphs and self.device.type == "cuda"):
            return step
        # The whole step, one graph per setting (baked into its kernels), the last few settings kept.
        return self.graphs.get(sampling, lambda: self.capture(step))

    def capture(self, step):
        """`step` (token, position) captured on this conversation's cache buffers (a capture holds
        them; the replays of a turn's steps need not point the layers at them again)."""
        position = torch.tensor([len(self.cached)], device=self.device)  # rewritten by the real step
        with self.lm.body.state_lock:  # another conversation's prefill may be running
            self.lm.body.use_state(self.state)
            return capture_step(step, torch.zeros_like(position), position)

    def start_read(self, token: torch.Tensor, score: torch.Tensor, slot: int):
        """Begin copying (token, score) to the host; the returned function waits for them.

        On a GPU the copy goes to pinned memory behind an event, so the caller can queue more
        work first; slot picks one of two host buffers, so a read never lands on the last one."""
        values = torch.stack([token.float(), score]).view(-1)  # [2]
        if self.device.type != "cuda":
            return values.tolist
        host = self.host_buffers[slot]
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def wait():
            copied.synchronize()
            return host.tolist()
        return wait

    def decode(self, hidden: torch.Tensor, length: int, sampling: SamplingParams,
               max_new_tokens: int) -> Iterator[Token]:
        """Yield the answer's tokens (eot excluded) after a prefill of `length` slots that gave
        `hidden` [1, H]; the cache then holds prompt + answer.

        Each step is queued before the token it consumes is read back, so the device runs step
        t + 1 while the host handles token t; the step queued after eot is simply never used."""
        token, score = self.select(hidden, sampling)
        step = self.step_function(sampling)
        position = torch.tensor([length], device=self.device)
        kept = hidden[0].clone()
        for n in range(max_new_tokens):
            read = self.start_read(token, score, n % 2)
            ahead = None
            if length < self.max_len and n + 1 < max_new_tokens:
                next_hidden, next_token, next_score = step(token, position)
                self.step += 1
                ahead = next_hidden[0].clone(), next_token, next_score  # clone: a graph reuses its outputs
            token_id, score_value = read()
            if int(token_id) == self.eot_id:
                return
            yield Token(int(token_id), kept, score_value)
            if ahead is None:
                if n + 1 < max_new_tokens:
                    raise cache_full(self.max_len, n + 1)
                return
            self.cached.append(int(token_id))  # its keys went into the cache with the step queued above
            kept, token, score = ahead
            position += 1
            length += 1
