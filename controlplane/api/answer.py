"""Writing one generation's answer: a body once it finished, or server-sent events as it goes.

A stream waits for the first token before its status line, so a request that fails in prefill
still gets a real 4xx/5xx; after that a failure is an error event, then `data: [DONE]`. Text the
stop-string matcher holds back leaves a delta with tokens and no text: it is sent only when the
client asked for something per token (its ids, its logprobs).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import hdrs, web

from controlplane.api.errors import json_response, worker_error_to_openai
from controlplane.api.fields import OpenAIError
from controlplane.api.logprobs import LogprobsWriter
from controlplane.api.responses import SSE_DONE, StreamFormatter, Usage, sse_event
from controlplane.request.generation import Generation, GenerationDelta
from controlplane.workers.client import TokenLogprob, WorkerError

__all__ = ["complete", "stream"]

logger = logging.getLogger("controlplane.gateway")  # the gateway's one log name


async def complete(
    generation: Generation, formatter: StreamFormatter, logprobs: LogprobsWriter | None
) -> web.Response:
    """The whole answer as one body, once the generation finished."""
    parts: list[str] = []
    token_ids: list[int] = []
    token_logprobs: list[TokenLogprob] = []
    async with aclosing(generation.stream()) as deltas:
        async for delta in deltas:
            parts.append(delta.text)
            token_ids += delta.token_ids
            token_logprobs += delta.logprobs
    if generation.finish_reason is None:  # stream() raises rather than end unfinished
        raise RuntimeError("generation ended without a finish reason")
    usage = _usage(generation)
    return json_response(
        formatter.body(
            "".join(parts),
            generation.finish_reason,
            usage,
            token_ids,
            logprobs.next(token_ids, token_logprobs) if logprobs else None,
        )
    )


async def stream(
    request: web.Request,
    generation: Generation,
    formatter: StreamFormatter,
    logprobs: LogprobsWriter | None,
) -> web.StreamResponse:
    async with aclosing(generation.stream()) as deltas:
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
            for chunk in formatter.opening_chunks():
                await response.write(sse_event(chunk))
            await _write_deltas(response, formatter, logprobs, first, deltas)
            if formatter.include_usage:
                await response.write(sse_event(formatter.usage_chunk(_usage(generation))))
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
    logprobs: LogprobsWriter | None,
    first: GenerationDelta,
    rest: AsyncIterator[GenerationDelta],
) -> None:
    per_token = formatter.return_token_ids or logprobs is not None
    delta: GenerationDelta | None = first
    while delta is not None:
        # Text held back by the stop matcher leaves a delta with tokens but no text: sent
        # only if the client wants something of each token (its id, its logprob).
        if delta.text or delta.finish_reason is not None or (per_token and delta.token_ids):
            chunk = formatter.text_chunk(
                delta.text,
                delta.finish_reason,
                delta.token_ids,
                logprobs.next(delta.token_ids, delta.logprobs)
                if logprobs and delta.token_ids
                else None,
            )
            await response.write(sse_event(chunk))
        delta = await anext(rest, None)


def _usage(generation: Generation) -> Usage:
    return Usage(
        prompt_tokens=generation.num_prompt_tokens,
        completion_tokens=generation.num_completion_tokens,
        cached_tokens=generation.num_cached_tokens,
    )
