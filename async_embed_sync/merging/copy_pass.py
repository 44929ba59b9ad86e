"""The copy pass: every checkpoint's article rows into the output writer, in index order, measured as they pass.

A legacy checkpoint's bytes are copied from the scratch files it was staged
in (``merging/spill.py``); a ``.npy`` checkpoint is read here, block by block,
its bytes hashed (for ``chunk_info``) from the same buffer that is copied.
Memory stays bounded by one block.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import (
    AFTER_MERGE,
    CheckpointError,
    MergeValidationError,
    translating_local_errors,
)
from ..fileio import file_sha256
from ..gone import checkpoint_parts
from ..layout import DownloadLayout
from ..output.writer import OutputWriter
from .checkpoints import NpyCheckpoint
from .digest import BackgroundDigest
from .metrics import QualityMetrics, RowHashBuckets
from .row_blocks import RowBlock

if TYPE_CHECKING:
    from .spill import SpilledCheckpoint  # which imports this module's block helpers

# Rows are copied in blocks of about this many bytes.
_BLOCK_BYTES = 8 << 20


@dataclass(frozen=True)
class MergeProgress:
    """Reported after each block: rows read so far, of how many, from which file."""

    rows_done: int
    rows_total: int
    checkpoint: Path




def block_rows(dim: int, *dtypes: np.dtype) -> int:
    """Rows per block of about ``_BLOCK_BYTES``, in the widest of ``dtypes``."""
    return max(1, _BLOCK_BYTES // (dim * max(dtype.itemsize for dtype in dtypes)))


def write_article_rows(
    block: RowBlock, dtype: np.dtype, write: Callable[[np.ndarray, RowBlock], None], metrics: QualityMetrics,
    strict: bool, path: Path,
) -> None:
    """Give the article rows of ``block``, in ``dtype``, to ``write`` (with the block), then account
    for them in ``metrics``.

    With ``strict``, a NaN or an Inf is a :class:`MergeValidationError`.
    """
    keep = block.keep
    rows = block.embeddings if keep.all() else block.embeddings[keep]
    rows = rows.astype(dtype, copy=False)
    write(rows, block)
    metrics.add_dropped(int(len(keep) - keep.sum()))
    nonfinite_before = metrics.nonfinite_rows
    # Meanwhile the digests of a .npy checkpoint and of a bundle hash the rows on another core.
    metrics.add_rows(rows)
    if strict and metrics.nonfinite_rows > nonfinite_before:
        raise MergeValidationError(
            f"{path} holds NaN or Inf values (--strict); "
            f"{metrics.nan_values:,} NaN and {metrics.inf_values:,} Inf values in it so far."
        )


def writing(output: Path):
    """The merge's writes, named by the output path (the staging area beside it is
    hidden, and goes with the exception)."""
    return translating_local_errors(output, "write", AFTER_MERGE)




def known(sha256: str) -> Callable[[], str]:
    return lambda: sha256


def sha256_of(path: Path, recorded_sha256: Callable[[Path], str | None]) -> Callable[[], str] | None:
    """How to get the sha256 that the sync recorded for ``path``; None if there is none to trust.

    Asked for once the file has been read (for ``chunk_info``), it checks
    that the file is still the one the sync hashed: one that changed while
    it was being merged fails the merge rather than getting that sha256.
    """
    recorded = recorded_sha256(path)
    if recorded is None:
        return None

    def still_recorded() -> str:
        if recorded_sha256(path) != recorded:
            raise CheckpointError(str(path), "changed while it was being merged; run the merge again.")
        return recorded

    return still_recorded




_SHA256 = re.compile(r"[0-9a-f]{64}")


def _verified_hash(path: Path, layout: DownloadLayout) -> tuple[str, float] | None:
    """The sha256 the journal records ``path`` complete with, and when; None if it records none."""
    if Path(path).parent.parent != layout.root:
        return None
    state = layout.load_state(layout.cluster_of(path), Path(path).name)
    if state is None or not state.complete or not _SHA256.fullmatch(state.sha256 or ""):
        return None
    return state.sha256, state.verified_at


def _hold_to_sync(path: Path, sha256: str, verified: tuple[str, float]) -> None:
    recorded, verified_at = verified
    if recorded == sha256:
        return
    when = f" on {datetime.fromtimestamp(verified_at).strftime('%Y-%m-%d %H:%M')}" if verified_at else ""
    raise CheckpointError(
        str(path),
        f"is not the file the sync verified{when}: it hashes to {sha256[:16]}..., the sync verified "
        f"{recorded[:16]}...: it was changed or damaged here since. Delete it and sync again (`sync` or "
        f"`run`) to fetch it anew: a sync takes a complete file of the size it verified as it is. Nothing "
        f"was written at the output path.")


def checked_against_sync(path: Path, sha256: str, layout: DownloadLayout) -> str:
    """``sha256``, the merge's hash of the checkpoint at ``path``, if the sync's journal verified
    no other bytes for it; else a :class:`CheckpointError` naming it.

    The journal's hash stands for the file whatever happened to it here since (a byte
    damaged in place keeps its size but not its hash): a file the journal records complete
    is the one the sync verified, or it is not merged. A file without a complete record (put
    here by hand, a sync under way) has nothing to be held to. A ``.npy``'s sidecar and
    article file are held to theirs too, hashed here only if they were touched since the
    sync hashed them (their identity changed).
    """
    verified = _verified_hash(path, layout)
    if verified is not None:
        _hold_to_sync(path, sha256, verified)
    for part in checkpoint_parts(path)[1:]:
        verified = _verified_hash(part, layout)
        if verified is None or layout.verified_sha256(part) is not None:
            continue  # nothing to hold it to, or untouched since it was hashed
        try:
            actual = file_sha256(part)
        except OSError:
            continue  # reading the checkpoint said so already
        _hold_to_sync(part, actual, verified)
    return sha256


class CopyPass:
    """Fills the output writer with the article rows of every checkpoint, in index order.

    Each checkpoint's sha256 comes from the sync's journal where it
    recorded one (``recorded_sha256``), else is computed on the way. Row
    hashes, for the duplicate count, go to ``hashes`` (else stay in memory).
    """

    def __init__(
        self,
        parts: Sequence[NpyCheckpoint | SpilledCheckpoint],
        recorded_sha256: Callable[[Path], str | None],
        dtype: np.dtype,
        strict: bool,
        on_progress: Callable[[MergeProgress], None] | None,
        hashes: RowHashBuckets | None = None,
    ):
        self.parts = parts
        self.hashes = hashes
        self.dtype = dtype
        self.strict = strict
        self.on_progress = on_progress
        self.rows_total = sum(part.info.rows for part in parts)
        self.recorded_sha256 = recorded_sha256
        self.rows_done = 0
        self.metrics = QualityMetrics(row_bytes=parts[0].info.dim * dtype.itemsize, hashes=hashes)

    def run(self, writer: OutputWriter) -> list[Callable[[], str]]:
        """Copy everything into ``writer``; how to get each checkpoint's sha256, in index order."""
        self.writer = writer
        digests: list[Callable[[], str]] = []
        for part in self.parts:
            if isinstance(part, NpyCheckpoint) and (recorded := sha256_of(part.path, self.recorded_sha256)):
                # Synced and untouched since: no need to hash it again.
                metrics = self._copy(part, None)
                digests.append(recorded)
            elif isinstance(part, NpyCheckpoint) and not part.rows_in_file_order:
                # Its blocks are not the file's bytes in order: the file is hashed on its own.
                metrics = self._copy(part, None)
                digests.append(functools.partial(file_sha256, part.path))
            elif isinstance(part, NpyCheckpoint):
                # Its thread lives as long as its copy, whatever ends it.
                with BackgroundDigest() as digest:
                    digest.update(part.header_bytes())
                    metrics = self._copy(part, digest)
                    digests.append(known(digest.hexdigest()))
            else:
                self._copy_spilled(part)
                digests.append(part.sha256)
                metrics = part.metrics
            # In index order, whatever order the checkpoints were read in.
            self.metrics.absorb(metrics)
        return digests

    def _copy_spilled(self, part: SpilledCheckpoint) -> None:
        self.writer.add_staged(part.staged)
        self._progress(part.info.rows, part.path)

    def _copy(self, checkpoint: NpyCheckpoint, digest: BackgroundDigest | None) -> QualityMetrics:
        info = checkpoint.info
        metrics = QualityMetrics(row_bytes=info.dim * self.dtype.itemsize, hashes=self.hashes)
        for block in checkpoint.blocks(block_rows(info.dim, self.dtype, info.dtype)):
            if digest is not None:
                digest.update(block.embeddings)
            write_article_rows(block, self.dtype, self.writer.add_block, metrics, self.strict, info.path)
            # The block's buffer is reused by the next block: the hashes must be done with it.
            self.writer.wait()
            if digest is not None:
                digest.wait()
            self._progress(len(block.keep), info.path)
        self.writer.add_checkpoint(checkpoint)
        return metrics

    def _progress(self, rows: int, path: Path) -> None:
        self.rows_done += rows
        if self.on_progress is not None:
            self.on_progress(MergeProgress(self.rows_done, self.rows_total, path))
