"""`ps3d demo`: the platform end to end on three synthetic samples of one campaign (deployments.demo).

The demo runs exactly as `make demo` runs it, in a subprocess with its own
Prefect server and Dask cluster; the fast test uses the tiny test model, the
slow one (`make test-slow`) the shipped default model and checks the
10-minute budget.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from ps3d.cli import app
from ps3d_core import catalog

PS3D = str(Path(sys.executable).with_name("ps3d"))
SEGMENT_OPTIONS = {"folds": [0], "device": "cpu", "chunk_size": 64, "output_chunks": 32, "batch_size": 4}


def run_demo(workdir: Path, *extra: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    result = subprocess.run([PS3D, "demo", "--workdir", str(workdir), *extra], capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    seconds = time.monotonic() - started
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before, "the demo left processes behind"
    return result, seconds


def check_demo(result: subprocess.CompletedProcess, workdir: Path) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "platform ready after" in out and "no process left behind" in out
    for stream in ("feed", "concentrate", "tailings"):
        assert re.search(rf"watcher: demo-{stream} ready \(_SCAN_COMPLETE present\) -> ingest flow run", out)
        assert re.search(rf"demo-{stream}: \d+ particles stored", out)
        assert re.search(rf"^   demo-{stream} +{stream} +\d+\.\d +\d+ +\d\.\d+ +\d\.\d+ +\d\.\d+ +\d\.\d+ +\d+\.\d+",
                         out, re.MULTILINE)  # fmt: skip
    assert f"ps3d dashboard --home {workdir}" in out
    # what the summary says is what the database holds
    rows = catalog.query(workdir, "SELECT sample_id, stream, campaign, mass_g, status, particle_count FROM samples "
                                  "ORDER BY sample_id", limit=None).table.to_pylist()  # fmt: skip
    assert [r["sample_id"] for r in rows] == ["demo-concentrate", "demo-feed", "demo-tailings"]
    assert {r["campaign"] for r in rows} == {"ps3d-demo"} and all(r["status"] == "ingested" for r in rows)
    assert {r["stream"]: r["mass_g"] for r in rows} == {"feed": 12.0, "concentrate": 2.4, "tailings": 9.1}
    for row in rows:
        assert re.search(rf"^   {row['sample_id']} .* {row['particle_count']} ", out, re.MULTILINE)
    # the grade follows the streams: concentrate > feed > tailings
    grades = catalog.query(workdir, "SELECT s.stream, sum(p.phase_valuable_accessory_fraction * p.volume_mm3) / "
                                    "sum(p.volume_mm3) AS g FROM particles p JOIN samples s USING (sample_id) "
                                    "GROUP BY s.stream", limit=None).table.to_pylist()  # fmt: skip
    grade = {r["stream"]: r["g"] for r in grades}
    assert grade["concentrate"] > grade["feed"] > grade["tailings"]
    assert not (workdir / "platform.json").exists()  # the platform shut down cleanly


def test_demo_runs_the_platform_end_to_end(tmp_path, tiny_model_dir):
    workdir = tmp_path / "demo"
    result, seconds = run_demo(workdir, "--model", str(tiny_model_dir), "--segment-options",
                               json.dumps(SEGMENT_OPTIONS), timeout=600)  # fmt: skip
    print(result.stdout)
    check_demo(result, workdir)
    assert (workdir / ".ps3d-demo").is_file()
    record = json.loads((workdir / "segmentations" / "demo-feed" / "segment.json").read_text())
    assert record["model"]["name"] == "ps3d-tiny-test"


@pytest.mark.slow
def test_demo_with_the_shipped_model_within_ten_minutes(tmp_path):
    workdir = tmp_path / "demo"
    result, seconds = run_demo(workdir, timeout=900)
    print(result.stdout)
    check_demo(result, workdir)
    assert "model ps3d-default" in result.stdout
    assert seconds < 600, f"the demo took {seconds:.0f} s"


def test_demo_refuses_a_directory_that_is_not_a_previous_demo(tmp_path):
    from deployments.demo import DEMO_MARKER, DemoError, prepare_workdir

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("data")
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "mine")])
    assert result.exit_code == 2 and "is not a previous demo's home" in result.output
    assert (tmp_path / "mine" / "precious.txt").read_text() == "data"
    old = tmp_path / "old-demo"
    old.mkdir()
    (old / DEMO_MARKER).touch()
    (old / "stale").mkdir()
    prepare_workdir(old)  # a previous demo's home is replaced
    assert sorted(p.name for p in old.iterdir()) == [DEMO_MARKER]
    with pytest.raises(DemoError, match="preset"):
        from deployments.demo import DemoConfig, run_demo as run

        run(DemoConfig(workdir=tmp_path / "x", preset="huge"))
