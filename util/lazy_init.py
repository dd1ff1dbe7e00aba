"""Lazy model creation: build on meta, then allocate and fill one tensor at a time.

    with meta_init(torch.bfloat16):          # no storage, no init work
        model = Transformer(args)
    quantize_model(model, "4bit")            # still on meta
    report = materialize_and_load(model, [ckpt_dir])

`materialize_and_load` walks the modules in order. For each tensor still on meta it allocates storage on
`device` and fills it from the last checkpoint that has it (this rank's slice, cast to the tensor's dtype) or,
where no checkpoint has it, by its module's own `reset_parameters` (seeded per module name, so the result does
not depend on walk order or on other modules). Quantized linears quantize their weight as it arrives - or, from
a pre-quantized checkpoint (`util.checkpoint.save_quantized`), adopt the stored packed weight and quantization
state as they are (copied straight into fresh storage on `device`; nothing is quantized). The checkpoint's pages
are released as soon as a tensor is consumed and freed heap is returned to the OS after each module, so peak
memory stays near the size of the finished model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.init import meta_init as meta_init  # re-exported: the public API is util.lazy_init.meta_init
from model.init import real_init as real_init
from model.layers.parallel import mp_rank, mp_world_size
from util import memory
from util.checkpoint import CheckpointReader, open_checkpoint, packed_key
from util.quant import QUANT_MODES, QuantLinear

log = logging.getLogger(__name__)

# Keys some checkpoints carry that this model computes itself (Meta's rope table, HF's rotary inv_freq).
IGNORED_CHECKPOINT_KEYS = ("rope.freqs", "*.inv_freq")


@dataclass
class LoadReport:
    loaded: int = 0  # tensors filled from a checkpoint (a pre-quantized weight counts as one)
    initialized: int = 0  # tensors filled by their module's reset_parameters
    quantized: int = 0  # linear weights quantized on arrival
    prequantized: int = 0  # linear weights adopted already quantized (also counted in loaded)
    missing_keys: list[str] = field(default_factory=list)  # persistent keys no checkpoint had (initialized)
    unexpected_keys: list[str] = field(default_factory=list)  # checkpoint keys the model does not have
    ignored_keys: list[str] = field(default_factory=list)  # checkpoint keys the model recomputes (rope tables)
    sources: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model_bytes: int = 0  # bytes of all tensors after materialization (quantized sizes)
    peak_rss: int = 0  # process peak RSS during materialization (0 where unsupported)
    peak_device_memory: int = 0  # CUDA peak allocated during materialization

    def summary(self) -> str:
        pre = f" ({self.prequantized} pre-quantized)" if self.prequantized else ""
        lines = [
            f"materialize_and_load: {self.loaded} loaded{pre}, {self.initialized} initialized, "
            f"{self.quantized} quantized in {self.seconds:.2f} s",
            f"  model tensors  {memory.fmt_bytes(self.model_bytes)}",
            f"  peak CPU RSS   {memory.fmt_bytes(self.peak_rss)}",
        ]
        if self.peak_device_memory:
            lines.append(f"  peak GPU mem   {memory.fmt_bytes(self.peak_device_memory)}")
        if self.missing_keys:
            lines.append(f"  not in checkpoint (initialized): {_short(self.missing_keys)}")
        if self.unexpected_keys:
            lines.append(f"  unexpected (unused): {_short(self.unexpected_keys)}")
        return "\n".join(lines)


def _short(keys: Sequence[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def _empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Storage for one tensor. Left uninitialized on purpose: every tensor is then filled (tests swap this for
    a garbage-filling allocator to prove nothing escapes init)."""
    return torch.empty(shape, dtype=dtype, device=device)


def module_seed(seed: int, name: str) -> int:
    """A seed per module name: init does not depend on walk order, on other modules, or on the process."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def allows_missing(module: nn.Module) -> bool:
    """Modules whose tensors are new (adapters, LoRA) may be absent from a base checkpoint."""
    return bool(getattr(module, "init_when_missing", False))


def _direct_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool, bool]]:
    """(name, tensor, is_parameter, persistent) for the tensors a module owns directly."""
    for name, p in module._parameters.items():
        if p is not None:
            yield name, p, True, True
    for name, b in module._buffers.items():
        if b is not None:
            yield name, b, False, name not in module._non_persistent_buffers_set


def _expected_full_shape(module: nn.Module, name: str, local: torch.Tensor, world_size: int) -> tuple[int, ...]:
    shape = list(local.shape)
    dim = getattr(module, "shard_dims", {}).get(name)
    if dim is not None:
        shape[dim] *= world_size
    return tuple(shape)


def _check_finite(key: str, t: torch.Tensor, chunk: int = 1 << 22) -> None:
    # In chunks: a whole-tensor isfinite() would add a bool temporary of the tensor's size to the peak. Per chunk,
    # min and max (a NaN propagates into both; an Inf is one of them): ~5x faster than isfinite().all() on CPU.
    if not t.is_floating_point():
        return
    flat = t.detach().reshape(-1)
    for lo in range(0, flat.numel(), chunk):
        part = flat[lo : lo + chunk]
        try:
            ends = torch.aminmax(part)
            finite = math.isfinite(float(ends.min)) and math.isfinite(float(ends.max))
        except (RuntimeError, NotImplementedError):  # a dtype without aminmax
            finite = bool(torch.isfinite(part).all())
        if not finite:
            raise ValueError(f"tensor {key!r} holds NaN or Inf after materialization")


def materialize_and_load(
    model: nn.Module,
    checkpoints: Sequence[str | Path | CheckpointReader] | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    strict: bool = True,
    allow_missing: Callable[[nn.Module, str], bool] | None = None,
) -> LoadReport:
    """Allocate every tensor still on meta, fill it from `checkpoints` (in order, later wins) or by its module's
    reset_parameters, quantize quantized linears' weights as they arrive, then verify. Tensors that are
    already real are left alone. Returns a LoadReport.

    strict: a persistent tensor missing from all checkpoints (unless its module allows it: adapters) and a
    checkpoint key the model lacks are errors. With no checkpoints everything is initialized.

    Pre-quantized checkpoints (`util.checkpoint.save_quantized`): a quantized linear whose weight the last
    checkpoint holding it stores packed adopts the packed data and quantization state as they are - read from
    the file straight into fresh storage on `device`, counted in `loaded` and `prequantized`, never in
    `quantized`. Such a checkpoint must match the build: the same quantization settings (bits, quant_type,
    blocksize, compress_statistics), the same layers quantized and the same model-parallel size; anything else
    is a ValueError saying how to build instead.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    rank, world_size = mp_rank(), mp_world_size()
    allow_missing = allow_missing or (lambda module, key: allows_missing(module))
    readers = [c if isinstance(c, CheckpointReader) else open_checkpoint(c) for c in checkpoints or []]
    owned = [r for r, c in zip(readers, checkpoints or []) if not isinstance(c, CheckpointReader)]
    report = LoadReport(sources=[str(r.path) for r in readers])
    memory.reset_peak_rss()
    memory.reset_peak_device_memory(device)
    try:
        source: dict[str, CheckpointReader] = {}  # key -> last checkpoint holding it
        packed_source: dict[str, CheckpointReader] = {}  # weight key -> last checkpoint holding it pre-quantized
        order = {id(reader): i for i, reader in enumerate(readers)}
        for reader in readers:
            for key in reader.keys():
                source[key] = reader
            for key in (reader.quantization or {}).get("weights", {}):
                packed_source[key] = reader
        _check_prequantized(model, readers, world_size)
        prequant: dict[str, CheckpointReader] = {}  # quantized weights adopted packed, from that checkpoint

        # 1. plan and validate before any allocation: missing keys, unexpected keys, shapes
        plan: list[tuple[str, nn.Module, list[tuple[str, torch.Tensor, bool, bool]]]] = []
        model_keys: set[str] = set()
        missing_base: list[str] = []
        seen: set[int] = set()
        for mod_name, module in model.named_modules():
            todo = []
            weight_key = f"{mod_name}.weight" if mod_name else "weight"
            if weight_key in packed_source:  # the packed tensors stand for the model's weight
                for reader in readers:
                    entry = (reader.quantization or {}).get("weights", {}).get(weight_key)
                    model_keys.update(packed_key(weight_key, n) for n in (entry or {}).get("tensors", []))
            for name, t, is_param, persistent in _direct_tensors(module):
                key = f"{mod_name}.{name}" if mod_name else name
                model_keys.add(key)
                packed = packed_source.get(key)
                if packed is not None and key in source and order[id(source[key])] > order[id(packed)]:
                    packed = None  # a later checkpoint holds it in full precision
                if packed is not None and not (isinstance(module, QuantLinear) and name == "weight"):
                    raise ValueError(
                        f"{key} is stored pre-quantized ({_describe(packed.quantization)}) in {packed.path}, but this "
                        f"model keeps {mod_name or 'it'} in full precision ({type(module).__name__}). Build with "
                        "the block list the checkpoint was quantized with, or load the full-precision checkpoint"
                    )
                if id(t) in seen or not t.is_meta:
                    continue
                seen.add(id(t))
                todo.append((name, t, is_param, persistent))
                if packed is not None:
                    _check_packed(module, key, packed, world_size)
                    prequant[key] = packed
                elif key in source:
                    expected = _expected_full_shape(module, name, t, world_size)
                    got = tuple(source[key].shape(key))
                    if got != expected:
                        raise ValueError(
                            f"shape mismatch for {key!r} in {source[key].file_of(key)}: the model expects "
                            f"{list(expected)} (model-parallel size {world_size}) but the checkpoint has {list(got)}"
                        )
                elif persistent:
                    if readers and not allow_missing(module, key):
                        missing_base.append(key)
                    elif readers:
                        report.missing_keys.append(key)
            if todo:
                plan.append((mod_name, module, todo))
        if strict and missing_base:
            raise KeyError(
                f"{len(missing_base)} key(s) of the model are in none of the checkpoints "
                f"{[str(r.path) for r in readers]}: {_short(missing_base, 20)}. "
                "Check that the checkpoint matches the config (n_layers, names), or pass the missing checkpoint."
            )
        report.missing_keys.extend(missing_base)
        for key in source:
            if key in model_keys:
                continue
            if any(fnmatch.fnmatchcase(key, pattern) for pattern in IGNORED_CHECKPOINT_KEYS):
                report.ignored_keys.append(key)
            else:
                report.unexpected_keys.append(key)
        if strict and report.unexpected_keys:
            files = sorted({source[k].file_of(k) for k in report.unexpected_keys})
            raise KeyError(
                f"{len(report.unexpected_keys)} key(s) in {files} are not in the model: "
                f"{_short(report.unexpected_keys, 20)}. Wrong config for this checkpoint? "
                "(strict=False loads anyway and reports them)"
            )

        # 2. per module: allocate -> fill from checkpoint or init -> quantize -> release the source.
        # Full-precision modules first: while one is copied its checkpoint pages are resident too, and the
        # largest of them (embedding, output head) would otherwise land on top of the finished model.
        plan.sort(key=lambda item: isinstance(item[1], QuantLinear))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for mod_name, module, todo in plan:
                _materialize_module(
                    module, mod_name, todo, source, device, seed, rank, world_size, report, prequant=prequant
                )
                memory.malloc_trim()

        # 3. verify: nothing left on meta
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"still on meta after materialization: {_short(left, 20)}")
    finally:
        for reader in owned:
            reader.close()
    report.model_bytes = memory.tensor_bytes(model)
    report.peak_rss = memory.peak_rss_bytes()
    report.peak_device_memory = memory.peak_device_memory(device)
    report.seconds = time.perf_counter() - t0
    return report


def _settings(q: dict | None) -> dict | None:
    """The part of a quantization record packed data depends on (not the mode's name)."""
    if not q:
        return None
    keys = ("bits", "quant_type", "blocksize", "compress_statistics", "nested_blocksize")
    return {k: q.get(k) for k in keys if k in q}


def _describe(q: dict | None) -> str:
    if not q:
        return "no quantization"
    if q.get("bits") == 8:
        return "8bit"
    stats = "double-quantized absmax" if q.get("compress_statistics") else "plain absmax"
    return f"{q.get('mode', '4bit')} ({q.get('quant_type')}, blocksize {q.get('blocksize')}, {stats})"


def _how_to_build(q: dict) -> str:
    for name, spec in QUANT_MODES.items():
        if _settings(QuantLinear.settings_of(spec)) == _settings(q):
            return f"--quant {name} (build_model(..., quant={name!r}))"
    return (
        f"quantize_model(model, QuantSpec(name, bits={q.get('bits')}, quant_type={q.get('quant_type')!r}, "
        f"compress_statistics={q.get('compress_statistics')}, blocksize={q.get('blocksize')}))"
    )


def _check_prequantized(model: nn.Module, readers: Sequence[CheckpointReader], world_size: int) -> None:
    """A pre-quantized checkpoint loads only into a build with the same quantization and model-parallel size:
    its packed data cannot be converted or re-split. Anything else is an error saying what to do."""
    asked = [m.quant_settings() for m in model.modules() if isinstance(m, QuantLinear)]
    for reader in readers:
        q = reader.quantization
        if not q:
            continue
        saved_ws = q["model_parallel_size"]
        same = bool(asked) and all(_settings(a) == _settings(q) for a in asked)
        if same and saved_ws == world_size:
            continue
        asked_desc = " + ".join(sorted({_describe(a) for a in asked})) if asked else "no quantization (--quant none)"
        raise ValueError(
            f"{reader.path} is pre-quantized: saved as {_describe(q)} at model-parallel size {saved_ws}; this build "
            f"asks for {asked_desc} at model-parallel size {world_size}. Build with {_how_to_build(q)} and "
            f"--model_parallel_size {saved_ws}, or re-quantize from the full-precision checkpoint (build from it "
            "with the quantization you want; save_quantized to keep the result)"
        )


def _check_packed(module: nn.Module, key: str, reader: CheckpointReader, world_size: int) -> None:
    """Before any allocation: the stored packed tensors are exactly what this layer's settings and shape need."""
    entry = reader.quantization["weights"][key]
    local = tuple(module.local_shape)
    if tuple(entry.get("shape", ())) != local:
        raise ValueError(
            f"{key}: pre-quantized in {reader.path} for a local weight of shape {entry.get('shape')}, but the model's "
            f"is {list(local)} (model-parallel size {world_size}); check that the config matches the checkpoint"
        )
    layout = module.packed_layout()
    if list(entry.get("tensors", [])) != list(layout):
        raise ValueError(
            f"{key}: {reader.path} stores its pre-quantized weight as {entry.get('tensors')}, but "
            f"{_describe(module.quant_settings())} needs {list(layout)}; save it again"
        )
    for name, (shape, dtype) in layout.items():
        k = packed_key(key, name)
        if k not in reader.keys():
            raise KeyError(f"{reader.path}: {k!r} is missing; the pre-quantized checkpoint is incomplete - save again")
        expected = (shape[0] * world_size, *shape[1:])  # every rank's own tensor, stacked along dim 0
        got, got_dtype = tuple(reader.shape(k)), reader.dtype(k)
        if got != expected or (got_dtype != dtype if dtype else not got_dtype.is_floating_point):
            raise ValueError(
                f"{k!r} in {reader.file_of(k)} is {got_dtype} {list(got)}, but the model expects {dtype or 'float'} "
                f"{list(expected)} ({_describe(module.quant_settings())}, model-parallel size {world_size}); "
                "save the checkpoint again"
            )


def _materialize_module(
    module: nn.Module,
    mod_name: str,
    todo: list[tuple[str, torch.Tensor, bool, bool]],
    source: dict[str, CheckpointReader],
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
    report: LoadReport,
    prequant: dict[str, CheckpointReader] | None = None,
) -> None:
    def key_of(name: str) -> str:
        return f"{mod_name}.{name}" if mod_name else name

    def read(name: str) -> torch.Tensor:
        key = key_of(name)
        dim = getattr(module, "shard_dims", {}).get(name)
        return source[key].read(key, shard_dim=dim, rank=rank, world_size=world_size)

    def read_into(name: str, out: torch.Tensor) -> None:  # cast to out's dtype; from the file where it can
        key = key_of(name)
        dim = getattr(module, "shard_dims", {}).get(name)
        source[key].read_into(key, out, shard_dim=dim, rank=rank, world_size=world_size)

    if isinstance(module, QuantLinear) and any(name == "weight" for name, *_ in todo):
        # The weight is quantized as it arrives: from the checkpoint slice (possibly an mmap view; copied to
        # the device chunk by chunk) or from the layer's own full-precision init. From a pre-quantized checkpoint
        # it arrives packed: this rank's tensors are copied from the mapped file into fresh storage, as they are.
        key = key_of("weight")
        if prequant and key in prequant:
            reader = prequant[key]
            packed = {}
            for n, (shape, dtype) in module.packed_layout().items():
                k = packed_key(key, n)  # this rank's own tensor (saved split on dim 0, one piece per rank)
                packed[n] = _empty(torch.Size(shape), dtype or reader.dtype(k), device)
                reader.read_into(k, packed[n], shard_dim=0, rank=rank, world_size=world_size)
                reader.release(k)
            module.adopt_packed_(packed, source=f"{reader.path}: {key}")
            del packed
            for n, t in module.packed_tensors().items():  # the scales (the codes are integers): small, cheap
                _check_finite(packed_key(key, n), t)
            report.loaded += 1
            report.prequantized += 1
        elif key in source:
            module.quantize_weight_(read("weight"), device=device)
            source[key].release(key)
            report.loaded += 1
            report.quantized += 1
        else:
            torch.manual_seed(module_seed(seed, key))
            module.quantize_weight_(module.init_weight(device), device=device)
            report.initialized += 1
            report.quantized += 1
        if any(name == "bias" for name, *_ in todo):  # a plain tensor: from the checkpoint, else zero
            module.bias = nn.Parameter(_empty(module.bias.shape, module.bias.dtype, device), module.bias.requires_grad)
            with torch.no_grad():
                if key_of("bias") in source:
                    read_into("bias", module.bias)
                    source[key_of("bias")].release(key_of("bias"))
                    report.loaded += 1
                else:
                    module.bias.zero_()
                    report.initialized += 1
            _check_finite(key_of("bias"), module.bias)
        return

    # Allocate every meta tensor of this module, then fill.
    fresh: dict[str, torch.Tensor] = {}
    for name, t, is_param, _ in todo:
        new = _empty(t.shape, t.dtype, device)
        if is_param:
            module._parameters[name] = nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            module._buffers[name] = new
        fresh[name] = new
    need_init = [name for name in fresh if key_of(name) not in source]
    if need_init:
        init = getattr(module, "reset_parameters", None)
        if init is None:
            raise TypeError(
                f"{type(module).__name__} ({mod_name or 'root'}) has tensors {need_init} that no checkpoint "
                "provides and no reset_parameters() to initialize them; give the class a reset_parameters() that "
                "initializes exactly the tensors it owns"
            )
        # reset_parameters initializes all of the module's own tensors: keep the ones that were already real.
        keep = {
            name: t.detach().clone() for name, t, *_ in _direct_tensors(module) if name not in fresh and not t.is_meta
        }
        torch.manual_seed(module_seed(seed, mod_name))
        with torch.no_grad():
            init()
            for name, value in keep.items():
                getattr(module, name).copy_(value)
        report.initialized += len(need_init)
    with torch.no_grad():
        for name in fresh:
            key, t = key_of(name), getattr(module, name)
            if key in source:
                read_into(name, t)
                source[key].release(key)
                report.loaded += 1
            _check_finite(key, t)
