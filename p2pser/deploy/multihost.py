"""Peers on many hosts: the SSH launcher (driven by a hosts file) and the Slurm helper.

The SSH launcher starts every peer with ``p2pser peer`` through a remote-exec command (by default
``ssh -o BatchMode=yes HOST``; anything that runs one shell script on the host works, e.g.
``ip netns exec NS sh -c`` for the test bed), polls the peers' metrics for a progress line, and at the end
copies every host's ``peer-KKK`` folders into one local run folder (tar over the same remote shell) and
writes the same ``summary.json`` as ``p2pser launch`` with the same report code.

Hosts file (TOML)::

    [defaults]                       # optional; every key can also be set per host
    shell = "ssh -o BatchMode=yes {name}"   # {name} is the host's name below
    python = "python3"               # a Python with p2pser installed, on the host
    workdir = "/tmp/p2pser-runs"     # each run gets WORKDIR/RUN_NAME on the host
    data_dir = "/data/ravdess"       # corpus on the host (default: the DATA_DIR given to the launcher)

    [[hosts]]
    name = "lab1"                    # what the shell is given (ssh destination)
    address = "10.0.0.11"            # the topology's host field of this host's peers (default: name)
    keys = "/home/me/p2pser-keys"    # optional key folder on the host; else secret keys are copied over
    bind = "0.0.0.0"                 # optional interface to listen on (default: the address; e.g. behind NAT)

Every remote peer runs under the supervisor (``deploy/supervise.py``) through its shell: the remote shell
waits for the peer and exits with its status (128+N when signal N killed it), which ``ssh`` passes on, so a
peer killed on its host is reported with its signal and can be restarted (``--restart N``). Commands whose
output is parsed print a marker first and only what follows it is read: a login banner or a noisy shell
start-up file cannot corrupt the metrics or the gathered folders.

The Slurm helper builds the topology from the allocation (``SLURM_JOB_NODELIST``, ``SLURM_TASKS_PER_NODE``,
block distribution: task i is peer i) and runs peer ``SLURM_PROCID``; see ``launch/slurm.sbatch``.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from p2pser.carriers.security import secret_key_path, security_on, with_public_keys
from p2pser.config import RunConfig, read_toml
from p2pser.deploy.launch import progress_line, write_config_toml
from p2pser.deploy.supervise import (
    LocalPeer,
    Supervisor,
    finished_peers,
    last_error,
    restart_counts,
    summary_base,
)
from p2pser.errors import UserError
from p2pser.exchange.checkpoint import CHECKPOINT_NAME
from p2pser.exchange.topology import KINDS, Topology, make_topology, save_topology
from p2pser.learn.tasks import experiment_task, task_named
from p2pser.partition.experiment import extract_for, make_plan, test_set
from p2pser.report.run_folder import peer_dir, prepare_out_dir
from p2pser.report.summary import report_run

log = logging.getLogger(__name__)

DEFAULT_SHELL = "ssh -o BatchMode=yes {name}"
_HOST_KEYS = {"name", "address", "shell", "python", "workdir", "data_dir", "keys", "bind"}
POLL_S = 2.0


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    shell: str = DEFAULT_SHELL
    python: str = "python3"
    workdir: str = "/tmp/p2pser-runs"
    data_dir: str | None = None
    keys: str | None = None
    bind: str | None = None

    def command(self, script: str) -> list[str]:
        """argv that runs ``script`` (one shell script, one argument) on this host."""
        return [*shlex.split(self.shell.format(name=self.name)), script]


def load_hosts(path: str | Path) -> dict[str, Host]:
    """Hosts by address; every problem is a ``UserError`` naming the file and the key."""
    path = Path(path)
    data = read_toml(path, "hosts file")
    unknown = sorted(set(data) - {"defaults", "hosts"})
    if unknown:
        raise UserError(f"hosts file {path}: unknown key(s) {', '.join(unknown)}; allowed: defaults, hosts")
    defaults = data.get("defaults", {})
    entries = data.get("hosts")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"hosts file {path}: needs one or more [[hosts]] tables with a name")
    hosts: dict[str, Host] = {}
    for k, entry in enumerate(entries):
        where = f"hosts file {path}: hosts[{k}]"
        merged = {**defaults, **entry} if isinstance(entry, dict) else None
        if merged is None or "name" not in merged:
            raise UserError(f"{where} must be a table with at least name = \"...\"")
        bad = sorted(set(merged) - _HOST_KEYS)
        if bad:
            raise UserError(f"{where}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(sorted(_HOST_KEYS))}")
        if not all(isinstance(v, str) and v for v in merged.values()):
            raise UserError(f"{where}: every value must be a non-empty string")
        host = Host(**{"address": merged["name"], **merged})
        if host.address in hosts:
            raise UserError(f"{where}: address {host.address} is listed twice")
        hosts[host.address] = host
    return hosts


# Printed before the output of every command whose output is parsed; what a login banner or a shell start-up
# file prints comes before it and is ignored.
MARKER = b"--p2pser-output--"


def _run_on(host: Host, script: str, *, stdin: bytes | None = None, timeout: float = 120,
            output: bool = False) -> bytes:
    """Run ``script`` on ``host``; with ``output``, return what it printed (after ``MARKER``)."""
    if output:
        script = f"printf '%s\\n' {MARKER.decode()} && {script}"
    try:
        done = subprocess.run(host.command(script), input=stdin, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise UserError(f"host {host.name}: remote shell {host.shell!r} not found: {exc.filename}") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"host {host.name}: no answer within {timeout:.0f} s; check the shell in the hosts file") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(f"host {host.name}: `{script[:60]}` failed (exit {done.returncode}): "
                        f"{err[-1] if err else 'no output'}")
    if not output:
        return done.stdout
    _, found, after = done.stdout.partition(MARKER + b"\n")
    if not found:
        raise UserError(f"host {host.name}: the remote shell ran `{script[:60]}` but its output has no start "
                        "marker; check the shell in the hosts file")
    return after


def _live_peer(pid_file: str) -> str:
    """Shell that sets ``pid`` to the pid in ``pid_file`` if that process is still a p2pser peer, else to
    nothing: a pid file outlives its peer, and its number may since belong to another process."""
    cmdline = 'tr "\\0" " " 2>/dev/null < /proc/"$pid"/cmdline || ps -o args= -p "$pid" 2>/dev/null'
    return (f'pid=$(cat {shlex.quote(pid_file)} 2>/dev/null); '
            f'case "$({cmdline})" in *"p2pser peer"*) ;; *) pid= ;; esac')


def _pid_file(remote: str, k: int) -> str:
    return f"{remote}/peer-{k}.pid"


def _peer_script(host: Host, remote: str, data_dir: str, k: int, keys: str | None) -> str:
    q = shlex.quote
    args = [host.python, "-m", "p2pser", "peer", data_dir, "--topology", f"{remote}/topology.toml", "--id", str(k),
            "--config", f"{remote}/config.toml", "--out", remote]
    if keys is not None:
        args += ["--keys", keys]
    if host.bind is not None:
        args += ["--bind-host", host.bind]
    # A peer of an earlier session may still run (its connection was lost, not the peer): stop it, so that
    # two lives of a peer never share a port (SIGCONT after SIGTERM: a suspended peer must wake to act on it,
    # as systemd does). Then the peer runs in the background with its pid in a file
    # (the launcher stops it through that file: a remote shell need not forward signals), and the shell
    # waits for it and exits with its status, 128+N if signal N killed it.
    return (f"cd {q(remote)} || exit 1\n"
            f"{_live_peer(_pid_file(remote, k))}\n"
            f'if [ -n "$pid" ]; then echo "p2pser: peer {k} of an earlier session still runs (pid $pid): stopping it" >&2; '
            f'kill -TERM "$pid"; kill -CONT "$pid" 2>/dev/null; i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done; '
            f'kill -KILL "$pid" 2>/dev/null; fi\n'
            f"OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 {shlex.join(args)} &\n"
            f"echo $! > {q(_pid_file(remote, k))}\n"
            f"wait $!\n")


class RemotePeer:
    """A peer on a host of the hosts file, seen by the supervisor through the local end of its remote shell."""

    shell = True

    def __init__(self, peer: int, host: Host, remote: str, script: str, folder: Path) -> None:
        self.peer, self.host, self.remote, self.script = peer, host, remote, script
        self.where = f" on {host.name}"
        self.local = LocalPeer(peer, host.command(script), folder)  # the remote output lands in folder/log.txt

    def start(self) -> subprocess.Popen:
        try:
            return self.local.start()
        except FileNotFoundError as exc:
            raise UserError(f"host {self.host.name}: remote shell {self.host.shell!r} not found: {exc.filename}") from None

    def stop(self) -> None:
        wake = 'kill -CONT "$pid"'  # after SIGTERM: a suspended peer must wake to save and end
        _run_on(self.host, f'{_live_peer(_pid_file(self.remote, self.peer))}; [ -z "$pid" ] || {{ kill -TERM "$pid"; {wake}; }}',
                timeout=20)

    def last_error(self) -> str:
        return last_error(self.local.folder)

    def close(self) -> None:
        self.local.close()


def _stage(host: Host, remote: str, topology_text: bytes, config_text: bytes, secrets: Mapping[int, bytes]) -> None:
    q = shlex.quote
    _run_on(host, f"mkdir -p {q(remote)} && cat > {q(remote)}/topology.toml", stdin=topology_text)
    _run_on(host, f"cat > {q(remote)}/config.toml", stdin=config_text)
    for k, text in secrets.items():
        # umask first: the secret key file is never readable by others, not even for a moment.
        _run_on(host, f"umask 077 && mkdir -p {q(remote)}/keys && cat > {q(remote)}/keys/peer-{k}.key", stdin=text)


def _restore_missing(host: Host, remote: str, peers: list[int], out: Path) -> None:
    """``--continue`` on a host that lost its peers' folders (a reboot cleared its work folder): send back the
    copies gathered at the end of the last session, so those peers resume instead of starting afresh."""
    names = [peer_dir("", k).name for k in peers]
    listing = _run_on(host, f"cd {shlex.quote(remote)} && for d in {' '.join(names)}; do "
                      f"[ -f $d/{CHECKPOINT_NAME} ] || echo $d; done", output=True)
    lost = [n for n in listing.decode(errors="replace").split() if n in names and (out / n / CHECKPOINT_NAME).exists()]
    if not lost:
        return
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w") as tar:
        for name in lost:
            tar.add(out / name, arcname=name, filter=lambda info: None if info.name.endswith("/log.txt") else info)
    print(f"host {host.name} lost {', '.join(lost)}: sending back the copies gathered last time", file=sys.stderr)
    _run_on(host, f"cd {shlex.quote(remote)} && tar -xf -", stdin=blob.getvalue(), timeout=600)


def _poll_metrics(hosts: list[tuple[Host, str]]) -> dict[int, list[dict]]:
    """The last metrics row of every peer that wrote one (one remote command per host)."""
    rows: dict[int, list[dict]] = {}
    for host, remote in hosts:
        try:
            out = _run_on(host, f"tail -qn1 {shlex.quote(remote)}/peer-*/metrics.jsonl 2>/dev/null || true",
                          timeout=20, output=True)
        except UserError as exc:
            log.warning("%s", exc)
            continue
        for line in out.decode(errors="replace").splitlines():
            try:
                row = json.loads(line)
                rows[int(row["peer"])] = [row]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return rows


def _gather(host: Host, remote: str, peers: list[int], out: Path) -> None:
    """Copy the host's peer folders into ``out``; a host that cannot be reached costs only its own peers."""
    names = " ".join(peer_dir("", k).name for k in peers)
    try:
        blob = _run_on(host, f"cd {shlex.quote(remote)} && found=$(for d in {names}; do [ -d $d ] && echo $d; done); "
                       '[ -z "$found" ] || tar -cf - $found', timeout=600, output=True)
    except UserError as exc:
        print(f"{exc}: the results of its peers stay on the host", file=sys.stderr)
        return
    if blob:
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(out, filter="data")


def summarize_gathered(out: Path, topology: Topology, data_dir: str | Path, cfg: RunConfig, base: dict[str, Any],
                       *, wall_s: float, restarts: Mapping[int, int] | None = None) -> dict[str, Any]:
    """``summary.json`` of a run folder holding every peer's folder, scored on the local copy of the data."""
    plan = make_plan(data_dir, cfg, topology.n)
    features, row_of = extract_for(plan, plan.test, cfg, workers=1)
    test = test_set(features, row_of, plan, cfg.normalizer)
    base = base | {"security": security_on(cfg.security, topology),
                   "hosts": sorted({p.host for p in topology.peers})}
    return report_run(out, base, cfg, test, plan.classes, wall_s=wall_s, restarts=restarts,
                      task=experiment_task(plan.experiment))


def launch_hosts(hosts_file: str | Path, topology: Topology, topology_name: str, data_dir: str | Path,
                 cfg: RunConfig, out_dir: str | Path, *, quiet: bool = False, restarts: int = 0,
                 continuing: bool = False) -> dict[str, Any]:
    """Start every peer on its host under the supervisor, wait for all, gather their folders into
    ``out_dir``, summarise. ``continuing``: ``out_dir`` holds a stopped run (``topology`` and ``cfg`` are its
    own); every peer that has not finished resumes from its checkpoint on its host."""
    start = time.monotonic()
    hosts = load_hosts(hosts_file)
    missing = sorted({p.host for p in topology.peers} - set(hosts))
    if missing:
        raise UserError(f"hosts file {hosts_file} has no [[hosts]] entry with address {', '.join(missing)} "
                        "(the topology's peers live there)")
    out = prepare_out_dir(out_dir, continuing=continuing)
    secured = security_on(cfg.security, topology)
    local_keys = Path(cfg.keys) if cfg.keys else None
    if secured and any(p.public_key is None for p in topology.peers):
        if local_keys is None or not local_keys.is_dir():
            raise UserError("security is on and the topology has no public keys: pass --keys DIR (from "
                            "`p2pser keys new`) or fill them with `p2pser keys fill DIR TOPOLOGY`")
        topology = with_public_keys(topology, local_keys)
    if not continuing:
        save_topology(topology, out / "topology.toml")
        write_config_toml(replace(cfg, keys=None), out / "config.toml")
    run_name = out.resolve().name
    by_host: dict[str, list[int]] = {}
    for p in topology.peers:
        by_host.setdefault(p.host, []).append(p.id)
    placed = [(hosts[a], f"{hosts[a].workdir}/{run_name}", ids) for a, ids in sorted(by_host.items())]
    for host, remote, ids in placed:
        secrets = {}
        if secured and host.keys is None:
            if local_keys is None:
                raise UserError(f"security is on: give --keys DIR (local key folder) or keys = \"...\" for host "
                                f"{host.name} in the hosts file")
            for k in ids:
                path = secret_key_path(local_keys, k) if local_keys.is_dir() else local_keys
                try:
                    secrets[k] = path.read_bytes()
                except OSError as exc:
                    raise UserError(f"cannot read secret key file {path}: {exc.strerror}") from None
        _stage(host, remote, (out / "topology.toml").read_bytes(), (out / "config.toml").read_bytes(), secrets)
        if continuing:
            _restore_missing(host, remote, ids, out)

    finished = finished_peers(out) if continuing else set()
    workers = []
    for host, remote, ids in placed:
        keys = (host.keys if host.keys is not None else f"{remote}/keys") if secured else None
        # Without a data_dir of its own, a host reads the launcher's path: absolute, as the peer runs elsewhere.
        data = host.data_dir or str(Path(data_dir).resolve())
        workers += [RemotePeer(k, host, remote, _peer_script(host, remote, data, k, keys), peer_dir(out, k))
                    for k in ids if k not in finished]
    task = task_named(cfg.task)  # its metric names are all the progress line needs
    progress = None if quiet else lambda: progress_line(_poll_metrics([(h, r) for h, r, _ in placed]), topology.n,
                                                        task)
    result = Supervisor(workers, restarts=restarts, poll_s=POLL_S, progress=progress).run()
    for host, remote, ids in placed:
        _gather(host, remote, ids, out)
    result.record(out)  # over the gathered status files: how each peer really ended
    base = summary_base("launch-hosts", topology_name, cfg, out, topology.n, result)
    return summarize_gathered(out, topology, data_dir, cfg, base, wall_s=time.monotonic() - start,
                              restarts=restart_counts(out, result))


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compressed host list (``node[01-03,07],gpu5``) as names, in order."""
    names = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", text):
        found = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not found:
            names.append(part)
            continue
        prefix, ranges, suffix = found.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return names


def expand_tasks_per_node(text: str) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1]."""
    counts = []
    for part in text.split(","):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not found:
            raise UserError(f"SLURM_TASKS_PER_NODE {text!r} is not in Slurm's format, e.g. 2(x3),1")
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return counts


def slurm_topology(env: Mapping[str, str], kind: str, *, base_port: int = 27100, degree: int | None = None,
                   seed: int = 0) -> Topology:
    """The topology of a Slurm job step: peer i is task i, on the node Slurm's block distribution gives it."""
    try:
        nodes = expand_nodelist(env["SLURM_JOB_NODELIST"])
        per_node = expand_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
    except KeyError as exc:
        raise UserError(f"{exc.args[0]} is not set: run this inside a Slurm job (srun)") from None
    if len(per_node) != len(nodes):
        raise UserError(f"SLURM_TASKS_PER_NODE lists {len(per_node)} nodes but SLURM_JOB_NODELIST {len(nodes)}")
    if kind not in KINDS:
        raise UserError(f"unknown topology kind {kind!r}; choose one of {', '.join(KINDS)}")
    addresses = []
    for node, count in zip(nodes, per_node):
        try:
            address = socket.gethostbyname(node)
        except OSError:
            raise UserError(f"Slurm node {node} has no address (DNS); cannot build the topology") from None
        addresses += [address] * count
    topo = make_topology(kind, len(addresses), degree=degree, seed=seed, base_port=base_port)
    # Ports stay base+i on every host: unique per peer, so two peers on one node never collide.
    return Topology(topo.kind, tuple(replace(p, host=addresses[p.id]) for p in topo.peers), topo.edges)


def _task_id(env: Mapping[str, str]) -> int:
    try:
        return int(env["SLURM_PROCID"])
    except (KeyError, ValueError):
        raise UserError("SLURM_PROCID is not set: run this through srun, one task per peer") from None


def slurm_peer(env: Mapping[str, str], run_dir: str | Path, data_dir: str | Path, cfg: RunConfig, *, kind: str,
               base_port: int, degree: int | None = None, bind_host: str | None = None) -> int:
    """Run the peer of this Slurm task; task 0 also writes RUN/topology.toml and RUN/config.toml."""
    from p2pser.deploy.peer_process import run_peer

    task = _task_id(env)
    topology = slurm_topology(env, kind, base_port=base_port, degree=degree, seed=cfg.seed)
    if security_on(cfg.security, topology):
        if not cfg.keys or not Path(cfg.keys).is_dir():
            raise UserError("security is on: pass --keys DIR, a key folder all nodes can read "
                            "(`p2pser keys new DIR --peers N`)")
        topology = with_public_keys(topology, cfg.keys)
    run = Path(run_dir)
    if task == 0:
        run.mkdir(parents=True, exist_ok=True)
        save_topology(topology, run / "topology.toml", note=f"Slurm job {env.get('SLURM_JOB_ID', '?')}")
        write_config_toml(replace(cfg, keys=None), run / "config.toml")
    return run_peer(topology, task, data_dir, cfg, run, bind_host=bind_host)


def slurm_task(env: Mapping[str, str], run_dir: str | Path, cmd: list[str], *, restarts: int = 0) -> int:
    """Supervise this Slurm task's peer, run by ``cmd`` (``p2pser slurm peer ... --no-supervisor``): a crash
    is reported and recorded in its ``status.json`` (a signal included), and restarted up to ``restarts``
    times. Exit status 0 when the peer finished, 130 when the job was cancelled, else 1."""
    task = _task_id(env)
    result = Supervisor([LocalPeer(task, cmd, peer_dir(run_dir, task))], restarts=restarts).run()
    result.record(Path(run_dir))
    return 130 if result.interrupted else 1 if result.crashed else 0


def slurm_summary(run_dir: str | Path, data_dir: str | Path, cfg: RunConfig, *, wall_s: float) -> dict[str, Any]:
    """Summarise a finished Slurm run folder (shared file system: the peers wrote their folders there)."""
    from p2pser.exchange.topology import load_topology

    run = Path(run_dir)
    topology = load_topology(run / "topology.toml")
    base = summary_base("slurm", topology.kind, cfg, run, topology.n, None)
    return summarize_gathered(run, topology, data_dir, cfg, base, wall_s=wall_s)

