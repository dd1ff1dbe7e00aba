"""Quantizer throughput and peak extra memory: bitsandbytes' own CPU quantizers against util.fast_quant.

    python bench/quant_speed.py                       # 4096x4096 and 11008x4096, bf16 input, all modes
    python bench/quant_speed.py --shapes 4096x4096 --modes nf4 --threads 1
    python bench/quant_speed.py --quick               # smoke test: one 1024x1024 weight

For each shape, a random bf16 weight (std 0.02) is quantized, in this one process, by
  bnb    bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type, compress_statistics=True) on the whole
         tensor (4-bit), or int8_vectorwise_quant(w.to(fp16)) (8-bit, as Int8Params does);
  ours   util.quant.quantize_4bit_chunked / quantize_8bit_chunked (row chunks through util.fast_quant, the same
         double quantization), as the model build calls them.
Each method runs once as a warm-up, then once timed. Their outputs are
compared bit for bit. Peak extra memory: VmHWM minus VmRSS before the call, after giving freed heap back
(malloc_trim) and resetting VmHWM (writing "5" to /proc/self/clear_refs); the outputs themselves are included.
Other processes on the machine slow both methods (and torch's multi-threaded ops most): the load average is printed.
The table and the raw rows are saved under bench/results/ (quant-speed-<stamp>.{md,json}).
"""

from __future__ import annotations

import argparse
import os
import time

import bitsandbytes.functional as bnbF
import torch
from harness import Session, hwm, reset_hwm, rss

from util.memory import malloc_trim
from util.quant import QUANT_MODES, quantize_4bit_chunked, quantize_8bit_chunked

MIB = 1 << 20
MODES = {"nf4": "4bit", "fp4": "4bit_fp4", "int8": "8bit"}


def _measure(fn):
    """(seconds, peak extra bytes, result) of one call."""
    malloc_trim()
    reset_hwm()  # VmHWM := VmRSS
    before = rss()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return seconds, hwm() - before, out


def _methods(mode: str, w: torch.Tensor):
    spec = QUANT_MODES[MODES[mode]]
    cpu = torch.device("cpu")
    if spec.bits == 4:

        def bnb():
            packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=spec.quant_type)
            return [packed, state.absmax, state.offset, state.state2.absmax]

        def ours():
            packed, state = quantize_4bit_chunked(w, spec, device=cpu, dtype=w.dtype)
            return [packed, state.absmax, state.offset, state.state2.absmax]

    else:

        def bnb():
            return list(bnbF.int8_vectorwise_quant(w.to(torch.float16))[:2])

        def ours():
            return list(quantize_8bit_chunked(w, device=cpu, dtype=w.dtype))

    return bnb, ours


def run(shapes, modes):
    rows_out = []
    for shape in shapes:
        torch.manual_seed(0)
        w = (torch.randn(*shape) * 0.02).to(torch.bfloat16)
        for mode in modes:
            bnb, ours = _methods(mode, w)
            bnb(), ours()  # warm-up (first-call setup, allocator), results dropped
            t_ours, m_ours, r_ours = _measure(ours)
            t_bnb, m_bnb, r_bnb = _measure(bnb)
            same = all(torch.equal(a, b) for a, b in zip(r_ours, r_bnb, strict=True))
            del r_ours, r_bnb
            n = w.numel() / 1e6
            row = (
                f"{shape[0]}x{shape[1]}",
                mode,
                n / t_bnb,
                n / t_ours,
                t_bnb / t_ours,
                m_bnb / MIB,
                m_ours / MIB,
                same,
            )
            rows_out.append(row)
            print(_fmt(row), flush=True)
    return rows_out


def _fmt(row):
    shape, mode, bnb, ours, ratio, mb, mo, same = row
    return (
        f"| {shape:>10} | {mode:>4} | {bnb:9.1f} | {ours:9.1f} | {ratio:6.1f}x | {mb:9.0f} | {mo:9.0f} "
        f"| {'yes' if same else 'NO'} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="comma-separated ROWSxCOLS")
    ap.add_argument("--modes", default="nf4,fp4,int8", help=f"comma-separated, of {','.join(MODES)}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="smoke test: --shapes 1024x1024")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in ("1024x1024" if args.quick else args.shapes).split(",")]
    modes = args.modes.split(",")
    header = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "M params/s (bf16 input; 4-bit: blocksize 64 + double quantization); peak extra memory in MiB",
        "|      shape | mode |  bnb M/s |  ours M/s |  ratio |  bnb MiB | ours MiB | bitwise equal |",
        "|------------|------|----------|-----------|--------|----------|----------|---------------|",
    ]
    print("\n".join(header))
    rows = run(shapes, modes)
    after = f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    print(after)
    fields = ("shape", "mode", "bnb_mparams_s", "ours_mparams_s", "ratio", "bnb_mib", "ours_mib", "bitwise_equal")
    Session("quant-speed", __file__).save(
        "quantizer speed", "\n".join([*header, *map(_fmt, rows), after]), {"rows": [dict(zip(fields, r)) for r in rows]}
    )


if __name__ == "__main__":
    main()
