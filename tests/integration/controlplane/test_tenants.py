"""Tenants at the gateway (docs/design/security.md §6.1), with the real HTTP server and scripted
workers: with API keys configured, the /v1 routes answer a missing or wrong key with 401 in
OpenAI's error JSON before any work, and each tenant's requests reach the workers under the
tenant's own namespace (the cache salt every KV key is derived from), subdivided by the client's
cache_salt; /health and /metrics stay open to probes."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from controlplane.config import ConfigError, GatewayConfig, HttpConfig
from controlplane.text.tokenizer import ModelTokenizer
from strata_common.credentials import derive_key, write_secret_file
from tests.integration.controlplane.conftest import (
    SERVED_MODEL_NAME,
    LoopThread,
    Stack,
    start_stack,
    stop_stack,
)

KEY_A = "sk-tenant-a-0123456789"
KEY_B = "sk-tenant-b-0123456789"
CLUSTER_KEY = bytes(range(32))


@pytest.fixture(scope="module")
def keyed(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer, tmp_path_factory
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("keys")
    keys = directory / "api-keys"
    keys.write_text(f"{KEY_A} team-a\n{KEY_B} team-b\n")
    keys.chmod(0o600)
    write_secret_file(directory / "cluster.key", CLUSTER_KEY.hex() + "\n")
    stack = start_stack(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        http={"api_keys_file": keys},
        cluster={"key_file": directory / "cluster.key"},
    )
    yield stack
    stop_stack(stack)


def _namespace(tenant: str) -> str:
    key = derive_key(CLUSTER_KEY, "tenants")
    return hmac.new(key, tenant.encode(), hashlib.sha256).hexdigest()[:32]


def _post(url: str, key: str | None) -> tuple[int, dict[str, object]]:
    body = json.dumps({"model": SERVED_MODEL_NAME, "prompt": "Hi", "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (None, "You didn't provide an API key"),
        ("sk-not-a-known-key-000", "Incorrect API key provided."),
    ],
)
def test_a_missing_or_wrong_key_is_401_before_any_work(
    keyed: Stack, key: str | None, message: str
) -> None:
    before = len(keyed.prefill.prefill_requests) + len(keyed.decode.prefill_requests)
    status, body = _post(keyed.url, key)
    assert status == 401
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert str(error["message"]).startswith(message)
    assert len(keyed.prefill.prefill_requests) + len(keyed.decode.prefill_requests) == before
    with urllib.request.urlopen(f"{keyed.url}/health", timeout=10) as response:
        assert response.status == 200  # probes need no key
    client = openai.OpenAI(
        base_url=f"{keyed.url}/v1", api_key="sk-wrong-wrong-wrong", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_tokenize_and_detokenize_need_a_key_version_does_not(keyed: Stack) -> None:
    """They run the tokenizer (CPU a stranger could spend): keyed like /v1, unlike vLLM's."""
    for path, body in (("/tokenize", {"prompt": "Hi"}), ("/detokenize", {"tokens": [1, 2]})):
        for key in (None, "sk-not-a-known-key-000"):
            headers = {"Content-Type": "application/json"}
            if key is not None:
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(
                keyed.url + path, data=json.dumps(body).encode(), headers=headers
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401, path
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY_A}"}
        request = urllib.request.Request(
            keyed.url + path, data=json.dumps(body).encode(), headers=headers
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, path
    with urllib.request.urlopen(f"{keyed.url}/version", timeout=10) as response:
        assert response.status == 200


def test_each_tenant_gets_its_own_namespace(keyed: Stack) -> None:
    def salts() -> list[str]:
        requests = [
            *keyed.prefill.prefill_requests,
            *keyed.decode.prefill_requests,
            *keyed.decode.decode_requests,
        ]
        return sorted({r.cache_salt for r in requests})

    for worker in (keyed.prefill, keyed.decode):
        worker.prefill_requests.clear()
        worker.decode_requests.clear()
    for key in (KEY_A, KEY_B):
        client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=key, max_retries=0)
        assert client.completions.create(model=SERVED_MODEL_NAME, prompt="Hi", max_tokens=2)
        client.completions.create(
            model=SERVED_MODEL_NAME, prompt="Hi", max_tokens=2, extra_body={"cache_salt": "mine"}
        )
        assert client.models.list().data[0].id == SERVED_MODEL_NAME
    a, b = _namespace("team-a"), _namespace("team-b")
    assert salts() == sorted({a, f"{a}/mine", b, f"{b}/mine"})


@pytest.mark.parametrize(
    "http",
    [
        {"api_keys": (KEY_A,)},
        {"api_keys_redis": "redis://127.0.0.1:6379/0"},
    ],
)
def test_api_keys_need_the_cluster_key(tiny_model_dir: Path, http: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="API keys need the cluster key"):
        GatewayConfig(
            model_dir=tiny_model_dir,
            prefill_endpoints=("127.0.0.1:1",),
            decode_endpoints=("127.0.0.1:2",),
            http=HttpConfig(**http),  # type: ignore[arg-type]
        )


@pytest.mark.parametrize(
    ("http", "message"),
    [
        ({"api_keys_redis": "http://x:1"}, "must be a redis://, rediss:// or unix:// URL"),
        ({"api_keys_refresh_s": 0.0}, "api_keys_refresh_s must be > 0"),
    ],
)
def test_api_keys_in_redis_settings_are_checked(http: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        HttpConfig(**http)  # type: ignore[arg-type]


def test_without_keys_the_clients_salt_is_kept_apart_from_every_tenant(stack: Stack) -> None:
    # Marked "~": a keyless gateway's client cannot name a tenant's namespace (32 hex digits)
    # where gateways with and without keys share workers.
    namespace = _namespace("team-a")
    for salt in ("mine", namespace):
        stack.client().completions.create(
            model=SERVED_MODEL_NAME, prompt="Hi", max_tokens=2, extra_body={"cache_salt": salt}
        )
    requests = [*stack.prefill.prefill_requests, *stack.decode.prefill_requests]
    assert requests and {r.cache_salt for r in requests} == {"~mine", f"~{namespace}"}
