"""`strata serve`'s admin token file and the order in which `strata admin` looks for a token."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from strata.admin_cli import resolve_token
from strata.admin_token import (
    TokenFileError,
    default_token_path,
    load_or_create_token,
    read_token_file,
)

TOKEN = "file-token-0123456789abcdef"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_a_random_owner_only_token_then_reuses_it(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "admin-token"
    token, created = load_or_create_token(path)
    assert created
    assert len(token) == 64 and int(token, 16) >= 0
    assert path.read_text() == token + "\n"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert load_or_create_token(path) == (token, False)
    assert [p.name for p in path.parent.iterdir()] == ["admin-token"]  # no temporary left


def test_a_file_others_can_read_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN)
    os.chmod(path, 0o644)
    token, created = load_or_create_token(path)
    assert created and token != TOKEN
    assert _mode(path) == 0o600


@pytest.mark.parametrize("content", ["", "short", "has space in it 0123456789"])
def test_a_file_without_a_valid_token_is_replaced(tmp_path: Path, content: str) -> None:
    path = tmp_path / "admin-token"
    path.write_text(content)
    os.chmod(path, 0o600)
    token, created = load_or_create_token(path)
    assert created and len(token) == 64


def test_read_token_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        read_token_file(tmp_path / "missing")
    (tmp_path / "bad").write_text("x")
    with pytest.raises(TokenFileError, match="holds no valid admin token"):
        read_token_file(tmp_path / "bad")


def test_default_path_follows_strata_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path))
    assert default_token_path() == tmp_path / "admin-token"
    assert default_token_path(tmp_path / "x") == tmp_path / "x" / "admin-token"


def test_token_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path))
    explicit = tmp_path / "explicit"
    explicit.write_text("explicit-token-0123456789abcdef\n")
    env = {"STRATA_ADMIN_TOKEN": "env-token-0123456789abcdef"}
    assert resolve_token("flag", str(explicit), env) == "flag"
    assert resolve_token(None, str(explicit), env) == "explicit-token-0123456789abcdef"
    assert resolve_token(None, None, env) == "env-token-0123456789abcdef"
    assert resolve_token(None, None, {}) == ""  # no default file yet
    (tmp_path / "admin-token").write_text(TOKEN)
    assert resolve_token(None, None, {}) == TOKEN
    assert resolve_token(None, None, {"STRATA_ADMIN_TOKEN": ""}) == TOKEN


def test_bad_token_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path))
    with pytest.raises(TokenFileError):
        resolve_token(None, str(tmp_path / "missing"), {})
    (tmp_path / "admin-token").write_text("bad")
    assert resolve_token(None, None, {}) == ""  # the default file is skipped, with a warning
    assert "ignoring" in capsys.readouterr().err
