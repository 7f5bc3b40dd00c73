"""Checkpoints: exact round trips, refusals of damaged or foreign files, and real peers killed with SIGKILL
(during training and during a checkpoint write) that resume from the last good checkpoint and catch up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_launch import topology_file

from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.exchange.checkpoint import CHECKPOINT_NAME, Checkpointer, load_checkpoint, save_checkpoint
from p2pser.exchange.peer import Peer, make_learner
from p2pser.learn.data import PeerData

FAST = ["--model", "cnn1d-shallow", "--partition", "iid", "--features", "mfcc", "--max-seconds", "1.5",
        "--batch-size", "16"]


def make_peer(model: str, peer_id: int = 0, **changes) -> Peer:
    """A peer on random features: what is tested here is the learning state, not the data."""
    rng = np.random.default_rng(1)
    n, channels, frames = 40, 20, 48
    x = rng.normal(size=(n, channels, frames)).astype(np.float32)
    y = np.arange(n) % 4
    lengths = np.full(n, frames)
    test = (x[:8], y[:8], lengths[:8])
    data = PeerData.from_arrays(x, y, lengths, np.arange(n), test, ["a", "b", "c", "d"], val_fraction=0.1, seed=0)
    cfg = RunConfig(model=model, features="mfcc", rounds=6, local_steps=3, batch_size=8, **changes)
    return Peer(peer_id, [], make_learner(data, cfg, peer_id), cfg, mix_weights={peer_id: 1.0})


@pytest.mark.parametrize("model", ["cnn1d-shallow", "crnn"])
def test_a_restored_peer_continues_exactly_as_if_it_never_stopped(tmp_path, model):
    first = make_peer(model)
    first.local_update(5)
    first.age = 15.0
    save_checkpoint(tmp_path / CHECKPOINT_NAME, first, next_round=2)
    first.local_update(4)

    second = make_peer(model)
    saver = Checkpointer(second, tmp_path, every=1)
    assert saver.resume()
    assert (second.round, second.age, saver.next_round) == (2, 15.0, 2)
    second.local_update(4)
    # Same weights, optimiser moments, learning-rate position, batch order and augmentation noise.
    for name, value in first.snapshot().items():
        np.testing.assert_array_equal(second.snapshot()[name], value)


def test_checkpoints_every_k_rounds_and_no_temporary_file_is_left(tmp_path):
    peer = make_peer("cnn1d-shallow")
    saver = Checkpointer(peer, tmp_path, every=2)
    written = []
    for r in range(5):
        before = (tmp_path / CHECKPOINT_NAME).stat().st_mtime_ns if (tmp_path / CHECKPOINT_NAME).exists() else None
        saver.after_round(r)
        after = (tmp_path / CHECKPOINT_NAME).stat().st_mtime_ns if (tmp_path / CHECKPOINT_NAME).exists() else None
        written.append(after != before)
    assert written == [False, True, False, True, False]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).next_round == 4
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_damaged_foreign_and_half_written_checkpoints(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match=f"checkpoint {path} is damaged"):
        load_checkpoint(path)
    save_checkpoint(path, make_peer("cnn1d-shallow"), next_round=1)
    with pytest.raises(UserError, match="made with model 'cnn1d-shallow', this run has 'crnn'"):
        Checkpointer(make_peer("crnn"), tmp_path, every=1).resume()
    with pytest.raises(UserError, match="made with peer 0, this run has 3"):
        Checkpointer(make_peer("cnn1d-shallow", peer_id=3), tmp_path, every=1).resume()
    # A write cut short by a crash leaves a .tmp beside the good file: it is removed, the good one is used.
    (tmp_path / (CHECKPOINT_NAME + ".tmp")).write_bytes(b"torn")
    peer = make_peer("cnn1d-shallow")
    assert Checkpointer(peer, tmp_path, every=1).resume() and peer.round == 1
    assert not (tmp_path / (CHECKPOINT_NAME + ".tmp")).exists()


# -- real processes -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(feature_cache) -> Path:
    # The session's warm cache (content-keyed: sharing it changes no result, and saves every test here
    # extracting the synthetic corpus again).
    return feature_cache


def start_peer(topo: Path, k: int, corpus: Path, run: Path, cache_dir: Path, *extra, log_name: str = "") -> subprocess.Popen:
    log = open(run / (log_name or f"peer{k}.log"), "a")  # noqa: SIM115 -- the child owns it
    cmd = [sys.executable, "-m", "p2pser", "-v", "peer", corpus, "--topology", topo, "--id", k, "--out", run,
           "--cache-dir", cache_dir, *FAST, *extra]
    return subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)


def metrics(run: Path, k: int) -> list[dict]:
    path = run / f"peer-{k:03d}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll until ``condition()`` holds; ``timeout`` only ends a broken run, so make it generous."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def rejoin_round(log: Path) -> int | None:
    """The round a restarted peer caught up to, from its log."""
    for line in log.read_text().splitlines():
        if "caught up from" in line:
            return int(line.split("at round ")[1].split()[0])
    return None


@pytest.mark.slow
def test_peer_killed_during_training_resumes_catches_up_and_is_readmitted(tmp_path, synth_corpus, cache_dir):
    topo = topology_file(tmp_path, "ring", 3)
    run = tmp_path / "run"
    run.mkdir()
    # Open-ended runs (stopped by the test with SIGTERM), so that on a fast or a slow machine alike the
    # others are still training when the killed peer comes back. The time budget is only a safety net.
    common = ["--final-mixing", "0", "--rounds", 100_000, "--local-steps", 6, "--checkpoint-every", 3, "--round-timeout", 5,
              "--eval-every", 5, "--time-budget", 240]
    procs = [start_peer(topo, k, synth_corpus, run, cache_dir, *common) for k in range(3)]
    log1 = run / "peer1.log"
    try:
        wait_until(lambda: len(metrics(run, 1)) >= 7, 240, "peer 1 never reached round 7")
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        killed_after = len(metrics(run, 1))
        saved = load_checkpoint(run / "peer-001" / CHECKPOINT_NAME).next_round
        assert saved % 3 == 0 and 0 < saved <= killed_after
        # The others carry on without it ...
        wait_until(lambda: len(metrics(run, 0)) >= killed_after + 4, 240, "peer 0 stalled after the kill")
        procs[1] = start_peer(topo, 1, synth_corpus, run, cache_dir, *common)
        # ... until it is back, has caught up and has trained a few rounds with them.
        wait_until(lambda: rejoin_round(log1) is not None, 240, "peer 1 never caught up")
        rejoined_at = rejoin_round(log1)
        wait_until(lambda: metrics(run, 1)[-1]["round"] >= rejoined_at + 3, 120, "peer 1 stalled after rejoining")
        wait_until(lambda: metrics(run, 0)[-1]["round"] >= rejoined_at + 3, 120, "peer 0 stalled")
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for k in range(3):
            assert procs[k].wait(timeout=60) == 130, (run / f"peer{k}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert f"resumed from {run / 'peer-001' / CHECKPOINT_NAME} at round {saved}" in log1.read_text()
    assert rejoined_at > killed_after + 3  # it jumped to the neighbours' round, not back to its checkpoint
    rows1 = metrics(run, 1)
    after = [r["round"] for r in rows1 if r["round"] >= rejoined_at]
    assert after == list(range(rejoined_at, rejoined_at + len(after)))
    # Its neighbours dropped it while it was dead and took it back when it returned.
    heard = {r["round"]: r["heard"] for r in metrics(run, 0)}
    assert min(heard[r] for r in range(killed_after + 1, killed_after + 4)) == 1
    assert 2 in [heard.get(r) for r in range(rejoined_at, rejoined_at + 4)]
    # Stopped with SIGTERM: the exit checkpoint holds the position after the last finished round.
    assert json.loads((run / "peer-001" / "status.json").read_text())["state"] == "interrupted"
    assert load_checkpoint(run / "peer-001" / CHECKPOINT_NAME).next_round == rows1[-1]["round"] + 1


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_last_good_checkpoint(tmp_path, synth_corpus, cache_dir):
    """SIGKILL the moment a checkpoint's temporary file appears, until one kill lands mid-write."""
    topo = topology_file(tmp_path, "ring", 2)
    run = tmp_path / "run"
    run.mkdir()
    folder = run / "peer-000"
    tmp = folder / (CHECKPOINT_NAME + ".tmp")
    # A lone peer (its neighbour never starts) checkpointing every round of a larger model: many writes.
    common = ["--final-mixing", "0", "--rounds", 400, "--local-steps", 1, "--checkpoint-every", 1, "--round-timeout", 0.01,
              "--startup-timeout", 0.01, "--model", "crnn", "--liveness", "fixed"]
    hit = False
    for attempt in range(6):
        proc = start_peer(topo, 0, synth_corpus, run, cache_dir, *common)
        try:
            trained = 3 * (attempt + 1)
            wait_until(lambda n=trained: len(metrics(run, 0)) >= n, 240, "the peer never trained")
            deadline = time.monotonic() + 20
            while not tmp.exists() and time.monotonic() < deadline:
                pass
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        if tmp.exists():
            hit = True
            break
    assert hit, "no kill landed during a checkpoint write in 6 attempts"
    good = load_checkpoint(folder / CHECKPOINT_NAME)  # the previous checkpoint is intact
    assert good.next_round >= 2  # written before the kill; the one being written when it landed is lost
    proc = start_peer(topo, 0, synth_corpus, run, cache_dir, *common, "--final-mixing", "0", "--rounds", good.next_round + 2,
                      log_name="restart.log")
    assert proc.wait(timeout=300) == 0
    log = (run / "restart.log").read_text()
    assert "a checkpoint write cut short by a crash" in log
    assert f"at round {good.next_round}" in log
    assert not tmp.exists()
    assert load_checkpoint(folder / CHECKPOINT_NAME).next_round == good.next_round + 2
