"""Topologies: the kinds, TOML files a person edits, validation messages, mixing weights, the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from p2pser.cli import main
from p2pser.errors import UserError
from p2pser.exchange.topology import (
    KINDS,
    PeerInfo,
    Topology,
    draw_topology,
    load_topology,
    make_topology,
    metropolis_hastings_weights,
    save_topology,
    spectral_gap,
    summary,
)

REPO = Path(__file__).resolve().parents[1]
# (file, kind, n, extra make_topology arguments): the topologies shipped in topologies/.
SHIPPED = [
    ("ring-8", "ring", 8, {}),
    ("complete-8", "complete", 8, {}),
    ("torus-16", "torus", 16, {}),
    ("exponential-16", "exponential", 16, {}),
    ("ring-20", "ring", 20, {}),
    ("exponential-20", "exponential", 20, {}),
    ("small-world-20", "small-world", 20, {"degree": 4, "seed": 0}),
    ("star-20", "star", 20, {}),
]


def degrees(topo: Topology) -> list[int]:
    return [len(topo.neighbours(i)) for i in range(topo.n)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [5, 12, 20])
def test_every_kind_is_connected_with_ids_and_ports_in_order(kind: str, n: int) -> None:
    topo = make_topology(kind, n, base_port=30000)
    assert topo.kind == kind and topo.n == n
    assert nx.is_connected(topo.graph())
    assert [p.id for p in topo.peers] == list(range(n))
    assert [topo.endpoint(i) for i in range(n)] == [f"tcp://127.0.0.1:{30000 + i}" for i in range(n)]
    for a, b in topo.edges:
        assert a < b and b in topo.neighbours(a) and a in topo.neighbours(b)
    assert not topo.spans_hosts()


def test_degrees_of_the_regular_kinds() -> None:
    assert degrees(make_topology("ring", 8)) == [2] * 8
    assert degrees(make_topology("torus", 16)) == [4] * 16
    assert degrees(make_topology("complete", 8)) == [7] * 8
    assert set(degrees(make_topology("random-regular", 20, degree=3, seed=5))) == {3}
    sw = make_topology("small-world", 20, degree=6, seed=1)
    assert sum(degrees(sw)) == 20 * 6  # rewiring moves edges but keeps their number


def test_torus_is_a_wrapped_grid() -> None:
    topo = make_topology("torus", 12)  # 3 x 4
    assert topo.neighbours(0) == [1, 3, 4, 8]
    assert topo.diameter == 3


def test_star_hub_is_peer_zero() -> None:
    topo = make_topology("star", 10)
    assert topo.neighbours(0) == list(range(1, 10))
    assert all(topo.neighbours(i) == [0] for i in range(1, 10))


@pytest.mark.parametrize("n", [7, 16, 20, 33])
def test_exponential_links_span_powers_of_two(n: int) -> None:
    topo = make_topology("exponential", n)
    hops = [2**k for k in range(n.bit_length()) if 2**k <= n // 2]
    for i in range(n):
        assert topo.neighbours(i) == sorted({(i + s * h) % n for h in hops for s in (1, -1)})
    assert topo.diameter <= len(hops)


def test_random_kinds_follow_the_seed() -> None:
    for kind in ("random-regular", "small-world"):
        assert make_topology(kind, 20, seed=3) == make_topology(kind, 20, seed=3)
        assert make_topology(kind, 20, seed=3).edges != make_topology(kind, 20, seed=4).edges
    assert make_topology("small-world", 20, rewire=0.0).edges == make_topology("small-world", 20, rewire=0.0,
                                                                                 seed=9).edges


@pytest.mark.parametrize(
    ("kind", "n", "kwargs", "words"),
    [
        ("hypercube", 8, {}, "unknown topology kind 'hypercube'"),
        ("ring", 0, {}, "positive integer"),
        ("ring", 8, {"degree": 3}, "--degree applies to random-regular and small-world"),
        ("random-regular", 7, {"degree": 3}, "n*degree even"),
        ("random-regular", 4, {"degree": 4}, "degree < n"),
        ("small-world", 10, {"degree": 3}, "even degree"),
        ("small-world", 10, {"rewire": 1.5}, "rewire probability"),
        ("complete", 10, {"rewire": 0.2}, "--rewire applies to small-world only"),
        ("ring", 10, {"base_port": 65530}, "base port 65530"),
    ],
)
def test_bad_parameters_are_user_errors(kind: str, n: int, kwargs: dict, words: str) -> None:
    with pytest.raises(UserError, match=re.escape(words)):
        make_topology(kind, n, **kwargs)


def test_toml_round_trip_keeps_hosts_ports_keys(tmp_path: Path) -> None:
    base = make_topology("small-world", 12, seed=2)
    peers = tuple(
        PeerInfo(p.id, "10.0.0.1" if p.id < 6 else "node-b.example", 5000 + p.id,
                 "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7" if p.id == 3 else None)
        for p in base.peers
    )
    topo = Topology(base.kind, peers, base.edges)
    path = save_topology(topo, tmp_path / "sub" / "t.toml", note="made for a test\nsecond line")
    text = path.read_text()
    assert text.startswith("# made for a test\n# second line\n")
    assert "[[peers]]" in text and 'host = "node-b.example"' in text
    loaded = load_topology(path)
    assert loaded == topo
    assert loaded.spans_hosts()
    assert loaded.peers[3].public_key == peers[3].public_key
    assert loaded.endpoint(7) == "tcp://node-b.example:5007"
    moved = loaded.with_ports(41000)
    assert [p.port for p in moved.peers] == [41000 + i for i in range(12)]
    assert moved.edges == loaded.edges and moved.peers[7].host == "node-b.example"


def test_ipv6_endpoint_is_bracketed() -> None:
    topo = Topology("ring", (PeerInfo(0, "::1", 7000), PeerInfo(1, "::1", 7001)), ((0, 1),))
    assert topo.endpoint(1) == "tcp://[::1]:7001"


GOOD_PEERS = "\n".join(f"[[peers]]\nid = {i}\nhost = \"127.0.0.1\"\nport = {9000 + i}\n" for i in range(3))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('kind = "ring"\nedges = [[0, 1], [1, 2]\n', "not valid TOML"),
        ('kind = "ring"\nedges = [[0, 1], [1, 2]]\n', "missing key 'peers'"),
        ('kind = "ring"\nedge = [[0, 1]]\n' + GOOD_PEERS, "unknown key(s) edge"),
        ('kind = "ring"\nedges = [[0, 1], [1, 2]]\n' + GOOD_PEERS.replace("id = 2", "id = 1"),
         "peers: peer id 1 appears twice"),
        ('kind = "ring"\nedges = [[0, 1], [1, 2]]\n' + GOOD_PEERS.replace("id = 2", "id = 5"),
         "peer ids must be 0..2"),
        ('kind = "ring"\nedges = [[0, 1], [1, 3]]\n' + GOOD_PEERS, "edge [1, 3] names a peer that does not exist"),
        ('kind = "ring"\nedges = [[0, 1], [1, 1], [1, 2]]\n' + GOOD_PEERS, "edge [1, 1] is a self loop"),
        ('kind = "ring"\nedges = [[0, 1], [1, 0], [1, 2]]\n' + GOOD_PEERS, "edge [1, 0] is listed twice"),
        ('kind = "ring"\nedges = [[0, 1]]\n' + GOOD_PEERS, "edges: graph is not connected (2 separate groups"),
        ('kind = "ring"\nedges = [[0, 1], [1, 2]]\n' + GOOD_PEERS.replace("9002", "70000"),
         "peers[2].port must be an integer in 1-65535, got 70000"),
        ('kind = "ring"\nedges = [[0, 1], [1, 2]]\n' + GOOD_PEERS.replace("9002", '"9002"'),
         "peers[2].port must be an integer"),
        ('kind = "ring"\nedges = [[0, 1], [1, 2]]\n' + GOOD_PEERS.replace("9002", "9001"),
         "peers 1 and 2 both use 127.0.0.1:9001"),
        ('kind = "ring"\nedges = [[0, 1], [1, 2]]\n' + GOOD_PEERS.replace('port = 9001', 'prot = 9001'),
         "peers[1] has unknown key(s) prot"),
        ('kind = "ring"\nedges = [[0, 1], [1, 2]]\n' + GOOD_PEERS + 'public_key = "short"\n',
         "peers[2].public_key must be a 40-character"),
        ('kind = "ring"\nedges = [[0, 1, 2]]\n' + GOOD_PEERS, "edges[0] must be a pair of peer ids"),
        ('kind = 3\nedges = []\n' + GOOD_PEERS, "'kind' must be a non-empty string"),
    ],
)
def test_load_errors_name_the_file_and_key(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_topology(path)
    assert str(path) in str(err.value)
    assert words in str(err.value)


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found; make one with `p2pser topology make`"):
        load_topology(tmp_path / "nope.toml")


def test_hand_written_custom_topology_loads(tmp_path: Path) -> None:
    path = tmp_path / "line.toml"
    path.write_text('kind = "line"\nedges = [[0, 1], [2, 1]]\n' + GOOD_PEERS)
    topo = load_topology(path)
    assert topo.kind == "line" and topo.edges == ((0, 1), (1, 2)) and topo.diameter == 2
    draw_topology(topo, tmp_path / "line.png")


@pytest.mark.parametrize("kind", KINDS)
def test_metropolis_hastings_is_symmetric_doubly_stochastic(kind: str) -> None:
    topo = make_topology(kind, 16, seed=1)
    w = metropolis_hastings_weights(topo)
    assert np.allclose(w, w.T)
    assert np.allclose(w.sum(axis=0), 1) and np.allclose(w.sum(axis=1), 1)
    assert (w >= 0).all()
    off = w - np.diag(np.diag(w))
    assert ((off > 0) == nx.to_numpy_array(topo.graph(), nodelist=range(16)).astype(bool)).all()
    d = degrees(topo)
    a, b = topo.edges[0]
    assert w[a, b] == pytest.approx(1 / (1 + max(d[a], d[b])))
    assert 0 < spectral_gap(w) <= 1


def test_spectral_gap_orders_complete_exponential_ring() -> None:
    gap = {k: spectral_gap(metropolis_hastings_weights(make_topology(k, 16))) for k in ("complete", "exponential",
                                                                                        "ring")}
    assert gap["complete"] == pytest.approx(1.0)
    assert gap["complete"] > gap["exponential"] > gap["ring"] > 0
    assert spectral_gap(np.eye(1)) == 1.0


def test_summary_numbers() -> None:
    info = summary(make_topology("star", 20))
    assert (info["peers"], info["edges"], info["degree_min"], info["degree_max"], info["diameter"]) == (
        20, 19, 1, 19, 2)
    assert info["degree_mean"] == pytest.approx(2 * 19 / 20)


def test_draw_writes_a_png(tmp_path: Path) -> None:
    for kind in ("torus", "star", "random-regular"):
        png = draw_topology(make_topology(kind, 16), tmp_path / f"{kind}.png")
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize(("name", "kind", "n", "kwargs"), SHIPPED)
def test_shipped_topologies_load_and_match_the_generator(name: str, kind: str, n: int, kwargs: dict) -> None:
    path = REPO / "topologies" / f"{name}.toml"
    assert load_topology(path) == make_topology(kind, n, **kwargs)
    assert f"made by: p2pser topology make {kind} -n {n}" in path.read_text()


def test_cli_make_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.toml"
    assert main(["topology", "make", "random-regular", "-n", "10", "--degree", "3", "--seed", "7",
                 "--base-port", "31000", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_topology(out) == make_topology("random-regular", 10, degree=3, seed=7, base_port=31000)
    assert main(["topology", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "degree min/mean/max 3/3.00/3" in shown and "MH spectral gap" in shown
    assert "tcp://127.0.0.1:31009" in shown
    assert (tmp_path / "t.png").stat().st_size > 0
    assert main(["topology", "show", str(out), "--json", "--png", str(tmp_path / "p.png")]) == 0
    assert '"diameter"' in capsys.readouterr().out and (tmp_path / "p.png").exists()


def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "show", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.toml not found" in err
    assert main(["topology", "make", "ring", "-n", "4", "--degree", "2", "-o", str(tmp_path / "x.toml")]) == 2
    assert "--degree applies" in capsys.readouterr().err
