"""The package and its legacy pickle across numpy versions: 2.x (this environment), 1.26 and the oldest.

A ``.pkl`` merged here (numpy 2) names only what every numpy loads, and
loads with plain ``pickle.load`` (warnings as errors) here, under numpy 1.26
and under the oldest numpy this Python installs (1.23.2 for Python 3.11), in
an environment of its own that holds numpy alone, as a legacy script's would.

A second virtual environment, built once per session, holds numpy 1.26 and
this project installed from a copy of its source with pip, as a user would.
In it:

- a pipeline's own numpy 1.26 checkpoints (numpy scalars in their rows,
  pickle protocols 2 and 5) merge into both output forms and load back,
  and a bundle's parquet shards are written by the pyarrow pip picks there;
- and here, the same checkpoints (numpy 1.x pickles) pass the restricted
  unpickler and merge to the same result, whose numpy 1.26 ``.pkl`` loads here.

In CI the environments must build; elsewhere the tests skip only when pip
cannot reach the package index.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from merge_fixtures import DIM, expected_merge

from async_embed_sync import load
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.testing.synthetic import (
    generate_run,
    make_rows,
    write_legacy_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
NUMPY_1 = "numpy==1.26.*"
# The oldest numpy with a wheel for each Python (pip download --no-deps --only-binary=:all: numpy==...):
# a legacy script's numpy may be as old as its Python allows.
OLDEST_NUMPY = {(3, 11): "1.23.2", (3, 12): "1.26.0", (3, 13): "2.1.0"}
# What pip prints when it cannot reach the index at all.
_OFFLINE = re.compile(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
                      r"Name or service not known|connection broken by")

pytestmark = pytest.mark.timeout(300)


def _build(what: str, steps: list[list[str]]) -> None:
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=280)
        if result.returncode != 0:
            message = (f"cannot build the {what} environment: {' '.join(step)} exited {result.returncode}\n"
                       f"{result.stderr[-4000:]}")
            if os.environ.get("CI") != "true" and _OFFLINE.search(result.stderr):
                pytest.skip(f"the package index is unreachable: {message}")
            pytest.fail(message)


@pytest.fixture(scope="session")
def numpy1_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a new environment with numpy 1.26 and this project installed by pip."""
    given = os.environ.get("ASYNC_EMBED_SYNC_NUMPY1_PYTHON")
    if given:
        # .ci/run's environment of the lowest versions pyproject.toml admits (numpy 1.26 among them),
        # already built: one numpy 1 environment per run.
        return Path(given)
    root = tmp_path_factory.mktemp("numpy1")
    source = root / "source"
    # A copy: pip builds in the source tree (build/, *.egg-info), which is the work tree here.
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "async_embed_sync", source / "async_embed_sync",
                    ignore=shutil.ignore_patterns("__pycache__"))
    constraints = root / "constraints.txt"
    constraints.write_text(NUMPY_1 + "\n")
    venv = root / "venv"
    python = venv / "bin" / "python"
    _build("numpy 1.26", [
        # No pip of its own: this environment's pip installs into it (--python), which saves a bootstrap.
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile",
         "--disable-pip-version-check", "--constraint", str(constraints), str(source)],
    ])
    return python


@pytest.fixture(scope="session")
def oldest_numpy_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a new environment with only the oldest numpy this Python installs, as a legacy script's."""
    version = OLDEST_NUMPY.get(sys.version_info[:2])
    if version is None:
        message = (f"no oldest numpy is known for Python {sys.version_info[0]}.{sys.version_info[1]}: "
                   "add the oldest with a wheel for it to OLDEST_NUMPY")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    venv = tmp_path_factory.mktemp("oldest_numpy") / "venv"
    python = venv / "bin" / "python"
    _build(f"numpy {version}", [
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile",
         "--disable-pip-version-check", "--only-binary=:all:", f"numpy=={version}"],
    ])
    return python


def _run_python(python: Path, script: str, *arguments: object, cwd: Path, options: tuple[str, ...] = ()) -> str:
    # Away from the work tree and without PYTHONPATH: the installed package is the one imported.
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(python), *options, "-c", script, *map(str, arguments)], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


# What every numpy loads: numpy 1.x's names (numpy 2 loads numpy.core.multiarray._reconstruct without a warning).
_NAMES_EVERY_NUMPY_LOADS = {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}


def _global_names(path: Path) -> set[str]:
    """Every ``module name`` a pickle names, by GLOBAL or by STACK_GLOBAL (the two strings pushed before it)."""
    names, strings = set(), []
    for opcode, argument, _ in pickletools.genops(path.read_bytes()):
        if opcode.name in ("GLOBAL", "INST"):
            names.add(argument)
        elif opcode.name == "STACK_GLOBAL":
            names.add(" ".join(strings[-2:]))
        elif "UNICODE" in opcode.name:
            strings.append(argument)
    return names


def _plain(articles: Any) -> str:
    """``articles`` as JSON, their arrays as lists and dtypes as names: what two loads of them must agree on."""
    return json.dumps(articles, default=lambda value: value.tolist() if isinstance(value, np.ndarray) else str(value),
                      sort_keys=True)


_LOAD_PLAINLY = """
import json, pickle, sys
import numpy as np
assert np.__version__.startswith(sys.argv[4]), np.__version__
with open(sys.argv[1], "rb") as stream:
    document = pickle.load(stream)
expected = np.load(sys.argv[2])
embeddings = document["embeddings"]
assert type(embeddings) is np.ndarray and embeddings.dtype == expected.dtype, (type(embeddings), embeddings.dtype)
assert np.array_equal(embeddings, expected)
embeddings[0, 0] = 1.0  # writable, as the legacy merge's array was
with open(sys.argv[3], encoding="utf-8") as stream:
    expected_articles = json.load(stream)
# An array in a row is an array: compared as the list it holds.
assert json.loads(json.dumps(document["articles"], default=lambda value: value.tolist())) == expected_articles
assert all(type(row["counts"]) is np.ndarray for row in document["articles"] if "counts" in row)
# An np.int64 id is an int, no numpy scalar: the synthetic run's ids are str.
assert [type(row["id"]) for row in document["articles"]] == [type(row["id"]) for row in expected_articles]
print(np.__version__)
"""


@pytest.mark.parametrize("numpy_version", ["here", "1.26", "oldest"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_pickle_merged_here_loads_plainly_under_every_numpy(
    request: pytest.FixtureRequest, tmp_path: Path, dtype: str, numpy_version: str
) -> None:
    fixture, version = {
        "here": (None, np.__version__),
        "1.26": ("numpy1_python", "1.26."),
        "oldest": ("oldest_numpy_python", OLDEST_NUMPY.get(sys.version_info[:2], "")),
    }[numpy_version]
    python = request.getfixturevalue(fixture) if fixture else Path(sys.executable)
    generate_run(tmp_path / "downloads", rows=200, dim=DIM, fmt="mixed")
    # A pipeline's numpy scalars and arrays, in a checkpoint after the run's.
    rows = [{**row, "id": np.int64(200 + offset), "score": np.float32(0.25), "ok": np.bool_(True),
             "counts": np.array([offset, 1])}
            for offset, row in enumerate(make_rows(200, 230, text_bytes=50, question_indices=(), seed=1))]
    vectors = np.linspace(-1, 1, 30 * DIM).reshape(30, DIM)
    write_legacy_checkpoint(tmp_path / "downloads" / "tensor03" / "extra.pkl", vectors, rows, start_index=200)
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl", dtype=dtype)
    embeddings, articles = expected_merge(200, set(range(190, 200)))
    articles += [{**row, "id": int(row["id"]), "score": 0.25, "ok": True, "counts": [offset, 1]}
                 for offset, row in enumerate(rows)]
    np.save(tmp_path / "expected.npy", np.concatenate([embeddings, vectors]).astype(dtype))
    (tmp_path / "expected.json").write_text(json.dumps(articles), encoding="utf-8")

    loaded = _run_python(python, _LOAD_PLAINLY, tmp_path / "merged.pkl", tmp_path / "expected.npy",
                         tmp_path / "expected.json", version, cwd=tmp_path, options=("-W", "error"))

    assert loaded.startswith(version)
    assert _global_names(tmp_path / "merged.pkl") <= _NAMES_EVERY_NUMPY_LOADS


def test_a_merged_pickle_names_only_what_every_numpy_loads(tmp_path: Path) -> None:
    generate_run(tmp_path / "downloads", rows=40, dim=DIM, fmt="mixed")
    # Every numpy value a checkpoint's rows may hold: scalars, arrays (strided, of objects, nested), dtypes.
    rows = [{**row, "id": np.int64(40 + offset), "vector": np.arange(4, dtype=np.float16)[::-2],
             "mixed": np.array([np.int64(offset), "x", np.zeros(2)], dtype=object),
             "nested": {"kind": np.dtype("<M8[s]"), "sizes": [np.uint8(offset)]}}
            for offset, row in enumerate(make_rows(40, 50, text_bytes=50, question_indices=(), seed=1))]
    vectors = np.linspace(-1, 1, 10 * DIM).reshape(10, DIM)
    write_legacy_checkpoint(tmp_path / "downloads" / "tensor03" / "extra.pkl", vectors, rows, start_index=40)
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")

    names = _global_names(tmp_path / "merged.pkl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 warns of numpy.core names other than _reconstruct's
        with open(tmp_path / "merged.pkl", "rb") as stream:
            plain = pickle.load(stream)
    restricted = load(tmp_path / "merged.pkl")

    assert names == _NAMES_EVERY_NUMPY_LOADS and not any("numpy._core" in name for name in names)
    embeddings, _ = expected_merge(40, set(range(30, 40)))
    expected = np.concatenate([embeddings, vectors]).astype(np.float32)
    assert np.array_equal(plain["embeddings"], expected) and plain["embeddings"].flags.writeable
    assert np.array_equal(restricted["embeddings"], expected)
    last = plain["articles"][-1]
    assert last["vector"].dtype == np.float16 and last["vector"].tolist() == [3, 1] and last["vector"].flags.writeable
    assert last["mixed"].dtype == object and type(last["mixed"][0]) is int and last["mixed"][0] == 9
    assert last["nested"] == {"kind": np.dtype("<M8[s]"), "sizes": [9]}
    assert _plain(plain["articles"]) == _plain(restricted["articles"])


_MERGE_UNDER_NUMPY_1 = """
import pickle, sys
from pathlib import Path
import numpy as np
import async_embed_sync
from async_embed_sync import load
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.testing.synthetic import generate_run, make_rows, make_vectors, write_legacy_checkpoint

assert np.__version__.startswith("1.26."), np.__version__
assert Path(async_embed_sync.__file__).is_relative_to(sys.prefix), async_embed_sync.__file__
root = Path(sys.argv[1])
downloads = root / "downloads"
generate_run(downloads, rows=120, dim=8, fmt="mixed", gpus_per_cluster=2)
scalar_rows = []
for protocol, start in ((2, 120), (5, 150)):
    rows = [{"id": np.int64(index), "title": f"t{index}", "score": np.float32(index / 4), "ok": np.bool_(index % 2)}
            for index in range(start, start + 30)]
    vectors = make_vectors(start, start + 30, dim=8, seed=5).astype(np.float64)
    write_legacy_checkpoint(downloads / "tensor03" / f"numpy1_p{protocol}.pkl", vectors, rows,
                            start_index=start, protocol=protocol)
    scalar_rows += [{"id": index, "title": f"t{index}", "score": index / 4, "ok": bool(index % 2)}
                    for index in range(start, start + 30)]
questions = set(range(110, 120))
run_rows = make_rows(0, 120, text_bytes=200, question_indices=questions, seed=0)
expected_articles = [row for index, row in enumerate(run_rows) if index not in questions] + scalar_rows
expected = np.concatenate([make_vectors(0, 110, dim=8, seed=0), make_vectors(120, 150, dim=8, seed=5),
                           make_vectors(150, 180, dim=8, seed=5)])
# Its ids are str and int: a bundle keeps them in JSON lines (a parquet column holds one type).
for output, articles_format in ((root / "numpy1.pkl", None), (root / "numpy1-bundle", "jsonl")):
    merge_checkpoints(downloads, output, articles_format=articles_format)
    merged = load(output)
    assert np.array_equal(merged["embeddings"], expected), output
    assert merged["articles"] == expected_articles, output
    assert all(type(article["id"]) is int for article in merged["articles"][-len(scalar_rows):]), output
with open(root / "numpy1.pkl", "rb") as stream:
    assert np.array_equal(pickle.load(stream)["embeddings"], expected)
# Parquet shards, written by the worker's pyarrow beside numpy 1.26.
generate_run(root / "plain", rows=120, dim=8, fmt="mixed", gpus_per_cluster=2)
merge_checkpoints(root / "plain", root / "numpy1-parquet", shard_rows=50)
assert list(load(root / "numpy1-parquet")["articles"]) == expected_articles[:110]
np.save(root / "expected.npy", expected)
print(np.__version__)
"""


def test_the_package_merges_and_loads_under_numpy_1_and_reads_its_pickles(numpy1_python: Path, tmp_path: Path) -> None:
    version = _run_python(numpy1_python, _MERGE_UNDER_NUMPY_1, tmp_path, cwd=tmp_path)
    assert version.startswith("1.26.")
    expected = np.load(tmp_path / "expected.npy")

    # Here, under numpy 2: numpy 1.26's checkpoints and its merged result.
    merge_checkpoints(tmp_path / "downloads", tmp_path / "numpy2.pkl")
    ours, theirs = load(tmp_path / "numpy2.pkl"), load(tmp_path / "numpy1.pkl")
    with open(tmp_path / "numpy1.pkl", "rb") as stream:
        plain = pickle.load(stream)

    assert np.array_equal(ours["embeddings"], expected) and np.array_equal(theirs["embeddings"], expected)
    assert np.array_equal(plain["embeddings"], expected)
    bundle = load(tmp_path / "numpy1-bundle")
    assert ours["articles"] == theirs["articles"] == plain["articles"] == bundle["articles"]
    assert ours["chunk_info"] == theirs["chunk_info"]
