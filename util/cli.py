"""What both entry scripts (main_finetune.py, demo.py) share: a configuration mistake as one `error: ...` line and
exit 2, logging, the lifetime of the process groups, and writing a pre-quantized model."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

TRACEBACK_ENV = "LAZYLLAMA_TRACEBACK"
# What a wrong argument, config, checkpoint, tokenizer or data file raises (CheckpointError is a ValueError; a
# checkpoint key that fits no tensor is a KeyError; a config value of the wrong type a TypeError).
CONFIG_ERRORS = (ValueError, TypeError, KeyError, OSError)


def error_line(e: BaseException) -> str:
    """`error: <message>` on one line (a KeyError's message without the quotes str() adds)."""
    message = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
    return "error: " + (" ".join(str(message).split()) or type(e).__name__)


def run(main: Callable[[], object]) -> int:
    """Run an entry script's main() and return its exit status: a configuration mistake is one `error: ...` line on
    stderr and 2, not a traceback; LAZYLLAMA_TRACEBACK=1 raises it (with the traceback) for debugging. Use as
    `sys.exit(run(main))`."""
    try:
        result = main()
    except CONFIG_ERRORS as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(error_line(e), file=sys.stderr, flush=True)
        return 2
    return result if isinstance(result, int) else 0


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(level: int = logging.INFO) -> None:
    """Messages only, from rank 0 (the other ranks warn); bitsandbytes' import chatter silenced."""
    logging.basicConfig(level=level if is_main_process() else logging.WARNING, format="%(message)s", force=True)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@contextlib.contextmanager
def process_groups() -> Iterator[None]:
    """Tear down on exit the process groups set up inside the block, not those the caller had (tests drive main()
    inside their own groups)."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_mp

    from util.dist import shutdown

    had_process_group, had_model_parallel = dist.is_initialized(), fs_mp.model_parallel_is_initialized()
    try:
        yield
    finally:
        if not had_model_parallel:
            shutdown(keep_process_group=had_process_group)


def save_quantized_for_reuse(model, out_dir: str | Path, say: Callable[[str], None]) -> None:
    """--save_quantized: every rank writes its file, all wait for each other (the directory is complete before
    anyone reads it), then `say` tells how to use it."""
    import torch.distributed as dist

    from util.checkpoint import save_quantized

    save_quantized(model, out_dir)
    if dist.is_initialized():
        dist.barrier()
    if is_main_process():
        say(f"saved the quantized model to {out_dir}: pass it as --pretrained_path to skip quantizing")
