"""``demo``: the whole job against two simulated clusters, with no setup.

Each cluster is an in-process asyncssh SFTP server on loopback, serving
synthetic checkpoints; host keys are generated and written to a known_hosts
file, so host-key checking stays on exactly as with real clusters. The
servers run on a background event loop while the caller runs the real
``run`` path against them. ``drop_after`` puts a link between client and
each server that cuts the connection after that many bytes, to show a
resume. The same generator and servers back the tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import NOTHING_CHANGED, LocalFileError, translating_local_errors
from .progress import Progress
from .testing.background import background_loop
from .testing.embedded_server import EmbeddedSFTPServer
from .testing.netproxy import LinkProxy
from .testing.synthetic import generate_run

DEMO_CLUSTERS = ("tensor01", "tensor02")
DEFAULT_DEMO_DIR = "async_embed_sync_demo"
# The demo's own file in its folder: which entries there a demo made. Every
# entry demo_site writes in its folder must be listed in _DEMO_ENTRIES.
DEMO_MARK = ".async_embed_sync_demo"
_DEMO_ENTRIES = ("remote", "keys", "checkpoints", "credentials.json", "wikipedia_merged.pkl")
DEFAULT_DEMO_ROWS = 20_010


@dataclass(frozen=True)
class DemoSite:
    """Where the demo put things: its config, and where the job should write."""

    root: Path
    config: Path
    download_dir: Path
    output: Path


class _ServerThreadChatter(logging.Filter):
    """asyncio's warnings from the simulated clusters' own loop (a server
    writing to a client that already hung up) are not the user's concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != _SERVER_THREAD


_SERVER_THREAD = "demo-servers"


def _claim(root: Path) -> None:
    """Make room for the demo in ``root``, removing only what a demo made there.

    ``--dir`` may name a folder of the user's own: the demo's entries are
    removed only when the mark of an earlier demo lists them, and the demo
    refuses to start where one of them exists unmarked. The mark is written
    before anything else, so that a demo stopped halfway is cleaned up too.
    """
    mark = root / DEMO_MARK
    with translating_local_errors(root, "create the folder", NOTHING_CHANGED):
        root.mkdir(parents=True, exist_ok=True)
    for name in _marked_entries(mark):
        with translating_local_errors(root / name, "remove"):
            _remove(root / name)
    for name in _DEMO_ENTRIES:
        path = root / name
        if path.exists() or path.is_symlink():
            raise LocalFileError(
                str(path), f"the demo writes there, and no earlier demo made it (it is not listed in "
                           f"{mark}); it was left alone. Choose another --dir, or move it away.", "use")
    with translating_local_errors(mark, "write"):
        mark.write_text(json.dumps({"made_by": "python -m async_embed_sync demo",
                                    "entries": list(_DEMO_ENTRIES)}, indent=2) + "\n")


def _marked_entries(mark: Path) -> list[str]:
    """The entries an earlier demo listed in ``mark``; plain names only, none if it is unreadable."""
    try:
        entries = json.loads(mark.read_text()).get("entries", [])
    except (OSError, ValueError, AttributeError):
        return []  # unmarked, as far as we can tell: nothing is removed
    # A mark edited to name "..", "/" or "a/b" must not reach outside the demo's folder.
    return [name for name in entries if isinstance(name, str) and name not in ("", ".", "..")
            and "/" not in name and "\0" not in name]


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@contextlib.contextmanager
def demo_site(root: str | os.PathLike = DEFAULT_DEMO_DIR, *, rows: int = DEFAULT_DEMO_ROWS,
              drop_after: int | None = None, fmt: str = "pkl", seed: int = 0,
              progress: Progress | None = None) -> Iterator[DemoSite]:
    """Generate a run, serve it from two clusters, yield the config to use.

    What an earlier demo made in ``root`` is removed first, so that the
    sync really transfers and the result is reproducible; nothing else in
    ``root`` is touched (see :func:`_claim`).
    """
    root = Path(root).resolve()
    _claim(root)
    remote = root / "remote"
    # 10 questions at the end of the run, as in the original corpus.
    progress = progress or Progress()
    generate_run(remote, rows=rows, clusters=DEMO_CLUSTERS, gpus_per_cluster=4, fmt=fmt,
                 text_bytes=400, questions=min(10, rows // 10), seed=seed,
                 on_file=lambda done, total: progress.step("demo: writing the clusters' checkpoints", done, total))
    chatter = _ServerThreadChatter()
    logging.getLogger("asyncio").addFilter(chatter)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(logging.getLogger("asyncio").removeFilter, chatter)
        loop = cleanup.enter_context(background_loop(_SERVER_THREAD))
        servers = [EmbeddedSFTPServer(remote / name, root / "keys" / name) for name in DEMO_CLUSTERS]
        proxies: list[LinkProxy] = []
        try:
            entries = {}
            for name, server in zip(DEMO_CLUSTERS, servers):
                loop.run(server.start())
                port = server.port
                if drop_after is not None:
                    proxy = LinkProxy(server.host, server.port, cut_after=drop_after)
                    loop.run(proxy.start())
                    proxies.append(proxy)
                    port = proxy.port
                entries[name] = server.cluster_entry("/", port=port)
            config = root / "credentials.json"
            # total_rows as a real run's config should say it: a result short of it is refused.
            config.write_text(json.dumps({"clusters": entries, "total_rows": rows}, indent=2))
            config.chmod(0o600)
            yield DemoSite(root, config, root / "checkpoints", root / "wikipedia_merged.pkl")
        finally:
            for closable in [*proxies, *servers]:
                with contextlib.suppress(Exception):
                    loop.run(closable.close(), timeout=15)
