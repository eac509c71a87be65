"""The `strata admin` command lines deploy/README.md tells operators to type parse with the
real `strata admin` parser (a README that drifts from the CLI fails here)."""

from __future__ import annotations

import re
import shlex

import pytest

from strata.admin_cli import build_parser
from tests.integration.deploy.manifests import DEPLOY

README = (DEPLOY / "README.md").read_text(encoding="utf-8")
#: Shell variables the README's commands use, as an operator's shell would have them.
SHELL = {"F": "deploy/k8s/secrets/files", "USER": "alice"}


def _expand(text: str) -> str:
    return re.sub(r"\$(\w+)", lambda m: SHELL.get(m.group(1), m.group(0)), text)


def _code() -> str:
    """The README's shell code blocks."""
    return "\n".join(re.findall(r"^```bash\n(.*?)^```", README, re.MULTILINE | re.DOTALL))


def _admin_lines() -> list[list[str]]:
    """Every `strata admin` invocation in the README's shell blocks: `$A ...` lines (A= the
    prefix it defines) and lines that spell `strata admin` out."""
    code_text = _code()
    (prefix,) = re.findall(r'^A="([^"]+)"', code_text, re.MULTILINE | re.DOTALL)
    prefix_argv = shlex.split(_expand(prefix))
    lines = []
    for line in code_text.splitlines():
        code = line.split("  #")[0].strip()
        if code.startswith("$A "):
            lines.append(prefix_argv + shlex.split(_expand(code[3:])))
        elif "strata admin " in code and not code.startswith("A="):
            lines.append(shlex.split(_expand(code[code.index("strata admin ") :])))
    return lines


def test_the_readme_has_admin_commands() -> None:
    commands = {argv[argv.index("admin") + 1 :][-1] for argv in _admin_lines()}
    assert len(_admin_lines()) >= 5 and "list" in commands


@pytest.mark.parametrize("argv", _admin_lines(), ids=shlex.join)
def test_each_admin_command_parses(argv: list[str]) -> None:
    assert argv[:2] == ["strata", "admin"]
    try:
        args = build_parser().parse_args(argv[2:])
    except SystemExit as exc:
        pytest.fail(f"{shlex.join(argv)}: usage error ({exc.code})")
    assert args.command
