"""Process-wide runtime settings that must be applied before heavy libraries start work."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
from pathlib import Path

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned = False


def ensure_numba_cache() -> None:
    """librosa's numba kernels need a writable cache; default it when the user has not set one."""
    if not os.environ.get("NUMBA_CACHE_DIR"):
        path = Path(tempfile.gettempdir()) / "p2pser-numba-cache"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = str(path)


def pin_threads(n: int = 1) -> None:
    """Pin torch and BLAS to ``n`` threads: many peers share 2 cores, oversubscription slows all of them.
    Every heavy process calls this first, so it also keeps freed memory for reuse (``tune_allocator``)."""
    tune_allocator()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # interop threads can only be set before the first parallel op; harmless if already set


def tune_allocator() -> None:
    """Keep large freed blocks in the process instead of handing them back to the kernel at every ``free``.

    A peer's round allocates and frees tensors of its whole parameter vector several times (gradients, the
    optimiser's temporaries, the float64 sums of mixing: 6.7-13 MB each for the 1.67 M-parameter ``mlp``).
    glibc serves blocks that large by ``mmap`` or trims them off the heap when freed, so every one came back
    as fresh pages the kernel had to zero: a step took 20.2 ms of CPU, 12.4 ms with both thresholds raised
    and the same pages reused (``benchmarks/results/step.json``). Only where memory lives changes, never a
    computed value. No-op off glibc."""
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    keep_blocks_up_to(64 << 20)


_kept_block_bytes = 0
MAX_KEPT_BLOCK = 1 << 30


def keep_blocks_up_to(nbytes: int) -> None:
    """Serve blocks up to ``nbytes`` (at most 1 GB) from the heap and keep up to 4x that free at its top:
    only ever raised. ``tune_allocator`` asks for 64 MB; utterance-level DP asks for its per-sample
    gradients' size (a batch of 16 x the 1.67 M-parameter ``mlp`` is 107 MB, mapped afresh and faulted in
    at every step otherwise: 198 against 65 ms a step, ``benchmarks/results/dp_step.json``). A process
    then holds on to up to 4x ``nbytes`` of freed memory. No-op off glibc."""
    global _kept_block_bytes
    nbytes = min(int(nbytes), MAX_KEPT_BLOCK)
    if nbytes <= _kept_block_bytes:
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return
    _kept_block_bytes = nbytes
    mallopt(_M_MMAP_THRESHOLD, nbytes)  # blocks below this come from the heap ...
    mallopt(_M_TRIM_THRESHOLD, 4 * nbytes)  # ... which keeps up to 4x as much free at its top instead of trimming
