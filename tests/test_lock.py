"""One writer per download directory, even where flock lies."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from async_embed_sync.errors import DownloadDirLockedError
from async_embed_sync.layout import STATE_DIR_NAME
from async_embed_sync.transfer.lock import DownloadDirLock


def test_second_holder_in_another_process_is_refused(tmp_path):
    with DownloadDirLock(tmp_path):
        code = ("import sys; from async_embed_sync.transfer.lock import DownloadDirLock\n"
                "from async_embed_sync.errors import DownloadDirLockedError\n"
                f"try:\n DownloadDirLock({str(tmp_path)!r}).acquire()\n"
                "except DownloadDirLockedError as e:\n print(e); sys.exit(3)\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert result.returncode == 3
        assert f"pid {os.getpid()}" in result.stdout
    # Released: it can be taken again.
    with DownloadDirLock(tmp_path):
        pass


def test_live_owner_record_refuses_even_when_flock_succeeds(tmp_path):
    # Emulates a filesystem where flock silently succeeds: no flock is held,
    # but the owner record names a live process on this host.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / STATE_DIR_NAME).mkdir()
        (tmp_path / STATE_DIR_NAME / "owner").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": sleeper.pid, "since": time.time()}))
        with pytest.raises(DownloadDirLockedError, match=f"pid {sleeper.pid}"):
            DownloadDirLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The owner died (as after a SIGKILL): its record is stale and ignored.
    with DownloadDirLock(tmp_path):
        pass
