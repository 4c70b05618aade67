"""The unit language: HuBERT unit sequences <-> unit tokens like `<|unit_12_345_7|>`.

The echo decoder does not write HuBERT units one by one: each of its unit tokens spells one or
more units, as the released `<|unit_a_b_c|>` tokens do. A vocabulary is built from unit
sequences by frequent-n-gram merges (byte-pair encoding over units): start from every unit value
seen, then repeatedly merge the most frequent adjacent pair of tokens whose units together are
at most `max_ngram` long, until the vocabulary has `size` tokens or no pair occurs twice.

Units are tokenized by greedy longest match from the left, which needs nothing but the token
strings: it serves a vocabulary built here and one read from a released tokenizer alike, and
round-trips exactly whenever every single unit is a token.

The tokens are written into `tokenizer.json` as added tokens right after the text vocabulary
(ids V, V+1, ...), which is where the engine's unit table (`Tokenizer.unit_table`) reads them:
the digit runs of a token's string, in order, are its units.
"""

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ..errors import EchoXError
from ..tokenizer import Tokenizer

HUBERT_UNITS = 1000


def unit_token_string(units: tuple[int, ...]) -> str:
    return "<|unit_" + "_".join(map(str, units)) + "|>"


@dataclass(frozen=True)
class UnitLanguage:
    tokens: tuple[tuple[int, ...], ...]  # unit token k -> the units it spells
    index: dict[tuple[int, ...], int] = field(init=False, repr=False, compare=False)
    longest: int = field(init=False, repr=False, compare=False)  # units of the longest token

    def __post_init__(self):
        index: dict[tuple[int, ...], int] = {}
        for k, units in enumerate(self.tokens):
            index.setdefault(units, k)  # a released vocabulary may spell the same units twice: use the first
        object.__setattr__(self, "index", index)
        # Once: `encode` asks at every position (a max over an 8k vocabulary each time was ~0.2 s per answer).
        object.__setattr__(self, "longest", max(map(len, index), default=0))

    @staticmethod
    def build(sequences: list[list[int]], size: int, max_ngram: int = 3) -> "UnitLanguage":
        """A vocabulary of at most `size` tokens: every unit value seen, then frequent merges."""
        alphabet = sorted({u for seq in sequences for u in seq})
        if not alphabet:
            raise EchoXError("no units to build a unit language from")
        if bad := [u for u in alphabet if not 0 <= u < HUBERT_UNITS]:
            raise EchoXError(f"unit values must be 0..{HUBERT_UNITS - 1}, got {bad[0]}")
        if size < len(alphabet):
            raise EchoXError(f"a unit language of {size} tokens cannot hold the {len(alphabet)} unit values seen")
        tokens = [(u,) for u in alphabet]
        known = {units: k for k, units in enumerate(tokens)}
        corpus = [[known[(u,)] for u in seq] for seq in sequences]
        while len(tokens) < size:
            pairs = Counter((a, b) for seq in corpus for a, b in zip(seq, seq[1:])
                            if len(tokens[a]) + len(tokens[b]) <= max_ngram)
            if not pairs:
                break
            # Most frequent first; among equals the smallest pair, so the result never depends on order.
            (a, b), count = max(pairs.items(), key=lambda item: (item[1], -item[0][0], -item[0][1]))
            if count < 2:
                break
            merged = tokens[a] + tokens[b]
            if merged not in known:
                known[merged] = len(tokens)
                tokens.append(merged)
            corpus = [_merge_pair(seq, a, b, known[merged]) for seq in corpus]
        return UnitLanguage(tuple(tokens))

    @staticmethod
    def from_tokenizer(tokenizer: Tokenizer, text_vocab: int, unit_vocab: int) -> "UnitLanguage":
        """The unit tokens a model folder's tokenizer already has (ids text_vocab ...)."""
        return UnitLanguage(tuple(tuple(units) for units in tokenizer.unit_table(text_vocab, unit_vocab)))

    def encode(self, units: list[int]) -> list[int]:
        """HuBERT units -> unit token indices k (token id V + k), greedy longest match."""
        out, i = [], 0
        while i < len(units):
            for n in range(min(self.longest, len(units) - i), 0, -1):
                k = self.index.get(tuple(units[i:i + n]))
                if k is not None:
                    out.append(k)
                    i += n
                    break
            else:
                raise EchoXError(f"unit {units[i]} has no token in this unit language")
        return out

    def decode(self, token_indices: list[int]) -> list[int]:
        """Unit token indices -> the HuBERT units they spell, in order."""
        return [u for k in token_indices for u in self.tokens[k]]

    def strings(self) -> list[str]:
        return [unit_token_string(units) for units in self.tokens]


def _merge_pair(seq: list[int], a: int, b: int, merged: int) -> list[int]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def write_unit_tokens(source: Path, target: Path, language: UnitLanguage, text_vocab: int):
    """Copy tokenizer.json from `source` to `target` with its unit tokens replaced by `language`'s,
    as added tokens with ids text_vocab, text_vocab + 1, ..."""
    raw = json.loads(source.read_text())
    vocab = raw.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict) and any(i >= text_vocab for i in vocab.values()):
        raise EchoXError(f"{source}: its base vocabulary uses ids >= {text_vocab}, where unit tokens belong")
    kept = [t for t in raw["added_tokens"] if t["id"] < text_vocab]
    added = [{"id": text_vocab + k, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": False} for k, text in enumerate(language.strings())]
    raw["added_tokens"] = kept + added
    target.write_text(json.dumps(raw, ensure_ascii=False, indent=2) + "\n")
    check = HFTokenizer.from_file(str(target))  # what the engine will read must be what was meant
    for entry in added:
        if check.token_to_id(entry["content"]) != entry["id"]:
            raise EchoXError(f"{target}: unit token {entry['content']} did not land on id {entry['id']}")
