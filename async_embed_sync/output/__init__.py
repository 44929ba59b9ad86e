"""The merged result: its spec, its two forms' writers, the staging area and the publish, ``load()``.

The merge (``merging/merge.py``) decides an :class:`OutputSpec` once, stages
legacy checkpoints' bytes in its :class:`~.scratch.Scratch`, fills the writer
the spec opens, then publishes the staging area atomically.
"""

from .forms import ARTICLES_FORMATS, LEGACY_KEYS, ArticlesFormat
from .load import load
from .spec import OUTPUT_DTYPES, OutputSpec

__all__ = ["ARTICLES_FORMATS", "LEGACY_KEYS", "OUTPUT_DTYPES", "ArticlesFormat", "OutputSpec", "load"]
