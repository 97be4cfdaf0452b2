"""Model jobs (training, evaluation) run in a fresh Python process, outside the Prefect flow-run process.

nnU-Net and the synthetic-scan generator start process pools. Inside a flow
run they inherit Prefect's SIGTERM handler and its threads (API client, log
shipping, heartbeat): measured, nnU-Net's preprocessing hung for good in a
flow run (its pool workers raised ``TerminationSignal`` when the pool was
closed), while the same call finished in 30 s in a plain process. So the
flows run these jobs with :func:`run_isolated`: a child ``python -m
flows.isolated SPEC`` that imports no Prefect, streams its output into the
flow's log and writes its JSON result; it is ended with the flow run.

Jobs are the functions of this module named in :data:`JOBS`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def train_and_compare(scans: str, labels: str, candidate_dir: str, config: dict[str, Any], current: str,
                      evaluation: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Train the candidate on the annotated scans, then score it and the current model on the same held-out scans."""
    from ps3d_core.training import TrainingConfig, compare_models, pair_scans_with_labels, train_model

    cases = pair_scans_with_labels(scans, labels)
    train_model(cases, candidate_dir, TrainingConfig(**config), log=lambda line: print(line, flush=True))
    return compare_models(candidate_dir, current, **evaluation)


def evaluate(model_dir: str, **options: Any) -> dict[str, Any]:
    """:func:`ps3d_core.training.evaluate_model` of one model."""
    from ps3d_core.training import evaluate_model

    return evaluate_model(model_dir, progress=lambda line: print(line, flush=True), **options)


JOBS: dict[str, Callable[..., Any]] = {"train_and_compare": train_and_compare, "evaluate": evaluate}


def run_isolated(job: str, kwargs: dict[str, Any], log: Callable[[str], None] = print) -> Any:
    """Run ``JOBS[job](**kwargs)`` in a child process; its JSON result.

    Raises
    ------
    RuntimeError
        The job failed; the message holds the end of its output.
    """
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}")
    with tempfile.TemporaryDirectory(prefix="ps3d-job-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"job": job, "kwargs": kwargs, "result": str(result)}))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "flows.isolated", str(spec)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        tail: deque[str] = deque(maxlen=40)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip()
                tail.append(line)
                if line.strip():
                    log(line)
            code = process.wait()
        finally:
            if process.poll() is None:  # the flow run is being stopped: stop the job and its pools too
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait()
        if code != 0:
            raise RuntimeError(f"{job} failed (exit status {code}):\n" + "\n".join(tail))
        return json.loads(result.read_text())


def _main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    value = JOBS[spec["job"]](**spec["kwargs"])
    Path(spec["result"]).write_text(json.dumps(value, default=str))


if __name__ == "__main__":
    _main(sys.argv[1])
