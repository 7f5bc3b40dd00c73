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

    ``speaker``: each speaker's utterances on one peer (the natural decentralized SER setting): one speaker
    per peer in sorted speaker order, or, with fewer peers than speakers, sites of several speakers
    (``_spread_speakers``).
    ``dirichlet``: label skew, each class spread over peers by Dirichlet(alpha) proportions (small alpha,
    few classes per peer). ``iid``: a shuffled near-equal split. Every peer gets at least one utterance;
    every index goes to exactly one peer.
    """
    indices = np.asarray(indices, dtype=np.int64)
    speakers, labels = np.asarray(speakers), np.asarray(labels)
    if scheme not in SCHEMES:
        raise UserError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    rng = np.random.default_rng(seed)
    if scheme == "speaker":
        return _spread_speakers(indices, speakers, n_peers, rng)
    if n_peers is None or not 1 <= n_peers <= len(indices):
        raise UserError(f"partition {scheme!r} needs a number of peers between 1 and {len(indices)}, got {n_peers}")
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(indices), n_peers)]
    if not alpha > 0:
        raise UserError(f"Dirichlet alpha must be positive, got {alpha}")
    return _dirichlet(indices, labels, n_peers, alpha, rng)


def _spread_speakers(
    indices: np.ndarray, speakers: np.ndarray, n_peers: int | None, rng: np.random.Generator
) -> list[np.ndarray]:
    """Every speaker on exactly one peer, the peers' utterance counts as equal as the speakers allow.

    Largest speakers first, each to the peer with the fewest utterances so far (ties between equal
    speakers broken by the seed), then swaps between the fullest and the emptiest peer while one narrows
    their gap. Peers are ordered by their first speaker's name, so one speaker per peer (``n_peers`` None
    or the number of speakers) gives peer k the k-th speaker in sorted order.
    """
    names, counts = np.unique(speakers[indices], return_counts=True)
    n_peers = len(names) if n_peers is None else n_peers
    if not 1 <= n_peers <= len(names):
        raise UserError(
            f"partition 'speaker' puts each training speaker on one peer, so {n_peers} peers need at least "
            f"{n_peers} training speakers and the fold has {len(names)}: use at most {len(names)} peers, or the "
            "'dirichlet' or 'iid' partition"
        )
    order = rng.permutation(len(names))
    order = order[np.argsort(-counts[order], kind="stable")]
    groups: list[list[int]] = [[] for _ in range(n_peers)]
    loads = np.zeros(n_peers, dtype=np.int64)
    for s in order:
        k = int(np.argmin(loads))
        groups[k].append(int(s))
        loads[k] += counts[s]
    while True:
        # Each accepted swap moves d utterances, 0 < d < gap: both peers end strictly inside the old gap, so
        # the sum of squared loads falls and the loop ends.
        full, empty = int(np.argmax(loads)), int(np.argmin(loads))
        gap = loads[full] - loads[empty]
        best = None
        for a in groups[full]:
            for b in [None, *groups[empty]]:
                d = counts[a] - (0 if b is None else counts[b])
                if 0 < d < gap and (best is None or abs(gap - 2 * d) < abs(gap - 2 * best[2])):
                    best = (a, b, d)
        if best is None:
            break
        a, b, d = best
        groups[full].remove(a)
        groups[empty].append(a)
        if b is not None:
            groups[empty].remove(b)
            groups[full].append(b)
        loads[full] -= d
        loads[empty] += d
    groups.sort(key=min)
    return [indices[np.isin(speakers[indices], names[g])] for g in groups]


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
