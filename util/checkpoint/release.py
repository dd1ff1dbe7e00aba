"""Giving the pages of memory-mapped checkpoint files back to the OS (madvise MADV_DONTNEED; Linux only).

Readers map checkpoint files privately and read-only; once a tensor is loaded into the model, its pages of the
file are only cache. Dropping them keeps the loader's resident memory near one tensor instead of the whole file.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

import torch

from util import memory

_MADV_DONTNEED = 4  # Linux value
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _madvise() -> Any:
    """libc's madvise with its C signature, or None where there is none (release() then does nothing)."""
    libc = memory.libc() if sys.platform.startswith("linux") else None
    fn = getattr(libc, "madvise", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def dontneed(addr: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) the pages covering [addr, addr+nbytes) of a private, file-backed mapping.

    Only ever called on ranges inside file mappings the readers made (or torch.load(mmap=True) made): there
    the kernel drops the pages and re-reads them from the file on the next touch. The range is widened to
    whole pages; neighbouring tensors sharing an edge page simply fault it back in. Best effort: errors are
    ignored because releasing is an optimisation, never needed for correctness.
    """
    if _MADVISE is None or nbytes <= 0:
        return
    start = addr - addr % _PAGE
    end = -(-(addr + nbytes) // _PAGE) * _PAGE
    _MADVISE(start, end - start, _MADV_DONTNEED)


def tensor_span(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the memory a strided tensor touches."""
    if t.numel() == 0:
        return t.data_ptr(), 0
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), extent * t.element_size()
