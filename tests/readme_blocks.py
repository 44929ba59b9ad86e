"""The fenced blocks of README.md and of the docs pages its examples moved to, for the tests that hold
them to what the tool does."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The README's examples, and those it links to: using and verifying a result, the engines at scale, the report.
PAGES = (README, ROOT / "docs" / "RESULT.md", ROOT / "docs" / "ENGINES.md", ROOT / "docs" / "REPORT.md")


def blocks(language: str = r"\w*", pages: tuple[Path, ...] = PAGES) -> list[str]:
    """The text of the fenced blocks tagged ``language`` (by default: any tag, or none) in ``pages``, in order."""
    return [block for page in pages for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)]


def commands(pages: tuple[Path, ...] = PAGES) -> list[str]:
    """Every ``python -m async_embed_sync ...`` command in the blocks of ``pages``, comments cut off."""
    found = []
    for block in blocks(pages=pages):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            for part in line.split("&&"):
                if part.strip().startswith("python -m async_embed_sync"):
                    found.append(part.strip())
    return found
