"""The particle database: per-sample Parquet files and a DuckDB catalog under a home directory.

Layout, tables, views and migrations: ``schemas.catalog``. Writing (one
writer at a time, atomic per sample, crash-safe): :mod:`ps3d_core.catalog.store`.
Reading (a snapshot that writers never block, safe analyst SQL):
:mod:`ps3d_core.catalog.query`.

Typical use::

    from ps3d_core import catalog

    home = catalog.resolve_home()          # $PS3D_HOME or ./ps3d-data
    catalog.store_sample(home, metadata, particles, run, phases=..., phases_source="scan.json", ...)
    result = catalog.query(home, "SELECT * FROM d_values")
    result.table                            # pyarrow.Table
"""

from ps3d_core.catalog._common import (
    HOME_ENV,
    CatalogError,
    CatalogLockTimeout,
    QueryRefused,
    QueryTimeout,
    particles_file,
    resolve_home,
)
from ps3d_core.catalog.query import (
    DEFAULT_LIMIT,
    DEFAULT_TIMEOUT_S,
    QueryResult,
    connect_readonly,
    get_sample,
    query,
    running_runs,
)
from ps3d_core.catalog.store import (
    DEFAULT_LOCK_TIMEOUT_S,
    init_catalog,
    interrupt_runs,
    mark_sample,
    read_particles_file,
    record_run,
    store_sample,
    validate_particle_table,
    volume_d_values,
    write_session,
    writer_lock,
)

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_LOCK_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "HOME_ENV",
    "CatalogError",
    "CatalogLockTimeout",
    "QueryRefused",
    "QueryResult",
    "QueryTimeout",
    "connect_readonly",
    "get_sample",
    "init_catalog",
    "interrupt_runs",
    "mark_sample",
    "particles_file",
    "query",
    "read_particles_file",
    "record_run",
    "resolve_home",
    "running_runs",
    "store_sample",
    "validate_particle_table",
    "volume_d_values",
    "write_session",
    "writer_lock",
]
