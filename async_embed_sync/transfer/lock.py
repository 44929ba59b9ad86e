"""One run per download directory: every command that writes or merges it holds the lock.

``flock`` alone is not enough: on Lustre, GPFS and some NFS mounts it
"succeeds" for every process, silently (huggingface_hub gave up
cross-process resume of a shared partial file for that reason). So the lock
is two things: an ``flock`` on the download directory's lock file
(``layout.py`` says where), and beside it the owner record: host name, pid,
what it runs (``sync``, ``merge``), since when, and what identifies that
process beyond its pid: its start time (``/proc/<pid>/stat`` field 22, clock
ticks since boot) and the machine's boot id
(``/proc/sys/kernel/random/boot_id``).

A second run that gets the flock still refuses while the record names a
holder that may be alive:

* on this machine (same boot id, same host name): a live process with that
  pid and start time. A pid reused by another process since is not it;
* this machine before a reboot (same host name, another boot id): gone;
* this kernel under another host name (a container restarted, or a sibling
  one sharing the folder): the kernel arbitrates the flock for both, and it
  granted it to us, so the recorded process does not hold it: gone;
* another host (a Slurm node), whose processes cannot be checked from here:
  held while the record is younger than ``STALE_FOREIGN_RECORD_SECONDS``,
  unless ``break_lock`` is asked for (``--break-lock``), which takes over
  such a record, never one whose holder is provably alive here, nor a held
  flock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import AFTER_SYNC, DownloadDirLockedError, LocalFileError, translating_local_errors
from ..layout import DownloadLayout, write_atomically
from ..processes import process_is_gone, process_start_ticks

# A record from another host older than this is taken as left by a crash.
STALE_FOREIGN_RECORD_SECONDS = 24 * 3600

ALIVE, GONE, UNKNOWN = "alive here", "gone", "on another host"


@dataclass(frozen=True)
class Holder:
    """Who the owner record names, and what can be said of it from here (``state``)."""

    host: str
    pid: int | None
    command: str | None
    since: float | None
    state: str
    record: Path

    @property
    def may_be_running(self) -> bool:
        """Provably alive here, or on another host with a record younger than the stale age."""
        if self.state == ALIVE:
            return True
        return self.state == UNKNOWN and self.since is not None \
            and time.time() - self.since < STALE_FOREIGN_RECORD_SECONDS

    def started(self) -> str | None:
        """When the holder took the lock, by this machine's clock: ``14:03``, or ``2026-12-05 14:03``."""
        return _when(self.since) if self.since else None

    def describe(self) -> str:
        """``pid 17272 on vm, a sync started 14:03``."""
        what = f"pid {self.pid} on {self.host}"
        if self.command or self.since:
            started = f"started {self.started()}" if self.since else ""
            what += ", " + " ".join(part for part in (f"a {self.command}" if self.command else "", started) if part)
        return what


class DownloadDirLock:
    """``command``: what the holder runs, said to whoever finds the folder taken (``merge``; "sync"
    by default, the sync's own call naming none). ``break_lock``: take over a record that names a
    run on another host (see the module)."""

    def __init__(self, download_dir: str | os.PathLike, command: str = "sync", break_lock: bool = False):
        self.directory = Path(download_dir)
        layout = DownloadLayout(download_dir)
        self.path = layout.lock_path
        self._owner_path = layout.lock_owner_path
        self.command = command
        self.break_lock = break_lock
        self._fd: int | None = None
        self.broken: Holder | None = None  # the record taken over with break_lock

    def acquire(self) -> None:
        with translating_local_errors(self.path.parent, "create the folder", AFTER_SYNC):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with translating_local_errors(self.path, "write", AFTER_SYNC):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            holder = read_holder(self.directory)
            # Held, whatever the record says: break_lock never takes a held flock.
            raise DownloadDirLockedError(str(self.directory), holder.describe() if holder else
                                         "another process holds its lock") from exc
        holder = read_holder(self.directory)
        if holder and holder.may_be_running and not (self.break_lock and holder.state == UNKNOWN):
            os.close(fd)
            raise DownloadDirLockedError(str(self.directory), holder.describe(), _hint(holder, self._owner_path))
        self.broken = holder if holder and holder.may_be_running else None
        self._fd = fd
        try:
            with translating_local_errors(self._owner_path, "write", AFTER_SYNC):
                write_atomically(self._owner_path, json.dumps(_me(self.command)).encode())
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self._owner_path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DownloadDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextlib.contextmanager
def reading_lock(download_dir: str | os.PathLike, command: str, break_lock: bool = False) -> Iterator[None]:
    """The lock, for a command that only reads the download directory (the merge).

    A folder that does not exist is not made (nothing runs there; the command
    says what is missing). One this account may not write (a read-only copy,
    another user's folder) cannot hold a lock: it is read unless its record
    names a run that may be going.
    """
    if not Path(download_dir).is_dir():
        yield
        return
    lock = DownloadDirLock(download_dir, command, break_lock=break_lock)
    try:
        lock.acquire()
    except LocalFileError as exc:
        if not (isinstance(exc.__cause__, OSError) and exc.__cause__.errno in _READ_ONLY):
            raise
        holder = read_holder(download_dir)
        if holder and holder.may_be_running and not (break_lock and holder.state == UNKNOWN):
            raise DownloadDirLockedError(str(download_dir), holder.describe(),
                                         _hint(holder, holder.record)) from None
        yield
        return
    try:
        yield
    finally:
        lock.release()


_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def read_holder(download_dir: str | os.PathLike) -> Holder | None:
    """The owner record's holder, judged from here; None without a readable record.
    Reads only: ``status`` calls it without taking the lock."""
    path = DownloadLayout(download_dir).lock_owner_path
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict):
        return None
    pid = owner.get("pid") if isinstance(owner.get("pid"), int) else None
    since = owner.get("since") if isinstance(owner.get("since"), (int, float)) else None
    command = owner.get("command") if isinstance(owner.get("command"), str) else None
    return Holder(str(owner.get("host")), pid, command, since, _state(owner, pid), path)


def _state(owner: dict, pid: int | None) -> str:
    same_host = owner.get("host") == socket.gethostname()
    boot_id = owner.get("boot_id")
    if boot_id and boot_id == _boot_id():
        # This kernel: under another host name (a container restarted), the flock we were
        # granted says the recorded process does not hold it, and its pid names nothing here.
        return _process_state(pid, owner.get("start_ticks")) if same_host else GONE
    if same_host:
        # A record of this host from another boot (or one without a boot id, written before
        # it was recorded; then the pid alone).
        return GONE if boot_id and _boot_id() else _process_state(pid, owner.get("start_ticks"))
    return UNKNOWN


def _process_state(pid: int | None, start_ticks: object) -> str:
    if pid is None or pid == os.getpid():
        return GONE
    return GONE if process_is_gone(pid, start_ticks) else ALIVE


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _me(command: str | None) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "command": command,
            "boot_id": _boot_id(), "start_ticks": process_start_ticks(os.getpid())}


def _when(since: float) -> str:
    moment = time.localtime(since)
    return time.strftime("%H:%M" if moment[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M", moment)


def _hint(holder: Holder, record: Path) -> str:
    if holder.state != UNKNOWN:
        return ""
    return (f"Its host cannot be checked from here. If that run is gone (a job killed, then requeued on "
            f"another node), delete {record}, or add --break-lock to take the folder over.")
