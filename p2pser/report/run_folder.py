"""The output folder of a run: checked before any long work starts."""

from __future__ import annotations

from pathlib import Path

from p2pser.errors import UserError


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (or accept an empty or unused one) and prove it is writable.

    A folder that already holds a run (a ``summary.json`` or peer folders) is refused, so a second run can
    never mix its files into the first one's results.
    """
    out = Path(out_dir)
    if (out / "summary.json").exists() or any(out.glob("peer-*")):
        raise UserError(f"output folder {out} already holds a run: choose a new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or exc}; choose another --out") from None
    return out
