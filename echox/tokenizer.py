"""The Llama-3 tokenizer (via `tokenizers`), the exact EchoX prompt, and the unit-token table.

Every `tok(x)` in SPEC §5 is BOS followed by the tokens of x: the released code called the
tokenizer once per piece, so BOS repeats inside the prompt. Special ids are looked up by name,
never written as literals, so the same code serves the tiny test vocabulary.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

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
        self.bos, self.eot = self.special_id(BOS), self.special_id(EOT)
        self.start_header, self.end_header = self.special_id(START_HEADER), self.special_id(END_HEADER)
        self.audio_patch = self.special_id(AUDIO_PATCH_TOKEN)
        self.pad = self.eot  # SPEC §5 quirk: pad == eos == <|eot_id|>
        self.period = self.tok(".")[-1]

    def special_id(self, name: str) -> int:
        token_id = self.hf.token_to_id(name)
        if token_id is None:
            raise EchoXError(f"{self.path}: has no token {name!r}")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def tok(self, text: str) -> list[int]:
        """What one call of the reference tokenizer gives: BOS + tokens."""
        return [self.bos] + self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def header(self, role: str) -> list[int]:
        return [self.start_header] + self.tok(role) + [self.end_header]

    def turn_ids(self, turn: Turn) -> list[int]:
        if turn.role == "user":
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
            table.append([int(run) for run in re.findall(r"\d+", token) if int(run) < 1000])
        return table
