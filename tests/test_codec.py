"""Wire codec: round trips, zero-copy, and a rejection (never a crash, never pickle) for every bad message."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pser.exchange import codec
from p2pser.exchange.codec import CodecError, Decoder, Message, encode, template_of


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "fc.weight": rng.standard_normal((4, 32)).astype(np.float32),
        "bn.num_batches": np.array(7, dtype=np.int64),
    }


STATE = model()
DECODER = Decoder(template_of(STATE))


def frames_of(**kw: object) -> list:
    args = {"sender": 3, "round": 12, "samples": 240, "age": 1.5, "meta": {"loss": 0.25, "phase": "train"}}
    args.update(kw)
    return encode(STATE, **args)


def header_of(frames: list) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def with_header(frames: list, **changes: object) -> list:
    header = header_of(frames)
    for key, value in changes.items():
        if value is ...:
            del header[key]
        else:
            header[key] = value
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def reason(frames: list, decoder: Decoder = DECODER) -> str:
    with pytest.raises(CodecError) as err:
        decoder.decode(frames)
    assert err.value.reason in codec.REASONS
    return err.value.reason


def test_round_trip_keeps_everything() -> None:
    msg = DECODER.decode(frames_of())
    assert isinstance(msg, Message)
    assert (msg.sender, msg.round, msg.samples, msg.age, msg.kind) == (3, 12, 240, 1.5, "model")
    assert msg.meta == {"loss": 0.25, "phase": "train"}
    assert list(msg.tensors) == list(STATE)
    for name, arr in STATE.items():
        assert msg.tensors[name].dtype == arr.dtype and msg.tensors[name].shape == arr.shape
        np.testing.assert_array_equal(msg.tensors[name], arr)
    frames = frames_of()
    assert msg.nbytes == sum(memoryview(f).nbytes for f in frames)


def test_frames_and_decoded_arrays_are_views_not_copies() -> None:
    frames = frames_of()
    for frame, arr in zip(frames[1:], STATE.values()):
        assert isinstance(frame, memoryview)
        assert np.shares_memory(np.frombuffer(frame, dtype=np.uint8), arr)
    msg = DECODER.decode(frames)
    for name, arr in STATE.items():
        assert np.shares_memory(msg.tensors[name], arr)
        assert not msg.tensors[name].flags.writeable


def test_received_bytes_frames_decode_without_copy() -> None:
    frames = [bytes(f) for f in frames_of()]
    msg = DECODER.decode(frames)
    view = np.frombuffer(frames[1], dtype=np.uint8)
    assert np.shares_memory(msg.tensors["conv.weight"], view)


def test_non_contiguous_and_big_endian_arrays_are_sent_correctly() -> None:
    state = {"t": np.arange(12, dtype=np.float32).reshape(3, 4).T, "b": np.arange(3, dtype=">f8")}
    msg = Decoder(None).decode(encode(state, sender=0, round=0, samples=1))
    np.testing.assert_array_equal(msg.tensors["t"], state["t"])
    np.testing.assert_array_equal(msg.tensors["b"], state["b"])
    assert msg.tensors["b"].dtype == np.dtype("<f8")


@pytest.mark.parametrize("kind", ["hello", "ping", "pull"])
def test_control_messages_carry_no_tensors(kind: str) -> None:
    msg = DECODER.decode(encode({}, sender=1, round=4, samples=0, kind=kind, meta={"port": 9000}))
    assert (msg.kind, msg.tensors, msg.meta) == (kind, {}, {"port": 9000})
    with pytest.raises(ValueError, match="carry no tensors"):
        encode(STATE, sender=1, round=4, samples=0, kind=kind)
    forged = with_header(frames_of(), kind=kind)
    assert reason(forged) == "kind"


def test_encode_refuses_what_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        encode({"x": np.array([object()])}, sender=0, round=0, samples=0)
    with pytest.raises(ValueError, match="unknown message kind"):
        encode({}, sender=0, round=0, samples=0, kind="exec")
    with pytest.raises(ValueError, match="bad meta"):
        encode({}, sender=0, round=0, samples=0, kind="ping", meta={"nested": {"a": 1}})


def test_every_available_checksum_decodes_and_catches_a_flipped_byte() -> None:
    for name, fn in codec.HASHES.items():
        frames = frames_of()
        buffers = [bytes(f) for f in frames[1:]]
        frames = with_header(frames, hash=name, checksum=fn(buffers))
        assert DECODER.decode(frames).round == 12
        corrupt = bytearray(frames[2])
        corrupt[0] ^= 0x01
        assert reason([frames[0], frames[1], bytes(corrupt), *frames[3:]]) == "checksum"


def nan_frames() -> list:
    bad = dict(STATE)
    bad["fc.weight"] = STATE["fc.weight"].copy()
    bad["fc.weight"][1, 2] = np.nan
    return encode(bad, sender=3, round=1, samples=1)


def inf_frames() -> list:
    bad = {"w": np.array([1.0, np.inf], dtype=np.float16)}
    return encode(bad, sender=3, round=1, samples=1)


REJECTIONS = {
    "not msgpack": (lambda: [b"\xc1", *frames_of()[1:]], "header"),
    "trailing bytes": (lambda: [bytes(frames_of()[0]) + b"\x00", *frames_of()[1:]], "header"),
    "header a list": (lambda: [msgpack.packb([1, 2]), *frames_of()[1:]], "header"),
    "no frames": (list, "frames"),
    "no version": (lambda: with_header(frames_of(), v=...), "fields"),
    "version 2": (lambda: with_header(frames_of(), v=2), "version"),
    "version True": (lambda: with_header(frames_of(), v=True), "version"),
    "missing round": (lambda: with_header(frames_of(), round=...), "fields"),
    "extra field": (lambda: with_header(frames_of(), code="import os"), "fields"),
    "unknown kind": (lambda: with_header(frames_of(), kind="exec"), "kind"),
    "sender str": (lambda: with_header(frames_of(), sender="3"), "type"),
    "sender bool": (lambda: with_header(frames_of(), sender=True), "type"),
    "negative round": (lambda: with_header(frames_of(), round=-1), "type"),
    "samples float": (lambda: with_header(frames_of(), samples=2.0), "type"),
    "age str": (lambda: with_header(frames_of(), age="old"), "type"),
    "age negative": (lambda: with_header(frames_of(), age=-1.0), "type"),
    "age inf": (lambda: with_header(frames_of(), age=math.inf), "nonfinite"),
    "samples absurd": (lambda: with_header(frames_of(), samples=codec.MAX_SAMPLES + 1), "range"),
    "age absurd": (lambda: with_header(frames_of(), age=codec.MAX_AGE * 10), "range"),
    "names not list": (lambda: with_header(frames_of(), names="conv.weight"), "type"),
    "names repeat": (lambda: with_header(frames_of(), names=["conv.weight"] * 4), "type"),
    "dtypes short": (lambda: with_header(frames_of(), dtypes=["float32"]), "type"),
    "dtype object": (lambda: with_header(frames_of(), dtypes=["object", "float32", "float32", "int64"]), "type"),
    "shape negative": (lambda: with_header(frames_of(), shapes=[[-8, 1, 3, 3], [8], [4, 32], []]), "type"),
    "shape str": (lambda: with_header(frames_of(), shapes=["8x9", [8], [4, 32], []]), "type"),
    "checksum str": (lambda: with_header(frames_of(), checksum="abc"), "type"),
    "unknown hash": (lambda: with_header(frames_of(), hash="md5"), "type"),
    "meta not map": (lambda: with_header(frames_of(), meta=[1]), "type"),
    "meta nested": (lambda: with_header(frames_of(), meta={"a": {"b": 1}}), "type"),
    "meta nan": (lambda: with_header(frames_of(), meta={"loss": math.nan}), "nonfinite"),
    "meta too big": (lambda: with_header(frames_of(), meta={f"k{i}": i for i in range(100)}), "oversize"),
    "bin in header": (lambda: with_header(frames_of(), meta={"blob": b"\x80\x04"}), "header"),
    "template names": (lambda: encode({**STATE, "extra": np.zeros(2, np.float32)}, sender=1, round=0,
                                      samples=1), "template"),
    "template missing": (lambda: encode({"conv.bias": STATE["conv.bias"]}, sender=1, round=0, samples=1),
                         "template"),
    "template shape": (lambda: encode({**STATE, "conv.bias": np.zeros(9, np.float32)}, sender=1, round=0,
                                      samples=1), "template"),
    "template dtype": (lambda: encode({**STATE, "conv.bias": np.zeros(8, np.float64)}, sender=1, round=0,
                                      samples=1), "template"),
    "frame missing": (lambda: frames_of()[:-1], "frames"),
    "frame extra": (lambda: [*frames_of(), b"more"], "frames"),
    "buffer short": (lambda: [*frames_of()[:2], bytes(frames_of()[2])[:-4], *frames_of()[3:]], "size"),
    "buffer swapped": (lambda: [frames_of()[0], frames_of()[2], frames_of()[1], *frames_of()[3:]], "size"),
    "byte flipped": (lambda: [*frames_of()[:3], bytes(frames_of()[3])[:-1] + b"\x00", *frames_of()[4:]],
                     "checksum"),
    "nan": (nan_frames, "nonfinite"),
    "inf float16": (inf_frames, "nonfinite"),
    "header oversize": (lambda: [b"\x00" * (codec.MAX_HEADER_BYTES + 1)], "oversize"),
    "content refused by the learner's check": (frames_of, "content"),
}


def _refuse(tensors) -> None:
    raise ValueError("these numbers are not an ensemble")


CONTENT_DECODER = Decoder(template_of(STATE), checks={"model": _refuse})


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejections(case: str) -> None:
    make, expected = REJECTIONS[case]
    decoder = {"inf float16": Decoder(None), "content refused by the learner's check": CONTENT_DECODER}.get(case, DECODER)
    assert reason(make(), decoder) == expected


def test_samples_and_age_are_bounded_by_what_the_run_allows() -> None:
    """A peer's decoder refuses claims no honest neighbour of its run can make: they would weight fedavg's
    (samples) and gossip's (age) averages towards the liar."""
    decoder = Decoder(template_of(STATE), max_samples=240, max_age=96.0)
    msg = decoder.decode(encode(STATE, sender=3, round=12, samples=240, age=96.0))
    assert (msg.samples, msg.age) == (240, 96.0)  # the limits themselves are honest values
    with pytest.raises(CodecError, match="samples 241 is more than 240") as exc:
        decoder.decode(encode(STATE, sender=3, round=12, samples=241))
    assert exc.value.reason == "range"
    with pytest.raises(CodecError, match="age 96.5 is more than 96 local steps") as exc:
        decoder.decode(encode(STATE, sender=3, round=12, samples=1, age=96.5))
    assert exc.value.reason == "range"
    # A run's limits can only tighten the absolute ones.
    assert Decoder(None, max_samples=10**12, max_age=1e20).max_samples == codec.MAX_SAMPLES


def test_a_template_dimension_of_none_accepts_any_size_and_nothing_else() -> None:
    decoder = Decoder({"blob": ((None,), np.dtype(np.uint8)), "index": ((None, 4), np.dtype(np.int64))})
    for n in (0, 7):
        state = {"blob": np.zeros(n, np.uint8), "index": np.zeros((n, 4), np.int64)}
        assert decoder.decode(encode(state, sender=1, round=0, samples=1)).tensors["blob"].shape == (n,)
    wrong = {"blob": np.zeros(3, np.uint8), "index": np.zeros((3, 5), np.int64)}
    assert reason(encode(wrong, sender=1, round=0, samples=1), decoder) == "template"
    flat = {"blob": np.zeros((3, 1), np.uint8), "index": np.zeros((3, 4), np.int64)}
    assert reason(encode(flat, sender=1, round=0, samples=1), decoder) == "template"


def test_every_reason_has_a_case() -> None:
    assert {expected for _, expected in REJECTIONS.values()} == set(codec.REASONS)


def test_size_limits() -> None:
    assert reason(frames_of(), Decoder(template_of(STATE), max_bytes=100)) == "oversize"
    many = {f"t{i}": np.zeros(1, np.float32) for i in range(codec.MAX_TENSORS + 1)}
    with pytest.raises(ValueError, match="at most"):
        encode(many, sender=0, round=0, samples=0)
    frames = encode({"t": np.zeros(1, np.float32)}, sender=0, round=0, samples=0)
    header = header_of(frames)
    count = codec.MAX_TENSORS + 1
    header.update(names=[f"t{i}" for i in range(count)], dtypes=["float32"] * count, shapes=[[1]] * count)
    assert reason([msgpack.packb(header), *[b"\0" * 4] * count], Decoder(None)) == "oversize"
    huge = with_header(frames, shapes=[[1 << 39]])
    assert reason(huge, Decoder(None)) == "oversize"


def test_template_none_accepts_any_layout_within_limits() -> None:
    msg = Decoder(None).decode(encode({"anything": np.ones((2, 2), np.float64)}, sender=0, round=0, samples=0))
    assert msg.tensors["anything"].shape == (2, 2)


def test_template_of_records_shapes_and_dtypes() -> None:
    assert template_of(STATE)["conv.weight"] == ((8, 1, 3, 3), np.dtype(np.float32))
    assert template_of(STATE)["bn.num_batches"] == ((), np.dtype(np.int64))


GOOD = [bytes(f) for f in frames_of()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=6))
def test_random_frames_are_rejected_cleanly(frames: list[bytes]) -> None:
    try:
        DECODER.decode(frames)
    except CodecError as exc:
        assert exc.reason in codec.REASONS


# msgpack strings are UTF-8: no lone surrogates.
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | texts | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(codec.HEADER_FIELDS) + ["extra"]), msgpack_values)
def test_any_header_field_change_is_rejected_or_harmless(key: str, value: object) -> None:
    frames = with_header(GOOD, **{key: value})
    try:
        msg = DECODER.decode(frames)
    except CodecError:
        return
    # Accepted only if the change kept the message valid: the tensors are still exactly the model's.
    assert key in {"sender", "round", "samples", "age", "meta", "kind"} or header_of(GOOD)[key] == value
    for name, arr in STATE.items():
        np.testing.assert_array_equal(msg.tensors[name], arr)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(GOOD[0]) - 1), st.integers(1, 255))
def test_flipped_header_bytes_are_rejected_or_harmless(pos: int, xor: int) -> None:
    header = bytearray(GOOD[0])
    header[pos] ^= xor
    try:
        msg = DECODER.decode([bytes(header), *GOOD[1:]])
    except CodecError:
        return
    for name, arr in STATE.items():
        np.testing.assert_array_equal(msg.tensors[name], arr)
