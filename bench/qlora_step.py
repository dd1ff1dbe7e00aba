"""One QLoRA training step: peak memory and tokens/s, ours against Hugging Face transformers + peft.

    python bench/qlora_step.py                       # 1.1B shape, seq 256, batch 1, 1 warm-up + 3 timed steps
    python bench/qlora_step.py --shape tiny          # smoke test
    python bench/qlora_step.py --flows ours --steps 5 --checkpointing

One fresh process per flow, same step on both sides: nf4 base with double quantization and bf16 compute, LoRA
r16 / alpha 32 / dropout 0.05 on all seven projections (configs/lora_r16.json), fp32 adapter weights, AdamW,
bf16 autocast, next-token loss over the whole random sequence, backward, optimizer step.
  ours  build_model(preset(shape) + LoRA r16, None, quant="4bit", dtype=bf16) (seeded random init, no
        checkpoint), util.train's pieces: upcast_trainable_, param_groups, token_loss, clip_grad_norm_.
  hf    AutoModelForCausalLM.from_pretrained(<random bf16 checkpoint of the shape>, BitsAndBytesConfig(nf4, double
        quant, bf16 compute)) + peft get_peft_model(LoraConfig(r=16, alpha=32, dropout=0.05, 7 projections)).
        The checkpoint is /tmp/lazyllama-bench/<shape> if bench/build_memory.py wrote it, else written once to
        /tmp/lazyllama-bench/qlora-<shape> (util.checkpoint.write_hf_checkpoint, tensor by tensor).
Reported per flow: build seconds, RSS after the build, peak RSS over the steps (VmHWM reset after the build;
CUDA: max allocated), median step seconds and tokens/s (batch x seq / step). The machine may be shared: the load
average is recorded; compare flows of one run. Results go to bench/results/ (gitignored) as JSON and markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CACHE = Path("/tmp/lazyllama-bench")
MARKER = "BENCH_COMPLETE.json"
LORA = json.loads((REPO / "configs" / "lora_r16.json").read_text())
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _tokens(vocab: int, batch: int, seq: int):
    import torch

    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _time_steps(step, n_steps: int, device) -> dict:
    """One warm-up step, then n timed ones; memory peak over the steps only."""
    import torch

    step()
    _reset_hwm()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        "step_s": times, "loss": loss, "peak_rss_steps": _status_kib("VmHWM") * 1024,
        "peak_cuda_steps": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
    }  # fmt: skip


def child_ours(opts) -> dict:
    import torch

    from model.args import preset
    from util.build import build_model
    from util.train import clip_grad_norm_, enable_activation_checkpointing, param_groups, token_loss, upcast_trainable_

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = preset(opts.shape, max_seq_len=max(opts.seq, 16), **LORA)
    t0 = time.perf_counter()
    model, _ = build_model(args, None, quant="4bit", dtype=torch.bfloat16, device=device)
    build_s = time.perf_counter() - t0
    upcast_trainable_(model)
    if opts.checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    params = [(p, None) for p in model.parameters() if p.requires_grad]
    tokens = _tokens(args.vocab_size, opts.batch, opts.seq).to(device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(tokens)
        loss_sum, n = token_loss(logits, tokens)
        (loss_sum / n).backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss_sum) / n

    rss_after_build = _status_kib("VmRSS") * 1024
    trainable = sum(p.numel() for p, _ in params)
    return {"build_s": build_s, "rss_after_build": rss_after_build, "trainable": trainable,
            **_time_steps(step, opts.steps, device)}  # fmt: skip


def child_hf(opts) -> dict:
    try:
        import peft
        import transformers
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError as e:
        return {"status": "not installed", "error": f"{e}; pip install transformers peft (check that torch stays)"}
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    dtype_kw = {"dtype": torch.bfloat16} if int(transformers.__version__.split(".")[0]) >= 5 else {
        "torch_dtype": torch.bfloat16}  # fmt: skip
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        opts.ckpt, quantization_config=qconfig, device_map=str(device), local_files_only=True, **dtype_kw
    )
    config = peft.LoraConfig(r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                             target_modules=TARGETS, task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, config)
    build_s = time.perf_counter() - t0
    if opts.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    for p in trainable_params:  # fp32 adapter weights, as ours
        p.data = p.data.float()
    opt = torch.optim.AdamW(trainable_params, lr=1e-4, weight_decay=0.0)
    tokens = _tokens(model.config.vocab_size, opts.batch, opts.seq).to(device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    rss_after_build = _status_kib("VmRSS") * 1024
    return {"build_s": build_s, "rss_after_build": rss_after_build, "trainable": sum(p.numel() for p in
            trainable_params), "transformers": transformers.__version__, "peft": peft.__version__,
            **_time_steps(step, opts.steps, device)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------


def hf_checkpoint(shape: str) -> Path:
    """A random bf16 HF checkpoint of the shape: build_memory.py's if present, else written here once."""
    from model.args import preset

    args = preset(shape)
    want = {"hidden_size": args.dim, "num_hidden_layers": args.n_layers, "intermediate_size": args.hidden_dim,
            "vocab_size": args.vocab_size, "num_key_value_heads": args.n_kv_heads}  # fmt: skip
    for ckpt in (CACHE / shape, CACHE / f"qlora-{shape}"):
        if (ckpt / MARKER).is_file() and (ckpt / "config.json").is_file():
            config = json.loads((ckpt / "config.json").read_text())
            if all(config.get(k) == v for k, v in want.items()):
                return ckpt
    ckpt = CACHE / f"qlora-{shape}"
    print(f"writing a random bf16 checkpoint of the {shape} shape to {ckpt} (once)", flush=True)
    subprocess.run([sys.executable, __file__, "--child", "write", "--shape", shape, "--ckpt", str(ckpt)], check=True)
    return ckpt


def child_write(opts) -> dict:
    import torch

    from model.args import preset
    from tests.helpers import params_of
    from util.checkpoint import write_hf_checkpoint

    args = preset(opts.shape)
    hd = args.head_dim
    shapes = [("tok_embeddings.weight", (args.vocab_size, args.dim))]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes += [
            (p + "attention.wq.weight", (args.n_heads * hd, args.dim)),
            (p + "attention.wk.weight", (args.n_kv_heads * hd, args.dim)),
            (p + "attention.wv.weight", (args.n_kv_heads * hd, args.dim)),
            (p + "attention.wo.weight", (args.dim, args.n_heads * hd)),
            (p + "feed_forward.w1.weight", (args.hidden_dim, args.dim)),
            (p + "feed_forward.w2.weight", (args.dim, args.hidden_dim)),
            (p + "feed_forward.w3.weight", (args.hidden_dim, args.dim)),
            (p + "attention_norm.weight", (args.dim,)),
            (p + "ffn_norm.weight", (args.dim,)),
        ]
    shapes += [("norm.weight", (args.dim,)), ("output.weight", (args.vocab_size, args.dim))]

    def tensors():
        for i, (key, shape) in enumerate(shapes):
            if len(shape) == 1:
                yield key, torch.ones(shape, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(i)
                yield key, torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)

    ckpt = Path(opts.ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    params = {**params_of(args), "ffn_hidden_dim": args.hidden_dim}
    write_hf_checkpoint(ckpt, tensors(), params=params, max_shard_bytes=1 << 30)
    (ckpt / MARKER).write_text(json.dumps({"shape": opts.shape}))
    return {}


def run_child(flow: str, opts) -> dict:
    cmd = [sys.executable, __file__, "--child", flow, "--shape", opts.shape, "--seq", str(opts.seq),
           "--batch", str(opts.batch), "--steps", str(opts.steps), "--ckpt", str(opts.ckpt)]  # fmt: skip
    if opts.checkpointing:
        cmd.append("--checkpointing")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "error": proc.stderr[-3000:]}
    return {"status": "ok", **json.loads(lines[-1])}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(results: dict, opts) -> str:
    rows = [
        f"QLoRA step, {opts.shape} shape, batch {opts.batch} x seq {opts.seq}, {opts.steps} timed steps after 1 "
        f"warm-up, activation checkpointing {'on' if opts.checkpointing else 'off'}; load average "
        f"{os.getloadavg()[0]:.1f}",
        "",
        "| flow | build s | RSS after build | peak RSS in steps | peak CUDA | step s (median) | tokens/s | trainable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for flow, r in results.items():
        if r.get("status") != "ok":
            rows.append(f"| {flow} | {r.get('status')}: {r.get('error', '')[-200:].strip()!r} |||||||")
            continue
        step = statistics.median(r["step_s"])
        rows.append(
            f"| {flow} | {r['build_s']:.1f} | {_gib(r['rss_after_build'])} | {_gib(r['peak_rss_steps'])} | "
            f"{_gib(r['peak_cuda_steps']) if r['peak_cuda_steps'] else '-'} | {step:.2f} | "
            f"{opts.batch * opts.seq / step:.1f} | {r['trainable']:,} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.1B")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--flows", default="ours,hf")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--ckpt", default=None, help="HF checkpoint for the hf flow (default: a cached random one)")
    ap.add_argument("--child", choices=["ours", "hf", "write"], help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        print(json.dumps({"ours": child_ours, "hf": child_hf, "write": child_write}[opts.child](opts)), flush=True)
        return 0
    flows = opts.flows.split(",")
    if "hf" in flows and opts.ckpt is None:
        opts.ckpt = str(hf_checkpoint(opts.shape))
    results = {}
    for flow in flows:
        print(f"running {flow} ...", flush=True)
        results[flow] = run_child(flow, opts)
    md = table(results, opts)
    print(md)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"qlora-step-{opts.shape}-{stamp}.md").write_text(md + "\n")
    (out / f"qlora-step-{opts.shape}-{stamp}.json").write_text(json.dumps({"opts": vars(opts), **results}, indent=1))
    return 0 if all(r.get("status") in ("ok", "not installed") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
