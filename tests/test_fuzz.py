"""Hostile input against a live peer (issue 6): over 10,000 malformed messages from hypothesis strategies.

A real ``p2pser peer`` process (peer 0 of a two-peer ring) trains on the synthetic corpus; the test plays
peer 1 through real ZeroMQ sockets. It is an honest neighbour for a few rounds (so that replayed and
out-of-order rounds mean something), then stops sending models, so the peer waits in round ``HONEST``'s
Gather, and fires the malformed messages. After every one it pulls the peer's parameters (the "pull"
protocol) and checks them bit for bit against the parameters before the fuzz. Every message must be
rejected with one log line whose reason is the expected one, in order, per connection. Finally it sends a
valid model and the peer must finish its rounds and exit 0.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_launch import free_base_port

from p2pser.exchange.codec import (
    CONTROL_KINDS,
    DEFAULT_MAX_BYTES,
    DTYPES,
    HASHES,
    HEADER_FIELDS,
    KINDS,
    MAX_HEADER_BYTES,
    MAX_META_KEYS,
    MAX_META_STR,
    MAX_NAME_LEN,
    MAX_NDIM,
    MAX_SAMPLES,
    MAX_TENSORS,
    CodecError,
    Decoder,
    Message,
    encode,
)
from p2pser.exchange.inbox import Inbox
from p2pser.exchange.topology import load_topology, make_topology, save_topology

pytestmark = pytest.mark.slow  # a real peer process and ten thousand messages

N_MESSAGES = 10_000
HONEST = 3  # rounds played honestly before the fuzz; the peer then waits in round HONEST
ROUNDS = HONEST + 3
MAX_AHEAD = Inbox([]).max_rounds_ahead  # rounds up to this far ahead are buffered, not refused
# Pulls whose answer has not arrived yet, at most. The peer's queue to us holds 16 messages, but ZeroMQ
# tells the sender of free room only every 8 (low-water mark), so more than 8 in flight can be dropped.
PULL_WINDOW = 4
# How long the test waits for anything that must happen (a model, an answer, a log line): it only ends a
# broken run. Nothing here is timed: on a busy machine everything just takes longer.
LIMIT_S = 300
# The fuzz must fit in one Gather, or the peer would move on without our model: the peer waits longer than
# the test would wait for anything (and than pytest-timeout lets the test run), however busy the machine.
ROUND_TIMEOUT = 3600
# Sockets the test sends from, by routing identity: "1" is the neighbour, "7" a peer id that is not one,
# "0" the peer's own id, "evil" an identity that is no peer id at all (the transport reports it as None).
CONNS = {"1": "1", "7": "7", "0": "0", "evil": "None"}
PEER_ARGS = ["--model", "svm", "--partition", "iid", "--features", "mfcc", "--max-seconds", "1.5",
             "--local-steps", "2", "--batch-size", "16", "--final-mixing", "0", "--rounds", str(ROUNDS), "--liveness", "fixed",
             "--resume", "off", "--round-timeout", str(ROUND_TIMEOUT), "--startup-timeout", str(ROUND_TIMEOUT),
             "--pull-rate", "0"]  # the test pulls after every message: each pull must be answered
MAX_AGE = ROUNDS * 2  # --rounds x --local-steps: no honest neighbour's model is older

# How each expected rejection reads in the peer's log (the text after "rejected a message from X: ").
REASONS = {
    **{code: re.escape(code) + ": " for code in ("header", "version", "fields", "kind", "type", "template",
                                                 "frames", "size", "checksum", "nonfinite", "oversize",
                                                 "range")},
    "impostor": r"header says sender \d+ but the connection is peer (None|\d+)$",
    "stranger": r"sender \d+ is not a neighbour$",
    "stale": r"stale round \d+ from 1 \(now at round \d+\)$",
    "ahead": r"round \d+ from 1 is (too far ahead of round \d+|past the schedule's end \(round \d+\))$",
    "unexpected": r"unexpected '(hello|ping)' message$",
    "duplicate": r"duplicate model for round \d+ from 1$",
}
REJECTED = re.compile(r"peer 0: rejected a message from (\S+): (.*)$")
MAX_LOG_LINE = 1000  # a hostile value quoted in a reason must not flood the log


class Case:
    """One malformed message: the socket it goes out on, its frames, and the reasons that may refuse it."""

    __slots__ = ("conn", "expect", "frames")

    def __init__(self, conn: str, frames: tuple[bytes, ...], expect: frozenset[str]) -> None:
        self.conn, self.frames, self.expect = conn, frames, expect

    def __repr__(self) -> str:  # hypothesis prints failing cases: frame heads, not megabytes
        frames = ", ".join(f"{f[:60]!r}{'...' if len(f) > 60 else ''} ({len(f)} B)" for f in self.frames)
        return f"Case(conn={self.conn!r}, expect={'/'.join(sorted(self.expect))}, frames=[{frames}])"


def _case(frames, *expect: str, conn: str = "1") -> Case:
    return Case(conn, tuple(bytes(f) for f in frames), frozenset(expect))


def _pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _raw_map(items: dict[str, bytes]) -> bytes:
    """A msgpack map from already-packed values: lets a header carry bytes msgpack.packb would not write."""
    n = len(items)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(_pack(k) + v for k, v in items.items())


def _nested(depth: int, leaf: bytes = b"\x01", *, maps: bool = False) -> bytes:
    """``depth`` one-element arrays (or one-key maps) around ``leaf``, as msgpack bytes."""
    return (b"\x81\xa1k" if maps else b"\x91") * depth + leaf


class Wire:
    """Builds messages around the peer's real parameters at the round it waits in."""

    def __init__(self, tensors: dict[str, np.ndarray], round_: int, samples: int, replays: list) -> None:
        self.tensors = {k: np.array(a) for k, a in tensors.items()}
        self.names = list(tensors)
        self.dtypes = [np.dtype(a.dtype).name for a in tensors.values()]
        self.shapes = [list(a.shape) for a in tensors.values()]
        self.buffers = [np.ascontiguousarray(a).tobytes() for a in tensors.values()]
        self.round = round_
        self.samples = samples
        self.replays = replays  # our honest messages of earlier rounds, byte for byte

    def header(self, buffers=None, hash_name: str = "xxh3_64", **override) -> dict:
        buffers = self.buffers if buffers is None else buffers
        header = {"v": 1, "kind": "model", "sender": 1, "round": self.round, "age": 0.0, "samples": self.samples,
                  "names": list(self.names), "dtypes": list(self.dtypes),
                  "shapes": [list(s) for s in self.shapes], "hash": hash_name,
                  "checksum": HASHES[hash_name](buffers), "meta": {}}
        header.update(override)
        return header

    def frames(self, buffers=None, **override) -> list[bytes]:
        buffers = self.buffers if buffers is None else buffers
        return [_pack(self.header(buffers, **override)), *buffers]


# Values of each msgpack type, to put where another type belongs. Built once, without filters on unions:
# hypothesis spends milliseconds a draw on those, and we draw tens of thousands.
NONE, BOOL, FLOAT = st.none(), st.booleans(), st.floats()
INT = st.integers(-(2**63), 2**64 - 1)
TEXT = st.text(max_size=8)
SCALAR = NONE | BOOL | INT | FLOAT | TEXT
LIST = st.lists(SCALAR, max_size=3)
MAP = st.dictionaries(st.text(max_size=4), SCALAR, max_size=2)
NOT_INT = NONE | BOOL | FLOAT | TEXT | LIST | MAP  # bool is refused where an int belongs
NOT_NUMBER = NONE | BOOL | TEXT | LIST | MAP
NOT_STR = NONE | BOOL | INT | FLOAT | LIST | MAP
NOT_LIST = NONE | BOOL | INT | FLOAT | TEXT | MAP
NOT_MAP = NONE | BOOL | INT | FLOAT | TEXT | LIST
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NEGATIVE = st.integers(-(2**63), -1)
NAME = st.text(min_size=1, max_size=40)
LONG = st.integers(MAX_NAME_LEN + 1, 4 * MAX_NAME_LEN).map(lambda n: "x" * n)
HASH = st.sampled_from(sorted(HASHES))
TENSOR_KIND = st.sampled_from(["model", "state"])
ANY_KIND = st.sampled_from(["model", "state", *sorted(CONTROL_KINDS)])
ROUND = st.integers(0, 2**62 - 1)
# Bit patterns of float32 NaNs (quiet, negative, signalling) and infinities.
NONFINITE_BITS = st.sampled_from([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000])
INT_FIELDS = {"sender": 2**31, "round": 2**62, "samples": 2**62, "checksum": 2**64}  # exclusive limits


def malformed(w: Wire) -> st.SearchStrategy[Case]:
    """Every way we know to get a message wrong, each with the rejection reason(s) it must earn."""
    index = st.integers(0, len(w.names) - 1)
    other_name = NAME.filter(lambda x: x not in w.names)
    bad_int_value = {f: NOT_INT | NEGATIVE | (st.integers(limit, 2**64 - 1) if limit < 2**64 else NEGATIVE)
                     for f, limit in INT_FIELDS.items()}

    @st.composite
    def garbage(draw):
        frames = draw(st.lists(st.binary(max_size=48), min_size=1, max_size=4))
        # Random bytes are almost never msgpack; when they are, a map without "v" is the only other outcome.
        return _case(frames, "header", "fields")

    @st.composite
    def truncated_header(draw):
        raw = _pack(w.header(kind=draw(ANY_KIND)))
        cut = draw(st.integers(0, len(raw) - 1))
        return _case([raw[:cut], *w.buffers[: draw(st.integers(0, len(w.buffers)))]], "header")

    as_list = list(w.header().items())

    @st.composite
    def not_a_map(draw):
        value = draw(NOT_MAP | st.binary(max_size=16) | st.just(as_list))
        return _case([_pack(value), *w.buffers], "header")

    packed = {k: _pack(v) for k, v in w.header().items()}
    broken = st.sampled_from([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"]).map(lambda p: p + b"\xff\xff\xff\xff")
    too_deep = st.builds(_nested, st.integers(1100, 4000), maps=BOOL)
    odd = st.sampled_from([b"\xc4\x01x", b"\xd4\x01\x00", b"\x81\x01\x01", b"\xc1", b"\xd6\xff\x00\x00\x00\x01"])

    @st.composite
    def msgpack_bomb(draw):
        # Length prefixes claiming 4 GiB (array, map, str, bin, ext), a stack deeper than the unpacker's, bin
        # and ext values (timestamps too), integer map keys, the never-used byte: all fail inside msgpack.
        value = draw(broken | too_deep | odd)
        if draw(BOOL):
            return _case([value, *w.buffers], "header")
        field = draw(st.sampled_from(sorted(HEADER_FIELDS)))
        return _case([_raw_map(packed | {field: value}), *w.buffers], "header")

    @st.composite
    def deep_field(draw):
        # Nesting the unpacker accepts (< 1024 levels) must still be refused without recursing on it.
        field = draw(st.sampled_from(sorted(HEADER_FIELDS - {"checksum"})))
        value = _nested(draw(st.integers(2, 1000)), maps=draw(BOOL))
        expect = {"v": "version", "kind": "kind"}.get(field, "type")
        return _case([_raw_map(packed | {field: value}), *w.buffers], expect)

    big_headers = [bytes([b]) * (MAX_HEADER_BYTES + extra) for b, extra in ((0x00, 1), (0x91, 77), (0xFF, 4096))]

    @st.composite
    def oversize_header(draw):
        return _case([draw(st.sampled_from(big_headers)), *w.buffers[: draw(st.integers(0, len(w.buffers)))]],
                     "oversize")

    # Legal msgpack of a few hundred kB in an int field: refused, and the reason quotes it briefly. Packed
    # once: hypothesis only picks which.
    huge_value = st.sampled_from([
        _case(w.frames(**{field: value}), "type")
        for field in INT_FIELDS
        for value in (list(range(20_000)), "x" * 200_000, {f"k{i}": i for i in range(5000)})
    ])

    @st.composite
    def bad_version(draw):
        v = draw(NOT_INT | NEGATIVE | st.integers(2, 2**64 - 1) | st.just(0))
        return _case(w.frames(v=v), "version")

    @st.composite
    def bad_fields(draw):
        drop = draw(st.sets(st.sampled_from(sorted(HEADER_FIELDS)), max_size=5))
        extra = draw(st.dictionaries((TEXT | LONG).filter(lambda k: k not in HEADER_FIELDS), SCALAR, max_size=3))
        if not drop and not extra:
            extra = {"padding": 0}
        header = {k: v for k, v in w.header().items() if k not in drop} | extra
        return _case([_pack(header), *w.buffers], "fields")

    @st.composite
    def bad_kind(draw):
        kind = draw(NOT_STR | TEXT.filter(lambda x: x not in KINDS))
        return _case(w.frames(kind=kind), "kind")

    @st.composite
    def bad_int(draw):
        # Bool, float, negative, too large, or not a number where a non-negative integer belongs.
        field = draw(st.sampled_from(sorted(INT_FIELDS)))
        return _case(w.frames(kind=draw(ANY_KIND), **{field: draw(bad_int_value[field])}), "type")

    @st.composite
    def bad_age(draw):
        age = draw(NONFINITE | st.floats(max_value=-1e-300) | NEGATIVE | NOT_NUMBER)
        nonfinite = isinstance(age, float) and not math.isfinite(age)
        return _case(w.frames(age=age), "nonfinite" if nonfinite else "type")

    @st.composite
    def out_of_range(draw):
        # Well-typed samples or age no honest neighbour of this run can claim (they weight the averages).
        if draw(BOOL):
            return _case(w.frames(kind=draw(ANY_KIND), samples=draw(st.integers(MAX_SAMPLES + 1, 2**62 - 1))),
                         "range")
        age = draw(st.floats(min_value=MAX_AGE, exclude_min=True, allow_infinity=False)
                   | st.integers(MAX_AGE + 1, 2**64 - 1))
        return _case(w.frames(kind=draw(ANY_KIND), age=age), "range")

    @st.composite
    def bad_hash(draw):
        return _case(w.frames(hash=draw(NOT_STR | TEXT.filter(lambda x: x not in HASHES))), "type")

    meta_key = st.text(min_size=1, max_size=8)

    @st.composite
    def bad_meta(draw):
        choice = draw(st.integers(0, 4))
        if choice == 0:
            return _case(w.frames(meta=draw(NOT_MAP)), "type")
        if choice == 1:
            n = draw(st.integers(MAX_META_KEYS + 1, 200))
            return _case(w.frames(meta={f"k{i}": i for i in range(n)}), "oversize")
        if choice == 2:
            return _case(w.frames(meta={draw(meta_key): "m" * draw(st.integers(MAX_META_STR + 1, 5000))}),
                         "oversize")
        if choice == 3:
            return _case(w.frames(meta={draw(meta_key): draw(NONFINITE)}), "nonfinite")
        return _case(w.frames(meta={draw(meta_key): draw(LIST | MAP)}), "type")

    bad_name = st.just("") | LONG | NOT_STR
    bad_dtype = (st.sampled_from(["float128", "complex64", "object", "<f4", ">f4", "str", "V8", "float"])
                 | TEXT.filter(lambda x: x not in DTYPES) | NOT_STR)
    bad_dim = BOOL | FLOAT | NEGATIVE | st.integers(2**40, 2**64 - 1) | TEXT | NONE
    bad_shape = (st.lists(st.integers(1, 4), min_size=MAX_NDIM + 1, max_size=MAX_NDIM + 4)
                 | st.lists(bad_dim, min_size=1, max_size=3) | NOT_LIST)
    wrong_length = NOT_LIST | st.lists(SCALAR, max_size=6).filter(lambda x: len(x) != len(w.names))

    @st.composite
    def bad_layout(draw):
        # names / dtypes / shapes that do not describe tensors: refused before any frame is looked at.
        choice = draw(st.integers(0, 8))
        if choice == 0:
            return _case(w.frames(names=draw(NOT_LIST)), "type")
        if choice == 1:
            count = draw(st.integers(MAX_TENSORS + 1, MAX_TENSORS + 500))
            return _case(w.frames(names=[f"t{i}" for i in range(count)]), "oversize")
        if choice == 2:
            names = list(w.names)
            names[draw(index)] = draw(bad_name)
            return _case(w.frames(names=names), "type")
        if choice == 3:
            return _case(w.frames(**{draw(st.sampled_from(["dtypes", "shapes"])): draw(wrong_length)}), "type")
        if choice == 4:
            dtypes = list(w.dtypes)
            dtypes[draw(index)] = draw(bad_dtype)
            return _case(w.frames(dtypes=dtypes), "type")
        if choice == 5:
            shapes = [list(s) for s in w.shapes]
            shapes[draw(index)] = draw(bad_shape)
            return _case(w.frames(shapes=shapes), "type")
        if choice == 6:  # a name twice, with consistent dtypes and shapes
            k = draw(index)
            return _case(w.frames(names=[*w.names, w.names[k]], dtypes=[*w.dtypes, w.dtypes[k]],
                                  shapes=[*w.shapes, w.shapes[k]]), "type")
        if choice == 7:  # a control message carrying tensors
            return _case(w.frames(kind=draw(st.sampled_from(sorted(CONTROL_KINDS)))), "kind")
        # Huge claimed shapes without the data: refused by size before any frame is read.
        shapes = [list(s) for s in w.shapes]
        shapes[draw(index)] = [draw(st.integers(DEFAULT_MAX_BYTES + 1, 2**40 - 1)),
                               *draw(st.lists(st.integers(1, 1000), max_size=MAX_NDIM - 1))]
        return _case(w.frames(shapes=shapes, kind=draw(TENSOR_KIND)), "oversize")

    small_shape = st.lists(st.integers(0, 48), max_size=4)  # at most 21 MB even as float64: not oversize
    other_dtype = [st.sampled_from(sorted(set(DTYPES) - {d})) for d in w.dtypes]

    @st.composite
    def wrong_template(draw):
        # Well-formed tensors that are not the local model's: other names, shapes or dtypes.
        names, dtypes, shapes = list(w.names), list(w.dtypes), [list(s) for s in w.shapes]
        k = draw(index)
        choice = draw(st.integers(0, 4))
        if choice == 0:
            names[k] = draw(other_name)
        elif choice == 1:
            del names[k], dtypes[k], shapes[k]
        elif choice == 2:
            names.append(draw(other_name))
            dtypes.append(draw(st.sampled_from(sorted(DTYPES))))
            shapes.append(draw(small_shape))
        elif choice == 3:
            shapes[k] = draw(small_shape.filter(lambda s: s != w.shapes[k]))
        else:
            dtypes[k] = draw(other_dtype[k])
        return _case(w.frames(names=names, dtypes=dtypes, shapes=shapes, kind=draw(TENSOR_KIND)), "template")

    @st.composite
    def bad_frames(draw):
        # The right header with tensor frames missing or extra ones riding along.
        frames = w.frames(kind=draw(TENSOR_KIND))
        if draw(BOOL):
            frames = frames[: draw(st.integers(1, len(frames) - 1))]
        else:
            frames = frames + draw(st.lists(st.binary(max_size=32), min_size=1, max_size=3))
        return _case(frames, "frames")

    @st.composite
    def bad_size(draw):
        # Frames shorter or longer than the header says (checksum right): the bytes are not what is declared.
        k = draw(index)
        buffers = list(w.buffers)
        how = draw(st.integers(0, 2))
        if how == 0:
            buffers[k] = buffers[k][: draw(st.integers(0, len(buffers[k]) - 1))]
        elif how == 1:
            buffers[k] = buffers[k] + draw(st.binary(min_size=1, max_size=64))
        else:  # the values as float64 under a float32 header
            buffers[k] = np.frombuffer(buffers[k], dtype=w.dtypes[k]).astype(np.float64).tobytes()
        return _case(w.frames(buffers, kind=draw(TENSOR_KIND), hash_name=draw(HASH)), "size")

    @st.composite
    def bad_checksum(draw):
        header = w.header(kind=draw(TENSOR_KIND), hash_name=draw(HASH))
        buffers = list(w.buffers)
        if draw(BOOL):
            k = draw(index)
            flipped = bytearray(buffers[k])
            flipped[draw(st.integers(0, len(flipped) - 1))] ^= draw(st.integers(1, 255))
            buffers[k] = bytes(flipped)
        else:
            header["checksum"] = draw(st.integers(0, 2**64 - 1).filter(lambda c: c != header["checksum"]))
        return _case([_pack(header), *buffers], "checksum")

    @st.composite
    def nonfinite_tensor(draw):
        k = draw(index)
        values = np.frombuffer(w.buffers[k], dtype=np.float32).copy()
        values[draw(st.integers(0, values.size - 1))] = np.uint32(draw(NONFINITE_BITS)).view(np.float32)
        buffers = list(w.buffers)
        buffers[k] = values.tobytes()
        return _case(w.frames(buffers, kind=draw(TENSOR_KIND), hash_name=draw(HASH)), "nonfinite")

    def well_formed(kind: str, sender: int, round_: int) -> list:
        return encode({} if kind in CONTROL_KINDS else w.tensors, sender=sender, round=round_,
                      samples=w.samples, kind=kind)

    @st.composite
    def impostor(draw):
        # Well-formed, but the header's sender is not the connection's identity.
        conn = draw(st.sampled_from(["1", "7", "evil"]))
        claimed = {"1": 1, "7": 7}.get(conn)
        sender = draw(st.integers(0, 2**31 - 1).filter(lambda s: s != claimed))
        return _case(well_formed(draw(ANY_KIND), sender, draw(ROUND)), "impostor", conn=conn)

    @st.composite
    def stranger(draw):
        # Well-formed and honest about its sender, which is not a neighbour (or is the peer itself).
        conn = draw(st.sampled_from(["7", "0"]))
        return _case(well_formed(draw(ANY_KIND), int(conn), draw(ROUND)), "stranger", conn=conn)

    @st.composite
    def replayed(draw):
        if draw(BOOL):  # our own honest messages of earlier rounds, byte for byte
            return _case(draw(st.sampled_from(w.replays)), "stale")
        return _case(w.frames(round=draw(st.integers(0, w.round - 1)), hash_name=draw(HASH)), "stale")

    @st.composite
    def far_ahead(draw):
        rnd = draw(st.integers(w.round + MAX_AHEAD + 1, 2**62 - 1))
        return _case(w.frames(round=rnd, hash_name=draw(HASH)), "ahead")

    @st.composite
    def unexpected(draw):
        # hello and ping are well-formed control messages the peer has no use for.
        return _case(well_formed(draw(st.sampled_from(["hello", "ping"])), 1, draw(ROUND)), "unexpected")

    return st.one_of(garbage(), truncated_header(), not_a_map(), msgpack_bomb(), deep_field(), oversize_header(),
                     huge_value, bad_version(), bad_fields(), bad_kind(), bad_int(), bad_age(), out_of_range(),
                     bad_hash(), bad_meta(), bad_layout(), wrong_template(), bad_frames(), bad_size(), bad_checksum(),
                     nonfinite_tensor(), impostor(), stranger(), replayed(), far_ahead(), unexpected())


class Neighbour:
    """The test's side of the wire: peer 1's ROUTER (what peer 0 sends to peer 1 arrives here) and one
    DEALER per identity in ``CONNS``, all connected to peer 0."""

    def __init__(self, endpoint_self: str, endpoint_peer: str) -> None:
        self.ctx = zmq.Context()
        self.inbound = self.ctx.socket(zmq.ROUTER)
        self.inbound.setsockopt(zmq.RCVHWM, 0)  # never drop a reply of the peer's because we read late
        self.inbound.setsockopt(zmq.LINGER, 0)
        self.inbound.bind(endpoint_self)
        self.conns = {}
        for name in CONNS:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, name.encode())
            sock.setsockopt(zmq.SNDTIMEO, LIMIT_S * 1000)  # a peer that stopped reading fails the test, not hangs it
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint_peer)
            self.conns[name] = sock

    def send(self, conn: str, frames) -> None:
        self.conns[conn].send_multipart(list(frames))

    def recv(self, decoder: Decoder, timeout: float) -> Message:
        if not self.inbound.poll(int(timeout * 1000)):
            raise AssertionError(f"peer 0 sent nothing for {timeout} s")
        _, *frames = self.inbound.recv_multipart()
        return decoder.decode(frames)

    def close(self) -> None:
        for sock in [self.inbound, *self.conns.values()]:
            sock.close(0)
        self.ctx.term()


class StateReader(threading.Thread):
    """Reads everything peer 0 sends while the fuzz runs: only answers to our pulls may come, each carrying
    exactly the parameters it had before the fuzz, at the round it waits in."""

    def __init__(self, neighbour: Neighbour, decoder: Decoder, expected: list[bytes], round_: int,
                 proc: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.neighbour, self.decoder, self.expected, self.round = neighbour, decoder, expected, round_
        self.proc = proc
        self.answers = 0
        self.problems: list[str] = []
        self.stop = threading.Event()
        # Set once the fuzz is over: the peer's first message that is not an answer (its next round's model,
        # sent after every pull before it was answered or dropped) is handed over and ends this reader.
        self.fuzz_over = threading.Event()
        self.handover: list | None = None
        self._answered = threading.Condition()

    def wait_answers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._answered:
            while not self._answered.wait_for(lambda: self.answers >= n, 0.5):
                assert self.proc.poll() is None, f"peer 0 exited ({self.proc.returncode}) during the fuzz"
                assert time.monotonic() < deadline, f"{self.answers} of {n} pulls answered after {timeout} s"

    def run(self) -> None:
        sock = self.neighbour.inbound
        while not self.stop.is_set():
            if not sock.poll(50):
                continue
            _, *frames = sock.recv_multipart()
            try:
                message = self.decoder.decode(frames)
            except CodecError as exc:
                message = Message(-1, -1, 0.0, 0, f"undecodable ({exc})")
            if self.fuzz_over.is_set() and (message.kind, message.round) != ("state", self.round):
                self.handover = frames
                return
            if message.kind != "state" or message.round != self.round:
                self.problems.append(f"peer 0 sent a {message.kind} of round {message.round} during the fuzz")
            elif [bytes(f) for f in frames[1:]] != self.expected:
                self.problems.append(f"answer {self.answers + 1}: parameters changed")
            with self._answered:
                self.answers += 1
                self._answered.notify_all()


def _rejections(log_text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in map(REJECTED.search, log_text.splitlines()) if m]


def _check_reasons(cases: list[Case], rejections: list[tuple[str, str]]) -> None:
    """One log line per case, in the order each connection sent them, with an expected reason."""
    patterns = {key: re.compile(p) for key, p in REASONS.items()}
    by_conn: dict[str, list[str]] = {}
    for claimed, text in rejections:
        by_conn.setdefault(claimed, []).append(text)
    for conn, claimed in CONNS.items():
        mine = [c for c in cases if c.conn == conn]
        texts = by_conn.pop(claimed, [])
        assert len(texts) == len(mine), f"connection {conn}: {len(mine)} malformed messages, {len(texts)} rejections"
        for k, (case, text) in enumerate(zip(mine, texts)):
            assert any(patterns[e].match(text) for e in case.expect), (
                f"connection {conn}, message {k}: expected a {'/'.join(sorted(case.expect))} rejection, the log "
                f"says {text!r}; {case!r}")
    assert not by_conn, f"rejections from connections the test never used: {sorted(by_conn)}"


@dataclass(repr=False)  # pytest would print ten thousand cases in an assertion's explanation
class FuzzRun:
    cases: list[Case]  # every message that must be rejected, in the order sent
    answers: int  # pulls answered during the fuzz (one after every malformed message)
    dropped: int  # sends the peer itself counted as dropped in that round (its queue to us full): answers lost
    problems: list[str]  # what was wrong with those answers
    alive_after_fuzz: bool
    pulls_after_fuzz: list[int]  # rounds at which the peer pulled us (caught up) after the fuzz
    returncode: int | None
    folder: Path
    log: str


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, synth_corpus, feature_cache) -> FuzzRun:
    tmp = tmp_path_factory.mktemp("fuzz")
    topo_path = tmp / "ring-2.toml"
    save_topology(make_topology("ring", 2, base_port=free_base_port(2)), topo_path)
    topology = load_topology(topo_path)
    run = tmp / "run"
    log_path = tmp / "peer0.log"
    neighbour = Neighbour(topology.endpoint(1), topology.endpoint(0))
    # -v: the inbox logs refusals of well-formed messages (stale, too far ahead, not a neighbour) at INFO.
    cmd = [sys.executable, "-m", "p2pser", "-v", "peer", synth_corpus, "--topology", topo_path, "--id", "0",
           "--out", run, "--cache-dir", feature_cache, *PEER_ARGS]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)
    try:
        return _fuzz_live_peer(proc, neighbour, run / "peer-000", log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        neighbour.close()


def _fuzz_live_peer(proc: subprocess.Popen, neighbour: Neighbour, folder: Path, log_path: Path) -> FuzzRun:
    def log_text() -> str:
        return log_path.read_text(errors="replace")

    def model_of_round(r: int, timeout: float) -> Message:
        model = neighbour.recv(Decoder(None), timeout)
        assert (model.kind, model.round) == ("model", r), (
            f"expected peer 0's model of round {r}, got a {model.kind} of round {model.round}\n{log_text()[-3000:]}")
        return model

    # Honest neighbour: answer each round with the peer's own model, so its parameters stay its own.
    replays = []
    for r in range(HONEST):
        model = model_of_round(r, timeout=LIMIT_S)
        reply = tuple(bytes(f) for f in encode(dict(model.tensors), sender=1, round=r, samples=model.samples))
        replays.append(reply)
        neighbour.send("1", reply)
    model = model_of_round(HONEST, timeout=LIMIT_S)
    # Peer 0 now waits in round HONEST's Gather for a model we will not send until the fuzz is over.
    decoder = Decoder({name: (a.shape, a.dtype) for name, a in model.tensors.items()})
    w = Wire(dict(model.tensors), HONEST, model.samples, replays)
    assert all(d == "float32" for d in w.dtypes)  # nonfinite_tensor writes float32 bit patterns
    pull = tuple(bytes(f) for f in encode({}, sender=1, round=HONEST, samples=0, kind="pull"))
    neighbour.send("1", pull)
    state = neighbour.recv(decoder, timeout=LIMIT_S)
    assert (state.kind, state.round) == ("state", HONEST), "the peer did not answer our pull"
    assert [a.tobytes() for a in state.tensors.values()] == w.buffers  # pulled == the model it just sent

    reader = StateReader(neighbour, decoder, w.buffers, HONEST, proc)
    reader.start()
    cases: list[Case] = []
    batch = 25  # cases per hypothesis example: the engine's per-example cost is spread over many messages

    @settings(max_examples=N_MESSAGES // batch, derandomize=True, deadline=None, phases=[Phase.generate],
              database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(malformed(w), min_size=batch, max_size=batch))
    def fire(batch_cases: list[Case]) -> None:
        for case in batch_cases:
            neighbour.send(case.conn, case.frames)
            # Pulled after every message: its parameters must not have moved. At most PULL_WINDOW answers
            # in flight: the peer drops sends beyond its queue of 16 to us rather than block, by design.
            reader.wait_answers(len(cases) - PULL_WINDOW, LIMIT_S)
            neighbour.send("1", pull)
            cases.append(case)

    t0 = time.monotonic()
    try:
        try:
            fire()
            # A message the peer took without a rejection line would leave this short: the tests say which.
            deadline = time.monotonic() + LIMIT_S
            while len(_rejections(log_text())) < len(cases) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
            seconds = time.monotonic() - t0
            # The last few answers may still be on their way; a send the peer dropped (its queue to us full)
            # never comes, and the peer counts it: the reader takes answers until the peer's next round says
            # that all are in (below).
            reader.wait_answers(len(cases) - PULL_WINDOW - 1, LIMIT_S)
        except AssertionError as exc:
            if proc.poll() is not None:  # the message that killed it is the last one sent; its traceback is here
                raise AssertionError(f"peer 0 died during the fuzz (exit {proc.returncode}):\n{log_text()[-3000:]}") \
                    from exc
            raise
    except BaseException:
        reader.stop.set()
        reader.join()
        raise
    kinds = Counter("/".join(sorted(c.expect)) for c in cases)
    print(f"fuzz: {len(cases)} malformed messages rejected in {seconds:.1f} s, {reader.answers} pulls answered; "
          f"by reason: {dict(sorted(kinds.items()))}")
    alive = proc.poll() is None

    # Now a valid model, twice: the copy is refused, and the peer goes on. We answer what it sends us as an
    # honest neighbour would (a model of each round, our state if it pulls) until it finishes.
    valid = tuple(bytes(f) for f in encode(dict(w.tensors), sender=1, round=HONEST, samples=w.samples))
    reader.fuzz_over.set()
    neighbour.send("1", valid)
    neighbour.send("1", valid)
    cases.append(_case(valid, "duplicate", "stale"))
    # The same connection carried every pull before the model that ends the peer's round, and the peer sends
    # to us in order: its next message after the answers tells that every answer it sent has arrived.
    deadline = time.monotonic() + LIMIT_S
    while reader.is_alive() and proc.poll() is None and time.monotonic() < deadline:
        reader.join(0.5)
    reader.stop.set()
    reader.join()
    pending = [reader.handover] if reader.handover is not None else []
    pulls = []
    params = dict(w.tensors)  # the peer's parameters as last sent to us
    deadline = time.monotonic() + LIMIT_S
    while alive and proc.poll() is None and time.monotonic() < deadline:
        if not pending and not neighbour.inbound.poll(200):
            continue
        frames = pending.pop() if pending else neighbour.inbound.recv_multipart()[1:]
        message = Decoder(None).decode(frames)
        if message.kind == "pull":
            pulls.append(message.round)
            neighbour.send("1", encode(params, sender=1, round=message.round, samples=w.samples, kind="state"))
        elif message.kind == "model":
            params = dict(message.tensors)
            neighbour.send("1", encode(params, sender=1, round=message.round, samples=message.samples))
    try:
        returncode = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        returncode = None
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    # The fuzz's round, where answers were the peer's only sends (a peer that died has no row: other tests say so)
    dropped = rows[HONEST]["dropped"] - rows[HONEST - 1]["dropped"] if len(rows) > HONEST else 0
    return FuzzRun(cases, reader.answers, dropped, reader.problems, alive, pulls, returncode, folder, log_text())


def test_ten_thousand_malformed_messages_are_each_rejected_with_their_reason(fuzzed):
    assert len(fuzzed.cases) > N_MESSAGES
    assert "Traceback" not in fuzzed.log
    rejections = _rejections(fuzzed.log)
    too_long = [text[:200] for _, text in rejections if len(text) > MAX_LOG_LINE]
    assert not too_long, too_long[:3]
    _check_reasons(fuzzed.cases, rejections)


def test_parameters_are_bit_identical_after_every_rejected_message(fuzzed):
    assert not fuzzed.problems, fuzzed.problems[:5]
    # Every malformed message but the final duplicate was followed by a pull: each one answered, or dropped
    # by the peer's full queue to us and counted (by design it drops rather than blocks; rare, a few at most).
    assert fuzzed.answers + fuzzed.dropped == len(fuzzed.cases) - 1, (fuzzed.answers, fuzzed.dropped)
    assert fuzzed.dropped <= 5, f"{fuzzed.dropped} answers dropped"


def test_the_peer_survives_and_finishes_its_rounds(fuzzed):
    assert fuzzed.alive_after_fuzz, fuzzed.log[-3000:]
    assert fuzzed.returncode == 0, fuzzed.log[-3000:]
    assert json.loads((fuzzed.folder / "status.json").read_text())["state"] == "done"
    rows = [json.loads(line) for line in (fuzzed.folder / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == ROUNDS - 1 and rows[-1]["rejected"] == len(fuzzed.cases)
    with np.load(fuzzed.folder / "model.npz") as z:
        assert len(z.files) == 2 and all(np.isfinite(z[k]).all() for k in z.files)


def test_rejected_messages_do_not_make_the_peer_catch_up(fuzzed):
    # Catching up replaces the peer's parameters with its neighbours' (its own get no weight) and moves it to
    # their round: a refused message must not be able to trigger that.
    assert not fuzzed.pulls_after_fuzz, (
        f"after the fuzz peer 0 pulled its neighbours at round(s) {fuzzed.pulls_after_fuzz} to catch up: a "
        f"model refused as too far ahead still counted as a neighbour's round")
