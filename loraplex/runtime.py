"""Process settings a CPU inference engine needs: one OpenMP team, and freed memory kept for reuse.

**One OpenMP team per process.** torch's CPU kernels run on OpenMP (libgomp), which gives every OS
thread that enters a parallel region a team of its own, kept for the thread's life. Once the process
holds more team threads than it has CPUs, libgomp stops spinning between parallel regions and puts its
workers to sleep on a futex after ~100 spins, so each of the thousands of small parallel regions in a
decode step pays a sleep and a wake-up (measured on 2 cores: ~40,000 wake-ups per 64-step run and
steps 15–30 % slower while a second team merely existed). Helper threads that touch tensors (adapter
loading and packing) therefore run their torch work on one thread, and the server builds its model on
the engine thread rather than the main one.

**Freed memory kept.** A decode step allocates and frees the same large tensors every time (logits,
log-probabilities, top-p's sort: `batch × vocab` floats, 6 MB each at batch 32 on a 49k vocabulary).
glibc serves an allocation at or above its mmap threshold with a fresh mapping and unmaps it on free,
and a thread's own arena grows in 64 MB heaps that are unmapped again once empty, so every step
page-faults the same megabytes back in (measured: 2,000–6,500 faults per step, several ms). The
thresholds are raised and every thread shares the main heap, so such buffers are reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 32 << 20
"""Allocations below this come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD_BYTES = 256 << 20
"""Free memory at the top of a heap is returned to the OS only beyond this much."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h


@functools.cache
def _thread_count_setters() -> list[Callable[..., int]]:
    """The per-thread count setters of the OpenMP and MKL runtimes torch uses, where they can be found."""
    setters: list[Callable[..., int]] = []
    if torch.backends.openmp.is_available():
        with contextlib.suppress(OSError, AttributeError):
            # The libgomp torch already loaded (same soname): its per-thread setting is what torch reads.
            setters.append(ctypes.CDLL("libgomp.so.1").omp_set_num_threads)
    if torch.backends.mkl.is_available():
        with contextlib.suppress(OSError, AttributeError):
            # MKL (linked into libtorch_cpu) keeps a count of its own once torch.set_num_threads has run.
            setters.append(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
                           .MKL_Set_Num_Threads_Local)
    return setters  # both take and return a C int, ctypes' default


def use_one_torch_thread() -> None:
    """Run this (helper) thread's torch ops on this thread alone, without an OpenMP team of its own.

    Other threads keep their own settings: unlike `torch.set_num_threads`, which also changes the count
    every thread started later begins with, this sets the calling thread's OpenMP and MKL values only.
    Where those runtimes cannot be found (another platform or build) it does nothing.
    """
    torch.get_num_threads()  # torch sets each thread's count on its first use; that must come before ours
    for fn in _thread_count_setters():
        fn(1)


def _glibc(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """The C library's function `name` (returning an int) on Linux with glibc; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except AttributeError:
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn  # type: ignore[no-any-return]


@functools.cache
def _malloc_trim() -> Callable[..., int] | None:
    return _glibc("malloc_trim", [ctypes.c_size_t])


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS now (glibc's `malloc_trim`; elsewhere nothing). For loads that
    free large buffers one after another: glibc keeps them (the thresholds above, and its own), and the next
    ones do not always land in them, so without this a quantizing load's resident memory grew by every layer's
    float weight (docs/benchmarks.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def keep_freed_memory(device: torch.device) -> bool:
    """For an engine on `device`: tune glibc malloc (once per process) so per-step buffers are reused,
    not unmapped and faulted back in. Call it before starting the thread that will run the model: a
    thread that has already allocated keeps its own arena. Returns whether it applied: only a CPU
    engine's step tensors live in malloc'd memory, and elsewhere (musl, macOS, Windows) it does nothing."""
    return device.type == "cpu" and _tune_malloc()


@functools.cache
def _tune_malloc() -> bool:
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    ok = all(mallopt(option, value) for option, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES), (_M_ARENA_MAX, 1)))
    if not ok:
        log.debug("mallopt refused the thresholds; freed buffers may be unmapped each step")
    return ok
