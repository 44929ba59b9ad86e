"""What a command costs before it does anything: no dependency's warning on any command, and no SSH
stack for the commands and calls that never connect (issue 22: five cryptography warnings on every
command, and 1.3 s of imports before ``--version`` printed its line).

Each case runs in a fresh interpreter, as a user starts one, with Python's default warning filters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from async_embed_sync.testing.synthetic import generate_run

SSH_STACK = ("asyncssh", "cryptography")
# Runs the command line's main() (or load()) and reports which of the SSH stack's packages it loaded.
_PROBE = """
import json, sys
from async_embed_sync.cli import main
from async_embed_sync import load
argv = json.loads(sys.argv[1])
code = main(argv) if argv[0] != "load()" else len(load(argv[1])["articles"]) and 0
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[2])))
print("LOADED", json.dumps(loaded), file=sys.stderr)
sys.exit(code)
"""


def _run(argv: list[str], cwd: Path) -> tuple[int, str, list[str]]:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv), json.dumps(SSH_STACK)],
                          cwd=cwd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    stderr, _, loaded = done.stderr.rpartition("LOADED ")
    return done.returncode, stderr, json.loads(loaded) if loaded else ["(the probe did not finish)"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    generate_run(root / "downloads", rows=60, dim=8, gpus_per_cluster=1)
    code, stderr, _ = _run(["merge", "--download-dir", str(root / "downloads"), "--output",
                            str(root / "merged.pkl"), "--quiet"], root)
    assert code == 0, stderr
    return root


@pytest.mark.parametrize("argv", [
    ["--version"], ["--help"], ["status", "--help"], ["run", "--help"], ["init", "--config", "credentials.json"],
    ["merge", "--download-dir", "downloads", "--output", "again/", "--quiet"],
    ["load()", "merged.pkl"],
], ids=lambda argv: " ".join(argv[:2]))
def test_a_command_that_never_connects_loads_no_ssh_stack_and_prints_no_warning(merged, argv):
    code, stderr, loaded = _run(argv, merged)
    assert code == 0, stderr
    assert loaded == [], f"{argv} loaded {loaded}"
    assert "Warning" not in stderr, stderr
    if argv[0] in ("--version", "merge"):
        assert stderr == ""  # --version's line goes to stdout; a quiet merge says nothing


def test_version_prints_one_line_and_nothing_else(tmp_path):
    done = subprocess.run([sys.executable, "-m", "async_embed_sync", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "python -m async_embed_sync 0.1.0\n", "")


def test_the_ssh_stack_imports_without_a_warning_but_a_dsa_key_in_use_still_warns():
    """Only the import's known DSA warnings are silenced: the same deprecation, raised by real use of DSA, shows."""
    probe = ("import warnings\n"
             "warnings.simplefilter('error')\n"
             "import async_embed_sync.transfer.ssh, async_embed_sync.testing.embedded_server\n"
             "warnings.simplefilter('default')\n"
             "from cryptography.hazmat.primitives.asymmetric import dsa\n"
             "dsa.DSAPrivateKey\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    import cryptography

    if int(cryptography.__version__.split(".")[0]) >= 51:  # the release that deprecated DSA
        assert "DSA is deprecated" in done.stderr
