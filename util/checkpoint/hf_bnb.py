"""Hugging Face bitsandbytes saves: `save_pretrained` of a model loaded with `load_in_4bit` / `load_in_8bit`
(config.json has `quantization_config` with quant_method "bitsandbytes").

Each quantized linear is stored packed. 4-bit: `<name>.weight` (uint8, two codes per byte over the flattened
weight), `.weight.absmax`, `.weight.quant_map`, with double quantization `.weight.nested_absmax` and
`.weight.nested_quant_map`, and `.weight.quant_state.bitsandbytes__nf4|fp4` (a JSON blob: quant_type, blocksize,
dtype, shape, nested_blocksize, nested_offset). 8-bit: `<name>.weight` (int8), `<name>.SCB` (fp32 row scales) and
`<name>.weight_format` (0: row-major). These are bitsandbytes' own structures, the ones this project's
save_quantized writes, so the reader presents them as a pre-quantized checkpoint (`quantization`, keys
`<weight key>.packed` / `.absmax` / ... / `.CB` / `.SCB`): materialize_and_load adopts them as they are when the
build's quantization matches, and otherwise says how to build.

One transform: Hugging Face keeps q/k projections with their rows permuted for its rotate_half RoPE
(names.hf_permute_qk), so their packed rows are un-permuted here. That is exact for the codes, for 8-bit, and for
the absmax of each 4-bit block as long as every block lies within one row (in_features a multiple of the
blocksize). With double quantization the absmax is itself quantized in groups of 256 blocks; where moving rows
moves absmax values between groups (head_dim * in_features / blocksize > 256, every real model), the absmax is
dequantized (exactly, as bitsandbytes does), un-permuted and double-quantized again - the 4-bit codes stay
bitwise, the q/k block scales change by the 8-bit rounding of the absmax (recorded in `info["renested"]`). Blocks
spanning rows cannot be un-permuted: an error says to load the full-precision checkpoint instead.

Linears Hugging Face left unquantized (llm_int8_skip_modules) arrive in full precision and are quantized on
arrival. The 8-bit matmul here has no outlier decomposition: a save made with llm_int8_threshold > 0 (transformers'
default 6.0) loads the same weights, but transformers computes activation outliers in fp16 (a warning says so).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from util.checkpoint import hf
from util.checkpoint.errors import CheckpointError
from util.checkpoint.files import read_config
from util.checkpoint.names import check_qk, hf_unpermute_qk, meta_split_dim, meta_to_hf_name, qk_heads_param
from util.checkpoint.reader import CheckpointFormat, CheckpointReader, Layout, Piece, merge_layout

log = logging.getLogger(__name__)

NESTED_BLOCKSIZE = 256  # this project's (and bitsandbytes') double-quantization block size
_QS_KEYS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
_MODES = {("nf4", True): "4bit", ("fp4", True): "4bit_fp4"}  # util.quant.QUANT_MODES' names for these settings


def _quantization_config(path: Path) -> dict[str, Any] | None:
    cfg = read_config(path / "config.json")
    q = (cfg or {}).get("quantization_config")
    return q if isinstance(q, dict) else None


def renest_absmax(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: torch.Tensor,
    order: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Double-quantized 4-bit block scales put into a new block `order`: dequantized exactly as bitsandbytes'
    dequantize_4bit does (code[absmax] * nested_absmax[group] + offset, fp32), reordered, and double-quantized again
    as this project's quantizer does (offset = mean, 8-bit blockwise in groups of 256)."""
    import bitsandbytes.functional as bnbF  # only here: the rest of the checkpoint package does not need it

    state2 = bnbF.QuantState(absmax=nested_absmax, code=nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    values = bnbF.dequantize_blockwise(absmax, state2) + offset
    values = values[order]
    new_offset = values.mean()
    codes, new2 = bnbF.quantize_blockwise(values - new_offset, blocksize=NESTED_BLOCKSIZE)
    return {
        "absmax": codes,
        "nested_absmax": new2.absmax,
        "nested_quant_map": new2.code,
        "nested_offset": new_offset.reshape(1),
    }


class HFBnbReader(CheckpointReader):
    """A Hugging Face bitsandbytes save, as a pre-quantized checkpoint under this project's names.

    Full-precision tensors (embeddings, norms, the output head) are read through the plain Hugging Face reader.
    """

    def __init__(self, path: Path, inner: CheckpointReader, qcfg: dict[str, Any]):
        super().__init__(path, "hf_bnb", inner.config)
        self._inner = inner
        self.info = {"quantization_config": qcfg, "renested": []}
        self._virtual: dict[str, Piece] = {}  # our packed key -> how to get it
        self._hidden: set[str] = set()  # inner keys the packed weights consume
        self._renested: dict[str, dict[str, torch.Tensor]] = {}
        self._keys: set[str] | None = None
        if qcfg.get("load_in_4bit") and qcfg.get("bnb_4bit_quant_storage", "uint8") != "uint8":
            raise CheckpointError(
                f"{path / 'config.json'}: bnb_4bit_quant_storage={qcfg['bnb_4bit_quant_storage']!r}; only uint8 "
                "storage (the default) is read"
            )
        if qcfg.get("load_in_8bit") and qcfg.get("llm_int8_threshold", 0.0):
            log.warning(
                "%s: saved with llm_int8_threshold=%s; this project's 8-bit matmul has no outlier decomposition "
                "(threshold 0): the weights are the same, activations above the threshold are not computed in fp16",
                path,
                qcfg["llm_int8_threshold"],
            )
        settings: dict[str, Any] | None = None
        weights: dict[str, dict[str, Any]] = {}
        keys = inner.keys()
        for key in sorted(keys):
            if not key.endswith(".weight") or meta_to_hf_name(key) == key:
                continue
            name = meta_to_hf_name(key)
            qs_keys = [k for k in keys if k.startswith(name + ".quant_state.bitsandbytes__")]
            if qs_keys:
                mine, entry = self._add_4bit(key, name, qs_keys[0])
            elif name.removesuffix(".weight") + ".SCB" in keys:
                mine, entry = self._add_8bit(key, name)
            else:
                continue  # full precision (not quantized by Hugging Face)
            if settings is None:
                settings, first = mine, key
            elif mine != settings:
                raise CheckpointError(
                    f"{path}: {key} is quantized as {mine} but {first} as {settings}; mixed settings are not read"
                )
            weights[key] = entry
        if settings is None:
            raise CheckpointError(
                f"{path}: config.json has a bitsandbytes quantization_config but no tensor is stored quantized"
            )
        stray = sorted(k for k in keys - self._hidden if ".quant_state." in k or k.endswith((".SCB", "weight_format")))
        if stray:
            raise CheckpointError(f"{path}: quantization tensors {stray[:4]} without their weight; the save is partial")
        kind = (settings.get("quant_type"), settings.get("compress_statistics"))
        mode = "8bit" if settings["bits"] == 8 else _MODES.get(kind)
        dtypes = {w["dtype"] for w in weights.values()}
        self.quantization = {
            "mode": mode or "bitsandbytes",
            **settings,
            "model_parallel_size": 1,  # one file set holding whole weights: packed data is split only at save time
            "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
            "adapters": False,
            "weights": weights,
        }

    # --- the packed weights

    def _raw(self, name: str) -> Piece:
        """The stored tensor of the plain reader's key `name`, as it is: its piece (the plain reader un-permutes q/k
        only in read(), so the piece holds the packed bytes as saved)."""
        self._hidden.add(name)
        return self._inner._layout(name, None).pieces[0]

    def _qk_heads(self, key: str) -> int | None:
        field = qk_heads_param(key)
        if field is None:
            return None
        n = (self.config or {}).get(field)
        if not isinstance(n, int):
            raise CheckpointError(f"{self.path}: un-permuting {key} needs {field} from config.json; it has none")
        return n

    def _rows(self, piece: Piece, heads: int, rows: int, what: str) -> Piece:
        """A piece whose stored tensor holds `rows` rows of the weight (flattened or not), un-permuted."""

        def load() -> torch.Tensor:
            t = piece.load()
            m = t.reshape(rows, -1)
            check_qk(m, heads, what)
            return hf_unpermute_qk(m, heads).reshape(t.shape)

        return Piece(piece.file, piece.shape, piece.dtype, load, piece.release)

    def _add_4bit(self, key: str, name: str, qs_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        where = f"{self._inner.file_of(qs_key)}: {qs_key!r}"
        try:
            qs = json.loads(bytes(self._inner.read(qs_key).numpy().tobytes()).decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where}: not a bitsandbytes quant state ({e}); the file is damaged") from None
        unknown = sorted(set(qs) - _QS_KEYS)
        if unknown or qs.get("quant_type") not in ("nf4", "fp4") or not isinstance(qs.get("shape"), list):
            raise CheckpointError(f"{where}: unsupported quant state {qs} (unknown {unknown})")
        rows, cols = qs["shape"]
        bs = int(qs["blocksize"])
        nested = "nested_offset" in qs
        if nested and qs.get("nested_blocksize") != NESTED_BLOCKSIZE:
            raise CheckpointError(
                f"{where}: nested_blocksize={qs.get('nested_blocksize')}; this project double-quantizes in blocks of "
                f"{NESTED_BLOCKSIZE} only"
            )
        names = ["packed", "absmax", "quant_map"] + (["nested_absmax", "nested_quant_map", "nested_offset"] * nested)
        raw = {"packed": self._raw(key)}
        raw |= {n: self._raw(f"{name}.{n}") for n in ("absmax", "quant_map")}
        if nested:
            raw["nested_absmax"] = self._raw(name + ".nested_absmax")
            raw["nested_quant_map"] = self._raw(name + ".nested_quant_map")
            offset = torch.tensor([float(qs["nested_offset"])], dtype=torch.float32)
            raw["nested_offset"] = Piece(where, (1,), torch.float32, lambda: offset, lambda: None)
        self._hidden.add(qs_key)
        heads = self._qk_heads(key)
        if heads is not None:
            if cols % bs:
                raise CheckpointError(
                    f"{where}: its 4-bit blocks of {bs} span rows ({cols} columns), so the rows Hugging Face permuted "
                    f"for {key} cannot be put back without re-quantizing the codes; load the full-precision "
                    "checkpoint and quantize it while building (build_model(..., quant=...))"
                )
            what = f"{self._inner.file_of(key)}: {name!r}"
            raw["packed"] = self._rows(raw["packed"], heads, rows, what)
            order = hf_unpermute_qk(torch.arange(rows * cols // bs).reshape(rows, -1), heads).reshape(-1)
            groups = torch.arange(order.numel()) // NESTED_BLOCKSIZE
            if not nested or torch.equal(order // NESTED_BLOCKSIZE, groups):  # every absmax stays in its group
                raw["absmax"] = self._rows(raw["absmax"], heads, rows, what)
            else:
                self.info["renested"].append(key)
                log.info(
                    "%s: %s: un-permuting its rows moves absmax between double-quantization groups; "
                    "its block scales are double-quantized again (codes unchanged)",
                    self.path,
                    key,
                )
                stored = dict(raw)  # the pieces as saved: the new ones are computed from them
                for n in ("absmax", "nested_absmax", "nested_quant_map", "nested_offset"):
                    raw[n] = self._renested_piece(key, n, stored, order)
        for n in names:
            self._virtual[f"{key}.{n}"] = raw[n]
        settings = {"bits": 4, "quant_type": qs["quant_type"], "blocksize": bs, "compress_statistics": nested}
        if nested:
            settings["nested_blocksize"] = NESTED_BLOCKSIZE
        entry = {"shape": [rows, cols], "shard_dim": meta_split_dim(key), "dtype": qs["dtype"], "tensors": names}
        return settings, entry

    def _renested_piece(self, key: str, n: str, raw: dict[str, Piece], order: torch.Tensor) -> Piece:
        def load() -> torch.Tensor:
            if key not in self._renested:
                self._renested[key] = renest_absmax(
                    raw["absmax"].load(),
                    raw["nested_absmax"].load(),
                    raw["nested_quant_map"].load(),
                    raw["nested_offset"].load().reshape(()),
                    order,
                )
            return self._renested[key][n]

        def release() -> None:
            raw[n].release()
            self._renested.pop(key, None) if n == "nested_offset" else None

        return Piece(raw[n].file, raw[n].shape, raw[n].dtype, load, release)

    def _add_8bit(self, key: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        scb_name, fmt_name = name.removesuffix(".weight") + ".SCB", name + "_format"
        raw = {"CB": self._raw(key), "SCB": self._raw(scb_name)}
        if fmt_name in self._inner.keys():
            self._hidden.add(fmt_name)
            fmt = int(self._inner.read(fmt_name).reshape(-1)[0])
            if fmt != 0:
                raise CheckpointError(
                    f"{self._inner.file_of(fmt_name)}: {fmt_name!r}={fmt}: only bitsandbytes' row-major int8 layout "
                    "(0) is read; save the model from a bitsandbytes version that stores it row-major"
                )
        rows, cols = raw["CB"].shape
        if raw["CB"].dtype != torch.int8 or tuple(raw["SCB"].shape) != (rows,):
            raise CheckpointError(
                f"{self._inner.file_of(key)}: {name!r} is {raw['CB'].dtype} {list(raw['CB'].shape)} with SCB "
                f"{list(raw['SCB'].shape)}; expected int8 [out, in] and [out]"
            )
        heads = self._qk_heads(key)
        if heads is not None:
            what = f"{self._inner.file_of(key)}: {name!r}"
            raw = {n: self._rows(p, heads, rows, what) for n, p in raw.items()}
        for n, p in raw.items():
            self._virtual[f"{key}.{n}"] = p
        entry = {"shape": [rows, cols], "shard_dim": meta_split_dim(key), "dtype": "float16", "tensors": ["CB", "SCB"]}
        return {"bits": 8}, entry

    # --- CheckpointReader: packed keys here, every other key from the plain reader

    def keys(self) -> set[str]:
        if self._keys is None:  # asked on every read: computed once, after __init__ has found the packed weights
            replaced = {k.rsplit(".", 1)[0] for k in self._virtual}
            self._keys = (self._inner.keys() - self._hidden - replaced) | set(self._virtual)
        return set(self._keys)

    def _make_layout(self, key: str, shard_dim: int | None) -> Layout:
        return merge_layout(key, None, [self._virtual[key]])

    def _delegate(self, key: str) -> bool:
        if key in self._virtual:
            return False
        self._check_key(key)
        return True

    def shape(self, key: str) -> tuple[int, ...]:
        return self._inner.shape(key) if self._delegate(key) else super().shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._inner.dtype(key) if self._delegate(key) else super().dtype(key)

    def file_of(self, key: str) -> str:
        return self._inner.file_of(key) if self._delegate(key) else super().file_of(key)

    def read(self, key: str, **kw: Any) -> torch.Tensor:
        return self._inner.read(key, **kw) if self._delegate(key) else super().read(key, **kw)

    def read_into(self, key: str, out: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self._inner.read_into(key, out, **kw) if self._delegate(key) else super().read_into(key, out, **kw)

    def release(self, key: str) -> None:
        self._inner.release(key) if self._delegate(key) else super().release(key)

    def close(self) -> None:
        super().close()
        self._renested.clear()
        self._inner.close()


def detect(path: Path) -> bool:
    """A Hugging Face directory (or a .safetensors file in one) whose config.json has a quantization_config."""
    if path.is_file():
        return path.suffix == ".safetensors" and _quantization_config(path.parent) is not None
    return _quantization_config(path) is not None and any(path.glob("*.safetensors"))


def open_hf_bnb(path: Path) -> HFBnbReader:
    folder = path if path.is_dir() else path.parent
    qcfg = _quantization_config(folder)
    if qcfg is None:
        raise CheckpointError(f"{folder / 'config.json'}: no quantization_config (not a quantized Hugging Face save)")
    method = qcfg.get("quant_method")
    if method != "bitsandbytes":
        raise CheckpointError(
            f"{folder / 'config.json'}: quantization_config.quant_method={method!r}; of Hugging Face's quantized "
            "saves only bitsandbytes (load_in_4bit / load_in_8bit) is read. Load the full-precision model instead"
        )
    return HFBnbReader(path, hf.open_hf(path), qcfg)


FORMAT: CheckpointFormat = CheckpointFormat(
    "hf_bnb", detect, open_hf_bnb, "config.json with a bitsandbytes quantization_config (Hugging Face 4/8-bit save)"
)
