"""The quickstart's inputs, made on first use: a small tokenizer and a tiny pre-trained base model.

`python main_finetune.py` with no model arguments fine-tunes the bundled tiny configuration on the bundled data
(data/quickstart.yaml). Before that, `prepare_quickstart` (rank 0 only, before model-parallel groups exist):
1. trains a sentencepiece tokenizer on the data's prompts and answers -> out/quickstart/tokenizer.model;
2. pre-trains preset("tiny") (vocab = the tokenizer's) from a seeded init for a few hundred full fine-tuning
   steps on the same records as plain text (no prompt template, every token in the loss), so it knows the words
   and facts the chat is about and the fine-tune teaches the instruction format -> out/quickstart/base
   in Meta's format (bf16 consolidated.00.pth + params.json), with quickstart.json recording what it was made
   from (a base made from another tokenizer, or a random stand-in, is made again).
The fine-tune then adds LoRA (configs/lora_r16.json) on the 4-bit base and writes out/quickstart/final.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.args import preset
from util.build import build_model
from util.checkpoint import write_meta_checkpoint
from util.checkpoint.files import publish_dir
from util.data import InstructionDataset, load_data_config, source_texts
from util.dist import control_group, position
from util.tokenizer import Tokenizer, train_tokenizer
from util.train import TrainConfig, Trainer

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
QUICKSTART_DIR = Path("out/quickstart")
DATA_CONFIG = REPO / "data" / "quickstart.yaml"
LORA_CONFIG = REPO / "configs" / "lora_r16.json"
MARKER = "quickstart.json"
PRETRAIN = {"steps": 800, "batch_size": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 20, "seed": 1234}


@dataclass(frozen=True)
class QuickstartInputs:
    tokenizer: Path
    base: Path
    lora_config: Path
    data_config: Path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _all_threads():
    """The other ranks wait while rank 0 prepares: let it use every core (torchrun sets 1 thread per rank)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_quickstart(
    out_dir: str | Path = QUICKSTART_DIR, *, data_config: str | Path = DATA_CONFIG, pretrain_steps: int | None = None
) -> QuickstartInputs:
    """Make the tokenizer and base if missing (rank 0; the other ranks wait). Call before init_distributed's
    model-parallel groups exist: the base is built and trained unsharded by rank 0 alone."""
    if position().model_parallel_size > 1:
        raise RuntimeError("prepare_quickstart must run before the model-parallel groups are set up")
    out = Path(out_dir)
    inputs = QuickstartInputs(out / "tokenizer.model", out / "base", LORA_CONFIG, Path(data_config))
    control = control_group() if position().world_size > 1 else None  # made by all ranks before rank 0 works
    if position().is_main:
        with _all_threads():
            _prepare(inputs, PRETRAIN["steps"] if pretrain_steps is None else pretrain_steps)
    if position().world_size > 1:  # plain torch.distributed: the model-parallel groups come later
        dist.barrier(group=control)  # gloo, long timeout: preparing may outlast NCCL's 10-minute watchdog
    return inputs


def _prepare(inputs: QuickstartInputs, steps: int) -> None:
    sources = load_data_config(inputs.data_config)
    if not inputs.tokenizer.is_file():
        texts = source_texts(sources)
        log.info("quickstart: training a tokenizer on %d examples -> %s", len(texts), inputs.tokenizer)
        train_tokenizer(texts, inputs.tokenizer, vocab_size=512)
    made_from = {"tokenizer_sha256": _sha256(inputs.tokenizer), "steps": steps, **PRETRAIN, "steps_done": steps}
    marker = inputs.base / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("tokenizer_sha256") == made_from["tokenizer_sha256"]:
        return
    if inputs.base.exists():
        log.info("quickstart: %s was not made from %s; making it again", inputs.base, inputs.tokenizer)
    pretrain_base(inputs.base, inputs.tokenizer, sources, steps=steps, marker=made_from)


def pretrain_base(out: Path, tokenizer_path: Path, sources, *, steps: int, marker: dict) -> None:
    """Full fine-tuning of preset("tiny") from a seeded init on the plain text; written in Meta's format, atomically."""
    vocab = Tokenizer(tokenizer_path).vocab_size
    args = preset("tiny", vocab_size=vocab)
    log.info("quickstart: pre-training a tiny base (%d steps) -> %s", steps, out)
    model, _ = build_model(args, None, dtype=torch.float32, seed=PRETRAIN["seed"])
    dataset = InstructionDataset(sources, tokenizer_path, max_words=args.max_seq_len, seed=PRETRAIN["seed"], plain=True)
    cfg = TrainConfig(
        output_dir=out.parent / "pretrain",
        batch_size=PRETRAIN["batch_size"],
        lr=PRETRAIN["lr"],
        min_lr=PRETRAIN["min_lr"],
        warmup_iters=PRETRAIN["warmup_iters"],
        max_iters=max(1, steps),
        clip_grad=1.0,
        save_interval=0,
        seed=PRETRAIN["seed"],
        tensorboard=False,
        weight_decay=0.0,
    )
    losses = Trainer(model, args, dataset, cfg).fit()
    log.info("quickstart: base loss %.3f -> %.3f", losses[0], losses[-1])
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    params = {k: v for k, v in args.to_dict().items() if not k.startswith(("lora", "adapter", "bias_", "norm_t"))}
    write_meta_checkpoint(tmp, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, params=params)
    (tmp / MARKER).write_text(json.dumps({**marker, "final_loss": losses[-1]}, indent=1))
    publish_dir(tmp, out)
