"""`strata tenants`: the API keys kept in Redis (docs/design/security.md §6.1).

    strata tenants --redis URL --cluster-key-file FILE add TENANT [--key-stdin]
    strata tenants ... remove TENANT            every key of TENANT
    strata tenants ... remove-key (--key-stdin | --digest HEX)
    strata tenants ... list                     digest prefix and tenant, one per line

Gateways started with ``--api-keys-redis URL`` (and the same cluster key) accept a key added
here within their ``--api-keys-refresh`` interval, and stop accepting a removed one as fast.
``add`` generates a key (printed once: only its SHA-256 is stored) unless ``--key-stdin`` gives
one. Keys and passwords never go on the command line: the Redis URL's password belongs in
``STRATA_TENANTS_REDIS`` (the environment), a key on standard input.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from controlplane.tenant_keys import ApiKeyStore, ApiKeyStoreError
from controlplane.tenants import TenantError, api_key_digest
from strata_common.credentials import CredentialError, read_cluster_key
from strata_common.options import add_options, from_namespace, option

__all__ = ["ENV_PREFIX", "TenantsConfig", "main"]

ENV_PREFIX = "STRATA_TENANTS_"


@dataclass(frozen=True, slots=True)
class TenantsConfig:
    """Where the keys are and the key that seals them."""

    redis: str = option(
        help="the Redis holding the keys: redis://HOST:PORT/DB, rediss://, unix:// (a password "
        "only in $STRATA_TENANTS_REDIS)",
        metavar="URL",
    )
    cluster_key_file: Path = option(help="the cluster key (0600 file) the records are sealed with")
    namespace: str = option("strata", help="the keys live in the hash NAMESPACE:api-keys")


def new_api_key() -> str:
    """A fresh key: 256 random bits."""
    return "sk-strata-" + secrets.token_urlsafe(32)


def _read_key(stdin: TextIO) -> str:
    key = stdin.readline().strip()
    if not key:
        raise TenantError("no API key on standard input")
    return key


async def _run(args: argparse.Namespace, config: TenantsConfig, stdin: TextIO, out: TextIO) -> None:
    store = ApiKeyStore(
        config.redis, read_cluster_key(config.cluster_key_file), namespace=config.namespace
    )
    try:
        if args.command == "add":
            key = _read_key(stdin) if args.key_stdin else new_api_key()
            added = await store.add(key, args.tenant)
            digest = api_key_digest(key).hex()[:12]
            if not added:
                print(f"strata tenants: key {digest}… already belongs to {args.tenant}", file=out)
            elif args.key_stdin:
                print(f"strata tenants: added key {digest}… for {args.tenant}", file=out)
            else:
                print(f"strata tenants: added key {digest}… for {args.tenant}: {key}", file=out)
        elif args.command == "remove":
            count = await store.remove_tenant(args.tenant)
            print(f"strata tenants: removed {count} key(s) of {args.tenant}", file=out)
        elif args.command == "remove-key":
            if args.digest is not None:
                try:
                    digest = bytes.fromhex(args.digest)
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise TenantError("--digest is a SHA-256: 64 hex digits")
            else:
                digest = api_key_digest(_read_key(stdin))
            removed = await store.remove_key(digest)
            print(
                f"strata tenants: {'removed' if removed else 'no'} key {digest.hex()[:12]}…",
                file=out,
            )
        else:
            table = await store.load()
            for digest, tenant in sorted(table.items(), key=lambda item: (item[1], item[0])):
                print(f"{digest.hex()}  {tenant}", file=out)
    finally:
        await store.close()


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> int:
    parser = argparse.ArgumentParser(
        prog="strata tenants",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, TenantsConfig, env_prefix=ENV_PREFIX)
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="give a new API key to a tenant")
    add.add_argument("tenant")
    add.add_argument(
        "--key-stdin", action="store_true", help="the key from standard input (else generated)"
    )
    remove = sub.add_parser("remove", help="remove every key of a tenant")
    remove.add_argument("tenant")
    remove_key = sub.add_parser("remove-key", help="remove one key")
    which = remove_key.add_mutually_exclusive_group(required=True)
    which.add_argument("--key-stdin", action="store_true", help="the key from standard input")
    which.add_argument("--digest", help="the key's SHA-256 (64 hex digits, as `list` shows)")
    sub.add_parser("list", help="every key's SHA-256 and its tenant")
    args = parser.parse_args(argv)
    try:
        config = from_namespace(TenantsConfig, args)
        asyncio.run(_run(args, config, stdin or sys.stdin, out or sys.stdout))
    except (ValueError, CredentialError) as exc:  # TenantError, a bad option
        parser.error(str(exc))
    except ApiKeyStoreError as exc:
        print(f"strata tenants: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
