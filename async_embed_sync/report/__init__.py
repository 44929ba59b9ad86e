"""The report on a merged result: one self-contained HTML page that shows whether the run is sound.

``statistics.py`` measures a result as ``load()`` returns it, in one
streaming pass and one sample; ``plots.py`` draws it (matplotlib, the
``report`` extra); ``page.py`` writes the page. :func:`write_report` is
the whole of it, for ``report`` and ``merge --report``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import LocalFileError, OutputError, translating_local_errors
from ..fileio import file_sha256
from ..output.forms import CHECKSUMS_FILE, MANIFEST_FILE, PICKLE_SUFFIXES

DEFAULT_SAMPLE = 2_000
# Where ``run`` and ``merge`` write the result unless told otherwise (``api.DEFAULT_OUTPUT``).
DEFAULT_RESULT = Path("embeddings/wikipedia_merged.pkl")


def default_report_path(result: str | os.PathLike[str]) -> Path:
    """Beside the result, not in it: ``merged.pkl`` -> ``merged.report.html``, ``merged/`` -> ``merged.report.html``."""
    result = Path(result)
    stem = result.stem if result.suffix.lower() in PICKLE_SUFFIXES else result.name
    return result.with_name(f"{stem}.report.html")


def _looks_merged(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES) or (path / MANIFEST_FILE).is_file()


def nearest_results(result: str | os.PathLike[str]) -> list[Path]:
    """Merged results near a path that does not exist: the ``.pkl`` files and bundles in the folder it
    names (or the nearest folder above that exists), then the default output, if there."""
    result = Path(result)
    folder = result.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        beside = sorted(path for path in folder.iterdir() if not path.name.startswith(".") and _looks_merged(path))
    except OSError:
        beside = []
    found = [*beside, *([DEFAULT_RESULT] if _looks_merged(DEFAULT_RESULT) else [])]
    return list(dict.fromkeys(found))[:5]


def _refuse_missing(result: Path) -> None:
    if result.exists():
        return
    found = nearest_results(result)
    hint = (f"Did you mean {' or '.join(map(str, found))}? Else run the merge first (`merge`, or `run`)."
            if found else f"No merged result is beside it, nor at {DEFAULT_RESULT}: run the merge first "
                          f"(`merge`, or `run`), then report on the result it names.")
    raise LocalFileError(str(result), f"it does not exist. {hint}", action="report on")


def _digest(result: Path) -> str:
    if result.is_dir():
        sums = result / CHECKSUMS_FILE
        return f"{file_sha256(sums)} (of {CHECKSUMS_FILE}, which holds every shard's)" if sums.is_file() else "-"
    return file_sha256(result)


def write_report(result: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
                 sample: int = DEFAULT_SAMPLE, on_rows: Callable[[int, int], None] | None = None) -> Path:
    """Write the report of the merged ``result`` (a ``.pkl`` or a bundle) to ``output`` (default: beside
    it, :func:`default_report_path`); the page's path. Memory: one block of rows and ``sample`` rows.
    ``on_rows(done, total)`` as the rows are read."""
    _refuse_missing(Path(result))
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise OutputError(str(result), "its report draws with matplotlib, which is not installed: "
                                       "pip install 'async_embed_sync[report]'.") from exc
    from ..output.load import load
    from . import page, plots
    from .statistics import flag_outliers, measure

    result = Path(result)
    target = Path(output) if output is not None else default_report_path(result)
    document = load(result)
    statistics = measure(document, sample=sample, on_rows=on_rows)
    flag_outliers(statistics)
    figures = {"norms": plots.norm_distributions(statistics), "similarities": plots.similarities(statistics)}
    figures.update((f"map {name}", png) for name, png in plots.maps(statistics))
    text = page.render(document, statistics, source=str(result), sha256=_digest(result), figures=figures)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with translating_local_errors(target, "write", "The result itself is as it was."):
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)  # a page is whole at its path, or not there
    return target
