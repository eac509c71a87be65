"""The OpenAI surface through Strata (real prefill and decode engines, the tiny model) against
one plain vLLM engine (issue "A drop-in OpenAI endpoint", acceptance 2):
- logprobs and top_logprobs equal one engine's to 1e-3 for every token, the first (the prefill
  engine's) included, in chat and completions, streaming and not;
- ``n`` = 3 with a seed: three answers equal to one engine's ``n`` = 3 with the same seed;
- ``response_format`` json_schema with penalties and ``logit_bias``: token for token one
  engine's (greedy). (That every answer validates is not tested with the tiny model: vLLM's JSON
  grammar allows whitespace anywhere, and a gibberish model pads with it until ``max_tokens``.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from controlplane.text.tokenizer import ModelTokenizer
from tests.e2e.conftest import StrataServer, run_reference
from tests.e2e.test_disaggregated import CHATS, PROMPTS

MAX_TOKENS = 12
TOP = 5
TOLERANCE = 1e-3
SAMPLES = {"n": 3, "seed": 7, "temperature": 0.9, "top_p": 0.95, "ignore_eos": True}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {"enum": [1, 2, 3]},
    },
    "required": ["color", "ok", "size"],
    "additionalProperties": False,
}
STRUCTURED_TOKENS = 96
STRUCTURED_PENALIZED = {
    "presence_penalty": 0.8,
    "frequency_penalty": 0.4,
    "logit_bias": {"17": 4.0, "42": -50.0},
}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, list[dict[str, Any]]]:
    sampling = {"logprobs": TOP}
    requests: list[dict[str, Any]] = [
        {"kind": "completion", "prompt": p, "max_tokens": MAX_TOKENS, "sampling": sampling}
        for p in PROMPTS[1:4]
    ] + [
        {"kind": "chat", "messages": m, "max_tokens": MAX_TOKENS, "sampling": sampling}
        for m in CHATS
    ]
    requests.append(
        {"kind": "completion", "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS, "sampling": SAMPLES}
    )
    # What vLLM's server makes of response_format json_schema.
    structured = {"structured_outputs": {"json": SCHEMA}, **STRUCTURED_PENALIZED}
    requests += [
        {"kind": "chat", "messages": m, "max_tokens": STRUCTURED_TOKENS, "sampling": structured}
        for m in CHATS
    ]
    results = run_reference(tiny_model_dir, requests)
    return {
        "completions": results[:3],
        "chats": results[3:5],
        "samples": results[5:6],
        "structured": results[6:8],
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_model_dir(tiny_model_dir)


def _client(server: StrataServer) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _assert_close(
    got: list[tuple[str, float, list[tuple[str, float]]]],
    ref: dict[str, Any],
    tokenizer: ModelTokenizer,
) -> None:
    """``got``: per token (its text, logprob, [(top text, logprob)]); ``ref``: the engine's."""
    expected = ref["logprobs"]
    assert len(got) == len(expected) == len(ref["token_ids"])
    names = tokenizer.token_texts
    for i, ((token, logprob, top), (ref_logprob, ref_top)) in enumerate(
        zip(got, expected, strict=True)
    ):
        assert token == names([ref["token_ids"][i]])[0], i
        assert logprob == pytest.approx(ref_logprob, abs=TOLERANCE), i
        assert [t for t, _ in top] == names([t for t, _ in ref_top]), i
        assert [v for _, v in top] == pytest.approx([v for _, v in ref_top], abs=TOLERANCE), i


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_chat_logprobs_equal_one_engine(
    tiny_server: StrataServer,
    reference: dict[str, list[dict[str, Any]]],
    tokenizer: ModelTokenizer,
    stream: bool,
) -> None:
    client = _client(tiny_server)
    for messages, ref in zip(CHATS, reference["chats"], strict=True):
        kwargs: dict[str, Any] = dict(
            model=tiny_server.model,
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            logprobs=True,
            top_logprobs=TOP,
        )
        content: list[Any] = []
        if stream:
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for choice in chunk.choices:
                    if choice.logprobs is not None:
                        content += choice.logprobs.content or []
        else:
            logprobs = client.chat.completions.create(**kwargs).choices[0].logprobs
            assert logprobs is not None
            content = logprobs.content or []
        got = [
            (c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs]) for c in content
        ]
        _assert_close(got, ref, tokenizer)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_completion_logprobs_equal_one_engine(
    tiny_server: StrataServer,
    reference: dict[str, list[dict[str, Any]]],
    tokenizer: ModelTokenizer,
    stream: bool,
) -> None:
    client = _client(tiny_server)
    for prompt, ref in zip(PROMPTS[1:4], reference["completions"], strict=True):
        kwargs: dict[str, Any] = dict(
            model=tiny_server.model,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            logprobs=TOP,
        )
        tokens: list[str] = []
        token_logprobs: list[float] = []
        tops: list[dict[str, float]] = []
        pieces = []
        if stream:
            pieces = [
                chunk.choices[0].logprobs
                for chunk in client.completions.create(stream=True, **kwargs)
                if chunk.choices and chunk.choices[0].logprobs is not None
            ]
        else:
            pieces = [client.completions.create(**kwargs).choices[0].logprobs]
        for piece in pieces:
            assert piece is not None
            tokens += piece.tokens or []
            token_logprobs += piece.token_logprobs or []
            tops += piece.top_logprobs or []
        # Completions name the top tokens by text, in an object: tokens of one text (byte
        # pieces decode alone to "\ufffd") are one entry, the first one's (vLLM's server, too).
        got = [(token, logprob, []) for token, logprob in zip(tokens, token_logprobs, strict=True)]
        _assert_close(got, {**ref, "logprobs": [[v, []] for v, _ in ref["logprobs"]]}, tokenizer)
        names = tokenizer.token_texts
        assert len(tops) == len(ref["logprobs"])
        for i, (top, (ref_logprob, ref_top)) in enumerate(zip(tops, ref["logprobs"], strict=True)):
            expected = {names([ref["token_ids"][i]])[0]: ref_logprob}
            for t, v in ref_top:  # the sampled token's entry first, then the top ones
                expected.setdefault(names([t])[0], v)
            assert list(top) == list(expected), i
            assert list(top.values()) == pytest.approx(list(expected.values()), abs=TOLERANCE), i


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_n_seeded_samples_equal_one_engine_s(
    tiny_server: StrataServer, reference: dict[str, list[dict[str, Any]]], stream: bool
) -> None:
    """Sample i draws with seed + i on a decode engine that samples every token: vLLM's child i
    of an ``n`` = 3 request does the same."""
    (ref,) = reference["samples"]
    kwargs: dict[str, Any] = dict(
        model=tiny_server.model,
        prompt=PROMPTS[2],
        max_tokens=MAX_TOKENS,
        n=SAMPLES["n"],
        seed=SAMPLES["seed"],
        temperature=SAMPLES["temperature"],
        top_p=SAMPLES["top_p"],
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    samples: dict[int, list[int]] = {i: [] for i in range(SAMPLES["n"])}
    if stream:
        for chunk in _client(tiny_server).completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                samples[choice.index] += getattr(choice, "token_ids", None) or []
    else:
        for choice in _client(tiny_server).completions.create(**kwargs).choices:
            samples[choice.index] = list(getattr(choice, "token_ids", None) or [])
    assert [samples[i] for i in range(SAMPLES["n"])] == ref["samples"]
    assert len({tuple(s) for s in ref["samples"]}) == SAMPLES["n"]  # three different answers


RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}


def test_json_schema_with_penalties_and_bias_equals_one_engine(
    tiny_server: StrataServer, reference: dict[str, list[dict[str, Any]]]
) -> None:
    """Greedy, under the schema, with output-count penalties and a bias: the decode engine
    samples every token with the grammar from its start, as one engine does."""
    client = _client(tiny_server)
    for messages, ref in zip(CHATS, reference["structured"], strict=True):
        answer = client.chat.completions.create(
            model=tiny_server.model,
            messages=messages,
            max_tokens=STRUCTURED_TOKENS,
            temperature=0,
            response_format=RESPONSE_FORMAT,
            extra_body={"return_token_ids": True, **STRUCTURED_PENALIZED},
        )
        choice = answer.choices[0]
        assert list(getattr(choice, "token_ids", None) or []) == ref["token_ids"]
        assert choice.message.content == ref["text"]
