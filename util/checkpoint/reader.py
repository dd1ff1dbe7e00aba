"""The reader every checkpoint format shares (`CheckpointReader`): a key's stored pieces and how they fit
together (`Layout`), one model-parallel rank's slice of any tensor whatever the model-parallel size the
checkpoint was saved with (resharding), `read` / `read_into` / `release`; and `CheckpointFormat`, the record
through which `open_checkpoint` detects and opens a format.

A reader slices each saved shard and concatenates only the overlapping pieces, and when the answer is one
stored tensor (or a `narrow()` of it) it returns a view into the memory-mapped file, so nothing is copied and
`release()` can give the pages back. A format module provides `keys()` and `_make_layout()`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from util.checkpoint.errors import CheckpointError
from util.checkpoint.safetensors import SafetensorsFile


@dataclass(frozen=True)
class Piece:
    """One stored tensor that holds (part of) a key."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]  # the stored tensor, as a view into the mapped file
    release: Callable[[], None]
    # (file path, byte offset of the tensor's data) where its raw bytes can be read with pread; None: mapped only
    location: tuple[str, int] | None = None


@dataclass(frozen=True)
class Layout:
    """How a key's full tensor is stored: `pieces` concatenated along `saved_dim` (None: replicated)."""

    saved_dim: int | None
    pieces: list[Piece]
    shape: tuple[int, ...]
    dtype: torch.dtype


def merge_layout(key: str, saved_dim: int | None, pieces: list[Piece]) -> Layout:
    """Check the pieces fit together along saved_dim and compute the full shape."""
    first = pieces[0]
    if saved_dim is None or len(pieces) == 1:
        return Layout(None, pieces[:1], first.shape, first.dtype)
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
    return Layout(saved_dim, pieces, tuple(shape), first.dtype)


def _assemble(layout: Layout, d: int | None, lo: int, hi: int) -> torch.Tensor:
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


# read_into copies a tensor it cannot pread in blocks of about this many source bytes, releasing pages between
READ_CHUNK_BYTES = 64 << 20


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


def _pread_slice(layout: Layout, d: int | None, lo: int, hi: int, out: torch.Tensor) -> bool:
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
        self._layouts: dict[tuple[str, int | None], Layout] = {}
        self._closed = False

    # --- what subclasses provide
    def keys(self) -> set[str]:
        raise NotImplementedError

    def _make_layout(self, key: str, shard_dim: int | None) -> Layout:
        raise NotImplementedError

    def _release_pieces(self, key: str) -> list[Piece]:
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

    def _layout(self, key: str, shard_dim: int | None) -> Layout:
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
        self,
        key: str,
        out: torch.Tensor,
        *,
        shard_dim: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """`out.copy_(self.read(...)[a:b])`, cast to out's dtype - but where the slice is contiguous bytes of
        safetensors files in out's dtype and `out` is a contiguous CPU tensor, its bytes are read from the file
        straight into `out` (pread): no mapped pages, no page faults on the source, 2-3x faster than copying from
        the mapping. `rows` = (a, b): only rows [a, b) of this rank's slice (a data-parallel shard of it under
        FSDP); the other rows are never touched. Returns `out`.
        """
        layout = self._layout(key, shard_dim)
        d, lo, hi = self._requested(key, layout.shape, shard_dim, rank, world_size)
        if world_size == 1:  # the whole tensor, whatever dim it would be split on (the embedding's is 1)
            d = None
        if rows is not None:
            a, b = rows
            n = hi - lo if d == 0 else layout.shape[0]
            if not 0 <= a <= b <= n:
                raise CheckpointError(f"{self.path}: key {key!r}: rows [{a}, {b}) are not within its {n} rows")
            if a == b:
                return out
            if d in (None, 0):  # the model-parallel slice is rows too: together one row range of the full tensor
                d, lo, hi = 0, lo + a, lo + b
            # (split on columns by model parallel and on rows by FSDP: no single byte range, read below)
        if self._direct_ok(key) and _pread_slice(layout, d, lo, hi, out):
            return out
        src = self.read(key, shard_dim=shard_dim, rank=rank, world_size=world_size)  # formats may transform here
        if rows is not None:
            src = src[rows[0] : rows[1]]  # a view: only these rows' pages are read
        with torch.no_grad():
            if src.dim() == 0 or src.nbytes <= READ_CHUNK_BYTES or src.shape != out.shape:
                return out.copy_(src)
            # A view into the mapping (a cast, or columns of it under model parallel): copied a block of rows at a
            # time, the pages read so far given back after each, so the transient is one block, not the tensor
            # (a 128k-vocabulary embedding is 0.5-1 GB).
            block = max(1, READ_CHUNK_BYTES // max(1, src[0].nbytes))
            for a in range(0, src.shape[0], block):
                out[a : a + block].copy_(src[a : a + block])
                self.release(key)
            return out

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


def safetensors_piece(f: SafetensorsFile, name: str) -> Piece:
    """The piece of one tensor of a safetensors file (a view of its mapping; pread-able at its offset)."""
    e = f.entries[name]
    return Piece(str(f.path), e.shape, e.dtype, lambda: f.tensor(name), lambda: f.release(name), (str(f.path), e.begin))


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format, as `open_checkpoint` sees it.

    `detect(path)`: whether a file or directory holds this format (auto-detection asks the formats in the
    registry's order, so a catch-all comes last). `open(path)`: a reader for it, or a CheckpointError saying
    what is missing. `looks_for`: what detection looks for, for the error when no format matches.
    """

    name: str
    detect: Callable[[Path], bool]
    open: Callable[[Path], CheckpointReader]
    looks_for: str


def unknown_file_type(path: Path, format: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: unknown checkpoint file type for format={format!r}; expected a zip-format .pth/.pt (Meta) "
        "or a .safetensors file (Hugging Face or lazyllama)"
    )
