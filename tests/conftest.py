"""Shared pytest fixtures, and a Prefect home of this session's own.

Prefect reads its settings when it is first imported, and keeps task results
and cache records under ``PREFECT_HOME/storage``: a second pytest session
sharing ``~/.prefect`` would get cache hits from the first. So, before any
test module can import prefect, every session gets a fresh temporary
``PREFECT_HOME`` (removed at exit), and the variables that would point the
tests at a user's server, cluster, platform home or model are dropped.
Subprocesses started by tests inherit this environment.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

if "prefect" in sys.modules:  # pragma: no cover - a plugin imported it before this file ran
    raise RuntimeError("prefect was imported before tests/conftest.py could isolate PREFECT_HOME")

PREFECT_TEST_HOME = tempfile.mkdtemp(prefix="ps3d-test-prefect-")
atexit.register(shutil.rmtree, PREFECT_TEST_HOME, ignore_errors=True)
for _name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH", "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
              "DASK_SCHEDULER_ADDRESS", "PS3D_HOME", "PS3D_MODEL"):  # fmt: skip
    os.environ.pop(_name, None)
os.environ["PREFECT_HOME"] = PREFECT_TEST_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a test module: the bits of the single-threaded Dask workers, and robust
    on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real 2-fold border-core model (tests/tiny_model.py), trained once per session (~15 s on 2 cores)."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "ps3d-tiny")


# one Prefect server and one Dask LocalCluster per session, for the tests that run the platform (tests/harness.py)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    from deployments.server import start_prefect_server

    server = start_prefect_server(tmp_path_factory.mktemp("prefect-server"), timeout_s=180)
    yield server.api_url
    server.stop()
    assert server.process.poll() is not None


@pytest.fixture(scope="session")
def dask_address():
    from distributed import LocalCluster

    import deployments.cluster  # noqa: F401 - its import keeps glibc's malloc defaults in the workers, as in `ps3d serve`

    # dashboard_address=None would still take 127.0.0.1:8787
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture
def platform_env(prefect_api, dask_address, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_", "PS3D_"))}
    env |= {"PREFECT_API_URL": prefect_api, "DASK_SCHEDULER_ADDRESS": dask_address,
            "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-client")), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    return env
