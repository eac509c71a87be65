"""Shared fixtures and the marker taxonomy.

Markers are declared once, in pyproject.toml ([tool.pytest.ini_options] markers, --strict-markers).
Each test gets its tier marker from the directory it lives in, so a test can never be left unmarked:
tests/unit -> unit, tests/integration -> integration, tests/e2e -> e2e, tests/chaos -> chaos. `slow`
and `gpu` are set by hand.

Chaos tests (tests/chaos/README.md) run in two sizes: shortened (the default, inside `make test`)
and full (`--chaos-full` or STRATA_CHAOS_FULL=1, what `make chaos` runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
_TIER_BY_DIR = {
    "unit": pytest.mark.unit,
    "integration": pytest.mark.integration,
    "e2e": pytest.mark.e2e,
    "chaos": pytest.mark.chaos,
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-full",
        action="store_true",
        default=os.environ.get("STRATA_CHAOS_FULL", "") == "1",
        help="run the chaos suite at full length (make chaos); default: the shortened form",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(REPO_ROOT / "tests")
        marker = _TIER_BY_DIR.get(rel.parts[0])
        if marker is not None:
            item.add_marker(marker)
        if item.get_closest_marker("gpu") is not None:
            try:
                import torch

                has_cuda = torch.cuda.is_available()
            except Exception:
                has_cuda = False
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def model_cache_dir() -> Path:
    """Prepared models are cached across runs (building them is the slow part of a fresh run)."""
    return Path(os.environ.get("STRATA_CACHE_DIR", REPO_ROOT / ".cache")) / "models"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny seeded Llama (gibberish, deterministic) for fast token-equality tests."""
    from strata.models import build_tiny_model

    return build_tiny_model(model_cache_dir() / "tiny-llama-seed0", seed=0)
