"""Peak CPU memory per rank of building a model for FSDP full fine-tuning, flow against flow, at 1, 2 and 4 processes.

    python bench/fsdp_memory.py --shape 1.1B                   # lazy and eager at 1, 2, 4 processes (fp32)
    python bench/fsdp_memory.py --shape tiny --procs 1,2       # smoke test, seconds

The synthetic bf16 checkpoint of the shape (bench/harness.py, Hugging Face format) is written once and reused. For
each flow and process count, that many fresh processes join one gloo group (torchrun's environment, set by this
parent) and build the model in fp32 (full fine-tuning keeps fp32 master weights):
    lazy   build_model(..., shard=wrap_fsdp): fully_shard per block and at the root while on meta, then every rank
           allocates and reads only its rows of each parameter (this project's --data_parallel fsdp)
    eager  build_model(...) then wrap_fsdp: the whole model on every rank first, sharded after (the flow before)
Each rank reports its peak RSS (VmHWM over the whole process, imports included), its RSS before the build (the
bare process: torch, this project and the process group) and the bytes of the tensors it holds. The goal per rank:
peak <= 1.10 x (full model / processes + bare process). A flow whose ranks together would not fit in the machine's
available memory is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness import GIB, RESULT_TAG, Session, emit, fmt_gib, hwm, keep_peak_counter, meminfo_bytes, n_params, rss

from model.args import preset

GOAL = 1.10


def child(flow: str, ckpt: Path) -> None:
    """One rank: build, report, leave (emit ends the process without teardown)."""
    import torch

    keep_peak_counter()
    from util.build import build_model
    from util.dist import dp_group, init_distributed, init_process_group
    from util.memory import tensor_bytes
    from util.train import wrap_fsdp

    torch.set_num_threads(1)
    init_process_group()
    init_distributed(1)
    shard = lambda m: wrap_fsdp(m, dp_group(), torch.device("cpu"))  # noqa: E731
    bare = rss()
    t0 = time.perf_counter()
    if flow == "lazy":
        model, _ = build_model(None, [ckpt], dtype=torch.float32, shard=shard)
    else:
        model, _ = build_model(None, [ckpt], dtype=torch.float32)
        model = shard(model)
    seconds = time.perf_counter() - t0
    torch.distributed.barrier()
    emit(flow, {"bare_rss": bare, "peak_rss": hwm(), "held_bytes": tensor_bytes(model), "wall_s": seconds})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(session: Session, flow: str, procs: int, ckpt: Path) -> list[dict]:
    """`procs` ranks of `flow` at once; their records in rank order (a failed rank: its stderr's tail)."""
    port, children = _free_port(), []
    session.log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(procs):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(procs),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(procs),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "LAZYLLAMA_DIST_BACKEND": "gloo",
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        }
        log = session.log_dir / f"{flow}-{procs}p-rank{rank}"
        cmd = [sys.executable, __file__, "--child", flow, "--ckpt", str(ckpt)]
        with open(f"{log}.stdout", "w") as out, open(f"{log}.stderr", "w") as err:  # the child keeps its own fds
            children.append((subprocess.Popen(cmd, stdout=out, stderr=err, env=env), log))
    records = []
    for proc, log in children:
        proc.wait()
        lines = [ln for ln in Path(f"{log}.stdout").read_text().splitlines() if ln.startswith(RESULT_TAG)]
        if proc.returncode == 0 and lines:
            records.append(json.loads(lines[-1][len(RESULT_TAG) :]))
        else:
            tail = Path(f"{log}.stderr").read_text()[-1500:]
            records.append({"flow": flow, "status": "failed", "error": f"exit {proc.returncode}", "stderr_tail": tail})
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1.1B")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--flows", default="lazy,eager")
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        child(opts.child, Path(opts.ckpt))
        return 0

    session = Session("fsdp-memory", __file__)
    ckpt, _ = session.synthetic_checkpoint(opts.shape, opts.ckpt_dir)
    model_bytes = 4 * n_params(preset(opts.shape))  # fp32
    rows, raw = [], {"shape": opts.shape, "model_bytes": model_bytes, "runs": []}
    for procs in map(int, opts.procs.split(",")):
        for flow in opts.flows.split(","):
            need = procs * (model_bytes if flow == "eager" else model_bytes / procs) + procs * GIB
            if need > meminfo_bytes("MemAvailable"):
                note = f"skipped: needs ~{fmt_gib(need)} GiB, {fmt_gib(meminfo_bytes('MemAvailable'))} available"
                rows.append(f"| {flow} | {procs} | - | - | - | - | {note} |")
                continue
            print(f"[{flow} x {procs}] running ...", flush=True)
            records = run_group(session, flow, procs, ckpt)
            raw["runs"].append({"flow": flow, "procs": procs, "ranks": records, "loadavg": os.getloadavg()[0]})
            failed = [r for r in records if r.get("status") != "ok"]
            if failed:
                rows.append(f"| {flow} | {procs} | - | - | - | - | failed: {failed[0]['error']} |")
                print(failed[0].get("stderr_tail", ""), flush=True)
                continue
            peak = max(r["peak_rss"] for r in records)
            bare = max(r["bare_rss"] for r in records)
            target = model_bytes / procs + bare
            ratio = peak / target
            held = max(r["held_bytes"] for r in records)
            wall = max(r["wall_s"] for r in records)
            verdict = "meets" if ratio <= GOAL else "misses"
            rows.append(
                f"| {flow} | {procs} | {fmt_gib(peak)} | {fmt_gib(held)} | {fmt_gib(target)} | {ratio:.2f}x "
                f"({verdict} {GOAL}x) | {wall:.1f} s, load {os.getloadavg()[0]:.1f} |"
            )
            print(rows[-1], flush=True)
    header = (
        f"{opts.shape} in fp32 ({fmt_gib(model_bytes)} GiB), per rank (the largest over the ranks)\n\n"
        "| flow | processes | peak RSS | tensors held | model / processes + bare | peak / that | build, load |\n"
        "|---|---|---|---|---|---|---|"
    )
    table = header + "\n" + "\n".join(rows)
    print("\n" + table)
    md, _ = session.save(f"FSDP build memory per rank, {opts.shape}", table, raw)
    print(f"saved {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
