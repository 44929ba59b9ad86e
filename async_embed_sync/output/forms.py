"""What the two forms of the merged result are called and hold.

The legacy pickle: one file, named ``*.pkl`` or ``*.pickle``, the legacy
dict of :data:`LEGACY_KEYS`. The bundle: a directory of ``embeddings.npy``,
the articles (JSON lines or parquet) and ``manifest.json``.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

# Compared without case: "X.PKL" and "x.pickle" are pickles too, not bundle folders.
PICKLE_SUFFIXES = (".pkl", ".pickle")
EMBEDDINGS_FILE = "embeddings.npy"
ARTICLES_JSONL = "articles.jsonl"
ARTICLES_PARQUET = "articles.parquet"
MANIFEST_FILE = "manifest.json"
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

ArticlesFormat = Literal["jsonl", "parquet"]

# The same on every install: JSON lines keep any row a pipeline writes (a key
# that only some rows have, nested values, mixed types), and need nothing
# beyond the core dependencies. Parquet is asked for by name.
DEFAULT_ARTICLES_FORMAT: ArticlesFormat = "jsonl"


def parquet_available() -> bool:
    # Found, not imported: pyarrow is imported only by the article worker
    # process, and would add 30 MiB to this one's resident size.
    return importlib.util.find_spec("pyarrow") is not None
