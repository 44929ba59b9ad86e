"""``status``: what each cluster holds against what is here; nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from ..config import ClusterConfig
from ..errors import NOTHING_CHANGED, AsyncEmbedSyncError, NoCheckpointsError
from ..gone import gone_from_cluster_notice, sort_gone
from ..layout import DownloadLayout
from ..progress import format_bytes
from ..termination import run_stoppable
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
    missing: int = 0
    local_only: int = 0  # here, but no longer on the cluster
    kept: int = 0  # of those, the copies a sync verified (kept here, gone from the cluster): the merge takes them
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # refused names, local-only files

    def line(self, width: int = 8) -> str:
        if self.error:
            return f"{self.name:<{width}} error (see below)"  # the paragraph would wrap across the columns
        # Rounded down, and below 100 %: a partial is not complete until it is verified.
        percent = f" ({min(99, 100 * self.partial_bytes // self.partial_of)} %)" if self.partial_of else ""
        return (f"{self.name:<{width}} {self.remote_files:>6} {format_bytes(self.remote_bytes):>9} "
                f"{self.complete:>8} {self.partial:>7} {format_bytes(self.partial_bytes) + percent:>15} "
                f"{self.changed:>7} {self.missing:>7} {self.local_only:>5}")


def header(width: int = 8) -> str:
    """The columns, within 80 for names up to 8 characters; "local": here, no longer on the cluster
    (the notes below the table tell the verified copies, which the merge takes, from the others)."""
    return (f"{'cluster':<{width}} {'remote':>6} {'size':>9} {'complete':>8} {'partial':>7} "
            f"{'partial bytes':>15} {'changed':>7} {'missing':>7} {'local':>5}")


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
    status.local_only = len(local_only)
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
            status.missing += 1
        elif not state.matches(remote_file.size, remote_file.mtime):
            status.changed += 1
        else:
            status.partial += 1
            status.partial_bytes += state.verified_offset
            status.partial_of += remote_file.size


def format_status(statuses: list[ClusterStatus]) -> str:
    width = max([7, *(len(s.name) for s in statuses)])
    lines = [header(width)] + [s.line(width) for s in statuses]
    # Below the table, each cluster's error once, whole (it names the cluster or its folder).
    lines += [s.error for s in statuses if s.error]
    for status in statuses:
        lines += status.notes
    return "\n".join(lines)
