"""Where `strata serve` keeps its admin token, and how `strata admin` finds it.

`strata serve` needs a token for its admin API (controlplane/admin/service.py refuses to serve
without one). It uses ``$STRATA_ADMIN_TOKEN`` when that is set; otherwise the token in
``CACHE_DIR/admin-token`` (``$STRATA_CACHE_DIR`` or ``~/.cache/strata``), created on first use
with 32 random bytes in hex, mode 0600. The file is reused while only its owner can read it, so
a restarted (or a second) `strata serve` keeps the token operators already have; a file that
others can read, or that holds no valid token, is replaced by a new one. Delete the file to
rotate the token.

`strata admin` looks for a token in this order: ``--token``, ``--token-file PATH``,
``$STRATA_ADMIN_TOKEN``, then ``CACHE_DIR/admin-token`` if it exists.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from controlplane.admin.config import MIN_TOKEN_CHARS
from strata.models import default_cache_dir
from strata_common.credentials import owner_only, write_secret_file

__all__ = [
    "TOKEN_FILE_NAME",
    "TokenFileError",
    "default_token_path",
    "load_or_create_token",
    "read_token_file",
]

TOKEN_FILE_NAME = "admin-token"


class TokenFileError(RuntimeError):
    """A token file cannot be read or holds no valid token; the message names the file."""


def default_token_path(cache_dir: Path | None = None) -> Path:
    return (cache_dir if cache_dir is not None else default_cache_dir()) / TOKEN_FILE_NAME


def _valid(token: str) -> bool:
    return (
        len(token) >= MIN_TOKEN_CHARS
        and token.isprintable()
        and not any(c.isspace() for c in token)
    )


def read_token_file(path: Path) -> str:
    """The token in ``path`` (one line; surrounding whitespace dropped)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the admin token file {path}: {exc}") from None
    if not _valid(token):
        raise TokenFileError(
            f"{path} holds no valid admin token (one line, at least {MIN_TOKEN_CHARS} printable "
            "characters, no whitespace)"
        )
    return token


def load_or_create_token(path: Path) -> tuple[str, bool]:
    """(token, created): the token in ``path`` if the file is a regular file of this user that
    nobody else can read and holds a valid token; else a new random token written there with
    mode 0600 (atomically: a reader sees the old file or the whole new one)."""
    if owner_only(path):
        try:
            return read_token_file(path), False
        except TokenFileError:
            pass
    token = secrets.token_hex(32)
    write_secret_file(path, token + "\n")
    return token, True
