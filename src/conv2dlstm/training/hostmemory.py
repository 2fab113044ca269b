"""The host memory torch frees stays with the process, as TensorFlow's allocator keeps it.

torch allocates each CPU tensor with ``malloc`` and releases it with ``free``. glibc serves a request
above its mmap threshold (128 KiB at first, at most 32 MiB) with fresh pages from the kernel and gives
them back on ``free``, so the large activations of a training step (the notebook network's first
convolution writes 163 MB per batch at 128 x 128) arrive as new pages at every step, and the kernel
zeroes each 4 KiB page when it is first touched. That cost exceeded the arithmetic: with this
module, the notebook network's training step at 128 x 128 runs 2.4x as fast, with 94% fewer page
faults, and its forward pass as fast as Keras's on the same oneDNN kernels (bench/host_memory.py,
bench/keras_side_by_side.py, docs/performance.md). TensorFlow keeps the memory it frees in its own
allocator.

:func:`retain_freed_memory` tells glibc (``mallopt``) to serve every block from its heap
(``M_MMAP_MAX = 0``) and to keep up to 2 GiB of free memory at the heap's top (``M_TRIM_THRESHOLD``):
after the first steps, a step reuses the pages of the last one. Memory freed is no longer given
back, as a GPU's caching allocator keeps its own, and the heap fragments: the peak resident memory
of a training process rose by up to a fifth at 128 x 128. It runs when :mod:`conv2dlstm.training`
is imported, so in every process that runs a network (train, evaluate, forecast, the benchmarks)
and in no data step (regrid, normalize, windows), whose memory is bounded by chunks and measured
as such.

An environment that tunes glibc's allocator itself (any ``MALLOC_*_`` variable glibc reads, or
``glibc.malloc`` in ``GLIBC_TUNABLES``) wins, untouched; so does another C library (nothing to set).
``CONV2DLSTM_MALLOC=system`` leaves glibc as it comes (the benchmarks' baseline; setting one of
glibc's variables instead would also switch off its dynamic mmap threshold, a third behaviour).
"""

from __future__ import annotations

import ctypes
import os
import platform

from conv2dlstm.errors import ConfigError

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes of free memory kept at the heap's top (mallopt takes an int)

ENVIRONMENT = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
)
"""Variables by which an environment tunes glibc's allocator (read by glibc when the process starts)."""

OPT_OUT = "CONV2DLSTM_MALLOC"
"""``system`` leaves the C library's allocator as it comes; unset or ``keep``: :func:`retain_freed_memory` acts."""

_state: str | None = None


def environment_tuning(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """The allocator settings the environment gives glibc, as ``NAME=value`` text, or None when it gives none."""
    given = [f"{name}={environ[name]}" for name in ENVIRONMENT if name in environ]
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        given.append(f"GLIBC_TUNABLES={tunables}")
    return " ".join(given) or None


def retain_freed_memory() -> str:
    """Keep the memory torch frees in this process (module docstring); return what was done, in words.

    Idempotent. Nothing is set under another C library than glibc or when the environment tunes
    glibc's allocator itself; the returned text says which.
    """
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(OPT_OUT, "keep")
    if choice not in ("keep", "system"):
        raise ConfigError(f"{OPT_OUT}={choice!r} is not keep or system; unset it (keep) or set it to system")
    given = environment_tuning()
    if choice == "system":
        _state = f"the C library's malloc as it comes ({OPT_OUT}=system)"
    elif given:
        _state = f"glibc malloc as the environment sets it ({given})"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = f"the C library's own malloc ({platform.system()} {platform.libc_ver()[0] or 'libc'})"
    else:
        libc = ctypes.CDLL(None)
        if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
            raise RuntimeError("glibc refused mallopt(M_MMAP_MAX, 0) or mallopt(M_TRIM_THRESHOLD, 2**31 - 1)")
        _state = f"freed memory kept (glibc mallopt M_MMAP_MAX=0 M_TRIM_THRESHOLD={TRIM_THRESHOLD})"
    return _state
