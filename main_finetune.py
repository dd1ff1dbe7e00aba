"""Fine-tune a LLaMA model with adapters (LoRA, LLaMA-Adapter, bias/norm tuning), optionally on a 4-bit base.

    python main_finetune.py                              # quickstart: tiny model, bundled data, CPU, ~a minute
    torchrun --nproc_per_node 2 main_finetune.py --quant 4bit
    torchrun --nproc_per_node 8 main_finetune.py --llama_config llama-2-7b/params.json configs/lora_r16.json \\
        --pretrained_path llama-2-7b --tokenizer_path llama-2-7b/tokenizer.model --quant 4bit \\
        --data_config data/quickstart.yaml --output_dir out/7b-qlora

Thin: arguments -> util.build.build_model (meta -> quantize -> adapters -> materialize and load -> verify) ->
util.train.Trainer -> <output_dir>/final (trainable-only or full model + params.json with the full config +
tokenizer.model). The config is the checkpoints' params.json/config.json, then --llama_config files on top
(later wins). Every data-parallel rank builds and quantizes its own base from the real weights.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.args import ModelArgs
from model.peft import uses_peft
from util import output_dir as out_lock
from util.build import build_model, model_config, open_checkpoints
from util.cli import is_main_process, process_groups, run, save_quantized_for_reuse, setup_logging
from util.data import InstructionDataset, load_data_config
from util.dist import DistInfo, init_distributed, init_process_group, local_device
from util.export import convert
from util.export.tokenizer import tokenizer_export
from util.quickstart import DATA_CONFIG, QUICKSTART_DIR, prepare_quickstart
from util.tokenizer import Tokenizer
from util.train import PRECISIONS, TrainConfig, Trainer, config_from, prepare_model, resolve_resume

log = logging.getLogger("main_finetune")

# Defaults, and the quickstart's where the user gave nothing (argparse defaults are None to tell them apart).
DEFAULTS = dict(
    quant="none",
    batch_size=4,
    accum_iter=1,
    lr=1e-4,
    min_lr=0.0,
    weight_decay=0.02,
    warmup_epochs=0.0,
    epochs=1,
    clip_grad=2.0,
    max_words=512,
    save_interval=1,
    save_iteration_interval=0,
    keep_last=0,
    seed=0,
    num_workers=1,
    output_dir="out/finetune",
    log_interval=1,
)
QUICKSTART = dict(
    quant="4bit",
    batch_size=8,
    lr=3e-3,
    min_lr=3e-4,
    warmup_iters=5,
    epochs=6,
    clip_grad=1.0,
    max_words=128,
    save_interval=0,
    num_workers=0,
    output_dir=str(QUICKSTART_DIR),
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--llama_config", nargs="+", default=[], help="JSON config(s) merged over the checkpoints' config")
    m.add_argument(
        "--tokenizer_path",
        help="tokenizer.model (sentencepiece or Llama 3's tiktoken), tokenizer.json, or a directory holding one",
    )
    m.add_argument(
        "--chat_format",
        default="auto",
        choices=["auto", "lazyllama", "llama2", "llama3"],
        help="prompt format of the data (auto: from the tokenizer); demo.py takes the same option",
    )
    m.add_argument("--pretrained_path", nargs="+", default=[], help="checkpoint(s) loaded in order (base, deltas)")
    m.add_argument("--pretrained_format", default="auto", choices=["auto", "meta", "hf", "lazyllama"])
    m.add_argument("--quant", choices=["none", "4bit", "4bit_fp4", "8bit"], help="base quantization (default none)")
    m.add_argument(
        "--save_quantized",
        default=None,
        help="after building, write the quantized model here (a later --pretrained_path DIR skips quantization)",
    )
    m.add_argument("--model_parallel_size", type=int, default=1)
    m.add_argument(
        "--data_parallel",
        default="ddp",
        choices=["ddp", "fsdp"],
        help="ddp (every rank holds the whole model) or fsdp (parameters sharded: full fine-tuning, or adapters on "
        "a frozen full-precision or 4-bit base)",
    )
    m.add_argument("--precision", choices=sorted(PRECISIONS), help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    m.add_argument("--checkpointing", action="store_true", help="activation checkpointing per transformer block")

    t = p.add_argument_group("training")
    t.add_argument("--batch_size", type=int, help="per data-parallel rank and micro-step (default 4)")
    t.add_argument("--accum_iter", type=int, help="micro-steps per optimizer step (default 1)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    t.add_argument("--min_lr", type=float, help="cosine floor (default 0)")
    t.add_argument("--weight_decay", type=float, help="AdamW weight decay on matrices (default 0.02)")
    t.add_argument("--warmup_epochs", type=float, help="linear warmup in epochs (default 0)")
    t.add_argument("--warmup_iters", type=int, help="linear warmup in optimizer steps (wins over --warmup_epochs)")
    t.add_argument("--epochs", type=int, help="epochs (default 1)")
    t.add_argument("--max_iters", type=int, help="optimizer steps in all (wins over --epochs)")
    t.add_argument("--clip_grad", type=float, help="max global grad norm, <= 0 for none (default 2.0)")
    t.add_argument("--seed", type=int)
    t.add_argument(
        "--max_bad_steps",
        type=int,
        help="stop after N steps in a row with a non-finite loss or grad norm (skipped), 0: never (default 5)",
    )

    d = p.add_argument_group("data")
    d.add_argument("--data_config", help="YAML listing the data sources (default: the bundled quickstart data)")
    d.add_argument("--max_words", type=int, help="tokens per example, longer ones are cut (default 512)")
    d.add_argument("--num_workers", type=int, help="DataLoader workers (default 1)")
    d.add_argument("--strict_data", action="store_true", help="reject bad records instead of skipping them")

    o = p.add_argument_group("output")
    o.add_argument("--output_dir", help="checkpoints, logs and final/ (default out/finetune)")
    o.add_argument("--save_interval", type=int, help="checkpoint every N epochs, 0: never (default 1)")
    o.add_argument("--save_iteration_interval", type=int, help="checkpoint every N optimizer steps (default 0)")
    o.add_argument(
        "--only_save_trainable",
        action="store_true",
        help="checkpoints hold the trainable tensors only (always so on a quantized base)",
    )
    o.add_argument("--keep_last", type=int, help="keep the newest K checkpoints, 0: all (default 0)")
    o.add_argument("--resume", help="a checkpoint-NNNNNNN directory to continue from, or 'latest' in --output_dir")
    o.add_argument("--log_interval", type=int, help="log every N optimizer steps (default 1)")
    o.add_argument("--no_tensorboard", dest="tensorboard", action="store_false")
    o.add_argument("--pretrain_steps", type=int, help="quickstart only: steps to pre-train the tiny base on first use")
    o.add_argument(
        "--export",
        nargs="+",
        default=[],
        choices=["hf", "meta", "peft", "gguf"],
        help="after training, export the base + final/ to <output_dir>/export-<format> as scripts/convert.py does "
        "(one process only)",
    )
    return p


@dataclass
class FinetuneResult:
    final_dir: Path
    losses: list[float]
    model: nn.Module  # the trained model (unwrapped), still holding this rank's shards
    args: ModelArgs
    checkpoints: list[Path]  # what build_model loaded: base(s), then the resumed checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the defaults (the quickstart's where no model is given) filled in."""
    opts = get_args_parser().parse_args(argv)
    quickstart = not (opts.llama_config or opts.pretrained_path or opts.tokenizer_path)
    for key, value in {**DEFAULTS, **(QUICKSTART if quickstart else {})}.items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    opts.quickstart = quickstart
    return opts


def with_quickstart_inputs(opts: argparse.Namespace) -> argparse.Namespace:
    """The quickstart's tokenizer, tiny base and LoRA config, made on first use (rank 0, before the model-parallel
    groups exist)."""
    data_config = opts.data_config or str(DATA_CONFIG)
    inputs = prepare_quickstart(opts.output_dir, data_config=data_config, pretrain_steps=opts.pretrain_steps)
    paths = dict(tokenizer_path=str(inputs.tokenizer), pretrained_path=[str(inputs.base)], data_config=data_config)
    return argparse.Namespace(**{**vars(opts), **paths, "llama_config": [str(inputs.lora_config)]})


def load_data(opts: argparse.Namespace, args: ModelArgs, tokenizer: Tokenizer) -> InstructionDataset:
    if opts.data_config is None:
        raise ValueError("no data: give --data_config (a YAML listing the sources, see data/quickstart.yaml)")
    max_words = min(opts.max_words, args.max_seq_len)
    if max_words < opts.max_words:
        log.info("max_words %d -> %d (the model's max_seq_len)", opts.max_words, max_words)
    sources = load_data_config(opts.data_config)
    dataset = InstructionDataset(
        sources,
        tokenizer.path,
        max_words=max_words,
        seed=opts.seed,
        strict=opts.strict_data,
        chat_format=opts.chat_format,
    )
    log.info("chat format: %s (tokenizer %s: %s)", dataset.format.name, tokenizer.kind, tokenizer.path)
    if dataset.has_images and not args.visual_backbone:
        raise ValueError(
            "image_conversation data needs a model with a visual backbone: add a visual config (visual_backbone, "
            "visual_weights) to --llama_config"
        )
    return dataset


def build_settings(opts: argparse.Namespace, args: ModelArgs, cfg: TrainConfig) -> tuple[str | None, torch.dtype]:
    """(quant, dtype) for build_model; refuses a quantized base with nothing to train, or 8-bit under FSDP."""
    peft = uses_peft(args)
    quant = None if opts.quant == "none" else opts.quant
    if quant and not peft:
        raise ValueError(
            f"--quant {quant} freezes the base, and the config adds no adapters to train: add a LoRA config "
            "(--llama_config ... configs/lora_r16.json) or fine-tune fully with --quant none"
        )
    if quant == "8bit" and cfg.data_parallel == "fsdp":
        raise ValueError(
            "--data_parallel fsdp cannot shard 8-bit weights (bitsandbytes' 8-bit matmul keeps its codes where FSDP "
            "does not see them): use --quant 4bit, or --data_parallel ddp"
        )
    # adapters train in fp32 beside a base in the autocast dtype; full fine-tuning keeps fp32 master weights
    return quant, torch.float32 if cfg.precision == "fp32" or not peft else PRECISIONS[cfg.precision]


def main(argv: list[str] | None = None) -> FinetuneResult | int:
    opts = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    # one run per --output_dir: rank 0 holds its lock for the whole run, taken before anything is made there
    with process_groups(), out_lock.locked(opts.output_dir) if is_main_process() else contextlib.nullcontext():
        init_process_group()
        if opts.quickstart:
            opts = with_quickstart_inputs(opts)
        info = init_distributed(opts.model_parallel_size)
        check_export(opts, info)
        device = local_device()  # this rank's GPU (nccl), else the CPU
        output_dir = Path(opts.output_dir)
        precision = opts.precision or ("bf16" if device.type == "cuda" else "fp32")
        cfg = config_from(opts, output_dir=output_dir, precision=precision)
        resume = [resolve_resume(opts.resume, output_dir)] if opts.resume else []
        tokenizer_path = opts.tokenizer_path or (opts.pretrained_path[0] if opts.pretrained_path else None)
        if tokenizer_path is None:
            raise ValueError("no tokenizer: give --tokenizer_path (a tokenizer.model or tokenizer.json)")
        tokenizer = Tokenizer(tokenizer_path)

        # each checkpoint opened once: the config, then the build (base(s), then the checkpoint resumed from)
        with open_checkpoints(opts.pretrained_path, format=opts.pretrained_format) as bases:
            args = model_config(bases, opts.llama_config, tokenizer=tokenizer)
            dataset = load_data(opts, args, tokenizer)  # before the model: a bad data file fails in seconds
            quant, dtype = build_settings(opts, args, cfg)
            if info.is_main:  # a read-only or full disk is reported now, not after the build and the first steps
                out_lock.check_writable(output_dir, 2 * checkpoint_bytes(args, quant, cfg))
            # FSDP: sharded on meta, so every rank allocates and reads only its rows of each parameter (of a 4-bit
            # base: its rows of the packed codes)
            shard = functools.partial(prepare_model, cfg=cfg, device=device) if cfg.data_parallel == "fsdp" else None
            with open_checkpoints(resume) as resumed:
                model, _ = build_model(
                    args, [*bases, *resumed], quant=quant, dtype=dtype, device=device, seed=opts.seed, shard=shard
                )
        if opts.save_quantized:
            save_quantized_for_reuse(model, opts.save_quantized, log.info)

        trainer = Trainer(model, args, dataset, cfg, device=device, base_checkpoints=opts.pretrained_path)
        if info.is_main:
            log_plan(trainer, len(dataset), info)
        if resume:
            trainer.resume(resume[0])
        try:
            losses = trainer.fit()
        except KeyboardInterrupt:
            if info.is_main:
                print(interrupted(trainer, argv), file=sys.stderr, flush=True)
            return 130  # as a shell reports a process ended by SIGINT
        final = trainer.save_final(output_dir / "final", tokenizer.path)
        if info.is_main:
            print_summary(opts, trainer, final, losses, quant)
        for fmt in opts.export:
            sources = [*opts.pretrained_path, final] if trainer.only_save_trainable else [final]
            out = convert(sources, to=fmt, out=output_dir / f"export-{fmt}", tokenizer_path=tokenizer_path)
            print(f"exported to {out}")
        return FinetuneResult(final, losses, trainer.module, args, [*map(Path, opts.pretrained_path), *resume])


def checkpoint_bytes(args: ModelArgs, quant: str | None, cfg: TrainConfig) -> int:
    """About the size of one checkpoint, from the config alone (before the model exists): the trainable tensors in
    fp32 with AdamW's two moments, plus the frozen weights where the full model is saved."""
    d, hd, f = args.dim, args.head_dim, args.hidden_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    shapes = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w1": (d, f), "w2": (f, d), "w3": (d, f)}
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * d
    total = args.n_layers * per_layer + args.vocab_size * d * (1 if args.tie_word_embeddings else 2) + d
    if uses_peft(args):
        lora = args.lora_rank * sum(sum(shapes[t]) for t in args.lora_targets if t in shapes) * args.n_layers
        trainable = lora + args.adapter_len * d * args.adapter_layers + (4 * d + 2 * f) * args.n_layers
    else:
        trainable = total
    saved = trainable if quant or cfg.only_save_trainable else total
    return 4 * saved + 8 * trainable


def interrupted(trainer: Trainer, argv: list[str]) -> str:
    """What a Ctrl-C during training prints: where it stopped, the checkpoint to continue from and the command."""
    where = f"interrupted at iteration {trainer.iteration} of {trainer.total_iters}"
    last = trainer.last_checkpoint
    if last is None:
        return (
            f"{where}; no checkpoint was saved, so there is nothing to resume from (--save_iteration_interval N "
            "saves every N steps)"
        )
    drop = {i + 1 for i, a in enumerate(argv) if a == "--resume"}  # the old --resume and its value
    kept = [a for i, a in enumerate(argv) if i not in drop and a != "--resume" and not a.startswith("--resume=")]
    launcher = "torchrun ... " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python "
    command = launcher + shlex.join(["main_finetune.py", *kept, "--resume", str(last)])
    return f"{where}; the last checkpoint is {last}; continue with:\n  {command}"


def check_export(opts: argparse.Namespace, info: DistInfo) -> None:
    """--export's problems before training, not after it: several processes, a tokenizer the formats cannot take."""
    if not opts.export:
        return
    if info.world_size > 1:
        raise ValueError("--export runs in a single process: run scripts/convert.py on the base and final/ afterwards")
    if {"hf", "gguf"} & set(opts.export) and opts.tokenizer_path:
        tokenizer_export(opts.tokenizer_path).check_plain_text()


def log_plan(trainer: Trainer, examples: int, info: DistInfo) -> None:
    trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
    log.info(
        "%d examples, %d optimizer steps (%d per epoch), %s trainable parameters per rank, dp %d x mp %d",
        examples,
        trainer.total_iters,
        trainer.steps_per_epoch,
        f"{trainable:,}",
        info.data_parallel_size,
        info.model_parallel_size,
    )


def print_summary(opts: argparse.Namespace, trainer: Trainer, final: Path, losses: list[float], quant) -> None:
    what = "trainable tensors" if trainer.only_save_trainable else "full model"
    print(f"fine-tuned {what} written to {final} (+ tokenizer.model, params.json)")
    if losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    paths = ", ".join(repr(str(p)) for p in [*opts.pretrained_path, final])
    print(f"load it with build_model(None, [{paths}]{', quant=' + repr(quant) if quant else ''})")
    if opts.quickstart:
        bases = " ".join(map(str, opts.pretrained_path))
        print(f'chat: python demo.py --prompt "What is the opposite of hot?"   (base {bases}, delta {final})')


if __name__ == "__main__":
    sys.exit(run(main))
