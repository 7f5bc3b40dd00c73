"""Launching on many hosts: the SSH launcher across three namespaces (remote shell: ``ip netns exec``), and the
Slurm batch script under a faked ``srun``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_netns import FAST, bed_cmd, spread_topology, start_bed, warm_feature_cache
from test_security import free_base_port

from p2pser.cli import main
from p2pser.errors import UserError
from p2pser.gossip.topology import load_topology, save_topology
from p2pser.run.multihost import expand_nodelist, expand_tasks_per_node, load_hosts, slurm_topology

REPO = Path(__file__).resolve().parents[1]
CHANCE = 1 / 6  # the synthetic corpus has six emotions
# The keys `p2pser launch` writes to summary.json (tests/test_launch.py): the multi-host launchers match them.
SUMMARY_KEYS = {"mode", "algorithm", "topology", "peers", "rounds", "ua_mean", "ua_min", "ua_max", "ua_average_model",
                "consensus_distance_first", "consensus_distance_last", "bytes_sent_total", "bytes_sent_max_peer",
                "wall_s", "per_peer", "crashed_peers", "consensus_distance_per_round", "ua_mean_per_round"}


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory, synth_corpus) -> Path:
    return warm_feature_cache(tmp_path_factory, synth_corpus)


@pytest.fixture
def bed(request) -> str:
    return start_bed(request)


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
    with pytest.raises(UserError, match="not found"):
        load_hosts(tmp_path / "none.toml")


def test_slurm_script_runs_one_peer_per_task_under_a_faked_srun(tmp_path, synth_corpus, feature_cache):
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    # srun's job: start SLURM_NTASKS copies of the command, each with its own SLURM_PROCID.
    fake.write_text("#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\nstatus=0; pids=()\n"
                    "for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i \"$@\" & pids+=($!); "
                    "done\nfor p in \"${pids[@]}\"; do wait $p || status=$?; done\nexit $status\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    run = tmp_path / "run"
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS="3",
               SLURM_JOB_NODELIST="localhost", SLURM_TASKS_PER_NODE="3", DATA=str(synth_corpus), RUN=str(run),
               KIND="ring", BASE_PORT=str(free_base_port(3)), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--security", "on", "--rounds", "6",
                             "--cache-dir", str(feature_cache), *FAST], env=env, capture_output=True, text=True,
                            timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["mode"] == "slurm" and summary["peers"] == 3 and summary["rounds"] == 6
    assert summary["security"] is True and summary["crashed_peers"] == []
    topo = load_topology(run / "topology.toml")
    assert all(p.host == "127.0.0.1" and p.public_key for p in topo.peers)
    assert stat.S_IMODE((run / "keys" / "peer-2.key").stat().st_mode) == 0o600
    assert summary["ua_mean"] > CHANCE


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_launch_hosts_runs_a_secured_mesh_across_three_namespaces(bed, tmp_path, synth_corpus, feature_cache):
    topo_path = save_topology(spread_topology(3, 3, kind="ring"), tmp_path / "topo.toml")
    keys = tmp_path / "keys"
    assert main(["keys", "new", str(keys), "--peers", "3"]) == 0
    hosts = tmp_path / "hosts.toml"
    # Each "host" has its own work folder: the results reach RUN only by the launcher's gathering.
    hosts.write_text(f'[defaults]\nshell = "ip netns exec {{name}} sh -c"\npython = "{sys.executable}"\n' + "".join(
        f'[[hosts]]\nname = "{bed}-h{k}"\naddress = "10.231.0.{k + 1}"\nworkdir = "{tmp_path}/host{k}"\n'
        for k in range(3)))
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "p2pser", "launch-hosts", str(hosts), str(topo_path), str(synth_corpus), "--out", str(run),
         "--keys", str(keys), "--rounds", "10", "--cache-dir", str(feature_cache), *FAST],
        capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "round" in result.stdout  # the progress line, polled from the hosts
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["mode"] == "launch-hosts" and summary["security"] is True
    assert summary["hosts"] == ["10.231.0.1", "10.231.0.2", "10.231.0.3"]
    assert summary["peers"] == 3 and summary["rounds"] == 10 and summary["crashed_peers"] == []
    assert summary["ua_mean"] > CHANCE + 0.2, summary["ua_mean"]
    assert summary["consensus_distance_last"] < summary["consensus_distance_first"]
    for k in range(3):
        remote = tmp_path / f"host{k}" / "run"
        assert (remote / f"peer-{k:03d}" / "model.npz").exists()
        assert (run / f"peer-{k:03d}" / "model.npz").exists()
        assert stat.S_IMODE((remote / "keys" / f"peer-{k}.key").stat().st_mode) == 0o600
        assert not (remote / "keys" / f"peer-{(k + 1) % 3}.key").exists()  # a host gets only its own secret
        rows = [json.loads(line) for line in (run / f"peer-{k:03d}" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["heard"] == 2
    assert bed_cmd("list", bed).stdout.split() == [f"{bed}-h{k}" for k in range(3)]
