"""Errors a user can cause and fix.

The CLI prints ``UserError`` as one line (``p2pser: error: ...``) and exits with status 2; anything else
is an internal bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad path, bad input file, bad config value or unreachable peer: say what and what to do."""
