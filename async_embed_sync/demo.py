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

from .background import background_loop
from .embedded_server import EmbeddedSFTPServer
from .netproxy import LinkProxy
from .synthetic import generate_run

DEMO_CLUSTERS = ("tensor01", "tensor02")
DEFAULT_DEMO_DIR = "async_embed_sync_demo"
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


@contextlib.contextmanager
def demo_site(root: str | os.PathLike = DEFAULT_DEMO_DIR, *, rows: int = DEFAULT_DEMO_ROWS,
              drop_after: int | None = None, fmt: str = "pkl", seed: int = 0) -> Iterator[DemoSite]:
    """Generate a run, serve it from two clusters, yield the config to use.

    ``root`` is emptied first: each demo starts from nothing, so that the
    sync really transfers and the result is reproducible.
    """
    root = Path(root).resolve()
    if root.exists():
        shutil.rmtree(root)
    remote = root / "remote"
    # 10 questions at the end of the run, as in the original corpus.
    generate_run(remote, rows=rows, clusters=DEMO_CLUSTERS, gpus_per_cluster=4, fmt=fmt,
                 text_bytes=400, questions=min(10, rows // 10), seed=seed)
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
            config.write_text(json.dumps({"clusters": entries}, indent=2))
            config.chmod(0o600)
            yield DemoSite(root, config, root / "checkpoints", root / "wikipedia_merged.pkl")
        finally:
            for closable in [*proxies, *servers]:
                with contextlib.suppress(Exception):
                    loop.run(closable.close(), timeout=15)
