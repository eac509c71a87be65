"""What must not leak: passwords in URLs (logs, command lines) and secrets in the environment of
the processes Strata starts (docs/design/security.md §9).

- :func:`redact_url`: a URL as it may be logged or shown (``redis://user:***@host:6379/0``).
- :func:`has_password`: whether a text is a URL that carries a password (the configuration
  machinery refuses such a value on a command line, which every local user can read in
  ``/proc/PID/cmdline``; the environment or a file is the place).
- :func:`scrubbed_environment`: the environment a child process gets: what any process needs
  (locale, paths, the Python, vLLM and math-library knobs) plus the child's own configuration
  variables, never a token, password or secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "CHILD_ENV_NAMES",
    "CHILD_ENV_PREFIXES",
    "has_password",
    "redact_url",
    "scrubbed_environment",
]

REDACTED: Final = "***"

CHILD_ENV_NAMES: Final = frozenset(
    {
        "HOME",
        "LANG",
        "LANGUAGE",
        "LOGNAME",
        "PATH",
        "PWD",
        "SHELL",
        "STRATA_CACHE_DIR",
        "TERM",
        "TMPDIR",
        "TZ",
        "USER",
        "VIRTUAL_ENV",
    }
)
"""Variables every child keeps."""
CHILD_ENV_PREFIXES: Final = (
    "LC_",
    "PYTHON",
    "VLLM_",
    "OMP_",
    "KMP_",
    "MKL_",
    "OPENBLAS_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "TORCH",
    "TOKENIZERS_",
    "TRANSFORMERS_",
    "HF_",
    "LD_",
    "XDG_",
    "SSL_CERT_",
    "REQUESTS_CA_BUNDLE",
)
"""Prefixes of the variables every child keeps (runtime knobs, not Strata configuration)."""
_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|API_KEY|PRIVATE", re.I)
"""A variable whose name says it holds a secret is dropped even under a kept prefix (HF_TOKEN)
unless the child's own configuration names it (``keep``)."""


def has_password(text: str) -> bool:
    """True for a URL with a password (``scheme://user:pw@host``, ``scheme://:pw@host``)."""
    try:
        return "://" in text and urlsplit(text).password is not None
    except ValueError:
        return False


def redact_url(text: str) -> str:
    """``text`` with a URL's password replaced by ``***`` (anything else unchanged)."""
    try:
        parts = urlsplit(text)
        if "://" not in text or parts.password is None:
            return text
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{user}:{REDACTED}@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return REDACTED  # not a URL we can read: show nothing of it
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def scrubbed_environment(
    environ: Mapping[str, str],
    *,
    prefixes: Iterable[str] = (),
    keep: Iterable[str] = (),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for a child: the variables every child keeps, those starting with one of
    the child's own ``prefixes`` (e.g. ``STRATA_WORKER_``: its configuration) or named in
    ``keep``, then ``extra``. Secrets (by name) are dropped unless named in ``keep``."""
    own = tuple(prefixes)
    kept = set(keep)
    env: dict[str, str] = {}
    for name, value in environ.items():
        if name in kept:
            env[name] = value
            continue
        runtime = name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES)
        if (runtime and not _SECRET_NAME.search(name)) or (own and name.startswith(own)):
            env[name] = value
    env.update(extra or {})
    return env
