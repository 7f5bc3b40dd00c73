"""A peer's metrics log: one JSON object per round, appended and flushed."""

from __future__ import annotations

import json
from pathlib import Path


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
