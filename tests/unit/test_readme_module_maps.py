"""Each package's README maps its modules: every module is named there, and every path named
there exists (a README that drifts from the tree fails here, not in a newcomer's head)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("strata_common", "kvstore", "controlplane", "dataplane", "strata")
_TICKED = re.compile(r"`([^`\s]+)`")
_BRACES = re.compile(r"\{([^{}]*)\}")


def _expand(token: str) -> list[str]:
    """``a/{b,c}.py`` → ``a/b.py``, ``a/c.py``."""
    match = _BRACES.search(token)
    if match is None:
        return [token]
    head, tail = token[: match.start()], token[match.end() :]
    return [path for part in match.group(1).split(",") for path in _expand(head + part + tail)]


def _named_paths(package: str) -> set[str]:
    text = (REPO / package / "README.md").read_text(encoding="utf-8")
    names: set[str] = set()
    for token in _TICKED.findall(text):
        for path in _expand(token.removeprefix(f"{package}/")):
            if path.endswith((".py", "/")) and not path.startswith(("/", ".", "-")):
                names.add(path)
    return names


def _modules(package: str) -> list[str]:
    root = REPO / package
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py") and "__pycache__" not in path.parts
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_is_in_the_readme(package: str) -> None:
    named = _named_paths(package)
    missing = [
        module
        for module in _modules(package)
        if module not in named and not any(module.startswith(d) for d in named if d.endswith("/"))
    ]
    assert missing == [], f"{package}/README.md does not name {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_path_in_the_readme_exists(package: str) -> None:
    root = REPO / package
    gone = sorted(
        path
        for path in _named_paths(package)
        if not path.rpartition("/")[2].startswith("test_") or path.startswith("tests/")
        if not (root / path).exists() and not (REPO / path).exists()
    )
    assert gone == [], f"{package}/README.md names paths that do not exist: {gone}"
