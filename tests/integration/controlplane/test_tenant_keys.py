"""API keys in the Redis hash strata:api-keys (docs/design/security.md §6.1), on a real Valkey:
the store seals each record (digest → tenant) with the cluster key and skips forged ones, the
gateway's live table follows the hash, `strata tenants` changes it, and a gateway started with
--api-keys-redis accepts a key added there and refuses it once removed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from controlplane.tenant_keys import ApiKeyStore, ApiKeyStoreError, LiveApiKeys
from controlplane.tenants import ApiKeys, TenantError, api_key_digest
from controlplane.text.tokenizer import ModelTokenizer
from strata.tenants_cli import main as tenants_main
from strata_common.credentials import write_secret_file
from strata_common.records import RecordSeal
from tests.integration.controlplane.conftest import (
    SERVED_MODEL_NAME,
    LoopThread,
    start_stack,
    stop_stack,
)
from tests.integration.kvstore.valkey_fixture import ValkeyServer, valkey_server, valkey_url

__all__ = ["valkey_server", "valkey_url"]

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
HASH = "strata:api-keys"
KEY_A = "sk-tenant-a-0123456789"
KEY_B = "sk-tenant-b-0123456789"
WRONG = "wrong MAC (another cluster key, altered, or moved from another key or id)"


def _hex(key: str) -> str:
    return api_key_digest(key).hex()


def test_the_store_seals_each_key_and_changes_it(valkey_url: str) -> None:
    async def scenario() -> None:
        store = ApiKeyStore(valkey_url, KEY)
        raw = redis.Redis.from_url(valkey_url)
        try:
            assert await store.load() == {}
            assert await store.add(KEY_A, "team-a")
            assert not await store.add(KEY_A, "team-a")  # already so
            with pytest.raises(TenantError, match="belongs to tenant team-a; remove it first"):
                await store.add(KEY_A, "team-b")
            with pytest.raises(TenantError, match="at least 16 printable characters"):
                await store.add("short", "team-b")
            with pytest.raises(TenantError, match="a tenant name is"):
                await store.add(KEY_B, "team b")
            assert await store.add(KEY_B, "team-b")
            assert raw.hgetall(HASH) == {
                _hex(KEY_A).encode(): RecordSeal(KEY).seal((HASH, _hex(KEY_A)), "team-a"),
                _hex(KEY_B).encode(): RecordSeal(KEY).seal((HASH, _hex(KEY_B)), "team-b"),
            }  # digests only: the keys themselves are nowhere
            assert await store.load() == {
                api_key_digest(KEY_A): "team-a",
                api_key_digest(KEY_B): "team-b",
            }
            assert await store.remove_tenant("team-a") == 1
            assert await store.remove_tenant("team-a") == 0
            assert await store.remove_key(api_key_digest(KEY_B))
            assert not await store.remove_key(api_key_digest(KEY_B))
            assert raw.hgetall(HASH) == {}
        finally:
            raw.close()
            await store.close()

    asyncio.run(scenario())


def test_forged_key_records_are_skipped_and_logged_once(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    forged_key = "sk-forged-0123456789"
    seal = RecordSeal(KEY)

    async def scenario() -> list[dict[bytes, str]]:
        store = ApiKeyStore(valkey_url, KEY)
        raw = redis.Redis.from_url(valkey_url)
        try:
            await store.add(KEY_A, "team-a")
            good = raw.hget(HASH, _hex(KEY_A))
            forged_field = _hex(forged_key)
            raw.hset(HASH, forged_field, b"team-a")  # no MAC
            raw.hset(HASH, _hex("sk-forged-1-0123456789"), good)  # team-a's record, moved
            raw.hset(
                HASH,
                _hex("sk-forged-2-0123456789"),
                RecordSeal(OTHER_KEY).seal((HASH, _hex("sk-forged-2-0123456789")), "team-a"),
            )
            raw.hset(HASH, "not-a-digest", seal.seal((HASH, "not-a-digest"), "team-a"))
            raw.hset(
                HASH,
                _hex("sk-forged-3-0123456789"),
                seal.seal((HASH, _hex("sk-forged-3-0123456789")), "team a"),  # bad tenant
            )
            rounds = [await store.load() for _ in range(3)]
        finally:
            raw.close()
            await store.close()
        return rounds

    with caplog.at_level(logging.WARNING, logger="controlplane.tenant_keys"):
        rounds = asyncio.run(scenario())
    assert rounds == [{api_key_digest(KEY_A): "team-a"}] * 3
    lines = sorted(r.getMessage() for r in caplog.records)
    assert len(lines) == 5, lines  # once each, not once per round
    assert sum(WRONG in line for line in lines) == 2
    assert sum("no MAC" in line for line in lines) == 1
    assert any("not-a-digest" in line and "not a SHA-256" in line for line in lines)
    assert any("a tenant name is" in line for line in lines)


def test_the_live_table_follows_the_hash_and_survives_an_outage(
    valkey_server: ValkeyServer, caplog: pytest.LogCaptureFixture
) -> None:
    static = ApiKeys.load([KEY_B])
    published: list[ApiKeys] = []

    async def scenario() -> None:
        store = ApiKeyStore(valkey_server.url, KEY)
        live = LiveApiKeys(
            static, ApiKeyStore(valkey_server.url, KEY), published.append, interval_s=0.01
        )
        try:
            table = await live.refresh()
            assert table.by_digest == static.by_digest and table.required
            await store.add(KEY_A, "team-a")
            table = await live.refresh()
            assert table.tenant_of(f"Bearer {KEY_A}") == "team-a"
            assert table.tenant_of(f"Bearer {KEY_B}") == static.tenant_of(f"Bearer {KEY_B}")
            await store.remove_tenant("team-a")
            table = await live.refresh()
            with pytest.raises(TenantError, match="Incorrect API key"):
                table.tenant_of(f"Bearer {KEY_A}")
            # the refresh loop: a key added shows up without a call
            await store.add(KEY_A, "team-a")
            runner = asyncio.create_task(live.run())
            while api_key_digest(KEY_A) not in live.table.by_digest:
                await asyncio.sleep(0.01)
            valkey_server.kill()  # Redis gone: the last table stays
            with pytest.raises(ApiKeyStoreError):
                await live.refresh()
            count = len(published)
            while len([r for r in caplog.records if "cannot refresh" in r.getMessage()]) < 1:
                await asyncio.sleep(0.01)
            assert live.table.tenant_of(f"Bearer {KEY_A}") == "team-a"
            assert len(published) == count  # nothing published while failing
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        finally:
            await store.close()
            await live.close()

    with caplog.at_level(logging.INFO, logger="controlplane.tenant_keys"):
        asyncio.run(scenario())
    assert [p.tenant_of(f"Bearer {KEY_B}") for p in published[:3]] == [
        "key-" + _hex(KEY_B)[:12]
    ] * 3


def test_an_empty_hash_still_requires_keys() -> None:
    table = ApiKeys({}).merged({})
    assert table.required
    with pytest.raises(TenantError, match="You didn't provide an API key"):
        table.tenant_of(None)
    with pytest.raises(TenantError, match="Incorrect API key"):
        table.tenant_of(f"Bearer {KEY_A}")


@pytest.fixture
def cluster_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    write_secret_file(path, KEY.hex() + "\n")
    return path


def _cli(url: str, key_file: Path, *args: str, stdin: str = "") -> str:
    out = io.StringIO()
    argv = ["--redis", url, "--cluster-key-file", str(key_file), *args]
    assert tenants_main(argv, stdin=io.StringIO(stdin), out=out) == 0
    return out.getvalue()


def test_the_cli_adds_lists_and_removes_keys(valkey_url: str, cluster_key_file: Path) -> None:
    said = _cli(valkey_url, cluster_key_file, "add", "team-a")
    generated = said.rstrip("\n").rsplit(": ", 1)[1]
    assert generated.startswith("sk-strata-") and len(generated) == len("sk-strata-") + 43
    assert said == f"strata tenants: added key {_hex(generated)[:12]}… for team-a: {generated}\n"
    said = _cli(valkey_url, cluster_key_file, "add", "team-b", "--key-stdin", stdin=KEY_B + "\n")
    assert said == f"strata tenants: added key {_hex(KEY_B)[:12]}… for team-b\n"
    assert KEY_B not in said
    assert _cli(valkey_url, cluster_key_file, "list") == (
        f"{_hex(generated)}  team-a\n{_hex(KEY_B)}  team-b\n"
    )
    said = _cli(valkey_url, cluster_key_file, "remove-key", "--digest", _hex(KEY_B))
    assert said == f"strata tenants: removed key {_hex(KEY_B)[:12]}…\n"
    said = _cli(valkey_url, cluster_key_file, "remove-key", "--key-stdin", stdin=KEY_B)
    assert said == f"strata tenants: no key {_hex(KEY_B)[:12]}…\n"
    assert _cli(valkey_url, cluster_key_file, "remove", "team-a") == (
        "strata tenants: removed 1 key(s) of team-a\n"
    )
    assert _cli(valkey_url, cluster_key_file, "list") == ""


def test_the_cli_refuses_what_cannot_work(
    valkey_url: str, cluster_key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, message in [
        (["--cluster-key-file", str(tmp_path / "none"), "list"], "does not exist"),
        (["--cluster-key-file", str(cluster_key_file), "remove-key", "--digest", "ab"], "64 hex"),
        (["--cluster-key-file", str(cluster_key_file), "add", "bad name"], "a tenant name is"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tenants_main(["--redis", valkey_url, *argv], stdin=io.StringIO(""))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def _status(url: str, key: str) -> int:
    body = json.dumps({"model": SERVED_MODEL_NAME, "prompt": "Hi", "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def redis_keyed_stack(
    loop_thread: LoopThread,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    valkey_url: str,
    cluster_key_file: Path,
) -> Iterator[tuple[str, str]]:
    stack = start_stack(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        http={"api_keys_redis": valkey_url, "api_keys_refresh_s": 0.05},
        cluster={"key_file": cluster_key_file},
    )
    try:
        yield stack.url, valkey_url
    finally:
        stop_stack(stack)


def _eventually(url: str, key: str, status: int, within_s: float = 30.0) -> None:
    """``status`` for ``key`` within ``within_s`` (a bound far above the 0.05 s refresh)."""
    deadline = time.monotonic() + within_s
    while _status(url, key) != status:
        assert time.monotonic() < deadline, f"still not {status}"
        time.sleep(0.02)


def test_a_gateway_follows_the_keys_in_redis(
    redis_keyed_stack: tuple[str, str], cluster_key_file: Path
) -> None:
    url, redis_url = redis_keyed_stack
    assert _status(url, KEY_A) == 401  # an empty hash: keys are still required
    _cli(redis_url, cluster_key_file, "add", "team-a", "--key-stdin", stdin=KEY_A)
    _eventually(url, KEY_A, 200)
    _cli(redis_url, cluster_key_file, "remove", "team-a")
    _eventually(url, KEY_A, 401)
