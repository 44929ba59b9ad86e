"""A sharded bundle, as the merge writes it, read as it is by the engines that work at scale.

embedding-reader (the reader of autofaiss and clip-retrieval), Dask on its
distributed scheduler with worker processes, Hugging Face ``datasets``,
pandas and pyarrow, FAISS: each reads the bundle's folders with no
conversion, and every vector comes back beside its own article. The
expected rows are computed from the synthetic run, not read back by this
project's own ``load()``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from merge_fixtures import expected_merge

from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.testing.synthetic import generate_run

ROWS, DIM, SHARD_ROWS = 3_000, 16, 700
QUESTIONS = set(range(ROWS - 10, ROWS))  # generate_run's default: the last 10 rows
ARTICLES = ROWS - len(QUESTIONS)


@pytest.fixture(scope="module")
def expected() -> tuple[np.ndarray, list[str]]:
    vectors, rows = expected_merge(ROWS, QUESTIONS, dim=DIM)
    return vectors, [row["id"] for row in rows]


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("downloads")
    generate_run(root, rows=ROWS, dim=DIM, fmt="mixed")
    return root


@pytest.fixture(scope="module")
def bundle(downloads: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("out") / "bundle"
    merge_checkpoints(downloads, output, shard_rows=SHARD_ROWS)
    assert len(os.listdir(output / "embeddings")) == 5  # 4 x 700 + 190: the engines see several shards
    return output


def _read_all(reader) -> tuple[np.ndarray, "object"]:
    import pandas as pd

    batches = list(reader(batch_size=512, show_progress=False))
    return np.concatenate([vectors for vectors, _ in batches]), pd.concat([meta for _, meta in batches])


def test_embedding_reader_reads_the_npy_shards(bundle: Path, expected) -> None:
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(str(bundle / "embeddings"), file_format="npy")
    vectors, meta = _read_all(reader)

    assert (reader.count, reader.dimension) == (ARTICLES, DIM)
    assert np.array_equal(vectors, expected[0])
    assert meta["i"].tolist() == list(range(ARTICLES))


def test_embedding_reader_pairs_the_npy_and_parquet_shards(bundle: Path, expected) -> None:
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(str(bundle / "embeddings"), file_format="parquet_npy",
                             metadata_folder=str(bundle / "metadata"), meta_columns=["row", "id", "title"])
    vectors, meta = _read_all(reader)

    assert np.array_equal(vectors, expected[0])
    assert meta["row"].tolist() == meta["i"].tolist() == list(range(ARTICLES))
    assert meta["id"].tolist() == expected[1]


def test_embedding_reader_reads_vectors_from_parquet_embeddings(downloads: Path, tmp_path: Path, expected) -> None:
    from embedding_reader import EmbeddingReader

    merge_checkpoints(downloads, tmp_path / "bundle", shard_rows=SHARD_ROWS, articles_format="parquet-embeddings")
    reader = EmbeddingReader(str(tmp_path / "bundle" / "metadata"), file_format="parquet",
                             embedding_column="embedding", meta_columns=["row", "id"])
    vectors, meta = _read_all(reader)

    assert np.array_equal(vectors, expected[0])
    assert meta["id"].tolist() == expected[1]


@pytest.fixture(scope="module")
def dask_client():
    from distributed import Client, LocalCluster

    # Worker processes: every task and its inputs cross a process boundary, pickled.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def _dask_array(bundle: Path):
    import dask.array as da
    from dask import delayed

    parts = []
    for path in sorted((bundle / "embeddings").glob("part-*.npy")):
        header = np.load(path, mmap_mode="r")  # the shape and dtype, no data
        parts.append(da.from_delayed(delayed(np.load)(str(path), mmap_mode="r"), shape=header.shape, dtype=header.dtype))
    return da.concatenate(parts, axis=0)


def test_dask_computes_over_the_shards_from_a_graph_of_file_names(bundle: Path, expected, dask_client) -> None:
    import dask.array as da

    vectors = _dask_array(bundle)
    norms = da.linalg.norm(vectors, axis=1)
    graph_bytes = len(pickle.dumps(dict(norms.__dask_graph__())))

    assert graph_bytes < expected[0].nbytes / 20  # names and shapes, not the rows
    assert vectors.numblocks == (5, 1)
    assert np.allclose(norms.compute(), np.linalg.norm(expected[0], axis=1))
    assert np.array_equal(vectors[1234].compute(), expected[0][1234])


def test_dask_dataframe_reads_the_metadata_a_partition_per_shard(bundle: Path, expected, dask_client) -> None:
    import dask.dataframe as dd

    frame = dd.read_parquet(str(bundle / "metadata"), columns=["row", "id"])
    vectors = _dask_array(bundle)

    assert frame.npartitions == 5
    rows = frame.compute()
    assert rows["row"].tolist() == list(range(ARTICLES)) and rows["id"].tolist() == expected[1]
    # Partition i holds the articles of block i: joined by position, shard by shard.
    assert frame.get_partition(3)["row"].compute().tolist() == list(range(3 * SHARD_ROWS, 3 * SHARD_ROWS + len(vectors.blocks[3])))


def test_hugging_face_datasets_loads_the_metadata_folder(bundle: Path, expected, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    files = load_dataset("parquet", data_files=str(bundle / "metadata" / "part-*.parquet"), split="train",
                         cache_dir=str(tmp_path / "cache"))
    folder = load_dataset(str(bundle / "metadata"), split="train", cache_dir=str(tmp_path / "cache"))
    streamed = load_dataset("parquet", data_files=str(bundle / "metadata" / "*.parquet"), split="train", streaming=True)

    assert files["row"] == folder["row"] == list(range(ARTICLES))
    assert files["id"] == expected[1]
    assert [row["id"] for row in streamed.take(3)] == expected[1][:3]


def test_pandas_and_pyarrow_read_the_metadata_folder(bundle: Path, expected) -> None:
    import pandas as pd
    import pyarrow.dataset as pads

    frame = pd.read_parquet(bundle / "metadata")
    table = pads.dataset(bundle / "metadata", format="parquet").to_table(columns=["row", "id"], filter=pads.field("row") >= 2800)

    assert frame["row"].tolist() == list(range(ARTICLES)) and frame["id"].tolist() == expected[1]
    assert table.column("id").to_pylist() == expected[1][2800:]


def test_faiss_search_over_the_shards_returns_the_articles(bundle: Path, expected) -> None:
    import faiss
    import pyarrow.parquet as pq

    index = faiss.IndexIDMap(faiss.IndexFlatL2(DIM))
    for path in sorted((bundle / "embeddings").glob("part-*.npy")):
        rows = pq.read_table(bundle / "metadata" / f"{path.stem}.parquet", columns=["row"]).column("row").to_numpy()
        index.add_with_ids(np.load(path, mmap_mode="r"), rows)
    asked = [0, 699, 700, 2989]

    _, found = index.search(expected[0][asked], 1)

    assert found[:, 0].tolist() == asked
    ids = pq.read_table(bundle / "metadata", columns=["id"]).column("id").to_pylist()
    assert [ids[row] for row in found[:, 0]] == [expected[1][row] for row in asked]
