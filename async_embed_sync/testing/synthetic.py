"""Synthetic embedding checkpoints, shaped like a real multi-cluster run.

Shared by the tests, the demo and the benchmarks. A run of ``rows`` items is
split into contiguous pieces, one per GPU, across clusters; each piece may be
written as several files, as the legacy pickle (``.pkl``) or the
memory-mappable form (``.npy`` + ``.json`` + ``.jsonl``), or a mix of both
(see ``docs/CHECKPOINT-FORMAT.md``).

Every row is a pure function of ``(seed, global index)``: the same run split
differently, or written in another format, merges to the same result. Files
are generated one at a time so that a gigabyte run needs only one file's
worth of memory.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

DEFAULT_MODEL = "google/embeddinggemma-300m"

CheckpointFormat = Literal["pkl", "npy", "mixed"]

# Vectors are drawn in fixed blocks of rows, each from its own generator, so a
# row's values do not depend on which file it lands in.
_VECTOR_BLOCK_ROWS = 1024

_WORDS = (
    "the history of river valley empire century language music science city "
    "population mountain island war treaty king queen village church school "
    "railway station museum novel film album species genus climate economy "
    "university council election party bridge harbour festival painter poet"
).split()


# How long ago a finished run last wrote its checkpoints, as ``finish_writing`` dates them.
FINISHED_AGO_SECONDS = 3600


def finish_writing(folder: Path | None, ago: float = FINISHED_AGO_SECONDS) -> None:
    """Date every file under ``folder`` as a finished run leaves it: last written
    ``ago`` seconds ago (an hour), long past the sync's settle window
    (``transfer/settle.py``). Files written a moment ago would be taken as
    still being written."""
    if folder is None or not folder.is_dir():
        return
    finished = time.time() - ago
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (finished, finished))


def _text_pool(text_bytes: int, seed: int) -> str:
    """A long run of pseudo-words that article texts are cut from."""
    rng = np.random.default_rng([seed, 7])
    words = rng.choice(_WORDS, size=max(4096, text_bytes // 2))
    return " ".join(words.tolist())


def make_vectors(start: int, end: int, *, dim: int, seed: int) -> np.ndarray:
    """Rows ``[start, end)`` of the run: float32, L2 norm 1."""
    first_block = start // _VECTOR_BLOCK_ROWS
    last_block = max(first_block, (end - 1) // _VECTOR_BLOCK_ROWS)
    blocks = [
        np.random.default_rng([seed, block]).standard_normal(
            (_VECTOR_BLOCK_ROWS, dim), dtype=np.float32
        )
        for block in range(first_block, last_block + 1)
    ]
    offset = start - first_block * _VECTOR_BLOCK_ROWS
    vectors = np.concatenate(blocks)[offset : offset + (end - start)]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def make_rows(
    start: int,
    end: int,
    *,
    text_bytes: int,
    question_indices: Collection[int],
    seed: int,
) -> list[dict]:
    """The row dicts of ``[start, end)``: articles, and questions where asked."""
    pool = _text_pool(text_bytes, seed)
    span = max(1, len(pool) - text_bytes)
    rows: list[dict] = []
    for index in range(start, end):
        offset = (index * 7919) % span
        if index in question_indices:
            rows.append(
                {
                    "id": f"q{index}",
                    "title": f"Which article answers question {index}?",
                    "kind": "question",
                    "text": pool[offset : offset + 200],
                }
            )
        else:
            rows.append(
                {
                    "id": str(index),
                    "title": f"Synthetic article {index}",
                    "url": f"https://en.wikipedia.org/wiki?curid={index}",
                    "text": pool[offset : offset + text_bytes],
                }
            )
    return rows


def write_legacy_checkpoint(
    path: Path,
    embeddings: np.ndarray,
    articles: Sequence[dict],
    *,
    start_index: int,
    end_index: int | None = None,
    model: str = DEFAULT_MODEL,
    gpu_id: int | None = None,
    hostname: str | None = None,
    total_rows: int | None = None,
    protocol: int = pickle.DEFAULT_PROTOCOL,
) -> Path:
    """Write one legacy ``.pkl`` checkpoint; ``end_index`` may lie, for tests."""
    document = {
        "embeddings": embeddings,
        "start_index": start_index,
        "end_index": start_index + len(embeddings) if end_index is None else end_index,
        "articles": list(articles),
        "model": model,
        "gpu_id": gpu_id,
        "hostname": hostname,
        **({} if total_rows is None else {"total_rows": total_rows}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        pickle.dump(document, stream, protocol=protocol)
    return path


def write_npy_checkpoint(
    stem_path: Path,
    embeddings: np.ndarray,
    articles: Sequence[dict],
    *,
    start_index: int,
    end_index: int | None = None,
    model: str = DEFAULT_MODEL,
    gpu_id: int | None = None,
    hostname: str | None = None,
    total_rows: int | None = None,
) -> Path:
    """Write ``<stem>.npy``, ``<stem>.json`` and ``<stem>.jsonl``; return the ``.npy`` path."""
    stem_path.parent.mkdir(parents=True, exist_ok=True)
    array_path = stem_path.with_name(stem_path.name + ".npy")
    articles_path = stem_path.with_name(stem_path.name + ".jsonl")
    np.save(array_path, embeddings, allow_pickle=False)
    with open(articles_path, "w", encoding="utf-8") as stream:
        for row in articles:
            stream.write(json.dumps(row) + "\n")
    sidecar = {
        "start_index": start_index,
        "end_index": start_index + len(embeddings) if end_index is None else end_index,
        "model": model,
        "gpu_id": gpu_id,
        "hostname": hostname,
        "articles_file": articles_path.name,
        **({} if total_rows is None else {"total_rows": total_rows}),
    }
    stem_path.with_name(stem_path.name + ".json").write_text(json.dumps(sidecar), encoding="utf-8")
    return array_path


def _boundaries(total: int, parts: int) -> list[int]:
    return [round(total * part / parts) for part in range(parts + 1)]


def generate_run(
    root: Path,
    *,
    rows: int = 1000,
    dim: int = 768,
    clusters: Sequence[str] = ("tensor01", "tensor02"),
    gpus_per_cluster: int = 4,
    files_per_gpu: int = 1,
    fmt: CheckpointFormat = "pkl",
    text_bytes: int = 200,
    questions: int = 10,
    question_indices: Collection[int] | None = None,
    seed: int = 0,
    model: str = DEFAULT_MODEL,
    declare_total: bool = False,
    on_file: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write a whole run under ``root/<cluster>/``; return the checkpoint paths in index order.

    ``declare_total``: every checkpoint carries ``total_rows``, as embedding
    jobs that know their corpus write it. ``on_file(written, of)`` after
    each file, for a progress display.

    Questions sit at the last ``questions`` indices, as in the original run,
    unless ``question_indices`` places them elsewhere. With ``fmt="mixed"``
    the files alternate between the two formats.
    """
    questions_at = (
        frozenset(question_indices)
        if question_indices is not None
        else frozenset(range(rows - questions, rows))
    )
    pieces = _boundaries(rows, len(clusters) * gpus_per_cluster)
    written: list[Path] = []
    for piece, (piece_start, piece_end) in enumerate(zip(pieces, pieces[1:])):
        cluster = clusters[piece // gpus_per_cluster]
        gpu_id = piece % gpus_per_cluster
        files = _boundaries(piece_end - piece_start, files_per_gpu)
        for file_start, file_end in zip(files, files[1:]):
            start, end = piece_start + file_start, piece_start + file_end
            embeddings = make_vectors(start, end, dim=dim, seed=seed)
            articles = make_rows(
                start, end, text_bytes=text_bytes, question_indices=questions_at, seed=seed
            )
            stem = root / cluster / f"embeddings_gpu{gpu_id}_{start:08d}_{end:08d}"
            as_npy = fmt == "npy" or (fmt == "mixed" and len(written) % 2 == 1)
            metadata = dict(start_index=start, model=model, gpu_id=gpu_id, hostname=f"{cluster}-node",
                            total_rows=rows if declare_total else None)
            if as_npy:
                written.append(write_npy_checkpoint(stem, embeddings, articles, **metadata))
            else:
                path = stem.with_name(stem.name + ".pkl")
                written.append(write_legacy_checkpoint(path, embeddings, articles, **metadata))
            if on_file is not None:
                on_file(len(written), (len(pieces) - 1) * files_per_gpu)
    finish_writing(root)  # a finished run's checkpoints
    return written
