"""The platform end to end: a real Prefect server, a real Dask LocalCluster, `ps3d serve` as users run it.

Nothing is mocked. A session-scoped Prefect server (temporary PREFECT_HOME,
started by the same function as `ps3d serve`) and LocalCluster are shared;
each test runs `ps3d serve` in a subprocess against them (the scale-out
mode: PREFECT_API_URL and DASK_SCHEDULER_ADDRESS set) with its own
PS3D_HOME and inbox, drops scans into the inbox and waits for the catalog.
One test runs `ps3d serve` fully self-managed (its own server child and
cluster) and checks that SIGTERM and Ctrl-C leave no process behind.
The scans are tiny synthetic ones and the model the tiny test model, so
one ingestion takes about 10-20 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import tifffile

from ps3d_core import catalog
from ps3d_core.inbox import read_quarantine
from ps3d_core.synth import synthesize, write_synthetic_scan

from harness import (INGEST_TIMEOUT_S, PS3D, QUIET_S, RESCAN_S, Platform, Watcher, api_get, api_post,
                     artifacts, drop_scan, ingest_runs, runs_of, sample_row, wait_for)


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_scan_reaches_database_once_across_redrops_and_restarts(tmp_path, platform_env, prefect_api, tiny_model_dir):
    home = tmp_path / "home"
    sample = f"S-{uuid.uuid4().hex[:6]}"
    platform = Platform(home, platform_env, tiny_model_dir)
    try:
        dropped = time.monotonic()
        scan = drop_scan(platform.inbox, sample, seed=6)
        row = wait_for(lambda: sample_row(home, sample), INGEST_TIMEOUT_S, f"{sample} in the catalog", platform)
        drop_to_db = time.monotonic() - dropped
        print(f"drop -> database: {drop_to_db:.1f} s")
        assert row["particle_count"] > 5 and row["fingerprint"] and row["model_version"] == "0.0.1-test"
        assert row["d50_volume_mm"] > 0
        particles = catalog.query(home, f"SELECT count(*) AS n FROM particles WHERE sample_id = '{sample}'").table
        assert particles.column("n")[0].as_py() == row["particle_count"]
        assert [r["status"] for r in runs_of(home, sample)] == ["succeeded"]
        segment = json.loads((home / "segmentations" / sample / "segment.json").read_text())
        assert segment["source_shape"] == [96, 96, 96]
        assert (home / "scans" / sample / "image.ome.zarr").is_dir()
        assert not list((home / "work").iterdir())
        markdown = artifacts(prefect_api, f"ingest-{sample.lower()}")
        assert markdown and "particles" in markdown[0]["data"] and "D10 / D50 / D80" in markdown[0]["data"]

        # the same scan dropped again (taken out, copied back with its times): not ingested again
        aside = tmp_path / "aside"
        shutil.move(str(scan), aside)
        time.sleep(RESCAN_S + 1)
        shutil.copytree(aside, scan)  # copy2 keeps the modification times: same content fingerprint
        time.sleep(2 * RESCAN_S + QUIET_S + 2)
        assert len(ingest_runs(prefect_api, scan.name)) == 1
        assert [r["status"] for r in runs_of(home, sample)] == ["succeeded"]
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert platform.process.returncode is not None and not alive, f"left behind: {alive}"

    # a restarted platform rescans the inbox and ingests nothing again
    platform = Platform(home, platform_env, tiny_model_dir)
    try:
        wait_for(lambda: "ready (_SCAN_COMPLETE present)" in platform.text(), 60, "the rescan", platform)
        time.sleep(2 * RESCAN_S)
        assert "already had flow run" in platform.text()
        assert len(ingest_runs(prefect_api, scan.name)) == 1
        assert [r["status"] for r in runs_of(home, sample)] == ["succeeded"]
        # a changed scan is a new content: ingested again, replacing the sample's rows
        (scan / "scan.json").write_text((scan / "scan.json").read_text().replace('"feed"', '"concentrate"'))
        wait_for(lambda: len(runs_of(home, sample)) == 2 and runs_of(home, sample)[-1]["status"] == "succeeded",
                 INGEST_TIMEOUT_S, "the changed scan re-ingested", platform)  # fmt: skip
        assert catalog.get_sample(home, sample)["stream"] == "concentrate"
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive


def test_slow_copy_ingested_once_and_bad_scan_quarantined(tmp_path, platform_env, prefect_api, tiny_model_dir):
    home = tmp_path / "home"
    platform = Platform(home, platform_env, tiny_model_dir)
    good, bad = f"slow-{uuid.uuid4().hex[:6]}", f"bad-{uuid.uuid4().hex[:6]}"
    try:
        # a bad scan: valid scan.json, but the image is not a TIFF
        bad_dir = platform.inbox / bad
        bad_dir.mkdir(parents=True)
        (bad_dir / "scan.json").write_text(json.dumps({"sample_id": bad, "spacing_mm": 0.01, "stream": "feed"}))
        (bad_dir / "scan.tif").write_bytes(b"this is not a TIFF file" * 100)
        (bad_dir / "_SCAN_COMPLETE").touch()

        # a TIFF stack copied slowly, slice by slice, without marker
        synthetic = synthesize("tiny", 7, workers=1, sample_id=good)
        scan = platform.inbox / good
        (scan / "slices").mkdir(parents=True)
        (scan / "scan.json").write_text(synthetic.metadata.model_dump_json(exclude_none=True))
        for index, plane in enumerate(synthetic.image):
            tifffile.imwrite(scan / "slices" / f"{index:04d}.tif", plane)
            if index % 8 == 7:
                time.sleep(QUIET_S / 4)  # the copy goes on for longer than the quiet period
                assert not ingest_runs(prefect_api, good), f"submitted after {index + 1} of 96 slices"
        copied = time.monotonic()
        row = wait_for(lambda: sample_row(home, good), INGEST_TIMEOUT_S, f"{good} in the catalog", platform)
        print(f"last slice -> database: {time.monotonic() - copied:.1f} s")
        segment = json.loads((home / "segmentations" / good / "segment.json").read_text())
        assert segment["source_shape"] == [96, 96, 96]  # complete: every slice
        assert row["particle_count"] > 5
        assert len(ingest_runs(prefect_api, good)) == 1
        assert [r["status"] for r in runs_of(home, good)] == ["succeeded"]

        entry = wait_for(lambda: [q for q in read_quarantine(home) if q["scan"] == bad], 120, "the quarantine", platform)[0]
        assert entry["stage"] == "validate" and entry["file"].endswith(f"{bad}/scan.tif")
        assert "not a TIFF file" in entry["problem"]
        assert not bad_dir.exists() and (Path(entry["path"]) / bad / "scan.json").is_file()
        wait_for(lambda: sample_row(home, bad, "quarantined"), 60, "the quarantined sample row", platform)
        assert [r["status"] for r in runs_of(home, bad)] == ["failed"]
        assert catalog.query(home, f"SELECT count(*) AS n FROM particles WHERE sample_id = '{bad}'").table.column(
            "n")[0].as_py() == 0  # fmt: skip
        states = [r["state_type"] for r in ingest_runs(prefect_api, bad)]
        assert states == ["FAILED"]
    finally:
        alive = platform.stop(signal.SIGINT)
    assert not alive


def test_serve_runs_its_own_server_and_cluster_and_leaves_nothing(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_", "PS3D_"))}
    home = tmp_path / "home"
    platform = Platform(home, env, tiny_model_dir, "--no-watch")
    text = platform.text()
    assert "Prefect server at http://127.0.0.1:" in text and "Dask LocalCluster at tcp://127.0.0.1:" in text
    record = json.loads((home / "platform.json").read_text())
    assert (home / "prefect" / "prefect.db").is_file()
    deployments = api_post(record["api_url"], "/deployments/filter", {"limit": 20})
    by_name = {f"{d['name']}": d for d in deployments}
    assert set(by_name) >= {"ingest", "weekly", "all", "current"}
    assert by_name["ingest"]["concurrency_limit"] == 1 or by_name["ingest"].get("global_concurrency_limit")
    schedule = by_name["weekly"]["schedules"][0]["schedule"]
    assert schedule["cron"] == "0 3 * * 0" and schedule["timezone"] == "UTC"
    alive = platform.stop(signal.SIGTERM)
    assert platform.process.returncode is not None and not alive, f"left behind: {alive}"
    assert not (home / "platform.json").exists()


# --------------------------------------------------------------------------
# `ps3d watch` on its own, and its polling mode
# --------------------------------------------------------------------------


def test_watch_alone_finds_the_platform_and_polls(tmp_path, platform_env, prefect_api, tiny_model_dir):
    home = tmp_path / "home"
    # no platform for this home yet: a clear error, no traceback
    lonely = {k: v for k, v in platform_env.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([PS3D, "watch", "--home", str(home)], env=lonely, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2 and "no running `ps3d serve` for this home" in result.stderr
    assert "Traceback" not in result.stderr

    platform = Platform(home, platform_env, tiny_model_dir, "--no-watch")
    other_inbox = tmp_path / "instrument-share"
    watchers = []
    try:
        # 1. the home's inbox, the server found through <home>/platform.json (no PREFECT_API_URL), file events
        watchers.append(Watcher(["--home", str(home), "--quiet", str(QUIET_S), "--rescan", str(RESCAN_S)], lonely,
                                tmp_path / "watch-events.log"))  # fmt: skip
        # 2. another directory, polled (network file systems), the server named by PREFECT_API_URL
        watchers.append(Watcher([str(other_inbox), "--poll", "--quiet", str(QUIET_S), "--rescan", "60"], platform_env,
                                tmp_path / "watch-poll.log"))  # fmt: skip
        assert "polling" in watchers[1].text() and "polling" not in watchers[0].text()
        first, second = f"W-{uuid.uuid4().hex[:6]}", f"P-{uuid.uuid4().hex[:6]}"
        drop_scan(platform.inbox, first, seed=8)
        # written without marker straight into the polled directory: found by polling within the quiet period,
        # not by the full rescan (60 s)
        synthetic = synthesize("tiny", 9, workers=1, sample_id=second)
        scan = other_inbox / second
        scan.mkdir(parents=True)
        tifffile.imwrite(scan / "scan.tif", synthetic.image)
        (scan / "scan.json").write_text(synthetic.metadata.model_dump_json(exclude_none=True))
        written = time.monotonic()
        wait_for(lambda: f"{second} ready" in watchers[1].text(), 40, "the polling watcher", platform)
        assert time.monotonic() - written < 30
        for sample in (first, second):
            row = wait_for(lambda: sample_row(home, sample), INGEST_TIMEOUT_S, f"{sample} in the catalog", platform)
            assert row["particle_count"] > 5
            assert [r["status"] for r in runs_of(home, sample)] == ["succeeded"]
        assert len(ingest_runs(prefect_api, first)) == 1 and len(ingest_runs(prefect_api, second)) == 1
        assert f"{first} ready (_SCAN_COMPLETE present)" in watchers[0].text()
        assert f"{second} ready (quiet for" in watchers[1].text()
    finally:
        codes = [watcher.stop(sig) for watcher, sig in zip(watchers, (signal.SIGINT, signal.SIGTERM))]
        alive = platform.stop(signal.SIGTERM)
    assert codes == [0, 0][: len(codes)] and not alive


# --------------------------------------------------------------------------
# retraining: promote a better candidate, keep a worse one out; resegment and evaluate; catch-up
# --------------------------------------------------------------------------

#: A training configuration as small as the tiny test model's (3 stages, patch 32^3, 16-voxel particles).
TINY_TRAINING = {"target_particle_size": 16, "patch_size": [32, 32, 32], "features_per_stage": [8, 16, 32],
                 "val_iterations_per_epoch": 1, "augmentation_workers": 0, "normalization": "zscore"}  # fmt: skip
#: Candidate and current model are scored on the same held-out synthetic scan.
TINY_EVALUATION = {"device": "cpu", "eval_preset": "tiny", "eval_samples": 1, "eval_seed": 1000}
FLOW_TIMEOUT_S = 400


def run_deployment_and_wait(api_url: str, name: str, parameters: dict, platform: Platform) -> dict:
    """Create a flow run of a served deployment through the REST API and wait until it is final."""
    deployment = api_get(api_url, f"/deployments/name/{name}")
    run = api_post(api_url, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})

    def final():
        current = api_get(api_url, f"/flow_runs/{run['id']}")
        return current if current["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    done = wait_for(final, FLOW_TIMEOUT_S, f"the {name} flow run", platform)
    assert done["state_type"] == "COMPLETED", f"{name}: {done['state']}\n{platform.text()[-6000:]}"
    return done


def test_retrain_promotes_a_better_candidate_keeps_a_worse_one_out(tmp_path, platform_env, prefect_api):
    from tiny_model import build_tiny_model

    from ps3d_core.model_registry import current_record, promote, read_retrain_state

    home = tmp_path / "home"
    # the current model: the tiny architecture barely trained (5 steps)
    weak = build_tiny_model(home / "models" / "weak", iterations=5, extra_fold_iterations=1)
    promote(home, weak, "test fixture: a weak current model")
    # annotated scans: scan directories and their instance labels
    annotations = home / "annotations"
    for seed in (500, 501, 502):
        synthetic = synthesize("tiny", seed, workers=1, sample_id=f"A-{seed}")
        write_synthetic_scan(synthetic, annotations / "scans")
    shutil.move(annotations / "scans" / "_truth", annotations / "labels")

    platform = Platform(home, platform_env, None)  # no --model: the promoted one
    try:
        sample = f"R-{uuid.uuid4().hex[:6]}"
        drop_scan(platform.inbox, sample, seed=10)
        row = wait_for(lambda: sample_row(home, sample), INGEST_TIMEOUT_S, f"{sample} in the catalog", platform)
        assert row["model_version"] == "0.0.1-test"  # the weak model's version

        # 1. fine-tuned from the weak current model: better on the held-out scan, promoted
        run_deployment_and_wait(prefect_api, "retrain/weekly", {"epochs": 4, "iterations": 25,
                                "training_options": TINY_TRAINING} | TINY_EVALUATION, platform)  # fmt: skip
        record = current_record(home)
        first = home / "models" / record["path"]
        assert first.parent == home / "models" and first.name.startswith("ps3d-tiny-test-")
        evaluation = json.loads((first / "evaluation.json").read_text())
        assert evaluation["promote"] is True
        new, old = evaluation["candidate"]["mean"]["model"], evaluation["current"]["mean"]["model"]
        assert new["f1_instance"] > old["f1_instance"]
        assert [s["sample_id"] for s in evaluation["candidate"]["scans"]] == [
            s["sample_id"] for s in evaluation["current"]["scans"]]  # the same held-out scans  # fmt: skip
        assert weak.is_dir()  # the earlier version is kept
        training = json.loads((first / "training.json").read_text())
        assert training["dataset"]["scans"] == ["A-500", "A-501", "A-502"]
        assert training["config"]["init_model"] == str(weak)  # fine-tuned from the current model
        assert read_retrain_state(home)["last_status"] == "promoted"
        retrains = catalog.query(home, "SELECT status, parameters FROM runs WHERE run_id LIKE 'retrain-%'",
                                 limit=None).table.to_pylist()  # fmt: skip
        assert [r["status"] for r in retrains] == ["succeeded"]

        # 2. the stored sample is re-segmented with the promoted model
        run_deployment_and_wait(prefect_api, "resegment/all", {}, platform)
        row = catalog.get_sample(home, sample)
        assert row["status"] == "ingested" and row["model_version"] == record["version"]
        assert [r["status"] for r in runs_of(home, sample)] == ["succeeded", "succeeded"]

        # 3. the current model's evaluation, as an artifact
        run_deployment_and_wait(prefect_api, "evaluate/current", {"preset": "tiny", "samples": 1, "device": "cpu"},
                                platform)  # fmt: skip
        markdown = artifacts(prefect_api, "evaluate")
        assert any(record["version"] in a["data"] and "F1_instance" in a["data"] for a in markdown)

        # 4. trained from scratch for 6 steps: worse, kept out (but kept on disk with its evaluation)
        run_deployment_and_wait(prefect_api, "retrain/weekly", {"epochs": 2, "iterations": 3, "init_from_current": False,
                                "training_options": TINY_TRAINING} | TINY_EVALUATION, platform)  # fmt: skip
        assert current_record(home)["path"] == record["path"]
        candidates = sorted(p for p in (home / "models").iterdir() if p.is_dir() and p.name not in ("weak", first.name))
        assert len(candidates) == 1
        evaluation = json.loads((candidates[0] / "evaluation.json").read_text())
        assert evaluation["promote"] is False
        assert evaluation["candidate"]["mean"]["model"]["f1_instance"] < evaluation["current"]["mean"]["model"]["f1_instance"]
        assert read_retrain_state(home)["last_status"] == "not promoted (current model kept)"
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive


def retrain_runs(api_url: str, home: Path) -> list[dict]:
    """Runs of the retrain deployment for ``home``, but the scheduler's runs of the coming Sundays."""
    from datetime import datetime, timezone

    deployment = api_get(api_url, "/deployments/name/retrain/weekly")
    runs = api_post(api_url, "/flow_runs/filter", {"limit": 200, "deployments": {"id": {"any_": [deployment["id"]]}}})
    now = datetime.now(timezone.utc)
    return [r for r in runs if r["parameters"].get("home") == str(home) and not (
        r["state_type"] == "SCHEDULED" and datetime.fromisoformat(r["expected_start_time"]) > now)]  # fmt: skip


def test_a_retraining_missed_while_down_runs_once_after_start(tmp_path, platform_env, prefect_api):
    from datetime import datetime, timedelta, timezone

    from ps3d_core.model_registry import read_retrain_state, update_retrain_state

    home = tmp_path / "home"
    # the last retraining completed 8 days ago: the weekly one (Sundays 03:00 UTC) fell due while the platform was down
    long_ago = datetime.now(timezone.utc) - timedelta(days=8)
    update_retrain_state(home, first_started_at=long_ago - timedelta(days=30), last_completed_at=long_ago)
    platform = Platform(home, platform_env, None, "--no-watch")
    try:
        done = wait_for(lambda: [r for r in retrain_runs(prefect_api, home) if r["state_type"] == "COMPLETED"],
                        FLOW_TIMEOUT_S, "the catch-up retraining", platform)  # fmt: skip
        assert len(retrain_runs(prefect_api, home)) == 1
        assert done[0]["idempotency_key"].startswith(f"retrain-catchup:{home}:")
        assert "was missed (last completed" in platform.text()
        state = read_retrain_state(home)
        assert state["last_completed_at"] > long_ago + timedelta(days=7) and state["last_status"] == "no annotations"
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive
    # back again: the retraining is not due, nothing runs
    platform = Platform(home, platform_env, None, "--no-watch")
    try:
        time.sleep(5)
        assert len(retrain_runs(prefect_api, home)) == 1
        assert "was missed" not in platform.text()
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive


def test_catch_up_counts_from_the_first_start_and_the_schedule(tmp_path):
    from datetime import datetime, timedelta, timezone

    from deployments.catchup import missed_fire_time, previous_fire_time
    from ps3d_core.model_registry import read_retrain_state, update_retrain_state

    now = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)  # a Wednesday
    assert previous_fire_time("0 3 * * 0", "UTC", now) == datetime(2026, 11, 22, 3, 0, tzinfo=timezone.utc)
    berlin = previous_fire_time("0 3 * * 0", "Europe/Berlin", now)
    assert berlin.astimezone(timezone.utc) == datetime(2026, 11, 22, 2, 0, tzinfo=timezone.utc)
    home = tmp_path / "home"
    assert missed_fire_time(home, "0 3 * * 0", "UTC", now) is None  # never ran: counts from now
    assert read_retrain_state(home)["first_started_at"] == now
    assert missed_fire_time(home, "0 3 * * 0", "UTC", now + timedelta(days=3)) is None  # not yet Sunday
    assert missed_fire_time(home, "0 3 * * 0", "UTC", now + timedelta(days=5)) == datetime(
        2026, 11, 29, 3, 0, tzinfo=timezone.utc)  # fmt: skip
    update_retrain_state(home, last_completed_at=now + timedelta(days=4, hours=16))  # ran that Sunday 04:00
    assert missed_fire_time(home, "0 3 * * 0", "UTC", now + timedelta(days=5)) is None


def test_prefect_home_of_the_test_session_is_its_own():
    from conftest import PREFECT_TEST_HOME
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    assert str(settings.home) == PREFECT_TEST_HOME == os.environ["PREFECT_HOME"]
    assert Path(PREFECT_TEST_HOME).name.startswith("ps3d-test-prefect-")
    storage = Path(settings.results.local_storage_path)
    assert storage.is_relative_to(PREFECT_TEST_HOME)  # results and cache records: this session's only
    assert settings.api.url is None or "PREFECT_API_URL" not in os.environ
