"""One QLoRA training step: peak memory and tokens/s, ours against Hugging Face transformers + peft and torchtune.

    python bench/qlora_step.py                       # 1.1B shape, seq 256, batch 1, 1 warm-up + 3 timed steps
    python bench/qlora_step.py --shape tiny          # smoke test
    python bench/qlora_step.py --flows ours --steps 5 --checkpointing
    python bench/qlora_step.py --shape llama3.2-1B --seq 1024 --flows ours,ours-plain,hf   # 128k vocabulary

One fresh process per flow, same step on both sides: nf4 base with double quantization and bf16 compute, LoRA
r16 / alpha 32 / dropout 0.05 on all seven projections (configs/lora_r16.json), fp32 adapter weights, AdamW,
bf16 autocast, next-token loss over the whole random sequence, backward, optimizer step.
  ours  build_model(preset(shape) + LoRA r16, None, quant="4bit", dtype=bf16) (seeded random init, no
        checkpoint), util.train's pieces: upcast_trainable_, param_groups, the chunked loss (util.loss),
        clip_grad_norm_. ours-plain: the same with the loss from the full logits.
  hf    AutoModelForCausalLM.from_pretrained(<random bf16 checkpoint of the shape>, BitsAndBytesConfig(nf4, double
        quant, bf16 compute)) + peft get_peft_model(LoraConfig(r=16, alpha=32, dropout=0.05, 7 projections)).
        The checkpoint is bench/harness.py's synthetic one, /tmp/lazyllama-bench/<shape> (shared with
        bench/build_memory.py; written once, tensor by tensor, if missing).
  torchtune, torchtune-fp32   torchtune's lora_llama2(quantize_base=True) (torchao NF4) built on meta as its
        distributed recipe, in the environment of --torchtune-python (bench/README.md): child_torchtune says more.
Reported per flow: build seconds, RSS after the build, peak RSS over the steps (VmHWM reset after the build;
CUDA: max allocated), median step seconds and tokens/s (batch x seq / step). The machine may be shared: the load
average is recorded; compare flows of one run. Results go to bench/results/ (gitignored) as JSON and markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from harness import (
    REPO,
    Session,
    cli_args,
    emit,
    hf_from_pretrained_kwargs,
    hf_not_installed,
    hwm,
    quiet_bitsandbytes,
    reset_hwm,
    rss,
)

LORA = json.loads((REPO / "configs" / "lora_r16.json").read_text())
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def _tokens(vocab: int, batch: int, seq: int):
    import torch

    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _profile_step(step, rows: int) -> str:
    """One more step under torch.profiler: the operators that took the most CPU time, as a table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _saved_tensors(step, rows: int) -> dict:
    """One more step with autograd's saved-tensor hooks: the bytes that forward keeps for backward (each storage
    once; parameters and views of them left out: they stay resident anyway), in total, by dtype and by the
    largest (shape, dtype) groups. Tensor subclasses (torchao's NF4) count their own storage where they have one."""
    import collections

    import torch

    seen: dict[tuple, int] = {}
    groups: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    by_dtype: collections.Counter = collections.Counter()
    params = 0

    def pack(t):
        nonlocal params
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter):
            params += 1
            return t
        try:
            storage = t.untyped_storage()
            key, nbytes = (storage.data_ptr(), storage.device.type), storage.nbytes()
        except (NotImplementedError, RuntimeError):  # a subclass without one storage
            key, nbytes = (id(t), "subclass"), t.numel() * t.element_size()
        if key not in seen:
            seen[key] = nbytes
            group = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
            groups[group] += nbytes
            counts[group] += 1
            by_dtype[group[1]] += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return {
        "saved_bytes": sum(seen.values()),
        "saved_tensors": len(seen),
        "saved_params_skipped": params,
        "saved_by_dtype": dict(by_dtype),
        "saved_top": [[list(g[0]), g[1], counts[g], b] for g, b in groups.most_common(rows)],
    }


def _time_steps(step, n_steps: int, device, profile_rows: int = 0, saved_rows: int = 0) -> dict:
    """One warm-up step, then n timed ones; memory peak over the steps only; then, with profile_rows, one
    profiled step (not timed)."""
    import torch

    step()
    peak_before = hwm()  # the build's and the warm-up's
    reset_hwm()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loads = [], []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])  # the 1-minute load as the step ends: a shared machine's steps differ
    peak_cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    steps = hwm()
    profiled = {"profile": _profile_step(step, profile_rows)} if profile_rows else {}
    if saved_rows:
        profiled.update(_saved_tensors(step, saved_rows))
    return {
        **profiled,
        "step_s": times,
        "load_1m": loads,
        "loss": loss,
        "peak_rss_steps": steps,
        # the whole process's, the profiled / tallied extra step included (the hooks' bookkeeping adds a little):
        # the parent compares its own sampled peak with this one
        "peak_rss": max(peak_before, hwm()),
        "peak_cuda_steps": peak_cuda,
    }


def child_ours(opts) -> dict:
    import torch

    from model.args import preset
    from util.build import build_model
    from util.loss import model_token_loss
    from util.train import clip_grad_norm_, enable_activation_checkpointing, param_groups, upcast_trainable_

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
        with torch.autocast(device.type, dtype=torch.bfloat16):  # as util.train: chunked loss unless ours-plain
            loss_sum, n = model_token_loss(model, model, tokens, tokens, chunked=opts.child == "ours")
        (loss_sum / n).backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss_sum) / n

    rss_after_build = rss()
    trainable = sum(p.numel() for p, _ in params)
    return {
        "build_s": build_s,
        "rss_after_build": rss_after_build,
        "trainable": trainable,
        **_time_steps(step, opts.steps, device, opts.profile, opts.saved),
    }


def child_hf(opts) -> dict:
    try:
        import peft
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return hf_not_installed(e)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(opts.ckpt, device_map=str(device), **hf_from_pretrained_kwargs("4bit"))
    config = peft.LoraConfig(
        r=LORA["lora_rank"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )
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

    trainable = sum(p.numel() for p in trainable_params)
    return {
        "build_s": build_s,
        "rss_after_build": rss(),
        "trainable": trainable,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        **_time_steps(step, opts.steps, device, opts.profile, opts.saved),
    }


TORCHTUNE_CHUNKS = 8  # torchtune's recipes: CEWithChunkedOutputLoss, 8 output chunks


def child_torchtune(opts) -> dict:
    """torchtune's QLoRA step, built the way its lora_finetune_distributed recipe builds (the single-device recipe
    builds on the device itself): lora_llama2(quantize_base=True) under set_default_dtype(bf16) on meta, the
    adapters to_empty + initialize_parameters, rope_init, then each base weight filled from a full bf16 tensor
    (seeded random normal std 0.02, norms ones: the recipe's load_from_full_model_state_dict, to_nf4 for NF4
    weights, assign=True). `torchtune`: the recipe's step (bf16 model and adapters, no autocast, chunked CE loss);
    `torchtune-fp32`: fp32 adapters under bf16 autocast, as ours and hf."""
    try:
        import torchao
        import torchtune
        from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
        from torchtune import modules, training
        from torchtune.models.llama2._component_builders import lora_llama2
        from torchtune.modules.loss import CEWithChunkedOutputLoss
        from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params
    except ImportError as e:
        return {
            "status": "not installed",
            "error": f"{e} (with {sys.executable}); make the torchtune environment (bench/README.md) and pass "
            "--torchtune-python /path/to/that/venv/bin/python",
        }
    import contextlib

    import torch

    from model.args import preset

    device = torch.device("cpu")  # this machine's; the NF4 path is torchao's pure-PyTorch one either way
    args = preset(opts.shape, max_seq_len=max(opts.seq, 16))
    fp32_adapters = opts.child == "torchtune-fp32"
    t0 = time.perf_counter()
    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = lora_llama2(
            lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            apply_lora_to_output=False,  # ours and hf leave the head frozen and unadapted too
            vocab_size=args.vocab_size,
            num_layers=args.n_layers,
            num_heads=args.n_heads,
            num_kv_heads=args.n_kv_heads or args.n_heads,
            embed_dim=args.dim,
            max_seq_len=args.max_seq_len,
            intermediate_dim=args.hidden_dim,
            norm_eps=args.norm_eps,
            lora_rank=LORA["lora_rank"],
            lora_alpha=LORA["lora_alpha"],
            lora_dropout=LORA["lora_dropout"],
            quantize_base=True,
        )
    set_trainable_params(model, get_adapter_params(model))
    if opts.checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    with training.set_default_dtype(torch.bfloat16), device:
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_a.to_empty(device=device)
                m.lora_b.to_empty(device=device)
                m.initialize_parameters()
            if hasattr(m, "rope_init"):
                m.rope_init()
    gen = torch.Generator().manual_seed(0)
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        full = torch.empty(param.shape, dtype=torch.bfloat16)
        full.fill_(1.0) if name.endswith("scale") else full.normal_(0.0, 0.02, generator=gen)
        if isinstance(param, NF4Tensor):  # what load_from_full_model_state_dict does for an NF4 weight
            full = to_nf4(full, param.block_size, param.scaler_block_size)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(full, requires_grad=param.requires_grad))
        del full
    training.validate_no_params_on_meta_device(model)
    build_s = time.perf_counter() - t0
    n_nf4 = sum(isinstance(p, NF4Tensor) for p in model.parameters())
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    if fp32_adapters:
        for p in trainable_params:
            p.data = p.data.float()
    model.set_num_output_chunks(TORCHTUNE_CHUNKS)
    model.train()
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=TORCHTUNE_CHUNKS)
    opt = torch.optim.AdamW(trainable_params, lr=1e-4, weight_decay=0.0)
    tokens = _tokens(args.vocab_size, opts.batch, opts.seq).to(device)
    # the recipe's label shift: the next token, the last position ignored
    labels = torch.hstack((tokens[:, 1:], torch.full((opts.batch, 1), loss_fn.ignore_index)))

    def step() -> float:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if fp32_adapters else contextlib.nullcontext()
        with ctx:
            logits = model(tokens)
            loss = loss_fn(logits, labels)
        del logits  # as the recipe: the logits are not kept through backward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return {
        "build_s": build_s,
        "rss_after_build": rss(),
        "trainable": sum(p.numel() for p in trainable_params),
        "adapter_dtype": str(trainable_params[0].dtype),
        "nf4_weights": n_nf4,
        "torchtune": torchtune.__version__,
        "torchao": torchao.__version__,
        "torch": torch.__version__,
        **_time_steps(step, opts.steps, device, opts.profile, opts.saved),
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(results: dict, opts) -> str:
    rows = [
        f"QLoRA step, {opts.shape} shape, batch {opts.batch} x seq {opts.seq}, {opts.steps} timed steps after 1 "
        f"warm-up, activation checkpointing {'on' if opts.checkpointing else 'off'}; load average "
        f"{os.getloadavg()[0]:.1f}",
        "",
        "| flow | build s | RSS after build | peak RSS in steps | step's growth | peak CUDA | step s (median) | "
        "tokens/s | best step s | best tokens/s | load per step | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for flow, r in results.items():
        if r.get("status") != "ok":
            rows.append(f"| {flow} | {r.get('status')}: {r.get('error', '')[-200:].strip()!r} |||||||||||")
            continue
        step = statistics.median(r["step_s"])
        rows.append(
            f"| {flow} | {r['build_s']:.1f} | {_gib(r['rss_after_build'])} | {_gib(r['peak_rss_steps'])} | "
            f"{_gib(r['peak_rss_steps'] - r['rss_after_build'])} | "
            f"{_gib(r['peak_cuda_steps']) if r['peak_cuda_steps'] else '-'} | {step:.2f} | "
            f"{opts.batch * opts.seq / step:.1f} | {min(r['step_s']):.2f} | "
            f"{opts.batch * opts.seq / min(r['step_s']):.1f} | "
            f"{' '.join(f'{x:.1f}' for x in r.get('load_1m', []))} | {r['trainable']:,} |"
        )
    return "\n".join(rows)


CHILDREN = {
    "ours": child_ours,
    "ours-plain": child_ours,
    "hf": child_hf,
    "torchtune": child_torchtune,
    "torchtune-fp32": child_torchtune,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.1B", help="model.args preset (tiny: smoke test)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--flows",
        default="ours,hf",
        help="of ours, ours-plain (the loss from full logits), hf, torchtune, torchtune-fp32",
    )
    ap.add_argument("--rounds", type=int, default=1, help="run the flows this many times, in turn")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="ROWS", help="after the timed steps, profile one more (top ROWS ops)"
    )
    ap.add_argument(
        "--saved",
        type=int,
        default=0,
        metavar="ROWS",
        help="after the timed steps, one more step tallying the tensors saved for backward (top ROWS groups)",
    )
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--ckpt", default=None, help="HF checkpoint for the hf flow (default: the synthetic one)")
    ap.add_argument(
        "--torchtune-python",
        default=sys.executable,
        help="the python of an environment with torchtune + torchao (bench/README.md), for the torchtune flows",
    )
    ap.add_argument("--child", choices=[*CHILDREN], help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        quiet_bitsandbytes()
        emit(opts.child, CHILDREN[opts.child](opts))
        return 0
    session = Session(f"qlora-step-{opts.shape}", __file__, timeout=opts.timeout)
    flows = opts.flows.split(",")
    if "hf" in flows and opts.ckpt is None:
        opts.ckpt = str(session.synthetic_checkpoint(opts.shape)[0])
    child_args = cli_args(
        shape=opts.shape,
        seq=opts.seq,
        batch=opts.batch,
        steps=opts.steps,
        ckpt=opts.ckpt,
        checkpointing=opts.checkpointing,
        profile=opts.profile or None,
        saved=opts.saved or None,
    )
    # --rounds N runs the flows N times in turn (ours, hf, ours, hf, ...): on a shared machine a busy spell then
    # hits both sides instead of one side's repeats
    results = {}
    for i in range(opts.rounds):
        for flow in flows:
            tag = flow if opts.rounds == 1 else f"{flow}#{i + 1}"
            python = opts.torchtune_python if flow.startswith("torchtune") else None
            results[tag] = session.spawn(flow, child_args, tag=tag, python=python)
    md = table(results, opts)
    for tag, r in results.items():
        if "saved_bytes" in r:
            md += (
                f"\n\n{tag}: saved for backward {_mib(r['saved_bytes'])} in {r['saved_tensors']} storages "
                f"({', '.join(f'{k} {_mib(v)}' for k, v in r['saved_by_dtype'].items())}; "
                f"{r['saved_params_skipped']} parameters left out); largest groups: "
                + "; ".join(f"{n} x {shape} {dt} {_mib(b)}" for shape, dt, n, b in r["saved_top"])
            )
        if r.get("profile"):
            md += f"\n\n{tag}: one profiled step, operators by self CPU time\n\n```\n{r['profile']}```"
    print(md)
    session.save(f"QLoRA step: {opts.shape}", md, {"opts": vars(opts), **results})
    return 0 if all(r.get("status") in ("ok", "not installed") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
