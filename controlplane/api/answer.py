"""Writing one generation's answer: a body once it finished, or server-sent events as it goes.

A request's ``n`` samples run at once; their deltas are taken as they come (`_merged`), each
written as a chunk of its choice's index, or gathered into the body's choices. The first failure
of any sample ends the answer (the others are cancelled): as one engine's request with ``n``
children, an answer has all its choices or none.

A stream waits for the first token before its status line, so a request that fails in prefill
still gets a real 4xx/5xx; after that a failure is an error event, then `data: [DONE]`. Text the
stop-string matcher holds back leaves a delta with tokens and no text: it is sent only when the
client asked for something per token (its ids, its logprobs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing

from aiohttp import hdrs, web

from controlplane.api.errors import json_response, worker_error_to_openai
from controlplane.api.fields import OpenAIError
from controlplane.api.logprobs import LogprobsWriter
from controlplane.api.responses import (
    SSE_DONE,
    ChatFormatter,
    Choice,
    StreamFormatter,
    Usage,
    sse_event,
)
from controlplane.api.tools import ToolCalls, ToolsRequest
from controlplane.request.generation import Generation, GenerationDelta
from controlplane.workers.client import TokenLogprob, WorkerError

__all__ = ["LogprobsFactory", "complete", "stream"]

logger = logging.getLogger("controlplane.gateway")  # the gateway's one log name

LogprobsFactory = Callable[[], LogprobsWriter]
"""A new writer of one choice's logprobs objects (None where the request asked for none)."""


async def complete(
    generations: Sequence[Generation],
    formatter: StreamFormatter,
    new_logprobs: LogprobsFactory | None,
    echo: Sequence[str] | None = None,
    tools: ToolsRequest | None = None,
) -> web.Response:
    """The whole answer as one body, once every sample finished. ``echo``: the text each
    choice starts with (completions' ``echo``: its prompt's)."""
    n = len(generations)
    parts: list[list[str]] = [[] for _ in range(n)]
    token_ids: list[list[int]] = [[] for _ in range(n)]
    token_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    async with aclosing(_merged(generations)) as deltas:
        async for index, delta in deltas:
            parts[index].append(delta.text)
            token_ids[index] += delta.token_ids
            token_logprobs[index] += delta.logprobs
    choices = []
    for i, generation in enumerate(generations):
        if generation.finish_reason is None:  # stream() raises rather than end unfinished
            raise RuntimeError("generation ended without a finish reason")
        logprobs = new_logprobs().next(token_ids[i], token_logprobs[i]) if new_logprobs else None
        text = (echo[i] if echo else "") + "".join(parts[i])
        finish = generation.finish_reason
        calls = ToolCalls(tools) if tools else None
        made = calls.body(text) if calls and calls.forced else None
        if calls is not None and made is not None:  # the answer is the calls
            choices.append(Choice("", calls.finish_reason(finish), token_ids[i], logprobs, made))
        else:
            choices.append(Choice(text, finish, token_ids[i], logprobs))
    return json_response(formatter.body(choices, _usage(generations)))


async def stream(
    request: web.Request,
    generations: Sequence[Generation],
    formatter: StreamFormatter,
    new_logprobs: LogprobsFactory | None,
    echo: Sequence[str] | None = None,
    tools: ToolsRequest | None = None,
) -> web.StreamResponse:
    async with aclosing(_merged(generations)) as deltas:
        # Wait for the first token before sending the status line: a request that fails in
        # prefill still gets a proper 4xx/5xx.
        first = await anext(deltas)
        response = web.StreamResponse(
            headers={
                hdrs.CONTENT_TYPE: "text/event-stream",
                hdrs.CACHE_CONTROL: "no-cache",
                "X-Accel-Buffering": "no",  # tell proxies not to buffer the stream
            }
        )
        await response.prepare(request)
        try:
            for chunk in formatter.opening_chunks(len(generations)):
                await response.write(sse_event(chunk))
            for index, text in enumerate(echo or ()):  # each choice's text starts with it
                await response.write(sse_event(formatter.text_chunk(text, None, index=index)))
            writers = [new_logprobs() for _ in generations] if new_logprobs else None
            calls = [ToolCalls(tools) for _ in generations] if tools else None
            if calls and not calls[0].forced:
                calls = None
            await _write_deltas(response, formatter, writers, calls, first, deltas)
            if formatter.include_usage:
                await response.write(sse_event(formatter.usage_chunk(_usage(generations))))
        except (OpenAIError, WorkerError) as exc:
            error = exc if isinstance(exc, OpenAIError) else worker_error_to_openai(exc)
            logger.warning("stream %s failed after its first token: %s", formatter.request_id, exc)
            await response.write(sse_event(error.to_dict()))
        except ConnectionResetError:
            logger.debug("client of %s went away", formatter.request_id)
            return response
        await response.write(SSE_DONE)
        await response.write_eof()
        return response


async def _write_deltas(
    response: web.StreamResponse,
    formatter: StreamFormatter,
    writers: list[LogprobsWriter] | None,
    calls: list[ToolCalls] | None,
    first: tuple[int, GenerationDelta],
    rest: AsyncIterator[tuple[int, GenerationDelta]],
) -> None:
    """``calls``: each choice's tool calls, when a call is forced (chat's ``tool_choice``)."""
    per_token = formatter.return_token_ids or writers is not None
    item: tuple[int, GenerationDelta] | None = first
    while item is not None:
        index, delta = item
        if calls is not None and isinstance(formatter, ChatFormatter):
            finish = delta.finish_reason
            made = calls[index].stream(delta.text, finish is not None)
            leftover = calls[index].leftover() if finish is not None and not made else ""
            if leftover:  # no call parsed: the text, as a body would carry it
                chunk = formatter.text_chunk(leftover, None, index=index)
                await response.write(sse_event(chunk))
            if made or finish is not None or (per_token and delta.token_ids):
                chunk = formatter.tool_calls_chunk(
                    made,
                    calls[index].finish_reason(finish) if finish is not None else None,
                    index=index,
                    token_ids=delta.token_ids,
                    logprobs=writers[index].next(delta.token_ids, delta.logprobs)
                    if writers and delta.token_ids
                    else None,
                )
                await response.write(sse_event(chunk))
            item = await anext(rest, None)
            continue
        # Text held back by the stop matcher leaves a delta with tokens but no text: sent
        # only if the client wants something of each token (its id, its logprob).
        if delta.text or delta.finish_reason is not None or (per_token and delta.token_ids):
            chunk = formatter.text_chunk(
                delta.text,
                delta.finish_reason,
                delta.token_ids,
                writers[index].next(delta.token_ids, delta.logprobs)
                if writers and delta.token_ids
                else None,
                index=index,
            )
            await response.write(sse_event(chunk))
        item = await anext(rest, None)


async def _merged(
    generations: Sequence[Generation],
) -> AsyncGenerator[tuple[int, GenerationDelta], None]:
    """Every sample's deltas, each with its sample's index, as they come. The first error of
    any sample is raised; leaving early (or an error) cancels and closes every sample."""
    if len(generations) == 1:
        async with aclosing(generations[0].stream()) as deltas:
            async for delta in deltas:
                yield 0, delta
        return
    # One slot per sample: a sample runs at most one delta ahead of the writer, as one does.
    queue: asyncio.Queue[tuple[int, GenerationDelta | Exception | None]] = asyncio.Queue(
        len(generations)
    )

    async def pump(index: int, generation: Generation) -> None:
        try:
            async with aclosing(generation.stream()) as deltas:
                async for delta in deltas:
                    await queue.put((index, delta))
        except Exception as exc:  # handed to the writer, which raises it
            await queue.put((index, exc))
            return
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(generations: Sequence[Generation]) -> Usage:
    """Each prompt once (its samples share it: sample 0 stands for it), every sample's output
    tokens."""
    prompts = [g for g in generations if g.sample == 0]
    return Usage(
        prompt_tokens=sum(g.num_prompt_tokens for g in prompts),
        completion_tokens=sum(g.num_completion_tokens for g in generations),
        cached_tokens=sum(g.num_cached_tokens for g in prompts),
        store_tokens=sum(g.num_store_tokens for g in prompts),
    )
