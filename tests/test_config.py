"""Configuration: precedence, validation, accounts, secrets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from zohofs.config import Config, MiB, build
from zohofs.errors import ConfigError

SECRET_FLAGS: dict[str, str | None] = {
    "client_id": None, "client_secret": None, "refresh_token": None}


def write(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def settings_of(tmp_path: Path, toml: str, flags: dict[str, Any] | None = None,
                env: dict[str, str] | None = None) -> Config:
    cfg = write(tmp_path / "config.toml", toml)
    settings, accounts = build(flags or {}, SECRET_FLAGS, env or {}, cfg)
    return Config.from_settings(settings, accounts=accounts)


def test_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    toml = 'cache_size = 100\nretries = 7\ntimeout = 5\nblock_size = "2M"\n'
    cfg = settings_of(tmp_path, toml)
    assert (cfg.cache_size, cfg.retries, cfg.timeout, cfg.block_size) == (
        100 * MiB, 7, 5.0, 2 * MiB)
    assert cfg.connections == 4  # default
    cfg = settings_of(tmp_path, toml, env={"ZOHOFS_RETRIES": "3", "ZOHOFS_TIMEOUT": "9"})
    assert (cfg.retries, cfg.timeout) == (3, 9.0)
    cfg = settings_of(tmp_path, toml, flags={"retries": 2, "timeout": None},
                      env={"ZOHOFS_RETRIES": "3"})
    assert (cfg.retries, cfg.timeout) == (2, 5.0)


@pytest.mark.parametrize(("toml", "message"), [
    ("cache_sise = 100\n", "unknown key 'cache_sise'"),
    ("retries = 'many'\n", "bad value for 'retries'"),
    ("dc = 'mars'\n", "bad value for 'dc'"),
    ("page_cache = 3\n", "bad value for 'page_cache'"),
    ("[[account]]\nclient_id = 'a'\nfavourite = 1\n", "unknown key 'favourite'"),
    ("[[account]]\nclient_id = 'a'\n", "client_secret, refresh_token missing"),
    ("retries = \n", "config.toml"),
    ("block_size = '100M'\n", "'block_size': must be between 1 MiB and 64 MiB, not 100 MiB"),
    ("connections = 0\n", "'connections': must be at least 1, not 0"),
    ("timeout = 0\n", "'timeout': must be more than 0, not 0"),
    ("read_timeout = -5\n", "'read_timeout': must be more than 0, not -5"),
    ("readahead = -1\n", "'readahead': must be at least 0, not -1"),
    ("cache_size = 1\n", "'cache_size': must be at least 2 MiB, not 1 MiB"),
])
def test_bad_files_name_the_key_and_the_file(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_of(tmp_path, toml)
    assert message in str(info.value)
    assert "config.toml" in str(info.value)


def test_settings_that_disagree_name_both_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cache_size \(10 MiB\) must hold at least two "
                       r"blocks of block_size \(8 MiB\)"):
        settings_of(tmp_path, "cache_size = 10\nblock_size = '8M'\n")


def test_several_accounts(tmp_path: Path) -> None:
    cfg = settings_of(tmp_path, """
dc = "eu"
[[account]]
name = "main"
client_id = "id1"
client_secret = "s1"
refresh_token = "r1"
[[account]]
name = "sister"
dc = "in"
client_id = "id2"
client_secret = "s2"
refresh_token = "r2"
""")
    assert [(a.name, a.dc, a.accounts_url) for a in cfg.accounts] == [
        ("main", "eu", "https://accounts.zoho.eu"), ("sister", "in", "https://accounts.zoho.in")]
    assert cfg.accounts[1].credentials.refresh_token == "r2"
    assert "r2" not in repr(cfg) and "s1" not in repr(cfg)


def test_secret_sources_in_precedence_order(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "config.toml",
                     'client_id = "file-id"\nclient_secret = "file-secret"\n'
                     'refresh_token = "file-refresh"\n')
    creds_dir = tmp_path / "creds"
    creds_dir.mkdir()
    write(creds_dir / "zoho-client-secret", "systemd-secret\n")
    env = {"ZOHO_CLIENT_SECRET": "env-secret", "ZOHO_REFRESH_TOKEN": "env-refresh",
           "CREDENTIALS_DIRECTORY": str(creds_dir)}
    flag_file = write(tmp_path / "refresh", "flag-refresh\n")
    _, accounts = build({}, {**SECRET_FLAGS, "refresh_token": flag_file}, env, cfg_path)
    creds = accounts[0].credentials
    assert (creds.client_id, creds.client_secret, creds.refresh_token) == (
        "file-id", "systemd-secret", "flag-refresh")


def test_readable_secrets_warn_or_are_refused(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    cfg_path = write(tmp_path / "config.toml", 'client_id = "i"\nclient_secret = "s"\n'
                     'refresh_token = "r"\n', mode=0o644)
    with caplog.at_level(logging.WARNING):
        build({}, SECRET_FLAGS, {}, cfg_path)
    assert "readable by group or others" in caplog.text
    with pytest.raises(ConfigError, match="--strict"):
        build({}, SECRET_FLAGS, {}, cfg_path, strict=True)
    token = write(tmp_path / "token", "r", mode=0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        build({}, {**SECRET_FLAGS, "refresh_token": token},
              {"ZOHO_CLIENT_ID": "i", "ZOHO_CLIENT_SECRET": "s"}, None, strict=True)


def test_default_config_location(tmp_path: Path) -> None:
    (tmp_path / "zohofs").mkdir()
    write(tmp_path / "zohofs" / "config.toml", "retries = 9\n")
    settings, _ = build({}, SECRET_FLAGS, {"XDG_CONFIG_HOME": str(tmp_path)}, None)
    assert settings["retries"] == 9


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_bytes("\ufeffretries = 7\n".encode())
    settings, _ = build({}, SECRET_FLAGS, {}, str(tmp_path / "config.toml"))
    assert settings["retries"] == 7
