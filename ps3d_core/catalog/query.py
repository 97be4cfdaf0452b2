"""Reading the particle database: read-only connections and safe analyst SQL.

Readers open ``snapshot/ps3d.duckdb`` read-only (see ``store``: never the
writers' file), then create the views as TEMP views against the home's
absolute Parquet path, so the home can be moved and the DuckDB file holds no
paths.

A *safe* connection (``connect_readonly(home)``, used by :func:`query` and
``ps3d sql``) is then locked down before any analyst SQL runs:

- no temporary directory (queries do not spill to disk: DuckDB would allow
  reading its temporary directory, ``.tmp/`` of the working directory);
- ``allowed_directories`` = the home's ``particles/`` directory and
  ``enable_external_access = false``: no other file, no network, no ATTACH,
  no COPY TO, no extension install or load; the views still read the Parquet
  files because those lie in the allowed directory;
- ``lock_configuration = true``: SQL cannot ``SET`` any of that back;
- :func:`query` accepts one statement, of type SELECT (including WITH,
  DESCRIBE, SHOW, SUMMARIZE, FROM-first) or EXPLAIN: CREATE, INSERT, UPDATE,
  DELETE, DROP, ATTACH, COPY, PRAGMA, SET, CALL, ... are refused before they
  reach DuckDB (a read-only database would still accept CREATE TEMP TABLE);
- a row limit (``LIMIT n + 1`` on the query's relation, so DuckDB stops
  early) and a time limit (a timer thread calls ``connection.interrupt()``).

Each connection is a new in-memory DuckDB that ATTACHes the snapshot: the
Python client caches one database instance per file path, which would share
settings between connections and keep a replaced snapshot open.

The ``particles`` view globs ``particles/sample_id=*/part-*.parquet`` when a
query runs. A store swaps a sample's directory in one step and gives its file
a new name, so a query sees each sample whole, old or new; if the swap falls
between DuckDB planning the query and opening the file, DuckDB reports the
old file missing and :func:`query` runs the query again (up to
:data:`ATTEMPTS` times).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from ps3d_core.catalog._common import (
    CatalogError,
    QueryRefused,
    QueryTimeout,
    check_sample_id,
    particles_dir,
    resolve_home,
    snapshot_path,
)
from schemas.catalog import (
    PARTICLES_GLOB,
    particles_view_sql,
    phase_names_of,
    view_statements,
)

DEFAULT_LIMIT = 10_000
DEFAULT_TIMEOUT_S = 30.0
#: Tries of a query whose particle file was replaced while it ran, and the pause between them.
ATTEMPTS = 5
RETRY_PAUSE_S = 0.02

_ALLOWED_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _attach_snapshot(path: Path) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB with the snapshot attached read-only as ``ps3d`` and made the default.

    Not ``duckdb.connect(path, read_only=True)``: the Python client caches one
    database instance per path and process, so a second connection would share
    the first one's (locked) settings and keep reading the replaced snapshot.
    """
    connection = duckdb.connect(":memory:")
    try:
        connection.execute(f"ATTACH {_quote(str(path))} AS ps3d (READ_ONLY)")
        connection.execute("USE ps3d")
        # Parquet footers are read once per connection instead of once per view and query; safe
        # because a particle file's path never gets other content (each store writes a new name).
        connection.execute("SET parquet_metadata_cache = true")
    except BaseException:
        connection.close()
        raise
    return connection


def _vanished(error: BaseException, home: Path) -> bool:
    """A particle file disappeared between planning and reading (its sample was stored again)."""
    return isinstance(error, duckdb.IOException) and str(particles_dir(home)) in str(error)


def _vanished_again(home: Path, error: BaseException) -> CatalogError:
    return CatalogError(
        home, f"sample files were replaced during the query {ATTEMPTS} times in a row; try again ({error})"
    )


def connect_readonly(home: str | os.PathLike[str] | None = None, *, safe: bool = True) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the home's catalog snapshot with the views ``particles``, ``psd``,
    ``d_values`` and ``size_classes``.

    Never waits for writers and never blocks them. It sees the catalog as of
    the last write published before it was opened; open a new one to see later
    writes. The views read the Parquet files present when a query runs. If a
    sample is stored again while a query on this connection plans and reads,
    that query can fail with ``duckdb.IOException`` naming the vanished file
    (never with wrong rows: file names are never reused); run it again.
    :func:`query` does that for you. With ``safe`` (the default) file and
    network access are off and the configuration is locked (module docstring).

    Raises
    ------
    CatalogError
        No catalog in ``home`` yet.
    """
    home = resolve_home(home)
    path = snapshot_path(home)
    if not path.is_file():
        raise CatalogError(
            home, "no particle database here yet: store a sample first (`ps3d store`), or point --home/PS3D_HOME at one"
        )
    for attempt in range(ATTEMPTS):
        connection = _attach_snapshot(path)
        try:
            folder = particles_dir(home)
            if safe:
                # no spilling: DuckDB adds its temp directory (``.tmp/`` of the working directory) to the
                # allowed ones, which would let SQL read whatever lies there
                connection.execute("SET temp_directory = ''")
                connection.execute(f"SET allowed_directories = [{_quote(str(folder) + os.sep)}]")
                connection.execute("SET enable_external_access = false")
                connection.execute("SET autoinstall_known_extensions = false")
                connection.execute("SET autoload_known_extensions = false")
            has_files = any(folder.glob(PARTICLES_GLOB))
            connection.execute(particles_view_sql(folder if has_files else None))
            columns = [row[0] for row in connection.execute("SELECT column_name FROM (DESCRIBE particles)").fetchall()]
            for statement in view_statements(folder, phase_names_of(columns), names=("psd", "d_values", "size_classes")):
                connection.execute(statement)
            if safe:
                connection.execute("SET lock_configuration = true")
            return connection
        except BaseException as error:
            connection.close()
            if not _vanished(error, home):
                raise
            if attempt == ATTEMPTS - 1:
                raise _vanished_again(home, error) from None
            time.sleep(RETRY_PAUSE_S * (attempt + 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class QueryResult:
    """Rows of an analyst query: at most ``limit`` of them; ``truncated`` when there were more."""

    table: pa.Table
    truncated: bool
    seconds: float


def check_statement(connection: duckdb.DuckDBPyConnection, sql: str, where: Any) -> duckdb.StatementType:
    """The type of the one SELECT/EXPLAIN statement in ``sql``; :class:`QueryRefused` otherwise."""
    try:
        statements = connection.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryRefused(where, f"SQL syntax error: {error}") from None
    if len(statements) != 1:
        raise QueryRefused(where, f"give exactly one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in _ALLOWED_STATEMENTS:
        raise QueryRefused(
            where,
            f"only SELECT queries are allowed (the particle database is read-only for analysts); got {kind.name}",
        )
    return kind


def query(
    home: str | os.PathLike[str] | None,
    sql: str,
    limit: int | None = DEFAULT_LIMIT,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> QueryResult:
    """Run one analyst SELECT on a safe read-only connection.

    Parameters
    ----------
    home : path or None
        Platform home (None: ``$PS3D_HOME``, else ``./ps3d-data``).
    sql : str
        One SELECT (or EXPLAIN) statement over ``samples``, ``runs``,
        ``schema_version``, ``particles``, ``psd``, ``d_values``, ``size_classes``.
    limit : int or None
        Most rows returned (None: all).
    timeout_s : float or None
        The query is interrupted after this many seconds (None: no limit).

    Raises
    ------
    QueryRefused
        Not a single SELECT, reads files or the network, or any SQL error.
    QueryTimeout
        It ran past ``timeout_s``.
    """
    home = resolve_home(home)
    if limit is not None and limit < 0:
        raise QueryRefused(home, f"limit must be >= 0, got {limit}")
    started = time.perf_counter()
    for attempt in range(ATTEMPTS):
        try:
            remaining = None if timeout_s is None else timeout_s - (time.perf_counter() - started)
            table = _run_once(home, sql, limit, remaining, timeout_s)
            break
        except duckdb.IOException as error:  # only a vanished particle file gets here
            if attempt == ATTEMPTS - 1:
                raise _vanished_again(home, error) from None
            time.sleep(RETRY_PAUSE_S * (attempt + 1))
    truncated = limit is not None and table.num_rows > limit
    if truncated:
        table = table.slice(0, limit)
    return QueryResult(table=table, truncated=truncated, seconds=time.perf_counter() - started)


def _run_once(home: Path, sql: str, limit: int | None, remaining_s: float | None, timeout_s: float | None) -> pa.Table:
    """One attempt of :func:`query`; re-raises ``duckdb.IOException`` only for a vanished particle file."""
    if remaining_s is not None and remaining_s <= 0:
        raise QueryTimeout(home, f"the query ran longer than its time limit of {timeout_s:g} s and was stopped")
    connection = connect_readonly(home, safe=True)
    timer = None
    try:
        kind = check_statement(connection, sql, home)
        if remaining_s is not None:
            timer = threading.Timer(remaining_s, connection.interrupt)
            timer.daemon = True
            timer.start()
        relation = connection.sql(sql)
        if limit is not None and kind == duckdb.StatementType.SELECT:
            relation = relation.limit(limit + 1)
        return relation.to_arrow_table()
    except duckdb.InterruptException:
        raise QueryTimeout(home, f"the query ran longer than its time limit of {timeout_s:g} s and was stopped") from None
    except duckdb.PermissionException as error:
        raise QueryRefused(
            home,
            "reading files, the network or extensions is not allowed in analyst queries; query the tables "
            f"samples, runs and the views particles, psd, d_values, size_classes ({error})",
        ) from None
    except duckdb.Error as error:
        if _vanished(error, home):
            raise
        raise QueryRefused(home, f"SQL error: {error}") from None
    finally:
        if timer is not None:
            timer.cancel()
        connection.close()


def get_sample(home: str | os.PathLike[str] | None, sample_id: str) -> dict[str, Any] | None:
    """The ``samples`` row of a sample as a dict (JSON columns decoded), or None when unknown or no catalog yet."""
    home = resolve_home(home)
    check_sample_id(sample_id, home)
    if not snapshot_path(home).is_file():
        return None
    connection = _attach_snapshot(snapshot_path(home))
    try:
        cursor = connection.execute("SELECT * FROM samples WHERE sample_id = ?", [sample_id])
        names = [d[0] for d in cursor.description]
        row = cursor.fetchone()
    finally:
        connection.close()
    if row is None:
        return None
    record = dict(zip(names, row))
    if record.get("phases") is not None:
        record["phases"] = json.loads(record["phases"])
    return record



def running_runs(home: str | os.PathLike[str] | None, sample_id: str) -> list[dict[str, Any]]:
    """The ``runs`` rows of a sample still marked ``running`` (parameters decoded), oldest first."""
    home = resolve_home(home)
    check_sample_id(sample_id, home)
    if not snapshot_path(home).is_file():
        return []
    connection = _attach_snapshot(snapshot_path(home))
    try:
        cursor = connection.execute(
            "SELECT * FROM runs WHERE sample_id = ? AND status = 'running' ORDER BY started_at", [sample_id]
        )
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        connection.close()
    for row in rows:
        row["parameters"] = json.loads(row["parameters"]) if row.get("parameters") else {}
    return rows
