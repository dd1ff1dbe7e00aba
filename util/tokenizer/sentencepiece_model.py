"""SentencePiece `tokenizer.model` (LLaMA 1 and 2, this project's quickstart tokenizer), and training a small one."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


class SentencePieceBackend:
    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.vocab_size()
        # sentencepiece answers -1 for a disabled bos/eos/pad
        self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())
        )
        self.add_bos = True  # Meta's LLaMA 1/2 prepend bos to every prompt

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        # sentencepiece never reads control symbols ("<s>") from text: allow_special changes nothing
        return self.sp.EncodeAsIds(text)

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        """ids and, per token, the utf-8 byte offset its text ends at (a byte-fallback piece: where its character
        starts, until the character's last byte)."""
        pieces = self.sp.encode(text, return_type="proto").pieces
        return [p.id for p in pieces], [p.end if p.end > p.begin else p.begin + 1 for p in pieces]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.DecodeIds(list(ids))  # control tokens (bos, eos) decode to nothing

    def token_id(self, token: str) -> int | None:
        i = self.sp.PieceToId(token)  # unknown pieces answer the unk id
        return i if self.sp.IdToPiece(i) == token else None


def train_tokenizer(
    texts: Iterable[str], out_path: str | Path, *, vocab_size: int = 512, llama_normalization: bool = False
):
    """Train a small BPE sentencepiece model (LLaMA's special ids: unk 0, bos 1, eos 2), written atomically.

    llama_normalization: keep the text as it is (newlines, runs of spaces), as LLaMA's own tokenizer does;
    the default (sentencepiece's nmt_nfkc) folds whitespace runs and newlines into single spaces."""
    import sentencepiece as spm

    from util.tokenizer import Tokenizer

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    llama = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False, "split_digits": True}
    normalization = llama if llama_normalization else {}
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(list(texts)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
        **normalization,
    )
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    return Tokenizer(out)
