"""Writing a file so that a crash at any moment leaves either the old content or the new, never a torn file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temporary_of(path: Path) -> Path:
    """Where ``write_atomically`` writes before renaming: a leftover one marks a write cut short."""
    return path.with_name(path.name + ".tmp")


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object], *, durable: bool = True) -> None:
    """Write through ``write(fh)`` to a temporary file beside ``path``, then rename it over ``path``.

    ``durable`` also fsyncs the file and its folder, so the new content survives a power cut, not only a
    killed process (checkpoints and models; the simulator, whose crashes are simulated, skips it).
    """
    path = Path(path)
    tmp = temporary_of(path)
    with open(tmp, "wb") as fh:
        write(fh)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
