"""The frame header has one owner: only kvstore/wire/frame.py packs or parses it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SKIPPED = {"tests", "strata_proto", ".venv", ".git"}
HEADER_FORMAT = re.compile(r"""["']<?4sBBBBIIQ["']""")
HEADER_STRUCT = re.compile(r"FRAME_HEADER\s*=\s*struct\.Struct\(|FRAME_HEADER\.(un)?pack")


def test_one_module_owns_the_frame_header() -> None:
    owners = set()
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in SKIPPED:
            continue
        text = path.read_text()
        if HEADER_FORMAT.search(text) or HEADER_STRUCT.search(text):
            owners.add(relative.as_posix())
    assert owners == {"kvstore/wire/frame.py"}
