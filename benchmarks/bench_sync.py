"""Sync benchmark matrix: this tool against rsync, rclone, lftp and scp.

One real OpenSSH sshd on loopback holds the checkpoints of two clusters,
each in its own remote directory. Every cell of the matrix is one file mix
(the total split evenly over the two clusters) downloaded over one link by
one tool into a fresh directory, timed end to end, and checked byte for byte
(sha256) before the next cell runs.

Links: ``loopback`` goes straight to sshd; every other link puts one
``async_embed_sync.testing.netproxy`` process in front of sshd per cluster,
with the link's one-way delay and rate. The rate is shared by every
connection through a proxy, so a tool that opens many connections cannot
exceed the link.

Tools, each run as users run it: this tool is one process for both
clusters (``python -m async_embed_sync sync``, its defaults); every peer is
one process per cluster, the two run concurrently. A tool's client CPU is
the user+sys time of its process tree (``getrusage(RUSAGE_CHILDREN)``
around it: the tool, and the ``ssh`` processes rsync, scp and lftp start;
not sshd, not the proxies).

The files are random bytes with ``.pkl`` names, not real checkpoints: the
transfer never looks inside them, random bytes cannot be compressed by
anyone along the way, and they are generated far faster. They are kept in
``--workdir`` and reused when the sizes match.

    python benchmarks/bench_sync.py --quick                 # scaled-down mixes, 2 links: under two minutes
    python benchmarks/bench_sync.py                         # the whole matrix: long
    python benchmarks/bench_sync.py --links loopback 400m   # some links only
    python benchmarks/bench_sync.py --mixes big --links 400m --tools this-tool lftp --repeat 3

Prints one markdown table on stdout; progress (one line per run) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
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
GIB = 1024 * MIB
WRITE_BLOCK = 8 * MIB
PROXY_START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Mix:
    key: str
    files: int  # over both clusters
    file_bytes: int

    @property
    def label(self) -> str:
        return f"{self.files:,} x {_size_label(self.file_bytes)}"

    @property
    def total_bytes(self) -> int:
        return self.files * self.file_bytes


@dataclass(frozen=True)
class Link:
    key: str
    label: str
    delay_ms: float | None  # one way; None: no proxy at all
    rate_mbit: float | None

    def limit_seconds(self, total_bytes: int) -> float | None:
        """The time both clusters' links need at full rate (None: unlimited)."""
        if self.rate_mbit is None:
            return None
        return total_bytes / (len(CLUSTERS) * self.rate_mbit * 1e6 / 8)


def _size_label(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000} MB"
    if size % 1024 == 0:
        return f"{size // 1024} KB" if size < MIB else f"{size / MIB:g} MiB"
    return f"{size:,} B"


MIXES = {
    "big": Mix("big", 8, 135_000_000),
    "medium": Mix("medium", 200, 2_000_000),
    "small": Mix("small", 2000, 64 * 1024),
}
QUICK_MIXES = {  # the same shapes, scaled down: with QUICK_LINKS, the matrix runs in under two minutes
    "big": Mix("big", 4, 4_000_000),
    "medium": Mix("medium", 8, 1_000_000),
    "small": Mix("small", 16, 16 * 1024),
}
LINKS = {
    "loopback": Link("loopback", "loopback, no proxy", None, None),
    "1g": Link("1g", "1 Gbit/s, 2 ms RTT", 1.0, 1000.0),
    "400m": Link("400m", "400 Mbit/s, 50 ms RTT", 25.0, 400.0),
    "100m": Link("100m", "100 Mbit/s, 200 ms RTT", 100.0, 100.0),
}
# --quick's links unless --links names others: every tool pays a few round trips per file and
# per connection, so the 200 ms link alone takes about two minutes even with tiny mixes.
QUICK_LINKS = ["loopback", "400m"]


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


def make_dataset(remote_root: Path, mix: Mix) -> Dataset:
    digests: dict[str, str] = {}
    per_cluster, extra = divmod(mix.files, len(CLUSTERS))
    for index, cluster in enumerate(CLUSTERS):
        directory = remote_root / cluster
        directory.mkdir(parents=True, exist_ok=True)
        count = per_cluster + (1 if index < extra else 0)
        wanted = {f"embeddings_{cluster}_gpu{gpu}.pkl" for gpu in range(count)}
        for stale in {p.name for p in directory.iterdir()} - wanted:
            (directory / stale).unlink()
        for name in sorted(wanted):
            path = directory / name
            if not path.is_file() or path.stat().st_size != mix.file_bytes:
                _write_random(path, mix.file_bytes)
            digests[f"{cluster}/{name}"] = file_sha256(path)
    return Dataset(remote_root, digests, mix.total_bytes)


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


def run_commands(commands: list[list[str]], timeout: float, env: list[dict[str, str]] | None = None) -> None:
    """Run the commands side by side; raise if any fails or the deadline passes."""
    processes = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=None if env is None else env[i])
                 for i, cmd in enumerate(commands)]
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


def parallel_rsync(bench: Bench, endpoints: dict[str, Endpoint], dest: Path) -> None:
    dest.mkdir()
    run_commands([
        ["rsync", "-a", "--partial",
         "-e", shlex.join(["ssh", "-p", str(endpoint.port), *bench.ssh_options(endpoint)]),
         f"{bench.login}:{bench.data.remote_dir(cluster)}", f"{dest}/"]
        for cluster, endpoint in endpoints.items()
    ], bench.timeout)


def parallel_rclone(bench: Bench, endpoints: dict[str, Endpoint], dest: Path) -> None:
    """``rclone copy`` with its sftp backend, configured through environment variables only."""
    dest.mkdir()
    empty_config = dest.parent / f"{dest.name}-rclone.conf"
    empty_config.write_text("")
    commands, envs = [], []
    for cluster, endpoint in endpoints.items():
        remote = f"BENCH{cluster.upper()}"
        prefix = f"RCLONE_CONFIG_{remote}_"
        env = {key: value for key, value in os.environ.items() if not key.startswith("RCLONE_")}
        env.update({
            "RCLONE_CONFIG": str(empty_config),
            prefix + "TYPE": "sftp",
            prefix + "HOST": bench.sshd.host,
            prefix + "PORT": str(endpoint.port),
            prefix + "USER": bench.sshd.username,
            prefix + "KEY_FILE": str(bench.sshd.client_key_path),
            prefix + "KNOWN_HOSTS_FILE": str(endpoint.known_hosts),
        })
        commands.append(["rclone", "copy", f"{remote}:{bench.data.remote_dir(cluster)}", str(dest / cluster)])
        envs.append(env)
    run_commands(commands, bench.timeout, envs)


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
    """What the legacy script did: one cluster, then the next, one file at a time.

    It runs in this process (not a child), so its CPU is not measured.
    """
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


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    run: Contender
    needs: str | None  # an executable that must be installed, or a module for paramiko


TOOLS = {
    "this-tool": Tool("this-tool", "this tool", this_tool, None),
    "rsync": Tool("rsync", "`rsync -a --partial`", parallel_rsync, "rsync"),
    "rclone": Tool("rclone", "`rclone copy` (sftp)", parallel_rclone, "rclone"),
    "lftp": Tool("lftp", "`lftp mirror --parallel=4`", lftp_mirror, "lftp"),
    "scp": Tool("scp", "`scp -r`", parallel_scp, "scp"),
    "paramiko": Tool("paramiko", "sequential paramiko (legacy)", sequential_paramiko, "paramiko"),
}
DEFAULT_TOOLS = ["this-tool", "rsync", "rclone", "lftp", "scp"]


def available(tool: Tool) -> bool:
    if tool.needs is None:
        return True
    if tool.needs == "paramiko":
        try:
            import paramiko  # noqa: F401
        except ImportError:
            return False
        return True
    return shutil.which(tool.needs) is not None


# ------------------------------------------------------------------ timing


@dataclass(frozen=True)
class Cell:
    mix: Mix
    link: Link
    tool: Tool
    seconds: float | None  # median; None when it failed
    cpu_seconds: float | None  # median client CPU (user + sys)
    error: str | None = None


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(tool: Tool, bench: Bench, endpoints: dict[str, Endpoint], scratch: Path,
          repeat: int, progress: str) -> tuple[float, float | None]:
    times, cpus = [], []
    for attempt in range(repeat):
        dest = scratch / f"{tool.key}-{attempt}"
        shutil.rmtree(dest, ignore_errors=True)
        cpu_before = children_cpu()
        started = time.perf_counter()
        try:
            tool.run(bench, endpoints, dest)
            times.append(time.perf_counter() - started)
            cpus.append(children_cpu() - cpu_before)
            verify(dest, bench.data)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        cpu_per_gib = cpus[-1] / (bench.data.total_bytes / GIB)
        print(f"  {progress} {tool.label}: {times[-1]:.2f} s, client CPU {cpus[-1]:.2f} s "
              f"({cpu_per_gib:.2f} s/GiB), verified", file=sys.stderr, flush=True)
    cpu = None if tool.key == "paramiko" else statistics.median(cpus)
    return statistics.median(times), cpu


def verify(dest: Path, data: Dataset) -> None:
    # Only the cluster folders: a tool may keep its own state beside them.
    found = {f"{cluster}/{p.name}" for cluster in CLUSTERS if (dest / cluster).is_dir()
             for p in (dest / cluster).iterdir()}
    if found != set(data.digests):
        missing = sorted(set(data.digests) - found)[:5]
        extra = sorted(found - set(data.digests))[:5]
        raise RuntimeError(f"{dest}: {len(found)} files where {len(data.digests)} were expected "
                           f"(missing e.g. {missing}, unexpected e.g. {extra})")
    for relative, digest in data.digests.items():
        if file_sha256(dest / relative) != digest:
            raise RuntimeError(f"{dest / relative} differs from the remote file")


def markdown_table(cells: list[Cell]) -> str:
    lines = ["| mix | link | tool | time (s) | MiB/s | share of the link's limit "
             "| this tool faster by (its row: vs the fastest peer; a peer's row: vs that peer) "
             "| client CPU s/GiB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for cell in cells:
        same = [c for c in cells if c.mix == cell.mix and c.link == cell.link and c.seconds is not None]
        ours = next((c.seconds for c in same if c.tool.key == "this-tool"), None)
        peers = [c for c in same if c.tool.key != "this-tool"]
        if cell.seconds is None:
            error = cell.error or "failed"
            timeouts = error.count(": timed out after ")
            reason = (f"{timeouts} of its processes timed out" if timeouts
                      else error.splitlines()[0][:120]).replace("|", "\\|")
            lines.append(f"| {cell.mix.label} | {cell.link.label} | {cell.tool.label} | failed: {reason} "
                         "| | | | |")
            continue
        limit = cell.link.limit_seconds(cell.mix.total_bytes)
        share = "n/a" if limit is None else f"{limit / cell.seconds:.1%}"
        if ours is None:
            ratio = "n/a"
        elif cell.tool.key == "this-tool":
            best = min(peers, key=lambda c: c.seconds or 0.0, default=None)
            ratio = "n/a" if best is None else f"{best.seconds / ours:.2f}x (vs {best.tool.label})"
        else:
            ratio = f"{cell.seconds / ours:.2f}x"
        cpu = "n/a" if cell.cpu_seconds is None else f"{cell.cpu_seconds / (cell.mix.total_bytes / GIB):.2f}"
        lines.append(f"| {cell.mix.label} | {cell.link.label} | {cell.tool.label} | {cell.seconds:.2f} "
                     f"| {cell.mix.total_bytes / MIB / cell.seconds:.1f} | {share} | {ratio} | {cpu} |")
    return "\n".join(lines)


# -------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="scaled-down mixes (4 x 4 MB, 8 x 1 MB, 16 x 16 KB), on loopback and 400m "
                             "unless --links says otherwise: under two minutes")
    parser.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES),
                        help="big: 8 x 135 MB; medium: 200 x 2 MB; small: 2,000 x 64 KB (over both clusters)")
    parser.add_argument("--links", nargs="+", choices=list(LINKS), default=None,
                        help="loopback (no proxy); 1g: 1 Gbit/s, 2 ms RTT; 400m: 400 Mbit/s, 50 ms; "
                             "100m: 100 Mbit/s, 200 ms (per cluster, per direction)")
    parser.add_argument("--tools", nargs="+", choices=list(TOOLS), default=DEFAULT_TOOLS,
                        help="default: every tool but paramiko (the legacy loop, in this process)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every file's size by this (the file counts stay)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is reported")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a cell counts as failed")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/async_embed_sync-bench"),
                        help="keeps the generated files between runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mixes = QUICK_MIXES if args.quick else MIXES
    mixes = {key: Mix(m.key, m.files, max(1, int(m.file_bytes * args.scale))) for key, m in mixes.items()
             if key in args.mixes}
    links = [LINKS[key] for key in args.links or (QUICK_LINKS if args.quick else LINKS)]
    tools = []
    for key in args.tools:
        if available(TOOLS[key]):
            tools.append(TOOLS[key])
        else:
            print(f"skipping {key}: {TOOLS[key].needs} is not installed", file=sys.stderr)

    args.workdir.mkdir(parents=True, exist_ok=True)
    datasets = {}
    for key, mix in mixes.items():
        root = args.workdir / "remote" / (f"quick-{key}" if args.quick else key)
        datasets[key] = make_dataset(root, mix)
        print(f"mix {mix.label}: {mix.total_bytes / 1e6:.1f} MB over {len(CLUSTERS)} clusters",
              file=sys.stderr, flush=True)
    scratch = args.workdir / "downloads"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()

    started = time.monotonic()
    cells: list[Cell] = []
    with OpenSSHServer(args.workdir / "sshd") as sshd:
        for link in links:
            with contextlib.ExitStack() as proxies:
                if link.delay_ms is None:
                    endpoints = {cluster: Endpoint(sshd.port, sshd.known_hosts_path) for cluster in CLUSTERS}
                else:
                    endpoints = {}
                    for cluster in CLUSTERS:
                        port = proxies.enter_context(link_proxy_process(sshd.port, link.delay_ms, link.rate_mbit))
                        endpoints[cluster] = Endpoint(port, sshd.known_hosts_for(port))
                for key, mix in mixes.items():
                    bench = Bench(sshd, datasets[key], timeout=args.timeout)
                    for tool in tools:
                        progress = f"[{time.monotonic() - started:.0f} s] {mix.label}, {link.label},"
                        try:
                            seconds, cpu = timed(tool, bench, endpoints, scratch, args.repeat, progress)
                        except Exception as exc:  # one failed cell must not lose the rest
                            print(f"  {progress} {tool.label}: FAILED: {exc}", file=sys.stderr, flush=True)
                            cells.append(Cell(mix, link, tool, None, None, f"{type(exc).__name__}: {exc}"))
                        else:
                            cells.append(Cell(mix, link, tool, seconds, cpu))
    print(f"matrix done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    order = {key: i for i, key in enumerate(mixes)}
    cells.sort(key=lambda c: (order[c.mix.key], list(LINKS).index(c.link.key)))  # stable: tools keep their order
    print(markdown_table(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
