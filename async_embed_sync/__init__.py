"""Sync embedding checkpoints from GPU clusters over SSH and merge them.

``python -m async_embed_sync run`` is the whole job; see README.md. The
Python API is the same job as functions::

    from async_embed_sync import sync, merge, load

    sync()                                  # every configured cluster
    merge(output="embeddings/merged")       # a .pkl path or a bundle directory
    result = load("embeddings/merged")      # the legacy dict, embeddings memory-mapped

``sync_async`` and ``merge_async`` are their forms for a running event loop.
"""

__version__ = "0.1.0"
__all__ = ["load", "merge", "merge_async", "sync", "sync_async"]

_API = ("merge", "merge_async", "sync", "sync_async")


def __getattr__(name: str):
    # Each on first use: ``load`` needs numpy but not the sync's SSH stack,
    # the sync needs no numpy; a notebook that only loads a result stays light.
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "load":
        from .output.load import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
