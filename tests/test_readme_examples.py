"""README.md's examples, and those of the docs pages it links to for more (docs/RESULT.md,
docs/ENGINES.md, docs/REPORT.md: ``readme_blocks.PAGES``), run as a user runs them: each ```python
block as a script and the ``sha256sum`` lines in a shell, in a folder laid out as ``run`` leaves it
(``embeddings/checkpoints/<cluster>/``, ``embeddings/wikipedia_merged.pkl``) with the bundle
the README's own merge command makes, and checked for what they print.

pandas, pyarrow, faiss-cpu and umap-learn come with the test extra: CI runs every example.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from readme_blocks import PAGES, blocks, commands

from async_embed_sync.testing.synthetic import generate_run

ROWS, ARTICLES, DIM = 2010, 2000, 768  # generate_run makes 10 of the rows questions
BUNDLE_COMMAND = "python -m async_embed_sync merge --output embeddings/merged"

# One marker per ```python block of the pages: the test that runs it (a new block fails
# test_every_python_block_is_run until it has one).
MARKERS = {
    "nearest neighbours": "np.argsort",
    "pandas": "pd.read_parquet",
    "faiss": "faiss.normalize_L2",
    "umap": "import umap",
    "api": "from async_embed_sync import sync, merge, load",
    "chunk_info": "chunk_info",
    "embedding-reader": "EmbeddingReader",
    "dask": "da.from_delayed",
    "datasets": "load_dataset",
    "faiss over the shards": "faiss.IndexFlatL2",
}
# The blocks docs/ENGINES.md shows as run by hand, with the versions and the date (Ray, autofaiss: too
# heavy for CI), and no test runs.
BY_HAND = ("import ray", "faiss.read_index")


def _needs(*modules: str) -> None:
    if os.environ.get("CI") == "true":
        return  # the test extra installs them: in CI a missing one fails the example
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def _block(marker: str) -> str:
    found = [block for block in blocks("python") if MARKERS[marker] in block]
    assert len(found) == 1, f"{len(found)} python blocks of {PAGES} hold {MARKERS[marker]!r}"
    return found[0]


def _run(argv: list[str], cwd: Path, timeout: float = 100, env: dict[str, str] | None = None) -> list[str]:
    """Run ``argv`` in ``cwd`` as a user would (``env`` added to the environment); its stdout, line by line."""
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout.splitlines()


def _python(marker: str, cwd: Path, timeout: float = 100, env: dict[str, str] | None = None) -> list[str]:
    return _run([sys.executable, "-c", _block(marker)], cwd, timeout, env)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as ``run`` leaves it, with the README's bundle beside the ``.pkl``."""
    _needs("pyarrow")
    root = tmp_path_factory.mktemp("readme_results")
    generate_run(root / "embeddings" / "checkpoints", rows=ROWS, dim=DIM)
    _run([sys.executable, "-m", "async_embed_sync", "merge", "--quiet"], root)  # `run`'s merge, defaults
    bundle = [command for command in commands() if command.startswith(BUNDLE_COMMAND)]
    assert len(bundle) == 1, bundle
    _run([sys.executable, *shlex.split(bundle[0])[1:], "--quiet"], root)
    assert (root / "embeddings" / "wikipedia_merged.pkl").is_file()
    assert (root / "embeddings" / "merged" / "metadata" / "part-00000.parquet").is_file()
    return root


def test_every_python_block_is_run():
    for block in blocks("python"):
        if any(marker in block for marker in BY_HAND):
            continue
        assert [name for name, marker in MARKERS.items() if marker in block], f"no test runs:\n{block}"
    for name in MARKERS:
        _block(name)  # exactly one block each


def test_nearest_neighbours_with_numpy(results):
    lines = _python("nearest neighbours", results)
    assert len(lines) == 5
    assert lines[0] == "1.000  Synthetic article 0"  # the first article is its own nearest neighbour
    scores = [float(line.split()[0]) for line in lines]
    assert scores == sorted(scores, reverse=True) and scores[1] < 1.0


def test_a_bundle_with_pandas(results):
    _needs("pyarrow", "pandas")
    assert _python("pandas", results) == [
        f"({ARTICLES}, {DIM}) ({ARTICLES}, 5) ['row', 'id', 'title', 'url', 'text']"]


def test_embedding_reader_as_shown(results):
    _needs("embedding_reader")
    assert _python("embedding-reader", results) == [f"({ARTICLES}, {DIM}) Synthetic article 0"]


def test_dask_as_shown(results):
    _needs("dask")
    assert _python("dask", results) == [f"({ARTICLES}, {DIM}) 1.000"]


def test_hugging_face_datasets_as_shown(results, tmp_path):
    _needs("datasets")
    # Its cache in the test's folder, not the user's home; no network.
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    assert _python("datasets", results, env=env) == [f"{ARTICLES} ['row', 'id', 'title', 'url', 'text']"]


def test_faiss_over_the_shards_as_shown(results):
    _needs("faiss")
    assert _python("faiss over the shards", results) == ["[0 1 2]"]


def test_a_faiss_index(results):
    _needs("faiss")
    assert _python("faiss", results) == ["[0 1 2]"]


@pytest.mark.timeout(300)
def test_a_umap_map(results, monkeypatch, capsys):
    _needs("umap")
    # numba compiles UMAP's functions on first use in a process (tens of seconds on a fresh install, and
    # not cached on disk): run here, the block shares that compile with the report's UMAP map
    # (tests/test_report.py) instead of paying it again in a process of its own.
    monkeypatch.chdir(results)
    exec(compile(_block("umap"), "the UMAP example", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.splitlines() == ["(500, 2)"]


def test_the_python_api_as_shown(openssh, tmp_path, write_config):
    remote = tmp_path / "remote"
    generate_run(remote, rows=ROWS, dim=8)
    write_config(tmp_path, {c: openssh.cluster_entry(str(remote / c)) for c in ("tensor01", "tensor02")})
    # In the folder that holds credentials.json, as the README's comments say.
    assert _python("api", tmp_path) == [f"{ARTICLES} ({ARTICLES}, 8)"]
    assert (tmp_path / "embeddings" / "merged" / "manifest.json").is_file()
    assert len(list((tmp_path / "embeddings" / "checkpoints").glob("tensor0?/*.pkl"))) == 8


def test_verifying_with_sha256sum(results, tmp_path):
    block = next(block for block in blocks() if "sha256sum -c --quiet SHA256SUMS" in block)
    assert _run(["bash", "-euo", "pipefail", "-c", block], results) == [
        "bundle: OK", "embeddings/wikipedia_merged.pkl: OK"]
    # A shard changed after the merge is caught.
    shutil.copytree(results / "embeddings", tmp_path / "embeddings")
    with open(tmp_path / "embeddings" / "merged" / "embeddings" / "part-00000.npy", "r+b") as shard:
        shard.seek(-1, os.SEEK_END)
        shard.write(b"\x01")
    damaged = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True)
    assert damaged.returncode != 0 and "part-00000.npy: FAILED" in damaged.stdout + damaged.stderr


def test_verifying_the_checkpoints_against_chunk_info(results, tmp_path):
    lines = _python("chunk_info", results)
    assert len(lines) == 8 and all(line.startswith("ok  embeddings/checkpoints/tensor0") for line in lines), lines

    # A checkpoint changed since the merge is named.
    shutil.copytree(results / "embeddings", tmp_path / "embeddings")
    victim = sorted((tmp_path / "embeddings" / "checkpoints" / "tensor02").glob("*.pkl"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(data)
    bad = [line for line in _python("chunk_info", tmp_path) if not line.startswith("ok ")]
    assert bad == [f"BAD {victim.relative_to(tmp_path)}"]


def test_the_report_command_as_shown(results, tmp_path):
    _needs("matplotlib")
    shown = [command for command in commands() if command.startswith("python -m async_embed_sync report")]
    assert len(shown) == 1, shown
    # umap-learn hidden from the report: numba compiling UMAP was most of this test's time, and the page's
    # UMAP map is drawn in tests/test_report.py.
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / "umap.py").write_text("raise ImportError('hidden by the test')\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "hidden"), os.environ.get("PYTHONPATH")]))
    _run([sys.executable, *shlex.split(shown[0])[1:], "--sample", "300", "--quiet"], results, timeout=200,
         env={"PYTHONPATH": path})
    page = (results / "embeddings" / "wikipedia_merged.report.html").read_text()
    assert "No checkpoint stands out among the 8." in page
