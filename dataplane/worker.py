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
SIGTERM (`dataplane/announcer.py`), then drains (`dataplane/shutdown.py`).
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
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import grpc

from dataplane.announcer import announcement_loop
from dataplane.config import WorkerConfig
from dataplane.counters import EngineProgress, WorkerCounters
from dataplane.hardware import AMX_BF16_DEFECT, host_compute, resolve_dtype
from dataplane.service import WorkerService
from dataplane.shutdown import drain_and_stop
from kvstore.blocks.hashing import model_fingerprint
from strata_common.credentials import Identity, read_cluster_key
from strata_common.grpc_auth import ClientAuth, ServerAuthInterceptor, add_port, roles_only
from strata_common.tls import TlsConfig, insecure_warning
from strata_proto import worker_pb2_grpc

logger = logging.getLogger("strata.worker")


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
        self.kv_capacity_tokens = 0
        """KV tokens the engine holds (its cache's blocks x block_size), once created."""
        self.ready = False
        self.draining = False
        """SIGTERM received: Health says so, gateways send nothing new (dataplane/shutdown.py)."""
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
        if self.dtype == "bfloat16" and compute.isa == "amx_bf16":
            logger.warning(
                "--dtype bfloat16 on an AMX CPU (%s): %s; answers may be wrong",
                compute.name,
                AMX_BF16_DEFECT,
            )
        # Read by the engine's processes, which inherit this environment.
        os.environ.update(engine_environment(self.config, os.environ))

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
                "heap_trim_interval_s": cfg.engine_heap_trim_interval_s,
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
        blocks = vllm_config.cache_config.num_gpu_blocks or 0
        self.kv_capacity_tokens = int(blocks) * self.block_size

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
        await drain_and_stop(
            self,
            self.server,
            announcement,
            notice_s=self.config.drain_notice_s,
            timeout_s=self.config.drain_timeout_s,
        )

    def num_in_flight(self) -> int:
        """Requests in the gRPC handlers, or still the engine's (until it processed their end)."""
        return max(self.counters.num_running, self.progress.num_items)

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

    def kv_identity(self) -> dict[str, Any]:
        """Health's KV identity: with it the gateway hashes prompts into the connector's block
        keys and finds this engine's HBM blocks (events of source ``kv_source``) in the prefix
        index. Empty until the engine is up."""
        if self.engine is None or not self.ready:
            return {}
        from dataplane.connector import kv_layout_name

        return {
            "kv_source": self.instance_id,
            "model_fingerprint": self._fingerprint,
            "kv_layout": kv_layout_name(self.engine.vllm_config),
        }

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


def engine_environment(config: WorkerConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the worker sets for its engine's processes, given its own ``environ``."""
    env: dict[str, str] = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in environ:
        # Without it vLLM's CPU backend wants 92 % of RAM for its KV cache.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, config.kv_cache_bytes >> 30))
    if config.engine_onednn_cache is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(config.engine_onednn_cache)
    return env


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


def main(argv: list[str] | None = None) -> int:
    config = WorkerConfig.from_cli(argv, description=__doc__.splitlines()[0])
    Worker(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
