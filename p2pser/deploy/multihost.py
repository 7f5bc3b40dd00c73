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
from p2pser.errors import UserError
from p2pser.exchange.topology import KINDS, Topology, make_topology, save_topology
from p2pser.partition.experiment import extract_for, make_plan, test_set
from p2pser.report.run_folder import peer_dir, prepare_out_dir
from p2pser.report.summary import read_status, report_run

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


def _run_on(host: Host, script: str, *, stdin: bytes | None = None, timeout: float = 120) -> bytes:
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
    return done.stdout


def _peer_script(host: Host, remote: str, data_dir: str, k: int, keys: str | None) -> str:
    q = shlex.quote
    args = [host.python, "-m", "p2pser", "peer", data_dir, "--topology", f"{remote}/topology.toml", "--id", str(k),
            "--config", f"{remote}/config.toml", "--out", remote]
    if keys is not None:
        args += ["--keys", keys]
    if host.bind is not None:
        args += ["--bind-host", host.bind]
    # The pid file lets the launcher stop the peer even when the remote shell does not forward signals.
    return (f"cd {q(remote)} && echo $$ > {q(f'{remote}/peer-{k}.pid') } && "
            f"OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 exec {shlex.join(args)}")


def _stage(host: Host, remote: str, topology_text: bytes, config_text: bytes, secrets: Mapping[int, bytes]) -> None:
    q = shlex.quote
    _run_on(host, f"mkdir -p {q(remote)} && cat > {q(remote)}/topology.toml", stdin=topology_text)
    _run_on(host, f"cat > {q(remote)}/config.toml", stdin=config_text)
    for k, text in secrets.items():
        # umask first: the secret key file is never readable by others, not even for a moment.
        _run_on(host, f"umask 077 && mkdir -p {q(remote)}/keys && cat > {q(remote)}/keys/peer-{k}.key", stdin=text)


def _poll_metrics(hosts: list[tuple[Host, str]]) -> dict[int, list[dict]]:
    """The last metrics row of every peer that wrote one (one remote command per host)."""
    rows: dict[int, list[dict]] = {}
    for host, remote in hosts:
        try:
            out = _run_on(host, f"tail -qn1 {shlex.quote(remote)}/peer-*/metrics.jsonl 2>/dev/null || true",
                          timeout=20)
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
    names = " ".join(peer_dir("", k).name for k in peers)
    blob = _run_on(host, f"cd {shlex.quote(remote)} && tar -cf - {names}", timeout=600)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(out, filter="data")


def summary_base(mode: str, topology_name: str, cfg: RunConfig, *, interrupted: bool, out: Path) -> dict[str, Any]:
    crashed = sorted(k for k, s in read_status(out).items() if s.get("state") == "crashed")
    return {"mode": mode, "algorithm": cfg.algorithm, "topology": topology_name, "model": cfg.model,
            "features": cfg.features, "fold": cfg.fold, "seed": cfg.seed, "interrupted": interrupted,
            "crashed_peers": crashed}


def summarize_gathered(out: Path, topology: Topology, data_dir: str | Path, cfg: RunConfig, base: dict[str, Any],
                       *, wall_s: float) -> dict[str, Any]:
    """``summary.json`` of a run folder holding every peer's folder, scored on the local copy of the data."""
    plan = make_plan(data_dir, cfg, topology.n)
    features, row_of = extract_for(plan, plan.test, cfg, workers=1)
    test = test_set(features, row_of, plan, cfg.normalizer)
    base = base | {"security": security_on(cfg.security, topology),
                   "hosts": sorted({p.host for p in topology.peers})}
    return report_run(out, base, cfg, test, plan.classes, wall_s=wall_s)


def launch_hosts(hosts_file: str | Path, topology: Topology, topology_name: str, data_dir: str | Path,
                 cfg: RunConfig, out_dir: str | Path, *, quiet: bool = False) -> dict[str, Any]:
    """Start every peer on its host, wait for all, gather their folders into ``out_dir``, summarise."""
    start = time.monotonic()
    hosts = load_hosts(hosts_file)
    missing = sorted({p.host for p in topology.peers} - set(hosts))
    if missing:
        raise UserError(f"hosts file {hosts_file} has no [[hosts]] entry with address {', '.join(missing)} "
                        "(the topology's peers live there)")
    out = prepare_out_dir(out_dir)
    secured = security_on(cfg.security, topology)
    local_keys = Path(cfg.keys) if cfg.keys else None
    if secured and any(p.public_key is None for p in topology.peers):
        if local_keys is None or not local_keys.is_dir():
            raise UserError("security is on and the topology has no public keys: pass --keys DIR (from "
                            "`p2pser keys new`) or fill them with `p2pser keys fill DIR TOPOLOGY`")
        topology = with_public_keys(topology, local_keys)
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

    procs: dict[int, tuple[subprocess.Popen, Host, str]] = {}
    reported: set[int] = set()
    logs = []
    interrupted = False
    try:
        for host, remote, ids in placed:
            keys = (host.keys if host.keys is not None else f"{remote}/keys") if secured else None
            for k in ids:
                folder = peer_dir(out, k)
                folder.mkdir(parents=True, exist_ok=True)
                fh = open(folder / "log.txt", "w")  # noqa: SIM115 -- the remote peer's output until it exits
                logs.append(fh)
                # Without a data_dir of its own, a host reads the launcher's path: absolute, as the peer runs elsewhere.
                script = _peer_script(host, remote, host.data_dir or str(Path(data_dir).resolve()), k, keys)
                procs[k] = (subprocess.Popen(host.command(script), stdin=subprocess.DEVNULL, stdout=fh,
                                             stderr=subprocess.STDOUT), host, remote)
        last_line = ""
        while any(p.poll() is None for p, _, _ in procs.values()):
            time.sleep(POLL_S)
            _report_exits(procs, reported, out)
            line = progress_line(_poll_metrics([(h, r) for h, r, _ in placed]), topology.n)
            if not quiet and line != last_line:
                print(line, flush=True)
                last_line = line
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: stopping all peers ...", file=sys.stderr)
    finally:
        _stop(procs)
        for fh in logs:
            fh.close()
    _report_exits(procs, reported, out)
    for host, remote, ids in placed:
        _gather(host, remote, ids, out)
    base = summary_base("launch-hosts", topology_name, cfg, interrupted=interrupted, out=out)
    return summarize_gathered(out, topology, data_dir, cfg, base, wall_s=time.monotonic() - start)


def _report_exits(procs: dict[int, tuple[subprocess.Popen, Host, str]], reported: set[int], out: Path) -> None:
    for k, (p, host, _) in procs.items():
        if p.returncode not in (None, 0) and k not in reported:
            reported.add(k)
            print(f"peer {k} on {host.name} exited with {p.returncode}: {_last_line(peer_dir(out, k) / 'log.txt')}",
                  file=sys.stderr)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def _stop(procs: dict[int, tuple[subprocess.Popen, Host, str]]) -> None:
    """SIGTERM through the pid files (the peers save their models), then wait; kill the local shells last."""
    for k, (p, host, remote) in procs.items():
        if p.poll() is None:
            try:
                _run_on(host, f"kill -TERM $(cat {shlex.quote(remote)}/peer-{k}.pid) 2>/dev/null || true", timeout=20)
            except UserError as exc:
                log.warning("%s", exc)
    deadline = time.monotonic() + 30
    for p, _, _ in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


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


def slurm_peer(env: Mapping[str, str], run_dir: str | Path, data_dir: str | Path, cfg: RunConfig, *, kind: str,
               base_port: int, degree: int | None = None, bind_host: str | None = None) -> int:
    """Run the peer of this Slurm task; task 0 also writes RUN/topology.toml and RUN/config.toml."""
    from p2pser.deploy.peer_process import run_peer

    try:
        task = int(env["SLURM_PROCID"])
    except (KeyError, ValueError):
        raise UserError("SLURM_PROCID is not set: run this through srun, one task per peer") from None
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


def slurm_summary(run_dir: str | Path, data_dir: str | Path, cfg: RunConfig, *, wall_s: float) -> dict[str, Any]:
    """Summarise a finished Slurm run folder (shared file system: the peers wrote their folders there)."""
    from p2pser.exchange.topology import load_topology

    run = Path(run_dir)
    topology = load_topology(run / "topology.toml")
    base = summary_base("slurm", topology.kind, cfg, interrupted=False, out=run)
    return summarize_gathered(run, topology, data_dir, cfg, base, wall_s=wall_s)

