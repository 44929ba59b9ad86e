from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from merge_fixtures import DIM, entries, write_evil_pickle

from async_embed_sync import load
from async_embed_sync.errors import OutputError
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.output import LEGACY_KEYS, OutputSpec, parquet_available
from async_embed_sync.testing.synthetic import generate_run


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


@pytest.mark.parametrize("articles_format", ["jsonl", "parquet"])
def test_bundle_articles_in_either_form_load_the_same(downloads: Path, tmp_path: Path, articles_format: str) -> None:
    if articles_format == "parquet":
        pytest.importorskip("pyarrow")
    merge_checkpoints(downloads, tmp_path / "merged.pkl")
    merge_checkpoints(downloads, tmp_path / "bundle", articles_format=articles_format)

    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    bundle = load(tmp_path / "bundle")

    assert manifest["articles_file"] == f"articles.{articles_format}"
    assert entries(tmp_path / "bundle") == sorted([f"articles.{articles_format}", "embeddings.npy", "manifest.json"])
    assert bundle["articles"] == load(tmp_path / "merged.pkl")["articles"]


def test_jsonl_is_the_default_even_where_pyarrow_imports(downloads: Path, tmp_path: Path) -> None:
    # The test extra installs pyarrow: the output must not change with it.
    assert parquet_available()
    merge_checkpoints(downloads, tmp_path / "bundle")

    assert entries(tmp_path / "bundle") == ["articles.jsonl", "embeddings.npy", "manifest.json"]


def test_parquet_without_pyarrow_is_one_clear_error(downloads: Path, tmp_path: Path) -> None:
    # A child whose import system finds no pyarrow, as on an install without the parquet extra.
    code = ("import sys; sys.modules['pyarrow'] = None\n"
            "from async_embed_sync.cli import main\n"
            f"sys.exit(main(['merge', '--download-dir', {str(downloads)!r}, '--output', "
            f"{str(tmp_path / 'bundle')!r}, '--articles-format', 'parquet']))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert child.returncode == 1, child.stderr
    assert "pip install 'async_embed_sync[parquet]'" in child.stderr
    assert "Traceback" not in child.stderr
    assert not (tmp_path / "bundle").exists()


def test_parquet_row_groups_bound_memory(downloads: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")

    spec = OutputSpec.decide(tmp_path / "bundle", articles_format="parquet", parquet_group_rows=50)
    merge_checkpoints(downloads, spec)

    assert pq.ParquetFile(tmp_path / "bundle" / "articles.parquet").num_row_groups > 1
    assert len(load(tmp_path / "bundle")["articles"]) == 290


def test_bundle_onto_a_file_is_refused_before_the_copy(downloads: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("precious")
    progress: list[object] = []

    with pytest.raises(OutputError, match="taken.*not a directory"):
        merge_checkpoints(downloads, tmp_path / "taken", on_progress=progress.append)
    assert progress == [] and (tmp_path / "taken").read_text() == "precious"


def test_pickle_onto_a_directory_is_refused_before_the_copy(downloads: Path, tmp_path: Path) -> None:
    (tmp_path / "taken.pkl").mkdir()
    progress: list[object] = []

    with pytest.raises(OutputError, match=r"taken\.pkl: is a directory"):
        merge_checkpoints(downloads, tmp_path / "taken.pkl", on_progress=progress.append)
    assert progress == []


def test_bundle_never_replaces_a_directory_that_is_not_a_bundle(downloads: Path, tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")

    with pytest.raises(OutputError, match="not a merged bundle"):
        merge_checkpoints(downloads, tmp_path / "home")
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_stale_staging_of_a_dead_merge_is_removed_by_the_next_merge(downloads: Path, tmp_path: Path) -> None:
    import os
    import socket

    host = socket.gethostname()
    dead = tmp_path / f".merged.pkl.{host}.{_dead_pid()}.x1y2.merging"
    dead_previous = tmp_path / f".merged.pkl.{host}.{_dead_pid()}.previous"
    alive = tmp_path / f".merged.pkl.{host}.{os.getpid()}.a1b2.merging"
    elsewhere = tmp_path / f".merged.pkl.another-host.{_dead_pid()}.c3d4.merging"
    other_output = tmp_path / f".other.pkl.{host}.{_dead_pid()}.e5f6.merging"
    for directory in (dead, dead_previous, alive, elsewhere, other_output):
        directory.mkdir()
        (directory / "embeddings.npy").write_bytes(b"partial")

    merge_checkpoints(downloads, tmp_path / "merged.pkl")

    assert entries(tmp_path) == sorted([alive.name, elsewhere.name, other_output.name, "merged.pkl"])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_load_maps_the_embeddings_of_a_pickle_it_wrote(downloads: Path, tmp_path: Path, dtype: str) -> None:
    # Rows of more than MAPPED_PAYLOAD_BYTES (1 MiB) in either dtype: mapped, not read.
    generate_run(tmp_path / "big", rows=40_000, dim=DIM, text_bytes=10)
    merge_checkpoints(tmp_path / "big", tmp_path / "merged.pkl", dtype=dtype)
    with open(tmp_path / "merged.pkl", "rb") as stream:
        plain = pickle.load(stream)  # our own output, as downstream scripts read it

    loaded = load(tmp_path / "merged.pkl")

    embeddings, bases = loaded["embeddings"], []
    while (base := getattr(bases[-1] if bases else embeddings, "base", None)) is not None:
        bases.append(base)
    assert any(isinstance(base, np.memmap) for base in bases) and embeddings.flags.writeable
    assert embeddings.dtype == np.dtype(dtype) and np.array_equal(embeddings, plain["embeddings"])
    assert loaded["articles"] == plain["articles"]
    embeddings[0, 0] = 42  # copy-on-write: the file does not change
    assert np.array_equal(load(tmp_path / "merged.pkl")["embeddings"], plain["embeddings"])


@pytest.mark.parametrize(("output_name", "articles_format"), [("merged.pkl", None), ("bundle", "jsonl")])
def test_copies_work_where_copy_file_range_does_not(
    downloads: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output_name: str, articles_format: str | None
) -> None:
    import errno
    import os

    merge_checkpoints(downloads, tmp_path / "kernel" / output_name, articles_format=articles_format)

    def unsupported(*arguments: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    merge_checkpoints(downloads, tmp_path / "fallback" / output_name, articles_format=articles_format)

    kernel, fallback = load(tmp_path / "kernel" / output_name), load(tmp_path / "fallback" / output_name)
    assert np.array_equal(kernel["embeddings"], fallback["embeddings"])
    for key in ("articles", "total_articles", "quality_metrics", "chunk_info"):
        assert kernel[key] == fallback[key]


@pytest.mark.parametrize("protocol", [4, 5])
def test_load_reads_a_pickle_dumped_whole_as_earlier_merges_wrote_it(
    downloads: Path, tmp_path: Path, protocol: int
) -> None:
    # The legacy merge's pickle.dump (protocol 4: _reconstruct) and this tool's
    # earlier writer (protocol 5: numpy's _frombuffer) of the same dict.
    merge_checkpoints(downloads, tmp_path / "merged.pkl")
    with open(tmp_path / "merged.pkl", "rb") as stream:
        document = pickle.load(stream)
    (tmp_path / "dumped.pkl").write_bytes(pickle.dumps(document, protocol=protocol))

    loaded = load(tmp_path / "dumped.pkl")

    assert np.array_equal(loaded["embeddings"], document["embeddings"]) and loaded["embeddings"].flags.writeable
    assert loaded["articles"] == document["articles"] and loaded["chunk_info"] == document["chunk_info"]
