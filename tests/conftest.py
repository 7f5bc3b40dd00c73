"""Shared fixtures: paths to the real corpora in ../shared/data and a small synthetic corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pser.runtime import ensure_numba_cache

REPO = Path(__file__).resolve().parents[1]
# CI and developers keep the real corpora beside the clone; P2PSER_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("P2PSER_SHARED_DATA", REPO.parent / "shared" / "data"))

ensure_numba_cache()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ravdess").is_dir():
        pytest.fail(f"real corpora not found at {SHARED_DATA}; set P2PSER_SHARED_DATA")
    return SHARED_DATA
