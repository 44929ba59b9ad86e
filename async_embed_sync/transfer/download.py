"""One file: partial -> verify prefix -> read blocks -> write -> verify -> move.

The invariant: the journal's ``verified_offset`` never runs ahead of bytes
that are fsynced in the partial file, and ``prefix_sha256`` is the hash of
exactly those bytes. So after a drop, a crash or a kill, the next attempt
re-hashes the local prefix, trusts it only if the hash still matches, and
asks the server only for the rest.

Only a file whose size (and, where the remote has a shell, sha256) matches
the remote is renamed into ``<download-dir>/<cluster>/<name>``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.lowlevel

from ..errors import (
    AFTER_SYNC,
    RemoteFileChangedError,
    VerificationError,
    translating_local_errors,
)
from ..fileio import fsync_directory
from ..layout import DownloadLayout, FileState
from ..progress import Progress
from .remote import ClusterRemote, RemoteFile, observe_outcome

logger = logging.getLogger(__name__)

# The journal is advanced (fsync + atomic state write) every this many bytes:
# at most this much is fetched again after a crash.
CHECKPOINT_BYTES = 8 * 1024 * 1024
_REHASH_BLOCK = 4 * 1024 * 1024


@dataclass
class FileOutcome:
    name: str
    status: str  # "downloaded" or "skipped"
    size: int
    transferred: int = 0
    # Continued from bytes an earlier attempt or run had verified.
    resumed: bool = False
    verified_by: str = ""


def is_up_to_date(layout: DownloadLayout, cluster: str, remote_file: RemoteFile) -> bool:
    """Complete locally and unchanged remotely (size and mtime)."""
    state = layout.load_state(cluster, remote_file.name)
    if state is None or not state.complete or not state.matches(remote_file.size, remote_file.mtime):
        return False
    final = layout.final_path(cluster, remote_file.name)
    try:
        return final.stat().st_size == remote_file.size
    except OSError:
        return False


async def download_file(remote: ClusterRemote, layout: DownloadLayout, remote_file: RemoteFile,
                        progress: Progress) -> FileOutcome:
    """Bring one remote file into place, resuming from a verified prefix.

    Raises ``TransferError``/``RemoteFileChangedError`` (retryable: the
    verified prefix survives for the next attempt) or ``VerificationError``
    (the partial is discarded).
    """
    cluster, name = remote.cluster.name, remote_file.name
    if is_up_to_date(layout, cluster, remote_file):
        logger.info("cluster %r: %s is up to date here (same size and mtime): skipped", cluster, name)
        progress.file_finished(cluster, name, "skipped")
        return FileOutcome(name, "skipped", remote_file.size)

    layout.prepare(cluster)
    partial_path = layout.partial_path(cluster, name)
    state, hasher = await anyio.to_thread.run_sync(_resume_point, layout, cluster, remote_file)
    resumed_from = state.verified_offset
    fd = _open_partial(partial_path)
    # The partial's own writes; the journal and the folders translate theirs.
    writing_partial = translating_local_errors(partial_path, "write", AFTER_SYNC)
    remote_hash = asyncio.ensure_future(remote.sha256(name))
    progress.file_started(cluster, name, remote_file.size, resumed_from)
    try:
        position = state.verified_offset
        after = remote_file
        with writing_partial:
            os.ftruncate(fd, position)
        try:
            async with remote.read(name, position, remote_file.size) as read:
                async for chunk in read.chunks():
                    # In a worker thread: pwrite and sha256 release the GIL,
                    # so they overlap with decrypting the next blocks. Shielded:
                    # the bytes, the hash and the position move together.
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(_write_and_hash, partial_path, fd, chunk,
                                                       position, hasher)
                    position += len(chunk)
                    progress.advance(cluster, name, len(chunk))
                    if position - state.verified_offset >= CHECKPOINT_BYTES:
                        await _checkpoint(layout, cluster, name, fd, state, position, hasher)
                    # A stop (Ctrl-C, SIGTERM) is taken here, between blocks, where
                    # the bytes, the hash and the position agree. Needed: while the
                    # blocks arrive faster than they are written, the loop's only
                    # suspensions are the shielded ones above (the next block is
                    # already there), and anyio delivers a cancel at an unshielded
                    # suspension only: the file would be fetched to its end first.
                    await anyio.lowlevel.checkpoint_if_cancelled()
            after = read.closing_stat or after
        finally:
            # Also after a drop: what arrived is kept, so that the retry asks
            # only for the rest.
            await _checkpoint(layout, cluster, name, fd, state, position, hasher)
        if position != remote_file.size:
            raise RemoteFileChangedError(cluster, name, f"it ended at byte {position}, "
                                                        f"expected {remote_file.size}")
        if (after.size, after.mtime) != (remote_file.size, remote_file.mtime):
            raise RemoteFileChangedError(cluster, name, "its size or modification time changed")
        digest = hasher.hexdigest()
        expected = await remote_hash
        if expected is not None and expected != digest:
            logger.info("cluster %r: %s does not match the server's sha256: discarded", cluster, name)
            await anyio.to_thread.run_sync(layout.forget, cluster, name)
            raise VerificationError(cluster, name, f"sha256 {digest[:16]}... locally, "
                                                   f"{expected[:16]}... on the server")
        verified_by = "sha256" if expected is not None else "size"
        await anyio.to_thread.run_sync(_move_into_place, layout, cluster, name, fd, state, digest, verified_by)
    except BaseException:
        progress.file_finished(cluster, name, "failed")
        raise
    finally:
        os.close(fd)
        await _discard(remote_hash)
    progress.file_finished(cluster, name, "downloaded")
    logger.info("cluster %r: %s complete (%d bytes%s), verified by %s%s", cluster, name, remote_file.size,
                f", resumed at byte {resumed_from}" if resumed_from else "", verified_by,
                " against the server's sha256sum" if verified_by == "sha256" else " (the server has no shell)")
    return FileOutcome(name, "downloaded", remote_file.size, remote_file.size - resumed_from,
                       resumed_from > 0, verified_by)


async def _discard(request: asyncio.Future) -> None:
    """Cancel ``request`` if it is still running, and observe how it ended.

    Only the request's own outcome is ignored: a cancel aimed at this task
    while it waits here still propagates (``contextlib.suppress(BaseException)``
    around the ``await`` would swallow it, and the task would carry on)."""
    request.add_done_callback(observe_outcome)
    if not request.done():
        request.cancel()
        await asyncio.wait([request])


def _resume_point(layout: DownloadLayout, cluster: str, remote_file: RemoteFile):
    """The state to continue from, and a hasher over its verified prefix.

    The prefix is trusted only when the remote file still has the size and
    mtime it had, and the local bytes still hash to what was recorded: a
    partial damaged on disk, or one of another version, starts again at 0.
    """
    state = layout.load_state(cluster, remote_file.name)
    fresh = FileState(remote_file.size, remote_file.mtime)
    if state is None or state.complete or not state.matches(remote_file.size, remote_file.mtime):
        return fresh, hashlib.sha256()
    hasher = hashlib.sha256()
    remaining = state.verified_offset
    try:
        with open(layout.partial_path(cluster, remote_file.name), "rb") as partial:
            while remaining:
                block = partial.read(min(_REHASH_BLOCK, remaining))
                if not block:
                    break
                hasher.update(block)
                remaining -= len(block)
    except OSError:
        return fresh, hashlib.sha256()
    if remaining or hasher.hexdigest() != state.prefix_sha256:
        return fresh, hashlib.sha256()
    return state, hasher


def _open_partial(path: Path) -> int:
    # O_NOFOLLOW: a symlink planted at the partial path must not redirect
    # our writes outside the download directory.
    with translating_local_errors(path, "write", AFTER_SYNC):
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)


def _write_and_hash(path: Path, fd: int, data: bytes, offset: int, hasher) -> None:
    view = memoryview(data)
    with translating_local_errors(path, "write", AFTER_SYNC):
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    hasher.update(data)


async def _checkpoint(layout: DownloadLayout, cluster: str, name: str, fd: int,
                      state: FileState, position: int, hasher) -> None:
    if position == state.verified_offset and state.prefix_sha256:
        return
    advanced = dataclasses.replace(state, verified_offset=position, prefix_sha256=hasher.hexdigest())
    # Shielded, and ``state`` moves only once the save is done: a cancel
    # here must not leave memory believing in a checkpoint the disk lacks
    # (the closing checkpoint would then skip it as already made).
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(_fsync_and_save, layout, cluster, name, fd, advanced)
    state.verified_offset, state.prefix_sha256 = advanced.verified_offset, advanced.prefix_sha256


def _fsync_and_save(layout: DownloadLayout, cluster: str, name: str, fd: int, state: FileState) -> None:
    # The order is the invariant: bytes durable first, then the state that
    # vouches for them.
    with translating_local_errors(layout.partial_path(cluster, name), "write", AFTER_SYNC):
        os.fsync(fd)
    layout.save_state(cluster, name, state)


def _move_into_place(layout: DownloadLayout, cluster: str, name: str, fd: int,
                     state: FileState, digest: str, verified_by: str) -> None:
    final = layout.final_path(cluster, name)
    with translating_local_errors(final, "write", AFTER_SYNC):
        os.fsync(fd)
        os.replace(layout.partial_path(cluster, name), final)
        fsync_directory(final.parent)
        layout.record_complete(cluster, name, state, digest, verified_by)
