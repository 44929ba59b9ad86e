"""Configuration: both layouts, validation, permissions, and no secret shown."""

import json
from pathlib import Path

import pytest

from async_embed_sync.cli import main
from async_embed_sync.config import DEFAULT_PATTERNS, load_config
from async_embed_sync.errors import ConfigError, KeyPermissionError, UnknownClusterError

SECRET = "s3cr3t-Pa55word"


def _key(tmp_path, mode=0o600):
    key = tmp_path / "id_test"
    key.write_text("not really a key")
    key.chmod(mode)
    return key


def _write(path, document, mode=0o600):
    path.write_text(json.dumps(document))
    path.chmod(mode)
    return path


def test_json_config_with_defaults(tmp_path):
    key = _key(tmp_path)
    path = _write(tmp_path / "credentials.json", {"clusters": {
        "tensor01": {"host": "h1", "username": "u", "key_file": str(key), "remote_dir": "/d"},
        "tensor02": {"host": "h2", "port": 2222, "password": SECRET, "remote_dir": "/e",
                     "pattern": "*.pkl"},
    }})
    config = load_config(path)
    one, two = config.clusters["tensor01"], config.clusters["tensor02"]
    # Left out: the ssh config, then ssh's defaults decide (transfer/target.py, resolve_target).
    assert (one.host, one.port, one.known_hosts, one.patterns) == ("h1", None, None, DEFAULT_PATTERNS)
    assert (two.port, two.patterns, two.password) == (2222, ("*.pkl",), SECRET)
    assert config.warnings == ()
    assert SECRET not in repr(config)


def test_legacy_credentials_dir(tmp_path):
    folder = tmp_path / ".credentials"
    folder.mkdir()
    for name in ("tensor01", "tensor02"):
        _write(folder / f"{name}.credentials", {"host": name, "remote_dir": f"/{name}"})
    config = load_config(credentials_dir=folder)
    assert sorted(config.clusters) == ["tensor01", "tensor02"]
    assert config.clusters["tensor02"].remote_dir == "/tensor02"


def test_default_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="No configuration found"):
        load_config()
    (tmp_path / ".credentials").mkdir()
    _write(tmp_path / ".credentials" / "old.credentials", {"host": "h", "remote_dir": "/d"})
    assert list(load_config().clusters) == ["old"]
    _write(tmp_path / "credentials.json", {"clusters": {"new": {"host": "h", "remote_dir": "/d"}}})
    assert list(load_config().clusters) == ["new"]


@pytest.mark.parametrize("names", [["tensor02", "tensor01"], ["tensor02 tensor01"], ["tensor02,tensor01"]])
def test_select_accepts_both_forms(tmp_path, names):
    path = _write(tmp_path / "c.json", {"clusters": {
        n: {"host": n, "remote_dir": "/d"} for n in ("tensor01", "tensor02", "tensor03")}})
    assert [c.name for c in load_config(path).select(names)] == ["tensor02", "tensor01"]
    assert len(load_config(path).select(None)) == 3


def test_unknown_cluster_lists_known_ones(tmp_path):
    path = _write(tmp_path / "c.json", {"clusters": {"tensor01": {"host": "h", "remote_dir": "/d"}}})
    with pytest.raises(UnknownClusterError) as info:
        load_config(path).select(["tensor09"])
    assert "tensor09" in str(info.value) and "tensor01" in str(info.value)


def test_world_readable_key_is_refused_with_chmod_hint(tmp_path):
    key = _key(tmp_path, 0o644)
    path = _write(tmp_path / "c.json", {"clusters": {
        "tensor01": {"host": "h", "key_file": str(key), "remote_dir": "/d"}}})
    with pytest.raises(KeyPermissionError) as info:
        load_config(path)
    assert f"chmod 600 {key}" in str(info.value)


def test_readable_password_file_warns_without_showing_it(tmp_path):
    path = _write(tmp_path / "c.json", {"clusters": {
        "tensor01": {"host": "h", "password": SECRET, "remote_dir": "/d"}}}, mode=0o644)
    config = load_config(path)
    assert len(config.warnings) == 1
    assert "chmod 600" in config.warnings[0] and SECRET not in config.warnings[0]


@pytest.mark.parametrize("document, expected", [
    ({"clusters": {}}, "at least one cluster"),
    ({"clusters": {"t": {"remote_dir": "/d"}}}, "'host'"),
    ({"clusters": {"t": {"host": "h"}}}, "'remote_dir'"),
    ({"clusters": {"t": {"host": "h", "remote_dir": "/d", "port": "22"}}}, "'port'"),
    ({"clusters": {"t": {"host": "h", "remote_dir": "/d", "hots": 1}}}, "unknown field"),
    ({"clusters": {"t": {"host": "h", "remote_dir": "/d", "pattern": []}}}, "'pattern'"),
    ({"clusters": {"t": {"host": "h", "remote_dir": "/d", "key_file": "/nonexistent/key"}}}, "does not exist"),
])
def test_invalid_settings_name_file_and_field(tmp_path, document, expected):
    path = _write(tmp_path / "c.json", document)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_broken_json_is_reported_without_echoing_content(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"clusters": {"t": {"password": "' + SECRET + '" oops')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 1" in str(info.value) and SECRET not in str(info.value)


def test_the_configuration_is_found_where_people_look(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user_file = tmp_path / "xdg" / "async_embed_sync" / "credentials.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    with pytest.raises(ConfigError) as refused:
        load_config()
    message = str(refused.value)
    for place in ("No --config given", "$ASYNC_EMBED_SYNC_CONFIG is not set", "no credentials.json or .credentials/",
                  str(user_file), "python -m async_embed_sync init", '"remote_dir"'):
        assert place in message
    user_file.parent.mkdir(parents=True)
    _write(user_file, {"clusters": {"user": {"host": "h", "remote_dir": "/d"}}})
    assert list(load_config().clusters) == ["user"]
    _write(tmp_path / "credentials.json", {"clusters": {"here": {"host": "h", "remote_dir": "/d"}}})
    assert list(load_config().clusters) == ["here"]  # the working directory's first
    named = _write(tmp_path / "elsewhere.json", {"clusters": {"named": {"host": "h", "remote_dir": "/d"}}})
    monkeypatch.setenv("ASYNC_EMBED_SYNC_CONFIG", str(named))
    assert list(load_config().clusters) == ["named"]  # the environment's before that
    assert list(load_config(tmp_path / "credentials.json").clusters) == ["here"]  # --config first of all
    monkeypatch.setenv("ASYNC_EMBED_SYNC_CONFIG", str(tmp_path / "typo.json"))
    with pytest.raises(ConfigError, match=r"named by \$ASYNC_EMBED_SYNC_CONFIG, does not exist"):
        load_config()


def test_init_writes_the_example_privately_and_never_over_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init"], prog="async-embed-sync") == 0
    written = tmp_path / "credentials.json"
    assert oct(written.stat().st_mode & 0o777) == "0o600"
    # The example the installed package carries, as the repository's top-level copy shows it.
    assert written.read_text() == (Path(__file__).parent.parent / "credentials.example.json").read_text()
    assert sorted(json.loads(written.read_text())["clusters"]) == ["tensor01", "tensor02"]
    said = capsys.readouterr().err
    assert "Fill in host" in said and "then check with: async-embed-sync status" in said  # the name typed
    assert main(["init", "--config", str(tmp_path / "quiet.json"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    written.write_text("{}  # edited by hand")
    assert main(["init"]) == 1
    assert "Cannot write the example to" in capsys.readouterr().err
    assert written.read_text() == "{}  # edited by hand"


@pytest.mark.parametrize("value", [-1, "60", True, float("inf")])
def test_settle_seconds_must_be_a_number_of_seconds(tmp_path, value):
    path = tmp_path / "credentials.json"
    document = {"clusters": {"tensor01": {"host": "h", "remote_dir": "/d"}}, "settle_seconds": value}
    path.write_text(json.dumps(document, allow_nan=True))
    with pytest.raises(ConfigError, match='"settle_seconds" must be a number of seconds, 0 or more'):
        load_config(str(path))


def test_settle_seconds_is_read_from_the_config(tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"clusters": {"tensor01": {"host": "h", "remote_dir": "/d"}}, "settle_seconds": 5}))
    assert load_config(str(path)).settle_seconds == 5.0
    path.write_text(json.dumps({"clusters": {"tensor01": {"host": "h", "remote_dir": "/d"}}}))
    assert load_config(str(path)).settle_seconds is None
