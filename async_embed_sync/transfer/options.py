"""The sync's settings and their defaults, without the SSH stack.

The command line and the API build their flags and signatures from these
defaults; keeping them apart from the modules that import asyncssh lets
``--version``, ``--help``, ``init``, ``merge`` and ``load()`` start without
loading asyncssh or cryptography. The SSH stack loads when a sync first
connects (``connect_over_ssh``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ClusterConfig, Config
from ..layout import free_space
from .prompts import Prompter
from .settle import DEFAULT_SETTLE_SECONDS

if TYPE_CHECKING:
    from .remote import Remote

DEFAULT_DOWNLOAD_DIR = "embeddings/checkpoints"
# 16 MiB per channel: at 50 ms RTT one channel then carries up to 320 MiB/s,
# instead of the 40 MiB/s that asyncssh's 2 MiB default allows.
DEFAULT_WINDOW = 16 * 1024 * 1024
# OpenSSH's default MaxSessions is 10 channels per connection: SFTP channels
# plus exec channels for sha256sum must stay below it.
DEFAULT_SFTP_CHANNELS = 4
# Bytes requested ahead of the write position, per file: enough to fill a
# 400 Mbit/s x 50 ms link (2.5 MB) with room to spare.
READ_AHEAD_BYTES = 8 * 1024 * 1024
# --follow: seconds between listings; and, where the run's total is not known,
# how long nothing may appear or change before the set counts as complete:
# longer than the gap between a run's periodic checkpoints.
DEFAULT_POLL_SECONDS = 60
DEFAULT_QUIET_PERIOD_SECONDS = 600


async def connect_over_ssh(cluster: ClusterConfig, options: SyncOptions) -> Remote:
    """``SyncOptions.connect``'s default: the cluster over SSH (the SSH stack is imported here, on first use)."""
    from .remote import ClusterRemote

    return await ClusterRemote.connect_with(cluster, options)


@dataclass(frozen=True)
class SyncOptions:
    # The user's cap on files in flight; the bytes in flight are capped too
    # (``FairSlots``' budget), so many small files fill a link whose round
    # trips a few would leave idle, and large ones stay bounded in memory.
    # 128: 2,000 files of 64 KB over 200 ms took 30.7 s at 32, 18.9 s at 64,
    # 15.0 s at 128 (a small file spends about two round trips in flight).
    max_parallel: int = 128
    # Bytes of read window in flight over all files: each file counts
    # min(its size, read_ahead). 8 read windows, as 8 large files in flight.
    bytes_in_flight: int = 8 * READ_AHEAD_BYTES
    # Connect/login timeout, and how long a silent link may go unnoticed.
    timeout: float = 30.0
    # Attempts per file that make no progress before it is given up.
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 8.0
    window: int = DEFAULT_WINDOW
    sftp_channels: int = DEFAULT_SFTP_CHANNELS
    # Bytes of block reads in flight per file, ahead of the write position.
    read_ahead: int = READ_AHEAD_BYTES
    # A file last written less than this many seconds before its listing
    # may still be being written: it is not put in place (``settle.py``).
    settle: float = DEFAULT_SETTLE_SECONDS
    # Who answers password, passphrase and 2FA prompts; None: nobody.
    prompter: Prompter | None = None
    # The free bytes and mount point of the file system a download directory is on (None: unknown,
    # no check); a cluster whose files still to fetch do not fit is refused before fetching.
    free_space: Callable[[str], tuple[int, str] | None] = free_space
    # A complete new version of a file that is to replace a verified copy here is first
    # checked as a checkpoint (None: not checked): called with the new version's path (a
    # partial, whose name does not end as the file's) and the file's name; returns why it is
    # not a readable checkpoint (then it stays a partial, the old copy in place), or None.
    # The merge's reader, passed by the caller (transfer/ may not import merging/).
    check_checkpoint: Callable[[Path, str], str | None] | None = None
    # How a cluster's remote is made: over SSH, or (in tests) any other ``remote.Remote``.
    connect: Callable[[ClusterConfig, SyncOptions], Awaitable[Remote]] = connect_over_ssh

    @staticmethod
    def settle_for(config: Config, given: float | None) -> float:
        """The settle window: ``given`` (``--settle``, ``settle=``), else the config's ``settle_seconds``, else 60."""
        return next(value for value in (given, config.settle_seconds, DEFAULT_SETTLE_SECONDS) if value is not None)

    def delay(self, attempt: int) -> float:
        return min(self.backoff * 2 ** attempt, self.max_backoff)
