"""One peer's own data, ready for its learner: train and validation arrays standardised as the run's
``normalizer`` mode says (``p2pser.features.normalize``), and the fold's shared test set."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from p2pser.features.augment import Copies
from p2pser.features.normalize import Normalizer, moments, standardize_by_speaker


@dataclass
class PeerData:
    """A peer's own training and validation utterances and the fold's test set (shared, read-only; in the
    ``local`` and ``global`` modes standardised batch by batch at evaluation, so that many simulated peers
    never hold copies of it; in the ``speaker`` mode it arrives standardised per test speaker)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    lengths_test: np.ndarray  # valid frames per test utterance: padding stays exactly zero when normalised
    classes: list[str]
    normalizer: Normalizer
    mode: str = "local"
    # The ``global`` mode keeps its raw (x, lengths) of train and validation until the peers have agreed on
    # the statistics (``adopt``): until then it standardises with its own.
    raw: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

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
        mode: str = "local",
        speakers: np.ndarray | None = None,
        copies: Copies | None = None,
    ) -> PeerData:
        """Split the peer's own rows ``own`` of ``x`` into train and validation; ``test`` = (x, y, lengths)
        of the fold's test set, shared, not copied (already standardised per speaker in ``speaker`` mode).
        ``speakers`` (per row of ``x``) is needed by the ``speaker`` mode. ``copies``: perturbed copies of
        rows of ``x`` (``--augment``); those of the training part join it, those of validation are dropped."""
        rng = np.random.default_rng(seed)
        own = rng.permutation(np.asarray(own))
        n_val = round(len(own) * val_fraction) if len(own) > 2 else 0
        val, train = own[:n_val], own[n_val:]
        extra = copies.of(train) if copies is not None else None
        x_test, y_test, lengths_test = test
        y_train = y[train] if extra is None else np.concatenate([y[train], y[extra.source]])
        common = {"y_train": y_train, "y_val": y[val], "x_test": x_test, "y_test": y_test,
                  "lengths_test": lengths_test, "classes": list(classes), "mode": mode}
        if mode == "speaker":
            if speakers is None:
                raise ValueError("the speaker normaliser needs each row's speaker")
            # Statistics over all of a speaker's own audio (training and validation utterances alike); a
            # perturbed copy is a speaker of its own (p2pser.features.augment).
            scaled = standardize_by_speaker(x[own], lengths[own], np.asarray(speakers)[own])
            x_train = scaled[n_val:]
            if extra is not None:
                x_train = np.concatenate([x_train, standardize_by_speaker(extra.x, extra.lengths, extra.speakers)])
            return cls(x_train=x_train, x_val=scaled[:n_val], normalizer=Normalizer.identity(x.shape[1]), **common)
        x_train, lengths_train = x[train], lengths[train]
        if extra is not None:
            x_train, lengths_train = np.concatenate([x_train, extra.x]), np.concatenate([lengths_train, extra.lengths])
        normalizer = Normalizer.fit(x_train, lengths_train)
        raw = (x_train, lengths_train, x[val], lengths[val]) if mode == "global" else None
        return cls(x_train=normalizer.apply(x_train, lengths_train),
                   x_val=normalizer.apply(x[val], lengths[val]), normalizer=normalizer, raw=raw, **common)

    def test_inputs(self) -> np.ndarray:
        """The test set as this peer's model sees it. In the ``local`` and ``global`` modes it is standardised
        with the peer's statistics; the result is shared by every peer whose statistics are the same values
        and kept for as long as the memory budget allows (``_standardised``), instead of standardising the
        whole test set again at every evaluation."""
        if self.mode == "speaker":
            return self.x_test
        return _standardised(self.x_test, self.lengths_test, self.normalizer)

    def moments(self) -> dict[str, np.ndarray]:
        """Frame count, sum and sum of squares of the raw training features (``global`` mode)."""
        if self.raw is None:
            raise ValueError("only a peer in the global normaliser mode keeps its raw features")
        return moments(self.raw[0], self.raw[1])

    def moments_template(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Names, shapes and dtypes of ``moments`` (what the codec checks statistics messages against)."""
        channels, f64 = self.x_train.shape[1], np.dtype(np.float64)
        return {"count": ((1,), f64), "sum": ((channels,), f64), "sumsq": ((channels,), f64)}

    def adopt(self, normalizer: Normalizer) -> None:
        """Standardise with ``normalizer`` (the agreed global statistics) from now on."""
        if self.raw is None:
            raise ValueError("only a peer in the global normaliser mode can adopt other statistics")
        x_train, lengths_train, x_val, lengths_val = self.raw
        self.normalizer = normalizer
        self.x_train = normalizer.apply(x_train, lengths_train)
        self.x_val = normalizer.apply(x_val, lengths_val)
        self.raw = None


# Standardised copies of a test set by (test set, statistics), least recently used first out, within a
# memory budget: the copies of a few dozen peers are reused round after round; with more peers than fit,
# each evaluation standardises again, as it always did (and at most the budget is held).
STANDARDISED_BUDGET = 1 << 30
_copies: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()


def _standardised(x: np.ndarray, lengths: np.ndarray, normalizer: Normalizer) -> np.ndarray:
    key = (id(x), id(lengths), normalizer.mean.tobytes(), normalizer.std.tobytes())
    hit = _copies.get(key)
    if hit is not None:
        _copies.move_to_end(key)
        return hit[2]
    out = normalizer.apply(x, lengths)
    if out.nbytes <= STANDARDISED_BUDGET // 4:
        # Shared by every peer with these statistics: read-only by contract, like the test set itself.
        # The entry holds x and lengths, so their ids cannot be reused by other arrays while it lives.
        _copies[key] = (x, lengths, out)
        while sum(v[2].nbytes for v in _copies.values()) > STANDARDISED_BUDGET:
            _copies.popitem(last=False)
    return out


class SharedStatistics:
    """A learner's part in ``--normalizer global`` for learners that hold their ``PeerData`` as ``self.data``:
    report this peer's moments, and adopt the agreed statistics. ``_inputs_changed`` then rebuilds whatever
    the learner derived from the standardised training inputs."""

    data: PeerData

    def moments(self) -> dict[str, np.ndarray]:
        return self.data.moments()

    def moments_template(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return self.data.moments_template()

    def adopt_moments(self, moments: dict[str, np.ndarray]) -> None:
        self.data.adopt(Normalizer.from_moments(dict(moments)))
        self._inputs_changed()

    def _inputs_changed(self) -> None:
        raise NotImplementedError
