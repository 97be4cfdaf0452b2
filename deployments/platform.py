"""``ps3d serve``: the whole platform in one process tree, stopped cleanly by Ctrl-C or SIGTERM.

1. A Prefect server child (``prefect server start``, SQLite under
   ``<home>/prefect``) unless ``PREFECT_API_URL`` names one (shared server).
2. A persistent Dask ``LocalCluster`` unless ``DASK_SCHEDULER_ADDRESS`` names
   a cluster; its address is exported, so flow runs and their tasks use it.
3. The deployments, served by one Prefect ``Runner`` in this process:
   ``ingest-scan/ingest`` (concurrency-limited), ``retrain/weekly`` (cron
   with an explicit time zone; not paused on shutdown, so a shared server
   keeps scheduling it), ``resegment/all`` and ``evaluate/current``. A
   retraining missed while the platform was down runs once at start-up
   (:mod:`deployments.catchup`).
4. The inbox watcher (:mod:`deployments.watcher`).

The Prefect server may go away while the platform runs (restarted,
upgraded, its machine rebooted). The runner gives up after a few failed
polls; the platform then waits until the server answers and serves the
deployments with a new runner (:class:`RunnerSupervisor`), and the watcher
submits what arrived meanwhile on its next pass. Nothing needs a restart of
``ps3d serve``.

Shutdown stops the watcher and the runner (which cancels flow runs in
progress: the watcher resubmits them on the next start), closes the cluster
and stops the server child, in that order, whatever ended the platform.

Prefect reads its settings when it is imported, so :func:`prepare_environment`
sets the environment (``PS3D_HOME``, ``PREFECT_API_URL``,
``DASK_SCHEDULER_ADDRESS``, a 2 s runner poll) before anything imports it;
child processes (flow runs, Dask workers) inherit it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deployments.cluster import SCHEDULER_ADDRESS_ENV
from deployments.server import (
    DEFAULT_PORT,
    PREFECT_DIR,
    PrefectServer,
    api_healthy,
    port_in_use,
    start_prefect_server,
)

logger = logging.getLogger("ps3d.platform")

PLATFORM_JSON = "platform.json"
INBOX_DIR = "inbox"


@dataclass
class PlatformConfig:
    """Settings of ``ps3d serve`` (its command-line options)."""

    home: Path
    inbox: Path | None = None
    watch: bool = True
    quiet_s: float = 30.0
    tick_s: float = 2.0
    rescan_s: float = 30.0
    poll: bool = False
    ingest_concurrency: int = 1
    runner_limit: int = 2
    model_dir: str | None = None
    segment_options: dict[str, Any] = field(default_factory=dict)
    retrain_cron: str = "0 3 * * 0"
    timezone: str = "UTC"
    retrain_parameters: dict[str, Any] = field(default_factory=dict)
    catch_up: bool = True
    dask_workers: int | None = None
    port: int | None = None
    ui: bool = False
    runner_poll_s: float = 2.0

    def __post_init__(self) -> None:
        self.home = Path(self.home).absolute()
        self.inbox = Path(self.inbox).absolute() if self.inbox is not None else self.home / INBOX_DIR


def prepare_environment(config: PlatformConfig) -> None:
    """Environment for this process and its children; call before importing prefect."""
    if "prefect" in sys.modules:
        logger.warning("prefect was imported before the platform set its environment; settings may be stale")
    os.environ["PS3D_HOME"] = str(config.home)
    os.environ.setdefault("PREFECT_HOME", str(config.home / PREFECT_DIR / "client"))
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", str(max(1, int(config.runner_poll_s))))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # a runner unable to observe cancellations (its server went away) stops, and RunnerSupervisor replaces it
    os.environ.setdefault("PREFECT_RUNNER_CRASH_ON_CANCELLATION_FAILURE", "true")
    if config.model_dir:
        os.environ["PS3D_MODEL"] = str(Path(config.model_dir).absolute())


def start_server_if_needed(config: PlatformConfig) -> PrefectServer | None:
    """The server child, or None when ``PREFECT_API_URL`` names a server (which must answer)."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        deadline = time.monotonic() + 60
        while not api_healthy(url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PREFECT_API_URL={url} does not answer; start that server or unset the variable")
            time.sleep(1)
        logger.info("using the Prefect server at %s", url)
        return None
    port = config.port
    if port is None:
        port = DEFAULT_PORT if not port_in_use("127.0.0.1", DEFAULT_PORT) else None
    started = time.perf_counter()
    server = start_prefect_server(config.home / PREFECT_DIR, port=port, ui=config.ui)
    os.environ["PREFECT_API_URL"] = server.api_url
    logger.info("Prefect server at %s (started in %.1f s; database %s)", server.api_url,
                time.perf_counter() - started, server.prefect_home / "prefect.db")  # fmt: skip
    return server


def start_cluster_if_needed(config: PlatformConfig):
    """A persistent LocalCluster, or None when ``DASK_SCHEDULER_ADDRESS`` names a cluster."""
    if os.environ.get(SCHEDULER_ADDRESS_ENV):
        logger.info("using the Dask cluster at %s", os.environ[SCHEDULER_ADDRESS_ENV])
        return None
    from distributed import LocalCluster

    workers = config.dask_workers or max(1, min(4, os.cpu_count() or 1))
    started = time.perf_counter()
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        # one torch/BLAS thread per single-threaded worker: no oversubscription
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )  # fmt: skip
    os.environ[SCHEDULER_ADDRESS_ENV] = cluster.scheduler_address
    logger.info("Dask LocalCluster at %s with %d workers (started in %.1f s; dashboard %s)",
                cluster.scheduler_address, workers, time.perf_counter() - started, cluster.dashboard_link)  # fmt: skip
    return cluster


async def build_deployments(config: PlatformConfig) -> list:
    """The RunnerDeployments served by the platform."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.ingest import ingest_scan
    from flows.retrain import evaluate_current, resegment_all, retrain

    # the home travels with every run: a run picked up by another platform process still writes here
    ingest_parameters: dict[str, Any] = {"home": str(config.home)}
    if config.model_dir:
        ingest_parameters["model_dir"] = str(Path(config.model_dir).absolute())
    if config.segment_options:
        ingest_parameters["segment_options"] = config.segment_options
    # module entry points: flow runs (and the Dask workers unpickling their tasks) import flows.* as modules
    module = {"entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        await ingest_scan.ato_deployment(
            name="ingest", concurrency_limit=config.ingest_concurrency, parameters=ingest_parameters,
            description="Ingest one scan directory (triggered by the inbox watcher).", **module,
        ),
        await retrain.ato_deployment(
            name="weekly", schedules=[Cron(config.retrain_cron, timezone=config.timezone)], concurrency_limit=1,
            parameters={"home": str(config.home)} | config.retrain_parameters,
            description="Train on PS3D_HOME/annotations, evaluate against the current model, promote if better.",
            **module,
        ),
        await resegment_all.ato_deployment(
            name="all", concurrency_limit=1, parameters={k: v for k, v in ingest_parameters.items()},
            description="Re-segment every stored sample with the current model.", **module,
        ),
        await evaluate_current.ato_deployment(
            name="current", concurrency_limit=1, parameters={"home": str(config.home)}, description="Score the current model on held-out synthetic scans.",
            **module,
        ),
    ]  # fmt: skip


def write_platform_json(config: PlatformConfig, extra: dict[str, Any]) -> Path:
    from ps3d_core.io import write_text_atomic

    record = {"pid": os.getpid(), "api_url": os.environ.get("PREFECT_API_URL"),
              "dask_scheduler_address": os.environ.get(SCHEDULER_ADDRESS_ENV), "inbox": str(config.inbox),
              "home": str(config.home), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")} | extra  # fmt: skip
    return write_text_atomic(config.home / PLATFORM_JSON, json.dumps(record, indent=2) + "\n")


async def wait_for_api(stop: asyncio.Event, period_s: float = 1.0) -> bool:
    """Wait until the Prefect API answers (True) or ``stop`` is set (False)."""
    url = os.environ.get("PREFECT_API_URL", "")
    while not stop.is_set():
        if await asyncio.to_thread(api_healthy, url):
            return True
        try:
            await asyncio.wait_for(stop.wait(), period_s)
        except TimeoutError:
            pass
    return False


@dataclass
class RunnerSupervisor:
    """Serves the deployments with a Prefect ``Runner``, and with a new one when it broke.

    A server that goes away breaks a runner in one of two ways: its poll for
    scheduled runs fails a few times in a row and ``start`` raises (``Service
    exceeded error threshold``), or its cancellation observer fails the same
    way; with ``PREFECT_RUNNER_CRASH_ON_CANCELLATION_FAILURE`` (set by
    :func:`prepare_environment`) the runner then stops submitting runs and
    flags itself ``stopping`` instead of going on unable to cancel a run. Either
    way :meth:`run` waits until the server answers again, stops that runner
    (it cancels the flow runs it still holds: the watcher submits them again)
    and starts a new one, registering the deployments again. A runner stopped
    on purpose (SIGTERM, :meth:`stop`) ends :meth:`run`.
    """

    deployments: list
    limit: int
    runner: Any = None
    restarts: int = 0
    #: The current runner's ``start()``; :meth:`stop` waits for it.
    serving: asyncio.Task | None = None

    async def register(self) -> None:
        """A new runner with the deployments registered with the server (not polling yet)."""
        from prefect.runner import Runner

        self.runner = Runner(name=f"ps3d-{os.getpid()}", pause_on_shutdown=False, limit=self.limit)
        for deployment in self.deployments:
            await self.runner.add_deployment(deployment)

    async def _serve_once(self, stop: asyncio.Event) -> bool:
        """Serve with the current runner until it ends; True when it broke and must be replaced."""
        runner = self.runner
        serving = self.serving = asyncio.create_task(runner.start())
        while not serving.done():
            await asyncio.wait({serving}, timeout=1.0)
            # stopping while started, and not told to: it gave up (a SIGTERM also sets ``stop``)
            if runner.stopping and runner.started and not stop.is_set() and not serving.done():
                logger.warning("the runner stopped submitting runs (its server connection failed); replacing it "
                               "when the Prefect server answers")  # fmt: skip
                if not await wait_for_api(stop):
                    break
                await runner.astop()
                await asyncio.gather(serving, return_exceptions=True)
                return True
        await serving  # raises the runner's error
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until a runner ends on purpose or ``stop`` is set (:meth:`register` first)."""
        while True:
            try:
                if self.runner is None:
                    await self.register()
                if not await self._serve_once(stop):
                    return
            except Exception as error:  # noqa: BLE001 - the server went away: serve again when it is back
                if stop.is_set():
                    return
                logger.warning("the runner stopped (%s: %s); serving the deployments again when the Prefect "
                               "server answers", type(error).__name__, error)  # fmt: skip
            self.runner = None
            if not await wait_for_api(stop):
                return
            self.restarts += 1
            logger.info("Prefect server back: starting runner %d", self.restarts + 1)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the current runner and wait until it has cancelled the flow runs in progress.

        A SIGTERM reaches the runner's own handler too, which starts the same
        stop in the background; either way ``start()`` returns only once the
        runs are cancelled (their state set, their processes ended). Leaving
        before that lost the cancellation when the event loop closed: the run
        stayed RUNNING on the server with its process gone, holding the
        deployment's concurrency slot, and the watcher never submitted the
        scan again.
        """
        if self.runner is not None and self.runner.started:
            await asyncio.wait_for(self.runner.astop(), timeout_s)
        if self.serving is not None:
            await asyncio.wait({self.serving}, timeout=timeout_s)


async def serve_platform(config: PlatformConfig) -> None:
    """Serve the deployments and run the watcher until SIGINT/SIGTERM (environment already prepared)."""
    from deployments.catchup import catch_up_retrain
    from deployments.watcher import InboxWatcher

    deployments = await build_deployments(config)
    supervisor = RunnerSupervisor(deployments, config.runner_limit)
    await supervisor.register()  # before the catch-up: it starts a run of the registered retrain deployment
    if config.catch_up:
        try:
            await catch_up_retrain(config.home, config.retrain_cron, config.timezone)
        except Exception as error:  # noqa: BLE001 - a failed catch-up must not keep the platform down
            logger.warning("catching up a missed retraining failed: %s: %s", type(error).__name__, error)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = {asyncio.create_task(supervisor.run(stop), name="runner"), asyncio.create_task(stop.wait(), name="stop")}
    if config.watch:
        watcher = InboxWatcher(config.inbox, quiet_s=config.quiet_s, tick_s=config.tick_s,
                               rescan_s=config.rescan_s, poll=config.poll)  # fmt: skip
        tasks.add(asyncio.create_task(watcher.run(stop), name="watcher"))
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    print(f"ps3d platform ready: Prefect {os.environ.get('PREFECT_API_URL')}, Dask "
          f"{os.environ.get(SCHEDULER_ADDRESS_ENV)}, deployments {names}"
          + (f", watching {config.inbox}" if config.watch else ""), flush=True)  # fmt: skip
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.get_name() != "stop" and task.exception() is not None:
                raise task.exception()
    finally:
        stop.set()
        logger.info("shutting down")
        try:
            await supervisor.stop()
        except Exception as error:  # noqa: BLE001
            logger.warning("runner stop: %s", error)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_platform(config: PlatformConfig) -> None:
    """Everything of ``ps3d serve``; returns after a clean shutdown."""
    prepare_environment(config)
    config.home.mkdir(parents=True, exist_ok=True)
    config.inbox.mkdir(parents=True, exist_ok=True)
    server = cluster = None
    # SIGTERM before the loop runs: turn it into KeyboardInterrupt so the finally below still cleans up
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server = start_server_if_needed(config)
        cluster = start_cluster_if_needed(config)
        write_platform_json(config, {"config": json.loads(json.dumps(asdict(config), default=str))})
        signal.signal(signal.SIGTERM, previous)
        asyncio.run(serve_platform(config))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
        if cluster is not None:
            try:
                cluster.close(timeout=20)
            except Exception as error:  # noqa: BLE001
                logger.warning("closing the Dask cluster: %s", error)
        if server is not None:
            server.stop()
        (config.home / PLATFORM_JSON).unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        logger.info("stopped")
