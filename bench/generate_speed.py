"""Greedy generation speed: util.generate (our KV cache, plain and speculative) against Hugging Face transformers'
`generate` (plain and with prompt lookup), same weights, batch 1.

    OMP_NUM_THREADS=1 python bench/generate_speed.py --weights hand-built --workloads chat,random --max-answer 48
    python bench/generate_speed.py --shape tiny             # smoke test with random weights (~1 min, mostly imports)
    python bench/generate_speed.py --quants 4bit --workloads random,quote --draft-tokens 6

1. Weights (--weights):
     random      bench/harness.py's synthetic bf16 checkpoint of --shape (random normal std 0.02, Hugging Face format),
                 shared with the other benches (/tmp/lazyllama-bench/<shape>). Its answers never repeat the prompt,
                 so it measures only what speculative decoding costs when no draft is accepted.
     copy-model  bench/copy_model.py's small model trained to quote its prompt, grafted exactly into the 1.1B shape
                 (trained, ~12 min, the first time; cached in /tmp/lazyllama-bench/copy-model-1.1B): the 1.1B's real
                 per-forward cost, with the acceptance of a model whose answers quote the prompt.
     hand-built  copy_model.py --hand-built: an induction circuit set by hand (no training; it quotes and loops, an
                 upper bound on acceptance), grafted the same way (/tmp/lazyllama-bench/copy-model-hand-1.1B).
     PATH        a folder laid out like copy-model's (config.json, safetensors, prompts.json).
2. Workloads (--workloads): random - a --prompt-tokens prompt of random in-vocabulary ids, --new-tokens tokens forced
   (no end token); chat - copy-model's held-out prompts (summaries quoting sentences, code edits), each answered until
   its end token (at most --max-answer tokens), totals over all prompts; quote (random weights) - the random prompt,
   our plain greedy answer to it, then the random prompt again.
3. One fresh process per (implementation, quant), all workloads and variants in it, interleaved per repeat:
     ours  build_model(None, [checkpoint], quant=...), prepare_for_inference, util.generate.generate: plain (draft 0)
           and speculative with each --draft-tokens length (the first one is the headline: demo.py's default 6);
     hf    AutoModelForCausalLM.from_pretrained (bf16, + BitsAndBytesConfig nf4/double quant/bf16 compute for 4-bit),
           model.generate(do_sample=False): plain and with prompt_lookup_num_tokens=--hf-lookup (for reference).
   A short warm-up per variant, then --repeat timed passes; tokens/s = new tokens / wall seconds of the pass (prompts
   included), best pass; CPU seconds per token; forwards per token (model forward calls, prefills included); for
   ours, drafted tokens accepted per verify forward that carried a draft.
   "spec == plain": prompts whose speculative tokens equal plain greedy's (exactness on this model); "exact": chat
   answers equal to the expected quote / edit.
4. A markdown table is printed and saved with the raw JSON under bench/results/ (gitignored).

The machine may be shared: the load average is printed after each process and recorded before and after; compare runs
made close together. OMP_NUM_THREADS=1: at a load near the core count, two torch threads spin-wait and run far slower.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import CACHE, Session, cli_args, emit, hf_from_pretrained_kwargs, hf_not_installed, quiet_bitsandbytes

EOS = 2  # LLaMA's sentencepiece eos (copy-model's tokenizer keeps it)


# --- workloads (children) ---


def _random_prompt(vocab_size: int, n: int) -> list[int]:
    import torch

    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def workload_items(workload: str, opts, vocab_size: int, plain_answer: list[int] | None) -> list[dict]:
    """The prompts of a workload: {prompt, max_new, eos (stop at the end token?), expected (chat)}."""
    if workload == "chat":
        if not opts.prompts:
            raise SystemExit("--workloads chat needs --weights copy-model or a folder with prompts.json")
        prompts = json.loads(Path(opts.prompts).read_text())["prompts"]
        return [
            {"prompt": p["prompt_ids"], "max_new": opts.max_answer, "eos": True, "expected": p["answer_ids"][:-1]}
            for p in prompts
        ]
    p = _random_prompt(vocab_size, opts.prompt_tokens)
    if workload == "quote":  # a context whose continuation repeats text already in it
        if plain_answer is None:
            raise SystemExit("--workloads quote needs random first (it quotes the random workload's answer)")
        p = p + plain_answer + p
    elif workload != "random":
        raise SystemExit(f"--workloads: unknown workload {workload!r} (random, chat, quote)")
    return [{"prompt": p, "max_new": opts.new_tokens, "eos": False, "expected": None}]


def run_variants(variants: dict, workloads: list[str], opts, vocab_size: int, forwards: list[int], stats=None) -> dict:
    """For each workload: a warm-up per variant, then --repeat passes over its prompts with the variants interleaved.
    variants: name -> generate(prompt, max_new, eos) -> tokens. Returns {workload: {variant: record}}."""
    out: dict = {}
    for workload in workloads:
        # quote: our plain answer to the random prompt (the parent passes it to the hf child: the same prompt)
        answer = [int(t) for t in opts.answer.split(",")] if opts.answer else None
        answer = answer or (out.get("random", {}).get("plain", {}).get("tokens") or [None])[0]
        items = workload_items(workload, opts, vocab_size, answer)
        recs = {name: {"runs_s": [], "cpu_s": [], "forwards": [], "tokens": None} for name in variants}
        for gen in variants.values():
            gen(items[0]["prompt"], 4, False)  # warm-up
        prefill: list[float] = []
        first = next(iter(variants.values()))
        for _ in range(opts.repeat):
            # the prompts' prefill + first token alone (the same forward for every variant): decode rates leave it out
            t0 = time.perf_counter()
            for it in items:
                first(it["prompt"], 1, False)
            prefill.append(time.perf_counter() - t0)
            for name, gen in variants.items():
                if stats is not None:
                    stats.clear()
                forwards[0] = 0
                t0, c0 = time.perf_counter(), time.process_time()
                tokens = [gen(it["prompt"], it["max_new"], it["eos"]) for it in items]
                recs[name]["runs_s"].append(time.perf_counter() - t0)
                recs[name]["cpu_s"].append(time.process_time() - c0)
                recs[name]["forwards"].append(forwards[0])
                recs[name]["tokens"] = tokens
                if stats is not None:
                    recs[name]["drafts"] = dict(stats)
        for rec in recs.values():
            rec["n_tokens"] = sum(len(t) for t in rec["tokens"])
            rec["prefill_s"] = min(prefill)
            if items[0]["expected"] is not None:
                rec["exact"] = sum(t == it["expected"] for t, it in zip(rec["tokens"], items))
            rec["n_prompts"] = len(items)
        out[workload] = recs
    return out


# --- children ---


def child_ours(quant: str, ckpt: Path, opts) -> dict:
    import torch

    import util.speculative as speculative
    from util.build import build_model
    from util.generate import SamplingParams, generate
    from util.quant import prepare_for_inference

    t0 = time.perf_counter()
    model, _ = build_model(None, [ckpt], quant=None if quant == "none" else quant, dtype=torch.bfloat16)
    load = time.perf_counter() - t0
    prepare_for_inference(model)  # as demo.py serves: eval mode, 4-bit repacked for the AVX512-BF16 CPU kernel
    forwards, stats = [0], {}
    real_forward, real_verify = model.forward, speculative.verify

    def counted(*a, **k):
        forwards[0] += 1
        return real_forward(*a, **k)

    def verify(logits, draft, *a, **k):  # drafted tokens offered and accepted, per verify forward with a draft
        out = real_verify(logits, draft, *a, **k)
        if draft:
            stats["drafting_forwards"] = stats.get("drafting_forwards", 0) + 1
            stats["proposed"] = stats.get("proposed", 0) + len(draft)
            stats["accepted"] = stats.get("accepted", 0) + len(out) - 1
        return out

    model.forward, speculative.verify = counted, verify

    def variant(draft: int):
        def gen(prompt: list[int], n: int, eos: bool) -> list[int]:
            params = SamplingParams(max_new_tokens=n, draft_tokens=draft)
            return generate(model, [prompt], params, eos_id=EOS if eos else None)[0]

        return gen

    variants = {"plain": variant(0), **{f"spec{d}": variant(d) for d in opts.draft_tokens}}
    vocab = opts.vocab_size or model.args.vocab_size
    return {"load_s": load, "workloads": run_variants(variants, opts.workloads, opts, vocab, forwards, stats)}


def child_hf(quant: str, ckpt: Path, opts) -> dict:
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return hf_not_installed(e)
    import torch

    try:
        kwargs = hf_from_pretrained_kwargs(quant)
    except ValueError as e:
        return {"status": "unsupported", "error": str(e)}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), device_map="cpu", **kwargs)
    load = time.perf_counter() - t0
    model.eval()
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    def variant(lookup: int):
        def gen(prompt: list[int], n: int, eos: bool) -> list[int]:
            ids = torch.tensor([prompt])
            extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=0 if eos else n,
                    do_sample=False,
                    eos_token_id=EOS,
                    pad_token_id=0,
                    **extra,
                )
            tokens = out[0, ids.shape[1] :].tolist()
            return tokens[:-1] if eos and tokens and tokens[-1] == EOS else tokens

        return gen

    variants = {"plain": variant(0), f"lookup{opts.hf_lookup}": variant(opts.hf_lookup)}
    vocab = opts.vocab_size or model.config.vocab_size
    return {
        "load_s": load,
        "workloads": run_variants(variants, opts.workloads, opts, vocab, forwards),
        "transformers": transformers.__version__,
    }


# --- parent ---


def resolve_weights(opts) -> tuple[Path, str, Path | None, int | None]:
    """(checkpoint folder, a description, prompts.json or None, in-vocabulary size for random prompts or None)."""
    if opts.weights == "random":
        session = Session(f"generate-{opts.shape}", __file__, timeout=opts.timeout)
        ckpt, _ = session.synthetic_checkpoint(opts.shape)
        return ckpt, f"{opts.shape} shape, random weights", None, None
    if opts.weights in ("copy-model", "hand-built"):
        # trains (once, <= 14 min) or builds, and grafts, when the cache is missing; reuses it otherwise
        hand = ["--hand-built"] if opts.weights == "hand-built" else []
        subprocess.run([sys.executable, str(Path(__file__).with_name("copy_model.py")), *hand], check=True)
        ckpt = CACHE / ("copy-model-hand-1.1B" if hand else "copy-model-1.1B")
    else:
        ckpt = Path(opts.weights)
    prompts = ckpt / "prompts.json"
    if not prompts.is_file():
        raise SystemExit(f"--weights {ckpt}: no prompts.json there (write one with bench/copy_model.py)")
    vocab = json.loads(prompts.read_text()).get("small_vocab_size")
    what = "a hand-built copier (induction circuit)" if "hand" in ckpt.name else "a small model trained to quote"
    return ckpt, f"{ckpt.name}: {what}, grafted exactly into the 1.1B shape", prompts, vocab


def fmt_rate(rec: dict | None) -> float | None:
    """New tokens per second of the best pass, prompts' prefill included."""
    return rec["n_tokens"] / min(rec["runs_s"]) if rec else None


def decode_rate(rec: dict | None) -> float | None:
    """Tokens after each prompt's first per second after it: the best pass less the prompts' prefill and first token
    (timed alone), so a long prompt's prefill (the same work for every variant) does not dilute the decoding."""
    if not rec or min(rec["runs_s"]) <= rec["prefill_s"]:
        return None
    return (rec["n_tokens"] - rec["n_prompts"]) / (min(rec["runs_s"]) - rec["prefill_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="random", help="random, copy-model, hand-built, or a folder with prompts.json")
    p.add_argument("--shape", default="1.1B", help="model.args preset of the random weights (tiny: smoke test)")
    p.add_argument("--quants", default="4bit,none", help="comma list of none,4bit")
    p.add_argument(
        "--workloads",
        default=None,
        help="comma list of random,chat,quote (default: chat,random with copy-model, random,quote with random weights)",
    )
    p.add_argument("--prompt-tokens", type=int, default=32, help="random workload: prompt length")
    p.add_argument("--new-tokens", type=int, default=64, help="random workload: tokens generated")
    p.add_argument("--max-answer", type=int, default=160, help="chat workload: most tokens per answer")
    p.add_argument("--draft-tokens", default="6,4,10", help="speculative draft lengths (the first is the headline)")
    p.add_argument("--hf-lookup", type=int, default=10, help="Hugging Face prompt_lookup_num_tokens (reference)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--vocab-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--answer", default="", help=argparse.SUPPRESS)
    opts = p.parse_args()
    opts.workloads = (opts.workloads or ("random,quote" if opts.weights == "random" else "chat,random")).split(",")
    opts.draft_tokens = [int(d) for d in str(opts.draft_tokens).split(",") if int(d) > 0]
    if opts.child:
        quiet_bitsandbytes()
        emit(opts.child, {"ours": child_ours, "hf": child_hf}[opts.child](opts.quant, Path(opts.ckpt), opts))
        return
    w = opts.workloads
    if "quote" in w and ("random" not in w or w.index("quote") < w.index("random")):
        p.error("--workloads: quote quotes the random workload's answer, so random must come before it")

    ckpt, described, prompts, vocab = resolve_weights(opts)
    session = Session(
        f"generate-{opts.weights if opts.weights != 'random' else opts.shape}", __file__, timeout=opts.timeout
    )
    base = cli_args(
        ckpt=ckpt,
        prompts=prompts,
        vocab_size=vocab,
        workloads=",".join(opts.workloads),
        prompt_tokens=opts.prompt_tokens,
        new_tokens=opts.new_tokens,
        max_answer=opts.max_answer,
        draft_tokens=",".join(map(str, opts.draft_tokens)) or "0",
        hf_lookup=opts.hf_lookup,
        repeat=opts.repeat,
    )
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    quants = opts.quants.split(",")
    for quant in quants:
        answer = None
        for child in ("ours", "hf"):
            r = session.spawn(child, base + cli_args(quant=quant, answer=answer), f"{child}-{quant}")
            if child == "ours" and "quote" in opts.workloads and r["status"] == "ok":
                answer = ",".join(map(str, r["workloads"]["random"]["plain"]["tokens"][0]))
            r["loadavg_after"] = os.getloadavg()[0]
            results[f"{child}/{quant}"] = r
            print(f"{child} {quant}: {r['status']} (load {r['loadavg_after']:.2f})", flush=True)
    load_after = os.getloadavg()
    table = report(opts, described, quants, results, load_before, load_after)
    print("\n" + table)
    session.save(
        f"generation speed: {described}",
        table,
        {"opts": vars(opts), "loadavg": [load_before, load_after], "results": results},
    )


def report(opts, described: str, quants: list[str], results: dict, load_before, load_after) -> str:
    head = f"spec{opts.draft_tokens[0]}" if opts.draft_tokens else None
    lookup = f"lookup{opts.hf_lookup}"
    lines = [
        f"Greedy generation, {described}; batch 1; workloads: chat = held-out prompts answered until the end token "
        f"(at most {opts.max_answer}), random = {opts.prompt_tokens} random in-vocabulary ids then {opts.new_tokens} "
        f"forced tokens; best of {opts.repeat}; {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} "
        "after (load after each process in the last column).",
        "",
        "| quant | workload | tokens/s: ours plain / ours spec / HF / HF lookup | decode tokens/s (after prefill): "
        "ours plain / ours spec / HF / HF lookup | spec / HF: tokens/s, decode | spec / plain: decode "
        "| accepted per drafting forward (accepted/drafted) | forwards per token: plain / spec / HF / HF lookup "
        "| spec == plain | exact answers plain / spec / HF | CPU s per token plain / spec / HF | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    extra = []
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    cell = lambda r: f"{r:.2f}" if r else "-"  # noqa: E731
    for quant in quants:
        ours, hf = results.get(f"ours/{quant}", {}), results.get(f"hf/{quant}", {})
        for workload in opts.workloads:
            o = ours.get("workloads", {}).get(workload, {}) if ours.get("status") == "ok" else {}
            h = hf.get("workloads", {}).get(workload, {}) if hf.get("status") == "ok" else {}
            cols = [o.get("plain"), o.get(head), h.get("plain"), h.get(lookup)]
            rates, dec = [fmt_rate(c) for c in cols], [decode_rate(c) for c in cols]
            d = (cols[1] or {}).get("drafts", {})
            acc = f"{d['accepted'] / d['drafting_forwards']:.2f} ({d['accepted']}/{d['proposed']})" if d else "-"
            fpt = " / ".join(f"{c['forwards'][-1] / max(c['n_tokens'], 1):.2f}" if c else "-" for c in cols)
            same = "-"
            if cols[0] and cols[1]:
                same = f"{sum(a == b for a, b in zip(cols[0]['tokens'], cols[1]['tokens']))}/{cols[0]['n_prompts']}"
            exact = " / ".join(f"{c['exact']}/{c['n_prompts']}" if c and "exact" in c else "-" for c in cols[:3])
            cpu = " / ".join(f"{min(c['cpu_s']) / max(c['n_tokens'], 1):.3f}" if c else "-" for c in cols[:3])
            load = " / ".join(f"{r.get('loadavg_after', 0):.1f}" for r in (ours, hf))
            lines.append(
                f"| {quant} | {workload} | {' / '.join(map(cell, rates))} | {' / '.join(map(cell, dec))} "
                f"| {ratio(rates[1], rates[2])}, {ratio(dec[1], dec[2])} | {ratio(dec[1], dec[0])} | {acc} | {fpt} "
                f"| {same} | {exact} | {cpu} | {load} |"
            )
            for dt in opts.draft_tokens:
                c = o.get(f"spec{dt}")
                if not c:
                    continue
                d = c.get("drafts", {})
                acc = f"{d['accepted'] / d['drafting_forwards']:.2f}" if d else "-"
                extra.append(
                    f"| {quant} | {workload} | {dt} | {cell(fmt_rate(c))} | {cell(decode_rate(c))} "
                    f"| {ratio(decode_rate(c), dec[0])} | {ratio(decode_rate(c), dec[2])} | {acc} "
                    f"| {c['forwards'][-1] / max(c['n_tokens'], 1):.2f} |"
                )
    if extra:
        lines += [
            "",
            "| quant | workload | draft tokens | ours spec tokens/s | decode tokens/s | decode / ours plain "
            "| decode / HF | accepted per drafting forward | forwards per token |",
            "|---|---|---|---|---|---|---|---|---|",
            *extra,
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
