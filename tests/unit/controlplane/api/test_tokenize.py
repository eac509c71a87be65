"""/tokenize and /detokenize requests: vLLM's fields and defaults."""

from __future__ import annotations

import pytest

from controlplane.api.openai_protocol import ChatMessage, OpenAIError
from controlplane.api.sampling import RequestLimits
from controlplane.api.tokenize import parse_detokenize_request, parse_tokenize_request

M = "m"


def test_a_prompt_gets_special_tokens_a_chat_its_generation_prompt() -> None:
    prompt = parse_tokenize_request({"prompt": "hi"}, served_model_name=M)
    assert (prompt.prompt, prompt.add_special_tokens, prompt.return_token_strs) == (
        "hi",
        True,
        False,
    )
    chat = parse_tokenize_request(
        {"model": M, "messages": [{"role": "user", "content": "hi"}]}, served_model_name=M
    )
    assert chat.prompt is None and chat.messages == (ChatMessage("user", "hi", None),)
    assert (chat.add_special_tokens, chat.add_generation_prompt) == (False, True)
    open_end = parse_tokenize_request(
        {
            "messages": [{"role": "assistant", "content": "Once"}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
        served_model_name=M,
    )
    assert (open_end.add_generation_prompt, open_end.continue_final_message) == (False, True)


def test_detokenize_takes_ids_of_the_vocabulary() -> None:
    limits = RequestLimits(max_model_len=64, vocab_size=100)
    parsed = parse_detokenize_request({"tokens": [0, 99]}, served_model_name=M, limits=limits)
    assert parsed.tokens == (0, 99)
    with pytest.raises(OpenAIError) as info:
        parse_detokenize_request({"tokens": [100]}, served_model_name=M, limits=limits)
    assert (info.value.status, info.value.param) == (400, "tokens")
    with pytest.raises(OpenAIError) as info:
        parse_detokenize_request({"tokens": [True]}, served_model_name=M, limits=limits)
    assert info.value.param == "tokens"


def test_a_chat_s_tools_go_to_its_template() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    chat = parse_tokenize_request(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}, served_model_name=M
    )
    assert chat.tools == [
        {
            "type": "function",
            "function": {"name": "f", "description": None, "parameters": {"type": "object"}},
        }
    ]
    with pytest.raises(OpenAIError) as info:
        parse_tokenize_request(
            {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "x"}]},
            served_model_name=M,
        )
    assert info.value.param == "tools"
