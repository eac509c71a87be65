"""logprobs and top_logprobs through Strata (real prefill and decode engines, the tiny model)
equal one engine's to 1e-3 for every token, the first (the prefill engine's) included, in chat
and completions, streaming and not (issue "A drop-in OpenAI endpoint", acceptance 2)."""

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
    results = run_reference(tiny_model_dir, requests)
    return {"completions": results[:3], "chats": results[3:]}


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
