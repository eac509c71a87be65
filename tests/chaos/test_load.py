"""The load harness against a scripted OpenAI-shaped server (no engine): what it records per
request (streams, bodies, refusals, error events, dropped connections) and how it summarizes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from tests.chaos.load import BackgroundLoad, Workload, arrivals, run_load, summarize


def _prompt_index(body: dict[str, object]) -> int:
    prompt = body.get("prompt")
    if prompt is None:
        messages = body["messages"]
        assert isinstance(messages, list)
        prompt = messages[0]["content"]
    assert isinstance(prompt, str)
    return int(prompt.split(":", 1)[0].removeprefix("request "))


async def _handler(request: web.Request) -> web.StreamResponse:
    """Request i: i % 5 == 1 refused (429, Retry-After 2); == 2 an error event mid-stream (or a
    500); == 3 the connection dropped; else 3 tokens "a", "b", "c" (ids 7, 8, 9)."""
    body = await request.json()
    i = _prompt_index(body)
    chat = request.path.endswith("/chat/completions")
    if i % 5 == 1:
        return web.json_response(
            {"error": {"code": "overloaded"}}, status=429, headers={"Retry-After": "2"}
        )
    if i % 5 == 3:
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    if not body["stream"]:
        if i % 5 == 2:
            return web.json_response({"error": {"code": "boom"}}, status=500)
        choice = {"finish_reason": "length", "token_ids": [7, 8, 9]}
        choice |= {"message": {"content": "abc"}} if chat else {"text": "abc"}
        usage = {"completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 5}}
        return web.json_response({"choices": [choice], "usage": usage})
    resp = web.StreamResponse()
    await resp.prepare(request)
    if chat:
        await resp.write(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
    for k, text in enumerate("abc"):
        if i % 5 == 2 and k == 1:
            await resp.write(b'data: {"error":{"code":"worker_failed"}}\n\n')
            break
        choice: dict[str, object] = {"token_ids": [7 + k]}
        choice |= {"delta": {"content": text}} if chat else {"text": text}
        choice["finish_reason"] = "length" if k == 2 else None
        await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        await asyncio.sleep(0.01)
    usage = {"completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 5}}
    await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.fixture
def fake_gateway() -> Iterator[str]:
    app = web.Application()
    app.router.add_post("/v1/completions", _handler)
    app.router.add_post("/v1/chat/completions", _handler)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_arrivals_are_seeded_and_at_the_rate() -> None:
    assert arrivals(4.0, 1.0, poisson=False) == [0.0, 0.25, 0.5, 0.75]
    poisson = arrivals(50.0, 20.0, seed=3)
    assert poisson == arrivals(50.0, 20.0, seed=3) != arrivals(50.0, 20.0, seed=4)
    assert 900 < len(poisson) < 1100 and poisson == sorted(poisson)


def test_workload_is_deterministic_and_unique_per_request() -> None:
    w = Workload(seed=1, shared_prefix=4)
    assert w.request(5) == w.request(5)
    assert w.request(5).prompt != w.request(6).prompt
    words = [w.request(i).prompt.split(": ", 1)[1].split()[:4] for i in range(3)]
    assert words[0] == words[1] == words[2]  # the shared prefix


@pytest.mark.parametrize("stream", [True, False])
def test_each_outcome_is_recorded(fake_gateway: str, stream: bool) -> None:
    workload = Workload(stream_fraction=1.0 if stream else 0.0, chat_fraction=0.5)
    results = run_load(fake_gateway, "m", workload, rate=50.0, duration_s=0.4, poisson=False)
    assert [r.index for r in results] == list(range(20))
    for r in results:
        kind = r.index % 5
        if kind == 1:
            assert (r.status, r.retry_after, r.ok) == (429, "2", False)
            assert "overloaded" in r.error
        elif kind == 2:
            assert not r.ok and r.status == (200 if stream else 500)
            assert ("worker_failed" if stream else "boom") in r.error
        elif kind == 3:
            assert (r.status, r.ok) == (0, False) and r.error
        else:
            assert r.ok, r
            assert (r.text, r.token_ids, r.finish_reason) == ("abc", [7, 8, 9], "length")
            assert (r.completion_tokens, r.cached_tokens) == (3, 5)
            assert (r.ttft_s is not None) == stream
            assert r.start <= r.end
    summary = summarize(results, window_s=0.1)
    assert (summary.requests, summary.ok, summary.errors) == (20, 8, 8)
    assert summary.statuses[429] == 4 and summary.statuses[0] == 4
    assert summary.success_rate == 0.4
    assert sum(rate * 0.1 for _, rate in summary.windows) == pytest.approx(8)
    assert summary.figures("x_")["x_requests"] == 20


def test_background_load_reports_in_flight_and_stops(fake_gateway: str) -> None:
    workload = Workload(stream_fraction=1.0, chat_fraction=0.0)
    with BackgroundLoad(fake_gateway, "m", workload, 20.0, 30.0, poisson=False) as load:
        while load.now() < 0.5:
            asyncio.run(asyncio.sleep(0.01))
        load.stop()
    results = load.results()
    assert 5 <= len(results) <= 15  # stopped long before 30 s
    assert all(r.end <= load.now() for r in results)
