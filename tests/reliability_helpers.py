"""Shared by the reliability and load tests: remote trees of seeded random
files, the mirror and journal checks, and CLI runs in child processes.

A child process is how a test kills the tool at an exact point (SIGKILL from
inside a patched function), limits its file size (RLIMIT_FSIZE) or measures
its peak memory, without touching the test process itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from async_embed_sync.config import load_config
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.progress import QuietProgress
from async_embed_sync.transfer.sync import SyncOptions, SyncReport, sync_clusters

MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT = 120.0
# Retries within a run come fast: the triggers are byte counts, not time.
FAST_RETRY = dict(backoff=0.02, max_backoff=0.1, timeout=10.0)


def make_files(directory: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """Files of seeded random bytes (incompressible, reproducible) in ``directory``."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        (directory / name).write_bytes(rng.randbytes(size))
    return directory


def assert_mirrored(remote_dir: Path, local_dir: Path, names: Sequence[str] | None = None) -> None:
    """Every named remote file (default: all) is in ``local_dir`` byte for byte."""
    names = sorted(p.name for p in remote_dir.iterdir()) if names is None else names
    for name in names:
        local = local_dir / name
        assert local.is_file(), f"{name} is missing"
        assert local.read_bytes() == (remote_dir / name).read_bytes(), f"{name} differs"


def assert_journal_readable(download_dir: Path) -> list[dict]:
    """Every state file under the download directory parses: none is ever torn.

    Returns the per-file states; the clusters' listings are parsed too, not
    returned.
    """
    layout = DownloadLayout(download_dir)
    for path in layout.listing_files():
        json.loads(path.read_text())  # raises on a torn file
    return [json.loads(path.read_text()) for path in layout.state_files()]


def assert_no_wrong_file_in_place(remote_dir: Path, local_dir: Path) -> None:
    """A file in the cluster folder is always the remote's bytes (or absent)."""
    if not local_dir.exists():
        return
    for local in local_dir.iterdir():
        assert local.read_bytes() == (remote_dir / local.name).read_bytes(), f"{local.name} is wrong"


def sync_argv(config: Path, download_dir: Path, *extra: str) -> list[str]:
    return ["sync", "--config", str(config), "--download-dir", str(download_dir), "--quiet", *extra]


def cli_child_command(argv: Sequence[str], prelude: str = "") -> list[str]:
    """``main(argv)`` in a fresh interpreter, after ``prelude`` (hooks, limits)."""
    code = (f"{prelude}\n"
            "import sys\n"
            "from async_embed_sync.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return [sys.executable, "-c", code, *argv]


def run_cli_child(argv: Sequence[str], prelude: str = "",
                  timeout: float = CHILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``main(argv)`` in a fresh interpreter, after ``prelude`` (hooks, limits).

    The child exits with main's return code; a SIGKILL from a hook shows as
    ``returncode == -9``.
    """
    return subprocess.run(cli_child_command(argv, prelude), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def start_cli_child(argv: Sequence[str], prelude: str = "", *,
                    sigint_ignored: bool = False) -> subprocess.Popen[str]:
    """:func:`run_cli_child`, not waited for: stdout and stderr are pipes."""
    return subprocess.Popen(with_sigint(cli_child_command(argv, prelude), ignored=sigint_ignored),
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def with_sigint(command: Sequence[str], ignored: bool) -> list[str]:
    """``command`` exec'd with SIGINT ignored, as a non-interactive shell starts
    ``command &`` (POSIX), or with SIGINT at its default whatever this process
    has (it may itself run in the background). Same pid as ``command``'s."""
    disposition = "SIG_IGN" if ignored else "SIG_DFL"
    return [sys.executable, "-c", f"import os, signal, sys; signal.signal(signal.SIGINT, signal.{disposition}); "
            "os.execv(sys.argv[1], sys.argv[1:])", *command]


def ignores_sigint(pid: int) -> bool:
    """Whether the process ``pid`` has SIGINT ignored, as the kernel sees it."""
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(ignored & (1 << (signal.SIGINT - 1)))


async def sync_in_process(config: Path, download_dir: Path, **options) -> SyncReport:
    """The sync on the test's own loop (where embedded servers and proxies live)."""
    clusters = load_config(config).select(None)
    return await sync_clusters(clusters, str(download_dir), QuietProgress(),
                               SyncOptions(**{**FAST_RETRY, **options}))


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` (a bounded wait, not a trigger)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
