"""How a bundle's rows are cut into shards: how many rows each, and what each shard's files are called.

Decided once, in the merge process, and sent as it is to the article worker:
both cut at the same rows, so every ``embeddings/part-N.npy`` has the rows
of its ``metadata/part-N.*``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .forms import EMBEDDINGS_DIR, METADATA_DIR

# A default shard holds about this many bytes of vectors: large enough that
# 25M x 768 float32 is 200 files, not 6,000; small enough for the Hugging Face
# Hub's advice (well under 20 GB a file) and for embedding-reader, which reads
# a whole metadata shard into memory.
_SHARD_BYTES = 1 << 30
_ROUND_ROWS = 100_000  # a default shard is whole row groups of the metadata
# Five digits: file names that sort as strings in row order (embedding-reader
# sorts them so), part-00000 to part-99999.
MAX_SHARDS = 100_000


def default_shard_rows(row_bytes: int) -> int:
    """Rows per shard for rows of ``row_bytes``: about 1-2 GiB of vectors, in whole 100,000s where
    rows are that small, else in whole 1,000s."""
    rows = max(1, _SHARD_BYTES // max(1, row_bytes))
    step = _ROUND_ROWS if rows >= _ROUND_ROWS else 1_000
    return -(-rows // step) * step


def stem(index: int) -> str:
    return f"part-{index:05d}"


@dataclass(frozen=True)
class ShardPlan:
    """``rows`` rows, cut into shards of ``shard_rows`` (the last one shorter); never no shard at all."""

    rows: int
    shard_rows: int

    def __post_init__(self) -> None:
        if self.shard_rows < 1:
            raise ValueError("shards hold at least one row")

    @property
    def count(self) -> int:
        return max(1, -(-self.rows // self.shard_rows))

    def first_row(self, index: int) -> int:
        return index * self.shard_rows

    def rows_of(self, index: int) -> int:
        return max(0, min(self.shard_rows, self.rows - self.first_row(index)))

    def embeddings_name(self, index: int) -> str:
        return f"{EMBEDDINGS_DIR}/{stem(index)}.npy"

    def metadata_name(self, index: int, suffix: str) -> str:
        return f"{METADATA_DIR}/{stem(index)}{suffix}"
