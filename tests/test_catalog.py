"""The particle database (``schemas.catalog``, ``ps3d_core.catalog``, ``ps3d store``/``ps3d sql``).

Real DuckDB files, real Parquet files, real processes. Particle tables are
built directly from ``schemas.particles.particle_schema`` with seeded random
values (sizes from integer voxel counts, so equal sizes occur as in real
scans); nothing here runs feature extraction.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ps3d.cli import app
from ps3d_core import catalog
from ps3d_core.catalog import store as store_module
from ps3d_core.inbox import fingerprint
from ps3d_core.synth.particle_tables import random_particle_table
from schemas import catalog as contract
from schemas.particles import BASE_COLUMNS, particle_schema
from schemas.scan import ScanMetadata

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SPACING_MM = 0.01
PHASE_RANGES = {"ore": (20000.0, 65535.0), "gangue": (5000.0, 20000.0), "pyrite": (30000.0, 65535.0)}


# --------------------------------------------------------------------------
# helpers (also imported by the child processes below)
# --------------------------------------------------------------------------


def make_particles(sample_id: str, n: int, phases=(), seed: int = 0, run_id: str | None = None) -> pa.Table:
    """A valid particle table of ``n`` particles with seeded random but physically consistent values."""
    return random_particle_table(
        sample_id, n, phases, seed=seed, spacing_mm=SPACING_MM, border_share=0.15,
        run_id=run_id, shuffle_ids=True,
    )  # fmt: skip


def make_metadata(sample_id: str, phases=(), **fields) -> ScanMetadata:
    document = {
        "sample_id": sample_id,
        "spacing_mm": SPACING_MM,
        "stream": "feed",
        "campaign": "2024-Q2",
        "material": "Cu ore",
        "mass_g": 12.5,
        "acquired_at": "2024-05-01T12:30:00",
        "phases": {name: PHASE_RANGES[name] for name in phases} or None,
        "notes": "test sample",
        "particle_size_mm": 0.08,
        **fields,
    }
    return ScanMetadata.model_validate(document)


def make_run(run_id: str, **fields) -> dict:
    return {
        "run_id": run_id,
        "status": "succeeded",
        "started_at": datetime(2024, 5, 2, 8, 0, 0),
        "finished_at": datetime(2024, 5, 2, 8, 5, 30),
        "parameters": {"model": "tiny", "tta": False},
        "timings": {"segment": 300.5, "features": 29.5},
        "versions": {"ps3d": "0.1.0"},
        "peak_memory_mb": 812.0,
        "host": "lab-1",
        **fields,
    }


def store(home: Path, sample_id: str, n: int, phases=(), seed: int = 0, run_id: str = "run-1", **kwargs) -> pa.Table:
    """Store a generated sample; returns the table as stored (run_id filled in)."""
    table = make_particles(sample_id, n, phases, seed)
    catalog.store_sample(
        home, make_metadata(sample_id, phases), table, make_run(run_id),
        phases={name: PHASE_RANGES[name] for name in phases} or None,
        phases_source="scan.json" if phases else None,
        particle_size_mm=0.08, particle_size_source="scan.json",
        model_name="ps3d-default", model_version="1.1.0", fingerprint=f"fp-{sample_id}-{seed}",
        **kwargs,
    )  # fmt: skip
    return table.set_column(2, particle_schema(list(phases)).field("run_id"), pa.array([run_id] * n, pa.string()))


def rows(home: Path, sql: str) -> list[dict]:
    return catalog.query(home, sql, limit=None).table.to_pylist()


def staging_entries(home: Path) -> list[str]:
    folder = home / contract.STAGING_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def psd_reference(table: pa.Table) -> dict:
    """Cumulative passing by number and volume per distinct ESD, border-touching particles excluded (numpy)."""
    esd = table.column("esd_mm").to_numpy()
    volume = table.column("volume_mm3").to_numpy()
    keep = ~table.column("touches_border").to_numpy(zero_copy_only=False)
    sizes, inverse = np.unique(esd[keep], return_inverse=True)
    counts = np.bincount(inverse)
    volumes = np.bincount(inverse, weights=volume[keep])
    return {
        "esd_mm": sizes,
        "particle_count": counts,
        "volume_mm3": volumes,
        "passing_number_pct": 100.0 * np.cumsum(counts) / counts.sum(),
        "passing_volume_pct": 100.0 * np.cumsum(volumes) / volumes.sum(),
    }


def d_reference(sizes: np.ndarray, passing: np.ndarray, p: float) -> float:
    """Log-linear interpolation between the last point below p and the first at or above it."""
    for j in range(len(sizes)):
        if passing[j] >= p:
            if j == 0:
                return float(sizes[0])
            fraction = (p - passing[j - 1]) / (passing[j] - passing[j - 1])
            return math.exp(math.log(sizes[j - 1]) + fraction * (math.log(sizes[j]) - math.log(sizes[j - 1])))
    raise AssertionError("curve never reaches p")


def assert_close(actual, expected, rel=1e-12):
    """Floating sums computed in another order (DuckDB vs numpy): equal to 1e-12 relative."""
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12)


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


def run_child(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# --------------------------------------------------------------------------
# storing and reading back
# --------------------------------------------------------------------------


def test_store_and_query_back_exact_values(tmp_path):
    home = tmp_path / "home"
    a = store(home, "A-1", 300, ("ore", "gangue"), seed=1, run_id="run-a")
    b = store(home, "B_2", 150, ("ore", "gangue"), seed=2, run_id="run-b")

    for table, sample_id in ((a, "A-1"), (b, "B_2")):
        back = catalog.query(home, f"SELECT * FROM particles WHERE sample_id = '{sample_id}' ORDER BY particle_id",
                             limit=None).table  # fmt: skip
        expected = table.sort_by("particle_id")
        assert back.column_names == expected.column_names
        for name in expected.column_names:
            assert back.column(name).to_pylist() == expected.column(name).to_pylist(), name

    # the stored file is self-documenting and carries the phases, sample, run and write id
    path = home / catalog.get_sample(home, "A-1")["particles_file"]
    assert path.parent == home / "particles" / "sample_id=A-1" and path.name.startswith("part-")
    schema = pq.read_schema(path)
    assert schema.field("esd_mm").metadata[b"unit"] == b"mm"
    assert schema.field("esd_mm").type == pa.float64() and schema.field("particle_id").type == pa.uint32()
    assert json.loads(schema.metadata[b"ps3d.phases"]) == {"ore": [20000.0, 65535.0], "gangue": [5000.0, 20000.0]}
    assert schema.metadata[b"ps3d.phases_source"] == b"scan.json"
    assert schema.metadata[b"ps3d.sample_id"] == b"A-1" and schema.metadata[b"ps3d.run_id"] == b"run-a"
    table, phases, source = catalog.read_particles_file(path)
    assert phases == {"ore": (20000.0, 65535.0), "gangue": (5000.0, 20000.0)} and source == "scan.json"
    assert table.num_rows == 300

    [sample] = rows(home, "SELECT * FROM samples WHERE sample_id = 'A-1'")
    assert sample["status"] == "ingested" and sample["error"] is None
    assert (sample["stream"], sample["campaign"], sample["material"], sample["mass_g"]) == ("feed", "2024-Q2", "Cu ore", 12.5)
    assert sample["acquired_at"] == datetime(2024, 5, 1, 12, 30)
    assert (sample["spacing_z_mm"], sample["spacing_y_mm"], sample["spacing_x_mm"]) == (0.01, 0.01, 0.01)
    assert json.loads(sample["phases"]) == {"ore": [20000.0, 65535.0], "gangue": [5000.0, 20000.0]}
    assert sample["phases_source"] == "scan.json" and sample["notes"] == "test sample"
    assert sample["particle_count"] == 300
    assert (sample["particle_size_mm"], sample["particle_size_source"]) == (0.08, "scan.json")
    assert (sample["model_name"], sample["model_version"]) == ("ps3d-default", "1.1.0")
    assert sample["fingerprint"] == "fp-A-1-1" and sample["last_run_id"] == "run-a"
    assert sample["particles_file"] == f"particles/sample_id=A-1/part-{schema.metadata[b'ps3d.write_id'].decode()}.parquet"
    assert sample["created_at"] == sample["updated_at"]

    [run] = rows(home, "SELECT * FROM runs WHERE run_id = 'run-a'")
    assert run["sample_id"] == "A-1" and run["status"] == "succeeded"
    assert (run["started_at"], run["finished_at"]) == (datetime(2024, 5, 2, 8), datetime(2024, 5, 2, 8, 5, 30))
    assert json.loads(run["parameters"]) == {"model": "tiny", "tta": False}
    assert json.loads(run["timings"]) == {"features": 29.5, "segment": 300.5}
    assert json.loads(run["versions"]) == {"ps3d": "0.1.0"}
    assert (run["peak_memory_mb"], run["host"], run["error"]) == (812.0, "lab-1", None)

    assert catalog.get_sample(home, "B_2")["particle_count"] == 150
    assert catalog.get_sample(home, "B_2")["phases"] == {"ore": [20000.0, 65535.0], "gangue": [5000.0, 20000.0]}
    assert catalog.get_sample(home, "nope") is None


def test_restore_replaces_all_rows(tmp_path):
    home = tmp_path / "home"
    store(home, "S", 200, ("ore", "gangue"), seed=1, run_id="first")
    store(home, "T", 50, (), seed=9, run_id="other")
    before = catalog.get_sample(home, "S")
    time.sleep(0.01)
    second = store(home, "S", 120, ("pyrite",), seed=2, run_id="second")
    assert not (home / before["particles_file"]).exists()  # a new file name; the old file is gone

    assert rows(home, "SELECT sample_id, count(*) AS n, min(run_id) AS lo, max(run_id) AS hi FROM particles "
                      "GROUP BY sample_id ORDER BY sample_id") == [  # fmt: skip
        {"sample_id": "S", "n": 120, "lo": "second", "hi": "second"},
        {"sample_id": "T", "n": 50, "lo": "other", "hi": "other"},
    ]
    assert rows(home, "SELECT count(DISTINCT particle_id) AS n FROM particles WHERE sample_id = 'S'") == [{"n": 120}]
    back = catalog.query(home, "SELECT particle_id, esd_mm, phase_pyrite_fraction FROM particles "
                               "WHERE sample_id = 'S' ORDER BY particle_id", limit=None).table  # fmt: skip
    expected = second.sort_by("particle_id")
    assert back.column("esd_mm").to_pylist() == expected.column("esd_mm").to_pylist()
    assert back.column("phase_pyrite_fraction").to_pylist() == expected.column("phase_pyrite_fraction").to_pylist()
    columns = [r["column_name"] for r in rows(home, "SELECT column_name FROM (DESCRIBE particles)")]
    assert columns == [*BASE_COLUMNS, "phase_pyrite_fraction"]  # the old phase set is gone with the old rows

    after = catalog.get_sample(home, "S")
    assert (after["particle_count"], after["last_run_id"], after["phases"]) == (120, "second", {"pyrite": [30000.0, 65535.0]})
    assert after["created_at"] == before["created_at"] and after["updated_at"] > before["updated_at"]
    assert [r["run_id"] for r in rows(home, "SELECT run_id FROM runs ORDER BY run_id")] == ["first", "other", "second"]
    assert sorted(p.name for p in (home / "particles").iterdir()) == ["sample_id=S", "sample_id=T"]
    assert [p.relative_to(home).as_posix() for p in (home / "particles" / "sample_id=S").iterdir()] == [after["particles_file"]]
    assert staging_entries(home) == []


def test_samples_with_different_phase_sets_combine(tmp_path):
    home = tmp_path / "home"
    store(home, "a", 80, ("ore", "gangue"), seed=1)
    store(home, "b", 60, ("pyrite",), seed=2)
    store(home, "c", 40, (), seed=3)
    columns = [r["column_name"] for r in rows(home, "SELECT column_name FROM (DESCRIBE particles)")]
    assert columns[: len(BASE_COLUMNS)] == list(BASE_COLUMNS)
    assert sorted(columns[len(BASE_COLUMNS):]) == ["phase_gangue_fraction", "phase_ore_fraction", "phase_pyrite_fraction"]
    counts = rows(home, "SELECT sample_id, count(*) AS n, count(phase_ore_fraction) AS ore, "
                        "count(phase_gangue_fraction) AS gangue, count(phase_pyrite_fraction) AS pyrite "
                        "FROM particles GROUP BY sample_id ORDER BY sample_id")  # fmt: skip
    assert counts == [
        {"sample_id": "a", "n": 80, "ore": 80, "gangue": 80, "pyrite": 0},
        {"sample_id": "b", "n": 60, "ore": 0, "gangue": 0, "pyrite": 60},
        {"sample_id": "c", "n": 40, "ore": 0, "gangue": 0, "pyrite": 0},
    ]
    size_columns = [r["column_name"] for r in rows(home, "SELECT column_name FROM (DESCRIBE size_classes)")]
    assert {"phase_ore_fraction", "phase_gangue_fraction", "phase_pyrite_fraction"} <= set(size_columns)


# --------------------------------------------------------------------------
# views against numpy
# --------------------------------------------------------------------------


def test_psd_and_d_values_match_numpy(tmp_path):
    home = tmp_path / "home"
    tables = {"p1": store(home, "p1", 2000, ("ore",), seed=11), "p2": store(home, "p2", 700, (), seed=12)}
    for sample_id, table in tables.items():
        reference = psd_reference(table)
        assert len(np.unique(table.column("esd_mm").to_numpy())) < table.num_rows  # equal sizes occur
        curve = catalog.query(home, f"SELECT * FROM psd WHERE sample_id = '{sample_id}'", limit=None).table
        assert curve.column_names == ["sample_id", "esd_mm", "particle_count", "volume_mm3",
                                      "passing_number_pct", "passing_volume_pct"]  # fmt: skip
        assert curve.column("esd_mm").to_pylist() == reference["esd_mm"].tolist()  # ordered by esd
        assert curve.column("particle_count").to_pylist() == reference["particle_count"].tolist()
        for name in ("volume_mm3", "passing_number_pct", "passing_volume_pct"):
            assert_close(curve.column(name).to_numpy(), reference[name])

        [d] = rows(home, f"SELECT * FROM d_values WHERE sample_id = '{sample_id}'")
        stored = catalog.get_sample(home, sample_id)
        for p in (10, 50, 80):
            by_volume = d_reference(reference["esd_mm"], reference["passing_volume_pct"], p)
            by_number = d_reference(reference["esd_mm"], reference["passing_number_pct"], p)
            assert_close(d[f"d{p}_volume_mm"], by_volume)
            assert_close(d[f"d{p}_number_mm"], by_number)
            assert_close(stored[f"d{p}_volume_mm"], by_volume)  # materialised at store time, same definition
        assert d["d10_volume_mm"] < d["d50_volume_mm"] < d["d80_volume_mm"]
    # the whole psd view comes back ordered by sample, then size
    whole = catalog.query(home, "SELECT sample_id, esd_mm FROM psd", limit=None).table.to_pylist()
    assert whole == sorted(whole, key=lambda r: (r["sample_id"], r["esd_mm"]))


def test_size_classes_match_numpy(tmp_path):
    home = tmp_path / "home"
    table = store(home, "k", 3000, ("ore", "gangue"), seed=21)
    esd = table.column("esd_mm").to_numpy()
    volume = table.column("volume_mm3").to_numpy()
    keep = ~table.column("touches_border").to_numpy(zero_copy_only=False)
    ore = table.column("phase_ore_fraction").to_numpy()
    classes = np.floor(2 * np.log2(esd)).astype(int)
    got = rows(home, "SELECT * FROM size_classes WHERE sample_id = 'k'")
    expected_classes = sorted(set(classes[keep].tolist()))
    assert [r["size_class"] for r in got] == expected_classes
    assert len(expected_classes) >= 4
    for row in got:
        k = row["size_class"]
        members = keep & (classes == k)
        assert row["lower_mm"] == 2 ** (k / 2) and row["upper_mm"] == 2 ** ((k + 1) / 2)
        assert np.all(esd[members] >= row["lower_mm"]) and np.all(esd[members] < row["upper_mm"])
        assert row["particle_count"] == int(members.sum())
        assert_close(row["volume_mm3"], volume[members].sum())
        assert_close(row["number_pct"], 100.0 * members.sum() / keep.sum())
        assert_close(row["volume_pct"], 100.0 * volume[members].sum() / volume[keep].sum())
        assert_close(row["phase_ore_fraction"], (ore[members] * volume[members]).sum() / volume[members].sum())
    assert_close(sum(r["volume_pct"] for r in got), 100.0)


def test_views_on_an_empty_home(tmp_path):
    home = catalog.init_catalog(tmp_path / "home")
    assert rows(home, "SELECT count(*) AS n FROM particles") == [{"n": 0}]
    assert rows(home, "SELECT count(*) AS n FROM psd") == [{"n": 0}]
    assert rows(home, "SELECT count(*) AS n FROM size_classes") == [{"n": 0}]
    assert rows(home, "SELECT count(*) AS n FROM samples") == [{"n": 0}]
    columns = [r["column_name"] for r in rows(home, "SELECT column_name FROM (DESCRIBE particles)")]
    assert columns == list(BASE_COLUMNS)


# --------------------------------------------------------------------------
# schema version, documentation, migrations
# --------------------------------------------------------------------------


def test_schema_version_tables_and_documentation(tmp_path):
    home = catalog.init_catalog(tmp_path / "home")
    versions = rows(home, "SELECT version, description FROM schema_version ORDER BY version")
    assert [v["version"] for v in versions] == list(range(1, contract.SCHEMA_VERSION + 1))
    assert versions[-1]["description"] == contract.MIGRATIONS[contract.SCHEMA_VERSION].description
    for table in contract.TABLES.values():
        described = rows(home, f"SELECT column_name, column_type FROM (DESCRIBE {table.name})")
        documented = [(c.name, c.type) for c in table.columns]
        assert sorted((r["column_name"], r["column_type"]) for r in described) == sorted(documented), table.name
    comments = rows(home, "SELECT table_name, column_name, comment FROM duckdb_columns() WHERE table_name = 'samples' "
                          "AND column_name = 'mass_g'")  # fmt: skip
    assert comments == [{"table_name": "samples", "column_name": "mass_g", "comment": "Mass of the scanned sample (scan.json). [g]"}]
    text = contract.markdown()
    for relation in (*contract.TABLES.values(), *contract.VIEWS.values()):
        assert f"#### `{relation.name}` ({relation.kind})" in text
        for column in relation.columns:
            assert f"| `{column.name}` | {column.type} | {column.unit} |" in text


def test_migration_from_version_1_backfills(tmp_path):
    home = tmp_path / "home"
    store(home, "m1", 500, ("ore",), seed=31)
    store(home, "m2", 300, (), seed=32)
    catalog.mark_sample(home, "m3", "failed", "no scan image")
    current = {r["sample_id"]: r for r in rows(home, "SELECT * FROM samples")}

    # rebuild the catalog as version 1 held it: same rows, without the version-2 columns
    v1_path = tmp_path / "v1.duckdb"
    connection = duckdb.connect(str(v1_path))
    assert store_module.migrate(connection, home, target=1) == [1]
    connection.execute(f"ATTACH '{home / 'ps3d.duckdb'}' AS cur (READ_ONLY)")
    v1_columns = [r[0] for r in connection.execute("SELECT column_name FROM (DESCRIBE samples)").fetchall()]
    assert "d50_volume_mm" not in v1_columns
    connection.execute(f"INSERT INTO samples SELECT {', '.join(v1_columns)} FROM cur.samples")
    connection.execute("INSERT INTO runs SELECT * FROM cur.runs")
    connection.execute("DETACH cur")
    connection.close()
    os.replace(v1_path, home / "ps3d.duckdb")

    catalog.init_catalog(home)  # opening for write migrates
    assert [r["version"] for r in rows(home, "SELECT version FROM schema_version ORDER BY version")] == [1, 2]
    migrated = {r["sample_id"]: r for r in rows(home, "SELECT * FROM samples")}
    assert set(migrated) == {"m1", "m2", "m3"}
    for sample_id, before in current.items():
        after = migrated[sample_id]
        for name, value in before.items():
            if name.startswith("d") and name.endswith("_volume_mm") and value is not None:
                assert_close(after[name], value)  # backfilled from the Parquet files
            else:
                assert after[name] == value, (sample_id, name)
    assert migrated["m3"]["d50_volume_mm"] is None  # no particles, nothing to backfill
    assert rows(home, "SELECT count(*) AS n FROM runs") == [{"n": 1}]


def test_a_newer_catalog_is_refused(tmp_path):
    home = catalog.init_catalog(tmp_path / "home")
    connection = duckdb.connect(str(home / "ps3d.duckdb"))
    connection.execute("INSERT INTO schema_version VALUES (99, 'from the future', now()::TIMESTAMP)")
    connection.close()
    with pytest.raises(catalog.CatalogError, match="schema version 99 is newer than this software's 2: upgrade ps3d"):
        catalog.mark_sample(home, "x", "failed", "boom")


def test_failing_migration_rolls_back(tmp_path):
    home = tmp_path / "home"
    connection = duckdb.connect(str(tmp_path / "c.duckdb"))
    store_module.migrate(connection, home, target=1)
    connection.execute("ALTER TABLE samples ADD COLUMN d10_volume_mm DOUBLE")  # makes migration 2 fail
    with pytest.raises(duckdb.CatalogException, match="d10_volume_mm"):
        store_module.migrate(connection, home)
    assert store_module.schema_version_of(connection) == 1
    assert connection.execute("SELECT count(*) FROM duckdb_columns() WHERE column_name = 'd50_volume_mm'").fetchone() == (0,)
    connection.close()


# --------------------------------------------------------------------------
# atomicity and crashes
# --------------------------------------------------------------------------


class InjectedFault(RuntimeError):
    pass


@pytest.fixture
def fault_at(monkeypatch):
    """Make ``store_sample`` raise at a named step (the module's testing hook)."""

    def arm(point: str) -> None:
        def hook(name: str) -> None:
            if name == point:
                raise InjectedFault(point)

        monkeypatch.setattr(store_module, "fault_hook", hook)

    return arm


def assert_version(home: Path, sample_id: str, n: int, run_id: str) -> None:
    """The sample shows exactly one complete version, the same in the particles view and the catalog."""
    assert rows(home, f"SELECT count(*) AS n, count(DISTINCT particle_id) AS ids, min(run_id) AS lo, max(run_id) AS hi "
                      f"FROM particles WHERE sample_id = '{sample_id}'") == [{"n": n, "ids": n, "lo": run_id, "hi": run_id}]  # fmt: skip
    sample = catalog.get_sample(home, sample_id)
    assert (sample["particle_count"], sample["last_run_id"]) == (n, run_id)
    [path] = (home / "particles" / f"sample_id={sample_id}").iterdir()
    assert path.relative_to(home).as_posix() == sample["particles_file"]
    assert path.name == f"part-{pq.read_schema(path).metadata[b'ps3d.write_id'].decode()}.parquet"


@pytest.mark.parametrize("point", ["parquet_partial", "written", "catalog_updated"])
def test_failure_before_commit_keeps_previous_version(tmp_path, fault_at, point):
    home = tmp_path / "home"
    first = store(home, "S", 200, ("ore",), seed=1, run_id="v1")
    fault_at(point)
    with pytest.raises(InjectedFault):
        store(home, "S", 120, ("pyrite",), seed=2, run_id="v2")
    assert_version(home, "S", 200, "v1")
    assert staging_entries(home) == []
    assert rows(home, "SELECT count(*) AS n FROM runs WHERE run_id = 'v2'") == [{"n": 0}]
    back = catalog.query(home, "SELECT esd_mm FROM particles ORDER BY particle_id", limit=None).table
    assert back.column("esd_mm").to_pylist() == first.sort_by("particle_id").column("esd_mm").to_pylist()
    store_module.fault_hook = None
    store(home, "S", 120, ("pyrite",), seed=2, run_id="v2")
    assert_version(home, "S", 120, "v2")


def test_failure_on_a_first_store_leaves_no_sample(tmp_path, fault_at):
    home = tmp_path / "home"
    store(home, "other", 30, seed=5)
    fault_at("catalog_updated")
    with pytest.raises(InjectedFault):
        store(home, "new", 50, seed=6)
    assert catalog.get_sample(home, "new") is None
    assert not (home / "particles" / "sample_id=new").exists()
    assert rows(home, "SELECT DISTINCT sample_id FROM particles") == [{"sample_id": "other"}]
    assert staging_entries(home) == []


def test_failure_after_commit_rolls_forward_on_next_write(tmp_path, fault_at):
    home = tmp_path / "home"
    store(home, "S", 200, ("ore",), seed=1, run_id="v1")
    fault_at("committed")
    with pytest.raises(InjectedFault):
        store(home, "S", 120, ("pyrite",), seed=2, run_id="v2")
    # readers still see the previous version, complete, in files and snapshot alike
    assert_version(home, "S", 200, "v1")
    assert len(staging_entries(home)) == 1
    store_module.fault_hook = None
    catalog.init_catalog(home)  # any next write recovers
    assert_version(home, "S", 120, "v2")
    assert staging_entries(home) == []


CRASHING_WRITER = """
    import os, sys
    from pathlib import Path
    from ps3d_core.catalog import store as store_module
    from test_catalog import store
    home, point = sys.argv[1], sys.argv[2]
    store_module.fault_hook = lambda name: os._exit(17) if name == point else None
    store(Path(home), "S", 120, ("pyrite",), seed=2, run_id="v2")
    print("not crashed")
"""


@pytest.mark.parametrize(
    ("point", "survivor"),
    [("parquet_partial", ("v1", 200)), ("catalog_updated", ("v1", 200)), ("committed", ("v2", 120)), ("swapped", ("v2", 120))],
)
def test_writer_process_killed_mid_store(tmp_path, point, survivor):
    home = tmp_path / "home"
    store(home, "S", 200, ("ore",), seed=1, run_id="v1")
    store(home, "T", 40, seed=3, run_id="t")
    result = run_child(CRASHING_WRITER, str(home), point)
    assert result.returncode == 17, result.stdout + result.stderr
    assert len(staging_entries(home)) == 1  # the dead writer's leftovers
    if point == "parquet_partial":  # a genuinely half-written Parquet file (no footer) was left behind
        [leftover] = (home / ".staging").glob("*/sample_id=S/part-*.parquet")
        with pytest.raises(pa.ArrowInvalid):
            pq.read_schema(leftover)
    # until the next writer, readers see one complete version
    before = rows(home, "SELECT count(*) AS n, min(run_id) AS lo, max(run_id) AS hi FROM particles WHERE sample_id = 'S'")
    assert before in ([{"n": 200, "lo": "v1", "hi": "v1"}], [{"n": 120, "lo": "v2", "hi": "v2"}])
    catalog.init_catalog(home)
    run_id, n = survivor
    assert_version(home, "S", n, run_id)
    assert_version(home, "T", 40, "t")
    assert staging_entries(home) == []


# --------------------------------------------------------------------------
# concurrency: a writer process and a reader process
# --------------------------------------------------------------------------

WRITER_LOOP = """
    import json, sys, time
    from pathlib import Path
    from test_catalog import store
    home, rounds, done = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    seconds = []
    for i in range(rounds):
        for s in range(3):
            n = 40 + 13 * ((i * 3 + s) % 17)
            phases = ("ore", "gangue") if (i + s) % 2 else ("pyrite",)
            started = time.perf_counter()
            store(home, f"s{s}", n, phases, seed=i * 3 + s, run_id=f"w{i}-n{n}")
            seconds.append(time.perf_counter() - started)
    done.write_text("done")
    print(json.dumps({"stores": len(seconds), "max_s": max(seconds)}))
"""

READER_LOOP = """
    import json, sys, time
    from pathlib import Path
    from ps3d_core import catalog
    home, done = Path(sys.argv[1]), Path(sys.argv[2])
    errors, queries, seen_runs = [], 0, set()
    held = catalog.connect_readonly(home)  # a long-lived reader must not block the writer
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        finished = done.exists()
        try:
            per_sample = catalog.query(
                home, "SELECT sample_id, count(*) AS n, count(DISTINCT particle_id) AS ids, min(run_id) AS lo, "
                "max(run_id) AS hi FROM particles GROUP BY sample_id ORDER BY sample_id", limit=None).table.to_pylist()
            for row in per_sample:
                expected = int(row["lo"].split("-n")[1])
                if not (row["lo"] == row["hi"] and row["n"] == expected == row["ids"]):
                    errors.append(f"inconsistent particles: {row}")
                seen_runs.add(row["lo"])
            for row in catalog.query(home, "SELECT sample_id, particle_count, last_run_id FROM samples").table.to_pylist():
                if row["particle_count"] != int(row["last_run_id"].split("-n")[1]):
                    errors.append(f"inconsistent samples row: {row}")
            curve = catalog.query(home, "SELECT sample_id, max(passing_volume_pct) AS top FROM psd GROUP BY ALL").table
            if any(abs(v - 100) > 1e-9 for v in curve.column("top").to_pylist()):
                errors.append(f"psd does not reach 100 %: {curve.to_pylist()}")
            held.execute("SELECT count(*) FROM samples").fetchone()
            queries += 1
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
        if finished:
            break
    held.close()
    print(json.dumps({"queries": queries, "errors": errors[:20], "error_count": len(errors), "runs_seen": len(seen_runs)}))
"""


def test_readers_keep_working_while_a_writer_writes(tmp_path):
    home = tmp_path / "home"
    for s in range(3):
        store(home, f"s{s}", 40, ("pyrite",), seed=100 + s, run_id="w0-n40")
    done = tmp_path / "writer-done"
    rounds = 8
    env = child_env()
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(READER_LOOP), str(home), str(done)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER_LOOP), str(home), str(rounds), str(done)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    writer_out, writer_err = writer.communicate(timeout=300)
    reader_out, reader_err = reader.communicate(timeout=300)
    assert writer.returncode == 0, writer_err
    assert reader.returncode == 0, reader_err
    written = json.loads(writer_out)
    read = json.loads(reader_out)
    assert written["stores"] == 3 * rounds
    assert read["error_count"] == 0, read["errors"]
    assert read["queries"] >= 5
    assert read["runs_seen"] >= 4  # the reader saw versions change under it
    # the end state is the writer's last round
    last = {f"s{s}": 40 + 13 * (((rounds - 1) * 3 + s) % 17) for s in range(3)}
    got = {r["sample_id"]: r["n"] for r in rows(home, "SELECT sample_id, count(*) AS n FROM particles GROUP BY ALL")}
    assert got == last


def test_writer_lock_times_out_with_a_clear_error(tmp_path):
    home = catalog.init_catalog(tmp_path / "home")
    with catalog.writer_lock(home):
        started = time.monotonic()
        with pytest.raises(catalog.CatalogLockTimeout, match=rf"another process is writing.*pid {os.getpid()}.*waited 0.3 s"):
            catalog.mark_sample(home, "x", "failed", "boom", lock_timeout_s=0.3)
        assert 0.3 <= time.monotonic() - started < 5
        # readers are not affected by the writers' lock
        assert rows(home, "SELECT count(*) AS n FROM samples") == [{"n": 0}]
    catalog.mark_sample(home, "x", "failed", "boom", lock_timeout_s=0.3)
    assert catalog.get_sample(home, "x")["status"] == "failed"


# --------------------------------------------------------------------------
# SQL safety
# --------------------------------------------------------------------------


@pytest.fixture
def safe_home(tmp_path):
    home = tmp_path / "home"
    store(home, "q", 100, ("ore",), seed=7)
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"secret": [1, 2, 3]}), outside)
    return home


REFUSED = [
    ("CREATE TABLE t AS SELECT 1", "only SELECT queries are allowed.*got CREATE"),
    ("CREATE TEMP TABLE t (a INTEGER)", "only SELECT queries are allowed.*got CREATE"),
    ("CREATE VIEW v AS SELECT 1", "only SELECT queries are allowed.*got CREATE"),
    ("INSERT INTO samples (sample_id, status, created_at, updated_at) VALUES ('x', 'x', now(), now())",
     "only SELECT queries are allowed.*got INSERT"),
    ("UPDATE samples SET status = 'failed'", "only SELECT queries are allowed.*got UPDATE"),
    ("DELETE FROM samples", "only SELECT queries are allowed.*got DELETE"),
    ("DROP TABLE samples", "only SELECT queries are allowed.*got DROP"),
    ("ATTACH '/tmp/other.duckdb' AS other", "only SELECT queries are allowed.*got ATTACH"),
    ("COPY samples TO '/tmp/ps3d-leak.csv'", "only SELECT queries are allowed.*got COPY"),
    ("SET enable_external_access = true", "only SELECT queries are allowed.*got SET"),
    ("PRAGMA database_list", "only SELECT queries are allowed.*got PRAGMA"),
    ("INSTALL httpfs", "only SELECT queries are allowed.*got LOAD"),
    ("LOAD httpfs", "only SELECT queries are allowed.*got LOAD"),
    ("SELECT 1; SELECT 2", "exactly one SQL statement, got 2"),
    ("SELEC 1", "SQL syntax error"),
    ("SELECT * FROM read_csv('/etc/passwd')", "reading files, the network or extensions is not allowed.*/etc/passwd"),
    ("SELECT * FROM read_text('/etc/hostname')", "reading files, the network or extensions is not allowed"),
    ("SELECT * FROM glob('/etc/*')", "reading files, the network or extensions is not allowed"),
    ("SELECT * FROM read_csv('https://example.com/x.csv')", "reading files, the network or extensions is not allowed"),
    ("SELECT * FROM read_text('{home}/ps3d.lock')", "reading files, the network or extensions is not allowed"),
    ("SELECT * FROM read_text('{home}/particles/../ps3d.duckdb')", "reading files, the network or extensions is not allowed"),
    ("SELECT * FROM read_parquet('{home}/../outside.parquet')", "reading files, the network or extensions is not allowed"),
    ("SELECT * FROM no_such_table", "SQL error: Catalog Error"),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "message"), REFUSED, ids=[s[:40] for s, _ in REFUSED])
def test_sql_refuses_writes_files_and_network(safe_home, sql, message):
    sql = sql.replace("{home}", str(safe_home))
    with pytest.raises(catalog.QueryRefused, match=message):
        catalog.query(safe_home, sql)
    assert not Path("/tmp/ps3d-leak.csv").exists()
    assert rows(safe_home, "SELECT count(*) AS n, min(status) AS s FROM samples") == [{"n": 1, "s": "ingested"}]
    assert rows(safe_home, "SELECT count(*) AS n FROM particles") == [{"n": 100}]


def test_sql_allows_reads_of_tables_views_and_describe(safe_home):
    assert rows(safe_home, "WITH x AS (SELECT count(*) AS n FROM particles) SELECT n FROM x") == [{"n": 100}]
    assert rows(safe_home, "FROM samples SELECT sample_id") == [{"sample_id": "q"}]
    assert {r["name"] for r in rows(safe_home, "SHOW TABLES")} >= {"samples", "runs", "schema_version", "particles",
                                                                    "psd", "d_values", "size_classes"}  # fmt: skip
    assert catalog.query(safe_home, "EXPLAIN SELECT * FROM psd").table.num_rows >= 1


def test_sql_row_limit(safe_home):
    result = catalog.query(safe_home, "SELECT particle_id FROM particles ORDER BY particle_id", limit=7)
    assert result.truncated and result.table.column("particle_id").to_pylist() == [1, 2, 3, 4, 5, 6, 7]
    result = catalog.query(safe_home, "SELECT particle_id FROM particles", limit=100)
    assert not result.truncated and result.table.num_rows == 100
    result = catalog.query(safe_home, "SELECT * FROM range(1000000000000)", limit=3)
    assert result.truncated and result.table.num_rows == 3
    assert catalog.query(safe_home, "SELECT * FROM particles", limit=None).table.num_rows == 100


def test_sql_time_limit_interrupts_a_long_query(safe_home):
    started = time.monotonic()
    with pytest.raises(catalog.QueryTimeout, match="longer than its time limit of 0.5 s"):
        catalog.query(safe_home, "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b", timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert rows(safe_home, "SELECT count(*) AS n FROM samples") == [{"n": 1}]


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------


def _drop(table, name):
    return table.drop_columns([name])


def _retype(table, name, type_):
    index = table.column_names.index(name)
    return table.set_column(index, name, table.column(name).cast(type_))


BAD_TABLES = [
    ("missing column", lambda t: _drop(t, "esd_mm"), "missing column\\(s\\) esd_mm"),
    ("wrong type", lambda t: _retype(t, "esd_mm", pa.float32()), "column esd_mm has type float, expected double"),
    ("wrong id type", lambda t: _retype(t, "particle_id", pa.int64()), "column particle_id has type int64, expected uint32"),
    ("unknown column", lambda t: t.append_column("colour", pa.array(["red"] * t.num_rows)), "unexpected column\\(s\\) colour"),
    ("undeclared phase", lambda t: t.append_column("phase_gold_fraction", pa.array([0.1] * t.num_rows)),
     "unexpected column\\(s\\) phase_gold_fraction \\(phase columns must match the sample's phases: ore\\)"),
    ("missing phase", lambda t: _drop(t, "phase_ore_fraction"), "missing column\\(s\\) phase_ore_fraction"),
    ("other sample", lambda t: t.set_column(0, "sample_id", pa.array(["good"] * (t.num_rows - 2) + ["evil", "evil"])),
     "2 row\\(s\\) have sample_id 'evil', expected 'good'"),
    ("null sample", lambda t: t.set_column(0, "sample_id", pa.array([None] + ["good"] * (t.num_rows - 1), pa.string())),
     "1 row\\(s\\) have no sample_id"),
    ("duplicate ids", lambda t: t.set_column(1, "particle_id", pa.array([1] * t.num_rows, pa.uint32())),
     "particle_id values are not unique"),
    ("other run", lambda t: t.set_column(2, "run_id", pa.array(["someone-else"] * t.num_rows)),
     "run_id column holds \\['someone-else'\\], expected 'run-1'"),
    ("not a table", lambda t: t.to_pylist(), "expected a pyarrow.Table, got list"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "message"), BAD_TABLES, ids=[c for c, _, _ in BAD_TABLES])
def test_bad_particle_tables_are_refused_and_nothing_is_written(tmp_path, case, change, message):
    home = tmp_path / "home"
    table = change(make_particles("good", 20, ("ore",), seed=1))
    with pytest.raises(catalog.CatalogError, match=message):
        catalog.store_sample(home, make_metadata("good", ("ore",)), table, make_run("run-1"),
                             phases={"ore": PHASE_RANGES["ore"]}, phases_source="scan.json")  # fmt: skip
    assert not (home / "particles").exists() and not (home / "ps3d.duckdb").exists()


def test_bad_arguments_are_refused(tmp_path):
    home = tmp_path / "home"
    table = make_particles("good", 20, ("ore",), seed=1)
    metadata = make_metadata("good", ("ore",))
    cases = [
        (dict(phases={"ore": (1, 2)}, phases_source="scan.json"), "said to come from scan.json"),
        (dict(phases={"ore": (5, 2)}, phases_source="auto"), "range \\[5.0, 2.0\\] must be finite with low < high"),
        (dict(phases={"ore": (1, 2)}, phases_source="guess"), "phases_source must be one of scan.json, auto"),
        (dict(phases={"ore": (1, 2)}, phases_source="auto", particle_size_source="magic"),
         "particle_size_source must be one of"),
        (dict(phases={"ore": (1, 2)}, phases_source="auto", particle_size_mm=-1.0), "particle_size_mm must be a positive"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(catalog.CatalogError, match=message):
            catalog.store_sample(home, metadata, table, make_run("run-1"), **kwargs)
    with pytest.raises(catalog.CatalogError, match="run record: field 'started_at'"):
        catalog.store_sample(home, metadata, table, {"run_id": "r", "started_at": "yesterday"},
                             phases={"ore": (1, 2)}, phases_source="auto")  # fmt: skip
    with pytest.raises(catalog.CatalogError, match="run record is for sample 'other', not 'good'"):
        catalog.store_sample(home, metadata, table, make_run("r", sample_id="other"),
                             phases={"ore": (1, 2)}, phases_source="auto")  # fmt: skip
    with pytest.raises(catalog.CatalogError, match="status must be one of processing, failed, quarantined, got 'ingested'"):
        catalog.mark_sample(home, "good", "ingested")
    assert not (home / "ps3d.duckdb").exists()


@pytest.mark.parametrize("sample_id", ["..", "../evil", "a/b", "/etc", "sample_id=x/../../y", "", "a\x00b", "é"])
def test_sample_ids_cannot_escape_the_home(tmp_path, sample_id):
    home = tmp_path / "deep" / "home"
    # bypass scan.json validation on purpose: the catalog checks again
    metadata = ScanMetadata.model_construct(**{**make_metadata("ok").__dict__, "sample_id": sample_id})
    table = make_particles(sample_id, 5) if sample_id else make_particles("x", 5)
    with pytest.raises(catalog.CatalogError, match="is not allowed: use 1-128 letters, digits"):
        catalog.store_sample(home, metadata, table, make_run("r"))
    with pytest.raises(catalog.CatalogError, match="is not allowed"):
        catalog.mark_sample(home, sample_id, "failed", "x")
    with pytest.raises(catalog.CatalogError, match="is not allowed"):
        catalog.get_sample(home, sample_id)
    with pytest.raises(catalog.CatalogError, match="run record: field 'sample_id'|sample id '..' is not allowed"):
        catalog.record_run(home, make_run("r", sample_id=sample_id))  # pattern or path check
    assert not (tmp_path / "deep").exists()


def test_mark_sample_and_record_run(tmp_path):
    home = tmp_path / "home"
    catalog.record_run(home, make_run("r-1", status="running", finished_at=None, sample_id="n1"))
    catalog.mark_sample(home, "n1", "processing", metadata=make_metadata("n1"), fingerprint="fp1")
    first = catalog.get_sample(home, "n1")
    assert (first["status"], first["error"], first["stream"], first["fingerprint"]) == ("processing", None, "feed", "fp1")
    assert first["particle_count"] is None
    catalog.mark_sample(home, "n1", "failed", "segmentation: out of memory")
    catalog.record_run(home, make_run("r-1", status="failed", error="out of memory", sample_id="n1"))
    after = catalog.get_sample(home, "n1")
    assert (after["status"], after["error"], after["fingerprint"], after["created_at"]) == (
        "failed", "segmentation: out of memory", "fp1", first["created_at"])  # fmt: skip
    assert rows(home, "SELECT run_id, status, error FROM runs") == [{"run_id": "r-1", "status": "failed", "error": "out of memory"}]
    # a failed re-ingestion keeps the earlier particles queryable
    store(home, "n1", 30, seed=4, run_id="r-2")
    catalog.mark_sample(home, "n1", "quarantined", "operator: wrong epoxy")
    assert catalog.get_sample(home, "n1")["status"] == "quarantined"
    assert rows(home, "SELECT count(*) AS n FROM particles") == [{"n": 30}]


def test_resolve_home(monkeypatch, tmp_path):
    monkeypatch.delenv(catalog.HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert catalog.resolve_home() == tmp_path / "ps3d-data"
    monkeypatch.setenv(catalog.HOME_ENV, str(tmp_path / "env-home"))
    assert catalog.resolve_home() == tmp_path / "env-home"
    assert catalog.resolve_home(tmp_path / "given") == tmp_path / "given"
    assert catalog.resolve_home("rel") == tmp_path / "rel"


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

runner = CliRunner()


def write_features_file(path: Path, sample_id: str, n: int, phases, run_id: str | None, seed: int = 0) -> pa.Table:
    """A Parquet file as `ps3d features` writes it: phases in the key-value metadata."""
    table = make_particles(sample_id, n, phases, seed, run_id=run_id)
    metadata = dict(table.schema.metadata)
    metadata[b"ps3d.phases"] = json.dumps({name: list(PHASE_RANGES[name]) for name in phases}).encode()
    metadata[b"ps3d.phases_source"] = b"auto"
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return table


def test_cli_store_and_sql(tmp_path):
    home = tmp_path / "home"
    scan = tmp_path / "scan-1"
    scan.mkdir()
    (scan / "scan.json").write_text(json.dumps({"sample_id": "cli-1", "spacing_mm": 0.01, "stream": "tailings"}))
    features = tmp_path / "particles.parquet"
    table = write_features_file(features, "cli-1", 64, ("ore", "gangue"), "features-20240501T000000Z-abcdef12")
    segment = tmp_path / "segment.json"
    segment.write_text(json.dumps({"model": {"name": "ps3d-default", "version": "1.1.0"}, "particle_size_mm": 0.09,
                                   "particle_size_source": "estimated", "timings_s": {"predict": 12.5}}))  # fmt: skip

    result = runner.invoke(app, ["store", str(scan), str(features), "--segment", str(segment), "--home", str(home)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["sample_id"], summary["particle_count"]) == ("cli-1", 64)
    assert summary["run_id"] == "features-20240501T000000Z-abcdef12"
    sample = catalog.get_sample(home, "cli-1")
    assert (sample["stream"], sample["phases_source"], sample["model_name"], sample["model_version"]) == (
        "tailings", "auto", "ps3d-default", "1.1.0")  # fmt: skip
    assert (sample["particle_size_mm"], sample["particle_size_source"]) == (0.09, "estimated")
    assert sample["fingerprint"] == fingerprint(scan)
    assert json.loads(rows(home, "SELECT timings FROM runs")[0]["timings"]) == {"predict": 12.5}

    result = runner.invoke(app, ["sql", "SELECT particle_id, esd_mm FROM particles ORDER BY particle_id",
                                 "--format", "json", "--limit", "5", "--home", str(home)])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    expected = table.sort_by("particle_id").slice(0, 5)
    assert lines == [{"particle_id": i, "esd_mm": e} for i, e in
                     zip(expected.column("particle_id").to_pylist(), expected.column("esd_mm").to_pylist())]  # fmt: skip
    assert "5 row(s)" in result.stderr and "stopped at --limit 5" in result.stderr

    out = tmp_path / "d.parquet"
    result = runner.invoke(app, ["sql", "SELECT * FROM d_values", "--format", "parquet", "--out", str(out), "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).column("sample_id").to_pylist() == ["cli-1"]

    out_csv = tmp_path / "s.csv"
    result = runner.invoke(app, ["sql", "SELECT sample_id, particle_count FROM samples", "--format", "csv",
                                 "--out", str(out_csv), "--home", str(home)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out_csv.read_text() == '"sample_id","particle_count"\n"cli-1",64\n'

    result = runner.invoke(app, ["sql", "SELECT sample_id, particle_count, mass_g FROM samples", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["sample_id  particle_count  mass_g", "---------  --------------  ------",
                                          "cli-1                  64    NULL"]  # fmt: skip

    result = runner.invoke(app, ["sql", "DROP TABLE samples", "--home", str(home)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {home}: only SELECT queries are allowed (the particle database is "
                                     "read-only for analysts); got DROP")  # fmt: skip
    result = runner.invoke(app, ["sql", "SELECT 1", "--format", "xml", "--home", str(home)])
    assert result.exit_code == 2 and "--format 'xml': choose one of table, csv, json, parquet" in result.stderr


def test_cli_store_refuses_a_mismatched_file(tmp_path):
    scan = tmp_path / "scan-2"
    scan.mkdir()
    (scan / "scan.json").write_text(json.dumps({"sample_id": "right", "spacing_mm": 0.01, "stream": "feed"}))
    features = tmp_path / "particles.parquet"
    write_features_file(features, "wrong", 10, (), None)
    result = runner.invoke(app, ["store", str(scan), str(features), "--home", str(tmp_path / "home")])
    assert result.exit_code == 2
    assert "10 row(s) have sample_id 'wrong', expected 'right' (the scan's)" in result.stderr
