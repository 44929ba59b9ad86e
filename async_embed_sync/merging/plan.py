"""Which checkpoints to merge, and whether together they form one clean run, checked before any output exists.

A run's rows are ``[0, N)``: covered contiguously from index 0, without
overlaps, by checkpoints of one dimension, one model and float dtypes.
``--partial`` accepts missing rows (never overlaps) and names them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, MergeValidationError, RowsMissingError, some_names
from ..gone import VerifiedCopy, verified_copy
from ..layout import DownloadLayout
from .checkpoints import CheckpointInfo, find_checkpoints, open_checkpoint


def _natural_order(path: Path) -> list[int | str]:
    # "ckpt_5000" before "ckpt_10000", as most runs number their files.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def select_checkpoints(download_dir: Path, clusters: Collection[str] | None = None, *,
                       check_versions: bool = True) -> tuple[list[Path], list[Path]]:
    """The checkpoints to merge under ``download_dir``, in natural order of their names, and those left out.

    Only the folders of ``clusters`` (all, when None). Where the sync
    recorded what a cluster held at its last listing, a file it no longer
    held (purged, deleted or re-split there since) is not among the first,
    never merged silently: of those, :func:`keep_verified_copies` takes the
    verified copies that no current file overlaps, and the caller reports
    the rest as left out. Read in natural order, checkpoints
    usually come in index order, which lets a ``.pkl`` output keep the rows
    where they were first written.
    """
    layout = DownloadLayout(download_dir)
    if not Path(download_dir).exists():
        raise MergeValidationError(f"{download_dir} does not exist. Sync into it first, "
                                   f"or give the --download-dir the sync used.")
    found = find_checkpoints(download_dir) if Path(download_dir).is_dir() else []
    listings = {cluster: layout.load_listing(cluster) for cluster in {layout.cluster_of(path) for path in found}}
    selected: list[Path] = []
    left_out: list[Path] = []
    for path in found:
        if clusters is not None and layout.cluster_of(path) not in clusters:
            continue
        listed = listings[layout.cluster_of(path)]
        (selected if listed is None or path.name in listed else left_out).append(path)
    if not selected and not any(verified_copy(layout, path) for path in left_out):
        where = f"{download_dir}/{{{','.join(sorted(clusters))}}}/" if clusters is not None else f"{download_dir}/*/"
        also = f" ({len(left_out)} more are no longer on their cluster)" if left_out else ""
        raise MergeValidationError(f"no checkpoints (*.pkl, *.npy) under {where}{also}.")
    if check_versions:
        _refuse_other_versions(not_as_listed(layout, {layout.cluster_of(path) for path in [*selected, *left_out]}))
    return sorted(selected, key=_natural_order), sorted(left_out, key=_natural_order)


def not_as_listed(layout: DownloadLayout, clusters: Collection[str]) -> list[str]:
    """The files that the last listing of each of ``clusters`` saw, and that are not here,
    complete, as it saw them: "cluster/name (why)"."""
    return [f"{cluster}/{name} ({why})" for cluster in sorted(clusters) for name, why in layout.not_as_listed(cluster)]


def _refuse_other_versions(stale: Sequence[str]) -> None:
    """Raise unless ``stale`` (``not_as_listed``) is empty: a result is one version of the run,
    never a mix of older files here with newer ones (a sync stopped between its listings; files
    still being written, whose rows an older copy here would stand in for, as after a re-split)."""
    if stale:
        shown = some_names(stale, "; ", "; and ")
        raise MergeValidationError(
            f"{len(stale)} file(s) here are not the version their cluster's last sync listed: {shown}. "
            f"Merging them would mix versions of the run. Run `sync` again once their jobs have "
            f"finished writing them (or `run --follow`, which waits for them).")


def verified_copies(download_dir: Path, gone: Sequence[Path]) -> list[VerifiedCopy]:
    """Of ``gone``, the checkpoints here that their cluster no longer held at the last sync, the
    copies a sync verified (all their parts), in the order given."""
    layout = DownloadLayout(download_dir)
    return [copy for path in gone if (copy := verified_copy(layout, path)) is not None]


@dataclass(frozen=True)
class Coverage:
    """What the checkpoints here cover of the run, as ``--follow`` judges it between polls."""

    rows: int  # rows of the checkpoints here that the merge would take
    articles: int
    rows_by_cluster: dict[str, int]
    # The run's rows, where the config or the checkpoints declare them ("" when not).
    total: int | None
    missing: list[tuple[int, int]]  # gaps, and what is missing up to ``total``
    # Why the files here cannot be merged as they are: none yet, an overlap (a re-split
    # half-way). None when they can.
    problem: str | None = None
    # Files the clusters' last listings saw that are not here as listed (still being
    # written, or fetched again): the merge refuses the set until they are.
    pending: int = 0


def coverage(download_dir: Path, clusters: Collection[str] | None, expect_rows: int | None,
             info: Callable[[Path], CheckpointInfo] = lambda path: open_checkpoint(path).info) -> Coverage:
    """What a merge of ``download_dir`` now would take, without writing anything.

    ``info``: how a checkpoint's range is read (``--follow`` keeps them per
    file version: a legacy pickle is read whole to know it)."""
    try:
        paths, gone = select_checkpoints(Path(download_dir), clusters, check_versions=False)
        layout = DownloadLayout(download_dir)
        pending = len(not_as_listed(layout, {layout.cluster_of(path) for path in [*paths, *gone]}))
        current = [info(path) for path in paths]
        kept, overlapped = keep_verified_copies(verified_copies(Path(download_dir), gone), current)
        infos = sorted(current + [info(copy.path) for copy in kept], key=lambda i: i.start_index)
        kept_paths = {copy.path for copy in kept}
        left_out = [path for path in gone if path not in kept_paths]
        missing = missing_rows(left_out, infos, None, expect_rows, partial=True, overlapped=overlapped)
        declared = _declared_rows(infos, expect_rows)
    except (MergeValidationError, CheckpointError) as exc:
        return Coverage(0, 0, {}, expect_rows, [], problem=str(exc))
    by_cluster: dict[str, int] = {}
    for checkpoint in infos:
        by_cluster[checkpoint.cluster] = by_cluster.get(checkpoint.cluster, 0) + checkpoint.rows
    return Coverage(sum(i.rows for i in infos), sum(i.article_rows for i in infos), by_cluster,
                    declared[0] if declared else None, missing, pending=pending)


def keep_verified_copies(copies: Sequence[VerifiedCopy], current: Sequence[CheckpointInfo]
                         ) -> tuple[list[VerifiedCopy], list[Path]]:
    """Of ``copies`` (verified, gone from their cluster), those that no ``current`` checkpoint
    (what the selected clusters hold now) overlaps, to merge from here, and the paths of the
    others, left out: the run was re-split there, and the current files win.

    Each copy is opened for its index range: one that cannot be read is an
    error naming it, as it would be on the cluster."""
    kept: list[VerifiedCopy] = []
    overlapped: list[Path] = []
    for copy in copies:
        info = open_checkpoint(copy.path).info
        covered = any(info.start_index < other.end_index and other.start_index < info.end_index for other in current)
        if covered:
            overlapped.append(copy.path)
        else:
            kept.append(copy)
    return kept, overlapped


def validate_plan(
    infos: Sequence[CheckpointInfo], expect_articles: int | None = None, *,
    expect_rows: int | None = None, partial: bool = False,
) -> list[tuple[int, int]]:
    """Raise :class:`MergeValidationError` unless the checkpoints form one clean run.

    The run's rows are ``[0, N)``, where ``N`` is declared by ``expect_rows``
    (the config's ``total_rows``) or by the checkpoints' own ``total_rows``,
    else is wherever the last checkpoint ends. ``partial`` accepts missing
    rows (never overlaps) and returns their ranges ``[start, end)``.
    """
    missing: list[tuple[int, int]] = []

    def lacking(start: int, end: int, problem: MergeValidationError) -> None:
        if not partial:
            raise problem
        missing.append((start, end))

    _check_ranges(infos, expect_rows, lacking)
    _check_alike(infos)
    articles = sum(info.article_rows for info in infos)
    if expect_articles is not None and articles != expect_articles:
        raise MergeValidationError(f"{expect_articles:,} articles were expected but the checkpoints hold {articles:,}.")
    return missing


def _check_ranges(infos: Sequence[CheckpointInfo], expect_rows: int | None,
                  lacking: Callable[[int, int, MergeValidationError], None]) -> None:
    """Overlaps raise; each gap (at the start, between, at the declared end) goes to ``lacking``."""
    first = infos[0]
    if first.start_index != 0:
        lacking(0, first.start_index, MergeValidationError(
            f"the first checkpoint, {first.path}, starts at index {first.start_index:,}, not 0: "
            f"indices 0..{first.start_index - 1:,} are missing."))
    for before, after in zip(infos, infos[1:]):
        if after.start_index < before.end_index:
            raise MergeValidationError(
                f"{before.path} [{before.start_index:,}, {before.end_index:,}) and {after.path} "
                f"[{after.start_index:,}, {after.end_index:,}) overlap at indices "
                f"{after.start_index:,}..{min(before.end_index, after.end_index) - 1:,}."
            )
        if after.start_index > before.end_index:
            lacking(before.end_index, after.start_index, MergeValidationError(
                f"indices {before.end_index:,}..{after.start_index - 1:,} are missing: "
                f"{before.path} ends at {before.end_index:,} and {after.path} starts at {after.start_index:,}."
            ))
    declared = _declared_rows(infos, expect_rows)
    if declared is not None:
        rows, declared_by = declared
        last = infos[-1]
        if last.end_index > rows:
            raise MergeValidationError(
                f"{last.path} ends at index {last.end_index:,}, past the run's {rows:,} rows ({declared_by}).")
        if last.end_index < rows:
            lacking(last.end_index, rows, RowsMissingError(rows, declared_by, last.end_index, str(last.path)))


def _check_alike(infos: Sequence[CheckpointInfo]) -> None:
    """One dimension, one model, float values, in every checkpoint."""
    first = infos[0]
    for info in infos:
        if info.dim != first.dim:
            raise MergeValidationError(f"{first.path} has dimension {first.dim} but {info.path} has {info.dim}.")
        if info.model != first.model:
            raise MergeValidationError(
                f"{first.path} was made by model {first.model!r} but {info.path} by {info.model!r}."
            )
        if not np.issubdtype(info.dtype, np.floating):
            raise MergeValidationError(f"{info.path} holds {info.dtype} values, not floats.")


def _rows_only_left_out(left_out: Sequence[Path], infos: Sequence[CheckpointInfo], partial: bool,
                        overlapped: Collection[Path] = ()) -> list[tuple[int, int]]:
    """Rows that only checkpoints the cluster no longer holds carry: a GPU's file deleted
    there (not re-split) would otherwise leave a result short with nothing to tell. Raises
    unless ``partial``, which gets their ranges ``[start, end)``. ``overlapped``: those of
    ``left_out`` that are verified copies, left out because current files cover part of them."""
    missing: list[tuple[int, int]] = []
    for path in left_out:
        try:
            info = open_checkpoint(path).info
        except CheckpointError:
            continue  # left out anyway; whatever it held cannot be told
        uncovered = [(info.start_index, info.end_index)]
        for merged in infos:
            uncovered = [piece for start, end in uncovered for piece in (
                (start, min(end, merged.start_index)), (max(start, merged.end_index), end)) if piece[0] < piece[1]]
        cluster = DownloadLayout.cluster_of(path)
        why = (f"its verified copy here is not merged, because files {cluster} holds now cover its other rows "
               f"(re-split there?) and none holds these. Run `sync` again once the new files are all written"
               if path in overlapped else
               f"no sync verified its copy here (put here by hand?), so it is not merged. Run `sync` again "
               f"if it is back on the cluster")
        for start, end in uncovered:
            if not partial:
                raise MergeValidationError(
                    f"indices {start:,}..{end - 1:,} are only in {path}, which {cluster} no longer held at the "
                    f"last sync: {why}, or add --partial to merge without those rows.")
            missing.append((start, end))
    return missing


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[start, end)`` ranges, overlapping ones joined."""
    joined: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    return joined


def _declared_rows(infos: Sequence[CheckpointInfo], expect_rows: int | None) -> tuple[int, str] | None:
    """The run's total rows and who declared it, where anyone did; declarations must agree."""
    carriers = [info for info in infos if info.total_rows is not None]
    for info in carriers[1:]:
        if info.total_rows != carriers[0].total_rows:
            raise MergeValidationError(
                f"{carriers[0].path} says the run has {carriers[0].total_rows:,} rows (total_rows) "
                f"but {info.path} says {info.total_rows:,}: are they from the same run?")
    if expect_rows is not None:
        if carriers and carriers[0].total_rows != expect_rows:
            raise MergeValidationError(
                f"the config's total_rows is {expect_rows:,} but {carriers[0].path} says the run has "
                f"{carriers[0].total_rows:,} rows.")
        return expect_rows, "total_rows in the config"
    if carriers:
        return carriers[0].total_rows, "total_rows in its checkpoints"
    return None




def missing_rows(
    left_out: Sequence[Path], infos: Sequence[CheckpointInfo], expect_articles: int | None,
    expect_rows: int | None, partial: bool, overlapped: Collection[Path] = (),
) -> list[tuple[int, int]]:
    """Raise unless ``infos`` (by start index) form the whole run; with ``partial``, the ranges
    ``[start, end)`` that the result will lack, joined and sorted. ``overlapped``: as for
    :func:`_rows_only_left_out`."""
    # The file a cluster no longer holds first: it names where the rows are, which
    # the general "rows missing" (past total_rows, or a gap) cannot.
    only_left_out = _rows_only_left_out(left_out, infos, partial, overlapped)
    return _union(only_left_out + validate_plan(infos, expect_articles, expect_rows=expect_rows, partial=partial))
