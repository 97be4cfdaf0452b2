"""Security: what listens on the network, what analyst SQL can reach, where sample names can lead.

- Every server the platform starts (the Prefect server child, the Dask
  scheduler, workers and nannies of `ps3d serve`, the Streamlit dashboard)
  listens on the loopback interface unless the user asks otherwise.
- Analyst SQL (`ps3d sql`, the dashboard's SQL page: both go through
  ``catalog.query``) cannot write, attach, or read any file but the particle
  Parquet files, whatever way it names a file: fuzzed with hypothesis over
  file-reading functions, paths and SQL wrappers, with a canary file whose
  text must never come back.
- A sample name can never lead out of ``PS3D_HOME``: fuzzed over arbitrary
  text; every id scan.json accepts is one plain directory name.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
from harness import PS3D, Platform, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ps3d_core import catalog
from ps3d_core.catalog._common import check_sample_id, partition_dir
from ps3d_core.synth.particle_tables import random_particle_table
from schemas.scan import ScanMetadata

CANARY = "canary-7f3a9c-never-returned"
LOOPBACK = {"127.0.0.1", "::1"}


# --------------------------------------------------------------------------
# servers bind to the loopback interface
# --------------------------------------------------------------------------


def listening_addresses(root: psutil.Process) -> dict[str, set[str]]:
    """Listening TCP addresses of ``root`` and its descendants: {"ip:port": {process names}}."""
    found: dict[str, set[str]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                found.setdefault(f"{connection.laddr.ip}:{connection.laddr.port}", set()).add(
                    " ".join(process.cmdline()[:4])
                )
    return found


def test_serve_listens_on_loopback_only(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_", "PS3D_"))}
    platform = Platform(tmp_path / "home", env, tiny_model_dir, "--no-watch")
    try:
        addresses = listening_addresses(psutil.Process(platform.process.pid))
    finally:
        alive = platform.stop(signal.SIGTERM)
    assert not alive
    # the Prefect server, the Dask scheduler and its dashboard, two workers and their nannies
    assert len(addresses) >= 6, addresses
    outside = {address: names for address, names in addresses.items() if address.rsplit(":", 1)[0] not in LOOPBACK}
    assert not outside, f"listening beyond the loopback interface: {outside}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dashboard_listens_on_loopback_by_default(tmp_path):
    port = free_port()
    log = (tmp_path / "dashboard.log").open("w")
    process = subprocess.Popen([PS3D, "dashboard", "--home", str(tmp_path / "home"), "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        addresses = wait_for(lambda: listening_addresses(psutil.Process(process.pid)), 120, "the dashboard's socket")
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    assert {address.rsplit(":", 1)[1] for address in addresses} == {str(port)}
    assert {address.rsplit(":", 1)[0] for address in addresses} <= LOOPBACK, addresses


# --------------------------------------------------------------------------
# analyst SQL reaches the database and nothing else
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sql_home(tmp_path_factory):
    """A catalog with one sample, and canary files outside the particles directory (in the home too)."""
    root = tmp_path_factory.mktemp("sql")
    home = root / "home"
    table = random_particle_table("s1", 50, seed=3, run_id="r1")
    metadata = ScanMetadata(sample_id="s1", spacing_mm=0.01, stream="feed")
    now = datetime.now(timezone.utc)
    catalog.store_sample(home, metadata, table, {"run_id": "r1", "status": "succeeded", "started_at": now, "finished_at": now})
    for path in (root / "secret.csv", home / "secret.csv", root / ".tmp" / "secret.csv", home / "particles.csv"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"token\n{CANARY}\n")
    return home


def catalog_bytes(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


def test_sql_ignores_duckdb_temporary_directory(sql_home, monkeypatch):
    # DuckDB allows reading its temporary directory (.tmp/ of the working directory) unless it has none
    monkeypatch.chdir(sql_home.parent)
    for sql in ("SELECT * FROM read_text('.tmp/secret.csv')", f"SELECT * FROM read_csv('{sql_home.parent}/.tmp/secret.csv')"):
        with pytest.raises(catalog.QueryRefused, match="reading files, the network or extensions is not allowed"):
            catalog.query(sql_home, sql)


READERS = ["read_text", "read_blob", "read_csv", "read_csv_auto", "read_json", "read_json_auto", "read_parquet",
           "parquet_scan", "parquet_metadata", "parquet_schema", "sniff_csv", "glob", "read_ndjson"]  # fmt: skip
WRAPPERS = [
    "SELECT * FROM {call}",
    "SELECT count(*) AS n FROM {call}",
    "WITH t AS (SELECT * FROM {call}) SELECT * FROM t",
    "SELECT * FROM samples WHERE sample_id IN (SELECT CAST(filename AS VARCHAR) FROM {call})",
    "SELECT * FROM query('SELECT * FROM {call_quoted}')",
    "SUMMARIZE SELECT * FROM {call}",
    "EXPLAIN ANALYZE SELECT * FROM {call}",
    "FROM {call}",
    "SELECT 1 AS a UNION ALL SELECT count(*) FROM {call}",
]


def _targets(home: Path) -> list[str]:
    """Files analyst SQL must not read. (DuckDB lets a connection read the database file it attached,
    ``snapshot/ps3d.duckdb``, whose tables the analyst may query anyway: not a target.)"""
    root = home.parent
    return [
        str(root / "secret.csv"), str(home / "secret.csv"), str(home / "particles.csv"), "secret.csv", ".tmp/secret.csv",
        str(home / "particles" / ".." / "secret.csv"), str(home / "particles") + "/../../secret.csv",
        str(home / "ps3d.duckdb"), "/etc/passwd", "/proc/self/environ",
        "file:///etc/passwd", "https://example.com/x.csv", "s3://bucket/x.parquet", str(root / "*.csv"),
        str(home / "**" / "*.csv"), "~/.bashrc",
    ]  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sql_cannot_read_any_other_file(sql_home, data, monkeypatch):
    monkeypatch.chdir(sql_home.parent)
    reader = data.draw(st.sampled_from(READERS), label="reader")
    target = data.draw(st.sampled_from(_targets(sql_home)), label="target")
    as_list = data.draw(st.booleans(), label="as list")
    argument = f"['{target}']" if as_list else f"'{target}'"
    call = f"{reader}({argument})"
    sql = data.draw(st.sampled_from(WRAPPERS), label="wrapper").format(call=call, call_quoted=call.replace("'", "''"))
    with pytest.raises((catalog.QueryRefused, catalog.CatalogError)) as refused:
        result = catalog.query(sql_home, sql)
        assert CANARY not in str(result.table.to_pylist())  # reached only if the query ran: then it must not leak
    assert CANARY not in str(refused.value)


WRITES = [
    "CREATE TABLE t AS SELECT 1", "INSERT INTO samples (sample_id) VALUES ('x')", "UPDATE samples SET status = 'x'",
    "DELETE FROM samples", "DROP VIEW particles", "ALTER TABLE samples ADD COLUMN x INT", "ATTACH '{root}/x.duckdb' AS x",
    "DETACH ps3d", "COPY samples TO '{root}/leak.csv'", "COPY (SELECT * FROM samples) TO '{root}/leak.parquet'",
    "EXPORT DATABASE '{root}/export'", "IMPORT DATABASE '{root}'", "INSTALL httpfs", "LOAD httpfs",
    "SET enable_external_access = true", "RESET allowed_directories", "SET allowed_directories = ['/']",
    "SET temp_directory = '/'", "PRAGMA enable_profiling", "CALL enable_logging()", "CHECKPOINT", "VACUUM",
    "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')", "USE memory", "SET VARIABLE v = 1",
    "WITH t AS (DELETE FROM samples RETURNING *) SELECT * FROM t", "SELECT * FROM query('DELETE FROM samples')",
    "SELECT 1; DELETE FROM samples", "BEGIN TRANSACTION",
]  # fmt: skip


@pytest.mark.parametrize("sql", WRITES)
def test_sql_cannot_write_attach_or_reconfigure(sql_home, sql):
    before = catalog_bytes(sql_home)
    root = sql_home.parent
    with pytest.raises(catalog.QueryRefused):
        catalog.query(sql_home, sql.format(root=root))
    assert catalog_bytes(sql_home) == before
    assert not any((root / name).exists() for name in ("x.duckdb", "leak.csv", "leak.parquet", "export"))
    assert catalog.query(sql_home, "SELECT count(*) AS n FROM particles").table.column("n")[0].as_py() == 50


def test_ps3d_sql_refuses_files_and_writes(sql_home):
    for sql, why in [(f"SELECT * FROM read_text('{sql_home.parent}/secret.csv')", "reading files"),
                     ("DELETE FROM samples", "only SELECT queries are allowed"),
                     (f"COPY samples TO '{sql_home.parent}/leak.csv'", "only SELECT queries are allowed")]:  # fmt: skip
        result = subprocess.run([PS3D, "sql", sql, "--home", str(sql_home)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and why in result.stderr, result
        assert "Traceback" not in result.stderr and CANARY not in result.stdout + result.stderr
    assert not (sql_home.parent / "leak.csv").exists()


# --------------------------------------------------------------------------
# sample names stay inside the home
# --------------------------------------------------------------------------


def _accepted(sample_id: str) -> bool:
    try:
        ScanMetadata(sample_id=sample_id, spacing_mm=0.01, stream="feed")
    except ValidationError:
        return False
    return True


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.one_of(
    st.text(max_size=140),
    st.text(alphabet="./\\-_aZ9\x00 ~:", max_size=12),
    st.sampled_from(["..", ".", "...", "../x", "a/../../b", "/etc/passwd", "C:\\x", "~root", "a\nb", "x" * 129]),
))  # fmt: skip
def test_sample_names_never_leave_the_home(sample_id):
    home = Path("/srv/ps3d-home")
    accepted = _accepted(sample_id)
    try:
        check_sample_id(sample_id, home)
        checked = True
    except catalog.CatalogError:
        checked = False
    assert accepted == checked  # scan.json and the catalog agree on every id
    if not accepted:
        return
    # one plain path component: every place a sample id becomes a path stays one level below its folder
    assert sample_id not in (".", "..") and os.sep not in sample_id and "\\" not in sample_id and "\x00" not in sample_id
    assert sample_id.isascii() and sample_id.isprintable() and len(sample_id) <= 128
    for folder in ("scans", "segmentations", "work", "quarantine"):
        path = home / folder / sample_id
        assert os.path.normpath(path) == str(path) and path.parent == home / folder
    assert partition_dir(home, sample_id).parent == home / "particles"
