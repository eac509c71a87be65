"""kvstore is a library: it imports neither controlplane, dataplane nor strata (see its README)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kvstore

FORBIDDEN = ("controlplane", "dataplane", "strata")
PACKAGE_DIR = Path(kvstore.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_upward_imports() -> None:
    offenders = {
        f"{path.name}: {name}"
        for path in PACKAGE_DIR.rglob("*.py")
        for name in _imported_modules(path)
        if name.split(".")[0] in FORBIDDEN
    }
    assert offenders == set()


def test_importing_the_package_and_hashing_is_light() -> None:
    """The gateway imports kvstore.blocks.hashing: it must not drag in the server, uvloop, grpc."""
    heavy = ("uvloop", "kvstore.server", "torch", "vllm", "grpc")
    code = (
        "import sys, kvstore, kvstore.blocks.hashing, kvstore.client.sync; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_worker_importing_the_client_and_membership_loads_no_node_state() -> None:
    """A vLLM worker imports the client and NodeAgent's module; neither may load lmdb or the
    node's state (membership types its tiers with a Protocol, not TierManager)."""
    heavy = ("lmdb", "uvloop", "kvstore.node", "kvstore.node.ssd", "kvstore.node.tiers")
    code = (
        "import sys, kvstore.client.sync, kvstore.client.aio, kvstore.cluster.membership; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
