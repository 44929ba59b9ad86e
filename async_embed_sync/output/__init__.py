"""The merged result: its spec, its two forms' writers, the staging area and the publish, ``load()``.

The merge (``merging/merge.py``) decides an :class:`OutputSpec` once, stages
legacy checkpoints' bytes in its :class:`~.scratch.Scratch`, fills the writer
the spec opens, then publishes the staging area atomically.
``load()`` is :mod:`.load`'s (``from async_embed_sync import load``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .forms import ARTICLES_FORMATS, LEGACY_KEYS, ArticlesFormat

if TYPE_CHECKING:
    from .spec import OUTPUT_DTYPES, OutputSpec

__all__ = ["ARTICLES_FORMATS", "LEGACY_KEYS", "OUTPUT_DTYPES", "ArticlesFormat", "OutputSpec"]


def __getattr__(name: str):
    # On first use: the command line names the forms in its --help without
    # loading numpy (``--version``, ``--help`` and ``init`` never need it).
    if name in ("OUTPUT_DTYPES", "OutputSpec"):
        from . import spec

        return getattr(spec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
