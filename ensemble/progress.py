"""Progress bars: live on a terminal or in a notebook; into a log file, a line every 30 s that stays.

On a terminal (or as a notebook widget) a bar redraws ten times a second and is cleared
when done. Written into a log file (``fit ... > log 2>&1``) a bar redraws every 30 s, each
state a whole line of its own written at once, so that the bars of several worker processes
and the messages between them never land on one another's lines.
"""

from __future__ import annotations

import re
import sys
import threading

from tqdm import autonotebook, std
from tqdm.auto import tqdm


def is_terminal(stream=None) -> bool:
    """Whether bars are seen live: a terminal, or a notebook (whose widget bars are not lines)."""
    if stream is None and autonotebook.tqdm is not std.tqdm:
        return True
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def interval(stream=None) -> float:
    """Seconds between redraws: 0.1 on a terminal, 30 into a log file."""
    return _interval(is_terminal(stream))


def _interval(live: bool) -> float:
    return 0.1 if live else 30.0


def bar(iterable=None, *, progress: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr (hidden when ``progress`` is false) that behaves as the module says."""
    live = is_terminal()
    seconds = _interval(live)  # tqdm's monitor redraws after `maxinterval` (10 s) unless it is raised too
    file = None if live else _Lines(sys.stderr)
    return tqdm(iterable, disable=not progress, leave=not live, mininterval=seconds,
                maxinterval=max(seconds, 10.0), file=file, **kwargs)


_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A log file for tqdm: each state it draws ('\\r' + state) becomes one whole line, written in
    one call (tqdm would leave it unended, for the next state, a message or another process's bar
    to overwrite)."""

    def __init__(self, stream):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None)

    def write(self, text: str) -> None:
        text = _CURSOR_MOVES.sub("", text)  # the moves between nested bars: each line stands alone here
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def use_thread_lock() -> None:
    """In a job's worker process: bars take a thread lock instead of tqdm's default, which holds a
    multiprocessing RLock, a semaphore that the worker leaks when Ctrl-C stops it ("There appear to
    be N leaked semaphore objects"). Loky starts its workers afresh, so none shares that lock anyway.
    Not done on import: tqdm's own ``process_map`` hands the lock to spawned processes, and a
    thread lock cannot be pickled."""
    std.tqdm.set_lock(threading.RLock())
