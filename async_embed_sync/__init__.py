"""Sync embedding checkpoints from GPU clusters over SSH and merge them.

``python -m async_embed_sync run`` is the whole job; see README.md.
"""

__version__ = "0.1.0"

from .output import load
