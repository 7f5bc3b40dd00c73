"""Who talks to whom: peer addresses and the undirected graph of links, built, saved, loaded and measured.

A topology is a value (frozen dataclass) passed to the peers and the launcher; the TOML file is what a person
reads and edits. Peer ids are always 0..N-1 so that mixing matrices can be indexed by id.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from p2pser.errors import UserError

if TYPE_CHECKING:
    import networkx as nx

log = logging.getLogger(__name__)

KINDS = ("ring", "torus", "exponential", "random-regular", "small-world", "complete", "star")
DEFAULT_DEGREE = 4
DEFAULT_REWIRE = 0.1
# Z85 text of a 32-byte CurveZMQ key.
PUBLIC_KEY_LEN = 40
_TOP_KEYS = {"kind", "peers", "edges"}
_PEER_KEYS = {"id", "host", "port", "public_key"}


@dataclass(frozen=True)
class PeerInfo:
    id: int
    host: str
    port: int
    public_key: str | None = None


@dataclass(frozen=True)
class Topology:
    """Peers sorted by id (0..N-1) and undirected edges stored once each as (low, high), sorted."""

    kind: str
    peers: tuple[PeerInfo, ...]
    edges: tuple[tuple[int, int], ...]
    _adjacency: dict[int, list[int]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        problem = _structure_problem(self.peers, self.edges)
        if problem:
            raise UserError(f"invalid {self.kind} topology: {problem[1]}")
        peers = tuple(sorted(self.peers, key=lambda p: p.id))
        edges = tuple(sorted({(min(a, b), max(a, b)) for a, b in self.edges}))
        adjacency: dict[int, list[int]] = {p.id: [] for p in peers}
        for a, b in edges:
            adjacency[a].append(b)
            adjacency[b].append(a)
        for neighbours in adjacency.values():
            neighbours.sort()
        # Frozen dataclass: normalise once at construction so equal graphs compare equal.
        object.__setattr__(self, "peers", peers)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "_adjacency", adjacency)

    @property
    def n(self) -> int:
        return len(self.peers)

    def neighbours(self, i: int) -> list[int]:
        if i not in self._adjacency:
            raise UserError(f"peer {i} is not in this {self.n}-peer topology (ids 0..{self.n - 1})")
        return list(self._adjacency[i])

    def degree(self, i: int) -> int:
        return len(self.neighbours(i))

    def graph(self) -> nx.Graph:
        import networkx as nx  # lazily: the CLI reads KINDS here, and networkx costs 0.1 s of every --help

        g = nx.Graph()
        g.add_nodes_from(range(self.n))
        g.add_edges_from(self.edges)
        return g

    def endpoint(self, i: int) -> str:
        peer = self.peers[i] if 0 <= i < self.n else None
        if peer is None:
            raise UserError(f"peer {i} is not in this {self.n}-peer topology (ids 0..{self.n - 1})")
        host = f"[{peer.host}]" if ":" in peer.host else peer.host
        return f"tcp://{host}:{peer.port}"

    def with_ports(self, base_port: int) -> Topology:
        """Same graph and hosts, peer i listening on ``base_port + i`` (e.g. to run two topologies at once)."""
        _check_port_range(base_port, self.n)
        peers = tuple(replace(p, port=base_port + p.id) for p in self.peers)
        return Topology(self.kind, peers, self.edges)

    def hub(self, algorithm: str = "fedavg") -> int:
        """The star's centre, for an algorithm that needs a peer linked to every other one."""
        for i in range(self.n):
            if len(self._adjacency[i]) == self.n - 1:
                return i
        raise UserError(f"--algorithm {algorithm} needs a star (or complete) topology: no peer is linked to all others")

    def spans_hosts(self) -> bool:
        return len({p.host for p in self.peers}) > 1

    @cached_property
    def diameter(self) -> int:
        import networkx as nx

        return nx.diameter(self.graph()) if self.n > 1 else 0


def _structure_problem(
    peers: tuple[PeerInfo, ...], edges: tuple[tuple[int, int], ...]
) -> tuple[str, str] | None:
    """(key, what is wrong) with a peer list and edge list (ids, ports, links, connectivity), or None."""
    if not peers:
        return "peers", "no peers"
    ids = [p.id for p in peers]
    seen: set[int] = set()
    for pid in ids:
        if pid in seen:
            return "peers", f"peer id {pid} appears twice"
        seen.add(pid)
    if sorted(ids) != list(range(len(ids))):
        return "peers", f"peer ids must be 0..{len(ids) - 1} without gaps, got {sorted(ids)}"
    endpoints: dict[tuple[str, int], int] = {}
    for p in peers:
        if not 1 <= p.port <= 65535:
            return "peers", f"peer {p.id} port {p.port} is not a TCP port (1-65535)"
        if (p.host, p.port) in endpoints:
            return "peers", f"peers {endpoints[(p.host, p.port)]} and {p.id} both use {p.host}:{p.port}"
        endpoints[(p.host, p.port)] = p.id
    pairs: set[tuple[int, int]] = set()
    for a, b in edges:
        if a not in seen or b not in seen:
            return "edges", f"edge [{a}, {b}] names a peer that does not exist (ids 0..{len(ids) - 1})"
        if a == b:
            return "edges", f"edge [{a}, {b}] is a self loop"
        pair = (min(a, b), max(a, b))
        if pair in pairs:
            return "edges", f"edge [{a}, {b}] is listed twice"
        pairs.add(pair)
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(seen)
    g.add_edges_from(pairs)
    if not nx.is_connected(g):
        parts = sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: c[0])
        shown = "; ".join(str(c) for c in parts[:4])
        return "edges", f"graph is not connected ({len(parts)} separate groups: {shown}); add edges between them"
    return None


def _check_port_range(base_port: int, n: int) -> None:
    if not 1 <= base_port or base_port + n - 1 > 65535:
        raise UserError(f"base port {base_port} with {n} peers needs ports up to {base_port + n - 1}; "
                        "choose a base port so that all fit in 1-65535")


def _torus_shape(n: int) -> tuple[int, int]:
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def _torus_edges(n: int) -> list[tuple[int, int]]:
    rows, cols = _torus_shape(n)
    if rows == 1:
        log.warning("torus of %d peers: %d is prime, so the torus is a %dx%d grid, i.e. a ring", n, n, rows, cols)
    edges = set()
    for r in range(rows):
        for c in range(cols):
            here = r * cols + c
            for there in (r * cols + (c + 1) % cols, ((r + 1) % rows) * cols + c):
                if there != here:
                    edges.add((min(here, there), max(here, there)))
    return sorted(edges)


def _exponential_edges(n: int) -> list[tuple[int, int]]:
    # Peer i links to i +- 2^k (mod n) for every 2^k <= n/2: the undirected static exponential graph, so
    # every link spans a power-of-two distance around the ring and degree grows as 2*log2(n).
    edges = set()
    hop = 1
    while hop <= n // 2:
        for i in range(n):
            j = (i + hop) % n
            if i != j:
                edges.add((min(i, j), max(i, j)))
        hop *= 2
    return sorted(edges)


def _connected_random_regular(n: int, degree: int, seed: int) -> nx.Graph:
    if not 1 <= degree < n or (n * degree) % 2:
        raise UserError(f"random-regular needs 1 <= degree < n and n*degree even; got n={n}, degree={degree}")
    import networkx as nx

    for attempt in range(100):
        # Deterministic retries: a derived seed per attempt keeps the same (n, degree, seed) -> same graph.
        g = nx.random_regular_graph(degree, n, seed=seed * 1000 + attempt)
        if nx.is_connected(g):
            return g
    raise UserError(f"no connected random-regular graph with n={n}, degree={degree} found in 100 tries; "
                    "use degree >= 3")


def make_topology(
    kind: str,
    n: int,
    *,
    degree: int | None = None,
    seed: int = 0,
    host: str = "127.0.0.1",
    base_port: int = 27100,
    rewire: float | None = None,
) -> Topology:
    """Build a connected topology of ``n`` peers on ``host``, peer i listening on ``base_port + i``.

    ``degree`` is used by ``random-regular`` and ``small-world`` (default 4); ``rewire`` is the small-world
    rewiring probability (default 0.1). ``seed`` makes the random kinds reproducible.
    """
    if kind not in KINDS:
        raise UserError(f"unknown topology kind {kind!r}; choose one of {', '.join(KINDS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"number of peers must be a positive integer, got {n!r}")
    if degree is not None and kind not in ("random-regular", "small-world"):
        raise UserError(f"--degree applies to random-regular and small-world, not {kind}")
    if rewire is not None and kind != "small-world":
        raise UserError(f"--rewire applies to small-world only, not {kind}")
    if not host:
        raise UserError("host must not be empty")
    _check_port_range(base_port, n)
    if kind == "ring":
        edges = [(i, (i + 1) % n) for i in range(n)] if n > 2 else [(0, 1)] if n == 2 else []
    elif kind == "torus":
        edges = _torus_edges(n)
    elif kind == "exponential":
        edges = _exponential_edges(n)
    elif kind == "complete":
        edges = [(i, j) for i in range(n) for j in range(i + 1, n)]
    elif kind == "star":
        edges = [(0, j) for j in range(1, n)]
    elif kind == "random-regular":
        edges = list(_connected_random_regular(n, DEFAULT_DEGREE if degree is None else degree, seed).edges)
    else:
        k = DEFAULT_DEGREE if degree is None else degree
        p = DEFAULT_REWIRE if rewire is None else rewire
        if k < 2 or k % 2 or k >= n:
            raise UserError(f"small-world needs an even degree 2 <= k < n; got k={k}, n={n}")
        if not 0.0 <= p <= 1.0:
            raise UserError(f"small-world rewire probability must be in [0, 1], got {p}")
        import networkx as nx

        try:
            g = nx.connected_watts_strogatz_graph(n, k, p, tries=100, seed=seed)
        except nx.NetworkXError as exc:
            raise UserError(f"no connected small-world graph with n={n}, k={k}, p={p}: {exc}") from exc
        edges = list(g.edges)
    peers = tuple(PeerInfo(i, host, base_port + i) for i in range(n))
    return Topology(kind, peers, tuple(edges))


def _toml_str(text: str) -> str:
    # JSON string escapes (\", \\, \n, \uXXXX, ...) are all valid TOML basic-string escapes.
    return json.dumps(text)


def save_topology(topo: Topology, path: str | Path, *, note: str | None = None) -> Path:
    """Write ``topo`` as a TOML file a person can edit; ``note`` becomes a comment line at the top."""
    path = Path(path)
    lines = []
    if note:
        lines += [f"# {line}".rstrip() for line in note.splitlines()]
    lines.append(f"# {topo.n} peers, {len(topo.edges)} undirected edges; peers listen on host:port. "
                 "Check edits with `p2pser topology show FILE`.")
    lines.append(f"kind = {_toml_str(topo.kind)}")
    lines.append("edges = [")
    per_line = 8
    for start in range(0, len(topo.edges), per_line):
        chunk = topo.edges[start:start + per_line]
        lines.append("  " + " ".join(f"[{a}, {b}]," for a, b in chunk))
    lines.append("]")
    for p in topo.peers:
        lines += ["", "[[peers]]", f"id = {p.id}", f"host = {_toml_str(p.host)}", f"port = {p.port}"]
        if p.public_key is not None:
            lines.append(f"public_key = {_toml_str(p.public_key)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write topology file {path}: {exc.strerror or exc}") from exc
    return path


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_peer(where: str, entry: Any) -> PeerInfo:
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a table with id, host and port")
    unknown = sorted(set(entry) - _PEER_KEYS)
    if unknown:
        raise UserError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: id, host, port, public_key")
    for key in ("id", "host", "port"):
        if key not in entry:
            raise UserError(f"{where} is missing key '{key}'")
    pid, host, port, key = entry["id"], entry["host"], entry["port"], entry.get("public_key")
    if not _is_int(pid) or pid < 0:
        raise UserError(f"{where}.id must be a non-negative integer, got {pid!r}")
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        raise UserError(f"{where}.host must be a host name or IP address, got {host!r}")
    if not _is_int(port) or not 1 <= port <= 65535:
        raise UserError(f"{where}.port must be an integer in 1-65535, got {port!r}")
    if key is not None and (not isinstance(key, str) or len(key) != PUBLIC_KEY_LEN):
        raise UserError(f"{where}.public_key must be a {PUBLIC_KEY_LEN}-character Z85 CurveZMQ public key")
    return PeerInfo(pid, host, port, key)


def _parse_edges(where: str, raw: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(raw, list):
        raise UserError(f"{where} must be a list of [a, b] pairs")
    edges = []
    for k, pair in enumerate(raw):
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_int(x) for x in pair):
            raise UserError(f"{where}[{k}] must be a pair of peer ids like [0, 1], got {pair!r}")
        edges.append((pair[0], pair[1]))
    return tuple(edges)


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology TOML file; every problem is a ``UserError`` naming the file and key."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"topology file {path} not found; make one with `p2pser topology make`") from None
    except IsADirectoryError:
        raise UserError(f"topology file {path} is a directory; pass a .toml file") from None
    except OSError as exc:
        raise UserError(f"cannot read topology file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"topology file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: kind, peers, edges")
    for key in ("kind", "peers", "edges"):
        if key not in data:
            raise UserError(f"{path}: missing key '{key}'")
    kind = data["kind"]
    if not isinstance(kind, str) or not kind:
        raise UserError(f"{path}: 'kind' must be a non-empty string, got {kind!r}")
    if not isinstance(data["peers"], list) or not data["peers"]:
        raise UserError(f"{path}: 'peers' must be one or more [[peers]] tables")
    peers = tuple(_parse_peer(f"{path}: peers[{k}]", e) for k, e in enumerate(data["peers"]))
    edges = _parse_edges(f"{path}: edges", data["edges"])
    problem = _structure_problem(peers, edges)
    if problem:
        raise UserError(f"{path}: {problem[0]}: {problem[1]}")
    return Topology(kind, peers, edges)


def metropolis_hastings_weights(topo: Topology) -> np.ndarray:
    """Symmetric doubly stochastic mixing matrix: W_ij = 1/(1+max(d_i, d_j)) on edges, the rest on W_ii."""
    w = np.zeros((topo.n, topo.n))
    deg = [len(topo.neighbours(i)) for i in range(topo.n)]
    for a, b in topo.edges:
        w[a, b] = w[b, a] = 1.0 / (1 + max(deg[a], deg[b]))
    w[np.diag_indices(topo.n)] = 1.0 - w.sum(axis=1)
    return w


def spectral_gap(w: np.ndarray) -> float:
    """1 - second largest |eigenvalue| of a mixing matrix: larger means faster consensus."""
    w = np.asarray(w, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"mixing matrix must be square, got shape {w.shape}")
    if w.shape[0] < 2:
        return 1.0
    eig = np.linalg.eigvalsh(w) if np.allclose(w, w.T) else np.linalg.eigvals(w)
    mags = np.sort(np.abs(eig))[::-1]
    return float(1.0 - mags[1])


def rounds_to_agree(topo: Topology, tolerance: float) -> int:
    """Averaging rounds after which every peer's value is within ``tolerance`` (relative to the spread of
    the starting values) of the network average, for Metropolis-Hastings gossip on ``topo``.

    The disagreement shrinks by at least the second largest eigenvalue modulus of the mixing matrix each
    round; sqrt(n) bounds how much of it one peer can hold at the start. Every peer reads the same topology
    file, so every peer computes the same count and they all stop together.
    """
    if topo.n < 2:
        return 0
    contraction = 1.0 - spectral_gap(metropolis_hastings_weights(topo))
    if contraction <= 0.0:
        return 1
    return max(1, math.ceil(math.log(tolerance / math.sqrt(topo.n)) / math.log(contraction)))


def summary(topo: Topology) -> dict[str, Any]:
    """Numbers `p2pser topology show` prints: size, degrees, diameter, MH spectral gap, hosts."""
    deg = [len(topo.neighbours(i)) for i in range(topo.n)]
    return {
        "kind": topo.kind,
        "peers": topo.n,
        "edges": len(topo.edges),
        "degree_min": min(deg),
        "degree_mean": sum(deg) / topo.n,
        "degree_max": max(deg),
        "diameter": topo.diameter,
        "spectral_gap_mh": spectral_gap(metropolis_hastings_weights(topo)),
        "hosts": sorted({p.host for p in topo.peers}),
    }


def _layout(topo: Topology) -> dict[int, tuple[float, float]]:
    import networkx as nx

    if topo.kind == "torus":
        rows, cols = _torus_shape(topo.n)
        if rows > 1:
            return {i: (float(i % cols), float(-(i // cols))) for i in range(topo.n)}
    if topo.kind == "star" and topo.n > 2:
        return nx.shell_layout(topo.graph(), nlist=[[0], list(range(1, topo.n))])
    # A spring layout of hundreds of nodes is a hairball that took 20 s to compute (1,000 peers): a circle.
    if (topo.kind in KINDS and topo.kind != "random-regular") or topo.n > SPRING_LAYOUT_MAX:
        return nx.circular_layout(topo.graph())
    return nx.spring_layout(topo.graph(), seed=0)


SPRING_LAYOUT_MAX = 100


def draw_topology(topo: Topology, png_path: str | Path) -> Path:
    """Draw the graph (ids on nodes, one colour per host) to a PNG file."""
    # Figure without pyplot: no global backend state, safe when peers draw from several threads.
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    png_path = Path(png_path)
    pos = _layout(topo)
    hosts = sorted({p.host for p in topo.peers})
    size = 4 + min(topo.n, 64) / 8
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    straight = []
    for a, b in topo.edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        if topo.kind == "torus" and abs(xa - xb) + abs(ya - yb) > 1.5:
            # Wrap-around links would overlap the grid lines if drawn straight.
            arc = {"arrowstyle": "-", "connectionstyle": "arc3,rad=0.2", "color": "0.6", "linestyle": "--"}
            ax.annotate("", (xb, yb), (xa, ya), zorder=1, arrowprops=arc)
        else:
            straight.append([(xa, ya), (xb, yb)])
    # One collection, not one line object per edge (4,000 of them for 1,000 peers of degree 8).
    ax.add_collection(LineCollection(straight, colors="0.6", linewidths=0.8, zorder=1))
    colours = [hosts.index(p.host) for p in topo.peers]
    xs = [pos[i][0] for i in range(topo.n)]
    ys = [pos[i][1] for i in range(topo.n)]
    ax.scatter(xs, ys, s=300, c=colours, cmap="tab10", vmin=0, vmax=9, edgecolors="black", zorder=2)
    for i in range(topo.n):
        ax.annotate(str(i), (xs[i], ys[i]), ha="center", va="center", fontsize=8, zorder=3)
    ax.set_title(f"{topo.kind}: {topo.n} peers, {len(topo.edges)} edges, {len(hosts)} host(s)")
    ax.set_aspect("equal")
    ax.axis("off")
    try:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png_path, format="png")
    except OSError as exc:
        raise UserError(f"cannot write picture {png_path}: {exc.strerror or exc}") from exc
    return png_path
