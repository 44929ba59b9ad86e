"""The package and its legacy pickle across numpy versions: 2.x (this environment) and 1.26.

A second virtual environment, built once per session, holds numpy 1.26 and
this project installed from a copy of its source with pip, as a user would.
In it:

- a ``.pkl`` merged here (numpy 2) loads with plain ``pickle.load``;
- a pipeline's own numpy 1.26 checkpoints (numpy scalars in their rows,
  pickle protocols 2 and 5) merge into both output forms and load back,
  and a bundle's parquet shards are written by the pyarrow pip picks there;
- and here, the same checkpoints (numpy 1.x pickles) pass the restricted
  unpickler and merge to the same result, whose numpy 1.26 ``.pkl`` loads here.

In CI the environment must build; elsewhere the tests skip only when pip
cannot reach the package index.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
# What pip prints when it cannot reach the index at all.
_OFFLINE = re.compile(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
                      r"Name or service not known|connection broken by")

pytestmark = pytest.mark.timeout(300)


def _cannot_build(step: list[str], result: subprocess.CompletedProcess[str]) -> None:
    message = (f"cannot build the numpy 1.26 environment: {' '.join(step)} exited {result.returncode}\n"
               f"{result.stderr[-4000:]}")
    if os.environ.get("CI") != "true" and _OFFLINE.search(result.stderr):
        pytest.skip(f"the package index is unreachable: {message}")
    pytest.fail(message)


@pytest.fixture(scope="session")
def numpy1_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a new environment with numpy 1.26 and this project installed by pip."""
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
    steps = [
        # No pip of its own: this environment's pip installs into it (--python), which saves a bootstrap.
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile",
         "--disable-pip-version-check", "--constraint", str(constraints), str(source)],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=280)
        if result.returncode != 0:
            _cannot_build(step, result)
    return python


def _run_numpy1(python: Path, script: str, *arguments: object, cwd: Path) -> str:
    # Away from the work tree and without PYTHONPATH: the installed package is the one imported.
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", script, *map(str, arguments)], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


_LOAD_PLAINLY = """
import json, pickle, sys
import numpy as np
assert np.__version__.startswith("1.26."), np.__version__
with open(sys.argv[1], "rb") as stream:
    document = pickle.load(stream)
expected = np.load(sys.argv[2])
embeddings = document["embeddings"]
assert type(embeddings) is np.ndarray and embeddings.dtype == expected.dtype, (type(embeddings), embeddings.dtype)
assert np.array_equal(embeddings, expected)
embeddings[0, 0] = 1.0  # writable, as the legacy merge's array was
with open(sys.argv[3], encoding="utf-8") as stream:
    expected_articles = json.load(stream)
assert document["articles"] == expected_articles
# An np.int64 id is an int, no numpy scalar: the synthetic run's ids are str.
assert [type(row["id"]) for row in document["articles"]] == [type(row["id"]) for row in expected_articles]
print(np.__version__)
"""


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_pickle_merged_with_numpy_2_loads_plainly_under_numpy_1(
    numpy1_python: Path, tmp_path: Path, dtype: str
) -> None:
    generate_run(tmp_path / "downloads", rows=200, dim=DIM, fmt="mixed")
    # A pipeline's numpy scalars, in a checkpoint after the run's.
    rows = [{**row, "id": np.int64(200 + offset), "score": np.float32(0.25), "ok": np.bool_(True)}
            for offset, row in enumerate(make_rows(200, 230, text_bytes=50, question_indices=(), seed=1))]
    vectors = np.linspace(-1, 1, 30 * DIM).reshape(30, DIM)
    write_legacy_checkpoint(tmp_path / "downloads" / "tensor03" / "extra.pkl", vectors, rows, start_index=200)
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl", dtype=dtype)
    embeddings, articles = expected_merge(200, set(range(190, 200)))
    articles += [{**row, "id": int(row["id"]), "score": 0.25, "ok": True} for row in rows]
    np.save(tmp_path / "expected.npy", np.concatenate([embeddings, vectors]).astype(dtype))
    (tmp_path / "expected.json").write_text(json.dumps(articles), encoding="utf-8")

    version = _run_numpy1(numpy1_python, _LOAD_PLAINLY, tmp_path / "merged.pkl", tmp_path / "expected.npy",
                          tmp_path / "expected.json", cwd=tmp_path)

    assert version.startswith("1.26.")


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
    version = _run_numpy1(numpy1_python, _MERGE_UNDER_NUMPY_1, tmp_path, cwd=tmp_path)
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
