"""The files of a run folder, named once here.

```
RUN/config.toml, RUN/topology.toml      what was run (launch, launch-hosts, Slurm)
RUN/summary.json, RUN/*.png             the report
RUN/peer-KKK/metrics.jsonl              one row per round
RUN/peer-KKK/status.json                starting / running / done / interrupted / crashed (+ error)
RUN/peer-KKK/model.npz                  the final shared parameters
RUN/peer-KKK/normalizer.json            the statistics the peer standardised its inputs with
RUN/peer-KKK/checkpoint.npz             everything needed to resume the peer
```
"""

from __future__ import annotations

import json
from pathlib import Path

from p2pser.errors import UserError
from p2pser.files import write_atomically

SUMMARY = "summary.json"
CONFIG = "config.toml"
TOPOLOGY = "topology.toml"
METRICS = "metrics.jsonl"
STATUS = "status.json"
MODEL = "model.npz"
NORMALIZER = "normalizer.json"
CHECKPOINT = "checkpoint.npz"
PEER_GLOB = "peer-*"


def peer_dir(out_dir: str | Path, peer_id: int) -> Path:
    return Path(out_dir) / f"peer-{peer_id:03d}"


def peer_id_of(folder: Path) -> int:
    """The peer id of a ``peer-KKK`` folder."""
    return int(folder.name.split("-")[1])


def write_json_atomic(path: Path, data: dict) -> None:
    # Status and normaliser files are rewritten often and rebuilt on restart: no fsync needed.
    write_atomically(path, lambda fh: fh.write(json.dumps(data, indent=1).encode()), durable=False)


def prepare_out_dir(out_dir: str | Path, *, continuing: bool | None = None) -> Path:
    """Create ``out_dir`` (or accept an empty or unused one) and prove it is writable.

    A folder that already holds a run (a ``summary.json`` or peer folders) is refused, so a second run can
    never mix its files into the first one's results; ``continuing=True`` (``--continue``) wants exactly
    such a folder instead. ``continuing=False`` says the command could continue it, and the refusal says so.
    """
    out = Path(out_dir)
    holds_run = (out / SUMMARY).exists() or any(out.glob(PEER_GLOB))
    if continuing and not (out / CONFIG).exists():
        raise UserError(f"--continue: {out} holds no run to continue (no config.toml); drop --continue to start one")
    if holds_run and not continuing:
        how = ", or add --continue to continue it" if continuing is False else ""
        raise UserError(f"output folder {out} already holds a run: choose a new --out{how}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or exc}; choose another --out") from None
    return out
