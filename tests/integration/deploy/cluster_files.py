"""The files a Strata container reads, made real in a temporary directory, so that a command
line from deploy/ can be given to the component's own config (which checks them: the TLS
certificate against its CA and role, the 0600 key files, the model directory).

Paths are moved under the temporary root (``FakeRoot.path``); the credentials of a Kubernetes pod
are made by running its init container's script, deploy/k8s/base/pod-credentials.sh, for real;
its Secrets are files of this user, 0600 (a Kubernetes Secret mount, root:fsGroup 0440, is what
strata_common.credentials.owner_only also accepts; tests/unit/common/test_credentials.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from strata.certs import init_ca
from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "deploy" / "k8s" / "base" / "pod-credentials.sh"

#: Contents of the operator's credential files, by the name they are mounted under.
CONTENTS = {
    "cluster.key": "ab" * 32 + "\n",
    "cluster_key": "ab" * 32 + "\n",
    "api-keys": "sk-test-0123456789abcdef tenant-a\n",
    "api_keys": "sk-test-0123456789abcdef tenant-a\n",
    "admin-token": "admin-token-for-tests\n",
    "admin_token": "admin-token-for-tests\n",
    "redis-password": "s3cret-for-tests",
    "redis_password": "s3cret-for-tests",
}


class FakeRoot:
    """A directory standing for a container's filesystem root, below ``mounts``."""

    def __init__(self, root: Path, mounts: Iterable[str]) -> None:
        self.root = root
        self.mounts = sorted(set(mounts), key=len, reverse=True)
        self._pattern = re.compile(
            r"(?<![\w./-])(" + "|".join(re.escape(m) for m in self.mounts) + r")(?=/|$|\b)"
        )
        for mount in self.mounts:
            self.path(mount).mkdir(parents=True, exist_ok=True)

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def move(self, text: str) -> str:
        """``text`` with every path below a mount moved under the root."""
        if not self.mounts:
            return text
        return self._pattern.sub(lambda m: str(self.root) + m.group(1), text)

    def model(self, container_path: str) -> None:
        """A model directory (the configs check for config.json)."""
        directory = self.path(container_path)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text("{}\n")


def secret_file(path: Path, name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CONTENTS[name])
    path.chmod(0o600)


def strata_on_path(bin_dir: Path) -> dict[str, str]:
    """An environment whose `strata` is this checkout's (as the image's entrypoint is)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "strata"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m strata.cli "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def make_ca(directory: Path) -> Path:
    """A cluster CA (`strata certs init`), as the operator makes it for the Secret strata-ca."""
    if not (directory / "ca.pem").exists():
        init_ca(directory)
    return directory


def run_pod_credentials(
    root: FakeRoot, args: list[str], ca_dir: Path, work: Path
) -> subprocess.CompletedProcess[str]:
    """pod-credentials.sh ARGS with the pod's mounts under ``root`` and the CA in ``ca_dir``."""
    env = strata_on_path(work / "bin")
    env.update(
        STRATA_CA_DIR=str(ca_dir),
        STRATA_CREDENTIALS_DIR=str(root.path("/run/strata/credentials")),
        STRATA_CA_WORK_DIR=str(root.path("/run/strata-ca")),
    )
    return subprocess.run(
        ["/bin/sh", str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
