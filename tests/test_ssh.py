"""`p2pser launch-hosts` over real SSH: an OpenSSH server in each namespace of the test bed (generated host
and user keys, a login banner, a start-up line on every session's stdout, connection sharing), paths with
spaces, a lost session whose peer runs on, Ctrl-C, the run continued after a host lost its work folder,
and a peer SIGKILLed on its host and restarted."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_netns import FAST, TESTBED, spread_topology
from test_supervise import default_sigint, metrics_rows, wait_for

from p2pser.cli import main
from p2pser.exchange.topology import save_topology

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]
ROUNDS = 14


@pytest.fixture
def ssh_bed(bed):
    """The three hosts of ``bed``, each with sshd on port 22 of its address; yields the key folder whose
    ``ssh_config`` reaches them (from inside the test bed). The set-up installs openssh-server if missing."""
    folder = Path(tempfile.mkdtemp(prefix="p2pssh", dir="/tmp"))  # short: it holds the ssh control sockets
    try:
        got = subprocess.run([str(TESTBED), "sshd", bed, str(folder)], capture_output=True, text=True, timeout=900,
                             check=False)
        if got.returncode == 3:
            pytest.skip(f"no OpenSSH server and it cannot be installed here: {got.stderr.strip()[-300:]}")
        assert got.returncode == 0, got.stderr
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _host_python(tmp_path: Path) -> Path:
    """The hosts' Python: this interpreter with this session's environment (the hosts are this machine, and
    ssh gives a remote command a clean environment). Its folder's name has a space, as a path may."""
    path = tmp_path / "my python" / "python3"
    path.parent.mkdir()
    env = "".join(f"export {k}={shlex.quote(os.environ[k])}\n" for k in ("PYTHONPATH", "NUMBA_CACHE_DIR",
                                                                         "P2PSER_CACHE_DIR") if k in os.environ)
    path.write_text(f"#!/bin/sh\n{env}exec {shlex.quote(sys.executable)} \"$@\"\n")
    path.chmod(0o755)
    return path


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _ssh_client(launcher: int, marker: str) -> int:
    """The pid of the launcher's local ssh whose remote command contains ``marker``."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and cmdline.startswith("ssh\0") and marker in cmdline:
            return int(proc.name)
    raise AssertionError(f"no ssh child of the launcher runs a command with {marker!r}")


def _peers_gone(remote: dict[int, Path]) -> None:
    for k, folder in remote.items():
        assert not _alive(int((folder / f"peer-{k}.pid").read_text())), f"peer {k} still runs on its host"


def test_launch_hosts_over_ssh_stops_on_ctrl_c_continues_and_restarts_a_killed_peer(bed, ssh_bed, tmp_path,
                                                                                   synth_corpus, feature_cache):
    topo = save_topology(spread_topology(3, 3, kind="ring"), tmp_path / "topo.toml")
    keys = tmp_path / "keys"
    assert main(["keys", "new", str(keys), "--peers", "3"]) == 0
    data = tmp_path / "my data"
    data.symlink_to(synth_corpus)
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(
        f'[defaults]\nshell = "ssh -F {ssh_bed}/ssh_config {{name}}"\npython = "{_host_python(tmp_path)}"\n'
        f'data_dir = "{data}"\n'
        + "".join(f'[[hosts]]\nname = "10.231.0.{k + 1}"\nworkdir = "{tmp_path}/host {k}"\n' for k in range(3)))
    run = tmp_path / "run"
    remote = {k: tmp_path / f"host {k}" / "run" for k in range(3)}
    metrics = {k: remote[k] / f"peer-{k:03d}" / "metrics.jsonl" for k in range(3)}
    in_bed = ["ip", "netns", "exec", f"{bed}-h0"]  # the operator's machine: host 0 of the test bed

    def launcher(words: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as fh:
            return subprocess.Popen([*in_bed, sys.executable, "-m", *words], stdout=fh, stderr=subprocess.STDOUT,
                                    preexec_fn=default_sigint)  # noqa: PLW1509 -- it only resets a signal

    # Neighbours wait up to five minutes for a model (fixed liveness): the peer killed below is back long
    # before even on a busy machine (at one minute, a restart slowed by other load let its neighbours stop
    # waiting for it and finish), so its neighbours are still there to catch up with.
    first = tmp_path / "first.log"
    proc = launcher(["p2pser", "launch-hosts", str(hosts), str(topo), str(data), "--out", str(run), "--keys",
                     str(keys), "--final-mixing", "0", "--eval-every", "1", "--rounds", str(ROUNDS), "--liveness", "fixed", "--round-timeout", "300",
                     "--startup-timeout", "300", "--restart", "1", "--checkpoint-every", "2", "--cache-dir",
                     str(feature_cache), *FAST], first)
    try:
        wait_for(lambda: min(len(metrics_rows(m)) for m in metrics.values()) >= 3, proc,
                 "every peer trained 3 rounds")
        # Peer 0's SSH session is lost (its local ssh dies): the peer itself runs on, unseen. The supervisor
        # restarts it, and the new life first stops the one left running.
        orphan = int((remote[0] / "peer-0.pid").read_text())
        # Suspended first: left running, the orphan and its neighbours could finish every round before the new
        # life stops it. Suspended, it holds its neighbours (fixed liveness) and must still be stopped cleanly.
        os.kill(orphan, signal.SIGSTOP)
        os.kill(_ssh_client(proc.pid, "--id 0 "), signal.SIGKILL)

        def replaced() -> bool:
            status = json.loads((remote[0] / "peer-000" / "status.json").read_text())
            return status.get("pid") != orphan and status.get("resumed") is True and status["state"] == "running"

        wait_for(replaced, proc, "peer 0 was restarted on host 0")
        assert not _alive(orphan)
        # Peer 2 suspended holds the others within a round of it, so no peer finishes before the Ctrl-C reaches
        # it, however fast the machine; the launcher's stop wakes it (SIGCONT) to save and end.
        os.kill(int((remote[2] / "peer-2.pid").read_text()), signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130, first.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = first.read_text()
    assert "peer 0 on 10.231.0.1 crashed: its remote shell's local end was killed by SIGKILL" in out, out[-3000:]
    assert "peer 0 on 10.231.0.1: restarting from its checkpoint (restart 1 of 1)" in out
    assert f"p2pser: peer 0 of an earlier session still runs (pid {orphan}): stopping it" in \
        (run / "peer-000" / "log.txt").read_text()
    # Stopped through the pid files: every remote peer saved and ended, none is left running on its host.
    _peers_gone(remote)
    for k in range(3):
        assert json.loads((run / f"peer-{k:03d}" / "status.json").read_text())["state"] == "interrupted", k
    # Counted in the gathered copies.
    stopped_at = {k: len(metrics_rows(run / f"peer-{k:03d}" / "metrics.jsonl")) for k in range(3)}
    assert 3 <= min(stopped_at.values()) and max(stopped_at.values()) < ROUNDS, stopped_at
    # Every session's output reaches the peer's log, the start-up line included; it broke no gathering.
    assert "Welcome to the p2pser test bed" in (run / "peer-001" / "log.txt").read_text()
    command = re.search(r"continue this run with:\n  (p2pser .*)\n", out)
    assert command, out[-2000:]
    words = shlex.split(command.group(1))
    assert words[:2] == ["p2pser", "launch-hosts"] and "--continue" in words and str(keys) in words

    # Host 1 rebooted meanwhile and lost its work folder: the run continues from the copies gathered.
    shutil.rmtree(tmp_path / "host 1")
    second = tmp_path / "second.log"
    proc = launcher(words, second)
    try:
        wait_for(lambda: len(metrics_rows(metrics[2])) >= stopped_at[2] + 2, proc,
                 "peer 2 trained 2 rounds more")
        killed = int((remote[2] / "peer-2.pid").read_text())
        os.kill(killed, signal.SIGKILL)  # on host 2, behind its ssh session
        assert proc.wait(timeout=300) == 0, second.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = second.read_text()
    assert "host 10.231.0.2 lost peer-001: sending back the copies gathered last time" in out, out[-3000:]
    assert "peer 2 on 10.231.0.3 crashed: killed by SIGKILL" in out, out[-3000:]
    assert "peer 2 on 10.231.0.3: restarting from its checkpoint (restart 1 of 1)" in out
    _peers_gone(remote)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "launch-hosts" and summary["security"] is True and summary["interrupted"] is False
    assert summary["rounds"] == ROUNDS and summary["crashed_peers"] == []
    assert [(c["peer"], c["restarted"]) for c in summary["crashes"]] == [(2, True)]  # this session's
    assert summary["restarts"] == 2 and [p["restarts"] for p in summary["per_peer"]] == [1, 0, 1]  # both
    assert all(p["state"] == "done" for p in summary["per_peer"])
    assert json.loads((run / "peer-002" / "status.json").read_text())["resumed"] is True
    for k in range(3):
        rows = metrics_rows(run / f"peer-{k:03d}" / "metrics.jsonl")
        assert rows[-1]["round"] == ROUNDS - 1 and rows[-1]["heard"] == 2, (k, rows[-1])
    # Peer 1 went on from its gathered copy: one row per round, none lost with the host's folder.
    assert [r["round"] for r in metrics_rows(run / "peer-001" / "metrics.jsonl")] == list(range(ROUNDS))
    assert summary["ua_mean"] > 1 / 6 + 0.15, summary["ua_mean"]
