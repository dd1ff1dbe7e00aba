"""Peak CPU memory and wall time of building a 4-bit LLaMA from a bf16 checkpoint, flow against flow.

    python bench/build_memory.py --shape 1.1B                      # lazy, naive, hf, floor
    python bench/build_memory.py --shape 7B --flows lazy,floor --repeat 3
    python bench/build_memory.py --shape tiny                      # smoke test, a few seconds

1. A synthetic bf16 checkpoint of the shape (random normal std 0.02, norms ones) is written once in Hugging Face
   format, tensor by tensor in ~2 GB shards, under --ckpt-dir (default /tmp/lazyllama-bench/<shape>); a marker
   file written last makes later runs reuse it. Every flow reads this same checkpoint.
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

The parent never imports torch: it stays small, watches each child's RSS (killing it past --rss-cap-gib, so
neither the parent nor the rest of the machine meets the OOM killer) and reports a child's exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model.args import ModelArgs, preset  # noqa: E402  (stdlib only: the parent stays torch-free)

GIB = 1 << 30
RESULT_TAG = "BENCH_JSON "
MARKER = "BENCH_COMPLETE.json"
MARKER_VERSION = 1
SHARD_BYTES = 2 * 10**9  # ~2 GB per safetensors file
ALL_FLOWS = ("lazy", "naive", "hf", "floor")
FORWARD_TOKENS = 8
LOGITS_KEPT = 64  # logits of the last position kept in the JSON to compare flows


# ---------------------------------------------------------------------------------------------------------------
# small helpers (no torch)
# ---------------------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rss(pid: int | str = "self") -> int:
    return (_proc_status_kib("VmRSS", pid) or 0) * 1024


def hwm(pid: int | str = "self") -> int:
    return (_proc_status_kib("VmHWM", pid) or 0) * 1024


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """This process's user + system CPU time."""
    t = os.times()
    return t.user + t.system


def steal_seconds() -> float:
    """Machine-wide CPU time stolen by the hypervisor (all CPUs), from /proc/stat; 0 where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Clock:
    """Wall time, this process's CPU time and the machine's stolen time of one stage (noisy neighbours show)."""

    def __init__(self) -> None:
        self.wall, self.cpu, self.steal = time.perf_counter(), cpu_seconds(), steal_seconds()

    def stop(self) -> dict:
        return {
            "wall_s": time.perf_counter() - self.wall,
            "cpu_s": cpu_seconds() - self.cpu,
            "steal_s": steal_seconds() - self.steal,
            "loadavg": os.getloadavg()[0],
        }


def meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def shape_params(args: ModelArgs) -> dict:
    """The params a checkpoint of this shape carries (Meta's params.json names; write_hf_checkpoint maps them)."""
    return {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "ffn_hidden_dim": args.hidden_dim,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_seq_len": args.max_seq_len,
    }


def tensor_shapes(args: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
    """(Meta name, shape) of every tensor of a LLaMA checkpoint of this shape, in Meta's order."""
    hd, d, hidden = args.head_dim, args.dim, args.hidden_dim
    out: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (args.vocab_size, d))]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out += [
            (p + "attention.wq.weight", (args.n_heads * hd, d)),
            (p + "attention.wk.weight", (args.n_kv_heads * hd, d)),
            (p + "attention.wv.weight", (args.n_kv_heads * hd, d)),
            (p + "attention.wo.weight", (d, args.n_heads * hd)),
            (p + "feed_forward.w1.weight", (hidden, d)),
            (p + "feed_forward.w2.weight", (d, hidden)),
            (p + "feed_forward.w3.weight", (hidden, d)),
            (p + "attention_norm.weight", (d,)),
            (p + "ffn_norm.weight", (d,)),
        ]
    out += [("norm.weight", (d,)), ("output.weight", (args.vocab_size, d))]
    return out


def n_params(args: ModelArgs) -> int:
    total = 0
    for _, shape in tensor_shapes(args):
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def naive_estimate_bytes(args: ModelArgs) -> int:
    """Peak of the naive flow: the bf16 model and the bf16 state dict coexist (2 + 2 bytes per parameter),
    plus the interpreter with torch and bitsandbytes (~0.4 GiB)."""
    return 4 * n_params(args) + int(0.4 * GIB)


def fmt_gib(n: float) -> str:
    return f"{n / GIB:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_is_complete(ckpt: Path, params: dict) -> bool:
    marker = ckpt / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("version") != MARKER_VERSION or info.get("params") != params or info.get("dtype") != "bfloat16":
        return False
    for name, size in info.get("files", {}).items():
        f = ckpt / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def prepare_checkpoint_dir(ckpt: Path) -> None:
    """Make `ckpt` ready for a fresh write: remove what an interrupted write of ours left; refuse anything else."""
    if not ckpt.exists():
        ckpt.mkdir(parents=True)
        return
    ours = [p for p in ckpt.iterdir() if p.name.endswith((".safetensors", ".json", ".tmp"))]
    foreign = [p for p in ckpt.iterdir() if p not in ours]
    if foreign:
        raise SystemExit(
            f"{ckpt} holds files this bench did not write ({', '.join(p.name for p in foreign[:5])}); "
            "pass an empty or new --ckpt-dir"
        )
    for p in ours:
        p.unlink()


def child_write(ckpt: Path, shape: str, seed: int) -> dict:
    import torch

    from util.checkpoint import write_hf_checkpoint

    args = preset(shape)
    params = shape_params(args)

    def tensors():
        for i, (key, shp) in enumerate(tensor_shapes(args)):
            if len(shp) == 1:  # RMSNorm weights
                yield key, torch.ones(shp, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                yield key, torch.empty(shp, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)

    t0 = time.perf_counter()
    write_hf_checkpoint(ckpt, tensors(), params=params, max_shard_bytes=SHARD_BYTES)
    seconds = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != MARKER}
    info = {
        "version": MARKER_VERSION,
        "shape": shape,
        "params": params,
        "dtype": "bfloat16",
        "seed": seed,
        "n_params": n_params(args),
        "files": files,
        "write_seconds": round(seconds, 2),
    }
    tmp = ckpt / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, ckpt / MARKER)  # last: its presence means the checkpoint is complete
    return {"flow": "write", "wall_s": seconds, "peak_rss": hwm(), "bytes": sum(files.values()), "files": len(files)}


def warm_page_cache(ckpt: Path) -> None:
    """Read the checkpoint once so every flow starts with it in the page cache (not counted in any RSS)."""
    buf = bytearray(16 << 20)
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


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


def child_floor(ckpt: Path, quant: str, trace: bool) -> dict:
    import bitsandbytes  # noqa: F401
    import torch  # noqa: F401

    return {"rss_after_imports": rss(), "peak_rss": hwm()}


def child_lazy(ckpt: Path, quant: str, trace: bool) -> dict:
    import bitsandbytes  # noqa: F401
    import torch

    import util.lazy_init as lazy_init
    from util import memory
    from util.build import build_model

    after_imports = {"rss_after_imports": rss(), "hwm_after_imports": hwm()}
    # materialize_and_load resets the kernel's peak counter to report its own stage; the bench wants the whole
    # process's peak (same as every other flow), so keep the counter running.
    memory.reset_peak_rss = lambda: False
    modules: list[dict] = []
    if trace:  # per module: RSS after it, and its own peak (the counter is read, then reset, around each module)
        original = lazy_init._materialize_module
        state = {"peak": 0}

        def traced(module, mod_name, *a, **kw):
            state["peak"] = max(state["peak"], hwm())
            reset_hwm()
            original(module, mod_name, *a, **kw)
            peak_in = hwm()
            state["peak"] = max(state["peak"], peak_in)
            modules.append({"module": mod_name, "rss_after": rss(), "peak_in": peak_in})

        lazy_init._materialize_module = traced

    args = None
    visual = os.environ.get("LAZYLLAMA_BENCH_VISUAL")
    if visual:  # multimodal: the LLM from the checkpoint plus a visual backbone (random weights, built real)
        from model.args import ModelArgs
        from util.checkpoint import open_checkpoint

        with open_checkpoint(ckpt) as reader:
            args = ModelArgs.from_dict(reader.config, source=str(ckpt)).replace(visual_backbone=visual)
    clock = Clock()
    model, report = build_model(args, [ckpt], quant=quant, dtype=torch.bfloat16)
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
    }
    if trace:
        out["trace"] = modules
    with torch.no_grad():
        out.update(_logits_summary(model.eval()(_tokens(model.args.vocab_size))))
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
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError as e:
        return {"status": "not installed", "error": f"transformers is not importable ({e}); "
                "pip install -r bench/requirements.txt"}  # fmt: skip
    import bitsandbytes as bnb
    import torch

    if quant not in ("4bit", "4bit_fp4", "8bit"):
        return {"status": "unsupported", "error": f"no HF equivalent for quant={quant!r}"}
    if quant == "8bit":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4" if quant == "4bit" else "fp4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    major = int(transformers.__version__.split(".")[0])
    # transformers 5 renamed torch_dtype to dtype (the old name warns) and always loads with low memory
    # (low_cpu_mem_usage is accepted and ignored); 4.x needs the old names.
    dtype_kw = {"dtype": torch.bfloat16} if major >= 5 else {"torch_dtype": torch.bfloat16}
    after_imports = {"rss_after_imports": rss(), "hwm_after_imports": hwm()}
    clock = Clock()
    model = AutoModelForCausalLM.from_pretrained(
        str(ckpt),
        quantization_config=qconfig,
        low_cpu_mem_usage=True,
        device_map="cpu",
        local_files_only=True,
        **dtype_kw,
    )
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


CHILDREN = {"floor": child_floor, "lazy": child_lazy, "naive": child_naive, "hf": child_hf}


def run_child_main(opts: argparse.Namespace) -> None:
    if opts.child == "write":
        result = child_write(Path(opts.ckpt_dir), opts.shape, opts.seed)
    else:
        result = {"flow": opts.child, **CHILDREN[opts.child](Path(opts.ckpt_dir), opts.quant, opts.trace)}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# the parent: run children, watch their memory, tabulate
# ---------------------------------------------------------------------------------------------------------------


def spawn(child: str, opts: argparse.Namespace, ckpt: Path, log_dir: Path, tag: str, cap: int) -> dict:
    """Run one child to completion; returns its JSON record, or a record saying how it failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--shape", opts.shape,
           "--ckpt-dir", str(ckpt), "--quant", opts.quant, "--seed", str(opts.seed)]  # fmt: skip
    if opts.trace and child == "lazy":
        cmd.append("--trace")
    env = dict(os.environ)
    if opts.visual:  # the multimodal build: the lazy child adds this backbone (random weights, built real)
        env["LAZYLLAMA_BENCH_VISUAL"] = opts.visual
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    out_path, err_path = log_dir / f"{tag}.stdout", log_dir / f"{tag}.stderr"
    digest = sources_digest()
    sampled_peak, killed_at = 0, None
    start = time.perf_counter()
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env, cwd=str(REPO))
        try:
            while proc.poll() is None:
                now = rss(proc.pid)
                sampled_peak = max(sampled_peak, now)
                if now > cap and killed_at is None:
                    killed_at = now
                    proc.send_signal(signal.SIGKILL)
                elif opts.timeout and time.perf_counter() - start > opts.timeout and killed_at is None:
                    killed_at = -1
                    proc.send_signal(signal.SIGKILL)
                time.sleep(0.05)
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
    elapsed = time.perf_counter() - start
    rc = proc.returncode
    record: dict | None = None
    for line in out_path.read_text().splitlines():
        if line.startswith(RESULT_TAG):
            record = json.loads(line[len(RESULT_TAG) :])
    if record is None or rc != 0:
        tail = err_path.read_text()[-3000:]
        if killed_at == -1:
            why = f"killed after --timeout {opts.timeout} s"
        elif killed_at is not None:
            why = f"killed by the bench at RSS {fmt_gib(killed_at)} GiB (--rss-cap-gib {fmt_gib(cap)})"
        elif rc == -signal.SIGKILL:
            why = "killed by SIGKILL (the kernel's OOM killer?)"
        else:
            why = f"exit status {rc}"
        if rc != 0 and f"exit status {rc}" not in why:
            why += f" (exit status {rc})"
        last = [ln for ln in tail.strip().splitlines() if ln.strip()][-1:]  # usually the exception
        if last and rc not in (0, -signal.SIGKILL):
            why += f": {last[0].strip()[:300]}"
        record = {"flow": child, "status": "failed", "rc": rc, "error": why, "stderr_tail": tail}
    record.setdefault("status", "ok")
    record["rc"] = rc
    record["sampled_peak_rss"] = sampled_peak
    record["process_s"] = elapsed
    record["sources_sha256"] = digest if digest == sources_digest() else f"{digest}->{sources_digest()} (edited)"
    return record


def _median_range(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


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
            if all("cpu_s" in r for r in good):
                notes.append(f"CPU {_median_range([r['cpu_s'] for r in good], '.1f')} s")
                steal = max(r.get("steal_s", 0.0) for r in good)
                if steal >= 1.0:
                    notes.append(f"up to {steal:.0f} s stolen by the hypervisor")
            notes.append(f"after imports {fmt_gib(statistics.median(r['rss_after_imports'] for r in good))} GiB")
            if len(good) > 1:
                notes.append(f"n={len(good)}")
            if not all(r.get("forward_ok") for r in good):
                notes.append("FORWARD NOT FINITE")
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
        peak_s = _median_range([p / GIB for p in peaks], ".2f")
        ratio_s = _median_range([p / floor for p in peaks], ".2f") if floor and peaks else "-"
        wall_s = _median_range(walls, ".1f")
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


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "mem_total_gib": round(meminfo_bytes("MemTotal") / GIB, 2),
        "kernel": platform.release(),
    }
    try:
        from importlib.metadata import version

        for pkg in ("torch", "bitsandbytes", "transformers", "accelerate", "safetensors"):
            try:
                info[pkg] = version(pkg)
            except Exception:
                info[pkg] = None
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    return info


def sources_digest() -> str:
    """A digest of the working tree's model/ and util/ sources (tells apart runs made while they were edited)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted([*REPO.glob("model/**/*.py"), *REPO.glob("util/**/*.py")]):
        digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:12]


def code_state() -> dict:
    """Which library code was measured: the commit, the edited files and their digest (read-only git calls)."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "model", "util").splitlines()]
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "dirty": dirty,
        "sources_sha256": sources_digest(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="tiny", help="model.args preset: tiny, 1.1B, 7B, 13B, 70B (default tiny)")
    ap.add_argument("--flows", default=",".join(ALL_FLOWS), help=f"comma-separated, of {','.join(ALL_FLOWS)}")
    ap.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default /tmp/lazyllama-bench/<shape>)")
    ap.add_argument("--quant", default="4bit", help="4bit (nf4, default), 4bit_fp4 or 8bit")
    ap.add_argument("--repeat", type=int, default=1, help="processes per flow (median and range are reported)")
    ap.add_argument("--keep-going", action="store_true", help="go on after a flow fails or is killed")
    ap.add_argument("--force-naive", action="store_true", help="run the naive flow even if it cannot fit")
    ap.add_argument("--rss-cap-gib", type=float, default=None,
                    help="kill a child past this RSS (default: MemAvailable at start - 1.5 GiB)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=None, help="kill a child after this many seconds")
    ap.add_argument("--trace", action="store_true", help="lazy: record RSS and peak after every module")
    ap.add_argument("--visual", default=None, help="multimodal lazy build: add this backbone, e.g. open_clip:ViT-L-14")
    ap.add_argument("--no-warm", action="store_true", help="do not read the checkpoint into the page cache first")
    ap.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic checkpoint")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()

    ckpt = Path(opts.ckpt_dir or f"/tmp/lazyllama-bench/{opts.shape}")
    opts.ckpt_dir = str(ckpt)
    if opts.child:
        run_child_main(opts)
        return 0

    args = preset(opts.shape)  # validates the name
    flows = [f.strip() for f in opts.flows.split(",") if f.strip()]
    unknown = [f for f in flows if f not in ALL_FLOWS]
    if unknown:
        ap.error(f"unknown flow(s) {unknown}; choose from {list(ALL_FLOWS)}")
    cap = int(opts.rss_cap_gib * GIB) if opts.rss_cap_gib else meminfo_bytes("MemAvailable") - int(1.5 * GIB)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = Path(opts.results_dir)
    log_dir = results / "logs" / f"{opts.shape}-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"shape {opts.shape}: {n_params(args) / 1e9:.3f} B params; checkpoint {ckpt}; child RSS cap "
          f"{fmt_gib(cap)} GiB", flush=True)  # fmt: skip

    params = shape_params(args)
    write_record = None
    if checkpoint_is_complete(ckpt, params):
        print("checkpoint: reusing the complete one there", flush=True)
    else:
        prepare_checkpoint_dir(ckpt)
        print(f"checkpoint: writing {2 * n_params(args) / 1e9:.2f} GB of bf16 ...", flush=True)
        write_record = spawn("write", opts, ckpt, log_dir, "write", cap)
        if write_record.get("status") != "ok":
            print(f"checkpoint write failed: {write_record.get('error')}\n{write_record.get('stderr_tail', '')}")
            return 1
        w = write_record
        print(
            f"checkpoint: {w['files']} files, {w['bytes'] / 1e9:.2f} GB in {w['wall_s']:.1f} s, "
            f"writer peak RSS {fmt_gib(w['peak_rss'])} GiB",
            flush=True,
        )

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
            if flow == "naive" and not opts.force_naive and naive_estimate_bytes(args) > cap:
                need = naive_estimate_bytes(args)
                why = (
                    f"would need ~{fmt_gib(need)} GiB (bf16 model + full state dict), more than the "
                    f"{fmt_gib(cap)} GiB cap; --force-naive runs it"
                )
                rec = {"flow": "naive", "status": "skipped", "error": why}
                print(f"[{tag}] skipped: {rec['error']}", flush=True)
                records.append(rec)
                dropped.add(flow)
                continue
            if flow != "floor" and not opts.no_warm:
                warm_page_cache(ckpt)
            print(f"[{tag}] running ...", flush=True)
            rec = spawn(flow, opts, ckpt, log_dir, tag, cap)
            records.append(rec)
            if rec.get("status") == "ok":
                extra = f", wall {rec['wall_s']:.1f} s, CPU {rec['cpu_s']:.1f} s" if "wall_s" in rec else ""
                print(f"[{tag}] peak RSS {fmt_gib(rec['peak_rss'])} GiB{extra}", flush=True)
                continue
            print(f"[{tag}] {rec.get('status')}: {rec.get('error')}", flush=True)
            if rec.get("stderr_tail"):
                print("    " + rec["stderr_tail"].strip().replace("\n", "\n    ")[-1500:], flush=True)
            dropped.add(flow)
            if rec.get("status") == "failed":
                failed = True
                if not opts.keep_going:
                    break
        if failed and not opts.keep_going:
            print("stopping (pass --keep-going to run the remaining flows)", flush=True)
            break

    table, summary = tabulate(records, opts.shape, opts.quant)
    code = code_state()
    print("\n" + table, flush=True)
    print(f"\ncode measured: {code}")
    md_path = results / f"{opts.shape}-{opts.quant}-{stamp}.md"
    json_path = results / f"{opts.shape}-{opts.quant}-{stamp}.json"
    header = (
        f"# build memory: {opts.shape}, {opts.quant}\n\n"
        f"command: `{' '.join([Path(sys.executable).name, 'bench/build_memory.py', *sys.argv[1:]])}`  \n"
        f"machine: {json.dumps(machine_info())}  \n"
        f"code: {json.dumps(code)}\n\n"
    )
    md_path.write_text(header + table + "\n")
    raw = {
        "shape": opts.shape,
        "quant": opts.quant,
        "argv": sys.argv[1:],
        "machine": machine_info(),
        "code": code,
        "checkpoint": str(ckpt),
        "checkpoint_write": write_record,
        "records": records,
        "summary": summary,
    }
    json_path.write_text(json.dumps(raw, indent=1))
    print(f"\nsaved {md_path} and {json_path} (child logs in {log_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
