"""Benchmark: the legacy merge against ``merge_checkpoints``, time and peak RSS.

Generates a synthetic run (default 250,010 x 768 float32 rows, 10 of them
questions, about 1 KB of row metadata each, 8 legacy pickles: about 1.03 GB,
the size of the original run), then runs each contender in its own process
under ``/usr/bin/time -v`` and prints one markdown table:

- ``legacy``: load every pickle, ``np.concatenate``, pickle the dict, as the
  legacy script did;
- ``merge (pkl in)``: this tool on the same pickles;
- ``cat``: copying the same input bytes into one file, the floor for any merge;
- ``merge (npy in)``: this tool on the same run written as ``.npy`` + ``.jsonl``
  checkpoints, at each ``--scale`` (rows multiplied), with its ``cat`` baseline.

Every merge writes the legacy ``.pkl`` output; the ``.npy`` runs also write
the bundle (a directory), the memory-mappable form. RSS is what ``time -v``
reports as "Maximum resident set size": it counts mapped file pages too. The
inputs are read from the page cache (they were just written), for every
contender alike.

Needs ``/usr/bin/time`` (Debian: ``apt-get install -y time``).

    python benchmarks/bench_merge.py                   # full size, scales 1 and 4
    python benchmarks/bench_merge.py --rows 20000 --scale 1 --keep --workdir /tmp/bm
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from async_embed_sync.synthetic import generate_run  # noqa: E402

LEGACY_MERGE = """
import glob, pickle, sys
import numpy as np
from datetime import datetime

download_dir, output = sys.argv[1], sys.argv[2]
chunks = []
for path in glob.glob(f"{download_dir}/*/*.pkl"):
    with open(path, "rb") as stream:
        chunks.append(pickle.load(stream))  # the legacy script trusted its inputs
chunks.sort(key=lambda chunk: chunk["start_index"])
articles = [row for chunk in chunks for row in chunk["articles"]]
keep = np.array([row.get("kind", "article") == "article" for row in articles])
embeddings = np.concatenate([chunk["embeddings"] for chunk in chunks])[keep]
document = {
    "embeddings": embeddings,
    "articles": [row for row, kept in zip(articles, keep) if kept],
    "total_articles": int(keep.sum()),
    "embedding_dim": embeddings.shape[1],
    "model": chunks[0]["model"],
    "timestamp": datetime.now().isoformat(),
}
with open(output, "wb") as stream:
    pickle.dump(document, stream)
"""

TOOL_MERGE = """
import sys
from async_embed_sync.merge import merge_checkpoints
print(merge_checkpoints(sys.argv[1], sys.argv[2]).summary(), file=sys.stderr)
"""


@dataclass(frozen=True)
class Measurement:
    label: str
    input_bytes: int
    seconds: float
    peak_rss_bytes: int


def _elapsed_seconds(text: str) -> float:
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def measure(label: str, command: list[str], input_bytes: int) -> Measurement:
    """Run ``command`` under ``/usr/bin/time -v``; its wall time and peak RSS."""
    finished = subprocess.run(
        ["/usr/bin/time", "-v", *command], cwd=REPO, capture_output=True, text=True, check=False
    )
    if finished.returncode != 0:
        raise SystemExit(f"{label} failed:\n{finished.stderr}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", finished.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", finished.stderr)
    assert rss and wall, finished.stderr
    lines = finished.stderr.splitlines()
    summary = next((lines[at : at + 4] for at, line in enumerate(lines) if line.startswith("Merged")), [])
    print(f"{label}: {wall.group(1)} s, {int(rss.group(1)) // 1024} MiB", *summary, sep="\n  ", file=sys.stderr)
    return Measurement(label, input_bytes, _elapsed_seconds(wall.group(1)), int(rss.group(1)) * 1024)


def _inputs(root: Path) -> list[Path]:
    return sorted(path for path in root.glob("*/*") if path.is_file())


def _size(paths: list[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def _cat(label: str, root: Path, target: Path) -> Measurement:
    files = _inputs(root)
    command = ["sh", "-c", 'cat "$@" > "$0"', str(target), *map(str, files)]
    return measure(label, command, _size(files))


def _generate(root: Path, rows: int, fmt: str, text_bytes: int) -> None:
    print(f"generating {rows:,} rows as {fmt} in {root} ...", file=sys.stderr)
    generate_run(root, rows=rows, dim=768, gpus_per_cluster=4, fmt=fmt, text_bytes=text_bytes)


def run(workdir: Path, rows: int, scales: list[int], text_bytes: int) -> list[tuple[Measurement, Measurement]]:
    """Pairs of (contender, reference) measurements, in table order."""
    pickles, output = workdir / "pkl", workdir / "out"
    output.mkdir(parents=True, exist_ok=True)
    _generate(pickles, rows, "pkl", text_bytes)
    size = _size(_inputs(pickles))
    legacy = measure("legacy merge (pkl in)", [sys.executable, "-c", LEGACY_MERGE, str(pickles), str(output / "legacy.pkl")], size)
    (output / "legacy.pkl").unlink()
    tool = measure("merge_checkpoints (pkl in)", [sys.executable, "-c", TOOL_MERGE, str(pickles), str(output / "merged.pkl")], size)
    (output / "merged.pkl").unlink()
    cat = _cat("cat (pkl in)", pickles, output / "cat.bin")
    (output / "cat.bin").unlink()
    shutil.rmtree(pickles)
    pairs = [(tool, legacy), (cat, legacy)]
    for scale in scales:
        arrays = workdir / f"npy-x{scale}"
        _generate(arrays, rows * scale, "npy", text_bytes)
        size = _size(_inputs(arrays))
        merged = measure(
            f"merge_checkpoints (npy in, {scale}x, .pkl out)",
            [sys.executable, "-c", TOOL_MERGE, str(arrays), str(output / "merged.pkl")],
            size,
        )
        (output / "merged.pkl").unlink()
        bundled = measure(
            f"merge_checkpoints (npy in, {scale}x, bundle out)",
            [sys.executable, "-c", TOOL_MERGE, str(arrays), str(output / "bundle")],
            size,
        )
        shutil.rmtree(output / "bundle")
        copied = _cat(f"cat (npy in, {scale}x)", arrays, output / "cat.bin")
        (output / "cat.bin").unlink()
        shutil.rmtree(arrays)
        pairs += [(merged, copied), (bundled, copied)]
    return pairs


def table(pairs: list[tuple[Measurement, Measurement]]) -> str:
    lines = [
        "| contender | input | wall time | peak RSS | reference | ref. time | ref. RSS | time ratio | RSS ratio |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for contender, reference in pairs:
        lines.append(
            f"| {contender.label} | {contender.input_bytes / 1e9:.2f} GB | {contender.seconds:.2f} s "
            f"| {contender.peak_rss_bytes / 2**20:,.0f} MiB | {reference.label} | {reference.seconds:.2f} s "
            f"| {reference.peak_rss_bytes / 2**20:,.0f} MiB | {contender.seconds / reference.seconds:.2f} "
            f"| {contender.peak_rss_bytes / reference.peak_rss_bytes:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=250_010, help="rows at scale 1 (default 250,010)")
    parser.add_argument("--scale", type=int, nargs="+", default=[1, 4], help="row multipliers for the .npy runs")
    parser.add_argument("--text-bytes", type=int, default=950, help="article text per row (default 950)")
    parser.add_argument("--workdir", type=Path, help="where the data goes (default: a new directory under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        raise SystemExit("/usr/bin/time is missing: apt-get install -y time")
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="bench_merge_"))
    try:
        print(table(run(workdir, options.rows, options.scale, options.text_bytes)))
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
