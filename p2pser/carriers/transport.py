"""ZeroMQ transport: one bound ROUTER for everything a peer receives, one DEALER per neighbour it sends to.

Sending never blocks: each neighbour has its own DEALER with a send queue of ``queue_limit`` messages, so a
slow or dead neighbour fills only its own queue and further messages to it are dropped (and counted) while
sends to the others go on. ZeroMQ's I/O thread keeps receiving into the ROUTER's queue (up to
``queue_limit`` messages per neighbour) while the peer trains; ``recv`` takes them out. DEALERs reconnect on
their own, so a neighbour that restarts on the same address is sent to again without any action here.

The sender id that ``recv`` returns is the DEALER's routing identity: with ``curve=None`` it is claimed,
not proven (the codec header's sender should agree). With a ``CurveConfig`` every link is encrypted, only
the listed public keys may connect, and the id comes from the authenticated key.

``FaultyTransport`` wraps a transport to inject message loss and delay in real runs.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import zmq
import zmq.auth.thread
import zmq.utils.monitor
import zmq.utils.z85

from p2pser.carriers import SEND_QUEUE_LIMIT
from p2pser.errors import UserError
from p2pser.exchange.codec import DEFAULT_MAX_BYTES, MAX_HEADER_BYTES

log = logging.getLogger(__name__)
# Handshake failures other than ZAP refusals (those the authenticator logs itself, with the client's address).
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL

RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
Frames = Sequence[bytes | memoryview | zmq.Frame]


class Transport(Protocol):
    """What a peer needs from a transport; ``ZmqTransport`` and ``FaultyTransport`` both provide it."""

    bytes_sent: int
    bytes_received: int
    messages_dropped: int

    def send(self, to: int, frames: Frames) -> bool: ...

    def recv(self, timeout: float | None) -> tuple[int | None, list[Any]] | None: ...

    def add_neighbour(self, peer_id: int, endpoint: str) -> None: ...

    def remove_neighbour(self, peer_id: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CurveConfig:
    """CurveZMQ keys (Z85 text, 40 characters) for encrypted, authenticated links.

    ``peer_keys`` maps every peer id this peer talks to (both directions) to its public key: the ROUTER
    admits only those keys, and each DEALER checks that its neighbour's ROUTER holds the listed key.
    ``peer_addresses`` optionally lists the IP addresses a peer may connect from: a listed key presented
    from elsewhere (a stolen key) is refused too. A peer missing from it is not checked by address.
    ``strict_addresses=False`` (``--peer-address key-only``) admits a listed key from any address and logs
    each address it was not expected from, once: for a multi-homed host whose outgoing address is not
    the one its peers listen on.
    """

    public_key: str
    secret_key: str
    peer_keys: Mapping[int, str] = field(default_factory=dict)
    peer_addresses: Mapping[int, frozenset[str]] = field(default_factory=dict)
    strict_addresses: bool = True


def _z85(key: str, what: str) -> bytes:
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(raw) != 40:
        raise UserError(f"{what} must be a 40-character Z85 CurveZMQ key, got {len(raw)} characters")
    return raw


class _PeerAuthenticator(zmq.auth.thread.ThreadAuthenticator):
    """ZAP handler: admits a CurveZMQ client only with a listed key, from that peer's address if known.

    Every refusal is logged as one warning naming the address and the key, and every admitted key is
    remembered as a peer id, so ``recv`` can name the sender from the verified key.
    """

    def __init__(self, context: zmq.Context, curve: CurveConfig) -> None:
        super().__init__(context)
        self.ids = {_z85(k, f"public key of peer {pid}"): pid for pid, k in curve.peer_keys.items()}
        self.addresses = dict(curve.peer_addresses)
        self.strict = curve.strict_addresses
        self._admitted_elsewhere: set[tuple[int, str]] = set()

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) == 7 and msg[5] == b"CURVE" and len(msg[6]) == 32:
            address = msg[3].decode("utf-8", "replace")
            key = zmq.utils.z85.encode(msg[6])
            peer = self.ids.get(key)
            if peer is None:
                return self._refuse(msg[1], f"refused a CurveZMQ connection from {address}: key "
                                    f"{key.decode()} is not a neighbour's key in the topology")
            allowed = self.addresses.get(peer)
            if allowed and address not in allowed:
                expected = ", ".join(sorted(allowed))
                if self.strict:
                    return self._refuse(msg[1], f"refused a CurveZMQ connection from {address}: it presents peer "
                                        f"{peer}'s key but peer {peer} connects from {expected}")
                if (peer, address) not in self._admitted_elsewhere:
                    self._admitted_elsewhere.add((peer, address))
                    log.warning("admitted peer %d's key from %s, not from its topology address %s "
                                "(--peer-address key-only)", peer, address, expected)
            self._send_zap_reply(msg[1], b"200", b"OK", key.decode())
            return None
        return await super().handle_zap_message(msg)

    def _refuse(self, request_id: bytes, text: str) -> None:
        log.warning("%s", text)
        self._send_zap_reply(request_id, b"400", b"refused")


_wakeup_pair: tuple[socket.socket, socket.socket] | None = None


def _signal_wakeup() -> socket.socket | None:
    """A socket that becomes readable when the process gets a signal (None outside the main thread).

    The kernel may hand SIGTERM or SIGINT to any thread (ZAP, the handshake monitor, ...); Python's handler
    then only sets a flag, and a main thread blocked in a poll would not notice until the poll timed out:
    minutes, with a long round timeout. Python writes a byte to its wake-up fd whichever thread took the
    signal, so a poll that includes it returns at once and the handler (KeyboardInterrupt: the peer saves
    and stops) runs in the main thread. One pair for the process, kept to its end."""
    global _wakeup_pair
    if _wakeup_pair is None and threading.current_thread() is threading.main_thread():
        read, write = socket.socketpair()
        read.setblocking(False)
        write.setblocking(False)
        previous = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        if previous != -1:  # someone else's (an event loop): leave it to them
            signal.set_wakeup_fd(previous)
            read.close()
            write.close()
            return None
        _wakeup_pair = (read, write)
    return None if _wakeup_pair is None else _wakeup_pair[0]


class ZmqTransport:
    """A peer's sockets. ``bind_endpoint`` may use port ``*`` (or 0) to pick a free port; see ``endpoint``.

    ``context`` lets several transports in one process share a ZeroMQ context (needed for ``inproc://``
    endpoints); by default each transport owns one and terminates it on ``close``.
    """

    def __init__(
        self,
        self_id: int,
        bind_endpoint: str,
        neighbours: Mapping[int, str],
        *,
        queue_limit: int = SEND_QUEUE_LIMIT,
        linger_ms: int = 0,
        curve: CurveConfig | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        if queue_limit < 1:
            raise UserError(f"queue_limit must be at least 1, got {queue_limit}")
        self.self_id = self_id
        self.queue_limit = queue_limit
        self.linger_ms = linger_ms
        self.curve = curve
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.messages_dropped = 0
        self._own_context = context is None
        self._ctx = zmq.Context() if context is None else context
        # Sends may come from a FaultyTransport thread as well as the peer's own; zmq sockets are not
        # thread-safe, so DEALER use is serialised (the ROUTER is only used by recv's caller).
        self._lock = threading.Lock()
        self._dealers: dict[int, zmq.Socket] = {}
        self._endpoints: dict[int, str] = {}
        self._auth: _PeerAuthenticator | None = None
        self._closed = False
        self._monitor_thread: threading.Thread | None = None
        self._poller: zmq.Poller | None = None
        self._router = self._ctx.socket(zmq.ROUTER)
        try:
            self._router.setsockopt(zmq.LINGER, linger_ms)
            self._router.setsockopt(zmq.RCVHWM, queue_limit)
            # A frame larger than any message the codec accepts is cut off by libzmq before it is buffered.
            self._router.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_BYTES + MAX_HEADER_BYTES)
            # A restarted neighbour reconnects with the same identity before its old connection is reaped;
            # hand the identity over instead of refusing the new connection.
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._set_heartbeat(self._router)
            if curve is not None:
                self._start_curve_server(curve)
                self._watch_handshakes()
            # Port 0 means "any free port" to most tools; ZeroMQ spells it "*".
            self._router.bind(bind_endpoint[:-2] + ":*" if bind_endpoint.endswith(":0") else bind_endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise UserError(f"peer {self_id} cannot listen on {bind_endpoint}: {exc.strerror}; "
                            "is the port in use or the host not an address of this machine?") from exc
        except BaseException:
            self.close()
            raise
        self.endpoint: str = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        for peer_id, ep in neighbours.items():
            self.add_neighbour(peer_id, ep)

    @staticmethod
    def _set_heartbeat(sock: zmq.Socket) -> None:
        # ZMTP heartbeats notice a neighbour host that vanished without closing TCP (crash, cable, VM
        # paused), so its connection is dropped and re-established instead of queueing into the void.
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)

    def _start_curve_server(self, curve: CurveConfig) -> None:
        self._auth = _PeerAuthenticator(self._ctx, curve)
        self._auth.start()
        self._router.curve_server = True
        self._router.curve_secretkey = _z85(curve.secret_key, "secret key")
        self._router.curve_publickey = _z85(curve.public_key, "public key")

    def add_neighbour(self, peer_id: int, endpoint: str) -> None:
        """Start sending to ``peer_id`` at ``endpoint`` (replacing an earlier endpoint for the same id)."""
        with self._lock:
            if self._endpoints.get(peer_id) == endpoint:
                return
            self._close_dealer(peer_id)
            sock = self._ctx.socket(zmq.DEALER)
            try:
                sock.setsockopt(zmq.IDENTITY, str(self.self_id).encode())
                sock.setsockopt(zmq.SNDHWM, self.queue_limit)
                sock.setsockopt(zmq.LINGER, self.linger_ms)
                sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
                self._set_heartbeat(sock)
                if self.curve is not None:
                    server_key = self.curve.peer_keys.get(peer_id)
                    if server_key is None:
                        raise UserError(f"no public key for neighbour {peer_id}; add it to the topology file")
                    sock.curve_serverkey = _z85(server_key, f"public key of peer {peer_id}")
                    sock.curve_publickey = _z85(self.curve.public_key, "public key")
                    sock.curve_secretkey = _z85(self.curve.secret_key, "secret key")
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                sock.close(0)
                raise UserError(f"peer {self.self_id} cannot connect to neighbour {peer_id} at {endpoint}: "
                                f"{exc.strerror}; check the endpoint (tcp://host:port)") from exc
            except BaseException:
                sock.close(0)
                raise
            self._dealers[peer_id] = sock
            self._endpoints[peer_id] = endpoint

    def remove_neighbour(self, peer_id: int) -> None:
        with self._lock:
            self._close_dealer(peer_id)

    def _close_dealer(self, peer_id: int) -> None:
        sock = self._dealers.pop(peer_id, None)
        self._endpoints.pop(peer_id, None)
        if sock is not None:
            sock.close(self.linger_ms)

    @property
    def neighbours(self) -> dict[int, str]:
        return dict(self._endpoints)

    def send(self, to: int, frames: Frames) -> bool:
        """Queue one multipart message for ``to`` without blocking; False (and a counted drop) if ``to`` is
        unknown or its queue is full. Frames are sent zero-copy: do not change their buffers afterwards."""
        with self._lock:
            sock = self._dealers.get(to)
            if sock is None or self._closed:
                self.messages_dropped += 1
                return False
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.messages_dropped += 1
                return False
            self.messages_sent += 1
            self.bytes_sent += sum(memoryview(f).nbytes if not isinstance(f, zmq.Frame) else len(f)
                                   for f in frames)
            return True

    def recv(self, timeout: float | None) -> tuple[int | None, list[Any]] | None:
        """Wait up to ``timeout`` seconds (None: forever, 0: just check) for one message.

        Returns ``(sender_id, frames)`` or None on timeout. ``frames`` are ``zmq.Frame`` objects (zero-copy;
        ``Decoder.decode`` takes them as they are). ``sender_id`` is None when the routing identity is not a
        peer id (or, with CurveZMQ, the key is not a listed peer's).
        """
        poll_ms = None if timeout is None else max(0, int(timeout * 1000))
        if self._poller is None:
            self._poller = zmq.Poller()
            self._poller.register(self._router, zmq.POLLIN)
            wakeup = _signal_wakeup()
            if wakeup is not None:
                self._poller.register(wakeup, zmq.POLLIN)
        ready = dict(self._poller.poll(poll_ms))
        if self._router not in ready:
            if ready and _wakeup_pair is not None:  # a signal: the caller's next line of Python runs its handler
                with contextlib.suppress(BlockingIOError):
                    while _wakeup_pair[0].recv(512):
                        pass
            return None
        identity, *frames = self._router.recv_multipart(copy=False)
        self.messages_received += 1
        self.bytes_received += sum(len(f) for f in frames)
        return self._sender_of(identity), frames

    def _sender_of(self, identity: zmq.Frame) -> int | None:
        if self._auth is not None:
            # ZAP put the authenticated client key in User-Id; the routing identity is only a claim.
            user = identity.get("User-Id")
            return self._auth.ids.get(user.encode() if isinstance(user, str) else user)
        text = identity.bytes
        if not text.isdigit() or len(text) > 9:
            return None
        return int(text)

    def _watch_handshakes(self) -> None:
        """Log clients that fail the CurveZMQ handshake: plain-text peers never reach ZAP, so only the
        socket's monitor sees them. (libzmq reports our endpoint, not the client's address.)"""
        monitor = self._router.get_monitor_socket(HANDSHAKE_FAILED)
        self._monitor_stop = threading.Event()

        def watch() -> None:
            while not self._monitor_stop.is_set():
                if not monitor.poll(200):
                    continue
                event = zmq.utils.monitor.recv_monitor_message(monitor)
                log.warning("peer %d: refused a connection on %s: it failed the CurveZMQ handshake (%s; a "
                            "plain-text or misconfigured peer)", self.self_id, event["endpoint"].decode(),
                            zmq.Event(event["event"]).name)
            monitor.close(0)

        self._monitor_thread = threading.Thread(target=watch, name=f"zmq-monitor-{self.self_id}", daemon=True)
        self._monitor_thread.start()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for peer_id in list(self._dealers):
                self._close_dealer(peer_id)
        if self._monitor_thread is not None:
            self._monitor_stop.set()
            self._monitor_thread.join()
            self._router.disable_monitor()
        self._router.close(self.linger_ms)
        if self._auth is not None:
            self._auth.stop()
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaultyTransport:
    """Wraps a transport and loses or delays outgoing messages, reproducibly from ``seed``.

    ``drop`` is the probability that a message is silently lost (``send`` still returns True, as a lossy
    network would). ``delay_s`` is a delay in seconds, or a function of the destination id (slow links);
    ``jitter_s`` adds a uniform random delay in [0, jitter_s). Delayed messages wait in a background thread,
    so ``send`` never blocks; their frames are copied first because the caller may reuse its buffers.
    Counters: ``messages_lost`` (injected) plus the inner transport's counters.
    """

    def __init__(
        self,
        inner: Transport,
        *,
        drop: float = 0.0,
        delay_s: float | Callable[[int], float] = 0.0,
        jitter_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= drop <= 1.0:
            raise UserError(f"drop probability must be in [0, 1], got {drop}")
        if jitter_s < 0 or (not callable(delay_s) and delay_s < 0):
            raise UserError("delay and jitter must be >= 0 seconds")
        self.inner = inner
        self.drop = drop
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.messages_lost = 0
        self._rng = random.Random(seed)
        self._pending: list[tuple[float, int, int, list[bytes]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    @property
    def messages_dropped(self) -> int:
        return self.inner.messages_dropped + self.messages_lost

    @property
    def endpoint(self) -> str:
        return getattr(self.inner, "endpoint", "")

    def _delay_for(self, to: int) -> float:
        base = self.delay_s(to) if callable(self.delay_s) else self.delay_s
        return max(0.0, base) + (self._rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0)

    def send(self, to: int, frames: Frames) -> bool:
        with self._cond:
            if self._closed:
                return self.inner.send(to, frames)  # counted as a drop by the closed inner transport
            lost = self.drop > 0 and self._rng.random() < self.drop
            delay = self._delay_for(to)
            if lost:
                self.messages_lost += 1
                return True
            if delay <= 0:
                return self.inner.send(to, frames)
            copies = [f.bytes if isinstance(f, zmq.Frame) else bytes(f) for f in frames]
            heapq.heappush(self._pending, (time.monotonic() + delay, next(self._seq), to, copies))
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name="faulty-transport", daemon=True)
                self._thread.start()
            self._cond.notify()
            return True

    def _deliver(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._pending or self._pending[0][0] > time.monotonic()):
                    wait = self._pending[0][0] - time.monotonic() if self._pending else None
                    self._cond.wait(wait)
                if self._closed:
                    return
                _, _, to, frames = heapq.heappop(self._pending)
            self.inner.send(to, frames)

    def recv(self, timeout: float | None) -> tuple[int | None, list[Any]] | None:
        return self.inner.recv(timeout)

    def add_neighbour(self, peer_id: int, endpoint: str) -> None:
        self.inner.add_neighbour(peer_id, endpoint)

    def remove_neighbour(self, peer_id: int) -> None:
        self.inner.remove_neighbour(peer_id)

    def close(self) -> None:
        """Stop delivering (messages still waiting are discarded, like packets in flight) and close."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.inner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
