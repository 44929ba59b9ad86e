"""``load()``: a merged result, any form, read back as the legacy dict."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, OutputError
from ..merging.safe_pickle import restricted_load_mapped
from .forms import (
    ARTICLES_JSONL,
    EMBEDDINGS_FILE,
    LEGACY_KEYS,
    MANIFEST_FILE,
    ROW_COLUMN,
    VECTOR_COLUMN,
)
from .views import ArticleRows, ShardedArray


def _inside(root: Path, name: Any) -> Path:
    # A manifest names files relative to its bundle, never elsewhere.
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"the manifest names a file outside the bundle: {name!r}")
    return root / name


def _load_bundle(path: Path, columns: Sequence[str] | None) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        if "shards" in manifest:
            shards = manifest["shards"]
            maps = []
            for shard in shards:
                vectors = np.load(_inside(path, shard["embeddings"]), mmap_mode="r", allow_pickle=False)
                if len(vectors) != shard["rows"]:
                    raise ValueError(f"{shard['embeddings']} holds {len(vectors)} rows; the manifest says {shard['rows']}")
                maps.append(vectors)
            embeddings: Any = maps[0] if len(maps) == 1 else ShardedArray(maps)
            articles = ArticleRows([(_inside(path, shard["metadata"]), shard["rows"]) for shard in shards], columns,
                                   hidden=(ROW_COLUMN, VECTOR_COLUMN))
        else:  # layout 1: one embeddings.npy, one articles file
            embeddings = np.load(_inside(path, manifest.get("embeddings_file", EMBEDDINGS_FILE)), mmap_mode="r",
                                 allow_pickle=False)
            articles = ArticleRows([(_inside(path, manifest.get("articles_file", ARTICLES_JSONL)), len(embeddings))],
                                   columns)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise OutputError(str(path), f"is not a readable merged bundle ({exc}).") from exc
    return {"embeddings": embeddings, "articles": articles, **{key: manifest.get(key) for key in LEGACY_KEYS[2:]}}


def load(path: str | os.PathLike[str], *, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """Read a merged result, any form, as the legacy dict.

    A bundle's embeddings are memory-mapped read-only: one shard's map, or
    a :class:`~.views.ShardedArray` over several; its articles are an
    :class:`~.views.ArticleRows` sequence that reads each row when asked
    (``columns``: only those fields). A pickle's embeddings are
    memory-mapped copy-on-write (writable, changes stay in memory), read
    through the same restricted unpickler as the checkpoints; its articles
    are the list it holds (with ``columns``, new dicts of those fields).
    """
    path = Path(path)
    if path.is_dir():
        document = _load_bundle(path, columns)
    else:
        try:
            # Copy-on-write: writable, as the legacy merge's array was, and the file stays as it is.
            document = restricted_load_mapped(path, mode="c")
        except CheckpointError as exc:
            raise OutputError(str(path), exc.problem) from exc
        if columns is not None and isinstance(document, dict) and isinstance(document.get("articles"), list):
            document["articles"] = [{name: article.get(name) for name in columns} for article in document["articles"]]
    if not isinstance(document, dict) or set(document) != set(LEGACY_KEYS):
        raise OutputError(str(path), "does not hold a merged result (unexpected keys).")
    rows = len(document["embeddings"])
    if not rows == len(document["articles"]) == document["total_articles"]:
        raise OutputError(
            str(path),
            f"{rows} embedding rows, {len(document['articles'])} articles and "
            f"total_articles {document['total_articles']} disagree.",
        )
    return document
