"""Scale-out on a real Dask cluster: `dask scheduler` and `dask worker` processes, started as users start them.

A module-scoped cluster (one scheduler, three one-thread workers with
nannies, one of them advertising ``gpu=1`` without having a GPU) listens on
127.0.0.1 only. ``ps3d segment`` and ``ps3d serve`` are pointed at it with
``DASK_SCHEDULER_ADDRESS``, as on a shared cluster, and must give what a
local run gives: the same labels, the same database. The workers run with
one BLAS/OpenMP thread, so a prediction is bit-identical to an inline run
with ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from distributed import Client
from fault_plugins import KillMidPrediction, KillSegmentDriver, pid_after_hanging_on_gpu
from harness import (
    INGEST_TIMEOUT_S,
    PS3D,
    SEGMENT_OPTIONS,
    Platform,
    ingest_runs,
    runs_of,
    sample_row,
    wait_for,
)
from reference import assert_same_database, reference_home

from deployments.cluster import chunk_executors, dask_client, gpu_workers
from ps3d_core.inference import SegmentParams, run_segmentation
from ps3d_core.io import open_ome_zarr
from ps3d_core.synth import synthesize, write_synthetic_scan

DASK = str(Path(sys.executable).with_name("dask"))
TESTS_DIR = Path(__file__).resolve().parent
#: The HTTP servers (health, metrics) run even with --no-dashboard: by default on *:8787 and *:<random>.
LOOPBACK_ANY_PORT = "127.0.0.1:0"
#: One thread per library in the workers: the same bits as a one-thread inline run, no oversubscription.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
#: The nannies leave glibc's malloc defaults alone, as deployments.cluster makes the platform's own nannies do.
MALLOC_DEFAULTS = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": '{"MALLOC_TRIM_THRESHOLD_": None}'}


class DaskProcesses:
    """A ``dask scheduler`` and ``dask worker`` processes (nanny on, one thread each) on 127.0.0.1.

    ``resources`` has one entry per worker: its ``--resources`` argument, or
    None. The workers import ``tests/`` (``PYTHONPATH``), where the fault
    plugins live. Logs go to ``root``.
    """

    def __init__(self, root: Path, resources: list[str | None]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        python_path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "MALLOC_"))}
        self.env |= ONE_THREAD | MALLOC_DEFAULTS
        self.env["PYTHONPATH"] = python_path
        self.processes: list[subprocess.Popen] = []
        scheduler_file = root / "scheduler.json"
        self._start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--dashboard-address", LOOPBACK_ANY_PORT,
                                  "--scheduler-file", str(scheduler_file)])  # fmt: skip
        self.address = wait_for(lambda: _address(scheduler_file), 120, "the Dask scheduler file")
        for n, resource in enumerate(resources):
            extra = ["--resources", resource] if resource else []
            self._start(f"worker-{n}", [DASK, "worker", self.address, "--name", f"worker-{n}", "--nthreads", "1",
                                        "--host", "127.0.0.1", "--nanny", "--no-dashboard",
                                        "--dashboard-address", LOOPBACK_ANY_PORT,
                                        "--local-directory", str(root / f"worker-{n}"), *extra])  # fmt: skip
        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(len(resources), timeout=180)

    def worker_process(self, n: int) -> psutil.Process:
        """The ``dask worker`` process (the nanny) of worker ``n``."""
        return psutil.Process(self.processes[1 + n].pid)

    def _start(self, name: str, command: list[str]) -> None:
        with (self.root / f"{name}.log").open("w") as log:
            self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def tree(self) -> list[psutil.Process]:
        """Every process of the cluster: schedulers, nannies, worker processes and their helpers."""
        tree = []
        for process in self.processes:
            try:
                parent = psutil.Process(process.pid)
                tree += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return tree

    def listening(self) -> list[tuple[int, str, int]]:
        """(pid, ip, port) of every listening TCP socket of the cluster's processes."""
        sockets = []
        for process in self.tree():
            try:
                connections = process.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            sockets += [(process.pid, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
        return sockets

    def stop(self) -> list[psutil.Process]:
        """SIGTERM the workers, then the scheduler; returns the processes still alive a minute later (killed)."""
        tree = self.tree()
        # workers first, the scheduler once they are gone: they close their work with it cleanly
        for group in (self.processes[1:], self.processes[:1]):
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in group:
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    pass
        _, alive = psutil.wait_procs(tree, timeout=15)
        for process in alive:  # not to leak them into the other tests; the caller fails on them
            process.kill()
        return alive


def _address(scheduler_file: Path) -> str | None:
    """The scheduler's address once its scheduler file is written completely."""
    try:
        return json.loads(scheduler_file.read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def assert_loopback_only(processes: DaskProcesses) -> None:
    """Every process of the cluster that listens does so on 127.0.0.1, and each server process listens."""
    sockets = processes.listening()
    assert sockets and {ip for _, ip, _ in sockets} == {"127.0.0.1"}, sockets
    # the scheduler, the nannies and the worker processes; not the multiprocessing helpers
    servers = {p.pid for p in processes.tree() if "resource_tracker" not in " ".join(p.cmdline())}
    assert servers == {pid for pid, _, _ in sockets}, (servers, sockets)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Scheduler + 3 workers, one with ``gpu=1``, on 127.0.0.1; on teardown no process of it may be left."""
    started = time.monotonic()
    processes = DaskProcesses(tmp_path_factory.mktemp("dask-cluster"), ["gpu=1", None, None])
    print(f"cluster of 3 workers up in {time.monotonic() - started:.1f} s")
    assert_loopback_only(processes)
    yield processes
    assert_loopback_only(processes)  # also the workers the nannies restarted
    alive = processes.stop()
    assert not alive, f"left behind: {alive}"


def worker_pids(client: Client) -> dict[int, str]:
    """pid -> address of every worker process of the cluster."""
    return {pid: address for address, pid in client.run(os.getpid).items()}


def task_pids(work: Path) -> dict[str, list[int]]:
    """stage -> pids of the processes that ran its tasks, from the task markers of a kept work directory."""
    stages = {}
    for stage in (work / "done").iterdir():
        if not stage.name.startswith("_"):  # the driver's own steps (_driver, _setup): no task statistics
            stages[stage.name] = [pickle.loads(m.read_bytes())["_stats"]["pid"] for m in stage.glob("*.pkl")]
    return stages


def labels_of(out: Path) -> np.ndarray:
    """The label volume of a segmentation output directory."""
    labels, _, _ = open_ome_zarr(out / "labels.ome.zarr")
    return np.asarray(labels[:])


def test_segment_on_the_cluster_equals_a_local_run(tmp_path, cluster, tiny_model_dir):
    """`ps3d segment` with DASK_SCHEDULER_ADDRESS: the labels of an inline run; prediction on the gpu worker only."""
    scan_dir = write_synthetic_scan(synthesize("tiny", 11, workers=1), tmp_path / "scans")
    params = SegmentParams(model_dir=tiny_model_dir, folds=(0,), device="cpu", chunk_size=64, batch_size=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' one thread: the same bits
    try:
        started = time.perf_counter()
        local = run_segmentation(scan_dir, tmp_path / "local", params)
        local_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)

    env = cluster.env | {"DASK_SCHEDULER_ADDRESS": cluster.address}
    out = tmp_path / "cluster"
    started = time.perf_counter()
    done = subprocess.run([PS3D, "segment", str(scan_dir), "--out", str(out), "--model", str(tiny_model_dir),
                           "--folds", "0", "--device", "cpu", "--chunk-size", "64", "--batch-size", "4",
                           "--keep-work"], env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    cli_s = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((out / "segment.json").read_text())
    print(f"segment: local inline {local_s:.1f} s (pipeline {local['timings_s']['total']:.1f} s); "
          f"ps3d segment on 3 workers {cli_s:.1f} s (pipeline {record['timings_s']['total']:.1f} s)")  # fmt: skip

    assert record["n_chunks"] == local["n_chunks"] == 8
    assert record["particle_count"] == local["particle_count"] > 0
    np.testing.assert_array_equal(labels_of(out), labels_of(tmp_path / "local"))

    with Client(cluster.address) as client:
        workers, gpu = worker_pids(client), gpu_workers(client)
    stages = task_pids(next(out.glob(".work-*")))
    assert len(gpu) == 1 and len(stages["predict"]) == 8
    assert {workers.get(pid) for pid in stages["predict"]} == set(gpu)  # every prediction on the gpu worker
    others = [pid for stage, pids in stages.items() if stage != "predict" for pid in pids]
    assert set(others) <= set(workers)  # on the workers, not in the `ps3d segment` process
    assert len({workers[pid] for pid in others}) > 1, stages


def serve_env(address: str, api_url: str, prefect_home: Path) -> dict[str, str]:
    """`ps3d serve`'s environment in the scale-out mode: the session's Prefect server and our cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_", "PS3D_"))}
    return env | {"PREFECT_API_URL": api_url, "DASK_SCHEDULER_ADDRESS": address, "PREFECT_HOME": str(prefect_home),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip


@pytest.fixture(scope="module")
def platform(cluster, prefect_api, tiny_model_dir, tmp_path_factory):
    """`ps3d serve` on the cluster, shared by the module's ingestion tests (each its own sample)."""
    root = tmp_path_factory.mktemp("cluster-platform")
    served = Platform(root / "home", serve_env(cluster.address, prefect_api, root / "prefect"), tiny_model_dir)
    yield served
    alive = served.stop(signal.SIGTERM)
    assert not alive, f"left behind: {alive}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The fault-free reference of the platform's home: its samples, ingested in the same order.

    The particles table has a column per phase of any sample, so a home is
    compared with a reference that holds the same samples.
    """
    return tmp_path_factory.mktemp("cluster-reference") / "home"


def drop_with_reference(inbox: Path, staging: Path, sample_id: str, seed: int) -> Path:
    """Drop a new scan into ``inbox`` (one rename); returns a copy of it (same files and times: same fingerprint)."""
    scan = write_synthetic_scan(synthesize("tiny", seed, workers=1, sample_id=sample_id), staging / "new")
    copy = shutil.copytree(scan, staging / "copy" / sample_id)  # copy2 keeps the modification times
    scan.rename(inbox / sample_id)  # complete at once: the watcher never sees half a scan
    return copy


def failed_runs(home: Path, sample_id: str) -> list[dict]:
    """The sample's failed runs: waiting for its row is over."""
    return [run for run in runs_of(home, sample_id) if run["status"] == "failed"]


def ingest_and_compare(platform: Platform, reference: Path, tmp_path: Path, tiny_model_dir: Path, seed: int) -> str:
    """Drop a scan, wait for it in the catalog, compare the database with the fault-free reference; the sample id."""
    sample = f"C-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    copy = drop_with_reference(platform.inbox, tmp_path / "staging", sample, seed)
    wait_for(lambda: sample_row(platform.home, sample) or failed_runs(platform.home, sample), INGEST_TIMEOUT_S,
             f"{sample} in the catalog", platform)  # fmt: skip
    print(f"{sample}: drop -> database {time.monotonic() - started:.1f} s")
    runs = runs_of(platform.home, sample)
    assert [r["status"] for r in runs] == ["succeeded"], runs
    reference_home(copy, tiny_model_dir, reference, SEGMENT_OPTIONS)
    assert_same_database(platform.home, reference, [sample])
    return sample


def test_serve_on_the_cluster_ingests_what_a_local_run_stores(tmp_path, cluster, platform, reference, tiny_model_dir):
    """`ps3d serve` with DASK_SCHEDULER_ADDRESS stores what the fault-free in-process reference stores."""
    assert f"using the Dask cluster at {cluster.address}" in platform.text()
    ingest_and_compare(platform, reference, tmp_path, tiny_model_dir, seed=6)


def test_worker_killed_mid_prediction_chunk_during_serve(
    tmp_path, cluster, platform, reference, prefect_api, tiny_model_dir
):
    """The gpu worker SIGKILLed in a prediction chunk: its nanny restarts it, the chunk is computed again."""
    flag = tmp_path / "killed.json"
    with Client(cluster.address) as client:
        before, gpu = worker_pids(client), gpu_workers(client)
        client.register_plugin(KillMidPrediction(str(flag)))
        try:
            sample = ingest_and_compare(platform, reference, tmp_path, tiny_model_dir, seed=7)
        finally:
            client.unregister_worker_plugin(KillMidPrediction.name)
        after = wait_for(lambda: len(worker_pids(client)) == 3 and worker_pids(client), 60, "3 workers again")
        gpu_after = gpu_workers(client)
    killed = json.loads(flag.read_text())
    assert before[killed["pid"]] == killed["worker"] == gpu[0]  # the prediction ran on the gpu worker
    assert killed["pid"] not in after  # gone; its nanny started a new process, which advertises gpu again
    assert len(gpu_after) == 1 and gpu_after[0] in after.values()
    assert len(ingest_runs(prefect_api, sample)) == 1  # recovered inside the one flow run


def test_segment_driver_killed_mid_prediction_during_serve(
    tmp_path, cluster, platform, reference, prefect_api, tiny_model_dir
):
    """The worker that runs the flow's segment task itself dies: Dask runs the task again elsewhere, which resumes."""
    flag = tmp_path / "killed.json"
    with Client(cluster.address) as client:
        before = worker_pids(client)
        client.register_plugin(KillSegmentDriver(str(flag)))
        try:
            sample = ingest_and_compare(platform, reference, tmp_path, tiny_model_dir, seed=13)
        finally:
            client.unregister_worker_plugin(KillSegmentDriver.name)
        after = wait_for(lambda: len(worker_pids(client)) == 3 and worker_pids(client), 60, "3 workers again")
    killed = json.loads(flag.read_text())
    assert before[killed["pid"]] == killed["worker"] and killed["pid"] not in after
    record = json.loads((platform.home / "segmentations" / sample / "segment.json").read_text())
    assert record["tasks"]["resumed"] >= 1  # the chunks finished before the kill were not computed again
    assert len(ingest_runs(prefect_api, sample)) == 1


#: Short, so the test is; the default (60 s) leaves a nanny time to restart a killed gpu worker.
GRACE_S = 4.0
#: How often the executor asks the scheduler for gpu workers (GpuExecutor's default).
POLL_S = 1.0


def test_prediction_falls_back_to_any_worker_once_the_gpu_worker_is_gone(tmp_path):
    """Regression: prediction tasks restricted to ``gpu`` waited forever once the only gpu worker was gone."""
    small = DaskProcesses(tmp_path / "cluster", ["gpu=1", None])
    try:
        with Client(small.address) as client:
            workers, gpu = worker_pids(client), gpu_workers(client)
            (cpu_pid,) = [pid for pid, address in workers.items() if address not in gpu]
            predict, _ = chunk_executors(client, gpu_grace_s=GRACE_S)
            in_flight, queued = predict.submit(pid_after_hanging_on_gpu), predict.submit(pid_after_hanging_on_gpu)
            wait_for(lambda: client.processing(gpu).get(gpu[0]), 60, "the tasks on the gpu worker")
            # the gpu worker's machine goes down: its nanny with it, nothing restarts it
            nanny = small.worker_process(0)
            for process in [nanny, *nanny.children(recursive=True)]:
                process.kill()
            gone = time.monotonic()
            assert {in_flight.result(timeout=120), queued.result(timeout=120)} == {cpu_pid}
            # they waited for a restart first: the grace, from when a poll last saw the gpu worker
            assert time.monotonic() - gone >= GRACE_S - POLL_S
            assert predict.submit(os.getpid).result(timeout=60) == cpu_pid  # and new ones no longer wait
    finally:
        alive = small.stop()
    assert not alive, f"left behind: {alive}"


def test_workers_keep_glibc_malloc_defaults(cluster):
    """Regression: Dask's MALLOC_TRIM_THRESHOLD_=65536 in the workers made CPU prediction twice as slow."""
    with dask_client(n_workers=1) as client:  # a local cluster, as `ps3d segment` and `ps3d serve` start
        assert list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == [None]
    with Client(cluster.address) as client:  # `dask worker` started as deployments.cluster documents
        assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
