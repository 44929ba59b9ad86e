"""Helpers shared by the merge-phase tests (checkpoints, merge, output)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from async_embed_sync.testing.synthetic import make_rows, make_vectors

DIM = 16


class _RunsShellCommand:
    """Unpickling this with a plain unpickler runs ``command``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def write_evil_pickle(path: Path, marker: Path) -> Path:
    """A checkpoint-looking pickle whose loading would create ``marker``."""
    document = {
        "embeddings": np.zeros((1, DIM), np.float32),
        "start_index": 0,
        "end_index": 1,
        "articles": [{"id": "0", "title": "t", "payload": _RunsShellCommand(f"touch {marker}")}],
        "model": "m",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(document, protocol=4))
    return path


def expected_merge(rows: int, questions: set[int], *, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """What a correct merge of a synthetic run holds, computed without any reader."""
    vectors = make_vectors(0, rows, dim=dim, seed=seed)
    row_dicts = make_rows(0, rows, text_bytes=200, question_indices=questions, seed=seed)
    keep = [index for index in range(rows) if index not in questions]
    return vectors[keep], [row_dicts[index] for index in keep]


def entries(directory: Path) -> list[str]:
    """Every name in ``directory``, hidden ones included, sorted."""
    return sorted(os.listdir(directory)) if directory.exists() else []
