"""The Llama-3 tokenizer (via `tokenizers`), the exact EchoX prompt, and the unit-token table.

Every `tok(x)` in SPEC §5 is BOS followed by the tokens of x: the released code called the
tokenizer once per piece, so BOS repeats inside the prompt. Special ids are looked up by name,
never written as literals, so the same code serves the tiny test vocabulary.

Text is encoded as plain text only: the prompt's special tokens are placed by id, so nothing a
user types may ever become one. `tokenizers` matches its *added* tokens (`<|eot_id|>`,
`<audio_patch>`, the unit tokens) inside any text before the model sees it; its
`encode_special_tokens` switch stops that for special ones only, and unit tokens are added as
non-special. So text goes through a copy of the tokenizer without its added tokens, where
`<|eot_id|>` typed by a user is the ordinary characters it is made of.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from .config import AUDIO_PATCH_TOKEN
from .errors import EchoXError

SYSTEM_PROMPT = ("You are a helpful language and speech assistant. You are able to understand the speech "
                 "content that the user provides, and assist the user with a variety of tasks using natural "
                 "language.")
BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
LLAMA3_BOS_ID = 128000
# The released T2U text prefix ends in 12800, a typo for 128000 that the model was trained with.
RELEASED_PREFIX_TYPO_ID = 12800


def user_text(text, name: str = "text") -> str:
    """The text of a user turn as `Session.respond(text=...)` or `--text` gives it: "" for none
    (None or ""), else a str holding something besides whitespace that is valid Unicode (argv
    bytes that are not UTF-8 arrive as lone surrogates, which no tokenizer can encode). It may not
    name `<audio_patch>`: that marker stands for a turn's speech, and a user who types it expects
    speech where there is none; every other special-token string is kept as plain text."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise EchoXError(f"{name} must be a str, got {type(text).__name__}")
    if text and not text.strip():
        raise EchoXError(f"{name} is only whitespace: give a question, or leave it out")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EchoXError(f"{name} is not valid UTF-8 text (character {e.start} is a lone surrogate: an undecodable "
                         "byte, or half of a UTF-16 pair)") from None
    if AUDIO_PATCH_TOKEN in text:
        raise EchoXError(f"{name} contains {AUDIO_PATCH_TOKEN!r}, which is reserved for speech")
    return text


def without_added_tokens(hf: HFTokenizer) -> HFTokenizer:
    """The same tokenizer with no added tokens: it reads every string as ordinary text."""
    raw = json.loads(hf.to_str())
    raw["added_tokens"] = []
    return HFTokenizer.from_str(json.dumps(raw))


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str = ""
    audio: bool = False  # a user turn whose speech embeddings replace one <audio_patch>


class Tokenizer:
    def __init__(self, folder: Path | str):
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise EchoXError(f"{path}: file not found")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise EchoXError(f"{path}: not a valid tokenizer ({e})") from None
        self.path = path
        self.plain = without_added_tokens(self.hf)
        self.bos, self.eot = self.special_id(BOS), self.special_id(EOT)
        self.start_header, self.end_header = self.special_id(START_HEADER), self.special_id(END_HEADER)
        self.audio_patch = self.special_id(AUDIO_PATCH_TOKEN)
        self.pad = self.eot  # SPEC §5 quirk: pad == eos == <|eot_id|>
        self.period = self._period_id()

    def _period_id(self) -> int:
        """The id of ".", whose row of the output head scores sentence ends (the segmenter's cue)."""
        ids = self.encode(".")
        if len(ids) != 1:  # a vocabulary without "." encodes it to nothing, and [-1] of tok(".") was BOS
            raise EchoXError(f"{self.path}: '.' encodes to {len(ids)} tokens, expected one (the period)")
        return ids[0]

    def special_id(self, name: str) -> int:
        token_id = self.hf.token_to_id(name)
        if token_id is None:
            raise EchoXError(f"{self.path}: has no token {name!r}")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Ordinary text tokens only: special and unit token strings in `text` stay text."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def tok(self, text: str) -> list[int]:
        """What one call of the reference tokenizer gives: BOS + tokens."""
        return [self.bos] + self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def decode_stream(self) -> "TextStream":
        """Incremental `decode` for text that streams out one token at a time."""
        return TextStream(self.hf)

    def header(self, role: str) -> list[int]:
        return [self.start_header] + self.tok(role) + [self.end_header]

    def turn_ids(self, turn: Turn) -> list[int]:
        if turn.role == "user":
            user_text(turn.text)
            if turn.audio:
                return self.header("user") + self.tok("\n") + [self.audio_patch] + self.tok(turn.text) + [self.eot]
            if not turn.text:
                raise EchoXError("a user turn needs speech, text, or both")
            return self.header("user") + self.tok(turn.text) + [self.eot]
        if turn.role == "assistant":
            return self.header("assistant") + self.tok("\n") + self.tok(turn.text) + [self.eot]
        raise EchoXError(f"unknown role {turn.role!r} (expected 'user' or 'assistant')")

    def system_ids(self) -> list[int]:
        return [self.bos] + self.header("system") + self.tok("\n") + self.tok(SYSTEM_PROMPT) + [self.eot]

    def generation_header(self) -> list[int]:
        return self.header("assistant") + self.tok("\n")

    def prompt(self, turns: list[Turn]) -> list[int]:
        """System block, every turn in order, then the open assistant header (SPEC §5)."""
        ids = self.system_ids()
        for turn in turns:
            ids += self.turn_ids(turn)
        return ids + self.generation_header()

    def echo_prefixes(self) -> tuple[list[int], list[int]]:
        """P_text and P_unit of the echo decoder (SPEC §7), with the 12800 quirk for Llama-3."""
        last = RELEASED_PREFIX_TYPO_ID if self.bos == LLAMA3_BOS_ID else self.bos
        speaker = self.header("speaker") + self.tok("\n")
        return speaker + [last], [self.eot] + speaker

    def unit_table(self, text_vocab: int, unit_vocab: int) -> list[list[int]]:
        """Echo-decoder unit k (id text_vocab + k) -> the HuBERT units its token string spells."""
        table = []
        for token_id in range(text_vocab, text_vocab + unit_vocab):
            token = self.hf.id_to_token(token_id)
            if token is None:
                raise EchoXError(f"{self.path}: has no unit token with id {token_id} "
                                 f"(expected {unit_vocab} unit tokens after the {text_vocab} text tokens)")
            # Lengths are compared first: int() refuses a run of more than 4300 digits.
            table.append([int(run) for run in re.findall(r"\d+", token) if len(run.lstrip("0")) <= 3])
        return table


class TextStream:
    """`step(id)` gives the text one more token adds (special tokens skipped, as `decode` does), or
    None while it ends inside a multi-byte character; it costs one token, not the whole answer."""

    def __init__(self, hf: HFTokenizer):
        self.hf, self.stream = hf, DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str | None:
        return self.stream.step(self.hf, token_id)
