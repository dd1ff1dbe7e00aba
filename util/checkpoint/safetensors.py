"""safetensors I/O written for this project: the header parsed and validated, the file mapped once
(`SafetensorsFile`), and a streaming writer (`write_safetensors`) that holds one tensor in memory at a time.

The format: an 8-byte little-endian header length, a JSON header (dtype, shape and data offsets per tensor,
optional `__metadata__` of strings), then the raw data. Files are mapped with
`torch.UntypedStorage.from_file(shared=False)`; the mapping is private and read-only in use, so a released page
is simply read from the file again.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from util.checkpoint.errors import CheckpointError
from util.checkpoint.release import dontneed

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
class StEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
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
        self.entries: dict[str, StEntry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_start, size)
        self.size = size
        # One mapping for the whole file; tensors are views at their offsets. shared=False: MAP_PRIVATE, so
        # nothing is ever written back and MADV_DONTNEED simply drops pages (re-read from the file when
        # touched).
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        self._bytes: torch.Tensor | None = torch.empty(0, dtype=torch.uint8).set_(storage)

    def _entry(self, name: str, info: Any, data_start: int, size: int) -> StEntry:
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
        nbytes = math.prod(shape) * itemsize(dtype)
        if end - begin != nbytes:
            raise CheckpointError(
                f"{where}: {end - begin} bytes of data for shape {shape} of {info['dtype']} (expected {nbytes})"
            )
        return StEntry(dtype, tuple(shape), begin, end)

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor as a view into the mapping (a copy only if its offset is misaligned)."""
        if self._bytes is None:
            raise CheckpointError(f"{self.path}: the reader was closed; open the checkpoint again")
        e = self.entries[name]
        raw = self._bytes[e.begin : e.end]
        item = itemsize(e.dtype)
        if e.begin % item:
            # torch cannot view bytes at a misaligned offset as a wider dtype; files written by safetensors or
            # by this module are aligned, so this copy happens only for unusual third-party writers.
            raw = raw.clone()
        return raw.view(e.dtype).view(e.shape)

    def release(self, name: str) -> None:
        if self._bytes is not None:
            e = self.entries[name]
            dontneed(self._bytes.data_ptr() + e.begin, e.end - e.begin)

    def close(self) -> None:
        # Views already handed out keep the mapping alive; it is unmapped when the last of them goes.
        self._bytes = None


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass
class WriteItem:
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


def write_order(items: Iterable[WriteItem]) -> list[WriteItem]:
    """The order write_safetensors produces and writes `items` in: largest elements first (aligned offsets), the
    caller's order within one element size (sorted() is stable). Ranks that must join each `produce` of a sharded
    tensor (a collective) walk this same order."""
    return sorted(items, key=lambda it: -itemsize(it.dtype))


def write_safetensors(f: IO[bytes], items: list[WriteItem], metadata: Mapping[str, str] | None) -> None:
    """Stream a safetensors file: header first, then each tensor's bytes, one tensor in memory at a time.

    Written here rather than with safetensors.torch.save_file, which needs every tensor contiguous and alive
    at once (and refuses views sharing storage); the output is the same format (checked against the library in
    the tests). Tensors are ordered by descending element size, as the library does, so every offset is
    aligned for its dtype and readers can map tensors without copying.
    """
    if sys.byteorder != "little":
        raise CheckpointError("writing safetensors on a big-endian machine is not supported")
    items = write_order(items)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for it in items:
        if it.dtype not in _ST_NAMES:
            raise CheckpointError(f"tensor {it.name!r}: dtype {it.dtype} cannot be stored in safetensors")
        nbytes = math.prod(it.shape) * itemsize(it.dtype)
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


def dtype_name(dtypes: Iterable[torch.dtype]) -> str:
    """One dtype name for a set of tensors ("bfloat16"), "mixed", or "none": recorded beside the weights."""
    names = {str(d).removeprefix("torch.") for d in dtypes}
    return names.pop() if len(names) == 1 else ("mixed" if names else "none")
