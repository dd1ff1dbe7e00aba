"""One Tokenizer over three kinds of files, detected from the path:

| file                                   | backend        | models                                        |
|----------------------------------------|----------------|-----------------------------------------------|
| tokenizer.model, sentencepiece proto   | sentencepiece  | LLaMA 1/2 (Meta and Hugging Face), quickstart  |
| tokenizer.json                         | tokenizers     | Hugging Face fast tokenizers (Llama 3 on HF)   |
| tokenizer.model, "base64 rank" lines   | tiktoken       | Llama 3 / 3.x as Meta ships it                 |

A directory is searched for tokenizer.json, then tokenizer.model. A tokenizer_config.json next to the file (Hugging
Face's) names bos/eos and the special tokens and holds the chat template (util.templates picks the chat format from
it); generation_config.json next to it may add end-of-answer ids (Llama 3.x instruct: eot, eom).

Text is encoded as text: special-token strings inside it ("<|eot_id|>", "</s>") are not read as special tokens unless
asked (allow_special=True), so data and chat messages cannot inject control tokens; chat formats place special
tokens by id. decode() drops special tokens.
"""

from __future__ import annotations

import bisect
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from util.tokenizer.sentencepiece_model import train_tokenizer

__all__ = ["Tokenizer", "copy_tokenizer", "find_tokenizer", "train_tokenizer"]

CONFIG_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def find_tokenizer(path: str | Path) -> tuple[Path, str]:
    """(the tokenizer file, its kind: "sentencepiece" | "tokenizer.json" | "tiktoken") for a file or a directory."""
    from util.tokenizer.tiktoken_model import looks_like_tiktoken

    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no tokenizer in {path}: expected tokenizer.json (Hugging Face) or tokenizer.model (sentencepiece, "
                "or Llama 3's tiktoken model); pass --tokenizer_path FILE"
            )
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(
            f"tokenizer not found: {path} (expected tokenizer.json, a tokenizer.model, or a directory holding one)"
        )
    if path.suffix == ".json":
        return path, "tokenizer.json"
    with path.open("rb") as f:
        head = f.read(4096)
    return path, "tiktoken" if looks_like_tiktoken(head) else "sentencepiece"


class Tokenizer:
    """encode / decode, bos / eos ids, the vocabulary size, and what the chat format needs (special token ids, the
    chat template, the ids that end an answer)."""

    def __init__(self, path: str | Path) -> None:
        self.path, self.kind = find_tokenizer(path)
        self.config = _read_json(self.path.parent / "tokenizer_config.json")
        if self.kind == "tokenizer.json":
            from util.tokenizer.hf_json import HFJsonBackend

            self._backend = HFJsonBackend(self.path)
        elif self.kind == "tiktoken":
            from util.tokenizer.tiktoken_model import TiktokenBackend

            self._backend = TiktokenBackend(self.path, _added_specials(self.config, self.path))
        else:
            from util.tokenizer.sentencepiece_model import SentencePieceBackend

            try:
                self._backend = SentencePieceBackend(self.path)
            except ValueError as e:
                raise ValueError(
                    f"{e}; nor Llama 3's tiktoken ranks (lines 'base64-token rank'). Expected a tokenizer.model or a "
                    "Hugging Face tokenizer.json"
                ) from None
        b = self._backend
        self.vocab_size: int = b.vocab_size
        self.bos_id: int | None = self._config_token("bos_token", b.bos_id)
        self.eos_id: int | None = self._config_token("eos_token", b.eos_id)
        self.pad_id: int | None = self._config_token("pad_token", b.pad_id)
        self.add_bos: bool = bool(self.config.get("add_bos_token", b.add_bos)) and self.bos_id is not None
        self.chat_template: str | None = _chat_template(self.config, self.path.parent)
        self.end_ids: tuple[int, ...] = self._end_ids()

    # --- text ---

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """allow_special: read special-token strings in the text as those tokens (as transformers does)."""
        ids = self._backend.encode(text, allow_special)
        return (
            ([self.bos_id] if bos and self.bos_id is not None else [])
            + ids
            + ([self.eos_id] if eos and self.eos_id is not None else [])
        )

    def encode_pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode the texts as one string (the ids are those of "".join(texts)) and say which ids came from which
        text: a token goes to the text holding its last byte. A chat template's prompt and answer tokenize as the
        whole conversation does, and the answer's tokens are known (for the loss)."""
        if len(texts) == 1:
            return [self._backend.encode(texts[0], False)]
        ids, ends = self._backend.encode_with_ends("".join(texts))
        bounds, at = [], 0
        for t in texts:
            at += len(t.encode())
            bounds.append(at)  # text j holds bytes [bounds[j-1], bounds[j])
        out: list[list[int]] = [[] for _ in texts]
        for i, end in zip(ids, ends):
            out[min(bisect.bisect_right(bounds, end - 1), len(texts) - 1)].append(i)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; special tokens and ids outside the vocabulary are dropped."""
        return self._backend.decode([i for i in ids if 0 <= i < self.vocab_size])

    def token_id(self, token: str) -> int | None:
        """The id of a token given by its text (special tokens included), None if the vocabulary lacks it."""
        return self._backend.token_id(token)

    def save(self, out_dir: str | Path) -> None:
        """Copy the tokenizer's files into out_dir (tokenizer.model or tokenizer.json, and its config files)."""
        copy_tokenizer(self.path, out_dir)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, kind={self.kind}, vocab_size={self.vocab_size})"

    # --- config ---

    def _config_token(self, key: str, default: int | None) -> int | None:
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if not isinstance(value, str):
            return default
        found = self.token_id(value)
        if found is None:
            raise ValueError(
                f"{self.path.parent / 'tokenizer_config.json'}: {key} {value!r} is not in the vocabulary of {self.path}"
            )
        return found

    def _end_ids(self) -> tuple[int, ...]:
        ids = [] if self.eos_id is None else [self.eos_id]
        generation = _read_json(self.path.parent / "generation_config.json").get("eos_token_id")
        for i in generation if isinstance(generation, list) else [generation]:
            if isinstance(i, int) and 0 <= i < self.vocab_size and i not in ids:
                ids.append(i)
        return tuple(ids)


def copy_tokenizer(src: str | Path, out_dir: str | Path) -> Path:
    """Copy a tokenizer (file or directory, as Tokenizer takes it) into out_dir under its standard name, with its
    tokenizer_config.json / chat_template.jinja / special_tokens_map.json; returns the copied tokenizer file."""
    path, kind = find_tokenizer(src)
    out_dir = Path(out_dir)
    dest = out_dir / ("tokenizer.json" if kind == "tokenizer.json" else "tokenizer.model")
    shutil.copyfile(path, dest)
    for name in CONFIG_FILES:
        if (path.parent / name).is_file():
            shutil.copyfile(path.parent / name, out_dir / name)
    return dest


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _chat_template(config: dict, folder: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = folder / "chat_template.jinja"  # transformers >= 4.43 writes it as its own file
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _added_specials(config: dict, path: Path) -> dict[str, int] | None:
    """tokenizer_config.json's added_tokens_decoder ({"128000": {"content": "<|begin_of_text|>", ...}}) as
    {token: id}; None without one (then Llama 3's own list applies)."""
    added = config.get("added_tokens_decoder")
    if not added:
        return None
    try:
        return {(v["content"] if isinstance(v, dict) else str(v)): int(k) for k, v in added.items()}
    except (KeyError, ValueError, TypeError):
        raise ValueError(
            f"{path.parent / 'tokenizer_config.json'}: added_tokens_decoder must map ids to {{'content': token}}"
        ) from None
