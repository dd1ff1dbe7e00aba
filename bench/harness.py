"""What every bench shares: a fresh child process per flow, its memory read from /proc, synthetic checkpoints
written once and reused, the bare-import floor, medians, and result tables under bench/results/.

A bench script is both parent and child. The parent runs `python bench/<script>.py --child FLOW ...` through
Session.spawn, which watches the child's RSS (killing it past a cap, so neither the parent nor the rest of the
machine meets the OOM killer, or past a timeout) and returns the one JSON record the child printed with emit(), or a
record saying how it failed. The parent never imports torch, so it stays small: this module is stdlib-only at import
(model.args is too); the child helpers import torch inside.

    python bench/harness.py --child write --shape tiny --ckpt-dir /tmp/x   # what Session.synthetic_checkpoint runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the benches import the library from the working tree, not an installed copy
    sys.path.insert(0, str(REPO))

from model.args import ModelArgs, preset  # noqa: E402  (stdlib only: the parent stays torch-free)

GIB = 1 << 30
CACHE = Path("/tmp/lazyllama-bench")  # synthetic checkpoints, one folder per shape
RESULT_TAG = "BENCH_JSON "  # the child's one result line on stdout starts with this
MARKER = "BENCH_COMPLETE.json"  # written last into a cached folder: its presence means the folder is complete
MARKER_VERSION = 1
SHARD_BYTES = 2 * 10**9  # ~2 GB per safetensors file


# ---------------------------------------------------------------------------------------------------------------
# /proc readings. util.memory has in-process ones, but it imports torch (the parent must not) and the build children
# replace its reset_peak_rss to keep the whole process's peak; these read any pid and are never patched.
# ---------------------------------------------------------------------------------------------------------------


def proc_status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rss(pid: int | str = "self") -> int:
    return (proc_status_kib("VmRSS", pid) or 0) * 1024


def hwm(pid: int | str = "self") -> int:
    """Peak RSS (VmHWM) since the process started or the last reset_hwm()."""
    return (proc_status_kib("VmHWM", pid) or 0) * 1024


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


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


def fmt_gib(n: float) -> str:
    return f"{n / GIB:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# the child side
# ---------------------------------------------------------------------------------------------------------------


def emit(flow: str, record: dict) -> NoReturn:
    """Print the child's result line for Session.spawn and end the child; `peak_rss` defaults to the whole
    process's VmHWM. The child ends without interpreter teardown: torch's and bitsandbytes' finalizers grow RSS
    by ~130 MB, which is no part of any flow and would hide a reset VmHWM from the parent's sampled peak."""
    record = {"flow": flow, **record}
    record.setdefault("status", "ok")
    record.setdefault("peak_rss", hwm())
    print(RESULT_TAG + json.dumps(record), flush=True)
    sys.stderr.flush()
    os._exit(0)


def child_floor() -> dict:
    """The floor's first part: a bare `import torch, bitsandbytes`. floor = this RSS + the model's tensor bytes."""
    import bitsandbytes  # noqa: F401
    import torch  # noqa: F401

    return {"rss_after_imports": rss(), "peak_rss": hwm()}


def keep_peak_counter() -> None:
    """materialize_and_load resets the kernel's peak counter to report its own stage; a bench wants the whole
    process's peak (imports included, as the floor child's), so keep the counter running."""
    from util import memory

    memory.reset_peak_rss = lambda: False


def quiet_bitsandbytes() -> None:
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def hf_not_installed(e: ImportError) -> dict:
    """The record of a Hugging Face flow on a machine without the optional bench requirements."""
    return {"status": "not installed", "error": f"{e}; pip install -r bench/requirements.txt (check that torch stays)"}


def hf_from_pretrained_kwargs(quant: str) -> dict:
    """bf16 weights and, for a quantized flow, the bitsandbytes config matching ours (nf4/fp4 with double
    quantization and bf16 compute, or int8); ValueError for a mode transformers has no equivalent of."""
    import torch
    import transformers
    from transformers import BitsAndBytesConfig

    # transformers 5 renamed torch_dtype to dtype (the old name warns); 4.x needs the old name.
    major = int(transformers.__version__.split(".")[0])
    kwargs: dict = {"dtype" if major >= 5 else "torch_dtype": torch.bfloat16, "local_files_only": True}
    if quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quant in ("4bit", "4bit_fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4" if quant == "4bit" else "fp4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    elif quant != "none":
        raise ValueError(f"no Hugging Face equivalent for quant={quant!r}")
    return kwargs


# ---------------------------------------------------------------------------------------------------------------
# cached folders and the synthetic checkpoint
# ---------------------------------------------------------------------------------------------------------------


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
        **({"tie_word_embeddings": True} if args.tie_word_embeddings else {}),
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
    out += [("norm.weight", (d,))]
    if not args.tie_word_embeddings:  # tied (Llama 3.2 1B): the head is the embedding, saved once
        out += [("output.weight", (args.vocab_size, d))]
    return out


def n_params(args: ModelArgs) -> int:
    total = 0
    for _, shape in tensor_shapes(args):
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def read_marker(directory: Path, name: str = MARKER, **expect) -> dict | None:
    """The marker of a complete cached folder whose fields equal `expect` and whose listed files all have their
    recorded sizes; None when the folder must be (re)written."""
    try:
        info = json.loads((directory / name).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(info.get(k) != v for k, v in expect.items()):
        return None
    for fname, size in info.get("files", {}).items():
        f = directory / fname
        if not f.is_file() or f.stat().st_size != size:
            return None
    return info


def write_marker(directory: Path, info: dict, name: str = MARKER) -> dict:
    """Write the marker last, atomically, listing every other file's size: its presence means the folder is complete."""
    files = {
        p.name: p.stat().st_size
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.endswith((name, name + ".tmp"))
    }
    info = {**info, "files": files}
    tmp = directory / (name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, directory / name)
    return info


def prepare_dir(directory: Path) -> None:
    """Make `directory` ready for a fresh write: remove what an interrupted write of ours left; refuse anything else."""
    if not directory.exists():
        directory.mkdir(parents=True)
        return
    ours = [p for p in directory.iterdir() if p.name.endswith((".safetensors", ".json", ".tmp"))]
    foreign = [p for p in directory.iterdir() if p not in ours]
    if foreign:
        raise SystemExit(
            f"{directory} holds files this bench did not write ({', '.join(p.name for p in foreign[:5])}); "
            "pass an empty or new folder"
        )
    for p in ours:
        p.unlink()


def synthetic_checkpoint_is_complete(ckpt: Path, shape: str, seed: int = 0) -> bool:
    params = shape_params(preset(shape))
    return read_marker(ckpt, version=MARKER_VERSION, params=params, dtype="bfloat16", seed=seed) is not None


def write_synthetic_checkpoint(ckpt: Path, shape: str, seed: int) -> dict:
    """(child) A bf16 checkpoint of the shape in Hugging Face format: random normal std 0.02, norms ones, written
    tensor by tensor in ~2 GB shards, so even 13B fits on a 24 GiB machine."""
    import torch

    from util.checkpoint import write_hf_checkpoint

    args = preset(shape)

    def tensors():
        for i, (key, shp) in enumerate(tensor_shapes(args)):
            if len(shp) == 1:  # RMSNorm weights
                yield key, torch.ones(shp, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                yield key, torch.empty(shp, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)

    t0 = time.perf_counter()
    write_hf_checkpoint(ckpt, tensors(), params=shape_params(args), max_shard_bytes=SHARD_BYTES)
    seconds = time.perf_counter() - t0
    info = write_marker(
        ckpt,
        {
            "version": MARKER_VERSION,
            "shape": shape,
            "params": shape_params(args),
            "dtype": "bfloat16",
            "seed": seed,
            "n_params": n_params(args),
            "write_seconds": round(seconds, 2),
        },
    )
    return {"wall_s": seconds, "bytes": sum(info["files"].values()), "files": len(info["files"])}


def warm_page_cache(directory: Path) -> None:
    """Read the folder's safetensors files once, so a flow starts with them in the page cache (not in any RSS)."""
    buf = bytearray(16 << 20)
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def drop_page_cache(directory: Path) -> None:
    """Evict the folder's files from the page cache (clean pages only; no root needed), so a flow pays the read."""
    for f in directory.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# the parent side
# ---------------------------------------------------------------------------------------------------------------


class Session:
    """One bench run: its timestamp, child logs under bench/results/logs/<name>-<stamp>/, the RSS cap of its children,
    and its saved results bench/results/<name>-<stamp>.{md,json}."""

    def __init__(
        self,
        name: str,
        script: str,
        results_dir: str | None = None,
        cap_gib: float | None = None,
        timeout: float | None = None,
    ) -> None:
        self.name, self.script, self.timeout = name, str(Path(script).resolve()), timeout
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.results = Path(results_dir) if results_dir else REPO / "bench" / "results"
        self.log_dir = self.results / "logs" / f"{name}-{self.stamp}"
        self.cap = int(cap_gib * GIB) if cap_gib else meminfo_bytes("MemAvailable") - int(1.5 * GIB)

    def spawn(
        self,
        flow: str,
        args: list[str],
        tag: str | None = None,
        env: dict | None = None,
        script: str | None = None,
        python: str | None = None,
    ) -> dict:
        """Run `python <script> --child FLOW *args` to completion, printing its progress; returns its JSON record
        (status "ok" unless the child said otherwise), or a record saying how it failed. `python`: another
        environment's interpreter for this child (default: this one's)."""
        tag = tag or flow
        cmd = [python or sys.executable, script or self.script, "--child", flow, *args]
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = str(REPO) + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
        full_env.setdefault("HF_HUB_OFFLINE", "1")
        full_env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out_path, err_path = self.log_dir / f"{tag}.stdout", self.log_dir / f"{tag}.stderr"
        digest = sources_digest()
        sampled_peak, killed_at = 0, None
        print(f"[{tag}] running ...", flush=True)
        start = time.perf_counter()
        with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
            proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=full_env, cwd=str(REPO))
            try:
                while proc.poll() is None:
                    now = rss(proc.pid)
                    sampled_peak = max(sampled_peak, now)
                    if now > self.cap and killed_at is None:
                        killed_at = now
                        proc.send_signal(signal.SIGKILL)
                    elif self.timeout and time.perf_counter() - start > self.timeout and killed_at is None:
                        killed_at = -1
                        proc.send_signal(signal.SIGKILL)
                    time.sleep(0.05)
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
                raise
        rc = proc.returncode
        record = None
        for line in out_path.read_text().splitlines():
            if line.startswith(RESULT_TAG):
                record = json.loads(line[len(RESULT_TAG) :])
        if record is None or rc != 0:
            tail = err_path.read_text()[-3000:]
            why = self._failure(rc, killed_at, tail)
            record = {"flow": flow, "status": "failed", "error": why, "stderr_tail": tail}
        now_digest = sources_digest()
        record.update(
            rc=rc,
            sampled_peak_rss=sampled_peak,
            process_s=time.perf_counter() - start,
            sources_sha256=digest if digest == now_digest else f"{digest}->{now_digest} (edited)",
        )
        # the parent samples the whole child, so compare with the child's peak over all it did (a build child's
        # test forward pass comes after its build peak)
        child_peak = max(record.get("peak_rss", 0), record.get("peak_rss_with_forward") or 0)
        if record["status"] == "ok" and sampled_peak > child_peak + (64 << 20):
            # The parent saw more than the child's own peak: something reset the child's VmHWM (a library stage
            # reporting its own peak), so its peak_rss understates the whole process's.
            record["warning"] = f"peak_rss below the parent's sampled {fmt_gib(sampled_peak)} GiB: VmHWM was reset"
            print(f"[{tag}] WARNING: {record['warning']}", flush=True)
        if record["status"] == "ok":
            times = [(k, record.get(f"{k.lower()}_s")) for k in ("wall", "CPU")]  # a stage's seconds, when one number
            extra = "".join(f", {k} {v:.1f} s" for k, v in times if isinstance(v, (int, float)))
            print(f"[{tag}] peak RSS {fmt_gib(record['peak_rss'])} GiB{extra}", flush=True)
        else:
            print(f"[{tag}] {record['status']}: {record.get('error')}", flush=True)
            if record.get("stderr_tail"):
                print("    " + record["stderr_tail"].strip().replace("\n", "\n    ")[-1500:], flush=True)
        return record

    def _failure(self, rc: int, killed_at: int | None, tail: str) -> str:
        if killed_at == -1:
            why = f"killed after --timeout {self.timeout} s"
        elif killed_at is not None:
            why = f"killed by the bench at RSS {fmt_gib(killed_at)} GiB (cap {fmt_gib(self.cap)} GiB)"
        elif rc == -signal.SIGKILL:
            why = "killed by SIGKILL (the kernel's OOM killer?)"
        else:
            why = f"exit status {rc}"
        if rc != 0 and f"exit status {rc}" not in why:
            why += f" (exit status {rc})"
        last = [ln for ln in tail.strip().splitlines() if ln.strip()][-1:]  # usually the exception
        if last and rc not in (0, -signal.SIGKILL):
            why += f": {last[0].strip()[:300]}"
        return why

    def synthetic_checkpoint(self, shape: str, ckpt: Path | None = None, seed: int = 0) -> tuple[Path, dict | None]:
        """The synthetic bf16 checkpoint of the shape (default CACHE/<shape>): reused when its marker matches, else
        written by a child. Returns the folder and the write's record (None when reused); exits if the write fails."""
        ckpt = Path(ckpt or CACHE / shape)
        if synthetic_checkpoint_is_complete(ckpt, shape, seed):
            print(f"checkpoint: reusing the complete one in {ckpt}", flush=True)
            return ckpt, None
        prepare_dir(ckpt)
        print(f"checkpoint: writing {2 * n_params(preset(shape)) / 1e9:.2f} GB of bf16 to {ckpt} ...", flush=True)
        rec = self.spawn("write", cli_args(shape=shape, ckpt_dir=ckpt, seed=seed), script=__file__)
        if rec["status"] != "ok":
            raise SystemExit(f"checkpoint write failed: {rec.get('error')}")
        print(f"checkpoint: {rec['files']} files, {rec['bytes'] / 1e9:.2f} GB in {rec['wall_s']:.1f} s", flush=True)
        return ckpt, rec

    def save(self, title: str, table: str, raw: dict, argv: list[str] | None = None) -> tuple[Path, Path]:
        """The table (under a header naming the command, machine and code measured) as markdown, and the raw
        numbers as JSON, under bench/results/<name>-<stamp>."""
        self.results.mkdir(parents=True, exist_ok=True)
        machine, code = machine_info(), code_state()
        argv = sys.argv[1:] if argv is None else argv
        script = Path(sys.argv[0]).resolve()
        command = " ".join(["python", str(script.relative_to(REPO) if script.is_relative_to(REPO) else script), *argv])
        md = self.results / f"{self.name}-{self.stamp}.md"
        md.write_text(
            f"# {title}\n\ncommand: `{command}`  \nmachine: {json.dumps(machine)}  \n"
            f"code: {json.dumps(code)}\n\n{table}\n"
        )
        js = self.results / f"{self.name}-{self.stamp}.json"
        js.write_text(json.dumps({"argv": argv, "machine": machine, "code": code, **raw}, indent=1))
        return md, js


def median_range(values: list[float], fmt: str) -> str:
    """`median (min-max)` of repeated measurements; the value alone when there is one."""
    if not values:
        return "-"
    med = format(statistics.median(values), fmt)
    return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def cli_args(**options) -> list[str]:
    """`--name value` for each option (underscores become dashes); True is a bare flag, None and False are left out."""
    out: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        out.append("--" + name.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "mem_total_gib": round(meminfo_bytes("MemTotal") / GIB, 2),
        "kernel": platform.release(),
        "loadavg": os.getloadavg()[0],
    }
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "bitsandbytes", "transformers", "accelerate", "peft", "safetensors"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    return info


def sources_digest() -> str:
    """A digest of the working tree's model/ and util/ sources (tells apart runs made while they were edited)."""
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
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "dirty": dirty, "sources_sha256": sources_digest()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", choices=["write"], required=True)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    emit("write", write_synthetic_checkpoint(Path(opts.ckpt_dir), opts.shape, opts.seed))
