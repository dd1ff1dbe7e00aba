"""Loading a pre-quantized checkpoint (util.checkpoint.save_quantized) against the floor: wall time and peak RSS.

    python bench/prequantized_load.py --shape 7B                  # prepare once, then floor + load (warm cache)
    python bench/prequantized_load.py --shape 7B --repeat 3 --cold
    python bench/prequantized_load.py --shape tiny                # smoke test

1. The full-precision bf16 checkpoint of bench/build_memory.py (/tmp/lazyllama-bench/<shape>, written by it if
   missing) is built once with build_model(None, [it], quant=...) and saved with save_quantized to --out (default
   /tmp/lazyllama-bench/<shape>-<quant>); a marker file written last makes later runs reuse it. That child also
   records its build time (quantizing from full precision) and save time, and a digest of its logits.
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
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from build_memory import (  # noqa: E402  (stdlib only: the parent stays torch-free)
    GIB,
    MARKER,
    RESULT_TAG,
    Clock,
    checkpoint_is_complete,
    code_state,
    fmt_gib,
    hwm,
    machine_info,
    meminfo_bytes,
    n_params,
    rss,
    shape_params,
    warm_page_cache,
)

from model.args import preset  # noqa: E402

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

    from util import memory
    from util.build import build_model
    from util.checkpoint import save_quantized

    memory.reset_peak_rss = lambda: False  # the whole process's peak, like every other child
    clock = Clock()
    model, report = build_model(None, [src], quant=quant, dtype=torch.bfloat16)
    build = clock.stop()
    clock = Clock()
    save_quantized(model, out)
    save = clock.stop()
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != PREQUANT_MARKER}
    result = {
        "build_s": build["wall_s"],
        "build_cpu_s": build["cpu_s"],
        "save_s": save["wall_s"],
        "quantized": report.quantized,
        "model_bytes": report.model_bytes,
        "peak_rss": hwm(),
        "files": files,
        **_forward_digest(model),
    }
    marker = {"version": PREQUANT_VERSION, "source": str(src), "quant": quant, **result}
    tmp = out / (PREQUANT_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, out / PREQUANT_MARKER)  # last: its presence means the directory is complete
    return result


def child_floor(out: Path, quant: str) -> dict:
    import bitsandbytes  # noqa: F401
    import torch  # noqa: F401

    return {"rss_after_imports": rss(), "peak_rss": hwm()}


def child_load(out: Path, quant: str) -> dict:
    import bitsandbytes  # noqa: F401
    import torch

    from util import memory
    from util.build import build_model

    after_imports = {"rss_after_imports": rss(), "hwm_after_imports": hwm()}
    memory.reset_peak_rss = lambda: False
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


CHILDREN = {"floor": child_floor, "load": child_load}


# ---------------------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------------------


def prequant_is_complete(out: Path, src: Path, quant: str) -> dict | None:
    try:
        info = json.loads((out / PREQUANT_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("version") != PREQUANT_VERSION or info.get("source") != str(src) or info.get("quant") != quant:
        return None
    src_marker = src / MARKER
    if not src_marker.is_file() or src_marker.stat().st_mtime > (out / PREQUANT_MARKER).stat().st_mtime:
        return None  # the full-precision checkpoint was rewritten since
    for name, size in info.get("files", {}).items():
        f = out / name
        if not f.is_file() or f.stat().st_size != size:
            return None
    return info


def drop_page_cache(directory: Path) -> None:
    """Evict the directory's files from the page cache (clean pages only; no root needed)."""
    for f in directory.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def spawn(child: str, opts: argparse.Namespace, log_dir: Path, tag: str, cap: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--shape", opts.shape,
           "--src", opts.src, "--out", opts.out, "--quant", opts.quant]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out_path, err_path = log_dir / f"{tag}.stdout", log_dir / f"{tag}.stderr"
    killed = None
    start = time.perf_counter()
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env, cwd=str(REPO))
        try:
            while proc.poll() is None:
                if rss(proc.pid) > cap and killed is None:
                    killed = rss(proc.pid)
                    proc.send_signal(signal.SIGKILL)
                time.sleep(0.05)
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
    record = None
    for line in out_path.read_text().splitlines():
        if line.startswith(RESULT_TAG):
            record = json.loads(line[len(RESULT_TAG) :])
    if record is None or proc.returncode != 0:
        tail = err_path.read_text()[-3000:]
        why = f"killed by the bench at RSS {fmt_gib(killed)} GiB" if killed else f"exit status {proc.returncode}"
        return {"flow": child, "status": "failed", "error": why, "stderr_tail": tail}
    record.update(status="ok", process_s=time.perf_counter() - start)
    return record


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

    def mr(values: list[float], fmt: str) -> str:
        med = format(statistics.median(values), fmt)
        return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"

    bitwise = all(r["logits_sha256"] == prepared.get("logits_sha256") for r in loads)
    notes = [
        f"model {fmt_gib(model_bytes)} GiB",
        f"CPU {mr([r['cpu_s'] for r in loads], '.1f')} s",
        f"{loads[0]['prequantized']} weights pre-quantized, {loads[0]['quantized']} quantized",
        "logits bitwise those of the full-precision build"
        if bitwise
        else "LOGITS DIFFER from the full-precision build",
    ]
    lines.append(
        f"| floor | {fmt_gib(floor)} | 1.00 | - | `import torch, bitsandbytes` {fmt_gib(floor_rss)} GiB + "
        f"model {fmt_gib(model_bytes)} GiB |"
    )
    lines.append(
        f"| load pre-quantized | {mr([p / GIB for p in peaks], '.2f')} | {mr([p / floor for p in peaks], '.3f')} | "
        f"{mr(walls, '.1f')} | {'; '.join(notes)} |"
    )
    lines.append(
        f"| (build from bf16, once) | {fmt_gib(prepared['peak_rss'])} | {prepared['peak_rss'] / floor:.2f} | "
        f"{prepared['build_s']:.1f} | quantizes {prepared['quantized']} weights; then save_quantized "
        f"{prepared['save_s']:.1f} s (the peak includes the save) |"
    )
    ratio, wall = statistics.median(peaks) / floor, statistics.median(walls)
    summary = {"floor": floor, "peak_rss": statistics.median(peaks), "ratio": ratio, "wall_s": wall,
               "bitwise": bitwise, "build_s": prepared["build_s"]}  # fmt: skip
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
    ap.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    opts.src = opts.src or f"/tmp/lazyllama-bench/{opts.shape}"
    suffix = {"4bit": "nf4", "4bit_fp4": "fp4", "8bit": "int8"}.get(opts.quant, opts.quant)
    opts.out = opts.out or f"{opts.src}-{suffix}"
    src, out = Path(opts.src), Path(opts.out)

    if opts.child:
        if opts.child == "prepare":
            result = {"flow": "prepare", **child_prepare(src, out, opts.quant)}
        else:
            result = {"flow": opts.child, **CHILDREN[opts.child](out, opts.quant)}
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0

    args = preset(opts.shape)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = Path(opts.results_dir)
    log_dir = results / "logs" / f"prequant-{opts.shape}-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    cap = meminfo_bytes("MemAvailable") - int(1.5 * GIB)

    if not checkpoint_is_complete(src, shape_params(args)):
        print(f"{src}: no complete full-precision checkpoint; writing it with bench/build_memory.py", flush=True)
        rc = subprocess.call([sys.executable, str(REPO / "bench" / "build_memory.py"), "--shape", opts.shape,
                              "--ckpt-dir", str(src), "--flows", "floor"])  # fmt: skip
        if rc != 0 or not checkpoint_is_complete(src, shape_params(args)):
            print("could not write the full-precision checkpoint")
            return 1

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
        rec = spawn("prepare", opts, log_dir, "prepare", cap)
        if rec.get("status") != "ok":
            print(f"prepare failed: {rec.get('error')}\n{rec.get('stderr_tail', '')}")
            return 1
        prepared = rec
        print(f"pre-quantized: built in {rec['build_s']:.1f} s, saved in {rec['save_s']:.1f} s", flush=True)

    records = []
    for i in range(max(1, opts.repeat)):
        for flow in ("floor", "load"):
            if flow == "load" and opts.cold:
                drop_page_cache(out)
            elif flow == "load":
                warm_page_cache(out)
            rec = spawn(flow, opts, log_dir, f"{flow}-{i}", cap)
            records.append(rec)
            if rec.get("status") != "ok":
                print(f"[{flow}-{i}] failed: {rec.get('error')}\n{rec.get('stderr_tail', '')}", flush=True)
                return 1
            extra = f", wall {rec['wall_s']:.1f} s" if "wall_s" in rec else ""
            print(f"[{flow}-{i}] peak RSS {fmt_gib(rec['peak_rss'])} GiB{extra}", flush=True)

    table, summary = tabulate(records, prepared, opts)
    print("\n" + table, flush=True)
    code = code_state()
    md = results / f"prequant-{opts.shape}-{opts.quant}-{stamp}.md"
    md.write_text(
        f"# pre-quantized load: {opts.shape}, {opts.quant}\n\ncommand: `bench/prequantized_load.py "
        f"{' '.join(sys.argv[1:])}`  \nmachine: {json.dumps(machine_info())}  \ncode: {json.dumps(code)}\n\n"
        + table
        + "\n"
    )
    raw = {"argv": sys.argv[1:], "machine": machine_info(), "code": code, "prepared": prepared, "records": records,
           "summary": summary}  # fmt: skip
    (results / f"prequant-{opts.shape}-{opts.quant}-{stamp}.json").write_text(json.dumps(raw, indent=1))
    print(f"\nsaved {md} (child logs in {log_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
