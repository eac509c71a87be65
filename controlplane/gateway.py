"""The OpenAI-compatible HTTP gateway: aiohttp on uvloop, in front of prefill and decode workers.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics.
Entry point: `python -m controlplane.gateway --model-dir DIR --prefill H:P --decode H:P ...`
(`main(argv)`). Start-up loads the tokenizer, starts the admin API when `--admin-port` is set
(controlplane/admin/), launches the `--launch-prefill/--launch-decode` workers, waits until
every worker's Health says ready, then prints "strata gateway listening on http://HOST:PORT".
SIGTERM/SIGINT stop accepting connections, let in-flight requests finish for `shutdown_grace_s`,
stop the launched workers, and exit 0.

Errors: every non-2xx answer is OpenAI's `{"error": {message, type, param, code}}` (see the table
in docs/design/gateway.md). A streaming request that fails before its first token gets a real
HTTP status; after the first token the status line is gone, so it gets an error event and
`data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import uvloop
from aiohttp import hdrs, web

from controlplane.admin.config import AdminConfig, AdminConfigError
from controlplane.admin.server import AdminServer
from controlplane.api.openai_protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    OpenAIError,
    RequestLimits,
    SamplingDefaults,
    SamplingOptions,
    check_context_length,
    parse_chat_completion_request,
    parse_completion_request,
)
from controlplane.api.responses import (
    SSE_DONE,
    ChatFormatter,
    CompletionFormatter,
    StreamFormatter,
    Usage,
    dumps,
    sse_event,
)
from controlplane.config import ConfigError, GatewayConfig
from controlplane.instances.registry import InstanceRegistry, StartupError
from controlplane.instances.store import RegistryStoreError, open_registry_store
from controlplane.instances.types import AdminBackend, InstanceConflict, InstanceState, Launcher
from controlplane.launch.launcher import LocalProcessLauncher
from controlplane.metrics import PROMETHEUS_CONTENT_TYPE, GatewayMetrics
from controlplane.request.generation import Generation, GenerationDelta, GenerationRequest
from controlplane.request.routing import (
    RejectedRequest,
    Router,
    kv_bytes_per_token,
    parse_slo_headers,
    rejection_error,
)
from controlplane.scheduling import Reject, SchedulingConfig
from controlplane.text.tokenizer import ModelTokenizer, read_sampling_defaults
from controlplane.workers.client import WorkerError, WorkerErrorKind
from controlplane.workers.roles import WorkerRole
from kvstore.cluster import ClusterView
from kvstore.metadata import open_metadata_store

__all__ = ["Gateway", "GatewayServer", "main", "serve"]

logger = logging.getLogger("controlplane.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
_WORKER_ERROR_STATUS = {
    WorkerErrorKind.UNAVAILABLE: (503, "server_error", "worker_unavailable"),
    WorkerErrorKind.OVERLOADED: (503, "server_error", "worker_overloaded"),
    WorkerErrorKind.TIMEOUT: (504, "server_error", "worker_timeout"),
    WorkerErrorKind.REJECTED: (400, "invalid_request_error", "worker_rejected_request"),
    WorkerErrorKind.FAILED: (502, "server_error", "worker_failed"),
}
_HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


def worker_error_to_openai(exc: WorkerError) -> OpenAIError:
    status, error_type, code = _WORKER_ERROR_STATUS[exc.kind]
    return OpenAIError(str(exc), status=status, type=error_type, code=code)


def error_response(exc: OpenAIError) -> web.Response:
    response = web.Response(
        status=exc.status, text=dumps(exc.to_dict()), content_type="application/json"
    )
    if isinstance(exc, RejectedRequest) and exc.retry_after_s is not None:
        response.headers[hdrs.RETRY_AFTER] = str(exc.retry_after_s)
    return response


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, text=dumps(obj), content_type="application/json")


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
        self._limits = RequestLimits(
            max_model_len=registry.limits.max_model_len, vocab_size=tokenizer.vocab_size
        )
        self._created = int(time.time())

    def build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._metrics_middleware, self._error_middleware],
            client_max_size=self._config.http.max_request_body_bytes,
        )
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
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
            return error_response(exc)
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
                    code=_HTTP_ERROR_CODES.get(exc.status),
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

    # -- simple routes ------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        model = {
            "id": self._config.served_model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "strata",
            "root": str(self._config.model_dir),
            "max_model_len": self._limits.max_model_len,
        }
        return json_response({"object": "list", "data": [model]})

    async def _health(self, request: web.Request) -> web.Response:
        workers = [
            {
                "id": info.id,
                "endpoint": info.endpoint,
                "role": info.role.name.lower(),
                "state": info.state.value,
                "ready": info.state.value == "ready",
                "in_flight": info.in_flight,
                "capacity": info.capacity,
                "detail": info.detail,
            }
            for info in self._registry.list_instances()
        ]
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
        body = await self._read_json(request)
        parsed = parse_completion_request(
            body,
            served_model_name=self._config.served_model_name,
            limits=self._limits,
            defaults=self._sampling_defaults,
        )
        if isinstance(parsed.prompt, str):
            prompt_ids = self._tokenizer.encode_prompt(parsed.prompt)
        else:
            prompt_ids = list(parsed.prompt)
        if not prompt_ids:
            raise OpenAIError("'prompt' tokenizes to no tokens.", param="prompt")
        formatter = CompletionFormatter(
            f"cmpl-{uuid.uuid4().hex}",
            int(time.time()),
            parsed.model,
            include_usage=parsed.include_usage,
            return_token_ids=parsed.return_token_ids,
            prompt_token_ids=prompt_ids,
        )
        generation = self._generation(
            request,
            formatter,
            prompt_ids,
            parsed.sampling,
            parsed.cache_salt,
            arrival_s,
            param="prompt",
            default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
        )
        if parsed.stream:
            return await self._stream(request, generation, formatter)
        return await self._complete(generation, formatter)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrival_s = time.monotonic()
        body = await self._read_json(request)
        parsed = parse_chat_completion_request(
            body,
            served_model_name=self._config.served_model_name,
            limits=self._limits,
            defaults=self._sampling_defaults,
        )
        prompt_ids = self._tokenizer.encode_chat(parsed.messages)
        formatter = ChatFormatter(
            f"chatcmpl-{uuid.uuid4().hex}",
            int(time.time()),
            parsed.model,
            include_usage=parsed.include_usage,
            return_token_ids=parsed.return_token_ids,
            prompt_token_ids=prompt_ids,
        )
        generation = self._generation(
            request,
            formatter,
            prompt_ids,
            parsed.sampling,
            parsed.cache_salt,
            arrival_s,
            param="messages",
        )
        if parsed.stream:
            return await self._stream(request, generation, formatter)
        return await self._complete(generation, formatter)

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
        raw = await request.read()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise OpenAIError(
                f"The request body is not valid JSON: {exc}", code="invalid_json"
            ) from None

    def _generation(
        self,
        http_request: web.Request,
        formatter: StreamFormatter,
        prompt_ids: list[int],
        sampling: SamplingOptions,
        cache_salt: str,
        arrival_s: float,
        *,
        param: str,
        default_max_tokens: int | None = None,
    ) -> Generation:
        max_tokens = check_context_length(
            len(prompt_ids),
            sampling.max_tokens,
            self._limits.max_model_len,
            param=param,
            default_max_tokens=default_max_tokens,
        )
        # Scheduling, before any work: the instances, or a refusal (429 / 503).
        ttft_slo_s, tpot_slo_s = parse_slo_headers(http_request.headers)
        decision = self._router.decide(
            prompt_ids, cache_salt, max_tokens, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s
        )
        if isinstance(decision, Reject):
            raise rejection_error(decision, self._registry)
        request = GenerationRequest(
            request_id=formatter.request_id,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            max_tokens=max_tokens,
            cache_salt=cache_salt,
            arrival_s=arrival_s,
            timeout_s=self._config.http.request_timeout_s,
            stop_token_ids=self._tokenizer.eos_token_ids.union(sampling.stop_token_ids),
        )
        detokenizer = self._tokenizer.new_detokenizer(prompt_ids)
        return Generation(request, self._registry, self._metrics, detokenizer, decision)

    async def _complete(self, generation: Generation, formatter: StreamFormatter) -> web.Response:
        parts: list[str] = []
        token_ids: list[int] = []
        async with aclosing(generation.stream()) as deltas:
            async for delta in deltas:
                parts.append(delta.text)
                token_ids += delta.token_ids
        if generation.finish_reason is None:  # stream() raises rather than end unfinished
            raise RuntimeError("generation ended without a finish reason")
        usage = _usage(generation)
        return json_response(
            formatter.body("".join(parts), generation.finish_reason, usage, token_ids)
        )

    async def _stream(
        self, request: web.Request, generation: Generation, formatter: StreamFormatter
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
                await self._write_deltas(response, formatter, first, deltas)
                if formatter.include_usage:
                    await response.write(sse_event(formatter.usage_chunk(_usage(generation))))
            except (OpenAIError, WorkerError) as exc:
                error = exc if isinstance(exc, OpenAIError) else worker_error_to_openai(exc)
                logger.warning(
                    "stream %s failed after its first token: %s", formatter.request_id, exc
                )
                await response.write(sse_event(error.to_dict()))
            except ConnectionResetError:
                logger.debug("client of %s went away", formatter.request_id)
                return response
            await response.write(SSE_DONE)
            await response.write_eof()
            return response

    @staticmethod
    async def _write_deltas(
        response: web.StreamResponse,
        formatter: StreamFormatter,
        first: GenerationDelta,
        rest: AsyncIterator[GenerationDelta],
    ) -> None:
        with_ids = formatter.return_token_ids
        delta: GenerationDelta | None = first
        while delta is not None:
            # Text held back by the stop matcher leaves a delta with tokens but no text: sent
            # only if the client wants the token ids.
            if delta.text or delta.finish_reason is not None or (with_ids and delta.token_ids):
                chunk = formatter.text_chunk(delta.text, delta.finish_reason, delta.token_ids)
                await response.write(sse_event(chunk))
            delta = await anext(rest, None)


def _usage(generation: Generation) -> Usage:
    return Usage(
        prompt_tokens=generation.num_prompt_tokens,
        completion_tokens=generation.num_completion_tokens,
        cached_tokens=generation.num_cached_tokens,
    )


class GatewayServer:
    """Lifecycle of one gateway: load the tokenizer, start the admin API (when
    ``config.admin.port`` is set), launch the start-up workers (``config.launch.prefill`` /
    ``.decode``), register the configured workers, wait until all of them are ready, serve
    HTTP, shut down.

    ``launcher`` (optional) lets the registry start workers for `scale` and `set-role`; without
    one, a config with ``launch.store`` gets a :class:`LocalProcessLauncher`. The server closes
    the launcher at stop, which stops every worker it launched. A failed start stops whatever it
    had started."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        tokenizer: ModelTokenizer | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        """Raises ConfigError for an admin or launcher setting that cannot work (e.g. the admin
        API on with no token)."""
        self.config = config
        self.metrics = GatewayMetrics()
        self._tokenizer = tokenizer
        self._admin_config = _admin_config(config)
        self._local_launcher: LocalProcessLauncher | None = None
        if launcher is None and config.launch.enabled:
            launcher = self._local_launcher = _local_launcher(config)
        self._launcher = launcher
        self._registry: InstanceRegistry | None = None
        self._cluster_view: ClusterView | None = None
        """The prefix index (with config.routing.kv_metadata), following the metadata store."""
        self._admin: AdminServer | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.url = ""
        self.admin_port: int | None = None
        """The admin API's bound port once started (None while it is off)."""

    @property
    def registry(self) -> InstanceRegistry:
        """The instances (state, load, health checks; the AdminBackend); only between start()
        and stop()."""
        if self._registry is None:
            raise RuntimeError("GatewayServer.registry used before start() or after stop()")
        return self._registry

    @property
    def cluster_view(self) -> ClusterView | None:
        """The prefix index (with ``config.routing.kv_metadata``; else None, or before start)."""
        return self._cluster_view

    @property
    def admin_backend(self) -> AdminBackend:
        """What the admin gRPC service drives (the registry)."""
        return self.registry

    async def start(self) -> str:
        """Return the base URL once the workers are ready and the port is bound."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> str:
        config = self.config
        if self._tokenizer is None:
            self._tokenizer = await asyncio.to_thread(
                ModelTokenizer.from_model_dir, config.model_dir
            )
        registry = self._registry = InstanceRegistry(
            metrics=self.metrics,
            health_check_timeout_s=config.registry.health_check_timeout_s,
            store=open_registry_store(config.registry.url),
            launcher=self._launcher,
            drain_timeout_s=config.registry.drain_timeout_s,
            policy=config.routing.policy,
            scheduling=_scheduling_config(config),
            profile=replace(config.profiling, vocab_size=self._tokenizer.vocab_size),
        )
        if self._admin_config is not None:
            # Up before the workers are: `strata admin list` shows them starting.
            self._admin = AdminServer(self._admin_config, registry)
            try:
                self.admin_port = await self._admin.start()
            except AdminConfigError as exc:
                raise StartupError(str(exc)) from None
        try:
            await self._launch_startup_workers()
            await registry.register_configured(WorkerRole.PREFILL, config.prefill_endpoints)
            await registry.register_configured(WorkerRole.DECODE, config.decode_endpoints)
        except RegistryStoreError as exc:
            raise StartupError(str(exc)) from None
        await self._wait_until_ready()
        if config.routing.kv_metadata:
            self._cluster_view = await asyncio.to_thread(
                _start_cluster_view, config.routing.kv_metadata
            )
        gateway = Gateway(
            config,
            tokenizer=self._tokenizer,
            registry=registry,
            metrics=self.metrics,
            sampling_defaults=read_sampling_defaults(config.model_dir),
            router=Router(registry, self._cluster_view),
        )
        self._runner = web.AppRunner(
            gateway.build_app(),
            handler_cancellation=True,  # a client that disconnects cancels its request's work
            shutdown_timeout=config.http.shutdown_grace_s,
            access_log=None,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.http.host, config.http.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{config.http.host}:{port}"
        interval_s = config.registry.health_check_interval_s
        self._tasks.append(asyncio.create_task(registry.run_health_checks(interval_s=interval_s)))
        if self._admin is not None:
            self._tasks.append(asyncio.create_task(self._publish_admin_health(self._admin)))
        return self.url

    async def _launch_startup_workers(self) -> None:
        """Launch ``launch_prefill`` + ``launch_decode`` workers. They are then registered as
        configured too, so start-up waits for them and agrees the model limits with them, while
        their records stay ``launched``: `scale` may stop them like any launched worker."""
        config = self.config
        registry = self.registry
        await registry.sync()  # with a shared registry, what other gateways registered
        for role, count in (
            (WorkerRole.PREFILL, config.launch.prefill),
            (WorkerRole.DECODE, config.launch.decode),
        ):
            if count == 0:
                continue
            before = registry.list_instances()
            active = [
                i
                for i in before
                if i.role is role and i.state in (InstanceState.STARTING, InstanceState.READY)
            ]
            try:
                infos = await registry.scale(role, len(active) + count)
            except InstanceConflict as exc:  # e.g. no free core with core sharing off
                raise StartupError(f"cannot launch {role.name.lower()} workers: {exc}") from None
            known = {i.id for i in before}
            await registry.register_configured(
                role, [i.endpoint for i in infos if i.id not in known]
            )

    async def _wait_until_ready(self) -> None:
        """The registry's wait, cut short when a worker this server launched exits (a worker
        that cannot start would otherwise be waited for until the start-up timeout)."""
        config = self.config
        waiting = asyncio.ensure_future(
            self.registry.wait_until_ready(
                timeout_s=config.registry.worker_startup_timeout_s,
                poll_interval_s=min(0.5, config.registry.health_check_interval_s),
            )
        )
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=0.5)
                if not waiting.done():
                    self._raise_if_launched_worker_exited()
            waiting.result()
        finally:
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)

    def _raise_if_launched_worker_exited(self) -> None:
        if self._local_launcher is None:
            return
        for worker in self._local_launcher.workers:
            if not worker.alive():
                tail = "\n".join(worker.tail[-20:])
                raise StartupError(
                    f"launched worker {worker.name} exited with code {worker.proc.returncode} "
                    f"before it was ready:\n{tail}"
                )

    async def _publish_admin_health(self, admin: AdminServer) -> None:
        """The admin API's health follows the registry: SERVING while at least one prefill and
        one decode instance are ready."""
        published: bool | None = None
        while True:
            ready = self.registry.is_ready()
            if ready != published:
                await admin.set_ready(ready)
                published = ready
            await asyncio.sleep(self.config.registry.health_check_interval_s)

    async def stop(self) -> None:
        """Stop the admin API, stop accepting HTTP, let in-flight requests finish
        (shutdown_grace_s), close the channels, stop the launched workers. Idempotent."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._admin is not None:
            # No scaling while shutting down; a call in flight gets a few seconds.
            await self._admin.stop(grace_s=min(5.0, self.config.http.shutdown_grace_s))
            self._admin = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._registry is not None:
            await self._registry.close()
            self._registry = None
        if self._cluster_view is not None:
            await asyncio.to_thread(self._cluster_view.stop)
            self._cluster_view = None
        if self._launcher is not None:
            await self._launcher.close()
            self._launcher = None


def _scheduling_config(config: GatewayConfig) -> SchedulingConfig:
    """The policies' knobs, with the KV size of a token read from the model's config."""
    default = config.scheduling.kv_bytes_per_token
    return replace(
        config.scheduling, kv_bytes_per_token=kv_bytes_per_token(config.model_dir, default)
    )


def _start_cluster_view(spec: str) -> ClusterView:
    """The prefix index over the metadata store ``spec`` (blocking: catches up once)."""
    try:
        return ClusterView(open_metadata_store(spec)).start()
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot follow the KV metadata at {spec}: {exc}") from None


def _admin_config(config: GatewayConfig) -> AdminConfig | None:
    """The admin API's settings; the token is the config's, else $STRATA_ADMIN_TOKEN."""
    try:
        return config.admin.server_config()
    except AdminConfigError as exc:
        raise ConfigError(f"admin API: {exc}") from None


def _local_launcher(config: GatewayConfig) -> LocalProcessLauncher:
    try:
        return LocalProcessLauncher(config.launch.launcher_config(config.model_dir))
    except ValueError as exc:
        raise ConfigError(f"launcher: {exc}") from None


async def serve(config: GatewayConfig) -> int:
    """Run a gateway until SIGTERM/SIGINT; return the process exit status."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    logger.info(
        "starting: model_dir=%s prefill=%s decode=%s launch=%d+%d registry=%s admin=%s",
        config.model_dir,
        ",".join(config.prefill_endpoints),
        ",".join(config.decode_endpoints),
        config.launch.prefill,
        config.launch.decode,
        config.registry.url or "local",
        "off" if config.admin.port is None else f"{config.admin.host}:{config.admin.port}",
    )
    try:
        server = GatewayServer(config)
    except ConfigError as exc:
        print(f"strata gateway: cannot start: {exc}", file=sys.stderr, flush=True)
        return 2
    start = asyncio.create_task(server.start())
    stop_wait = asyncio.create_task(stop_requested.wait())
    try:
        await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            logger.info("stop requested during start-up")
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            return 0
        try:
            url = start.result()
        except (StartupError, OSError) as exc:
            print(f"strata gateway: cannot start: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"strata gateway listening on {url}", flush=True)
        await stop_wait
        logger.info("shutting down (grace %g s)", config.http.shutdown_grace_s)
        return 0
    finally:
        stop_wait.cancel()
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    config = GatewayConfig.from_argv(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
