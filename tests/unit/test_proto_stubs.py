"""The committed gRPC stubs are exactly what scripts/gen_proto.sh makes from proto/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_committed_stubs_match_a_fresh_build(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        cwd=REPO_ROOT,
    )
    fresh = sorted(p.name for p in (tmp_path / "strata_proto").iterdir())
    committed = sorted(
        p.name for p in (REPO_ROOT / "strata_proto").iterdir() if p.name != "__pycache__"
    )
    assert fresh == committed
    for name in fresh:
        assert (tmp_path / "strata_proto" / name).read_bytes() == (
            REPO_ROOT / "strata_proto" / name
        ).read_bytes(), f"strata_proto/{name} is stale: run `make proto`"


def test_stubs_are_not_a_top_level_proto_package() -> None:
    # proto-plus owns the top-level name `proto`; our stubs live in strata_proto.
    assert not (REPO_ROOT / "proto" / "__init__.py").exists()
