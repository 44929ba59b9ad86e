"""The floor under the sync on a fast link: asyncssh alone reading one file
over SFTP from OpenSSH's sshd on loopback, nothing written or hashed, beside
this tool syncing the same file.

    python benchmarks/bench_sftp_floor.py               # one file of 135 MB
    python benchmarks/bench_sftp_floor.py --mb 512

The difference between the two rows is what the sync adds per byte (the
partial file, its writes and hash, the journal, the scheduler) on top of
what one asyncio process spends decrypting and parsing SSH and SFTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import asyncssh  # noqa: E402
from openssh import OpenSSHServer  # noqa: E402  (tests/ is put on the path just above)

BLOCK = 261_120  # what OpenSSH's sftp-server answers per read at most
IN_FLIGHT = 32


async def _read_whole(entry: dict, path: str) -> int:
    async with asyncssh.connect(entry["host"], port=entry["port"], username=entry["username"],
                                client_keys=[entry["key_file"]], known_hosts=entry["known_hosts"],
                                window=16 << 20, max_pktsize=256 << 10) as connection:
        async with connection.start_sftp_client() as sftp, sftp.open(path, "rb", block_size=0) as file:
            size, offset, reads = (await file.stat()).size, 0, []
            while offset < size or reads:
                while offset < size and len(reads) < IN_FLIGHT:
                    reads.append(asyncio.ensure_future(file.read(BLOCK, offset)))
                    offset += BLOCK
                await reads.pop(0)
            return size


def _timed(run) -> tuple[float, float]:
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    run()
    seconds = time.perf_counter() - started
    after, children_after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(after, f) - getattr(before, f) + getattr(children_after, f) - getattr(children, f)
              for f in ("ru_utime", "ru_stime"))
    return seconds, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=135, help="the file's size")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    try:
        remote = work / "remote"
        remote.mkdir()
        with open(remote / "embeddings_gpu0.pkl", "wb") as out:
            for _ in range(args.mb):
                out.write(os.urandom(1 << 20))
        size = args.mb << 20
        with OpenSSHServer(work / "sshd") as sshd:
            entry = sshd.cluster_entry(str(remote))
            config = work / "credentials.json"
            config.write_text(json.dumps({"clusters": {"tensor01": entry}}))
            rows = [
                ("asyncssh alone: 32 reads of 255 KiB in flight, nothing written (in this process)",
                 lambda: asyncio.run(_read_whole(entry, str(remote / "embeddings_gpu0.pkl")))),
                ("this tool: `sync`, written, hashed, verified (a process of its own, start-up included)",
                 lambda: subprocess.run([sys.executable, "-m", "async_embed_sync", "sync", "--config", str(config),
                                         "--download-dir", str(work / "dl"), "--quiet"], check=True)),
            ]
            print(f"| one file of {args.mb} MiB, loopback | seconds | MiB/s | CPU s/GiB |")
            print("| --- | ---: | ---: | ---: |")
            for label, run in rows:
                seconds, cpu = _timed(run)
                print(f"| {label} | {seconds:.2f} | {size / seconds / (1 << 20):.0f} | {cpu / (size / (1 << 30)):.2f} |",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
