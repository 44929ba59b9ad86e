"""One file: partial -> verify prefix -> read blocks -> write -> verify -> move.

The invariant: the journal's ``verified_offset`` never runs ahead of bytes
that are fsynced in the partial file, and ``prefix_sha256`` is the hash of
exactly those bytes. So after a drop, a crash or a kill, the next attempt
re-hashes the local prefix, trusts it only if the hash still matches, and
asks the server only for the rest.

Only a file whose size (and, where the remote has a shell, sha256) matches
the remote is renamed into place (``layout.py`` says where).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.lowlevel

from ..errors import (
    AFTER_SYNC,
    AsyncEmbedSyncError,
    NotACheckpointError,
    StillBeingWrittenError,
    VerificationError,
    translating_local_errors,
)
from ..fileio import fsync_directory
from ..layout import DownloadLayout, FileState
from ..progress import Progress, format_bytes
from .remote import Remote, RemoteFile, observe_outcome
from .settle import ListingTime

logger = logging.getLogger(__name__)

# The journal is advanced (fsync + atomic state write) every this many bytes,
# or every this many seconds, whichever comes first: a crash or a kill costs
# at most this much of each file in flight (on a slow link, the seconds).
CHECKPOINT_BYTES = 8 * 1024 * 1024
CHECKPOINT_SECONDS = 2.0
_REHASH_BLOCK = 4 * 1024 * 1024


@dataclass
class FileOutcome:
    name: str
    status: str  # "downloaded", "skipped", or "failed" (then ``error`` says why)
    size: int
    transferred: int = 0
    # Continued from bytes an earlier attempt or run had verified.
    resumed: bool = False
    verified_by: str = ""
    # What the journal vouches for after this attempt, and how far the attempt
    # moved it (never negative): a failed attempt reports them too, so that
    # the retry loop counts progress without reading the journal back.
    verified: int = 0
    gained: int = 0
    error: AsyncEmbedSyncError | None = None


async def download_file(remote: Remote, layout: DownloadLayout, remote_file: RemoteFile,
                        progress: Progress, listed: ListingTime | None = None,
                        check: Callable[[Path, str], str | None] | None = None) -> FileOutcome:
    """Bring one remote file into place, resuming from a verified prefix.

    ``listed``: when the listing that saw ``remote_file`` was taken, and the
    settle window (None: now, with the default window). ``check``: a new
    version that is to replace a complete, verified copy here must pass it
    (a message: why it is not a readable checkpoint; ``SyncOptions.check_checkpoint``).

    An error of ours ends the attempt as a "failed" outcome that carries
    it: ``TransferError`` (retryable: the verified prefix survives for the
    next attempt), ``StillBeingWrittenError`` (the prefix survives for the
    next run), ``VerificationError`` (the partial is discarded),
    ``LocalFileError``. A stop propagates.
    """
    listed = listed if listed is not None else ListingTime(time.time())
    cluster, name = remote.cluster.name, remote_file.name
    local = layout.local_copy(cluster, name, remote_file.size, remote_file.mtime)
    if local.up_to_date:
        logger.info("cluster %r: %s is up to date here (same size and mtime): skipped", cluster, name)
        progress.file_finished(cluster, name, "skipped")
        return FileOutcome(name, "skipped", remote_file.size)
    partial = PartialFile(layout, cluster, remote_file, local.state)
    try:
        await partial.open()
        verified_by = await _transfer(remote, partial, progress, listed, check)
    except AsyncEmbedSyncError as exc:
        return partial.outcome("failed", error=exc)
    finally:
        partial.close()
    resumed_from = partial.resumed_from
    logger.info("cluster %r: %s complete (%d bytes%s), verified by %s%s", cluster, name, remote_file.size,
                f", resumed at byte {resumed_from}" if resumed_from else "", verified_by,
                " against the server's sha256sum" if verified_by == "sha256" else " (the server has no shell)")
    return partial.outcome("downloaded", transferred=remote_file.size - resumed_from, resumed=resumed_from > 0,
                           verified_by=verified_by)


async def _transfer(remote: Remote, partial: PartialFile, progress: Progress, listed: ListingTime,
                    check: Callable[[Path, str], str | None] | None = None) -> str:
    """Fetch the rest of ``partial``, check it, move it into place; how it was verified.

    A file that changed during the copy, or whose last write is within the
    settle window, is still being written: its bytes stay a partial (the
    next run resumes them, and the server's hash of the finished file
    vouches for them), and it is not put in place."""
    cluster, name, remote_file = partial.cluster, partial.name, partial.remote_file
    remote_hash = asyncio.ensure_future(remote.sha256(name))
    progress.file_started(cluster, name, remote_file.size, partial.resumed_from)
    try:
        try:
            # No closing stat: the file ended early, which the position says.
            after = await _receive(remote, partial, progress) or remote_file
        except BaseException:
            # After a drop or a stop: what arrived is kept, so that the retry
            # asks only for the rest.
            await partial.checkpoint()
            raise
        # A small file fetched whole in this attempt, with nothing vouched
        # for yet, goes into place without a journal save of its own first:
        # a crash before the move fetches it again (less than a checkpoint
        # interval); a drop or a stop while the hash is awaited saves it then.
        unchanged = (after.size, after.mtime) == (remote_file.size, remote_file.mtime)
        whole_and_small = (partial.resumed_from == 0 and partial.state.verified_offset == 0
                           and partial.position == remote_file.size <= CHECKPOINT_BYTES and unchanged)
        if not whole_and_small:
            await partial.checkpoint()
        changed = _change_during_copy(remote_file, after, partial.position)
        if changed or listed.still_settling(remote_file.mtime):
            await partial.checkpoint()
            raise StillBeingWrittenError(cluster, name, changed or listed.settling_reason(remote_file.mtime),
                                         kept=format_bytes(partial.position))
        digest = partial.hasher.hexdigest()
        try:
            expected = await remote_hash
        except BaseException:
            await partial.checkpoint()
            raise
        if expected is not None and expected != digest:
            logger.info("cluster %r: %s does not match the server's sha256: discarded", cluster, name)
            await anyio.to_thread.run_sync(partial.discard)
            raise VerificationError(cluster, name, f"sha256 {digest[:16]}... locally, "
                                                   f"{expected[:16]}... on the server")
        if expected is None and partial.state.hash_needed:
            await anyio.to_thread.run_sync(partial.discard)
            raise VerificationError(cluster, name, "part of it was copied while it was still being written, "
                                                   "and the server has no shell to hash it: fetched again whole")
        verified_by = "sha256" if expected is not None else "size"
        if partial.replacing is not None and check is not None:
            # A verified copy is replaced only by a version that reads as a checkpoint.
            why = await anyio.to_thread.run_sync(check, partial.path, name)
            if why:
                await partial.checkpoint()
                raise NotACheckpointError(cluster, name, _change_of(partial.replacing, remote_file), why)
        # A version this close to its listing could be rewritten in the same
        # second at the same size: the next sync fetches it again.
        partial.state.recheck = listed.too_recent_to_trust(remote_file.mtime)
        await anyio.to_thread.run_sync(partial.move_into_place, digest, verified_by)
    except BaseException:
        progress.file_finished(cluster, name, "failed")
        raise
    finally:
        await _discard(remote_hash)
    progress.file_finished(cluster, name, "downloaded")
    return verified_by


def _change_of(old: FileState, new: RemoteFile) -> str:
    """How a file changed on the cluster since the copy here was verified, in words."""
    if old.remote_size != new.size:
        before, now = _two_sizes(old.remote_size, new.size)
        verb = "cut" if new.size < old.remote_size else "grown"
        return f"{verb} from the {before} verified here to {now}"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(new.mtime))
    return f"rewritten at the same size ({format_bytes(new.size)}), modified {when}"


def _two_sizes(before: int, now: int) -> tuple[str, str]:
    """Two different sizes as a change is said: "6.0 MiB", "8.5 MiB"; in bytes where a few
    KiB apart would read alike rounded ("3,145,728", "3,149,824 bytes")."""
    said = format_bytes(before), format_bytes(now)
    return said if said[0] != said[1] else (f"{before:,}", f"{now:,} bytes")


def _change_during_copy(listed: RemoteFile, after: RemoteFile, position: int) -> str:
    """How the file changed between its listing and the end of its copy, in words; "" if it did not."""
    if position != listed.size:
        return f"it ended at {format_bytes(position)} while it was copied, not at the {format_bytes(listed.size)} listed"
    if after.size != listed.size:
        verb = "grew" if after.size > listed.size else "shrank"
        before, now = _two_sizes(listed.size, after.size)
        return f"it {verb} from {before} to {now} while it was copied"
    if after.mtime != listed.mtime:
        return "it was modified while it was copied"
    return ""


async def _receive(remote: Remote, partial: PartialFile, progress: Progress) -> RemoteFile | None:
    """Write the remote bytes from ``partial.position`` to the file's end.

    Returns the closing stat: the size and mtime the server reported after
    the reads; None when the file ended early (it shrank).
    """
    read = remote.read(partial.name, partial.position, partial.remote_file.size)
    async with read:
        async for chunk in read.chunks():
            await partial.write(chunk)
            progress.advance(partial.cluster, partial.name, len(chunk))
            if partial.position - partial.state.verified_offset >= CHECKPOINT_BYTES \
                    or time.monotonic() - partial.checkpointed_at >= CHECKPOINT_SECONDS:
                await partial.checkpoint()
            # A stop (Ctrl-C, SIGTERM) is taken here, between blocks, where
            # the bytes, the hash and the position agree. Needed: while the
            # blocks arrive faster than they are written, the loop's only
            # suspensions are the shielded ones in write() and checkpoint()
            # (the next block is already there), and anyio delivers a cancel
            # at an unshielded suspension only: the file would be fetched to
            # its end first.
            await anyio.lowlevel.checkpoint_if_cancelled()
    return read.closing_stat


async def _discard(request: asyncio.Future) -> None:
    """Cancel ``request`` if it is still running, and observe how it ended.

    Only the request's own outcome is ignored: a cancel aimed at this task
    while it waits here still propagates (``contextlib.suppress(BaseException)``
    around the ``await`` would swallow it, and the task would carry on)."""
    request.add_done_callback(observe_outcome)
    if not request.done():
        request.cancel()
        await asyncio.wait([request])


class PartialFile:
    """One download in flight: the partial file's descriptor, the hasher over
    its bytes, the journal state that vouches for a prefix of them, and the
    write position.

    ``state`` is what this attempt trusts (a prefix that still hashes to the
    journal's record, or nothing); ``recorded`` is the offset the journal on
    disk vouches for, which the attempt reports as verified, and gained.
    """

    def __init__(self, layout: DownloadLayout, cluster: str, remote_file: RemoteFile,
                 journal: FileState | None):
        self.layout, self.cluster, self.remote_file = layout, cluster, remote_file
        self.name = remote_file.name
        self.path = layout.partial_path(cluster, self.name)
        # A complete copy in place, verified, which this download is to replace: its record
        # stays the journal's until the new version is in place; this partial's is apart.
        self.replacing = journal if journal is not None and journal.complete \
            and layout.final_path(cluster, self.name).exists() else None
        if self.replacing is not None:
            journal = layout.load_replacement_state(cluster, self.name)
        self._journal = journal  # as loaded when the attempt began
        # A complete journal vouches for the file in place, not for a partial: nothing of this one yet.
        self.recorded = self._recorded_at_start = journal.verified_offset if journal and not journal.complete else 0
        self.state = FileState(remote_file.size, remote_file.mtime)
        self.hasher = hashlib.sha256()
        self.position = self.resumed_from = 0
        self._fd: int | None = None
        # When the journal last vouched for this file's bytes (or the attempt began).
        self.checkpointed_at = time.monotonic()

    async def open(self) -> None:
        """Make the folders, pick the resume point, open the partial, and drop
        whatever lies past the trusted prefix.

        In one worker thread: creating a file takes a few hundred
        microseconds here, longer while other files' fsyncs hold the journal,
        and the event loop would wait on each."""
        await anyio.to_thread.run_sync(self._open)

    def _open(self) -> None:
        self.layout.prepare(self.cluster)
        resumed = _verified_prefix(self.path, self._journal, self.remote_file)
        if resumed is not None:
            self.state, self.hasher = resumed
        self.position = self.resumed_from = self.state.verified_offset
        # O_NOFOLLOW: a symlink planted at the partial path must not redirect
        # our writes outside the download directory. The partial's own writes
        # are translated here; the journal and the folders translate theirs.
        with translating_local_errors(self.path, "write", AFTER_SYNC):
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            os.ftruncate(self._fd, self.position)

    async def write(self, chunk: bytes) -> None:
        """Write ``chunk`` at the position and hash it.

        In a worker thread: pwrite and sha256 release the GIL, so they
        overlap with decrypting the next blocks. Shielded: the bytes, the
        hash and the position move together.
        """
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._write_and_hash, chunk)
        self.position += len(chunk)

    def _write_and_hash(self, data: bytes) -> None:
        view, offset = memoryview(data), self.position
        with translating_local_errors(self.path, "write", AFTER_SYNC):
            while view:
                written = os.pwrite(self._fd, view, offset)
                view = view[written:]
                offset += written
        self.hasher.update(data)

    async def checkpoint(self) -> None:
        """Make the bytes up to the position durable, then vouch for them in the journal."""
        if self.position == self.state.verified_offset and self.state.prefix_sha256:
            self.checkpointed_at = time.monotonic()
            return
        advanced = dataclasses.replace(self.state, verified_offset=self.position,
                                       prefix_sha256=self.hasher.hexdigest())
        # Shielded, and ``state`` moves only once the save is done: a cancel
        # here must not leave memory believing in a checkpoint the disk lacks
        # (the closing checkpoint would then skip it as already made).
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._fsync_and_save, advanced)
        self.state.verified_offset, self.state.prefix_sha256 = advanced.verified_offset, advanced.prefix_sha256
        self.recorded = advanced.verified_offset
        self.checkpointed_at = time.monotonic()

    def _fsync_and_save(self, state: FileState) -> None:
        # The order is the invariant: bytes durable first, then the state that
        # vouches for them.
        with translating_local_errors(self.path, "write", AFTER_SYNC):
            os.fsync(self._fd)
        if self.replacing is not None:
            self.layout.save_replacement_state(self.cluster, self.name, state)
        else:
            self.layout.save_state(self.cluster, self.name, state)

    def move_into_place(self, digest: str, verified_by: str) -> None:
        """Rename the complete, verified partial to its final path and record it complete."""
        final = self.layout.final_path(self.cluster, self.name)
        with translating_local_errors(final, "write", AFTER_SYNC):
            os.fsync(self._fd)
            os.replace(self.path, final)
            fsync_directory(final.parent)
            self.layout.record_complete(self.cluster, self.name, self.state, digest, verified_by)

    def discard(self) -> None:
        """Drop the partial and its state: the next attempt starts at 0 (a copy it was to replace stays)."""
        if self.replacing is not None:
            self.layout.forget_replacement(self.cluster, self.name)
        else:
            self.layout.forget(self.cluster, self.name)
        self.recorded = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def outcome(self, status: str, **details) -> FileOutcome:
        return FileOutcome(self.name, status, self.remote_file.size, verified=self.recorded,
                           gained=max(self.recorded - self._recorded_at_start, 0), **details)


def _verified_prefix(path: Path, state: FileState | None, remote_file: RemoteFile):
    """The state to resume from and a hasher over the partial's verified prefix, or None: start at 0.

    The prefix is trusted only while the local bytes still hash to what was
    recorded (a partial damaged on disk starts again at 0). Where the remote
    file changed since (it grew while it was being written), the prefix is
    kept if the file is still at least that long, and marked: only the
    server's sha256 of the whole file can then vouch for it.
    """
    if state is None or state.complete or remote_file.size < state.verified_offset:
        return None
    hasher = hashlib.sha256()
    remaining = state.verified_offset
    try:
        with open(path, "rb") as partial:
            while remaining:
                block = partial.read(min(_REHASH_BLOCK, remaining))
                if not block:
                    break
                hasher.update(block)
                remaining -= len(block)
    except OSError:
        return None
    if remaining or hasher.hexdigest() != state.prefix_sha256:
        return None
    if not state.matches(remote_file.size, remote_file.mtime):
        state = dataclasses.replace(state, remote_size=remote_file.size, remote_mtime=remote_file.mtime,
                                    hash_needed=state.hash_needed or state.verified_offset > 0)
    return state, hasher
