"""Whether a process that left a record on this host (a lock owner, a merge's staging) is gone.

A pid alone is not enough: pids are reused, and a killed process stays a
zombie until its parent reaps it (a container's init may never do so). So a
process counts as alive only if its pid exists, is no zombie, and, where its
start time was recorded (``/proc/<pid>/stat`` field 22, clock ticks since
boot), started then.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_is_gone(pid: int, start_ticks: object = None) -> bool:
    """The process ``pid`` on this host has exited (or the pid now names another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    if isinstance(start_ticks, int) and process_start_ticks(pid) not in (None, start_ticks):
        return True  # the pid was reused by another process since
    # Killed, not yet reaped: it holds nothing.
    return (_stat_fields(pid) or [None])[0] == "Z"


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat``: when the process started, in clock ticks since boot."""
    try:
        return int((_stat_fields(pid) or [])[22 - 3])
    except (IndexError, ValueError):
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from field 3 on (the first is field 3); None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command) is in parentheses and may hold spaces: count from after its ")".
    return stat[stat.rfind(")") + 2:].split()
