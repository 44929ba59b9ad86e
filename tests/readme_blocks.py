"""README.md's fenced blocks, for the tests that hold the README to what the tool does."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str = r"\w*") -> list[str]:
    """The text of README.md's fenced blocks tagged ``language`` (by default: any tag, or none)."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def commands() -> list[str]:
    """Every ``python -m async_embed_sync ...`` command in README.md's blocks, comments cut off."""
    found = []
    for block in blocks():
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            for part in line.split("&&"):
                if part.strip().startswith("python -m async_embed_sync"):
                    found.append(part.strip())
    return found
