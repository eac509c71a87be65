from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.deploy.manifests import OVERLAYS, copy_tree, render


@pytest.fixture(scope="session")
def k8s_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_tree(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="session")
def rendered(k8s_tree: Path) -> dict[str, list[dict[str, Any]]]:
    """Each overlay's objects, rendered once per session."""
    return {overlay: render(k8s_tree / "overlays" / overlay) for overlay in OVERLAYS}
