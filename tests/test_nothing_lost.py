"""Nothing lost and nothing misleading: the user's files at --output, the publish, what a killed
merge leaves, free space, damaged local files, hostile sizes, completeness left unchecked.

Real files, real pickles, the real CLI: nothing under test is mocked.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from merge_fixtures import DIM

from async_embed_sync import load
from async_embed_sync.errors import AsyncEmbedSyncError, OutputError
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.testing.synthetic import generate_run, make_vectors

ROWS = 200


def _run(root: Path, fmt: str = "npy", **options: object) -> list[Path]:
    settings: dict = dict(rows=ROWS, dim=DIM, gpus_per_cluster=2, fmt=fmt, questions=2)
    settings.update(options)
    return generate_run(root, **settings)


def _refusal(downloads: Path, output: Path, **options: object) -> str:
    """The paragraph the CLI prints (``str`` of the error; exit 1: an ``AsyncEmbedSyncError``)."""
    with pytest.raises(AsyncEmbedSyncError) as caught:
        merge_checkpoints(downloads, output, **options)
    return str(caught.value)


# ------------------------------------------------------------ 1. the user's own pickle at --output


@pytest.mark.parametrize("name", ["my_model.pkl", "my_model.PICKLE"])
def test_the_users_own_pickle_at_the_output_is_refused_untouched(tmp_path: Path, name: str) -> None:
    _run(tmp_path / "downloads")
    mine = tmp_path / name
    mine.write_bytes(pickle.dumps({"mine": 1}))
    before = mine.read_bytes()

    message = _refusal(tmp_path / "downloads", mine)

    assert message.startswith(f"Output {mine}: exists and is not a merged result")
    assert message.endswith("Delete it first, or choose another --output.")
    assert mine.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["downloads", name])


@pytest.mark.parametrize("content", [
    pickle.dumps([{"embeddings": 1, "articles": 2}]),  # not a dict at the top
    pickle.dumps({"embeddings": {"articles": 1}, "x": 1}),  # the name, but nested
    pickle.dumps({"embeddings": [1.0, 2.0], "articles": []}),  # no array first
    b"",  # empty
    b"not a pickle at all\n",
], ids=["list", "nested", "no array", "empty", "text"])
def test_a_pickle_that_only_looks_like_a_result_is_refused(tmp_path: Path, content: bytes) -> None:
    _run(tmp_path / "downloads")
    mine = tmp_path / "mine.pkl"
    mine.write_bytes(content)

    with pytest.raises(OutputError, match="exists and is not a merged result"):
        merge_checkpoints(tmp_path / "downloads", mine)
    assert mine.read_bytes() == content


def test_a_symlink_at_a_pickle_output_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "real.pkl")
    (tmp_path / "link.pkl").symlink_to(tmp_path / "real.pkl")

    with pytest.raises(OutputError, match="exists and is not a merged result"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "link.pkl")
    assert (tmp_path / "link.pkl").is_symlink()


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
def test_a_result_the_legacy_script_dumped_is_replaced(tmp_path: Path, protocol: int) -> None:
    _run(tmp_path / "downloads")
    output = tmp_path / "wikipedia_merged.pkl"
    # What sync_and_merge_embeddings.py wrote: pickle.dump of the legacy dict.
    legacy = {
        "embeddings": np.ones((3000, DIM), np.float32),  # a payload past any prefix read
        "articles": [{"id": 1, "title": "old"}] * 3000,
        "total_articles": 3000, "embedding_dim": DIM, "model": "old", "timestamp": "then",
        "quality_metrics": {}, "chunk_info": [],
    }
    output.write_bytes(pickle.dumps(legacy, protocol=protocol))

    report = merge_checkpoints(tmp_path / "downloads", output)

    assert load(output)["total_articles"] == report.total_articles == ROWS - 2


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_result_this_tool_wrote_is_replaced(tmp_path: Path, dtype: str) -> None:
    _run(tmp_path / "downloads")
    output = tmp_path / "merged.pkl"
    merge_checkpoints(tmp_path / "downloads", output, dtype=dtype)
    _run(tmp_path / "downloads", seed=1)  # new vectors, same files

    merge_checkpoints(tmp_path / "downloads", output, dtype=dtype)

    assert np.array_equal(load(output)["embeddings"][0], make_vectors(0, 1, dim=DIM, seed=1)[0].astype(dtype))


def test_the_recogniser_reads_a_bounded_prefix_of_a_large_result(tmp_path: Path) -> None:
    """A result whose rows are 8 GiB (sparse here) is told from a few reads: its payloads are skipped."""
    from async_embed_sync.output.legacy_pickle import is_merged_result

    shape = (1 << 21, 1024)  # 8 GiB of float32 rows
    legacy = tmp_path / "legacy.pkl"
    with open(legacy, "wb") as stream:
        body = pickle.dumps({"embeddings": np.zeros((1, 1), np.float32), "articles": []}, protocol=4)
        # The same stream with the payload's length made 8 GiB, the bytes left a hole.
        small = np.zeros((1, 1), np.float32).tobytes()
        marker = b"\x8e" + len(small).to_bytes(8, "little") if b"\x8e" in body else b"C" + bytes([len(small)])
        at = body.index(marker + small)
        stream.write(body[:at] + b"\x8e" + (shape[0] * shape[1] * 4).to_bytes(8, "little"))
        stream.seek(shape[0] * shape[1] * 4, 1)
        stream.write(body[at + len(marker) + len(small):])
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, stream):
            self.stream = stream

        def read(self, n=-1):
            data = self.stream.read(n)
            reads.append(len(data))
            return data

        def readline(self, n=-1):
            data = self.stream.readline(n)
            reads.append(len(data))
            return data

        def seek(self, *args):
            return self.stream.seek(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    import async_embed_sync.output.legacy_pickle as legacy_pickle
    legacy_pickle.open = lambda path, mode: Counting(real_open(path, mode))  # type: ignore[attr-defined]
    try:
        assert is_merged_result(legacy)
    finally:
        del legacy_pickle.open  # type: ignore[attr-defined]
    assert legacy.stat().st_size > 8 << 30
    assert sum(reads) < 4096


# ------------------------------------------------------------ 7. completeness not checked


def test_the_summary_says_once_that_completeness_could_not_be_checked(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")

    out = merge_checkpoints(tmp_path / "downloads", tmp_path / "merged").summary()

    assert out.count("UNCHECKED") == 1
    assert '"total_rows": N in credentials.json' in out
    assert "write total_rows in its checkpoints" in out
    assert all(len(line) <= 80 for line in out.splitlines() if "UNCHECKED" in line or "total_rows" in line)


@pytest.mark.parametrize("declared", ["checkpoints", "config"])
def test_the_summary_says_nothing_of_it_when_a_total_is_known(tmp_path: Path, declared: str) -> None:
    _run(tmp_path / "downloads", declare_total=declared == "checkpoints")

    report = merge_checkpoints(tmp_path / "downloads", tmp_path / "merged",
                               expect_rows=ROWS if declared == "config" else None)

    assert not report.completeness_unchecked
    assert "UNCHECKED" not in report.summary()
