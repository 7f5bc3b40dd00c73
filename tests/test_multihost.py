"""Launching on many hosts: the SSH launcher across three namespaces of the test bed (remote shell: ``ip netns
exec``) with a partition and its healing, and the Slurm batch script under a faked ``srun``."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import free_base_port
from test_netns import FAST, bed_cmd, spread_topology

from p2pser.cli import main
from p2pser.deploy.multihost import expand_nodelist, expand_tasks_per_node, load_hosts, slurm_topology
from p2pser.errors import UserError
from p2pser.exchange.topology import load_topology, save_topology

REPO = Path(__file__).resolve().parents[1]
CHANCE = 1 / 6  # the synthetic corpus has six emotions
# The keys `p2pser launch` writes to summary.json (tests/test_launch.py): the multi-host launchers match them.
SUMMARY_KEYS = {"mode", "algorithm", "topology", "peers", "rounds", "ua_mean", "ua_min", "ua_max", "ua_average_model",
                "consensus_distance_first", "consensus_distance_last", "bytes_sent_total", "bytes_sent_max_peer",
                "wall_s", "per_peer", "crashed_peers", "consensus_distance_per_round", "ua_mean_per_round"}


def test_slurm_host_lists_expand_like_slurm():
    assert expand_nodelist("node[01-03,07],gpu5,rack[8-9]-a") == ["node01", "node02", "node03", "node07", "gpu5",
                                                                 "rack8-a", "rack9-a"]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    topo = slurm_topology({"SLURM_JOB_NODELIST": "localhost,127.0.0.2", "SLURM_TASKS_PER_NODE": "2,1"}, "ring",
                          base_port=30000)
    assert [(p.host, p.port) for p in topo.peers] == [("127.0.0.1", 30000), ("127.0.0.1", 30001),
                                                      ("127.0.0.2", 30002)]
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST is not set"):
        slurm_topology({}, "ring")
    with pytest.raises(UserError, match="format"):
        expand_tasks_per_node("two")


def test_hosts_file_problems_are_clear_errors(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text('[defaults]\nworkdir = "/w"\n[[hosts]]\nname = "a"\n[[hosts]]\nname = "b"\naddress = "10.0.0.2"\n')
    hosts = load_hosts(path)
    assert hosts["a"].workdir == "/w" and hosts["10.0.0.2"].name == "b"
    assert hosts["a"].command("echo hi") == ["ssh", "-o", "BatchMode=yes", "a", "echo hi"]
    path.write_text('[[hosts]]\nname = "a"\nport = "1"\n')
    with pytest.raises(UserError, match="unknown key"):
        load_hosts(path)
    with pytest.raises(UserError, match="does not exist"):
        load_hosts(tmp_path / "none.toml")


@pytest.mark.slow
def test_slurm_script_runs_one_peer_per_task_under_a_faked_srun(tmp_path, synth_corpus, feature_cache):
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    # srun's job: start SLURM_NTASKS copies of the command, each with its own SLURM_PROCID.
    fake.write_text("#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\nstatus=0; pids=()\n"
                    "for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i \"$@\" & pids+=($!); "
                    "done\nfor p in \"${pids[@]}\"; do wait $p || status=$?; done\nexit $status\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    run = tmp_path / "run"
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="localhost", SLURM_TASKS_PER_NODE="2", DATA=str(synth_corpus), RUN=str(run),
               KIND="ring", BASE_PORT=str(free_base_port(2)), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--security", "on", "--final-mixing", "0", "--eval-every", "1", "--rounds", "4",
                             "--cache-dir", str(feature_cache), *FAST], env=env, capture_output=True, text=True,
                            timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["mode"] == "slurm" and summary["peers"] == 2 and summary["rounds"] == 4
    assert summary["security"] is True and summary["crashed_peers"] == []
    topo = load_topology(run / "topology.toml")
    assert all(p.host == "127.0.0.1" and p.public_key for p in topo.peers)
    assert stat.S_IMODE((run / "keys" / "peer-1.key").stat().st_mode) == 0o600
    # Each task heard the other over CurveZMQ, and the peers agreed more by the end.
    assert all(p["rounds"] == 4 and p["ua"] is not None for p in summary["per_peer"])
    assert summary["consensus_distance_last"] < summary["consensus_distance_first"]


# How long the test waits for something that must happen: it only ends a broken run, a loaded machine
# never nears it.
LIMIT_S = 300


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        assert proc.poll() is None, f"the launcher exited early while waiting until {what}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_launch_hosts_secured_mesh_across_three_namespaces_partitions_and_heals(bed, tmp_path, synth_corpus,
                                                                               feature_cache):
    """`p2pser launch-hosts` starts one peer per namespace (remote shell: ip netns exec), CurveZMQ on because
    the topology spans hosts. Host 2's cable is pulled for a few rounds: it hears nobody and nobody hears
    it, while hosts 0 and 1 go on together; plugged back, everyone hears everyone again and the consensus
    distance, pushed up by the partition, falls again. The gathered run folder has the summary of `p2pser
    launch`, with a UA well above chance.

    Nothing is timed: each phase lasts until what it is about has happened, on a fast or a busy machine.
    The round timeout (10 s) is long enough that peers in step never miss each other on a loaded machine,
    so only the cable decides who is heard."""
    topo_path = save_topology(spread_topology(3, 3, kind="ring"), tmp_path / "topo.toml")
    keys = tmp_path / "keys"
    assert main(["keys", "new", str(keys), "--peers", "3"]) == 0
    hosts = tmp_path / "hosts.toml"
    # Each "host" has its own work folder: the results reach RUN only by the launcher's gathering.
    hosts.write_text(f'[defaults]\nshell = "ip netns exec {{name}} sh -c"\npython = "{sys.executable}"\n' + "".join(
        f'[[hosts]]\nname = "{bed}-h{k}"\naddress = "10.231.0.{k + 1}"\nworkdir = "{tmp_path}/host{k}"\n'
        for k in range(3)))
    # Fixed liveness: a 10 s round timeout, so peers in step never miss each other on a loaded machine. Who
    # must not finish before the heal is held there by suspending it (below), not by timing.
    run, rounds = tmp_path / "run", 40
    metrics = {k: tmp_path / f"host{k}" / "run" / f"peer-{k:03d}" / "metrics.jsonl" for k in range(3)}

    def last_round(k: int) -> int:
        rows = _rows(metrics[k])
        return rows[-1]["round"] if rows else -1

    def peer_pid(k: int) -> int:
        return int((tmp_path / f"host{k}" / "run" / f"peer-{k}.pid").read_text())

    suspended: set[int] = set()

    def wake() -> None:
        for k in sorted(suspended):
            try:
                os.kill(peer_pid(k), signal.SIGCONT)
            except ProcessLookupError:
                pass
        suspended.clear()

    with open(tmp_path / "launcher.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pser", "launch-hosts", str(hosts), str(topo_path), str(synth_corpus), "--out",
             str(run), "--keys", str(keys), "--final-mixing", "0", "--eval-every", "1", "--rounds", str(rounds), "--liveness", "fixed",
             "--round-timeout", "10", "--cache-dir",
             str(feature_cache), *FAST], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: min(len(_rows(m)) for m in metrics.values()) >= 4, LIMIT_S, "every peer has done 4 rounds",
              proc)
        before = {k: last_round(k) for k in range(3)}  # rounds finished with the cable in
        assert bed_cmd("link", bed, 2, "down").returncode == 0
        # A model sent before the cable was pulled may still be used in the round its receiver is in, or the
        # one after (peers run up to a round apart); from round cut_from on, nothing can cross.
        cut_from = max(last_round(k) for k in range(3)) + 2

        def cut(k: int) -> list[dict]:
            return [r for r in _rows(metrics[k]) if r["round"] >= cut_from]

        # A side that stops hearing a neighbour waits one round timeout for it, then no longer (it is suspected
        # until heard from), so hosts 0 and 1 could run through every round while host 2 still sits in its
        # timeouts. Each side is suspended once it has shown what the cut is about, so nobody finishes before
        # the heal however fast or busy the machine. After the heal host 2 is woken only once hosts 0 and 1
        # are ahead of it: a peer ahead of the others, not waiting for them, would never see a model of its own
        # round from them, while one behind finds theirs waiting and the ones ahead wait for it once heard.
        _wait(lambda: all(any(r["heard"] for r in cut(k)) for k in (0, 1)), LIMIT_S,
              "hosts 0 and 1 have heard each other with host 2 cut off", proc)
        for k in (0, 1):
            os.kill(peer_pid(k), signal.SIGSTOP)
        suspended.update({0, 1})
        _wait(lambda: len(cut(2)) >= 3, LIMIT_S, "host 2 has gone 3 rounds alone", proc)
        os.kill(peer_pid(2), signal.SIGSTOP)
        suspended.add(2)
        cut_until = {k: last_round(k) for k in range(3)}  # rounds finished before the cable is back
        assert bed_cmd("link", bed, 2, "up").returncode == 0
        for k in (0, 1):
            os.kill(peer_pid(k), signal.SIGCONT)
        suspended -= {0, 1}
        _wait(lambda: min(last_round(0), last_round(1)) > cut_until[2], LIMIT_S,
              "hosts 0 and 1 are ahead of host 2", proc)
        wake()
        assert proc.wait(timeout=LIMIT_S) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    finally:
        wake()  # never leave a suspended peer behind, whatever failed
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (tmp_path / "launcher.log").read_text()
    assert "round" in out  # the progress line, polled from the hosts
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["mode"] == "launch-hosts" and summary["security"] is True
    assert summary["hosts"] == ["10.231.0.1", "10.231.0.2", "10.231.0.3"]
    assert summary["peers"] == 3 and summary["rounds"] == rounds and summary["crashed_peers"] == []
    assert summary["ua_mean"] > CHANCE + 0.2, summary["ua_mean"]
    rows = {k: _rows(run / f"peer-{k:03d}" / "metrics.jsonl") for k in range(3)}  # gathered copies
    for k in range(3):
        remote = tmp_path / f"host{k}" / "run"
        assert (run / f"peer-{k:03d}" / "model.npz").exists() and rows[k][-1]["round"] == rounds - 1
        assert stat.S_IMODE((remote / "keys" / f"peer-{k}.key").stat().st_mode) == 0o600
        assert not (remote / "keys" / f"peer-{(k + 1) % 3}.key").exists()  # a host gets only its own secret
        # Over CurveZMQ across the namespaces, every peer heard both others before the cut.
        assert any(r["heard"] == 2 for r in rows[k] if r["round"] <= before[k]), rows[k][:before[k] + 1]
    # While cut off, host 2 heard nobody and the others heard only each other (never host 2).
    cut = {k: [r for r in rows[k] if cut_from <= r["round"] <= cut_until[k]] for k in range(3)}
    assert cut[2] and all(r["heard"] == 0 and r["consensus_distance"] is None for r in cut[2]), cut[2]
    for k in (0, 1):
        assert cut[k] and all(r["heard"] <= 1 for r in cut[k]) and any(r["heard"] == 1 for r in cut[k]), cut[k]
    # Healed: everyone hears both others again, and the mesh converges again.
    healed = {k: [r for r in rows[k] if r["round"] > cut_until[k]] for k in range(3)}
    for k in range(3):
        assert any(r["heard"] == 2 for r in healed[k]), (k, healed[k])
    after = [r["consensus_distance"] for r in healed[2] if r["consensus_distance"] is not None]
    assert len(after) >= 3 and after[-1] < 0.5 * max(after), after
    assert bed_cmd("list", bed).stdout.split() == [f"{bed}-h{k}" for k in range(3)]
