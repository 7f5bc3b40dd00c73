"""Who holds which training utterances: the partition of a fold's training data into peers.

Works on index arrays into a corpus listing (or a FeatureSet), never on copies of the data, and is
deterministic given the seed.
"""

from __future__ import annotations

import numpy as np

from p2pser.errors import UserError

SCHEMES = ("speaker", "dirichlet", "iid")
_DIRICHLET_TRIES = 100


def partition(
    indices: np.ndarray,
    speakers: np.ndarray,
    labels: np.ndarray,
    *,
    scheme: str = "speaker",
    n_peers: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split ``indices`` (into ``speakers``/``labels``) among peers; each peer gets a sorted index array.

    ``speaker``: one peer per speaker, in sorted speaker order (the natural decentralized SER setting).
    ``dirichlet``: label skew, each class spread over peers by Dirichlet(alpha) proportions (small alpha,
    few classes per peer). ``iid``: a shuffled near-equal split. Every peer gets at least one utterance;
    every index goes to exactly one peer.
    """
    indices = np.asarray(indices, dtype=np.int64)
    speakers, labels = np.asarray(speakers), np.asarray(labels)
    if scheme not in SCHEMES:
        raise UserError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if scheme == "speaker":
        names = sorted(set(speakers[indices].tolist()))
        if n_peers is not None and n_peers != len(names):
            raise UserError(
                f"partition 'speaker' gives one peer per training speaker ({len(names)}), not {n_peers}; "
                "use that many peers, or the 'dirichlet' or 'iid' partition"
            )
        return [indices[speakers[indices] == name] for name in names]
    if n_peers is None or not 1 <= n_peers <= len(indices):
        raise UserError(f"partition {scheme!r} needs a number of peers between 1 and {len(indices)}, got {n_peers}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(indices), n_peers)]
    if not alpha > 0:
        raise UserError(f"Dirichlet alpha must be positive, got {alpha}")
    return _dirichlet(indices, labels, n_peers, alpha, rng)


def _dirichlet(
    indices: np.ndarray, labels: np.ndarray, n_peers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    by_class = [indices[labels[indices] == c] for c in np.unique(labels[indices])]
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
        for members in by_class:
            members = rng.permutation(members)
            cuts = (np.cumsum(rng.dirichlet(np.full(n_peers, alpha)))[:-1] * len(members)).astype(int)
            for peer, chunk in enumerate(np.split(members, cuts)):
                parts[peer].append(chunk)
        peers = [np.concatenate(p) for p in parts]
        if all(len(p) for p in peers):
            break
    # Very small alpha with many peers can keep leaving a peer empty: give each empty peer one utterance
    # from the largest, which changes the label skew as little as possible.
    for k in range(n_peers):
        if not len(peers[k]):
            donor = max(range(n_peers), key=lambda j: len(peers[j]))
            pick = rng.integers(len(peers[donor]))
            peers[k] = peers[donor][pick : pick + 1]
            peers[donor] = np.delete(peers[donor], pick)
    return [np.sort(p).astype(np.int64) for p in peers]
