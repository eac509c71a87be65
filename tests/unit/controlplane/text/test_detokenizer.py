"""The gateway's incremental detokenizer, with the tiny model's real tokenizer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from controlplane.text.detokenizer import IncrementalDetokenizer, _priming_suffix


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def _full_prompt_text(tokenizer: Any, prompt: list[int], generated: list[int]) -> str:
    """What a stream primed with the whole prompt releases (the detokenizer's reference)."""
    stream = DecodeStream(ids=list(prompt), skip_special_tokens=True)
    return "".join(stream.step(tokenizer, t) or "" for t in generated)


def test_suffix_priming_releases_the_same_text(tokenizer: Any) -> None:
    """Primed with a short suffix of the prompt (as vLLM does, and cheap for long prompts), the
    text of the generated tokens equals that of a stream primed with the whole prompt, for
    random prompts and outputs over the whole vocabulary (byte tokens included)."""
    rng = random.Random(3)
    vocab = tokenizer.get_vocab_size()
    sample = "Le café coûte 3 € — 日本語のテキスト 😀"
    text_ids = tokenizer.encode(sample, add_special_tokens=False).ids
    for _ in range(400):
        pool = text_ids if rng.random() < 0.5 else list(range(3, vocab))
        prompt = [rng.choice(pool) for _ in range(rng.randint(1, 60))]
        generated = [rng.choice(pool) for _ in range(12)]
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        got = "".join(detokenizer.step(t) for t in generated)
        assert got == _full_prompt_text(tokenizer, prompt, generated), (prompt, generated)


def test_priming_suffix_is_short_for_any_prompt_length(tokenizer: Any) -> None:
    ids = tokenizer.encode("The capital of France is Paris. " * 5000, add_special_tokens=True).ids
    assert len(ids) > 20_000
    suffix = _priming_suffix(tokenizer, ids)
    assert 4 <= len(suffix) < 24 and suffix == ids[-len(suffix) :]
    assert _priming_suffix(tokenizer, ids[:3]) == ids[:3]  # short prompts: all of it
