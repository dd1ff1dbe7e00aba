"""LLaMA2-Accessory's format: `consolidated.NN-of-MM.model.pth`, one zip-format torch file per model-parallel rank
(MM ranks), each holding `{"model": {"llma.<name>": tensor}}`, with `config.json` (Accessory's ModelArgs as a dict)
and `meta.json` (`{"llama_type": ...}`) beside them.

Read: full models of llama_type "llama" and "llama_peft", and their trainable-only saves (LoRA, bias and norm
deltas). Names map to this project's: `llma.` is dropped; Accessory's LoRA children `<proj>.lora_a.weight` /
`<proj>.lora_b.weight` become `<proj>.lora.lora_a` / `<proj>.lora.lora_b`, and its projection biases (bias tuning)
`<proj>.bias` become `<proj>.bias_tune.bias`. Accessory adds `lora_b(lora_a(x))` unscaled, so its LoRA reads as
lora_alpha = lora_rank (scale 1).

Accessory's files do not record split dims; its loader takes them from the layer classes
(util/tensor_parallel.py there): ColumnParallelLinear weight and bias on dim 0, RowParallelLinear weight on dim 1
(bias replicated), ParallelEmbedding on dim 1. Its LoRA on a column-parallel projection has a replicated A and a
column-parallel B (split on dim 0); on a row-parallel one a row-parallel A (split on dim 1) and a replicated B.
Those are this project's own splits, so any saved model-parallel size loads at any other.

Not read (an error that says so): the additive `*.model-diff.pth` checkpoints, other llama_types (adapters,
multimodal), and `rope_scaling` (Accessory's linear position scaling; not implemented here).
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
from util.checkpoint.files import read_config
from util.checkpoint.meta import MetaReader, _mmap_piece
from util.checkpoint.names import LAYER_RE, UNKNOWN, meta_rule
from util.checkpoint.reader import CheckpointFormat, Layout, merge_layout, unknown_file_type

_FILE_RE = re.compile(r"consolidated\.(\d+)-of-(\d+)\.model\.pth")
_DIFF_RE = re.compile(r"consolidated\.(\d+)-of-(\d+)\.model-diff\.pth")
_PREFIX = "llma."

# Accessory's projections: column-parallel (split on output rows) or row-parallel (split on input columns).
_STYLE = {
    "attention.wq": "column",
    "attention.wk": "column",
    "attention.wv": "column",
    "attention.wo": "row",
    "feed_forward.w1": "column",
    "feed_forward.w3": "column",
    "feed_forward.w2": "row",
}
_ALL_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
_LLAMA_TYPES = ("llama", "llama_peft")

# Accessory's ModelArgs fields that are this project's under the same name and meaning.
_SAME = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "max_batch_size",
    "max_seq_len",
    "bias_tuning",
    "norm_tuning",
)
# llama_peft's defaults, for a config.json that leaves them out (Accessory writes every field).
_PEFT_DEFAULTS = {"lora_rank": -1, "bias_tuning": True, "norm_tuning": True}


def _projection(key: str) -> tuple[str, str, str] | None:
    """(layer prefix `layers.N.`, projection `attention.wq`, rest) for a name under one of the projections."""
    m = LAYER_RE.fullmatch(key)
    if not m:
        return None
    for proj in _STYLE:
        if m.group(2).startswith(proj + "."):
            return f"layers.{m.group(1)}.", proj, m.group(2)[len(proj) + 1 :]
    return None


def to_project_name(name: str) -> str:
    """This project's name for an Accessory state-dict key (`llma.` dropped; LoRA and tuning biases renamed)."""
    key = name.removeprefix(_PREFIX)
    p = _projection(key)
    if p is None:
        return key
    layer, proj, rest = p
    new = {"lora_a.weight": "lora.lora_a", "lora_b.weight": "lora.lora_b", "bias": "bias_tune.bias"}.get(rest)
    return f"{layer}{proj}.{new}" if new else key


def split_dim(key: str) -> int | None | str:
    """The dim Accessory splits `key` (this project's name) on across model-parallel ranks; None: replicated;
    "unknown" for names outside its LLaMA layout."""
    p = _projection(key)
    if p is not None and p[2] != "weight":
        column = _STYLE[p[1]] == "column"
        return {
            "lora.lora_a": None if column else 1,
            "lora.lora_b": 0 if column else None,
            "bias_tune.bias": 0 if column else None,
        }.get(p[2], UNKNOWN)
    return meta_rule(key)


def _load(path: Path) -> dict[str, torch.Tensor]:
    """One rank file's `model` dict, loaded with torch.load(mmap=True, weights_only=True), under this project's
    names. Every failure is a CheckpointError naming the file; a pickle that would run code is refused."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    if magic != b"PK\x03\x04" or not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a complete zip-format torch file (empty, truncated, or saved in torch's legacy format); "
            "copy it again, or re-save it with torch.save"
        )
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain containers "
            f"({str(e).strip().splitlines()[0] if str(e).strip() else e}); nothing was run. Re-save the model "
            "state dict alone"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: the file is truncated or corrupt ({e}); copy it again") from None
    sd = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping):
        raise CheckpointError(
            f"{path}: expected LLaMA2-Accessory's {{'model': {{name: tensor}}}}, found "
            f"{type(obj).__name__}{' with keys ' + str(sorted(map(str, obj))[:5]) if isinstance(obj, Mapping) else ''}"
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: model[{k!r}] holds a {type(v).__name__}; expected a tensor")
        out[to_project_name(k)] = v
    return out


def _config(path: Path) -> dict[str, Any] | None:
    """Accessory's config.json (+ meta.json) as ModelArgs fields; None when there is no config.json."""
    meta = read_config(path / "meta.json") or {}
    llama_type = meta.get("llama_type")
    if llama_type is not None and llama_type not in _LLAMA_TYPES:
        raise CheckpointError(
            f"{path / 'meta.json'}: llama_type={llama_type!r} is not supported (this reader reads "
            f"{', '.join(_LLAMA_TYPES)}: full LLaMA models and their LoRA / bias / norm deltas)"
        )
    raw = read_config(path / "config.json")
    if raw is None:
        return None
    where = path / "config.json"
    values = dict(_PEFT_DEFAULTS) if llama_type == "llama_peft" else {}
    values.update(raw)
    params: dict[str, Any] = {}
    for k, v in values.items():
        if k in _SAME:
            if v is not None:
                params[k] = v
        elif k == "rope_scaling":
            if v is not None:
                raise CheckpointError(
                    f"{where}: rope_scaling={v!r} (Accessory's linear RoPE position scaling) is not implemented "
                    "here; loading without it would compute different attention"
                )
        elif k == "lora_rank":
            if v is not None and v > 0:  # Accessory adds lora_b(lora_a(x)) with no scale: alpha = rank
                params |= {"lora_rank": v, "lora_alpha": float(v), "lora_targets": list(_ALL_TARGETS)}
            else:
                params["lora_rank"] = 0
        else:
            raise CheckpointError(
                f"{where}: field {k!r} of LLaMA2-Accessory's config is not supported by this reader (it reads "
                f"{', '.join(_SAME)}, rope_scaling=null and lora_rank)"
            )
    return params


def _files(path: Path) -> list[Path]:
    found = [(m, p) for p in path.iterdir() if (m := _FILE_RE.fullmatch(p.name))]
    if not found:
        diff = sorted(p.name for p in path.iterdir() if _DIFF_RE.fullmatch(p.name))
        if diff:
            raise CheckpointError(
                f"{path}: {diff[0]} is an additive LLaMA2-Accessory diff checkpoint (values added to a base), which "
                "this loader does not read; add it to its base with Accessory's tools and save a full checkpoint"
            )
        raise CheckpointError(f"{path}: no consolidated.NN-of-MM.model.pth files (a LLaMA2-Accessory checkpoint)")
    sizes = {int(m.group(2)) for m, _ in found}
    if len(sizes) != 1:
        raise CheckpointError(
            f"{path}: rank files of different model-parallel sizes {sorted(sizes)} side by side "
            f"({', '.join(sorted(p.name for _, p in found))}); keep one save per directory"
        )
    n = sizes.pop()
    by_rank = {int(m.group(1)): p for m, p in found}
    missing = [f"consolidated.{r:02d}-of-{n:02d}.model.pth" for r in range(n) if r not in by_rank]
    if missing or len(by_rank) != n:
        raise CheckpointError(
            f"{path}: a {n}-way LLaMA2-Accessory checkpoint, but {', '.join(missing) or 'extra rank files'} "
            f"{'is' if len(missing) == 1 else 'are'} missing; copy the whole directory"
        )
    return [by_rank[r] for r in range(n)]


class AccessoryReader(MetaReader):
    """LLaMA2-Accessory rank files, merged and re-split by Accessory's split rule (see `split_dim`)."""

    def __init__(self, path: Path, files: list[Path], config: dict[str, Any] | None):
        # MetaReader's loading expects flat dicts: set up its state from Accessory's wrapped ones instead.
        super(MetaReader, self).__init__(path, "accessory", config)
        self.files = files
        self._sds = [_load(f) for f in files]
        self._keys = set().union(*(sd.keys() for sd in self._sds))
        for key in sorted(self._keys):
            missing = [f.name for f, sd in zip(files, self._sds) if key not in sd]
            if missing:
                raise CheckpointError(
                    f"{path}: {key!r} is missing from {', '.join(missing)} but present in other rank files; "
                    "the rank files come from different saves"
                )

    def _make_layout(self, key: str, shard_dim: int | None) -> Layout:
        pieces = [_mmap_piece(f, sd[key]) for f, sd in zip(self.files, self._sds)]
        rule = split_dim(key)
        if rule == UNKNOWN:  # outside Accessory's LLaMA layout: split where the shapes differ, else replicated
            return super()._make_layout(key, None)
        return merge_layout(key, rule if len(pieces) > 1 else None, pieces)


def detect(path: Path) -> bool:
    """A directory with consolidated.NN-of-MM.model(-diff).pth files, or one such file."""
    if path.is_file():
        return bool(_FILE_RE.fullmatch(path.name) or _DIFF_RE.fullmatch(path.name))
    return any(_FILE_RE.fullmatch(c.name) or _DIFF_RE.fullmatch(c.name) for c in path.iterdir())


def open_accessory(path: Path) -> AccessoryReader:
    """A LLaMA2-Accessory checkpoint directory, or the one rank file of a model-parallel-size-1 save."""
    if path.is_dir():
        return AccessoryReader(path, _files(path), _config(path))
    m = _FILE_RE.fullmatch(path.name)
    if m is None:
        if _DIFF_RE.fullmatch(path.name):
            _files(path.parent)  # raises the diff-checkpoint error
        raise unknown_file_type(path, "accessory")
    if int(m.group(2)) != 1:
        raise CheckpointError(
            f"{path}: rank {int(m.group(1))} of a {int(m.group(2))}-way LLaMA2-Accessory checkpoint; open its "
            "directory to read the whole model"
        )
    return AccessoryReader(path, [path], _config(path.parent))


FORMAT = CheckpointFormat(
    "accessory", detect, open_accessory, "consolidated.NN-of-MM.model.pth + config.json (LLaMA2-Accessory)"
)
