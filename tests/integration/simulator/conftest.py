from __future__ import annotations

from pathlib import Path

import pytest

from strata_common.credentials import load_or_create_cluster_key


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    load_or_create_cluster_key(path)
    return path
