"""The one ``HOST:PORT`` parser: every endpoint on a command line, in a config or a record.

A host is a DNS name, an IPv4 address, or an IPv6 address in brackets (``[::1]:7600``); the
port is 1..65535 (``allow_zero`` admits 0, "any free port", for addresses to listen on).
:func:`format_endpoint` writes the same form back, brackets included.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "Endpoint",
    "EndpointError",
    "bind_port",
    "format_endpoint",
    "is_wildcard",
    "parse_endpoint",
]

_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")


class EndpointError(ValueError):
    """Not a ``HOST:PORT`` endpoint; the message quotes the text."""


class Endpoint(NamedTuple):
    """A parsed endpoint; ``host`` has no brackets, ``str(endpoint)`` restores them."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_endpoint(self.host, self.port)


def parse_endpoint(text: str, *, allow_zero: bool = False) -> Endpoint:
    """``HOST:PORT`` or ``[IPV6]:PORT`` → :class:`Endpoint`; raises :class:`EndpointError`."""
    if not isinstance(text, str):
        raise EndpointError(f"endpoint must be HOST:PORT, got {text!r}")
    stripped = text.strip()
    bad = EndpointError(f"endpoint must be HOST:PORT (IPv6 in brackets), got {text!r}")
    if stripped.startswith("["):
        host, sep, port_text = stripped[1:].partition("]:")
        if not sep:
            raise bad
        try:
            if ipaddress.ip_address(host).version != 6:
                raise bad
        except ValueError:
            raise bad from None
    else:
        host, sep, port_text = stripped.rpartition(":")
        if not sep or not host or ":" in host or not _HOST_NAME.fullmatch(host):
            raise bad
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise bad
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise EndpointError(f"endpoint port must be in [{0 if allow_zero else 1}, 65535]: {text!r}")
    return Endpoint(host, port)


def format_endpoint(host: str, port: int) -> str:
    """``("::1", 7600)`` → ``"[::1]:7600"``; other hosts as they are."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    """``0.0.0.0``, ``::`` (any spelling, brackets or not) or ``""``: an address to listen on
    every interface, never one to dial."""
    bare = host.strip("[]")
    if not bare:
        return True
    try:
        return ipaddress.ip_address(bare).is_unspecified
    except ValueError:
        return False  # a DNS name


def bind_port(
    add_port: Callable[[str], int],
    address: str,
    what: str,
    error: Callable[[str], Exception] = OSError,
) -> int:
    """``add_port(address)`` (e.g. a gRPC server's ``add_insecure_port``): the port it bound.

    When nothing was bound (``add_port`` raised RuntimeError, or answered 0, as gRPC does), raises
    ``error("cannot bind <what> to <address>[: <reason>]")``.
    """
    try:
        port = add_port(address)
    except RuntimeError as exc:
        raise error(f"cannot bind {what} to {address}: {exc}") from exc
    if port == 0:
        raise error(f"cannot bind {what} to {address}")
    return port
