"""The whole job once, end to end: the set CI also runs on the lowest versions ``pyproject.toml`` admits.

``.ci/run`` installs the project a second time, into a fresh environment
held to each direct dependency's lower bound (``.ci/lowest-constraints``),
and runs this file there: a lower bound that the code has outgrown fails
here before a user with an older environment meets it. It needs only the
package, pytest and the embedded asyncssh server (no sshd, no test extras).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from async_embed_sync import load
from async_embed_sync.cli import main
from async_embed_sync.output.forms import LEGACY_KEYS

ROWS = 2_010  # 2,000 articles and 10 questions, over 2 clusters x 4 GPUs


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo: a sync from two embedded SSH servers, through a link cut once (so a file resumes), then a merge."""
    root = tmp_path_factory.mktemp("end_to_end")
    assert main(["demo", "--dir", str(root), "--rows", str(ROWS), "--drop-after", "400000", "--quiet"]) == 0
    return root


def test_the_sync_and_merge_give_every_article_once(demo):
    result = load(demo / "wikipedia_merged.pkl")
    assert result["embeddings"].shape == (ROWS - 10, 768)
    assert result["total_articles"] == ROWS - 10 == len(result["articles"])
    assert [article["id"] for article in result["articles"]] == [str(index) for index in range(ROWS - 10)]


@pytest.mark.parametrize("articles_format", ["parquet", "jsonl"])
def test_the_same_checkpoints_merge_to_a_bundle_that_loads_as_the_pickle(demo, tmp_path, articles_format):
    bundle = tmp_path / "merged"
    assert main(["merge", "--download-dir", str(demo / "checkpoints"), "--output", str(bundle),
                 "--articles-format", articles_format, "--quiet"]) == 0
    as_bundle, as_pickle = load(bundle), load(demo / "wikipedia_merged.pkl")
    assert np.array_equal(np.asarray(as_bundle["embeddings"]), as_pickle["embeddings"])
    assert [a["title"] for a in as_bundle["articles"]] == [a["title"] for a in as_pickle["articles"]]


def test_the_legacy_pickle_reads_back_with_plain_pickle_load(demo):
    with open(demo / "wikipedia_merged.pkl", "rb") as file:
        legacy = pickle.load(file)
    assert list(legacy) == list(LEGACY_KEYS)
    assert isinstance(legacy["embeddings"], np.ndarray) and legacy["embeddings"].flags.writeable
    assert np.array_equal(legacy["embeddings"], load(demo / "wikipedia_merged.pkl")["embeddings"])
