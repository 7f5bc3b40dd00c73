"""From the bytes of an audio file to a clean waveform, or to the one-line reason it cannot give one.

Per file: read it safely (regular files of bounded size only), decode block by block (any libsndfile
format, whatever the file's suffix says), mix down to mono, remove any DC offset, resample, reject empty,
silent, too-short or too-long audio, trim leading/trailing silence and normalise the level. Every refusal
is an ``Unusable`` whose message is the reason shown to the user; the feature extractor caches it so that
a warm run does not retry the file.
"""

from __future__ import annotations

import io
import math
import os
import stat

import numpy as np

NORMALIZATIONS = ("rms", "peak", "none")

_RMS_TARGET_DBFS = -20.0
# Below -80 dBFS peak there is no speech to hear (RAVDESS's quietest takes still peak near -34 dBFS).
_SILENT_PEAK = 1e-4
# Corpus files are utterances of seconds (IEMOCAP's longest is ~35 s): a file of many minutes is a session
# that needs cutting, and decoding it whole could exhaust a peer's memory. Together the limits keep one
# worker under a GB (file bytes + mono samples); beyond them a file is skipped with its reason.
_MAX_SECONDS = 300.0
_MAX_FILE_BYTES = 512 * 2**20
_MIN_RATE = 4000  # Hz: below this no speech band survives (and it is the lowest FeatureSpec rate)
# Frames per read: a decoding error loses about a block of what decoded before it, and libsndfile's cost
# per call makes smaller blocks dear (1024 frames take 5x the CPU of one whole-file read of a FLAC).
_DECODE_BLOCK = 4096


class Unusable(Exception):
    """The file's content cannot give features; the message is the reason shown to the user."""


def read_file(path: str) -> bytes:
    """The bytes of a regular file of at most _MAX_FILE_BYTES; Unusable (or OSError) otherwise."""
    # O_NONBLOCK: opening a FIFO named like an audio file would otherwise wait forever for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe, socket or device"
            raise Unusable(f"not a regular file ({kind})")
        if st.st_size > _MAX_FILE_BYTES:
            size, limit = st.st_size / 2**20, _MAX_FILE_BYTES // 2**20
            raise Unusable(f"too large for one utterance ({size:.0f} MB, limit {limit} MB); cut it into "
                           "utterances")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def load_audio(
    data: bytes, *, sample_rate: int, trim_db: float | None, trim_block: int, min_samples: int, normalize: str
) -> tuple[np.ndarray, float, str | None]:
    """Decoded, mono, resampled, trimmed and level-normalised waveform, the decoded duration, and the
    damage found when only a leading part of the file decodes (else None).

    ``trim_block`` is the block (in samples) silence is trimmed by; fewer than ``min_samples`` samples of
    sound left after trimming is Unusable as too short. ``normalize`` is one of NORMALIZATIONS: "rms" (to
    -20 dBFS), "peak" (to full scale) or "none".
    """
    import librosa

    y, rate, channels, damage = _decode(data)
    # The reasons below name the damage too: "too short" alone would puzzle the owner of a 3 s file.
    suffix = f"; {damage}" if damage else ""
    if not np.isfinite(y).all():
        raise Unusable("audio contains NaN or infinite samples" + suffix)
    seconds = len(y) / rate
    # A constant offset (a cheap microphone, a badly converted file) carries no sound, yet it would count as
    # level in the silence check, trimming and normalisation.
    offset = float(y.mean(dtype=np.float64))
    y = y - np.float32(offset)
    if rate != sample_rate:
        y = librosa.resample(y, orig_sr=rate, target_sr=sample_rate)
    peak = float(np.abs(y).max())
    if peak < _SILENT_PEAK:
        level = 20 * math.log10(peak) if peak > 0 else -math.inf
        how = [f"after removing a DC offset of {offset:+.3f}"] if abs(offset) >= _SILENT_PEAK else []
        how += [f"after mixing {channels} channels to mono"] if channels > 1 else []
        raise Unusable(f"silent (peak {level:.0f} dBFS{' ' if how else ''}{' and '.join(how)})" + suffix)
    if trim_db is not None:
        y = _trim(y, trim_db, trim_block)
    if len(y) < min_samples:
        raise Unusable(f"too short: {1000 * len(y) / sample_rate:.0f} ms of sound" + suffix)
    return normalize_level(y, normalize), seconds, damage


def normalize_level(y: np.ndarray, normalize: str) -> np.ndarray:
    """``y`` at the level ``normalize`` (one of NORMALIZATIONS) says, as float32."""
    if normalize == "rms":
        y = y * (10 ** (_RMS_TARGET_DBFS / 20) / max(float(np.sqrt(np.mean(y**2))), 1e-12))
    elif normalize == "peak":
        y = y / max(float(np.abs(y).max()), 1e-12)
    return y.astype(np.float32)


def _decode(data: bytes) -> tuple[np.ndarray, int, int, str | None]:
    """Mono float32 samples at the file's own rate, that rate, the channel count, and the damage if decoding
    failed part-way (else None).

    Reads block by block rather than trusting the header's length: a header claiming billions of frames
    would otherwise allocate them up front, and a decoder error would lose what had decoded before it.
    A file that fails part-way (truncated download, broken FLAC frame) is used up to the failure: the
    frames before it passed the codec's checks (FLAC frames carry a CRC), the features are cropped from
    the start anyway, and a truncated WAV gives the same result because libsndfile silently reads what is
    there. Less than ``min_seconds`` of it is then skipped as too short, naming the damage.
    """
    import soundfile

    if not data:
        raise Unusable("empty file (0 bytes)")
    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except Exception as exc:  # libsndfile reports bad content with several exception types
        raise Unusable(f"not readable audio ({_decoder_message(exc)})") from exc
    with sound:
        rate, channels = sound.samplerate, sound.channels
        if rate < _MIN_RATE:
            raise Unusable(f"sample rate {rate} Hz is too low for speech (need at least {_MIN_RATE} Hz)")
        limit = int(_MAX_SECONDS * rate)
        blocks: list[np.ndarray] = []
        decoded, damage = 0, None
        while True:
            try:
                block = sound.read(_DECODE_BLOCK, dtype="float32", always_2d=True)
            except Exception as exc:
                if not decoded:
                    raise Unusable(f"not readable audio ({_decoder_message(exc)})") from exc
                claimed = sound.frames / rate
                announced = f" of the {claimed:.2f} s its header announces" if sound.frames > decoded else ""
                damage = f"decoding stopped after {decoded / rate:.2f} s{announced} ({_decoder_message(exc)})"
                break
            if not len(block):
                break
            decoded += len(block)
            if decoded > limit:
                raise Unusable(f"too long: more than {_MAX_SECONDS:.0f} s of audio; cut it into utterances")
            # Mixing down block by block keeps memory at one channel's worth.
            blocks.append(block.mean(axis=1) if channels > 1 else block[:, 0])
    if not decoded:
        raise Unusable("no audio samples")
    return np.concatenate(blocks), rate, channels, damage


def _decoder_message(exc: Exception) -> str:
    """libsndfile's own words, without its "Error : " prefix or the in-memory file's object address."""
    text = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    return text.removeprefix("Error : ").rstrip(".")


def _trim(y: np.ndarray, top_db: float, block: int) -> np.ndarray:
    """Cut leading/trailing blocks quieter than ``top_db`` below the loudest block.

    Same rule as librosa.effects.trim on non-overlapping hop-sized blocks, at a tenth of its cost (it
    dominated extraction time).
    """
    n = len(y) // block
    if n == 0:
        return y
    power = np.mean(y[: n * block].reshape(n, block) ** 2, axis=1)
    loud = np.flatnonzero(power > power.max() * 10 ** (-top_db / 10))
    return y[loud[0] * block : min(len(y), (loud[-1] + 1) * block)]
