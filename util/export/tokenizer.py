"""A tokenizer as each export format stores it: the files a Hugging Face directory holds, and GGUF's vocabulary.

One class per tokenizer backend behind `TokenizerExport`; `tokenizer_export(path)` picks it from the file:
sentencepiece (`tokenizer.model`), a Hugging Face byte-level BPE `tokenizer.json`, and Llama 3's tiktoken
`tokenizer.model`. The two byte-level ones become GGUF's "gpt2" vocabulary (each token's bytes through GPT-2's
byte-to-unicode table, with the BPE merges).
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
    pre: str | None = None  # tokenizer.ggml.pre: llama.cpp's name for the split before BPE ("llama-bpe": Llama 3)


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
            raise ValueError(
                f"{self.path}: sentencepiece model type {proto.trainer_spec.model_type} (not BPE or "
                "unigram) cannot be exported to Hugging Face"
            )
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


def _pad_vocab(path: Path, vocab: GGUFVocab, vocab_size: int) -> GGUFVocab:
    """Embedding rows past the tokenizer (a vocabulary padded for efficiency) get placeholder tokens no text encodes
    to: llama.cpp requires one token per row."""
    n = len(vocab.tokens)
    if n > vocab_size:
        raise ValueError(f"{path}: {n} tokens, more than the model's vocab_size {vocab_size}")
    for i in range(n, vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.scores.append(-1000.0)
        vocab.token_types.append(UNUSED)
    return vocab


def _byte_level_pre(path: Path, pattern: str | None) -> str:
    """llama.cpp's pre-tokenizer name for a split pattern: only Llama 3's is known to give llama.cpp's ids."""
    from util.tokenizer.tiktoken_model import LLAMA3_PATTERN

    if pattern != LLAMA3_PATTERN:
        raise ValueError(
            f"{path}: its pre-tokenizer split pattern {pattern!r} is not Llama 3's; llama.cpp picks its split by "
            "name (tokenizer.ggml.pre) and would tokenize this text differently. GGUF export supports Llama 3's "
            "byte-level BPE and sentencepiece tokenizers"
        )
    return "llama-bpe"


def _hf_config(tok: Any, max_seq_len: int, **extra: Any) -> dict[str, Any]:
    """tokenizer_config.json for a PreTrainedTokenizerFast over tokenizer.json, with the source's chat template."""
    names = {i: t for t, i in tok._backend.specials.items()}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        **extra,
    }
    for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
        if i is not None:
            config[key] = names.get(i) or tok._backend.decode([i])
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    return config


class HFJsonExport(TokenizerExport):
    """A Hugging Face `tokenizer.json` (Llama 3 as Hugging Face ships it, most fast tokenizers)."""

    def __init__(self, path: Path) -> None:
        import json

        from util.tokenizer import Tokenizer

        self.path = path
        self.tok = Tokenizer(path)
        self.bos_id, self.eos_id = self.tok.bos_id, self.tok.eos_id
        self.spec = json.loads(path.read_text(encoding="utf-8"))

    def write_hf(self, out_dir: Path, *, max_seq_len: int) -> None:
        from util.tokenizer import copy_tokenizer

        if not (out_dir / "tokenizer.json").exists() or not (out_dir / "tokenizer.json").samefile(self.path):
            copy_tokenizer(self.path, out_dir)  # tokenizer.json with its tokenizer_config.json / special_tokens_map
        if not (out_dir / "tokenizer_config.json").is_file():  # transformers needs one to know bos / eos
            write_json(out_dir / "tokenizer_config.json", _hf_config(self.tok, max_seq_len))

    def _split_pattern(self) -> str | None:
        """The Split regex of a byte-level pre-tokenizer (None when there is none)."""

        def walk(pre: dict | None) -> list[dict]:
            if not pre:
                return []
            return [q for p in pre.get("pretokenizers", []) for q in walk(p)] if pre["type"] == "Sequence" else [pre]

        steps = walk(self.spec.get("pre_tokenizer"))
        if not any(s["type"] == "ByteLevel" for s in steps):
            raise ValueError(
                f'{self.path}: not a byte-level BPE (no ByteLevel pre-tokenizer); GGUF\'s "gpt2" vocabulary needs one'
            )
        return next((s["pattern"].get("Regex") for s in steps if s["type"] == "Split"), None)

    def gguf_vocab(self, vocab_size: int) -> GGUFVocab:
        model = self.spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{self.path}: model type {model.get('type')!r}; GGUF export supports BPE tokenizer.json")
        pre = _byte_level_pre(self.path, self._split_pattern())
        by_id = {i: t for t, i in model["vocab"].items()}
        types = dict.fromkeys(by_id, NORMAL)
        for added in self.spec.get("added_tokens", []):  # special ones are control tokens; others user-defined
            by_id[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
        n = max(by_id) + 1
        if len(by_id) != n:
            raise ValueError(f"{self.path}: token ids are not contiguous ({n - len(by_id)} missing below {n})")
        # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (newer ones)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        vocab = GGUFVocab(
            model="gpt2",
            tokens=[by_id[i] for i in range(n)],
            scores=[0.0] * n,
            token_types=[types[i] for i in range(n)],
            special_ids={k: v for k, v in (("bos", self.bos_id), ("eos", self.eos_id)) if v is not None},
            add_bos=self.tok.add_bos,
            merges=merges,
            pre=pre,
        )
        return _pad_vocab(self.path, vocab, vocab_size)


class TiktokenExport(TokenizerExport):
    """Llama 3's tiktoken `tokenizer.model` (Meta's ranks file) with its 256 special tokens."""

    def __init__(self, path: Path) -> None:
        from util.tokenizer import Tokenizer
        from util.tokenizer.tiktoken_model import read_ranks

        self.path = path
        self.tok = Tokenizer(path)
        self.bos_id, self.eos_id = self.tok.bos_id, self.tok.eos_id
        self.ranks = read_ranks(path)

    def write_hf(self, out_dir: Path, *, max_seq_len: int) -> None:
        """tokenizer.json built by transformers' own tiktoken converter (what users run on Meta's files), with the
        Llama 3 special tokens and <|begin_of_text|> in front as the tokenizer adds it."""
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import TikTokenConverter

        from util.tokenizer.tiktoken_model import LLAMA3_PATTERN

        specials = sorted(self.tok._backend.specials.items(), key=lambda kv: kv[1])
        tk = TikTokenConverter(
            vocab_file=str(self.path), pattern=LLAMA3_PATTERN, extra_special_tokens=[t for t, _ in specials]
        ).converted()
        for token, i in specials:  # the converter numbers them after the ranks: check it matches the ids we use
            if tk.token_to_id(token) != i:
                raise ValueError(f"{self.path}: special token {token} would get id {tk.token_to_id(token)}, not {i}")
        steps = [processors.ByteLevel(trim_offsets=False)]
        if self.tok.add_bos and self.bos_id is not None:
            bos = dict((i, t) for t, i in specials)[self.bos_id]
            steps.append(
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
                )
            )
        tk.post_processor = processors.Sequence(steps)
        tk.save(str(out_dir / "tokenizer.json"))
        # Meta's Llama 3 reads no special tokens out of text: text "<|eot_id|>" stays text, as ours encodes it
        write_json(out_dir / "tokenizer_config.json", _hf_config(self.tok, max_seq_len, split_special_tokens=True))

    def gguf_vocab(self, vocab_size: int) -> GGUFVocab:
        """Tokens as GPT-2's byte-to-unicode spelling of their bytes; each multi-byte token's merge is the pair
        that byte-pair encoding of its own bytes, using only lower ranks, ends with (how tiktoken builds it)."""
        from util.tokenizer.tiktoken_model import LLAMA3_PATTERN

        spell = _byte_unicode()
        by_rank = sorted(self.ranks.items(), key=lambda kv: kv[1])
        if [r for _, r in by_rank] != list(range(len(by_rank))):
            raise ValueError(f"{self.path}: ranks are not 0..{len(by_rank) - 1}; GGUF needs one token per id")
        tokens = ["".join(spell[b] for b in token) for token, _ in by_rank]
        merges = []
        for token, rank in by_rank:
            if len(token) > 1:
                left, right = _last_merge(self.ranks, token, rank)
                merges.append(f"{''.join(spell[b] for b in left)} {''.join(spell[b] for b in right)}")
        types = [NORMAL] * len(tokens)
        for token, i in sorted(self.tok._backend.specials.items(), key=lambda kv: kv[1]):
            if i != len(tokens):
                raise ValueError(f"{self.path}: special token {token} has id {i}, expected {len(tokens)}")
            tokens.append(token)
            types.append(CONTROL)
        vocab = GGUFVocab(
            model="gpt2",
            tokens=tokens,
            scores=[0.0] * len(tokens),
            token_types=types,
            special_ids={k: v for k, v in (("bos", self.bos_id), ("eos", self.eos_id)) if v is not None},
            add_bos=self.tok.add_bos,
            merges=merges,
            pre=_byte_level_pre(self.path, LLAMA3_PATTERN),
        )
        return _pad_vocab(self.path, vocab, vocab_size)


def _byte_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    rest (controls, space) are shifted to 256 and up, so every token is a visible string."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """Byte-pair encode `token` with the merges ranked below it: the two parts left are its merge."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


def tokenizer_export(path: str | Path) -> TokenizerExport:
    """The export view of a tokenizer file, or of a directory holding tokenizer.json or tokenizer.model."""
    from util.tokenizer import find_tokenizer

    path = Path(path)
    if path.is_dir() and (path / "tokenizer.model").is_file():
        # a directory with both (a Hugging Face export of a sentencepiece or tiktoken model): tokenizer.model is
        # the source, and GGUF stores a sentencepiece vocabulary as such, not as byte-level BPE
        path = path / "tokenizer.model"
    p, kind = find_tokenizer(path)
    if kind == "tokenizer.json":
        return HFJsonExport(p)
    if kind == "tiktoken":
        return TiktokenExport(p)
    return SentencePieceExport(p)
