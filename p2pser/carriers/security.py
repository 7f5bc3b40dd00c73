"""CurveZMQ keys for peers: key files on disk, public keys in topology files, a ``CurveConfig`` per peer.

A peer's key pair is two files in a key folder: ``peer-K.key`` (secret, mode 0600, never leaves the peer's
host) and ``peer-K.pub`` (public, goes into the topology file). Both are text in the ZeroMQ certificate
style, so ``zmq.auth.load_certificate`` reads them too. Whether a run is secured is ``RunConfig.security``:
``on``, ``off`` or ``auto`` (on exactly when the topology spans more than one host).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import replace
from pathlib import Path

import zmq

from p2pser.carriers.transport import CurveConfig
from p2pser.errors import UserError
from p2pser.exchange.topology import Topology

log = logging.getLogger(__name__)

from p2pser.config import SECURITY as SECURITY_MODES

_KEY_LINE = re.compile(r'^\s*(public|secret)-key\s*=\s*"([^"]{40})"\s*$', re.MULTILINE)


def secret_key_path(folder: str | Path, peer_id: int) -> Path:
    return Path(folder) / f"peer-{peer_id}.key"


def public_key_path(folder: str | Path, peer_id: int) -> Path:
    return Path(folder) / f"peer-{peer_id}.pub"


def _cert_text(peer_id: int, public: str, secret: str | None) -> str:
    kind = "secret" if secret is not None else "public"
    lines = [f"#   p2pser peer {peer_id} CurveZMQ {kind} key file (ZeroMQ certificate format)",
             "metadata", f"    peer = \"{peer_id}\"", "curve", f"    public-key = \"{public}\""]
    if secret is not None:
        lines.append(f"    secret-key = \"{secret}\"")
    return "\n".join(lines) + "\n"


def new_key_pair(folder: str | Path, peer_id: int, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``peer-K.key`` (0600, created so that it is never readable by others) and ``peer-K.pub``."""
    if peer_id < 0:
        raise UserError(f"peer id must be >= 0, got {peer_id}")
    folder = Path(folder)
    secret_path, public_path = secret_key_path(folder, peer_id), public_key_path(folder, peer_id)
    if not overwrite and (secret_path.exists() or public_path.exists()):
        raise UserError(f"{secret_path} already exists; keys are not overwritten (choose another folder)")
    public, secret = (k.decode() for k in zmq.curve_keypair())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        secret_path.unlink(missing_ok=True)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(_cert_text(peer_id, public, secret))
        public_path.write_text(_cert_text(peer_id, public, None))
    except OSError as exc:
        raise UserError(f"cannot write key files in {folder}: {exc.strerror or exc}") from exc
    return secret_path, public_path


def _read_keys(path: Path, what: str) -> dict[str, str]:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found; make keys with `p2pser keys new`") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"cannot read {what} {path}: {reason}") from None
    keys = {kind: value for kind, value in _KEY_LINE.findall(text)}
    if "public" not in keys:
        raise UserError(f"{what} {path} holds no public-key = \"...\" line (40 Z85 characters)")
    return keys


def load_public_key(path: str | Path) -> str:
    return _read_keys(Path(path), "public key file")["public"]


def load_secret_key(path: str | Path) -> tuple[str, str]:
    """(public, secret) from a ``peer-K.key`` file; warns when others may read it."""
    path = Path(path)
    keys = _read_keys(path, "secret key file")
    if "secret" not in keys:
        raise UserError(f"secret key file {path} holds no secret-key line; pass the peer-K.key file, "
                        "not peer-K.pub")
    if path.stat().st_mode & 0o077:
        log.warning("secret key file %s is readable by other users; chmod 600 it", path)
    return keys["public"], keys["secret"]


def with_public_keys(topology: Topology, folder: str | Path) -> Topology:
    """The topology with every peer's ``public_key`` read from ``folder/peer-K.pub``."""
    peers = tuple(replace(p, public_key=load_public_key(public_key_path(folder, p.id))) for p in topology.peers)
    return Topology(topology.kind, peers, topology.edges)


def security_on(mode: str, topology: Topology) -> bool:
    if mode not in SECURITY_MODES:
        raise UserError(f"security mode {mode!r} is not one of {', '.join(SECURITY_MODES)}")
    return mode == "on" or (mode == "auto" and topology.spans_hosts())


def resolve_secret_key(keys: str | Path | None, peer_id: int) -> Path:
    """``keys`` is a key folder (holding ``peer-K.key``) or this peer's secret key file itself."""
    if keys is None:
        raise UserError(f"security is on but no key was given for peer {peer_id}: pass --keys DIR (the folder "
                        "of `p2pser keys new`) or --keys FILE (this peer's peer-K.key), or --security off")
    path = Path(keys)
    return secret_key_path(path, peer_id) if path.is_dir() else path


def curve_config(topology: Topology, peer_id: int, keys: str | Path | None, *,
                 peer_address: str = "strict") -> CurveConfig:
    """This peer's keys plus the public key of every neighbour, from the topology file.

    Only neighbours are admitted: a listed peer that is not linked to this one is refused like a stranger.
    ``peer_address`` "strict" admits a neighbour's key only from its topology address, "key-only" from any.
    """
    public, secret = load_secret_key(resolve_secret_key(keys, peer_id))
    mine = topology.peers[peer_id].public_key
    missing = [j for j in [peer_id, *topology.neighbours(peer_id)] if topology.peers[j].public_key is None]
    if missing:
        raise UserError(f"security is on but the topology has no public_key for peer(s) {missing}; fill them "
                        "with `p2pser keys new DIR --topology FILE` (or `p2pser keys fill`)")
    if mine != public:
        raise UserError(f"the secret key file for peer {peer_id} does not belong to the public key the topology "
                        f"lists for peer {peer_id}; use the matching peer-{peer_id}.key")
    neighbours = topology.neighbours(peer_id)
    peer_keys = {j: topology.peers[j].public_key for j in neighbours}
    # A neighbour connects from the address the topology gives it, so a listed key from elsewhere is a
    # stolen or misconfigured key: the transport refuses it.
    addresses = {j: _addresses(topology.peers[j].host) for j in neighbours}
    if peer_address == "key-only":
        log.warning("peer %d: --peer-address key-only: a neighbour's listed key is admitted from any address",
                    peer_id)
    return CurveConfig(public, secret, peer_keys, addresses, strict_addresses=peer_address == "strict")


def _addresses(host: str) -> frozenset[str]:
    """The IP addresses a topology host name stands for; empty (no address check) if it cannot resolve."""
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None))
    except OSError:
        log.info("cannot resolve %s: connections presenting its key are not checked by address", host)
        return frozenset()
