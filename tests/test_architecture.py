"""docs/ARCHITECTURE.md is drawn from the real imports: every module is named there, and none imports
against the drawn direction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "async_embed_sync"
BASE = {"errors", "config", "layout", "gone", "fileio", "known_hosts", "progress", "logs", "termination",
        "dependencies", "processes"}


def _modules() -> dict[str, Path]:
    """Dotted name under the package (``transfer.sync``, ``cli``) -> file."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """What ``module`` imports: our modules by dotted name, and ``asyncssh``."""
    package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [target] if node.module else [".".join([*base, alias.name]) for alias in node.names]
            found.update(name or "__init__" for name in names)
            # dependencies.import_asyncssh() is ``import asyncssh`` without its known warnings.
            found.update("asyncssh" for alias in node.names if alias.name == "import_asyncssh")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] == "asyncssh":
                found.add("asyncssh")
            elif node.module.startswith("async_embed_sync."):
                found.add(node.module.removeprefix("async_embed_sync."))
        elif isinstance(node, ast.Import):
            found.update("asyncssh" for alias in node.names if alias.name.split(".")[0] == "asyncssh")
    return found


def _room(module: str) -> str:
    head = module.split(".")[0]
    if head in ("transfer", "testing"):
        return head
    if head in ("merging", "output"):
        return "merge"
    return "base" if head in BASE else head


IMPORTS = {module: _imports(module, path) for module, path in _modules().items()}
# The memory remote is the other end of the transfer protocol: it imports that protocol, nothing else of transfer/.
CROSSINGS = {"testing.memory_remote": {"transfer.files"}}


def test_every_module_is_named_in_the_architecture_page():
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    unnamed = [module for module, path in _modules().items()
               if path.name != "__init__.py" and f"`{path.relative_to(PACKAGE)}`" not in page]
    assert not unnamed, f"not in docs/ARCHITECTURE.md: {unnamed}"


@pytest.mark.parametrize(("room", "may_not_import"), [
    ("base", {"transfer", "merge", "testing", "api", "cli", "demo", "__init__", "__main__"}),
    ("transfer", {"merge", "testing", "api", "cli", "demo"}),  # the sync never imports the merge
    ("merge", {"transfer", "testing", "api", "cli", "demo"}),
    ("testing", {"transfer", "merge", "api", "cli", "demo"}),
])
def test_no_room_imports_against_the_drawn_direction(room, may_not_import):
    wrong = {module: sorted(target for target in targets - CROSSINGS.get(module, set())
                            if target != "asyncssh" and _room(target) in may_not_import)
             for module, targets in IMPORTS.items() if _room(module) == room}
    assert not {module: targets for module, targets in wrong.items() if targets}


def test_only_the_demo_imports_the_simulation():
    importers = {module for module, targets in IMPORTS.items()
                 if _room(module) != "testing" and any(_room(target) == "testing" for target in targets)}
    assert importers == {"demo"}


def test_the_memory_remote_imports_the_protocol_it_serves_and_the_base():
    assert IMPORTS["testing.memory_remote"] == {"config", "errors", "transfer.files"}
    assert IMPORTS["transfer.files"] <= {"config", "errors"}  # and the protocol, only the base


def test_one_client_module_imports_asyncssh():
    # dependencies.py imports it for them (and for no one else), without its known warnings.
    assert {module for module, targets in IMPORTS.items() if "asyncssh" in targets} - {"dependencies"} == {
        "transfer.ssh", "testing.embedded_server"}  # the client, and the server the demo and tests run


def test_errors_import_nothing_of_ours_but_the_host_names():
    assert IMPORTS["errors"] == {"known_hosts"}


# The checkpoint readers: what merging/merge.py and output.py stand on.
READERS = {f"merging.{name}" for name in ("checkpoints", "safe_pickle", "jsonl_index", "row_blocks", "rows", "digest")}


def test_the_checkpoint_readers_import_only_the_base_and_each_other():
    assert READERS <= IMPORTS.keys()
    wrong = {module: sorted(target for target in IMPORTS[module] if _room(target) != "base" and target not in READERS)
             for module in READERS}
    assert not {module: targets for module, targets in wrong.items() if targets}
    assert IMPORTS["merging.safe_pickle"] == {"errors"}


def test_only_the_layout_knows_where_the_download_directory_keeps_its_files():
    """The state directory, the partials' and the journal's names: ``layout.py``'s alone."""
    marks = ("STATE_DIR_NAME", '.part"', ".listing.json", ".async_embed_sync/")
    knowing = {module for module, path in _modules().items()
               if module != "layout" and any(mark in path.read_text() for mark in marks)}
    assert not knowing
