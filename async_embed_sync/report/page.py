"""The report as one self-contained HTML page: inline style, images as data URIs, no script, no URL.

Every text that comes from the result (titles, file and host names) is
escaped: an article title is data, never markup.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from .statistics import ResultStatistics

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.odd td { background: #fdecea; } .verdict { font-size: 1.1em; padding: 0.6em 1em; border-radius: 4px; }
.ok { background: #e8f5e9; } .bad { background: #fdecea; } img { max-width: 100%; }
.why { color: #c0392b; } code { font-size: 0.9em; }
"""


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else escape(str(value))


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _title(articles: Sequence[Mapping[str, Any]], row: int) -> str:
    article = articles[int(row)]
    return escape(str(article.get("title") or article.get("id") or f"row {row}"))


def render(result: Mapping[str, Any], statistics: ResultStatistics, *, source: str, sha256: str,
           figures: Mapping[str, bytes]) -> str:
    """The page of ``result`` (read from ``source``, whose digest is ``sha256``), with its ``figures``."""
    checkpoints = statistics.checkpoints
    articles = result["articles"]
    metrics = result.get("quality_metrics") or {}
    odd = [index for index, checkpoint in enumerate(checkpoints) if checkpoint.flags]
    clusters = sorted({checkpoint.cluster for checkpoint in checkpoints})
    glance = [
        ("result", f"<code>{escape(source)}</code>"),
        ("rows (articles kept)", _number(statistics.rows)),
        ("dropped rows (not articles)", _number(metrics.get("dropped_non_article_rows"))),
        ("model", escape(str(result.get("model")))),
        ("dimension, dtype", f"{statistics.dim}, {escape(statistics.dtype)}"),
        ("clusters", f"{len(clusters)}: {escape(', '.join(clusters))}"),
        ("checkpoints", _number(len(checkpoints))),
        ("merged at", escape(str(result.get("timestamp")))),
        ("sha256", f"<code>{escape(sha256)}</code>"),
        ("NaN, Inf, zero-norm, repeated rows", ", ".join(_number(metrics.get(key)) for key in
                                                        ("nan_values", "inf_values", "zero_norm_rows", "duplicate_rows"))),
    ]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>Report: {escape(source)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Embedding result: {escape(source)}</h1>",
        _verdict(odd, len(checkpoints)),
        "<h2>The run at a glance</h2><table>",
        *(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in glance),
        "</table>",
        "<h2>Checkpoints</h2>",
        "<p>One row per checkpoint, in index order; a row that stands out is red, and says why. The"
        " duplicates column counts its rows that repeat an earlier row of the result; \"apart\" is how far"
        " its vectors' mean direction is from the others', in units of what chance gives (about 1).</p>",
        _checkpoint_table(statistics),
        "<h2>Norms</h2>", _image(figures["norms"], "norm distribution per checkpoint"),
        "<h2>Cosine similarity</h2>",
        "<p>Random pairs of a sample against each sample row and its nearest other sample row: nearest"
        " neighbours far more similar than random pairs mean the vectors carry structure.</p>",
        _image(figures["similarities"], "cosine similarity distributions"),
        "<h2>Maps of a sample</h2>",
        "<p>Coloured by checkpoint: a GPU whose vectors live apart from the others shows as its own island.</p>",
        *(_image(png, f"{name} map") for name, png in figures.items() if name.startswith("map ")),
        "<h2>Nearest neighbours</h2>",
        "<p>A few articles of the sample and their nearest articles in the whole result (cosine), to read.</p>",
        _neighbours(statistics, articles),
        "<h2>Duplicates</h2>",
        _duplicates(statistics, articles),
        "</body></html>",
    ]
    return "\n".join(parts)


def _verdict(odd: list[int], checkpoints: int) -> str:
    if not odd:
        return f'<p class="verdict ok">No checkpoint stands out among the {checkpoints}.</p>'
    return (f'<p class="verdict bad">{len(odd)} of {checkpoints} checkpoints stand out: '
            f'{", ".join(str(index) for index in odd)} (below, in red, with why).</p>')


def _checkpoint_table(statistics: ResultStatistics) -> str:
    head = ("#", "cluster", "GPU", "host", "index range", "rows", "NaN", "Inf", "zero-norm", "norm mean",
            "norm std", "duplicates", "apart", "file")
    rows = ["<table><tr>" + "".join(f"<th>{name}</th>" for name in head) + "</tr>"]
    for index, c in enumerate(statistics.checkpoints):
        cells = [
            f'<td class="n">{index}</td>', f"<td>{escape(str(c.cluster))}</td>", f"<td>{_number(c.gpu_id)}</td>",
            f"<td>{escape(str(c.hostname))}</td>", f'<td class="n">{c.start_index:,}-{c.end_index - 1:,}</td>',
            *(f'<td class="n">{_number(value)}</td>' for value in
              (c.rows, c.nan_values, c.inf_values, c.zero_norm_rows, c.norm_mean, c.norm_std, c.duplicate_rows)),
            f'<td class="n">{_number(c.direction_distance, 3)}</td>',
            f"<td><code>{escape(c.file)}</code></td>",
        ]
        rows.append(f'<tr{" class=odd" if c.flags else ""}>' + "".join(cells) + "</tr>")
        if c.flags:  # why, on a row of its own under it
            rows.append(f'<tr class=odd><td></td><td class="why" colspan={len(head) - 1}>Stands out: '
                        f'{"; ".join(escape(flag) for flag in c.flags)}.</td></tr>')
    rows.append("</table>")
    return "\n".join(rows)


def _neighbours(statistics: ResultStatistics, articles: Sequence[Mapping[str, Any]]) -> str:
    if not len(statistics.queries):
        return "<p>No rows.</p>"
    parts = []
    for query, rows, scores in zip(statistics.queries, statistics.neighbours, statistics.neighbour_scores):
        items = "".join(f"<li>{score:.3f} {_title(articles, row)}</li>" for row, score in zip(rows, scores) if row >= 0)
        parts.append(f"<p><b>{_title(articles, query)}</b> (row {int(query):,})</p><ol>{items}</ol>")
    return "\n".join(parts)


def _duplicates(statistics: ResultStatistics, articles: Sequence[Mapping[str, Any]]) -> str:
    if not statistics.duplicate_rows:
        return "<p>No row repeats another, byte for byte.</p>"
    examples = "".join(f"<li>row {row:,} <b>{_title(articles, row)}</b> repeats row {earlier:,} "
                       f"<b>{_title(articles, earlier)}</b></li>" for row, earlier in statistics.duplicate_examples)
    return (f"<p>{statistics.duplicate_rows:,} rows repeat an earlier row byte for byte. The first few:</p>"
            f"<ul>{examples}</ul>")
