"""Dask clusters for the chunked work: a local one by default, a shared one when users outgrow one machine.

The science (``ps3d_core.inference``) submits its chunk tasks to anything with
the ``concurrent.futures.Executor`` interface; this module turns a Dask
client into such executors. Prediction chunks are routed to workers that
advertise a ``gpu`` resource (``dask worker ... --resources gpu=1``), but
only when at least one worker does: a task that asks for a resource no
worker offers would wait forever. For the same reason they fall back to any
worker when the cluster has had no gpu worker for a while
(:class:`GpuExecutor`): a nanny restarts a killed worker within seconds,
but a gpu worker gone for good would otherwise stall the segmentation.

Importing this module keeps glibc's malloc defaults in the worker processes
of the clusters this process starts (see :data:`NANNY_MALLOC_CONFIG`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask
from distributed import Client, Future, LocalCluster

SCHEDULER_ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"
#: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, to hand freed memory back to the OS
#: early. Any value of it also freezes glibc's mmap threshold at 128 KiB: every activation tensor of the
#: network becomes a fresh mmap, page-faulted in, and CPU prediction runs twice as slow. None unsets it
#: (for `dask worker` processes: DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{"MALLOC_TRIM_THRESHOLD_": None}').
NANNY_MALLOC_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
dask.config.set(NANNY_MALLOC_CONFIG)
#: Seconds prediction tasks wait for a gpu worker when the cluster has none (a nanny restarts one in seconds).
GPU_GRACE_S = 60.0

logger = logging.getLogger(__name__)


def scheduler_address(address: str | None = None) -> str | None:
    """The cluster to use: ``address``, else ``$DASK_SCHEDULER_ADDRESS``, else None (start a local one)."""
    return address or os.environ.get(SCHEDULER_ADDRESS_ENV) or None


@contextmanager
def dask_client(address: str | None = None, *, n_workers: int | None = None) -> Iterator[Client]:
    """A client of the cluster at ``address``, or of a new ``LocalCluster`` closed on exit.

    The local cluster runs one single-threaded worker process per core (at
    most 4), so each chunk task owns a core and torch's own threads do not
    oversubscribe it; it listens on the loopback interface only.
    """
    address = scheduler_address(address)
    if address is not None:
        with Client(address) as client:
            yield client
        return
    workers = n_workers or max(1, min(4, os.cpu_count() or 1))
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def gpu_workers(client: Client) -> list[str]:
    """Addresses of the workers that advertise a ``gpu`` resource."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(address for address, info in workers.items() if info.get("resources", {}).get("gpu", 0) > 0)


@dataclass
class _Task:
    """A task of a :class:`GpuExecutor`: the call, and its current Dask future."""

    fn: Callable[..., Any]
    args: tuple
    future: Future | None = None
    routed: bool = True


class GpuExecutor(Executor):
    """Runs tasks on workers with a ``gpu`` resource; on any worker once none has been seen for ``grace_s``.

    A gpu worker killed in the middle of a task is restarted by its nanny
    and advertises the resource again: its tasks wait for it. A gpu worker
    gone for good (its machine down, its nanny killed) would leave tasks
    restricted to ``gpu`` waiting forever: after ``grace_s`` seconds without
    any gpu worker, the tasks still waiting are resubmitted without the
    restriction, and so are new ones until a gpu worker is seen again. A
    resubmitted task may run twice: tasks must be idempotent, as the
    pipeline's chunk tasks are (their results are written atomically).
    """

    def __init__(self, client: Client, grace_s: float = GPU_GRACE_S, poll_s: float = 1.0) -> None:
        self._client = client
        self._grace_s = grace_s
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._tasks: dict[cf.Future, _Task] = {}
        self._watcher: threading.Thread | None = None
        self._gpu_seen = time.monotonic()
        self._fallen_back = False

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> cf.Future:
        """Submit ``fn(*args)``; returns a ``concurrent.futures.Future``."""
        outer: cf.Future = cf.Future()
        with self._lock:
            self._tasks[outer] = _Task(fn, args)
            self._dispatch(outer, routed=not self._fallen_back)
            if self._watcher is None:
                # the grace counts from when tasks start waiting, not from the last batch
                self._gpu_seen = time.monotonic()
                self._watcher = threading.Thread(target=self._watch, name="gpu-executor", daemon=True)
                self._watcher.start()
        return outer

    def _dispatch(self, outer: cf.Future, routed: bool) -> None:
        """Submit ``outer``'s task to Dask, restricted to gpu workers or not (the caller holds the lock)."""
        task = self._tasks[outer]
        task.routed = routed
        task.future = self._client.submit(task.fn, *task.args, pure=False, resources={"gpu": 1} if routed else None)
        task.future.add_done_callback(partial(self._deliver, outer))

    def _deliver(self, outer: cf.Future, future: Future) -> None:
        """Pass a finished Dask future's outcome on to ``outer``, unless it was superseded."""
        with self._lock:
            task = self._tasks.get(outer)
            if task is None or task.future is not future:
                return  # resubmitted: the new future delivers
            del self._tasks[outer]
        if future.status == "cancelled":
            outer.cancel()
            outer.set_running_or_notify_cancel()  # wakes as_completed() and wait()
        elif outer.set_running_or_notify_cancel():  # False: the caller cancelled it
            if future.status == "finished":
                outer.set_result(future.result())
            else:
                outer.set_exception(future.exception())

    def _watch(self) -> None:
        """While tasks are pending: note when a gpu worker was last seen; past the grace, reroute the waiting ones."""
        while True:
            time.sleep(self._poll_s)
            with self._lock:
                if not self._tasks or self._client.status != "running":
                    self._watcher = None
                    return
            try:
                gpu = bool(gpu_workers(self._client))
            except (OSError, TimeoutError) as error:  # the scheduler out of reach for now: the tasks' futures tell
                logger.debug("asking the scheduler for gpu workers failed: %s", error)
                continue
            if gpu:
                self._gpu_seen, self._fallen_back = time.monotonic(), False
            elif time.monotonic() - self._gpu_seen > self._grace_s:
                self._reroute()

    def _reroute(self) -> None:
        """Resubmit the tasks waiting for a gpu worker to any worker."""
        with self._lock:
            self._fallen_back = True
            stuck = [outer for outer, task in self._tasks.items() if task.routed]
            superseded = [self._tasks[outer].future for outer in stuck]
            for outer in stuck:
                self._dispatch(outer, routed=False)
        if stuck:
            self._client.cancel(superseded)
            logger.warning("no worker with a gpu resource for %.0f s: %d tasks resubmitted to any worker",
                           self._grace_s, len(stuck))  # fmt: skip


def chunk_executors(client: Client, gpu_grace_s: float = GPU_GRACE_S) -> tuple[Executor, Executor]:
    """(prediction executor, executor for the other stages) on ``client``'s cluster.

    Prediction goes to the gpu workers when the cluster has any
    (:class:`GpuExecutor`, falling back to any worker after ``gpu_grace_s``
    seconds without one), else anywhere. Every submission gets a new Dask
    key (``pure=False``): a rerun resumes from the pipeline's own task
    markers, never from the keys (and errors) of an earlier run's tasks that
    the scheduler still holds.
    """
    anywhere = client.get_executor(pure=False)
    return (GpuExecutor(client, gpu_grace_s) if gpu_workers(client) else anywhere), anywhere
