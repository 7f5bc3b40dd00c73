"""The network-namespace test bed: hosts with their own addresses, a cable per host that can be pulled, and
a secured run across three namespaces that is partitioned and heals."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pser.cli import main
from p2pser.gossip.topology import Topology, make_topology, save_topology

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "launch" / "netns-testbed"
SUBNET = "10.231.0"
FAST = ["--model", "cnn1d-shallow", "--partition", "iid", "--features", "mfcc", "--max-seconds", "1.5",
        "--local-steps", "4", "--batch-size", "16"]
_names = itertools.count()

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def bed_cmd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(TESTBED), *map(str, args)], capture_output=True, text=True, check=False, timeout=60)


def warm_feature_cache(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The synthetic corpus' features under FAST settings, extracted once per session for every multi-host
    test: peer processes then start in seconds instead of each decoding the test set again."""
    import numpy as np

    from p2pser.config import RunConfig
    from p2pser.run.plan import extract_for, make_plan

    folder = tmp_path_factory.getbasetemp() / "secure-feature-cache"
    if not (folder / "warm").exists():
        cfg = RunConfig(features="mfcc", max_seconds=1.5, partition="iid", cache_dir=str(folder))
        plan = make_plan(corpus, cfg, 3)
        extract_for(plan, np.unique(np.concatenate([*plan.peers, plan.test])), cfg)
        (folder / "warm").touch()
    return folder


def start_bed(request: pytest.FixtureRequest) -> str:
    """Three hosts NAME-h0..2 at 10.231.0.1-3, removed (with anything running in them) even if the test fails."""
    name = f"t{os.getpid() % 100000}{next(_names)}"
    request.addfinalizer(lambda: bed_cmd("down", name))
    up = bed_cmd("up", name, 3, SUBNET)
    assert up.returncode == 0, up.stderr
    return name


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory, synth_corpus) -> Path:
    return warm_feature_cache(tmp_path_factory, synth_corpus)


@pytest.fixture
def bed(request) -> str:
    return start_bed(request)


def spread_topology(n: int, hosts: int, port: int = 27500, kind: str = "complete") -> Topology:
    """Peer i on host i % hosts of the test bed."""
    topo = make_topology(kind, n, base_port=port)
    peers = tuple(type(p)(p.id, f"{SUBNET}.{p.id % hosts + 1}", p.port) for p in topo.peers)
    return Topology(topo.kind, peers, topo.edges)


PROBE = ("import socket, sys\ns = socket.socket(); s.settimeout(1.5)\n"
         "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('ok')\nexcept OSError as e:\n    print('no', e)\n")


def test_testbed_hosts_reach_each_other_until_a_cable_is_pulled(bed):
    assert bed_cmd("list", bed).stdout.split() == [f"{bed}-h{k}" for k in range(3)]
    listen = f"import socket, time\ns = socket.socket(); s.bind(('{SUBNET}.3', 5599)); s.listen()\ntime.sleep(30)"
    server = subprocess.Popen(["ip", "netns", "exec", f"{bed}-h2", sys.executable, "-c", listen])
    try:
        def probe() -> str:
            # Only from inside the test bed: its addresses mean nothing (or something else) outside it.
            return bed_cmd("exec", bed, 0, sys.executable, "-c", PROBE, f"{SUBNET}.3", 5599).stdout.strip()

        deadline = time.monotonic() + 10
        while probe() != "ok":
            assert time.monotonic() < deadline, "host 0 never reached host 2"
        assert bed_cmd("link", bed, 2, "down").returncode == 0
        assert probe().startswith("no")
        assert bed_cmd("link", bed, 2, "up").returncode == 0
        deadline = time.monotonic() + 10
        while probe() != "ok":
            assert time.monotonic() < deadline, "host 2 did not come back"
    finally:
        server.kill()
        server.wait()
    assert bed_cmd("up", bed, 3).returncode == 2  # the name is taken
    assert bed_cmd("link", bed, 7, "down").returncode != 0
    assert bed_cmd("up", "bad name!", 3).returncode == 2


def test_teardown_removes_namespaces_and_their_processes():
    name = f"t{os.getpid() % 100000}{next(_names)}"
    try:
        assert bed_cmd("up", name, 3).returncode == 0
        sleeper = subprocess.Popen(["ip", "netns", "exec", f"{name}-h1", "sleep", "60"])
    finally:
        assert bed_cmd("down", name).returncode == 0
    assert sleeper.wait(timeout=10) != 0
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"{name}-" not in left


def _rows(run: Path, k: int) -> list[dict]:
    path = run / f"peer-{k:03d}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(condition, timeout: float, what: str, procs) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        assert all(p.poll() is None for p in procs), f"a peer exited early while waiting until {what}"
        time.sleep(0.2)


def test_secured_run_partitions_when_a_host_link_goes_down_and_heals(bed, tmp_path, synth_corpus, feature_cache):
    """Three peers, one per namespace, CurveZMQ on (the topology spans hosts). Host 2's cable is pulled for
    a few rounds: it hears nobody and nobody hears it; plugged back, it is heard again and the consensus
    distance, pushed up by the partition, falls again."""
    topo_path = save_topology(spread_topology(3, 3), tmp_path / "topo.toml")
    assert main(["keys", "new", str(tmp_path / "keys"), "--topology", str(topo_path)]) == 0
    run = tmp_path / "run"
    run.mkdir()
    procs = []
    for k in range(3):
        with open(run / f"peer{k}.log", "w") as log:
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", f"{bed}-h{k}", sys.executable, "-m", "p2pser", "peer", str(synth_corpus),
                 "--topology", str(topo_path), "--id", str(k), "--out", str(run), "--keys", str(tmp_path / "keys"),
                 "--rounds", "16", "--round-timeout", "2", "--cache-dir", str(feature_cache), *FAST],
                stdout=log, stderr=subprocess.STDOUT))
    try:
        _wait(lambda: min(len(_rows(run, k)) for k in range(3)) >= 4, 120, "every peer has done 4 rounds", procs)
        assert bed_cmd("link", bed, 2, "down").returncode == 0
        down_at = {k: len(_rows(run, k)) for k in range(3)}
        _wait(lambda: all(len(_rows(run, k)) >= down_at[k] + 4 for k in range(3)), 90, "4 rounds cut off", procs)
        assert bed_cmd("link", bed, 2, "up").returncode == 0
        up_at = {k: len(_rows(run, k)) for k in range(3)}
        for p in procs:
            assert p.wait(timeout=150) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = {k: (run / f"peer{k}.log").read_text()[-1500:] for k in range(3)}
    rows = {k: _rows(run, k) for k in range(3)}
    assert all(len(r) == 16 for r in rows.values()), logs
    # Before the cut every peer heard both others.
    assert all(r[2]["heard"] == 2 for r in rows.values()), rows
    # While cut off (skipping the round in flight when the cable went): host 2 heard nobody, the others
    # heard only each other.
    cut = {k: rows[k][down_at[k] + 1:up_at[k]] for k in range(3)}
    assert cut[2] and all(r["heard"] == 0 and r["consensus_distance"] is None for r in cut[2]), cut[2]
    for k in (0, 1):
        assert cut[k] and all(r["heard"] == 1 for r in cut[k]), cut[k]
    # Healed: everyone hears both others again by the end, and the mesh converges again.
    for k in range(3):
        assert rows[k][-1]["heard"] == 2, (k, rows[k][up_at[k]:], logs[k])
    after = [r["consensus_distance"] for r in rows[2][up_at[2]:] if r["consensus_distance"] is not None]
    assert len(after) >= 3 and after[-1] < 0.5 * max(after), after
