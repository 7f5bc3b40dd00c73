"""The supervisor behind `launch`, `launch-hosts` and `slurm peer`: exits read from the process (a signal
included), restarts, the status files it writes, `--continue`; and real launches whose peers are SIGKILLed,
restarted, or stopped with Ctrl-C and continued. (Over real SSH: tests/test_ssh.py.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import topology_file
from test_netns import FAST

from p2pser.cli import main
from p2pser.config import RunConfig
from p2pser.deploy.launch import write_config_toml
from p2pser.deploy.multihost import slurm_task
from p2pser.deploy.supervise import (
    LocalPeer,
    Supervisor,
    continued_config,
    continued_topology,
    crashed_peers,
    describe_exit,
)
from p2pser.errors import UserError
from p2pser.exchange.topology import make_topology, save_topology
from p2pser.report.metrics_log import forget_rounds_from
from p2pser.report.run_folder import prepare_out_dir
from p2pser.report.summary import bytes_sent

CHANCE = 1 / 6  # the synthetic corpus' six emotions


def test_an_exit_is_told_by_its_signal_or_status():
    assert describe_exit(-9) == "killed by SIGKILL (out of memory, or kill -9)"
    assert describe_exit(-11) == "killed by SIGSEGV"
    assert describe_exit(137, shell=True) == "killed by SIGKILL (out of memory, or kill -9)"
    assert describe_exit(137) == "exit 137"  # only a shell reports signals as 128+N
    assert "connection is lost" in describe_exit(-9, shell=True)  # the local ssh, not the remote peer
    assert describe_exit(130) == describe_exit(130, shell=True) == "stopped by SIGINT or SIGTERM"
    assert "connection" in describe_exit(255, shell=True)
    assert describe_exit(2) == "exit 2 (a configuration error)" and describe_exit(1) == "exit 1"


def _script_peer(tmp_path: Path, k: int, code: str) -> LocalPeer:
    """A stand-in peer: a real process running ``code`` with its folder as working directory."""
    folder = tmp_path / f"peer-{k:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    prelude = f"import os, sys, signal, pathlib, json; os.chdir({str(folder)!r}); "
    return LocalPeer(k, [sys.executable, "-c", prelude + code], folder)


def test_supervisor_reads_every_end_restarts_within_its_budget_and_records_it(tmp_path, capsys):
    # Peer 0 finishes; peer 1 is SIGKILLed in its first life and finishes in its second; peer 2 always dies
    # by a signal; peer 3 stops on a configuration error, which a restart cannot fix.
    lives = "n = len(list(pathlib.Path('.').glob('life-*'))); pathlib.Path(f'life-{n}').touch(); "
    workers = [
        _script_peer(tmp_path, 0, "json.dump({'peer': 0, 'state': 'done'}, open('status.json', 'w'))"),
        _script_peer(tmp_path, 1, lives + "json.dump({'peer': 1, 'state': 'running'}, open('status.json', 'w')); "
                                          "n == 0 and os.kill(os.getpid(), signal.SIGKILL); "
                                          "json.dump({'peer': 1, 'state': 'done'}, open('status.json', 'w'))"),
        _script_peer(tmp_path, 2, lives + "print('segfault ahead', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"),
        _script_peer(tmp_path, 3, lives + "json.dump({'peer': 3, 'state': 'crashed', 'error': 'no such model'}, "
                                          "open('status.json', 'w')); sys.exit(2)"),
    ]
    result = Supervisor(workers, restarts=2, poll_s=0.05).run()
    assert not result.interrupted
    assert {k: o.state for k, o in result.peers.items()} == {0: "done", 1: "done", 2: "crashed", 3: "crashed"}
    assert {k: o.restarts for k, o in result.peers.items()} == {0: 0, 1: 1, 2: 2, 3: 0}
    assert result.crashed == [2, 3]
    assert len(list((tmp_path / "peer-002").glob("life-*"))) == 3  # its first life and two restarts
    # Every crash is in the record, whether it was restarted or not (peers' crashes interleave in time).
    crashes = [(c["peer"], c["restarted"]) for c in result.crashes]
    assert sorted(crashes) == [(1, True), (2, False), (2, True), (2, True), (3, False)]
    assert [c for c in crashes if c[0] == 2] == [(2, True), (2, True), (2, False)]
    err = capsys.readouterr().err
    assert "peer 1 crashed: killed by SIGKILL (out of memory, or kill -9)" in err
    assert "peer 1: restarting from its checkpoint (restart 1 of 2)" in err
    assert "peer 2 crashed: killed by SIGSEGV; last output: segfault ahead" in err
    assert "peer 3 crashed: exit 2 (a configuration error); no such model" in err
    assert "peer 3: not restarted" in err
    result.record(tmp_path)
    status = {k: json.loads((tmp_path / f"peer-{k:03d}" / "status.json").read_text()) for k in range(4)}
    assert status[0]["state"] == status[1]["state"] == "done" and "exit" not in status[1]
    # The peer SIGKILLed for good never wrote its end: the supervisor did, with the signal.
    assert status[2]["state"] == "crashed" and status[2]["error"] == "killed by SIGSEGV"
    assert status[3]["error"] == "no such model" and status[3]["exit"] == "exit 2 (a configuration error)"


def test_a_slurm_task_supervises_its_peer_and_summarize_counts_the_silent_ones(tmp_path, capsys):
    # Task 2's peer dies by SIGKILL in its first life: recorded, restarted, then it finishes.
    marker = tmp_path / "lived"
    code = (f"import os, signal, pathlib; p = pathlib.Path({str(marker)!r}); first = not p.exists(); p.touch(); "
            "first and os.kill(os.getpid(), signal.SIGKILL)")
    assert slurm_task({"SLURM_PROCID": "2"}, tmp_path, [sys.executable, "-c", code], restarts=1) == 0
    assert "peer 2 crashed: killed by SIGKILL" in capsys.readouterr().err
    marker.unlink()
    assert slurm_task({"SLURM_PROCID": "2"}, tmp_path, [sys.executable, "-c", code], restarts=0) == 1
    status = json.loads((tmp_path / "peer-002" / "status.json").read_text())
    assert status["state"] == "crashed" and status["error"].startswith("killed by SIGKILL")
    # Task 1 still says running (its node went down with it), task 0 never started: both crashed.
    (tmp_path / "peer-001").mkdir()
    (tmp_path / "peer-001" / "status.json").write_text(json.dumps({"peer": 1, "state": "running"}))
    assert crashed_peers(tmp_path, 3) == [0, 1, 2]


def test_the_metrics_of_rounds_a_resumed_peer_runs_again_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"round": r, "bytes_sent": 10 * r}) + "\n" for r in range(6)) + '{"rou')
    forget_rounds_from(path, 4)
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    # Each life counts bytes from zero: the summary adds the lives up.
    assert bytes_sent([{"bytes_sent": b} for b in (10, 20, 30, 5, 15, 3)]) == 30 + 15 + 3


def test_continue_keeps_the_runs_settings_and_refuses_a_conflicting_flag_in_one_line(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match="holds no run to continue"):
        prepare_out_dir(run, continuing=True)
    run.mkdir()
    stored = RunConfig(rounds=30, local_steps=4, keys=None)
    write_config_toml(stored, run / "config.toml")
    (run / "peer-000").mkdir()
    with pytest.raises(UserError, match="already holds a run: choose a new --out, or add --continue"):
        prepare_out_dir(run, continuing=False)
    assert prepare_out_dir(run, continuing=True) == run
    assert continued_config(run, RunConfig(rounds=30), {"rounds"}) == stored  # the same value is no conflict
    assert continued_config(run, RunConfig(keys="k"), {"keys"}).keys == "k"  # not kept by multi-host runs
    with pytest.raises(UserError) as exc:
        continued_config(run, RunConfig(rounds=60), {"rounds"})
    assert str(exc.value).count("\n") == 0
    assert "--rounds 60 conflicts with rounds = 30 in" in str(exc.value)
    write_config_toml(stored.replace(resume="off"), run / "config.toml")
    with pytest.raises(UserError, match="resume = \"off\""):
        continued_config(run, RunConfig(), set())
    save_topology(make_topology("ring", 3, base_port=30000), run / "topology.toml")
    assert continued_topology(run, make_topology("ring", 3, base_port=30000), "t.toml").n == 3
    with pytest.raises(UserError, match="differs from the run's own"):
        continued_topology(run, make_topology("ring", 3, base_port=30100), "t.toml")


# -- real launches ----------------------------------------------------------------------------------------------


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default action, so the launcher is tested as from a
    terminal even when a shell started this test in the background (its children then ignore SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch(*args, out: Path) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 -- the child writes to it until it exits
    cmd = [sys.executable, "-m", "p2pser", "launch", *map(str, args), "--out", str(out), "--quiet"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=default_sigint)  # noqa: PLW1509 -- it only resets a signal


def metrics_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _rows(run: Path, k: int) -> list[dict]:
    return metrics_rows(run / f"peer-{k:03d}" / "metrics.jsonl")


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    """Until ``condition()``, as long as the launcher ``proc`` runs; the test fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the launcher exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.2)


def _kill_peer(run: Path, k: int) -> None:
    """SIGKILL peer k's process, as the OOM killer would: it can write nothing more."""
    os.kill(json.loads((run / f"peer-{k:03d}" / "status.json").read_text())["pid"], signal.SIGKILL)


def _common(feature_cache: Path) -> list:
    return ["--checkpoint-every", 2, "--cache-dir", feature_cache, *FAST]


@pytest.mark.slow
def test_a_sigkilled_peer_fails_the_launch_by_its_id(tmp_path, synth_corpus, feature_cache):
    topo, run = topology_file(tmp_path, "ring", 3), tmp_path / "run"
    proc = _launch(topo, synth_corpus, "--final-mixing", "0", "--eval-every", "1", "--rounds", 8, "--round-timeout", 5, *_common(feature_cache), out=run)
    try:
        wait_for(lambda: len(_rows(run, 1)) >= 2, proc, "peer 1 trained 2 rounds")
        _kill_peer(run, 1)
        assert proc.wait(timeout=240) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "run.log").read_text()
    assert "peer 1 crashed: killed by SIGKILL" in out, out[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["crashed_peers"] == [1] and summary["restarts"] == 0
    assert summary["crashes"][0]["peer"] == 1 and not summary["crashes"][0]["restarted"]
    state = {p["peer"]: (p["state"], p["error"]) for p in summary["per_peer"]}
    assert state[1] == ("crashed", "killed by SIGKILL (out of memory, or kill -9)")
    assert state[0][0] == state[2][0] == "done"  # the others carried on without it


@pytest.mark.slow
def test_with_restart_a_sigkilled_peer_comes_back_and_finishes_with_its_neighbours(tmp_path, synth_corpus,
                                                                                 feature_cache):
    topo, run, rounds = topology_file(tmp_path, "ring", 3), tmp_path / "run", 12
    # Its neighbours wait for its model up to a minute (fixed liveness): it is back long before, however fast
    # the others could have run on without it.
    proc = _launch(topo, synth_corpus, "--final-mixing", "0", "--eval-every", "1", "--rounds", rounds, "--restart", 1, *_common(feature_cache), "--liveness",
                   "fixed", "--round-timeout", 60, out=run)
    try:
        wait_for(lambda: len(_rows(run, 1)) >= 3, proc, "peer 1 trained 3 rounds")
        _kill_peer(run, 1)
        assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "run.log").read_text()
    assert "peer 1 crashed: killed by SIGKILL" in out and "peer 1: restarting from its checkpoint (restart 1 of 1)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["crashed_peers"] == [] and summary["restarts"] == 1 and summary["rounds"] == rounds
    assert [p["restarts"] for p in summary["per_peer"]] == [0, 1, 0]
    assert all(p["state"] == "done" for p in summary["per_peer"])
    assert json.loads((run / "peer-001" / "status.json").read_text())["resumed"] is True
    rows = _rows(run, 1)
    assert rows[-1]["round"] == rounds - 1 and rows[-1]["heard"] == 2  # back among its neighbours to the end
    ua = {p["peer"]: p["ua"] for p in summary["per_peer"]}
    assert ua[1] > CHANCE + 0.15, ua
    # Within reach of its neighbours: about 10 of the 96 test utterances at most.
    assert abs(ua[1] - (ua[0] + ua[2]) / 2) <= 0.1, ua


@pytest.mark.slow
def test_a_launch_stopped_with_ctrl_c_continues_to_the_rounds_of_an_uninterrupted_one(tmp_path, synth_corpus,
                                                                                    feature_cache, capsys):
    topo, run, rounds = topology_file(tmp_path, "ring", 3), tmp_path / "run", 12
    proc = _launch(topo, synth_corpus, "--final-mixing", "0", "--eval-every", "1", "--rounds", rounds, "--round-timeout", 5, *_common(feature_cache), out=run)
    try:
        wait_for(lambda: min(len(_rows(run, k)) for k in range(3)) >= 3, proc, "every peer trained 3 rounds")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "run.log").read_text()
    stopped = {k: len(_rows(run, k)) for k in range(3)}
    assert max(stopped.values()) < rounds, stopped
    assert all(json.loads((run / f"peer-{k:03d}" / "status.json").read_text())["state"] == "interrupted"
               for k in range(3))
    assert json.loads((run / "summary.json").read_text())["interrupted"] is True
    command = re.search(r"continue this run with:\n  (p2pser .*)\n", out)
    assert command, out[-2000:]
    words = shlex.split(command.group(1))
    assert words[:2] == ["p2pser", "launch"] and "--continue" in words

    again = subprocess.run([sys.executable, "-m", *words], capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["interrupted"] is False and summary["crashed_peers"] == []
    for k in range(3):
        # One row per round of the schedule, as a run that was never stopped writes: none skipped, none twice.
        assert [r["round"] for r in _rows(run, k)] == list(range(rounds)), k
        assert json.loads((run / f"peer-{k:03d}" / "status.json").read_text())["state"] == "done"
    assert summary["ua_mean"] > CHANCE + 0.15
    # The settings are the run's own: a flag that differs is refused in one line.
    assert main([*words[1:], "--rounds", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rounds 99 conflicts with rounds = 12 in" in err
