"""build_model(): the one build sequence both entry scripts use."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from model.args import ModelArgs
from model.llama import Transformer
from model.peft import add_bias_tuning, add_lora, mark_trainable
from util.checkpoint import CheckpointError, CheckpointReader, open_checkpoint
from util.lazy_init import LoadReport, materialize_and_load, meta_init
from util.quant import DEFAULT_BLOCK_LIST, quantize_model

log = logging.getLogger(__name__)


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
) -> tuple[Transformer, LoadReport]:
    """Build a LLaMA model lazily: its memory is the memory of its (quantized) weights.

    args: the config; None takes it from the first checkpoint (params.json / config.json). Meta's
    vocab_size=-1 is filled from the checkpoint's embedding.
    """
    # Paths are opened (format auto-detected) and closed here; CheckpointReader objects (e.g. opened with an
    # explicit format) are used as given and left open for their owner.
    readers = [p if isinstance(p, CheckpointReader) else open_checkpoint(p) for p in checkpoints or []]
    owned = [r for r, p in zip(readers, checkpoints or []) if r is not p]
    try:
        # 0. config: given, or the checkpoints' (later wins: a LoRA delta's config adds its LoRA fields to the
        #    base's); vocab size from the embedding when the config says -1
        if args is None:
            configs = [(r.config, str(r.path)) for r in readers if r.config]
            if not configs:
                raise ValueError(
                    "no model config: pass ModelArgs (e.g. --llama_config params.json) or a checkpoint with one"
                )
            for config, source in configs:
                args = ModelArgs.from_dict(config, source=source, base=args)
        if args.vocab_size == -1 and readers and "tok_embeddings.weight" in readers[0].keys():
            args = args.with_vocab_size(readers[0].shape("tok_embeddings.weight")[0], source=str(readers[0].path))
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

        # 4. allocate, fill (checkpoint or reset_parameters), quantize, release: one tensor at a time
        report = materialize_and_load(model, readers, device=device, seed=seed, strict=strict)
    finally:
        for reader in owned:
            reader.close()

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
