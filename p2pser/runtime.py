"""Process-wide runtime settings that must be applied before heavy libraries start work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def ensure_numba_cache() -> None:
    """librosa's numba kernels need a writable cache; default it when the user has not set one."""
    if not os.environ.get("NUMBA_CACHE_DIR"):
        path = Path(tempfile.gettempdir()) / "p2pser-numba-cache"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = str(path)


def pin_threads(n: int = 1) -> None:
    """Pin torch and BLAS to ``n`` threads: many peers share 2 cores, oversubscription slows all of them."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # interop threads can only be set before the first parallel op; harmless if already set
