"""Shared command-line behaviour: a user error is one `error:` line on stderr and exit code 1.

Set QWENVL_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import os
import sys


def user_error(e: BaseException) -> int:
    """Prints `error: <message>` (a KeyError's key without quotes) and returns the exit code 1."""
    if os.environ.get("QWENVL_DEBUG"):
        raise e
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    return 1
