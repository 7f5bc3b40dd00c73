"""A peer's metrics log: one JSON object per round, appended and flushed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from p2pser.files import write_atomically

log = logging.getLogger(__name__)


class MetricsWriter:
    """Append-only JSONL, flushed per row so a crash loses at most the row being written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- open for the whole run

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row, allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def forget_rounds_from(path: Path, next_round: int) -> None:
    """Drop the metrics rows of rounds the peer runs again after resuming from a checkpoint of ``next_round``
    (it was stopped after writing them but before checkpointing them): one row per round of the model's own
    history, as a run that never stopped would have written."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["round"]) >= next_round:
                continue
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a torn last line (killed mid-write)
        kept.append(line)
    if len(kept) < len(lines):
        log.info("%s: dropped %d row(s) of rounds from %d on, which the resumed peer runs again", path,
                 len(lines) - len(kept), next_round)
        write_atomically(path, lambda fh: fh.write("".join(f"{ln}\n" for ln in kept).encode()), durable=False)
