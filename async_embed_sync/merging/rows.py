"""What a checkpoint row is: an article unless its ``kind`` says otherwise; its values as JSON holds them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ARTICLE_KIND = "article"


def is_article(row: Mapping[str, Any]) -> bool:
    """A row is an article unless its ``kind`` says otherwise."""
    return row.get("kind", ARTICLE_KIND) == ARTICLE_KIND


def article_mask(rows: list[dict]) -> np.ndarray:
    """Which of ``rows`` are articles, as a boolean array."""
    return np.fromiter(map(is_article, rows), dtype=bool, count=len(rows))


def python_scalar(value: Any) -> Any:
    """The Python scalar of a numpy scalar's value (``np.int64(7)`` is ``7``); TypeError for anything else."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def python_values(value: Any) -> Any:
    """``value`` with every numpy scalar in it, however deep, replaced by the Python scalar of its value."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {python_values(key): python_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(map(python_values, value))
    return value

