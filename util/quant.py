"""quantize_model(): swap linear layers for bitsandbytes-backed ones, on meta or on real modules.

The quantized linear is a drop-in replacement for `nn.Linear` and for this project's column/row-parallel
linears: same input/output semantics, same model-parallel split, the local matmul done by bitsandbytes'
kernels. On a meta model the swap only records shapes; the weight is quantized when `materialize_and_load`
hands it the checkpoint slice (or its init), in row chunks, so the full-precision tensor never has to exist
whole in memory and bitsandbytes' per-call temporaries stay small.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from bitsandbytes.nn import Int8Params, Params4bit
from torch import nn

from model.layers.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_mp,
    gather_from_mp,
    init_sharded_,
    linear_weight_fill,
    mp_rank,
    mp_world_size,
    reduce_from_mp,
    scatter_to_mp,
)
from util.fast_quant import agrees_with_bitsandbytes, int8_rowwise, quantize_4bit_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantSpec:
    name: str
    bits: int  # 4 or 8
    quant_type: str | None = None  # "nf4" / "fp4" for 4 bits
    compress_statistics: bool = True  # double quantization of the 4-bit absmax
    blocksize: int = 64


QUANT_MODES: dict[str, QuantSpec] = {
    "4bit": QuantSpec("4bit", 4, "nf4", True),
    "4bit_fp4": QuantSpec("4bit_fp4", 4, "fp4", True),
    "8bit": QuantSpec("8bit", 8),
}

# Never quantized by default: the output head (small, sensitive), adapter paths (trained in full precision)
# and visual backbones (their attention reads `.weight` directly, which a packed weight cannot serve).
DEFAULT_BLOCK_LIST: tuple[str, ...] = ("output", "*lora*", "*adapter*", "visual", "visual.*", "*.visual", "*.visual.*")

# The nested (double) quantization of the 4-bit absmax: bitsandbytes' blockwise 8-bit, this block size.
NESTED_BLOCKSIZE = 256

# Elements per quantization chunk. On CPU a chunk is only a unit of work for util.fast_quant, which reads the source
# in place and casts it step by step (~4 MB of scratch per worker thread). Elsewhere each chunk is copied to the
# device in the model's dtype and bitsandbytes' op allocates 12-16 bytes per element of it (~64 MB).
CHUNK_ELEMENTS = 1 << 22


class NonFiniteWeight(ValueError):
    """A weight to quantize holds NaN/Inf (or overflows the model's dtype): packed, it would pass unnoticed, as
    codes whose scale is NaN. The caller adds which tensor and file."""


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in a floating tensor. min and max instead of isfinite(): no bool temporary of the tensor's size
    (a NaN propagates into both, an Inf is one of them), and several times faster on CPU."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(t.detach().reshape(-1))
        return math.isfinite(float(low)) and math.isfinite(float(high))
    except (RuntimeError, NotImplementedError):  # a dtype/device without aminmax
        return bool(torch.isfinite(t).all())


def _require_finite(chunk: torch.Tensor, lo: int, hi: int) -> None:
    if not all_finite(chunk):
        raise NonFiniteWeight(f"rows {lo}-{hi - 1} hold NaN or Inf")


def _require_finite_scales(scales: torch.Tensor, dtype: torch.dtype) -> None:
    # A block's scale is its largest |value| as rounded to the model's dtype: NaN or Inf in the input, or a value
    # beyond that dtype's range (an fp32 1e6 is Inf in fp16; int8 goes through fp16), make it NaN/Inf. On CPU that
    # is the whole check (util.fast_quant's and bitsandbytes' CPU max propagate NaN, tests/test_faults.py holds it
    # to that; checking every input chunk too doubled the quantization time). Elsewhere each chunk on the device
    # is checked before bitsandbytes' kernels see it, as a GPU max may drop a NaN (fmaxf).
    if not all_finite(scales):
        raise NonFiniteWeight(
            f"its quantization scales are NaN/Inf: the weight holds NaN or Inf, or a value overflows {dtype} on the "
            "way to the quantizer (then build in bf16/fp32)"
        )


def quant_spec(quant: str | QuantSpec) -> QuantSpec:
    if isinstance(quant, QuantSpec):
        return quant
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quant mode {quant!r}; choose one of {sorted(QUANT_MODES)} (or 'none')")
    return QUANT_MODES[quant]


def _row_chunks(rows: int, cols: int, granularity: int = 1):
    step = max(granularity, (max(1, CHUNK_ELEMENTS // max(1, cols)) // granularity) * granularity)
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def _fast_quant_on(device: torch.device, kind: str) -> bool:
    # util.fast_quant reproduces bitsandbytes' CPU quantizers (its generic torch kernels) bit for bit, ~10-20x
    # faster. On other devices bitsandbytes runs its own native kernels (fast there), whose rounding is not the
    # same: keep bitsandbytes' op, so a model built there is bitwise the one bitsandbytes would build. Likewise
    # if the installed bitsandbytes' CPU quantizer no longer agrees with util.fast_quant (a probe, once).
    if device.type != "cpu":
        return False
    if not agrees_with_bitsandbytes(kind):
        log.warning("util.fast_quant does not reproduce this bitsandbytes' %s quantizer: using bitsandbytes'", kind)
        return False
    return True


def quantize_4bit_chunked(
    weight: torch.Tensor, spec: QuantSpec, *, device: torch.device, dtype: torch.dtype, check_finite: bool = False
) -> tuple[torch.Tensor, bnbF.QuantState]:
    """bitsandbytes' quantize_4bit, bit for bit, done in row chunks.

    4-bit blocks run over the flattened tensor, so a chunk that holds a whole number of blocks quantizes
    independently; the absmax vector is concatenated and double-quantized once at the end, as bitsandbytes does.
    `weight` may be a read-only view into an mmap'd checkpoint. Its values are quantized as rounded to `dtype` (the
    model's dtype, as an eagerly built model would have held them): on CPU by util.fast_quant, which reads the chunk
    in place and rounds step by step (same bits as bitsandbytes' op, much faster); elsewhere each chunk is copied to
    `device` in `dtype` just before bitsandbytes quantizes it. check_finite: NonFiniteWeight for NaN/Inf; off, this
    is bitsandbytes' op exactly, specials included (see _require_finite_scales for what is checked where).
    """
    rows, cols = weight.shape
    n = rows * cols
    bs = spec.blocksize
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device)
    absmax = torch.empty(math.ceil(n / bs), dtype=torch.float32, device=device)
    rows_per_block_multiple = bs // math.gcd(cols, bs)
    fast = _fast_quant_on(torch.device(device), spec.quant_type)
    for lo, hi in _row_chunks(rows, cols, rows_per_block_multiple):
        start, m = lo * cols, (hi - lo) * cols
        p_out = packed[start // 2 : start // 2 + (m + 1) // 2]  # chunks start on block (so even) boundaries
        a_out = absmax[start // bs : start // bs + math.ceil(m / bs)]
        if fast:  # casts to `dtype` step by step, in its workers: no converted copy of the chunk
            chunk = weight[lo:hi].to(device=device)
            quantize_4bit_blocks(chunk, bs, spec.quant_type, via=(dtype,), out=p_out, absmax_out=a_out)
        else:
            chunk = weight[lo:hi].to(device=device, dtype=dtype)
            if check_finite:
                _require_finite(chunk, lo, hi)
            out, amax = torch.ops.bitsandbytes.quantize_4bit.default(chunk, bs, spec.quant_type, torch.uint8)
            p_out.copy_(out)
            a_out.copy_(amax)
            del out, amax
        del chunk
    if check_finite:
        _require_finite_scales(absmax, dtype)
    code = bnbF.get_4bit_type(spec.quant_type, device=device)
    nested = {}
    if spec.compress_statistics:  # double quantization of the absmax, as bitsandbytes does it
        offset = absmax.mean()
        absmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        nested = {"offset": offset, "state2": state2}
    state = bnbF.QuantState(
        absmax=absmax,
        shape=torch.Size((rows, cols)),
        dtype=dtype,
        blocksize=bs,
        code=code,
        quant_type=spec.quant_type,
        **nested,
    )
    return packed, state


def quantize_8bit_chunked(
    weight: torch.Tensor, *, device: torch.device, dtype: torch.dtype | None = None, check_finite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' row-wise int8 quantization (as Int8Params does: via fp16), in row chunks.

    `dtype`: the model's dtype, which an eagerly built model would have held the weight in before quantizing.
    On CPU the chunks go through util.fast_quant (same bits as bitsandbytes' op, much faster, no chunk copies).
    """
    rows, cols = weight.shape
    cb = torch.empty(rows, cols, dtype=torch.int8, device=device)
    scb = torch.empty(rows, dtype=torch.float32, device=device)
    fast = _fast_quant_on(torch.device(device), "int8")
    for lo, hi in _row_chunks(rows, cols):
        if fast:
            chunk = weight[lo:hi].to(device=device)
            int8_rowwise(chunk, via=(dtype or weight.dtype, torch.float16), out=(cb[lo:hi], scb[lo:hi]))
        else:
            chunk = weight[lo:hi].to(device=device, dtype=dtype or weight.dtype).to(torch.float16)
            if check_finite:
                _require_finite(chunk, lo, hi)
            cb[lo:hi], scb[lo:hi], _ = bnbF.int8_vectorwise_quant(chunk)
        del chunk
    if check_finite:
        _require_finite_scales(scb, torch.float16)
    return cb, scb


class QuantLinear(nn.Module):
    """A bitsandbytes 4-bit or 8-bit linear standing in for nn.Linear or a column/row-parallel linear.

    Built on meta, `weight` is a plain meta Parameter with the local full-precision shape and dtype; it becomes
    a packed `Params4bit` / `Int8Params` in `quantize_weight_`. The quantized weight is frozen; `bias` (if any)
    stays a regular full-precision parameter.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        spec: QuantSpec,
        local_shape: tuple[int, int],
        style: str | None = None,  # None (plain), "column" or "row"
        gather_output: bool = True,
        input_is_parallel: bool = True,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # full sizes
        self.spec, self.style = spec, style
        self.gather_output, self.input_is_parallel = gather_output, input_is_parallel
        self.shard_dims = {
            None: {"weight": None, "bias": None},
            "column": {"weight": 0, "bias": 0},
            "row": {"weight": 1, "bias": None},
        }[style]
        # The full-precision dtype the weight stands for (dequantization target; checkpoint values cast to it).
        self.weight_dtype = dtype or torch.get_default_dtype()
        # Always a meta placeholder: storage arrives packed, so never allocate the full-precision shape here.
        self.weight = nn.Parameter(
            torch.empty(local_shape, dtype=self.weight_dtype, device="meta"), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(local_shape[0] if style != "row" else out_features)) if bias else None
        self.state: bnb.MatmulLtState | None = None  # 8-bit matmul state
        self._module_quant_state: bnbF.QuantState | None = None  # 4-bit, once make_shardable_ moved it here
        self._fp_shape = tuple(local_shape)  # the full-precision local shape, whatever form the weight takes

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec) -> QuantLinear:
        style = {nn.Linear: None, ColumnParallelLinear: "column", RowParallelLinear: "row"}[type(linear)]
        q = cls(
            linear.in_features,
            linear.out_features,
            spec=spec,
            local_shape=tuple(linear.weight.shape),
            style=style,
            gather_output=getattr(linear, "gather_output", True),
            input_is_parallel=getattr(linear, "input_is_parallel", True),
            bias=False,
            dtype=linear.weight.dtype,
        )
        q.bias = linear.bias  # keep the (meta or real) bias parameter as it is
        if not linear.weight.is_meta:  # a real model: quantize now
            q.quantize_weight_(linear.weight.detach(), device=linear.weight.device)
        return q

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.weight, (Params4bit, Int8Params)) or self._module_quant_state is not None

    @property
    def quant_state(self) -> bnbF.QuantState | None:
        """The 4-bit weight's quantization state (absmax, code tables, shape): the Params4bit's, or this module's
        after `make_shardable_`. None for 8 bits and before quantization."""
        if isinstance(self.weight, Params4bit):
            return self.weight.quant_state
        return self._module_quant_state

    def make_shardable_(self, device: torch.device | str | None = None) -> None:
        """Hold the 4-bit codes as a plain frozen uint8 Parameter (the same storage, no copy) and the quantization
        state on this module, so FSDP2's fully_shard can shard the codes: it replaces every parameter by an
        nn.Parameter(DTensor), which would drop Params4bit's quant_state, and all-gathers it (bytes, whatever the
        dtype) before each forward. The state stays whole on every rank (~3% of the codes with double
        quantization). `device`: where the state goes (fully_shard moves parameters to its mesh's device, not
        this state). The math is unchanged: the same codes and state reach bnb.matmul_4bit."""
        if self.spec.bits != 4:
            raise ValueError(
                f"{type(self).__name__}: only 4-bit weights can be sharded; 8-bit ones keep their codes in "
                "bitsandbytes' MatmulLtState, which FSDP does not see (use --data_parallel ddp with --quant 8bit)"
            )
        if self.weight.is_meta and not self.is_quantized:
            # Still on meta: the placeholder takes the packed codes' shape, so FSDP shards the codes' rows;
            # materialize_and_load then quantizes the weight and keeps this rank's rows (quantize + adopt_codes_).
            rows, cols = self._fp_shape
            self.weight = nn.Parameter(
                torch.empty(((rows * cols + 1) // 2, 1), dtype=torch.uint8, device="meta"), requires_grad=False
            )
            return
        if not isinstance(self.weight, Params4bit):
            if self._module_quant_state is None and self.weight.dtype != torch.uint8:
                raise RuntimeError(f"{type(self).__name__}.make_shardable_: the weight is neither on meta nor packed")
            return  # already shardable
        state = self.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "this 4-bit weight was repacked for CPU inference (prepare_for_inference); it cannot train"
            )
        if device is not None:
            state.to(torch.device(device))
        self._module_quant_state = state
        self.weight = nn.Parameter(self.weight.data, requires_grad=False)

    def _whole_codes(self) -> torch.Tensor:
        """The local 4-bit codes; refused while FSDP holds them sharded (outside its forward)."""
        codes = self.weight.data
        if hasattr(codes, "full_tensor"):  # a DTensor: this rank has a slice of the codes
            raise RuntimeError(
                f"{type(self).__name__}: the 4-bit codes are sharded by FSDP here; read them inside the forward or "
                "from the unsharded model"
            )
        return codes

    def quantize_weight_(self, weight: torch.Tensor, *, device: torch.device | str) -> None:
        """Quantize `weight` (this rank's full-precision local slice, any float dtype, may be an mmap view)."""
        self.install_(self.quantize(weight, device=device))

    def install_(self, packed: tuple) -> None:
        """Make `quantize`'s result this layer's weight."""
        (self._install_4bit if self.spec.bits == 4 else self._install_8bit)(*packed)

    def quantize(self, weight: torch.Tensor, *, device: torch.device | str) -> tuple:
        """The packed form of `weight` without installing it: (codes, QuantState) at 4 bits, (CB, SCB) at 8."""
        device = torch.device(device)
        expected = self.local_shape
        if tuple(weight.shape) != expected:
            raise ValueError(f"{type(self).__name__}: weight of shape {tuple(weight.shape)}, expected {expected}")
        # NaN/Inf refused (NonFiniteWeight): packed, they would pass as codes with a NaN scale
        kw = dict(device=device, dtype=self.weight_dtype, check_finite=True)
        if self.spec.bits == 4:
            return quantize_4bit_chunked(weight, self.spec, **kw)
        return quantize_8bit_chunked(weight, **kw)

    def adopt_codes_(self, codes: torch.Tensor, state: bnbF.QuantState) -> None:
        """The shardable form with `codes` as the weight: this rank's rows of the packed codes (an FSDP DTensor)
        or all of them, and the whole quantization state on the module (see make_shardable_)."""
        if self.spec.bits != 4 or codes.dtype != torch.uint8:
            raise ValueError(f"{type(self).__name__}: adopt_codes_ takes 4-bit uint8 codes, got {codes.dtype}")
        self.weight = nn.Parameter(codes, requires_grad=False)
        self._module_quant_state = state

    def _install_4bit(self, packed: torch.Tensor, state: bnbF.QuantState) -> None:
        self._module_quant_state = None
        self.weight = Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=self.spec.blocksize,
            compress_statistics=self.spec.compress_statistics,
            quant_type=self.spec.quant_type,
            bnb_quantized=True,
        )

    def _install_8bit(self, cb: torch.Tensor, scb: torch.Tensor) -> None:
        self.weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        self.state = bnb.MatmulLtState()
        self.state.CB, self.state.SCB = cb, scb
        self.state.has_fp16_weights = False
        self.state.threshold = 0.0

    def _apply(self, fn, recurse: bool = True):
        """model.to(device) etc.: Int8Params moves its codes, but the 8-bit matmul reads the codes and row scales
        from `state`, plain attributes no Module method sees. They follow the weight here - its device only: the
        scales stay fp32 whatever dtype the model is cast to (a buffer would be cast along)."""
        super()._apply(fn, recurse)
        if self.spec.bits == 8 and self.state is not None and self.is_quantized:
            self.state.CB = self.weight.data
            self.state.SCB = self.state.SCB.to(self.weight.device)
        if self._module_quant_state is not None:  # make_shardable_'s state: a plain attribute, as above
            self._module_quant_state.to(self.weight.device)
        return self

    # --- pre-quantized weights: the packed data and quantization state as plain tensors (util.checkpoint's
    #     save_quantized writes them, materialize_and_load hands them back), so a model is quantized only once.

    def quant_settings(self) -> dict:
        """The settings packed data depends on (JSON-able); a pre-quantized weight loads only where they match."""
        return self.settings_of(self.spec)

    @staticmethod
    def settings_of(s: QuantSpec) -> dict:
        if s.bits == 8:
            return {"mode": s.name, "bits": 8}
        out = {
            "mode": s.name,
            "bits": 4,
            "quant_type": s.quant_type,
            "blocksize": s.blocksize,
            "compress_statistics": s.compress_statistics,
        }
        if s.compress_statistics:
            out["nested_blocksize"] = NESTED_BLOCKSIZE
        return out

    def packed_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Name -> (shape, dtype) of each tensor of this layer's quantized weight (local to this rank); dtype None:
        any floating dtype (bitsandbytes builds its code tables in the default dtype of the moment).

        4-bit: `packed` (two 4-bit codes per byte, over the flattened weight), `absmax` (one per block: fp32, or
        uint8 when double-quantized), `quant_map` (the 16 code values), and with double quantization
        `nested_absmax`, `nested_quant_map` (bitsandbytes' 8-bit dynamic map) and `nested_offset` (the mean
        subtracted from absmax before its quantization; stored with shape [1]). 8-bit: `CB` (int8, the weight's
        shape) and `SCB` (fp32 row scales).
        """
        rows, cols = self.local_shape
        f32 = torch.float32
        if self.spec.bits == 8:
            return {"CB": ((rows, cols), torch.int8), "SCB": ((rows,), f32)}
        n, bs = rows * cols, self.spec.blocksize
        blocks = math.ceil(n / bs)
        out = {"packed": (((n + 1) // 2, 1), torch.uint8)}
        if self.spec.compress_statistics:
            out["absmax"] = ((blocks,), torch.uint8)
        else:
            out["absmax"] = ((blocks,), f32)
        out["quant_map"] = ((16,), None)
        if self.spec.compress_statistics:
            out["nested_absmax"] = ((math.ceil(blocks / NESTED_BLOCKSIZE),), f32)
            out["nested_quant_map"] = ((256,), None)
            out["nested_offset"] = ((1,), f32)
        return out

    @property
    def local_shape(self) -> tuple[int, int]:
        """This rank's full-precision weight shape (also once the weight is packed)."""
        return self._fp_shape

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The quantized weight as the plain tensors `packed_layout` names (views of this layer's own state)."""
        if not self.is_quantized:
            raise RuntimeError(
                f"{type(self).__name__} has no quantized weight yet (still on meta): run materialize_and_load first"
            )
        if self.spec.bits == 8:
            return {"CB": self.state.CB, "SCB": self.state.SCB}
        qs = self.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            raise RuntimeError(
                "this 4-bit weight was repacked in place for bitsandbytes' CPU inference kernel (a bnb.nn.Linear4bit "
                "eval forward); its layout is not the portable one. Save before running it through Linear4bit."
            )
        out = {"packed": self._whole_codes(), "absmax": qs.absmax, "quant_map": qs.code}
        if qs.nested:
            out.update(
                nested_absmax=qs.state2.absmax, nested_quant_map=qs.state2.code, nested_offset=qs.offset.reshape(1)
            )
        return out

    def adopt_packed_(self, tensors: dict[str, torch.Tensor], *, source: str = "") -> None:
        """Install `tensors` (named as `packed_layout` says, all on one device) as this layer's quantized weight,
        taking them over as they are (no copy: they become the weight's storage)."""
        self._check_packed(tensors, source)
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ValueError(f"{source}: the packed tensors are on several devices {sorted(map(str, devices))}")
        if self.spec.bits == 8:
            self._install_8bit(tensors["CB"], tensors["SCB"])
            return
        offset = state2 = None
        if self.spec.compress_statistics:  # as bitsandbytes.functional.quantize_blockwise builds it
            offset = tensors["nested_offset"].reshape(())
            state2 = bnbF.QuantState(
                absmax=tensors["nested_absmax"],
                code=tensors["nested_quant_map"],
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
        state = bnbF.QuantState(
            absmax=tensors["absmax"],
            shape=torch.Size(self.local_shape),
            dtype=self.weight_dtype,
            blocksize=self.spec.blocksize,
            code=tensors["quant_map"],
            quant_type=self.spec.quant_type,
            offset=offset,
            state2=state2,
        )
        self._install_4bit(tensors["packed"], state)

    def _check_packed(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        where = f"{source}: " if source else ""
        layout = self.packed_layout()
        if set(tensors) != set(layout):
            raise ValueError(
                f"{where}pre-quantized weight has tensors {sorted(tensors)}, expected {sorted(layout)} for "
                f"{self.spec.name} (quant settings {self.quant_settings()})"
            )
        for name, (shape, dtype) in layout.items():
            t = tensors[name]
            if tuple(t.shape) != shape or (t.dtype != dtype if dtype else not t.dtype.is_floating_point):
                raise ValueError(
                    f"{where}pre-quantized {name!r} is {t.dtype} {list(t.shape)}, expected {dtype or 'float'} "
                    f"{list(shape)} for a {self.spec.name} weight of local shape {list(self.local_shape)}; the "
                    "checkpoint was quantized for another config or model-parallel size"
                )

    def init_weight(self, device: torch.device | str) -> torch.Tensor:
        """The full-precision init this layer would have unquantized (same values for the same RNG state)."""
        w = torch.empty(self.local_shape, dtype=torch.float32, device=device)
        return init_sharded_(
            w,
            linear_weight_fill(self.in_features),
            shard_dim=self.shard_dims["weight"],
            rank=mp_rank() if self.style else 0,
            world_size=mp_world_size() if self.style else 1,
        )

    def reset_parameters(self) -> None:
        device = self.bias.device if self.bias is not None and not self.bias.is_meta else None
        if self.is_quantized:
            device = self.weight.device
        if device is None:  # still on meta: materialize_and_load calls quantize_weight_ with the real values
            return
        self.quantize_weight_(self.init_weight(device), device=device)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def dequantized_weight(self) -> torch.Tensor:
        """The full-precision weight the kernels compute with: the reference tests hold the quantized matmul to.
        Nothing in the library reads it: merge_lora and the full-precision writers (save_model, export_meta) refuse
        quantized models instead of dequantizing them."""
        if self.spec.bits == 4:
            return bnbF.dequantize_4bit(self._whole_codes(), self.quant_state)
        return (self.state.CB.float() * self.state.SCB[:, None] / 127).to(self.weight_dtype)

    def pack_for_cpu_inference_(self) -> bool:
        """Repack a 4-bit CPU weight into bitsandbytes' AVX512-BF16 inference layout (several times faster
        decoding). The layer becomes inference-only: that layout keeps the absmax in bf16 (results differ in the
        last bits) and has no training path. False (nothing done) where the CPU or the shapes do not allow it."""
        if (
            self.spec.bits != 4
            or not isinstance(self.weight, Params4bit)  # the shardable (FSDP) form trains
            or self.weight.device.type != "cpu"
            or not bnbF.has_avx512bf16()
            or self.weight.quant_state.shape[1] % self.spec.blocksize
            or self.weight.quant_state.shape[0] % 32
            or getattr(self.weight.quant_state, "packing_format_for_cpu", False)
        ):
            return False
        self.weight.data, self.weight.quant_state = bnbF._convert_weight_packed_for_cpu(
            self.weight.data, self.weight.quant_state
        )
        self.inference_only = True
        return True

    def _local(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if getattr(self, "inference_only", False) and (self.training or (torch.is_grad_enabled() and x.requires_grad)):
            raise RuntimeError(
                "this 4-bit layer was repacked for CPU inference (prepare_for_inference) and cannot train; "
                "build the model again for training"
            )
        if not self.is_quantized:
            raise RuntimeError("QuantLinear has no weight yet: run materialize_and_load(model, ...) first")
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.spec.bits == 4:
            # Calls the kernel directly rather than through bnb.nn.Linear4bit.forward, whose CPU inference path
            # repacks the weight in place (AVX512-BF16 CPUs) and breaks a later training forward.
            return bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=self.quant_state)
        self.state.is_training = self.training
        return bnb.matmul(x, self.weight, bias=bias, state=self.state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "column":
            y = self._local(copy_to_mp(x), self.bias)
            return gather_from_mp(y) if self.gather_output else y
        if self.style == "row":
            if not self.input_is_parallel:
                x = scatter_to_mp(x)
            y = reduce_from_mp(self._local(x, None))
            return y + self.bias if self.bias is not None else y
        return self._local(x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, quant={self.spec.name}, "
            f"style={self.style}, local_weight={tuple(self.weight.shape) if not self.is_quantized else 'packed'}"
        )


def _blocked(name: str, block_list: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in block_list)


def quantize_model(
    model: nn.Module, quant: str | None, *, block_list: tuple[str, ...] = DEFAULT_BLOCK_LIST
) -> nn.Module:
    """Replace linears (nn.Linear, ColumnParallelLinear, RowParallelLinear) by QuantLinear, in place.

    `quant`: "4bit" (nf4 + double quantization), "4bit_fp4", "8bit", or None / "none" (no change). Modules whose
    qualified name matches a `block_list` pattern (fnmatch) are skipped with everything below them.
    Works on meta (records shapes only) and on real models (quantizes now).
    """
    if quant in (None, "none"):
        return model
    spec = quant_spec(quant)
    quantizable = (nn.Linear, ColumnParallelLinear, RowParallelLinear)  # exact types: subclasses may read .weight
    converted = 0

    def visit(module: nn.Module, prefix: str) -> None:
        nonlocal converted
        for name, child in list(module.named_children()):
            qual = prefix + name
            if _blocked(qual, block_list):
                continue
            if type(child) in quantizable:
                if "lora" in child._modules:
                    raise ValueError(
                        f"{qual} already has LoRA: quantize the base before adding LoRA (build_model does it in "
                        "that order), or build again with quant set"
                    )
                setattr(module, name, QuantLinear.from_linear(child, spec))
                converted += 1
            else:
                visit(child, qual + ".")

    visit(model, "")
    log.info("quantize_model: %d linear layers -> %s (block list %s)", converted, spec.name, list(block_list))
    return model


def prepare_for_inference(model: nn.Module) -> int:
    """Inference-only speed-up on CPU: repack 4-bit weights for bitsandbytes' AVX512-BF16 kernel where the CPU
    has it, and switch to eval mode. Returns how many layers were repacked (0 elsewhere: nothing changes)."""
    model.eval()
    return sum(m.pack_for_cpu_inference_() for m in model.modules() if isinstance(m, QuantLinear))
