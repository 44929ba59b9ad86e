"""Command line: ``main(argv) -> int``, and the one place errors become exits.

Exit codes: 0 done, 1 failed (one clear paragraph on stderr, no traceback),
2 usage error (argparse's convention), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM; 128 + 15, the shell's convention).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence

from . import __version__
from .api import DEFAULT_OUTPUT
from .api import merge as _library_merge
from .api import sync_options
from .config import (
    DEFAULT_CONFIG_FILE,
    INIT_COMMAND,
    ClusterConfig,
    Config,
    load_config,
    write_example_config,
)
from .errors import AsyncEmbedSyncError, ClustersLeftOutError, NoConfigError, Terminated, UnknownClusterError
from .logs import configure_logging
from .output import ARTICLES_FORMATS
from .progress import Progress, choose_progress
from .report import DEFAULT_SAMPLE
from .termination import stop_on_sigterm
from .transfer.prompts import TerminalPrompter
from .transfer.options import DEFAULT_DOWNLOAD_DIR, DEFAULT_POLL_SECONDS, DEFAULT_QUIET_PERIOD_SECONDS, SyncOptions

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

# Each command's --help shows its own; the top-level --help shows them all.
_EXAMPLES = {
    "demo": ["demo                                 # the whole job on two simulated clusters",
             "demo --drop-after 20000000           # cut each link after 20,000,000 bytes, to see a resume"],
    "run": ["run                                  # sync every cluster, then merge",
            "run --output embeddings/merged/      # a memory-mappable bundle instead of a .pkl",
            "run --clusters tensor01 --partial    # one cluster's rows only, on purpose",
            "run --follow                         # beside the GPU jobs: merge once the set is complete",
            "--sync-only                          # legacy flags mean `run`"],
    "sync": ["sync --max-parallel 16               # download only",
             "sync --clusters tensor01 tensor02"],
    "merge": ["merge --dtype float16                # merge what is downloaded",
              "merge --output merged/ --shard-rows 100000  # a bundle in shards of 100,000 rows"],
    "status": ["status                               # what is remote, what is here"],
    "init": ["init                                 # write credentials.json to fill in"],
    "report": ["report embeddings/wikipedia_merged.pkl  # a page beside it: wikipedia_merged.report.html",
               "report merged/ --sample 5000 --output merged.html"],
}
_EXIT_CODES = "exit codes: 0 done, 1 failed, 2 usage error, 130 interrupted, 143 terminated."


def _epilog(prog: str, commands: Sequence[str]) -> str:
    # Each example under its comment, so that an 80-column terminal shows both whole.
    lines = [line for command in commands for example in _EXAMPLES[command]
             for line in (f"  # {example.partition('#')[2].strip()}", f"  {prog} {example.partition('#')[0].strip()}")
             if line != "  # "]
    return "examples:\n" + "\n".join(lines) + "\n\n" + _EXIT_CODES + "\n"


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line; ``prog`` is the name the user typed (``python -m async_embed_sync``
    from ``__main__``; the console script's own name otherwise)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    try:
        args = parser.parse_args(_with_default_command(argv))
        if getattr(args, "follow", False) and getattr(args, "merge_only", False):
            args.usage_error("--follow waits for the clusters; --merge-only does not look at them")
    except SystemExit as exc:  # -h, --version (0) or a usage error (2): argparse printed it
        return int(exc.code or 0)
    # A scheduler's or a kill's SIGTERM cleans up like Ctrl-C: partials stay
    # resumable, no half-written output is left at the final path.
    restore_sigterm = stop_on_sigterm()
    restore_logging = lambda: None  # noqa: E731
    document = _json_document(args) if getattr(args, "json", False) else None
    token = _JSON_DOCUMENT.set(document)
    code, error = EXIT_FAILED, None
    try:
        restore_logging = configure_logging(2 if args.debug else args.verbose, args.log_file)
        code = args.handler(args)
    except UnknownClusterError as exc:  # a typo in --clusters: a usage error, as argparse says them
        error = exc
        code = _usage_error(args, f"argument --clusters: unknown cluster(s) {', '.join(exc.unknown)}; "
                                  f"the clusters configured in {exc.source} are: {', '.join(exc.known)}")
    except SystemExit as exc:  # args.usage_error() in a handler: argparse printed it
        code = exc.code if isinstance(exc.code, int) else EXIT_FAILED if exc.code else EXIT_OK
    except AsyncEmbedSyncError as exc:
        error = exc
        message = str(exc)
        if isinstance(exc, NoConfigError):  # the name typed: `async-embed-sync init`, not `python -m ...`
            message = message.replace(INIT_COMMAND, f"{args.prog} init")
        print(f"error: {message}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        error, code = "Interrupted", EXIT_INTERRUPTED
        print(f"Interrupted. {args.after_stop}",
              file=sys.stderr)
    except Terminated:
        error, code = "Terminated", EXIT_TERMINATED
        print(f"Terminated. {args.after_stop}",
              file=sys.stderr)
    finally:
        _JSON_DOCUMENT.reset(token)
        restore_logging()
        restore_sigterm()
    if document is not None:
        _print_json(document, code, error)
    return code


def api_merge(*args, **options):
    """The library's merge, its report kept for ``--json`` (``_merge_phase`` calls it)."""
    report = _library_merge(*args, **options)
    _record("merge", report)
    return report


def _usage_error(args: argparse.Namespace, message: str) -> int:
    """argparse's usage error for the command (its usage line, then ``PROG COMMAND: error: ...``); 2."""
    try:
        args.usage_error(message)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return EXIT_USAGE


# --json: the document of the command running (None: no --json); the phases put their reports in it.
_JSON_DOCUMENT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("json_document", default=None)


def _json_document(args: argparse.Namespace) -> dict:
    return {"command": args.command, "ok": False, "exit_code": None, "error": None}


def _record(phase: str, report: object) -> None:
    """Keep a phase's report (``sync``, ``merge``, ``report``) for ``--json``."""
    document = _JSON_DOCUMENT.get()
    if document is not None:
        document[phase] = _jsonable(report)


def _print_json(document: dict, code: int, error: BaseException | str | None) -> None:
    """One JSON document on stdout, whatever the outcome: the reports of the phases that ran, and the error."""
    document.update(ok=code == EXIT_OK, exit_code=code)
    if error is not None:
        document["error"] = {"message": str(error), "type": type(error).__name__ if isinstance(error, BaseException)
                             else error, "cause": getattr(error, "cause", None),
                             "rerun_fixes": getattr(error, "rerun_fixes", None)}
    print(json.dumps(document, indent=2, allow_nan=False), flush=True)


def _jsonable(value: object) -> object:
    """A report as JSON: dataclasses as objects (with their ``ok``), paths and errors as strings,
    sets as sorted lists, NaN and infinities as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(getattr(type(value), "ok", None), property):
            fields["ok"] = bool(value.ok)
        return fields
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(item) for item in value), key=str)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # a numpy scalar
        return _jsonable(value.item())
    return str(value)  # a path, an error


_AFTER_STOP = "What was verified is kept; run the same command again to resume."
_AFTER_MERGE_STOP = ("Nothing was written at the output path (an earlier result there is as it was); "
                     "the merge starts over when run again.")


def _with_default_command(argv: list[str]) -> list[str]:
    """The legacy script took flags only (``--sync-only``, ``--clusters``...), or
    nothing at all: flags without a command, or no arguments, mean ``run``."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["run", *argv]
    return argv


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or os.path.basename(sys.argv[0]) or "async-embed-sync"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Sync embedding checkpoints from GPU clusters over SSH, then merge them into one\n"
                    "result. With no command, or only flags, the command is `run`.",
        epilog=_epilog(prog, list(_EXAMPLES)), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, handler, *groups) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                  epilog=_epilog(prog, [name]), formatter_class=argparse.RawDescriptionHelpFormatter)
        for add_group in (*groups, _add_log_arguments):
            add_group(sub)
        sub.set_defaults(handler=handler, after_stop=_AFTER_STOP, prog=prog, usage_error=sub.error)
        return sub

    run = command("run", "sync every selected cluster, then merge (the whole job)", _run,
                  _add_connection_arguments, _add_sync_arguments, _add_merge_arguments,
                  _add_common_arguments)
    phases = run.add_mutually_exclusive_group()
    phases.add_argument("--sync-only", action="store_true", help="stop after the sync")
    phases.add_argument("--merge-only", action="store_true", help="merge what is already downloaded")
    command("sync", "download every checkpoint from the clusters, concurrently and resumably",
            _sync, _add_connection_arguments, _add_sync_arguments, _add_common_arguments)
    merge = command("merge", "merge the downloaded checkpoints into one result", _merge_command,
                    _add_merge_arguments, _add_common_arguments)
    for sub in (run, commands.choices["sync"], merge):
        if "--json" not in sub._option_string_actions:  # _add_common_arguments may have given it already
            sub.add_argument("--json", action="store_true",
                             help="write the summary as one JSON document on stdout, also on failure (with "
                                  "the error); bars and notes stay on stderr")
    # A merge does not resume: it starts over, and an earlier result stays as it was.
    merge.set_defaults(after_stop=_AFTER_MERGE_STOP)
    command("status", "show per cluster what is remote, complete here, partial or changed", _status,
            _add_connection_arguments, _add_common_arguments).add_argument(
        "--json", action="store_true", dest="status_json",  # its own document, not main()'s
        help="the statuses as one JSON document on stdout (errors still on stderr)")
    report = command("report", "write one self-contained HTML page that shows whether a merged result "
                               "is sound", _report, _add_report_arguments)
    report.add_argument("result", metavar="RESULT", help="a merged .pkl or bundle folder")
    report.add_argument("--output", dest="report_output", default=None, metavar="PATH",
                        help="where the page goes (default: beside the result, NAME.report.html)")
    report.add_argument("--quiet", action="store_true", help="print errors and warnings only")
    report.set_defaults(after_stop="Nothing was written at the report's path; the result is as it was.")
    init = command("init", "write a credentials.json to fill in (mode 600), from the example", _init)
    init.add_argument("--config", default=DEFAULT_CONFIG_FILE, metavar="FILE",
                      help="where to write it (default: ./%(default)s; the user's is "
                           "~/.config/async_embed_sync/credentials.json)")
    init.add_argument("--quiet", action="store_true", help="print errors and warnings only")
    demo = command("demo", "run the whole job against two simulated clusters, no setup needed",
                   _demo, _add_merge_arguments_without_output)
    # The demo makes its clusters anew each time: there is nothing to resume.
    demo.set_defaults(after_stop="The demo starts over when run again; nothing of yours was touched.")
    demo.add_argument("--rows", type=_positive_int, default=None, metavar="N",
                      help="rows to generate (default: 20,010: 20,000 articles and 10 questions)")
    demo.add_argument("--drop-after", type=_positive_int, default=None, metavar="BYTES",
                      help="cut each cluster's connection after this many bytes, to show a resume")
    demo.add_argument("--dir", default=None, metavar="DIR",
                      help="where the demo keeps its clusters and results; it replaces only what an "
                           "earlier demo made there (default: ./async_embed_sync_demo)")
    demo.add_argument("--max-parallel", type=_positive_int, default=SyncOptions.max_parallel, metavar="N",
                      help="files in flight at once (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="print errors and warnings only")
    return parser


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="cluster settings (default: $ASYNC_EMBED_SYNC_CONFIG, else ./credentials.json, "
                             "./.credentials/, ~/.config/async_embed_sync/credentials.json)")
    parser.add_argument("--credentials-dir", metavar="DIR",
                        help="legacy folder of <cluster>.credentials files")
    parser.add_argument("--clusters", nargs="+", metavar="NAME",
                        help='clusters to use (default: all configured); "tensor01 tensor02" works too')
    parser.add_argument("--timeout", type=_positive_seconds, default=SyncOptions.timeout, metavar="SECONDS",
                        help="connect timeout, and how soon a dead link is noticed (default: %(default)s)")


def _add_sync_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-parallel", type=_positive_int, default=SyncOptions.max_parallel,
                        metavar="N", help="files in flight at once, over all clusters (default: %(default)s)")
    parser.add_argument("--retries", type=_whole_number, default=SyncOptions.retries, metavar="N",
                        help="retries in a row without progress before a file is given up; after a "
                             "drop, reconnects: one, then up to N more (default: %(default)s)")
    follow = parser.add_argument_group("follow a run that is still writing")
    follow.add_argument("--follow", action="store_true",
                        help="keep the connections and list again every --poll seconds, fetching files as "
                             "they appear and settle, until the set is complete (rows 0 to total_rows with "
                             "no gap; without a total, no gap and nothing new for --quiet-period)")
    follow.add_argument("--poll", type=_positive_seconds, default=DEFAULT_POLL_SECONDS, metavar="SECONDS",
                        help="with --follow: seconds between listings (default: %(default)s)")
    follow.add_argument("--quiet-period", type=_positive_seconds, default=DEFAULT_QUIET_PERIOD_SECONDS,
                        metavar="SECONDS", help="with --follow and no known total: the set is complete once no "
                                                "file appeared or changed for this long (default: %(default)s)")
    follow.add_argument("--max-wait", type=_positive_seconds, default=None, metavar="SECONDS",
                        help="with --follow: give up after this long, naming what is missing (default: wait "
                             "until complete)")
    parser.add_argument("--settle", type=_seconds_or_zero, default=None, metavar="SECONDS",
                        help="a file last written less than this long before it is listed may still be "
                             "being written: it is kept as a partial, not put in place (default: "
                             "settle_seconds in the config, else 60)")


def _add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="PATH",
                        help="a .pkl or .pickle path (any case) for the legacy pickle, any other path "
                             "for a memory-mappable bundle directory (default: %(default)s)")
    parser.add_argument("--articles-format", choices=ARTICLES_FORMATS, default=None, metavar="FORMAT",
                        help="a bundle's metadata shards: parquet (a column for every key any article "
                             "has; a key's values share one type), jsonl (keeps any row), or "
                             "parquet-embeddings (parquet that also holds the vectors) (default: parquet)")
    parser.add_argument("--shard-rows", type=_positive_int, default=None, metavar="N",
                        help="rows per shard of a bundle (default: about 1 GiB of vectors a shard, "
                             "e.g. 400,000 rows of 768 float32)")
    parser.add_argument("--report", action="store_true",
                        help="also write the result's report beside it (NAME.report.html; see `report`)")
    _add_report_arguments(parser)
    parser.add_argument("--partial", action="store_true",
                        help="merge what is there even if rows of the run are missing (a cluster left "
                             "out of --clusters, checkpoints short of total_rows); the summary names them")
    _add_merge_arguments_without_output(parser)


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample", type=_positive_int, default=DEFAULT_SAMPLE, metavar="N",
                        help="rows of the sample for the maps and similarities (default: %(default)s)")


def _add_merge_arguments_without_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="dtype of the merged embeddings (default: %(default)s)")
    parser.add_argument("--expect-articles", type=_whole_number, default=None, metavar="N",
                        help="fail unless the merge keeps exactly N articles")
    parser.add_argument("--strict", action="store_true", help="treat NaN and Inf values as errors")


def _add_log_arguments(parser: argparse.ArgumentParser) -> None:
    logs = parser.add_argument_group("logs")
    logs.add_argument("-v", "--verbose", action="count", default=0,
                      help="log what the tool decides: connections, methods, retries, how each file "
                           "was verified (timestamped, to stderr)")
    logs.add_argument("--debug", action="store_true", help="as -v, and asyncssh's own debug log")
    logs.add_argument("--log-file", metavar="FILE", help="write the log to FILE as well (timestamped)")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--download-dir", default=DEFAULT_DOWNLOAD_DIR, metavar="DIR",
                        help="where checkpoints are kept, one folder per cluster (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print errors and warnings only")
    parser.add_argument("--break-lock", action="store_true",
                        help="take over a download directory whose lock record names a run on another host, "
                             "after checking what can be checked")


def _whole_number(text: str, least: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, least=1)


def _seconds_or_zero(text: str) -> float:
    return _positive_seconds(text, zero=True)


def _positive_seconds(text: str, zero: bool = False) -> float:
    """A finite number of seconds above 0 (``zero``: or 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (0 <= value if zero else 0 < value) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds {'0 or more' if zero else 'above 0'}, "
                                         f"not {text}")
    return value


# ----------------------------------------------------------------- handlers


def _sync(args: argparse.Namespace) -> int:
    _sync_phase(args, choose_progress(args.quiet))
    return EXIT_OK


def _merge(args: argparse.Namespace) -> int:
    _merge_phase(args, choose_progress(args.quiet))
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    progress = choose_progress(args.quiet)
    # --merge-only needs no connection: without any configuration it merges
    # what is downloaded, as `merge` does.
    config = load_config(args.config, args.credentials_dir, required=not args.merge_only)
    clusters = config.select(args.clusters) if config else None
    partial_notice = _refuse_left_out_clusters(config, clusters, args.partial) \
        if config and not args.sync_only else None
    if partial_notice:
        print(partial_notice, file=sys.stderr)
    if not args.merge_only:
        _sync_phase(args, progress, config, clusters)
    if not args.sync_only:
        # Exactly the clusters of this run, as they were at their sync.
        _merge_phase(_without_summary(args), progress, clusters=[c.name for c in clusters] if clusters else None,
                     expect_rows=config.total_rows if config else None)
        if partial_notice:
            print(f"  {partial_notice}", file=sys.stderr)  # again under the summary: the start scrolled away
    return EXIT_OK


def _merge_command(args: argparse.Namespace) -> int:
    """``merge``: as ``_merge``; with ``--json``, its bars as asked and no human summary."""
    if not getattr(args, "json", False):
        return _merge(args)
    _merge_phase(_without_summary(args), choose_progress(args.quiet))
    return EXIT_OK


def _without_summary(args: argparse.Namespace) -> argparse.Namespace:
    """With ``--json``, the merge phase's arguments as ``--quiet`` for its human lines (the summary is the
    JSON document); the bars go by the progress passed, which follows the real ``--quiet``."""
    if not getattr(args, "json", False):
        return args
    return argparse.Namespace(**{**vars(args), "quiet": True})


def _refuse_left_out_clusters(config: Config, clusters: list[ClusterConfig], partial: bool) -> str | None:
    """A run that merges fewer clusters than are configured would make a result that looks complete;
    with ``partial`` it is asked for, and the line that says so is returned."""
    selected = {c.name for c in clusters}
    left_out = [name for name in config.clusters if name not in selected]
    if left_out and not partial:
        raise ClustersLeftOutError(config.source, selected, left_out)
    if left_out:
        return f"PARTIAL (--partial): the merge leaves out {', '.join(left_out)}, configured in {config.source}."
    return None


def _sync_phase(args: argparse.Namespace, progress: Progress, config: Config | None = None,
                clusters: list[ClusterConfig] | None = None) -> None:
    """Raises SyncFailedError when a cluster did not sync completely, so that
    ``run`` never merges an incomplete download."""
    if config is None:
        config = load_config(args.config, args.credentials_dir)
    if clusters is None:
        clusters = config.select(args.clusters)
    from .transfer.sync import sync  # the SSH stack: only for the commands that connect

    options = sync_options(config, max_parallel=args.max_parallel, timeout=args.timeout, retries=args.retries,
                           settle=args.settle, prompter=TerminalPrompter())
    watch = None
    if args.follow:
        from .follow import Follow

        watch = Follow(args.download_dir, [c.name for c in clusters], progress, poll=args.poll,
                       quiet_period=args.quiet_period, max_wait=args.max_wait, expect_rows=config.total_rows,
                       expect_articles=getattr(args, "expect_articles", None))
    report = sync(clusters, args.download_dir, progress, options, watch, break_lock=args.break_lock)
    _record("sync", report)
    if not args.quiet and not getattr(args, "json", False):  # --json: the summary is the document on stdout
        print(report.summary(), file=sys.stderr)
    if watch is not None:
        watch.raise_if_gave_up()  # it names what is missing, the files still being written too
    report.raise_for_failures()


def _merge_phase(args: argparse.Namespace, progress: Progress, clusters: list[str] | None = None,
                 expect_rows: int | None = None) -> None:
    report = api_merge(args.download_dir, args.output, progress=progress, dtype=args.dtype,
                       expect_articles=args.expect_articles, strict=args.strict,
                       articles_format=args.articles_format, clusters=clusters, expect_rows=expect_rows,
                       partial=args.partial, shard_rows=args.shard_rows, break_lock=args.break_lock)
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
    if args.report:
        _write_report(args, args.output)


def _report(args: argparse.Namespace) -> int:
    _write_report(args, args.result, args.report_output)
    return EXIT_OK


def _write_report(args: argparse.Namespace, result: str, output: str | None = None) -> None:
    from .report import write_report

    progress = choose_progress(args.quiet)
    try:
        path = write_report(result, output, sample=args.sample,
                            on_rows=lambda done, total: progress.step("report: rows read", done, total))
    finally:
        progress.close()
    _record("report", path)
    if not args.quiet:
        print(f"Report: {path} (open it in a browser; it needs no network)", file=sys.stderr)


def _init(args: argparse.Namespace) -> int:
    path = write_example_config(args.config)
    if not args.quiet:
        print(f"Wrote {path} (mode 600). Fill in host, username, key_file (or password) and remote_dir "
              f"for each cluster, and set total_rows to the rows of the whole run (the length of the "
              f"dataset the embedding job was given, its last checkpoint's end_index): a merge short of "
              f"it is then refused, where a cluster missing from the file would otherwise go unnoticed "
              f"(null: not set); then check with: {args.prog} status", file=sys.stderr)
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    import json

    from .transfer.status import collect_status, errors, format_status, running_here, status_document

    if args.break_lock:
        print(f"{args.prog} status: error: status takes no lock and changes nothing; --break-lock is for "
              f"sync, run and merge", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args.config, args.credentials_dir)
    # Read without the lock: a run going meanwhile is said, not waited for.
    in_flight = running_here(args.download_dir)
    statuses = collect_status(config.select(args.clusters), args.download_dir, args.timeout,
                              TerminalPrompter())
    in_flight = in_flight or running_here(args.download_dir)
    if args.status_json:
        print(json.dumps(status_document(args.download_dir, statuses, in_flight), indent=2))
    else:
        print(format_status(statuses, in_flight))
    sys.stdout.flush()  # the table first, then the errors below it on a terminal
    for error in errors(statuses):
        print(f"error: {error}", file=sys.stderr)
    return EXIT_FAILED if any(s.error for s in statuses) else EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_DEMO_DIR, DEFAULT_DEMO_ROWS, demo_site

    with demo_site(args.dir or DEFAULT_DEMO_DIR, rows=args.rows or DEFAULT_DEMO_ROWS,
                   drop_after=args.drop_after, progress=choose_progress(args.quiet)) as site:
        # The real `run` command, pointed at the simulated clusters.
        run_argv = ["run", "--config", str(site.config), "--download-dir", str(site.download_dir),
                    "--output", str(site.output), "--max-parallel", str(args.max_parallel),
                    "--dtype", args.dtype, "--timeout", "10"]
        run_argv += ["--expect-articles", str(args.expect_articles)] if args.expect_articles else []
        run_argv += ["--strict"] * args.strict + ["--quiet"] * args.quiet
        _run(build_parser().parse_args(run_argv))
    if not args.quiet:
        print(f"\nThe merged result is {site.output}. Load it with:\n\n"
              f"    from async_embed_sync import load\n"
              f"    result = load({str(site.output)!r})\n"
              f"    result['embeddings'].shape, result['articles'][0]['title']\n\n"
              f"The demo's two clusters existed only while it ran: the credentials.json it left in "
              f"{site.config.parent} points at servers that are gone now, so status or sync there "
              f"cannot connect. Run the demo again to see them.")
    return EXIT_OK
