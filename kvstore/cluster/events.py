"""KV events: what holders publish about the blocks they hold, and their wire format.

A *holder* -- a store node, or an engine instance for blocks resident in its GPU memory -- tells the
cluster-wide :class:`~kvstore.cluster.index.PrefixIndex` which blocks it holds in which
:class:`Tier`, as a stream of events numbered per holder (the event's *source*) 0, 1, 2, ... The
numbers let the index notice a lost event (a gap) and ask the source for a :class:`SourceSnapshot`.
The stream of a source starts with ``SourceCleared(seq=0)``, and starts again that way after a
restart. The rules the index applies are in docs/design/kvstore.md §10.2.

Events are small frozen, slotted dataclasses, validated on construction (keys are 16-byte
:data:`~kvstore.blocks.hashing.BlockKey` values, the source id is 1..255 bytes of UTF-8), so a
malformed event fails where it is made, not deep inside the index.

Wire format, version 1 (little-endian; one message per Redis stream entry or gRPC ``bytes``, so
there is no outer framing)::

    u8 version | u8 kind | u8 tier | u8 flags | u8 len(source) | u32 count | u64 seq
    | source (UTF-8) | [parent key, 16 B, if flags & 1] | body

The body is ``count`` 16-byte keys (stored, removed), empty (cleared, count 0), or for a snapshot
``count`` tier sections, each ``u8 tier | u32 n | n keys``. :func:`decode_event` and
:func:`decode_snapshot` check every field and that the length is exact, and raise ``ValueError``
otherwise: the bytes come from another process and are never trusted.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, NamedTuple

from kvstore.blocks.hashing import BLOCK_KEY_BYTES, BlockKey
from kvstore.blocks.tier import Tier

__all__ = [
    "EVENT_FORMAT_VERSION",
    "MAX_SOURCE_ID_BYTES",
    "SOURCE_GONE_SEQ",
    "BlocksRemoved",
    "BlocksStored",
    "KVEvent",
    "SourceCleared",
    "SourceSnapshot",
    "decode_event",
    "decode_snapshot",
    "encode_event",
    "encode_snapshot",
    "message_source",
]

EVENT_FORMAT_VERSION: Final = 1
MAX_SOURCE_ID_BYTES: Final = 255
_MAX_SEQ: Final = 2**64 - 1
SOURCE_GONE_SEQ: Final = _MAX_SEQ
"""``SourceCleared(source, SOURCE_GONE_SEQ)``: the source is gone for good (it left, or it
crashed and was reaped). To a :class:`~kvstore.cluster.index.PrefixIndex` any later event of that
incarnation is a duplicate; only a new incarnation (``SourceCleared(seq=0)``) brings the source
back. A :class:`~kvstore.cluster.view.ClusterView` forgets the source altogether."""
_MAX_COUNT: Final = 2**32 - 1


class _Kind(enum.IntEnum):
    STORED = 1
    REMOVED = 2
    CLEARED = 3
    SNAPSHOT = 4


_KIND_VALUES: Final = frozenset(int(kind) for kind in _Kind)
_TIER_VALUES: Final = frozenset(int(tier) for tier in Tier)
_HEADER = struct.Struct("<BBBBBIQ")
_SECTION = struct.Struct("<BI")
_FLAG_PARENT = 0x01


def _check_source(source: str) -> bytes:
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    encoded = source.encode("utf-8")
    if not 0 < len(encoded) <= MAX_SOURCE_ID_BYTES:
        raise ValueError(f"source id must be 1..{MAX_SOURCE_ID_BYTES} bytes of UTF-8: {source!r}")
    return encoded


def _check_seq(seq: int) -> None:
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= _MAX_SEQ:
        raise ValueError(f"seq must be an int in [0, 2**64), got {seq!r}")


def _check_keys(keys: tuple[BlockKey, ...]) -> None:
    if len(keys) > _MAX_COUNT:
        raise ValueError("too many keys in one event")
    for key in keys:
        if type(key) is not bytes or len(key) != BLOCK_KEY_BYTES:
            raise ValueError(f"block keys are {BLOCK_KEY_BYTES}-byte bytes, got {key!r}")


def _as_tier(tier: object) -> Tier:
    if isinstance(tier, bool) or not isinstance(tier, int):
        raise TypeError(f"tier must be a Tier, got {tier!r}")
    return Tier(tier)  # ValueError for an int that names no tier


def _check_tier_event(event: BlocksStored | BlocksRemoved) -> None:
    """Validate and normalise the fields both tier events have (they are frozen: set through
    ``object.__setattr__``)."""
    _check_source(event.source)
    _check_seq(event.seq)
    object.__setattr__(event, "tier", _as_tier(event.tier))
    object.__setattr__(event, "keys", tuple(event.keys))
    _check_keys(event.keys)


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """``source`` now holds ``keys`` in ``tier``.

    ``keys`` is a chain: ``keys[0]``'s parent is ``parent`` (None: the chain starts at the root),
    ``keys[i]``'s parent is ``keys[i - 1]``. The index does not need the parent (a key names its
    whole prefix); it is carried for consumers that build explicit trees.
    """

    source: str
    seq: int
    tier: Tier
    keys: tuple[BlockKey, ...]
    parent: BlockKey | None = None

    def __post_init__(self) -> None:
        _check_tier_event(self)
        if self.parent is not None:
            _check_keys((self.parent,))


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """``source`` no longer holds ``keys`` in ``tier`` (evicted, demoted or deleted)."""

    source: str
    seq: int
    tier: Tier
    keys: tuple[BlockKey, ...]

    def __post_init__(self) -> None:
        _check_tier_event(self)


@dataclass(frozen=True, slots=True)
class SourceCleared:
    """``source`` holds nothing: it started or restarted (``seq == 0``), or dropped its cache."""

    source: str
    seq: int

    def __post_init__(self) -> None:
        _check_source(self.source)
        _check_seq(self.seq)


KVEvent = BlocksStored | BlocksRemoved | SourceCleared
"""Any event a holder publishes."""


@dataclass(frozen=True, slots=True)
class SourceSnapshot:
    """Everything ``source`` holds as of its event ``seq`` (that event included).

    The answer to a resync request (:meth:`kvstore.cluster.index.PrefixIndex.resync`).
    ``keys_by_tier`` is stored as a read-only mapping from :class:`Tier` to a tuple of keys; tiers
    with no keys may be absent.
    """

    source: str
    seq: int
    keys_by_tier: Mapping[Tier, tuple[BlockKey, ...]]

    def __post_init__(self) -> None:
        _check_source(self.source)
        _check_seq(self.seq)
        normalized: dict[Tier, tuple[BlockKey, ...]] = {}
        for tier, keys in self.keys_by_tier.items():
            tier_keys = tuple(keys)
            _check_keys(tier_keys)
            normalized[_as_tier(tier)] = tier_keys
        ordered = {tier: normalized[tier] for tier in Tier if tier in normalized}
        object.__setattr__(self, "keys_by_tier", MappingProxyType(ordered))

    @classmethod
    def of(
        cls, source: str, seq: int, keys_by_tier: Mapping[Tier, Iterable[BlockKey]]
    ) -> SourceSnapshot:
        """Build a snapshot from any iterables of keys (they are copied into tuples)."""
        return cls(source, seq, {tier: tuple(keys) for tier, keys in keys_by_tier.items()})


# -- wire format ------------------------------------------------------------------------------


def encode_event(event: KVEvent) -> bytes:
    """Serialize one event (format v1, see the module docstring)."""
    source = event.source.encode("utf-8")
    if isinstance(event, BlocksStored):
        flags = _FLAG_PARENT if event.parent is not None else 0
        header = _HEADER.pack(
            EVENT_FORMAT_VERSION,
            _Kind.STORED,
            event.tier,
            flags,
            len(source),
            len(event.keys),
            event.seq,
        )
        parent = event.parent if event.parent is not None else b""
        return b"".join((header, source, parent, *event.keys))
    if isinstance(event, BlocksRemoved):
        header = _HEADER.pack(
            EVENT_FORMAT_VERSION,
            _Kind.REMOVED,
            event.tier,
            0,
            len(source),
            len(event.keys),
            event.seq,
        )
        return b"".join((header, source, *event.keys))
    if isinstance(event, SourceCleared):
        header = _HEADER.pack(EVENT_FORMAT_VERSION, _Kind.CLEARED, 0, 0, len(source), 0, event.seq)
        return header + source
    raise TypeError(f"not a KV event: {type(event).__name__}")


def encode_snapshot(snapshot: SourceSnapshot) -> bytes:
    """Serialize a snapshot (kind 4): one section per tier present, fastest tier first."""
    source = snapshot.source.encode("utf-8")
    sections = snapshot.keys_by_tier
    parts = [
        _HEADER.pack(
            EVENT_FORMAT_VERSION, _Kind.SNAPSHOT, 0, 0, len(source), len(sections), snapshot.seq
        ),
        source,
    ]
    for tier, keys in sections.items():
        parts.append(_SECTION.pack(tier, len(keys)))
        parts.extend(keys)
    return b"".join(parts)


def _split_keys(data: memoryview, count: int, what: str) -> tuple[BlockKey, ...]:
    if len(data) != count * BLOCK_KEY_BYTES:
        raise ValueError(f"{what}: expected {count} keys, got {len(data)} bytes")
    raw = data.tobytes()
    return tuple(raw[i : i + BLOCK_KEY_BYTES] for i in range(0, len(raw), BLOCK_KEY_BYTES))


class _Header(NamedTuple):
    kind: _Kind
    tier: int
    flags: int
    num_items: int
    seq: int
    source: str
    body: memoryview
    """Everything after the source id."""


def _decode_header(data: bytes | bytearray | memoryview) -> _Header:
    """Check the fixed header and the source id of a message."""
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size:
        raise ValueError(f"KV event too short: {len(view)} bytes")
    version, kind, tier, flags, source_len, count, seq = _HEADER.unpack_from(view)
    if version != EVENT_FORMAT_VERSION:
        raise ValueError(f"unsupported KV event format version {version}")
    if kind not in _KIND_VALUES:
        raise ValueError(f"unknown KV event kind {kind}")
    end = _HEADER.size + source_len
    if source_len == 0 or len(view) < end:
        raise ValueError("KV event: bad source id length")
    try:
        source = view[_HEADER.size : end].tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("KV event: source id is not UTF-8") from None
    return _Header(_Kind(kind), tier, flags, count, seq, source, view[end:])


def decode_event(data: bytes | bytearray | memoryview) -> KVEvent:
    """Parse one event produced by :func:`encode_event`; ``ValueError`` if malformed."""
    kind, tier, flags, count, seq, source, rest = _decode_header(data)
    if kind is _Kind.SNAPSHOT:
        raise ValueError("a snapshot is not an event: use decode_snapshot")
    if flags & ~_FLAG_PARENT or (flags and kind is not _Kind.STORED):
        raise ValueError(f"KV event: bad flags {flags:#x}")
    if kind is _Kind.CLEARED:
        if tier or count or len(rest):
            raise ValueError("KV event: SourceCleared carries no tier and no keys")
        return SourceCleared(source, seq)
    if tier not in _TIER_VALUES:
        raise ValueError(f"KV event: unknown tier {tier}")
    if kind is _Kind.REMOVED:
        return BlocksRemoved(source, seq, Tier(tier), _split_keys(rest, count, "BlocksRemoved"))
    parent: BlockKey | None = None
    if flags & _FLAG_PARENT:
        if len(rest) < BLOCK_KEY_BYTES:
            raise ValueError("BlocksStored: truncated parent key")
        parent = rest[:BLOCK_KEY_BYTES].tobytes()
        rest = rest[BLOCK_KEY_BYTES:]
    keys = _split_keys(rest, count, "BlocksStored")
    return BlocksStored(source, seq, Tier(tier), keys, parent)


def decode_snapshot(data: bytes | bytearray | memoryview) -> SourceSnapshot:
    """Parse a snapshot produced by :func:`encode_snapshot`; ``ValueError`` if malformed."""
    kind, tier, flags, count, seq, source, rest = _decode_header(data)
    if kind is not _Kind.SNAPSHOT:
        raise ValueError(f"not a snapshot: kind {int(kind)}")
    if tier or flags:
        raise ValueError("snapshot: tier and flags must be 0")
    keys_by_tier: dict[Tier, tuple[BlockKey, ...]] = {}
    offset = 0
    for _ in range(count):
        if len(rest) - offset < _SECTION.size:
            raise ValueError("snapshot: truncated section header")
        section_tier, num_keys = _SECTION.unpack_from(rest, offset)
        offset += _SECTION.size
        if section_tier not in _TIER_VALUES or Tier(section_tier) in keys_by_tier:
            raise ValueError(f"snapshot: bad or repeated tier {section_tier}")
        end = offset + num_keys * BLOCK_KEY_BYTES
        if end > len(rest):
            raise ValueError("snapshot: truncated keys")
        keys_by_tier[Tier(section_tier)] = _split_keys(rest[offset:end], num_keys, "snapshot")
        offset = end
    if offset != len(rest):
        raise ValueError(f"snapshot: {len(rest) - offset} trailing bytes")
    return SourceSnapshot(source, seq, keys_by_tier)


def message_source(data: bytes | bytearray | memoryview) -> str:
    """The source of one stream message, an event or a snapshot, after checking all of it
    (``ValueError`` if malformed): who a publisher claims to speak for."""
    if len(data) > 1 and data[1] == _Kind.SNAPSHOT:
        return decode_snapshot(data).source
    return decode_event(data).source
