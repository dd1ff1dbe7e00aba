"""SentencePiece tokenizer (Meta's and Hugging Face's LLaMA `tokenizer.model`), and training a small one."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if path.is_dir():  # a Hugging Face / Meta checkpoint directory holding tokenizer.model
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path} (expected a sentencepiece tokenizer.model)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([i for i in ids if 0 <= i < self.vocab_size])


def train_tokenizer(texts: Iterable[str], out_path: str | Path, *, vocab_size: int = 512) -> Tokenizer:
    """Train a small BPE sentencepiece model (LLaMA's special ids: unk 0, bos 1, eos 2), written atomically."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=os.cpu_count() or 1, minloglevel=2,
    )  # fmt: skip
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    return Tokenizer(out)
