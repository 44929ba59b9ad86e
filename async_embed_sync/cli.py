"""Command line: ``main(argv) -> int``, and the one place errors become exits.

Exit codes: 0 done, 1 failed (a clear message on stderr, no traceback),
2 usage error (argparse's own convention), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .config import load_config
from .errors import AsyncEmbedSyncError
from .progress import choose_progress
from .sync import DEFAULT_DOWNLOAD_DIR, SyncOptions, sync

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_EXAMPLES = """\
examples:
  python -m async_embed_sync sync --clusters tensor01 tensor02
  python -m async_embed_sync sync --config credentials.json --max-parallel 16
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return args.handler(args)
    except AsyncEmbedSyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("Interrupted. What was verified is kept; run the same command again to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m async_embed_sync",
        description="Sync embedding checkpoints from GPU clusters over SSH and merge them.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sync_parser = commands.add_parser(
        "sync", help="download every checkpoint from the clusters",
        description="Download every checkpoint from the configured clusters, concurrently "
                    "and resumably, into DOWNLOAD_DIR/<cluster>/.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_sync_arguments(sync_parser)
    _add_common_arguments(sync_parser)
    sync_parser.set_defaults(handler=_run_sync)
    return parser


def _add_sync_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="cluster settings (default: ./credentials.json, else ./.credentials/)")
    parser.add_argument("--credentials-dir", metavar="DIR",
                        help="legacy folder of <cluster>.credentials files")
    parser.add_argument("--clusters", nargs="+", metavar="NAME",
                        help='clusters to sync (default: all); "tensor01 tensor02" works too')
    parser.add_argument("--max-parallel", type=_positive_int, default=SyncOptions.max_parallel,
                        metavar="N", help="files in flight at once, over all clusters (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=SyncOptions.timeout, metavar="SECONDS",
                        help="connect timeout, and how soon a dead link is noticed (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=SyncOptions.retries, metavar="N",
                        help="attempts per file without progress before giving up (default: %(default)s)")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--download-dir", default=DEFAULT_DOWNLOAD_DIR, metavar="DIR",
                        help="where checkpoints are kept (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print errors only")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _run_sync(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.credentials_dir)
    clusters = config.select(args.clusters)
    for warning in config.warnings:
        print(warning, file=sys.stderr)
    progress = choose_progress(args.quiet)
    options = SyncOptions(max_parallel=args.max_parallel, timeout=args.timeout, retries=args.retries)
    report = sync(clusters, args.download_dir, progress, options)
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
    report.raise_for_failures()
    return EXIT_OK
