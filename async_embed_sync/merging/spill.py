"""Step 1 of a merge: read every checkpoint once, one at a time; legacy ones leave their bytes in the scratch files.

A legacy pickle can only be loaded whole, and holding them all would break
the memory bound: what the output needs of each (its article rows in the
output dtype, its articles as the output encodes them) is staged in the
scratch files (``output/scratch.py``) as it is read, and its quality metrics
are taken. A ``.npy`` checkpoint stays open (a map and the index of its
lines) for the copy pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..fileio import file_sha256
from ..output.scratch import StagedCheckpoint
from ..output.spec import OutputSpec
from ..output.staging import StagingArea
from .checkpoints import LEGACY_SUFFIX, CheckpointInfo, LegacyCheckpoint, NpyCheckpoint
from .copy_pass import block_rows, sha256_of, write_article_rows, writing
from .metrics import QualityMetrics, RowHashBuckets


class ArticleSurvey(Protocol):
    # merging/article_worker.ArticleWorker: what the parquet columns will be, learnt as the checkpoints are read.
    def survey(self, path: Path, spans: Iterable[tuple[int, int, int]], source: Path | None = None) -> None: ...


@dataclass(frozen=True)
class SpilledCheckpoint:
    """A legacy checkpoint after its one read: what the copy needs of it, in the scratch files."""

    info: CheckpointInfo
    metrics: QualityMetrics
    sha256: Callable[[], str]
    staged: StagedCheckpoint

    @property
    def path(self) -> Path:
        return self.info.path


class Spill:
    """Reads legacy checkpoints once each, staging what the output needs in the scratch files of ``spec``.

    The output cannot be sized, nor its rows placed, before every checkpoint
    has been read: the copy takes the staged bytes in index order. Each file
    is hashed (for ``chunk_info``) by a worker thread meanwhile.
    """

    def __init__(
        self, staging: StagingArea, spec: OutputSpec, strict: bool, recorded_sha256: Callable[[Path], str | None],
        hashes: RowHashBuckets | None = None,
    ):
        self.output = spec.path
        self.hashes = hashes
        self.recorded_sha256 = recorded_sha256
        self.dtype = spec.dtype
        self.strict = strict
        self._hasher = ThreadPoolExecutor(max_workers=1)
        try:
            with writing(self.output):
                self.scratch = spec.open_scratch(staging.path)
        except BaseException:
            self._hasher.shutdown()
            raise

    def read(self, path: Path) -> SpilledCheckpoint:
        sha256 = sha256_of(path, self.recorded_sha256) or self._hasher.submit(file_sha256, path).result
        checkpoint = LegacyCheckpoint(path)
        info = checkpoint.info
        metrics = QualityMetrics(row_bytes=info.dim * self.dtype.itemsize, hashes=self.hashes)
        position = self.scratch.position()
        with writing(self.output):
            for block in checkpoint.blocks(block_rows(info.dim, self.dtype, info.dtype)):
                write_article_rows(block, self.dtype, self.scratch.add_block, metrics, self.strict, path)
        return SpilledCheckpoint(info, metrics, sha256, self.scratch.staged_since(position, info.article_rows, path))

    def remove(self) -> None:
        """Delete the scratch files: their bytes are in the output, or nowhere."""
        self.scratch.remove()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.remove()
        finally:
            self._hasher.shutdown(cancel_futures=True)


ReadCheckpoint = NpyCheckpoint | SpilledCheckpoint


def read_all(paths: Sequence[Path], spill: Spill, survey: ArticleSurvey | None = None,
             on_read: Callable[[int, int], None] | None = None) -> list[ReadCheckpoint]:
    """Read the checkpoints at ``paths``, one at a time; by start index.

    A legacy checkpoint is read through ``spill`` and dropped at once, so
    memory holds at most one loaded pickle. With ``survey``, the article
    lines of each checkpoint (a ``.jsonl``'s, or a pickle's as staged) are
    given to it as soon as they are known, so that it runs beside the rest
    of the read.
    """
    parts = []
    for path in paths:
        if path.suffix == LEGACY_SUFFIX:
            part = spill.read(path)
            if survey is not None:
                survey.survey(spill.scratch.articles.path,
                              [(part.staged.articles_offset, part.staged.articles_length, 1)], path)
        else:
            part = NpyCheckpoint(path)
            if survey is not None:
                survey.survey(part.articles_path, part.article_spans())
        parts.append(part)
        if on_read is not None:
            on_read(len(parts), len(paths))
    return sorted(parts, key=lambda part: part.info.start_index)
