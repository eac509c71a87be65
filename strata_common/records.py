"""MACs on the records Strata keeps in Redis (docs/design/security.md §5.2).

Anyone who can write to Redis could otherwise write a registry record that sends real prompts to
a fake worker, a member that is not one, or events under another holder's name. With a cluster key
every record Strata writes is *sealed*:

    stored = b"strata-mac1:" + hex(mac) + b":" + body
    mac    = HMAC-SHA256(k_records, b"strata-record/1" + lp(place_1) + ... + lp(place_n) + lp(body))

``k_records = derive_key(K, "records")``, ``lp(x)`` is ``x`` preceded by its length (4 bytes,
big-endian), and the *place* names where the record is stored: the Redis key and, for a hash, the
field (``("strata:registry:instances", "w3")``). So a sealed record cannot be altered, forged
without the key, or moved under another key, id or member; the body is the exact bytes the writer
stored (no canonical re-encoding), and the MAC is checked, in constant time, before the body is
parsed. What a MAC cannot stop: a *replay* of a record that was once valid at the same place (an
older version of a registry record, a deleted one brought back, an old event appended again), and
deletions. The design doc says what each store does about them.

Without a key nothing is sealed and records are stored as they were (loopback development); a
reader without a key that finds a sealed record says so instead of failing to parse it.

:class:`SkippedRecords` is the one owner of "a bad record is skipped and logged once per key and
reason": a reader calls it for every record it skips and after each full read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Iterable, Sequence
from typing import Final

from strata_common.credentials import CLUSTER_KEY_BYTES, derive_key

__all__ = ["SEAL_HEADER_BYTES", "SEAL_PREFIX", "RecordError", "RecordSeal", "SkippedRecords"]

SEAL_PREFIX: Final = b"strata-mac1:"
_MAC_HEX: Final = 64
SEAL_HEADER_BYTES: Final = len(SEAL_PREFIX) + _MAC_HEX + 1
"""Bytes before a sealed record's body (a Lua script that reads a field skips them)."""
_HEADER: Final = SEAL_HEADER_BYTES
_DOMAIN: Final = b"strata-record/1"

# Reasons are fixed texts (never built from what was read), so a log keyed by reason stays small.
NO_MAC: Final = "no MAC (written without the cluster key?)"
BAD_MAC: Final = "wrong MAC (another cluster key, altered, or moved from another key or id)"
MALFORMED: Final = "malformed MAC"
UNEXPECTED: Final = "sealed with a cluster key, but this process has none (--cluster-key-file)"
TOO_LARGE: Final = "larger than any record of its kind"


class RecordError(ValueError):
    """A stored record failed its MAC check; ``str()`` is one of a few fixed reasons."""


Place = Sequence[str | bytes]


def _update(mac: hmac.HMAC, value: str | bytes | memoryview) -> None:
    data = value.encode() if isinstance(value, str) else value
    mac.update(struct.pack(">I", len(data)))
    mac.update(data)


class RecordSeal:
    """Seals records before they are written and opens them after they are read.

    ``cluster_key``: the cluster key K (32 bytes), or None for no MACs at all."""

    def __init__(self, cluster_key: bytes | None) -> None:
        if cluster_key is not None and len(cluster_key) != CLUSTER_KEY_BYTES:
            raise ValueError(f"a cluster key is {CLUSTER_KEY_BYTES} bytes")
        self._key = None if cluster_key is None else derive_key(cluster_key, "records")

    def __repr__(self) -> str:  # never the key
        return f"RecordSeal({'sealed' if self._key is not None else 'no MACs'})"

    @property
    def enabled(self) -> bool:
        """Records are sealed and checked (a cluster key was given)."""
        return self._key is not None

    def _mac(self, key: bytes, place: Place, body: bytes | memoryview) -> bytes:
        mac = hmac.new(key, _DOMAIN, hashlib.sha256)
        for part in place:
            _update(mac, part)
        _update(mac, body)  # no copy of a large body (a snapshot)
        return mac.hexdigest().encode()

    def seal(self, place: Place, body: bytes | str) -> bytes:
        """What to store at ``place``: ``body`` sealed (or ``body`` itself, without a key).
        Deterministic: sealing the same body at the same place gives the same bytes."""
        data = body.encode() if isinstance(body, str) else bytes(body)
        if self._key is None:
            return data
        return SEAL_PREFIX + self._mac(self._key, place, data) + b":" + data

    def open(
        self, place: Place, stored: bytes | str, *, max_body_bytes: int | None = None
    ) -> bytes:
        """The body of the record read from ``place``, after checking its MAC (constant time);
        RecordError if there is none, it is malformed or wrong. Without a key: ``stored`` as
        it is, unless it is sealed (RecordError: this process cannot check it).

        ``max_body_bytes``: the largest body of this kind of record; a longer one is refused
        (TOO_LARGE) before its MAC is computed, so a huge value costs a reader nothing."""
        if max_body_bytes is not None and len(stored) > max_body_bytes + _HEADER:
            raise RecordError(TOO_LARGE)
        data = stored.encode() if isinstance(stored, str) else bytes(stored)
        sealed = data.startswith(SEAL_PREFIX)
        if self._key is None:
            if sealed:
                raise RecordError(UNEXPECTED)
            return data
        if not sealed:
            raise RecordError(NO_MAC)
        if len(data) < _HEADER or data[_HEADER - 1 : _HEADER] != b":":
            raise RecordError(MALFORMED)
        given = data[len(SEAL_PREFIX) : _HEADER - 1]
        body = memoryview(data)[_HEADER:]
        if not hmac.compare_digest(self._mac(self._key, place, body), given):
            raise RecordError(BAD_MAC)
        return body.tobytes()


class SkippedRecords:
    """Records a reader skipped (bad MAC, bad fields), each logged once per key and reason.

    A reader polls every record every round (a health-check round, a membership refresh); a bad
    one must neither stop the others nor flood the log. Not thread-safe: one per reader.
    ``what`` names the records in the log line (``"registry record"``, ``"member record"``)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._reasons: dict[bytes, str] = {}

    def note(self, key: bytes, reason: str) -> None:
        """``key``'s record was skipped because of ``reason``: logged unless it was skipped for
        the same reason last time."""
        if self._reasons.get(key) != reason:
            self._reasons[key] = reason
            self._logger.warning("skipping the %s under %r: %s", self._what, key[:80], reason)

    def forget_except(self, keys: Iterable[bytes]) -> None:
        """After a full read: forget every record but ``keys`` (those skipped in this read), so
        one that was fixed or deleted is logged again if it turns bad again."""
        for key in set(self._reasons) - set(keys):
            del self._reasons[key]

    @property
    def skipped(self) -> dict[bytes, str]:
        """The records skipped now, by key: the reason."""
        return dict(self._reasons)
