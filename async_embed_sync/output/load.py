"""``load()``: a merged result, either form, read back as the legacy dict."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..errors import CheckpointError, OutputError
from ..merging.safe_pickle import restricted_load_mapped
from .forms import ARTICLES_JSONL, EMBEDDINGS_FILE, LEGACY_KEYS, MANIFEST_FILE


def _read_articles(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, "rb") as stream:
        return [orjson.loads(line) for line in stream]


def _load_bundle(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        embeddings = np.load(path / manifest.get("embeddings_file", EMBEDDINGS_FILE), mmap_mode="r", allow_pickle=False)
        articles = _read_articles(path / manifest.get("articles_file", ARTICLES_JSONL))
    except (OSError, ValueError, ImportError) as exc:
        raise OutputError(str(path), f"is not a readable merged bundle ({exc}).") from exc
    return {"embeddings": embeddings, "articles": articles, **{key: manifest.get(key) for key in LEGACY_KEYS[2:]}}


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a merged result, either form, as the legacy dict.

    A bundle's embeddings are memory-mapped read-only; a pickle's are
    memory-mapped copy-on-write (writable, changes stay in memory), read
    through the same restricted unpickler as the checkpoints.
    """
    path = Path(path)
    if path.is_dir():
        document = _load_bundle(path)
    else:
        try:
            # Copy-on-write: writable, as the legacy merge's array was, and the file stays as it is.
            document = restricted_load_mapped(path, mode="c")
        except CheckpointError as exc:
            raise OutputError(str(path), exc.problem) from exc
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
