"""Sync embedding checkpoints from GPU clusters over SSH and merge them.

``python -m async_embed_sync run`` is the whole job; see README.md.
``async_embed_sync.load(path)`` reads a merged result back.
"""

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
    # Imported on first use: ``load`` needs numpy, which the sync does not,
    # and every command pays for what the package's import pulls in.
    if name == "load":
        from .output import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
