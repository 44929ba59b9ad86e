"""Benchmark: the legacy merge against ``merge_checkpoints``, time and peak RSS.

Generates a synthetic run (default 250,010 x 768 float32 rows, 10 of them
questions, about 1 KB of row metadata each, 8 legacy pickles: about 1.03 GB,
the size of the original run), then runs each contender in its own process
under ``/usr/bin/time -v`` and prints one markdown table:

- ``legacy``: load every pickle, ``np.concatenate``, pickle the dict, as the
  legacy script did;
- ``merge (pkl in)``: this tool on the same pickles, ``.pkl`` output;
- ``cat``: ``cat`` of exactly the merge's input files into one file in the
  same output directory: the floor for reading and writing those bytes (it
  hashes nothing, parses nothing, and, like the merge, does not fsync);
- ``merge (npy in)``: this tool on the same run written as ``.npy`` + ``.jsonl``
  checkpoints, at each ``--scale`` (rows multiplied), with its ``cat``
  baseline: ``.pkl`` output, and bundle output with parquet and jsonl metadata
  shards; after each bundle, ``load()`` of it in a fresh process (a second
  table: its time, and its peak resident set with a vector and an article read).

Every contender gets the same conditions: its inputs are read once just
before it (page cache warm, for every contender alike), the previous
contender's output is deleted and ``sync`` is run before the clock starts
(so that no one pays for another's writeback), and its output goes to the
same directory on the same disk. Each contender runs ``--repeat`` times; the
table shows the median wall time, the largest peak RSS of those runs, and
the median CPU time (user + system; it is less sensitive than the wall time
to other load on the machine). RSS is what ``time -v`` reports as "Maximum
resident set size": it counts mapped file pages too, and it is the largest
peak of any *one* process of the tree (the process it ran and the
descendants reaped by then: the kernel keeps the largest), not their sum.
The merge starts a worker process (a fresh interpreter) that parses the
articles of a bundle, so the merge also reports its own peak and its
worker's (``getrusage``), and the table shows their sum: an upper bound of
what the two held at once (pages of shared libraries count twice).
CPU time, by contrast, includes the reaped worker's.

Needs ``/usr/bin/time`` (Debian: ``apt-get install -y time``).

    python benchmarks/bench_merge.py                   # full size, scales 1 and 4
    python benchmarks/bench_merge.py --rows 20000 --scale 1 --keep --workdir /tmp/bm
    python benchmarks/bench_merge.py --npy-only --no-pkl-out --bundle-forms jsonl   # the jsonl bundle rows only
    python benchmarks/bench_merge.py --pkl-only        # the legacy-pickle input rows only
    # 1x and 10x the rows, 128-dim with short texts: memory flat as rows grow, time linear, load() at 10x
    python benchmarks/bench_merge.py --npy-only --no-pkl-out --npy-inputs synced --bundle-forms parquet \
        --dim 128 --text-bytes 100 --scale 1 10 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from async_embed_sync.fileio import file_sha256  # noqa: E402
from async_embed_sync.layout import DownloadLayout, FileState  # noqa: E402
from async_embed_sync.testing.synthetic import generate_run  # noqa: E402

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
import resource, sys
from async_embed_sync.merging.merge import merge_checkpoints
articles_format = sys.argv[3] if len(sys.argv) > 3 else None
shard_rows = int(sys.argv[4]) if len(sys.argv) > 4 else None
print(merge_checkpoints(sys.argv[1], sys.argv[2], articles_format=articles_format, shard_rows=shard_rows).summary(),
      file=sys.stderr)
# time -v reports the larger of these two, not their sum: see the module docstring.
print("peak RSS KiB: merge process", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      "its largest worker process", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
"""


# load() of a bundle, then one vector from the middle and the last article: seconds and the
# peak resident set since exec (VmHWM: ru_maxrss would include the benchmark's own).
LOAD = """
import json, sys, time

def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

started = time.perf_counter()
from async_embed_sync import load
result = load(sys.argv[1])
opened, opened_peak = time.perf_counter() - started, peak()
vector, article = result["embeddings"][len(result["embeddings"]) // 2], result["articles"][-1]
read = time.perf_counter() - started
shards = len(getattr(result["embeddings"], "shards", [None]))
print(json.dumps({"rows": len(result["embeddings"]), "shards": shards, "opened": opened, "read": read,
                  "opened_peak": opened_peak, "peak": peak()}))
"""


@dataclass(frozen=True)
class LoadMeasurement:
    label: str
    rows: int
    shards: int
    opened_seconds: float  # import and load()
    read_seconds: float  # and one vector and one article
    opened_peak_rss_bytes: int
    peak_rss_bytes: int


def measure_load(label: str, bundle: Path, repeat: int) -> LoadMeasurement:
    """Median times and largest peak of ``repeat`` cold-process load()s of ``bundle``."""
    runs = []
    for _ in range(repeat):
        finished = subprocess.run([sys.executable, "-c", LOAD, str(bundle)], cwd=REPO, capture_output=True,
                                  text=True, check=False)
        if finished.returncode != 0:
            raise SystemExit(f"load of {bundle} failed:\n{finished.stderr}")
        runs.append(json.loads(finished.stdout))
    print(f"{label}: load {runs[-1]}", file=sys.stderr)
    return LoadMeasurement(label, runs[0]["rows"], runs[0]["shards"], statistics.median(run["opened"] for run in runs),
                           statistics.median(run["read"] for run in runs), max(run["opened_peak"] for run in runs),
                           max(run["peak"] for run in runs))


@dataclass(frozen=True)
class Measurement:
    label: str
    input_bytes: int
    seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    # The merge's own process peak plus its largest worker process's peak, where it says (else None).
    process_tree_rss_bytes: int | None = None


def _elapsed_seconds(text: str) -> float:
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _time_v(label: str, command: list[str]) -> tuple[float, float, int, int | None]:
    """Run ``command`` once under ``/usr/bin/time -v``: wall seconds, CPU seconds, peak RSS bytes,
    and the sum of the merge's and its worker's peaks if the merge reported them."""
    finished = subprocess.run(
        ["/usr/bin/time", "-v", *command], cwd=REPO, capture_output=True, text=True, check=False
    )
    if finished.returncode != 0:
        raise SystemExit(f"{label} failed:\n{finished.stderr}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", finished.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", finished.stderr)
    user = re.search(r"User time \(seconds\): ([\d.]+)", finished.stderr)
    system = re.search(r"System time \(seconds\): ([\d.]+)", finished.stderr)
    assert rss and wall and user and system, finished.stderr
    lines = finished.stderr.splitlines()
    summary = next((lines[at : at + 4] for at, line in enumerate(lines) if line.startswith("Merged")), [])
    print(f"{label}: {wall.group(1)} s, {int(rss.group(1)) // 1024} MiB", *summary, sep="\n  ", file=sys.stderr)
    cpu = float(user.group(1)) + float(system.group(1))
    peaks = re.search(r"peak RSS KiB: merge process (\d+) its largest worker process (\d+)", finished.stderr)
    tree = (int(peaks.group(1)) + int(peaks.group(2))) * 1024 if peaks else None
    return _elapsed_seconds(wall.group(1)), cpu, int(rss.group(1)) * 1024, tree


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _same_conditions(inputs: list[Path], output: Path) -> None:
    """Inputs in the page cache, the previous output gone, nothing left to write back."""
    _remove(output)
    for path in inputs:
        with open(path, "rb") as stream:
            while stream.read(16 << 20):
                pass
    subprocess.run(["sync"], check=True)


def measure(label: str, command: list[str], inputs: list[Path], output: Path, repeat: int,
            keep: bool = False) -> Measurement:
    """Median wall and CPU time and largest peak RSS of ``repeat`` runs of ``command`` writing ``output``
    (removed after, unless ``keep``)."""
    runs = []
    for _ in range(repeat):
        _same_conditions(inputs, output)
        runs.append(_time_v(label, command))
    if not keep:
        _remove(output)
    return Measurement(
        label,
        _size(inputs),
        statistics.median(run[0] for run in runs),
        statistics.median(run[1] for run in runs),
        max(run[2] for run in runs),
        None if runs[0][3] is None else max(run[3] for run in runs),
    )


def _inputs(root: Path) -> list[Path]:
    return sorted(path for path in root.glob("*/*") if path.is_file())


def _size(paths: list[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def _cat(label: str, root: Path, target: Path, repeat: int) -> Measurement:
    files = _inputs(root)
    command = ["sh", "-c", 'cat "$@" > "$0"', str(target), *map(str, files)]
    return measure(label, command, files, target, repeat)


def _merge(label: str, root: Path, target: Path, repeat: int, articles_format: str | None = None,
           shard_rows: int | None = None, keep: bool = False) -> Measurement:
    command = [sys.executable, "-c", TOOL_MERGE, str(root), str(target)]
    if articles_format:
        command += [articles_format] + ([str(shard_rows)] if shard_rows else [])
    return measure(label, command, _inputs(root), target, repeat, keep)


def _generate(root: Path, rows: int, fmt: str, text_bytes: int, dim: int = 768) -> None:
    print(f"generating {rows:,} rows of {dim} as {fmt} in {root} ...", file=sys.stderr)
    generate_run(root, rows=rows, dim=dim, gpus_per_cluster=4, fmt=fmt, text_bytes=text_bytes)


def _record_as_synced(root: Path) -> None:
    """Write the sync's journal for every file under ``root/*/``, as a sync that downloaded them would."""
    layout = DownloadLayout(root)
    for path in _inputs(root):
        layout.prepare(path.parent.name)
        stat = path.stat()
        state = FileState(stat.st_size, int(stat.st_mtime), verified_offset=stat.st_size)
        layout.record_complete(path.parent.name, path.name, state, file_sha256(path), "sha256")


def _forget_sync(root: Path) -> None:
    shutil.rmtree(DownloadLayout(root).state_root, ignore_errors=True)


def _pickle_input_pairs(workdir: Path, output: Path, rows: int, text_bytes: int, repeat: int) -> list[tuple[Measurement, Measurement]]:
    """The legacy merge, this tool and ``cat`` on legacy pickles."""
    pickles = workdir / "pkl"
    _generate(pickles, rows, "pkl", text_bytes)
    legacy_command = [sys.executable, "-c", LEGACY_MERGE, str(pickles), str(output / "legacy.pkl")]
    legacy = measure("legacy merge (pkl in)", legacy_command, _inputs(pickles), output / "legacy.pkl", repeat)
    tool = _merge("merge_checkpoints (pkl in)", pickles, output / "merged.pkl", repeat)
    cat = _cat("cat (pkl in)", pickles, output / "cat.bin", repeat)
    shutil.rmtree(pickles)
    return [(tool, legacy), (cat, legacy)]


def run(
    workdir: Path, rows: int, scales: list[int], text_bytes: int, repeat: int,
    pickle_input: bool = True, bundle_forms: list[str] | None = None, pickle_output: bool = True,
    synced: list[bool] | None = None, dim: int = 768, shard_rows: int | None = None,
    loads: list[LoadMeasurement] | None = None,
) -> list[tuple[Measurement, Measurement]]:
    """Pairs of (contender, reference) measurements, in table order; each bundle's load() into ``loads``."""
    output = workdir / "out"
    output.mkdir(parents=True, exist_ok=True)
    pairs = _pickle_input_pairs(workdir, output, rows, text_bytes, repeat) if pickle_input else []
    if bundle_forms is None:
        bundle_forms = ["parquet", "jsonl"]
    for scale in scales:
        arrays = workdir / f"npy-x{scale}"
        _generate(arrays, rows * scale, "npy", text_bytes, dim)
        copied = _cat(f"cat (npy in, {scale}x)", arrays, output / "cat.bin", repeat)
        for was_synced in synced or [False]:
            # Synced: the sync's journal holds each file's sha256, which the merge then need not compute.
            _record_as_synced(arrays) if was_synced else _forget_sync(arrays)
            inputs = f"npy in{', synced' if was_synced else ''}, {scale}x"
            if pickle_output:
                merged = _merge(f"merge_checkpoints ({inputs}, .pkl out)", arrays, output / "merged.pkl", repeat)
                pairs.append((merged, copied))
            for form in bundle_forms:
                label = f"merge_checkpoints ({inputs}, bundle out, {form})"
                pairs.append((_merge(label, arrays, output / "bundle", repeat, form, shard_rows, keep=True), copied))
                if loads is not None:
                    loads.append(measure_load(f"load() of the bundle ({inputs}, {form})", output / "bundle", repeat))
                _remove(output / "bundle")
        shutil.rmtree(arrays)
    return pairs


def _ratio(value: float, reference: float, digits: int) -> str:
    # A tiny run can take "0:00.00" by /usr/bin/time's clock.
    return f"{value / reference:.{digits}f}" if reference else "n/a"


def table(pairs: list[tuple[Measurement, Measurement]]) -> str:
    lines = [
        "| contender | input | wall time | CPU time | peak RSS | merge + worker peaks "
        "| reference | ref. time | ref. RSS | time ratio | RSS ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for contender, reference in pairs:
        tree = contender.process_tree_rss_bytes
        lines.append(
            f"| {contender.label} | {contender.input_bytes / 1e9:.2f} GB | {contender.seconds:.2f} s "
            f"| {contender.cpu_seconds:.2f} s | {contender.peak_rss_bytes / 2**20:,.0f} MiB "
            f"| {'-' if tree is None else f'{tree / 2**20:,.0f} MiB'} | {reference.label} "
            f"| {reference.seconds:.2f} s | {reference.peak_rss_bytes / 2**20:,.0f} MiB "
            f"| {_ratio(contender.seconds, reference.seconds, 2)} "
            f"| {_ratio(contender.peak_rss_bytes, reference.peak_rss_bytes, 3)} |"
        )
    return "\n".join(lines)


def load_table(loads: list[LoadMeasurement]) -> str:
    lines = ["| result | rows | shards | import + load() | its peak RSS | + a vector and an article | peak RSS |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for load in loads:
        lines.append(f"| {load.label} | {load.rows:,} | {load.shards} | {load.opened_seconds:.2f} s "
                     f"| {load.opened_peak_rss_bytes / 2**20:,.0f} MiB | {load.read_seconds:.2f} s "
                     f"| {load.peak_rss_bytes / 2**20:,.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=250_010, help="rows at scale 1 (default 250,010)")
    parser.add_argument("--scale", type=int, nargs="+", default=[1, 4], help="row multipliers for the .npy runs")
    parser.add_argument("--text-bytes", type=int, default=950, help="article text per row (default 950)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; the median is shown (default 3)")
    parser.add_argument("--workdir", type=Path, help="where the data goes (default: a new directory under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--npy-only", action="store_true", help="skip the legacy-pickle input rows")
    only.add_argument("--pkl-only", action="store_true", help="only the legacy-pickle input rows (no .npy runs)")
    parser.add_argument("--bundle-forms", nargs="*", choices=["parquet", "jsonl", "parquet-embeddings"],
                        help="articles formats of the bundle rows (default: parquet and jsonl; none: no bundle rows)")
    parser.add_argument("--dim", type=int, default=768, help="vector dimension of the .npy runs (default 768)")
    parser.add_argument("--shard-rows", type=int, default=None, help="rows per bundle shard (default: the merge's)")
    parser.add_argument("--no-pkl-out", action="store_true", help="skip the .npy-in, .pkl-out rows")
    parser.add_argument("--npy-inputs", nargs="+", choices=["unsynced", "synced"], default=["unsynced", "synced"],
                        help="the .npy inputs as files from elsewhere (the merge hashes them) and/or as a sync "
                             "left them (their sha256 in its journal); default both")
    options = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        raise SystemExit("/usr/bin/time is missing: apt-get install -y time")
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="bench_merge_"))
    loads: list[LoadMeasurement] = []
    try:
        pairs = run(
            workdir, options.rows, [] if options.pkl_only else options.scale, options.text_bytes, options.repeat,
            pickle_input=not options.npy_only, bundle_forms=options.bundle_forms, pickle_output=not options.no_pkl_out,
            synced=[kind == "synced" for kind in options.npy_inputs], dim=options.dim,
            shard_rows=options.shard_rows, loads=loads,
        )
        print(table(pairs))
        if loads:
            print()
            print(load_table(loads))
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
