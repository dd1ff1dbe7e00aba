"""Instruction data for fine-tuning: Alpaca-style and multi-turn conversation JSON, mixed per a YAML config.

    sources:                                   # data config (--data_config)
      - {path: alpaca_tiny.json, type: alpaca, ratio: 1.0}
      - {path: conversations_tiny.json, type: conversation, ratio: 0.5}

- alpaca: a JSON list (or JSON lines) of {"instruction": str, "input": str (optional), "output": str}
- conversation: a list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}
- image_conversation: a conversation with an image, {"image": "path.png", "conversations": [...]}; the path is
  relative to the JSON file's directory (or absolute). The image is checked when the file is loaded (Pillow's
  verify and a size limit: `max_image_pixels` in the source, default util.images.MAX_PIXELS) and read per item
  with the visual backbone's preprocessing (a model with visual_backbone); a batch stacks its images. An image
  that cannot be read is a bad record like any other: skipped and reported with its file, index and image path
  (also when only decoding it fails, mid-epoch: that item then takes the next record).

Prompts come from util.templates' chat format, chosen from the tokenizer (the chat demo uses the same one): this
project's template, Llama 2's [INST] or Llama 3's headers. Only response tokens are in the loss: labels are -100
elsewhere. Every record is validated when its file is loaded; a bad record (missing field,
wrong type, empty text) is reported with its file and index and skipped, or rejected with strict=True, so a
run never stops mid-epoch on bad data. Tokenization is lazy (per item, in the DataLoader workers).

`ResumableDistributedSampler` shards a seeded per-epoch permutation by data-parallel rank (model-parallel
ranks of one data-parallel group see the same samples) and resumes mid-epoch from (epoch, position).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from util.templates import (
    ALPACA_HEADER,
    ALPACA_HEADER_INPUT,
    BOS,
    CHAT_HEADER,
    DEFAULT_FORMAT,
    EOS,
    ChatFormat,
    Segments,
    chat_format_for,
)
from util.tokenizer import Tokenizer

if TYPE_CHECKING:
    from model.visual import ImagePreprocess

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATA_TYPES = ("alpaca", "conversation", "image_conversation")
_SOURCE_KEYS = {"path", "type", "ratio", "max_image_pixels"}
_CONFIG_EXAMPLE = "sources:\n  - {path: data/alpaca_tiny.json, type: alpaca, ratio: 1.0}"
_MAX_LISTED = 10


class DataError(ValueError):
    """Bad data or data config; the message names the file (and record) and how to fix it."""


@dataclass(frozen=True)
class DataSource:
    path: Path
    type: str  # one of DATA_TYPES
    ratio: float = 1.0  # records per epoch = round(ratio * valid records)
    max_image_pixels: int | None = None  # image_conversation: larger pictures are bad records (None: the default)


def load_data_config(path: str | Path) -> list[DataSource]:
    """Read and validate a YAML data config. Source paths are relative to the YAML's directory, or else to the
    working directory."""
    cfg_path = Path(path)
    if not cfg_path.is_file():
        raise DataError(f"data config not found: {cfg_path} (expected a YAML file like:\n{_CONFIG_EXAMPLE})")
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{cfg_path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("sources"), list) or not cfg["sources"]:
        raise DataError(f"{cfg_path}: expected a mapping with a non-empty 'sources' list, like:\n{_CONFIG_EXAMPLE}")
    sources = []
    for i, entry in enumerate(cfg["sources"]):
        where = f"{cfg_path}: sources[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping with path, type and ratio, got {entry!r}")
        unknown = sorted(set(entry) - _SOURCE_KEYS)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_SOURCE_KEYS)}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise DataError(f"{where}: 'path' (a JSON file) is missing")
        if entry.get("type") not in DATA_TYPES:
            raise DataError(f"{where}: type {entry.get('type')!r} is not one of {list(DATA_TYPES)}")
        ratio = entry.get("ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (ratio > 0 and math.isfinite(ratio)):
            raise DataError(f"{where}: ratio must be a number > 0 and finite, got {ratio!r}")
        pixels = entry.get("max_image_pixels")
        if pixels is not None and (
            entry["type"] != "image_conversation"
            or isinstance(pixels, bool)
            or not isinstance(pixels, int)
            or pixels <= 0
        ):
            raise DataError(
                f"{where}: max_image_pixels must be an integer > 0 on an image_conversation source, "
                f"got {pixels!r} on a {entry['type']} source"
            )
        raw = Path(entry["path"])
        candidates = [raw] if raw.is_absolute() else [cfg_path.parent / raw, Path.cwd() / raw]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(
                f"{where}: data file {entry['path']!r} not found (looked for {', '.join(map(str, candidates))}); "
                "fix the path in the config"
            )
        sources.append(DataSource(found, entry["type"], float(ratio), pixels))
    return sources


# ----------------------------------------------------------------------------------------------------
# Records -> prompt/response segments
# ----------------------------------------------------------------------------------------------------


def _text_field(rec: dict, key: str, *, required: bool = True) -> str | None:
    """The field's text, or raises ValueError with the reason the record is bad."""
    if key not in rec or (not required and rec[key] is None):
        if required:
            raise ValueError(f"missing field {key!r}")
        return None
    value = rec[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def alpaca_segments(rec: Any, fmt: ChatFormat = DEFAULT_FORMAT) -> Segments:
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object with instruction/input/output, got {type(rec).__name__}")
    instruction, output = _text_field(rec, "instruction"), _text_field(rec, "output")
    return fmt.instruction(instruction, _text_field(rec, "input", required=False), output)


def conversation_segments(rec: Any, fmt: ChatFormat = DEFAULT_FORMAT) -> Segments:
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        raise ValueError('expected an object with a "conversations" list')
    turns: list[tuple[str, str]] = []
    human: str | None = None
    for j, msg in enumerate(rec["conversations"]):
        if not isinstance(msg, dict):
            raise ValueError(f"conversations[{j}] is not an object with from/value")
        speaker = msg.get("from")
        if speaker not in ("human", "gpt"):
            raise ValueError(f'conversations[{j}]: "from" must be "human" or "gpt", got {speaker!r}')
        try:
            value = _text_field(msg, "value")
        except ValueError as e:
            raise ValueError(f"conversations[{j}]: {e}") from None
        expected = "human" if human is None else "gpt"
        if speaker != expected:
            raise ValueError(f"conversations[{j}]: expected a {expected} turn (turns alternate, human first)")
        if human is None:
            human = value
        else:
            turns.append((human, value))
            human = None
    if not turns:  # a trailing unanswered human turn is dropped; nothing answered at all is unusable
        raise ValueError("no answered human turn (nothing to learn)")
    return fmt.chat(turns)


def plain_segments(segments: Segments) -> Segments:
    """The record's own words without the prompt template, all of it as text to learn (base pre-training)."""
    text = "\n".join(_template_free(text) for text, _ in segments if isinstance(text, str)).strip()
    return [(BOS, False), (text, True), (EOS, True)]


def _template_free(text: str) -> str:
    for marker in ("### Instruction:\n", "### Input:\n", "### Response:\n", "### Human: ", "### Assistant: "):
        text = text.replace(marker, "")
    for header in (ALPACA_HEADER, ALPACA_HEADER_INPUT, CHAT_HEADER):
        text = text.replace(header, "")
    return " ".join(text.split())


_SEGMENTERS = {
    "alpaca": alpaca_segments,
    "conversation": conversation_segments,
    "image_conversation": conversation_segments,
}


@dataclass(frozen=True)
class ImageRecord:
    """Where a record's image is, and where the record came from (to report it if the image fails later)."""

    path: Path
    source: Path
    where: str  # the record's index in its file: "[3]" or "line 4"
    max_pixels: int


def _image_record(rec: dict, source: DataSource, where: str) -> ImageRecord:
    """The record's image file (relative paths against the JSON file's directory), checked to be readable:
    anything Pillow refuses, or a picture over the size limit, makes the record bad."""
    from util.images import MAX_PIXELS, ImageError, open_image

    value = rec.get("image")
    if not isinstance(value, str) or not value.strip():
        raise ValueError('missing field "image" (an image file path)')
    path = Path(value) if Path(value).is_absolute() else source.path.parent / value
    max_pixels = source.max_image_pixels or MAX_PIXELS
    try:
        open_image(path, max_pixels=max_pixels, decode=False)
    except ImageError as e:
        raise ValueError(f"image {e.path}: {e.reason}") from None
    return ImageRecord(path, source.path, where, max_pixels)


@dataclass
class _BadJson:
    reason: str


def _read_json_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs of a .json list or a .jsonl file; unreadable JSON is a DataError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((f"line {lineno}", _BadJson(f"not valid JSON ({e.msg} at column {e.colno})")))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); expected a list of records"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return [(f"[{i}]", rec) for i, rec in enumerate(data)]


def read_source(source: DataSource, *, strict: bool = False, fmt: ChatFormat = DEFAULT_FORMAT) -> list[Segments]:
    """The valid records of one source as segments. Bad records are logged (file and index) and skipped, or
    raise a DataError listing them when strict."""
    return [segments for segments, _ in read_records(source, strict=strict, fmt=fmt)]


def read_records(
    source: DataSource, *, strict: bool = False, fmt: ChatFormat = DEFAULT_FORMAT
) -> list[tuple[Segments, ImageRecord | None]]:
    """read_source with each record's image (image_conversation; None for text-only types)."""
    segmenter = _SEGMENTERS[source.type]
    records, problems = [], []
    for where, rec in _read_json_records(source.path):
        try:
            if isinstance(rec, _BadJson):
                raise ValueError(rec.reason)
            segments = segmenter(rec, fmt)
            image = _image_record(rec, source, where) if source.type == "image_conversation" else None
            records.append((segments, image))
        except ValueError as e:
            problems.append(f"{where}: {e}")
    total = len(records) + len(problems)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED]) + (
            f"; ... (+{len(problems) - _MAX_LISTED})" if len(problems) > _MAX_LISTED else ""
        )
        if strict:
            raise DataError(
                f"{source.path}: {len(problems)} of {total} {source.type} record(s) are bad: {listed}. Fix them, "
                "or run without --strict_data to skip them"
            )
        log.warning("%s: skipped %d of %d bad %s record(s): %s", source.path, len(problems), total, source.type, listed)
    if not records:
        raise DataError(
            f"{source.path}: no usable {source.type} records (of {total}); is the type right? "
            f"{'expected ' + ('instruction/input/output objects' if source.type == 'alpaca' else 'conversations')}"
        )
    return records


# ----------------------------------------------------------------------------------------------------
# Tokenization and the dataset
# ----------------------------------------------------------------------------------------------------


def encode_segments(
    segments: Segments,
    tokenizer: Tokenizer,
    max_words: int,
    *,
    train_on_prompt: bool = False,
    fmt: ChatFormat | None = None,
) -> tuple[list[int], list[int]]:
    """(tokens, labels) of a chat format's segments (bos ... eos or the format's end token), truncated to
    max_words. Labels are the tokens of the response segments (the end token included), IGNORE_INDEX elsewhere
    (everywhere but bos with train_on_prompt)."""
    tokens, response = (fmt or DEFAULT_FORMAT).encode(segments, tokenizer)
    labels = [t if r or (train_on_prompt and i > 0) else IGNORE_INDEX for i, (t, r) in enumerate(zip(tokens, response))]
    return tokens[:max_words], labels[:max_words]


class InstructionDataset(Dataset):
    """The mixture of the configured sources; item i -> (tokens, labels) LongTensors (tokenized on access), plus
    the preprocessed image [3, S, S] for image_conversation data (read on access with `preprocess`, the visual
    backbone's config: model.visual.preprocess; it may be set after the model is built, before the first item).

    plain: the records' words without prompt templates, every token in the loss (to pre-train a base on).
    chat_format: "auto" (from the tokenizer, util.templates.chat_format_for), "lazyllama", "llama2" or "llama3".
    """

    def __init__(
        self,
        sources: Sequence[DataSource],
        tokenizer_path: str | Path,
        *,
        max_words: int,
        seed: int = 0,
        strict: bool = False,
        train_on_prompt: bool = False,
        plain: bool = False,
        preprocess: ImagePreprocess | None = None,
        chat_format: str = "auto",
    ) -> None:
        if max_words < 2:
            raise ValueError(f"max_words={max_words}: need at least 2 tokens per example")
        self.tokenizer_path = Path(tokenizer_path)
        self.max_words, self.train_on_prompt = max_words, train_on_prompt
        self._tokenizer: Tokenizer | None = None
        # fails now (missing or bad tokenizer, a chat template of another format), not in a DataLoader worker
        self.format = DEFAULT_FORMAT if plain else chat_format_for(self.tokenizer, chat_format)
        self.items: list[Segments] = []
        self.images: list[ImageRecord | None] = []
        self.strict = strict
        self._unreadable: set[int] = set()  # items whose image failed to decode (in this process)
        self.preprocess = preprocess
        self.counts: dict[str, int] = {}
        kinds = {s.type == "image_conversation" for s in sources}
        if len(kinds) > 1:
            raise DataError(
                "the data config mixes image_conversation with text-only sources: a batch needs an image for every "
                "example (or none); train them in separate runs"
            )
        self.has_images = kinds == {True}
        for i, source in enumerate(sources):
            records = read_records(source, strict=strict, fmt=self.format)
            if plain:
                records = [(plain_segments(r), img) for r, img in records]
            # ratio: whole repeats plus a seeded subset (the same on every rank: seeded by config order only)
            n = max(1, round(source.ratio * len(records)))
            rng = random.Random(f"{seed}/{i}")
            chosen = list(range(len(records))) * (n // len(records)) + rng.sample(range(len(records)), n % len(records))
            self.items += [records[j][0] for j in chosen]
            self.images += [records[j][1] for j in chosen]
            self.counts[str(source.path)] = n

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __getstate__(self) -> dict:  # DataLoader workers reload the sentencepiece model from its path
        return {**self.__dict__, "_tokenizer": None}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.images[i] is None:
            return self._encode(i)
        if self.preprocess is None:
            raise DataError("image_conversation data needs the visual backbone's preprocessing: a visual model")
        from util.images import ImageError, load_image

        # An image that passed the check when the file was loaded can still fail to decode (truncated data):
        # the record is skipped like any bad record, and this item takes the next one that reads.
        for j in (k % len(self) for k in range(i, i + len(self))):
            record = self.images[j]
            if j in self._unreadable:
                continue
            try:
                image = load_image(record.path, self.preprocess, max_pixels=record.max_pixels)
            except ImageError as e:
                problem = f"{record.source}: {record.where}: image {e.path}: {e.reason}"
                if self.strict:
                    raise DataError(f"{problem}. Fix it, or run without --strict_data to skip it") from None
                log.warning("%s; skipped (item %d takes the next record)", problem, i)
                self._unreadable.add(j)
                continue
            return (*self._encode(j), image)
        raise DataError(f"none of the {len(self)} image_conversation items has an image that can be read")

    def _encode(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = encode_segments(
            self.items[i], self.tokenizer, self.max_words, train_on_prompt=self.train_on_prompt, fmt=self.format
        )
        return torch.tensor(tokens), torch.tensor(labels)


def source_texts(sources: Sequence[DataSource]) -> list[str]:
    """Every valid record's full text (prompt and answer), e.g. to train a tokenizer on."""
    return [
        "".join(text for text, _ in segments if isinstance(text, str))
        for source in sources
        for segments in read_source(source)
    ]


def collate(batch: Sequence[tuple[torch.Tensor, ...]], pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """Right-pad to the longest example (causal attention: padding after the text changes nothing before it);
    images (image_conversation items) are stacked: (tokens, labels, images [B, 3, S, S])."""
    length = max(item[0].numel() for item in batch)
    tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for i, (t, lab, *_) in enumerate(batch):
        tokens[i, : t.numel()], labels[i, : lab.numel()] = t, lab
    if len(batch[0]) > 2:
        return tokens, labels, torch.stack([item[2] for item in batch])
    return tokens, labels


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


class ResumableDistributedSampler(Sampler[int]):
    """A seeded permutation per epoch, padded by wrapping to a multiple of `world_size` and dealt out by `rank`
    (the data-parallel rank), resumable mid-epoch.

    State: (epoch, position), position = samples of this epoch this rank has consumed. The DataLoader may read
    ahead, so the training loop reports consumption with `advance()`; iterating starts at `position`.
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
            order = order.tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank :: self.world_size]

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        if not 0 <= position <= self.per_rank:
            raise ValueError(f"position={position} is outside this epoch's {self.per_rank} samples per rank")
        self.epoch, self.position = epoch, position

    def advance(self, n: int) -> None:
        self.position += n

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.position :])

    def __len__(self) -> int:
        return self.per_rank - self.position

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_samples", "world_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]}, this run "
                    f"{getattr(self, key)}; resume with the same data config, seed and number of data-parallel ranks"
                )
        self.set_epoch(state["epoch"], state["position"])


def make_loader(
    dataset: Dataset, sampler: ResumableDistributedSampler, *, batch_size: int, num_workers: int = 0, seed: int = 0
) -> DataLoader:
    """Whole batches only (every data-parallel rank takes the same number of steps). The loader has its own
    generator, so creating an iterator does not draw from the global RNG (resumed runs stay identical)."""
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=True),
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
