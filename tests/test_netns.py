"""The network-namespace test bed: hosts with their own addresses and a cable per host that can be pulled.

The fixtures here also serve tests/test_multihost.py, whose secured run across three namespaces is
partitioned and heals."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pser.exchange.topology import Topology, make_topology

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "launch" / "netns-testbed"
SUBNET = "10.231.0"
FAST = ["--model", "cnn1d-shallow", "--partition", "iid", "--features", "mfcc", "--max-seconds", "1.5",
        "--local-steps", "4", "--batch-size", "16"]
_names = itertools.count()

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


def bed_cmd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(TESTBED), *map(str, args)], capture_output=True, text=True, check=False, timeout=60)


def warm_feature_cache(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The synthetic corpus' features under FAST settings, extracted once per session for every multi-host
    test: peer processes then start in seconds instead of each decoding the test set again."""
    import numpy as np

    from p2pser.config import RunConfig
    from p2pser.partition.experiment import extract_for, make_plan

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


def spread_topology(n: int, hosts: int, port: int = 27500, kind: str = "complete") -> Topology:
    """Peer i on host i % hosts of the test bed."""
    topo = make_topology(kind, n, base_port=port)
    peers = tuple(type(p)(p.id, f"{SUBNET}.{p.id % hosts + 1}", p.port) for p in topo.peers)
    return Topology(topo.kind, peers, topo.edges)


PROBE = ("import socket, sys\ns = socket.socket(); s.settimeout(1.5)\n"
         "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('ok')\nexcept OSError as e:\n    print('no', e)\n")


def test_testbed_hosts_reach_each_other_until_a_cable_is_pulled(bed):
    assert bed_cmd("list", bed).stdout.split() == [f"{bed}-h{k}" for k in range(3)]
    listen = f"import socket, time\ns = socket.socket(); s.bind(('{SUBNET}.3', 5599)); s.listen()\ntime.sleep(600)"
    server = subprocess.Popen(["ip", "netns", "exec", f"{bed}-h2", sys.executable, "-c", listen])
    try:
        def probe() -> str:
            # Only from inside the test bed: its addresses mean nothing (or something else) outside it.
            return bed_cmd("exec", bed, 0, sys.executable, "-c", PROBE, f"{SUBNET}.3", 5599).stdout.strip()

        deadline = time.monotonic() + 60  # only ends a broken run
        while probe() != "ok":
            assert time.monotonic() < deadline, "host 0 never reached host 2"
        assert bed_cmd("link", bed, 2, "down").returncode == 0
        assert probe().startswith("no")
        assert bed_cmd("link", bed, 2, "up").returncode == 0
        deadline = time.monotonic() + 60  # only ends a broken run
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
