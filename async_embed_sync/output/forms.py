"""What the forms of the merged result are called and hold.

The legacy pickle: one file, named ``*.pkl`` or ``*.pickle``, the legacy
dict of :data:`LEGACY_KEYS`. The bundle: a directory of shards, in the
layout that clip-retrieval writes and embedding-reader, autofaiss, Dask,
Ray and Hugging Face read as it is::

    manifest.json               every legacy key but the first two, and the shard list
    SHA256SUMS                  the sha256 of every shard file, for ``sha256sum -c``
    embeddings/part-00000.npy   consecutive rows, (rows, dim), C order
    metadata/part-00000.parquet the same rows' articles, with the global ``row`` first

The same stems in both folders, the same rows in each pair, and nothing
else in either: embedding-reader globs them recursively and pairs them
blindly by sorted name. Bundles written before the shards (``embeddings.npy``,
``articles.jsonl`` or ``.parquet``, ``manifest.json``) are still read.
"""

from __future__ import annotations

from typing import Literal

# Compared without case: "X.PKL" and "x.pickle" are pickles too, not bundle folders.
PICKLE_SUFFIXES = (".pkl", ".pickle")
MANIFEST_FILE = "manifest.json"
CHECKSUMS_FILE = "SHA256SUMS"
EMBEDDINGS_DIR = "embeddings"
METADATA_DIR = "metadata"
# The metadata's column of global row numbers: what every engine joins on.
ROW_COLUMN = "row"
# A parquet-embeddings shard's vectors, where embedding-reader's parquet mode looks by default.
VECTOR_COLUMN = "embedding"
LAYOUT_VERSION = 2

# The single-file bundle of layout 1, read by load() only.
EMBEDDINGS_FILE = "embeddings.npy"
ARTICLES_JSONL = "articles.jsonl"

LEGACY_KEYS = (
    "embeddings",
    "articles",
    "total_articles",
    "embedding_dim",
    "model",
    "timestamp",
    "quality_metrics",
    "chunk_info",
)

# parquet: the engines' layout. jsonl: any row a pipeline writes (a key that
# only some rows have, nested values, mixed types), which one set of parquet
# columns refuses. parquet-embeddings: parquet shards that carry the vectors
# too, for readers of one table (LanceDB, Hugging Face, embedding-reader's parquet mode).
ArticlesFormat = Literal["parquet", "jsonl", "parquet-embeddings"]
ARTICLES_FORMATS: tuple[ArticlesFormat, ...] = ("parquet", "jsonl", "parquet-embeddings")
DEFAULT_ARTICLES_FORMAT: ArticlesFormat = "parquet"


def metadata_suffix(articles_format: ArticlesFormat) -> str:
    return ".jsonl" if articles_format == "jsonl" else ".parquet"
