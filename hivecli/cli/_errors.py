"""Exit codes and how expected errors are shown: one line on stderr, no traceback.

    0   ok
    1   runtime failure (any other HiveError)
    2   bad usage, flag, address or recipe (ConfigError)
    3   peer unreachable (PeerUnreachableError, BootstrapError)
    130 interrupted (Ctrl+C)

Set HIVE_DEBUG=1 to get the full traceback of an expected error as well.
"""

from __future__ import annotations

import os
import sys

from hivecli._exceptions import ConfigError, HiveError, PeerUnreachableError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

# most specific first: the first matching class decides the exit code
ERROR_EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (ConfigError, EXIT_USAGE),
    (PeerUnreachableError, EXIT_UNREACHABLE),
    (HiveError, EXIT_FAILURE),
]


def exit_code_for(error: BaseException) -> int | None:
    """The exit code of an expected error, or None for an unexpected one (a bug: show the traceback)."""
    for error_type, code in ERROR_EXIT_CODES:
        if isinstance(error, error_type):
            return code
    return None


def report(error: BaseException) -> int:
    """Print an expected error as one line on stderr and return its exit code."""
    code = exit_code_for(error)
    assert code is not None
    if os.environ.get("HIVE_DEBUG"):
        import traceback

        traceback.print_exception(error)
    print(f"hive: error: {error}", file=sys.stderr)
    return code
