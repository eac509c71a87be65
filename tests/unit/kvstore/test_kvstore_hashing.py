"""Exact tests of block identity (kvstore.blocks.hashing): chain property, isolation, goldens."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest

from kvstore.blocks.hashing import (
    HASH_VERSION,
    PUBLIC_HASH_KEY,
    block_keys,
    model_fingerprint,
    root_key,
)

FP = bytes(range(16))
ROOT = root_key(FP, "bf16/bs4")


def _write_model(path: Path, seed: int, config: dict[str, object] | None = None) -> Path:
    path.mkdir()
    cfg = config if config is not None else {"hidden_size": 8, "num_hidden_layers": 2}
    (path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    (path / "model.safetensors").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def test_hash_version_is_two() -> None:
    assert HASH_VERSION == 2


def test_golden_values() -> None:
    """Pinned outputs: if this fails the key format changed and HASH_VERSION must be bumped."""
    root = root_key(b"\x00" * 16, "bf16/bs16")
    assert root.hex() == "ad7477eef0f2078f9ee70f28f51c2bd2"
    assert [k.hex() for k in block_keys(list(range(40)), 16, root)] == [
        "bb10a02262edafe3fa8ef86cab499dd6",
        "3a49b5fb41e6402a5f45d116fd13e9e3",
    ]
    assert root_key(b"\x00" * 16, "bf16/bs16", "tenant-a").hex() == (
        "5dae0d782c457269c706f2a13dfabfc2"
    )
    assert root_key(b"\x00" * 16, "bf16/bs16", hash_key=bytes(range(32))).hex() == (
        "4f948f866917c30dc9699e5b40c896e8"
    )


def test_format_matches_documented_derivation() -> None:
    """Recompute keys from the docstring's definition with raw blake3 and struct."""

    def lp(b: bytes) -> bytes:
        return struct.pack("<I", len(b)) + b

    def b(data: bytes, key: bytes = PUBLIC_HASH_KEY) -> bytes:
        return blake3.blake3(data, key=key).digest(16)

    expected_root = b(b"strata-root" + struct.pack("<I", 2) + lp(FP) + lp(b"bf16/bs4") + lp(b""))
    assert expected_root == ROOT
    tokens = [7, 8, 9, 2**32 - 1, 0, 1, 2, 3, 5]
    key1 = b(ROOT + struct.pack("<4I", 7, 8, 9, 2**32 - 1))
    key2 = b(key1 + struct.pack("<4I", 0, 1, 2, 3))
    assert block_keys(tokens, 4, ROOT) == [key1, key2]
    secret = bytes(range(100, 132))
    keyed1 = b(ROOT + struct.pack("<4I", 7, 8, 9, 2**32 - 1), secret)
    assert block_keys(tokens, 4, ROOT, secret)[0] == keyed1


def test_the_hash_key_separates_clusters() -> None:
    """Without the cluster's hash key, neither the root nor any block key can be computed."""
    secret = bytes(range(32))
    tokens = list(range(64))
    public = block_keys(tokens, 16, root_key(FP, "bf16/bs16"))
    keyed = block_keys(tokens, 16, root_key(FP, "bf16/bs16", hash_key=secret), secret)
    assert len(keyed) == 4 and not set(public) & set(keyed)
    # Same root, other key: the chain diverges from the first block on.
    other = block_keys(tokens, 16, root_key(FP, "bf16/bs16", hash_key=secret))
    assert not set(other) & set(keyed)
    with pytest.raises(ValueError, match="hash_key"):
        block_keys(tokens, 16, ROOT, b"short")
    with pytest.raises(ValueError, match="hash_key"):
        root_key(FP, "x", hash_key=b"short")


def test_keys_are_16_bytes_and_partial_block_excluded() -> None:
    assert block_keys([], 4, ROOT) == []
    assert block_keys([1, 2, 3], 4, ROOT) == []
    keys = block_keys(list(range(11)), 4, ROOT)
    assert len(keys) == 2
    assert all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    # The partial tail never changes the full blocks' keys.
    assert block_keys(list(range(8)), 4, ROOT) == keys


def test_chain_property_key_names_whole_prefix() -> None:
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, ROOT)
    b = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 99, 10, 11, 12], 4, ROOT)
    c = block_keys([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, ROOT)
    assert a[:2] == b[:2] and a[2] != b[2]
    # Same tokens in block 2 but a different block 1: every later key differs too.
    assert all(x != y for x, y in zip(a, c, strict=True))
    # Identical block contents at different positions get different keys.
    same = block_keys([5, 5, 5, 5] * 3, 4, ROOT)
    assert len(set(same)) == 3


def test_namespace_model_and_layout_isolation() -> None:
    tokens = list(range(32))
    keys = {
        "default": block_keys(tokens, 16, root_key(FP, "bf16/bs16")),
        "tenant": block_keys(tokens, 16, root_key(FP, "bf16/bs16", "tenant-a")),
        "tenant2": block_keys(tokens, 16, root_key(FP, "bf16/bs16", "tenant-b")),
        "layout": block_keys(tokens, 16, root_key(FP, "fp8/bs16")),
        "model": block_keys(tokens, 16, root_key(b"\x01" * 16, "bf16/bs16")),
    }
    flat = [k for ks in keys.values() for k in ks]
    assert len(set(flat)) == len(flat) == 10
    # Length prefixes: shifting a character between layout and namespace changes the root.
    assert root_key(FP, "ab", "c") != root_key(FP, "a", "bc")


def test_numpy_and_list_inputs_agree() -> None:
    tokens = list(range(100, 164))
    expected = block_keys(tokens, 16, ROOT)
    assert block_keys(np.array(tokens, dtype=np.int64), 16, ROOT) == expected
    assert block_keys(np.array(tokens, dtype="<u4"), 16, ROOT) == expected
    assert block_keys(tuple(tokens), 16, ROOT) == expected


@pytest.mark.parametrize("bad", [[-1, 0, 0, 0], [2**32, 0, 0, 0]])
def test_out_of_range_token_ids_rejected(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        block_keys(bad, 4, ROOT)
    with pytest.raises(ValueError):
        block_keys(np.array(bad, dtype=np.int64), 4, ROOT)


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError):
        block_keys([1, 2], 0, ROOT)
    with pytest.raises(ValueError):
        block_keys([1, 2], 1, b"short")
    with pytest.raises(ValueError):
        root_key(b"short", "x")


def test_model_fingerprint_depends_on_weights_config_and_dtype(tmp_path: Path) -> None:
    m1 = _write_model(tmp_path / "m1", seed=1)
    m1_again = _write_model(tmp_path / "m1_again", seed=1)
    m2 = _write_model(tmp_path / "m2", seed=2)
    m3 = _write_model(tmp_path / "m3", seed=1, config={"hidden_size": 16, "num_hidden_layers": 2})
    fp1 = model_fingerprint(m1, "bfloat16")
    assert len(fp1) == 16
    assert model_fingerprint(m1_again, "bfloat16") == fp1  # location does not matter
    assert model_fingerprint(str(m1), "bfloat16") == fp1
    assert model_fingerprint(m2, "bfloat16") != fp1  # equal configs, different weights
    assert model_fingerprint(m3, "bfloat16") != fp1
    assert model_fingerprint(m1, "float16") != fp1


def test_model_fingerprint_covers_every_shard_in_order(tmp_path: Path) -> None:
    m = _write_model(tmp_path / "m", seed=1)
    before = model_fingerprint(m, "bfloat16")
    (m / "model-00002.safetensors").write_bytes(b"\x00" * 10)
    with_shard = model_fingerprint(m, "bfloat16")
    assert with_shard != before
    (m / "model-00002.safetensors").write_bytes(b"\x00" * 11)
    assert model_fingerprint(m, "bfloat16") != with_shard


def test_model_fingerprint_golden(tmp_path: Path) -> None:
    m = tmp_path / "g"
    m.mkdir()
    (m / "config.json").write_bytes(b'{"a": 1}')
    (m / "model.safetensors").write_bytes(b"weights")
    assert model_fingerprint(m, "bfloat16").hex() == "a7b388943c904fa4bb797c7568828511"


def test_model_fingerprint_requires_weights(tmp_path: Path) -> None:
    m = tmp_path / "empty"
    m.mkdir()
    (m / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        model_fingerprint(m, "bfloat16")
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "missing", "bfloat16")
