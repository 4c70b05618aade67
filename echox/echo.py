"""Echo decoder (T2U, SPEC §7): LLM hidden states of one segment -> unit-language tokens.

For a segment S [n, H] of the LLM's final-norm hidden states, the decoder reads

    adapter( concat( T[P_text], aligner_MLP(S), T[P_unit] ) )        [L, h],  L = |P_text| + n + |P_unit|

where T = concat(text embeddings, unit embeddings) [V+U, H] and `adapter` projects the LLM
width H to the body width h. A small Llama body then decodes greedily, one token at a time,
each new token embedded as adapter(T[id]), until eot. Token ids >= V are unit-language
tokens; each spells one or more HuBERT units (`EchoDecoder.units_of`).

Two output heads select the next token, both greedy through `sampling.head_select`:
- the full head, all V+U rows of `lm_head`: the released computation, kept as the reference;
- the unit head, only the eot row and the U unit rows (the fast path: ~16x fewer rows for
  the 8B vocabulary). Its rows are in increasing token-id order (eot < V <= units), so argmax
  ties break to the same token as over the full head.
The two pick the same token whenever the full head's argmax is eot or a unit. When the full
head's argmax is a text token other than eot, the unit head picks the best unit or eot
instead; the full path feeds the text token back, as the released decoder does (it generates
over the whole vocabulary), and yields nothing for it, since it stands for no unit.

Length: the released decoder (Hugging Face generate) may write 2048 new tokens after a prompt
of any length; RoPE has no hard position limit. The static KV cache here holds the prompt of a
segment of up to LONGEST_SEGMENT tokens plus 2048 new ones, so every segment of a released-size
answer (at most 512 tokens) gets the full budget. A decode stops at eot, after `max_units`
new tokens (default `EchoDecoderConfig.max_new_tokens`, 2048), or when the positions run out,
whichever comes first.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import EchoDecoderConfig
from .capture import capture_step
from .errors import EchoXError
from .llama import LlamaBody, body_layout
from .sampling import GREEDY, head_select
from .segmenter import LONGEST_SEGMENT
from .tokenizer import Tokenizer
from .weights import Layout

if TYPE_CHECKING:  # checkpoint.py imports this module for echo_layout
    from .checkpoint import ModelFolder

ECHO_PREFIX = "unit_translator."
# Decode steps per host read on a GPU, where a unit costs ~0.1 ms and a read about as much. On the
# CPU a read is free, so each step is read at once: a segment stops at eot without running past
# it, and every unit goes to the vocoder as soon as it exists.
UNITS_PER_READ = 8


def echo_layout(cfg: EchoDecoderConfig, prefix: str = ECHO_PREFIX) -> Layout:
    big_h, inner, width = cfg.llm_hidden_size, cfg.aligner_intermediate, cfg.body.hidden_size
    return {
        prefix + "aligner_MLP.0.weight": (inner, big_h), prefix + "aligner_MLP.0.bias": (inner,),
        prefix + "aligner_MLP.3.weight": (big_h, inner), prefix + "aligner_MLP.3.bias": (big_h,),
        prefix + "model.embed_tokens.weight": (cfg.text_vocab_size, big_h),
        prefix + "unit_embedding.weight": (cfg.unit_vocab_size, big_h),
        prefix + "adapter.weight": (width, big_h), prefix + "adapter.bias": (width,),
        prefix + "lm_head.weight": (cfg.body.vocab_size, width),
    } | body_layout(cfg.body, prefix + "model.")


@dataclass(frozen=True)
class EchoVocabulary:
    """What the echo decoder takes from the tokenizer, read once at load."""

    text_prefix: tuple[int, ...]  # P_text, ending in the 12800 quirk for Llama-3
    unit_prefix: tuple[int, ...]  # P_unit
    eot: int
    units: tuple[tuple[int, ...], ...]  # unit token k (id V + k) -> its HuBERT units, values < 1000

    @staticmethod
    def from_tokenizer(tokenizer: Tokenizer, cfg: EchoDecoderConfig) -> "EchoVocabulary":
        text_prefix, unit_prefix = tokenizer.echo_prefixes()
        table = tokenizer.unit_table(cfg.text_vocab_size, cfg.unit_vocab_size)
        return EchoVocabulary(tuple(text_prefix), tuple(unit_prefix), tokenizer.eot,
                              tuple(tuple(units) for units in table))


def _aligner_mlp(big_h: int, inner: int, dropout: float = 0.0) -> nn.Sequential:
    """The denoising adapter; indices match the released keys `aligner_MLP.0` and `.3`. Index 2 is
    Dropout(`dropout`) in training (0.1 in the authors' echo training), the identity at inference."""
    middle = nn.Dropout(dropout) if dropout else nn.Identity()
    return nn.Sequential(nn.Linear(big_h, inner), nn.ReLU(), middle, nn.Linear(inner, big_h))


class EchoDecoder(nn.Module):
    """The T2U decoder with its own static KV cache (batch 1, room for a segment and 2048 units)."""

    def __init__(self, cfg: EchoDecoderConfig, vocab: EchoVocabulary, tensors: dict[str, torch.Tensor]):
        """`tensors` keyed as `echo_layout(cfg, prefix="")` become the weights; only the token
        table T and the unit head are new tensors (concatenated or gathered from them). Consumes
        `tensors`, as `LlamaBody.load_released` does: each original goes once its copy exists, so
        the load peaks at the weights plus the one copy being made (a layer's fused matrices, or T
        while it is concatenated), not with every copy beside every original."""
        super().__init__()
        if not 0 <= vocab.eot < cfg.text_vocab_size:
            raise EchoXError(f"eot id {vocab.eot} is not a text token id (0..{cfg.text_vocab_size - 1})")
        self.cfg, self.vocab = cfg, vocab
        # Built on the meta device and left uninitialised: a random init of these sizes costs
        # seconds and every value is overwritten by the released weights.
        with torch.device("meta"):
            self.aligner_mlp = _aligner_mlp(cfg.llm_hidden_size, cfg.aligner_intermediate)
            self.adapter = nn.Linear(cfg.llm_hidden_size, cfg.body.hidden_size)
            self.body = LlamaBody(cfg.body)
        self._load_modules(tensors)
        self._build_tables(tensors)
        self.requires_grad_(False).eval()
        self.state = self.body.allocate_state(1, self.cache_len)  # the solo decode's cache
        self.body.use_state(self.state)
        on_gpu = self.adapter.weight.device.type == "cuda"
        self.use_graphs = on_gpu  # capture decode blocks (capture.py); the engine decides
        self.units_per_read = UNITS_PER_READ if on_gpu else 1
        self.graphs = {}  # captured decode blocks, by head

    def _load_modules(self, tensors: dict[str, torch.Tensor]):
        """The loaded tensors replace the meta ones (assigned, not copied: no `to_empty` first,
        whose meta `empty_like` imports sympy, ~0.5 s of every load)."""
        self.load_state_dict({f"aligner_mlp.{i}.{part}": tensors.pop(f"aligner_MLP.{i}.{part}")
                              for i in (0, 3) for part in ("weight", "bias")}
                             | {f"adapter.{part}": tensors.pop(f"adapter.{part}") for part in ("weight", "bias")},
                             strict=False, assign=True)
        self.body.load_released(tensors, "model.")  # leaves model.embed_tokens, the token table's

    def _build_tables(self, tensors: dict[str, torch.Tensor]):
        """The token table, both heads, the prefixes, and the small constants of a decode step."""
        cfg, device = self.cfg, self.adapter.weight.device

        def constant(name: str, value: torch.Tensor):
            self.register_buffer(name, value, persistent=False)

        constant("token_table", torch.cat([tensors.pop("model.embed_tokens.weight"),
                                           tensors.pop("unit_embedding.weight")]))  # T [V+U, H]
        constant("lm_head", tensors.pop("lm_head.weight"))  # [V+U, h]
        # Unit-head row r stands for token id unit_head_ids[r]: eot first, then every unit token.
        unit_ids = torch.arange(cfg.text_vocab_size, cfg.body.vocab_size, device=device)
        constant("unit_head_ids", torch.cat([torch.tensor([self.vocab.eot], device=device), unit_ids]))  # [1+U]
        constant("unit_head", self.lm_head[self.unit_head_ids])  # [1+U, h]
        constant("text_prefix", torch.tensor(self.vocab.text_prefix, device=device))
        constant("unit_prefix", torch.tensor(self.vocab.unit_prefix, device=device))
        # Greedy selection ignores the sampling counter, but head_select takes one.
        constant("select_step", torch.zeros(1, dtype=torch.int64, device=device))
        constant("one_valid_key", torch.ones(1, 1, dtype=torch.bool, device=device))

    @property
    def cache_len(self) -> int:
        """Positions of a segment's cache: its longest prompt, 2048 units and one block's overrun."""
        vocab = self.vocab
        return len(vocab.text_prefix) + LONGEST_SEGMENT + len(vocab.unit_prefix) + self.cfg.max_new_tokens + UNITS_PER_READ

    @property
    def max_len(self) -> int:
        """Positions a prompt and its units may use (the cache also holds one block's overrun)."""
        return self.cache_len - UNITS_PER_READ

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [...] -> adapter(T[id]) [..., h]."""
        return self.adapter(self.token_table[token_ids])

    def prompt_embeddings(self, segment: torch.Tensor) -> torch.Tensor:
        """segment [n, H] -> adapter(concat(T[P_text], aligner_MLP(S), T[P_unit])) [L, h]."""
        if segment.dim() != 2 or segment.shape[1] != self.cfg.llm_hidden_size:
            raise EchoXError(f"an echo-decoder segment must be [n, {self.cfg.llm_hidden_size}] LLM hidden "
                             f"states, got shape {list(segment.shape)}")
        denoised = self.aligner_mlp(segment.to(self.token_table))  # [n, H]
        pieces = [self.token_table[self.text_prefix], denoised, self.token_table[self.unit_prefix]]
        return self.adapter(torch.cat(pieces))

    def select(self, hidden: torch.Tensor, full_head: bool = False) -> torch.Tensor:
        """hidden [B, h] -> greedy next token id [B], over the full head or the unit head."""
        if full_head:
            return head_select(hidden, self.lm_head, GREEDY, self.select_step)
        return self.unit_head_ids[head_select(hidden, self.unit_head, GREEDY, self.select_step)]

    def prefill(self, prompt: torch.Tensor, full_head: bool = False) -> torch.Tensor:
        """Write prompt [L, h] at positions 0..L-1 of the cache; return the first new token id [1]."""
        length = prompt.shape[0]
        positions = torch.arange(length, device=prompt.device)[None]  # [1, L]
        key_valid = torch.ones(1, length, dtype=torch.bool, device=prompt.device)
        hidden = self.body(prompt[None], positions, key_valid, kv_len=length)  # [1, L, h]
        return self.select(hidden[:, -1], full_head)

    def decode_step(self, token_id: torch.Tensor, position: torch.Tensor, full_head: bool = False) -> torch.Tensor:
        """Feed token_id [B] at position [B, 1] (one segment per row of the cache in use); return
        the next token ids [B].

        Static shapes, no host sync: a CUDA graph can capture it with token_id and position as
        its input buffers.
        """
        valid = self.one_valid_key.expand(token_id.shape[0], 1)
        hidden = self.body(self.embed(token_id[:, None]), position, valid)  # [B, 1, h]
        return self.select(hidden[:, 0], full_head)

    def unit_budget(self, prompt_length: int, max_units: int | None = None) -> int:
        """How many new tokens a prompt of this length may get: prompt + new tokens <= max_len."""
        limit = self.cfg.max_new_tokens if max_units is None else max_units
        if limit < 1:
            raise EchoXError(f"max_units must be at least 1, got {limit}")
        room = self.max_len - prompt_length
        if room < 1:
            raise EchoXError(f"the echo-decoder prompt of this segment has {prompt_length} positions, leaving no "
                             f"room for units in the decoder's {self.max_len}; cut the segment shorter")
        return min(limit, room)

    def decode_block(self, token_id: torch.Tensor, position: torch.Tensor, full_head: bool = False) -> torch.Tensor:
        """units_per_read greedy steps from token_id [B] at position [B, 1] -> the next tokens [B, K].

        Each step feeds the token the previous one chose, so the block equals K single steps; the
        host reads the K tokens back at once instead of once per token."""
        tokens = []
        for offset in range(self.units_per_read):
            token_id = self.decode_step(token_id, position + offset, full_head)
            tokens.append(token_id)
        return torch.stack(tokens, dim=-1)

    def block_function(self, full_head: bool):
        """decode_block, eager or captured once per head (capture.py). The cache buffers never
        move (allocated once in __init__), so the capture stays valid; its runs write at the last
        positions, which real steps rewrite before reading."""
        def block(token_id, position):
            return self.decode_block(token_id, position, full_head)

        if not self.use_graphs:
            return block
        if full_head not in self.graphs:
            device = self.adapter.weight.device
            self.graphs[full_head] = capture_step(block, torch.zeros(1, dtype=torch.int64, device=device),
                                                  torch.full((1, 1), self.max_len, device=device))
        return self.graphs[full_head]

    @torch.no_grad()
    def generate(self, segment: torch.Tensor, max_units: int | None = None,
                 full_head: bool = False) -> Iterator[int]:
        """Decode one segment [n, H] greedily; yield each unit token id (>= V) as it is produced.

        eot ends the decode and is not yielded. Tokens come back to the host a block at a time
        (one sync per `units_per_read` tokens); steps a block ran past eot or the budget are dropped.
        """
        prompt = self.prompt_embeddings(segment)
        yield from self.generate_from_prompt(prompt, self.tally(prompt.shape[0], max_units), full_head)

    @torch.no_grad()
    def generate_from_prompt(self, prompt: torch.Tensor, tally: "UnitTally", full_head: bool = False) -> Iterator[int]:
        """`generate` from a prompt already embedded [L, h], ending as `tally` (from `tally`) says;
        training decodes text prompts with it (text embeddings in the segment slots) to make its echo
        pseudo-labels, and reads afterwards from the tally whether eot ended each."""
        self.body.use_state(self.state)  # a batched decode may have pointed the layers elsewhere
        token_id = self.prefill(prompt, full_head)  # [1]
        block = self.block_function(full_head)
        position = torch.full((1, 1), prompt.shape[0], device=prompt.device)  # [1, 1]
        ready = token_id.tolist()
        while True:
            yield from tally.take(ready)
            if tally.done:
                return
            tokens = block(token_id, position)[0]  # [K]
            position += self.units_per_read
            ready, token_id = tokens.tolist(), tokens[-1:]

    def tally(self, prompt_length: int, max_units: int | None = None) -> "UnitTally":
        return UnitTally(self.vocab.eot, self.cfg.text_vocab_size, self.unit_budget(prompt_length, max_units))

    def units_of(self, token_ids: Iterable[int]) -> list[int]:
        """Unit token ids (V..V+U-1) -> the HuBERT units they spell, in order."""
        first = self.cfg.text_vocab_size
        units: list[int] = []
        for token_id in token_ids:
            if not first <= token_id < first + self.cfg.unit_vocab_size:
                raise EchoXError(f"token id {token_id} is not a unit token (unit ids are "
                                 f"{first}..{first + self.cfg.unit_vocab_size - 1})")
            units.extend(self.vocab.units[token_id - first])
        return units


class UnitTally:
    """The host's view of one segment's decode: which new tokens are units, and when it ends
    (at eot, or once `budget` new tokens were written, whichever comes first)."""

    def __init__(self, eot: int, first_unit: int, budget: int):
        self.eot, self.first_unit, self.budget = eot, first_unit, budget
        self.produced, self.done = 0, False
        self.at_eot = False  # whether eot ended it (else the budget did, or it has not ended)

    def take(self, token_ids: list[int]) -> Iterator[int]:
        """The unit token ids among `token_ids`, the decoder's next tokens in order, up to the end."""
        for value in token_ids:
            if self.done:
                return
            if value == self.eot:
                self.done = self.at_eot = True
                return
            if value >= self.first_unit:
                yield value
            self.produced += 1
            self.done = self.produced == self.budget


def load_echo_decoder(model: "ModelFolder", dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> EchoDecoder:
    """The echo decoder of an EchoX model folder, with its KV cache allocated on `device`."""
    cfg = model.config.echo
    tensors = model.weights.take(echo_layout(cfg), "echo decoder", dtype, device, strip=ECHO_PREFIX)
    return EchoDecoder(cfg, EchoVocabulary.from_tokenizer(model.tokenizer, cfg), tensors)
