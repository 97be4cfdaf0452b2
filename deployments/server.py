"""A local Prefect server as a child process (SQLite under ``<home>/prefect``), and its shutdown.

Prefect's ephemeral mode is not used: it runs no scheduler (a weekly
retraining would never fire) and makes every Dask worker start its own
temporary server (see ``../shared/reference/notes/prefect-dask.md``). The
child runs in its own session, so a Ctrl-C in the terminal reaches only the
platform, which then stops the child in order; :meth:`PrefectServer.stop`
ends the child's whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PREFECT_DIR = "prefect"
DEFAULT_PORT = 4200


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def server_env(prefect_home: Path) -> dict[str, str]:
    """Environment of the server child: its own PREFECT_HOME and SQLite database, no telemetry, no API URL."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env |= {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }
    return env


def api_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class PrefectServer:
    """A running ``prefect server start`` child."""

    process: subprocess.Popen
    api_url: str
    prefect_home: Path
    log_path: Path

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the child's process group, SIGKILL after ``timeout_s``; waits until it is gone."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        # uvicorn workers or services that outlived the main process
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start_prefect_server(
    prefect_home: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    ui: bool = False,
    timeout_s: float = 120.0,
) -> PrefectServer:
    """Start ``prefect server start`` with ``PREFECT_HOME=prefect_home`` and wait until its API answers.

    Parameters
    ----------
    prefect_home : path
        Created; holds the SQLite database (``prefect.db``) and ``server.log``.
    port : int, optional
        Default: a free port.
    ui : bool
        Serve the web UI too (it takes a few seconds more to start).

    Raises
    ------
    RuntimeError
        The server exited or did not answer within ``timeout_s``; the message
        holds the end of its log.
    """
    home = Path(prefect_home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    if port_in_use(host, port):
        raise RuntimeError(f"port {port} on {host} is in use; pass another port or set PREFECT_API_URL to that server")
    log_path = home / "server.log"
    command = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", host, "--port", str(port),
               "--analytics-off", "--ui" if ui else "--no-ui"]  # fmt: skip
    if not Path(command[0]).exists():
        command[0:1] = [sys.executable, "-m", "prefect"]
    log = log_path.open("ab")
    process = subprocess.Popen(
        command, env=server_env(home), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    log.close()
    server = PrefectServer(process, f"http://{host}:{port}/api", home, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if api_healthy(server.api_url):
            (home / "server.json").write_text(json.dumps({"api_url": server.api_url, "pid": process.pid}) + "\n")
            return server
        time.sleep(0.3)
    server.stop()
    tail = log_path.read_text(errors="replace")[-3000:]
    what = f"exited with status {process.returncode}" if process.returncode is not None else f"did not answer in {timeout_s:g} s"
    raise RuntimeError(f"the Prefect server {what}; end of {log_path}:\n{tail}")
