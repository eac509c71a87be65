"""WorkerSampling: what one worker call is asked to sample."""

from __future__ import annotations

from dataclasses import replace

from controlplane.api.openai_protocol import SamplingOptions
from controlplane.workers.client import WorkerSampling


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
