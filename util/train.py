"""The fine-tuning loop: data parallel x model parallel, mixed precision, accumulation, clipping, checkpoints.

    trainer = Trainer(model, args, dataset, TrainConfig(...), base_checkpoints=[base])
    trainer.resume(checkpoint_dir)          # optional: optimizer, schedule, RNG and data position
    losses = trainer.fit()
    trainer.save_final(output_dir / "final", tokenizer_path)

One optimizer step (`Trainer.train_step`), readable top to bottom:
  1. loss:         each micro-batch's summed next-token cross entropy over its labelled tokens (util.loss: the head
                   in checkpointed chunks, never the full logits), divided by the labelled tokens of the whole
                   step (`Trainer._micro_batch_loss`), so accumulation is one large batch;
  2. accumulation: backward per micro-batch, gradients synchronized across data parallel on the last one only;
  3. clipping:     the global grad norm over model-parallel shards (`clip_grad_norm_`), then AdamW at the
                   schedule's learning rate (util.lr_sched.Schedule);
  4. logging:      the loss that was back-propagated (the sum of the micro-batch losses), averaged over the
                   data-parallel ranks as their gradients are.

Data parallel: every rank holds its own copy of the frozen (possibly quantized) base, built from the real
weights by build_model, so only trainable parameters are synchronized: DDP over the data-parallel group
(frozen parameters and buffers are not registered with DDP at all), or FSDP2 (`fully_shard` per transformer
block) for full fine-tuning of unquantized models. Model parallel: grad-norm clipping sums the squares of
model-parallel-split parameters across the model-parallel group and counts replicated ones once (modules declare
`shard_dims`). Groups and positions come from util.dist.

Checkpoints (`<output_dir>/checkpoint-NNNNNNN/`): the model (trainable-only or full, this project's format) +
optimizer state + schedule position + RNG states (torch, python, numpy, CUDA; per rank) + the sampler's
(epoch, position). Written into a hidden temp directory and published with one rename, so a crash mid-save
leaves the previous checkpoint intact. Loaded with torch.load(weights_only=True) and safetensors only.

Under FSDP nothing is gathered whole: the model is written one parameter at a time (each gathered with
`full_tensor()`, written by data-parallel rank 0, dropped), and the optimizer state with
torch.distributed.checkpoint (DCP): every rank writes its own shards into `optimizer/mpNN/` as safetensors files (one
per transformer block or other parameter) whose headers record each shard's offsets (torch's
HuggingFaceStorageWriter/Reader), so a resume at another data-parallel size reads the rows it now owns. Those files
are read without unpickling anything: DCP's default FileSystemReader would unpickle its `.metadata` file (and
torch.load(weights_only=False) non-tensor entries), so it is not used.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model.args import ModelArgs
from util import memory
from util import output_dir as out_lock
from util.checkpoint import join_sharded_save, model_state, save_checkpoint
from util.checkpoint.files import publish_dir
from util.data import IGNORE_INDEX, InstructionDataset, ResumableDistributedSampler, make_loader
from util.dist import barrier, dp_group, mp_group, position
from util.loss import model_token_loss
from util.lr_sched import Schedule, set_lr
from util.quant import all_finite

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
TRAIN_STATE = "train_state.pt"
OPTIMIZER_DIR = "optimizer"  # FSDP: DCP shards of the optimizer state, one subdirectory per model-parallel rank
# Test hook: "ITERATION:SECONDS" pauses the save of that iteration's checkpoint after its model and optimizer files
# are written and before it is published, so a test can kill the process mid-save.
SAVE_PAUSE_ENV = "LAZYLLAMA_SAVE_PAUSE"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(ValueError):
    """The loss or the gradients stopped being finite (too high a learning rate, bad data): the run stops with the
    step named, and no non-finite checkpoint is published. A ValueError, so the entry scripts print one line."""


@dataclass
class TrainConfig:
    output_dir: Path
    batch_size: int = 4  # per data-parallel rank, per micro-step
    accum_iter: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4  # peak learning rate (after warmup)
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.02  # AdamW; never on norms, biases, gates (1-D parameters)
    warmup_iters: int | None = None  # linear warmup, in optimizer steps (wins over warmup_epochs)
    warmup_epochs: float = 0.0
    epochs: int = 1
    max_iters: int | None = None  # optimizer steps in all; wins over epochs
    clip_grad: float = 0.0  # max global grad norm (<= 0: no clipping; the norm is still logged)
    precision: str = "fp32"  # autocast dtype: bf16 | fp16 (with a GradScaler) | fp32
    data_parallel: str = "ddp"  # ddp | fsdp
    checkpointing: bool = False  # activation checkpointing per TransformerBlock
    save_interval: int = 1  # checkpoint every N epochs (0: never)
    save_iteration_interval: int = 0  # checkpoint every N optimizer steps (0: never)
    only_save_trainable: bool = (
        True  # checkpoints and final hold only the trainable tensors (always on a quantized base)
    )
    keep_last: int = 0  # keep the newest K checkpoints (0: keep all)
    seed: int = 0
    num_workers: int = 0
    log_interval: int = 1  # JSON-lines / TensorBoard every N optimizer steps
    tensorboard: bool = True
    max_bad_steps: int = 5  # stop after N optimizer steps in a row with a non-finite loss or grad norm (0: never)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        problems = []
        if self.batch_size < 1 or self.accum_iter < 1:
            problems.append(f"batch_size={self.batch_size} and accum_iter={self.accum_iter} must be >= 1")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} is not one of {sorted(PRECISIONS)}")
        if self.data_parallel not in ("ddp", "fsdp"):
            problems.append(f"data_parallel={self.data_parallel!r} is not 'ddp' or 'fsdp'")
        if self.max_iters is None and self.epochs < 1:
            problems.append(f"epochs={self.epochs}: train at least one epoch, or give max_iters")
        if self.max_iters is not None and self.max_iters < 1:
            problems.append(f"max_iters={self.max_iters} must be >= 1")
        if self.max_bad_steps < 0:
            problems.append(f"max_bad_steps={self.max_bad_steps} must be >= 0 (0: never stop)")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def examples_per_step(self) -> int:
        """Examples one optimizer step takes on each data-parallel rank."""
        return self.batch_size * self.accum_iter


# ----------------------------------------------------------------------------------------------------
# The model: master weights, activation checkpointing, data-parallel wrappers, optimizer groups
# ----------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def upcast_trainable_(model: nn.Module) -> int:
    """Trainable parameters become fp32 master weights (AdamW on bf16 weights loses small updates); the frozen
    base keeps its dtype. Autocast computes in the precision asked for. Returns the count changed."""
    changed = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            changed += 1
    return changed


def is_quantized(model: nn.Module) -> bool:
    return any(not p.dtype.is_floating_point for p in model.parameters())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (LoRA A/B, adapter prompts, linear weights, embeddings); none on
    norms, biases, gates and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise ValueError(
            "no trainable parameters: the config adds no adapters (lora_rank, adapter_len, bias_tuning, "
            "norm_tuning) and the base is quantized; add a LoRA config (e.g. --llama_config configs/lora_r16.json)"
        )
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def shard_dims_of(model: nn.Module) -> list[tuple[nn.Parameter, int | None]]:
    """(parameter, model-parallel split dim or None) for every trainable parameter, from the modules' shard_dims."""
    out, seen = [], set()
    for module in model.modules():
        dims = getattr(module, "shard_dims", {})
        for name, p in module._parameters.items():
            if p is None or not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            out.append((p, dims.get(name)))
    return out


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each TransformerBlock's activations in backward (non-reentrant torch.utils.checkpoint).

    The block's forward is wrapped in place, so parameter names and checkpoints are unchanged. Returns the count.
    """
    from model.llama import TransformerBlock

    count = 0
    for module in model.modules():
        if isinstance(module, TransformerBlock) and not isinstance(module.forward, functools.partial):
            module.forward = functools.partial(_checkpointed, module.forward)
            count += 1
    return count


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, group: dist.ProcessGroup | None, device: torch.device) -> nn.Module:
    """DDP over the data-parallel group for the trainable parameters only: frozen (quantized) weights and
    buffers are not broadcast at start and take no part in gradient synchronization."""
    ignored = [n for n, p in model.named_parameters() if not p.requires_grad]
    ignored += [n for n, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return nn.parallel.DistributedDataParallel(
        model,
        process_group=group,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
    )


def wrap_fsdp(model: nn.Module, group: dist.ProcessGroup | None, device: torch.device) -> nn.Module:
    """FSDP2: every TransformerBlock, then the root, sharded across the data-parallel group.

    A 4-bit base (QLoRA) is sharded too: its frozen uint8 codes become plain parameters (QuantLinear.make_shardable_)
    that FSDP2 all-gathers as bytes next to the fp32 adapters (only trainable parameters must share a dtype), and
    each rank keeps the small quantization state whole. Keep the codes uint8 (not bitsandbytes' float
    quant_storage): a MixedPrecisionPolicy's param_dtype casts float-stored codes as numbers, non-float ones never."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from model.llama import TransformerBlock
    from util.quant import QuantLinear

    if isinstance(model, FSDPModule):  # sharded on meta by build_model (each rank materialized its rows)
        return model
    int8 = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.spec.bits == 8]
    if int8:
        raise ValueError(
            f"--data_parallel fsdp cannot shard 8-bit weights ({int8[0]}, ...): bitsandbytes' 8-bit matmul reads "
            "its codes from a MatmulLtState FSDP does not see; use --quant 4bit, or --data_parallel ddp"
        )
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.make_shardable_(device)
    mesh = DeviceMesh.from_group(group or dist.group.WORLD, device_type=device.type)
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, mesh=mesh)
    # The root (embedding, final norm, head) stays gathered from its forward until backward: the chunked loss
    # (util.loss) applies the head outside the model's forward.
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """fp32 master weights, activation checkpointing if asked, then the data-parallel wrapper (none on one rank
    with DDP). The parameters keep their names; `unwrap` gives the model back."""
    upcast_trainable_(model)
    if cfg.checkpointing:
        enable_activation_checkpointing(model)
    if cfg.data_parallel == "fsdp":
        return wrap_fsdp(model, dp_group(), device)
    if position().data_parallel_size > 1:
        return wrap_ddp(model, dp_group(), device)
    return model


# ----------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------


def labelled_targets(labels: torch.Tensor) -> torch.Tensor:
    """Per example: how many of its next-token targets are in the loss."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


# ----------------------------------------------------------------------------------------------------
# Clipping
# ----------------------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor (FSDP2): this rank's shard


def _size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _norm_device(params: Sequence[tuple[nn.Parameter, int | None]], device: torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    grads = (p.grad.device for p, _ in params if p.grad is not None)
    return next(grads, next((_local(p).device for p, _ in params), torch.device("cpu")))


@torch.no_grad()
def clip_grad_norm_(
    params: Sequence[tuple[nn.Parameter, int | None]],
    max_norm: float,
    *,
    mp: dist.ProcessGroup | None = None,
    dp_sharded: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> float:
    """Global L2 norm of the gradients of a model-parallel (and possibly FSDP-sharded) model; scales them to
    max_norm when larger (max_norm <= 0: only measures).

    Split parameters (shard dim not None) hold different slices on each model-parallel rank: their squares are
    summed across `mp`. Replicated ones hold the same gradient on every model-parallel rank: counted once.
    `dp_sharded`: the group FSDP shards every parameter across (its squares are summed there first).
    `device`: where the sums are reduced (the training device); default: the gradients' device, else the parameters'
    - never the CPU by default on a GPU rank that has no gradient this step, since nccl cannot reduce CPU tensors.
    """
    device = _norm_device(params, device)
    split = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    mp_size = _size(mp)
    grads = []
    for p, dim in params:
        if p.grad is None:
            continue
        g = _local(p.grad)
        grads.append(g)
        sq = torch.linalg.vector_norm(g, 2, dtype=torch.float32).double() ** 2
        if dim is not None and mp_size > 1:
            split += sq
        else:
            replicated += sq
    if dp_sharded is not None and _size(dp_sharded) > 1:
        both = torch.stack([split, replicated])
        dist.all_reduce(both, group=dp_sharded)
        split, replicated = both[0], both[1]
    if mp_size > 1:
        dist.all_reduce(split, group=mp)
    total = float((split + replicated).sqrt())
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def training_dataset(dataset: InstructionDataset, model: nn.Module, args: ModelArgs) -> InstructionDataset:
    """The dataset as this model trains on it. Text data: as given. Image data: a copy (the caller's is not
    changed) that reads images with the visual backbone's preprocessing and cuts the text to the positions
    left after the image tokens."""
    if not getattr(dataset, "has_images", False):
        return dataset
    visual = getattr(model, "visual", None)
    if visual is None:
        raise ValueError(
            "image_conversation data needs a model with a visual backbone: set visual_backbone in the config"
        )
    room = args.max_seq_len - model.image_positions()  # image tokens come before the text
    if room < 2:
        raise ValueError(f"max_seq_len={args.max_seq_len} leaves no room for text after the image tokens")
    if dataset.max_words > room:
        log.info("max_words %d -> %d (max_seq_len minus the image's positions)", dataset.max_words, room)
    derived = copy.copy(dataset)  # shallow: the records are shared, read-only
    derived.preprocess = dataset.preprocess if dataset.preprocess is not None else visual.preprocess
    derived.max_words = min(dataset.max_words, room)
    return derived


# ----------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------


def _save_pt(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load_pt(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete or from another world size")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True refused an object; torch's own advice (weights_only=False) would run its code
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: refused, it holds objects other than tensors and plain values ({first[:200]}); it was not "
            "written by this trainer and is never loaded with code execution. Resume from a checkpoint this "
            "project wrote"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # a torn or truncated zip archive
        raise ValueError(
            f"{path}: truncated or corrupt ({' '.join(str(e).split())[:200]}); resume from an earlier checkpoint "
            "(checkpoints are published complete, so this file was damaged afterwards)"
        ) from None


def _check_tensors_only(sd: Any, where: Path, key: str = "") -> None:
    """The sharded optimizer checkpoint holds tensors only (anything else would be pickled by DCP)."""
    if isinstance(sd, dict):
        for k, v in sd.items():
            _check_tensors_only(v, where, f"{key}.{k}" if key else str(k))
    elif not isinstance(sd, torch.Tensor):
        raise TypeError(
            f"{where}: optimizer state {key!r} is a {type(sd).__name__}, not a tensor; the sharded checkpoint stores "
            "tensors only (an optimizer other than torch.optim.AdamW?)"
        )


def _optimizer_files(sd: dict[str, Any]) -> dict[str, int]:
    """DCP's flattened key of each optimizer tensor -> the file (1, 2, ...) it goes to on every rank: one per
    transformer block, one per other parameter. The safetensors writer builds each file in memory before writing it,
    so a file per block bounds that copy to one block's moments (one file would cost this rank's whole shard)."""
    groups: dict[str, int] = {}
    files: dict[str, int] = {}
    for fqn, state in sd["state"].items():
        block = re.match(r"(?:.*\.)?layers\.\d+\.", fqn)
        index = groups.setdefault(block.group(0) if block else fqn, len(groups) + 1)
        files.update({f"state.{fqn}.{name}": index for name in state})
    return files


def _sampler_state_at(state: dict[str, int], world_size: int, ckpt: Path) -> dict[str, int]:
    """The sampler's state for `world_size` data-parallel ranks. Ranks are dealt one permutation round-robin, so
    after each consumed `position` examples the epoch's first position x world_size are consumed whatever the size:
    the same global position, divided among this run's ranks. (The loop then restarts the epoch at step_in_epoch x
    examples_per_step, which is this position when the global batch is the one the checkpoint was trained with.)"""
    if state["world_size"] == world_size:
        return state
    consumed = state["position"] * state["world_size"]
    if consumed % world_size:
        raise ValueError(
            f"{ckpt}: {consumed} examples of epoch {state['epoch']} were consumed, which {world_size} data-parallel "
            "ranks cannot share evenly; resume at the data-parallel size it was saved with"
        )
    return {**state, "world_size": world_size, "position": consumed // world_size}


_PENDING_INTERRUPT: list[int] = []  # a Ctrl-C held by _interrupt_after (the save pause test hook ends on it)


@contextlib.contextmanager
def _interrupt_after(what: str):
    """A Ctrl-C (SIGINT) inside the block is held until the block ends, then raised: a save is finished rather
    than torn (torch.save interrupted midway also reports a misleading 'unexpected pos'). A second Ctrl-C aborts
    at once; the temp directory is then left for the next save to clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = _PENDING_INTERRUPT
    pending.clear()

    def hold(signum, frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)
        print(f"\ninterrupted: finishing {what} first (Ctrl-C again to abort it)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    except RuntimeError as e:  # torch.save's zip writer, torn by the second Ctrl-C, hides the interrupt
        if isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Published checkpoints, oldest first (temp directories of interrupted saves are hidden and skipped)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | Path, output_dir: Path) -> Path:
    """`resume` as a checkpoint directory; "latest" is the newest published one in output_dir."""
    if str(resume) == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no {CHECKPOINT_PREFIX}* directory in {output_dir}")
    path = found[-1] if str(resume) == "latest" else Path(resume)
    if not (path / TRAIN_STATE).is_file():
        raise FileNotFoundError(
            f"--resume {path}: not a training checkpoint (no {TRAIN_STATE}); pass a {CHECKPOINT_PREFIX}NNNNNNN "
            "directory written by main_finetune.py, or 'latest'"
        )
    _load_pt(path / TRAIN_STATE)  # small: a damaged or foreign file is reported before the model is built
    return path


def _rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """RNG states as tensors and plain types, so torch.load(weights_only=True) reads them back. CUDA: the state of
    this rank's device only (`device`), so a resume that sees fewer GPUs never touches one that is not there."""
    version, mt, gauss = random.getstate()
    npstate = np.random.get_state(legacy=False)
    device = torch.device(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "bit_generator": npstate["bit_generator"],
            "key": torch.from_numpy(npstate["state"]["key"].astype(np.int64)),
            "pos": int(npstate["state"]["pos"]),
            "has_gauss": int(npstate["has_gauss"]),
            "gauss": float(npstate["gauss"]),
        },
    }


def _set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu") -> None:
    """Restores what _rng_state saved; the CUDA state goes to this rank's `device` (a checkpoint written before
    states were per device holds a list over the GPUs then visible: this rank's entry is taken)."""
    torch.set_rng_state(state["torch"])
    device, cuda = torch.device(device), state.get("cuda")
    if device.type == "cuda" and cuda is not None:
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's state
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": key, "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )


class GroupGradScaler(torch.amp.GradScaler):
    """fp16 loss scaling that skips a step on every rank or on none.

    GradScaler checks this rank's gradients for inf/NaN. Under model parallel (or FSDP) each rank holds different
    shard gradients, so one rank can overflow alone: it would skip the step while the others take it, and the
    replicas drift apart silently. After unscaling, the overflow flag is all-reduced (max) over all ranks.
    (Data parallel alone sees equal gradients after DDP's all-reduce; the reduction is then a cheap no-op.)"""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        # GradScaler's per-optimizer record of the overflow flags, one per device (torch's ShardedGradScaler reads
        # it the same way). One reduction per rank whatever it holds, so that every rank makes the same calls.
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        flag = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        for f in found.values():
            flag = torch.maximum(flag, f.to(flag.device).reshape(()))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        for f in found.values():
            f.copy_(flag.reshape(f.shape))


# ----------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    loss: float  # the back-propagated loss (sum over the micro-batches), averaged over the data-parallel ranks
    lr: float
    grad_norm: float  # before clipping
    tokens: int  # tokens processed (padding included) by the whole data-parallel group
    empty_examples: int  # examples on this rank with no labelled target left after the cut to max_words
    skipped: bool = False  # the loss or grad norm was not finite: no update was made (the divergence guard)


class Trainer:
    """Owns the wrapped model, the optimizer, the data order and the position in training (iteration, epoch,
    step in epoch). The caller's config and dataset are not changed."""

    def __init__(
        self,
        model: nn.Module,
        args: ModelArgs,
        dataset: InstructionDataset,
        cfg: TrainConfig,
        *,
        device: torch.device | str = "cpu",
        base_checkpoints: Sequence[str | Path] = (),
    ) -> None:
        self.args, self.cfg, self.device = args, cfg, torch.device(device)
        self.base_checkpoints = [str(p) for p in base_checkpoints]
        self.pos, self.dp, self.mp = position(), dp_group(), mp_group()
        if self.pos.is_main:  # one run per output directory, for as long as this trainer lives
            out_lock.acquire(cfg.output_dir)
            weakref.finalize(self, out_lock.release, cfg.output_dir)
        self.fsdp = cfg.data_parallel == "fsdp"
        # a quantized base stays in its own checkpoint: saves hold the trainable tensors only
        self.only_save_trainable = cfg.only_save_trainable or is_quantized(model)
        if self.only_save_trainable != cfg.only_save_trainable:
            log.info("quantized base: checkpoints hold the trainable tensors only (the base stays in its checkpoint)")

        self.model = prepare_model(model, cfg, self.device)
        self.module = unwrap(self.model)
        self.params = shard_dims_of(self.module)
        self.optimizer = torch.optim.AdamW(param_groups(self.module, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        self.scaler = GroupGradScaler(self.device.type) if cfg.precision == "fp16" else None
        self._setup_data(dataset)

        self.iteration = 0  # optimizer steps done: the schedule's position
        self.epoch, self.step_in_epoch = 0, 0  # the data's position
        self.losses: list[float] = []
        self._last_saved: int | None = None
        self.bad_steps = 0  # steps in a row the divergence guard skipped
        self.empty_examples = 0  # examples whose response was cut away by max_words (reported per epoch)
        seed_everything(cfg.seed + self.pos.data_parallel_rank)  # dropout: equal across a model-parallel group

    def _setup_data(self, dataset: InstructionDataset) -> None:
        """Sampler and loader deal whole optimizer steps to every data-parallel rank; the schedule counts them."""
        cfg, pos = self.cfg, self.pos
        self.dataset = training_dataset(dataset, self.module, self.args)
        self.sampler = ResumableDistributedSampler(
            len(self.dataset), rank=pos.data_parallel_rank, world_size=pos.data_parallel_size, seed=cfg.seed
        )
        self.loader = make_loader(
            self.dataset, self.sampler, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed
        )
        self.steps_per_epoch = self.sampler.per_rank // cfg.examples_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.dataset)} examples over {pos.data_parallel_size} data-parallel rank(s) do not fill one "
                f"optimizer step of batch_size {cfg.batch_size} x accum_iter {cfg.accum_iter}; use a smaller batch "
                "or more data"
            )
        self.total_iters = cfg.max_iters or cfg.epochs * self.steps_per_epoch
        warmup = cfg.warmup_iters if cfg.warmup_iters is not None else round(cfg.warmup_epochs * self.steps_per_epoch)
        self.schedule = Schedule(cfg.lr, cfg.min_lr, warmup_iters=warmup, total_iters=self.total_iters)

    # --- one optimizer step ---------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[tuple[torch.Tensor, ...]]) -> StepResult:
        """One optimizer step over `micro_batches` ((tokens, labels[, images]) each): accumulate the gradients,
        clip, update at the schedule's learning rate, advance the iteration."""
        per_example = [labelled_targets(batch[1]) for batch in micro_batches]
        step_targets = self._step_divisor(int(sum(int(t.sum()) for t in per_example)))
        loss = self._accumulate_gradients(micro_batches, step_targets)
        lr = self.schedule(self.iteration)
        tokens = sum(batch[0].numel() for batch in micro_batches)
        # averaged over the data-parallel ranks before the update: every rank takes the same skip decision
        mean_loss, all_tokens = self._mean_loss_and_total_tokens(loss, tokens)
        grad_norm, updated = self._clip_and_update(lr, loss_finite=math.isfinite(mean_loss))
        self.iteration += 1
        empty = sum(int((t == 0).sum()) for t in per_example)
        return StepResult(mean_loss, lr, grad_norm, int(all_tokens), empty, skipped=not updated)

    def _micro_batch_loss(self, batch: tuple[torch.Tensor, ...], step_targets: float) -> torch.Tensor:
        tokens, labels, *images = (t.to(self.device, non_blocking=True) for t in batch)
        # The head in chunks (util.loss), outside the model's forward: under FSDP2 the root module (embedding, norm,
        # head) is not resharded after its forward, so the head's full weight is there until backward reshards it.
        with self._autocast():
            loss_sum, _ = model_token_loss(
                self.model, unwrap(self.model), tokens, labels, images=images[0] if images else None
            )
        return loss_sum / max(step_targets, 1)

    def _accumulate_gradients(
        self, micro_batches: Sequence[tuple[torch.Tensor, ...]], step_targets: float
    ) -> torch.Tensor:
        """Backward of each micro-batch's loss; gradients are synchronized across data parallel on the last one
        only. Returns the sum of the back-propagated losses (before fp16 loss scaling), in float64."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro_batches):
            with self._sync_gradients(i == len(micro_batches) - 1):
                loss = self._micro_batch_loss(batch, step_targets)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach().double()
        return total

    def _clip_and_update(self, lr: float, *, loss_finite: bool = True) -> tuple[float, bool]:
        """Unscale (fp16), clip the global grad norm, AdamW at `lr`, zero the gradients. Returns the norm before
        clipping and whether the update was made: a non-finite loss or grad norm skips it (the divergence guard),
        so NaN never reaches the weights or AdamW's moments. The norm is global (reduced over the model-parallel
        and FSDP groups, gradients already synchronized across data parallel): every rank decides alike."""
        set_lr(self.optimizer, lr)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        dp_sharded = self.dp if self.fsdp else None
        norm = clip_grad_norm_(self.params, self.cfg.clip_grad, mp=self.mp, dp_sharded=dp_sharded, device=self.device)
        updated = loss_finite and math.isfinite(norm)
        if self.scaler is not None:
            if loss_finite:  # the scaler skips a step whose gradients overflowed by itself, and lowers its scale
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif updated:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, updated

    def _step_divisor(self, local_targets: int) -> float:
        """What each rank divides its loss sum by: the labelled tokens of the whole data-parallel group's step over
        the group size (DDP and FSDP average the gradients over the group, which gives the size back). So the step
        is one large batch however its tokens fall on the ranks - not a mean of per-rank means."""
        if self.pos.data_parallel_size == 1:
            return local_targets
        total = torch.tensor(float(local_targets), dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.dp)
        return float(total) / self.pos.data_parallel_size

    def _mean_loss_and_total_tokens(self, loss: torch.Tensor, tokens: int) -> tuple[float, float]:
        """The step's loss over the data-parallel group (the ranks' losses summed over the group size: each rank's
        is its loss sum over the group's labelled tokens times the size), the tokens summed."""
        if self.pos.data_parallel_size == 1:
            return float(loss), float(tokens)
        both = torch.stack([loss, torch.tensor(float(tokens), dtype=torch.float64, device=self.device)])
        dist.all_reduce(both, group=self.dp)
        return float(both[0]) / self.pos.data_parallel_size, float(both[1])

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.cfg.precision])

    def _sync_gradients(self, sync: bool):
        """Gradient synchronization only on the last micro-step of an accumulation."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel) and not sync:
            return self.model.no_sync()
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # --- the loop -------------------------------------------------------------------------------------
    def fit(self) -> list[float]:
        """Train to total_iters; returns the loss of every optimizer step (StepResult.loss)."""
        self.model.train()
        logger = _Logger(self.cfg, self.pos.is_main, start=self.iteration)
        bar = tqdm(
            total=self.total_iters,
            initial=self.iteration,
            disable=not self.pos.is_main,
            desc="train",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        memory.reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            while self.iteration < self.total_iters:
                self._run_epoch(logger, bar)
        finally:
            bar.close()
            logger.close()
        return self.losses

    def _run_epoch(self, logger: _Logger, bar: tqdm) -> None:
        """From the data's position to the end of its epoch (or of training), with the checkpoints asked for."""
        cfg = self.cfg
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch, self.step_in_epoch * cfg.examples_per_step)
        batches = iter(self.loader)
        while self.step_in_epoch < self.steps_per_epoch and self.iteration < self.total_iters:
            t0 = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.accum_iter)]
            self.sampler.advance(cfg.examples_per_step)
            result = self.train_step(micro_batches)
            self.step_in_epoch += 1
            self._count_bad_step(result)
            self.losses.append(result.loss)
            self.empty_examples += result.empty_examples
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._report(result, time.perf_counter() - t0, logger, bar)
            if cfg.save_iteration_interval and self.iteration % cfg.save_iteration_interval == 0:
                self._save_unless_diverging()
        self._warn_empty_examples()
        epoch_done = self.step_in_epoch >= self.steps_per_epoch
        epoch_save = epoch_done and cfg.save_interval and (self.epoch + 1) % cfg.save_interval == 0
        if epoch_save and self._last_saved != self.iteration:
            self._save_unless_diverging()

    def _save_unless_diverging(self) -> None:
        """A checkpoint, unless the last step was skipped as non-finite: its weights are finite but are the ones that
        just gave NaN, and saving them could rotate the last good checkpoint out (--keep_last)."""
        if self.bad_steps:
            if self.pos.is_main:
                log.warning(
                    "iteration %d: checkpoint not written (the last step's loss or grad norm was not finite); %s",
                    self.iteration,
                    self._last_good(),
                )
            return
        self.save_checkpoint()

    def _count_bad_step(self, result: StepResult) -> None:
        """The divergence guard: a step with a non-finite loss or grad norm made no update; max_bad_steps of them in
        a row stop the run. An fp16 step whose gradients overflowed while the loss was finite is the GradScaler's
        own skip (it lowers the scale and tries again), not a bad step."""
        overflow = self.scaler is not None and math.isfinite(result.loss)
        if not result.skipped or overflow:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        limit = self.cfg.max_bad_steps
        if self.pos.is_main:
            log.warning(
                "iteration %d: loss %s, grad norm %s: update skipped (%d in a row%s)",
                self.iteration,
                result.loss,
                result.grad_norm,
                self.bad_steps,
                f", the run stops at {limit}" if limit else "",
            )
        if limit and self.bad_steps >= limit:
            first = self.iteration - self.bad_steps + 1
            raise TrainingDiverged(
                f"training diverged: iterations {first}-{self.iteration} all had a non-finite loss or gradient norm "
                f"(last: loss {result.loss}, grad norm {result.grad_norm}), so the run stopped at iteration "
                f"{self.iteration} (--max_bad_steps {limit}). {self._last_good()}; lower --lr (now {self.cfg.lr}) "
                "or check the data, then resume from it or start again"
            )

    def _last_good(self) -> str:
        last = self.last_checkpoint
        return f"The last checkpoint, {last}, is intact" if last is not None else "No checkpoint was written"

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest published checkpoint in output_dir (this run's or an earlier one's), or None."""
        found = list_checkpoints(self.cfg.output_dir)
        return found[-1] if found else None

    def _report(self, result: StepResult, seconds: float, logger: _Logger, bar: tqdm) -> None:
        tokens_per_s = result.tokens / seconds
        peak = memory.peak_device_memory(self.device) or memory.peak_rss_bytes()
        if not self.pos.is_main:
            return
        bar.update(1)
        postfix = f"loss {result.loss:.4f} lr {result.lr:.2e} {tokens_per_s:,.0f} tok/s peak {memory.fmt_bytes(peak)}"
        bar.set_postfix_str(postfix, refresh=False)
        if self.iteration % self.cfg.log_interval == 0 or self.iteration == self.total_iters:
            entry = {"iteration": self.iteration, "epoch": self.epoch, "loss": result.loss, "lr": result.lr}
            entry |= {"grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak}
            if result.skipped:
                entry["skipped"] = True
            logger.write({**entry, "time": time.time()})

    def _warn_empty_examples(self) -> None:
        if self.empty_examples and self.pos.is_main:
            log.warning(
                "epoch %d: %d example(s) on rank 0 had no response token left after the cut to max_words (they "
                "teach nothing); raise --max_words",
                self.epoch,
                self.empty_examples,
            )
        self.empty_examples = 0

    # --- checkpoints and resume -----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """All ranks: write checkpoint-NNNNNNN atomically (temp dir, then one rename by rank 0). Refused (the last
        good checkpoint stays, none rotates out) if a tensor to save is not finite. A Ctrl-C during the save lets it
        finish first, then stops the run with it as the checkpoint to resume from."""
        self._refuse_non_finite(f"checkpoint-{self.iteration:07d}")
        with _interrupt_after("the checkpoint save"):
            return self._save_checkpoint()

    def _save_checkpoint(self) -> Path:
        out_dir = self.cfg.output_dir
        final = out_dir / f"{CHECKPOINT_PREFIX}{self.iteration:07d}"
        tmp = out_dir / f".tmp-{final.name}"
        if self.pos.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps(tmp)
            tmp.mkdir()
        barrier()
        self._write_model(tmp)
        if self.fsdp:  # each rank its shards of the optimizer state
            self._save_sharded_optimizer(tmp / self._optimizer_dir())
        elif self.pos.writes:  # the same on every data-parallel rank
            _save_pt(self.optimizer.state_dict(), tmp / self._optimizer_file())
        self._pause_if_asked(tmp)
        _save_pt(_rng_state(self.device), tmp / f"rng.rank{self.pos.rank:05d}.pt")
        if self.pos.is_main:
            _save_pt(self._train_state(), tmp / TRAIN_STATE)
        barrier()
        if self.pos.is_main:
            publish_dir(tmp, final)
            if self.cfg.keep_last > 0:
                for old in list_checkpoints(out_dir)[: -self.cfg.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            log.info("saved %s", final)
        barrier()
        self._last_saved = self.iteration
        return final

    def _remove_stale_temps(self, tmp: Path) -> None:
        """Temp directories of interrupted saves. All of them only while this process holds the output directory's
        lock (then no other run can be writing one); otherwise only the one this save is about to use."""
        stale = self.cfg.output_dir.glob(".tmp-*") if out_lock.held(self.cfg.output_dir) else [tmp]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)

    def _refuse_non_finite(self, what: str) -> None:
        """All ranks: a save of NaN/Inf tensors is refused (never published, nothing rotated out); every rank
        learns whether any rank holds one, so all stop alike."""
        tensors, _ = model_state(self.module, trainable_only=self.only_save_trainable)
        bad = next((k for k, v in tensors.items() if not all_finite(_local(v))), None)
        flag = torch.tensor(float(bad is not None), device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise TrainingDiverged(
                f"iteration {self.iteration}: {what} not written: {repr(bad) if bad else 'a tensor on another rank'} "
                f"holds NaN or Inf. {self._last_good()}; lower --lr (now {self.cfg.lr}) or check the data"
            )

    def _train_state(self) -> dict[str, Any]:
        """Position, losses so far, loss scale, and what a resume must match (layout, steps per epoch)."""
        return {
            "iteration": self.iteration,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "sampler": self.sampler.state_dict(),
            "losses": list(self.losses),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "data_parallel_size": self.pos.data_parallel_size,
            "model_parallel_size": self.pos.model_parallel_size,
            "data_parallel": self.cfg.data_parallel,  # ddp | fsdp: which optimizer files the checkpoint holds
            "examples_per_step": self.cfg.examples_per_step,  # per rank; x data_parallel_size = the global batch
            "steps_per_epoch": self.steps_per_epoch,
            "total_iters": self.total_iters,
            "schedule": {"lr": self.cfg.lr, "min_lr": self.cfg.min_lr, "warmup_iters": self.schedule.warmup_iters},
        }

    def resume(self, ckpt: str | Path) -> None:
        """Continue from a checkpoint whose model tensors build_model already loaded: optimizer, schedule
        position, data position and RNG states."""
        ckpt = Path(ckpt)
        state = _load_pt(ckpt / TRAIN_STATE)
        self._check_resumable(ckpt, state)
        same_layout = state["data_parallel_size"] == self.pos.data_parallel_size
        self.sampler.load_state_dict(_sampler_state_at(state["sampler"], self.pos.data_parallel_size, ckpt))
        self.iteration, self.epoch, self.step_in_epoch = state["iteration"], state["epoch"], state["step_in_epoch"]
        self.losses = list(state["losses"])
        self._last_saved = self.iteration
        if self.fsdp:
            self._load_sharded_optimizer(ckpt / self._optimizer_dir())
        else:
            self.optimizer.load_state_dict(_load_pt(ckpt / self._optimizer_file()))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if same_layout:
            _set_rng_state(_load_pt(ckpt / f"rng.rank{self.pos.rank:05d}.pt"), self.device)
        else:  # no rank's streams continue another layout's; fresh ones, equal across a model-parallel group
            seed_everything(self.cfg.seed + self.pos.data_parallel_rank + 1_000_003 * (self.iteration + 1))
            if self.pos.is_main:
                log.info(
                    "resumed at data parallel %d (saved at %d): the same data order and position; the random "
                    "streams (dropout) start afresh",
                    self.pos.data_parallel_size,
                    state["data_parallel_size"],
                )
        if self.pos.is_main:
            where = f"epoch {self.epoch}, step {self.step_in_epoch}"
            log.info("resumed from %s at iteration %d (%s)", ckpt, self.iteration, where)

    def _check_resumable(self, ckpt: Path, state: dict[str, Any]) -> None:
        dp_size, mp_size = self.pos.data_parallel_size, self.pos.model_parallel_size
        saved_mode = state.get("data_parallel", "fsdp" if any(ckpt.glob("optimizer.rank*.pt")) else "ddp")
        if saved_mode != self.cfg.data_parallel:
            raise ValueError(
                f"{ckpt} was saved with --data_parallel {saved_mode} and this run has {self.cfg.data_parallel}: "
                "their optimizer states are stored differently; resume with the same --data_parallel"
            )
        if self.fsdp and not (ckpt / OPTIMIZER_DIR).is_dir():
            raise ValueError(
                f"{ckpt}: no {OPTIMIZER_DIR}/ directory (an FSDP checkpoint from before sharded optimizer checkpoints, "
                "optimizer.rankNNNNN.pt per rank, which this trainer no longer reads); its model still loads: start "
                f"a new run from it (--pretrained_path <base> {ckpt}) instead of resuming"
            )
        layout = f"data parallel {state['data_parallel_size']} x model parallel {state['model_parallel_size']}"
        if state["model_parallel_size"] != mp_size or (
            state["data_parallel_size"] != dp_size and not self._reshardable(ckpt, state)
        ):
            raise ValueError(
                f"{ckpt} was saved with {layout}; this run has {dp_size} x {mp_size}. Resume with the same "
                "layout (torchrun --nproc_per_node and --model_parallel_size) to continue the same data order"
                + (
                    " (--data_parallel fsdp checkpoints also resume at another data-parallel size with the same "
                    "model-parallel size and global batch)"
                    if not self.fsdp
                    else ""
                )
            )
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"{ckpt}: {state['steps_per_epoch']} steps per epoch when saved, {self.steps_per_epoch} now; resume "
                "with the same data config, batch_size and accum_iter"
            )
        done = state["iteration"]
        if done >= self.total_iters:
            raise ValueError(
                f"{ckpt} is at iteration {done} and this run has {self.total_iters} optimizer steps in all "
                "(--max_iters / --epochs): nothing is left to train; raise --max_iters to continue"
            )
        self._warn_schedule_change(ckpt, state)

    def _warn_schedule_change(self, ckpt: Path, state: dict[str, Any]) -> None:
        """The learning rate follows this run's schedule from the resumed iteration; say so when it is not the one
        the checkpoint was trained with (another --max_iters, --lr, --min_lr or warmup)."""
        saved = state.get("schedule", {})
        saved_total = state.get("total_iters", self.total_iters)
        now = {"lr": self.cfg.lr, "min_lr": self.cfg.min_lr, "warmup_iters": self.schedule.warmup_iters}
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
        if saved_total != self.total_iters:
            changed["total optimizer steps"] = (saved_total, self.total_iters)
        if not changed or not self.pos.is_main:
            return
        it = state["iteration"]
        before = Schedule(
            saved.get("lr", self.cfg.lr),
            saved.get("min_lr", self.cfg.min_lr),
            warmup_iters=saved.get("warmup_iters", self.schedule.warmup_iters),
            total_iters=saved_total,
        )(it)
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        log.warning(
            "resuming %s with another learning-rate schedule (%s): from iteration %d the lr follows the new one, "
            "%.3g now instead of %.3g; resume with the original values to continue the same run",
            ckpt,
            what,
            it,
            self.schedule(it),
            before,
        )

    def _reshardable(self, ckpt: Path, state: dict[str, Any]) -> bool:
        """Whether an FSDP checkpoint continues exactly at this run's data-parallel size (raises, saying why not,
        where it is an FSDP checkpoint that cannot). The optimizer shards are resharded by DCP; the data continues at
        the same global example when every optimizer step takes the same examples: the sampler deals one seeded
        permutation round-robin, so the first `position x data-parallel size` examples of the epoch are consumed at
        any size, and equal global batches make every step the same slice of it."""
        if not self.fsdp:
            return False
        where = f"{ckpt} (saved at data parallel {state['data_parallel_size']}, this run {self.pos.data_parallel_size})"
        saved_per_rank = state.get("examples_per_step")
        if saved_per_rank is None:
            raise ValueError(
                f"{where}: the checkpoint does not record its batch; resume at the same data-parallel size"
            )
        saved, now = (
            saved_per_rank * state["data_parallel_size"],
            self.cfg.examples_per_step * self.pos.data_parallel_size,
        )
        if saved != now:
            raise ValueError(
                f"{where}: each optimizer step took {saved} examples (batch_size x accum_iter x data-parallel size) "
                f"and would take {now} now; choose --batch_size and --accum_iter so that their product times "
                f"{self.pos.data_parallel_size} is {saved}, so every step sees the same examples"
            )
        return True

    def _optimizer_file(self) -> str:
        # DDP: the optimizer state is the same on every data-parallel rank (FSDP: see _optimizer_dir)
        return f"optimizer.mp{self.pos.model_parallel_rank:02d}.pt"

    def _optimizer_dir(self) -> str:
        # FSDP: one DCP checkpoint per model-parallel rank, written and read by its data-parallel group
        return f"{OPTIMIZER_DIR}/mp{self.pos.model_parallel_rank:02d}"

    def _save_sharded_optimizer(self, out: Path) -> None:
        """All ranks: this rank's shards of the optimizer state into `out` (DCP, safetensors); the parameter groups
        (hyperparameters and parameter names: plain values) into param_groups.pt by data-parallel rank 0."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sd = get_optimizer_state_dict(self.module, self.optimizer)
        groups = sd.pop("param_groups")
        _check_tensors_only(sd, out)
        files = _optimizer_files(sd)
        writer = dcp.HuggingFaceStorageWriter(str(out), fqn_to_index_mapping=files, save_distributed=True)
        dcp.save(sd, storage_writer=writer, process_group=self.dp or dist.group.WORLD)
        if self.pos.writes:
            _save_pt(groups, out / "param_groups.pt")

    def _load_sharded_optimizer(self, src: Path) -> None:
        """All ranks: the optimizer state from a DCP checkpoint of any data-parallel size: each rank reads the rows of
        its own shards (from safetensors headers and data; nothing is unpickled)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not src.is_dir():
            raise FileNotFoundError(
                f"{src} is missing: the checkpoint holds no optimizer state for model-parallel rank "
                f"{self.pos.model_parallel_rank}; resume with the model-parallel size it was saved with"
            )
        groups = _load_pt(src / "param_groups.pt")
        sd = get_optimizer_state_dict(self.module, self.optimizer)  # this layout's shards (a zero state), filled here
        sd.pop("param_groups")
        try:
            dcp.load(
                sd, storage_reader=dcp.HuggingFaceStorageReader(str(src)), process_group=self.dp or dist.group.WORLD
            )
        except Exception as e:  # DCP reports every rank's failure in one CheckpointException
            detail = " ".join(str(e).split())[:300]
            raise ValueError(
                f"{src}: the sharded optimizer state does not load into this model ({detail}); resume from a "
                "checkpoint this trainer wrote for the same model and config"
            ) from None
        set_optimizer_state_dict(self.module, self.optimizer, {**sd, "param_groups": groups})

    def _write_model(self, out: Path) -> None:
        """All ranks; data-parallel rank 0 writes each model-parallel shard. FSDP: each parameter is gathered at its
        turn in the file and dropped once written (a collective every data-parallel rank joins in the same order),
        so no rank holds more than one full tensor beyond its shards."""
        tensors, dims = model_state(self.module, trainable_only=self.only_save_trainable)
        if not self.pos.writes:
            if self.fsdp:
                join_sharded_save(tensors, shard_dims=dims, rank=self.pos.model_parallel_rank)
            return
        save_checkpoint(
            out,
            tensors,
            shard_dims=dims,
            rank=self.pos.model_parallel_rank,
            world_size=self.pos.model_parallel_size,
            config=self.args.to_dict(),
            trainable_only=self.only_save_trainable,
            extra={"base_checkpoints": self.base_checkpoints},
        )

    def _pause_if_asked(self, tmp: Path) -> None:
        spec = os.environ.get(SAVE_PAUSE_ENV)
        if not spec or not self.pos.is_main:
            return
        iteration, seconds = spec.split(":")
        if int(iteration) == self.iteration:
            print(f"pausing {seconds} s mid-save of {tmp} ({SAVE_PAUSE_ENV})", flush=True)
            end = time.monotonic() + float(seconds)
            while time.monotonic() < end and not _PENDING_INTERRUPT:  # a Ctrl-C ends the pause, the save goes on
                time.sleep(0.05)

    def save_final(self, out: str | Path, tokenizer_path: str | Path | None = None) -> Path:
        """All ranks: the trained model (trainable-only or full, with the full config in params.json, so
        build_model(None, [*base_checkpoints, out]) rebuilds it) and the tokenizer next to it; atomic."""
        out = Path(out)
        self._refuse_non_finite(str(out))
        with _interrupt_after(f"writing {out}"):
            return self._save_final(out, tokenizer_path)

    def _save_final(self, out: Path, tokenizer_path: str | Path | None) -> Path:
        tmp = out.with_name(f".tmp-{out.name}")
        if self.pos.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        self._write_model(tmp)
        barrier()
        if self.pos.is_main:
            if tokenizer_path is not None:
                from util.tokenizer import copy_tokenizer

                copy_tokenizer(tokenizer_path, tmp)  # tokenizer.model or tokenizer.json, with its config
            publish_dir(tmp, out)
        barrier()
        return out


class _Logger:
    """JSON lines (<output_dir>/log.jsonl) and TensorBoard (<output_dir>/tensorboard) on rank 0."""

    def __init__(self, cfg: TrainConfig, enabled: bool, *, start: int) -> None:
        self.enabled, self.writer, self.file = enabled, None, None
        if not enabled:
            return
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(cfg.output_dir / "log.jsonl", "a")  # noqa: SIM115 - open for the whole run, closed in close()
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    f"TensorBoard logging needs the tensorboard package ({e}): pip install tensorboard, or pass "
                    "--no_tensorboard"
                ) from None
            # purge_step: a resumed run replaces what an interrupted one logged after its checkpoint
            self.writer = SummaryWriter(str(cfg.output_dir / "tensorboard"), purge_step=start or None)

    def write(self, entry: dict[str, Any]) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes"):
                self.writer.add_scalar(f"train/{key}", entry[key], entry["iteration"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def config_from(opts: Any, **overrides: Any) -> TrainConfig:
    """A TrainConfig from an argparse namespace (fields of the same name), then overrides."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(opts).items() if k in names and v is not None}
    values.update(overrides)
    return TrainConfig(**values)
