"""Greedy generation speed: util.generate (our KV cache) against Hugging Face transformers' `generate`, same weights.

    python bench/generate_speed.py                          # 1.1B shape, bf16 and 4-bit, 32-token prompt, 64 new
    python bench/generate_speed.py --shape tiny             # smoke test (~30 s, mostly imports)
    python bench/generate_speed.py --quants 4bit --new-tokens 32 --repeat 2
    python bench/generate_speed.py --quants 4bit --workloads random,quote --draft-tokens 6

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


def _workload_prompt(vocab_size: int, opts) -> list[int]:
    """random: --prompt-tokens random ids. quote: the random prompt, our plain greedy answer to it (--answer, from
    the parent), then the random prompt again - a context whose continuation repeats text already in it, as a chat
    answer quoting its prompt does (random weights cannot be asked to summarize; they do continue the same way
    from the same tokens, which is the property prompt lookup uses)."""
    p = _prompt(vocab_size, opts.prompt_tokens)
    if opts.workload == "random":
        return p
    return p + [int(t) for t in opts.answer.split(",")] + p


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
    prompt = _workload_prompt(args.vocab_size, opts)
    params = SamplingParams(draft_tokens=opts.draft_tokens)
    forwards = [0]
    real_forward = model.forward

    def counted(*a, **k):  # forwards per generation: how many tokens each verify forward yielded
        forwards[0] += 1
        return real_forward(*a, **k)

    model.forward = counted
    run = lambda n: generate(model, [prompt], params.replace(max_new_tokens=n))[0]
    out = _timed_runs(run, opts)
    forwards[0] = 0
    run(opts.new_tokens)
    return {"load_s": load, **out, "forwards": forwards[0], "prompt_len": len(prompt)}


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
    ids = torch.tensor([_workload_prompt(preset(shape).vocab_size, opts)])

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
    p.add_argument("--workloads", default="random,quote", help="comma list of random,quote (quote needs random)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--draft-tokens", type=int, default=6, help="speculative (prompt lookup) drafts per forward")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    p.add_argument("--workload", default="random", help=argparse.SUPPRESS)
    p.add_argument("--answer", default="", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        quiet_bitsandbytes()
        emit(
            opts.child, {"ours": child_ours, "hf": child_hf}[opts.child](opts.shape, opts.quant, Path(opts.ckpt), opts)
        )
        return
    workloads = opts.workloads.split(",")
    if "quote" in workloads and workloads[0] != "random":
        p.error("--workloads: quote quotes the random workload's answer, so random must come first")

    session = Session(f"generate-{opts.shape}", __file__, timeout=opts.timeout)
    ckpt, _ = session.synthetic_checkpoint(opts.shape)
    base_args = cli_args(
        shape=opts.shape, prompt_tokens=opts.prompt_tokens, new_tokens=opts.new_tokens, repeat=opts.repeat, ckpt=ckpt
    )
    impls = (("plain", "ours", 0), ("spec", "ours", opts.draft_tokens), ("hf", "hf", 0))
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for quant in opts.quants.split(","):
        answer = ""
        for workload in workloads:
            for name, child, draft in impls:
                args = base_args + cli_args(quant=quant, workload=workload, draft_tokens=draft, answer=answer)
                r = session.spawn(child, args, f"{name}-{quant}-{workload}")
                results[f"{name}/{quant}/{workload}"] = r
                speed = f"{opts.new_tokens / min(r['runs_s']):.2f} tokens/s" if r["status"] == "ok" else r["error"]
                print(f"{name:5s} {quant:5s} {workload:6s} {speed} (load {os.getloadavg()[0]:.2f})", flush=True)
            if workload == "random" and results[f"plain/{quant}/random"]["status"] == "ok":
                answer = ",".join(str(t) for t in results[f"plain/{quant}/random"]["tokens"])
    load_after = os.getloadavg()

    lines = [
        f"Greedy generation, {opts.shape} shape (random weights), batch 1, {opts.prompt_tokens}-token random prompt "
        f"(quote: prompt + our greedy answer + prompt), {opts.new_tokens} new tokens, best of {opts.repeat}, "
        f"speculative with up to {opts.draft_tokens} prompt-lookup drafts; {os.cpu_count()} cores; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (each process alone, one after the other).",
        "",
        "| quant | workload | plain tokens/s | speculative tokens/s | HF tokens/s | spec / HF | plain / HF "
        "| spec / plain | tokens per forward | spec == plain | CPU s per token plain / spec / HF |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for quant in opts.quants.split(","):
        for workload in workloads:
            trio = [results.get(f"{n}/{quant}/{workload}", {"status": "missing"}) for n, _, _ in impls]
            ts = [opts.new_tokens / min(r["runs_s"]) if r["status"] == "ok" else None for r in trio]
            cell = [f"{t:.2f}" if t else r["status"] for t, r in zip(ts, trio)]
            ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
            spec = trio[1]
            per_fwd = f"{len(spec['tokens']) / max(spec['forwards'], 1):.2f}" if spec["status"] == "ok" else "-"
            same = agreement(trio[1].get("tokens"), trio[0].get("tokens"))
            cpu = " / ".join(f"{min(r['cpu_s']) / opts.new_tokens:.3f}" if r["status"] == "ok" else "-" for r in trio)
            lines.append(
                f"| {quant} | {workload} | {cell[0]} | {cell[1]} | {cell[2]} | {ratio(ts[1], ts[2])} | "
                f"{ratio(ts[0], ts[2])} | {ratio(ts[1], ts[0])} | {per_fwd} | {same} | {cpu} |"
            )
    table = "\n".join(lines)
    print("\n" + table)
    session.save(
        f"generation speed: {opts.shape}",
        table,
        {"opts": vars(opts), "loadavg": [load_before, load_after], "results": results},
    )


if __name__ == "__main__":
    main()
