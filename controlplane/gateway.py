"""The gateway process: start-up, serving, signals and shutdown (`GatewayServer`, `serve`, `main`).

Entry point: `python -m controlplane.gateway --model-dir DIR --prefill H:P --decode H:P ...`
(`main(argv)`; `strata gateway` calls it). Start-up loads the tokenizer, starts the admin API when
`--admin-port` is set (controlplane/admin/), launches the `--launch-prefill/--launch-decode`
workers, waits until every worker's Health says ready, serves the HTTP application
(controlplane/api/app.py), then prints "strata gateway listening on http://HOST:PORT".
Once serving, a launched worker that stops serving is replaced
(controlplane/instances/supervision.py). SIGTERM/SIGINT stop accepting connections, let in-flight
requests finish for `shutdown_grace_s`, stop the launched workers, and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import uvloop
from aiohttp import web

from controlplane.admin.config import AdminConfig, AdminConfigError
from controlplane.admin.server import AdminServer
from controlplane.api.app import Gateway
from controlplane.api.http_server import ConnectionGuard, GuardedSite, raise_file_limit
from controlplane.config import ConfigError, GatewayConfig
from controlplane.instances.instance import StartupError
from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.store import RegistryStoreError, open_registry_store
from controlplane.instances.types import (
    InstanceConflict,
    InstanceState,
    Launcher,
    LauncherUnavailable,
    PoolLauncher,
)
from controlplane.launch.launcher import LocalProcessLauncher
from controlplane.launch.planner import PlannerLoop
from controlplane.launch.standby import StandbyLauncher
from controlplane.metrics import GatewayMetrics
from controlplane.request.routing import (
    Router,
    kv_bytes_per_token,
)
from controlplane.scheduling import SchedulingConfig
from controlplane.tenant_keys import ApiKeyStore, ApiKeyStoreError, LiveApiKeys
from controlplane.text.tokenizer import ModelTokenizer, read_sampling_defaults
from controlplane.workers.roles import WorkerRole
from kvstore.blocks.hashing import block_hash_key
from kvstore.cluster.view import ClusterView
from kvstore.metadata import open_metadata_store
from strata_common.grpc_auth import ClientAuth
from strata_common.secrets import redact_url

__all__ = ["GatewayServer", "main", "serve"]

if TYPE_CHECKING:
    from controlplane.launch.kubernetes import KubernetesLauncher

logger = logging.getLogger("controlplane.gateway")

_SUPERVISION_INTERVAL_S = 0.5
"""How often the launched workers' processes are looked at (a look is a waitpid each)."""


class GatewayServer:
    """Lifecycle of one gateway: load the tokenizer, start the admin API (when
    ``config.admin.port`` is set), launch the start-up workers (``config.launch.prefill`` /
    ``.decode``), register the configured workers, wait until all of them are ready, serve
    HTTP, shut down.

    ``launcher`` (optional) lets the registry start workers for `scale` and `set-role`; without
    one, a config with ``launch.store`` gets a :class:`LocalProcessLauncher`. ``pool_launcher``
    (optional) scales pools that something else runs instead; without one, a config with
    ``k8s.namespace`` gets a :class:`KubernetesLauncher`. The server closes the launcher at stop,
    which stops every worker it launched (a pool launcher's pods keep running). A failed start
    stops whatever it had started."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        tokenizer: ModelTokenizer | None = None,
        launcher: Launcher | None = None,
        pool_launcher: PoolLauncher | None = None,
    ) -> None:
        """Raises ConfigError for an admin or launcher setting that cannot work (e.g. the admin
        API on with no token)."""
        self.config = config
        self.metrics = GatewayMetrics()
        self._auth = config.client_auth()
        """The gateway's cluster credentials (None: no key file, no authentication)."""
        self._tokenizer = tokenizer
        self._admin_config = _admin_config(config)
        self._local_launcher: LocalProcessLauncher | None = None
        self._standby: StandbyLauncher | None = None
        if launcher is None and config.launch.enabled:
            launcher = self._local_launcher = _local_launcher(config)
            if config.launch.standby:
                launcher = self._standby = StandbyLauncher(
                    self._local_launcher, per_role=config.launch.standby
                )
        self._launcher = launcher
        self._k8s_launcher: KubernetesLauncher | None = None
        if pool_launcher is None and config.k8s.enabled:
            # Imported here: a gateway without --k8s-namespace loads no Kubernetes client.
            from controlplane.launch.kubernetes import KubernetesLauncher

            pool_launcher = self._k8s_launcher = KubernetesLauncher(config.k8s)
        if pool_launcher is not None and launcher is not None:
            raise ConfigError("a gateway has a process launcher or a pool launcher, not both")
        if config.planner.enabled and launcher is None and pool_launcher is None:
            raise ConfigError(
                "--planner resizes pools this gateway launches: give --launch-store (local "
                "workers) or --k8s-namespace (the Kubernetes Deployments)"
            )
        self._pool_launcher = pool_launcher
        self._registry: InstanceRegistry | None = None
        self._cluster_view: ClusterView | None = None
        """The prefix index (with config.routing.kv_metadata), following the metadata store."""
        self._admin: AdminServer | None = None
        self._runner: web.AppRunner | None = None
        self._gateway: Gateway | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._api_keys: LiveApiKeys | None = None
        """API keys from Redis (with ``http.api_keys_redis``)."""
        self.url = ""
        self.admin_port: int | None = None
        """The admin API's bound port once started (None while it is off)."""
        self.planner: PlannerLoop | None = None
        """The P:D planner's loop once serving, with ``--planner`` (docs/design/planner.md)."""

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
            store=open_registry_store(config.registry.url, config.cluster.key()),
            launcher=self._launcher,
            pool_launcher=self._pool_launcher,
            drain_timeout_s=config.registry.drain_timeout_s,
            announcement_grace_s=config.registry.announcement_grace_s,
            restart=config.launch.restart_policy(),
            stall_floor_s=config.registry.stall_floor_s,
            stall_factor=config.registry.stall_factor,
            policy=config.routing.policy.value,
            scheduling=_scheduling_config(config),
            profile=replace(config.profiling, vocab_size=self._tokenizer.vocab_size),
            worker_auth=self._auth,
        )
        if self._k8s_launcher is not None:
            try:  # credentials now: a gateway that cannot scale says so at start
                await self._k8s_launcher.open()
            except LauncherUnavailable as exc:
                raise StartupError(str(exc)) from None
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
        if self._standby is not None:
            self._standby.start()  # after the pool's own start: standbys never compete with it
        if config.routing.kv_metadata:
            self._cluster_view = await asyncio.to_thread(
                _start_cluster_view, config.routing.kv_metadata, self._auth
            )
        gateway = self._gateway = Gateway(
            config,
            tokenizer=self._tokenizer,
            registry=registry,
            metrics=self.metrics,
            sampling_defaults=read_sampling_defaults(config.model_dir),
            router=Router(registry, self._cluster_view, block_hash_key(config.cluster.key())),
        )
        if config.http.api_keys_redis:  # before the port opens: no request without its keys
            await self._start_api_keys(gateway)
        http = config.http
        self._runner = web.AppRunner(
            gateway.build_app(),
            handler_cancellation=True,  # a client that disconnects cancels its request's work
            shutdown_timeout=http.shutdown_grace_s,
            access_log=None,
            # aiohttp's one read-side timer: no complete request head for this long after the
            # connection opened or its previous response ended closes it (api/http_server.py).
            keepalive_timeout=http.read_timeout_s,
        )
        await self._runner.setup()
        raise_file_limit(http.max_connections)
        guard = ConnectionGuard(
            max_connections=http.max_connections,
            write_timeout_s=http.write_timeout_s,
            metrics=self.metrics,
        )
        site = GuardedSite(self._runner, http.host, http.port, guard)
        await site.start()
        self.url = f"http://{http.host}:{site.port}"
        interval_s = config.registry.health_check_interval_s
        self._tasks.append(asyncio.create_task(registry.run_health_checks(interval_s=interval_s)))
        # From now on a launched worker that stops serving is replaced (before, it fails the
        # start: _wait_until_ready); its exit is noticed within this interval.
        self._tasks.append(
            asyncio.create_task(registry.run_supervision(interval_s=_SUPERVISION_INTERVAL_S))
        )
        if self._admin is not None:
            self._tasks.append(asyncio.create_task(self._publish_admin_health(self._admin)))
        if config.planner.enabled:
            scheduling = _scheduling_config(config)
            assert scheduling.default_ttft_slo_s is not None  # GatewayConfig checks it
            assert scheduling.default_tpot_slo_s is not None
            self.planner = PlannerLoop(
                registry,
                config.planner,
                ttft_slo_s=scheduling.default_ttft_slo_s,
                tpot_slo_s=scheduling.default_tpot_slo_s,
            )
            self._tasks.append(asyncio.create_task(self.planner.run()))
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

    async def _start_api_keys(self, gateway: Gateway) -> None:
        """API keys from Redis (controlplane/tenant_keys.py): read now, then refreshed."""
        http = self.config.http
        key = self.config.cluster.key()
        if key is None:  # GatewayConfig refuses API keys without the cluster key
            raise StartupError("API keys in Redis need the cluster key (--cluster-key-file)")
        live = self._api_keys = LiveApiKeys(
            http.api_key_table(),
            ApiKeyStore(http.api_keys_redis, key),
            gateway.set_api_keys,
            interval_s=http.api_keys_refresh_s,
        )
        try:
            await live.refresh()
        except ApiKeyStoreError as exc:
            raise StartupError(str(exc)) from None
        self._tasks.append(asyncio.create_task(live.run()))

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
        if self._gateway is not None:
            self._gateway.close()
            self._gateway = None
        if self._api_keys is not None:
            await self._api_keys.close()
            self._api_keys = None
        if self._registry is not None:
            await self._registry.close()
            self._registry = None
        if self._cluster_view is not None:
            await asyncio.to_thread(self._cluster_view.stop)
            self._cluster_view = None
        if self._launcher is not None:
            await self._launcher.close()
            self._launcher = None
        if self._pool_launcher is not None:
            await self._pool_launcher.close()
            self._pool_launcher = None


def _scheduling_config(config: GatewayConfig) -> SchedulingConfig:
    """The policies' knobs, with the KV size of a token read from the model's config."""
    default = config.scheduling.kv_bytes_per_token
    return replace(
        config.scheduling, kv_bytes_per_token=kv_bytes_per_token(config.model_dir, default)
    )


def _start_cluster_view(spec: str, auth: ClientAuth | None) -> ClusterView:
    """The prefix index over the metadata store ``spec`` (blocking: catches up once), followed
    with the gateway's credentials."""
    try:
        return ClusterView(open_metadata_store(spec, auth=auth)).start()
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot follow the KV metadata at {redact_url(spec)}: {exc}") from None


def _admin_config(config: GatewayConfig) -> AdminConfig | None:
    """The admin API's settings; the token is the config's, else $STRATA_ADMIN_TOKEN."""
    try:
        return config.admin.server_config(cluster_key=config.cluster.key(), tls=config.tls)
    except AdminConfigError as exc:
        raise ConfigError(f"admin API: {exc}") from None


def _local_launcher(config: GatewayConfig) -> LocalProcessLauncher:
    try:
        return LocalProcessLauncher(
            config.launch.launcher_config(config.model_dir, config.cluster.key_file)
        )
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
    for warning in config.insecure_warnings():
        logger.warning("%s", warning)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
