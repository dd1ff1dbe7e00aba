"""A tokenizer as each export format stores it: the files a Hugging Face directory holds, and GGUF's vocabulary.

One class per tokenizer backend behind `TokenizerExport`; `tokenizer_export(path)` picks it from the file. Today:
sentencepiece (`tokenizer.model`). A Hugging Face tokenizer.json or Llama 3's tiktoken model plugs in as another
subclass (HF: copy tokenizer.json + tokenizer_config.json; GGUF: tokenizer.ggml.model "gpt2" with its merges).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from util.checkpoint.files import write_json

# GGUF's token types (llama.cpp's llama_token_type; gguf.TokenType has the same values)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    """What GGUF's tokenizer.ggml.* keys hold."""

    model: str  # tokenizer.ggml.model: "llama" (sentencepiece), "gpt2" (byte-level BPE)
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    special_ids: dict[str, int]  # "bos" / "eos" / "unk" / "pad" -> id
    add_bos: bool = True
    add_eos: bool = False
    merges: list[str] = field(default_factory=list)  # byte-level BPE only


class TokenizerExport:
    """A tokenizer file, as the export formats want it."""

    path: Path
    bos_id: int | None
    eos_id: int | None

    def check_plain_text(self) -> None:
        """Raise if Hugging Face or llama.cpp would tokenize text differently from this tokenizer."""

    def write_hf(self, out_dir: Path, *, max_seq_len: int) -> None:
        """The tokenizer files of a Hugging Face model directory (AutoTokenizer.from_pretrained reads them)."""
        raise NotImplementedError

    def gguf_vocab(self, vocab_size: int) -> GGUFVocab:
        """GGUF's vocabulary, padded to the model's `vocab_size` rows."""
        raise NotImplementedError


class SentencePieceExport(TokenizerExport):
    """Meta's / Hugging Face's LLaMA sentencepiece `tokenizer.model`."""

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        ids = (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id(), self.sp.pad_id())
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (i if i >= 0 else None for i in ids)

    def check_plain_text(self) -> None:
        """Refuse a model that normalizes text (sentencepiece's default nmt_nfkc: newlines to spaces, repeated spaces
        collapsed): transformers' Llama tokenizer and llama.cpp apply no normalizer (Meta's tokenizers have none),
        so they would give other ids. Tested by behaviour: such a model does not decode back what it encoded."""
        probe = "a  b\nc\td"
        if self.sp.DecodeIds(self.sp.EncodeAsIds(probe)) != probe:
            raise ValueError(
                f"{self.path}: this sentencepiece model normalizes text (it decodes {probe!r} as "
                f"{self.sp.DecodeIds(self.sp.EncodeAsIds(probe))!r}); Hugging Face and llama.cpp would tokenize "
                "differently. Use a tokenizer trained with normalization_rule_name='identity' and "
                "remove_extra_whitespaces=False, as Meta's are"
            )

    def _piece(self, i: int | None) -> str | None:
        return None if i is None else self.sp.IdToPiece(i)

    def write_hf(self, out_dir: Path, *, max_seq_len: int) -> None:
        self.check_plain_text()
        # tokenizer.json: sentencepiece's own pipeline in the `tokenizers` library, so AutoTokenizer gives the ids
        # this model was trained on. (transformers' LlamaTokenizer class would rebuild it with a Metaspace
        # pre-tokenizer, which adds no "▁" before text that starts with a space: other ids there.)
        # tokenizer.model is kept for sentencepiece users.
        if not (out_dir / "tokenizer.model").exists() or not (out_dir / "tokenizer.model").samefile(self.path):
            shutil.copyfile(self.path, out_dir / "tokenizer.model")
        self._hf_tokenizer().save(str(out_dir / "tokenizer.json"))
        special = {
            name: piece
            for name, piece in (
                ("bos_token", self._piece(self.bos_id)),
                ("eos_token", self._piece(self.eos_id)),
                ("unk_token", self._piece(self.unk_id)),
                ("pad_token", self._piece(self.pad_id)),
            )
            if piece is not None
        }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": self.bos_id is not None,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_seq_len,
            "split_special_tokens": True,  # "<s>" in text is text, as sentencepiece encodes it
        }
        write_json(out_dir / "tokenizer_config.json", config)
        write_json(out_dir / "special_tokens_map.json", special)

    def _proto(self) -> Any:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        return proto

    def _hf_tokenizer(self) -> Any:
        """sentencepiece's encoding as a `tokenizers` pipeline: spaces to "▁" (and one in front, sentencepiece's
        dummy prefix), then its BPE merges or unigram scores with byte fallback; bos in front."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

        proto = self._proto()
        n = self.sp.GetPieceSize()
        pieces = [self.sp.IdToPiece(i) for i in range(n)]
        unk = self._piece(self.unk_id)
        if proto.trainer_spec.model_type == 2:  # BPE: the merges are implied by the pieces, ranked by score
            vocab = {p: i for i, p in enumerate(pieces)}
            merges = []
            for i, piece in enumerate(pieces):
                if not (self.sp.IsControl(i) or self.sp.IsUnknown(i) or self.sp.IsByte(i)):
                    for k in range(1, len(piece)):
                        left, right = piece[:k], piece[k:]
                        if left in vocab and right in vocab:
                            merges.append((-self.sp.GetScore(i), vocab[left], vocab[right], left, right))
            merges.sort()
            model = models.BPE(
                vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True
            )
        elif proto.trainer_spec.model_type == 1:  # unigram: pieces with their log probabilities
            # control pieces ("<s>") are never matched in text by sentencepiece: a score no path would pick
            never = [self.sp.IsControl(i) or self.sp.IsUnknown(i) for i in range(n)]
            scores = [(p, -1e9 if never[i] else float(self.sp.GetScore(i))) for i, p in enumerate(pieces)]
            model = models.Unigram(scores, unk_id=self.unk_id, byte_fallback=True)
        else:
            raise ValueError(f"{self.path}: sentencepiece model type {proto.trainer_spec.model_type} (not BPE or "
                             "unigram) cannot be exported to Hugging Face")  # fmt: skip
        tok = Tokenizer(model)
        steps = [normalizers.Replace(" ", "▁")]
        if proto.normalizer_spec.add_dummy_prefix:
            steps.insert(0, normalizers.Prepend("▁"))
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = None
        decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if proto.normalizer_spec.add_dummy_prefix:
            decode.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(decode)
        tok.add_special_tokens(
            [AddedToken(pieces[i], special=True, normalized=False) for i in range(n) if self.sp.IsControl(i)]
            + ([AddedToken(unk, special=True, normalized=False)] if unk is not None else [])
        )
        if self.bos_id is not None:
            bos = pieces[self.bos_id]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
            )
        return tok

    def gguf_vocab(self, vocab_size: int) -> GGUFVocab:
        self.check_plain_text()
        n = self.sp.GetPieceSize()
        if n > vocab_size:
            raise ValueError(f"{self.path}: {n} tokens, more than the model's vocab_size {vocab_size}")
        tokens, scores, types = [], [], []
        for i in range(n):
            tokens.append(self.sp.IdToPiece(i))
            scores.append(float(self.sp.GetScore(i)))
            if self.sp.IsUnknown(i):
                types.append(UNKNOWN)
            elif self.sp.IsControl(i):
                types.append(CONTROL)
            elif self.sp.IsUnused(i):
                types.append(UNUSED)
            elif self.sp.IsByte(i):
                types.append(BYTE)
            else:
                types.append(NORMAL)
        # Embedding rows past the tokenizer (a vocabulary padded for efficiency) get placeholder tokens no text
        # encodes to: llama.cpp requires one token per row.
        for i in range(n, vocab_size):
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(UNUSED)
        special = {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id}
        return GGUFVocab(
            model="llama",
            tokens=tokens,
            scores=scores,
            token_types=types,
            special_ids={k: v for k, v in special.items() if v is not None},
            add_bos=self.bos_id is not None,
        )


def tokenizer_export(path: str | Path) -> TokenizerExport:
    """The export view of a tokenizer file (or a directory holding tokenizer.model)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.model").is_file():
            # TODO(tokenizers): tokenizer.json (Hugging Face) and Llama 3's tiktoken model, once util/tokenizer.py
            # reads them: a subclass each (copy the files for HF; GGUF "gpt2" vocabulary with merges).
            raise ValueError(
                f"{p}: no tokenizer.model in this directory; exporting supports sentencepiece tokenizer.model "
                "files today (pass --tokenizer_path path/to/tokenizer.model)"
            )
        p = p / "tokenizer.model"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {p} (pass --tokenizer_path path/to/tokenizer.model)")
    if p.name == "tokenizer.json" or p.suffix in (".json", ".tiktoken"):
        raise ValueError(f"{p}: exporting this tokenizer type is not supported yet; only sentencepiece .model files")
    return SentencePieceExport(p)
