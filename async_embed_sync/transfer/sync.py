"""The sync phase: every cluster at once, files shared fairly between them.

One task per cluster connects, lists and plans; one task per file waits for
one of ``max_parallel`` slots and downloads. Slots are handed to the cluster
with the fewest files in flight, so a cluster with 64 small files cannot
starve one with 8 large ones. A dropped connection is re-established (with
backoff, a bounded number of times without progress) and the file resumes at
its verified offset. A failing cluster never stops the others; its errors
land in the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from ..config import ClusterConfig
from ..errors import (
    AsyncEmbedSyncError,
    ConnectError,
    ConnectionDroppedError,
    HandshakeDroppedError,
    LinkLostError,
    LocalFileError,
    NoCheckpointsError,
    NotACheckpointError,
    NotEnoughSpaceError,
    RemoteError,
    RemoteFileGoneError,
    StillBeingWrittenError,
    SyncFailedError,
    TransferError,
    UnsafeRemoteNameError,
    VerificationError,
    some_names,
)
from ..gone import gone_from_cluster_notice
from ..layout import DownloadLayout
from ..progress import Progress, format_bytes, format_rate
from ..termination import run_stoppable
from .download import FileOutcome, download_file
from .lock import DownloadDirLock
from .prompts import Prompter
from .options import SyncOptions
from .remote import Remote, RemoteFile
from .settle import ListingTime

logger = logging.getLogger(__name__)

@dataclass
class ClusterReport:
    name: str
    files: int = 0
    total_bytes: int = 0
    transferred: int = 0
    downloaded: int = 0
    skipped: int = 0
    resumed: int = 0
    reconnects: int = 0
    seconds: float = 0.0
    method: str = ""  # "sftp", or "exec" where the server has no SFTP
    verified_by: set[str] = field(default_factory=set)
    failures: list[AsyncEmbedSyncError] = field(default_factory=list)
    # Files here that the cluster no longer holds, and what is said of them
    # (``gone.py``: verified copies are merged, others left out).
    local_only: list[str] = field(default_factory=list)
    local_only_notice: str = ""
    # Files still being written on the cluster: kept as partials, not in place.
    still_writing: list[StillBeingWrittenError] = field(default_factory=list)
    fetched_names: set[str] = field(default_factory=set)
    polls: int = 0  # listings of the cluster started afresh: 1, or each poll of --follow
    said_writing: set[str] = field(default_factory=set)  # still being written, and said so
    # Listed, then deleted on the cluster before they could be read (a purge, a re-split):
    # not a failure; the listing saved is the one taken after, without them.
    gone: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [str(failure) for failure in self.failures]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.still_writing

    def start_poll(self) -> None:
        """``--follow`` polls again: what the last poll found still being written, or failed
        in a way a new attempt may mend, is judged anew."""
        self.still_writing = []
        self.gone = []
        self.failures = [failure for failure in self.failures if not failure.rerun_fixes]

    def gone_notice(self) -> str:
        """One line for the files deleted on the cluster after they were listed."""
        return (f"{self.name}: {some_names(self.gone)} deleted on the cluster after the listing (a purge, or a "
                f"re-split in progress?): not fetched, and left out of the listing the merge takes.")

    def lacking(self) -> str:
        """What a failed cluster lacks, in a few words ("" before its listing)."""
        absent = self.files - self.downloaded - self.skipped
        return f"{absent} of {self.files} files missing" if self.files and absent else ""

    def record(self, outcome: FileOutcome) -> None:
        if outcome.status == "skipped":
            self.skipped += 1
            return
        self.said_writing.discard(outcome.name)  # complete: if it is written again, that is said again
        if outcome.name not in self.fetched_names:  # fetched again after a change: one file still
            self.fetched_names.add(outcome.name)
            self.downloaded += 1
        self.transferred += outcome.transferred
        self.resumed += outcome.resumed
        self.verified_by.add(outcome.verified_by)


@dataclass
class SyncReport:
    clusters: dict[str, ClusterReport]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.clusters.values())

    @property
    def transferred(self) -> int:
        return sum(c.transferred for c in self.clusters.values())

    @property
    def still_writing(self) -> dict[str, list[str]]:
        """Per cluster, the files still being written there (none: not in it)."""
        return {name: [e.name for e in c.still_writing] for name, c in self.clusters.items() if c.still_writing}

    def raise_for_failures(self) -> None:
        failures = {name: (c.failures[0], c.lacking()) for name, c in self.clusters.items() if c.failures}
        if failures or self.still_writing:
            fetched = any(c.transferred or c.downloaded or c.skipped or c.resumed for c in self.clusters.values())
            raise SyncFailedError(failures, anything_fetched=fetched, still_writing=self.still_writing)

    def summary(self) -> str:
        """One row per cluster, within 80 columns for names up to 8 characters."""
        width = max([7, *(len(name) for name in self.clusters)])
        header = f"{'cluster':<{width}} {'files':>5} {'size':>9} {'fetched':>9} {'time':>6} {'rate':>10} " \
                 f"{'resumed':>7} {'skipped':>7} how"
        lines = [header]
        for c in self.clusters.values():
            rate = format_rate(c.transferred / c.seconds) if c.seconds > 0 and c.transferred else "-"
            verified = "+".join(sorted(v for v in c.verified_by if v)) or "-"
            how = f"{c.method or '-'}/{verified}" if not c.failures else "FAILED"
            how += f" ({len(c.still_writing)} writing)" if c.still_writing and not c.failures else ""
            lines.append(f"{c.name:<{width}} {c.files:>5} {format_bytes(c.total_bytes):>9} "
                         f"{format_bytes(c.transferred):>9} {c.seconds:>5.1f}s {rate:>10} "
                         f"{c.resumed:>7} {c.skipped:>7} {how}")
        lines += [c.local_only_notice for c in self.clusters.values() if c.local_only_notice]
        lines += [c.gone_notice() for c in self.clusters.values() if c.gone]
        return "\n".join(lines)


def sync(clusters: list[ClusterConfig], download_dir: str, progress: Progress,
         options: SyncOptions = SyncOptions(), watch: Watch | None = None,
         break_lock: bool = False) -> SyncReport:
    """Sync every cluster into ``download_dir`` (``watch``: polled, see ``sync_clusters``); holds the
    directory's lock (``break_lock``: as ``--break-lock``, see ``lock.py``)."""
    with DownloadDirLock(download_dir, break_lock=break_lock):
        return run_stoppable(sync_clusters, clusters, download_dir, progress, options, watch)


async def sync_clusters(clusters: list[ClusterConfig], download_dir: str, progress: Progress,
                        options: SyncOptions = SyncOptions(), watch: Watch | None = None) -> SyncReport:
    """Sync every cluster once; with ``watch`` (``--follow``), again every ``watch.poll``
    seconds over the same connections, until ``watch.settled`` says the wait is over."""
    layout = DownloadLayout(download_dir)
    slots = FairSlots(options.max_parallel, options.bytes_in_flight)
    report = SyncReport({c.name: ClusterReport(c.name) for c in clusters})
    links = {c.name: ClusterLink(c, options, progress, report.clusters[c.name]) for c in clusters}
    # Said at once: the SSH stack's import, the handshakes and a passphrase take seconds.
    progress.note(f"connecting to {', '.join(c.name for c in clusters)} ...")
    try:
        while True:
            disk = DiskBudget(download_dir, options.free_space(download_dir))
            async with anyio.create_task_group() as tasks:
                for cluster in clusters:
                    tasks.start_soon(_sync_cluster, cluster, layout, slots, progress, options,
                                     report.clusters[cluster.name], links[cluster.name], watch is not None, disk)
            if watch is None or watch.settled(report):
                return report
            await anyio.sleep(watch.poll)
            for cluster_report in report.clusters.values():
                cluster_report.start_poll()
            for link in links.values():
                link.revive()
    finally:
        with anyio.CancelScope(shield=True):
            for link in links.values():
                await link.close()
        progress.close()


class DiskBudget:
    """The download directory's free space, measured as a poll starts, shared by the
    clusters: each cluster, once its listing is complete, reserves the bytes it still
    has to fetch (listed size minus the verified bytes kept), and is refused before it
    fetches anything if they do not fit beside what the clusters before it reserved."""

    def __init__(self, directory: str, free: tuple[int, str] | None):
        self.directory = directory
        self.free, self.mount = free if free is not None else (None, "")
        self.reserved = 0

    def reserve(self, cluster: str, needed: int) -> NotEnoughSpaceError | None:
        """Reserve ``needed`` bytes for ``cluster``; the error that refuses it if they do not fit."""
        if self.free is None or needed <= 0:
            return None
        available = max(self.free - self.reserved, 0)
        if needed > available:
            return NotEnoughSpaceError(cluster, format_bytes(needed), format_bytes(available), self.mount,
                                       self.directory)
        self.reserved += needed
        return None


class Watch(Protocol):
    """What ``--follow`` decides between polls (``follow.py``)."""

    poll: float  # seconds from the end of one poll to the next

    def settled(self, report: SyncReport) -> bool:
        """After each poll: True when the wait is over (the set is complete, a failure a
        new poll cannot mend, or the wait gave up); else the status is said and the
        clusters are polled again."""
        ...


@dataclass
class _ClusterRun:
    """What the file tasks of one cluster's sync share."""

    link: ClusterLink
    layout: DownloadLayout
    slots: FairSlots
    progress: Progress
    options: SyncOptions
    report: ClusterReport
    # Verified bytes kept of each file still to fetch: the journal's at the
    # listing, then what each attempt reports.
    kept: dict[str, int] = field(default_factory=dict)
    # Files this run does not fetch again: still being written, or given up.
    not_again: set[str] = field(default_factory=set)
    following: bool = False  # --follow: files still being written are waited for
    disk: DiskBudget | None = None
    # Refused for lack of disk space: its file tasks end without fetching.
    disk_refused: bool = False
    rounds: int = 0  # listings taken
    planned: int = 0  # files started, over every round

    def kept_summary(self) -> str:
        """What a cluster given up keeps, verified: "2 file(s) complete and 1.8 MiB of big.npy"; "" for nothing."""
        partial = {name: kept for name, kept in self.kept.items() if kept}
        parts = [f"{self.report.downloaded} file(s) complete"] if self.report.downloaded else []
        if len(partial) == 1:
            [(name, kept)] = partial.items()
            parts.append(f"{format_bytes(kept)} of {name}")
        elif partial:
            parts.append(f"{format_bytes(sum(partial.values()))} of {len(partial)} files in progress")
        return " and ".join(parts)


async def _sync_cluster(cluster: ClusterConfig, layout: DownloadLayout, slots: FairSlots,
                        progress: Progress, options: SyncOptions, report: ClusterReport, link: ClusterLink,
                        following: bool = False, disk: DiskBudget | None = None) -> None:
    """List, fetch what is not here, then list again until a listing finds every file here
    as the cluster holds it: a file rewritten on the cluster after its copy (a job re-run
    mid-sync) is fetched again, so that what the merge takes is one version of the set,
    the one the last listing saw. A file that keeps changing is still being written.
    ``following`` (``--follow``): a folder with no checkpoint yet is not an error (the
    jobs have not written one yet), and a file still being written is waited for."""
    started = time.monotonic()
    run = _ClusterRun(link, layout, slots, progress, options, report, following=following, disk=disk)
    link.kept = run.kept_summary
    report.polls += 1
    slots.register(cluster.name)
    try:
        listing, fetched = await _sync_round(run, fetch=True)
        while fetched:
            # The last round checks only: what changed yet again is named, not chased.
            fetch = run.rounds <= options.retries
            listing, fetched = await _sync_round(run, fetch=fetch)
            if not fetch:
                for entry in fetched:
                    _still_writing(run, StillBeingWrittenError(
                        cluster.name, entry.name, f"it changed on the cluster again after each of "
                                                  f"{run.rounds - 1} copies in this run", kept=""))
                break
        report.files = len(listing)
        report.total_bytes = sum(entry.size for entry in listing.values())
        if not run.disk_refused:  # refused for lack of space: nothing here changed
            # A new version that is no readable checkpoint did not replace the verified copy:
            # the listing the merge takes names that copy (as verified), so a merge takes it.
            for failure in report.failures:
                state = layout.load_state(cluster.name, failure.name) \
                    if isinstance(failure, NotACheckpointError) else None
                if state is not None and state.complete and failure.name in listing:
                    listing[failure.name] = RemoteFile(failure.name, state.remote_size, state.remote_mtime)
            # What the cluster holds now, so that the merge takes exactly that.
            layout.save_listing(cluster.name, listing.values())
            report.local_only = layout.local_only(cluster.name, listing)
            report.local_only_notice = gone_from_cluster_notice(layout, cluster.name, report.local_only)
        if not report.files and report.ok and not following:
            raise NoCheckpointsError(cluster.name, cluster.remote_dir, cluster.patterns)
    except AsyncEmbedSyncError as exc:
        _fail(report, progress, exc)
    finally:
        slots.unregister(cluster.name)
        # From the end of the login, not from the start: the time a passphrase or a
        # 2FA code took to type is not the transfer's, nor in its rate.
        if link.connected_at is not None:
            started = max(started, link.connected_at)
        report.seconds += time.monotonic() - started


async def _sync_round(run: _ClusterRun, fetch: bool) -> tuple[dict[str, RemoteFile], list[RemoteFile]]:
    """One listing, and (``fetch``) the download of every listed file not here as listed,
    as the listing arrives. The listing by name, and the files not here as listed (fetched,
    or to fetch). Raises the listing's error once the files already started are done."""
    cluster, layout, progress, report = run.link.cluster, run.layout, run.progress, run.report
    remote = await run.link.get()
    listed_at = ListingTime(time.time(), run.options.settle)
    first = not run.rounds
    run.rounds += 1
    if first:  # counted anew at each poll
        report.files = report.total_bytes = 0
    listing: dict[str, RemoteFile] = {}
    changed: list[RemoteFile] = []
    listing_error: AsyncEmbedSyncError | None = None
    # The files wait for the listing's end: their bytes still to fetch are checked against
    # the disk's free space before any is written.
    planned_before, needed = run.planned, 0
    listed_all = anyio.Event()
    run.slots.listing(cluster.name)
    async with anyio.create_task_group() as tasks:
        try:
            async with contextlib.aclosing(remote.scan_checkpoints()) as entries:
                async for entry in entries:
                    if isinstance(entry, UnsafeRemoteNameError):
                        if first:
                            _fail(report, progress, entry)
                        continue
                    listing[entry.name] = entry
                    if first:
                        report.files += 1
                        report.total_bytes += entry.size
                    if entry.name in run.not_again:
                        continue  # said once in this run; the next run (or poll) resumes it
                    local = layout.local_copy(cluster.name, entry.name, entry.size, entry.mtime)
                    if local.up_to_date or (local.complete_as_listed and entry.name in report.fetched_names):
                        if first and report.polls == 1:
                            report.skipped += 1
                        continue
                    if local.state is not None and local.kept == entry.size \
                            and local.state.matches(entry.size, entry.mtime) \
                            and listed_at.still_settling(entry.mtime):
                        # Copied whole at this size already, and still within its settle window:
                        # nothing to fetch until it settles or changes.
                        _still_writing(run, StillBeingWrittenError(
                            cluster.name, entry.name, listed_at.settling_reason(entry.mtime),
                            kept=format_bytes(entry.size)))
                        continue
                    changed.append(entry)
                    if not fetch:
                        continue
                    run.planned += 1
                    run.kept[entry.name] = local.kept
                    needed += max(entry.size - local.kept, 0)
                    progress.file_planned(cluster.name, entry.name, entry.size)
                    # Hashed on the server while the files travel, in a few large batches.
                    remote.prefetch_sha256(entry.name, entry.size)
                    tasks.start_soon(_sync_file, run, entry, listed_at, listed_all)
        except AsyncEmbedSyncError as exc:
            # Raised here, it would reach the caller wrapped in the task
            # group's ExceptionGroup; files already started still finish.
            listing_error = exc
        finally:
            refused = run.disk.reserve(cluster.name, needed) if run.disk is not None and fetch else None
            if refused is not None:
                run.disk_refused = True
                run.planned = planned_before  # none of them takes a slot
                _fail(report, progress, refused)
            listed_all.set()
        run.slots.set_need(cluster.name, run.planned)
        if listing_error is None:  # said now, not once the files are done
            logger.info("cluster %r: %d file(s) listed in %s, %d to fetch%s", cluster.name, len(listing),
                        cluster.remote_dir, len(changed) if fetch else 0,
                        "" if first else " (changed or new since the last listing)")
    if listing_error is not None:
        raise listing_error
    return listing, changed


async def _sync_file(run: _ClusterRun, remote_file: RemoteFile, listed_at: ListingTime,
                     listed_all: anyio.Event) -> None:
    await listed_all.wait()
    if run.disk_refused:
        run.not_again.add(remote_file.name)
        return
    window = min(remote_file.size, run.options.read_ahead)
    async with run.slots.slot(run.link.cluster.name, window):
        try:
            run.report.record(await _download_with_retries(run, remote_file, listed_at))
        except StillBeingWrittenError as exc:
            _still_writing(run, exc)
        except RemoteFileGoneError as exc:
            # Not a failure of the cluster's sync: the next round's listing (saved for the
            # merge) no longer holds it; a file of that name written again is fetched again.
            run.kept.pop(remote_file.name, None)
            if remote_file.name not in run.report.gone:
                run.report.gone.append(remote_file.name)
                run.progress.note(str(exc))
            logger.info("cluster %r: %s was deleted on the cluster after it was listed", exc.cluster, exc.name)
        except AsyncEmbedSyncError as exc:
            run.not_again.add(remote_file.name)
            _fail(run.report, run.progress, exc)


def _disk_full(exc: BaseException) -> bool:
    """A local write that failed for lack of space (or quota, or the file size limit)."""
    cause = exc.__cause__
    return isinstance(exc, LocalFileError) and isinstance(cause, OSError) \
        and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _still_writing(run: _ClusterRun, exc: StillBeingWrittenError) -> None:
    """One line per file, shown even with --quiet: the run cannot end complete without it
    (with --follow, once, not at every poll that finds it still being written)."""
    run.not_again.add(exc.name)
    run.report.still_writing.append(exc)
    if exc.name not in run.report.said_writing:
        run.report.said_writing.add(exc.name)
        run.progress.error(exc.while_following() if run.following else str(exc))
    logger.info("cluster %r: %s is still being written (%s): kept as a partial", exc.cluster, exc.name, exc.why)


async def _download_with_retries(run: _ClusterRun, remote_file: RemoteFile, listed_at: ListingTime) -> FileOutcome:
    """Attempts continue while they make progress; ``retries`` in a row
    without a byte gained give the file up. A verification failure earns
    one fresh download (the partial was discarded), not more. A file given
    up still adds what it fetched and kept in this run to the report's
    bytes fetched."""
    cluster, name, options = run.link.cluster.name, remote_file.name, run.options
    stalled_attempts = 0
    verification_failed = False
    fetched_by_failed_attempts = 0
    try:
        while True:
            outcome = await _attempt(run, remote_file, listed_at)
            exc = outcome.error
            if exc is None:
                del run.kept[name]
                outcome.transferred += fetched_by_failed_attempts
                outcome.resumed = outcome.resumed or fetched_by_failed_attempts > 0
                return outcome
            run.kept[name] = outcome.verified
            if isinstance(exc, VerificationError):
                fetched_by_failed_attempts = 0  # discarded with the partial
                if verification_failed:
                    raise exc
                verification_failed = True
                continue
            fetched_by_failed_attempts += outcome.gained
            stalled_attempts = 0 if outcome.gained else stalled_attempts + 1
            if not (isinstance(exc, RemoteError) and exc.retryable) or stalled_attempts > options.retries:
                raise exc
            if not run.link.lost and not isinstance(exc, ConnectionDroppedError):
                # A drop fails every file in flight at once: the link says it, once.
                run.progress.note(f"{exc} (retrying)")
            logger.info("cluster %r: %s: attempt failed (%s); %d byte(s) verified so far; retrying in %.1f s",
                        cluster, name, exc.cause, outcome.verified, options.delay(stalled_attempts))
            await anyio.sleep(options.delay(stalled_attempts))
    except AsyncEmbedSyncError:
        run.report.transferred += fetched_by_failed_attempts
        raise


async def _attempt(run: _ClusterRun, remote_file: RemoteFile, listed_at: ListingTime) -> FileOutcome:
    """One attempt at the file, on the link as it is now."""
    try:
        remote = await run.link.get()
    except RemoteError as exc:  # as a failed download: retried if it may pass
        return FileOutcome(remote_file.name, "failed", remote_file.size,
                           verified=run.kept[remote_file.name], error=exc)
    return await download_file(remote, run.layout, remote_file, run.progress, listed_at,
                               check=run.options.check_checkpoint)


def _fail(report: ClusterReport, progress: Progress, exc: AsyncEmbedSyncError) -> None:
    # Said once: a blocked cluster folder fails each of its files alike; a full disk
    # fails each file (and the listing's save) at a path of its own: one paragraph per cluster.
    if str(exc) in report.errors:
        return
    if _disk_full(exc) and any(_disk_full(failure) for failure in report.failures):
        logger.info("cluster %r: %s", report.name, exc)
        return
    report.failures.append(exc)
    progress.error(str(exc))


class ClusterLink:
    """A cluster's one connection, re-established after a drop.

    The first connect fails fast (a wrong host or key will not fix itself);
    a reconnect after a drop retries with backoff, since the network may be
    coming back.
    """

    def __init__(self, cluster: ClusterConfig, options: SyncOptions, progress: Progress,
                 report: ClusterReport, kept: Callable[[], str] = lambda: ""):
        self.cluster = cluster
        self._options = options
        self._progress = progress
        self._report = report
        self.kept = kept  # what is kept and verified, for the error that gives up
        self._remote: Remote | None = None
        self._lock = asyncio.Lock()
        self._drops = 0
        self._given_up: LinkLostError | None = None
        self.connected_at: float | None = None  # when the first login ended (time.monotonic())

    async def get(self) -> Remote:
        async with self._lock:
            if self._given_up is not None:
                raise self._given_up  # every file in flight learns it, and it is said once
            if self._remote is not None and not self._remote.is_closed:
                return self._remote
            if self._remote is None:
                self._remote = await self._first_connect()
                return self._remote
            return await self._reconnect()

    async def _first_connect(self) -> Remote:
        """The first connect fails fast, except where the host answered and the connection
        dropped during the handshake: a drop, retried as a reconnect is (with backoff, up to
        ``retries`` more times)."""
        name, retries = self.cluster.name, self._options.retries
        for attempt in range(retries + 1):
            try:
                return await self._connect()
            except HandshakeDroppedError as exc:
                if attempt == retries:
                    raise
                self._report.reconnects += 1
                delay = self._options.delay(attempt)
                self._progress.note(f"{name}: the connection dropped during the SSH handshake; retry "
                                    f"{attempt + 1} of {retries} in {delay:.1f} s.")
                logger.info("cluster %r: %s; retrying in %.1f s", name, exc.reason, delay)
                await anyio.sleep(delay)
        raise AssertionError("unreachable")

    async def _reconnect(self) -> Remote:
        """After a drop: one attempt, then up to ``retries`` more. The cluster
        was reached in this run, so what fails now is the link: said so."""
        name, retries = self.cluster.name, self._options.retries
        await self._remote.close()
        self._drops += 1
        self._progress.note(f"{name}: connection lost; reconnecting.")
        for attempt in range(retries + 1):
            self._report.reconnects += 1
            logger.info("cluster %r: reconnecting (attempt %d of %d: once, then up to --retries %d more)",
                        name, attempt + 1, retries + 1, retries)
            try:
                self._remote = await self._connect()
            except (ConnectError, TransferError) as exc:
                if attempt == retries:
                    target = self._remote.target
                    self._given_up = LinkLostError(name, target.hostname, target.port, drops=self._drops,
                                                   attempts=retries + 1, last_cause=exc.reason,
                                                   kept=self.kept())
                    raise self._given_up from exc
                delay = self._options.delay(attempt)
                self._progress.note(f"{name}: reconnecting failed ({exc.reason}); retry {attempt + 1} "
                                    f"of {retries} in {delay:.1f} s.")
                await anyio.sleep(delay)
                continue
            self._progress.note(f"{name}: reconnected; the files in flight resume at their verified offsets.")
            return self._remote
        raise AssertionError("unreachable")

    def revive(self) -> None:
        """A new poll (``--follow``) tries a link given up again: the network may be back."""
        self._given_up = None

    @property
    def lost(self) -> bool:
        """The connection dropped (it is re-established by the next ``get``)."""
        return self._remote is not None and self._remote.is_closed

    async def _connect(self) -> Remote:
        remote = await self._options.connect(self.cluster, self._options)
        if self.connected_at is None:
            self.connected_at = time.monotonic()
        self._report.method = remote.method
        logger.info("cluster %r: connected to %s:%d as %r; files over %s", self.cluster.name,
                    remote.target.hostname, remote.target.port, remote.target.username,
                    "SFTP" if remote.method == "sftp" else "exec channels (the server has no SFTP)")
        return remote

    async def close(self) -> None:
        if self._remote is not None:
            with anyio.CancelScope(shield=True):
                await self._remote.close()


class FairSlots:
    """At most ``limit`` files in flight, shared between clusters by need.

    A cluster is registered when its sync starts, still listing, then told
    how many files it has to fetch. Shares are computed by water-filling:
    a cluster that needs fewer than an equal share gets what it needs, the
    others split the rest. A cluster still listing counts as needing a full
    share, so that the cluster whose listing returns first cannot take every
    slot (its files would hold them for minutes while the other link idles).
    """

    def __init__(self, limit: int, byte_budget: int | None = None):
        if limit < 1:
            raise ValueError("max_parallel must be at least 1")
        self._limit = limit
        # Bytes the files in flight may hold: a file is admitted while its
        # cost fits, or when nothing is in flight (a file larger than the
        # budget still goes, alone).
        self._budget = byte_budget
        self._bytes = 0
        self._cost: dict[asyncio.Future, int] = {}
        self._held: dict[str, int] = {}
        self._files: dict[str, int | None] = {}  # files to fetch; None: still listing
        self._finished: dict[str, int] = {}
        self._waiting: dict[str, deque[asyncio.Future]] = {}

    def register(self, owner: str) -> None:
        self._held[owner] = 0
        self._files[owner] = None
        self._finished[owner] = 0
        self._waiting[owner] = deque()

    def listing(self, owner: str) -> None:
        """``owner`` lists again: until ``set_need``, it may need a full share."""
        self._files[owner] = None
        self._dispatch()

    def set_need(self, owner: str, files: int) -> None:
        """``owner`` has ``files`` to fetch in all, counting those already fetched (its listing is complete)."""
        self._files[owner] = files
        self._dispatch()

    def unregister(self, owner: str) -> None:
        for mapping in (self._held, self._files, self._finished, self._waiting):
            mapping.pop(owner, None)
        self._dispatch()

    def _need(self, owner: str) -> int | None:
        files = self._files[owner]
        return None if files is None else files - self._finished[owner]

    @asynccontextmanager
    async def slot(self, owner: str, cost: int = 0):
        """One file in flight; ``cost``: the bytes it may hold (its read window)."""
        waiter = asyncio.get_running_loop().create_future()
        self._cost[waiter] = cost
        self._waiting[owner].append(waiter)
        self._dispatch()
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(owner, cost)  # granted just as we were cancelled
            else:
                self._cost.pop(waiter, None)
                if waiter in self._waiting[owner]:
                    self._waiting[owner].remove(waiter)
                self._dispatch()  # a file behind it may fit now
            raise
        try:
            yield
        finally:
            self._release(owner, cost)

    def _release(self, owner: str, cost: int = 0) -> None:
        self._bytes -= cost
        self._held[owner] -= 1
        self._finished[owner] += 1
        self._dispatch()

    def _shares(self) -> dict[str, int]:
        needs = {owner: self._need(owner) for owner in self._files}
        # A cluster still listing (need None) may need every slot.
        by_need = sorted(needs, key=lambda o: self._limit if needs[o] is None else needs[o])
        shares, remaining = {}, self._limit
        for position, owner in enumerate(by_need):
            equal = remaining // (len(by_need) - position)
            need = needs[owner]
            shares[owner] = equal if need is None else min(need, equal)
            remaining -= shares[owner]
        return shares

    def _dispatch(self) -> None:
        free = self._limit - sum(self._held.values())
        shares = self._shares()
        while free > 0:
            for queue in self._waiting.values():
                while queue and queue[0].cancelled():
                    queue.popleft()
            candidates = [o for o, q in self._waiting.items()
                          if q and self._held[o] < shares[o] and self._fits(self._cost.get(q[0], 0))]
            if not candidates:
                return
            owner = min(candidates, key=lambda o: self._held[o])
            self._held[owner] += 1
            free -= 1
            waiter = self._waiting[owner].popleft()
            self._bytes += self._cost.pop(waiter, 0)
            waiter.set_result(None)

    def _fits(self, cost: int) -> bool:
        return self._budget is None or self._bytes == 0 or self._bytes + cost <= self._budget
