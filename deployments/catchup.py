"""Catching up a scheduled retraining that fell due while the platform was down.

Prefect's scheduler creates the runs of a cron schedule only while the server
runs, and ``ps3d serve`` usually runs the server itself: a Sunday on which the
platform was down has no retraining, or (when the server had created the run
beforehand) a *late* run that would start at the next start-up, one per
missed week. Neither is what a weekly retraining wants.

So at start-up the platform compares the last completed retraining
(``<home>/models/retrain.json``, written by the ``retrain`` flow whatever
its outcome) with the schedule's last fire time before now. If no retraining
completed since then, it cancels the late scheduled runs of the deployment
and triggers **one** run, with the idempotency key
``retrain-catchup:<home>:<fire time>``: restarting again before it finished
does not add a second one. A home that never retrained counts from the
platform's first start, so a fresh installation does not retrain at once.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from ps3d_core.model_registry import read_retrain_state, update_retrain_state

RETRAIN_DEPLOYMENT = "retrain/weekly"
CATCHUP_KEY_PREFIX = "retrain-catchup"
#: States of an earlier catch-up run after which it is submitted again (the platform was stopped while it ran).
RESUBMIT_STATES = ("CANCELLED", "CRASHED")

logger = logging.getLogger("ps3d.catchup")


def previous_fire_time(cron: str, timezone_name: str, now: datetime) -> datetime:
    """The latest time at or before ``now`` at which the cron schedule fires (aware, in ``timezone_name``)."""
    from prefect._vendor.croniter import croniter

    local = now.astimezone(ZoneInfo(timezone_name))
    return croniter(cron, local).get_prev(datetime)


def missed_fire_time(home: str | os.PathLike[str], cron: str, timezone_name: str,
                     now: datetime | None = None) -> datetime | None:  # fmt: skip
    """The fire time of a retraining missed since the last completed one (or the first start), else None.

    Records the first start in the retraining state when there is none.
    """
    now = now or datetime.now(timezone.utc)
    state = read_retrain_state(home)
    reference = state.get("last_completed_at") or state.get("first_started_at")
    if reference is None:
        update_retrain_state(home, first_started_at=now)
        return None
    fired = previous_fire_time(cron, timezone_name, now)
    return fired if reference < fired else None


def catchup_key(home: str | os.PathLike[str], fired: datetime) -> str:
    return f"{CATCHUP_KEY_PREFIX}:{Path(home).absolute()}:{fired.astimezone(timezone.utc).isoformat()}"


async def cancel_late_runs(deployment_id: Any, now: datetime) -> int:
    """Cancel the deployment's scheduled runs that should have started before ``now`` (not catch-up runs)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    cancelled = 0
    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                expected_start_time=FlowRunFilterExpectedStartTime(before_=now),
            ),
        )  # fmt: skip
        for run in runs:
            if (run.idempotency_key or "").startswith(CATCHUP_KEY_PREFIX):
                continue
            await client.set_flow_run_state(
                run.id, Cancelled(message="missed while the platform was down; replaced by one catch-up run"),
                force=True,
            )  # fmt: skip
            cancelled += 1
    return cancelled


async def catch_up_retrain(home: str | os.PathLike[str], cron: str, timezone_name: str,
                           deployment: str = RETRAIN_DEPLOYMENT, now: datetime | None = None) -> dict[str, Any] | None:  # fmt: skip
    """Trigger one retraining when one was missed (module docstring); the submitted run, else None."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    now = now or datetime.now(timezone.utc)
    fired = missed_fire_time(home, cron, timezone_name, now)
    async with get_client() as client:
        target = await client.read_deployment_by_name(deployment)
    late = await cancel_late_runs(target.id, now)
    if late:
        logger.info("cancelled %d late scheduled run(s) of %s", late, deployment)
    if fired is None:
        return None
    key = catchup_key(home, fired)
    for _ in range(10):
        run = await run_deployment(deployment, idempotency_key=key, timeout=0, as_subflow=False)
        state = run.state.type.value if run.state is not None else None
        if state in RESUBMIT_STATES:
            key = f"{catchup_key(home, fired)}:after-{run.id}"
            continue
        state_record = read_retrain_state(home)
        logger.info("the retraining due at %s was missed (last completed %s): catch-up flow run %s (%s)",
                    fired.isoformat(), state_record.get("last_completed_at") or "never", run.id, state)  # fmt: skip
        return {"flow_run_id": str(run.id), "state": state, "fired": fired.isoformat(), "key": key}
    raise RuntimeError(f"too many cancelled catch-up runs for the retraining due at {fired.isoformat()}")
