"""Keep XLA's large host buffers mapped between calls (glibc malloc settings, Linux).

XLA on CPU allocates each call's scratch buffer in one piece (85 MB for a force call of
the small model on 500 atoms, 2 GB for the default model) with ``posix_memalign``.
glibc serves a block that large from fresh ``mmap`` pages, in a per-thread arena, and
unmaps it when the call ends, so every call faults its whole scratch buffer into memory
again. On a 2-core VM that doubled the time of a small model's force call (110 ms
against 55 ms; ``docs/benchmarks.md``). With one arena, no ``mmap`` and no trimming,
a freed block stays in the heap and the next call reuses it without a page fault.

The price: memory freed by the process is kept by it for reuse, not returned to the
system, so the resident size stays at its peak. Set ``MLIP_KEEP_HOST_MEMORY=0`` (or
``false``, ``no``, ``off``) to keep glibc's defaults. The settings only reach threads that have not allocated yet, so
``import mlip`` before the first JAX computation (the CLI does).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

applied = False  # True once the settings are in force in this process


def keep_host_memory() -> bool:
    """Apply the settings once (glibc on Linux only); True if they are in force."""
    global applied
    if applied:
        return True
    switched_off = os.environ.get("MLIP_KEEP_HOST_MEMORY", "1").strip().lower() in ("0", "false", "no", "off")
    if switched_off or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # One arena: in another thread's arena glibc maps a block over 64 MB with mmap even
    # with mmap switched off. Then no mmap at all, and no returning of the heap's top.
    applied = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                   and mallopt(_M_TRIM_THRESHOLD, -1))
    return applied
