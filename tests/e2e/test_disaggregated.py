"""Disaggregated serving, end to end, with real vLLM engines and the tiny seeded model.

- Greedy output through the gateway (prefill engine -> store -> decode engine) is token-identical to
  one plain vLLM engine, streaming and not, completions and chat, driven by the official SDK.
- Negative control: noise in place of the stored KV changes the decode engine's output.
- The decode worker's counters show the prompt blocks were loaded, not recomputed.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from strata_proto import worker_pb2
from tests.e2e.conftest import StrataServer, run_reference

MAX_TOKENS = 24
BLOCK_SIZE = 128  # vLLM's CPU block size
_WORDS = "cache block token prefill decode engine memory store paris river tower seven".split()


def make_text(seed: int, num_words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


# Lengths chosen to cover: shorter than a block, just past one block, and several blocks.
PROMPTS = [make_text(i, n) for i, n in enumerate((3, 40, 140, 300, 700))]
CHATS = [
    [{"role": "user", "content": make_text(10, 20)}],
    [
        {"role": "system", "content": make_text(11, 250)},
        {"role": "user", "content": make_text(12, 30)},
    ],
]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, list[dict[str, Any]]]:
    requests: list[dict[str, Any]] = [
        {"kind": "completion", "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True}
        for p in PROMPTS
    ] + [
        {"kind": "chat", "messages": m, "max_tokens": MAX_TOKENS, "ignore_eos": True} for m in CHATS
    ]
    requests += [
        {"kind": "completion", "prompt": p, "max_tokens": MAX_TOKENS, "sampling": s}
        for p, s in zip(EXTENSION_PROMPTS, SAMPLING_EXTENSIONS, strict=True)
    ]
    results = run_reference(tiny_model_dir, requests)
    chats_end = len(PROMPTS) + len(CHATS)
    return {
        "completions": results[: len(PROMPTS)],
        "chats": results[len(PROMPTS) : chats_end],
        "extensions": results[chats_end:],
    }


def _client(server: StrataServer) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


EXTRA = {"ignore_eos": True, "return_token_ids": True}
SAMPLING_EXTENSIONS: list[dict[str, Any]] = [
    # Changes greedy output (the prompt's words are penalized), and through the split: the
    # decode engine sees the first token in its prompt, one engine in its output; both count.
    {"repetition_penalty": 1.8, "top_k": 5, "min_p": 0.05},
    # EOS suppressed until 20 tokens, the first of them sampled by the prefill engine.
    {"min_tokens": 20, "repetition_penalty": 0.7},
    # A seeded sample: the decode engine samples every token (the seed's draws from the first).
    {"temperature": 0.9, "top_p": 0.95, "seed": 7, "ignore_eos": True},
    # Penalties on the output's token counts: the decode engine samples every token (the first
    # one handed over would be in its prompt, not counted).
    {"presence_penalty": 1.5, "frequency_penalty": 1.0, "ignore_eos": True},
    # A bias has no state: both engines apply it.
    {"logit_bias": {"17": 8.0, "42": 6.0, "99": -100.0}, "ignore_eos": True},
    # Stop strings count once they end past min_tokens (the gateway's matcher, vLLM's rule).
    {"min_tokens": 6, "stop": [" ", "e", "a"], "ignore_eos": True},
]
EXTENSION_PROMPTS = [PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[1], PROMPTS[2], PROMPTS[3]]


def test_prompts_span_several_blocks(reference: dict[str, list[dict[str, Any]]]) -> None:
    lengths = [len(r["prompt_token_ids"]) for r in reference["completions"]]
    assert min(lengths) < BLOCK_SIZE
    assert max(lengths) >= 3 * BLOCK_SIZE, lengths
    assert len(set(lengths)) == len(lengths)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_completions_match_single_engine(
    tiny_server: StrataServer, reference: dict[str, list[dict[str, Any]]], stream: bool
) -> None:
    client = _client(tiny_server)
    for prompt, ref in zip(PROMPTS, reference["completions"], strict=True):
        if stream:
            token_ids: list[int] = []
            text = ""
            for chunk in client.completions.create(
                model=tiny_server.model,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                extra_body=EXTRA,
            ):
                for choice in chunk.choices:
                    token_ids += getattr(choice, "token_ids", None) or []
                    text += choice.text
        else:
            resp = client.completions.create(
                model=tiny_server.model,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body=EXTRA,
            )
            token_ids = list(getattr(resp.choices[0], "token_ids", None) or [])
            text = resp.choices[0].text
            assert resp.usage is not None
            assert resp.usage.prompt_tokens == len(ref["prompt_token_ids"])
            assert resp.usage.completion_tokens == MAX_TOKENS
        assert token_ids == ref["token_ids"]
        assert text == ref["text"]


def test_vllm_sampling_extensions_match_single_engine(
    tiny_server: StrataServer, reference: dict[str, list[dict[str, Any]]]
) -> None:
    """top_k, min_p, repetition_penalty, min_tokens, presence and frequency penalties and
    logit_bias reach both engines and the answer is one engine's, token for token (greedy); so
    is a seeded sample's."""
    client = _client(tiny_server)
    refs = reference["extensions"]
    cases = zip(EXTENSION_PROMPTS, SAMPLING_EXTENSIONS, refs, strict=True)
    for prompt, extension, ref in cases:
        resp = client.completions.create(
            model=tiny_server.model,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            extra_body={"return_token_ids": True, "temperature": 0, **extension},
        )
        assert list(getattr(resp.choices[0], "token_ids", None) or []) == ref["token_ids"]
        assert resp.choices[0].text == ref["text"]
    assert 6 < len(refs[5]["token_ids"]) < MAX_TOKENS  # a stop string ended it past min_tokens
    # Each penalty and the bias changed the answer (else this test could not fail).
    for i in (0, 3, 4):
        plain = reference["completions"][PROMPTS.index(EXTENSION_PROMPTS[i])]["token_ids"]
        assert refs[i]["token_ids"] != plain[: len(refs[i]["token_ids"])], SAMPLING_EXTENSIONS[i]


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_chat_matches_single_engine(
    tiny_server: StrataServer, reference: dict[str, list[dict[str, Any]]], stream: bool
) -> None:
    client = _client(tiny_server)
    for messages, ref in zip(CHATS, reference["chats"], strict=True):
        if stream:
            token_ids: list[int] = []
            text = ""
            for chunk in client.chat.completions.create(
                model=tiny_server.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                extra_body=EXTRA,
            ):
                for choice in chunk.choices:
                    token_ids += getattr(choice, "token_ids", None) or []
                    text += choice.delta.content or ""
        else:
            resp = client.chat.completions.create(
                model=tiny_server.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body=EXTRA,
            )
            token_ids = list(getattr(resp.choices[0], "token_ids", None) or [])
            text = resp.choices[0].message.content or ""
        assert token_ids == ref["token_ids"]
        assert text == ref["text"]


def _stubs(server: StrataServer) -> tuple[Any, Any]:
    return server.worker_stub(server.prefill), server.worker_stub(server.decode)


def _disaggregated_tokens(
    server: StrataServer, prompt: list[int], max_tokens: int, request_id: str, corrupt: bool
) -> tuple[list[int], worker_pb2.DecodeChunk]:
    """Prefill, optionally replace the stored blocks with other numbers, then decode."""
    prefill, decode = _stubs(server)
    greedy = worker_pb2.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    first = prefill.Prefill(
        worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, sampling=greedy)
    )
    assert len(first.block_keys) == len(prompt) // BLOCK_SIZE
    if corrupt:
        with server.store_client() as store:
            for key in first.block_keys:
                data = store.get(key)
                assert data is not None, "the prefill worker did not store its blocks"
                # Same size and a valid checksum, but other KV: bytes reversed.
                assert store.delete([key]) == 1
                store.put(key, data[::-1])
    tokens = [first.first_token_id]
    last = worker_pb2.DecodeChunk()
    greedy.max_tokens = max_tokens - 1
    for chunk in decode.Decode(
        worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=[*prompt, first.first_token_id],
            sampling=greedy,
        )
    ):
        tokens += list(chunk.token_ids)
        last = chunk
    return tokens, last


def _token_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


def test_corrupted_kv_changes_output(tiny_server: StrataServer, tiny_model_dir: Path) -> None:
    good_prompt, bad_prompt = _token_prompt(100, 3 * BLOCK_SIZE + 20), _token_prompt(101, 400)
    ref = run_reference(
        tiny_model_dir,
        [
            {"kind": "tokens", "prompt_token_ids": p, "max_tokens": 12, "ignore_eos": True}
            for p in (good_prompt, bad_prompt)
        ],
    )
    good, good_last = _disaggregated_tokens(tiny_server, good_prompt, 12, "neg-ctl-good", False)
    bad, bad_last = _disaggregated_tokens(tiny_server, bad_prompt, 12, "neg-ctl-bad", True)
    # Both requests really loaded their prompt blocks from the store...
    assert good_last.num_external_tokens == 3 * BLOCK_SIZE
    assert bad_last.num_external_tokens == 3 * BLOCK_SIZE
    # ...so the intact KV reproduces the single engine and the corrupted KV does not.
    assert good == ref[0]["token_ids"]
    assert bad != ref[1]["token_ids"]


def test_decode_loads_blocks_instead_of_recomputing(tiny_server: StrataServer) -> None:
    _, decode = _stubs(tiny_server)
    before = decode.Stats(worker_pb2.StatsRequest())
    # A fresh prompt (not in any engine's prefix cache) of 4 full blocks and a partial one.
    prompt = make_text(777, 900)
    client = _client(tiny_server)
    resp = client.completions.create(
        model=tiny_server.model, prompt=prompt, max_tokens=8, temperature=0, extra_body=EXTRA
    )
    assert resp.usage is not None
    num_prompt = resp.usage.prompt_tokens
    num_blocks = num_prompt // BLOCK_SIZE
    assert num_blocks >= 3
    # The decode prompt is the prompt plus the first token; its full blocks come from the store.
    expected_computed = num_prompt + 1 - num_blocks * BLOCK_SIZE
    deadline = time.monotonic() + 10
    while True:  # connector counters reach the worker with the engine's next stats report
        after = decode.Stats(worker_pb2.StatsRequest())
        if after.kv_blocks_loaded - before.kv_blocks_loaded >= num_blocks:
            break
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.2)
    assert after.kv_blocks_loaded - before.kv_blocks_loaded == num_blocks
    assert after.kv_tokens_loaded - before.kv_tokens_loaded == num_blocks * BLOCK_SIZE
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == expected_computed
    assert after.kv_load_failures == before.kv_load_failures
