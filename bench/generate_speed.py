"""Greedy generation speed: util.generate (our KV cache) against Hugging Face transformers' `generate`, same weights.

    python bench/generate_speed.py                          # 1.1B shape, bf16 and 4-bit, 32-token prompt, 64 new
    python bench/generate_speed.py --shape tiny             # smoke test (~30 s, mostly imports)
    python bench/generate_speed.py --quants 4bit --new-tokens 32 --repeat 2

1. Random weights: build_model(preset(shape), None, dtype=bf16) (seeded init), written once in Hugging Face's format
   with util.checkpoint.write_hf_checkpoint (cached in /tmp/lazyllama-bench/generate-<shape>).
2. One fresh process per (implementation, quant):
     ours  build_model(None, [that checkpoint], quant=...) - the same weights as HF's (a 4-bit build from random
           init draws other values than the bf16 one), then util.generate.generate (greedy) on one prompt;
     hf    AutoModelForCausalLM.from_pretrained(that checkpoint, dtype=bf16, + BitsAndBytesConfig(nf4, double quant,
           bf16 compute) for 4-bit), then model.generate(do_sample=False, min_new_tokens = max_new_tokens).
   Each runs a short warm-up generation, then --repeat timed generations of --new-tokens tokens from the same
   random --prompt-tokens prompt (batch 1); tokens/s = new tokens / wall seconds (prompt included), best of the
   repeats, and CPU seconds per token (less sensitive to other jobs than wall time). "same tokens": how many leading
   generated tokens the two agree on (same weights; random weights give flat logits, so bf16 near-ties make them
   part early).
3. A markdown table is printed and saved with the raw JSON under bench/results/ (gitignored).

The machine may be shared: the load average before and after is recorded; compare runs made close together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CACHE = Path("/tmp/lazyllama-bench")
MARKER = "BENCH_COMPLETE.json"
SEED = 0


def _params(args) -> dict:
    return {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "ffn_hidden_dim": args.hidden_dim, "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "max_seq_len": args.max_seq_len,
    }  # fmt: skip


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _prompt(vocab_size: int, n: int) -> list[int]:
    import torch

    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()


# --- children ---


def child_write(shape: str, out: Path) -> dict:
    import torch

    from model.args import preset
    from util.build import build_model
    from util.checkpoint import write_hf_checkpoint

    args = preset(shape)
    model, _ = build_model(args, None, dtype=torch.bfloat16, seed=SEED)
    t0 = time.perf_counter()
    write_hf_checkpoint(out, model.state_dict(), params=_params(args), max_shard_bytes=2 << 30)
    info = {"shape": shape, "seed": SEED, "seconds": time.perf_counter() - t0}
    (out / MARKER).write_text(json.dumps(info))
    return info


def child_ours(shape: str, quant: str, ckpt: Path, opts) -> dict:
    import torch

    from model.args import preset
    from util.build import build_model
    from util.generate import SamplingParams, generate

    args = preset(shape)
    t0 = time.perf_counter()
    model, _ = build_model(args, [ckpt], quant=None if quant == "none" else quant, dtype=torch.bfloat16)
    load = time.perf_counter() - t0
    from util.quant import prepare_for_inference

    prepare_for_inference(model)  # as demo.py serves: eval mode, 4-bit repacked for the AVX512-BF16 CPU kernel
    prompt = _prompt(args.vocab_size, opts.prompt_tokens)
    generate(model, [prompt], SamplingParams(max_new_tokens=4))  # warm-up
    runs, cpu, tokens = [], [], None
    for _ in range(opts.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = generate(model, [prompt], SamplingParams(max_new_tokens=opts.new_tokens))[0]
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"load_s": load, "runs_s": runs, "cpu_s": cpu, "tokens": tokens}


def child_hf(shape: str, quant: str, ckpt: Path, opts) -> dict:
    try:
        import transformers
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError as e:
        return {"status": "not installed", "error": f"{e}; pip install -r bench/requirements.txt"}
    import torch

    from model.args import preset

    kwargs = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.bfloat16}
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    elif quant != "none":
        return {"status": "unsupported", "error": f"no HF row for quant={quant}"}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), device_map="cpu", local_files_only=True, **kwargs)
    load = time.perf_counter() - t0
    model.eval()
    ids = torch.tensor([_prompt(preset(shape).vocab_size, opts.prompt_tokens)])

    def run(n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    run(4)  # warm-up
    runs, cpu, tokens = [], [], None
    for _ in range(opts.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = run(opts.new_tokens)
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"load_s": load, "runs_s": runs, "cpu_s": cpu, "tokens": tokens, "transformers": transformers.__version__}


def child_main(opts) -> None:
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if opts.child == "write":
        result = child_write(opts.shape, Path(opts.ckpt))
    elif opts.child == "ours":
        result = child_ours(opts.shape, opts.quant, Path(opts.ckpt), opts)
    else:
        result = child_hf(opts.shape, opts.quant, Path(opts.ckpt), opts)
    result.setdefault("status", "ok")
    result["peak_rss"] = _peak_rss()
    print("RESULT " + json.dumps(result), flush=True)


# --- parent ---


def spawn(opts, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--shape", opts.shape, "--prompt-tokens", str(opts.prompt_tokens),
           "--new-tokens", str(opts.new_tokens), "--repeat", str(opts.repeat), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"status": "failed", "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}


def agreement(a: list[int] | None, b: list[int] | None) -> str:
    if not a or not b:
        return "-"
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same}/{min(len(a), len(b))}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1.1B")
    p.add_argument("--quants", default="none,4bit", help="comma list of none,4bit")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", choices=["write", "ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        child_main(opts)
        return

    ckpt = CACHE / f"generate-{opts.shape}"
    if not (ckpt / MARKER).exists():
        print(f"writing random {opts.shape} weights (HF format) to {ckpt}", flush=True)
        ckpt.mkdir(parents=True, exist_ok=True)
        r = spawn(opts, "--child", "write", "--ckpt", str(ckpt))
        if r["status"] != "ok":
            sys.exit(f"writing the checkpoint failed: {r['error']}")
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for quant in opts.quants.split(","):
        for impl in ("ours", "hf"):
            t0 = time.perf_counter()
            r = spawn(opts, "--child", impl, "--quant", quant, "--ckpt", str(ckpt))
            r["wall_s"] = time.perf_counter() - t0
            results[f"{impl}/{quant}"] = r
            speed = f"{opts.new_tokens / min(r['runs_s']):.2f} tokens/s" if r["status"] == "ok" else r["error"]
            print(f"{impl:4s} {quant:5s} {speed}", flush=True)
    load_after = os.getloadavg()

    lines = [
        f"Greedy generation, {opts.shape} shape (random weights), batch 1, {opts.prompt_tokens}-token prompt, "
        f"{opts.new_tokens} new tokens, best of {opts.repeat}; torch threads: {os.cpu_count()} cores; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        "",
        "| quant | ours tokens/s | HF tokens/s | ours / HF | CPU s per token ours / HF | load s ours / HF "
        "| same tokens | peak RSS ours / HF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for quant in opts.quants.split(","):
        pair = (results[f"ours/{quant}"], results[f"hf/{quant}"])
        ok = all(r["status"] == "ok" for r in pair)
        ts = [opts.new_tokens / min(r["runs_s"]) if r["status"] == "ok" else None for r in pair]
        cell = [f"{t:.2f}" if t else r["status"] for t, r in zip(ts, pair)]
        ratio = f"{ts[0] / ts[1]:.2f}x" if ok else "-"
        cpu = " / ".join(f"{min(r['cpu_s']) / opts.new_tokens:.3f}" for r in pair) if ok else "-"
        loads = " / ".join(f"{r['load_s']:.1f}" for r in pair) if ok else "-"
        rss = " / ".join(f"{r['peak_rss'] / 2**30:.2f} GiB" for r in pair) if ok else "-"
        same = agreement(pair[0].get("tokens"), pair[1].get("tokens"))
        lines.append(f"| {quant} | {cell[0]} | {cell[1]} | {ratio} | {cpu} | {loads} | {same} | {rss} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"generate-{opts.shape}-{stamp}.md").write_text(table + "\n")
    (out / f"generate-{opts.shape}-{stamp}.json").write_text(
        json.dumps({"opts": vars(opts), "loadavg": [load_before, load_after], "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
