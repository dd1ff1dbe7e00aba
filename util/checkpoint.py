"""Checkpoint formats: Meta `.pth` shards, Hugging Face safetensors, and this project's own sharded saves.

Every format is read through one interface, `CheckpointReader`, under Meta LLaMA's tensor names
(`tok_embeddings.weight`, `layers.{i}.attention.wq.weight`, ...). Keys this module does not know (LoRA,
adapters, `rope.freqs`) pass through unchanged. A reader hands out one model-parallel rank's slice of any
tensor, whatever the model-parallel size the checkpoint was saved with: it slices each saved shard and
concatenates only the overlapping pieces, and when the answer is one stored tensor (or a `narrow()` of it) it
returns a view into the memory-mapped file, so nothing is copied and `release()` can give the pages back.

Formats (see `open_checkpoint` for how a path is recognised):
- "meta": `params.json` + `consolidated.NN.pth`, one zip-format torch file per rank. Loaded with
  `torch.load(mmap=True, weights_only=True)` only: a pickle that would run code is refused, never retried
  unsafely.
- "hf": `config.json` + `model.safetensors` or `model-0000N-of-0000M.safetensors` + index. Names are mapped to
  Meta's, and the q/k row permutation HF applies for its rotate_half RoPE is undone.
- "lazyllama": `params.json` + `lazyllama.json` + `consolidated.NN.safetensors` per rank, written by
  `save_checkpoint` (atomically, per file). lazyllama.json records each key's split dim, so any saved
  model-parallel size reads at any other.
- pre-quantized lazyllama (`save_quantized`): the same layout, with each quantized linear's weight stored as its
  packed data + quantization state (`<weight key>.packed`, `.absmax`, ... or `.CB`, `.SCB`: see
  `QuantLinear.packed_layout`) instead of `<weight key>`, and a "quantization" section in lazyllama.json (and in
  every rank file's metadata) recording the settings and each packed weight. Packed data depends on the
  model-parallel split, so such a checkpoint loads only at the model-parallel size it was saved with.

Safetensors files are parsed here (8-byte header length, JSON header, raw data) and mapped once with
`torch.UntypedStorage.from_file(shared=False)`; the mapping is private and read-only in use, so a released
page is simply read from the file again.

This module is pure tensor-level: it imports nothing from `model/` or `util/lazy_init.py`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import pickle
import re
import struct
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from util.hf_config import hf_config_to_params

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "open_checkpoint",
    "save_checkpoint",
    "write_meta_checkpoint",
    "write_hf_checkpoint",
    "meta_split_dim",
    "hf_to_meta_name",
    "meta_to_hf_name",
    "hf_permute_qk",
    "hf_unpermute_qk",
    "hf_config_to_params",
    "model_state",
    "save_model",
    "save_quantized",
    "packed_key",
    "export_meta",
]

FORMAT_VERSION = 1
OWN_INDEX = "lazyllama.json"


class CheckpointError(ValueError):
    """A checkpoint file or directory is not what was expected; the message names the file and key."""


# ----------------------------------------------------------------------------------------------------
# Names and layouts
# ----------------------------------------------------------------------------------------------------

# Meta's model-parallel layout: column-parallel weights are split on dim 0, row-parallel ones and the
# embedding on dim 1, norms replicated. "unknown" marks names Meta's layout does not cover (LoRA, adapters,
# ...).
_META_LAYER_SPLIT: dict[str, int | None] = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
_META_TOP_SPLIT: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "rope.freqs": None,
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_UNKNOWN = "unknown"


def _meta_rule(key: str) -> int | None | str:
    """Meta's split dim for `key`, None for replicated, or "unknown" for a name outside Meta's layout."""
    if key in _META_TOP_SPLIT:
        return _META_TOP_SPLIT[key]
    m = _LAYER_RE.fullmatch(key)
    if m and m.group(2) in _META_LAYER_SPLIT:
        return _META_LAYER_SPLIT[m.group(2)]
    return _UNKNOWN


def meta_split_dim(key: str) -> int | None:
    """The dim Meta's checkpoints split `key` on across model-parallel ranks (None: replicated or unknown)."""
    rule = _meta_rule(key)
    return None if rule == _UNKNOWN else rule  # type: ignore[return-value]


_HF_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_META_TOP_TO_HF = {v: k for k, v in _HF_TOP.items()}
_META_LAYER_TO_HF = {v: k for k, v in _HF_LAYER.items()}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_to_meta_name(name: str) -> str | None:
    """Meta's name for a Hugging Face LLaMA tensor name; None for keys to ignore; unknown names unchanged."""
    if name.endswith("rotary_emb.inv_freq"):  # a cached RoPE table some HF versions save; recomputed by the model
        return None
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return name


def meta_to_hf_name(name: str) -> str:
    """Hugging Face's name for a Meta LLaMA tensor name; unknown names unchanged."""
    if name in _META_TOP_TO_HF:
        return _META_TOP_TO_HF[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _META_LAYER_TO_HF:
        return f"model.layers.{m.group(1)}.{_META_LAYER_TO_HF[m.group(2)]}"
    return name


def _qk_heads_param(key: str) -> str | None:
    """Which config field counts the heads of a q/k projection HF permutes ("n_heads"/"n_kv_heads")."""
    m = _LAYER_RE.fullmatch(key)
    if m and m.group(2) == "attention.wq.weight":
        return "n_heads"
    if m and m.group(2) == "attention.wk.weight":
        return "n_kv_heads"
    return None


def _check_qk(w: torch.Tensor, n_heads: int, what: str) -> int:
    if w.dim() != 2 or n_heads <= 0 or w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise CheckpointError(
            f"{what}: cannot undo/apply the Hugging Face q/k permutation to shape {tuple(w.shape)} with "
            f"{n_heads} heads (expected a 2-D weight whose rows are n_heads * an even head_dim); "
            "check num_attention_heads / num_key_value_heads in the config"
        )
    return w.shape[0] // n_heads


def hf_permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF layout of a q/k projection (as HF's convert_llama_weights_to_hf.py does).

    Meta's RoPE rotates interleaved pairs (rows 2j, 2j+1 of each head); HF's rotate_half pairs row j with row
    j + head_dim/2. So HF row j of a head is Meta row 2j and HF row head_dim/2 + j is Meta row 2j + 1.
    """
    head_dim = _check_qk(w, n_heads, "hf_permute_qk")
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def hf_unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta layout of a q/k projection: the exact inverse of `hf_permute_qk`. Works on whole heads."""
    head_dim = _check_qk(w, n_heads, "hf_unpermute_qk")
    return w.reshape(n_heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _ffn_hidden_dim(params: Mapping[str, Any]) -> int:
    """SwiGLU hidden size by Meta's rule unless given explicitly (same rule as ModelArgs.hidden_dim)."""
    if params.get("ffn_hidden_dim") is not None:
        return int(params["ffn_hidden_dim"])
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    return multiple_of * math.ceil(hidden / multiple_of)


# ----------------------------------------------------------------------------------------------------
# Memory: giving mmap'd pages back
# ----------------------------------------------------------------------------------------------------

_MADV_DONTNEED = 4  # Linux value
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LIBC: Any = None
if sys.platform.startswith("linux"):
    try:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _LIBC.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # no libc symbol: release() becomes a no-op
        _LIBC = None


def _dontneed(addr: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) the pages covering [addr, addr+nbytes) of a private, file-backed mapping.

    Only ever called on ranges inside file mappings this module made (or torch.load(mmap=True) made): there
    the kernel drops the pages and re-reads them from the file on the next touch. The range is widened to
    whole pages; neighbouring tensors sharing an edge page simply fault it back in. Best effort: errors are
    ignored because releasing is an optimisation, never needed for correctness.
    """
    if _LIBC is None or nbytes <= 0:
        return
    start = addr - addr % _PAGE
    end = -(-(addr + nbytes) // _PAGE) * _PAGE
    _LIBC.madvise(start, end - start, _MADV_DONTNEED)


def _tensor_span(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the memory a strided tensor touches."""
    if t.numel() == 0:
        return t.data_ptr(), 0
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), extent * t.element_size()


# ----------------------------------------------------------------------------------------------------
# safetensors: parse, map, write
# ----------------------------------------------------------------------------------------------------

_ST_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in [
        ("F64", torch.float64),
        ("F32", torch.float32),
        ("F16", torch.float16),
        ("BF16", torch.bfloat16),
        ("I64", torch.int64),
        ("I32", torch.int32),
        ("I16", torch.int16),
        ("I8", torch.int8),
        ("U8", torch.uint8),
        ("BOOL", torch.bool),
        ("U16", getattr(torch, "uint16", None)),
        ("U32", getattr(torch, "uint32", None)),
        ("U64", getattr(torch, "uint64", None)),
        ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
        ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
        ("C64", torch.complex64),
    ]
    if dtype is not None
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


@dataclass(frozen=True)
class _StEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class _SafetensorsFile:
    """One safetensors file: header parsed and validated, data mapped once (private mapping)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(
                        f"{path}: {size} bytes, too short for a safetensors file (needs an 8-byte header "
                        "length); the file is truncated or not safetensors"
                    )
                (header_len,) = struct.unpack("<Q", head)
                if header_len > size - 8:
                    raise CheckpointError(
                        f"{path}: header length {header_len} is beyond the file size {size}; the file is "
                        "truncated or not safetensors"
                    )
                raw = f.read(header_len)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); corrupt file?") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the safetensors header is not a JSON object; corrupt file?")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: __metadata__ in the safetensors header must be an object of strings")
        self.metadata: dict[str, str] = meta
        data_start = 8 + header_len
        self.entries: dict[str, _StEntry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_start, size)
        self.size = size
        # One mapping for the whole file; tensors are views at their offsets. shared=False: MAP_PRIVATE, so
        # nothing is ever written back and MADV_DONTNEED simply drops pages (re-read from the file when
        # touched).
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        self._bytes: torch.Tensor | None = torch.empty(0, dtype=torch.uint8).set_(storage)

    def _entry(self, name: str, info: Any, data_start: int, size: int) -> _StEntry:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {info.get('dtype')!r}; expected one of {sorted(_ST_DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end] with begin <= end")
        begin, end = data_start + offsets[0], data_start + offsets[1]
        if end > size:
            raise CheckpointError(
                f"{where}: data ends at byte {end} but the file has {size} bytes; the file is truncated "
                "(copy or download it again)"
            )
        nbytes = math.prod(shape) * _itemsize(dtype)
        if end - begin != nbytes:
            raise CheckpointError(
                f"{where}: {end - begin} bytes of data for shape {shape} of {info['dtype']} (expected {nbytes})"
            )
        return _StEntry(dtype, tuple(shape), begin, end)

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor as a view into the mapping (a copy only if its offset is misaligned)."""
        if self._bytes is None:
            raise CheckpointError(f"{self.path}: the reader was closed; open the checkpoint again")
        e = self.entries[name]
        raw = self._bytes[e.begin : e.end]
        item = _itemsize(e.dtype)
        if e.begin % item:
            # torch cannot view bytes at a misaligned offset as a wider dtype; files written by safetensors or
            # by this module are aligned, so this copy happens only for unusual third-party writers.
            raw = raw.clone()
        return raw.view(e.dtype).view(e.shape)

    def release(self, name: str) -> None:
        if self._bytes is not None:
            e = self.entries[name]
            _dontneed(self._bytes.data_ptr() + e.begin, e.end - e.begin)

    def close(self) -> None:
        # Views already handed out keep the mapping alive; it is unmapped when the last of them goes.
        self._bytes = None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass
class _WriteItem:
    """A tensor to write: name, dtype and shape (for the header), and how to produce it at its turn."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of one tensor (a contiguous CPU copy made only if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _write_safetensors(f: IO[bytes], items: list[_WriteItem], metadata: Mapping[str, str] | None) -> None:
    """Stream a safetensors file: header first, then each tensor's bytes, one tensor in memory at a time.

    Written here rather than with safetensors.torch.save_file, which needs every tensor contiguous and alive
    at once (and refuses views sharing storage); the output is the same format (checked against the library in
    the tests). Tensors are ordered by descending element size, as the library does, so every offset is
    aligned for its dtype and readers can map tensors without copying.
    """
    if sys.byteorder != "little":
        raise CheckpointError("writing safetensors on a big-endian machine is not supported")
    # Largest elements first; sorted() is stable, so the caller's order holds within one element size.
    items = sorted(items, key=lambda it: -_itemsize(it.dtype))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for it in items:
        if it.dtype not in _ST_NAMES:
            raise CheckpointError(f"tensor {it.name!r}: dtype {it.dtype} cannot be stored in safetensors")
        nbytes = math.prod(it.shape) * _itemsize(it.dtype)
        header[it.name] = {
            "dtype": _ST_NAMES[it.dtype],
            "shape": list(it.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data section starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for it in items:
        t = it.produce()
        if t.dtype != it.dtype or tuple(t.shape) != it.shape:
            raise CheckpointError(
                f"tensor {it.name!r}: produced {t.dtype} {tuple(t.shape)} but {it.dtype} {it.shape} was "
                "declared (was it modified while being saved?)"
            )
        f.write(_tensor_bytes(t))
        del t


# ----------------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _atomic_write(path: Path) -> Iterator[IO[bytes]]:
    """Write `path` via a temp file in the same directory, fsync, and os.replace: readers (and a crash) see
    either the old file or the complete new one. On an exception the temp file is removed and `path` is
    untouched.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with 0o666 honours the umask, unlike tempfile.mkstemp's 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    with _atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config fields, got {type(cfg).__name__}")
    return cfg


# ----------------------------------------------------------------------------------------------------
# Reader base: layouts and resharding
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One stored tensor that holds (part of) a key."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]  # the stored tensor, as a view into the mapped file
    release: Callable[[], None]
    # (file path, byte offset of the tensor's data) where its raw bytes can be read with pread; None: mapped only
    location: tuple[str, int] | None = None


@dataclass(frozen=True)
class _Layout:
    """How a key's full tensor is stored: `pieces` concatenated along `saved_dim` (None: replicated)."""

    saved_dim: int | None
    pieces: list[_Piece]
    shape: tuple[int, ...]
    dtype: torch.dtype


def _merge_layout(key: str, saved_dim: int | None, pieces: list[_Piece]) -> _Layout:
    """Check the pieces fit together along saved_dim and compute the full shape."""
    first = pieces[0]
    if saved_dim is None or len(pieces) == 1:
        return _Layout(None, pieces[:1], first.shape, first.dtype)
    for p in pieces[1:]:
        if p.dtype != first.dtype:
            raise CheckpointError(
                f"key {key!r}: dtype {p.dtype} in {p.file} but {first.dtype} in {first.file}; the shards of "
                "one tensor must share a dtype"
            )
        if len(p.shape) != len(first.shape) or any(
            a != b for i, (a, b) in enumerate(zip(p.shape, first.shape)) if i != saved_dim
        ):
            raise CheckpointError(
                f"key {key!r}: shape {p.shape} in {p.file} does not concatenate with {first.shape} in "
                f"{first.file} along dim {saved_dim}"
            )
    shape = list(first.shape)
    shape[saved_dim] = sum(p.shape[saved_dim] for p in pieces)
    return _Layout(saved_dim, pieces, tuple(shape), first.dtype)


def _assemble(layout: _Layout, d: int | None, lo: int, hi: int) -> torch.Tensor:
    """The slice [lo, hi) along dim d of the full tensor (d None: all of it), touching only the pieces needed.

    One contributing piece: a view of it (narrowed) - no copy. Several: narrow each, then one torch.cat.
    """
    s = layout.saved_dim
    if s is None:
        t = layout.pieces[0].load()
        return t if d is None else t.narrow(d, lo, hi - lo)
    parts = []
    start = 0
    for p in layout.pieces:
        end = start + p.shape[s]
        if d == s:
            a, b = max(start, lo), min(end, hi)
            if a < b:
                parts.append(p.load().narrow(s, a - start, b - a))
        else:
            t = p.load()
            parts.append(t if d is None else t.narrow(d, lo, hi - lo))
        start = end
    if len(parts) == 1:
        return parts[0]
    if not parts:  # an empty request (a zero-size dim)
        shape = list(layout.shape)
        if d is not None:
            shape[d] = hi - lo
        return torch.empty(shape, dtype=layout.dtype)
    return torch.cat(parts, dim=s)


def _pread_into(path: str, offset: int, buf: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        done = 0
        while done < len(buf):  # Linux reads at most ~2 GiB per call
            got = os.preadv(fd, [buf[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(
                    f"{path}: the file ended {len(buf) - done} bytes early at byte {offset + done}; the file is "
                    "truncated (copy or download it again)"
                )
            done += got
    finally:
        os.close(fd)


def _pread_slice(layout: _Layout, d: int | None, lo: int, hi: int, out: torch.Tensor) -> bool:
    """Read rows [lo, hi) (d == 0) or everything (d None) of a tensor stored whole or split on dim 0 straight
    into `out` with pread. False (nothing done) where that does not apply: out not a contiguous CPU tensor of the
    stored dtype and the slice's size, a piece without a file location, or a slice that is not contiguous bytes."""
    if not hasattr(os, "preadv") or out.device.type != "cpu" or not out.is_contiguous() or out.dtype != layout.dtype:
        return False
    if d not in (None, 0) or layout.saved_dim not in (None, 0) or any(p.location is None for p in layout.pieces):
        return False
    shape = list(layout.shape)
    if d == 0:
        shape[0] = hi - lo
    if out.numel() != math.prod(shape) or not shape:
        return False
    row = math.prod(shape[1:]) * out.element_size()
    dst = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
    rows = layout.shape[0]
    a, b = (lo, hi) if d == 0 else (0, rows)
    start = 0  # first row of the current piece in the full tensor
    for p in layout.pieces if layout.saved_dim == 0 else layout.pieces[:1]:
        end = start + p.shape[0] if layout.saved_dim == 0 else rows
        x, y = max(start, a), min(end, b)
        if x < y:
            path, begin = p.location
            _pread_into(path, begin + (x - start) * row, dst[(x - a) * row : (y - a) * row])
        start = end
    return True


class CheckpointReader:
    """Read access to one checkpoint (directory or file) under Meta's tensor names.

    Attributes: `path` (as given), `format` ("meta" | "hf" | "lazyllama"), `config` (the model config found
    beside the weights, as ModelArgs field names; None if there is none), `info` (format-specific extras, e.g.
    the contents of lazyllama.json), `quantization` (a pre-quantized checkpoint's settings and packed weights,
    see `save_quantized`; None otherwise). Tensors returned by `read` may be views into read-only file
    mappings: treat them as read-only (copy before modifying in place).
    """

    path: Path
    format: str
    config: dict[str, Any] | None

    def __init__(self, path: Path, format: str, config: dict[str, Any] | None):
        self.path = path
        self.format = format
        self.config = config
        self.info: dict[str, Any] = {}
        self.quantization: dict[str, Any] | None = None
        self._layouts: dict[tuple[str, int | None], _Layout] = {}
        self._closed = False

    # --- what subclasses provide
    def keys(self) -> set[str]:
        raise NotImplementedError

    def _make_layout(self, key: str, shard_dim: int | None) -> _Layout:
        raise NotImplementedError

    def _release_pieces(self, key: str) -> list[_Piece]:
        return self._layout(key, None).pieces

    # --- shared logic
    def _check_key(self, key: str) -> None:
        if self._closed:
            raise CheckpointError(f"{self.path}: this reader was closed; open the checkpoint again")
        if key not in self.keys():
            some = ", ".join(sorted(self.keys())[:5])
            raise CheckpointError(
                f"{self.path}: no tensor {key!r} in this {self.format} checkpoint ({len(self.keys())} keys, "
                f"e.g. {some}); check the model config matches the checkpoint"
            )

    def _layout(self, key: str, shard_dim: int | None) -> _Layout:
        self._check_key(key)
        cache_key = (key, shard_dim)
        if cache_key not in self._layouts:
            self._layouts[cache_key] = self._make_layout(key, shard_dim)
        return self._layouts[cache_key]

    def shape(self, key: str) -> tuple[int, ...]:
        """The FULL (unsharded, merged) shape of `key`."""
        return self._layout(key, None).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._layout(key, None).dtype

    def file_of(self, key: str) -> str:
        """A file holding (part of) `key`, for error messages."""
        return self._layout(key, None).pieces[0].file

    def _requested(
        self, key: str, shape: tuple[int, ...], shard_dim: int | None, rank: int, world_size: int
    ) -> tuple[int | None, int, int]:
        """Normalise a shard request to (dim, lo, hi) of the full tensor, validating it."""
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise CheckpointError(
                f"{self.path}: key {key!r}: invalid model-parallel request rank={rank}, "
                f"world_size={world_size} (expected world_size >= 1 and 0 <= rank < world_size)"
            )
        if shard_dim is None:
            return None, 0, 0
        if not -len(shape) <= shard_dim < len(shape):
            raise CheckpointError(
                f"{self.path}: key {key!r} has shape {shape}; shard_dim={shard_dim} is not one of its dims"
            )
        d = shard_dim % len(shape)
        if shape[d] % world_size:
            raise CheckpointError(
                f"{self.path}: key {key!r} of shape {shape} cannot be split into world_size={world_size} "
                f"equal parts along dim {d} ({shape[d]} % {world_size} != 0); use a model-parallel size that "
                "divides it"
            )
        size = shape[d] // world_size
        return d, rank * size, (rank + 1) * size

    def read(self, key: str, *, shard_dim: int | None = None, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This rank's slice `full.chunk(world_size, dim=shard_dim)[rank]` (shard_dim None: the whole tensor).

        Only the saved shards overlapping the slice are touched. When the slice is one stored tensor or a
        narrow() of it, the result is a view into the mapped file (no copy): treat it as read-only.
        """
        layout = self._layout(key, shard_dim)
        d, lo, hi = self._requested(key, layout.shape, shard_dim, rank, world_size)
        return _assemble(layout, d, lo, hi)

    def read_into(
        self, key: str, out: torch.Tensor, *, shard_dim: int | None = None, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """`out.copy_(self.read(...))`, cast to out's dtype - but where the slice is contiguous bytes of safetensors
        files in out's dtype and `out` is a contiguous CPU tensor, its bytes are read from the file straight into
        `out` (pread): no mapped pages, no page faults on the source, 2-3x faster than copying from the mapping.
        Returns `out`.
        """
        layout = self._layout(key, shard_dim)
        d, lo, hi = self._requested(key, layout.shape, shard_dim, rank, world_size)
        if self._direct_ok(key) and _pread_slice(layout, d, lo, hi, out):
            return out
        with torch.no_grad():
            return out.copy_(self.read(key, shard_dim=shard_dim, rank=rank, world_size=world_size))

    def _direct_ok(self, key: str) -> bool:
        """Whether `key`'s stored bytes are its values (no transform on the way out)."""
        return True

    def release(self, key: str) -> None:
        """Give back the memory pages holding this key's bytes (Linux; a no-op elsewhere).

        Reading the key again afterwards still works: the mapping is private and read-only in use, so the
        pages are read from the file again. Views of the key obtained earlier stay valid (they refault the
        same way) - but a view that was modified in place would silently revert to the file's values, so
        never release a key whose view is kept as a live (e.g. trainable) tensor: copy it first.
        """
        self._check_key(key)
        for p in self._release_pieces(key):
            p.release()

    def close(self) -> None:
        self._closed = True
        self._layouts.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} format={self.format} path={str(self.path)!r} keys={len(self.keys())}>"


# ----------------------------------------------------------------------------------------------------
# Meta .pth shards
# ----------------------------------------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """torch.load(mmap=True, weights_only=True); every failure becomes a CheckpointError naming the file.

    There is deliberately no fallback to weights_only=False: that would execute whatever the pickle says.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    if magic != _ZIP_MAGIC:
        if not magic:
            raise CheckpointError(f"{path}: the file is empty; it is truncated or corrupt (copy it again)")
        raise CheckpointError(
            f"{path}: not a zip-format torch checkpoint (a legacy torch.save file, or not a torch file). "
            "Memory-mapped loading needs the zip format: re-save it with torch.save (zip format, the default "
            "since torch 1.6), e.g. torch.save(torch.load(old, weights_only=True), new)"
        )
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: the file is truncated or corrupt (a zip file without its central directory); copy it again"
        )
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            first = str(e).strip().splitlines()
            detail = next((ln for ln in first if "Unsupported" in ln or "GLOBAL" in ln), first[0] if first else "")
            raise CheckpointError(
                f"{path}: refused to load: the pickle references code or objects other than tensors and "
                f"plain containers ({detail.strip()}). Nothing in it was run, and this loader never falls "
                "back to unsafe loading; re-save the file as a plain dict of tensors from a trusted source"
            ) from None
        raise CheckpointError(f"{path}: the file is truncated or corrupt ({e}); copy it again") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: the file is truncated or corrupt ({e}); copy it again") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{path}: key {k!r} holds a {type(v).__name__}; expected a flat dict of str -> tensor (if "
                "this is a training checkpoint, extract its model state dict and save that)"
            )
    return dict(obj)


def _mmap_piece(file: Path, t: torch.Tensor) -> _Piece:
    def release() -> None:
        _dontneed(*_tensor_span(t))  # t comes from torch.load(mmap=True): it lies in a private file mapping

    return _Piece(str(file), tuple(t.shape), t.dtype, lambda: t, release)


class _MetaReader(CheckpointReader):
    """Meta's consolidated.NN.pth files, one per model-parallel rank.

    A file does not record how a key was split. The rule used: shapes that differ across files give the split
    dim; equal shapes (or one file) are resolved by Meta's layout (wq wk wv w1 w3 output: dim 0; wo w2
    tok_embeddings: dim 1; norms, rope.freqs: replicated, read from file 0). For names outside Meta's layout
    with equal shapes, `read` takes the caller's shard_dim as the saved split (None: replicated) and `shape`
    reports them as replicated.
    """

    def __init__(self, path: Path, files: list[Path], config: dict[str, Any] | None):
        super().__init__(path, "meta", config)
        self.files = files
        self._sds = [_load_pth(f) for f in files]
        self._keys = set().union(*(sd.keys() for sd in self._sds))
        for key in sorted(self._keys):
            missing = [f.name for f, sd in zip(files, self._sds) if key not in sd]
            if missing:
                have = [f.name for f, sd in zip(files, self._sds) if key in sd]
                raise CheckpointError(
                    f"{path}: key {key!r} is in {', '.join(have)} but missing from {', '.join(missing)}; "
                    "every consolidated.NN.pth must hold the same keys (a file from another checkpoint or a "
                    "partial copy?)"
                )

    def keys(self) -> set[str]:
        return set(self._keys)

    def _make_layout(self, key: str, shard_dim: int | None) -> _Layout:
        pieces = [_mmap_piece(f, sd[key]) for f, sd in zip(self.files, self._sds)]
        if len(pieces) == 1:
            return _merge_layout(key, None, pieces)
        shapes = {p.shape for p in pieces}
        if len(shapes) > 1:
            ndims = {len(s) for s in shapes}
            differ = {i for s in shapes for i in range(len(s)) if len(ndims) == 1 and s[i] != pieces[0].shape[i]}
            if len(ndims) != 1 or len(differ) != 1:
                listing = ", ".join(f"{p.file}: {p.shape}" for p in pieces)
                raise CheckpointError(
                    f"key {key!r}: shapes across shards differ in more than one dim ({listing}); cannot tell "
                    "how it was split"
                )
            return _merge_layout(key, differ.pop(), pieces)
        rule = _meta_rule(key)
        ndim = len(pieces[0].shape)
        saved: int | None
        if rule == _UNKNOWN:
            saved = None if shard_dim is None or ndim == 0 else shard_dim % ndim
        else:
            saved = rule if isinstance(rule, int) and rule < ndim else None
        return _merge_layout(key, saved, pieces)

    def _release_pieces(self, key: str) -> list[_Piece]:
        return [_mmap_piece(f, sd[key]) for f, sd in zip(self.files, self._sds)]

    def close(self) -> None:
        super().close()
        self._sds = [{} for _ in self._sds]  # handed-out views keep their mappings alive; ours go


# ----------------------------------------------------------------------------------------------------
# Hugging Face safetensors
# ----------------------------------------------------------------------------------------------------


def _st_piece(f: _SafetensorsFile, name: str) -> _Piece:
    e = f.entries[name]
    return _Piece(
        str(f.path), e.shape, e.dtype, lambda: f.tensor(name), lambda: f.release(name), (str(f.path), e.begin)
    )


class _HFReader(CheckpointReader):
    """Hugging Face LLaMA safetensors (or any safetensors files without lazyllama metadata).

    HF names are mapped to Meta's, other names pass through, so a safetensors file with Meta's names is read
    as-is. Each tensor lives whole in one file; wq/wk get HF's rotary permutation undone on the way out.
    """

    def __init__(
        self,
        path: Path,
        files: list[Path],
        config: dict[str, Any] | None,
        config_file: Path | None,
        weight_map: dict[str, str] | None = None,
    ):
        super().__init__(path, "hf", config)
        self._files = [_SafetensorsFile(f) for f in files]
        by_name = {f.path.name: f for f in self._files}
        self._where: dict[str, tuple[_SafetensorsFile, str]] = {}  # meta name -> (file, stored name)
        # wq/wk stored under HF names are in HF's rotary layout; Meta-named ones are read as-is
        self._permuted: dict[str, str] = {}  # meta name -> config field counting its heads
        for f in self._files:
            for name in f.entries:
                if weight_map is not None and weight_map.get(name) != f.path.name:
                    continue  # the index says another file holds this name (or it is not part of the model)
                self._add(meta_name=hf_to_meta_name(name), f=f, name=name)
        if weight_map is not None:
            for name, fname in weight_map.items():
                if fname not in by_name or name not in by_name[fname].entries:
                    raise CheckpointError(
                        f"{path}: the index model.safetensors.index.json says {name!r} is in {fname}, but "
                        f"{'that file does not have it' if fname in by_name else 'that file is missing'}"
                    )
        # A tied model (config tie_word_embeddings: true) saves no lm_head: its config builds a model whose head
        # is the embedding (ModelArgs.tie_word_embeddings), so nothing is aliased here.
        for field in sorted(set(self._permuted.values())):
            if not config or not isinstance(config.get(field), int):
                raise CheckpointError(
                    f"{path}: the q/k projections are stored in HF's rotary layout, and undoing it needs "
                    f"{field} from config.json ({config_file or 'not found beside the weights'}); expected "
                    "num_attention_heads (and num_key_value_heads for grouped-query attention)"
                )

    def _add(self, meta_name: str | None, f: _SafetensorsFile, name: str) -> None:
        if meta_name is None:
            return
        if meta_name in self._where:
            other, other_name = self._where[meta_name]
            raise CheckpointError(
                f"{self.path}: key {meta_name!r} is stored twice: {other_name!r} in {other.path} and "
                f"{name!r} in {f.path}; remove one of the files"
            )
        self._where[meta_name] = (f, name)
        heads_field = _qk_heads_param(meta_name)
        if heads_field and name != meta_name:
            self._permuted[meta_name] = heads_field

    def keys(self) -> set[str]:
        return set(self._where)

    def _make_layout(self, key: str, shard_dim: int | None) -> _Layout:
        f, name = self._where[key]
        return _merge_layout(key, None, [_st_piece(f, name)])

    def _direct_ok(self, key: str) -> bool:
        return key not in self._permuted  # q/k in HF's layout are permuted on the way out

    def read(self, key: str, *, shard_dim: int | None = None, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if key not in self._permuted:
            return super().read(key, shard_dim=shard_dim, rank=rank, world_size=world_size)
        layout = self._layout(key, shard_dim)
        d, lo, hi = self._requested(key, layout.shape, shard_dim, rank, world_size)
        assert self.config is not None  # checked in __init__
        n_heads = int(self.config[self._permuted[key]])
        stored = layout.pieces[0].load()
        head_dim = _check_qk(stored, n_heads, f"{layout.pieces[0].file}: {self._where[key][1]!r}")
        if d == 0:
            # The permutation stays within each head: read only the rows of the heads covering [lo, hi).
            h0, h1 = lo // head_dim, -(-hi // head_dim)
            out = hf_unpermute_qk(stored.narrow(0, h0 * head_dim, (h1 - h0) * head_dim), h1 - h0)
            if (h0 * head_dim, h1 * head_dim) != (lo, hi):  # part of a head: keep only the requested rows
                out = out.narrow(0, lo - h0 * head_dim, hi - lo).clone()
            return out
        if d is not None:
            stored = stored.narrow(d, lo, hi - lo)  # columns: the row permutation is unaffected
        return hf_unpermute_qk(stored, n_heads)

    def close(self) -> None:
        super().close()
        for f in self._files:
            f.close()


# ----------------------------------------------------------------------------------------------------
# This project's own format
# ----------------------------------------------------------------------------------------------------


def _own_file_name(rank: int) -> str:
    return f"consolidated.{rank:02d}.safetensors"


class _OwnReader(CheckpointReader):
    """lazyllama: per-rank safetensors files merged by the shard dims recorded at save time."""

    def __init__(
        self,
        path: Path,
        files: list[Path],
        shard_dims: dict[str, int | None],
        config: dict[str, Any] | None,
        info: dict[str, Any],
    ):
        super().__init__(path, "lazyllama", config)
        self.info = info
        self._files = [_SafetensorsFile(f) for f in files]
        self._shard_dims = shard_dims
        ws = len(files)
        self.quantization = _quantization_of(self._files, info, path)
        for r, f in enumerate(self._files):
            md = f.metadata
            if md.get("format") == "lazyllama" and (md.get("rank"), md.get("world_size")) != (
                str(r),
                str(ws),
            ):
                raise CheckpointError(
                    f"{f.path}: written as rank {md.get('rank')} of {md.get('world_size')}, but {OWN_INDEX} "
                    f"says it is rank {r} of {ws}; the directory mixes two saves (an interrupted save?) - "
                    "save again"
                )
        self._keys: set[str] = set()
        for f in self._files:
            self._keys.update(f.entries)
        absent = sorted(k for k in shard_dims if k not in self._keys)
        if absent:
            raise CheckpointError(
                f"{path}: {OWN_INDEX} lists {absent[:5]} but no rank file holds them; the checkpoint is "
                "incomplete - save it again"
            )
        for key in sorted(self._keys):
            have = [f for f in self._files if key in f.entries]
            if shard_dims.get(key) is not None and len(have) != ws:
                missing = [f.path.name for f in self._files if key not in f.entries]
                raise CheckpointError(
                    f"{path}: key {key!r} is split across ranks (dim {shard_dims[key]}) but missing from "
                    f"{', '.join(missing)}; the checkpoint is incomplete - save it again"
                )

    def keys(self) -> set[str]:
        return set(self._keys)

    def _make_layout(self, key: str, shard_dim: int | None) -> _Layout:
        pieces = [_st_piece(f, key) for f in self._files if key in f.entries]
        if key not in self._shard_dims and len(pieces) > 1:
            raise CheckpointError(
                f"{self.path}: key {key!r} is in {len(pieces)} rank files but {OWN_INDEX} records no shard "
                "dim for it, so it cannot be merged; save the checkpoint again"
            )
        return _merge_layout(key, self._shard_dims.get(key), pieces)

    def _release_pieces(self, key: str) -> list[_Piece]:
        return [_st_piece(f, key) for f in self._files if key in f.entries]

    def close(self) -> None:
        super().close()
        for f in self._files:
            f.close()


def _check_quantization(q: Any, where: Path) -> dict[str, Any]:
    """The "quantization" section of a pre-quantized lazyllama checkpoint, validated."""
    problems = []
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: the quantization section must be a JSON object")
    if q.get("bits") not in (4, 8):
        problems.append(f"bits={q.get('bits')!r} (expected 4 or 8)")
    if q.get("bits") == 4:
        if q.get("quant_type") not in ("nf4", "fp4"):
            problems.append(f"quant_type={q.get('quant_type')!r} (expected nf4 or fp4)")
        if not isinstance(q.get("blocksize"), int) or q["blocksize"] <= 0:
            problems.append(f"blocksize={q.get('blocksize')!r} (expected a positive integer)")
        if not isinstance(q.get("compress_statistics"), bool):
            problems.append(f"compress_statistics={q.get('compress_statistics')!r} (expected true or false)")
    if not isinstance(q.get("model_parallel_size"), int) or q["model_parallel_size"] < 1:
        problems.append(f"model_parallel_size={q.get('model_parallel_size')!r} (expected a positive integer)")
    weights = q.get("weights")
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("tensors"), list) for k, v in weights.items()
    ):
        problems.append("weights must map each packed weight key to {shape, shard_dim, tensors}")
    if problems:
        raise CheckpointError(f"{where}: invalid quantization section: {'; '.join(problems)}; save it again")
    return q


def _quantization_of(files: list[_SafetensorsFile], info: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The checkpoint's quantization section (lazyllama.json, else a lone rank file's metadata), checked against
    every rank file's copy: a directory mixing a pre-quantized save with another save is refused."""
    per_file = []
    for f in files:
        raw = f.metadata.get("quantization")
        try:
            per_file.append(None if raw is None else json.loads(raw))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f.path}: its quantization metadata is not valid JSON ({e}); save again") from None
    q = info["quantization"] if "quantization" in info else per_file[0]
    if q is None:
        return None
    for f, fq in zip(files, per_file):
        if fq != q:
            raise CheckpointError(
                f"{f.path}: its quantization metadata does not match {OWN_INDEX} ({'none' if fq is None else fq}); "
                "the directory mixes two saves (an interrupted save?) - save again"
            )
    q = _check_quantization(q, path / OWN_INDEX if "quantization" in info else files[0].path)
    if q["model_parallel_size"] != len(files):
        raise CheckpointError(
            f"{path}: the quantization section says model-parallel size {q['model_parallel_size']} but there are "
            f"{len(files)} rank files; save it again"
        )
    return q


def _shard_dims_from(obj: Any, where: Path) -> dict[str, int | None]:
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and (v is None or (isinstance(v, int) and v >= 0)) for k, v in obj.items()
    ):
        raise CheckpointError(f"{where}: shard_dims must map each key to a dim (int >= 0) or null")
    return obj


def _open_own_dir(path: Path) -> _OwnReader:
    index_path = path / OWN_INDEX
    info = _read_json(index_path)
    if not isinstance(info, dict):
        raise CheckpointError(f"{index_path}: expected a JSON object")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{index_path}: format_version {version!r} is not supported (this code reads version "
            f"{FORMAT_VERSION}); update the code or re-save the checkpoint"
        )
    ws = info.get("model_parallel_size")
    if not isinstance(ws, int) or ws < 1:
        raise CheckpointError(f"{index_path}: model_parallel_size must be a positive integer, got {ws!r}")
    files = [path / _own_file_name(r) for r in range(ws)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: {OWN_INDEX} says model_parallel_size={ws} but {', '.join(missing)} "
            "is missing; copy the whole directory, or save again"
        )
    shard_dims = _shard_dims_from(info.get("shard_dims", {}), index_path)
    return _OwnReader(path, files, shard_dims, _read_config(path / "params.json"), info)


# ----------------------------------------------------------------------------------------------------
# open_checkpoint
# ----------------------------------------------------------------------------------------------------

_FORMATS = ("auto", "meta", "hf", "lazyllama")
_META_FILE_RE = re.compile(r"consolidated\.(\d+)\.pth")
_OWN_FILE_RE = re.compile(r"consolidated\.(\d+)\.safetensors")


def _meta_files(path: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in path.iterdir() if (m := _META_FILE_RE.fullmatch(p.name))}
    if not found:
        raise CheckpointError(f"{path}: no consolidated.NN.pth files (expected a Meta LLaMA checkpoint directory)")
    expected = list(range(len(found)))
    if sorted(found) != expected:
        have = ", ".join(found[i].name for i in sorted(found))
        raise CheckpointError(
            f"{path}: Meta shards must be numbered consolidated.00.pth .. "
            f"consolidated.{len(found) - 1:02d}.pth without gaps; found {have}"
        )
    return [found[i] for i in expected]


def _hf_config(path: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """Config beside safetensors weights, and the file it came from: config.json (mapped from HF names by
    util/hf_config.py; a field that is not implemented is an error naming it), else params.json (as is)."""
    cfg_path = path / "config.json"
    hf = _read_config(cfg_path)
    if hf is not None:
        try:
            return hf_config_to_params(hf, source=cfg_path), cfg_path
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    meta_path = path / "params.json"
    return _read_config(meta_path), (meta_path if meta_path.is_file() else None)


def _open_hf_dir(path: Path) -> _HFReader:
    index_path = path / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: expected an object with a 'weight_map' of tensor name -> file name")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: {index_path.name} lists {', '.join(missing)}, which is missing")
        files = [path / n for n in names]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files (expected a Hugging Face checkpoint directory)")
    config, config_file = _hf_config(path)
    return _HFReader(path, files, config, config_file, weight_map)


def _open_safetensors_file(path: Path, format: str) -> CheckpointReader:
    st = _SafetensorsFile(path)
    md = st.metadata
    st.close()
    if format in ("auto", "lazyllama") and md.get("format") == "lazyllama":
        ws = int(md.get("world_size", "1"))
        if ws != 1:
            raise CheckpointError(
                f"{path}: this file is rank {md.get('rank')} of a {ws}-way sharded lazyllama checkpoint; "
                "open its directory to read the whole model"
            )
        shard_dims = _shard_dims_from(json.loads(md.get("shard_dims", "{}")), path)
        return _OwnReader(path, [path], shard_dims, _read_config(path.parent / "params.json"), {"file_metadata": md})
    if format == "lazyllama":
        raise CheckpointError(f"{path}: not a lazyllama file (its safetensors metadata has no format=lazyllama)")
    if format == "meta":
        raise CheckpointError(f"{path}: a safetensors file cannot be read as format 'meta' (.pth files only)")
    config, config_file = _hf_config(path.parent)
    return _HFReader(path, [path], config, config_file, None)


def open_checkpoint(path: str | Path, *, format: str = "auto") -> CheckpointReader:
    """Open a checkpoint directory or file for reading.

    Auto-detection, in this order:
    - a directory with lazyllama.json: this project's format (params.json + consolidated.NN.safetensors);
    - a directory with consolidated.NN.pth: Meta (params.json beside it becomes `config`);
    - a directory with *.safetensors: Hugging Face (config.json mapped to ModelArgs names, optional
      model.safetensors.index.json); Meta-named safetensors files are read as-is;
    - a .pth/.pt file: Meta with one shard;
    - a .safetensors file: lazyllama if its metadata says so (one rank only), else as a HF directory of one
      file.
    `format` ("meta" | "hf" | "lazyllama") skips detection.
    """
    if format not in _FORMATS:
        raise CheckpointError(f"format={format!r} is not one of {_FORMATS}")
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory (expected a checkpoint directory or file)")
    if p.is_file():
        if p.suffix == ".safetensors":
            return _open_safetensors_file(p, format)
        if format in ("auto", "meta") and p.suffix in (".pth", ".pt"):
            return _MetaReader(p, [p], _read_config(p.parent / "params.json"))
        raise CheckpointError(
            f"{p}: unknown checkpoint file type for format={format!r}; expected a zip-format .pth/.pt (Meta) "
            "or a .safetensors file (Hugging Face or lazyllama)"
        )
    has_own = (p / OWN_INDEX).is_file()
    has_meta = any(_META_FILE_RE.fullmatch(c.name) for c in p.iterdir())
    has_st = any(p.glob("*.safetensors"))
    if format == "lazyllama" or (format == "auto" and has_own):
        return _open_own_dir(p)
    if format == "meta" or (format == "auto" and has_meta):
        return _MetaReader(p, _meta_files(p), _read_config(p / "params.json"))
    if format == "hf" or (format == "auto" and has_st):
        if format == "auto" and any(_OWN_FILE_RE.fullmatch(c.name) for c in p.glob("*.safetensors")):
            st = _SafetensorsFile(next(p.glob("consolidated.*.safetensors")))
            if st.metadata.get("format") == "lazyllama":
                raise CheckpointError(
                    f"{p}: holds lazyllama consolidated.NN.safetensors files but no {OWN_INDEX} (the save "
                    "was interrupted before rank 0 wrote it?); save the checkpoint again"
                )
        return _open_hf_dir(p)
    listing = ", ".join(sorted(c.name for c in p.iterdir())[:10]) or "nothing"
    raise CheckpointError(
        f"{p}: unknown checkpoint layout. Looked for {OWN_INDEX} (lazyllama), consolidated.NN.pth + "
        "params.json (Meta), *.safetensors + config.json (Hugging Face; pytorch_model*.bin is not supported: "
        f"convert to safetensors); found {listing}"
    )


# ----------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if it owns its whole storage, else a compact copy (torch.save saves whole storages)."""
    t = t.detach()
    whole = (
        t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
    return t if whole and t.device.type == "cpu" else t.to("cpu").clone()


def _dtype_name(dtypes: Iterable[torch.dtype]) -> str:
    names = {str(d).removeprefix("torch.") for d in dtypes}
    return names.pop() if len(names) == 1 else ("mixed" if names else "none")


def save_checkpoint(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    shard_dims: Mapping[str, int | None],
    rank: int = 0,
    world_size: int = 1,
    config: dict[str, Any] | None = None,
    trainable_only: bool = False,
    extra: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
) -> Path:
    """Save this model-parallel rank's tensors in the lazyllama format; returns the file this rank wrote.

    `tensors` are this rank's local tensors (its slice of split ones); `shard_dims[key]` is the dim a key is
    split on across ranks (None: replicated - written by rank 0 only, since every rank holds the same values).
    Each rank writes consolidated.{rank:02d}.safetensors atomically (temp file, fsync, os.replace), streaming
    one tensor at a time (non-contiguous or GPU tensors are copied to CPU one at a time). Rank 0 also writes
    params.json (when `config` is given) and lazyllama.json, atomically, after its weights, and removes rank
    files left over from an earlier save with a larger model-parallel size. An exception mid-write leaves the
    previous file in place. Caveat: atomicity is per file; a crash of one rank of several can leave a mix of
    old and new rank files, which the reader detects only if the model-parallel size differs (it checks each
    file's rank metadata).

    `quantization` (from `save_quantized`): the settings of pre-quantized weights, recorded in lazyllama.json and
    in each rank file's metadata.
    """
    out = Path(out_dir)
    if not 0 <= rank < world_size:
        raise CheckpointError(f"save_checkpoint: rank={rank} is not in [0, world_size={world_size})")
    missing = sorted(k for k in tensors if k not in shard_dims)
    if missing:
        raise CheckpointError(
            f"save_checkpoint({out}): no shard_dims entry for {missing[:5]}; give each key its split dim or None"
        )
    out.mkdir(parents=True, exist_ok=True)
    dims = {k: shard_dims[k] for k in tensors}
    for k, d in dims.items():
        t = tensors[k]
        if d is not None and not 0 <= d < t.dim():
            raise CheckpointError(
                f"save_checkpoint({out}): shard dim {d} of {k!r} is not a dim of shape {tuple(t.shape)}"
            )
        if t.device.type == "meta":
            raise CheckpointError(f"save_checkpoint({out}): {k!r} is still on the meta device (not materialized)")
    mine = {k: t for k, t in tensors.items() if dims[k] is not None or rank == 0}
    items = [_WriteItem(k, t.dtype, tuple(t.shape), (lambda t=t: t)) for k, t in mine.items()]
    metadata = {
        "format": "lazyllama",
        "format_version": str(FORMAT_VERSION),
        "rank": str(rank),
        "world_size": str(world_size),
        "shard_dims": json.dumps({k: dims[k] for k in mine}, sort_keys=True),
    }
    if quantization is not None:
        metadata["quantization"] = json.dumps(quantization, sort_keys=True)
    target = out / _own_file_name(rank)
    with _atomic_write(target) as f:
        _write_safetensors(f, items, metadata)
    if rank == 0:
        if config is not None:
            _write_json(out / "params.json", config)
        _write_json(
            out / OWN_INDEX,
            {
                "format": "lazyllama",
                "format_version": FORMAT_VERSION,
                "model_parallel_size": world_size,
                "shard_dims": dims,
                "trainable_only": trainable_only,
                "dtype": _dtype_name(t.dtype for t in tensors.values()),
                "files": [_own_file_name(r) for r in range(world_size)],
                "extra": extra or {},
                **({"quantization": quantization} if quantization is not None else {}),
            },
        )
        for stale in out.glob("consolidated.*.safetensors"):
            m = _OWN_FILE_RE.fullmatch(stale.name)
            if m and int(m.group(1)) >= world_size:
                stale.unlink(missing_ok=True)
    return target


def write_meta_checkpoint(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    params: dict[str, Any],
    num_shards: int = 1,
) -> Path:
    """Write a Meta-layout checkpoint: params.json + consolidated.NN.pth (zip format), split by Meta's rule.

    Memory: besides `state_dict` itself, one shard's worth of copies (about model size / num_shards) exists
    while that shard is written; with num_shards=1 nothing is copied unless a tensor is a view of a larger
    storage (torch.save would write the whole storage). Keys outside Meta's layout are replicated.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if num_shards < 1:
        raise CheckpointError(f"write_meta_checkpoint: num_shards must be >= 1, got {num_shards}")
    for k, t in state_dict.items():
        d = meta_split_dim(k)
        if num_shards > 1 and d is not None and t.shape[d] % num_shards:
            raise CheckpointError(
                f"write_meta_checkpoint({out}): {k!r} of shape {tuple(t.shape)} cannot be split into "
                f"{num_shards} shards along dim {d}"
            )
    for r in range(num_shards):
        shard: dict[str, torch.Tensor] = {}
        for k, t in state_dict.items():
            d = meta_split_dim(k) if num_shards > 1 else None
            shard[k] = _standalone(t) if d is None else t.detach().chunk(num_shards, dim=d)[r].to("cpu").clone()
        with _atomic_write(out / f"consolidated.{r:02d}.pth") as f:
            torch.save(shard, f)
        del shard
    _write_json(out / "params.json", params)
    return out


def write_hf_checkpoint(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    params: dict[str, Any],
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a Hugging Face LLaMA checkpoint from Meta-named tensors: config.json + model.safetensors, or
    model-0000N-of-0000M.safetensors + model.safetensors.index.json when `max_shard_bytes` splits it.

    Names are mapped, wq/wk get HF's rotary permutation (n_heads / n_kv_heads from `params`), rope.freqs is
    dropped. `state_dict` may be a dict or an iterable of (key, tensor) pairs. Memory: from a dict, one
    permuted copy at a time; from an iterable, the tensors of the shard being filled are held until it is
    written (so pass `max_shard_bytes` to bound memory when streaming a large model).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    lazy = isinstance(state_dict, Mapping)
    pairs = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    shards: list[tuple[Path, list[str]]] = []
    current: list[_WriteItem] = []
    current_bytes = 0
    seen: dict[str, torch.dtype] = {}
    vocab_size = params.get("vocab_size", -1)
    tag = uuid.uuid4().hex[:8]

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            tmp_name = out / f".shard-{len(shards):05d}.{tag}.safetensors.tmp"
            with _atomic_write(tmp_name) as f:
                _write_safetensors(f, current, {"format": "pt"})
            shards.append((tmp_name, [it.name for it in current]))
        current, current_bytes = [], 0

    def producer(t: torch.Tensor, heads: int | None) -> Callable[[], torch.Tensor]:
        return (lambda: hf_permute_qk(t.detach(), heads)) if heads else (lambda: t)

    try:
        for key, t in pairs:
            if key == "rope.freqs":
                continue
            if key == "tok_embeddings.weight" and (vocab_size is None or vocab_size < 0):
                vocab_size = t.shape[0]
            heads = {"n_heads": n_heads, "n_kv_heads": n_kv_heads}.get(_qk_heads_param(key) or "")
            if heads and not lazy:  # from a stream, hold the permuted copy instead of the original
                t = hf_permute_qk(t.detach(), heads)
                heads = None
            name = meta_to_hf_name(key)
            nbytes = t.numel() * t.element_size()
            if max_shard_bytes is not None and current and current_bytes + nbytes > max_shard_bytes:
                flush()
            current.append(_WriteItem(name, t.dtype, tuple(t.shape), producer(t, heads)))
            current_bytes += nbytes
            seen[name] = t.dtype
            del t
        flush()
        if len(shards) == 1:
            os.replace(shards[0][0], out / "model.safetensors")
        else:
            weight_map = {}
            for i, (tmp_name, names) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp_name, out / final)
                weight_map.update({n: final for n in names})
            total = sum((out / f).stat().st_size for f in set(weight_map.values()))
            _write_json(
                out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
    finally:
        for tmp_name, _ in shards:
            tmp_name.unlink(missing_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": params["dim"],
        "intermediate_size": _ffn_hidden_dim(params),
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": params.get("rope_theta", 10000.0),
        "vocab_size": vocab_size,
        "max_position_embeddings": params.get("max_seq_len", 2048),
        "torch_dtype": _dtype_name(seen.values()),
        "tie_word_embeddings": False,
    }
    _write_json(out / "config.json", config)
    return out


def model_state(
    model: torch.nn.Module, *, trainable_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, int | None]]:
    """A model's persistent tensors (this rank's local slices) and each one's split dim.

    Split dims come from the modules' `shard_dims` (the model-parallel layers declare them); anything else is
    replicated. trainable_only keeps the parameters that require grad: the same predicate the optimizer uses.
    """
    tensors: dict[str, torch.Tensor] = {}
    dims: dict[str, int | None] = {}
    for mod_name, module in model.named_modules():
        own = [(n, p, True) for n, p in module._parameters.items() if p is not None]
        own += [
            (n, b, False)
            for n, b in module._buffers.items()
            if b is not None and n not in module._non_persistent_buffers_set
        ]
        for name, t, is_param in own:
            key = f"{mod_name}.{name}" if mod_name else name
            if trainable_only and not (is_param and t.requires_grad):
                continue
            if t.dtype in (torch.uint8, torch.int8) and hasattr(t, "quant_state") or hasattr(t, "SCB"):
                raise CheckpointError(
                    f"{key} is a quantized weight: save a quantized model with save_quantized (packed weights, "
                    "loaded without quantizing again), or save trainable_only=True (the base stays in its checkpoint)"
                )
            tensors[key] = t.detach()
            dims[key] = getattr(module, "shard_dims", {}).get(name)
    return tensors, dims


def save_model(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    config: dict[str, Any] | None = None,
    trainable_only: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    """Save a (possibly model-parallel) model in this project's format: each model-parallel rank its shard.

    Under data parallelism only data-parallel rank 0 writes (the other replicas hold the same values).
    Returns the file this process wrote, or None if it wrote nothing.
    """
    writes, rank, world_size = _parallel_position()
    if not writes:
        return None
    tensors, dims = model_state(model, trainable_only=trainable_only)
    return save_checkpoint(
        out_dir, tensors, shard_dims=dims, rank=rank, world_size=world_size, config=config,
        trainable_only=trainable_only, extra=extra,
    )  # fmt: skip


def _parallel_position() -> tuple[bool, int, int]:
    """(writes, model-parallel rank, model-parallel size) of this process: only data-parallel rank 0 writes."""
    from fairscale.nn.model_parallel import initialize as fs_mp

    if not fs_mp.model_parallel_is_initialized():
        return True, 0, 1
    return (
        fs_mp.get_data_parallel_rank() == 0,
        fs_mp.get_model_parallel_rank(),
        fs_mp.get_model_parallel_world_size(),
    )


def packed_key(weight_key: str, name: str) -> str:
    """The checkpoint key of one tensor of a pre-quantized weight, e.g. `layers.0.attention.wq.weight.packed`."""
    return f"{weight_key}.{name}"


def _is_packed_linear(module: torch.nn.Module) -> bool:
    # duck-typed util.quant.QuantLinear (this module imports nothing from util.quant)
    return all(callable(getattr(module, a, None)) for a in ("packed_tensors", "quant_settings", "packed_layout"))


def quantized_model_state(
    model: torch.nn.Module, *, adapters: bool = True, world_size: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, int | None], dict[str, Any]]:
    """A quantized model's tensors for `save_quantized`: (tensors, split dims, quantization section).

    Each quantized linear contributes its packed weight + quantization state under `packed_key(weight key, name)`
    (this rank's own tensors: split dim 0, written by every rank) instead of the weight; everything else is as
    `model_state` gives it. adapters=False leaves out the tensors of modules that are new on top of a base model
    (those declaring `init_when_missing`: LoRA, bias tuning, LLaMA-Adapter prompts and gates, and their children).
    """
    tensors: dict[str, torch.Tensor] = {}
    dims: dict[str, int | None] = {}
    weights: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] | None = None
    first = ""
    skipped: list[str] = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if not adapters and (
            getattr(module, "init_when_missing", False) or any(mod_name.startswith(p) for p in skipped)
        ):
            skipped.append(prefix)
            continue
        packed_linear = _is_packed_linear(module)
        if packed_linear:
            key = prefix + "weight"
            mine = module.quant_settings()
            if settings is None:
                settings, first = mine, key
            elif mine != settings:
                raise CheckpointError(
                    f"save_quantized: {key} is quantized as {mine} but {first} as {settings}; a pre-quantized "
                    "checkpoint holds one quantization setting (quantize the model with one mode)"
                )
            packed = module.packed_tensors()
            for name, t in packed.items():
                tensors[packed_key(key, name)] = t.detach()
                dims[packed_key(key, name)] = 0
            weights[key] = {
                "shape": list(module.local_shape),
                "shard_dim": module.shard_dims.get("weight"),
                "dtype": str(module.weight_dtype).removeprefix("torch."),
                "tensors": list(packed),
            }
        own = [(n, p) for n, p in module._parameters.items() if p is not None and not (packed_linear and n == "weight")]
        own += [
            (n, b) for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set
        ]
        for name, t in own:
            key = prefix + name
            if hasattr(t, "quant_state") or hasattr(t, "SCB"):
                raise CheckpointError(
                    f"save_quantized: {key} is a quantized weight outside util.quant.QuantLinear; quantize the model "
                    "with util.quant.quantize_model"
                )
            if t.device.type == "meta":
                raise CheckpointError(f"save_quantized: {key!r} is still on the meta device (not materialized)")
            tensors[key] = t.detach()
            dims[key] = getattr(module, "shard_dims", {}).get(name)
    if settings is None:
        raise CheckpointError(
            "save_quantized: the model has no quantized linear layers (built without quant?); build it with "
            "quant='4bit' / '4bit_fp4' / '8bit', or save a full-precision model with save_model"
        )
    dtypes = {w["dtype"] for w in weights.values()}
    quantization = {
        **settings,
        "model_parallel_size": world_size,
        "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "adapters": adapters,
        "weights": weights,
    }
    return tensors, dims, quantization


def save_quantized(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    config: dict[str, Any] | None = None,
    adapters: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    """Save a quantized model so it can be loaded without quantizing again ("pre-quantized" lazyllama).

    Writes, per model-parallel rank (only data-parallel rank 0 writes; every model-parallel rank must call it),
    consolidated.NN.safetensors atomically: each quantized linear's packed weight and quantization state
    (`QuantLinear.packed_layout`: 4-bit packed uint8 data, absmax, quant_map, nested absmax / quant_map / offset;
    8-bit CB + SCB) under `<weight key>.<name>`, and every other tensor (embeddings, norms, output head, and with
    adapters=True the adapter tensors - LoRA, bias tuning, LLaMA-Adapter) as it is. Rank 0 writes params.json
    (`config`, default `model.args.to_dict()`) and lazyllama.json with a "quantization" section: mode, bits,
    quant_type, blocksize, compress_statistics (nested_blocksize), model_parallel_size, dtype, and per packed weight
    its local shape, split dim and tensor names.

    adapters=False saves the base only (the adapter modules' tensors are left out; the config is saved as given,
    so a build from it initializes fresh adapters). Load with
    `build_model(None, [out_dir], quant=<the same mode>)` at the same model-parallel size: the packed weights are
    adopted as they are (report.quantized == 0).
    Returns the file this process wrote, or None if it wrote nothing.
    """
    writes, rank, world_size = _parallel_position()
    tensors, dims, quantization = quantized_model_state(model, adapters=adapters, world_size=world_size)
    if not writes:
        return None
    if config is None:
        args = getattr(model, "args", None)
        config = args.to_dict() if callable(getattr(args, "to_dict", None)) else None
    return save_checkpoint(
        out_dir, tensors, shard_dims=dims, rank=rank, world_size=world_size, config=config,
        extra=extra, quantization=quantization,
    )  # fmt: skip


# Keys of Meta's layout (what `export_meta` can write and other LLaMA code can read).
_META_KEY = re.compile(
    r"^(tok_embeddings\.weight|norm\.weight|output\.weight|layers\.\d+\.(attention\.(wq|wk|wv|wo)"
    r"|feed_forward\.(w1|w2|w3)|attention_norm|ffn_norm)\.weight)$"
)


def export_meta(model: torch.nn.Module, out_dir: str | Path, *, params: dict[str, Any]) -> Path | None:
    """Write a full-precision model in Meta's format (consolidated.NN.pth per model-parallel rank + params.json),
    e.g. after merge_lora, to serve it with any LLaMA code. Only data-parallel rank 0 writes.

    Refuses quantized weights and tensors Meta's layout has no place for (adapters, tuning biases): merge or
    drop them first.
    """
    writes, rank, _ = _parallel_position()
    if not writes:
        return None
    tensors, _ = model_state(model)
    extra = sorted(k for k in tensors if not _META_KEY.match(k))
    if extra:
        raise CheckpointError(
            f"export_meta({out_dir}): Meta's format has no place for {extra[:6]}{' ...' if len(extra) > 6 else ''}; "
            "merge LoRA first (model.peft.merge_lora) and export models without adapters or tuning biases"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"consolidated.{rank:02d}.pth"
    with _atomic_write(target) as f:
        torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, f)
    if rank == 0:
        _write_json(out / "params.json", params)
    return target
