"""Shared fixtures: paths to the real corpora in ../shared/data and a small synthetic corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic corpus written once per session: 6 speakers (3 F, 3 M) x 6 emotions x 8 takes,
    seed 0, 16 kHz; the folder holds <speaker>/*.wav, manifest.csv and folds.json (3 folds)."""
    from p2pser.audio.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("synth_corpus")
    synthesize_corpus(root, speakers=6, per_emotion=8, seed=0)
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Test batches are tiny: extra threads only add synchronisation, which costs seconds on 2 shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory, synth_corpus) -> Path:
    """The synthetic corpus' features for the multi-host tests, extracted once per session."""
    from test_netns import warm_feature_cache

    return warm_feature_cache(tmp_path_factory, synth_corpus)


@pytest.fixture
def bed(request) -> str:
    """A three-host network-namespace test bed, torn down even when the test fails."""
    from test_netns import start_bed

    return start_bed(request)
