"""The host's memory: what is available, byte counts for messages, and the check a size passes before it is
allocated (a size read from a file or a config must not end in a ``MemoryError`` traceback)."""

from __future__ import annotations

import psutil

from vesuvius_monai.errors import VesuviusError


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def available_memory() -> int:
    """Bytes of host memory available to a new allocation (psutil's ``available``)."""
    return int(psutil.virtual_memory().available)


def check_memory(need: int, what: str, have: int | None = None, device: str = "cpu") -> None:
    """Raise a VesuviusError ``"{what} needs at least N of memory, more than the M available on DEVICE"`` when
    ``need`` bytes exceed ``have`` (default: the host's available memory)."""
    have = available_memory() if have is None else have
    if need > have:
        raise VesuviusError(f"{what} needs at least {format_bytes(need)} of memory, more than the "
                            f"{format_bytes(have)} available on {device}")
