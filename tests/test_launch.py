"""Real peer processes on loopback: convergence, malformed frames, and the privacy proof. (Killed peers:
test_liveness.py and test_checkpoint.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import soundfile
import zmq

from p2pser.audio.synth import synthesize_corpus
from p2pser.exchange.topology import make_topology, save_topology

N_CLASSES = 6  # the synthetic corpus' emotions
ROUNDS_LONE = 30  # the peer under attack runs long enough to read every malformed message sent mid-run
FAST = ["--model", "cnn1d-shallow", "--partition", "iid", "--features", "mfcc", "--max-seconds", "1.5",
        "--local-steps", "6", "--batch-size", "16"]


def free_base_port(n: int) -> int:
    """A base port with ``n`` consecutive free ports on 127.0.0.1."""
    rng = np.random.default_rng()
    for _ in range(200):
        base = int(rng.integers(20000, 60000 - n))
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize_corpus(out, speakers=6, per_emotion=8, seed=3)
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def p2pser(*args, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "p2pser", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def topology_file(tmp_path: Path, kind: str, n: int) -> Path:
    path = tmp_path / f"{kind}-{n}.toml"
    save_topology(make_topology(kind, n, base_port=free_base_port(n)), path)
    return path


@pytest.mark.slow
def test_four_peers_converge_and_learn(tmp_path, corpus, cache_dir):
    topo = topology_file(tmp_path, "ring", 4)
    run = tmp_path / "run"
    result = p2pser("launch", topo, corpus, "--out", run, "--final-mixing", "0", "--rounds", 14, "--cache-dir", cache_dir, "--quiet",
                    *FAST, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("mode", "algorithm", "topology", "peers", "rounds", "ua_mean", "ua_min", "ua_average_model",
                "consensus_distance_first", "consensus_distance_last", "bytes_sent_total", "bytes_sent_max_peer",
                "wall_s"):
        assert key in summary, key
    assert summary["mode"] == "launch" and summary["peers"] == 4 and summary["rounds"] == 14
    assert summary["consensus_distance_last"] * 10 <= summary["consensus_distance_first"]
    assert summary["ua_mean"] > 1 / N_CLASSES + 0.2, summary["ua_mean"]
    assert summary["bytes_sent_total"] > 0
    assert (run / "ua_per_peer.png").stat().st_size > 0 and (run / "consensus_distance.png").stat().st_size > 0
    for k in range(4):
        assert (run / f"peer-{k:03d}" / "model.npz").exists()

    # The simulator runs the same peer code: with the same seed and options it must tell the same story.
    sim = tmp_path / "sim"
    result = p2pser("simulate", corpus, "--topology", topo, "--out", sim, "--final-mixing", "0", "--rounds", 14, "--cache-dir", cache_dir,
                    *FAST, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    simulated = json.loads((sim / "summary.json").read_text())
    assert simulated["mode"] == "simulate"
    assert abs(simulated["ua_mean"] - summary["ua_mean"]) <= 0.01
    launched_cd = summary["consensus_distance_per_round"]
    simulated_cd = simulated["consensus_distance_per_round"]
    assert launched_cd.keys() == simulated_cd.keys()
    for r in launched_cd:
        assert simulated_cd[r] == pytest.approx(launched_cd[r], rel=0.05)


def _start_peer(topo: Path, k: int, corpus: Path, run: Path, cache_dir: Path, *extra) -> subprocess.Popen:
    log = open(run / f"peer{k}.log", "w")  # noqa: SIM115 -- the child owns it
    cmd = [sys.executable, "-m", "p2pser", "peer", corpus, "--topology", topo, "--id", k, "--out", run,
           "--cache-dir", cache_dir, *FAST, *extra]
    return subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)


def _rounds_done(run: Path, k: int) -> int:
    path = run / f"peer-{k:03d}" / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def lone_peer(tmp_path_factory, corpus, cache_dir):
    """Peer 0 of a two-peer topology runs for real; the test plays peer 1: it records every frame peer 0
    sends and sends it malformed messages."""
    tmp = tmp_path_factory.mktemp("lone")
    topo = topology_file(tmp, "ring", 2)
    from p2pser.exchange.topology import load_topology

    t = load_topology(topo)
    ctx = zmq.Context()
    inbound = ctx.socket(zmq.ROUTER)  # where peer 0 sends to "peer 1"
    inbound.bind(t.endpoint(1))
    outbound = ctx.socket(zmq.DEALER)  # "peer 1" talking to peer 0
    outbound.setsockopt(zmq.IDENTITY, b"1")
    outbound.connect(t.endpoint(0))
    run = tmp / "run"
    run.mkdir()
    proc = _start_peer(topo, 0, corpus, run, cache_dir, "--final-mixing", "0", "--rounds", ROUNDS_LONE, "--round-timeout", 1,
                       "--startup-timeout", 2)
    received: list[list[bytes]] = []
    garbage = [
        [b"\x00\x01garbage"],
        [msgpack.packb({"v": 99, "kind": "model"})],
        [msgpack.packb({"v": 1, "kind": "model", "sender": 1, "round": 0}), b"x" * 10],
        [b""],
        [msgpack.packb([1, 2, 3]), b"\xff" * 64, b"\x00"],
    ]
    sent = 0
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if inbound.poll(100):
            received.append(inbound.recv_multipart()[1:])  # drop the routing identity
        if _rounds_done(run, 0) >= 2 and sent == 0:
            # One burst while the peer is mid-run: it must reject them all and keep training.
            for k in range(40):
                outbound.send_multipart(garbage[k % len(garbage)])
            sent = 40
    while inbound.poll(200):
        received.append(inbound.recv_multipart()[1:])
    rc = proc.wait(timeout=30)
    inbound.close(0)
    outbound.close(0)
    ctx.term()
    return {"rc": rc, "run": run, "frames": received, "sent": sent, "corpus": corpus, "topo": t,
            "cache_dir": cache_dir}


@pytest.mark.slow
def test_malformed_frames_are_rejected_and_logged_while_training_goes_on(lone_peer):
    run = lone_peer["run"]
    log = (run / "peer0.log").read_text()
    assert lone_peer["rc"] == 0, log[-2000:]
    assert lone_peer["sent"] >= 20
    rejected = [line for line in log.splitlines() if "rejected a message from 1" in line]
    assert len(rejected) >= 20, log[-2000:]
    rows = [json.loads(line) for line in (run / "peer-000" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == ROUNDS_LONE - 1 and rows[-1]["rejected"] >= 20
    assert all(np.isfinite(r["loss"]) for r in rows)
    with np.load(run / "peer-000" / "model.npz") as z:
        assert all(np.isfinite(z[k]).all() for k in z.files)


@pytest.mark.slow
def test_privacy_every_frame_sent_is_a_header_or_a_declared_parameter_tensor(lone_peer):
    frames = lone_peer["frames"]
    assert len(frames) >= 10  # one model per round
    with np.load(lone_peer["run"] / "peer-000" / "model.npz") as z:
        params = {k: (z[k].shape, z[k].dtype) for k in z.files}
    allowed_header = {"v", "kind", "sender", "round", "age", "samples", "names", "dtypes", "shapes", "hash",
                      "checksum", "meta"}
    for message in frames:
        header = msgpack.unpackb(message[0])
        assert set(header) <= allowed_header
        assert header["kind"] == "model" and header["meta"] == {}
        assert dict(zip(header["names"], map(tuple, header["shapes"]))) == {k: v[0] for k, v in params.items()}
        assert len(message) == 1 + len(header["names"])  # nothing rides along
        for name, frame in zip(header["names"], message[1:]):
            shape, dtype = params[name]
            assert len(frame) == int(np.prod(shape)) * dtype.itemsize
    # No audio sample run of the peer's corpus appears in anything it sent.
    sent = b"".join(f for message in frames for f in message)
    corpus = lone_peer["corpus"]
    for wav in sorted(corpus.glob("*/*.wav"))[:40]:
        pcm, _ = soundfile.read(wav, dtype="int16")
        chunk = pcm[len(pcm) // 2 : len(pcm) // 2 + 32].tobytes()
        assert chunk not in sent
    # Nor does any run of the features the peer computed from its own speech.
    from p2pser.config import RunConfig
    from p2pser.partition.experiment import extract_for, make_plan

    cfg = RunConfig(partition="iid", features="mfcc", max_seconds=1.5, cache_dir=str(lone_peer["cache_dir"]))
    plan = make_plan(corpus, cfg, 2)
    features, _ = extract_for(plan, plan.peers[0], cfg)
    for x in features.x[:40]:
        for channel in (0, 3, 50):
            assert x[channel, 5:21].tobytes() not in sent
