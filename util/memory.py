"""Process memory readings for the per-stage memory report (Linux /proc; harmless elsewhere)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

import torch

_libc = None


def libc() -> ctypes.CDLL | None:
    """The C library, loaded once for the process (malloc_trim here, madvise in util.checkpoint.release); None if
    it cannot be loaded."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return _libc or None


def malloc_trim() -> None:
    """Give the C heap's free pages back to the OS (glibc keeps freed quantizer temporaries otherwise)."""
    c = libc()
    if c is not None and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak RSS since the start or the last reset_peak_rss()."""
    kib = _status_kib("VmHWM")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so a stage's own peak can be read. False if unsupported."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peak_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} GiB"


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, quantization state included."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_meta:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard: the rows this process holds
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for part in (qs.absmax, qs.code, getattr(qs.state2, "absmax", None), getattr(qs.state2, "code", None)):
                if isinstance(part, torch.Tensor):
                    total += part.numel() * part.element_size()
    for m in module.modules():  # 8-bit row scales live in the matmul state
        state = getattr(m, "state", None)
        scb = getattr(state, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total
