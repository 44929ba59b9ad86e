"""Sync benchmark: this tool against scp, lftp and the legacy paramiko loop.

Two emulated WAN links (``LinkProxy`` processes, default 25 ms one way =
50 ms RTT and 400 Mbit/s each) stand in front of one real OpenSSH sshd on
loopback; each link plays one cluster, whose checkpoints sit in their own
remote directory. Every contender downloads all files into a fresh
directory, is timed end to end, and its result is checked byte for byte
(sha256) before the next one runs. A second pair of rows, straight to sshd
without a proxy, compares this tool with one plain ``scp`` on loopback.

The files are random bytes with ``.pkl`` names, not real checkpoints: the
transfer never looks inside them, random bytes cannot be compressed by
anyone along the way, and they are generated far faster. They are kept in
``--workdir`` and reused when the sizes match.

    python benchmarks/bench_sync.py            # 8 x 135 MB, several minutes
    python benchmarks/bench_sync.py --quick    # 8 x 8 MB smoke test

Prints one markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from openssh import OpenSSHServer  # noqa: E402  (tests/ is put on the path just above)

from async_embed_sync.fileio import file_sha256  # noqa: E402

CLUSTERS = ("tensor01", "tensor02")
MIB = 1024 * 1024
WRITE_BLOCK = 8 * MIB
PROXY_START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Dataset:
    remote_root: Path
    digests: dict[str, str]  # "<cluster>/<file>" -> sha256
    total_bytes: int

    def remote_dir(self, cluster: str) -> Path:
        return self.remote_root / cluster


@dataclass(frozen=True)
class Endpoint:
    """How to reach one cluster: the sshd itself or a link proxy in front of it."""

    port: int
    known_hosts: Path


@dataclass(frozen=True)
class Bench:
    sshd: OpenSSHServer
    data: Dataset
    timeout: float

    def ssh_options(self, endpoint: Endpoint) -> list[str]:
        return ["-i", str(self.sshd.client_key_path),
                "-o", f"UserKnownHostsFile={endpoint.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]

    @property
    def login(self) -> str:
        return f"{self.sshd.username}@{self.sshd.host}"


Contender = Callable[[Bench, dict[str, Endpoint], Path], None]


# ------------------------------------------------------------------- setup


def make_dataset(remote_root: Path, files_per_cluster: int, file_bytes: int) -> Dataset:
    digests: dict[str, str] = {}
    for cluster in CLUSTERS:
        directory = remote_root / cluster
        directory.mkdir(parents=True, exist_ok=True)
        wanted = {f"embeddings_{cluster}_gpu{gpu}.pkl" for gpu in range(files_per_cluster)}
        for stale in {p.name for p in directory.iterdir()} - wanted:
            (directory / stale).unlink()
        for name in sorted(wanted):
            path = directory / name
            if not path.is_file() or path.stat().st_size != file_bytes:
                _write_random(path, file_bytes)
            digests[f"{cluster}/{name}"] = file_sha256(path)
    return Dataset(remote_root, digests, file_bytes * files_per_cluster * len(CLUSTERS))


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for start in range(0, size, WRITE_BLOCK):
            f.write(os.urandom(min(WRITE_BLOCK, size - start)))


@contextlib.contextmanager
def link_proxy_process(target_port: int, delay_ms: float, rate_mbit: float) -> Iterator[int]:
    """A LinkProxy in a process of its own (off this process's GIL); yields its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "async_embed_sync.testing.netproxy", "--target", f"127.0.0.1:{target_port}",
         "--delay-ms", str(delay_ms), "--rate-mbit", str(rate_mbit)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        with _deadline(PROXY_START_TIMEOUT, process):
            port = int(process.stdout.readline())
        yield port
    finally:
        process.terminate()
        try:
            process.wait(PROXY_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _deadline(seconds: float, process: subprocess.Popen[str]) -> Iterator[None]:
    """Kill ``process`` if the block takes longer than ``seconds`` (so a read cannot hang)."""
    timer = threading.Timer(seconds, process.kill)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# -------------------------------------------------------------- contenders


def run_commands(commands: list[list[str]], timeout: float) -> None:
    """Run the commands side by side; raise if any fails or the deadline passes."""
    processes = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for cmd in commands]
    deadline = time.monotonic() + timeout
    failures = []
    for cmd, process in zip(commands, processes):
        try:
            _, stderr = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            failures.append(f"{shlex.join(cmd)}: timed out after {timeout:.0f} s")
            continue
        if process.returncode != 0:
            failures.append(f"{shlex.join(cmd)}: exit {process.returncode}: "
                            f"{stderr.decode(errors='replace')[-1500:]}")
    if failures:
        raise RuntimeError("\n".join(failures))


def this_tool(bench: Bench, endpoints: dict[str, Endpoint], dest: Path) -> None:
    clusters = {
        cluster: bench.sshd.cluster_entry(str(bench.data.remote_dir(cluster)), port=endpoint.port)
        for cluster, endpoint in endpoints.items()
    }
    config = dest.parent / f"{dest.name}-credentials.json"
    config.write_text(json.dumps({"clusters": clusters}, indent=2))
    run_commands([[sys.executable, "-m", "async_embed_sync", "sync", "--config", str(config),
                   "--download-dir", str(dest), "--quiet"]], bench.timeout)


def parallel_scp(bench: Bench, endpoints: dict[str, Endpoint], dest: Path) -> None:
    dest.mkdir()
    run_commands([
        ["scp", "-q", "-r", "-P", str(endpoint.port), *bench.ssh_options(endpoint),
         f"{bench.login}:{bench.data.remote_dir(cluster)}", str(dest)]
        for cluster, endpoint in endpoints.items()
    ], bench.timeout)


def single_scp(bench: Bench, endpoints: dict[str, Endpoint], dest: Path) -> None:
    (endpoint,) = set(endpoints.values())  # one scp process can reach one port only
    dest.mkdir()
    run_commands([
        ["scp", "-q", "-r", "-P", str(endpoint.port), *bench.ssh_options(endpoint),
         *(f"{bench.login}:{bench.data.remote_dir(cluster)}" for cluster in endpoints), str(dest)]
    ], bench.timeout)


def lftp_mirror(bench: Bench, endpoints: dict[str, Endpoint], dest: Path) -> None:
    commands = []
    for cluster, endpoint in endpoints.items():
        connect_program = shlex.join(["ssh", "-a", "-x", *bench.ssh_options(endpoint)])
        script = "; ".join([
            f"set sftp:connect-program {shlex.quote(connect_program)}",
            "set net:max-retries 1",
            "set cmd:fail-exit yes",
            # "root," with an empty password: lftp must not prompt, the key logs in.
            f"open -u {bench.sshd.username}, -p {endpoint.port} sftp://{bench.sshd.host}",
            f"mirror --parallel=4 {shlex.quote(str(bench.data.remote_dir(cluster)))} "
            f"{shlex.quote(str(dest / cluster))}",
        ])
        commands.append(["lftp", "-c", script])
    run_commands(commands, bench.timeout)


def sequential_paramiko(bench: Bench, endpoints: dict[str, Endpoint], dest: Path) -> None:
    """What the legacy script did: one cluster, then the next, one file at a time."""
    import paramiko
    for cluster, endpoint in endpoints.items():
        client = paramiko.SSHClient()
        client.load_host_keys(str(endpoint.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(bench.sshd.host, endpoint.port, username=bench.sshd.username,
                       key_filename=str(bench.sshd.client_key_path), look_for_keys=False,
                       allow_agent=False, timeout=30, banner_timeout=30, auth_timeout=30)
        try:
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(bench.timeout)
            remote_dir = str(bench.data.remote_dir(cluster))
            (dest / cluster).mkdir(parents=True)
            for name in sorted(sftp.listdir(remote_dir)):
                sftp.get(f"{remote_dir}/{name}", str(dest / cluster / name))
        finally:
            client.close()


# ------------------------------------------------------------------ timing


@dataclass(frozen=True)
class Row:
    link: str
    tool: str
    seconds: float
    limit_seconds: float | None  # the links' limit for these bytes; None when unlimited


def timed(name: str, contender: Contender, bench: Bench, endpoints: dict[str, Endpoint],
          scratch: Path, repeat: int) -> float:
    times = []
    for attempt in range(repeat):
        dest = scratch / f"{contender.__name__}-{attempt}"
        shutil.rmtree(dest, ignore_errors=True)
        started = time.perf_counter()
        contender(bench, endpoints, dest)
        times.append(time.perf_counter() - started)
        verify(dest, bench.data)
        shutil.rmtree(dest)
        print(f"  {name}: {times[-1]:.1f} s, verified", file=sys.stderr, flush=True)
    return statistics.median(times)


def verify(dest: Path, data: Dataset) -> None:
    # Only the cluster folders: a tool may keep its own state beside them.
    found = {f"{cluster}/{p.name}" for cluster in CLUSTERS if (dest / cluster).is_dir()
             for p in (dest / cluster).iterdir()}
    if found != set(data.digests):
        raise RuntimeError(f"{dest}: expected files {sorted(data.digests)}, found {sorted(found)}")
    for relative, digest in data.digests.items():
        if file_sha256(dest / relative) != digest:
            raise RuntimeError(f"{dest / relative} differs from the remote file")


def markdown_table(rows: list[Row], total_bytes: int) -> str:
    reference = {row.link: row.seconds for row in rows if row.tool == "this tool"}
    lines = ["| link | tool | time (s) | MiB/s aggregate | share of the links' limit | this tool is faster by |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        share = "n/a" if row.limit_seconds is None else f"{row.limit_seconds / row.seconds:.1%}"
        speedup = row.seconds / reference[row.link] if row.link in reference else float("nan")
        lines.append(f"| {row.link} | {row.tool} | {row.seconds:.2f} | {total_bytes / MIB / row.seconds:.1f} "
                     f"| {share} | {speedup:.2f}x |")
    return "\n".join(lines)


# -------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 x 8 MB per cluster: a smoke test")
    parser.add_argument("--files-per-cluster", type=int, default=4)
    parser.add_argument("--file-mb", type=float, default=135.0, help="size of each file in MB (10^6 bytes)")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay of each link")
    parser.add_argument("--rate-mbit", type=float, default=400.0, help="rate of each link, per direction")
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender; the median is reported")
    parser.add_argument("--only", nargs="+", metavar="TOOL", help="run only these contenders "
                        "(this-tool, parallel-scp, lftp, paramiko, single-scp)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/async_embed_sync-bench"),
                        help="keeps the generated files between runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.file_mb = 8.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wan: dict[str, Contender] = {"this-tool": this_tool, "parallel-scp": parallel_scp}
    if shutil.which("lftp"):
        wan["lftp"] = lftp_mirror
    with contextlib.suppress(ImportError):
        import paramiko  # noqa: F401
        wan["paramiko"] = sequential_paramiko
    loopback: dict[str, Contender] = {"this-tool": this_tool, "single-scp": single_scp}
    labels = {"this-tool": "this tool", "parallel-scp": "2 x `scp -r` in parallel",
              "lftp": "`lftp mirror --parallel=4` per cluster", "paramiko": "sequential paramiko (legacy)",
              "single-scp": "one `scp -r`"}
    wanted = set(args.only or labels)

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = make_dataset(args.workdir / "remote", args.files_per_cluster, int(args.file_mb * 1e6))
    scratch = args.workdir / "downloads"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    rate_bytes = args.rate_mbit * 1e6 / 8
    limit = data.total_bytes / (len(CLUSTERS) * rate_bytes)
    wan_link = f"2 x {args.rate_mbit:g} Mbit/s, {2 * args.delay_ms:g} ms RTT"
    print(f"{len(data.digests)} files x {args.file_mb:g} MB = {data.total_bytes / 1e9:.2f} GB; "
          f"links: {wan_link}, limit {limit:.1f} s", file=sys.stderr, flush=True)

    rows: list[Row] = []
    with OpenSSHServer(args.workdir / "sshd") as sshd, contextlib.ExitStack() as links:
        bench = Bench(sshd, data, timeout=max(120.0, 30 * limit))
        endpoints = {}
        for cluster in CLUSTERS:
            port = links.enter_context(link_proxy_process(sshd.port, args.delay_ms, args.rate_mbit))
            endpoints[cluster] = Endpoint(port, sshd.known_hosts_for(port))
        for key, contender in wan.items():
            if key in wanted:
                rows.append(Row(wan_link, labels[key],
                                timed(labels[key], contender, bench, endpoints, scratch, args.repeat), limit))
        direct = {cluster: Endpoint(sshd.port, sshd.known_hosts_path) for cluster in CLUSTERS}
        for key, contender in loopback.items():
            if key in wanted:
                rows.append(Row("loopback, no proxy", labels[key],
                                timed(labels[key], contender, bench, direct, scratch, args.repeat), None))
    print(markdown_table(rows, data.total_bytes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
