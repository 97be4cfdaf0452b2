"""Platform faults survived, nothing lost (issue 9): each fault test ends with the database a fault-free run gives.

The platform runs as users run it (`ps3d serve` in a subprocess, the
session's Prefect server and Dask cluster, or a server of the test's own
when the test restarts it), nothing is mocked, and every test ends with
:func:`reference.assert_same_database` against a reference database built
fault-free in this process from copies of the same scans. The faults:

* the ingest flow's process killed half-way: the watcher resubmits the
  crashed run, the new run resumes the segmentation and marks the dead run
  ``interrupted``;
* the Prefect server restarted while the watcher runs: scans dropped
  meanwhile are ingested once afterwards, ``ps3d serve`` survives;
* the watcher restarted (SIGKILL) while a scan is being ingested;
* the disk filling up during the re-ingestion of a stored sample (a tmpfs);
* two scan directories with the same sample_id at once;
* a scan whose files change while it is being ingested.

Each test prints its measured figures (pytest -s shows them).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from harness import (
    INGEST_TIMEOUT_S,
    QUIET_S,
    RESCAN_S,
    Platform,
    Watcher,
    fill_disk,
    flow_run_processes,
    flow_run_state,
    ingest_runs,
    reference_of,
    runs_of,
    sample_row,
    segmentation_markers,
    stage_scan,
    tmpfs,
    wait_for,
)
from reference import assert_same_database

from ps3d_core import catalog
from ps3d_core.claims import claim_winner, claimants
from ps3d_core.inbox import read_quarantine


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _stored_from(home: Path, sample: str) -> str:
    return Path(json.loads((home / "scans" / sample / "source.json").read_text())["path"]).name


# --------------------------------------------------------------------------
# the rules, without a platform
# --------------------------------------------------------------------------


def test_claim_winner_does_not_depend_on_order():
    import itertools

    names = ["scan-b", "scan-a", "scan-c"]
    for order in itertools.permutations(names):
        for scan in order:
            others = [n for n in order if n != scan]
            assert claim_winner(scan, others) == "scan-a"
            assert claim_winner(scan, [*others, scan]) == "scan-a"  # the scan among the claimants: the same
            assert claim_winner(scan, others, stored_from="scan-c") == "scan-c"  # stored: its directory owns it
    assert claim_winner("only", []) == "only"


def test_claimants_read_the_inbox(tmp_path):
    inbox = tmp_path / "inbox"
    for name, sample in [("b", "S1"), ("a", "S1"), ("c", "S2"), (".staging", "S1"), ("_truth", "S1")]:
        (inbox / name).mkdir(parents=True)
        (inbox / name / "scan.json").write_text(json.dumps({"sample_id": sample}))
    (inbox / "broken").mkdir()
    (inbox / "broken" / "scan.json").write_text("{not json")
    assert claimants(inbox, "S1") == ["a", "b"]  # hidden and reserved names are no scans
    assert claimants(inbox, "S2") == ["c"]
    assert claimants(tmp_path / "missing", "S1") == []


def test_a_dead_process_is_told_from_a_live_one():
    import socket

    import psutil

    from flows.ingest import process_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(child.pid).create_time()
        record = {"host": socket.gethostname(), "pid": child.pid, "pid_started": started}
        assert process_alive(record)
        assert not process_alive(record | {"pid_started": record["pid_started"] - 100})  # a reused pid
    finally:
        child.kill()
        child.wait()
    assert not process_alive(record)
    assert process_alive({})  # nothing recorded: left alone


def test_disk_full_errors_are_recognised():
    from flows.ingest import disk_full

    assert disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x"))
    assert disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert disk_full(catalog.CatalogError("/home", "No space left on device: 1.0 MiB free"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("segmentation failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(ValueError("bad scan"))


def test_store_on_a_full_disk_changes_nothing(tmp_path, tiny_model_dir):
    """Before: a store whose checkpoint or snapshot ran out of space raised after its commit, and the next write
    published the new version the caller was told had failed."""
    import pyarrow as pa

    from schemas.scan import load_scan_metadata

    staged = stage_scan(tmp_path / "staged", _unique("F"), seed=21)
    sample = staged.name
    with tmpfs(tmp_path / "disk", 24) as disk:
        home = reference_of(disk, [staged], tiny_model_dir)
        before = tmp_path / "before"
        shutil.copytree(home, before)
        table, phases, source = catalog.read_particles_file(catalog.particles_file(home, sample))
        table = table.set_column(table.schema.get_field_index("run_id"), "run_id", pa.array(["r-full"] * len(table)))
        size = (home / "ps3d.duckdb").stat().st_size
        ballast = fill_disk(disk, size + (1 << 20))  # room for the Parquet file and a little, not for a checkpoint
        run = {"run_id": "r-full", "sample_id": sample, "status": "succeeded", "started_at": "2026-01-01T00:00:00"}
        with pytest.raises(catalog.CatalogError, match="No space left on device") as raised:
            catalog.store_sample(home, load_scan_metadata(staged), table, run, phases=phases or None,
                                 phases_source=source)  # fmt: skip
        print(f"refused: {raised.value}")
        ballast.unlink()
        catalog.init_catalog(home)  # the next write publishes whatever was committed: nothing
        assert_same_database(home, before, [sample])
        assert catalog.get_sample(home, sample)["last_run_id"] != "r-full"
        assert [p.name for p in (home / "particles").iterdir()] == [f"sample_id={sample}"]
        assert len(list((home / "particles" / f"sample_id={sample}").iterdir())) == 1
        assert not list((home / ".staging").iterdir())


def test_quarantine_on_a_full_disk_keeps_the_scan(tmp_path):
    from ps3d_core.inbox import quarantine

    with tmpfs(tmp_path / "disk", 16) as disk:
        scan = stage_scan(disk / "inbox", _unique("Q"), seed=22)
        files = sorted(p.name for p in scan.iterdir())
        fill_disk(disk, 0)
        with pytest.raises(OSError) as raised:
            quarantine(scan, disk / "home", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), stage="segment")
        assert raised.value.errno == errno.ENOSPC  # error.json did not fit
        assert sorted(p.name for p in scan.iterdir()) == files  # the scan stayed, whole
        assert not list((disk / "home" / "quarantine").iterdir())  # and no half entry


# --------------------------------------------------------------------------
# the platform's faults
# --------------------------------------------------------------------------


def test_killed_flow_process_is_resubmitted_and_resumes(tmp_path, platform_env, prefect_api, tiny_model_dir):
    home = tmp_path / "home"
    sample = _unique("K")
    staged = stage_scan(tmp_path / "staged", sample, seed=11)
    reference = reference_of(tmp_path, [staged], tiny_model_dir)
    platform = Platform(home, platform_env, tiny_model_dir)
    try:
        dropped = time.monotonic()
        os.rename(staged, platform.inbox / sample)
        wait_for(lambda: segmentation_markers(home), INGEST_TIMEOUT_S, "the first segmentation chunk", platform)
        process = wait_for(lambda: flow_run_processes(platform), 30, "the flow run's process", platform)[0]
        first = ingest_runs(prefect_api, sample)[0]
        markers = len(segmentation_markers(home))
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: flow_run_state(prefect_api, first["id"]) == "CRASHED", 60, "the crashed run", platform)
        crashed = time.monotonic()
        wait_for(lambda: len(ingest_runs(prefect_api, sample)) == 2, 60, "the resubmission", platform)
        resubmitted = time.monotonic()
        wait_for(lambda: sample_row(home, sample), INGEST_TIMEOUT_S, f"{sample} in the catalog", platform)
        done = time.monotonic()
        print(f"killed {killed - dropped:.1f} s after the drop ({markers} chunk markers); crashed after "
              f"{crashed - killed:.1f} s, resubmitted after {resubmitted - killed:.1f} s, stored "
              f"{done - killed:.1f} s after the kill")  # fmt: skip

        runs = ingest_runs(prefect_api, sample)
        assert [r["state_type"] for r in runs] == ["CRASHED", "COMPLETED"]
        assert runs[1]["idempotency_key"] == f"{runs[0]['idempotency_key']}:after-{runs[0]['id']}"
        assert f"flow run {first['id']} is CRASHED; submitting the scan again" in platform.text()
        rows = runs_of(home, sample)
        assert [r["status"] for r in rows] == ["interrupted", "succeeded"], rows
        assert "its process ended without recording an outcome" in rows[0]["error"]
        segment = json.loads((home / "segmentations" / sample / "segment.json").read_text())
        print(f"segmentation tasks of the second run: {segment['tasks']}")
        assert segment["tasks"]["resumed"] >= markers > 0  # the chunks of the killed run were not run again
        assert not list((home / "work").iterdir())
        assert_same_database(home, reference, [sample])  # one row per particle: no duplicates
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive


def test_platform_stopped_during_ingestion_resumes_after_restart(tmp_path, platform_env, prefect_api,
                                                                 tiny_model_dir):  # fmt: skip
    """Before: the run stayed RUNNING on the server with its process gone, holding the deployment's slot."""
    home = tmp_path / "home"
    sample = _unique("T")
    staged = stage_scan(tmp_path / "staged", sample, seed=15)
    reference = reference_of(tmp_path, [staged], tiny_model_dir)
    platform = Platform(home, platform_env, tiny_model_dir)
    try:
        os.rename(staged, platform.inbox / sample)
        wait_for(lambda: segmentation_markers(home), INGEST_TIMEOUT_S, "the first segmentation chunk", platform)
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive
    first = ingest_runs(prefect_api, sample)[0]
    assert first["state_type"] == "CANCELLED", first["state"]
    platform = Platform(home, platform_env, tiny_model_dir)
    try:
        restarted = time.monotonic()
        wait_for(lambda: sample_row(home, sample), INGEST_TIMEOUT_S, f"{sample} in the catalog", platform)
        print(f"restart -> database: {time.monotonic() - restarted:.1f} s")
        runs = ingest_runs(prefect_api, sample)
        assert [r["state_type"] for r in runs] == ["CANCELLED", "COMPLETED"]
        assert runs[1]["idempotency_key"].endswith(f":after-{first['id']}")
        assert [r["status"] for r in runs_of(home, sample)] == ["interrupted", "succeeded"]
        segment = json.loads((home / "segmentations" / sample / "segment.json").read_text())
        assert segment["tasks"]["resumed"] > 0
        assert_same_database(home, reference, [sample])
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive


def test_prefect_server_restart_while_the_watcher_runs(tmp_path, platform_env, tiny_model_dir):
    from deployments.server import free_port, start_prefect_server

    port = free_port()
    prefect_home = tmp_path / "prefect-server"
    server = start_prefect_server(prefect_home, port=port, timeout_s=180)
    env = platform_env | {"PREFECT_API_URL": server.api_url}
    home = tmp_path / "home"
    samples = [_unique("P0"), _unique("P1")]
    staged = [stage_scan(tmp_path / "staged", sample, seed=30 + i) for i, sample in enumerate(samples)]
    reference = reference_of(tmp_path, staged, tiny_model_dir)
    platform = Platform(home, env, tiny_model_dir)
    try:
        server.stop()
        stopped = time.monotonic()
        for path, sample in zip(staged, samples):
            os.rename(path, platform.inbox / sample)
        # the watcher fails to submit them, the runner's polls fail meanwhile
        wait_for(lambda: all(f"could not submit {s}" in platform.text() for s in samples), 120,
                 "the watcher to notice the server is gone", platform)  # fmt: skip
        time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
        assert platform.process.poll() is None, "ps3d serve died with its Prefect server"
        server = start_prefect_server(prefect_home, port=port, timeout_s=180)
        restarted = time.monotonic()
        wait_for(lambda: all(sample_row(home, s) for s in samples), INGEST_TIMEOUT_S,
                 "the scans dropped meanwhile in the catalog", platform)  # fmt: skip
        replaced = "Prefect server back: starting runner 2" in platform.text()
        print(f"server down {restarted - stopped:.1f} s; both scans dropped meanwhile stored "
              f"{time.monotonic() - restarted:.1f} s after its restart (runner replaced: {replaced})")  # fmt: skip

        assert platform.process.poll() is None
        for sample in samples:
            runs = ingest_runs(server.api_url, sample)
            assert [r["state_type"] for r in runs] == ["COMPLETED"], (sample, runs)
            assert [r["status"] for r in runs_of(home, sample)] == ["succeeded"]
        assert_same_database(home, reference, samples)
    finally:
        alive = platform.stop(signal.SIGTERM)
        server.stop()
    assert not alive


def test_restarted_watcher_ingests_nothing_twice(tmp_path, platform_env, prefect_api, tiny_model_dir):
    home = tmp_path / "home"
    samples = [_unique("W0"), _unique("W1")]
    staged = [stage_scan(tmp_path / "staged", sample, seed=40 + i) for i, sample in enumerate(samples)]
    reference = reference_of(tmp_path, staged, tiny_model_dir)
    platform = Platform(home, platform_env, tiny_model_dir, "--no-watch")
    args = ["--home", str(home), "--quiet", str(QUIET_S), "--rescan", str(RESCAN_S)]
    watcher = Watcher(args, platform_env, tmp_path / "watch-1.log")
    try:
        os.rename(staged[0], platform.inbox / samples[0])
        wait_for(lambda: sample_row(home, samples[0]), INGEST_TIMEOUT_S, f"{samples[0]} in the catalog", platform)
        os.rename(staged[1], platform.inbox / samples[1])
        wait_for(lambda: [r for r in ingest_runs(prefect_api, samples[1]) if r["state_type"] == "RUNNING"], 120,
                 f"{samples[1]} being ingested", platform)  # fmt: skip
        assert watcher.stop(signal.SIGKILL) == -signal.SIGKILL
        killed = time.monotonic()
        watcher = Watcher(args, platform_env, tmp_path / "watch-2.log")
        print(f"watcher back in {time.monotonic() - killed:.1f} s")
        wait_for(lambda: sample_row(home, samples[1]), INGEST_TIMEOUT_S, f"{samples[1]} in the catalog", platform)
        time.sleep(2 * RESCAN_S)  # the restarted watcher's full rescans: nothing more is submitted

        for sample in samples:
            assert f"{sample} ready (_SCAN_COMPLETE present): already had flow run" in watcher.text()
            assert [r["state_type"] for r in ingest_runs(prefect_api, sample)] == ["COMPLETED"]
            assert [r["status"] for r in runs_of(home, sample)] == ["succeeded"]
        assert_same_database(home, reference, samples)
    finally:
        code = watcher.stop(signal.SIGTERM)
        alive = platform.stop(signal.SIGTERM)
    assert code == 0 and not alive


def test_disk_full_while_writing_leaves_the_sample_as_it_was(tmp_path, platform_env, prefect_api, tiny_model_dir):
    sample = _unique("D")
    original = stage_scan(tmp_path / "original", sample, seed=50)
    changed = tmp_path / "changed" / sample
    shutil.copytree(original, changed)
    metadata = json.loads((changed / "scan.json").read_text())
    (changed / "scan.json").write_text(json.dumps(metadata | {"notes": "re-measured"}, indent=2) + "\n")
    after = reference_of(tmp_path, [changed], tiny_model_dir)
    before = reference_of(tmp_path, [original], tiny_model_dir)  # the sample as stored fault-free
    with tmpfs(tmp_path / "home", 40) as home:
        shutil.copytree(before, home, dirs_exist_ok=True)
        platform = Platform(home, platform_env, tiny_model_dir)
        try:
            staged = platform.inbox / ".staging" / sample  # hidden: not a scan yet
            shutil.copytree(changed, staged)
            scan = platform.inbox / sample
            os.rename(staged, scan)
            # the run is recorded and its tasks start writing: now the disk fills up (another program's file)
            wait_for(lambda: list((home / "work").glob(f"{sample}-*")), INGEST_TIMEOUT_S, "the run's work directory",
                     platform)  # fmt: skip
            ballast = fill_disk(home, 256 << 10)
            filled = time.monotonic()
            entry = wait_for(lambda: [q for q in read_quarantine(home) if q["scan"] == sample], INGEST_TIMEOUT_S,
                             "the quarantine", platform)[0]  # fmt: skip
            print(f"failed at {entry['stage']} {time.monotonic() - filled:.1f} s after the disk filled up: "
                  f"{entry['problem'][:300]} (file {entry['file']})")  # fmt: skip

            assert "No space left on device" in entry["problem"] and entry["file"].startswith(str(home))
            assert not scan.exists() and sorted(p.name for p in (Path(entry["path"]) / sample).iterdir()) == sorted(
                p.name for p in changed.iterdir())  # the whole scan  # fmt: skip
            failed = wait_for(lambda: [r for r in ingest_runs(prefect_api, sample) if r["state_type"] == "FAILED"],
                              60, "the failed flow run")[0]  # fmt: skip
            assert "No space left on device" in failed["state"]["message"]
            # the catalog refused to record the failure (a write needs twice the catalog's size free, and
            # nothing was written): the run row still says running, until the sample's next run
            assert [r["status"] for r in runs_of(home, sample)] == ["succeeded", "running"]
            assert_same_database(home, before, [sample])  # the sample's rows as they were, status included
            assert [p.name for p in (home / "particles").iterdir()] == [f"sample_id={sample}"]
            assert [p.name for p in (home / "particles" / f"sample_id={sample}").iterdir()] == [
                p.name for p in (before / "particles" / f"sample_id={sample}").iterdir()]  # fmt: skip
            assert not list((home / ".staging").iterdir())

            # space freed, the scan moved back by the operator: ingested, replacing the sample's rows
            ballast.unlink()
            time.sleep(RESCAN_S + 1)  # the watcher saw the scan leave
            os.rename(Path(entry["path"]) / sample, scan)
            back = time.monotonic()
            wait_for(lambda: (sample_row(home, sample) or {}).get("notes") == "re-measured", INGEST_TIMEOUT_S,
                     "the re-ingestion", platform)  # fmt: skip
            print(f"moved back -> database: {time.monotonic() - back:.1f} s")
            rows = runs_of(home, sample)  # the reference's store, the run the full disk stopped, the one after
            assert [r["status"] for r in rows] == ["succeeded", "interrupted", "succeeded"]
            assert_same_database(home, after, [sample])
            assert not list((home / "work").iterdir())
        finally:
            alive = platform.stop(signal.SIGTERM)
        assert not alive


def test_two_directories_claiming_one_sample_id(tmp_path, platform_env, prefect_api, tiny_model_dir):
    sample = _unique("C")
    first, second, third = f"a-{sample}", f"b-{sample}", f"0-{sample}"  # name order: third, first, second
    staged = {name: stage_scan(tmp_path / name, sample, seed=seed) for name, seed in
              ((first, 60), (second, 61), (third, 62))}  # fmt: skip
    reference = reference_of(tmp_path, [staged[first]], tiny_model_dir)
    home = tmp_path / "home"
    platform = Platform(home, platform_env, tiny_model_dir)
    try:
        # at once, the one whose name sorts last first: whichever run goes first, the first name wins
        os.rename(staged[second], platform.inbox / second)
        os.rename(staged[first], platform.inbox / first)
        dropped = time.monotonic()
        wait_for(lambda: sample_row(home, sample), INGEST_TIMEOUT_S, f"{sample} in the catalog", platform)
        loser = wait_for(lambda: [q for q in read_quarantine(home) if q["scan"] == second], 120, "the quarantine",
                         platform)[0]  # fmt: skip
        print(f"winner stored and loser quarantined {time.monotonic() - dropped:.1f} s after the drop")
        assert loser["stage"] == "claim"
        assert f"sample_id {sample} is also claimed by scan directory {first}" in loser["problem"]
        assert _stored_from(home, sample) == first
        assert [r["state_type"] for r in ingest_runs(prefect_api, first)] == ["COMPLETED"]
        wait_for(lambda: [r["state_type"] for r in ingest_runs(prefect_api, second)] == ["FAILED"], 60,
                 "the loser's failed flow run", platform)  # fmt: skip
        started = sorted((r["start_time"], Path(r["parameters"]["scan_path"]).name)
                         for r in ingest_runs(prefect_api, first) + ingest_runs(prefect_api, second))  # fmt: skip
        print(f"flow runs started in the order {[name for _, name in started]}")

        # later, a directory whose name sorts first: the sample is stored from another directory, it loses
        os.rename(staged[third], platform.inbox / third)
        late = wait_for(lambda: [q for q in read_quarantine(home) if q["scan"] == third], 120, "the quarantine",
                        platform)[0]  # fmt: skip
        assert f"is also claimed by scan directory {first}, from which it is already stored" in late["problem"]
        row = catalog.get_sample(home, sample)
        assert row["status"] == "ingested" and row["error"] is None  # the losers did not touch the winner's row
        assert _stored_from(home, sample) == first
        assert_same_database(home, reference, [sample])
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive


def test_scan_changed_during_ingestion_is_ingested_again(tmp_path, platform_env, prefect_api, tiny_model_dir):
    home = tmp_path / "home"
    sample = _unique("M")
    staged = stage_scan(tmp_path / "staged", sample, seed=70)
    platform = Platform(home, platform_env, tiny_model_dir)
    try:
        scan = platform.inbox / sample
        os.rename(staged, scan)
        wait_for(lambda: segmentation_markers(home), INGEST_TIMEOUT_S, "the first segmentation chunk", platform)
        metadata = json.loads((scan / "scan.json").read_text())
        (scan / "scan.json").write_text(json.dumps(metadata | {"notes": "corrected while ingesting"}) + "\n")
        changed = time.monotonic()
        wait_for(lambda: [r["status"] for r in runs_of(home, sample)] == ["superseded", "succeeded"],
                 2 * INGEST_TIMEOUT_S, "the new content stored", platform)  # fmt: skip
        print(f"changed -> new content stored: {time.monotonic() - changed:.1f} s")

        rows = runs_of(home, sample)
        assert "changed while it was being ingested" in rows[0]["error"]
        runs = ingest_runs(prefect_api, sample)
        assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
        assert runs[0]["parameters"]["fingerprint"] != runs[1]["parameters"]["fingerprint"]
        assert catalog.get_sample(home, sample)["notes"] == "corrected while ingesting"
        assert not list((home / "work").iterdir())
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive
    assert_same_database(home, reference_of(tmp_path, [scan], tiny_model_dir), [sample])
