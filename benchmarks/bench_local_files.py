"""The local cost of one small checkpoint: what the sync does on this machine
per file once its bytes have arrived, beside the floor of the same steps
and what rsync does.

No network and no SSH: the sync reads from the in-memory remote
(``async_embed_sync.testing.memory_remote``, the seam tests use), so what is
left is the per-file work here: the partial file, the thread hops, the
write and the hash, the fsyncs, the renames and the journal. Prints one
table: milliseconds of wall time and of CPU (user, system) per file.

    python benchmarks/bench_local_files.py                  # 2,000 files of 64 KiB
    python benchmarks/bench_local_files.py --files 500 --kib 2048

Rows:
- this tool: ``sync`` through the memory remote, its defaults (up to 128 files in flight);
- its durable steps alone, one thread, no event loop: create the partial,
  write, fsync, rename into place, fsync the folder, then the journal entry
  (a temporary, fsync, rename, fsync its folder): the floor of the steps;
- rsync's steps: a temporary file, write, rename; no fsync.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from async_embed_sync.config import load_config
from async_embed_sync.fileio import fsync_directory
from async_embed_sync.layout import write_atomically
from async_embed_sync.progress import QuietProgress
from async_embed_sync.testing.memory_remote import MemoryServer
from async_embed_sync.transfer.sync import SyncOptions, sync

CLUSTERS = ("tensor01", "tensor02")


def _measure(run: Callable[[], None], files: int) -> tuple[float, float, float]:
    """Milliseconds per file: wall, user CPU, system CPU (every thread of this process)."""
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    per_file = 1000 / files
    return wall * per_file, (after.ru_utime - before.ru_utime) * per_file, (after.ru_stime - before.ru_stime) * per_file


def this_tool(work: Path, contents: dict[str, dict[str, bytes]]) -> Callable[[], None]:
    server = MemoryServer(contents)
    config = work / "credentials.json"
    config.write_text(json.dumps({"clusters": server.entries()}))

    def run() -> None:
        report = sync(load_config(config).select(None), str(work / "dl"), QuietProgress(),
                      SyncOptions(connect=server.connect))
        if not report.ok:
            raise SystemExit(f"the sync failed: {report}")
    return run


def durable_steps(work: Path, contents: dict[str, dict[str, bytes]]) -> Callable[[], None]:
    def run() -> None:
        for cluster, files in contents.items():
            final, state = work / "steps" / cluster, work / "steps" / ".state" / cluster
            final.mkdir(parents=True)
            state.mkdir(parents=True)
            for name, data in files.items():
                partial = state / f"{name}.part"
                fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                try:
                    os.pwrite(fd, data, 0)
                    digest = hashlib.sha256(data).hexdigest()
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(partial, final / name)
                fsync_directory(final)
                entry = json.dumps({"complete": True, "sha256": digest, "size": len(data)}).encode()
                write_atomically(state / f"{name}.json", entry)  # a temporary, fsync, rename, fsync its folder
    return run


def rsync_steps(work: Path, contents: dict[str, dict[str, bytes]]) -> Callable[[], None]:
    def run() -> None:
        for cluster, files in contents.items():
            folder = work / "rsync" / cluster
            folder.mkdir(parents=True)
            for name, data in files.items():
                temporary = folder / f".{name}.XXXXXX"
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.replace(temporary, folder / name)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="files in all, over two clusters")
    parser.add_argument("--kib", type=int, default=64, help="size of each file")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write (default: a temporary folder; the disk is what is measured)")
    args = parser.parse_args(argv)
    contents = {cluster: {f"embeddings_{cluster}_{i:05d}.pkl": os.urandom(args.kib * 1024)
                          for i in range(args.files // len(CLUSTERS))} for cluster in CLUSTERS}
    files = sum(map(len, contents.values()))
    rows = [("this tool: `sync` through the memory remote (no network), defaults", this_tool),
            ("its durable steps alone: partial, write, fsync, rename, fsync folder, journal entry", durable_steps),
            ("rsync's steps: temporary file, write, rename (no fsync)", rsync_steps)]
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    print(f"{files} files of {args.kib} KiB in {parent}", file=sys.stderr)
    print("| per file | wall ms | user CPU ms | system CPU ms |")
    print("| --- | ---: | ---: | ---: |")
    for label, make in rows:
        work = Path(tempfile.mkdtemp(prefix="bench-local-", dir=parent))
        try:
            wall, user, system = _measure(make(work, contents), files)
        finally:
            shutil.rmtree(work)
        print(f"| {label} | {wall:.2f} | {user:.2f} | {system:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
