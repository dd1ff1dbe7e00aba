"""Peak CPU memory and wall time of building a 4-bit LLaMA from a bf16 checkpoint, flow against flow.

    python bench/build_memory.py --shape 1.1B                      # lazy, naive, hf, floor
    python bench/build_memory.py --shape 7B --flows lazy,floor --repeat 3
    python bench/build_memory.py --shape tiny                      # smoke test, a few seconds
    python bench/build_memory.py --shape 7B --flows lazy --device cuda   # the lazy build onto a GPU

1. The synthetic bf16 checkpoint of the shape (bench/harness.py: random normal std 0.02, norms ones, Hugging Face
   format) is written once under --ckpt-dir (default /tmp/lazyllama-bench/<shape>) and reused while its marker
   matches. Every flow reads this same checkpoint.
2. Each flow runs in its own fresh process (`--child FLOW`), which prints one JSON line: build wall time (after
   imports), peak RSS (VmHWM), the model's tensor bytes (quantized sizes), and logits of a tiny forward pass
   (not timed) that proves the model works and lets the flows be compared with each other.
      lazy   util.build.build_model(None, [ckpt], quant=...): meta build -> quantize -> materialize per tensor
      naive  eager bf16 Transformer(args) with real init, whole checkpoint read into a state dict,
             load_state_dict, then quantize_model (skipped when it cannot fit in memory)
      hf     transformers' from_pretrained(BitsAndBytesConfig(load_in_4bit, nf4, double quant), device_map=cpu)
      floor  a bare `import torch, bitsandbytes`; floor = its RSS + lazy's quantized model bytes
3. A markdown table (flow | peak RSS | x floor | wall | note) is printed and saved with the raw JSON under
   bench/results/.

The parent never imports torch; bench/harness.py runs the children, kills one past --rss-cap-gib and reports how
a child ended.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from harness import (
    GIB,
    Clock,
    Session,
    child_floor,
    cli_args,
    emit,
    fmt_gib,
    hf_from_pretrained_kwargs,
    hf_not_installed,
    hwm,
    keep_peak_counter,
    median_range,
    n_params,
    reset_hwm,
    rss,
    warm_page_cache,
)

from model.args import ModelArgs, preset

ALL_FLOWS = ("lazy", "naive", "hf", "floor")
FORWARD_TOKENS = 8
LOGITS_KEPT = 64  # logits of the last position kept in the JSON to compare flows


def naive_estimate_bytes(args: ModelArgs) -> int:
    """Peak of the naive flow: the bf16 model and the bf16 state dict coexist (2 + 2 bytes per parameter),
    plus the interpreter with torch and bitsandbytes (~0.4 GiB)."""
    return 4 * n_params(args) + int(0.4 * GIB)


# ---------------------------------------------------------------------------------------------------------------
# the children: one flow each, in a fresh process
# ---------------------------------------------------------------------------------------------------------------


def _tokens(vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, FORWARD_TOKENS), generator=g)


def _logits_summary(logits) -> dict:
    import torch

    last = logits[0, -1].float()
    return {
        "forward_ok": bool(torch.isfinite(logits).all()),
        "logits_shape": list(logits.shape),
        "logits_last": [round(float(x), 5) for x in last[:LOGITS_KEPT]],
    }


def _model_bytes(model) -> int:
    from util.memory import tensor_bytes

    return tensor_bytes(model)


def child_lazy(ckpt: Path, quant: str, trace: bool) -> dict:
    import bitsandbytes  # noqa: F401
    import torch

    import util.lazy_init as lazy_init
    from util.build import build_model

    after_imports = {"rss_after_imports": rss(), "hwm_after_imports": hwm()}
    keep_peak_counter()
    modules: list[dict] = []
    if trace:  # per module: RSS after it, and its own peak (the counter is read, then reset, around each module)
        original = lazy_init._Filler.fill_one
        state = {"peak": 0}

        def traced(filler, plan):
            state["peak"] = max(state["peak"], hwm())
            reset_hwm()
            original(filler, plan)
            peak_in = hwm()
            state["peak"] = max(state["peak"], peak_in)
            modules.append({"module": plan.name, "rss_after": rss(), "peak_in": peak_in})

        lazy_init._Filler.fill_one = traced

    args = None
    visual = os.environ.get("LAZYLLAMA_BENCH_VISUAL")
    if visual:  # multimodal: the LLM from the checkpoint plus a visual backbone (random weights, built real)
        from model.args import ModelArgs
        from util.checkpoint import open_checkpoint

        with open_checkpoint(ckpt) as reader:
            args = ModelArgs.from_dict(reader.config, source=str(ckpt)).replace(visual_backbone=visual)
    device = os.environ.get("LAZYLLAMA_BENCH_DEVICE", "cpu")  # --device: where the lazy build puts the model
    clock = Clock()
    model, report = build_model(args, [ckpt], quant=quant, dtype=torch.bfloat16, device=device)
    timing = clock.stop()
    peak = hwm() if not trace else max(state["peak"], hwm())
    out = {
        **after_imports,
        **timing,
        "peak_rss": peak,
        "rss_after_build": rss(),
        "model_bytes": report.model_bytes,
        "materialize_s": report.seconds,
        "loaded": report.loaded,
        "quantized": report.quantized,
        "device": device,
        "peak_device_memory": report.peak_device_memory,
    }
    if trace:
        out["trace"] = modules
    with torch.no_grad():
        out.update(_logits_summary(model.eval()(_tokens(model.args.vocab_size).to(device))))
    out["peak_rss_with_forward"] = hwm()
    return out


def child_naive(ckpt: Path, quant: str, trace: bool) -> dict:
    import bitsandbytes  # noqa: F401
    import torch

    from model.args import ModelArgs as Args
    from model.llama import Transformer
    from util.checkpoint import open_checkpoint
    from util.quant import quantize_model

    after_imports = {"rss_after_imports": rss(), "hwm_after_imports": hwm()}
    clock = Clock()
    reader = open_checkpoint(ckpt)
    args = Args.from_dict(reader.config, source=str(ckpt))
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Transformer(args)  # eager: every tensor allocated and initialized for real
    finally:
        torch.set_default_dtype(torch.float32)
    t_init = time.perf_counter() - clock.wall
    sd = {}
    for key in sorted(reader.keys()):
        sd[key] = reader.read(key).clone()
        # The copy is the state dict; dropping the mmap pages it came from makes this cost what torch.load's
        # in-memory read costs (2 bytes/param). Without it the mapped file would add another 2 bytes/param.
        reader.release(key)
    reader.close()
    model.load_state_dict(sd, strict=True)
    del sd
    quantize_model(model, quant)
    timing = clock.stop()
    out = {
        **after_imports,
        **timing,
        "init_s": t_init,
        "peak_rss": hwm(),
        "rss_after_build": rss(),
        "model_bytes": _model_bytes(model),
    }
    with torch.no_grad():
        out.update(_logits_summary(model.eval()(_tokens(args.vocab_size))))
    out["peak_rss_with_forward"] = hwm()
    return out


def child_hf(ckpt: Path, quant: str, trace: bool) -> dict:
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return hf_not_installed(e)
    import bitsandbytes as bnb
    import torch

    try:
        kwargs = hf_from_pretrained_kwargs(quant)
    except ValueError as e:
        return {"status": "unsupported", "error": str(e)}
    after_imports = {"rss_after_imports": rss(), "hwm_after_imports": hwm()}
    clock = Clock()
    # transformers 5 always loads with low memory (low_cpu_mem_usage is accepted and ignored); 4.x needs it.
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), low_cpu_mem_usage=True, device_map="cpu", **kwargs)
    timing = clock.stop()
    out = {
        **after_imports,
        **timing,
        "peak_rss": hwm(),
        "rss_after_build": rss(),
        "model_bytes": _model_bytes(model),
        "hf_memory_footprint": int(model.get_memory_footprint()),
        "transformers": transformers.__version__,
    }
    quantized = [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    out["quantized_linears"] = len(quantized)
    out["unquantized_linears"] = plain
    out["unquantized_dtypes"] = sorted(
        {str(p.dtype) for n, p in model.named_parameters() if not any(n.startswith(q + ".") for q in quantized)}
    )
    with torch.no_grad():
        out.update(_logits_summary(model.eval()(input_ids=_tokens(model.config.vocab_size)).logits))
    out["peak_rss_with_forward"] = hwm()
    return out


CHILDREN = {"lazy": child_lazy, "naive": child_naive, "hf": child_hf}


# ---------------------------------------------------------------------------------------------------------------
# the parent: run children, tabulate
# ---------------------------------------------------------------------------------------------------------------


def tabulate(records: list[dict], shape: str, quant: str) -> tuple[str, dict]:
    """The markdown table and the numbers the goal check needs."""
    by_flow: dict[str, list[dict]] = {}
    for r in records:
        by_flow.setdefault(r["flow"], []).append(r)
    ok = {f: [r for r in rs if r.get("status") == "ok"] for f, rs in by_flow.items()}

    model_bytes_src = next((f for f in ("lazy", "naive", "hf") if ok.get(f)), None)
    model_bytes = statistics.median(r["model_bytes"] for r in ok[model_bytes_src]) if model_bytes_src else None
    floor_rss = statistics.median(r["rss_after_imports"] for r in ok["floor"]) if ok.get("floor") else None
    floor = floor_rss + model_bytes if floor_rss is not None and model_bytes is not None else None
    ref_logits = ok["lazy"][0].get("logits_last") if ok.get("lazy") else None

    lines = [
        f"shape {shape}, bf16 checkpoint -> {quant}; peak RSS = the child process's VmHWM; "
        "median (min-max) when repeated",
        "",
        "| flow | peak RSS (GiB) | x floor | wall (s) | note |",
        "|---|---|---|---|---|",
    ]
    summary: dict = {"floor": floor, "model_bytes": model_bytes}
    for flow in [f for f in ALL_FLOWS if f in by_flow] + [f for f in by_flow if f not in ALL_FLOWS]:
        rs, good = by_flow[flow], ok.get(flow, [])
        notes = []
        if flow == "floor":
            if floor is not None:
                notes.append(
                    f"`import torch, bitsandbytes` {fmt_gib(floor_rss)} GiB + {model_bytes_src}'s model bytes "
                    f"{fmt_gib(model_bytes)} GiB"
                )
                lines.append(f"| floor | {fmt_gib(floor)} | 1.00 | - | {'; '.join(notes)} |")
            else:
                why = "; ".join(r.get("error", "") for r in rs if r.get("status") != "ok") or "no model bytes"
                lines.append(f"| floor | - | - | - | {why} |")
            continue
        peaks = [r["peak_rss"] for r in good]
        walls = [r["wall_s"] for r in good]
        if good:
            summary[flow] = {"peak_rss": statistics.median(peaks), "wall_s": statistics.median(walls)}
            notes.append(f"model {fmt_gib(statistics.median(r['model_bytes'] for r in good))} GiB")
            if any(r.get("peak_device_memory") for r in good):
                peak_gpu = statistics.median(r.get("peak_device_memory", 0) for r in good)
                notes.append(f"on {good[0]['device']}: peak GPU memory {fmt_gib(peak_gpu)} GiB")
            if all("cpu_s" in r for r in good):
                notes.append(f"CPU {median_range([r['cpu_s'] for r in good], '.1f')} s")
                steal = max(r.get("steal_s", 0.0) for r in good)
                if steal >= 1.0:
                    notes.append(f"up to {steal:.0f} s stolen by the hypervisor")
            notes.append(f"after imports {fmt_gib(statistics.median(r['rss_after_imports'] for r in good))} GiB")
            if len(good) > 1:
                notes.append(f"n={len(good)}")
            if not all(r.get("forward_ok") for r in good):
                notes.append("FORWARD NOT FINITE")
            notes += sorted({r["warning"] for r in good if r.get("warning")})
            if ref_logits and flow != "lazy" and good[0].get("logits_last"):
                diff = max(abs(a - b) for a, b in zip(good[0]["logits_last"], ref_logits))
                notes.append(
                    f"logits vs lazy: max abs diff {diff:.3g} (lazy's std {statistics.pstdev(ref_logits):.3g})"
                )
            if flow == "naive" and good[0].get("init_s") is not None:
                notes.append(f"real init {statistics.median(r['init_s'] for r in good):.1f} s")
            if flow == "hf":
                r0 = good[0]
                notes.append(
                    f"transformers {r0.get('transformers')}, {r0.get('quantized_linears')} linears 4-bit, "
                    f"kept: {', '.join(r0.get('unquantized_linears') or []) or 'none'} "
                    f"({'/'.join(r0.get('unquantized_dtypes') or [])})"
                )
        for r in rs:
            if r.get("status") != "ok":
                notes.append(f"{r.get('status')}: {r.get('error', '')}".strip())
        peak_s = median_range([p / GIB for p in peaks], ".2f")
        ratio_s = median_range([p / floor for p in peaks], ".2f") if floor and peaks else "-"
        wall_s = median_range(walls, ".1f")
        lines.append(f"| {flow} | {peak_s} | {ratio_s} | {wall_s} | {'; '.join(notes)} |")

    digests = sorted({r["sources_sha256"] for r in records if r.get("sources_sha256")})
    if len(digests) > 1:
        lines += ["", f"WARNING: model/ and util/ changed between the runs above (source digests {digests})"]
    goal = []
    if floor and "lazy" in summary:
        lazy = summary["lazy"]
        ratio = lazy["peak_rss"] / floor
        goal.append(f"- lazy peak <= 1.10x floor: {'PASS' if ratio <= 1.10 else 'FAIL'} ({ratio:.3f}x)")
        if "hf" in summary:
            hf = summary["hf"]
            goal.append(
                f"- lazy peak < hf peak: {'PASS' if lazy['peak_rss'] < hf['peak_rss'] else 'FAIL'} "
                f"({fmt_gib(lazy['peak_rss'])} vs {fmt_gib(hf['peak_rss'])} GiB)"
            )
            goal.append(
                f"- lazy wall <= hf wall: {'PASS' if lazy['wall_s'] <= hf['wall_s'] else 'FAIL'} "
                f"({lazy['wall_s']:.1f} vs {hf['wall_s']:.1f} s)"
            )
    if goal:
        lines += ["", "Goal (issue: lazy <= 1.10x floor, below HF's peak, not slower than HF):", *goal]
    return "\n".join(lines), summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="tiny", help="model.args preset: tiny, 1.1B, 7B, 13B, 70B (default tiny)")
    ap.add_argument("--flows", default=",".join(ALL_FLOWS), help=f"comma-separated, of {','.join(ALL_FLOWS)}")
    ap.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default /tmp/lazyllama-bench/<shape>)")
    ap.add_argument("--quant", default="4bit", help="4bit (nf4, default), 4bit_fp4 or 8bit")
    ap.add_argument("--repeat", type=int, default=1, help="processes per flow (median and range are reported)")
    ap.add_argument("--keep-going", action="store_true", help="go on after a flow fails or is killed")
    ap.add_argument("--force-naive", action="store_true", help="run the naive flow even if it cannot fit")
    ap.add_argument(
        "--rss-cap-gib", type=float, default=None, help="kill a child past this RSS (default: MemAvailable - 1.5 GiB)"
    )
    ap.add_argument("--timeout", type=float, default=None, help="kill a child after this many seconds")
    ap.add_argument("--trace", action="store_true", help="lazy: record RSS and peak after every module")
    ap.add_argument("--device", default="cpu", help="lazy flow: build onto this device, e.g. cuda (default cpu)")
    ap.add_argument("--visual", default=None, help="multimodal lazy build: add this backbone, e.g. open_clip:ViT-L-14")
    ap.add_argument("--no-warm", action="store_true", help="do not read the checkpoint into the page cache first")
    ap.add_argument("--results-dir", default=None, help="default bench/results")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic checkpoint")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()

    ckpt = Path(opts.ckpt_dir or f"/tmp/lazyllama-bench/{opts.shape}")
    if opts.child:
        emit(opts.child, child_floor() if opts.child == "floor" else CHILDREN[opts.child](ckpt, opts.quant, opts.trace))
        return 0

    args = preset(opts.shape)  # validates the name
    flows = [f.strip() for f in opts.flows.split(",") if f.strip()]
    unknown = [f for f in flows if f not in ALL_FLOWS]
    if unknown:
        ap.error(f"unknown flow(s) {unknown}; choose from {list(ALL_FLOWS)}")
    session = Session(f"{opts.shape}-{opts.quant}", __file__, opts.results_dir, opts.rss_cap_gib, opts.timeout)
    print(
        f"shape {opts.shape}: {n_params(args) / 1e9:.3f} B params; checkpoint {ckpt}; child RSS cap "
        f"{fmt_gib(session.cap)} GiB",
        flush=True,
    )
    ckpt, write_record = session.synthetic_checkpoint(opts.shape, ckpt, opts.seed)
    child_args = cli_args(shape=opts.shape, ckpt_dir=ckpt, quant=opts.quant)
    # the multimodal build: the lazy child adds this backbone (random weights, built real)
    env = {"LAZYLLAMA_BENCH_VISUAL": opts.visual} if opts.visual else {}
    env = {**env, "LAZYLLAMA_BENCH_DEVICE": opts.device} if opts.device != "cpu" else env or None

    # Round-robin (floor, then the flows in the order given, per round): a noisy neighbour then slows every flow
    # alike instead of one flow's repeats. A flow that fails or cannot run is not tried again.
    records: list[dict] = []
    dropped: set[str] = set()
    failed = False
    for i in range(max(1, opts.repeat)):
        for flow in (["floor"] if "floor" in flows else []) + [f for f in flows if f != "floor"]:
            if flow in dropped:
                continue
            tag = f"{flow}-{i}"
            if flow == "naive" and not opts.force_naive and naive_estimate_bytes(args) > session.cap:
                why = (
                    f"would need ~{fmt_gib(naive_estimate_bytes(args))} GiB (bf16 model + full state dict), more "
                    f"than the {fmt_gib(session.cap)} GiB cap; --force-naive runs it"
                )
                print(f"[{tag}] skipped: {why}", flush=True)
                records.append({"flow": "naive", "status": "skipped", "error": why})
                dropped.add(flow)
                continue
            if flow != "floor" and not opts.no_warm:
                warm_page_cache(ckpt)
            rec = session.spawn(flow, child_args + cli_args(trace=opts.trace and flow == "lazy"), tag, env=env)
            records.append(rec)
            if rec["status"] == "ok":
                continue
            dropped.add(flow)
            if rec["status"] == "failed":
                failed = True
                if not opts.keep_going:
                    break
        if failed and not opts.keep_going:
            print("stopping (pass --keep-going to run the remaining flows)", flush=True)
            break

    table, summary = tabulate(records, opts.shape, opts.quant)
    print("\n" + table, flush=True)
    raw = {
        "shape": opts.shape,
        "quant": opts.quant,
        "checkpoint": str(ckpt),
        "checkpoint_write": write_record,
        "records": records,
        "summary": summary,
    }
    md, js = session.save(f"build memory: {opts.shape}, {opts.quant}", table, raw)
    print(f"\nsaved {md} and {js} (child logs in {session.log_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
