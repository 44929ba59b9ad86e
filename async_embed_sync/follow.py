"""``--follow``: sync beside the GPU jobs, and stop once the run's set is complete.

The sync (``transfer/sync.py``) keeps each cluster's connection and lists
again every ``poll`` seconds; after each poll, :class:`Follow` judges the
download directory as the merge would take it (``merging/plan.coverage``):

* complete: nothing still being written, no failure, rows from 0 with no
  gap, up to the run's total where one is known (``total_rows`` in the
  config or the checkpoints), or as many articles as ``--expect-articles``;
  with neither, once no file has appeared or changed for ``quiet_period``;
* a failure a new poll cannot mend (a login refused, a host key changed)
  ends the wait at once; one that may pass (a dropped link) is tried again
  at the next poll;
* ``max_wait`` gives up, naming what is missing.

While it waits, one status line per cluster and one for the set, said again
whenever they change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FollowGaveUpError
from .layout import DownloadLayout, file_identity
from .merging.checkpoints import CheckpointInfo, open_checkpoint
from .merging.plan import Coverage, coverage
from .progress import Progress, format_duration
from .transfer.options import DEFAULT_POLL_SECONDS, DEFAULT_QUIET_PERIOD_SECONDS
from .transfer.sync import SyncReport


@dataclass
class Follow:
    """The judge between polls (``transfer/sync.py``'s ``Watch``)."""

    download_dir: str
    clusters: Collection[str]
    progress: Progress
    poll: float = DEFAULT_POLL_SECONDS
    quiet_period: float = DEFAULT_QUIET_PERIOD_SECONDS
    max_wait: float | None = None
    expect_rows: int | None = None
    expect_articles: int | None = None
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    last_change: float = field(init=False)
    gave_up: FollowGaveUpError | None = field(default=None, init=False)
    _seen: dict[str, object] = field(default_factory=dict, init=False)
    _said: list[str] = field(default_factory=list, init=False)
    # Per cluster, this machine's time when its last change was seen (a file new, grown, rewritten).
    changed_at: dict[str, str] = field(default_factory=dict, init=False)
    _infos: dict[tuple[Path, tuple[int, ...]], CheckpointInfo] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.started = self.last_change = self.clock()

    def settled(self, report: SyncReport) -> bool:
        now = self.clock()
        if any(not failure.rerun_fixes for c in report.clusters.values() for failure in c.failures):
            return True  # said by the sync's report: a new poll would meet it again
        seen = self._fingerprint(report)
        for cluster, what in seen.items():
            if what != self._seen.get(cluster):
                self.changed_at[cluster] = time.strftime("%H:%M:%S")
        if seen != self._seen:
            self._seen, self.last_change = seen, now
        cover = coverage(Path(self.download_dir), self.clusters, self.expect_rows, self._info)
        if report.ok and self._complete(cover, now):
            return True
        if self.max_wait is not None and now - self.started >= self.max_wait:
            self.gave_up = FollowGaveUpError(format_duration(now - self.started), self._lacking(report, cover))
            return True
        status = self._status(report, cover)
        if status != self._said:  # said when it changes: a night of polls is not a night of lines
            self._said = status
            for line in status:
                self.progress.note(line)
        return False

    def raise_if_gave_up(self) -> None:
        if self.gave_up is not None:
            raise self.gave_up

    def _complete(self, cover: Coverage, now: float) -> bool:
        if cover.problem is not None or cover.missing or not cover.rows or cover.pending:
            return False
        if cover.total is not None:
            return cover.rows == cover.total
        if self.expect_articles is not None:
            return cover.articles == self.expect_articles
        return now - self.last_change >= self.quiet_period

    def _fingerprint(self, report: SyncReport) -> dict[str, object]:
        """What each cluster's last listing saw, and what is still being written: any change restarts the quiet period."""
        layout = DownloadLayout(self.download_dir)
        return {name: (layout.listed_files(name), sorted(e.name for e in c.still_writing), c.transferred)
                for name, c in report.clusters.items()}

    def _info(self, path: Path) -> CheckpointInfo:
        """A checkpoint's range, read once per version of the file (a legacy pickle is read whole for it)."""
        key = (path, tuple(file_identity(path)))
        if key not in self._infos:
            self._infos[key] = open_checkpoint(path).info
        return self._infos[key]

    def _lacking(self, report: SyncReport, cover: Coverage) -> list[str]:
        lacking = [f"{cluster}: still being written there: {', '.join(names)}"
                   for cluster, names in sorted(report.still_writing.items())]
        lacking += [f"{name}: {c.failures[0].cause}" for name, c in report.clusters.items() if c.failures]
        lacking.append(_rows_said(cover))
        return lacking

    def _status(self, report: SyncReport, cover: Coverage) -> list[str]:
        lines = []
        for name, c in report.clusters.items():
            writing = len(c.still_writing)
            rows = "" if cover.problem else f", {cover.rows_by_cluster.get(name, 0):,} rows"
            state = f"; {c.failures[0].cause}, tried again at the next poll" if c.failures else ""
            lines.append(f"{name}: {c.files - writing} file(s) here, {writing} still being written{rows}, "
                         f"last change seen at {self.changed_at.get(name, '-')}{state}")
        if cover.total is None and self.expect_articles is None and cover.problem is None and not cover.missing:
            until = f"; complete once nothing changes for {format_duration(self.quiet_period)} (--quiet-period)"
        else:
            until = ""
        lines.append(f"waiting: {_rows_said(cover)}{until}. Looking again every {format_duration(self.poll)} "
                     f"(--poll); Ctrl-C stops, keeping what is verified.")
        return lines


def _rows_said(cover: Coverage) -> str:
    if cover.problem is not None:
        return f"the files here cannot be merged yet ({cover.problem.rstrip('.')})"
    of = f" of {cover.total:,}" if cover.total is not None else ""
    gaps = ", ".join(f"{start:,}..{end - 1:,}" for start, end in cover.missing[:3])
    more = f" and {len(cover.missing) - 3} more ranges" if len(cover.missing) > 3 else ""
    pending = f", {cover.pending} file(s) still to arrive as the clusters list them" if cover.pending else ""
    return f"{cover.rows:,}{of} rows here" + (f", rows {gaps}{more} missing" if gaps else "") + pending
