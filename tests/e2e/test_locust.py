"""The locust suite drives the running server headless and finishes with no failures."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import StrataServer


def test_locust_headless_run_has_no_failures(tiny_server: StrataServer, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(REPO_ROOT / "loadtests" / "locustfile.py"),
            "--headless",
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "12s",
            "--host",
            tiny_server.base_url,
            "--csv",
            str(prefix),
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, rows
