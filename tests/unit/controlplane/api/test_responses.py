"""Response bodies, SSE chunks and usage: exact shapes."""

from __future__ import annotations

import json

from controlplane.api.responses import (
    SSE_DONE,
    ChatFormatter,
    Choice,
    CompletionFormatter,
    Usage,
    dumps,
    sse_event,
)

USAGE = Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=4, store_tokens=3)
USAGE_DICT = {
    "prompt_tokens": 7,
    "completion_tokens": 3,
    "total_tokens": 10,
    # The standard field, and Strata's split of it beside it.
    "prompt_tokens_details": {
        "cached_tokens": 4,
        "strata_cached_tokens_by_tier": {"engine": 1, "kv_store": 3},
    },
}


def test_usage() -> None:
    assert USAGE.to_dict() == USAGE_DICT


def test_sse_framing() -> None:
    assert sse_event({"a": "é", "b": [1, None]}) == 'data: {"a":"é","b":[1,null]}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert dumps({"x": 1.5}) == '{"x":1.5}'


def test_completion_body_and_chunks() -> None:
    f = CompletionFormatter("cmpl-1", 1700000000, "m", include_usage=False)
    assert f.body([Choice("hi", "length")], USAGE) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}],
        "usage": USAGE_DICT,
    }
    assert f.opening_chunks() == []
    assert f.text_chunk("h", None) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "text": "h", "logprobs": None, "finish_reason": None}],
    }


def test_chat_body() -> None:
    f = ChatFormatter("chatcmpl-1", 5, "m", include_usage=False)
    body = f.body([Choice("hello", "stop")], USAGE)
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == USAGE_DICT


def test_chat_stream_chunks_with_usage() -> None:
    f = ChatFormatter("chatcmpl-1", 5, "m", include_usage=True)
    (opening,) = f.opening_chunks()
    assert opening == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    middle = f.text_chunk("wor", None)
    assert middle["choices"][0]["delta"] == {"content": "wor"}
    assert middle["usage"] is None
    last_with_text = f.text_chunk("ld", "stop")
    assert last_with_text["choices"][0]["delta"] == {"content": "ld"}
    assert last_with_text["choices"][0]["finish_reason"] == "stop"
    last_empty = f.text_chunk("", "length")
    assert last_empty["choices"][0]["delta"] == {}
    usage = f.usage_chunk(USAGE)
    assert usage["choices"] == []
    assert usage["usage"] == USAGE_DICT
    assert usage["object"] == "chat.completion.chunk"
    json.loads(sse_event(usage)[len(b"data: ") :])  # valid JSON on the wire


def test_token_ids_where_vllm_puts_them() -> None:
    completion = CompletionFormatter(
        "cmpl-1", 5, "m", include_usage=False, return_token_ids=True, prompt_token_ids=[1, 2]
    )
    body = completion.body([Choice("hi", "stop", [7, 8])], USAGE)
    assert body["choices"][0]["token_ids"] == [7, 8]
    assert body["choices"][0]["prompt_token_ids"] == [1, 2]
    stream = CompletionFormatter(
        "cmpl-1", 5, "m", include_usage=False, return_token_ids=True, prompt_token_ids=[1, 2]
    )
    first, second = stream.text_chunk("h", None, [7]), stream.text_chunk("", "stop", [8])
    assert (first["choices"][0]["token_ids"], first["choices"][0]["prompt_token_ids"]) == (
        [7],
        [1, 2],
    )
    assert second["choices"][0]["token_ids"] == [8]
    assert "prompt_token_ids" not in second["choices"][0]

    chat = ChatFormatter(
        "chatcmpl-1", 5, "m", include_usage=False, return_token_ids=True, prompt_token_ids=[3]
    )
    (opening,) = chat.opening_chunks()
    assert opening["prompt_token_ids"] == [3]
    assert chat.text_chunk("x", None, [9])["choices"][0]["token_ids"] == [9]
    assert "prompt_token_ids" not in chat.text_chunk("y", None, [10])
    chat_body = ChatFormatter(
        "chatcmpl-1", 5, "m", include_usage=False, return_token_ids=True, prompt_token_ids=[3]
    ).body([Choice("xy", "length", [9, 10])], USAGE)
    assert (chat_body["prompt_token_ids"], chat_body["choices"][0]["token_ids"]) == ([3], [9, 10])


def test_no_token_ids_unless_asked() -> None:
    f = CompletionFormatter("cmpl-1", 5, "m", include_usage=False, prompt_token_ids=[1])
    choice = f.body([Choice("hi", "stop", [7])], USAGE)["choices"][0]
    assert "token_ids" not in choice and "prompt_token_ids" not in choice


def test_n_choices_are_indexed_in_bodies_and_chunks() -> None:
    completion = CompletionFormatter(
        "cmpl-1", 5, "m", include_usage=False, return_token_ids=True, prompt_token_ids=[1]
    )
    body = completion.body([Choice("a", "stop", [4]), Choice("b", "length", [5])], USAGE)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "a", "stop"),
        (1, "b", "length"),
    ]
    # The prompt's ids go with every completions choice (vLLM: with each prompt's choices).
    assert [c["prompt_token_ids"] for c in body["choices"]] == [[1], [1]]
    assert completion.text_chunk("x", None, index=3)["choices"][0]["index"] == 3
    chat = ChatFormatter("chatcmpl-1", 5, "m", include_usage=False)
    openings = chat.opening_chunks(2)
    assert [o["choices"][0]["index"] for o in openings] == [0, 1]
    assert all(o["choices"][0]["delta"] == {"role": "assistant", "content": ""} for o in openings)
    chat_body = chat.body([Choice("x", "stop"), Choice("y", "stop")], USAGE)
    assert [c["message"]["content"] for c in chat_body["choices"]] == ["x", "y"]
