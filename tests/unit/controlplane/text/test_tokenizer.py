"""Tokenization with the tiny model's real HF tokenizer, following vLLM's rules."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane.api.openai_protocol import ChatMessage, OpenAIError
from controlplane.api.sampling import SamplingDefaults
from controlplane.text.tokenizer import ModelTokenizer, read_sampling_defaults

PARTS_TEMPLATE = (
    "{% for message in messages %}[{{ message['role'] }}]"
    "{% for part in message['content'] %}<{{ part['text'] }}>{% endfor %}{% endfor %}"
)
STRICT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ raise_exception('no assistant turns here') }}{% endif %}{{ message['content'] }}"
    "{% endfor %}"
)
MakeTokenizer = Callable[[str | None], ModelTokenizer]
DEVELOPER_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}/developer:{{ m['content'] }}{% endfor %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


@pytest.fixture(scope="module")
def with_template(tiny_model_dir: Path) -> Callable[[str | None], ModelTokenizer]:
    """A ModelTokenizer over a fresh copy of the tiny tokenizer with another chat template."""
    from transformers import AutoTokenizer

    def make(template: str | None) -> ModelTokenizer:
        hf = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
        hf.chat_template = template
        return ModelTokenizer(hf)

    return make


def test_completion_prompt_gets_special_tokens_like_vllm(hf_tokenizer: Any) -> None:
    tokenizer = ModelTokenizer(hf_tokenizer)
    text = "Paris is the capital of France"
    assert tokenizer.encode_prompt(text) == hf_tokenizer.encode(text, add_special_tokens=True)
    assert tokenizer.vocab_size == len(hf_tokenizer)


def test_chat_renders_then_encodes_without_special_tokens(hf_tokenizer: Any) -> None:
    tokenizer = ModelTokenizer(hf_tokenizer)
    messages = (ChatMessage("system", "Be brief.", None), ChatMessage("user", "Hi", None))
    text = tokenizer.render_chat(messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.encode_chat(messages)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == hf_tokenizer.convert_tokens_to_ids(
        "<|im_start|>"
    )  # one BOS, from the template


def test_text_parts_are_joined_with_newlines_for_string_templates(hf_tokenizer: Any) -> None:
    tokenizer = ModelTokenizer(hf_tokenizer)
    parts = tokenizer.render_chat((ChatMessage("user", ("a", "b"), None),))
    joined = tokenizer.render_chat((ChatMessage("user", "a\nb", None),))
    assert parts == joined


def test_templates_that_iterate_content_get_parts(with_template: MakeTokenizer) -> None:
    tokenizer = with_template(PARTS_TEMPLATE)
    messages = (ChatMessage("system", "s", None), ChatMessage("user", ("a", "b"), None))
    assert tokenizer.render_chat(messages) == "[system]<s>[user]<a><b>"


@pytest.mark.parametrize(
    ("template", "expected"),
    [(None, "system"), (DEVELOPER_TEMPLATE, "developer/developer:x")],
)
def test_developer_role(
    with_template: MakeTokenizer, hf_tokenizer: Any, template: str | None, expected: str
) -> None:
    tokenizer = ModelTokenizer(hf_tokenizer) if template is None else with_template(template)
    text = tokenizer.render_chat((ChatMessage("developer", "x", None),))
    assert expected in text


def test_template_exception_is_a_400(with_template: MakeTokenizer) -> None:
    tokenizer = with_template(STRICT_TEMPLATE)
    with pytest.raises(OpenAIError) as info:
        tokenizer.render_chat((ChatMessage("assistant", "x", None),))
    assert (info.value.status, info.value.param, info.value.code) == (
        400,
        "messages",
        "invalid_messages",
    )
    assert "no assistant turns here" in info.value.message


def test_no_chat_template_is_a_400(with_template: MakeTokenizer) -> None:
    tokenizer = with_template(None)
    with pytest.raises(OpenAIError) as info:
        tokenizer.encode_chat((ChatMessage("user", "x", None),))
    assert (info.value.status, info.value.code) == (400, "chat_template_missing")


def test_sampling_defaults_from_generation_config(tmp_path: Path) -> None:
    assert read_sampling_defaults(tmp_path) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05})
    )
    assert read_sampling_defaults(tmp_path) == SamplingDefaults(
        temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05
    )
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"presence_penalty": 0.5, "frequency_penalty": -0.25})
    )
    assert read_sampling_defaults(tmp_path) == SamplingDefaults(
        presence_penalty=0.5, frequency_penalty=-0.25
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"min_p": "low", "top_k": -1}))
    assert read_sampling_defaults(tmp_path) == SamplingDefaults()  # not a number; -1: all
    (tmp_path / "generation_config.json").write_text("{broken")
    assert read_sampling_defaults(tmp_path) == SamplingDefaults()


def test_detokenizer_is_one_stream_over_the_generated_tokens(hf_tokenizer: Any) -> None:
    tokenizer = ModelTokenizer(hf_tokenizer)
    prompt = hf_tokenizer.encode("The river", add_special_tokens=False)
    generated = hf_tokenizer.encode(" and the bridge!", add_special_tokens=False)
    detokenizer = tokenizer.new_detokenizer(prompt)
    assert "".join(detokenizer.step(t) for t in generated) == " and the bridge!"
    # A lone byte of a multi-byte character waits for the next token, as in vLLM.
    split = tokenizer.new_detokenizer(prompt)
    assert split.step(116) == ""
    assert split.step(1692).startswith("\ufffd")
    eos = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.new_detokenizer(prompt).step(eos) == ""  # special tokens are skipped


def test_eos_ids_include_generation_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    plain = ModelTokenizer.from_model_dir(tiny_model_dir)
    assert plain.eos_token_ids == {2}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert ModelTokenizer.from_model_dir(tmp_path).eos_token_ids == {2, 7}


def test_max_token_chars_bounds_every_token(hf_tokenizer: Any) -> None:
    """No token's text is longer than the longest vocabulary entry (what the gateway's check
    before tokenizing relies on), and that entry exists."""
    tokenizer = ModelTokenizer(hf_tokenizer)
    longest = max(len(hf_tokenizer.decode([i])) for i in range(len(hf_tokenizer)))
    assert 0 < longest <= tokenizer.max_token_chars
    assert tokenizer.max_token_chars == max(len(t) for t in hf_tokenizer.get_vocab())
    assert ModelTokenizer(object()).max_token_chars == 0  # no vocabulary: no bound


def test_chat_encoding_in_two_steps_is_the_same(hf_tokenizer: Any) -> None:
    tokenizer = ModelTokenizer(hf_tokenizer)
    messages = (ChatMessage("user", "Hi there", None),)
    rendered = tokenizer.render_chat(messages)
    assert tokenizer.encode_rendered_chat(rendered) == tokenizer.encode_chat(messages)


def _metaspace_tokenizer() -> Any:
    """A SentencePiece-style vocabulary (Metaspace pre-tokenizer: "▁" stands for a space),
    whose lone tokens lose their leading space when decoded alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "s": 3, "▁": 4, "▁▁x": 5, "at": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_token_texts_name_tokens_as_vllm_does(hf_tokenizer: Any, kind: str) -> None:
    """The names logprobs give tokens: vLLM's own per-token detokenization, compared here on
    a byte-level vocabulary (the tiny model's) and a SentencePiece one."""
    from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens

    hf = hf_tokenizer if kind == "byte-level" else _metaspace_tokenizer()
    ids = list(range(len(hf))) if kind == "metaspace" else list(range(0, len(hf), 13))
    texts = ModelTokenizer(hf).token_texts(ids)
    assert texts == convert_ids_list_to_tokens(hf, ids)
    if kind == "metaspace":
        assert texts[1:3] == [" the", " cat"]  # the space a lone decode drops, restored
