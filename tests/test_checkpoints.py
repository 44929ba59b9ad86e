from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from merge_fixtures import DIM, write_evil_pickle

from async_embed_sync.errors import CheckpointError, UnsafePickleError
from async_embed_sync.fileio import file_sha256
from async_embed_sync.merging.checkpoints import find_checkpoints, open_checkpoint
from async_embed_sync.merging.jsonl_index import parse_jsonl_span
from async_embed_sync.merging.safe_pickle import restricted_load
from async_embed_sync.testing.synthetic import (
    make_rows,
    make_vectors,
    write_legacy_checkpoint,
    write_npy_checkpoint,
)


def _rows(start: int, end: int, questions: frozenset[int] = frozenset()) -> tuple[np.ndarray, list[dict]]:
    return make_vectors(start, end, dim=DIM, seed=0), make_rows(
        start, end, text_bytes=50, question_indices=questions, seed=0
    )


def _write(path: Path, fmt: str, start: int = 10, end: int = 40, **overrides: object) -> Path:
    embeddings, articles = _rows(start, end, frozenset({start + 3}))
    arguments: dict = dict(start_index=start, model="m", gpu_id=2, hostname="h")
    arguments.update(overrides)
    arguments["embeddings"] = arguments.get("embeddings", embeddings)
    arguments["articles"] = arguments.get("articles", articles)
    if fmt == "pkl":
        return write_legacy_checkpoint(path.with_suffix(".pkl"), **arguments)
    return write_npy_checkpoint(path, **arguments)


@pytest.mark.parametrize("fmt", ["pkl", "npy"])
def test_both_formats_open_as_the_same_shard(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path / "tensor01" / "ckpt", fmt)
    embeddings, articles = _rows(10, 40, frozenset({13}))

    checkpoint = open_checkpoint(path)
    # A block may reuse the previous block's buffer: copy while iterating.
    blocks = [(block.embeddings.copy(), block.article_rows(), block.article_lines()) for block in checkpoint.blocks(7)]

    info = checkpoint.info
    assert (info.cluster, info.start_index, info.end_index, info.rows, info.dim) == ("tensor01", 10, 40, 30, DIM)
    assert (info.model, info.gpu_id, info.hostname, info.dtype) == ("m", 2, "h", np.float32)
    assert info.article_rows == 29 and info.size_bytes == path.stat().st_size
    articles_only = [row for row in articles if row.get("kind") != "question"]
    assert [len(vectors) for vectors, _, _ in blocks] == [7, 7, 7, 7, 2]
    assert np.array_equal(np.concatenate([vectors for vectors, _, _ in blocks]), embeddings)
    assert [row for _, rows, _ in blocks for row in rows] == articles_only
    assert [json.loads(line) for _, _, lines in blocks for line in lines] == articles_only


def test_npy_array_is_memory_mapped(tmp_path: Path) -> None:
    checkpoint = open_checkpoint(_write(tmp_path / "c" / "ckpt", "npy"))

    assert isinstance(checkpoint.embeddings, np.memmap)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_loads(tmp_path: Path, protocol: int) -> None:
    path = _write(tmp_path / "c" / "ckpt", "pkl", protocol=protocol, start_index=np.int64(10))

    assert open_checkpoint(path).info.start_index == 10


def test_numpy_1x_global_names_are_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "pkl", protocol=2)
    # Protocol 2 names globals as text lines; rewrite them as numpy 1.x did.
    path.write_bytes(path.read_bytes().replace(b"numpy._core.", b"numpy.core."))

    assert np.array_equal(open_checkpoint(path).embeddings, _rows(10, 40)[0])


def test_evil_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_evil_pickle(tmp_path / "c" / "evil.pkl", marker)

    with pytest.raises(UnsafePickleError) as caught:
        open_checkpoint(path)

    assert not marker.exists()
    assert "posix.system" in str(caught.value) and str(path) in str(caught.value)


def test_any_other_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c" / "x.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"embeddings": np.memmap(tmp_path / "m", np.float32, "w+", shape=(1, 2))}))

    with pytest.raises(UnsafePickleError, match="numpy.memmap"):
        open_checkpoint(path)


def test_pickled_object_array_is_refused(tmp_path: Path) -> None:
    embeddings = np.empty((1, DIM), dtype=object)
    path = _write(tmp_path / "c" / "ckpt", "pkl", start=0, end=1, embeddings=embeddings)

    with pytest.raises(CheckpointError, match="object"):
        open_checkpoint(path)


def test_truncated_pickle_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "pkl")
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(CheckpointError, match="truncated") as caught:
        open_checkpoint(path)
    assert str(path) in str(caught.value)


def test_a_pkl_that_is_not_a_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c" / "ckpt.pkl"
    path.parent.mkdir()
    np.save(tmp_path / "a.npy", np.zeros((2, 2)))
    path.write_bytes((tmp_path / "a.npy").read_bytes())

    with pytest.raises(CheckpointError, match=str(path)):
        open_checkpoint(path)


def test_pickle_of_something_else_than_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c" / "ckpt.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps([1, 2, 3]))

    with pytest.raises(CheckpointError, match="checkpoint dict"):
        open_checkpoint(path)


def test_object_npy_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "npy")
    np.save(path, np.array([[{"a": 1}] * DIM] * 30, dtype=object), allow_pickle=True)

    with pytest.raises(CheckpointError, match="Python objects"):
        open_checkpoint(path)


def test_npy_header_claiming_a_huge_shape_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "npy")
    data = path.read_bytes()
    honest = b"(30, 16)"
    # Same header length: the padding absorbs the longer shape.
    lying = data.replace(honest + b", }" + b" " * 11, b"(3000000000000, 16), }", 1)
    assert lying != data and len(lying) == len(data)
    path.write_bytes(lying)

    with pytest.raises(CheckpointError, match="header declares"):
        open_checkpoint(path)


def test_truncated_npy_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "npy")
    path.write_bytes(path.read_bytes()[:-1])

    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(path)


def test_sidecar_range_that_disagrees_with_the_rows_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "npy", end_index=45)

    with pytest.raises(CheckpointError, match=r"spans 35 rows but the array has 30"):
        open_checkpoint(path)


def test_legacy_range_that_disagrees_with_the_rows_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "pkl", end_index=39)

    with pytest.raises(CheckpointError, match=r"spans 29 rows"):
        open_checkpoint(path)


@pytest.mark.parametrize("fmt", ["pkl", "npy"])
def test_article_list_of_the_wrong_length_is_refused(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path / "c" / "ckpt", fmt, articles=_rows(10, 39)[1])

    with pytest.raises(CheckpointError, match="29 entries"):
        open_checkpoint(path)


def test_articles_file_outside_the_directory_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "npy")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    sidecar["articles_file"] = "../../etc/passwd"
    path.with_suffix(".json").write_text(json.dumps(sidecar))

    with pytest.raises(CheckpointError, match="plain file name"):
        open_checkpoint(path)


def test_missing_sidecar_field_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "npy")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    del sidecar["model"]
    path.with_suffix(".json").write_text(json.dumps(sidecar))

    with pytest.raises(CheckpointError, match="'model'"):
        open_checkpoint(path)


def test_find_checkpoints_skips_hidden_and_foreign_files(tmp_path: Path) -> None:
    kept = [_write(tmp_path / "a" / "one", "pkl"), _write(tmp_path / "b" / "two", "npy")]
    (tmp_path / ".async_embed_sync" / "a").mkdir(parents=True)
    (tmp_path / ".async_embed_sync" / "a" / "one.pkl.part").write_bytes(b"x")
    (tmp_path / ".async_embed_sync" / "x.pkl").write_bytes(b"x")
    (tmp_path / "a" / ".hidden.pkl").write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("x")

    assert find_checkpoints(tmp_path) == kept


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 10_000)

    assert file_sha256(path, chunk_bytes=4096) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_restricted_load_reads_plain_containers(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    value = {"a": [1, 2.5, "x", None, (1, 2)], "b": {3, 4}, "c": frozenset({5}), "d": bytearray(b"z"), "e": b"y"}
    path.write_bytes(pickle.dumps(value, protocol=2))

    assert restricted_load(path) == value


def test_kind_key_is_found_however_it_is_escaped(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "ckpt", "npy", start=0, end=4, articles=[{"id": str(i)} for i in range(4)])
    lines = [
        '{"id": "0", "kind": "question"}',
        '{"id": "1", "\\u006bind": "question"}',
        '{"id": "2", "text": "a \\"kind\\" word", "kind": "article"}',
        '{"id": "3", "title": "kin d"}',
    ]
    path.with_suffix(".jsonl").write_text("\n".join(lines) + "\n")

    assert open_checkpoint(path).info.article_rows == 2


def _npy_with_lines(tmp_path: Path, text: str) -> Path:
    rows = text.count("\n") + (not text.endswith("\n"))
    path = _write(tmp_path / "c" / "ckpt", "npy", start=0, end=rows, articles=[{"id": str(i)} for i in range(rows)])
    path.with_suffix(".jsonl").write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "0"}\n\n{"id": "2"}\n', "line 2 is not JSON"),
        ('{"id": "0"}\n["a list"]\n', "line 2 is not a JSON object"),
        ('{"id": "0"}\n{"id": "1", "title": \n', "line 2 is not JSON"),
    ],
)
def test_a_jsonl_line_that_is_not_an_object_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = _npy_with_lines(tmp_path, text)

    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def _parse(path: Path, offset: int, length: int, first_line: int = 1) -> list[dict]:
    return [row for rows in parse_jsonl_span(path, offset, length, first_line) for row in rows]


def test_parse_jsonl_span_parses_every_line_of_the_span(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "0"}\r\n {"id": "1"} \n{"id": "2", "title": 3,}\n{"id": "3"}')
    good = len('{"id": "0"}\r\n {"id": "1"} \n')

    assert _parse(path, 0, good) == [{"id": "0"}, {"id": "1"}]
    assert _parse(path, len('{"id": "0"}\r\n'), good - len('{"id": "0"}\r\n'), 2) == [{"id": "1"}]
    with pytest.raises(CheckpointError, match="rows.jsonl: line 3 is not JSON"):
        _parse(path, 0, path.stat().st_size)
    with pytest.raises(CheckpointError, match="line 12 is not JSON"):
        _parse(path, good, path.stat().st_size - good, 12)
    path.write_text('{"id": "0"}\n{"id": "1"}')
    assert _parse(path, 0, path.stat().st_size) == [{"id": "0"}, {"id": "1"}]
    with pytest.raises(CheckpointError, match="the file shrank while it was read"):
        _parse(path, 0, path.stat().st_size + 5)
    with pytest.raises(CheckpointError, match="missing.jsonl: cannot be read"):
        _parse(tmp_path / "missing.jsonl", 0, 1)


def test_jsonl_lines_are_kept_verbatim_whatever_their_ending(tmp_path: Path) -> None:
    text = '{"id": "0"}\r\n{"id": "1", "kind": "question"}\n {"id": "2"} \n{"id": "3"}'
    path = _npy_with_lines(tmp_path, text)

    checkpoint = open_checkpoint(path)
    # A block is used before the next one is asked for.
    (lines, rows), = [(block.article_lines(), block.article_rows()) for block in checkpoint.blocks(10)]

    assert checkpoint.info.article_rows == 3
    assert lines == [b'{"id": "0"}\r\n', b' {"id": "2"} \n', b'{"id": "3"}\n']
    assert rows == [{"id": "0"}, {"id": "2"}, {"id": "3"}]
    assert [(text.encode()[offset : offset + length], line) for offset, length, line in checkpoint.article_spans()] == [
        (b'{"id": "0"}\r\n', 1), (b' {"id": "2"} \n{"id": "3"}', 3)
    ]


def _bases(array: np.ndarray) -> list[object]:
    bases: list[object] = []
    while (base := getattr(bases[-1] if bases else array, "base", None)) is not None:
        bases.append(base)
    return bases


# Payloads under about 128 KiB come within the unpickler's read-ahead (or a
# protocol-4 frame) and are never skipped: these arrays are larger.
_MAPPED_ROWS = 4000
# A threshold far below the default, so that the test files stay small.
_MAPPED_BYTES = 4096


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_legacy_embeddings_are_mapped_from_the_file_not_read(tmp_path: Path, protocol: int) -> None:
    path = _write(tmp_path / "c" / "ckpt", "pkl", end=10 + _MAPPED_ROWS, protocol=protocol)

    embeddings = open_checkpoint(path, mapped_payload_bytes=_MAPPED_BYTES).embeddings

    assert np.array_equal(embeddings, _rows(10, 10 + _MAPPED_ROWS)[0])
    # Protocol 2 carries bytes as latin-1 text, which is read, never skipped.
    mapped = any(isinstance(base, np.memmap) for base in _bases(embeddings))
    assert mapped == (protocol >= 3)
    assert not (mapped and embeddings.flags.writeable)


@pytest.mark.parametrize("rows", [_MAPPED_ROWS, 30])
def test_a_large_payload_that_is_not_the_embeddings_is_read_all_the_same(tmp_path: Path, rows: int) -> None:
    embeddings, articles = _rows(10, 10 + rows)
    blob = bytes(range(256)) * 1024  # a bytes payload that is skipped, beside (or instead of) the array's
    articles[1]["blob"] = blob
    path = _write(tmp_path / "c" / "ckpt", "pkl", end=10 + rows, embeddings=embeddings, articles=articles)

    checkpoint = open_checkpoint(path, mapped_payload_bytes=_MAPPED_BYTES)

    assert checkpoint.articles[1]["blob"] == blob
    assert np.array_equal(checkpoint.embeddings, embeddings)


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_pickle_truncated_inside_its_mapped_array_is_refused(tmp_path: Path, protocol: int) -> None:
    path = _write(tmp_path / "c" / "ckpt", "pkl", end=10 + _MAPPED_ROWS, protocol=protocol)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(_rows(10, 10 + _MAPPED_ROWS)[0].tobytes()) + 200_000])

    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(path, mapped_payload_bytes=_MAPPED_BYTES)
