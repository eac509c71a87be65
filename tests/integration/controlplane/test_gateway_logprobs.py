"""logprobs through the gateway (scripted workers: each output token i has logprob -(i+1)/4 and
is the most likely; the top tokens are the ids after it, 1 lower each), and the penalties'
hand-over rule. Exactness against one engine is the e2e tests' (tests/e2e)."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.text.tokenizer import ModelTokenizer
from tests.integration.controlplane.conftest import SERVED_MODEL_NAME, Stack
from tests.integration.controlplane.scripted_worker import DEFAULT_TEXT, EOS_TOKEN_ID

PROMPT = "The capital of France is a city with a river and a tower and many bridges"
NUM_TOKENS = 8  # the seven scripted tokens and EOS


def _expected(stack: Stack, tokenizer: ModelTokenizer, top: int) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` the script makes, token by token."""
    ids = [*stack.script.token_ids, EOS_TOKEN_ID]
    out = []
    for i, token_id in enumerate(ids):
        own = -(i + 1) / 4
        top_ids = [(token_id + k) % 1000 for k in range(top)]
        names = tokenizer.token_texts([token_id, *top_ids])
        out.append(
            {
                "token": names[0],
                "logprob": own,
                "bytes": list(names[0].encode()),
                "top_logprobs": [
                    {"token": n, "logprob": own - k, "bytes": list(n.encode())}
                    for k, n in enumerate(names[1:])
                ],
            }
        )
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_chat_logprobs_of_every_token_the_first_one_from_the_prefill(
    stack: Stack, model_tokenizer: ModelTokenizer, stream: bool
) -> None:
    stack.script.decode_chunk_size = 3
    kwargs: dict[str, Any] = dict(
        model=SERVED_MODEL_NAME,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=10,
        logprobs=True,
        top_logprobs=2,
    )
    if stream:
        content: list[Any] = []
        text = ""
        for chunk in stack.client().chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.logprobs is not None:
                    content += choice.logprobs.content or []
    else:
        result = stack.client().chat.completions.create(**kwargs)
        text = result.choices[0].message.content or ""
        assert result.choices[0].logprobs is not None
        content = result.choices[0].logprobs.content or []
    assert text == DEFAULT_TEXT
    assert [c.model_dump() for c in content] == _expected(stack, model_tokenizer, 2)
    # The first token's logprobs are the prefill's: it was asked for them, and the decode
    # continued after its token as usual.
    (prefill,) = stack.prefill.prefill_requests
    (decode,) = stack.decode.decode_requests
    assert prefill.sampling.logprobs == decode.sampling.logprobs == 2
    assert len(decode.prompt_token_ids) == len(prefill.prompt_token_ids) + 1


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_completion_logprobs_count_offsets_over_the_whole_answer(
    stack: Stack, model_tokenizer: ModelTokenizer, stream: bool
) -> None:
    stack.script.decode_chunk_size = 2
    kwargs: dict[str, Any] = dict(model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, logprobs=1)
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top: list[dict[str, float]] = []
    offsets: list[int] = []
    if stream:
        for chunk in stack.client().completions.create(stream=True, **kwargs):
            lp = chunk.choices[0].logprobs
            if lp is not None:
                tokens += lp.tokens or []
                token_logprobs += lp.token_logprobs or []
                top += lp.top_logprobs or []
                offsets += lp.text_offset or []
    else:
        lp = stack.client().completions.create(**kwargs).choices[0].logprobs
        assert lp is not None
        tokens, token_logprobs = lp.tokens or [], lp.token_logprobs or []
        top, offsets = lp.top_logprobs or [], lp.text_offset or []
    expected = _expected(stack, model_tokenizer, 1)
    assert tokens == [e["token"] for e in expected]
    assert token_logprobs == [e["logprob"] for e in expected]
    # The sampled token, then the most likely one (here the same: one entry).
    assert top == [{e["token"]: e["logprob"]} for e in expected]
    starts = [sum(len(t) for t in tokens[:i]) for i in range(NUM_TOKENS)]
    assert offsets == starts


def test_completion_logprobs_zero_is_the_sampled_token_s_alone(stack: Stack) -> None:
    lp = (
        stack.client()
        .completions.create(model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, logprobs=0)
        .choices[0]
        .logprobs
    )
    assert lp is not None and lp.top_logprobs is not None
    assert [len(step) for step in lp.top_logprobs] == [1] * NUM_TOKENS
    assert stack.prefill.prefill_requests[0].sampling.logprobs == 0
    assert stack.prefill.prefill_requests[0].sampling.HasField("logprobs")


def test_no_logprobs_unless_asked(stack: Stack) -> None:
    result = stack.client().chat.completions.create(
        model=SERVED_MODEL_NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=10
    )
    assert result.choices[0].logprobs is None
    assert not stack.prefill.prefill_requests[0].sampling.HasField("logprobs")
    assert not stack.decode.decode_requests[0].sampling.HasField("logprobs")


def test_top_logprobs_without_logprobs_is_400(stack: Stack) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        stack.client().chat.completions.create(
            model=SERVED_MODEL_NAME, messages=[{"role": "user", "content": "x"}], top_logprobs=3
        )
    assert info.value.body is not None and info.value.body["param"] == "top_logprobs"  # type: ignore[index]


@pytest.mark.parametrize(
    "penalties",
    [{"presence_penalty": 0.5}, {"frequency_penalty": -0.3}],
    ids=["presence", "frequency"],
)
def test_output_count_penalties_make_the_decode_sample_the_first_token(
    stack: Stack, model_tokenizer: ModelTokenizer, penalties: dict[str, float]
) -> None:
    """The decode engine counts only its own output: it samples every token, the prefill's
    dropped (docs/design/openai-surface.md §2); a bias alone has no state and changes nothing."""
    result = stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, extra_body=penalties
    )
    assert result.choices[0].text == DEFAULT_TEXT
    prompt_ids = model_tokenizer.encode_prompt(PROMPT)
    (decode,) = stack.decode.decode_requests
    assert list(decode.prompt_token_ids) == prompt_ids
    ((name, value),) = penalties.items()
    assert getattr(decode.sampling, name) == pytest.approx(value)
    stack.decode.decode_requests.clear()
    stack.client().completions.create(
        model=SERVED_MODEL_NAME, prompt=PROMPT, max_tokens=10, logit_bias={"5": -3}
    )
    (biased,) = stack.decode.decode_requests
    assert list(biased.prompt_token_ids) == [*prompt_ids, stack.script.token_ids[0]]
    assert dict(biased.sampling.logit_bias) == {5: -3.0}
    assert dict(stack.prefill.prefill_requests[-1].sampling.logit_bias) == {5: -3.0}
