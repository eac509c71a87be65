"""Every `strata` command line in deploy/ (the rendered Kubernetes overlays and the compose
file) is one the component accepts: its flags exist, their values parse, and the component's
own config validation passes on the files the container would have — the TLS certificate a pod's
init container issues (deploy/k8s/base/pod-credentials.sh, run here for real), the 0600 key
files, the model directory — including the non-loopback rule (docs/design/security.md §7).

The manifests use flags that the two other parts of issue 12 add in their own branches: the
worker's announcement in the shared registry (`--advertise-address`; `--announce` is given by
its environment variable, as it carries the Redis password) and the gateway's Kubernetes
launcher (`--k8s-*`). Until those branches are merged into this tree, the parser here does not
declare them; PENDING_FLAGS names them, and only a flag named there, and only while the parser
lacks it, is set aside before parsing. Once merged, they are parsed and validated like every other
flag, and test_pending_flags_are_the_agreed_ones keeps the list from growing.

The same branches let a gateway start without static workers (`--prefill`/`--decode`): its
workers announce themselves in the shared registry. Until the announcement branch is merged
(the worker's parser declares `--announce`), the gateway's config still requires one of each, so
the gateway's command line is checked with a stand-in of each added (STAND_IN_WORKERS); once
merged, it is checked as written.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import ENV_PREFIX as GATEWAY_ENV
from controlplane.config import GatewayConfig
from dataplane.config import ENV_PREFIX as WORKER_ENV
from dataplane.config import WorkerConfig
from kvstore.server.config import ENV_PREFIX as STORE_ENV
from kvstore.server.config import StoreNodeConfig
from strata_common.options import add_options, from_namespace
from tests.integration.deploy.cluster_files import (
    FakeRoot,
    make_ca,
    run_pod_credentials,
    secret_file,
)
from tests.integration.deploy.manifests import (
    OVERLAYS,
    Container,
    container_env,
    containers,
    expand,
    load_compose,
    strata_argv,
)

COMPONENTS: dict[str, tuple[type[Any], str]] = {
    "gateway": (GatewayConfig, GATEWAY_ENV),
    "worker": (WorkerConfig, WORKER_ENV),
    "store": (StoreNodeConfig, STORE_ENV),
}

#: The flag names the three parts of issue 12 agreed on, added by the other two branches.
PENDING_FLAGS = {
    "worker": {"--announce", "--announce-interval", "--announce-ttl", "--advertise-address"},
    "gateway": {
        "--k8s-namespace",
        "--k8s-prefill-deployment",
        "--k8s-decode-deployment",
        "--k8s-dry-run",
        "--k8s-kubeconfig",
    },
    "store": set(),
}


#: Static workers added to a gateway's command line while this tree's gateway still needs them.
STAND_IN_WORKERS = ["--prefill=10.0.0.1:50051", "--decode=10.0.0.2:50051"]


def _declares(command: str, flag: str) -> bool:
    cls, prefix = COMPONENTS[command]
    parser = argparse.ArgumentParser()
    add_options(parser, cls, env_prefix=prefix, environ={})
    return flag in parser._option_string_actions


def announcements_merged() -> bool:
    return _declares("worker", "--announce")


@dataclass
class Parsed:
    config: Any
    set_aside: list[str]


def _split(argv: list[str]) -> list[tuple[str, str | None]]:
    """(flag, value) pairs of ``--flag=value`` or ``--flag value`` arguments."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        assert arg.startswith("--"), f"positional argument {arg!r}"
        if "=" in arg:
            flag, value = arg.split("=", 1)
            pairs.append((flag, value))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((arg, argv[i + 1]))
            i += 2
        else:
            pairs.append((arg, None))
            i += 1
    return pairs


def parse(command: str, argv: list[str], env: dict[str, str]) -> Parsed:
    """``strata COMMAND ARGV`` with the environment ``env`` only, through the component's own
    parser and config; a usage error fails the test with argparse's message."""
    cls, prefix = COMPONENTS[command]
    if command == "gateway" and not announcements_merged():
        argv = [*argv, *STAND_IN_WORKERS]
    parser = argparse.ArgumentParser(prog=f"strata {command}", exit_on_error=False)
    add_options(parser, cls, env_prefix=prefix, environ=env)
    declared = set(parser._option_string_actions)
    kept: list[str] = []
    set_aside: list[str] = []
    for flag, value in _split(argv):
        if flag not in declared and flag in PENDING_FLAGS[command]:
            set_aside.append(flag)
            continue
        kept += [flag] if value is None else [f"{flag}={value}"]
    try:
        namespace, unknown = parser.parse_known_args(kept)
    except (argparse.ArgumentError, SystemExit) as exc:
        pytest.fail(f"strata {command} {shlex.join(argv)}: {exc}")
    if unknown:
        pytest.fail(f"strata {command}: unknown arguments {unknown}")
    try:
        config = from_namespace(cls, namespace)
    except ValueError as exc:
        pytest.fail(f"strata {command} {shlex.join(argv)}: {exc}")
    return Parsed(config, set_aside)


# -- Kubernetes ----------------------------------------------------------------------------------


#: The file each Secret of a pod's projected volume `secrets` holds (deploy/k8s/secrets).
SECRET_FILES = {
    "strata-cluster-key": "cluster.key",
    "strata-api-keys": "api-keys",
    "strata-admin-token": "admin-token",
}


def _write_secrets(root: FakeRoot, pod: dict[str, Any]) -> None:
    """The pod's projected Secrets, in /etc/strata/secrets."""
    (volume,) = [v for v in pod["volumes"] if v["name"] == "secrets"]
    for source in volume["projected"]["sources"]:
        name = SECRET_FILES[source["secret"]["name"]]
        secret_file(root.path(f"/etc/strata/secrets/{name}"), name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_strata_command_line_in_the_overlays_parses(
    overlay: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objects = rendered[overlay]
    ca_dir = make_ca(tmp_path / "operator-ca")
    seen: dict[str, int] = {}
    for number, c in enumerate(containers(objects)):
        argv = strata_argv(c, objects)
        if c.init or argv is None:
            continue
        command, args = argv[0], argv[1:]
        root_dir = tmp_path / f"pod{number}"
        mounts = [m["mountPath"] for m in c.spec.get("volumeMounts", [])]
        root = FakeRoot(root_dir, [*mounts, "/run/strata-ca"])
        _write_secrets(root, c.pod)
        # The pod's init container `credentials`, for real: its certificate and key files.
        (init,) = [i for i in c.pod.get("initContainers", []) if i["name"] == "credentials"]
        init_env = container_env(Container(c.workload, init["name"], init, c.pod, True), objects)
        script_args = [expand(a, init_env) for a in init["command"][2:]]
        done = run_pod_credentials(root, script_args, ca_dir, root_dir)
        assert done.returncode == 0, done.stderr
        env = {k: root.move(v) for k, v in container_env(c, objects).items()}
        args = [root.move(a) for a in args]
        model = env.get("STRATA_MODEL_DIR")
        if model is not None:  # moved under the root with the /models mount
            Path(model).mkdir(parents=True, exist_ok=True)
            (Path(model) / "config.json").write_text("{}\n")
        parsed = parse(command, args, env)
        assert set(parsed.set_aside) <= PENDING_FLAGS[command]
        seen[command] = seen.get(command, 0) + 1
        _check_k8s(command, parsed.config, c.pod)
    assert seen == {"gateway": 1, "worker": 2, "store": 1}


def _check_k8s(command: str, config: Any, pod: dict[str, Any]) -> None:
    """What a parsed command line must say on Kubernetes."""
    if command == "worker":
        assert config.tls.enabled and config.host == "0.0.0.0"
        assert config.store_endpoint == "192.0.2.10:7600"  # status.hostIP and the store's host port
    elif command == "store":
        assert config.tls.enabled and config.host == "0.0.0.0" and config.port == 7600
        assert config.advertise_address == "192.0.2.10"  # status.hostIP, the host port's
        assert str(config.arena_dir).endswith("/run/strata/arena")  # the host's /dev/shm
    else:
        assert config.has_api_keys and config.tls.enabled
        assert config.http.host == "0.0.0.0"
        assert config.admin.host == "127.0.0.1"  # reached by `kubectl port-forward` only


# -- compose -------------------------------------------------------------------------------------

_EXPORTS = re.compile(r"export\s+((?:STRATA_[A-Z_]+=\"\$\$r\"\s*)+);")


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    entrypoint = service.get("entrypoint")
    if entrypoint and entrypoint[0] == "/bin/sh":
        script = entrypoint[2]
        assert script.rstrip().endswith('exec strata "$$@"'), script
        (exports,) = _EXPORTS.findall(script)
        for name in re.findall(r"(STRATA_[A-Z_]+)=", exports):
            env[name] = "redis://:s3cret-for-tests@127.0.0.1:6379/0"
    return env


def _compose_default(text: str) -> str:
    """``${VAR:-default}`` → default (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def test_every_strata_command_line_in_compose_parses(tmp_path: Path) -> None:
    compose = load_compose()
    seen = []
    for name, service in compose["services"].items():
        command = service.get("command")
        if not command or command[0] not in COMPONENTS:
            continue
        mounts = ["/run/secrets", "/tmp"]
        mounts += [v.split(":")[1] for v in service.get("volumes", [])]
        root = FakeRoot(tmp_path / name, mounts)
        for secret in service.get("secrets", []):
            secret_file(root.path(f"/run/secrets/{secret}"), secret)
        root.model("/var/cache/strata/models/SmolLM2-135M-Instruct")
        env = {k: _compose_default(v) for k, v in _compose_env(service).items()}
        parsed = parse(command[0], [root.move(a) for a in command[1:]], env)
        assert set(parsed.set_aside) <= PENDING_FLAGS[command[0]]
        seen.append(command[0])
    assert sorted(seen) == ["gateway", "store", "worker", "worker"]


def test_pending_flags_are_the_agreed_ones() -> None:
    """The set-aside list is the shared-facts list of issue 12 and nothing else; a pending flag
    the parser already declares is parsed strictly (parse() sets aside only undeclared ones)."""
    assert PENDING_FLAGS["worker"] == {
        "--announce",
        "--announce-interval",
        "--announce-ttl",
        "--advertise-address",
    }
    assert all(flag.startswith("--k8s-") for flag in PENDING_FLAGS["gateway"])
    assert len(PENDING_FLAGS["gateway"]) == 5


def test_an_unknown_flag_fails_the_parse(tmp_path: Path) -> None:
    """The check above can fail: a flag no parser declares is an error, not set aside."""
    with pytest.raises(pytest.fail.Exception, match="unknown arguments"):
        parse("store", ["--no-such-flag=1"], {})
    with pytest.raises(pytest.fail.Exception, match="refusing to listen"):
        parse("store", ["--host=0.0.0.0"], {})
