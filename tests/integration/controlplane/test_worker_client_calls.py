"""The gateway's worker client frees every decode call (real grpc.aio on loopback).

A grpc.aio call whose response iterator is left suspended — the gateway stops reading at the
final chunk, before the call's status arrives, or a client goes away mid-stream — was never
freed (1-2 % of such calls, ~8 KiB each): the gateway's memory grew for as long as it served.
`WorkerClient.decode` closes the call's response iterator itself, which leaves nothing behind."""

from __future__ import annotations

import asyncio
import gc
from contextlib import aclosing
from pathlib import Path

from grpc.aio import _call as aio_call
from tokenizers import Tokenizer

from controlplane.api.sampling import SamplingOptions
from controlplane.workers.client import WorkerClient, WorkerSampling
from strata_proto import worker_pb2
from tests.integration.controlplane.scripted_worker import ScriptedWorker, default_script

GREEDY = SamplingOptions.greedy(16)
CALLS = 1500
"""Per way of leaving: with the iterator, ~20 calls of 1,500 stayed alive in each way."""


def live_calls() -> list[object]:
    gc.collect()
    # type(), not isinstance(): the latter reads __class__, which some objects other tests
    # leave behind (torch's deprecated aliases) answer with a warning.
    return [o for o in gc.get_objects() if type(o) is aio_call.UnaryStreamCall]


def new_calls(before: list[object]) -> int:
    """Calls alive now that were not alive at ``before`` — this test's leftovers only.

    Calls other tests of the same process left behind may be freed while this one runs, so a
    count against ``before`` would be off by them; holding them in ``before`` keeps their ids
    from being reused."""
    old = {id(o) for o in before}
    return sum(id(o) not in old for o in live_calls())


async def _decode(client: WorkerClient, index: int, *, stop_after: int | None) -> int:
    """One decode; leave after ``stop_after`` chunks (None: at the chunk that finishes)."""
    stream = client.decode(
        request_id=f"r{index}",
        prompt_token_ids=[1, 5, 9],
        sampling=WorkerSampling(max_tokens=16, options=GREEDY),
        cache_salt="",
        block_keys=[],
        timeout_s=30,
    )
    chunks = 0
    async with aclosing(stream) as outputs:
        async for output in outputs:
            chunks += 1
            if output.finish_reason is not None or chunks == stop_after:
                break  # as the gateway does: leaving closes the stream
    return chunks


def test_decode_calls_are_freed_however_the_reader_leaves(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    script = default_script(tokenizer)
    worker = ScriptedWorker(worker_pb2.ROLE_DECODE, script, tokenizer)

    async def main() -> tuple[int, int]:
        await worker.start()
        client = WorkerClient(worker.endpoint)
        try:
            before = live_calls()
            finished = [await _decode(client, i, stop_after=None) for i in range(CALLS)]
            after_finish = new_calls(before)
            cut = [await _decode(client, i, stop_after=2) for i in range(CALLS)]
            after_cut = new_calls(before)
        finally:
            await client.close()
            await worker.stop()
        assert set(finished) == {len(script.token_ids) + 1}  # every token, then EOS
        assert set(cut) == {2}
        return after_finish, after_cut

    assert asyncio.run(main()) == (0, 0)
