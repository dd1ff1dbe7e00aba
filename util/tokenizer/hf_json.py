"""Hugging Face `tokenizer.json` through the `tokenizers` library (Llama 3's Hugging Face tokenizer, converted
LLaMA 2 tokenizers, and most fast tokenizers)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path


class HFJsonBackend:
    kind = "tokenizer.json"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            text = path.read_text(encoding="utf-8")
            spec = json.loads(text)
            self.tk = RustTokenizer.from_str(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json (not JSON: {e})") from None
        except Exception as e:  # the Rust side raises plain Exception for a malformed spec
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json the tokenizers library reads ({e})") from None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        # what the post-processor adds around a single text: its special tokens before and after "$A"
        before, after = _template_specials(spec.get("post_processor"))
        self.bos_id = self.token_id(before[0]) if before else _first_id(self, ("<s>", "<|begin_of_text|>"))
        self.eos_id = self.token_id(after[-1]) if after else _first_id(self, ("</s>", "<|end_of_text|>"))
        self.pad_id = None
        self.add_bos = bool(before)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        self._special_text(allow_special)
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        self._special_text(False)
        enc = self.tk.encode(text, add_special_tokens=False)
        byte_at = list(itertools.accumulate((len(c.encode()) for c in text), initial=0))  # char offset -> byte
        return enc.ids, [byte_at[min(max(end, start + 1), len(text))] for start, end in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def _special_text(self, allow: bool) -> None:
        # tokenizers reads added special tokens out of the text unless told to split them like any text
        if self.tk.encode_special_tokens == allow:
            self.tk.encode_special_tokens = not allow


def _first_id(backend: HFJsonBackend, names: tuple[str, ...]) -> int | None:
    return next((i for i in map(backend.token_id, names) if i is not None), None)


def _template_specials(processor: dict | None) -> tuple[list[str], list[str]]:
    """The special tokens a TemplateProcessing post-processor puts before and after a single sequence."""
    if not processor:
        return [], []
    if processor.get("type") == "Sequence":
        for p in processor.get("processors", []):
            found = _template_specials(p)
            if found != ([], []):
                return found
        return [], []
    if processor.get("type") != "TemplateProcessing":
        return [], []
    before, after, seen_text = [], [], False
    for piece in processor.get("single", []):
        if "Sequence" in piece:
            seen_text = True
        elif "SpecialToken" in piece:
            (after if seen_text else before).append(piece["SpecialToken"]["id"])
    return before, after
