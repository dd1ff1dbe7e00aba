"""Can QLoRA run under FSDP2 here? Each question of issue 14 (item 2) answered by running the real components on CPU:
bitsandbytes' CPU kernels, torch's FSDP2 `fully_shard`, two gloo processes.

    .venv/bin/python bench/qlora_fsdp_probe.py storage     # 1: float quant_storage vs uint8 codes, one process
    .venv/bin/python bench/qlora_fsdp_probe.py fsdp        # 2-3: fully_shard variants against the unsharded model
    .venv/bin/python bench/qlora_fsdp_probe.py state       # 3: the replicated quantization state's size
    .venv/bin/python bench/qlora_fsdp_probe.py memory      # 4: per-rank RSS, 2 ranks, stacked 1.1B-shaped blocks
    .venv/bin/python bench/qlora_fsdp_probe.py all

fsdp cases (a tiny nf4 + LoRA r4 model, bf16 base, fp32 LoRA with B != 0; fully_shard per block and at the root;
the same tokens on both ranks, so the averaged gradient must equal the unsharded one):
  params4bit   today's Params4bit weight handed to fully_shard as it is
  uint8        QuantLinear.make_shardable_: plain frozen uint8 Parameter, quant_state on the module
  bf16, fp32   the same codes viewed as bitsandbytes' quant_storage float dtypes
  *_mp         + MixedPrecisionPolicy(param_dtype=bf16 or fp16)
  uint8_ckpt   uint8 + activation checkpointing
  padding      one QuantLinear whose 105 packed rows do not divide by 2 ranks
  int8         an 8-bit QuantLinear handed to fully_shard as it is
Prints one JSON line per result. memory: PROBE_LAYERS=N (default 4) blocks; MALLOC_MMAP_THRESHOLD_=1048576 keeps
glibc from holding FSDP's freed all-gather buffers in its heap (without it the FSDP peak is the higher one).

What it found (torch 2.14.1, bitsandbytes 0.50.2, CPU, 2 gloo ranks; 2026-11-30):
- A float quant_storage holds the same bytes (bitsandbytes views them back to uint8): matmul_4bit's output and input
  gradient are bit-identical for bf16/fp16/fp32 storage. The byte count must divide by the float's size (a 3x6
  weight: "self.size(-1) must be divisible by 4 to view Byte as Float").
- It is not needed: FSDP2 shards a frozen uint8 Parameter and all-gathers mixed dtypes as bytes
  (_fsdp_collectives._get_all_gather_input_metadatas); only trainable parameters must share a dtype
  (_fsdp_param_group._init_mp_dtypes). What breaks today is Params4bit itself: _fsdp_param._init_sharded_param
  replaces it by nn.Parameter(DTensor), its quant_state is gone, QuantLinear sees no weight. With the codes as a
  plain uint8 Parameter and the state on the module (make_shardable_): loss and all 28 LoRA grads bit-identical to
  the unsharded model, with activation checkpointing too; padding (105 packed rows over 2 ranks: 53 + 52) exact.
- A float storage is the hazard: MixedPrecisionPolicy(param_dtype) casts float-stored codes as numbers (fp32 codes +
  bf16: a shape error in dequantize_4bit; bf16 codes + fp16: silently wrong codes, loss 6.4313 vs 6.4513), and this
  project detects packed weights by their non-float dtype (util.train.is_quantized, peft.mark_trainable, build's
  invariant). uint8 codes are left alone by param_dtype (non-float) and keep those checks true.
- 8 bits cannot be sharded this way: the matmul reads MatmulLtState.CB, which keeps the whole codes on every rank.
- The quantization state every rank keeps whole: 3.2% of the codes with double quantization, 12.5% without.
- Memory, 1.1B-shaped blocks, vocab 512, 2 ranks (MALLOC_MMAP_THRESHOLD_ 1 MiB): 8 blocks, 168 MiB of codes: RSS
  after sharding 833 vs 925 MiB unsharded (-92), peak over 2 LoRA steps 1031-1037 vs 1100-1105 MiB; 4 blocks:
  783 vs 829 MiB, peak 942 vs 948 (one block's all-gather in flight eats most of the saving at this size). With
  glibc's default dynamic threshold the FSDP peak is higher than DDP's (8 blocks: 1459-1694 vs 1210-1220 MiB).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tests.multiprocess import run_multiprocess  # noqa: E402
from tests.util.test_qlora_fsdp import _Scaled  # noqa: E402  (a 4-bit 70 -> 3 linear times a trainable scale)


def show(record: dict) -> None:
    print(json.dumps(record, default=str), flush=True)


# --- 1. float quant_storage ---------------------------------------------------------------------------------------
def storage() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from util.quant import QuantLinear, quant_spec

    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=False).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, quant_spec("4bit"))
    codes, qs = q.weight.data, q.weight.quant_state
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16, requires_grad=True)

    def run(weight, state):
        y = bnb.matmul_4bit(x, weight, quant_state=state)
        (gx,) = torch.autograd.grad(y.float().square().sum(), x)
        return y.detach(), gx

    y0, g0 = run(codes, qs)
    for st in (torch.bfloat16, torch.float16, torch.float32):
        packed, state = bnbF.quantize_4bit(
            lin.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=st
        )
        y1, g1 = run(packed, state)
        show(
            dict(
                q="1 storage",
                quant_storage=str(st),
                shape=list(packed.shape),
                same_bytes_as_uint8=torch.equal(packed.view(torch.uint8).reshape(-1), codes.reshape(-1)),
                same_absmax=torch.equal(state.absmax, qs.absmax),
                forward_bit_equal=torch.equal(y1, y0),
                grad_x_bit_equal=torch.equal(g1, g0),
            )
        )
    for st in (torch.bfloat16, torch.float32):  # bitsandbytes views the bytes as `st`: the byte count must divide
        try:
            packed, _ = bnbF.quantize_4bit(torch.randn(3, 6), blocksize=64, quant_storage=st)
            show(dict(q="1 odd byte count", quant_storage=str(st), shape=list(packed.shape)))
        except RuntimeError as e:
            show(dict(q="1 odd byte count (3x6 weight: 9 bytes)", quant_storage=str(st), error=str(e)))
    q.make_shardable_()
    y2, g2 = run(q.weight, q.quant_state)
    show(
        dict(
            q="1 make_shardable_",
            weight_type=type(q.weight).__name__,
            dtype=str(q.weight.dtype),
            forward_bit_equal=torch.equal(y2, y0),
            grad_x_bit_equal=torch.equal(g2, g0),
        )
    )


# --- 2-3. fully_shard ---------------------------------------------------------------------------------------------
CASES = ["params4bit", "uint8", "bf16", "fp32", "uint8_mp", "fp32_mp", "bf16_mp16", "uint8_ckpt", "padding", "int8"]


def _as_storage(model: nn.Module, storage: torch.dtype) -> None:
    """make_shardable_, then the codes viewed as a float quant_storage (same bytes; the kernels view them back)."""
    from util.quant import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.make_shardable_()
            if storage != torch.uint8:
                m.weight = nn.Parameter(m.weight.data.view(-1).view(storage).unsqueeze(1), requires_grad=False)


def _tiny_qlora():
    from model.args import preset
    from util.build import build_model
    from util.train import upcast_trainable_

    args = preset("tiny", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)
    model, _ = build_model(args, None, quant="4bit", dtype=torch.bfloat16, seed=0)
    upcast_trainable_(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0: every LoRA tensor gets a gradient
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model, args


def _watch_codes(model: nn.Module) -> list[bool]:
    """Each QuantLinear forward appends whether the codes it computes with (FSDP's all-gathered unsharded
    parameter) are byte for byte the codes it was built with."""
    from util.quant import QuantLinear

    seen = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            original = m.weight.data.reshape(-1).view(torch.uint8).clone()

            def check(mod, _inputs, original=original):
                now = mod.weight.data.reshape(-1)
                seen.append(
                    now.dtype.itemsize * now.numel() == original.numel()
                    and torch.equal(now.view(torch.uint8), original)
                )

            m.register_forward_pre_hook(check)
    return seen


def _loss_and_grads(model, vocab: int):
    tokens = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[n] = g.detach().clone()
    return float(loss.detach()), grads


def _padding_case(mesh) -> dict:
    from torch.distributed.fsdp import fully_shard

    def run(m):
        x = torch.randn(4, 70, generator=torch.Generator().manual_seed(3), requires_grad=True)
        y = m(x)
        y.square().sum().backward()
        g = m.scale.grad.full_tensor() if hasattr(m.scale.grad, "full_tensor") else m.scale.grad
        return y.detach(), x.grad, g

    ref = run(_Scaled())
    m = _Scaled()
    m.q.make_shardable_()
    fully_shard(m.q, mesh=mesh)
    fully_shard(m, mesh=mesh)
    local = m.q.weight.to_local()
    out = run(m)
    return dict(
        packed_rows=105,
        local_rows=local.shape[0],
        forward_bit_equal=torch.equal(out[0], ref[0]),
        grad_x_bit_equal=torch.equal(out[1], ref[1]),
        grad_param_bit_equal=torch.equal(out[2], ref[2]),
    )


def _int8_case(mesh) -> dict:
    """8 bits: fully_shard takes the Int8Params, but bitsandbytes' 8-bit matmul reads the codes from the layer's
    MatmulLtState (state.CB), a plain attribute that still holds the whole original tensor."""
    from torch.distributed.fsdp import fully_shard

    from util.quant import QuantLinear, quant_spec

    torch.manual_seed(0)
    m = QuantLinear.from_linear(nn.Linear(256, 96, bias=False), quant_spec("8bit"))
    x = torch.randn(2, 256)
    ref = m(x).detach()
    fully_shard(m, mesh=mesh)
    local = list(m.weight.to_local().shape)
    try:
        y = m(x)
        out = dict(forward_bit_equal=torch.equal(y, ref))
    except Exception as e:
        out = dict(forward_error=f"{type(e).__name__}: {e}")
    return dict(
        weight_local_shape=local,
        state_CB_shape=list(m.state.CB.shape),
        state_CB_is_a_DTensor=hasattr(m.state.CB, "to_local"),
        **out,
    )


def _fsdp_worker(rank: int, case: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from model.llama import TransformerBlock
    from util.dist import init_distributed
    from util.train import enable_activation_checkpointing

    init_distributed(1)
    mesh = DeviceMesh.from_group(dist.group.WORLD, device_type="cpu")
    try:
        if case == "padding":
            return {"case": case, **_padding_case(mesh)}
        if case == "int8":
            return {"case": case, **_int8_case(mesh)}
        ref, args = _tiny_qlora()
        ref_loss, ref_grads = _loss_and_grads(ref, args.vocab_size)
        model, _ = _tiny_qlora()
        storage = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp32_mp": torch.float32, "bf16_mp16": torch.bfloat16}
        if case != "params4bit":
            _as_storage(model, storage.get(case, torch.uint8))
        if case == "uint8_ckpt":
            enable_activation_checkpointing(model)
        intact = _watch_codes(model)
        kw = {}
        if case.endswith("_mp"):
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if case.endswith("_mp16"):
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
        for m in model.modules():
            if isinstance(m, TransformerBlock):
                fully_shard(m, mesh=mesh, **kw)
        fully_shard(model, mesh=mesh, **kw)
        w = model.layers[0].attention.wq.weight
        sharded = dict(global_shape=list(w.shape), local_shape=list(w.to_local().shape), dtype=str(w.dtype))
        loss, grads = _loss_and_grads(model, args.vocab_size)
    except Exception as e:  # the finding: where it breaks
        tb = traceback.extract_tb(e.__traceback__)[-3:]
        return {"case": case, "error": f"{type(e).__name__}: {e}", "at": [f"{f.filename}:{f.lineno}" for f in tb]}
    diff = max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads)
    return dict(
        case=case,
        loss=loss,
        ref_loss=ref_loss,
        loss_bit_equal=loss == ref_loss,
        lora_grads=len(grads),
        grads_bit_equal=all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads),
        codes_seen_by_forward_intact=all(intact) and len(intact) > 0,
        max_grad_diff=diff,
        wq_codes=sharded,
    )


def fsdp(cases=CASES) -> None:
    for case in cases:
        res = run_multiprocess(_fsdp_worker, 2, case)
        show({"q": "2-3 fsdp", **res[0]})


# --- 3. the replicated quantization state -------------------------------------------------------------------------
def state() -> None:
    """Bytes of the codes (sharded) against the quantization state every rank keeps whole, from QuantLinear's own
    packed_layout (code tables counted as fp32, as bitsandbytes builds them here)."""
    from util.quant import QuantLinear, quant_spec

    for mode in ("4bit",):  # fp4: the same sizes
        for rows, cols, name in [
            (4096, 4096, "7B wq"),
            (11008, 4096, "7B w1"),
            (5632, 2048, "1.1B w1"),
            (3, 70, "3x70"),
        ]:
            spec = quant_spec(mode)
            for double in (True, False):
                spec = type(spec)(spec.name, 4, spec.quant_type, double)
                q = QuantLinear(cols, rows, spec=spec, local_shape=(rows, cols), dtype=torch.bfloat16)
                sizes = {
                    k: math.prod(shape) * (dtype.itemsize if dtype else 4)
                    for k, (shape, dtype) in q.packed_layout().items()
                }
                codes = sizes.pop("packed")
                show(
                    dict(
                        q="3 quant_state size",
                        mode=mode,
                        double_quant=double,
                        weight=f"{name} {rows}x{cols}",
                        codes_bytes=codes,
                        state_bytes=sum(sizes.values()),
                        state_over_codes=round(sum(sizes.values()) / codes, 4),
                    )
                )


# --- 4. memory ----------------------------------------------------------------------------------------------------
def _mem_worker(rank: int, layers: int, shard: bool) -> dict:
    import torch.distributed as dist

    from model.args import preset
    from util.build import build_model
    from util.dist import dp_group, init_distributed
    from util.memory import malloc_trim
    from util.train import upcast_trainable_, wrap_fsdp

    sys.path.insert(0, str(REPO / "bench"))
    from harness import hwm, reset_hwm, rss

    init_distributed(1)
    args = preset(
        "1.1B", n_layers=layers, vocab_size=512, max_seq_len=64, lora_rank=16, lora_alpha=32.0, lora_dropout=0.0
    )
    t0 = time.perf_counter()
    model, _ = build_model(args, None, quant="4bit", dtype=torch.bfloat16, seed=0)
    upcast_trainable_(model)
    malloc_trim()
    built, build_peak = rss(), hwm()
    codes = sum(p.numel() for p in model.parameters() if p.dtype == torch.uint8)
    if shard:
        model = wrap_fsdp(model, dp_group(), torch.device("cpu"))
        malloc_trim()
    after = rss()
    local_codes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters() if p.dtype == torch.uint8
    )
    reset_hwm()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(rank))
    losses = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if not shard:  # DDP's job, by hand: average the LoRA gradients
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= 2
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return dict(
        rank=rank,
        shard=shard,
        layers=layers,
        build_s=round(time.perf_counter() - t0, 1),
        codes_mib=codes / 2**20,
        local_codes_mib=local_codes / 2**20,
        rss_built_mib=built / 2**20,
        peak_build_mib=build_peak / 2**20,
        rss_after_shard_mib=after / 2**20,
        peak_steps_mib=hwm() / 2**20,
        losses=losses,
    )


def memory(layers: int = int(os.environ.get("PROBE_LAYERS", "4"))) -> None:
    for shard in (False, True):
        for r in run_multiprocess(_mem_worker, 2, layers, shard, timeout=900):
            show({"q": "4 memory", **{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}})


if __name__ == "__main__":
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    for name, fn in [("storage", storage), ("fsdp", fsdp), ("state", state), ("memory", memory)]:
        if what in (name, "all"):
            fn()
