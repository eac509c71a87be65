"""The gateway through the official `openai` SDK: chat and completions, streaming and not."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import grpc
import openai
import pytest
from tokenizers.decoders import DecodeStream

from controlplane.api.openai_protocol import ChatMessage
from controlplane.text.tokenizer import ModelTokenizer
from tests.integration.controlplane.conftest import BLOCK_SIZE, SERVED_MODEL_NAME, Stack
from tests.integration.controlplane.scripted_worker import EOS_TOKEN_ID

PROMPT = "The capital of France is a city with a river and a tower and many bridges"


def test_models_lists_the_served_model(stack: Stack) -> None:
    models = stack.client().models.list()
    assert [m.id for m in models.data] == [SERVED_MODEL_NAME]
    assert models.data[0].object == "model"


def test_completion_stitches_prefill_and_decode(
    stack: Stack, model_tokenizer: ModelTokenizer
) -> None:
    stack.script.num_cached_tokens = 16
    stack.script.num_external_tokens = 12
    result = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10
    )

    assert result.id.startswith("cmpl-")
    assert result.object == "text_completion"
    assert result.model == SERVED_MODEL_NAME
    assert result.choices[0].text == "Hello world!"
    assert result.choices[0].finish_reason == "stop"
    prompt_ids = model_tokenizer.encode_prompt(PROMPT)
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == 8  # seven scripted tokens and EOS
    assert result.usage.total_tokens == len(prompt_ids) + 8
    assert result.usage.prompt_tokens_details is not None
    assert result.usage.prompt_tokens_details.cached_tokens == 16
    # Strata's extension: where the cached tokens came from.
    by_tier = result.usage.prompt_tokens_details.model_extra["strata_cached_tokens_by_tier"]
    assert by_tier == {"engine": 4, "kv_store": 12}

    (prefill,) = stack.prefill.prefill_requests
    assert list(prefill.prompt_token_ids) == prompt_ids
    assert prefill.request_id == result.id
    (decode,) = stack.decode.decode_requests
    first_token = stack.script.token_ids[0]
    assert list(decode.prompt_token_ids) == [*prompt_ids, first_token]  # prompt + first token
    assert decode.sampling.max_tokens == 9
    assert len(decode.block_keys) == len(prompt_ids) // BLOCK_SIZE
    assert decode.request_id == result.id


def test_completion_accepts_token_ids(stack: Stack) -> None:
    result = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=[5, 6, 7, 8], max_tokens=2
    )
    assert result.choices[0].text == "Hell"  # He|ll
    assert result.choices[0].finish_reason == "length"
    assert list(stack.prefill.prefill_requests[0].prompt_token_ids) == [5, 6, 7, 8]
    assert stack.decode.decode_requests[0].sampling.max_tokens == 1


def test_chat_uses_the_chat_template(stack: Stack, model_tokenizer: ModelTokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
        },
    ]
    result = stack.client().chat.completions.create(
        model=SERVED_MODEL_NAME, messages=messages, max_completion_tokens=20, temperature=0
    )
    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == "Hello world!"
    assert result.choices[0].finish_reason == "stop"

    expected_text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    parsed = (ChatMessage("system", "Be brief.", None), ChatMessage("user", ("Hi", "there"), None))
    assert model_tokenizer.render_chat(parsed) == expected_text
    expected_ids = model_tokenizer._tokenizer.encode(expected_text, add_special_tokens=False)
    assert list(stack.prefill.prefill_requests[0].prompt_token_ids) == expected_ids
    assert result.usage is not None and result.usage.prompt_tokens == len(expected_ids)
    assert stack.prefill.prefill_requests[0].sampling.temperature == 0


def test_completion_stream_with_usage(stack: Stack) -> None:
    stack.script.decode_chunk_size = 2
    chunks = list(
        stack.client().completions.create(
            model=SERVED_MODEL_NAME,
            prompt=PROMPT,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == "Hello world!"
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and usage_chunk.usage.completion_tokens == 8


def test_chat_stream_starts_with_the_assistant_role(stack: Stack) -> None:
    stream = stack.client().chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world!"
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_return_token_ids(stack: Stack, model_tokenizer: ModelTokenizer, stream: bool) -> None:
    """vLLM's `return_token_ids`, read the way the e2e tests read it through the SDK."""
    client = stack.client()
    extra = {"return_token_ids": True}
    # A stop string that holds text back ("l") still reports every generated token.
    kwargs: dict[str, Any] = {"max_tokens": 10, "stop": ["lx"], "extra_body": extra}
    expected_ids = [*stack.script.token_ids, EOS_TOKEN_ID]
    prompt_ids = model_tokenizer.encode_prompt(PROMPT)
    if stream:
        chunks = list(
            client.completions.create(model=SERVED_MODEL_NAME, prompt=PROMPT, stream=True, **kwargs)
        )
        token_ids = [t for c in chunks for t in getattr(c.choices[0], "token_ids", None) or []]
        text = "".join(c.choices[0].text for c in chunks)
        assert getattr(chunks[0].choices[0], "prompt_token_ids", None) == prompt_ids
        assert all(getattr(c.choices[0], "prompt_token_ids", None) is None for c in chunks[1:])
    else:
        result = client.completions.create(model=SERVED_MODEL_NAME, prompt=PROMPT, **kwargs)
        token_ids = list(getattr(result.choices[0], "token_ids", None) or [])
        text = result.choices[0].text
        assert getattr(result.choices[0], "prompt_token_ids", None) == prompt_ids
    assert token_ids == expected_ids
    assert text == "Hello world!"

    messages: Any = [{"role": "user", "content": "Hi"}]
    if stream:
        chat_chunks = list(
            client.chat.completions.create(
                model=SERVED_MODEL_NAME, messages=messages, stream=True, extra_body=extra
            )
        )
        chat_ids = [t for c in chat_chunks for t in getattr(c.choices[0], "token_ids", None) or []]
        assert getattr(chat_chunks[0], "prompt_token_ids", None)
    else:
        chat = client.chat.completions.create(
            model=SERVED_MODEL_NAME, messages=messages, extra_body=extra
        )
        chat_ids = list(getattr(chat.choices[0], "token_ids", None) or [])
        assert getattr(chat, "prompt_token_ids", None)
    assert chat_ids == expected_ids


def test_max_tokens_one_needs_no_decode(stack: Stack) -> None:
    result = stack.client().completions.create(model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=1)
    assert result.choices[0].text == "He"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 1
    assert stack.decode.decode_requests == []


def test_eos_from_prefill_ends_the_request(stack: Stack) -> None:
    stack.script.token_ids = []
    result = stack.client().completions.create(model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=5)
    assert result.choices[0].text == ""
    assert result.choices[0].finish_reason == "stop"
    assert stack.decode.decode_requests == []


def test_ignore_eos_runs_to_max_tokens(stack: Stack) -> None:
    result = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].text == "Hello world!"  # then three EOS tokens, no text
    assert result.usage is not None and result.usage.completion_tokens == 10
    assert stack.decode.decode_requests[0].sampling.ignore_eos


def test_stop_string_straddling_prefill_and_decode(stack: Stack) -> None:
    # "He" comes from the prefill worker, "ll" from the decode worker: neither sees "ell".
    stack.script.decode_delay_s = 0.05
    stream = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=20, stop=["ell"], stream=True
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == "H"  # the held-back "e" was never sent
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert list(stack.decode.decode_requests[0].sampling.stop) == ["ell"]
    _wait_for(lambda: stack.decode.num_decodes_cancelled == 1)


def test_stop_string_inside_decode_output(stack: Stack) -> None:
    result = stack.client().chat.completions.create(
        model=SERVED_MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], stop="ld"
    )
    assert result.choices[0].message.content == "Hello wor"
    assert result.choices[0].finish_reason == "stop"


def test_a_character_split_over_the_boundary_is_decoded_like_one_engine(stack: Stack) -> None:
    """Token 116 is one byte of a multi-byte character. Each worker's detokenizer drops it (the
    prefill's stream ends holding it back, the decode's stream takes it as context); the gateway
    decodes all generated tokens in one stream, as a single engine does."""
    stack.script.token_ids = [116, 1692, 105, 860]
    result = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=[5, 6, 7], max_tokens=10, extra_body={"ignore_eos": True}
    )
    one_engine = DecodeStream(ids=[5, 6, 7], skip_special_tokens=True)
    expected = "".join(one_engine.step(stack.tokenizer, t) or "" for t in stack.script.token_ids)
    assert expected.startswith("\ufffd")
    assert result.choices[0].text == expected
    # What stitching the two workers' texts together would have given:
    prefill_stream = DecodeStream(ids=[5, 6, 7], skip_special_tokens=True)
    decode_stream = DecodeStream(ids=[5, 6, 7, 116], skip_special_tokens=True)
    workers_text = (prefill_stream.step(stack.tokenizer, 116) or "") + "".join(
        decode_stream.step(stack.tokenizer, t) or "" for t in stack.script.token_ids[1:]
    )
    assert workers_text != expected


def test_stop_token_ends_without_its_text(stack: Stack) -> None:
    ld = stack.script.token_ids[5]  # He|ll|o| w|or|ld|!
    result = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, extra_body={"stop_token_ids": [ld]}
    )
    assert result.choices[0].text == "Hello wor"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None and result.usage.completion_tokens == 6
    assert list(stack.prefill.prefill_requests[0].sampling.stop_token_ids) == [ld]


def test_held_back_text_is_released_at_the_end(stack: Stack) -> None:
    # " world!" ends with "!", a possible start of the stop string "!?": released at EOS.
    result = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, stop=["!?"]
    )
    assert result.choices[0].text == "Hello world!"
    assert result.choices[0].finish_reason == "stop"


def test_client_disconnect_cancels_the_decode(stack: Stack) -> None:
    stack.script.token_ids = stack.encode(" t0 t1") * 100
    stack.script.decode_delay_s = 0.02
    url = urllib.parse.urlsplit(stack.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    body = {"model": SERVED_MODEL_NAME, "prompt": PROMPT, "max_tokens": 150, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    # Read until the decode worker is streaming (closing earlier cancels the decode rpc before
    # it reaches the worker, which is right but not what this test is about).
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        assert response.readline() == b"\n"
    assert len(stack.decode.decode_requests) == 1
    response.close()  # the socket stays open while the response still references it
    conn.close()
    _wait_for(lambda: stack.decode.num_decodes_cancelled == 1)


def test_worker_failures_map_to_http_statuses(stack: Stack) -> None:
    client = stack.client()
    cases = [
        (grpc.StatusCode.INTERNAL, openai.InternalServerError, 502, "worker_failed"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, openai.InternalServerError, 503, "worker_overloaded"),
        (grpc.StatusCode.INVALID_ARGUMENT, openai.BadRequestError, 400, "worker_rejected_request"),
    ]
    for code, error_class, status, error_code in cases:
        stack.script.prefill_error = code
        with pytest.raises(error_class) as info:
            client.completions.create(model=SERVED_MODEL_NAME, prompt=PROMPT)
        assert info.value.status_code == status
        assert isinstance(info.value.body, dict) and info.value.body["code"] == error_code
    stack.script.prefill_error = None
    assert client.completions.create(model=SERVED_MODEL_NAME, prompt=PROMPT).choices[0].text


def test_decode_failure_mid_stream_sends_an_error_event(stack: Stack) -> None:
    stack.script.decode_error = grpc.StatusCode.INTERNAL
    stack.script.decode_error_after_chunks = 1
    url = urllib.parse.urlsplit(stack.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    body = {"model": SERVED_MODEL_NAME, "prompt": PROMPT, "max_tokens": 10, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    conn.close()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))
    assert error["error"]["code"] == "worker_failed"
    texts = [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-2]]
    assert "".join(texts) == "Hell"  # He (prefill) | ll (first decode chunk), then the failure

    with pytest.raises(openai.APIError):
        list(
            stack.client().completions.create(
                model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, stream=True
            )
        )


def test_health_and_metrics(stack: Stack) -> None:
    stack.client().completions.create(model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10)
    url = urllib.parse.urlsplit(stack.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    conn.request("GET", "/health")
    health = conn.getresponse()
    assert health.status == 200
    assert json.loads(health.read())["status"] == "ok"
    conn.request("GET", "/metrics")
    metrics = conn.getresponse()
    assert metrics.status == 200
    assert metrics.getheader("Content-Type", "").startswith("text/plain")
    text = metrics.read().decode()
    conn.close()
    samples = _samples(text)
    assert samples['strata_gateway_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert samples["strata_gateway_time_to_first_token_seconds_count"] >= 1
    assert samples["strata_gateway_inter_token_latency_seconds_count"] >= 1
    assert samples["strata_gateway_scheduling_decision_seconds_count"] >= 1
    assert samples["strata_gateway_kv_transfer_blocks_total"] >= 1
    assert samples["strata_gateway_kv_transfer_tokens_total"] >= BLOCK_SIZE
    assert samples["strata_gateway_completion_tokens_total"] >= 4
    assert samples["strata_gateway_prompt_tokens_total"] >= 1
    ready = f'strata_gateway_worker_ready{{endpoint="{stack.decode.endpoint}",role="decode"}}'
    assert samples[ready] == 1


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _wait_for(condition, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _post_json(stack: Stack, path: str, body: object) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        stack.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_tokenize_counts_what_a_request_would_send(
    stack: Stack, model_tokenizer: ModelTokenizer
) -> None:
    status, body = _post_json(stack, "/tokenize", {"model": SERVED_MODEL_NAME, "prompt": PROMPT})
    assert status == 200
    ids = model_tokenizer.encode_prompt(PROMPT)
    assert body["tokens"] == ids and body["count"] == len(ids) and body["token_strs"] is None
    assert body["max_model_len"] > 0
    # Without special tokens, and each token's vocabulary entry.
    status, bare = _post_json(
        stack,
        "/tokenize",
        {"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True},
    )
    assert status == 200 and bare["tokens"] == model_tokenizer.encode_prompt(
        PROMPT, add_special_tokens=False
    )
    assert len(bare["token_strs"]) == bare["count"]
    # A chat: the template's prompt, as /v1/chat/completions sends it.
    messages = [{"role": "user", "content": PROMPT}]
    status, chat = _post_json(stack, "/tokenize", {"messages": messages})
    assert status == 200
    assert chat["tokens"] == model_tokenizer.encode_chat((ChatMessage("user", PROMPT, None),))


def test_detokenize_gives_the_text_back(stack: Stack, model_tokenizer: ModelTokenizer) -> None:
    ids = model_tokenizer.encode_prompt(PROMPT, add_special_tokens=False)
    status, body = _post_json(stack, "/detokenize", {"model": SERVED_MODEL_NAME, "tokens": ids})
    assert (status, body) == (200, {"prompt": PROMPT})


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ("/tokenize", {}, "messages"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
        ("/tokenize", {"prompt": "x", "chat_template": "{{ x }}"}, "chat_template"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                       "continue_final_message": True}, "continue_final_message"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ],
)  # fmt: skip
def test_bad_tokenize_requests_name_the_field(
    stack: Stack, path: str, body: dict[str, Any], param: str
) -> None:
    status, answer = _post_json(stack, path, body)
    assert status in (400, 404) and answer["error"]["param"] == param, answer


def test_version_is_strata_s(stack: Stack) -> None:
    from importlib import metadata

    with urllib.request.urlopen(f"{stack.url}/version", timeout=10) as response:
        assert json.loads(response.read()) == {"version": metadata.version("strata-serve")}


def test_a_seeded_sample_s_first_token_comes_from_the_decode_engine(
    stack: Stack, model_tokenizer: ModelTokenizer
) -> None:
    """A seeded generator's draws run from the first token on: the prefill still computes and
    saves the prompt's blocks, but the decode engine samples every token (its prompt is the
    prompt alone), as one engine would (docs/design/openai-surface.md §2)."""
    stack.script.num_cached_tokens = 16
    result = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0.7, seed=1234
    )
    assert result.choices[0].text == "Hello world!"  # every scripted token, once
    assert result.usage is not None and result.usage.completion_tokens == 8
    assert result.usage.prompt_tokens_details is not None
    assert result.usage.prompt_tokens_details.cached_tokens == 16  # the prefill's hits
    prompt_ids = model_tokenizer.encode_prompt(PROMPT)
    (prefill,) = stack.prefill.prefill_requests
    assert list(prefill.prompt_token_ids) == prompt_ids  # computed and saved, its token dropped
    (decode,) = stack.decode.decode_requests
    assert list(decode.prompt_token_ids) == prompt_ids  # not prompt + first token
    assert decode.sampling.max_tokens == 10 and decode.sampling.seed == 1234
    assert len(decode.block_keys) == len(prompt_ids) // BLOCK_SIZE
    # Greedy with a seed has no generator state: the prefill's token is used as before.
    stack.prefill.prefill_requests.clear()
    stack.decode.decode_requests.clear()
    stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, seed=1234
    )
    (greedy,) = stack.decode.decode_requests
    assert list(greedy.prompt_token_ids) == [*prompt_ids, stack.script.token_ids[0]]


def test_min_tokens_beyond_the_default_max_tokens_is_400(stack: Stack) -> None:
    """Completions generate 16 tokens when max_tokens is left out: min_tokens 100 cannot hold."""
    status, body = _post_json(
        stack, "/v1/completions", {"model": SERVED_MODEL_NAME, "prompt": "x", "min_tokens": 100}
    )
    assert status == 400 and body["error"]["param"] == "min_tokens", body
    assert stack.prefill.prefill_requests == []
