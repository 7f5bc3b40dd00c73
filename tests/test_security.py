"""CurveZMQ for real peers: key files, keys in topologies, clear errors, and strangers refused on the wire."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
import zmq.utils.monitor
from test_checkpoint import wait_until
from test_launch import free_base_port

from p2pser.carriers.security import curve_config, load_secret_key, security_on, with_public_keys
from p2pser.carriers.transport import CurveConfig, ZmqTransport
from p2pser.cli import main
from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.exchange.codec import encode
from p2pser.exchange.topology import load_topology, make_topology, save_topology

FAST = ["--model", "cnn1d-shallow", "--partition", "iid", "--features", "mfcc", "--max-seconds", "1.5",
        "--local-steps", "4", "--batch-size", "16"]


def p2pser(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pser", *map(str, args)], capture_output=True, text=True,
                          check=False, **kw)


def keys_cli(*args) -> int:
    """``p2pser keys ...`` in this process (the same entry point, without a second interpreter start)."""
    return main(["keys", *map(str, args)])


@pytest.fixture
def keyed_ring(tmp_path) -> tuple[Path, Path]:
    topo = save_topology(make_topology("ring", 3, base_port=free_base_port(3)), tmp_path / "ring.toml")
    assert keys_cli("new", tmp_path / "keys", "--topology", topo) == 0
    return topo, tmp_path / "keys"


def test_keys_new_writes_private_secret_files_and_fills_the_topology(keyed_ring, tmp_path, capsys):
    topo_path, keys = keyed_ring
    topo = load_topology(topo_path)
    for k in range(3):
        secret = keys / f"peer-{k}.key"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        public, _ = load_secret_key(secret)
        assert topo.peers[k].public_key == public
        assert "secret" not in (keys / f"peer-{k}.pub").read_text()
        # ZeroMQ's own certificate reader agrees with ours.
        assert zmq.auth.load_certificate(str(secret))[0].decode() == public
    assert len({p.public_key for p in topo.peers}) == 3
    # One site makes only its own key; an existing key is never overwritten.
    assert keys_cli("new", tmp_path / "site", "--id", 7) == 0
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["peer-7.key", "peer-7.pub"]
    capsys.readouterr()
    assert keys_cli("new", keys, "--id", 1) == 2
    assert "already exists" in capsys.readouterr().err
    assert keys_cli("new", tmp_path / "x") == 2
    # `keys fill` puts the same keys into another copy of the file.
    bare = save_topology(make_topology("ring", 3), tmp_path / "bare.toml")
    assert keys_cli("fill", keys, bare, "-o", tmp_path / "filled.toml") == 0
    filled = load_topology(tmp_path / "filled.toml")
    assert [p.public_key for p in filled.peers] == [p.public_key for p in topo.peers]


def test_security_mode_auto_follows_the_hosts():
    one_host = make_topology("ring", 3)
    assert not security_on("auto", one_host) and security_on("on", one_host) and not security_on("off", one_host)
    from dataclasses import replace

    spread = type(one_host)(one_host.kind, (replace(one_host.peers[0], host="10.0.0.9"), *one_host.peers[1:]),
                            one_host.edges)
    assert security_on("auto", spread)


def test_key_problems_are_clear_errors(keyed_ring, tmp_path):
    topo_path, keys = keyed_ring
    topo = load_topology(topo_path)
    with pytest.raises(UserError, match="no key was given"):
        curve_config(topo, 0, None)
    with pytest.raises(UserError, match=r"peer-0\.key not found"):
        curve_config(topo, 0, tmp_path)
    with pytest.raises(UserError, match="does not belong"):
        curve_config(topo, 0, keys / "peer-1.key")
    with pytest.raises(UserError, match="no secret-key line"):
        curve_config(topo, 0, keys / "peer-0.pub")
    unreadable = tmp_path / "garbage.key"
    unreadable.write_bytes(b"\xff\xfe not a key")
    with pytest.raises(UserError, match="cannot read secret key file"):
        curve_config(topo, 0, unreadable)
    bare = make_topology("ring", 3)
    with pytest.raises(UserError, match="no public_key for peer"):
        curve_config(bare, 0, keys)
    config = curve_config(topo, 1, keys)
    assert set(config.peer_keys) == {0, 2}
    assert with_public_keys(bare, keys).peers[2].public_key == topo.peers[2].public_key


@pytest.mark.slow
def test_peer_with_security_on_and_no_key_file_stops_with_one_line(keyed_ring, tmp_path, synth_corpus):
    topo, _ = keyed_ring
    cache = tmp_path / "cache"
    result = p2pser("peer", synth_corpus, "--topology", topo, "--id", 0, "--out", tmp_path / "run",
                    "--security", "on", "--keys", tmp_path / "nowhere", "--cache-dir", cache, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere not found" in lines[0], result.stderr
    assert not cache.exists()  # checked before any feature extraction: a missing key must not cost minutes first
    status = json.loads((tmp_path / "run" / "peer-000" / "status.json").read_text())
    assert status["state"] == "crashed" and "nowhere" in status["error"]


def _as_peer(frames: list[zmq.Frame], sender: int, round_: int) -> list:
    """A valid model message from ``sender``: the tensors of a received message, re-encoded."""
    header = msgpack.unpackb(frames[0].bytes)
    state = {name: np.frombuffer(f.bytes, dtype=dtype).reshape(shape).copy()
             for name, dtype, shape, f in zip(header["names"], header["dtypes"], header["shapes"], frames[1:])}
    return encode(state, sender=sender, round=round_, samples=header["samples"])


def _rows(run: Path) -> list[dict]:
    path = run / "peer-000" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_unlisted_key_and_plain_text_peer_cannot_deliver_a_model(tmp_path, synth_corpus):
    """Real secured peer 0; the test plays its neighbour 1 (listed key), a stranger with its own key that
    claims to be peer 1, and a plain-text DEALER claiming to be peer 1. Strangers send valid models for
    the first rounds, then the real peer 1 does: only the latter is ever heard."""
    topo_path = save_topology(make_topology("ring", 2, base_port=free_base_port(2)), tmp_path / "pair.toml")
    keys = tmp_path / "keys"
    assert keys_cli("new", keys, "--topology", topo_path) == 0
    topo = load_topology(topo_path)
    pub0 = topo.peers[0].public_key
    run = tmp_path / "run"
    run.mkdir()
    log_path = run / "peer0.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pser", "peer", str(synth_corpus), "--topology", str(topo_path), "--id", "0",
             "--out", str(run), "--security", "on", "--keys", str(keys), "--final-mixing", "0", "--rounds", "10", "--round-timeout", "1",
             "--startup-timeout", "2", "--cache-dir", str(tmp_path / "cache"), *FAST],
            stdout=log, stderr=subprocess.STDOUT)
    legit = ZmqTransport(1, topo.endpoint(1), {0: topo.endpoint(0)},
                         curve=CurveConfig(*load_secret_key(keys / "peer-1.key"), {0: pub0}))
    stranger_pub, stranger_sec = (k.decode() for k in zmq.curve_keypair())
    stranger = ZmqTransport(1, "tcp://127.0.0.1:0", {0: topo.endpoint(0)},
                            curve=CurveConfig(stranger_pub, stranger_sec, {0: pub0}))
    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.IDENTITY, b"1")
    plain.setsockopt(zmq.RECONNECT_IVL, 100)
    monitor = plain.get_monitor_socket()
    plain.connect(topo.endpoint(0))
    events: list[int] = []
    template = None
    strangers_sent = legit_sent = 0
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            got = legit.recv(0.1)
            if got is not None:
                template = got[1]
            while monitor.poll(0):
                events.append(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
            done = len(_rows(run))
            if template is None:
                continue
            if done < 5:
                stranger.send(0, _as_peer(template, 1, done))
                try:
                    plain.send_multipart(_as_peer(template, 1, done), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # no connection ever completes its handshake, so the DEALER has nowhere to queue
                strangers_sent += 1
            else:
                legit.send(0, _as_peer(template, 1, done))
                legit_sent += 1
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        for t in (legit, stranger):
            t.close()
        monitor.close(0)
        plain.close(0)
        ctx.term()
    log = log_path.read_text()
    rows = _rows(run)
    assert template is not None, "peer 0 never sent its model over the encrypted link"
    assert strangers_sent >= 10 and legit_sent >= 3
    early = [r for r in rows if r["round"] < 4]
    assert early and all(r["heard"] == 0 and r["bytes_received"] == 0 for r in early), early
    assert any(r["heard"] == 1 for r in rows[5:]), rows  # the listed key is heard: the wire works
    assert "refused a CurveZMQ connection from 127.0.0.1" in log and stranger_pub in log, log[-2000:]
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events
    assert any(e & (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_DISCONNECTED) for e in events), events


def _curve_pair(addresses: frozenset[str], caplog, *, refused: bool, strict: bool = True) -> bool:
    """Peer 1 (holding its real key) connects from 127.0.0.1 to peer 0, which expects it from ``addresses``;
    whether its message was delivered."""
    import zmq

    from p2pser.carriers.transport import CurveConfig, ZmqTransport

    pub0, sec0 = (k.decode() for k in zmq.curve_keypair())
    pub1, sec1 = (k.decode() for k in zmq.curve_keypair())
    server = ZmqTransport(0, "tcp://127.0.0.1:0", {}, curve=CurveConfig(pub0, sec0, {1: pub1}, {1: addresses},
                                                                       strict_addresses=strict))
    client = ZmqTransport(1, "tcp://127.0.0.1:0", {0: server.endpoint}, curve=CurveConfig(pub1, sec1, {0: pub0}))
    try:
        client.send(0, [b"hello"])
        if refused:
            # No message passes before a handshake succeeds: once the refusal is logged, none can arrive.
            wait_until(lambda: "refused a CurveZMQ connection" in caplog.text, 120, "no refusal was logged")
            return server.recv(1.0) is not None
        got = server.recv(120.0)
        return got is not None and got[0] == 1
    finally:
        client.close()
        server.close()


def test_a_listed_key_from_the_wrong_address_is_refused_and_logged(caplog):
    caplog.set_level("WARNING", logger="p2pser.carriers.transport")
    assert not _curve_pair(frozenset({"127.0.0.2"}), caplog, refused=True)
    assert "refused a CurveZMQ connection from 127.0.0.1: it presents peer 1's key but peer 1 connects from " \
           "127.0.0.2" in caplog.text
    assert _curve_pair(frozenset({"127.0.0.1"}), caplog, refused=False)


def test_peer_address_key_only_admits_a_listed_key_from_elsewhere_and_says_so(keyed_ring, caplog):
    """A multi-homed host connects from another address than its listening one: --peer-address key-only
    admits the listed key anyway, logging the unexpected address; a stranger's key is still refused."""
    caplog.set_level("WARNING")
    assert _curve_pair(frozenset({"127.0.0.2"}), caplog, refused=False, strict=False)
    assert "admitted peer 1's key from 127.0.0.1, not from its topology address 127.0.0.2 (--peer-address " \
           "key-only)" in caplog.text
    topo_path, keys = keyed_ring
    topo = load_topology(topo_path)
    strict = curve_config(topo, 1, keys)
    relaxed = curve_config(topo, 1, keys, peer_address="key-only")
    assert strict.strict_addresses and not relaxed.strict_addresses
    assert relaxed.peer_keys == strict.peer_keys  # only listed keys, as before
    assert "key-only: a neighbour's listed key is admitted from any address" in caplog.text
    with pytest.raises(UserError, match="peer_address"):
        RunConfig(peer_address="anywhere")


def test_a_plain_text_client_is_refused_and_logged_by_the_secured_side(caplog):
    import zmq

    from p2pser.carriers.transport import CurveConfig, ZmqTransport

    caplog.set_level("WARNING", logger="p2pser.carriers.transport")
    pub0, sec0 = (k.decode() for k in zmq.curve_keypair())
    pub1, _ = (k.decode() for k in zmq.curve_keypair())
    server = ZmqTransport(0, "tcp://127.0.0.1:0", {}, curve=CurveConfig(pub0, sec0, {1: pub1}))
    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.IDENTITY, b"1")
    plain.connect(server.endpoint)
    try:
        plain.send_multipart([b"not", b"encrypted"])
        wait_until(lambda: "failed the CurveZMQ handshake" in caplog.text, 120, "no failed handshake was logged")
        assert server.recv(1.0) is None
    finally:
        plain.close(0)
        ctx.term()
        server.close()
