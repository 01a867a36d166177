"""Giving freed memory back to the operating system, and reading what the process holds.

glibc serves allocations below its (adaptive, up to 32 MiB) mmap threshold from heaps it keeps:
a layer's temporaries freed between two long-lived tensors leave holes that stay resident. A
compression frees such temporaries for every layer, so the resident set drifts far above what is
alive. :func:`release_memory` hands whole free pages back (``malloc_trim``); it costs about a
millisecond and does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from functools import cache


@cache
def _malloc_trim():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_memory() -> bool:
    """Return the free pages of the C heap to the system; ``True`` if anything was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def resident_bytes() -> int | None:
    """The process's resident set now (Linux ``/proc``), or ``None`` where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_bytes() -> int:
    """The process's peak resident set so far: Linux's ``VmHWM`` (this program's own, from its ``exec``), else
    ``ru_maxrss`` (kilobytes on Linux, bytes on macOS). ``ru_maxrss`` is not used on Linux where ``VmHWM`` can
    be read: it carries the parent's resident set at ``fork`` across ``exec``, so a process started by a large
    one would report the parent's size as its own peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


__all__ = ["peak_resident_bytes", "release_memory", "resident_bytes"]
