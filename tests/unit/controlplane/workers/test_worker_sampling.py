"""WorkerSampling: what one worker call is asked to sample; the client's checks of what the
worker sends back."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from controlplane.api.sampling import SamplingOptions
from controlplane.workers.client import TokenLogprob, WorkerClient, WorkerError, WorkerSampling
from strata_proto import worker_pb2


def test_min_tokens_counts_the_tokens_the_request_already_has() -> None:
    options = replace(SamplingOptions.greedy(10), min_tokens=5)
    # The prefill samples one token: it must not be EOS.
    assert WorkerSampling(1, options).to_proto().min_tokens == 1
    # The decode continues after it: four more before EOS may end the answer.
    assert WorkerSampling(9, options, generated=1).to_proto().min_tokens == 4
    # A decode resumed after 6 tokens (its first worker died) has none left to force.
    assert WorkerSampling(4, options, generated=6).to_proto().min_tokens == 0


def test_the_extensions_are_sent_and_their_off_values_are_zero() -> None:
    plain = WorkerSampling(3, SamplingOptions.greedy(3)).to_proto()
    assert (plain.top_k, plain.min_p, plain.min_tokens) == (0, 0.0, 0)
    options = replace(SamplingOptions.greedy(3), top_k=7, min_p=0.5, repetition_penalty=1.25)
    sent = WorkerSampling(3, options).to_proto()
    assert (sent.top_k, sent.min_p, sent.repetition_penalty) == (7, 0.5, 1.25)


def test_penalties_and_logit_bias_are_sent() -> None:
    plain = WorkerSampling(3, SamplingOptions.greedy(3)).to_proto()
    assert (plain.presence_penalty, plain.frequency_penalty, dict(plain.logit_bias)) == (0, 0, {})
    options = replace(
        SamplingOptions.greedy(3),
        presence_penalty=0.7,
        frequency_penalty=-1.1,
        logit_bias=((4, -100.0), (11, 0.3)),
    )
    sent = WorkerSampling(3, options).to_proto()
    # Doubles on the wire: the engines get the client's values exactly.
    assert (sent.presence_penalty, sent.frequency_penalty) == (0.7, -1.1)
    assert dict(sent.logit_bias) == {4: -100.0, 11: 0.3}


def _checked(options: SamplingOptions, num_tokens: int, sent: list[Any]) -> Any:
    async def run() -> Any:
        client = WorkerClient("127.0.0.1:1")  # never called: only its checks run
        try:
            return client._logprobs("Decode", WorkerSampling(4, options), num_tokens, sent)
        finally:
            await client.close()

    return asyncio.run(run())


def test_logprobs_from_a_worker_are_checked_against_the_request() -> None:
    top2 = replace(SamplingOptions.greedy(4), logprobs=2)
    good = worker_pb2.TokenLogprobs(logprob=-0.5, top_token_ids=[3, 4], top_logprobs=[-0.5, -1])
    assert _checked(top2, 1, [good]) == (TokenLogprob(-0.5, ((3, -0.5), (4, -1.0))),)
    assert _checked(SamplingOptions.greedy(4), 1, []) == ()  # not asked for
    assert _checked(top2, 0, []) == ()  # a chunk with no tokens (the finish)
    malformed = [
        (1, []),  # missing
        (1, [good, good]),  # one too many
        (2, [good]),  # one too few
        (1, [worker_pb2.TokenLogprobs(top_token_ids=[3, 4], top_logprobs=[-1])]),  # ragged
        (1, [worker_pb2.TokenLogprobs(top_token_ids=[1, 2, 3], top_logprobs=[0, 0, 0])]),  # > 2
    ]
    for num_tokens, sent in malformed:
        with pytest.raises(WorkerError, match="logprobs malformed"):
            _checked(top2, num_tokens, sent)
