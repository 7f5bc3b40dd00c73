"""Adaptive liveness: the deadline estimator, a crashed peer in the simulator and in real processes, and a
slow-but-alive neighbour that must never be dropped."""

from __future__ import annotations

import itertools
import json
import signal
import time
from pathlib import Path

import pytest
from test_launch import _rounds_done, _start_peer, topology_file

from p2pser.cli import main
from p2pser.config import RunConfig
from p2pser.exchange.liveness import BUSY_MARGIN, FLOOR_S, MIN_WINDOW, WAIT_MARGIN, Deadlines, WaitEstimate
from p2pser.report.summary import read_metrics

UPPER = 20.0


def _end_rounds(d: Deadlines, lengths: list[float], t: float = 0.0) -> float:
    """Let rounds of these lengths end after clock ``t``; returns the clock after the last."""
    for length in lengths:
        t += length
        d.round_ended(t)
    return t


def _timed(lengths: list[float], window: int = 3) -> Deadlines:
    """Deadlines that have timed rounds of these lengths after the first (start-up) round."""
    d = Deadlines(UPPER, window=window)
    d.round_ended(1.0)
    _end_rounds(d, lengths, 1.0)
    return d


def test_wait_estimate_follows_jacobson_karels():
    e = WaitEstimate()
    assert e.deadline(0.0) is None  # never timed: no basis for a deadline
    e.observe(1.0)
    assert (e.mean, e.dev) == (1.0, 0.5)  # RFC 6298: first sample R gives SRTT = R, RTTVAR = R / 2
    e.observe(3.0)
    assert e.dev == pytest.approx(0.75 * 0.5 + 0.25 * 2.0)
    assert e.mean == pytest.approx(7 / 8 * 1.0 + 1 / 8 * 3.0)
    assert e.deadline(0.0) == pytest.approx(e.mean + 4 * e.dev)
    assert e.deadline(100.0) == 100.0  # never under the floor
    e.missed()
    e.missed()
    assert e.deadline(0.0) == pytest.approx(4 * (e.mean + 4 * e.dev))  # Karn: doubled per miss
    e.observe(e.mean)
    assert e.backoff == 1.0  # on time again: back to its own estimate


def test_round_timeout_until_a_whole_window_of_rounds_is_timed():
    d = Deadlines(UPPER, window=3)
    assert d.timeout({1, 2}) == UPPER
    d.observe({1: 50.0}, ())  # waits before the first round ended are start-up: not learned
    assert 1 not in d.neighbours
    d.round_ended(30.0)  # the first round's length includes start-up: not a round time either
    assert len(d.rounds) == 0
    for t in (30.4, 30.8):
        d.observe({1: 0.1, 2: 0.0})
        d.round_ended(t)
        assert d.timeout({1, 2}) == UPPER  # a wave of lateness may still be crossing the graph
    d.observe({1: 0.1, 2: 0.0})
    d.round_ended(31.2)
    assert d.timeout({1, 2}) == FLOOR_S  # 4 x 0.4 s rounds is under the absolute floor
    assert d.timeout({1, 2, 3}) == UPPER  # neighbour 3 never timed: patience
    assert d.timeout(set()) == FLOOR_S
    assert Deadlines(UPPER).rounds.maxlen == MIN_WINDOW >= 11  # a 20-peer ring has diameter 10


def test_deadline_is_a_few_round_times_or_an_erratic_neighbours_own():
    slow = _timed([1.5] * 5)
    slow.observe({1: 0.2})
    assert slow.timeout({1}) == BUSY_MARGIN * 1.5  # rounds of 1.5 s of our own work
    for wait in (0.1, 4.0, 0.1, 4.0):
        slow.observe({1: wait})
    e = slow.neighbours[1]
    assert e.mean + 4 * e.dev > BUSY_MARGIN * 1.5
    assert slow.timeout({1}) == pytest.approx(e.mean + 4 * e.dev)
    assert _timed([8.0] * 3).timeout(set()) == UPPER  # 3 x 8 s is capped by round_timeout


def test_the_last_rounds_work_and_the_longest_recent_wait_set_the_floor():
    d = Deadlines(UPPER, window=4)
    d.round_ended(0.0)
    t = 0.0

    def round_(length: float, wait: float) -> None:
        nonlocal t
        d.observe({1: wait})
        t += length
        d.round_ended(t)

    for length, wait in [(0.5, 0.1), (2.0, 1.8), (0.5, 0.1), (0.5, 0.1)]:
        round_(length, wait)
    assert d.timeout({1}) == pytest.approx(WAIT_MARGIN * 1.8)  # the spike after an evaluation will recur
    round_(0.5, 0.1)
    assert d.timeout({1}) == pytest.approx(WAIT_MARGIN * 1.8)
    round_(0.5, 0.1)
    assert d.timeout({1}) == FLOOR_S  # the spike left the window
    round_(5.1, 0.1)  # an evaluation round: 5 s of our own work, the neighbours' may differ by more
    assert d.timeout({1}) == pytest.approx(BUSY_MARGIN * 5.0)
    round_(0.5, 0.1)
    assert d.timeout({1}) == FLOOR_S
    # A round that waited out a deadline says nothing about normal rounds.
    d.observe({}, missed={1})
    d.round_ended(t + 19.0)
    assert max(work for work, _ in d.rounds) == pytest.approx(5.0)  # not 19 s
    assert d.timeout({1}) == pytest.approx(2 * FLOOR_S)  # neighbour 1 missed: its deadline doubled
    assert d.timeout({2}) == UPPER


def test_fixed_liveness_is_todays_behaviour():
    cfg = RunConfig(liveness="fixed", round_timeout=7.0, eval_every=10, checkpoint_every=3)
    d = Deadlines.from_config(cfg)
    assert not d.adaptive and d.rounds.maxlen == 20
    for t in range(30):
        d.observe({1: 0.0})
        d.round_ended(float(t))
    assert d.timeout({1}) == 7.0
    assert Deadlines.from_config(RunConfig()).rounds.maxlen == MIN_WINDOW


# -- simulated runs --------------------------------------------------------------------------------------

SIM = ["--model", "svm", "--features", "mfcc", "--max-seconds", "1.5", "--partition", "iid", "--peers", "4",
       "--topology", "ring", "--local-steps", "4", "--step-time", "const:0.05", "--eval-every", "4"]


@pytest.fixture(scope="module")
def cache(feature_cache) -> Path:
    # The session's warm cache (content-keyed: sharing it changes no result, and saves every test here
    # extracting the synthetic corpus again).
    return feature_cache


def _simulate(corpus: Path, cache: Path, out: Path, *extra) -> dict[int, list[dict]]:
    assert main(["simulate", str(corpus), "--cache-dir", str(cache), "--out", str(out), *SIM,
                 *map(str, extra)]) == 0
    return read_metrics(out)


def _round_lengths(rows: list[dict]) -> list[float]:
    times = [r["time"] for r in rows]
    return [b - a for a, b in itertools.pairwise(times)]


CRASH = MIN_WINDOW + 2  # deadlines adapt from round MIN_WINDOW + 1 on


@pytest.mark.slow
def test_simulated_crash_costs_its_neighbours_a_few_rounds_not_the_round_timeout(synth_corpus, cache, tmp_path):
    lost = {}
    for mode in ("fixed", "adaptive"):
        metrics = _simulate(synth_corpus, cache, tmp_path / mode, "--final-mixing", "0", "--rounds", CRASH + 3, "--churn", f"2@{CRASH}-",
                            "--liveness", mode)
        for k in (1, 3):  # the dead peer's neighbours: one wait for it, then they go on without it
            assert [r["heard"] for r in metrics[k]] == [2] * (CRASH + 1) + [1] * 2
        normal = _round_lengths(metrics[1])[0]
        lost[mode] = max(_round_lengths(metrics[1])) - normal
    assert lost["fixed"] == pytest.approx(UPPER, abs=0.5)
    assert lost["adaptive"] == pytest.approx(FLOOR_S, abs=0.5)  # rounds of 0.2 s: the absolute floor rules


@pytest.mark.slow
def test_a_straggler_is_waited_for_not_dropped(synth_corpus, cache, tmp_path):
    """One peer in four computes 20x slower: its neighbours wait ~4 s every round for it, the adaptive
    deadlines settle far below round_timeout, and the run is the very same as with fixed deadlines."""
    runs = {}
    for mode in ("fixed", "adaptive"):
        runs[mode] = _simulate(synth_corpus, cache, tmp_path / mode, "--final-mixing", "0", "--rounds", MIN_WINDOW + 3, "--stragglers", 0.25,
                               "--straggler-factor", 20, "--liveness", mode)
    adaptive = runs["adaptive"]
    assert all(r["heard"] == 2 for rows in adaptive.values() for r in rows)  # nobody ever dropped
    waits = [r["wait_s"] for rows in adaptive.values() for r in rows[1:]]
    assert max(waits) > 3.0  # someone really waited for the straggler
    late = [r["deadline_s"] for rows in adaptive.values() for r in rows[MIN_WINDOW + 1:]]
    assert max(late) < UPPER and min(late) > max(waits)

    def without_deadlines(metrics):
        return {p: [{k: v for k, v in r.items() if k != "deadline_s"} for r in rows] for p, rows in metrics.items()}

    assert without_deadlines(runs["fixed"]) == without_deadlines(adaptive)  # same models, same clock


# -- real processes --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_peer_is_dropped_after_a_few_round_times_by_real_peers(tmp_path, synth_corpus, cache):
    """Four `p2pser peer` processes on a ring, a round_timeout of 60 s; peer 2 gets SIGKILL after its round
    CRASH. Its neighbours drop it after a few of their round times, not 60 s, and finish; nobody is dropped
    before."""
    timeout = 60
    topo = topology_file(tmp_path, "ring", 4)
    run = tmp_path / "run"
    run.mkdir()
    rounds = CRASH + 3
    procs = [_start_peer(topo, k, synth_corpus, run, cache, "--final-mixing", "0", "--rounds", rounds, "--round-timeout", timeout,
                         "--eval-every", 4) for k in range(4)]
    try:
        deadline = time.monotonic() + 180
        while _rounds_done(run, 2) < CRASH + 1:
            assert time.monotonic() < deadline, f"peer 2 never reached round {CRASH}"
            assert all(p.poll() is None for p in procs), (run / "peer2.log").read_text()[-2000:]
            time.sleep(0.05)
        procs[2].send_signal(signal.SIGKILL)
        for k in (0, 1, 3):
            assert procs[k].wait(timeout=180) == 0, (run / f"peer{k}.log").read_text()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    metrics = read_metrics(run)
    killed_after = metrics[2][-1]["round"]
    for k in (1, 3):
        rows = metrics[k]
        assert [r["round"] for r in rows] == list(range(rounds)) and rows[-1]["heard"] == 1
        assert all(r["heard"] == 2 for r in rows[: killed_after + 1])  # no false suspect before
        lengths = _round_lengths(rows)
        normal = max(lengths[MIN_WINDOW:killed_after])
        detection = next(i for i, r in enumerate(rows) if r["heard"] == 1)
        # The one wait for the dead peer: its adaptive deadline, a few normal rounds, not the 60 s.
        assert rows[detection]["deadline_s"] < timeout / 3
        assert lengths[detection - 1] < rows[detection]["deadline_s"] + 2 * normal + 1.0, lengths
    # Peer 0 finishes too. Both its neighbours waited out a deadline for peer 2, so their next models reach
    # it about one deadline late and it may go a round or two without them (see liveness.py: the ripple).
    assert [r["round"] for r in metrics[0]] == list(range(rounds))
    assert json.loads((run / "peer-001" / "status.json").read_text())["state"] == "done"
