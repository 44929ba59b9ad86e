"""One writer per download directory.

``flock`` alone is not enough: on Lustre, GPFS and some NFS mounts it
"succeeds" for every process, silently (huggingface_hub gave up
cross-process resume of a shared partial file for that reason). So the lock
is two things: an ``flock`` on the download directory's lock file
(``layout.py`` says where), and beside it the owner's host name and pid. A
second run that gets the flock still refuses when the recorded owner is a
live process on this host, or any process on another host (whose liveness
cannot be checked from here) whose record is fresh.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import AFTER_SYNC, DownloadDirLockedError, translating_local_errors
from ..layout import DownloadLayout, write_atomically

# A record from another host older than this is taken as left by a crash.
STALE_FOREIGN_RECORD_SECONDS = 24 * 3600


class DownloadDirLock:
    def __init__(self, download_dir: str | os.PathLike):
        self.directory = Path(download_dir)
        layout = DownloadLayout(download_dir)
        self.path = layout.lock_path
        self._owner_path = layout.lock_owner_path
        self._fd: int | None = None

    def acquire(self) -> None:
        with translating_local_errors(self.path.parent, "create the folder", AFTER_SYNC):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with translating_local_errors(self.path, "write", AFTER_SYNC):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise DownloadDirLockedError(str(self.directory), _describe(self._read_owner())) from exc
        owner = self._read_owner()
        if owner and _owner_is_alive(owner):
            os.close(fd)
            raise DownloadDirLockedError(str(self.directory), _describe(owner))
        self._fd = fd
        try:
            with translating_local_errors(self._owner_path, "write", AFTER_SYNC):
                write_atomically(self._owner_path, json.dumps(_me()).encode())
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

    def _read_owner(self) -> dict | None:
        try:
            return json.loads(self._owner_path.read_text())
        except (OSError, ValueError):
            return None


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _owner_is_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return time.time() - float(owner.get("since", 0)) < STALE_FOREIGN_RECORD_SECONDS
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another process holds its lock"
    return f"pid {owner.get('pid')} on {owner.get('host')}"
