"""Dask clusters for the chunked work: a local one by default, a shared one when users outgrow one machine.

The science (``ps3d_core.inference``) submits its chunk tasks to anything with
the ``concurrent.futures.Executor`` interface; this module turns a Dask
client into such executors. Prediction chunks are routed to workers that
advertise a ``gpu`` resource (``dask worker ... --resources gpu=1``), but
only when at least one worker does: a task that asks for a resource no
worker offers would wait forever.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager

from distributed import Client, LocalCluster

SCHEDULER_ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"


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


def chunk_executors(client: Client) -> tuple[Executor, Executor]:
    """(prediction executor, executor for the other stages) on ``client``'s cluster."""
    predict = client.get_executor(resources={"gpu": 1}) if gpu_workers(client) else client.get_executor()
    return predict, client.get_executor()
