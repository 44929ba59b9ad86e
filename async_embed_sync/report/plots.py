"""The report's figures, drawn with matplotlib (the ``report`` extra) and returned as PNG bytes.

matplotlib's Agg backend draws without a display and writes PNGs that the
page inlines; it is imported here only, when a report is made.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from .statistics import ResultStatistics

_FLAGGED, _PLAIN = "#c0392b", "#4a6fa5"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def labels(statistics: ResultStatistics) -> list[str]:
    return [f"{index}: {c.cluster} gpu {c.gpu_id}" for index, c in enumerate(statistics.checkpoints)]


def norm_distributions(statistics: ResultStatistics) -> bytes:
    plt = _pyplot()
    checkpoints = statistics.checkpoints
    figure, axes = plt.subplots(figsize=(9, 0.35 * len(checkpoints) + 1.2))
    data = [c.norms[np.isfinite(c.norms)] if len(c.norms) else np.zeros(1) for c in checkpoints]
    boxes = axes.boxplot(data, orientation="horizontal", patch_artist=True, showfliers=True,
                         flierprops={"markersize": 2})
    for box, checkpoint in zip(boxes["boxes"], checkpoints):
        box.set_facecolor(_FLAGGED if checkpoint.flags else _PLAIN)
        box.set_alpha(0.6)
    axes.set_yticks(range(1, len(checkpoints) + 1), labels(statistics), fontsize=8)
    axes.ticklabel_format(axis="x", useOffset=False)
    finite = np.concatenate(data)
    middle = float(np.median(finite)) if len(finite) else 0.0
    if len(finite) and float(np.ptp(finite)) < 0.01 * max(abs(middle), 1e-12):
        axes.set_xlim(middle * 0.99, middle * 1.01)  # unit vectors: a range of float rounding, not a spread
    axes.invert_yaxis()
    axes.set_xlabel("L2 norm of a row (up to 2,000 rows of each checkpoint)")
    axes.set_title("Norms per checkpoint (red: stands out)")
    return _png(figure)


def similarities(statistics: ResultStatistics) -> bytes:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 3.2))
    bins = np.linspace(-1, 1, 101)
    axes.hist(statistics.random_pair_similarity, bins=bins, alpha=0.6, label="random pairs", color="#7f8c8d")
    axes.hist(statistics.nearest_similarity, bins=bins, alpha=0.6, label="each row and its nearest", color=_PLAIN)
    axes.set_xlabel(f"cosine similarity (a sample of {len(statistics.sample_rows):,} rows)")
    axes.set_ylabel("pairs")
    axes.legend()
    axes.set_title("Cosine similarity: random pairs against nearest neighbours")
    return _png(figure)


def _pca(unit: np.ndarray) -> np.ndarray:
    centred = unit - unit.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T


def maps(statistics: ResultStatistics) -> list[tuple[str, bytes]]:
    """The sample in 2-D, coloured by checkpoint: PCA, and UMAP where umap-learn is installed."""
    unit = statistics.sample
    if len(unit) < 3:
        return []
    found = [("PCA", _pca(unit))]
    try:
        with warnings.catch_warnings():
            # umap-learn's import says that TensorFlow, for its ParametricUMAP (not used here), is missing.
            warnings.filterwarnings("ignore", message="Tensorflow not installed", category=ImportWarning)
            import umap
    except ImportError:
        pass
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notes on threads and seeds are not the reader's business
            found.append(("UMAP", umap.UMAP(n_neighbors=15, metric="cosine", random_state=0).fit_transform(unit)))
    return [(name, _map(statistics, name, xy)) for name, xy in found]


def _map(statistics: ResultStatistics, name: str, xy: np.ndarray) -> bytes:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 6))
    colours = plt.get_cmap("tab20")
    for index, label in enumerate(labels(statistics)):
        mine = statistics.sample_checkpoint == index
        if mine.any():
            flagged = bool(statistics.checkpoints[index].flags)
            axes.scatter(xy[mine, 0], xy[mine, 1], s=6 if not flagged else 10, alpha=0.7,
                         color=colours(index % 20), label=label + (" (stands out)" if flagged else ""),
                         marker="x" if flagged else "o")
    axes.set_title(f"{name} of a sample of {len(statistics.sample_rows):,} rows, by checkpoint")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(figure)
