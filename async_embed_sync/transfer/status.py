"""``status``: what each cluster holds against what is here; nothing is downloaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import anyio

from ..config import ClusterConfig
from ..errors import NOTHING_CHANGED, AsyncEmbedSyncError, NoCheckpointsError
from ..gone import gone_from_cluster_notice, sort_gone
from ..layout import DownloadLayout
from ..progress import format_bytes
from ..termination import run_stoppable
from .lock import UNKNOWN, Holder, read_holder
from .prompts import Prompter
from .remote import ClusterRemote


@dataclass
class ClusterStatus:
    name: str
    remote_files: int = 0
    remote_bytes: int = 0
    complete: int = 0
    partial: int = 0
    partial_bytes: int = 0
    partial_of: int = 0
    changed: int = 0
    to_fetch: int = 0  # on the cluster, nothing of it here yet
    only_here: int = 0  # here, but no longer on the cluster
    kept: int = 0  # of those, the copies a sync verified (kept here, gone from the cluster): the merge takes them
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # refused names, local-only files

    def line(self, width: int = 8) -> str:
        if self.error:
            # The paragraph would wrap across the columns; it goes to stderr, after the table.
            return f"{self.name:<{width}} error (see below)"
        return (f"{self.name:<{width}} {self.remote_files:>6} {format_bytes(self.remote_bytes):>9} "
                f"{self.complete:>8} {self.partial_column():>10} {self.changed:>7} {self.to_fetch:>8} "
                f"{self.only_here:>9}")

    def partial_column(self) -> str:
        # Rounded down, and below 100 %: a partial is not complete until it is verified.
        return f"{self.partial} ({self.percent()} %)" if self.partial_of else f"{self.partial}"

    def percent(self) -> int:
        return min(99, 100 * self.partial_bytes // self.partial_of) if self.partial_of else 0

    def partial_note(self) -> str | None:
        if not self.partial:
            return None
        return (f"{self.name}: {self.partial} partial file(s): {format_bytes(self.partial_bytes)} of "
                f"{format_bytes(self.partial_of)} verified here so far ({self.percent()} %); the next sync "
                f"resumes them.")


def header(width: int = 8) -> str:
    """The columns, within 80 for names up to 8 characters. "to fetch": on the cluster, not here
    yet; "only here": here, no longer on the cluster (the notes below the table tell the verified
    copies, which the merge takes, from the others)."""
    return (f"{'cluster':<{width}} {'remote':>6} {'size':>9} {'complete':>8} {'partial':>10} "
            f"{'changed':>7} {'to fetch':>8} {'only here':>9}")


def collect_status(clusters: list[ClusterConfig], download_dir: str, timeout: float = 30.0,
                   prompter: Prompter | None = None) -> list[ClusterStatus]:
    return run_stoppable(_collect, clusters, download_dir, timeout, prompter)


async def _collect(clusters: list[ClusterConfig], download_dir: str, timeout: float,
                   prompter: Prompter | None) -> list[ClusterStatus]:
    layout = DownloadLayout(download_dir)
    statuses = [ClusterStatus(c.name) for c in clusters]
    async with anyio.create_task_group() as tasks:
        for cluster, status in zip(clusters, statuses):
            tasks.start_soon(_cluster_status, cluster, layout, timeout, prompter, status)
    return statuses


async def _cluster_status(cluster: ClusterConfig, layout: DownloadLayout, timeout: float,
                          prompter: Prompter | None, status: ClusterStatus) -> None:
    try:
        # Before connecting: a file where the cluster's folder belongs would
        # otherwise read as "nothing downloaded".
        layout.check_readable(cluster.name, NOTHING_CHANGED)
        async with await ClusterRemote.connect(cluster, timeout=timeout, prompter=prompter) as remote:
            listing = await remote.list_checkpoints()
    except AsyncEmbedSyncError as exc:
        status.error = str(exc)
        return
    status.notes = [str(e) for e in listing.refused]
    if not listing.files:  # as sync refuses it: a remote_dir one level off lists nothing
        status.error = str(NoCheckpointsError(cluster.name, cluster.remote_dir, cluster.patterns))
    local_only = layout.local_only(cluster.name, (f.name for f in listing.files))
    status.only_here = len(local_only)
    status.kept = len(sort_gone(layout, cluster.name, local_only)[0])
    if local_only:
        status.notes += gone_from_cluster_notice(layout, cluster.name, local_only).splitlines()
    for remote_file in listing.files:
        status.remote_files += 1
        status.remote_bytes += remote_file.size
        local = layout.local_copy(cluster.name, remote_file.name, remote_file.size, remote_file.mtime)
        state = local.state
        if local.complete_as_listed:
            status.complete += 1
        elif state is None:
            status.to_fetch += 1
        elif not state.matches(remote_file.size, remote_file.mtime) or state.complete:
            status.changed += 1  # changed there, or the complete copy changed here
        else:
            status.partial += 1
            status.partial_bytes += state.verified_offset
            status.partial_of += remote_file.size


def format_status(statuses: list[ClusterStatus], in_flight: Holder | None = None) -> str:
    """The table and the notes below it, for stdout; each cluster's error goes to stderr
    (``errors``). ``in_flight``: the run that holds the folder, said above the table."""
    width = max([7, *(len(s.name) for s in statuses)])
    lines = [in_flight_line(in_flight)] if in_flight else []
    lines += [header(width)] + [s.line(width) for s in statuses]
    for status in statuses:
        lines += [status.partial_note()] if status.partial_note() else []
        lines += status.notes
    return "\n".join(lines)


def errors(statuses: list[ClusterStatus]) -> list[str]:
    """Each cluster's error once, whole (it names the cluster or its folder)."""
    return [s.error for s in statuses if s.error]


def running_here(download_dir: str) -> Holder | None:
    """The run that holds the download directory's lock, by its record, if it may be going:
    ``status`` reads without the lock, and says so."""
    holder = read_holder(download_dir)
    return holder if holder and holder.may_be_running else None


def in_flight_line(holder: Holder) -> str:
    what = holder.command or "run"
    started = f", started {holder.started()}" if holder.since else ""
    moving = ("partial counts are moving" if what == "sync" else
              "it reads this folder; the counts below are not changed by it")
    if holder.state == UNKNOWN:
        return (f"A {what} on {holder.host} holds this folder (pid {holder.pid}{started}, by its lock record "
                f"{holder.record}); that host cannot be checked from here. If it runs, {moving}.")
    return f"A {what} is running here (pid {holder.pid} on {holder.host}{started}): {moving}."


def status_document(download_dir: str, statuses: list[ClusterStatus], in_flight: Holder | None) -> dict:
    """``status --json``: the same, as one JSON document."""
    holder = None
    if in_flight:
        holder = {**asdict(in_flight), "record": str(in_flight.record), "line": in_flight_line(in_flight)}
    return {"download_dir": str(download_dir), "in_flight": holder, "clusters": [asdict(s) for s in statuses]}
