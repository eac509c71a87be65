"""SIMULATED OpenAI-compatible engines for measuring HTTP routers (benchmarks only).

    .venv/bin/python benchmarks/sim_openai_backend.py --port 20000 --count 256 \\
        [--token-interval 20ms] [--prefill-time 30ms] [--model sim]

One process serves ``--count`` simulated engines, each on its own port from ``--port`` on
(``--host`` 127.0.0.1), so that a router (vllm-router, sglang-router, in PD mode or not) can be
put before hundreds of "engines" on one machine and its own CPU cost measured
(benchmarks/bench_rust_routers.py). It is not a model and never stands in for one in Strata:
every answer is deterministic filler. Each engine answers what those routers call:

- ``GET /health``, ``/health_generate``, ``/v1/models``, ``/get_model_info``,
  ``/get_server_info``, ``/server_info``, ``/model_info``: 200 with a small JSON body;
- ``POST /v1/completions``, ``/v1/chat/completions``, ``/generate``: ``max_tokens`` (or
  ``max_new_tokens``) tokens after ``--prefill-time``, one every ``--token-interval``; streamed as
  OpenAI server-sent events when ``stream`` is true, else one JSON body. A request that names the
  prefill side of a disaggregated pair (vLLM's ``kv_transfer_params`` with ``do_remote_decode``)
  returns its single token at once with the ``kv_transfer_params`` a decode side expects.

Anything else is answered 404 and logged on stderr (which route a router wanted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

from aiohttp import web

from strata_common.units import parse_duration

FILLER = " tok"


def _params(body: dict[str, Any]) -> tuple[int, bool]:
    sampling = body.get("sampling_params") or {}
    tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    tokens = tokens or sampling.get("max_new_tokens") or 16
    return max(1, int(tokens)), bool(body.get("stream"))


class Engine:
    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.port = port
        self.args = args
        self.requests = 0
        self.running = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        for path in ("/health", "/health_generate", "/v1/models", "/get_model_info",
                     "/get_server_info", "/server_info", "/model_info", "/v1/models/"):  # fmt: skip
            app.router.add_get(path, self.info)
        for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
            app.router.add_post(path, self.generate)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        return app

    async def info(self, request: web.Request) -> web.Response:
        model = self.args.model
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "owned_by": "simulated"}],
                "model_path": model,
                "tokenizer_path": None,
                "is_generation": True,
                "status": "ok",
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """vLLM's load gauges (vllm-router reads them): the requests this engine has now."""
        labels = f'{{model_name="{self.args.model}"}}'
        text = (
            f"vllm:num_requests_running{labels} {self.running}\n"
            f"vllm:num_requests_waiting{labels} 0\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def unknown(self, request: web.Request) -> web.Response:
        print(f"[{self.port}] 404 {request.method} {request.path}", file=sys.stderr, flush=True)
        return web.json_response({"error": f"simulated engine: no {request.path}"}, status=404)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.running += 1
        try:
            return await self._generate(request)
        finally:
            self.running -= 1

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tokens, stream = _params(body)
        chat = request.path.endswith("chat/completions")
        native = request.path == "/generate"
        transfer = body.get("kv_transfer_params") or {}
        if transfer.get("do_remote_decode"):
            tokens = 1  # the prefill side of vLLM's disaggregated pair
        created = int(time.time())
        rid = f"sim-{self.port}-{self.requests}"
        await asyncio.sleep(self.args.prefill_time)

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            if native:
                return {"text": text, "meta_info": {"id": rid, "finish_reason": finish}}
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            kind = "chat.completion.chunk" if chat else "text_completion"
            return {"id": rid, "object": kind, "created": created, "model": self.args.model,
                    "choices": [choice]}  # fmt: skip

        usage = {
            "prompt_tokens": 0,
            "completion_tokens": tokens,
            "total_tokens": tokens,
        }
        if not stream:
            await asyncio.sleep(self.args.token_interval * (tokens - 1))
            whole = chunk(FILLER * tokens, "length")
            if chat:
                whole["choices"][0]["message"] = whole["choices"][0].pop("delta")
                whole["object"] = "chat.completion"
            elif not native:
                whole["object"] = "text_completion"
            whole["usage"] = usage
            if transfer.get("do_remote_decode"):
                whole["kv_transfer_params"] = {
                    "do_remote_prefill": True,
                    "do_remote_decode": False,
                    "remote_engine_id": f"sim-{self.port}",
                    "remote_block_ids": [],
                    "remote_host": "127.0.0.1",
                    "remote_port": self.port,
                }
            return web.json_response(whole)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(tokens):
            if i:
                await asyncio.sleep(self.args.token_interval)
            event = chunk(FILLER, "length" if i == tokens - 1 else None)
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            final = chunk("", None)
            final["choices"] = []
            final["usage"] = usage
            await response.write(f"data: {json.dumps(final)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def serve(args: argparse.Namespace) -> None:
    runners = []
    for port in range(args.port, args.port + args.count):
        runner = web.AppRunner(Engine(port, args).app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, port, backlog=1024).start()
        runners.append(runner)
    print(f"simulated engines ready on {args.host}:{args.port}..{args.port + args.count - 1}",
          flush=True)  # fmt: skip
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="the first engine's port")
    ap.add_argument("--count", type=int, default=1, help="engines, on consecutive ports")
    ap.add_argument("--token-interval", type=parse_duration, default=0.02)
    ap.add_argument("--prefill-time", type=parse_duration, default=0.03)
    ap.add_argument("--model", default="sim")
    args = ap.parse_args(argv)
    # Routers probe each engine for gRPC (HTTP/2) first: aiohttp logs every such probe.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
