"""The inbox watcher: every ready scan triggers the ``ingest`` deployment exactly once per content.

A loop on ``watchfiles.awatch`` wakes on file events and at least every
``tick_s`` seconds. On every wake it re-checks the scans that events touched
and those not yet submitted (readiness needs repeated looks: the quiet
period); every ``rescan_s`` seconds it re-checks every scan of the inbox, so
that events lost by the operating system (network file systems, overflowed
queues) delay a scan but never lose it. ``poll=True`` uses polling instead
of inotify, for NFS/SMB mounts where remote writes raise no events.

A ready scan is submitted with ``run_deployment(..., idempotency_key=
"ingest:<scan>:<fingerprint>", timeout=0)``: the Prefect server returns the
existing flow run for a key it has seen, so a restarted watcher, a second
watcher or a rescan never start a second ingestion of the same content. A run
for that key that was cancelled or crashed (the platform was stopped while it
ran), or that failed (the scan was quarantined, and an operator put it back),
is submitted again under a key derived from it (``...:after-<run id>``),
which is deterministic too. The ingest flow's
ledger (the catalog) is the final guard: its check makes a repeated run a
no-op even after the server forgot old runs. The watcher itself never opens
the database.

A run may also stop while the watcher runs: its process killed (the runner
marks it crashed) or cancelled. So the watcher keeps the flow run of each
scan it submitted, and on every full rescan it asks the server for the
state of those not yet final; a scan whose run crashed or was cancelled is
submitted again at once (the ``after-<run id>`` key above), without waiting
for a restart. A server that does not answer (restarting) delays this to the
next rescan.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ps3d_core.inbox import DEFAULT_QUIET_S, ReadinessTracker, list_scans

INGEST_DEPLOYMENT = "ingest-scan/ingest"
#: States of an earlier run for the same key after which a scan seen in the inbox is submitted again:
#: stopped or crashed runs, and failed ones (a failed scan leaves the inbox for the quarantine, so
#: seeing it again means an operator put it back).
RETRY_STATES = ("CANCELLED", "CRASHED", "FAILED")
#: States of a run submitted by this watcher after which the scan is submitted again while it is still in the
#: inbox: the run stopped without an outcome. A failed run is not resubmitted: it quarantined the scan, or
#: failed for a reason a retry would meet again (a full disk: the operator moves the scan back).
STOPPED_STATES = ("CANCELLED", "CRASHED")
#: States after which a run's state cannot change any more.
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")

logger = logging.getLogger("ps3d.watcher")


def idempotency_key(scan_name: str, fingerprint: str) -> str:
    return f"ingest:{scan_name}:{fingerprint}"


async def flow_run_state(flow_run_id: str) -> str | None:
    """The state type of a flow run (RUNNING, CRASHED, ...); None for a run without state."""
    from uuid import UUID

    from prefect import get_client

    async with get_client() as client:
        run = await client.read_flow_run(UUID(flow_run_id))
    return run.state.type.value if run.state is not None else None


@dataclass
class Submission:
    scan: str
    fingerprint: str
    key: str
    flow_run_id: str
    state: str | None
    new: bool


async def submit_ingest(
    scan: Path,
    fingerprint: str,
    *,
    deployment: str = INGEST_DEPLOYMENT,
    parameters: dict[str, Any] | None = None,
) -> Submission:
    """Trigger the ingest deployment for ``scan`` (idempotent per scan name and fingerprint)."""
    from prefect.deployments import run_deployment

    key = idempotency_key(scan.name, fingerprint)
    for _ in range(20):  # a chain of cancelled runs; bounded
        started = time.time()
        run = await run_deployment(
            deployment,
            parameters={"scan_path": str(scan), "fingerprint": fingerprint, **(parameters or {})},
            idempotency_key=key,
            timeout=0,
            as_subflow=False,
        )
        state = run.state.type.value if run.state is not None else None
        created = run.created.timestamp() if run.created is not None else started
        new = created >= started - 1.0
        if state in RETRY_STATES:  # a fresh run is never in these states
            key = f"{idempotency_key(scan.name, fingerprint)}:after-{run.id}"
            continue
        return Submission(scan.name, fingerprint, key, str(run.id), state, new)
    raise RuntimeError(f"{scan}: too many cancelled ingest runs in a row")


@dataclass
class InboxWatcher:
    """Watches ``inbox`` and submits ready scans (see the module docstring).

    Parameters
    ----------
    inbox : path
        Created if missing.
    quiet_s : float
        Quiet period of scans without the ``_SCAN_COMPLETE`` marker.
    tick_s : float
        Longest sleep between two looks at pending scans.
    rescan_s : float
        Period of the full rescan.
    poll : bool
        Poll the file system instead of using inotify (network file systems).
    submit : async callable(scan, fingerprint) -> Submission, optional
        Default :func:`submit_ingest` with ``deployment`` and ``parameters``.
    state_of : async callable(flow_run_id) -> state type, optional
        Default :func:`flow_run_state` (the Prefect server's).
    """

    inbox: Path
    quiet_s: float = DEFAULT_QUIET_S
    tick_s: float = 2.0
    rescan_s: float = 30.0
    poll: bool = False
    deployment: str = INGEST_DEPLOYMENT
    parameters: dict[str, Any] = field(default_factory=dict)
    submit: Callable[[Path, str], Awaitable[Submission]] | None = None
    state_of: Callable[[str], Awaitable[str | None]] = flow_run_state
    submitted: dict[str, str] = field(default_factory=dict)
    #: Scan name -> its latest flow run while that run is not final.
    running: dict[str, str] = field(default_factory=dict)
    submissions: list[Submission] = field(default_factory=list)
    _refused: set[str] = field(default_factory=set)
    _last_full: float = 0.0

    def __post_init__(self) -> None:
        self.inbox = Path(self.inbox).absolute()
        self.tracker = ReadinessTracker(quiet_s=self.quiet_s, inbox=self.inbox)

    async def _submit(self, scan: Path, fingerprint: str) -> Submission:
        if self.submit is not None:
            return await self.submit(scan, fingerprint)
        return await submit_ingest(scan, fingerprint, deployment=self.deployment, parameters=self.parameters)

    async def _resubmit_stopped(self) -> None:
        """Forget the submission of scans whose run crashed or was cancelled, so that this pass submits them again."""
        for name, flow_run_id in list(self.running.items()):
            try:
                state = await self.state_of(flow_run_id)
            except Exception as error:  # noqa: BLE001 - the server may be restarting: ask again next rescan
                logger.warning("could not read the state of flow run %s of %s (%s: %s)", flow_run_id, name,
                               type(error).__name__, error)  # fmt: skip
                return
            if state in FINAL_STATES:
                self.running.pop(name)
            if state in STOPPED_STATES:
                self.submitted.pop(name, None)
                logger.warning("%s: flow run %s is %s; submitting the scan again", name, flow_run_id, state)

    def _touched(self, changes: set[tuple[Any, str]]) -> set[str]:
        names = set()
        for _, path in changes:
            try:
                relative = Path(path).relative_to(self.inbox)
            except ValueError:
                continue
            if relative.parts:
                names.add(relative.parts[0])
        return names

    async def scan_once(self, touched: set[str] | None = None, full: bool = True) -> list[Submission]:
        """One pass: check scans (all when ``full``, else touched and pending ones) and submit the ready ones."""
        listing = list_scans(self.inbox)
        for path, reason in listing.refused:
            if path.name not in self._refused:
                self._refused.add(path.name)
                logger.warning("%s", reason if str(path) in reason else f"{path}: {reason}")
        present = {p.name for p in listing.scans}
        for name in list(self.submitted):
            if name not in present:  # moved away (quarantined) or deleted: forget it
                self.submitted.pop(name)
                self.running.pop(name, None)
                self.tracker.forget(self.inbox / name)
        if full:
            await self._resubmit_stopped()
        done: list[Submission] = []
        for scan in listing.scans:
            if not full and scan.name in self.submitted and scan.name not in (touched or set()):
                continue
            state = self.tracker.check(scan)
            if state.refused:
                if scan.name not in self._refused:
                    self._refused.add(scan.name)
                    logger.warning("%s", state.reason)
                continue
            if not state.ready or self.submitted.get(scan.name) == state.fingerprint:
                continue
            try:
                submission = await self._submit(scan, state.fingerprint)
            except Exception as error:  # noqa: BLE001 - the server may be restarting: try again next pass
                logger.warning("could not submit %s (%s: %s); retrying on the next pass",
                               scan.name, type(error).__name__, error)  # fmt: skip
                continue
            self.submitted[scan.name] = state.fingerprint
            self.running[scan.name] = submission.flow_run_id
            self.submissions.append(submission)
            done.append(submission)
            logger.info("%s ready (%s): %s flow run %s (%s)", scan.name, state.reason,
                        "started" if submission.new else "already had", submission.flow_run_id,
                        submission.state)  # fmt: skip
        return done

    async def run(self, stop_event: asyncio.Event | None = None) -> None:
        """Watch until ``stop_event`` is set (or the task is cancelled)."""
        from watchfiles import awatch

        self.inbox.mkdir(parents=True, exist_ok=True)
        stop_event = stop_event or asyncio.Event()
        logger.info("watching %s (quiet period %g s, full rescan every %g s%s)", self.inbox, self.quiet_s,
                    self.rescan_s, ", polling" if self.poll else "")  # fmt: skip
        await self.scan_once(full=True)
        self._last_full = time.monotonic()
        async for changes in awatch(
            self.inbox,
            stop_event=stop_event,
            yield_on_timeout=True,
            rust_timeout=int(self.tick_s * 1000),
            force_polling=self.poll,
            poll_delay_ms=int(min(self.tick_s, 1.0) * 1000),
            debounce=int(min(self.tick_s, 1.6) * 1000),
            recursive=True,
            ignore_permission_denied=True,
        ):
            full = time.monotonic() - self._last_full >= self.rescan_s
            await self.scan_once(self._touched(changes), full=full)
            if full:
                self._last_full = time.monotonic()


def watch_inbox_forever(inbox: str | os.PathLike[str], **options: Any) -> None:
    """Run an :class:`InboxWatcher` until Ctrl-C or SIGTERM (for ``ps3d watch``)."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await InboxWatcher(Path(inbox), **options).run(stop)

    asyncio.run(main())
