"""A data-plane worker: one vLLM engine (AsyncLLM) in a role, served over gRPC (strata.v1.Worker).

Lifecycle (every role runs the same fixed sequence; roles differ only in the engine's KV role and in
which RPCs they accept):

    set_up_runtime -> create_engine -> create_service -> serve (until SIGTERM/SIGINT) -> clean_up

- Prefill (`Prefill` rpc): runs the prompt with max_tokens=1; the StrataConnector saves the prompt's
  full KV blocks to the store during that step; the reply carries the first token and the block
  keys.
- Decode (`Decode` rpc): runs prompt + tokens generated so far; the connector loads the stored
  blocks into the paged cache instead of recomputing them; tokens stream back as they are produced.

With a metadata store configured (`--kv-metadata`), the worker also publishes the blocks of its
engine's prefix cache as kvstore events (`dataplane/hbm_events.py`): source id = its instance id,
`SourceCleared` when it starts serving and after its engine stopped. With `--announce` it
announces itself in the gateways' shared registry once serving, and withdraws that first on
SIGTERM (`dataplane/announcer.py`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from dataplane.announcer import announcement_loop
from dataplane.config import WorkerConfig, WorkerRole
from dataplane.counters import EngineProgress, WorkerCounters
from dataplane.hardware import host_compute, resolve_dtype
from dataplane.kv_hint import KV_NODE_PARAM
from kvstore.blocks.hashing import model_fingerprint
from strata_common.credentials import Identity, read_cluster_key
from strata_common.grpc_auth import ClientAuth, ServerAuthInterceptor, add_port, roles_only
from strata_common.tls import TlsConfig, insecure_warning
from strata_proto import worker_pb2, worker_pb2_grpc

logger = logging.getLogger("strata.worker")

_FINISH = {
    "stop": worker_pb2.FINISH_REASON_STOP,
    "length": worker_pb2.FINISH_REASON_LENGTH,
    "abort": worker_pb2.FINISH_REASON_ABORT,
    "error": worker_pb2.FINISH_REASON_ABORT,
}
_ROLE = {
    WorkerRole.PREFILL: worker_pb2.ROLE_PREFILL,
    WorkerRole.DECODE: worker_pb2.ROLE_DECODE,
    WorkerRole.BOTH: worker_pb2.ROLE_BOTH,
}


def _stat_logger_factory(counters: WorkerCounters, progress: EngineProgress) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class KVStatsLogger(StatLoggerBase):
        """Receives the connector's counters from the engine-core process every step.

        With stats on (``disable_log_stats=False``) the engine core attaches scheduler stats to
        the output of every step it runs while it has requests (vLLM's ``Scheduler.
        update_from_output``), and AsyncLLM's output handler calls ``record`` once per such
        output, in the worker's event loop: one call = one completed engine step."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            # Known by now: AsyncLLM builds its loggers after the engine core's handshake.
            counters.kv_cache_blocks = int(vllm_config.cache_config.num_gpu_blocks or 0)

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                progress.step()
                counters.engine_step(float(getattr(scheduler_stats, "kv_cache_usage", 0.0)))
            data = getattr(scheduler_stats, "kv_connector_stats", None)
            if data:
                counters.add_kv(data)

        def log_engine_initialized(self) -> None:
            pass

    return KVStatsLogger


class Worker:
    """The lifecycle template. Subclass and override a hook to change one step."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.counters = WorkerCounters()
        self.progress = EngineProgress()
        self._abort_probes: set[asyncio.Task[None]] = set()
        self.engine: Any = None
        self.server: grpc.aio.Server | None = None
        self.block_size = 0
        self.max_model_len = 0
        self.ready = False
        self.instance_id = config.instance_id or ""
        self.hbm_events: Any = None  # HbmEventPublisher once serving, with kv_metadata set
        self.endpoint = ""  # HOST:PORT once the gRPC server is bound
        self._kv_events_dir: str | None = None
        self._fingerprint = b""
        self.dtype = resolve_dtype(config.dtype)
        """The engine's dtype ("auto" resolved for this host)."""
        self.hardware = host_compute().identity(self.dtype, _num_engine_cores())
        self.startup = StartupTimeline()
        """Where the start-up time goes (logged once serving; docs/benchmarks.md)."""

    # -- hooks -------------------------------------------------------------------------------

    def set_up_runtime(self) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        cfg = self.config
        warning = insecure_warning(
            cfg.host,
            "the worker service",
            secured=cfg.tls.enabled,
            insecure=cfg.insecure,
            keyed=cfg.cluster_key_file is not None,
        )
        if warning is not None:
            logger.warning("%s", warning)
        compute = host_compute()
        logger.info(
            "engine dtype %s (%s); compute %s",
            self.dtype,
            f"--dtype {self.config.dtype}" if self.config.dtype != "auto" else compute.reason,
            self.hardware,
        )
        # Without this vLLM's CPU backend wants 92 % of RAM for its KV cache.
        os.environ.setdefault(
            "VLLM_CPU_KVCACHE_SPACE", str(max(1, self.config.kv_cache_bytes >> 30))
        )

    def store_identity_name(self) -> str:
        """The NAME of this worker's identity ``worker/NAME`` at the store node: its instance id
        when configured, else its configured ADVERTISED_HOST:PORT, else its process id (the
        engine starts before the gRPC port is bound)."""
        cfg = self.config
        if cfg.instance_id:
            return cfg.instance_id
        if cfg.port:
            return cfg.advertised_endpoint(cfg.port)
        return f"pid-{os.getpid()}"

    def engine_args(self) -> Any:
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        cfg = self.config
        fingerprint = self._fingerprint = model_fingerprint(cfg.model_dir, self.dtype)
        kv_transfer = KVTransferConfig(
            kv_connector="StrataConnector",
            kv_connector_module_path="dataplane.connector",
            kv_role=cfg.role.kv_role,
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={
                "store_endpoint": cfg.store_endpoint,
                "model_fingerprint": fingerprint.hex(),
                # The key's file, never the key: vLLM logs its whole configuration.
                **(
                    {
                        "cluster_key_file": str(cfg.cluster_key_file),
                        "identity": f"worker/{self.store_identity_name()}",
                    }
                    if cfg.cluster_key_file is not None
                    else {}
                ),
                **(
                    {f"tls_{n}": str(getattr(cfg.tls, n)) for n in ("cert", "key", "ca")}
                    if cfg.tls.enabled
                    else {}
                ),
            },
        )
        return AsyncEngineArgs(
            model=str(cfg.model_dir),
            dtype=self.dtype,
            enforce_eager=cfg.enforce_eager,
            kv_cache_memory_bytes=cfg.kv_cache_bytes,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            enable_prefix_caching=cfg.enable_prefix_caching,
            seed=cfg.seed,
            disable_log_stats=False,
            kv_transfer_config=kv_transfer,
            kv_events_config=self.kv_events_config(),
        )

    def kv_events_config(self) -> Any:
        """vLLM's own KV cache events, published by the engine core on an ipc socket that the
        worker follows (see dataplane/hbm_events.py); None without a metadata store."""
        from vllm.config import KVEventsConfig

        cfg = self.config
        if cfg.kv_metadata is None or not cfg.enable_prefix_caching:
            return None
        if self._kv_events_dir is None:
            self._kv_events_dir = tempfile.mkdtemp(prefix="strata-kv-events-")
        return KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=f"ipc://{self._kv_events_dir}/events",
            replay_endpoint=f"ipc://{self._kv_events_dir}/replay",
            topic="strata",
        )

    def start_hbm_events(self) -> None:
        """Start publishing the engine's prefix cache as HBM events (needs the bound port)."""
        events = self.kv_events_config()
        if events is None:
            return
        from dataplane.connector import kv_layout_name
        from dataplane.hbm_events import HbmBlockTranslator, HbmEventPublisher
        from kvstore.blocks.hashing import block_hash_key, root_key
        from kvstore.metadata import open_metadata_store

        assert self.config.kv_metadata is not None
        layout = kv_layout_name(self.engine.vllm_config)
        fingerprint = self._fingerprint
        key = self.cluster_key()
        hash_key = block_hash_key(key)  # the connector's and the gateways' too

        def root_for(namespace: str) -> bytes:
            return root_key(fingerprint, layout, namespace, hash_key)

        translator = HbmBlockTranslator(
            self.instance_id, self.block_size, root_for, hash_key=hash_key
        )
        # Secret mode: this worker is worker/INSTANCE_ID, its events' source id (the metadata
        # service lets it publish under that id only; docs/design/security.md §5.1).
        store = open_metadata_store(self.config.kv_metadata, auth=self.client_auth())
        self.hbm_events = HbmEventPublisher(
            store,
            translator,
            events.endpoint,
            events.replay_endpoint,
            topic=events.topic,
            info={"endpoint": self.endpoint},
            heartbeat_interval_s=self.config.kv_heartbeat_interval_s,
            heartbeat_timeout_s=self.config.kv_heartbeat_timeout_s,
        ).start()

    def create_engine(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(
            self.engine_args(), stat_loggers=[_stat_logger_factory(self.counters, self.progress)]
        )
        vllm_config = self.engine.vllm_config
        self.block_size = int(vllm_config.cache_config.block_size)
        self.max_model_len = int(vllm_config.model_config.max_model_len)

    def cluster_key(self) -> bytes | None:
        """The cluster key (``--cluster-key-file``), or None: no authentication."""
        path = self.config.cluster_key_file
        return None if path is None else read_cluster_key(path)

    def tls(self) -> TlsConfig | None:
        """The TLS credentials (``--tls-*``), or None: secret mode or none."""
        return self.config.tls if self.config.tls.enabled else None

    def client_auth(self) -> ClientAuth | None:
        """This worker's credentials as a gRPC client (``worker/INSTANCE_ID``): its certificate
        in TLS mode, the cluster key in secret mode, None without either."""
        tls, key = self.tls(), self.cluster_key()
        if tls is not None:
            return ClientAuth.from_tls(tls, "worker", key)
        return None if key is None else ClientAuth(key, Identity("worker", self.instance_id))

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """With TLS or a cluster key, every Worker RPC needs a gateway's credentials (Prefill
        and Decode would bypass the gateway's admission, Health tells the model fingerprint).
        In TLS mode the caller's identity is its certificate's."""
        if self.tls() is not None:
            return [ServerAuthInterceptor(None, roles_only("gateway"))]
        key = self.cluster_key()
        return [] if key is None else [ServerAuthInterceptor(key, roles_only("gateway"))]

    def create_service(self) -> grpc.aio.Server:
        # At most config.rpc_limit calls at once (beyond: RESOURCE_EXHAUSTED). SO_REUSEPORT off,
        # so that no other process can bind this port beside us and take a share of its calls;
        # on only behind a launcher's reservation of the port (`reuse_port`), which Linux lets
        # processes of the same user share, and nobody else.
        server = grpc.aio.server(
            interceptors=self.server_interceptors(),
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.so_reuseport", int(self.config.reuse_port)),
            ],
            maximum_concurrent_rpcs=self.config.rpc_limit,
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(self), server)
        return server

    async def serve(self) -> None:
        self.server = self.create_service()
        port = add_port(self.server, self.tls())(f"{self.config.host}:{self.config.port}")
        await self.server.start()
        self.endpoint = self.config.advertised_endpoint(port)  # what others dial
        self.instance_id = self.config.instance_id or self.endpoint
        await asyncio.get_running_loop().run_in_executor(None, self.start_hbm_events)
        self.ready = True
        self.startup.mark("serving")
        logger.info("start-up: %s", self.startup)
        print(
            f"strata worker ready role={self.config.role.value} "
            f"listening on {self.config.host}:{port} instance={self.instance_id}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        announcement = announcement_loop(self.config, port, self.cluster_key())
        if announcement is not None:  # serving: gateways may find it from now on
            await announcement.start()
        await stop.wait()
        if announcement is not None:  # first: gateways drain this worker on their next round
            await announcement.stop()
        self.ready = False
        await self.server.stop(grace=5.0)

    def clean_up(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        # After the engine: its last events are in, and the final SourceCleared is the last word.
        if self.hbm_events is not None:
            self.hbm_events.close()
            self.hbm_events = None
        if self._kv_events_dir is not None:
            shutil.rmtree(self._kv_events_dir, ignore_errors=True)
            self._kv_events_dir = None

    async def generate(
        self, prompt: dict[str, Any], sampling: Any, request_id: str
    ) -> AsyncGenerator[Any, None]:
        """The engine's outputs for one request, counted as engine work (``progress``) while the
        engine has it: a request that ends unfinished (cancelled by the gateway, or an error)
        stays the engine's work until the engine core has processed its abort (a probe call
        through the core's input queue, which it reads between steps), so an engine core that
        is stopped does not look idle once the gateway gave up on its requests."""
        progress = self.progress
        progress.begin()
        finished = False
        try:
            async for out in self.engine.generate(prompt, sampling, request_id):
                finished = finished or out.finished
                yield out
        except ValueError:
            finished = True  # rejected by input processing: never reached the engine core
            raise
        finally:
            if finished:
                progress.end()
            else:
                task = asyncio.create_task(self._confirm_abort())
                self._abort_probes.add(task)
                task.add_done_callback(self._abort_probes.discard)

    async def _confirm_abort(self) -> None:
        try:
            await self.engine.is_sleeping()
        except Exception as exc:  # a dead engine core: nothing will ever confirm
            logger.warning("engine core did not confirm an abort: %s", exc)
        finally:
            self.progress.end()

    # -- driver ------------------------------------------------------------------------------

    def run(self) -> None:
        self.set_up_runtime()
        import vllm.v1.engine.async_llm  # noqa: F401  (timed on its own: see StartupTimeline)

        self.startup.mark("imports")
        try:
            self.create_engine()
            self.startup.mark("engine")
            asyncio.run(self.serve())
        finally:
            self.clean_up()


class WorkerService(worker_pb2_grpc.WorkerServicer):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def _sampling(
        self, sp: worker_pb2.SamplingParams, max_tokens: int, kind: Any, kv_node: str = ""
    ) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p if sp.top_p > 0 else 1.0,
            seed=sp.seed if sp.HasField("seed") else None,
            stop=list(sp.stop) or None,
            stop_token_ids=list(sp.stop_token_ids) or None,
            ignore_eos=sp.ignore_eos,
            output_kind=kind,
            # The gateway detokenizes the whole sequence itself
            # (controlplane/text/detokenizer.py); the engine needs text only to match stop strings.
            detokenize=bool(sp.stop),
            # The request's params for its KV connector (vLLM's Request.kv_transfer_params): the
            # store node holding the prompt's blocks, a hint for its match (multihost.md §2).
            extra_args={"kv_transfer_params": {KV_NODE_PARAM: kv_node}} if kv_node else None,
        )

    def _prompt(self, token_ids: Any, cache_salt: str) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": list(token_ids)}
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        return prompt

    async def _check(self, context: grpc.aio.ServicerContext, rpc: str, token_ids: Any) -> None:
        role = self.worker.config.role
        if rpc == "Prefill" and role is WorkerRole.DECODE:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this is a decode worker")
        if rpc == "Decode" and role is WorkerRole.PREFILL:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this is a prefill worker")
        if not self.worker.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is not ready")
        if len(token_ids) == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        if len(token_ids) >= self.worker.max_model_len:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {len(token_ids)} tokens does not fit max_model_len "
                f"{self.worker.max_model_len}",
            )

    async def Health(self, request: Any, context: Any) -> worker_pb2.HealthResponse:
        w = self.worker
        return worker_pb2.HealthResponse(
            ready=w.ready,
            role=_ROLE[w.config.role],
            model=str(w.config.model_dir),
            block_size=w.block_size,
            max_model_len=w.max_model_len,
            capacity=w.config.max_num_seqs,
            dtype=w.dtype,
            hardware=w.hardware,
            num_engine_requests=w.progress.num_items,
            stalled_s=w.progress.stalled_s(),
            num_engine_steps=w.progress.num_steps,
            **_kv_identity(w),
        )

    async def Stats(self, request: Any, context: Any) -> worker_pb2.StatsResponse:
        c = self.worker.counters
        return worker_pb2.StatsResponse(
            role=_ROLE[self.worker.config.role],
            num_requests=c.num_requests,
            num_running=c.num_running,
            kv_blocks_saved=int(c.kv["blocks_saved"]),
            kv_blocks_loaded=int(c.kv["blocks_loaded"]),
            kv_bytes_saved=int(c.kv["bytes_saved"]),
            kv_bytes_loaded=int(c.kv["bytes_loaded"]),
            kv_tokens_loaded=c.kv_tokens_loaded,
            prompt_tokens_computed=c.prompt_tokens_computed,
            kv_save_time_s=c.kv["save_time_s"],
            kv_load_time_s=c.kv["load_time_s"],
            kv_load_failures=int(c.kv["load_failures"]),
            kv_cache_blocks=c.kv_cache_blocks,
            kv_blocks_in_use=c.kv_blocks_in_use,
        )

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        from vllm.sampling_params import RequestOutputKind

        await self._check(context, "Prefill", request.prompt_token_ids)
        sp = self._sampling(request.sampling, 1, RequestOutputKind.FINAL_ONLY)
        counters = self.worker.counters
        counters.num_requests += 1
        counters.num_running += 1
        t0 = time.perf_counter()
        final = None
        try:
            async with aclosing(
                self.worker.generate(
                    self._prompt(request.prompt_token_ids, request.cache_salt),
                    sp,
                    request.request_id,
                )
            ) as outs:
                async for out in outs:
                    final = out
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            counters.num_running -= 1
        if final is None or not final.outputs or not final.outputs[0].token_ids:
            await context.abort(grpc.StatusCode.INTERNAL, "engine returned no token")
        assert final is not None
        comp = final.outputs[0]
        params = final.kv_transfer_params or {}
        num_cached = _num_cached_tokens(final, params)
        counters.finish_request(
            len(request.prompt_token_ids),
            num_cached,
            int(params.get("strata_num_external_tokens", 0)),
        )
        return worker_pb2.PrefillResponse(
            first_token_id=comp.token_ids[0],
            first_token_text=comp.text,
            finish_reason=(
                worker_pb2.FINISH_REASON_STOP
                if comp.finish_reason == "stop"
                else worker_pb2.FINISH_REASON_UNSPECIFIED
            ),
            block_keys=[bytes.fromhex(k) for k in params.get("strata_block_keys", [])],
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=num_cached,
            engine_time_s=time.perf_counter() - t0,
            kv_node=str(params.get(KV_NODE_PARAM) or ""),  # the connector's store node
        )

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        from vllm.sampling_params import RequestOutputKind

        await self._check(context, "Decode", request.prompt_token_ids)
        max_tokens = request.sampling.max_tokens
        if max_tokens < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be ≥ 1")
        sp = self._sampling(request.sampling, max_tokens, RequestOutputKind.DELTA, request.kv_node)
        counters = self.worker.counters
        counters.num_requests += 1
        counters.num_running += 1
        try:
            async with aclosing(
                self.worker.generate(
                    self._prompt(request.prompt_token_ids, request.cache_salt),
                    sp,
                    request.request_id,
                )
            ) as outs:
                async for out in outs:
                    comp = out.outputs[0]
                    chunk = worker_pb2.DecodeChunk(token_ids=comp.token_ids, text=comp.text)
                    if out.finished:
                        params = out.kv_transfer_params or {}
                        num_cached = _num_cached_tokens(out, params)
                        num_external = int(params.get("strata_num_external_tokens", 0))
                        chunk.finish_reason = _FINISH.get(
                            comp.finish_reason or "", worker_pb2.FINISH_REASON_ABORT
                        )
                        chunk.num_cached_tokens = num_cached
                        chunk.num_external_tokens = num_external
                        counters.finish_request(
                            len(request.prompt_token_ids), num_cached, num_external
                        )
                    yield chunk
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            counters.num_running -= 1


class StartupTimeline:
    """Seconds since the process started at each phase's end: ``imports`` (Python, torch, vLLM
    in this worker's process), ``engine`` (vLLM's engine-core and executor processes — two more
    interpreters importing the same — the model load, the KV cache), ``serving`` (the gRPC
    server, HBM events)."""

    def __init__(self) -> None:
        import psutil

        self._start = psutil.Process().create_time()
        self.marks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.marks[phase] = time.time() - self._start

    def __str__(self) -> str:
        parts, last = [], 0.0
        for phase, at in self.marks.items():
            parts.append(f"{phase} {at - last:.1f} s")
            last = at
        return ", ".join(parts) + f" (total {last:.1f} s since the process started)"


def _num_engine_cores() -> int:
    """The cores the engine computes on: VLLM_CPU_OMP_THREADS_BIND's list (the launcher sets it),
    else this process's affinity set."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    if bind and bind not in ("auto", "nobind"):
        cores: set[int] = set()
        for part in bind.replace("|", ",").split(","):
            low, _, high = part.partition("-")
            if low.strip().isdigit():
                cores.update(range(int(low), int(high or low) + 1))
        if cores:
            return len(cores)
    return len(os.sched_getaffinity(0))


def _num_cached_tokens(out: Any, params: dict[str, Any]) -> int:
    """Prompt tokens not computed: vLLM counts a planned load at scheduling time, even when the
    load then failed and the tokens were recomputed (the connector reports how many)."""
    num_cached = int(out.num_cached_tokens or 0)
    return max(0, num_cached - int(params.get("strata_num_failed_tokens", 0)))


def _kv_identity(worker: Worker) -> dict[str, Any]:
    """Health's KV identity: with it the gateway hashes prompts into the connector's block keys
    and finds this engine's HBM blocks (events of source ``kv_source``) in the prefix index."""
    if worker.engine is None or not worker.ready:
        return {}
    from dataplane.connector import kv_layout_name

    return {
        "kv_source": worker.instance_id,
        "model_fingerprint": worker._fingerprint,
        "kv_layout": kv_layout_name(worker.engine.vllm_config),
    }


def main(argv: list[str] | None = None) -> int:
    config = WorkerConfig.from_cli(argv, description=__doc__.splitlines()[0])
    Worker(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
