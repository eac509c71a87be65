"""``n`` > 1 through the gateway (scripted workers): one prefill, ``n`` decodes that each sample
every token from the prompt's blocks, sample i with seed + i (docs/design/openai-surface.md)."""

from __future__ import annotations

from collections import defaultdict

import grpc
import openai
import pytest

from controlplane.text.tokenizer import ModelTokenizer
from tests.integration.controlplane.conftest import SERVED_MODEL_NAME, Stack
from tests.integration.controlplane.scripted_worker import DEFAULT_TEXT

PROMPT = "The capital of France is a city with a river and a tower and many bridges"


def test_n_completions_share_one_prefill(stack: Stack, model_tokenizer: ModelTokenizer) -> None:
    result = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, n=3, temperature=0.8, seed=40
    )
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert [c.text for c in result.choices] == [DEFAULT_TEXT] * 3
    assert result.usage is not None and result.usage.completion_tokens == 3 * 8
    assert result.usage.prompt_tokens == len(model_tokenizer.encode_prompt(PROMPT))
    (prefill,) = stack.prefill.prefill_requests  # one prefill for the three samples
    decodes = sorted(stack.decode.decode_requests, key=lambda d: d.request_id)
    assert [d.request_id for d in decodes] == [f"{result.id}-{i}" for i in range(3)]
    assert [d.sampling.seed for d in decodes] == [40, 41, 42]  # vLLM's children's seeds
    for decode in decodes:  # each samples its first token itself
        assert list(decode.prompt_token_ids) == list(prefill.prompt_token_ids)
        assert decode.sampling.max_tokens == 10


def test_n_chat_stream_interleaves_indexed_choices(stack: Stack) -> None:
    stack.script.decode_chunk_size = 2
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, str | None] = {}
    roles = []
    for chunk in stack.client().chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=10,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.index)
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == 2 * 8
    assert roles == [0, 1]
    assert dict(texts) == {0: DEFAULT_TEXT, 1: DEFAULT_TEXT}
    assert finishes == {0: "stop", 1: "stop"}
    assert len(stack.prefill.prefill_requests) == 1
    assert len(stack.decode.decode_requests) == 2


def test_a_failed_sample_fails_the_request(stack: Stack) -> None:
    """All choices or none: a decode that fails (not a worker death: no failover) ends it."""
    stack.script.decode_error = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(openai.APIStatusError):
        stack.client().completions.create(
            model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, n=3
        )
    stack.script.decode_error = None
    assert (
        stack.client()
        .completions.create(model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, n=2)
        .choices[1]
        .text
        == DEFAULT_TEXT
    )


def test_structured_output_is_the_decode_engine_s_from_the_first_token(stack: Stack) -> None:
    """A grammar's state starts at the first token: the decode engine samples every token under
    the constraint (docs/design/openai-surface.md §2)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    stack.client().chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=10,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    (prefill,) = stack.prefill.prefill_requests
    (decode,) = stack.decode.decode_requests
    assert list(decode.prompt_token_ids) == list(prefill.prompt_token_ids)
    assert decode.sampling.structured.WhichOneof("constraint") == "json_schema"
    assert decode.sampling.structured.json_schema == (
        '{"type":"object","properties":{"a":{"type":"integer"}}}'
    )


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_a_batch_of_prompts_with_n_and_echo(
    stack: Stack, model_tokenizer: ModelTokenizer, stream: bool
) -> None:
    """Two prompts (one as token ids) x n = 2: choice i * 2 + j is prompt i's sample j, its text
    starting with its prompt's (echo); usage counts each prompt once."""
    second = model_tokenizer.encode_prompt("A second prompt about rivers and bridges")
    kwargs = dict(
        model=SERVED_MODEL_NAME,
        prompt=[PROMPT, second],
        max_tokens=10,
        n=2,
        echo=True,
        extra_body={"return_token_ids": True},
    )
    texts: dict[int, str] = defaultdict(str)
    prompt_ids: dict[int, list[int]] = {}
    if stream:
        usage = None
        for chunk in stack.client().completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        ):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                if getattr(choice, "prompt_token_ids", None):
                    prompt_ids[choice.index] = choice.prompt_token_ids
    else:
        result = stack.client().completions.create(**kwargs)
        usage = result.usage
        for choice in result.choices:
            texts[choice.index] = choice.text
            prompt_ids[choice.index] = getattr(choice, "prompt_token_ids", None)
    first = model_tokenizer.encode_prompt(PROMPT)
    echoed = [PROMPT, model_tokenizer.decode(second)]
    assert dict(texts) == {i: echoed[i // 2] + DEFAULT_TEXT for i in range(4)}
    assert prompt_ids == {0: first, 1: first, 2: second, 3: second}
    assert usage is not None
    assert usage.prompt_tokens == len(first) + len(second)
    assert usage.completion_tokens == 4 * 8
    assert len(stack.prefill.prefill_requests) == 2  # one per prompt
    assert len(stack.decode.decode_requests) == 4


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_stop_strings_wait_for_min_tokens(stack: Stack, stream: bool) -> None:
    """vLLM's rule: a stop string counts once it ends in the text of a token past min_tokens
    (He|ll|o| w|or|ld|!: "l" in token 1 is too early with min_tokens 3, the one in token 5
    is not)."""
    kwargs = dict(model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, stop=["l"])
    plain = stack.client().completions.create(**kwargs)
    assert plain.choices[0].text == "He"
    body = {**kwargs, "extra_body": {"min_tokens": 3}}
    if stream:
        chunks = list(stack.client().completions.create(stream=True, **body))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        answer = stack.client().completions.create(**body).choices[0]
        text, finish = answer.text, answer.finish_reason
    assert (text, finish) == ("Hello wor", "stop")
