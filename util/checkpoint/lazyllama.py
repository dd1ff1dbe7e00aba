"""This project's format, "lazyllama": `params.json` + `lazyllama.json` + `consolidated.NN.safetensors` per
model-parallel rank, written by `save_checkpoint` (atomically, per file). lazyllama.json records each key's
split dim, so any saved model-parallel size reads at any other.

Pre-quantized lazyllama (`save_quantized`): the same layout, with each quantized linear's weight stored as its
packed data + quantization state (`<weight key>.packed`, `.absmax`, ... or `.CB`, `.SCB`: see
`QuantLinear.packed_layout`) instead of `<weight key>`, and a "quantization" section in lazyllama.json (and in
every rank file's metadata) recording the settings and each packed weight. Packed data depends on the
model-parallel split, so such a checkpoint loads only at the model-parallel size it was saved with.

Holds the reader (with the checks of the quantization section), the writer and the detection rule.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from util.checkpoint.errors import CheckpointError
from util.checkpoint.files import atomic_write, read_config, read_json, write_json
from util.checkpoint.reader import (
    CheckpointFormat,
    CheckpointReader,
    Layout,
    Piece,
    merge_layout,
    safetensors_piece,
    unknown_file_type,
)
from util.checkpoint.safetensors import SafetensorsFile, WriteItem, dtype_name, write_order, write_safetensors

FORMAT_VERSION = 1
INDEX = "lazyllama.json"
_RANK_FILE_RE = re.compile(r"consolidated\.(\d+)\.safetensors")


def _rank_file_name(rank: int) -> str:
    return f"consolidated.{rank:02d}.safetensors"


class LazyllamaReader(CheckpointReader):
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
        self._files = [SafetensorsFile(f) for f in files]
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
                    f"{f.path}: written as rank {md.get('rank')} of {md.get('world_size')}, but {INDEX} "
                    f"says it is rank {r} of {ws}; the directory mixes two saves (an interrupted save?) - "
                    "save again"
                )
        self._keys: set[str] = set()
        for f in self._files:
            self._keys.update(f.entries)
        absent = sorted(k for k in shard_dims if k not in self._keys)
        if absent:
            raise CheckpointError(
                f"{path}: {INDEX} lists {absent[:5]} but no rank file holds them; the checkpoint is "
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

    def _make_layout(self, key: str, shard_dim: int | None) -> Layout:
        pieces = [safetensors_piece(f, key) for f in self._files if key in f.entries]
        if key not in self._shard_dims and len(pieces) > 1:
            raise CheckpointError(
                f"{self.path}: key {key!r} is in {len(pieces)} rank files but {INDEX} records no shard "
                "dim for it, so it cannot be merged; save the checkpoint again"
            )
        return merge_layout(key, self._shard_dims.get(key), pieces)

    def _release_pieces(self, key: str) -> list[Piece]:
        return [safetensors_piece(f, key) for f in self._files if key in f.entries]

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


def _quantization_of(files: list[SafetensorsFile], info: dict[str, Any], path: Path) -> dict[str, Any] | None:
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
                f"{f.path}: its quantization metadata does not match {INDEX} ({'none' if fq is None else fq}); "
                "the directory mixes two saves (an interrupted save?) - save again"
            )
    q = _check_quantization(q, path / INDEX if "quantization" in info else files[0].path)
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


def _open_dir(path: Path) -> LazyllamaReader:
    index_path = path / INDEX
    info = read_json(index_path)
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
    files = [path / _rank_file_name(r) for r in range(ws)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: {INDEX} says model_parallel_size={ws} but {', '.join(missing)} "
            "is missing; copy the whole directory, or save again"
        )
    shard_dims = _shard_dims_from(info.get("shard_dims", {}), index_path)
    return LazyllamaReader(path, files, shard_dims, read_config(path / "params.json"), info)


def _metadata(path: Path) -> dict[str, str]:
    """A safetensors file's `__metadata__` (its header is parsed and checked; no tensor is read)."""
    f = SafetensorsFile(path)
    f.close()
    return f.metadata


def _open_file(path: Path) -> LazyllamaReader:
    md = _metadata(path)
    if md.get("format") != "lazyllama":
        raise CheckpointError(f"{path}: not a lazyllama file (its safetensors metadata has no format=lazyllama)")
    ws = int(md.get("world_size", "1"))
    if ws != 1:
        raise CheckpointError(
            f"{path}: this file is rank {md.get('rank')} of a {ws}-way sharded lazyllama checkpoint; "
            "open its directory to read the whole model"
        )
    shard_dims = _shard_dims_from(json.loads(md.get("shard_dims", "{}")), path)
    return LazyllamaReader(path, [path], shard_dims, read_config(path.parent / "params.json"), {"file_metadata": md})


def detect(path: Path) -> bool:
    """A directory with lazyllama.json, or a .safetensors file whose metadata says format=lazyllama."""
    if path.is_file():
        return path.suffix == ".safetensors" and _metadata(path).get("format") == "lazyllama"
    return (path / INDEX).is_file()


def open_lazyllama(path: Path) -> LazyllamaReader:
    """A lazyllama directory, or one rank file of a checkpoint saved at model-parallel size 1."""
    if path.is_dir():
        return _open_dir(path)
    if path.suffix == ".safetensors":
        return _open_file(path)
    raise unknown_file_type(path, "lazyllama")


def refuse_interrupted_save(path: Path) -> None:
    """Raise if `path` holds lazyllama rank files but no lazyllama.json: a save that did not finish, which must
    not be read as some other format's safetensors."""
    rank_files = any(_RANK_FILE_RE.fullmatch(c.name) for c in path.glob("*.safetensors"))
    if rank_files and _metadata(next(path.glob("consolidated.*.safetensors"))).get("format") == "lazyllama":
        raise CheckpointError(
            f"{path}: holds lazyllama consolidated.NN.safetensors files but no {INDEX} (the save "
            "was interrupted before rank 0 wrote it?); save the checkpoint again"
        )


FORMAT = CheckpointFormat("lazyllama", detect, open_lazyllama, f"{INDEX} (lazyllama)")


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective over its mesh); any other tensor as it is."""
    return t.full_tensor() if _is_sharded(t) else t


def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")  # DTensor, without importing torch.distributed where it is not used


def _file_items(tensors: Mapping[str, torch.Tensor], dims: Mapping[str, int | None], rank: int) -> list[WriteItem]:
    """What this model-parallel rank's file holds (split keys; replicated ones on rank 0 only), in write order."""
    items = [
        WriteItem(k, t.dtype, tuple(t.shape), functools.partial(_gathered, t))
        for k, t in tensors.items()
        if dims[k] is not None or rank == 0
    ]
    return write_order(items)


def join_sharded_save(
    tensors: Mapping[str, torch.Tensor], *, shard_dims: Mapping[str, int | None], rank: int = 0
) -> int:
    """On a rank that holds shards of the tensors another rank saves with `save_checkpoint` (an FSDP rank other
    than data-parallel rank 0): take part in each gather, in the writer's order, dropping every result at once.
    Returns the count of gathers joined."""
    joined = 0
    for it in _file_items(tensors, {k: shard_dims[k] for k in tensors}, rank):
        if _is_sharded(tensors[it.name]):
            it.produce()  # the collective; the result is dropped at once
            joined += 1
    return joined


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
    one tensor at a time (non-contiguous or GPU tensors are copied to CPU one at a time). A sharded DTensor
    (FSDP's parameters) is gathered (`full_tensor()`) at its turn and dropped once written, so the writing rank
    holds one full tensor at a time; every other rank of its mesh must join those gathers, in the same order,
    with `join_sharded_save` (same tensors, shard dims and rank). Rank 0 also writes
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
    items = _file_items(tensors, dims, rank)
    mine = {it.name for it in items}
    metadata = {
        "format": "lazyllama",
        "format_version": str(FORMAT_VERSION),
        "rank": str(rank),
        "world_size": str(world_size),
        "shard_dims": json.dumps({k: dims[k] for k in mine}, sort_keys=True),
    }
    if quantization is not None:
        metadata["quantization"] = json.dumps(quantization, sort_keys=True)
    target = out / _rank_file_name(rank)
    with atomic_write(target) as f:
        write_safetensors(f, items, metadata)
    if rank == 0:
        if config is not None:
            write_json(out / "params.json", config)
        write_json(
            out / INDEX,
            {
                "format": "lazyllama",
                "format_version": FORMAT_VERSION,
                "model_parallel_size": world_size,
                "shard_dims": dims,
                "trainable_only": trainable_only,
                "dtype": dtype_name(t.dtype for t in tensors.values()),
                "files": [_rank_file_name(r) for r in range(world_size)],
                "extra": extra or {},
                **({"quantization": quantization} if quantization is not None else {}),
            },
        )
        for stale in out.glob("consolidated.*.safetensors"):
            m = _RANK_FILE_RE.fullmatch(stale.name)
            if m and int(m.group(1)) >= world_size:
                stale.unlink(missing_ok=True)
    return target
