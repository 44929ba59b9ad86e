"""The lock's owner record names its holder beyond a pid (start time, boot id): a reused pid, a
rebooted machine or a restarted container is not taken for a live holder; a record left on another
node says how to clear it, and --break-lock takes it over, never from a holder alive here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from async_embed_sync.cli import main
from async_embed_sync.errors import DownloadDirLockedError
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.testing.synthetic import generate_run
from async_embed_sync.transfer.lock import DownloadDirLock, process_start_ticks

BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.fixture
def sleeper():
    """A real, live process of this machine (``sleep``), killed at the end."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def _write_record(directory: Path, **fields) -> Path:
    record = DownloadLayout(directory).lock_owner_path
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"host": socket.gethostname(), "since": time.time(), "command": "sync",
                                  "boot_id": BOOT_ID, **fields}))
    return record


def test_the_record_names_its_holder_by_start_time_and_boot_id(tmp_path):
    with DownloadDirLock(tmp_path):
        record = json.loads(DownloadLayout(tmp_path).lock_owner_path.read_text())
    stat = Path("/proc/self/stat").read_text()
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["boot_id"] == BOOT_ID
    assert record["start_ticks"] == int(stat[stat.rfind(")") + 2:].split()[19])  # field 22
    assert not DownloadLayout(tmp_path).lock_owner_path.exists()  # released: the record goes


def test_a_live_process_with_the_recorded_start_time_holds_the_folder(tmp_path, sleeper):
    _write_record(tmp_path, pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid))
    with pytest.raises(DownloadDirLockedError, match=f"pid {sleeper.pid} on {socket.gethostname()}, a sync"):
        DownloadDirLock(tmp_path).acquire()
    # --break-lock never takes the folder from a holder alive on this host.
    with pytest.raises(DownloadDirLockedError, match=f"pid {sleeper.pid}"):
        DownloadDirLock(tmp_path, break_lock=True).acquire()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path, sleeper):
    # The record's pid is alive, but started at another time: the holder died, its pid was reused.
    _write_record(tmp_path, pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid) - 1)
    with DownloadDirLock(tmp_path):
        assert json.loads(DownloadLayout(tmp_path).lock_owner_path.read_text())["pid"] == os.getpid()


def test_a_record_from_before_a_reboot_is_not_taken_for_the_holder(tmp_path, sleeper):
    _write_record(tmp_path, pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid),
                  boot_id=str(uuid.uuid4()))
    with DownloadDirLock(tmp_path):
        pass


def test_a_record_of_a_restarted_container_is_not_taken_for_the_holder(tmp_path, sleeper):
    # The same kernel (boot id) under another host name: the container the record names is gone
    # (the kernel granted the flock), and its pid means nothing here.
    _write_record(tmp_path, host="c0ffee00", pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid))
    with DownloadDirLock(tmp_path):
        pass


def test_a_record_from_another_node_says_how_to_clear_it_and_break_lock_takes_it_over(tmp_path):
    record = _write_record(tmp_path, host="node042", pid=12345, boot_id=str(uuid.uuid4()), start_ticks=99)
    with pytest.raises(DownloadDirLockedError) as refused:
        DownloadDirLock(tmp_path).acquire()
    message = str(refused.value)
    assert f"in use by another run (pid 12345 on node042, a sync started {time.strftime('%H:%M')}" in message
    assert f"delete {record}, or add --break-lock" in message, message
    lock = DownloadDirLock(tmp_path, command="merge", break_lock=True)
    with lock:
        assert lock.broken.host == "node042"
        assert json.loads(record.read_text())["host"] == socket.gethostname()


def test_break_lock_never_takes_a_held_flock(tmp_path):
    code = ("import sys, time; from async_embed_sync.transfer.lock import DownloadDirLock\n"
            f"lock = DownloadDirLock({str(tmp_path)!r}); lock.acquire(); print('held', flush=True)\n"
            "sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        # Whatever the record says (here: another node's), a held flock is a live holder.
        _write_record(tmp_path, host="node042", pid=12345, boot_id=str(uuid.uuid4()))
        with pytest.raises(DownloadDirLockedError, match="pid 12345 on node042"):
            DownloadDirLock(tmp_path, break_lock=True).acquire()
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()


def test_merge_names_the_record_left_on_another_node_and_break_lock_takes_it_over(
        openssh, tmp_path, write_config, capsys):
    generate_run(tmp_path / "remote", rows=410, dim=8, clusters=("tensor01",), gpus_per_cluster=2)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(tmp_path / "remote" / "tensor01"))})
    download_dir, output = tmp_path / "dl", tmp_path / "merged.pkl"
    assert main(["sync", "--config", str(config), "--download-dir", str(download_dir), "--quiet"]) == 0
    # A job killed outright on node042 (its record stays), requeued here.
    record = _write_record(download_dir, host="node042", pid=12345, boot_id=str(uuid.uuid4()))
    capsys.readouterr()

    merge = ["merge", "--download-dir", str(download_dir), "--output", str(output), "--quiet"]
    assert main(merge) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: The download directory {download_dir} is in use by another run (pid 12345 on "
                          f"node042, a sync started "), err
    assert f"Its host cannot be checked from here. If that run is gone (a job killed, then requeued on another " \
           f"node), delete {record}, or add --break-lock to take the folder over." in err, err
    assert not output.exists()
    # status says what the record claims, without taking anything over.
    assert main(["status", "--config", str(config), "--download-dir", str(download_dir)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"A sync on node042 holds this folder (pid 12345, started "), first
    assert first.endswith(f"by its lock record {record}); that host cannot be checked from here. If it runs, "
                          f"partial counts are moving."), first
    assert main(["status", "--break-lock", "--config", str(config), "--download-dir", str(download_dir)]) == 2
    assert record.exists()

    assert main([*merge, "--break-lock"]) == 0
    assert not record.exists()  # taken over, then released
    assert main(merge) == 0


def test_sync_break_lock_takes_over_a_record_left_on_another_node(openssh, tmp_path, write_config, capsys):
    generate_run(tmp_path / "remote", rows=410, dim=8, clusters=("tensor01",), gpus_per_cluster=2)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(tmp_path / "remote" / "tensor01"))})
    download_dir = tmp_path / "dl"
    record = _write_record(download_dir, host="node042", pid=12345, boot_id=str(uuid.uuid4()))
    sync = ["sync", "--config", str(config), "--download-dir", str(download_dir), "--quiet"]
    assert main(sync) == 1
    assert f"delete {record}, or add --break-lock" in capsys.readouterr().err
    assert main([*sync, "--break-lock"]) == 0
    assert not record.exists() and len(list((download_dir / "tensor01").iterdir())) == 2


def test_a_killed_holder_not_yet_reaped_is_not_taken_for_a_live_one(tmp_path):
    # SIGKILLed, its entry left until its parent reaps it: a container's init may never do so.
    child = subprocess.Popen(["sleep", "60"])
    try:
        child.kill()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        record = _write_record(tmp_path / "dl", pid=child.pid, start_ticks=process_start_ticks(child.pid))
        assert record.exists()
        with DownloadDirLock(tmp_path / "dl"):
            pass  # taken: the record names a process that is gone
    finally:
        child.wait()
