"""Every valid input that pipelines produce merges to its values, in every output form.

Inputs are drawn by hypothesis: float arrays of any dtype numpy saves, either
byte order, C or Fortran order, split into checkpoints of both formats; and
article rows whose metadata holds numpy scalars, None, nested lists and
dicts, any Unicode. Metadata is drawn as ``(value written, value expected)``
pairs, so the expectation never goes through the code under test.
"""

from __future__ import annotations

import math
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from async_embed_sync import load
from async_embed_sync.errors import CheckpointError
from async_embed_sync.merging.merge import OUTPUT_DTYPES, merge_checkpoints
from async_embed_sync.testing.synthetic import (
    write_legacy_checkpoint,
    write_npy_checkpoint,
)

# Deterministic (derandomized, no example database) and small: CI runs the same examples each time.
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A bundle's merge starts the article worker, a fresh interpreter (0.15 s; 0.5 s with pyarrow's import):
# fewer examples where each one writes a bundle.
BUNDLE_SETTINGS = settings(SETTINGS, max_examples=20)
PARQUET_SETTINGS = settings(SETTINGS, max_examples=12)

FLOAT_DTYPES = [np.dtype(name) for name in ("float16", "float32", "float64", "longdouble")]
NUMPY_INTEGERS = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32)
PLAIN_TYPES = (dict, list, str, int, float, bool, type(None))


def _pair(value: Any) -> tuple[Any, Any]:
    return value, value


def _numpy_integer(kind: type) -> st.SearchStrategy[tuple[Any, int]]:
    bounds = np.iinfo(kind)
    return st.integers(int(bounds.min), int(bounds.max)).map(lambda value: (kind(value), value))


def _numpy_float(kind: type, width: int) -> st.SearchStrategy[tuple[Any, float]]:
    finite = st.floats(width=width, allow_nan=False, allow_infinity=False)
    return finite.map(lambda value: (kind(value), float(kind(value))))


IDS = st.one_of(st.integers(-(2**63), 2**63 - 1).map(_pair), *map(_numpy_integer, NUMPY_INTEGERS))
# numpy strings drop trailing NULs: np.str_("a\x00") is "a", and so is the value expected.
TEXTS = st.one_of(st.text().map(_pair), st.text().map(lambda text: (np.str_(text), str(np.str_(text)))))
FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(_pair),
    _numpy_float(np.float64, 64),
    _numpy_float(np.float32, 32),
    _numpy_float(np.float16, 16),
)
BOOLS = st.one_of(st.booleans().map(_pair), st.booleans().map(lambda flag: (np.bool_(flag), flag)))
SCALARS = st.one_of(st.none().map(_pair), BOOLS, IDS, FLOATS, TEXTS)


def _list_pairs(pairs: list[tuple[Any, Any]]) -> tuple[list, list]:
    return [written for written, _ in pairs], [expected for _, expected in pairs]


def _dict_pairs(pairs: dict[str, tuple[Any, Any]]) -> tuple[dict, dict]:
    written = {key: value for key, (value, _) in pairs.items()}
    return written, {key: expected for key, (_, expected) in pairs.items()}


METADATA = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(_list_pairs),
        st.dictionaries(st.text(max_size=4), children, max_size=3).map(_dict_pairs),
    ),
    max_leaves=6,
)


@st.composite
def free_rows(draw: st.DrawFn, count: int) -> list[tuple[dict, dict]]:
    """``count`` ``(row written, row expected)``, each with an id, a title and any metadata."""
    rows = []
    for _ in range(count):
        fields = {"id": draw(IDS), "title": draw(TEXTS), "meta": draw(METADATA)}
        if draw(st.integers(0, 4)) == 0:
            fields["kind"] = _pair(draw(st.sampled_from(["question", "article"])))
        rows.append(_dict_pairs(fields))
    return rows


@st.composite
def tabular_rows(draw: st.DrawFn, count: int) -> list[tuple[dict, dict]]:
    """Rows that all have the same fields of the same types, as a parquet table needs."""
    rows = []
    for _ in range(count):
        fields = {
            "id": draw(IDS),
            "title": draw(TEXTS),
            "score": draw(st.one_of(st.none().map(_pair), FLOATS)),
            "flag": draw(BOOLS),
            "tags": _list_pairs(draw(st.lists(TEXTS, max_size=2))),
            "extra": _dict_pairs({"rank": draw(IDS), "note": draw(st.one_of(st.none().map(_pair), TEXTS))}),
        }
        rows.append(_dict_pairs(fields))
    return rows


def _elements(dtype: np.dtype) -> st.SearchStrategy[float]:
    width = min(dtype.itemsize * 8, 64)
    # Within float16's range: a cast to either output dtype keeps every finite value finite.
    return st.one_of(
        st.floats(min_value=-6e4, max_value=6e4, width=width),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    )


@st.composite
def runs(draw: st.DrawFn, rows_strategy: Any) -> dict[str, Any]:
    """A run split into 1 to 3 checkpoints, each in a format, byte order and memory order of its own."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    dim = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
    embeddings = draw(hnp.arrays(dtype, (sum(sizes), dim), elements=_elements(dtype)))
    rows = draw(rows_strategy(sum(sizes)))
    checkpoints = []
    start = 0
    for size in sizes:
        checkpoints.append(
            {
                "start": start,
                "size": size,
                "format": draw(st.sampled_from(["pkl", "npy"])),
                "protocol": draw(st.integers(2, 5)),
                "byteorder": draw(st.sampled_from(["<", ">"])),
                "fortran": draw(st.booleans()),
            }
        )
        start += size
    dtype = draw(st.sampled_from(OUTPUT_DTYPES))
    return {"embeddings": embeddings, "rows": rows, "checkpoints": checkpoints, "dtype": dtype}


def _is_article(row: dict) -> bool:
    return row.get("kind", "article") == "article"


def _write_run(run: dict[str, Any], root: Path) -> tuple[np.ndarray, list[dict]]:
    """Write the run's checkpoints under ``root``; the embeddings and articles a merge must give."""
    embeddings, rows = run["embeddings"], run["rows"]
    for number, part in enumerate(run["checkpoints"]):
        window = slice(part["start"], part["start"] + part["size"])
        array = embeddings[window].astype(embeddings.dtype.newbyteorder(part["byteorder"]))
        array = np.asfortranarray(array) if part["fortran"] else np.ascontiguousarray(array)
        stem = root / "cluster" / f"part{number}"
        if part["format"] == "pkl":
            written = [row for row, _ in rows[window]]
            write_legacy_checkpoint(
                stem.with_suffix(".pkl"), array, written, start_index=part["start"], protocol=part["protocol"]
            )
        else:
            # JSON lines hold plain values only: what the pipeline's json.dumps could write.
            write_npy_checkpoint(stem, array, [expected for _, expected in rows[window]], start_index=part["start"])
    keep = np.array([_is_article(expected) for _, expected in rows])
    return embeddings[keep], [expected for (_, expected), kept in zip(rows, keep) if kept]


def _assert_plain(value: Any) -> None:
    """Nothing in ``value`` is a numpy scalar or any other type than JSON's."""
    assert type(value) in PLAIN_TYPES, (type(value), value)
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        _assert_plain(item)


def _assert_merged(output: Path, embeddings: np.ndarray, articles: list[dict], dtype: str) -> None:
    merged = load(output)
    assert merged["embeddings"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(merged["embeddings"], embeddings.astype(dtype))
    assert merged["articles"] == articles
    _assert_plain(list(merged["articles"]))
    assert all(type(article["id"]) is int for article in merged["articles"])


@BUNDLE_SETTINGS
@given(runs(free_rows))
def test_any_float_array_and_metadata_merge_to_their_values(run: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        embeddings, articles = _write_run(run, root / "downloads")
        if not articles:
            return  # a run without articles is not one that pipelines produce
        for output, articles_format in ((root / "merged.pkl", None), (root / "bundle", "jsonl")):
            merge_checkpoints(root / "downloads", output, dtype=run["dtype"], articles_format=articles_format)
            _assert_merged(output, embeddings, articles, run["dtype"])
        with open(root / "merged.pkl", "rb") as stream:
            plain = pickle.load(stream)  # as downstream scripts read it
        assert plain["articles"] == articles
        np.testing.assert_array_equal(plain["embeddings"], embeddings.astype(run["dtype"]))


@PARQUET_SETTINGS
@given(runs(tabular_rows))
def test_tabular_metadata_merges_to_parquet_with_its_values(run: dict[str, Any]) -> None:
    pytest.importorskip("pyarrow")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        embeddings, articles = _write_run(run, root / "downloads")
        if not articles:
            return
        merge_checkpoints(root / "downloads", root / "bundle", dtype=run["dtype"], articles_format="parquet")
        _assert_merged(root / "bundle", embeddings, articles, run["dtype"])


def _one_checkpoint(root: Path, rows: list[dict]) -> Path:
    embeddings = np.ones((len(rows), 3), np.float32)
    return write_legacy_checkpoint(root / "cluster" / "part.pkl", embeddings, rows, start_index=0)


@pytest.mark.parametrize("articles_format", ["jsonl", "parquet"])
def test_nan_and_infinity_in_metadata_are_null_in_a_bundle_and_kept_in_a_pickle(
    tmp_path: Path, articles_format: str
) -> None:
    if articles_format == "parquet":
        pytest.importorskip("pyarrow")
    rows = [{"id": np.int64(index), "title": "t", "score": value} for index, value in
            enumerate([math.nan, np.float32(math.inf), -math.inf, 0.5])]
    _one_checkpoint(tmp_path / "downloads", rows)

    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "bundle", articles_format=articles_format)

    kept = [article["score"] for article in load(tmp_path / "merged.pkl")["articles"]]
    assert math.isnan(kept[0]) and kept[1:] == [math.inf, -math.inf, 0.5]
    assert [article["score"] for article in load(tmp_path / "bundle")["articles"]] == [None, None, None, 0.5]


def test_a_value_json_cannot_hold_fails_a_bundle_naming_the_file_and_row(tmp_path: Path) -> None:
    rows = [{"id": 0, "title": "fine"}, {"id": 1, "title": "lone surrogate \ud800"}]
    checkpoint = _one_checkpoint(tmp_path / "downloads", rows)

    with pytest.raises(CheckpointError) as raised:
        merge_checkpoints(tmp_path / "downloads", tmp_path / "bundle", articles_format="jsonl")

    assert str(checkpoint) in str(raised.value) and "articles[1]" in str(raised.value)
    assert "surrogates not allowed" in str(raised.value) and not (tmp_path / "bundle").exists()
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")  # a pickle holds any str
    assert load(tmp_path / "merged.pkl")["articles"][1]["title"] == "lone surrogate \ud800"
