"""Whether a command draws a progress bar."""

from __future__ import annotations

import sys


def want_bar(no_progress: bool, stream=None) -> bool:
    """A progress bar only in a terminal: in a log file or a pipe tqdm's carriage returns glue every redraw into one
    long line, so a command there prints plain lines instead (as with --no_progress)."""
    stream = sys.stderr if stream is None else stream
    try:
        return not no_progress and stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream: no bar
        return False


__all__ = ["want_bar"]
