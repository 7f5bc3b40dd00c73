"""One peer's own data, ready for its learner: train and validation arrays normalised with its own
statistics, and the fold's shared test set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from p2pser.learn.normalize import Normalizer


@dataclass
class PeerData:
    """A peer's own training and validation utterances (normalised with its own statistics) and the
    fold's test set (shared, read-only; normalised batch by batch at evaluation so that many simulated
    peers never hold copies of it)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    lengths_test: np.ndarray  # valid frames per test utterance: padding stays exactly zero when normalised
    classes: list[str]
    normalizer: Normalizer

    @classmethod
    def from_arrays(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        lengths: np.ndarray,
        own: np.ndarray,
        test: tuple[np.ndarray, np.ndarray, np.ndarray],
        classes: Sequence[str],
        *,
        val_fraction: float,
        seed: int,
    ) -> PeerData:
        """Split the peer's own rows ``own`` of ``x`` into train and validation; ``test`` = (x, y, lengths)
        of the fold's test set, shared, not copied."""
        rng = np.random.default_rng(seed)
        own = rng.permutation(np.asarray(own))
        n_val = round(len(own) * val_fraction) if len(own) > 2 else 0
        val, train = own[:n_val], own[n_val:]
        normalizer = Normalizer.fit(x[train], lengths[train])
        x_test, y_test, lengths_test = test
        return cls(
            x_train=normalizer.apply(x[train], lengths[train]),
            y_train=y[train],
            x_val=normalizer.apply(x[val], lengths[val]),
            y_val=y[val],
            x_test=x_test,
            y_test=y_test,
            lengths_test=lengths_test,
            classes=list(classes),
            normalizer=normalizer,
        )

    def test_inputs(self) -> np.ndarray:
        """The test set as this peer's model sees it: standardised with this peer's statistics."""
        return self.normalizer.apply(self.x_test, self.lengths_test)
