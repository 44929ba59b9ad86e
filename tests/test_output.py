from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from merge_fixtures import DIM, entries, write_evil_pickle

from async_embed_sync import load
from async_embed_sync.errors import OutputError
from async_embed_sync.merge import merge_checkpoints
from async_embed_sync.output import LEGACY_KEYS, _StreamedList
from async_embed_sync.synthetic import generate_run


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("downloads")
    generate_run(root, rows=300, dim=DIM, fmt="mixed")
    return root


def test_bundle_round_trip_is_memory_mapped(downloads: Path, tmp_path: Path) -> None:
    merge_checkpoints(downloads, tmp_path / "bundle")
    merge_checkpoints(downloads, tmp_path / "merged.pkl")

    bundle = load(tmp_path / "bundle")
    legacy = load(tmp_path / "merged.pkl")

    assert list(bundle) == list(legacy) == list(LEGACY_KEYS)
    assert isinstance(bundle["embeddings"], np.memmap) and not bundle["embeddings"].flags.writeable
    assert np.array_equal(bundle["embeddings"], legacy["embeddings"])
    assert bundle["articles"] == legacy["articles"]
    for key in ("total_articles", "embedding_dim", "model", "quality_metrics", "chunk_info"):
        assert bundle[key] == legacy[key]


def test_bundle_files_and_manifest(downloads: Path, tmp_path: Path) -> None:
    merge_checkpoints(downloads, tmp_path / "bundle", articles_format="jsonl")

    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    digest = hashlib.sha256((tmp_path / "bundle" / "embeddings.npy").read_bytes()).hexdigest()
    lines = (tmp_path / "bundle" / "articles.jsonl").read_text().splitlines()

    assert entries(tmp_path / "bundle") == ["articles.jsonl", "embeddings.npy", "manifest.json"]
    assert manifest["embeddings_sha256"] == digest
    assert set(LEGACY_KEYS[2:]) <= set(manifest)
    assert len(lines) == manifest["total_articles"] == 290
    assert np.load(tmp_path / "bundle" / "embeddings.npy").shape == (290, DIM)


def test_legacy_output_is_one_plain_dict(downloads: Path, tmp_path: Path) -> None:
    merge_checkpoints(downloads, tmp_path / "merged.pkl", dtype="float16")

    with open(tmp_path / "merged.pkl", "rb") as stream:
        document = pickle.load(stream)  # our own output, read as downstream scripts do

    assert set(document) == set(LEGACY_KEYS)
    assert document["embeddings"].dtype == np.float16 and document["embeddings"].shape == (290, DIM)
    assert document["embedding_dim"] == DIM and document["model"] == "google/embeddinggemma-300m"
    assert document["timestamp"].endswith("+00:00")


def test_streamed_list_pickles_as_a_plain_list() -> None:
    produced = iter(range(2500))

    loaded = pickle.loads(pickle.dumps({"items": _StreamedList(produced)}, protocol=5))

    assert type(loaded["items"]) is list and loaded["items"] == list(range(2500))


def test_load_refuses_a_checkpoint(downloads: Path) -> None:
    checkpoint = next(downloads.glob("*/*.pkl"))

    with pytest.raises(OutputError, match="not hold a merged result"):
        load(checkpoint)


def test_load_refuses_an_evil_pickle_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_evil_pickle(tmp_path / "merged.pkl", marker)

    with pytest.raises(OutputError, match="posix.system"):
        load(path)
    assert not marker.exists()


def test_load_of_a_missing_output_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot be read"):
        load(tmp_path / "nothing.pkl")


def test_load_refuses_a_bundle_whose_parts_disagree(downloads: Path, tmp_path: Path) -> None:
    merge_checkpoints(downloads, tmp_path / "bundle", articles_format="jsonl")
    articles = tmp_path / "bundle" / "articles.jsonl"
    articles.write_text("\n".join(articles.read_text().splitlines()[:-1]) + "\n")

    with pytest.raises(OutputError, match="290 embedding rows, 289 articles"):
        load(tmp_path / "bundle")


def test_pickle_output_onto_a_directory_is_refused(downloads: Path, tmp_path: Path) -> None:
    (tmp_path / "taken.pkl").mkdir()

    with pytest.raises(OutputError, match="is a directory"):
        merge_checkpoints(downloads, tmp_path / "taken.pkl")
    assert entries(tmp_path) == ["taken.pkl"]
