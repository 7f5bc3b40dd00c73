"""The output folder of a run: checked before any long work starts."""

from __future__ import annotations

from pathlib import Path

from p2pser.errors import UserError


def prepare_out_dir(out_dir: str | Path, *, continuing: bool | None = None) -> Path:
    """Create ``out_dir`` (or accept an empty or unused one) and prove it is writable.

    A folder that already holds a run (a ``summary.json`` or peer folders) is refused, so a second run can
    never mix its files into the first one's results; ``continuing=True`` (``--continue``) wants exactly
    such a folder instead. ``continuing=False`` says the command could continue it, and the refusal says so.
    """
    out = Path(out_dir)
    holds_run = (out / "summary.json").exists() or any(out.glob("peer-*"))
    if continuing and not (out / "config.toml").exists():
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
