"""Where output goes: results on stdout (human or JSON lines), everything else on stderr."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from rich.console import Console

# Piped output is read by scripts and pasted by people: never fold peer IDs at 80 columns there.
stdout = Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 300)
stderr = Console(stderr=True, soft_wrap=True, highlight=False, width=None if sys.stderr.isatty() else 300)


def emit_json(event: str, **fields: Any) -> None:
    """Print one JSON object on its own line on stdout and flush it (scripts read it live)."""
    sys.stdout.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


def setup_logging(verbose: bool) -> None:
    """Log lines go to stderr with a timestamp; HIVE_LOGLEVEL overrides the level."""
    import os

    level = os.environ.get("HIVE_LOGLEVEL", "DEBUG" if verbose else "INFO").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
