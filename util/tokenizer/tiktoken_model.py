"""Llama 3's `tokenizer.model`: tiktoken byte-level BPE ranks (one "base64-token rank" line each; 128,000 in
Meta's file), Llama 3's pre-tokenization pattern, and 256 special tokens numbered after the ranks."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path

# Llama 3's split of text into words before BPE (contractions, letters, 1-3 digits, punctuation, newlines, spaces)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL = 256


def llama3_special_tokens(base: int) -> dict[str, int]:
    """Llama 3.1's special tokens numbered from `base` (the number of ranks). Llama 3.0 named ids base+4, +5, +8
    and +10 reserved tokens instead; the tokens the chat format uses (begin/end of text, headers, eot) agree."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL - len(named))]
    return {token: base + i for i, token in enumerate(named + reserved)}


def looks_like_tiktoken(head: bytes) -> bool:
    """The start of a tiktoken ranks file: a base64 token, a space, a number (a sentencepiece model is binary)."""
    first = head.split(b"\n", 1)[0].strip()
    parts = first.split(b" ")
    return len(parts) == 2 and parts[1].isdigit() and all(c in _B64 for c in parts[0])


_B64 = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path}: line {lineno} is not 'base64-token rank' ({line[:60]!r}): not a tiktoken ranks file "
                "(Llama 3's tokenizer.model)"
            ) from None
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: two tokens share a rank: not a tiktoken ranks file")
    return ranks


class TiktokenBackend:
    kind = "tiktoken"

    def __init__(self, path: Path, specials: dict[str, int] | None = None) -> None:
        import tiktoken

        ranks = read_ranks(path)
        if not ranks:
            raise ValueError(f"{path}: empty tiktoken ranks file")
        self.specials = specials or llama3_special_tokens(len(ranks))
        self.enc = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.specials
        )
        self.vocab_size = self.enc.n_vocab
        self._special_ids = set(self.specials.values())
        self.bos_id, self.eos_id = self.token_id("<|begin_of_text|>"), self.token_id("<|end_of_text|>")
        self.pad_id = None
        self.add_bos = True

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        # Meta's Llama 3 reads no special tokens out of text (allowed_special=set(), disallowed_special=())
        return self.enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.encode(text)
        ends, at = [], 0
        for i in ids:
            at += len(self.enc.decode_single_token_bytes(i))
            ends.append(at)
        return ids, ends

    def decode(self, ids: Sequence[int]) -> str:
        # a character split across tokens decodes to U+FFFD until its last byte arrives (streaming holds it back)
        return self.enc.decode([i for i in ids if i not in self._special_ids], errors="replace")

    def token_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        try:
            return self.enc.encode_single_token(token.encode())
        except KeyError:
            return None
