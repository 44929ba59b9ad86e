"""The report: its numbers per checkpoint, computed here independently, the checkpoints it flags, and the
page, opened in a real browser (Debian's chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from async_embed_sync import load
from async_embed_sync.cli import main
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.report.statistics import flag_outliers, measure
from async_embed_sync.testing.synthetic import generate_run

ROWS, DIM = 8_000, 32
SCALED, ZEROED, DUPLICATED, APART = 1, 3, 5, 6  # of the 8 checkpoints, in index order


def _vectors(path: Path) -> np.ndarray:
    return np.load(path)


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A run of 8 .npy checkpoints, 4 of them made odd; and every checkpoint's article rows as merged."""
    root = tmp_path_factory.mktemp("odd")
    paths = generate_run(root / "downloads", rows=ROWS, dim=DIM, fmt="npy", questions=0)
    vectors = [np.load(path) for path in paths]
    vectors[SCALED] = vectors[SCALED] * 3
    vectors[ZEROED][::5] = 0  # a fifth of its rows
    vectors[DUPLICATED][: len(vectors[DUPLICATED]) // 2] = vectors[0][: len(vectors[DUPLICATED]) // 2]
    shift = np.zeros(DIM, np.float32)
    shift[0] = 4.0
    apart = vectors[APART] + shift
    vectors[APART] = apart / np.linalg.norm(apart, axis=1, keepdims=True)
    for path, rows in zip(paths, vectors):
        np.save(path, rows.astype(np.float32))
    merge_checkpoints(root / "downloads", root / "bundle", shard_rows=3_000)
    return root / "bundle", vectors


def test_the_numbers_of_each_checkpoint_are_its_rows(odd_run) -> None:
    bundle, vectors = odd_run
    statistics = measure(load(bundle), sample=1_000)

    assert [c.rows for c in statistics.checkpoints] == [len(v) for v in vectors]
    seen: set[bytes] = set()
    for checkpoint, rows in zip(statistics.checkpoints, vectors):
        norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        assert checkpoint.zero_norm_rows == int((norms == 0).sum())
        assert checkpoint.norm_mean == pytest.approx(norms.mean(), rel=1e-6)
        assert checkpoint.norm_std == pytest.approx(norms.std(), rel=1e-4, abs=1e-7)
        repeats = 0
        for row in rows:
            repeats += row.tobytes() in seen
            seen.add(row.tobytes())
        assert checkpoint.duplicate_rows == repeats, checkpoint.file
    assert statistics.duplicate_rows == sum(c.duplicate_rows for c in statistics.checkpoints) > 0


def test_exactly_the_odd_checkpoints_are_flagged_and_why(odd_run) -> None:
    bundle, _ = odd_run
    statistics = measure(load(bundle), sample=1_000)
    flag_outliers(statistics)

    flagged = {index: checkpoint.flags for index, checkpoint in enumerate(statistics.checkpoints) if checkpoint.flags}
    assert set(flagged) == {SCALED, ZEROED, DUPLICATED, APART}, flagged
    assert any("3.00 times the others'" in flag for flag in flagged[SCALED])
    assert any("20.0% of its rows have zero norm" in flag for flag in flagged[ZEROED])
    assert any("50.0% of its rows repeat earlier rows" in flag for flag in flagged[DUPLICATED])
    assert any("lie apart" in flag for flag in flagged[APART])


def test_the_nearest_neighbours_are_those_of_the_whole_result(odd_run) -> None:
    bundle, vectors = odd_run
    result = load(bundle)
    statistics = measure(result, sample=500)
    everything = np.concatenate(vectors).astype(np.float32)
    norms = np.linalg.norm(everything, axis=1, keepdims=True)
    unit = np.divide(everything, norms, out=np.zeros_like(everything), where=norms > 0)

    for query, found in zip(statistics.queries, statistics.neighbours):
        scores = unit @ unit[query]
        scores[query] = -np.inf
        assert np.allclose(scores[found], np.sort(scores)[::-1][: len(found)], atol=1e-5)


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def _screenshot(page: Path, png: Path, profile: Path) -> None:
    # The flags of a closed network: no background connections, no first-run work.
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1200,3000",
                    f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=90, check=True)


@pytest.fixture(scope="module")
def odd_page(odd_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle, _ = odd_run
    page = tmp_path_factory.mktemp("page") / "odd.html"
    assert main(["report", str(bundle), "--output", str(page), "--sample", "800", "--quiet"]) == 0
    return page


def test_the_page_flags_the_odd_checkpoints_and_needs_no_network(odd_page: Path) -> None:
    text = odd_page.read_text(encoding="utf-8")

    assert "4 of 8 checkpoints stand out: 1, 3, 5, 6" in text
    assert text.count("Stands out:") == 4
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", text, re.I)  # nothing fetched
    assert "<script" not in text.lower() and "url(" not in text
    assert text.count('src="data:image/png;base64,') >= 3  # norms, similarities, a map
    assert odd_page.stat().st_size < 5 * 2**20


def test_the_page_opens_in_a_real_browser_and_shows_something(odd_page: Path, tmp_path: Path) -> None:
    import matplotlib.image

    _screenshot(odd_page, tmp_path / "shot.png", tmp_path / "profile")
    pixels = matplotlib.image.imread(tmp_path / "shot.png")[..., :3]

    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.05  # text, tables and plots, not a blank page
    assert (np.abs(pixels - [0.99, 0.93, 0.92]).max(axis=2) < 0.02).sum() > 10_000  # the red rows


def test_an_article_title_is_text_not_markup(tmp_path: Path) -> None:
    generate_run(tmp_path / "downloads", rows=300, dim=8, fmt="npy", questions=0)
    for articles in (tmp_path / "downloads").glob("*/*.jsonl"):  # every title: whichever the page shows
        articles.write_text(re.sub(r'"title": "Synthetic article \d+"', '"title": "<img src=http://evil.example/x>"',
                                   articles.read_text()))
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")

    assert main(["report", str(tmp_path / "merged.pkl"), "--sample", "300", "--quiet"]) == 0

    text = (tmp_path / "merged.report.html").read_text()
    assert "&lt;img src=http://evil.example/x&gt;" in text and "<img src=http" not in text


def test_merge_report_writes_the_page_beside_the_result(odd_run, tmp_path: Path) -> None:
    bundle, _ = odd_run
    downloads = bundle.parent / "downloads"

    assert main(["merge", "--download-dir", str(downloads), "--output", str(tmp_path / "merged.pkl"),
                 "--report", "--sample", "300", "--quiet"]) == 0

    assert sorted(os.listdir(tmp_path)) == ["merged.pkl", "merged.report.html"]
    assert "4 of 8 checkpoints stand out" in (tmp_path / "merged.report.html").read_text()


def test_a_report_of_what_is_not_a_result_is_one_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes").mkdir()

    assert main(["report", str(tmp_path / "notes")]) == 1

    err = capsys.readouterr().err
    assert "notes" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["notes"]


# Without umap: numba's compiler takes a heap of its own (about 200 MB), whatever the result's size.
_REPORT_AND_MEASURE = """
import sys
sys.modules["umap"] = None
from async_embed_sync.cli import main
assert main(["report", sys.argv[1], "--output", sys.argv[2], "--sample", "500", "--quiet"]) == 0
with open("/proc/self/status") as status:
    fields = dict(line.split(":", 1) for line in status)
print(int(fields["RssAnon"].split()[0]) * 1024)
"""


def test_a_report_of_a_result_larger_than_its_memory_bound(tmp_path: Path) -> None:
    # 60,000 rows of 768 float32: 184 MB of vectors, read in blocks of 8 MiB, a sample of 500.
    generate_run(tmp_path / "downloads", rows=60_000, dim=768, fmt="npy", text_bytes=20)
    merge_checkpoints(tmp_path / "downloads", tmp_path / "bundle", shard_rows=20_000)

    child = subprocess.run([sys.executable, "-c", _REPORT_AND_MEASURE, str(tmp_path / "bundle"),
                            str(tmp_path / "page.html")], capture_output=True, text=True, timeout=300)

    assert child.returncode == 0, child.stderr
    assert int(child.stdout.split()[-1]) < 120 * 2**20, child.stdout  # its heap: not the vectors
    assert "No checkpoint stands out" in (tmp_path / "page.html").read_text()


def test_without_matplotlib_the_report_says_which_extra_to_install(tmp_path: Path) -> None:
    generate_run(tmp_path / "downloads", rows=100, dim=8, fmt="npy")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from async_embed_sync.cli import main\n"
            f"sys.exit(main(['report', {str(tmp_path / 'merged.pkl')!r}]))")

    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert child.returncode == 1, child.stderr
    assert "pip install 'async_embed_sync[report]'" in child.stderr and "Traceback" not in child.stderr
    assert sorted(os.listdir(tmp_path)) == ["downloads", "merged.pkl"]
