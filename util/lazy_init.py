"""Lazy model creation: build on meta, then allocate and fill one tensor at a time.

    with meta_init(torch.bfloat16):          # no storage, no init work
        model = Transformer(args)
    quantize_model(model, "4bit")            # still on meta
    report = materialize_and_load(model, [ckpt_dir])

`materialize_and_load` plans, validates, then fills. The plan records, for each tensor still on meta, the last
checkpoint that has it (in full precision or pre-quantized) or that its module initializes it. Validation, before
any allocation: shapes, pre-quantized settings, missing and unexpected keys. The fill goes module by module
(full-precision modules first): storage on `device`, filled from the checkpoint (this rank's slice, cast to the
tensor's dtype) or by the module's own `reset_parameters` (seeded per module name, so the result does not depend
on walk order or on other modules). Quantized linears quantize their weight as it arrives - or, from a
pre-quantized checkpoint (`util.checkpoint.save_quantized`), adopt the stored packed weight and quantization
state as they are (copied straight into fresh storage on `device`; nothing is quantized). The checkpoint's pages
are released as soon as a tensor is consumed and freed heap is returned to the OS after each module, so peak
memory stays near the size of the finished model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.init import meta_init as meta_init  # re-exported: the public API is util.lazy_init.meta_init
from model.init import real_init as real_init
from util import memory
from util.checkpoint import CheckpointReader, open_checkpoint, packed_key
from util.dist import position
from util.quant import QUANT_MODES, NonFiniteWeight, QuantLinear, all_finite

try:  # FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed: nothing can be sharded
    DTensor = Shard = None

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
    # a quantized linear's weight may stand as its packed codes already (FSDP shards them on meta)
    shape = list(module.local_shape if isinstance(module, QuantLinear) and name == "weight" else local.shape)
    dim = getattr(module, "shard_dims", {}).get(name)
    if dim is not None:
        shape[dim] *= world_size
    return tuple(shape)


def is_sharded(t: torch.Tensor | None) -> bool:
    """A data-parallel shard (an FSDP2 DTensor): this rank owns some rows of it."""
    return DTensor is not None and isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The rows this rank holds: the local tensor of a sharded parameter, the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def shard_rows(t: torch.Tensor, key: str = "") -> tuple[int, int]:
    """Rows [a, b) of the full (model-parallel local) tensor this rank's shard of `t` holds. FSDP2 splits dim 0
    as torch.chunk does: ceil(n / size) rows per rank, the last ranks short or empty."""
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise NotImplementedError(
            f"{key or 'a tensor'} is sharded as {t.placements}; lazy materialization fills FSDP2's Shard(0) on a "
            "1-D data-parallel mesh only"
        )
    n, size, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    per = -(-n // size)
    a, b = min(rank * per, n), min((rank + 1) * per, n)
    if b - a != t.to_local().shape[0]:  # the placement rule changed under us: never fill the wrong rows
        raise RuntimeError(f"{key}: shard rows [{a}, {b}) do not match its local shape {list(t.to_local().shape)}")
    return a, b


def _check_finite(key: str, t: torch.Tensor, where: str = "", chunk: int = 1 << 22) -> None:
    # In chunks: a whole-tensor check would add temporaries of the tensor's size to the peak. A shard: its rows
    # (every rank checks its own; reshaping the DTensor would gather it).
    flat = local_part(t).detach().reshape(-1)
    for lo in range(0, flat.numel(), chunk):
        if not all_finite(flat[lo : lo + chunk]):
            raise ValueError(f"tensor {key!r}{_in(where)} holds NaN or Inf after materialization")


def _in(where: str) -> str:
    return f" (from {where})" if where else ""


@dataclass
class TensorPlan:
    """One tensor a module owns directly, and where its values come from."""

    name: str  # attribute name in its module
    key: str  # checkpoint key
    tensor: torch.Tensor  # as found: a meta placeholder, or already real
    is_param: bool
    persistent: bool
    fill: bool  # still on meta and not shared with an earlier module: allocate and fill it
    source: CheckpointReader | None  # the last checkpoint holding it in full precision
    packed: CheckpointReader | None  # the checkpoint holding it pre-quantized, where that is the last to hold it


@dataclass
class ModulePlan:
    name: str
    module: nn.Module
    tensors: list[TensorPlan]  # every tensor it owns directly, in its own order

    @property
    def todo(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.fill]

    def planned(self, name: str) -> TensorPlan | None:
        return next((t for t in self.todo if t.name == name), None)


@dataclass
class _Sources:
    """Which checkpoint wins for each key: the last one holding it (in `readers` order)."""

    readers: list[CheckpointReader]
    full: dict[str, CheckpointReader] = field(default_factory=dict)  # key -> in full precision
    packed: dict[str, CheckpointReader] = field(default_factory=dict)  # weight key -> pre-quantized

    def __post_init__(self) -> None:
        for reader in self.readers:
            for key in reader.keys():
                self.full[key] = reader
            for key in (reader.quantization or {}).get("weights", {}):
                self.packed[key] = reader

    def winner(self, key: str) -> tuple[CheckpointReader | None, CheckpointReader | None]:
        """(full-precision source, pre-quantized source) of `key`; at most one of them where both exist."""
        full, packed = self.full.get(key), self.packed.get(key)
        if packed is not None and full is not None:
            order = {id(reader): i for i, reader in enumerate(self.readers)}
            if order[id(full)] > order[id(packed)]:
                packed = None  # a later checkpoint holds it in full precision
        return full, packed


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
    already real keep their values, moved to `device` if they are elsewhere. Returns a LoadReport.

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
    pos = position()
    world_size = pos.model_parallel_size
    allow_missing = allow_missing or (lambda module, key: allows_missing(module))
    readers = [c if isinstance(c, CheckpointReader) else open_checkpoint(c) for c in checkpoints or []]
    owned = [r for r, c in zip(readers, checkpoints or []) if not isinstance(c, CheckpointReader)]
    report = LoadReport(sources=[str(r.path) for r in readers])
    memory.reset_peak_rss()
    memory.reset_peak_device_memory(device)
    try:
        sources = _Sources(readers)
        plans = _plan(model, sources)  # 1. plan: every tensor and where its values come from
        _check_prequantized(model, readers, world_size)  # 2. validate, before any allocation
        _validate(plans, sources, world_size=world_size, strict=strict, allow_missing=allow_missing, report=report)
        _Filler(device, seed, pos.model_parallel_rank, world_size, report).fill(plans)  # 3. fill, module by module
        _check_nothing_on_meta(model)  # 4. verify
        _move_real_tensors(model, device)  # 5. a visual backbone was built for real on the CPU: onto `device`
    finally:
        for reader in owned:
            reader.close()
    report.model_bytes = memory.tensor_bytes(model)
    report.peak_rss = memory.peak_rss_bytes()
    report.peak_device_memory = memory.peak_device_memory(device)
    report.seconds = time.perf_counter() - t0
    return report


def _move_real_tensors(model: nn.Module, device: torch.device) -> None:
    """Tensors that were real before materialization (built with meta off, on the default device) go to `device`,
    as everything materialized there: one device for the whole model (a mixed one fails at the first image, and
    DDP refuses it). Through the module's own _apply, as model.to() would, so quantized weights move whole."""

    def elsewhere(t: torch.Tensor) -> bool:
        return t.device.type != device.type or (device.index is not None and t.device.index != device.index)

    for module in model.modules():
        if any(elsewhere(t) for _, t, *_ in _direct_tensors(module)):
            module._apply(lambda t: t.to(device), recurse=False)


def _key(mod_name: str, name: str) -> str:
    return f"{mod_name}.{name}" if mod_name else name


def _plan(model: nn.Module, sources: _Sources) -> list[ModulePlan]:
    """Every module with the tensors it owns directly, each with its source; no checks, no allocation."""
    plans = []
    seen: set[int] = set()  # a tensor shared by several modules is filled once, where it is first seen
    for mod_name, module in model.named_modules():
        tensors = []
        for name, t, is_param, persistent in _direct_tensors(module):
            key = _key(mod_name, name)
            full, packed = sources.winner(key)
            fill = t.is_meta and id(t) not in seen
            if fill:
                seen.add(id(t))
            tensors.append(TensorPlan(name, key, t, is_param, persistent, fill, full, packed))
        plans.append(ModulePlan(mod_name, module, tensors))
    return plans


def _validate(
    plans: list[ModulePlan],
    sources: _Sources,
    *,
    world_size: int,
    strict: bool,
    allow_missing: Callable[[nn.Module, str], bool],
    report: LoadReport,
) -> None:
    """Per tensor, in model order: pre-quantized only where the model quantizes, packed tensors as the layer needs
    them, full shapes as the model expects; then missing and unexpected keys (errors under `strict`, else in
    `report`)."""
    missing_base: list[str] = []  # missing, and their module does not allow it
    for mp in plans:
        for tp in mp.tensors:
            _check_tensor(mp, tp, world_size)
            if tp.fill and tp.source is None and tp.packed is None and tp.persistent and sources.readers:
                (report.missing_keys if allow_missing(mp.module, tp.key) else missing_base).append(tp.key)
    if strict and missing_base:
        raise KeyError(
            f"{len(missing_base)} key(s) of the model are in none of the checkpoints "
            f"{[str(r.path) for r in sources.readers]}: {_short(missing_base, 20)}. "
            "Check that the checkpoint matches the config (n_layers, names), or pass the missing checkpoint."
        )
    report.missing_keys.extend(missing_base)
    _sort_unused_keys(plans, sources, report)
    if strict and report.unexpected_keys:
        files = sorted({sources.full[k].file_of(k) for k in report.unexpected_keys})
        raise KeyError(
            f"{len(report.unexpected_keys)} key(s) in {files} are not in the model: "
            f"{_short(report.unexpected_keys, 20)}. Wrong config for this checkpoint? "
            "(strict=False loads anyway and reports them)"
        )


def _check_tensor(mp: ModulePlan, tp: TensorPlan, world_size: int) -> None:
    if tp.packed is not None and not (isinstance(mp.module, QuantLinear) and tp.name == "weight"):
        raise ValueError(
            f"{tp.key} is stored pre-quantized ({_describe(tp.packed.quantization)}) in {tp.packed.path}, "
            f"but this model keeps {mp.name or 'it'} in full precision ({type(mp.module).__name__}). Build "
            "with the block list the checkpoint was quantized with, or load the full-precision checkpoint"
        )
    if not tp.fill:
        return
    if tp.packed is not None:
        _check_packed(mp.module, tp.key, tp.packed, world_size)
    elif tp.source is not None:
        _check_shape(mp.module, tp, world_size)


def _sort_unused_keys(plans: list[ModulePlan], sources: _Sources, report: LoadReport) -> None:
    """Checkpoint keys the model does not read: ignored (it computes them itself) or unexpected."""
    model_keys = _model_keys(plans, sources)
    for key in sources.full:
        if key in model_keys:
            continue
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in IGNORED_CHECKPOINT_KEYS):
            report.ignored_keys.append(key)
        else:
            report.unexpected_keys.append(key)


def _check_shape(module: nn.Module, tp: TensorPlan, world_size: int) -> None:
    expected = _expected_full_shape(module, tp.name, tp.tensor, world_size)
    got = tuple(tp.source.shape(tp.key))
    if got != expected:
        raise ValueError(
            f"shape mismatch for {tp.key!r} in {tp.source.file_of(tp.key)}: the model expects "
            f"{list(expected)} (model-parallel size {world_size}) but the checkpoint has {list(got)}"
        )
    stored = tp.source.dtype(tp.key)
    if tp.tensor.is_floating_point() and not (stored.is_floating_point or stored.is_complex):
        # an integer or bool weight is a broken conversion; casting it would hide that
        raise ValueError(
            f"{tp.key!r} in {tp.source.file_of(tp.key)} is stored as {stored}, but the model's tensor is floating "
            f"point ({tp.tensor.dtype}): the checkpoint was written wrong; convert it again from the original"
        )


def _model_keys(plans: list[ModulePlan], sources: _Sources) -> set[str]:
    """The checkpoint keys this model reads: its tensors' keys and, for a weight some checkpoint stores
    pre-quantized, the packed tensors standing for it (in any checkpoint)."""
    keys = set()
    for mp in plans:
        weight_key = _key(mp.name, "weight")
        if weight_key in sources.packed:
            for reader in sources.readers:
                entry = (reader.quantization or {}).get("weights", {}).get(weight_key)
                keys.update(packed_key(weight_key, n) for n in (entry or {}).get("tensors", []))
        keys.update(tp.key for tp in mp.tensors)
    return keys


def _check_nothing_on_meta(model: nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"still on meta after materialization: {_short(left, 20)}")


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


@dataclass
class _Filler:
    """Step 3: per module, allocate -> fill from its checkpoint or init -> quantize -> release the source."""

    device: torch.device
    seed: int
    rank: int
    world_size: int
    report: LoadReport

    def fill(self, plans: list[ModulePlan]) -> None:
        # Full-precision modules first: while one is copied its checkpoint pages are resident too, and the
        # largest of them (embedding, output head) would otherwise land on top of the finished model.
        todo = sorted((mp for mp in plans if mp.todo), key=lambda mp: isinstance(mp.module, QuantLinear))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for mp in todo:
                self.fill_one(mp)
                memory.malloc_trim()

    def fill_one(self, mp: ModulePlan) -> None:
        """One module's tensors (bench/build_memory.py --trace wraps this to measure each module)."""
        if isinstance(mp.module, QuantLinear) and mp.planned("weight") is not None:
            self._fill_quant_linear(mp)
        else:
            self._fill_module(mp)

    # --- reading this rank's slice

    def _read(self, module: nn.Module, tp: TensorPlan) -> torch.Tensor:
        """A view where it can be (an mmap slice): the caller releases the pages once it is consumed."""
        dim = getattr(module, "shard_dims", {}).get(tp.name)
        return tp.source.read(tp.key, shard_dim=dim, rank=self.rank, world_size=self.world_size)

    def _load_into(self, module: nn.Module, tp: TensorPlan, out: torch.Tensor) -> None:
        """Into `out`, cast to its dtype (read from the file where it can); then the pages are released. A shard
        reads only its own rows of this model-parallel rank's slice."""
        dim = getattr(module, "shard_dims", {}).get(tp.name)
        rows = shard_rows(out, tp.key) if is_sharded(out) else None
        tp.source.read_into(
            tp.key, local_part(out), shard_dim=dim, rank=self.rank, world_size=self.world_size, rows=rows
        )
        tp.source.release(tp.key)
        self.report.loaded += 1

    # --- quantized linears: the weight is quantized as it arrives (or adopted packed), the bias is plain

    def _fill_quant_linear(self, mp: ModulePlan) -> None:
        # From the checkpoint slice (possibly an mmap view; copied to the device chunk by chunk) or from the
        # layer's own full-precision init. From a pre-quantized checkpoint it arrives packed.
        module, weight = mp.module, mp.planned("weight")
        if is_sharded(module.weight):
            self._keep_code_rows(module, weight)
        elif weight.packed is not None:
            self._adopt_packed(module, weight)
        else:
            module.install_(self._quantize(module, weight))
        bias = mp.planned("bias")
        if bias is not None:  # a plain tensor (or its rows under FSDP): from the checkpoint, else zero
            module.bias = nn.Parameter(self._storage(module.bias), module.bias.requires_grad)
            with torch.no_grad():
                if bias.source is not None:
                    self._load_into(module, bias, module.bias)
                else:
                    module.bias.zero_()
                    self.report.initialized += 1
            _check_finite(bias.key, module.bias, bias.source.file_of(bias.key) if bias.source else "")

    def _quantize(self, module: QuantLinear, weight: TensorPlan) -> tuple:
        """The packed form of this layer's weight (not installed), quantized from its checkpoint slice (possibly an
        mmap view, read chunk by chunk; its pages released after) or from the layer's own full-precision init."""
        if weight.source is not None:
            where = weight.source.file_of(weight.key)
            try:
                packed = module.quantize(self._read(module, weight), device=self.device)
            except NonFiniteWeight as e:
                raise ValueError(
                    f"tensor {weight.key!r} in {where} cannot be quantized: {e}. The checkpoint is damaged "
                    "(or diverged in training): load an earlier one"
                ) from None
            weight.source.release(weight.key)
            self.report.loaded += 1
        else:
            torch.manual_seed(module_seed(self.seed, weight.key))
            packed = module.quantize(module.init_weight(self.device), device=self.device)
            self.report.initialized += 1
        self.report.quantized += 1
        return packed

    def _keep_code_rows(self, module: QuantLinear, weight: TensorPlan) -> None:
        """QLoRA under FSDP: the whole weight of this model-parallel slice is quantized as unsharded (one tensor in
        flight); this rank keeps its rows of the codes and the whole quantization state (its blocks' scales and
        the double quantization span the whole weight)."""
        if weight.packed is not None:
            raise ValueError(
                f"{weight.key}: a pre-quantized checkpoint ({weight.packed.path}) cannot be loaded into an "
                "FSDP-sharded 4-bit model yet; build from the full-precision checkpoint with --quant 4bit"
            )
        codes, state = self._quantize(module, weight)
        shard = self._storage(module.weight)
        a, b = shard_rows(module.weight, weight.key)
        shard.to_local().copy_(codes[a:b])
        del codes
        module.adopt_codes_(shard, state)

    def _adopt_packed(self, module: QuantLinear, weight: TensorPlan) -> None:
        """This rank's packed tensors copied from the mapped file into fresh storage, as they are."""
        reader, key = weight.packed, weight.key
        packed = {}
        for n, (shape, dtype) in module.packed_layout().items():
            k = packed_key(key, n)  # this rank's own tensor (saved split on dim 0, one piece per rank)
            packed[n] = _empty(torch.Size(shape), dtype or reader.dtype(k), self.device)
            reader.read_into(k, packed[n], shard_dim=0, rank=self.rank, world_size=self.world_size)
            reader.release(k)
        module.adopt_packed_(packed, source=f"{reader.path}: {key}")
        del packed
        for n, t in module.packed_tensors().items():  # the scales (the codes are integers): small, cheap
            _check_finite(packed_key(key, n), t, str(reader.path))
        self.report.loaded += 1
        self.report.prequantized += 1

    # --- any other module: allocate its meta tensors, init those no checkpoint has, load the others

    def _fill_module(self, mp: ModulePlan) -> None:
        fresh = self._allocate(mp)
        need_init = [tp.name for tp in mp.todo if tp.source is None]
        if need_init:
            self._init(mp, need_init, fresh)
        with torch.no_grad():
            for tp in mp.todo:
                t = getattr(mp.module, tp.name)
                if tp.source is not None:
                    self._load_into(mp.module, tp, t)
                _check_finite(tp.key, t, tp.source.file_of(tp.key) if tp.source is not None else "")

    def _allocate(self, mp: ModulePlan) -> set[str]:
        """Fresh uninitialized storage on the device for every planned tensor; returns their names."""
        for tp in mp.todo:
            new = self._storage(tp.tensor)
            if tp.is_param:
                mp.module._parameters[tp.name] = nn.Parameter(new, requires_grad=tp.tensor.requires_grad)
            else:
                mp.module._buffers[tp.name] = new
        return {tp.name for tp in mp.todo}

    def _storage(self, t: torch.Tensor) -> torch.Tensor:
        """Fresh uninitialized storage on the device for the meta tensor `t`: a shard gets its rows only, wrapped
        as the same DTensor (FSDP2 adopts it at its lazy init)."""
        if not is_sharded(t):
            return _empty(t.shape, t.dtype, self.device)
        local = _empty(t.to_local().shape, t.dtype, self.device)
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())

    def _init(self, mp: ModulePlan, need_init: list[str], fresh: set[str]) -> None:
        """The module's reset_parameters, seeded by the module's name."""
        init = getattr(mp.module, "reset_parameters", None)
        if init is None:
            raise TypeError(
                f"{type(mp.module).__name__} ({mp.name or 'root'}) has tensors {need_init} that no checkpoint "
                "provides and no reset_parameters() to initialize them; give the class a reset_parameters() that "
                "initializes exactly the tensors it owns"
            )
        # reset_parameters initializes all of the module's own tensors: keep the ones that were already real.
        keep = {
            name: t.detach().clone()
            for name, t, *_ in _direct_tensors(mp.module)
            if name not in fresh and not t.is_meta
        }
        if any(is_sharded(t) for name, t, *_ in _direct_tensors(mp.module) if name in keep):
            raise NotImplementedError(f"{mp.name}: a module with real and meta data-parallel shards cannot be reset")
        # Sharded tensors are initialized whole (one module's tensors in flight) and keep their rows: the values
        # are the unsharded build's for the same seed, whatever the data-parallel size.
        shards = {name: t for name, t, *_ in _direct_tensors(mp.module) if name in fresh and is_sharded(t)}
        for name, t in shards.items():
            _swap(mp.module, name, _empty(t.shape, t.dtype, self.device))
        torch.manual_seed(module_seed(self.seed, mp.name))
        with torch.no_grad():
            init()
            for name, value in keep.items():
                getattr(mp.module, name).copy_(value)
            for name, t in shards.items():
                a, b = shard_rows(t, _key(mp.name, name))
                t.to_local().copy_(getattr(mp.module, name)[a:b])
                _swap(mp.module, name, t)
        self.report.initialized += len(need_init)


def _swap(module: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put `t` in place of the module's tensor `name`, as the same kind (parameter or buffer)."""
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, old.requires_grad)
    else:
        module._buffers[name] = t
