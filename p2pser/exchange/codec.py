"""Wire messages: a msgpack header frame followed by one raw buffer frame per tensor. Never pickle.

Frame 0 is a msgpack map::

    {v, kind, sender, round, age, samples, names, dtypes, shapes, hash, checksum, meta}

and frames 1..K are the C-contiguous little-endian bytes of tensor ``names[k-1]``. Metadata and tensor bytes
are kept apart (as hivemind and Flower do) so that tensors cross the wire without being copied into a
serializer: ``encode`` returns memoryviews of the caller's arrays and ``Decoder.decode`` returns read-only
numpy views of the received frames.

The receiver trusts nothing: ``Decoder`` checks every field, the frame count and sizes, the checksum, that
values are finite and, for model messages, that names/shapes/dtypes equal the local model's. Anything wrong
raises ``CodecError`` whose ``reason`` is a short code a peer can count and log.
"""

from __future__ import annotations

import math
import reprlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

try:
    import xxhash
except ImportError:  # optional speed-up; see HASHES
    xxhash = None

VERSION = 1
# "model": a peer's parameters for one round of mixing; "state": its current parameters, sent only to answer a
# "pull" from a neighbour that restarted and wants to catch up at once.
TENSOR_KINDS = frozenset({"model", "state", "stats"})  # stats: normalisation statistics agreed before training
CONTROL_KINDS = frozenset({"hello", "ping", "pull"})
KINDS = TENSOR_KINDS | CONTROL_KINDS
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_NAME_LEN = 256
MAX_NDIM = 8
MAX_META_KEYS = 32
MAX_META_STR = 1024
DEFAULT_MAX_BYTES = 64 << 20
# A message's ``samples`` weights fedavg's average and its ``age`` weights gossip's, so an absurd value would
# let one neighbour outweigh all the others. These are the limits that hold for any run: more training
# utterances than any speech corpus holds by orders of magnitude, and more local steps than any schedule
# takes. A peer tightens both to what its own run allows (``Peer.decoder``).
MAX_SAMPLES = 10**9
MAX_AGE = 1e12
# Wire names of the dtypes we accept; always little-endian, never object (object arrays would need pickle).
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
}
HEADER_FIELDS = frozenset(
    {"v", "kind", "sender", "round", "age", "samples", "names", "dtypes", "shapes", "hash", "checksum", "meta"}
)

# CodecError.reason values.
REASONS = ("header", "version", "kind", "fields", "type", "range", "template", "frames", "size", "checksum",
           "nonfinite", "oversize", "content")
# A template's shape may hold None for a dimension of any size (bounded by max_bytes): an ensemble of trees
# has no fixed size, so its bytes travel as a uint8 vector whose length varies.
Template = Mapping[str, tuple[tuple[int | None, ...], np.dtype]]
# A learner's check of what a tensor message carries beyond names, shapes and dtypes (e.g. that bytes are a
# well-formed tree ensemble); it raises ValueError with the reason, and the message is refused as "content".
ContentCheck = Callable[[Mapping[str, np.ndarray]], None]


class CodecError(Exception):
    """A received message was rejected; ``reason`` is one of ``REASONS``, the text says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Message:
    sender: int
    round: int
    age: float
    samples: int
    kind: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


def template_of(state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names, shapes and dtypes a model message must carry, from a state dict of arrays (or CPU tensors)."""
    out = {}
    for name, value in state.items():
        arr = np.asarray(value)
        out[name] = (tuple(int(d) for d in arr.shape), arr.dtype)
    return out


def _crc32(buffers: Sequence[Any]) -> int:
    crc = 0
    for buf in buffers:
        crc = zlib.crc32(buf, crc)
    return crc


def _xxh3_64(buffers: Sequence[Any]) -> int:
    h = xxhash.xxh3_64()
    for buf in buffers:
        h.update(buf)
    return h.intdigest()


# Checksum algorithms by wire name. xxh3 is ~10x faster than crc32 (0.3 vs 3 ms per 4 MB), which is the
# difference between the codec costing a third of loopback throughput or under a tenth; crc32 (stdlib) is
# the fallback when the xxhash package is missing, and every receiver can check either.
HASHES: dict[str, Callable[[Sequence[Any]], int]] = {"crc32": _crc32}
if xxhash is not None:
    HASHES["xxh3_64"] = _xxh3_64
DEFAULT_HASH = "xxh3_64" if xxhash is not None else "crc32"


def _wire_dtype(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype} cannot be sent; use one of {', '.join(DTYPES)}")
    return name


# Received values are quoted in rejection reasons through this: a hostile header may hold a megabyte string
# or lists nested a thousand deep, whose plain repr() floods the log or raises RecursionError.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 3, 60, 60, 40


def _show(value: Any) -> str:
    """A short, safe repr of a received value for a rejection reason."""
    return _QUOTE.repr(value)


def _check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise CodecError("type", "meta must be a map")
    if len(meta) > MAX_META_KEYS:
        raise CodecError("oversize", f"meta has {len(meta)} keys, at most {MAX_META_KEYS}")
    for key, value in meta.items():
        if not isinstance(key, str) or len(key) > MAX_NAME_LEN:
            raise CodecError("type", f"meta key {_show(key)} must be a short string")
        if isinstance(value, str):
            if len(value) > MAX_META_STR:
                raise CodecError("oversize", f"meta[{key!r}] is longer than {MAX_META_STR} characters")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise CodecError("nonfinite", f"meta[{key!r}] is {value}")
        elif value is not None and not isinstance(value, (bool, int)):
            raise CodecError("type", f"meta[{key!r}] must be a scalar (str, int, float, bool, None)")
    return meta


def encode(
    tensors: Mapping[str, np.ndarray],
    *,
    sender: int,
    round: int,
    samples: int,
    kind: str = "model",
    age: float = 0.0,
    meta: dict | None = None,
) -> list[bytes | memoryview]:
    """Frames of one message: msgpack header, then one buffer per tensor in ``tensors`` order.

    Tensor frames are memoryviews of the arrays themselves (contiguous little-endian arrays are not copied),
    so the caller must not change the arrays until the transport has sent them: encode a snapshot (e.g.
    ``{k: v.detach().numpy().copy()}`` of a model that keeps training). A torn buffer would be rejected by
    the receiver's checksum, not silently averaged.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    if kind in CONTROL_KINDS and tensors:
        raise ValueError(f"{kind} messages carry no tensors")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"{len(tensors)} tensors; a message carries at most {MAX_TENSORS}")
    names, dtypes, shapes, buffers = [], [], [], []
    for name, value in tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise ValueError(f"tensor name {name!r} must be a non-empty string of at most {MAX_NAME_LEN}")
        arr = np.asarray(value)
        wire = _wire_dtype(arr.dtype)
        if arr.ndim > MAX_NDIM:
            raise ValueError(f"tensor {name!r} has {arr.ndim} dimensions; at most {MAX_NDIM}")
        names.append(name)
        dtypes.append(wire)
        shapes.append(list(arr.shape))
        # Copies only non-contiguous or big-endian arrays (and turns 0-d into 1-d, hence the shape above).
        arr = np.ascontiguousarray(arr, dtype=DTYPES[wire])
        buffers.append(memoryview(arr.reshape(-1).view(np.uint8)))
    meta = dict(meta or {})
    try:
        _check_meta(meta)
    except CodecError as exc:
        raise ValueError(f"bad meta: {exc}") from None
    header = {
        "v": VERSION,
        "kind": kind,
        "sender": int(sender),
        "round": int(round),
        "age": float(age),
        "samples": int(samples),
        "names": names,
        "dtypes": dtypes,
        "shapes": shapes,
        "hash": DEFAULT_HASH,
        "checksum": HASHES[DEFAULT_HASH](buffers),
        "meta": meta,
    }
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def _buffer(frame: Any) -> memoryview:
    # zmq.Frame exposes its message memory as .buffer (zero-copy); bytes and memoryviews are used as they are.
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    try:
        view = memoryview(buf)
    except TypeError:
        raise CodecError("frames", f"frame of type {type(frame).__name__} is not a buffer") from None
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonneg_int(header: dict, key: str, limit: int = 1 << 62) -> int:
    value = header[key]
    if not _is_int(value) or not 0 <= value < limit:
        raise CodecError("type", f"{key} must be a non-negative integer, got {_show(value)}")
    return value


def _str_list(header: dict, key: str, count: int) -> list[str]:
    value = header[key]
    if not isinstance(value, list) or len(value) != count:
        raise CodecError("type", f"{key} must be a list of {count} strings")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= MAX_NAME_LEN:
            raise CodecError("type", f"{key} holds {_show(item)}, not a short string")
    return value


class Decoder:
    """Validates and decodes received frames into a ``Message``.

    ``template`` (see ``template_of``) is what tensor messages must carry exactly: the same tensor names,
    shapes and dtypes as the local model. ``None`` accepts any model layout within the limits (for tools).
    ``templates`` overrides it per message kind (an algorithm that sends more than the model with each
    ``model`` message, while ``state`` answers carry the model alone). ``max_bytes`` bounds the tensor bytes
    of one message; ``max_samples`` and ``max_age`` the ``samples`` and ``age`` a sender may claim (a larger
    claim is refused with reason "range"). ``checks`` (per message kind) look at the decoded tensors last,
    once everything else holds; what they refuse has reason "content".
    """

    def __init__(self, template: Template | None, *, templates: Mapping[str, Template] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_samples: int = MAX_SAMPLES,
                 max_age: float = MAX_AGE, checks: Mapping[str, ContentCheck] | None = None) -> None:
        def normal(t: Template) -> dict[str, tuple[tuple[int | None, ...], np.dtype]]:
            return {name: (tuple(None if d is None else int(d) for d in shape), np.dtype(dtype))
                    for name, (shape, dtype) in t.items()}

        self.template = None if template is None else normal(template)
        self.templates = {kind: normal(t) for kind, t in (templates or {}).items()}
        self.max_bytes = max_bytes
        self.max_samples = min(max_samples, MAX_SAMPLES)
        self.max_age = min(max_age, MAX_AGE)
        self.checks = dict(checks or {})

    def _header(self, frame: Any) -> dict[str, Any]:
        raw = _buffer(frame)
        if raw.nbytes > MAX_HEADER_BYTES:
            raise CodecError("oversize", f"header is {raw.nbytes} bytes, at most {MAX_HEADER_BYTES}")
        try:
            header = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True,
                                     max_bin_len=0, max_ext_len=0)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise CodecError("header", f"frame 0 is not msgpack ({type(exc).__name__})") from None
        if not isinstance(header, dict):
            raise CodecError("header", f"frame 0 is a msgpack {type(header).__name__}, not a map")
        if "v" not in header:
            raise CodecError("fields", "header has no version field 'v'")
        if header["v"] != VERSION or not _is_int(header["v"]):
            raise CodecError("version", f"wire version {_show(header['v'])}; this peer speaks version {VERSION}")
        missing = HEADER_FIELDS - header.keys()
        extra = header.keys() - HEADER_FIELDS
        if missing or extra:
            raise CodecError("fields", f"missing {sorted(missing)}, unexpected {_show(sorted(extra))}")
        if not isinstance(header["kind"], str) or header["kind"] not in KINDS:
            raise CodecError("kind", f"unknown message kind {_show(header['kind'])}")
        return header

    def decode(self, frames: Sequence[Any]) -> Message:
        """Check everything, then return the message; tensors are read-only views of ``frames``."""
        if len(frames) < 1:
            raise CodecError("frames", "no frames")
        header = self._header(frames[0])
        kind = header["kind"]
        sender = _nonneg_int(header, "sender", 1 << 31)
        rnd = _nonneg_int(header, "round")
        samples = _nonneg_int(header, "samples")
        checksum = _nonneg_int(header, "checksum", 1 << 64)
        hash_name = header["hash"]
        if hash_name == "xxh3_64" and "xxh3_64" not in HASHES:
            raise CodecError("checksum", "sender used xxh3_64 but the xxhash package is not installed here")
        if not isinstance(hash_name, str) or hash_name not in HASHES:
            raise CodecError("type", f"unknown checksum algorithm {_show(hash_name)}; known: {', '.join(HASHES)}")
        age = header["age"]
        if not isinstance(age, (int, float)) or isinstance(age, bool):
            raise CodecError("type", f"age must be a number, got {_show(age)}")
        if not math.isfinite(age) or age < 0:
            raise CodecError("nonfinite" if not math.isfinite(age) else "type", f"age is {age}")
        if samples > self.max_samples:
            raise CodecError("range", f"samples {samples} is more than {self.max_samples}, the most in this run")
        if age > self.max_age:
            raise CodecError("range", f"age {_show(age)} is more than {self.max_age:g} local steps, the most in "
                                      "this run")
        meta = _check_meta(header["meta"])
        if not isinstance(header["names"], list):
            raise CodecError("type", "names must be a list")
        count = len(header["names"])
        if count > MAX_TENSORS:
            raise CodecError("oversize", f"{count} tensors, at most {MAX_TENSORS}")
        names = _str_list(header, "names", count)
        dtype_names = _str_list(header, "dtypes", count)
        shapes = self._shapes(header["shapes"], count)
        if len(set(names)) != count:
            raise CodecError("type", "tensor names repeat")
        unknown = [d for d in dtype_names if d not in DTYPES]
        if unknown:
            raise CodecError("type", f"dtype {unknown[0]!r} is not accepted; accepted: {', '.join(DTYPES)}")
        if kind in CONTROL_KINDS and count:
            raise CodecError("kind", f"{kind} messages carry no tensors, this one has {count}")
        dtypes = [DTYPES[d] for d in dtype_names]
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes)]
        if sum(sizes) > self.max_bytes:
            raise CodecError("oversize", f"{sum(sizes)} tensor bytes, at most {self.max_bytes}")
        template = self.templates.get(kind, self.template)
        if kind in TENSOR_KINDS and template is not None:
            self._match_template(template, names, shapes, dtypes)
        if len(frames) != 1 + count:
            raise CodecError("frames", f"{len(frames)} frames for {count} tensors; expected {1 + count}")
        buffers = [_buffer(f) for f in frames[1:]]
        for name, buf, size in zip(names, buffers, sizes):
            if buf.nbytes != size:
                raise CodecError("size", f"tensor {name!r} frame is {buf.nbytes} bytes, header says {size}")
        if HASHES[hash_name](buffers) != checksum:
            raise CodecError("checksum", "tensor bytes do not match the header checksum")
        tensors = {}
        for name, buf, dtype, shape in zip(names, buffers, dtypes, shapes):
            arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
            if dtype.kind == "f" and not np.isfinite(arr).all():
                raise CodecError("nonfinite", f"tensor {name!r} holds NaN or Inf")
            arr.flags.writeable = False
            tensors[name] = arr
        if kind in self.checks:
            try:
                self.checks[kind](tensors)
            except ValueError as exc:
                raise CodecError("content", str(exc)[:MAX_META_STR]) from None
        nbytes = _buffer(frames[0]).nbytes + sum(sizes)
        return Message(sender=sender, round=rnd, age=float(age), samples=samples, kind=kind,
                       tensors=tensors, meta=meta, nbytes=nbytes)

    @staticmethod
    def _shapes(value: Any, count: int) -> list[tuple[int, ...]]:
        if not isinstance(value, list) or len(value) != count:
            raise CodecError("type", f"shapes must be a list of {count} lists of sizes")
        shapes = []
        for shape in value:
            if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                    or not all(_is_int(d) and 0 <= d < (1 << 40) for d in shape)):
                raise CodecError("type", f"shape {_show(shape)} is not a list of at most {MAX_NDIM} sizes")
            shapes.append(tuple(shape))
        return shapes

    @staticmethod
    def _match_template(template: dict, names: list[str], shapes: list[tuple[int, ...]],
                        dtypes: list[np.dtype]) -> None:
        if set(names) != template.keys():
            missing = sorted(template.keys() - set(names))[:3]
            extra = sorted(set(names) - template.keys())[:3]
            raise CodecError("template", f"tensor names differ from the local model: missing {missing}, "
                                         f"unexpected {extra}")
        for name, shape, dtype in zip(names, shapes, dtypes):
            want_shape, want_dtype = template[name]
            fits = len(shape) == len(want_shape) and all(w is None or d == w for d, w in zip(shape, want_shape))
            if not fits or dtype != want_dtype:
                raise CodecError("template", f"tensor {name!r} is {dtype.name}{list(shape)}, the local model "
                                             f"has {want_dtype.name}{['any' if w is None else w for w in want_shape]}")
