"""Loading a pre-quantized checkpoint (util.checkpoint.save_quantized) against the floor: wall time and peak RSS.

    python bench/prequantized_load.py --shape 7B                  # prepare once, then floor + load (warm cache)
    python bench/prequantized_load.py --shape 7B --repeat 3 --cold
    python bench/prequantized_load.py --shape tiny                # smoke test

1. The synthetic full-precision bf16 checkpoint of bench/harness.py (/tmp/lazyllama-bench/<shape>, shared with
   bench/build_memory.py, written if missing) is built once with build_model(None, [it], quant=...) and saved with
   save_quantized to --out (default /tmp/lazyllama-bench/<shape>-<quant>); a marker file written last makes later
   runs reuse it. That child also records its build time (quantizing from full precision) and save time, and a
   digest of its logits.
2. Each measured flow runs in a fresh process (`--child FLOW`) that prints one JSON line:
      floor  a bare `import torch, bitsandbytes`; floor = its RSS + the loaded model's tensor bytes
      load   build_model(None, [out], quant=...) from the pre-quantized directory (no quantization), then a tiny
             forward pass (not timed) whose logits must be bitwise those of the model built from full precision
   Peak RSS is the child's VmHWM (whole process, imports included), as in bench/build_memory.py. By default the
   pre-quantized files are read into the page cache first (warm); --cold drops them from the cache before each load
   (posix_fadvise DONTNEED), so the load pays the disk read.
3. A markdown table and the raw JSON go to bench/results/ (prequant-<shape>-<quant>-<stamp>.{md,json}).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
from pathlib import Path

from harness import (
    GIB,
    MARKER,
    Clock,
    Session,
    child_floor,
    cli_args,
    drop_page_cache,
    emit,
    fmt_gib,
    hwm,
    keep_peak_counter,
    median_range,
    n_params,
    read_marker,
    rss,
    warm_page_cache,
    write_marker,
)

from model.args import preset

PREQUANT_MARKER = "BENCH_PREQUANT.json"
PREQUANT_VERSION = 1
FORWARD_TOKENS = 8


# ---------------------------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------------------------


def _forward_digest(model) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.args.vocab_size, (1, FORWARD_TOKENS), generator=g)
    with torch.no_grad():
        logits = model.eval()(tokens)
    raw = logits.detach().contiguous().view(torch.uint8).numpy().tobytes()
    return {
        "forward_ok": bool(torch.isfinite(logits).all()),
        "logits_sha256": hashlib.sha256(raw).hexdigest()[:16],
        "logits_first": [round(float(x), 5) for x in logits[0, -1, :8].float()],
    }


def child_prepare(src: Path, out: Path, quant: str) -> dict:
    import bitsandbytes  # noqa: F401
    import torch

    from util.build import build_model
    from util.checkpoint import save_quantized

    keep_peak_counter()
    clock = Clock()
    model, report = build_model(None, [src], quant=quant, dtype=torch.bfloat16)
    build = clock.stop()
    clock = Clock()
    save_quantized(model, out)
    save = clock.stop()
    result = {
        "build_s": build["wall_s"],
        "build_cpu_s": build["cpu_s"],
        "save_s": save["wall_s"],
        "quantized": report.quantized,
        "model_bytes": report.model_bytes,
        "peak_rss": hwm(),
        **_forward_digest(model),
    }
    return write_marker(
        out, {"version": PREQUANT_VERSION, "source": str(src), "quant": quant, **result}, PREQUANT_MARKER
    )


def child_load(out: Path, quant: str) -> dict:
    import bitsandbytes  # noqa: F401
    import torch

    from util.build import build_model

    after_imports = {"rss_after_imports": rss(), "hwm_after_imports": hwm()}
    keep_peak_counter()
    clock = Clock()
    model, report = build_model(None, [out], quant=quant, dtype=torch.bfloat16)
    timing = clock.stop()
    result = {
        **after_imports,
        **timing,
        "peak_rss": hwm(),
        "rss_after_build": rss(),
        "model_bytes": report.model_bytes,
        "materialize_s": report.seconds,
        "loaded": report.loaded,
        "prequantized": report.prequantized,
        "quantized": report.quantized,
    }
    result.update(_forward_digest(model))
    result["peak_rss_with_forward"] = hwm()
    return result


# ---------------------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------------------


def prequant_is_complete(out: Path, src: Path, quant: str) -> dict | None:
    info = read_marker(out, PREQUANT_MARKER, version=PREQUANT_VERSION, source=str(src), quant=quant)
    if info is None or not (src / MARKER).is_file():
        return None
    if (src / MARKER).stat().st_mtime > (out / PREQUANT_MARKER).stat().st_mtime:
        return None  # the full-precision checkpoint was rewritten since
    return info


def tabulate(records: list[dict], prepared: dict, opts: argparse.Namespace) -> tuple[str, dict]:
    ok = [r for r in records if r.get("status") == "ok"]
    floors = [r for r in ok if r["flow"] == "floor"]
    loads = [r for r in ok if r["flow"] == "load"]
    summary: dict = {}
    lines = [
        f"shape {opts.shape}, pre-quantized {opts.quant} ({opts.out}); peak RSS = the child's VmHWM; "
        f"{'cold' if opts.cold else 'warm'} page cache; median (min-max) over {len(loads)} load(s)",
        "",
        "| flow | peak RSS (GiB) | x floor | wall (s) | note |",
        "|---|---|---|---|---|",
    ]
    if not floors or not loads:
        lines.append("| - | - | - | - | a floor or load child failed: see the JSON |")
        return "\n".join(lines), summary
    floor_rss = statistics.median(r["rss_after_imports"] for r in floors)
    model_bytes = statistics.median(r["model_bytes"] for r in loads)
    floor = floor_rss + model_bytes
    peaks = [r["peak_rss"] for r in loads]
    walls = [r["wall_s"] for r in loads]

    bitwise = all(r["logits_sha256"] == prepared.get("logits_sha256") for r in loads)
    notes = [
        f"model {fmt_gib(model_bytes)} GiB",
        f"CPU {median_range([r['cpu_s'] for r in loads], '.1f')} s",
        f"{loads[0]['prequantized']} weights pre-quantized, {loads[0]['quantized']} quantized",
        "logits bitwise those of the full-precision build"
        if bitwise
        else "LOGITS DIFFER from the full-precision build",
        *sorted({r["warning"] for r in loads if r.get("warning")}),
    ]
    lines.append(
        f"| floor | {fmt_gib(floor)} | 1.00 | - | `import torch, bitsandbytes` {fmt_gib(floor_rss)} GiB + "
        f"model {fmt_gib(model_bytes)} GiB |"
    )
    peak_s, ratio_s = median_range([p / GIB for p in peaks], ".2f"), median_range([p / floor for p in peaks], ".3f")
    lines.append(f"| load pre-quantized | {peak_s} | {ratio_s} | {median_range(walls, '.1f')} | {'; '.join(notes)} |")
    lines.append(
        f"| (build from bf16, once) | {fmt_gib(prepared['peak_rss'])} | {prepared['peak_rss'] / floor:.2f} | "
        f"{prepared['build_s']:.1f} | quantizes {prepared['quantized']} weights; then save_quantized "
        f"{prepared['save_s']:.1f} s (the peak includes the save) |"
    )
    ratio, wall = statistics.median(peaks) / floor, statistics.median(walls)
    summary = {
        "floor": floor,
        "peak_rss": statistics.median(peaks),
        "ratio": ratio,
        "wall_s": wall,
        "bitwise": bitwise,
        "build_s": prepared["build_s"],
    }
    lines += [
        "",
        "Goal (issue 7): load peak <= 1.05x floor, under 30 s, bitwise the full-precision build, nothing quantized:",
        f"- peak: {'PASS' if ratio <= 1.05 else 'FAIL'} ({ratio:.3f}x)",
        f"- wall: {'PASS' if wall < 30 else 'FAIL'} ({wall:.1f} s)",
        f"- logits: {'PASS' if bitwise else 'FAIL'}",
        f"- quantized: {'PASS' if all(r['quantized'] == 0 for r in loads) else 'FAIL'}",
    ]
    return "\n".join(lines), summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="tiny", help="model.args preset (default tiny)")
    ap.add_argument("--quant", default="4bit", help="4bit (nf4, default), 4bit_fp4 or 8bit")
    ap.add_argument("--src", default=None, help="full-precision checkpoint (default /tmp/lazyllama-bench/<shape>)")
    ap.add_argument("--out", default=None, help="pre-quantized directory (default <src>-<quant>)")
    ap.add_argument("--repeat", type=int, default=1, help="load processes (median and range are reported)")
    ap.add_argument("--cold", action="store_true", help="drop the pre-quantized files from the page cache first")
    ap.add_argument("--force-prepare", action="store_true", help="quantize and save again even if complete")
    ap.add_argument("--results-dir", default=None, help="default bench/results")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    opts.src = opts.src or f"/tmp/lazyllama-bench/{opts.shape}"
    suffix = {"4bit": "nf4", "4bit_fp4": "fp4", "8bit": "int8"}.get(opts.quant, opts.quant)
    opts.out = opts.out or f"{opts.src}-{suffix}"
    src, out = Path(opts.src), Path(opts.out)

    if opts.child:
        children = {
            "prepare": lambda: child_prepare(src, out, opts.quant),
            "floor": child_floor,
            "load": lambda: child_load(out, opts.quant),
        }
        emit(opts.child, children[opts.child]())
        return 0

    args = preset(opts.shape)
    session = Session(f"prequant-{opts.shape}-{opts.quant}", __file__, opts.results_dir)
    session.synthetic_checkpoint(opts.shape, src)
    child_args = cli_args(shape=opts.shape, src=src, out=out, quant=opts.quant)

    prepared = None if opts.force_prepare else prequant_is_complete(out, src, opts.quant)
    if prepared:
        print(f"pre-quantized: reusing {out} (built in {prepared['build_s']:.1f} s)", flush=True)
    else:
        need = int(0.6 * n_params(args)) + GIB  # ~4.5 bits per quantized parameter, bf16 head and embeddings
        free = shutil.disk_usage(out.parent if out.parent.exists() else "/").free
        if free < need:
            print(f"not enough disk for {out}: {fmt_gib(free)} GiB free, ~{fmt_gib(need)} GiB needed")
            return 1
        out.mkdir(parents=True, exist_ok=True)
        (out / PREQUANT_MARKER).unlink(missing_ok=True)
        warm_page_cache(src)
        print(f"pre-quantized: building {opts.quant} from {src} and saving to {out} ...", flush=True)
        prepared = session.spawn("prepare", child_args)
        if prepared["status"] != "ok":
            return 1
        print(f"pre-quantized: built in {prepared['build_s']:.1f} s, saved in {prepared['save_s']:.1f} s", flush=True)

    records = []
    for i in range(max(1, opts.repeat)):
        for flow in ("floor", "load"):
            if flow == "load" and opts.cold:
                drop_page_cache(out)
            elif flow == "load":
                warm_page_cache(out)
            rec = session.spawn(flow, child_args, f"{flow}-{i}")
            records.append(rec)
            if rec["status"] != "ok":
                return 1

    table, summary = tabulate(records, prepared, opts)
    print("\n" + table, flush=True)
    raw = {"prepared": prepared, "records": records, "summary": summary}
    md, _ = session.save(f"pre-quantized load: {opts.shape}, {opts.quant}", table, raw)
    print(f"\nsaved {md} (child logs in {session.log_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
