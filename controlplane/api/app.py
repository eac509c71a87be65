"""The OpenAI-compatible HTTP application (aiohttp): routes, middlewares and request handlers.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics.
A handler parses the body (:mod:`controlplane.api.openai_protocol`), tokenizes the prompt, asks the
router for a decision, runs the :class:`~controlplane.request.generation.Generation` and writes the
answer (:mod:`controlplane.api.answer`, in the shapes of :mod:`controlplane.api.responses`).

Prompts are tokenized on a pool of `tokenizer_threads` threads, never on the event loop (the
tokenizers library releases the GIL while it encodes): a megabyte prompt takes about a second to
tokenize, and the loop serves every other stream meanwhile.

Errors: every non-2xx answer is OpenAI's `{"error": {message, type, param, code}}` (see the table
in docs/design/gateway.md). A streaming request that fails before its first token gets a real
HTTP status; after the first token the status line is gone, so it gets an error event and
`data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any, Final, ParamSpec, TypeVar

from aiohttp import hdrs, web

from controlplane.api import answer
from controlplane.api.errors import (
    HTTP_ERROR_CODES,
    answer_and_close,
    error_response,
    json_response,
    worker_error_to_openai,
)
from controlplane.api.logprobs import ChatLogprobs, CompletionLogprobs, LogprobsWriter
from controlplane.api.openai_protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatMessage,
    GenerationRequestFields,
    OpenAIError,
    parse_chat_completion_request,
    parse_completion_request,
)
from controlplane.api.request_checks import (
    check_context_length,
    check_prompt_chars,
    parse_json_body,
)
from controlplane.api.responses import (
    ChatFormatter,
    CompletionFormatter,
    StreamFormatter,
)
from controlplane.api.sampling import RequestLimits, SamplingDefaults, SamplingOptions
from controlplane.api.tokenize import (
    parse_detokenize_request,
    parse_tokenize_request,
    strata_version,
    tokenize_answer,
)
from controlplane.api.tools import ToolsRequest
from controlplane.config import GatewayConfig
from controlplane.instances.registry import InstanceRegistry
from controlplane.metrics import PROMETHEUS_CONTENT_TYPE, GatewayMetrics
from controlplane.request.generation import Generation, GenerationRequest, SharedPrefill
from controlplane.request.routing import (
    Router,
    parse_slo_headers,
    rejection_error,
)
from controlplane.scheduling import Reject
from controlplane.tenants import ANONYMOUS, ApiKeys, TenantError, tenant_namespace
from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.client import WorkerError
from strata_common.credentials import CLUSTER_KEY_BYTES, derive_key

__all__ = ["Gateway"]

logger = logging.getLogger("controlplane.gateway")  # the gateway's one log name

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_Parsed = TypeVar("_Parsed", bound=GenerationRequestFields)
_P = ParamSpec("_P")
_R = TypeVar("_R")
_GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
_KEYED_ROUTES = frozenset({"/tokenize", "/detokenize"})
"""Routes outside /v1 that need the API key too (they run the tokenizer: tokenize.py)."""
_TENANT: Final = web.RequestKey("strata_tenant", str)
"""The request's tenant (set by the tenant middleware on /v1 routes)."""


class Gateway:
    """The HTTP application: request handling over the instance registry and the tokenizer."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        tokenizer: ModelTokenizer,
        registry: InstanceRegistry,
        metrics: GatewayMetrics,
        sampling_defaults: SamplingDefaults,
        router: Router | None = None,
    ) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._registry = registry
        self._router = router if router is not None else Router(registry, None)
        self._metrics = metrics
        self._sampling_defaults = sampling_defaults
        http = config.http
        self._limits = RequestLimits(
            max_model_len=registry.limits.max_model_len,
            vocab_size=tokenizer.vocab_size,
            max_stop_strings=http.max_stop_strings,
            max_stop_chars=http.max_stop_chars,
            max_chars_per_token=min(
                http.max_chars_per_token, tokenizer.max_token_chars or http.max_chars_per_token
            ),
        )
        self._tokenize_pool = ThreadPoolExecutor(
            max_workers=http.tokenizer_threads, thread_name_prefix="strata-tokenize"
        )
        # Tenants (docs/design/security.md §6.1): the API key of each /v1 request, and the
        # namespace its KV is keyed under (the cluster's key makes it unguessable).
        self._api_keys = http.api_key_table()
        cluster_key = config.cluster.key()
        self._tenants_key = derive_key(
            cluster_key if cluster_key is not None else bytes(CLUSTER_KEY_BYTES), "tenants"
        )
        self._created = int(time.time())

    def set_api_keys(self, table: ApiKeys) -> None:
        """Use ``table`` from now on (the Redis hash re-read: controlplane/tenant_keys.py)."""
        self._api_keys = table

    def close(self) -> None:
        """Stop the tokenizer threads (after the HTTP server stopped)."""
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._metrics_middleware, self._error_middleware, self._tenant_middleware],
            client_max_size=self._config.http.max_request_body_bytes,
        )
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions, expect_handler=self._expect)
        app.router.add_post(
            "/v1/chat/completions", self._chat_completions, expect_handler=self._expect
        )
        app.router.add_post("/tokenize", self._tokenize_route)
        app.router.add_post("/detokenize", self._detokenize_route)
        app.router.add_get("/version", self._version)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics_text)
        return app

    # -- middlewares --------------------------------------------------------------------------

    @web.middleware
    async def _metrics_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        is_generation = endpoint in _GENERATION_ROUTES
        start_s = time.monotonic()
        status = 500
        if is_generation:
            self._metrics.requests_in_flight.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # client closed the connection (nginx's convention)
            raise
        finally:
            self._metrics.requests.labels(endpoint, str(status)).inc()
            if is_generation:
                self._metrics.requests_in_flight.dec()
                if status == 200:
                    elapsed_s = time.monotonic() - start_s
                    self._metrics.request_latency.labels(endpoint).observe(elapsed_s)

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except OpenAIError as exc:
            response = error_response(exc)
            if exc.status == 408:  # the rest of a body this slow is not waited for
                await answer_and_close(request, response)
            return response
        except WorkerError as exc:
            logger.warning("%s %s: %s", request.method, request.path, exc)
            return error_response(worker_error_to_openai(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(
                OpenAIError(
                    f"{exc.reason}: {request.method} {request.path}",
                    status=exc.status,
                    code=HTTP_ERROR_CODES.get(exc.status),
                )
            )
            if hdrs.ALLOW in exc.headers:
                response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
            return response
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("unexpected error serving %s %s", request.method, request.path)
            return error_response(
                OpenAIError(
                    "Internal server error (logged by the gateway).",
                    status=500,
                    type="server_error",
                    code="internal_error",
                )
            )

    @web.middleware
    async def _tenant_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """The /v1 routes, /tokenize and /detokenize need a valid API key when keys are
        configured: 401 (OpenAI's ``invalid_api_key``) before anything else; the request's
        tenant is kept for its KV namespace. /health, /metrics and /version are for probes and
        operators."""
        if request.path.startswith("/v1/") or request.path in _KEYED_ROUTES:
            try:
                request[_TENANT] = self._api_keys.tenant_of(request.headers.get(hdrs.AUTHORIZATION))
            except TenantError as exc:
                raise OpenAIError(str(exc), status=401, code="invalid_api_key") from None
        return await handler(request)

    # -- simple routes ------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        # Nothing about where the model lives (vLLM's "root" is its path) or who serves it.
        model = {
            "id": self._config.served_model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "strata",
            "max_model_len": self._limits.max_model_len,
        }
        return json_response({"object": "list", "data": [model]})

    async def _tokenize_route(self, request: web.Request) -> web.Response:
        name = self._config.served_model_name
        parsed = parse_tokenize_request(await self._read_json(request), served_model_name=name)
        answer = await tokenize_answer(parsed, self._tokenizer, self._limits, self._tokenize)
        return json_response(answer)

    async def _detokenize_route(self, request: web.Request) -> web.Response:
        parsed = parse_detokenize_request(
            await self._read_json(request),
            served_model_name=self._config.served_model_name,
            limits=self._limits,
        )
        text = await self._tokenize(self._tokenizer.decode, list(parsed.tokens))
        return json_response({"prompt": text})

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": strata_version()})

    async def _health(self, request: web.Request) -> web.Response:
        # Public: each instance's id, role and state only. Endpoints, load and the reason an
        # instance is down are internal: the admin API's (`strata admin list`, behind its token),
        # and here only with --health-details.
        details = self._config.http.health_details
        workers: list[dict[str, Any]] = []
        for info in self._registry.list_instances():
            worker: dict[str, Any] = {
                "id": info.id,
                "role": info.role.name.lower(),
                "state": info.state.value,
                "ready": info.state.value == "ready",
            }
            if details:
                worker.update(
                    endpoint=info.endpoint,
                    in_flight=info.in_flight,
                    capacity=info.capacity,
                    detail=info.detail,
                )
            workers.append(worker)
        ready = self._registry.is_ready()
        return json_response(
            {"status": "ok" if ready else "unavailable", "workers": workers},
            status=200 if ready else 503,
        )

    async def _metrics_text(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.render())
        response.headers[hdrs.CONTENT_TYPE] = PROMETHEUS_CONTENT_TYPE
        return response

    # -- generation routes --------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        arrival_s = time.monotonic()
        parsed = self._parse(parse_completion_request, await self._read_json(request))
        prompts: list[list[int]] = []
        for prompt in parsed.prompts:
            if isinstance(prompt, str):
                max_tokens = parsed.sampling.max_tokens
                check_prompt_chars(len(prompt), max_tokens, self._limits, param="prompt")
                prompt_ids = await self._tokenize(self._tokenizer.encode_prompt, prompt)
            else:
                prompt_ids = list(prompt)
            if not prompt_ids:
                raise OpenAIError("'prompt' tokenizes to no tokens.", param="prompt")
            prompts.append(prompt_ids)
        echo = None
        if parsed.echo:  # each choice's text starts with its prompt's (token ids: decoded)
            texts = [
                p if isinstance(p, str) else self._tokenizer.decode(list(p)) for p in parsed.prompts
            ]
            echo = [text for text in texts for _ in range(parsed.sampling.n)]
        return await self._serve(
            request,
            arrival_s,
            parsed,
            prompts,
            (CompletionFormatter, CompletionLogprobs),
            "cmpl",
            param="prompt",
            default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
            echo=echo,
        )

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrival_s = time.monotonic()
        parsed = self._parse(parse_chat_completion_request, await self._read_json(request))
        prompt_ids = await self._tokenize(
            self._encode_chat,
            parsed.messages,
            parsed.sampling.max_tokens,
            parsed.tools.template_tools() if parsed.tools else None,
        )
        return await self._serve(
            request,
            arrival_s,
            parsed,
            [prompt_ids],
            (ChatFormatter, ChatLogprobs),
            "chatcmpl",
            param="messages",
            tools=parsed.tools,
        )

    async def _tokenize(self, encode: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
        """Run `encode` on the tokenizer pool; the loop serves other requests meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, lambda: encode(*args, **kwargs))

    def _encode_chat(
        self,
        messages: tuple[ChatMessage, ...],
        max_tokens: int | None,
        tools: list[dict[str, Any]] | None,
    ) -> list[int]:
        """Render and tokenize a chat prompt (on the pool); the rendered text's length is
        checked before it is tokenized."""
        text = self._tokenizer.render_chat(messages, tools=tools)
        check_prompt_chars(len(text), max_tokens, self._limits, param="messages")
        return self._tokenizer.encode_rendered_chat(text)

    def _parse(self, parse: Callable[..., _Parsed], body: Any) -> _Parsed:
        return parse(
            body,
            served_model_name=self._config.served_model_name,
            limits=self._limits,
            defaults=self._sampling_defaults,
        )

    async def _serve(
        self,
        request: web.Request,
        arrival_s: float,
        parsed: GenerationRequestFields,
        prompts: list[list[int]],
        shapes: tuple[type[StreamFormatter], type[LogprobsWriter]],
        id_prefix: str,
        *,
        param: str,
        default_max_tokens: int | None = None,
        echo: list[str] | None = None,
        tools: ToolsRequest | None = None,
    ) -> web.StreamResponse:
        """Run a parsed, tokenized request (one prompt, or a batch); answer as one body or as a
        stream, in the endpoint's ``shapes`` (its bodies and chunks, its logprobs objects).
        Choice ``i * n + j`` is prompt i's sample j, as vLLM numbers them; ``echo``: the text
        each choice starts with."""
        formatter_type, logprobs_type = shapes
        logprobs = None
        if parsed.sampling.logprobs is not None:
            logprobs = partial(logprobs_type, self._tokenizer.token_texts)
        formatter = formatter_type(
            f"{id_prefix}-{uuid.uuid4().hex}",
            int(time.time()),
            parsed.model,
            include_usage=parsed.include_usage,
            return_token_ids=parsed.return_token_ids,
            prompt_token_ids=prompts,
            n=parsed.sampling.n,
        )
        # The tenant's namespace, subdivided by the client's own salt: no request of one
        # tenant can hit, or time, another's blocks (in vLLM's cache, the store, the index).
        cache_salt = tenant_namespace(
            self._tenants_key, request.get(_TENANT, ANONYMOUS), parsed.cache_salt
        )
        generations = []
        for i, prompt_ids in enumerate(prompts):
            generations += self._generations(
                request,
                formatter.request_id if len(prompts) == 1 else f"{formatter.request_id}-{i}",
                prompt_ids,
                parsed.sampling,
                cache_salt,
                arrival_s,
                param=param,
                default_max_tokens=default_max_tokens,
            )
        if parsed.stream:
            return await answer.stream(request, generations, formatter, logprobs, echo, tools)
        return await answer.complete(generations, formatter, logprobs, echo, tools)

    async def _read_json(self, request: web.Request) -> Any:
        # A missing Content-Type is tolerated (curl -d without -H); a wrong one is not.
        if hdrs.CONTENT_TYPE in request.headers:
            mime = request.content_type
            if mime != "application/json" and not mime.endswith("+json"):
                raise OpenAIError(
                    f"Content-Type must be application/json, got {mime!r}.",
                    status=415,
                    code="unsupported_media_type",
                )
        too_large = self._body_too_large(request)
        if too_large is not None:
            raise too_large  # refused before reading a byte of it
        timeout_s = self._config.http.read_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                raw = await request.read()  # aiohttp stops reading at client_max_size
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None
        except TimeoutError:
            raise OpenAIError(
                f"The request body did not arrive within {timeout_s:g} s.",
                status=408,
                code="request_timeout",
            ) from None
        return parse_json_body(raw)

    def _too_large(self) -> OpenAIError:
        limit = self._config.http.max_request_body_bytes
        return OpenAIError(
            f"The request body is larger than this server's limit of {limit} bytes.",
            status=413,
            code="request_too_large",
        )

    def _body_too_large(self, request: web.Request) -> OpenAIError | None:
        """413 when the declared Content-Length is over the limit (a chunked body is counted
        as it is read)."""
        length = request.content_length
        if length is not None and length > self._config.http.max_request_body_bytes:
            return self._too_large()
        return None

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue` (curl sends it for bodies over 1 MiB): a body over the limit is
        refused before the client sends it, else the client is told to go on."""
        too_large = self._body_too_large(request)
        if too_large is not None:
            response = error_response(too_large)
            await answer_and_close(request, response)  # its body will not come
            return response
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            return error_response(
                OpenAIError(
                    "Only 'Expect: 100-continue' is supported.",
                    status=417,
                    code="expectation_failed",
                )
            )
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # (as aiohttp's own handler: no body started yet)
        return None

    def _generations(
        self,
        http_request: web.Request,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingOptions,
        cache_salt: str,
        arrival_s: float,
        *,
        param: str,
        default_max_tokens: int | None = None,
    ) -> list[Generation]:
        """The request's samples (``n``; one decision: their instances), or a refusal."""
        max_tokens = check_context_length(
            len(prompt_ids),
            sampling.max_tokens,
            self._limits.max_model_len,
            param=param,
            default_max_tokens=default_max_tokens,
        )
        if sampling.min_tokens > max_tokens:  # max_tokens left out: its default is smaller
            raise OpenAIError(
                f"'min_tokens' ({sampling.min_tokens}) must be at most the tokens this request "
                f"may generate ({max_tokens}).",
                param="min_tokens",
            )
        # Scheduling, before any work: the instances, or a refusal (429 / 503).
        ttft_slo_s, tpot_slo_s = parse_slo_headers(http_request.headers)
        decision = self._router.decide(
            prompt_ids, cache_salt, max_tokens, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s
        )
        if isinstance(decision, Reject):
            raise rejection_error(decision, self._registry)
        n = sampling.n
        shared = SharedPrefill() if n > 1 else None
        generations = []
        for i in range(n):
            request = GenerationRequest(
                # vLLM's children of a request with n > 1 are told apart the same way.
                request_id=request_id if n == 1 else f"{request_id}-{i}",
                prompt_token_ids=prompt_ids,
                # Sample i draws with seed + i, as vLLM's child i does: each equals one engine's.
                sampling=sampling
                if sampling.seed is None
                else replace(sampling, seed=sampling.seed + i),
                max_tokens=max_tokens,
                cache_salt=cache_salt,
                arrival_s=arrival_s,
                timeout_s=self._config.http.request_timeout_s,
                stop_token_ids=self._tokenizer.eos_token_ids.union(sampling.stop_token_ids),
            )
            detokenizer = self._tokenizer.new_detokenizer(prompt_ids)
            generations.append(
                Generation(
                    request,
                    self._registry,
                    self._metrics,
                    detokenizer,
                    decision,
                    sample=i,
                    shared=shared,
                )
            )
        return generations
