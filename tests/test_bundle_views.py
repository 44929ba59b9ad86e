"""load()'s views over a bundle's shards: indexed as one array and one list, reading only what is asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from merge_fixtures import DIM

from async_embed_sync import load
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.output.shards import default_shard_rows
from async_embed_sync.output.views import ShardedArray
from async_embed_sync.testing.synthetic import generate_run

_SIZES = (3, 1, 5, 4)
_WHOLE = np.arange(sum(_SIZES) * 3, dtype=np.float32).reshape(-1, 3)


def _sharded(tmp_path: Path) -> ShardedArray:
    maps, first = [], 0
    for index, size in enumerate(_SIZES):
        np.save(tmp_path / f"{index}.npy", _WHOLE[first : first + size])
        maps.append(np.load(tmp_path / f"{index}.npy", mmap_mode="r"))
        first += size
    return ShardedArray(maps)


_ROWS = len(_WHOLE)
_row_keys = st.one_of(
    st.integers(-_ROWS, _ROWS - 1),
    st.builds(slice, st.none() | st.integers(-_ROWS - 2, _ROWS + 2), st.none() | st.integers(-_ROWS - 2, _ROWS + 2),
              st.none() | st.integers(1, 4) | st.integers(-4, -1)),
    st.lists(st.integers(-_ROWS, _ROWS - 1), max_size=20).map(lambda rows: np.array(rows, dtype=np.int64)),
    st.lists(st.booleans(), min_size=_ROWS, max_size=_ROWS).map(np.array),
)
_keys = st.one_of(_row_keys, st.tuples(_row_keys, st.integers(-3, 2) | st.builds(slice, st.integers(0, 2))))


@settings(max_examples=300, deadline=None)
@given(key=_keys)
def test_a_sharded_array_indexes_as_the_whole_array_does(tmp_path_factory: pytest.TempPathFactory, key) -> None:
    sharded = _sharded(tmp_path_factory.mktemp("shards"))

    assert np.array_equal(sharded[key], _WHOLE[key])


def test_a_sharded_array_is_an_array_to_numpy(tmp_path: Path) -> None:
    sharded = _sharded(tmp_path)

    assert sharded.shape == _WHOLE.shape and len(sharded) == _ROWS and sharded.dtype == np.float32
    assert np.array_equal(np.asarray(sharded), _WHOLE)
    assert np.asarray(sharded, dtype=np.float64).dtype == np.float64
    assert np.array_equal(np.stack(list(sharded)), _WHOLE)
    assert np.array_equal(sharded[..., 1], _WHOLE[..., 1])
    assert np.shares_memory(sharded[4:9], sharded.shards[2])  # within one shard: a view of its map
    with pytest.raises(IndexError):
        sharded[_ROWS]


def test_articles_index_and_slice_across_shards_as_a_list(tmp_path: Path) -> None:
    generate_run(tmp_path / "downloads", rows=100, dim=DIM, fmt="npy", questions=0)
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "bundle", shard_rows=30)
    legacy, articles = load(tmp_path / "merged.pkl")["articles"], load(tmp_path / "bundle")["articles"]

    assert len(articles) == 100 and articles == legacy
    for key in (slice(25, 65), slice(None, None, 7), slice(-3, None), slice(90, 10, -4), slice(50, 50)):
        assert articles[key] == legacy[key]
    assert [articles[i] for i in (0, 29, 30, 59, 99, -1, -100)] == [legacy[i] for i in (0, 29, 30, 59, 99, -1, -100)]
    with pytest.raises(IndexError):
        articles[100]


def test_columns_limits_the_fields_of_every_form(tmp_path: Path) -> None:
    generate_run(tmp_path / "downloads", rows=50, dim=DIM, fmt="mixed")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")
    for articles_format in ("parquet", "jsonl"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / articles_format, articles_format=articles_format)
    legacy = load(tmp_path / "merged.pkl")["articles"]
    wanted = [{"row": row, "title": article["title"]} for row, article in enumerate(legacy)]

    for output in ("parquet", "jsonl"):
        assert list(load(tmp_path / output, columns=["row", "title"])["articles"]) == wanted
        assert load(tmp_path / output, columns=["title"])["articles"][3] == {"title": legacy[3]["title"]}
    assert load(tmp_path / "merged.pkl", columns=["title"])["articles"][3] == {"title": legacy[3]["title"]}


def test_a_layout_1_bundle_still_loads(tmp_path: Path) -> None:
    # The bundle the merge wrote before shards: embeddings.npy, articles.jsonl, manifest.json.
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "embeddings.npy", vectors)
    (tmp_path / "articles.jsonl").write_text("".join(json.dumps({"id": str(i), "row": i * 10}) + "\n" for i in range(4)))
    (tmp_path / "manifest.json").write_text(json.dumps({
        "total_articles": 4, "embedding_dim": 3, "model": "m", "timestamp": "t", "quality_metrics": {},
        "chunk_info": [], "embeddings_sha256": "x", "embeddings_file": "embeddings.npy", "articles_file": "articles.jsonl",
    }))

    result = load(tmp_path)

    assert np.array_equal(result["embeddings"], vectors)
    assert result["articles"][2] == {"id": "2", "row": 20}  # an article's own "row" key is kept there


@pytest.mark.parametrize(("row_bytes", "rows"), [(768 * 4, 400_000), (384 * 4, 700_000), (4096 * 4, 66_000),
                                                 (768 * 2, 700_000), (1 << 31, 1_000)])
def test_a_default_shard_holds_about_1_gib_of_vectors(row_bytes: int, rows: int) -> None:
    assert default_shard_rows(row_bytes) == rows
    assert 1 << 30 <= rows * row_bytes < 2 << 30 or rows == 1_000


# What the load left resident: its own heap (RssAnon; the shared libraries' pages, which the
# page cache decides, are not the load's doing), and the pages of the mapped vector shards.
_LOAD_AND_MEASURE = """
import sys
from async_embed_sync import load
result = load(sys.argv[1])
vector, article = float(result["embeddings"][-1].sum()), result["articles"][-1]  # a page of a shard read
with open("/proc/self/status") as status:
    heap = next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
mapped, in_shard = 0, False
with open("/proc/self/smaps") as smaps:
    for line in smaps:
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            in_shard = line.rstrip().endswith(".npy")
        elif in_shard and line.startswith("Rss:"):
            mapped += int(line.split()[1]) * 1024
print(heap, mapped, len(result["articles"]))
"""


def test_load_opens_a_bundle_larger_than_its_memory_bound(tmp_path: Path) -> None:
    # 40,000 rows of 768 float32 (123 MB of vectors) in 4 shards, opened and read at the last row.
    generate_run(tmp_path / "downloads", rows=40_000, dim=768, fmt="npy", text_bytes=20)
    merge_checkpoints(tmp_path / "downloads", tmp_path / "bundle", shard_rows=10_000)

    child = subprocess.run([sys.executable, "-c", _LOAD_AND_MEASURE, str(tmp_path / "bundle")],
                           capture_output=True, text=True, timeout=60)

    heap, mapped, articles = map(int, child.stdout.split())
    assert child.returncode == 0, child.stderr
    assert articles == 39_990
    assert 0 < mapped <= 1 << 20  # the vectors are mapped, a few pages of them read
    assert heap < 64 * 2**20  # Python, numpy, pyarrow's heap and one row group: not the vectors
