"""One supervisor for every way peers run: local processes (``launch``), remote shells (``launch-hosts``)
and a Slurm task (``slurm peer``).

It watches each peer's *process*, not only the ``status.json`` the peer writes: a peer killed by SIGKILL, the
OOM killer or a segfault never updates its status file, and only its exit status tells. Every crash is
reported by peer id with its signal or its last error. With ``restarts = N`` a crashed peer is started again,
up to N times; it resumes from its checkpoint and catches up with its neighbours through the pull path
(``algorithms.catch_up``). When supervision ends, each peer's outcome (and how its last life ended) is
written into its ``status.json``, so that the summary, ``slurm summarize`` and a later ``--continue`` all see
what happened.

Ctrl-C (SIGINT), SIGTERM and SIGHUP (the operator's session closed) stop every peer cleanly: each saves its
checkpoint and model on SIGTERM, and the run can be continued with ``--continue``. Peers run in their own
sessions, so a Ctrl-C in the terminal reaches only the supervisor, which then stops them itself (over SSH, a
signal to the local ``ssh`` would only cut the connection and leave the remote peer running).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2pser.config import RunConfig, config_to_dict, load_config
from p2pser.errors import UserError
from p2pser.exchange.topology import Topology, load_topology
from p2pser.report.run_folder import peer_dir, write_json_atomic
from p2pser.report.summary import read_status

log = logging.getLogger(__name__)

STOP_S = 30.0  # how long stopped peers get to save their checkpoint and model before they are killed
CONFIG_ERROR = 2  # the exit status of `p2pser` after a user error: the same error again on a restart


def describe_exit(code: int, *, shell: bool = False) -> str:
    """How a peer process ended, for a person: ``killed by SIGKILL``, ``exit 1``.

    ``shell``: the status came through a shell (a remote peer), which reports death by signal N as 128+N;
    ``ssh`` itself exits 255 when the connection fails.
    """
    if code == 0:
        return "finished"
    if code == 130:  # SIGINT, or the peer's own status after SIGTERM (it saved its model)
        return "stopped by SIGINT or SIGTERM"
    number = -code if code < 0 else code - 128 if shell and 128 < code < 192 else None
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if shell and code < 0:  # the local end (ssh) died, not the peer: it may still run on its host
            return f"its remote shell's local end was killed by {name} (the connection is lost)"
        hint = " (out of memory, or kill -9)" if number == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    if shell and code == 255:
        return "exit 255: the remote shell failed (connection lost or refused?)"
    if code == CONFIG_ERROR:
        return f"exit {code} (a configuration error)"
    return f"exit {code}"


def last_error(folder: Path) -> str:
    """The peer's own error if its status file has one, else the last line of its log ("" if none)."""
    try:
        error = json.loads((folder / "status.json").read_text()).get("error")
        if error:
            return error
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    try:
        lines = [ln for ln in (folder / "log.txt").read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f"last output: {lines[-1]}" if lines else ""


class Worker(Protocol):
    """One peer as the supervisor sees it: something that starts it, asks it to stop, and explains its end."""

    peer: int
    where: str  # "" on this host, " on HOST" otherwise: for messages
    shell: bool  # exit statuses come through a shell (see ``describe_exit``)

    def start(self) -> subprocess.Popen: ...

    def stop(self) -> None:
        """Ask the running peer to stop (it saves its checkpoint and model); may return before it has."""

    def last_error(self) -> str: ...

    def close(self) -> None: ...


class LocalPeer:
    """A ``p2pser peer`` process on this host; its output goes to ``folder/log.txt`` (appended: every life)."""

    shell = False
    where = ""

    def __init__(self, peer: int, cmd: Sequence[str], folder: Path, env: dict[str, str] | None = None) -> None:
        self.peer, self.cmd, self.folder, self.env = peer, list(cmd), folder, env
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> subprocess.Popen:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._log is None:
            self._log = open(self.folder / "log.txt", "a")  # noqa: SIM115 -- written by the child until it exits
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)  # a suspended peer (Ctrl-Z, SIGSTOP) must wake to save and end

    def last_error(self) -> str:
        return last_error(self.folder)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class PeerOutcome:
    peer: int
    where: str = ""
    state: str = "running"  # then: done, crashed or interrupted
    restarts: int = 0
    exit: str | None = None  # how the last life ended, when it did not finish
    error: str | None = None  # its last error or log line then ("": none)


@dataclass
class Supervision:
    """What the supervisor saw: every peer's outcome, and whether the operator interrupted the run."""

    peers: dict[int, PeerOutcome] = field(default_factory=dict)
    interrupted: bool = False
    crashes: list[dict[str, Any]] = field(default_factory=list)  # every crash, in order: peer, exit, restarted

    @property
    def crashed(self) -> list[int]:
        return sorted(k for k, o in self.peers.items() if o.state == "crashed")

    def record(self, out: Path) -> None:
        """Write each supervised peer's outcome into ``out/peer-KKK/status.json``. A peer that died by a signal
        never wrote its own end there; one that crashed on its own keeps its error."""
        for k, outcome in self.peers.items():
            path = peer_dir(out, k) / "status.json"
            try:
                status = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                status = {"peer": k}
            if outcome.state in ("crashed", "interrupted") and status.get("state") != outcome.state:
                status["state"] = outcome.state
                if outcome.state == "crashed":
                    status["error"] = outcome.exit if not status.get("error") else status["error"]
            if outcome.exit is not None:
                status["exit"] = outcome.exit
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, status)


class Supervisor:
    """Start ``workers``, watch them, restart crashed ones up to ``restarts`` times, stop them all on Ctrl-C.

    ``progress`` returns a one-line view of the run, printed every ``poll_s`` when it changes.
    """

    def __init__(self, workers: Sequence[Worker], *, restarts: int = 0, poll_s: float = 1.0,
                 progress: Callable[[], str] | None = None) -> None:
        if restarts < 0:
            raise UserError(f"--restart must be 0 or more, got {restarts}")
        self.workers = {w.peer: w for w in workers}
        self.restarts = restarts
        self.poll_s = poll_s
        self.progress = progress
        self.tty = sys.stdout.isatty()
        self._procs: dict[int, subprocess.Popen] = {}
        self._result = Supervision({k: PeerOutcome(k, w.where) for k, w in self.workers.items()})

    def run(self) -> Supervision:
        result = self._result
        try:
            with _stop_signals_interrupt():
                try:
                    for k, w in self.workers.items():
                        self._procs[k] = w.start()
                    self._watch()
                except KeyboardInterrupt:
                    result.interrupted = True
                    self._say("interrupted: stopping all peers (each saves its checkpoint) ...")
                finally:
                    self._stop_all()
        finally:
            for w in self.workers.values():
                w.close()
        if self.progress is not None and self.tty:
            print()
        return result

    def _watch(self) -> None:
        last_line = ""
        while any(o.state == "running" for o in self._result.peers.values()):
            time.sleep(self.poll_s)
            for k, proc in self._procs.items():
                code = proc.poll()
                if code is not None and self._result.peers[k].state == "running":
                    self._ended(k, code)
            if self.progress is not None:
                line = self.progress()
                if line != last_line:
                    # On a terminal one line is rewritten in place; in a log file each change is its own line.
                    print("\r" + line.ljust(78) if self.tty else line, end="" if self.tty else "\n", flush=True)
                    last_line = line

    def _ended(self, k: int, code: int) -> None:
        outcome, worker = self._result.peers[k], self.workers[k]
        if code == 0:
            outcome.state, outcome.exit, outcome.error = "done", None, None
            return
        outcome.exit, outcome.error = describe_exit(code, shell=worker.shell), worker.last_error()
        again = outcome.restarts < self.restarts and code != CONFIG_ERROR
        self._result.crashes.append({"peer": k, "exit": outcome.exit, "error": outcome.error, "restarted": again})
        self._say(f"peer {k}{worker.where} crashed: {outcome.exit}" + (f"; {outcome.error}" if outcome.error else ""))
        if not again:
            outcome.state = "crashed"
            try:
                worker.stop()  # a remote peer may outlive its lost connection: it must not run on unseen
            except UserError as exc:
                log.warning("%s", exc)
            if code == CONFIG_ERROR and outcome.restarts < self.restarts:
                self._say(f"peer {k}: not restarted: the same configuration error would stop it again")
            return
        outcome.restarts += 1
        self._say(f"peer {k}{worker.where}: restarting from its checkpoint (restart {outcome.restarts} of "
                  f"{self.restarts})")
        self._procs[k] = worker.start()

    def _stop_all(self) -> None:
        """SIGTERM every running peer (they save), wait up to ``STOP_S``, kill what is left."""
        running = [k for k, p in self._procs.items() if p.poll() is None]
        if not running:
            return
        # A second Ctrl-C (or SIGTERM, SIGHUP) must not cut this short: the peers would be left running, or
        # killed unsaved.
        previous = {signum: _ignore(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            with ThreadPoolExecutor(max_workers=min(16, len(running))) as pool:
                for future in [pool.submit(self.workers[k].stop) for k in running]:
                    try:
                        future.result()
                    except UserError as exc:
                        log.warning("%s", exc)
            deadline = time.monotonic() + STOP_S
            for k in running:
                proc = self._procs[k]
                try:
                    code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                    self._say(f"peer {k}{self.workers[k].where} did not stop within {STOP_S:.0f} s: killed")
                outcome = self._result.peers[k]
                if outcome.state == "running":
                    outcome.state = "done" if code == 0 else "interrupted"
        finally:
            for signum, handler in previous.items():
                _restore(signum, handler)

    def _say(self, text: str) -> None:
        print(("\n" if self.tty and self.progress is not None else "") + text, file=sys.stderr, flush=True)


def _ignore(signum: int) -> Any:
    try:
        return signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to handle
        return None


def _restore(signum: int, handler: Any) -> None:
    if handler is not None:
        signal.signal(signum, handler)


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP act like Ctrl-C while peers are supervised: stop them all cleanly, not abandon them.
    A signal the launcher was started ignoring (``nohup`` ignores SIGHUP) stays ignored."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    saved = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(signum) != signal.SIG_IGN:
                saved[signum] = signal.signal(signum, interrupt)
        except ValueError:  # not the main thread: signals are not ours to handle
            pass
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


# -- continuing a stopped run ---------------------------------------------------------------------------------


def continued_config(out: Path, requested: RunConfig, given: set[str]) -> RunConfig:
    """The settings of the run in ``out`` (its ``config.toml``) for ``--continue``; a setting given now that
    differs from the run's own is a ``UserError`` naming both. ``keys`` may be given when the run did not keep
    one (multi-host runs keep key paths out of the run folder)."""
    path = out / "config.toml"
    if not path.exists():
        raise UserError(f"--continue: {out} holds no run to continue ({path} is missing)")
    stored = load_config(path)
    wanted, kept = config_to_dict(requested), config_to_dict(stored)
    for key in sorted(given):
        if key == "keys" and kept[key] is None:
            continue
        if wanted[key] != kept[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--continue: {flag} {wanted[key]} conflicts with {key} = {json.dumps(kept[key])} in "
                            f"{path}; a continued run keeps its settings (drop the flag, or start a new --out)")
    if stored.resume != "auto":
        raise UserError(f"--continue: {path} says resume = {json.dumps(stored.resume)}: its peers would start "
                        "afresh instead of continuing; start a new --out instead")
    return stored.replace(keys=requested.keys) if stored.keys is None else stored


def continued_topology(out: Path, given: Topology, given_path: str | Path) -> Topology:
    """The run's own topology (``out/topology.toml``); the one named on the command line must be the same."""
    saved = load_topology(out / "topology.toml")

    def shape(t: Topology) -> tuple:
        return tuple((p.id, p.host, p.port) for p in t.peers), tuple(sorted(map(tuple, t.edges)))

    if shape(saved) != shape(given):
        raise UserError(f"--continue: topology {given_path} differs from the run's own {out / 'topology.toml'} "
                        "(peers, hosts, ports or links); continue with the topology the run started with")
    return saved


def finished_peers(out: Path) -> set[int]:
    """Peers whose status says they finished their schedule: a continued run does not start them again."""
    return {k for k, s in read_status(out).items() if s.get("state") == "done"}


def previous_restarts(out: Path) -> dict[int, int]:
    """Restarts per peer counted by earlier sessions of this run (its last ``summary.json``)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        return {int(p["peer"]): int(p.get("restarts") or 0) for p in summary.get("per_peer", [])}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}


def restart_counts(out: Path, result: Supervision | None) -> dict[int, int]:
    """Restarts per peer over every session of the run, this one included."""
    counts = previous_restarts(out)
    for k, outcome in (result.peers if result is not None else {}).items():
        counts[k] = counts.get(k, 0) + outcome.restarts
    return counts


def crashed_peers(out: Path, n: int) -> list[int]:
    """Peers of the run in ``out`` that neither finished nor were stopped by the operator, once every peer
    process has ended: a status still saying starting or running means the peer died without a word (its
    supervisor recorded nothing either: its node went down), and no status means it never started."""
    status = read_status(out)
    return [k for k in range(n) if status.get(k, {}).get("state") not in ("done", "interrupted")]


def summary_base(mode: str, topology_name: str, cfg: RunConfig, out: Path, n: int,
                 result: Supervision | None) -> dict[str, Any]:
    """The run-level fields every launcher's ``summary.json`` starts with."""
    return {"mode": mode, "algorithm": cfg.algorithm, "topology": topology_name, "model": cfg.model,
            "features": cfg.features, "fold": cfg.fold, "seed": cfg.seed,
            "interrupted": bool(result and result.interrupted), "crashed_peers": crashed_peers(out, n),
            "crashes": list(result.crashes) if result is not None else []}


def stop_leftovers(out: Path, peers: Sequence[int]) -> None:
    """Before a run continues on this host: stop any of its peers still running from an earlier session (the
    launcher was killed, the terminal closed), so that two lives of a peer never share its port and folder."""
    status = read_status(out)
    for k in peers:
        pid = status.get(k, {}).get("pid")
        if status.get(k, {}).get("state") not in ("starting", "running") or not isinstance(pid, int):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone (or not Linux): nothing to stop
        if b"peer" not in cmdline or str(k).encode() not in cmdline or not any(b"p2pser" in a for a in cmdline):
            continue  # the pid now belongs to another process
        print(f"peer {k} is still running from an earlier session (pid {pid}): stopping it first", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # wake it if suspended, or it never acts on SIGTERM
        deadline = time.monotonic() + STOP_S
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
