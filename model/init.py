"""Where modules put their tensors while being built: on meta (no storage, no init work), or for real.

This is the bottom of the lazy build: model/ modules use `real_init()` for parts that bring their own weights
(a visual backbone); util.lazy_init re-exports both and owns materialization.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_outer_device: list[torch.device] = []


@contextlib.contextmanager
def meta_init(dtype: torch.dtype | None = None) -> Iterator[None]:
    """Modules created inside hold meta tensors only (no storage, no init work), of `dtype` if given.

    The global default device and dtype are restored on exit, also when the body raises.
    """
    old_dtype = torch.get_default_dtype()
    _outer_device.append(torch.get_default_device())
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device("meta"):
            yield
    finally:
        _outer_device.pop()
        torch.set_default_dtype(old_dtype)


@contextlib.contextmanager
def real_init(dtype: torch.dtype | None = None) -> Iterator[None]:
    """Escape hatch inside meta_init(): build real modules (e.g. a visual backbone that brings its own weights).

    Tensors are created on the device that was the default outside meta_init, in `dtype` (default: fp32, since
    third-party constructors expect it). Default state is restored on exit, also when the body raises.
    """
    old_dtype = torch.get_default_dtype()
    device = _outer_device[-1] if _outer_device else torch.get_default_device()
    try:
        torch.set_default_dtype(dtype or torch.float32)
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old_dtype)
