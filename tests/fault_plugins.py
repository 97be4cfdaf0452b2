"""Faults for Dask workers (tests only): plugins that kill a worker in the middle of the segmentation.

Plugins and functions are pickled by reference to this module: the workers
of a cluster started outside pytest need ``tests/`` on their ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from distributed.diagnostics.plugin import WorkerPlugin


class KillMidPrediction(WorkerPlugin):
    """SIGKILLs the worker process that runs the first forward pass of a prediction chunk, once.

    Installed in every worker process (also those the nanny restarts): wraps
    the pipeline's task wrapper, to know which task the worker thread is in,
    and ``PatchPredictor.__call__``. The first forward pass inside a
    ``predict`` task, in any worker, claims ``flag`` (``O_EXCL``, so exactly
    one kill per flag), writes the chunk index, the pid and the worker's
    address into it, and SIGKILLs its own process: the network has run on the
    chunk's first batch, nothing of the chunk has been written. ``teardown``
    (on unregistering) puts the original functions back, so a long-lived
    cluster is clean again.
    """

    name = "kill-mid-prediction"

    def __init__(self, flag: str) -> None:
        self.flag = str(flag)

    def setup(self, worker) -> None:
        """Wrap the task wrapper and the forward pass of this worker process."""
        from ps3d_core.inference import pipeline, predict

        flag, current = self.flag, threading.local()
        run_task, forward = pipeline._run_task, predict.PatchPredictor.__call__
        self._originals = (run_task, forward)

        def tracked_run_task(plan_path, stage, index, body):
            current.task = (stage, [int(i) for i in index])
            try:
                return run_task(plan_path, stage, index, body)
            finally:
                current.task = None

        def killing_forward(predictor, x):
            out = forward(predictor, x)
            task = getattr(current, "task", None)
            if task is None or task[0] != "predict":
                return out
            if _claim(flag, {"chunk": task[1], "pid": os.getpid(), "worker": worker.address}):
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        pipeline._run_task = tracked_run_task
        predict.PatchPredictor.__call__ = killing_forward

    def teardown(self, worker) -> None:
        """Put the original task wrapper and forward pass back."""
        from ps3d_core.inference import pipeline, predict

        pipeline._run_task, predict.PatchPredictor.__call__ = self._originals


def _claim(flag: str, record: dict) -> bool:
    """Create ``flag`` with ``record`` unless it exists (``O_EXCL``: one claim per flag across processes)."""
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)
    os.close(fd)
    return True


class KillSegmentDriver(WorkerPlugin):
    """SIGKILLs the worker process that runs the segmentation's driver, after its first finished chunk, once.

    The driver (``run_segmentation`` in the ingest flow's ``segment`` task)
    waits for its chunk tasks with ``as_completed``; the wrapped one, in the
    process that first gets a chunk result back, claims ``flag`` (the pid and
    the worker's address) and SIGKILLs that process: the Prefect task dies
    in the middle of its prediction stage, with chunks finished, running and
    queued. ``teardown`` puts the original back.
    """

    name = "kill-segment-driver"

    def __init__(self, flag: str) -> None:
        self.flag = str(flag)

    def setup(self, worker) -> None:
        """Wrap the pipeline's ``as_completed`` in this worker process."""
        from ps3d_core.inference import pipeline

        flag, original = self.flag, pipeline.as_completed
        self._original = original

        def killing_as_completed(futures, timeout=None):
            for future in original(futures, timeout):
                yield future
                if _claim(flag, {"pid": os.getpid(), "worker": worker.address}):
                    os.kill(os.getpid(), signal.SIGKILL)

        pipeline.as_completed = killing_as_completed

    def teardown(self, worker) -> None:
        """Put the original ``as_completed`` back."""
        from ps3d_core.inference import pipeline

        pipeline.as_completed = self._original


def pid_after_hanging_on_gpu() -> int:
    """The worker's pid; on a worker with a ``gpu`` resource, only after 10 minutes (so it dies in flight)."""
    from distributed import get_worker

    if get_worker().state.total_resources.get("gpu"):
        time.sleep(600)
    return os.getpid()
