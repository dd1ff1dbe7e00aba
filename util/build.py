"""build_model(): the one build sequence both entry scripts use; model_config(): the one config rule."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from model.args import ModelArgs, read_config_json
from model.llama import Transformer
from model.peft import add_bias_tuning, add_lora, mark_trainable
from util.checkpoint import CheckpointError, CheckpointReader, open_checkpoint
from util.lazy_init import LoadReport, materialize_and_load, meta_init
from util.quant import DEFAULT_BLOCK_LIST, quantize_model

log = logging.getLogger(__name__)

EMBEDDING = "tok_embeddings.weight"


class _Vocab(Protocol):  # a util.tokenizer.Tokenizer, or anything with its vocabulary size and file
    vocab_size: int
    path: Path


@contextlib.contextmanager
def open_checkpoints(paths: Sequence[str | Path] | None, *, format: str = "auto") -> Iterator[list[CheckpointReader]]:
    """Open each checkpoint once (format auto-detected unless given) and close them all on leaving the block."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(open_checkpoint(p, format=format)) for p in paths or []]


def model_config(
    readers: Sequence[CheckpointReader],
    config_files: Sequence[str | Path] = (),
    *,
    tokenizer: _Vocab | None = None,
) -> ModelArgs:
    """THE config rule: the checkpoints' configs in order (base, then deltas: a LoRA delta adds its LoRA fields to
    the base's), then the user's config files on top (--llama_config); later wins. The vocabulary (Meta's -1) from
    the first checkpoint holding the embedding, else from the tokenizer; a tokenizer larger than the model is an
    error."""
    args = None
    for reader in readers:
        if reader.config:
            args = ModelArgs.from_dict(reader.config, source=str(reader.path), base=args)
    for path in config_files:
        args = ModelArgs.from_dict(read_config_json(path, what="--llama_config"), source=str(path), base=args)
    if args is None:
        raise ValueError(
            "no model config: give --llama_config (e.g. params.json configs/lora_r16.json) or a checkpoint whose "
            "directory has params.json / config.json"
        )
    return with_vocab(args, readers, tokenizer)


def with_vocab(args: ModelArgs, readers: Sequence[CheckpointReader], tokenizer: _Vocab | None = None) -> ModelArgs:
    """Fill vocab_size=-1 from the embedding, else the tokenizer; check the tokenizer fits the model."""
    if args.vocab_size == -1:
        holder = next((r for r in readers if EMBEDDING in r.keys()), None)
        if holder is not None:
            args = args.with_vocab_size(holder.shape(EMBEDDING)[0], source=str(holder.path))
        elif tokenizer is not None:
            args = args.with_vocab_size(tokenizer.vocab_size, source=str(tokenizer.path))
        else:
            raise ValueError("vocab_size is -1 in the config and no checkpoint or tokenizer says it: set vocab_size")
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise ValueError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{args.vocab_size}: use the tokenizer that belongs to the checkpoint"
        )
    return args


def build_model(
    args: ModelArgs | None,
    checkpoints: Sequence[str | Path | CheckpointReader] | None = None,
    *,
    quant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    block_list: tuple[str, ...] = DEFAULT_BLOCK_LIST,
    strict: bool = True,
    shard: Callable[[torch.nn.Module], object] | None = None,
) -> tuple[Transformer, LoadReport]:
    """Build a LLaMA model lazily: its memory is the memory of its (quantized) weights.

    args: the config; None takes it from the checkpoints by `model_config`'s rule. Meta's vocab_size=-1 is filled
    from the checkpoint's embedding. checkpoints: paths (opened and closed here) or open readers (left open for
    their owner, e.g. an entry script's `open_checkpoints` block). shard: applied to the finished model while it is
    still on meta (util.train.prepare_model under FSDP: fully_shard per block), so that each rank then allocates
    and reads only its own rows of every parameter.
    """
    with contextlib.ExitStack() as opened:  # paths are opened here and closed on leaving; readers stay open
        readers = [
            p if isinstance(p, CheckpointReader) else opened.enter_context(open_checkpoint(p))
            for p in checkpoints or []
        ]
        # 0. config: given, or the checkpoints' (the one rule, see model_config)
        args = model_config(readers) if args is None else with_vocab(args, readers)
        for reader in readers:  # deltas that need the base's shape to be read (a peft adapter's q/k rows)
            if callable(getattr(reader, "bind_base", None)):
                reader.bind_base(args)

        # 1. build on meta: no storage, no init work (a visual backbone is built for real inside, and gets
        #    its own weights from its file now)
        with meta_init(dtype):
            model = Transformer(args)
        if model.visual is not None:
            load_visual_weights(model.visual.backbone, args.visual_weights)

        # 2. swap linears for bitsandbytes ones, still on meta (before LoRA wraps them)
        quantize_model(model, quant, block_list=block_list)

        # 3. adapters on the (quantized) base, still on meta; then one predicate decides what trains
        #    (the LLaMA-Adapter prompts and gates were built with the model from the config)
        with meta_init(dtype):
            add_lora(model, args)
            add_bias_tuning(model, args)
        trainable = mark_trainable(model, args)
        if shard is not None:  # data-parallel sharding (FSDP2) on meta: from here each rank holds its rows only
            shard(model)

        # 4. allocate, fill (checkpoint or reset_parameters), quantize, release: one tensor at a time
        report = materialize_and_load(model, readers, device=device, seed=seed, strict=strict)

    # 5. invariants (materialize_and_load verified nothing is on meta, no NaN): the trainable set is the
    #    predicate's, quantized weights are frozen
    now = [n for n, p in model.named_parameters() if p.requires_grad]
    if now != trainable:
        raise RuntimeError(f"trainable set changed during materialization: {sorted(set(now) ^ set(trainable))}")
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point and p.requires_grad:
            raise RuntimeError(f"quantized weight {name} is trainable")
    log.info("%s", report.summary())
    return model, report


def load_visual_weights(backbone: torch.nn.Module, path: str | Path | None) -> None:
    """Fill a (real, randomly initialized) visual backbone from its weights file, written by
    scripts/convert_visual_weights.py; every key must match. No file: the backbone keeps its random init."""
    if path is None:
        log.warning("no visual_weights given: the visual backbone keeps its random initialization")
        return
    expected = backbone.state_dict()
    with open_checkpoint(path) as reader:
        missing, unexpected = sorted(set(expected) - reader.keys()), sorted(reader.keys() - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: does not fit the visual backbone: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                "write it with scripts/convert_visual_weights.py for the same visual_backbone/visual_kwargs"
            )
        with torch.no_grad():
            for key, t in expected.items():
                value = reader.read(key)
                if tuple(value.shape) != tuple(t.shape):
                    raise CheckpointError(f"{path}: {key} has shape {list(value.shape)}, the backbone {list(t.shape)}")
                t.copy_(value)
                reader.release(key)
