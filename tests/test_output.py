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
from async_embed_sync.errors import MergeValidationError, OutputError
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.output import LEGACY_KEYS, OutputSpec
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
    assert list(bundle["articles"]) == legacy["articles"]
    for key in ("total_articles", "embedding_dim", "model", "quality_metrics", "chunk_info"):
        assert bundle[key] == legacy[key]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundle_shards_and_manifest(downloads: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    merge_checkpoints(downloads, tmp_path / "bundle", shard_rows=100)
    bundle = tmp_path / "bundle"

    manifest = json.loads((bundle / "manifest.json").read_text())

    assert entries(bundle) == ["SHA256SUMS", "embeddings", "manifest.json", "metadata"]
    assert entries(bundle / "embeddings") == ["part-00000.npy", "part-00001.npy", "part-00002.npy"]
    assert entries(bundle / "metadata") == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert set(LEGACY_KEYS[2:]) <= set(manifest) and manifest["total_articles"] == 290
    assert [(shard["first_row"], shard["rows"]) for shard in manifest["shards"]] == [(0, 100), (100, 100), (200, 90)]
    for shard in manifest["shards"]:
        vectors = np.load(bundle / shard["embeddings"])
        rows = pq.read_table(bundle / shard["metadata"]).column("row").to_numpy()
        assert vectors.shape == (shard["rows"], DIM) and vectors.flags.c_contiguous
        assert rows.tolist() == list(range(shard["first_row"], shard["first_row"] + shard["rows"]))
        assert shard["embeddings_sha256"] == _sha256(bundle / shard["embeddings"])
        assert shard["metadata_sha256"] == _sha256(bundle / shard["metadata"])
    assert pq.read_schema(bundle / "metadata" / "part-00000.parquet").names[0] == "row"
    checked = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.count(": OK") == 6, checked.stdout


@pytest.mark.parametrize("shard_rows", [1, 37, 289, 290, 10_000])
def test_any_cut_of_the_shards_loads_the_rows_of_the_pickle(downloads: Path, tmp_path: Path, shard_rows: int) -> None:
    # The mixed run's checkpoints are pickles and .npy + .jsonl, cut anywhere across them.
    merge_checkpoints(downloads, tmp_path / "merged.pkl")
    merge_checkpoints(downloads, tmp_path / "bundle", shard_rows=shard_rows)
    legacy, bundle = load(tmp_path / "merged.pkl"), load(tmp_path / "bundle")

    assert len(json.loads((tmp_path / "bundle" / "manifest.json").read_text())["shards"]) == -(-290 // shard_rows)
    assert np.array_equal(np.asarray(bundle["embeddings"]), legacy["embeddings"])
    assert list(bundle["articles"]) == legacy["articles"]
    assert bundle["articles"][shard_rows - 3 : shard_rows + 3] == legacy["articles"][shard_rows - 3 : shard_rows + 3]
    assert bundle["articles"][-1] == legacy["articles"][-1]


def test_a_jsonl_shard_line_starts_with_its_global_row(downloads: Path, tmp_path: Path) -> None:
    merge_checkpoints(downloads, tmp_path / "bundle", shard_rows=100, articles_format="jsonl")

    lines = (tmp_path / "bundle" / "metadata" / "part-00001.jsonl").read_text().splitlines()

    assert len(lines) == 100
    assert lines[0].startswith('{"row":100,') and json.loads(lines[-1])["row"] == 199


def test_parquet_embeddings_shards_carry_the_vectors(downloads: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    merge_checkpoints(downloads, tmp_path / "bundle", shard_rows=100, articles_format="parquet-embeddings")

    table = pq.read_table(tmp_path / "bundle" / "metadata" / "part-00002.parquet")
    vectors = np.load(tmp_path / "bundle" / "embeddings" / "part-00002.npy")

    assert str(table.schema.field("embedding").type) == f"fixed_size_list<element: float>[{DIM}]"
    assert np.array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), vectors)
    assert "embedding" not in load(tmp_path / "bundle")["articles"][0]  # the legacy shape, as for every form


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


@pytest.mark.parametrize("articles_format", ["jsonl", "parquet"])
def test_a_shard_cut_short_is_an_output_error_naming_it(downloads: Path, tmp_path: Path, articles_format: str) -> None:
    merge_checkpoints(downloads, tmp_path / "bundle", shard_rows=100, articles_format=articles_format)
    shard = tmp_path / "bundle" / "metadata" / f"part-00001.{articles_format}"
    if articles_format == "jsonl":
        shard.write_text("\n".join(shard.read_text().splitlines()[:-1]) + "\n")
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pq.read_table(shard).slice(0, 99), shard)
    articles = load(tmp_path / "bundle")["articles"]  # nothing read yet

    with pytest.raises(OutputError, match=rf"part-00001\.{articles_format}: holds 99 \w+; the manifest says 100"):
        articles[150]
    with pytest.raises(OutputError, match=r"part-00001"):
        list(articles)


def test_load_refuses_a_bundle_whose_vectors_disagree_with_its_manifest(downloads: Path, tmp_path: Path) -> None:
    merge_checkpoints(downloads, tmp_path / "bundle", shard_rows=100)
    np.save(tmp_path / "bundle" / "embeddings" / "part-00002.npy", np.zeros((89, DIM), np.float32))

    with pytest.raises(OutputError, match="part-00002.npy holds 89 rows; the manifest says 90"):
        load(tmp_path / "bundle")


def test_pickle_output_onto_a_directory_is_refused(downloads: Path, tmp_path: Path) -> None:
    (tmp_path / "taken.pkl").mkdir()

    with pytest.raises(OutputError, match="is a directory"):
        merge_checkpoints(downloads, tmp_path / "taken.pkl")
    assert entries(tmp_path) == ["taken.pkl"]


@pytest.mark.parametrize(("articles_format", "suffix"), [("jsonl", "jsonl"), ("parquet", "parquet"),
                                                       ("parquet-embeddings", "parquet"), (None, "parquet")])
def test_bundle_articles_in_every_form_load_the_same(
    downloads: Path, tmp_path: Path, articles_format: str | None, suffix: str,
) -> None:
    merge_checkpoints(downloads, tmp_path / "merged.pkl")
    merge_checkpoints(downloads, tmp_path / "bundle", articles_format=articles_format)

    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    bundle = load(tmp_path / "bundle")

    assert manifest["articles_format"] == (articles_format or "parquet")
    assert entries(tmp_path / "bundle" / "metadata") == [f"part-00000.{suffix}"]
    assert list(bundle["articles"]) == load(tmp_path / "merged.pkl")["articles"]


def test_parquet_row_groups_bound_memory(downloads: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")

    spec = OutputSpec.decide(tmp_path / "bundle", articles_format="parquet", parquet_group_rows=50)
    merge_checkpoints(downloads, spec)

    assert pq.ParquetFile(tmp_path / "bundle" / "metadata" / "part-00000.parquet").num_row_groups == 6
    assert len(load(tmp_path / "bundle")["articles"]) == 290


def test_more_shards_than_names_in_order_are_refused(tmp_path: Path) -> None:
    spec = OutputSpec.decide(tmp_path / "bundle", shard_rows=1)

    assert spec.shard_plan(100_000, DIM).count == 100_000
    with pytest.raises(MergeValidationError, match="100,001 shards; at most 100,000"):
        spec.shard_plan(100_001, DIM)


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
