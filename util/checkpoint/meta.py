"""Meta's LLaMA format: `params.json` + `consolidated.NN.pth`, one zip-format torch file per model-parallel rank.

Read with `torch.load(mmap=True, weights_only=True)` only: a pickle that would run code is refused, never
retried unsafely. Holds the reader, the writer (`write_meta_checkpoint`) and the detection rule.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from util.checkpoint.errors import CheckpointError
from util.checkpoint.files import atomic_write, read_config, write_json
from util.checkpoint.names import UNKNOWN, meta_rule, meta_split_dim
from util.checkpoint.reader import CheckpointFormat, CheckpointReader, Layout, Piece, merge_layout, unknown_file_type
from util.checkpoint.release import dontneed, tensor_span

_FILE_RE = re.compile(r"consolidated\.(\d+)\.pth")
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


def _mmap_piece(file: Path, t: torch.Tensor) -> Piece:
    def release() -> None:
        dontneed(*tensor_span(t))  # t comes from torch.load(mmap=True): it lies in a private file mapping

    return Piece(str(file), tuple(t.shape), t.dtype, lambda: t, release)


class MetaReader(CheckpointReader):
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

    def _make_layout(self, key: str, shard_dim: int | None) -> Layout:
        pieces = [_mmap_piece(f, sd[key]) for f, sd in zip(self.files, self._sds)]
        if len(pieces) == 1:
            return merge_layout(key, None, pieces)
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
            return merge_layout(key, differ.pop(), pieces)
        rule = meta_rule(key)
        ndim = len(pieces[0].shape)
        saved: int | None
        if rule == UNKNOWN:
            saved = None if shard_dim is None or ndim == 0 else shard_dim % ndim
        else:
            saved = rule if isinstance(rule, int) and rule < ndim else None
        return merge_layout(key, saved, pieces)

    def _release_pieces(self, key: str) -> list[Piece]:
        return [_mmap_piece(f, sd[key]) for f, sd in zip(self.files, self._sds)]

    def close(self) -> None:
        super().close()
        self._sds = [{} for _ in self._sds]  # handed-out views keep their mappings alive; ours go


def _meta_files(path: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in path.iterdir() if (m := _FILE_RE.fullmatch(p.name))}
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


def detect(path: Path) -> bool:
    """A .pth/.pt file, or a directory with consolidated.NN.pth files."""
    if path.is_file():
        return path.suffix in (".pth", ".pt")
    return any(_FILE_RE.fullmatch(c.name) for c in path.iterdir())


def open_meta(path: Path) -> MetaReader:
    """A Meta directory (params.json beside the shards becomes `config`) or a single .pth/.pt file."""
    if path.is_dir():
        config = read_config(path / "params.json")
        extra = read_config(path / "extra_params.json")  # what export_meta keeps out of Meta's params.json
        return MetaReader(path, _meta_files(path), {**config, **extra} if config and extra else config)
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: a safetensors file cannot be read as format 'meta' (.pth files only)")
    if path.suffix in (".pth", ".pt"):
        return MetaReader(path, [path], read_config(path.parent / "params.json"))
    raise unknown_file_type(path, "meta")


FORMAT = CheckpointFormat("meta", detect, open_meta, "consolidated.NN.pth + params.json (Meta)")


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if it owns its whole storage, else a compact copy (torch.save saves whole storages)."""
    t = t.detach()
    whole = (
        t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
    return t if whole and t.device.type == "cpu" else t.to("cpu").clone()


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
        with atomic_write(out / f"consolidated.{r:02d}.pth") as f:
            torch.save(shard, f)
        del shard
    write_json(out / "params.json", params)
    return out
