"""Block identity: the one place that decides what a KV block is called.

The gateway (to look up cached prefixes), the KV connector (to save and load blocks) and the store
(to index them) must all derive *exactly* the same key for the same block, so the derivation lives
here and nowhere else. Changing any byte of the format below changes every key in every cache,
which is why the format is versioned and pinned by a golden-value unit test.

Hash format, version 2 (``HASH_VERSION = 2``)
---------------------------------------------
Block keys are **keyed BLAKE3** (``blake3(data, key=hash_key)``, the first 16 bytes of its
output): without the 32-byte ``hash_key`` nobody can compute a block's key, so nobody can aim a
PUT at a prefix they do not know the key of, nor craft two prompts whose keys collide (a keyed
PRF; docs/design/security.md §6.2). A cluster derives ``hash_key`` from its cluster key
(``strata_common.credentials.derive_key(K, "block-keys")``); a deployment without one uses
:data:`PUBLIC_HASH_KEY` (32 zero bytes: the same collision resistance, no secrecy). Integers are
little-endian; ``str`` values are UTF-8. ``lp(x)`` means ``len(x)`` as uint32 followed by ``x``
(length prefixes make concatenations unambiguous: ``("ab", "c")`` never collides with
``("a", "bc")``). Version 1 was xxh3_128 with seed 0: predictable, and collidable by design.

``model_fingerprint(model_dir, dtype)`` -- 16 bytes naming the exact weights (not a secret: it is
xxh3_128, fast over gigabytes of weights)::

    xxh3_128( b"strata-model-fp" || u32 HASH_VERSION || lp(dtype) || lp(config.json bytes)
              || for each *.safetensors file in model_dir, sorted by file name:
                     lp(file name) || u64 file size || file contents )

  The weights are hashed in full (streamed in 8 MiB chunks) rather than trusting names or
  ``config.json``: two checkpoints with the same architecture but different weights (two seeds of a
  tiny test model, a fine-tune) produce different KV for the same tokens and must never share cache
  entries.

``root_key(model_fingerprint, kv_layout, namespace="", hash_key=PUBLIC_HASH_KEY)`` -- the parent
of a prompt's first block::

    B( b"strata-root" || u32 HASH_VERSION || lp(model_fingerprint) || lp(kv_layout)
       || lp(namespace) )                       where B(x) = blake3(x, key=hash_key)[:16]

  ``kv_layout`` names everything about the stored tensors that is not in the weights (KV dtype,
  block size, layer/head layout, tensor-parallel shard). ``namespace`` is the tenant or cache salt:
  different namespaces give disjoint key spaces, so one tenant cannot learn through hit/miss timing
  whether another tenant sent a given prompt.

``block_keys(token_ids, block_size, root, hash_key=PUBLIC_HASH_KEY)`` -- one key per *full*
block::

    key_0 = root
    key_i = B( key_{i-1} || token ids of block i as little-endian uint32 )   (i >= 1)

  Chaining makes a key name its whole prefix (two prompts share key ``i`` only if they share their
  first ``i * block_size`` tokens), so a prefix lookup is a walk down the chain, and a block's key
  follows from its parent's and its own tokens alone (what the HBM event translator needs). The
  trailing partial block has no key: its KV is still being extended by decode and is never shared.

Speed: the prompt is packed to bytes once with numpy and sliced; each block costs one keyed
BLAKE3 call (~1 us, Python-call bound; xxh3 was ~0.2 us): docs/benchmarks.md, "Block keys".
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import blake3
import numpy as np
import xxhash

from strata_common.credentials import derive_key

__all__ = [
    "BLOCK_KEY_BYTES",
    "HASH_KEY_BYTES",
    "HASH_VERSION",
    "PUBLIC_HASH_KEY",
    "BlockKey",
    "block_hash_key",
    "block_keys",
    "model_fingerprint",
    "root_key",
]

HASH_VERSION: int = 2
"""Version of the hash format described in the module docstring; part of every key."""

BlockKey = bytes
"""A block's identity: 16 bytes (the first 16 of a keyed BLAKE3 output)."""

BLOCK_KEY_BYTES = 16
HASH_KEY_BYTES = 32
PUBLIC_HASH_KEY = bytes(HASH_KEY_BYTES)
"""The hash key of a deployment without a cluster key (everyone can compute its block keys)."""

_CHUNK_BYTES = 8 * 1024 * 1024
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MAX_TOKEN_ID = 2**32 - 1


def _lp(data: bytes) -> bytes:
    """Length-prefix ``data`` (uint32 LE) so that concatenated fields cannot be confused."""
    return _U32.pack(len(data)) + data


def model_fingerprint(model_dir: str | os.PathLike[str], dtype: str) -> bytes:
    """Return a 16-byte fingerprint of the model in ``model_dir`` run at ``dtype``.

    Hashes ``config.json`` and the full contents of every ``*.safetensors`` file directly in
    ``model_dir`` (sorted by name, streamed in 8 MiB chunks into one reused buffer). This reads
    every weight byte once -- call it once per process at start-up, not per request.

    Raises:
        FileNotFoundError: ``config.json`` is missing, or there is no ``*.safetensors`` file.
            Refusing is deliberate: fingerprinting only the config would let two different
            checkpoints share KV and silently corrupt outputs.
    """
    root = Path(model_dir)
    config_bytes = (root / "config.json").read_bytes()
    weight_files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not weight_files:
        raise FileNotFoundError(f"no *.safetensors weights in {root}; cannot fingerprint the model")

    hasher = xxhash.xxh3_128()
    hasher.update(b"strata-model-fp")
    hasher.update(_U32.pack(HASH_VERSION))
    hasher.update(_lp(dtype.encode("utf-8")))
    hasher.update(_lp(config_bytes))
    chunk = bytearray(_CHUNK_BYTES)
    chunk_view = memoryview(chunk)
    for path in weight_files:
        hasher.update(_lp(path.name.encode("utf-8")))
        with path.open("rb", buffering=0) as f:
            hasher.update(_U64.pack(os.fstat(f.fileno()).st_size))
            while n := f.readinto(chunk_view):
                hasher.update(chunk_view[:n])
    return hasher.digest()


def block_hash_key(cluster_key: bytes | None) -> bytes:
    """The hash key of a cluster's block keys: derived from its cluster key (the same on every
    gateway and worker that holds it), :data:`PUBLIC_HASH_KEY` without one."""
    if cluster_key is None:
        return PUBLIC_HASH_KEY
    return derive_key(cluster_key, "block-keys")


def _check_hash_key(hash_key: bytes) -> None:
    if len(hash_key) != HASH_KEY_BYTES:
        raise ValueError(f"hash_key must be {HASH_KEY_BYTES} bytes")


def root_key(
    model_fingerprint: bytes,
    kv_layout: str,
    namespace: str = "",
    hash_key: bytes = PUBLIC_HASH_KEY,
) -> BlockKey:
    """Return the key that is the parent of the first block of every prompt in this key space.

    Args:
        model_fingerprint: the 16 bytes from :func:`model_fingerprint`.
        kv_layout: a stable description of how KV is stored (e.g. ``"bf16/bs16/l30/h3/d64/tp1"``).
        namespace: tenant or cache salt; ``""`` is the shared default namespace.
        hash_key: the cluster's block-key key (32 bytes; :data:`PUBLIC_HASH_KEY` without one).
    """
    if len(model_fingerprint) != BLOCK_KEY_BYTES:
        raise ValueError(f"model_fingerprint must be {BLOCK_KEY_BYTES} bytes")
    _check_hash_key(hash_key)
    data = (
        b"strata-root"
        + _U32.pack(HASH_VERSION)
        + _lp(bytes(model_fingerprint))
        + _lp(kv_layout.encode("utf-8"))
        + _lp(namespace.encode("utf-8"))
    )
    return blake3.blake3(data, key=hash_key).digest(BLOCK_KEY_BYTES)


def _pack_tokens(token_ids: Sequence[int] | np.ndarray, num_tokens: int) -> bytes:
    """Pack the first ``num_tokens`` ids as little-endian uint32, rejecting out-of-range ids.

    numpy casts arrays with wrap-around (``-1`` would become ``0xFFFFFFFF`` and collide with a real
    id), so arrays of another dtype are range-checked; Python ints overflow-check themselves.
    """
    if isinstance(token_ids, np.ndarray):
        ids = token_ids[:num_tokens]
        if (
            ids.dtype != np.dtype("<u4")
            and ids.size
            and (ids.min() < 0 or ids.max() > _MAX_TOKEN_ID)
        ):
            raise ValueError("token ids must be in [0, 2**32)")
        return np.asarray(ids, dtype="<u4").tobytes()
    try:
        return np.asarray(token_ids[:num_tokens], dtype="<u4").tobytes()
    except OverflowError as exc:
        raise ValueError("token ids must be in [0, 2**32)") from exc


def block_keys(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    root: BlockKey,
    hash_key: bytes = PUBLIC_HASH_KEY,
) -> list[BlockKey]:
    """Return the chained keys of the full blocks of ``token_ids`` (the partial tail is skipped).

    ``result[i]`` names the first ``(i + 1) * block_size`` tokens under ``root``; a prompt that
    shares its first ``k`` full blocks with another shares exactly its first ``k`` keys.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if len(root) != BLOCK_KEY_BYTES:
        raise ValueError(f"root must be {BLOCK_KEY_BYTES} bytes")
    _check_hash_key(hash_key)
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    packed = _pack_tokens(token_ids, num_blocks * block_size)
    step = block_size * 4
    keyed = blake3.blake3(key=hash_key)  # copied per block: 1.7x faster than a new keyed hasher
    keys: list[BlockKey] = []
    parent = bytes(root)
    for start in range(0, num_blocks * step, step):
        hasher = keyed.copy()
        hasher.update(parent + packed[start : start + step])
        parent = hasher.digest(BLOCK_KEY_BYTES)
        keys.append(parent)
    return keys
