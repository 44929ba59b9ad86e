"""What the merge fills, the same calls for either form: rows, articles, a legacy checkpoint's staged bytes.

The merge hands the writer each checkpoint in index order, a ``.npy`` one as
row blocks then the checkpoint itself (:meth:`OutputWriter.add_block`,
:meth:`OutputWriter.add_checkpoint`), a legacy one as what waits of it in the
scratch files (:meth:`OutputWriter.add_staged`); the form's article writer
decides what it takes of each.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..merging.checkpoints import NpyCheckpoint
from ..merging.row_blocks import RowBlock
from .files import EmbeddingRows
from .scratch import Scratch, ScratchFile, StagedCheckpoint


class Articles(Protocol):
    """A form's article writer (``output/articles.py``, ``output/legacy_pickle.py``)."""

    def add_block(self, block: RowBlock) -> None: ...
    def add_lines(self, checkpoint: NpyCheckpoint) -> None: ...
    def add_encoded(self, scratch: ScratchFile, offset: int, length: int, source: Path) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


class OutputWriter:
    """The rows into :attr:`embeddings`, the articles into :attr:`articles`, staged bytes from :attr:`scratch`."""

    embeddings: EmbeddingRows
    articles: Articles
    scratch: Scratch

    def add_block(self, rows: np.ndarray, block: RowBlock) -> None:
        """Append the article ``rows`` of ``block`` (in the output dtype); they must stay unchanged until :meth:`wait`."""
        self.embeddings.append(rows)
        self.articles.add_block(block)

    def wait(self) -> None:
        """Block until the rows given so far are done with: their buffer may then be reused."""
        self.embeddings.wait()

    def add_checkpoint(self, checkpoint: NpyCheckpoint) -> None:
        """After the blocks of ``checkpoint``: what the articles take of it whole."""
        self.articles.add_lines(checkpoint)

    def add_staged(self, staged: StagedCheckpoint) -> None:
        """Copy in a legacy checkpoint's bytes from the scratch files."""
        self.embeddings.copy_from(self.scratch.rows.fd, staged.rows_offset, staged.rows)
        self.articles.add_encoded(self.scratch.articles, staged.articles_offset, staged.articles_length, staged.source)

    def finish(self, metadata: Mapping[str, Any]) -> None:
        """Write what follows the rows and articles (every legacy key but the first two), and close."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
