"""Greedy generation speed: util.generate (our KV cache) against Hugging Face transformers' `generate`, same weights.

    python bench/generate_speed.py                          # 1.1B shape, bf16 and 4-bit, 32-token prompt, 64 new
    python bench/generate_speed.py --shape tiny             # smoke test (~30 s, mostly imports)
    python bench/generate_speed.py --quants 4bit --new-tokens 32 --repeat 2

1. Random weights: bench/harness.py's synthetic bf16 checkpoint of the shape (random normal std 0.02, Hugging Face
   format), written once and shared with the other benches (/tmp/lazyllama-bench/<shape>).
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
import os
import time
from pathlib import Path

from harness import Session, cli_args, emit, hf_from_pretrained_kwargs, hf_not_installed, quiet_bitsandbytes


def _prompt(vocab_size: int, n: int) -> list[int]:
    import torch

    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def _timed_runs(run, opts) -> dict:
    """A short warm-up generation, then --repeat timed ones of --new-tokens tokens."""
    run(4)
    runs, cpu, tokens = [], [], None
    for _ in range(opts.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = run(opts.new_tokens)
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"runs_s": runs, "cpu_s": cpu, "tokens": tokens}


# --- children ---


def child_ours(shape: str, quant: str, ckpt: Path, opts) -> dict:
    import torch

    from model.args import preset
    from util.build import build_model
    from util.generate import SamplingParams, generate
    from util.quant import prepare_for_inference

    args = preset(shape)
    t0 = time.perf_counter()
    model, _ = build_model(args, [ckpt], quant=None if quant == "none" else quant, dtype=torch.bfloat16)
    load = time.perf_counter() - t0
    prepare_for_inference(model)  # as demo.py serves: eval mode, 4-bit repacked for the AVX512-BF16 CPU kernel
    prompt = _prompt(args.vocab_size, opts.prompt_tokens)
    run = lambda n: generate(model, [prompt], SamplingParams(max_new_tokens=n))[0]
    return {"load_s": load, **_timed_runs(run, opts)}


def child_hf(shape: str, quant: str, ckpt: Path, opts) -> dict:
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return hf_not_installed(e)
    import torch

    from model.args import preset

    try:
        kwargs = hf_from_pretrained_kwargs(quant)
    except ValueError as e:
        return {"status": "unsupported", "error": str(e)}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), device_map="cpu", **kwargs)
    load = time.perf_counter() - t0
    model.eval()
    ids = torch.tensor([_prompt(preset(shape).vocab_size, opts.prompt_tokens)])

    def run(n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, ids.shape[1] :].tolist()

    return {"load_s": load, **_timed_runs(run, opts), "transformers": transformers.__version__}


# --- parent ---


def agreement(a: list[int] | None, b: list[int] | None) -> str:
    if not a or not b:
        return "-"
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same}/{min(len(a), len(b))}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1.1B", help="model.args preset (tiny: smoke test)")
    p.add_argument("--quants", default="none,4bit", help="comma list of none,4bit")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        quiet_bitsandbytes()
        emit(
            opts.child, {"ours": child_ours, "hf": child_hf}[opts.child](opts.shape, opts.quant, Path(opts.ckpt), opts)
        )
        return

    session = Session(f"generate-{opts.shape}", __file__, timeout=opts.timeout)
    ckpt, _ = session.synthetic_checkpoint(opts.shape)
    child_args = cli_args(
        shape=opts.shape, prompt_tokens=opts.prompt_tokens, new_tokens=opts.new_tokens, repeat=opts.repeat, ckpt=ckpt
    )
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for quant in opts.quants.split(","):
        for impl in ("ours", "hf"):
            r = session.spawn(impl, child_args + cli_args(quant=quant), f"{impl}-{quant}")
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
    session.save(
        f"generation speed: {opts.shape}",
        table,
        {"opts": vars(opts), "loadavg": [load_before, load_after], "results": results},
    )


if __name__ == "__main__":
    main()
