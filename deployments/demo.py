"""``ps3d demo``: the platform end to end on three synthetic samples of one campaign.

1. starts the platform exactly as ``ps3d serve`` does (the same command, as
   a child process with its own Prefect server, Dask cluster, deployments and
   inbox watcher; its log is ``<workdir>/serve.log``);
2. synthesizes a feed, its concentrate and its tailings (one campaign: the
   same sample preparation and scanner settings, so the same seed; the streams
   differ in size distribution and grade, see :mod:`ps3d_core.synth`), with
   ``campaign`` and ``mass_g`` in their ``scan.json``;
3. drops them into the inbox the way an instrument operator would (copied
   into ``inbox/.staging/``, marker written last, then renamed into the
   inbox) and waits while the watcher triggers the ``ingest`` deployment for
   each and the flows store them;
4. prints a per-sample summary queried with SQL from the particle database
   (particles, D10/D50/D80 by volume, mean sphericity, grade), next to the
   synthetic ground truth, and how to look further (dashboard, SQL, Prefect UI);
5. stops the platform with SIGTERM, as Ctrl-C would, and checks that no
   process is left behind.

The demo home is ``<workdir>`` (default ``./ps3d-demo``); a previous demo there
(recognised by its ``.ps3d-demo`` marker) is replaced, any other non-empty
directory is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.server import free_port

DEMO_MARKER = ".ps3d-demo"
CAMPAIGN = "ps3d-demo"
#: (stream, sample mass in g as weighed before mounting)
STREAMS: tuple[tuple[str, float], ...] = (("feed", 12.0), ("concentrate", 2.4), ("tailings", 9.1))
SERVE_LOG = "serve.log"
READY_LINE = "ps3d platform ready"
_SUBMITTED = re.compile(r"ps3d\.watcher INFO (\S+) ready \(([^)]*)\): (started|already had) flow run (\S+)")


class DemoError(RuntimeError):
    """The demo could not finish (the message says why and where to look)."""


@dataclasses.dataclass
class DemoConfig:
    workdir: Path = Path("ps3d-demo")
    preset: str = "tiny"
    seed: int = 1
    model: Path | None = None
    segment_options: dict[str, Any] | None = None
    workers: int | None = None
    timeout_s: float = 900.0
    quiet_s: float = 5.0
    rescan_s: float = 10.0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).absolute()


def sample_id(stream: str) -> str:
    return f"demo-{stream}"


def prepare_workdir(workdir: Path) -> None:
    """An empty demo home: a previous demo's is removed, anything else non-empty is refused."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).is_file():
            raise DemoError(f"{workdir}: exists and is not a previous demo's home; pass another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text("home of `ps3d demo`; removed by the next demo run\n")


def synthesize_campaign(preset: str, seed: int, out_dir: Path) -> dict[str, dict[str, Any]]:
    """The three scan directories under ``out_dir`` (truth in ``out_dir/_truth``); per sample: path and truth."""
    from ps3d_core.synth import synthesize, write_synthetic_scan

    written = {}
    for stream, mass_g in STREAMS:
        scan = synthesize(preset, seed, stream=stream, sample_id=sample_id(stream), workers=1)
        metadata = scan.metadata.model_copy(update={"campaign": CAMPAIGN, "mass_g": mass_g})
        path = write_synthetic_scan(dataclasses.replace(scan, metadata=metadata), out_dir)
        written[sample_id(stream)] = {"path": path, "stream": stream, "truth": scan.truth}
    return written


def drop_into_inbox(scan_dir: Path, inbox: Path) -> Path:
    """The operator contract: copy into ``inbox/.staging/``, then one atomic rename into the inbox."""
    staging = inbox / ".staging" / scan_dir.name
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(scan_dir, staging)
    target = inbox / scan_dir.name
    os.replace(staging, target)
    return target


def summary_sql(columns: list[str]) -> str:
    """The per-sample summary: counts, D-values by volume, sphericity of whole particles, grade.

    The grade is the share of particle volume in the valuable phase: the phase
    columns whose name holds ``valuable`` (the synthetic scans name their phases
    by role; ``valuable_accessory`` when no grey value separates the two).
    """
    valuable = [c for c in columns if c.startswith("phase_") and c.endswith("_fraction") and "valuable" in c]
    if valuable:
        share = " + ".join(f"coalesce({c}, 0)" for c in valuable)
        grade = (f"100 * sum(({share}) * volume_mm3) / sum(volume_mm3) AS grade_vol_pct,\n"
                 f"           100 * avg(CASE WHEN {share} > 0.01 THEN 1 ELSE 0 END) AS carriers_pct")  # fmt: skip
    else:  # no sample has a valuable phase
        grade = "CAST(NULL AS DOUBLE) AS grade_vol_pct, CAST(NULL AS DOUBLE) AS carriers_pct"
    return f"""SELECT s.sample_id, s.stream, s.mass_g, s.particle_count AS particles,
       d.d10_volume_mm, d.d50_volume_mm, d.d80_volume_mm, p.mean_sphericity, p.grade_vol_pct, p.carriers_pct
FROM samples s
LEFT JOIN d_values d USING (sample_id)
LEFT JOIN (SELECT sample_id,
           avg(sphericity) FILTER (WHERE NOT coalesce(touches_border, false)) AS mean_sphericity,
           {grade}
    FROM particles GROUP BY sample_id) p USING (sample_id)
WHERE s.campaign = '{CAMPAIGN}'
ORDER BY list_position(['feed', 'concentrate', 'tailings'], s.stream)"""


def query_summary(home: Path) -> tuple[str, list[dict[str, Any]]]:
    from ps3d_core import catalog

    columns = catalog.query(home, "SELECT column_name FROM (DESCRIBE particles)", limit=None).table
    sql = summary_sql([str(c) for c in columns.column("column_name").to_pylist()])
    return sql, catalog.query(home, sql, limit=None).table.to_pylist()


def format_table(rows: list[dict[str, Any]], truth: dict[str, dict[str, Any]]) -> str:
    def number(value: Any, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    header = ["sample", "stream", "mass g", "particles", "D10 mm", "D50 mm", "D80 mm", "sphericity",
              "grade vol%", "carriers %", "| truth: particles", "mean diam. mm", "carriers %"]  # fmt: skip
    lines = [header]
    for row in rows:
        t = truth.get(row["sample_id"], {}).get("truth", {})
        lines.append([
            row["sample_id"], row["stream"] or "", number(row["mass_g"], 1), str(row["particles"]),
            number(row["d10_volume_mm"], 3), number(row["d50_volume_mm"], 3), number(row["d80_volume_mm"], 3),
            number(row["mean_sphericity"], 3), number(row["grade_vol_pct"], 2), number(row["carriers_pct"], 1),
            f"| {t.get('particle_count', 'n/a')}",
            number((t.get("whole_particle_diameter") or {}).get("mean_mm"), 3),
            number(100 * t["mineralogy"]["grade"] if t.get("mineralogy") else None, 1),
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("   " + "  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in
                                       enumerate(zip(line, widths))).rstrip() for line in lines)  # fmt: skip


class ServeProcess:
    """``ps3d serve`` as a child process in its own session, its output in ``log``."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._handle = log.open("wb")
        self.process = subprocess.Popen(command, env=env, stdout=self._handle, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self._offset = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def new_lines(self) -> list[str]:
        with self.log.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        return data[:end].decode(errors="replace").splitlines()

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise DemoError(f"`ps3d serve` exited with status {self.process.returncode}; "
                            f"end of {self.log}:\n{self.text()[-3000:]}")  # fmt: skip

    def stop(self, timeout_s: float = 120.0) -> list[int]:
        """SIGTERM, wait; returns the ids of descendants still alive afterwards (then killed)."""
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._handle.close()
        _, alive = psutil.wait_procs(children, timeout=15)
        for process in alive:  # should not happen: reported, then ended
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        return [p.pid for p in alive]


def serve_command(config: DemoConfig, model: Path) -> list[str]:
    command = [sys.executable, "-m", "ps3d", "serve", "--home", str(config.workdir), "--model", str(model),
               "--quiet", str(config.quiet_s), "--rescan", str(config.rescan_s), "--port", str(free_port())]  # fmt: skip
    if config.segment_options:
        command += ["--segment-options", json.dumps(config.segment_options)]
    if config.workers:
        command += ["--workers", str(config.workers)]
    return command


def demo_environment() -> dict[str, str]:
    """The caller's environment without settings that would point the demo at another server, cluster or home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    for name in ("DASK_SCHEDULER_ADDRESS", "PS3D_HOME", "PS3D_MODEL"):
        env.pop(name, None)
    return env


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns timings, the summary rows and the SQL.

    Raises
    ------
    DemoError
        The platform did not start, a scan failed or the demo ran past ``timeout_s``.
    """
    from ps3d_core import catalog
    from ps3d_core.models import DEFAULT_MODEL_DIR, read_metadata
    from ps3d_core.synth import PRESETS

    if config.preset not in PRESETS:
        raise DemoError(f"--preset {config.preset!r}: choose one of {', '.join(PRESETS)}")
    t0 = time.perf_counter()
    deadline = time.monotonic() + config.timeout_s
    home = config.workdir
    model = Path(config.model or DEFAULT_MODEL_DIR).absolute()
    metadata = read_metadata(model)
    prepare_workdir(home)
    inbox = home / "inbox"
    timings: dict[str, float] = {}
    echo(f"ps3d demo: three samples of one campaign through the whole platform (home {home})")
    echo(f"1. Starting the platform: ps3d serve --home {home} (log {home / SERVE_LOG})")
    serve = ServeProcess(serve_command(config, model), demo_environment(), home / SERVE_LOG)
    left_behind: list[int] = []
    try:
        # synthesis overlaps with the server's start-up
        echo(f"2. Synthesizing a feed, its concentrate and its tailings (preset '{config.preset}', seed {config.seed})")
        t = time.perf_counter()
        scans = synthesize_campaign(config.preset, config.seed, home / "synthetic")
        timings["synthesize"] = time.perf_counter() - t
        shape = "x".join(map(str, scans[sample_id("feed")]["truth"]["shape_zyx"]))
        echo(f"   {shape} voxels each, ground truth in {home / 'synthetic' / '_truth'}/ ({timings['synthesize']:.1f} s)")
        while READY_LINE not in serve.text():
            serve.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"the platform did not start in time; see {serve.log}")
            time.sleep(0.3)
        timings["platform_ready"] = time.perf_counter() - t0
        ready = next(line for line in serve.text().splitlines() if READY_LINE in line)
        echo(f"   platform ready after {timings['platform_ready']:.1f} s: {ready.split(': ', 1)[1]}")
        echo(f"   model {metadata.name} {metadata.version} ({model})")

        echo(f"3. Dropping the scans into the inbox {inbox}/ (copied to .staging/, then renamed in)")
        dropped: dict[str, float] = {}
        for name, scan in scans.items():
            drop_into_inbox(scan["path"], inbox)
            dropped[name] = time.monotonic()
        pending = set(scans)
        results: dict[str, dict[str, Any]] = {}
        while pending:
            for line in serve.new_lines():
                match = _SUBMITTED.search(line)
                if match and match.group(1) in scans:
                    echo(f"   watcher: {match.group(1)} ready ({match.group(2)}) -> ingest flow run {match.group(4)}")
            for name in sorted(pending):
                try:
                    row = catalog.get_sample(home, name)
                except catalog.CatalogError:
                    row = None
                if row is None or row["status"] not in ("ingested", "quarantined", "failed"):
                    continue
                pending.discard(name)
                results[name] = row
                after = time.monotonic() - dropped[name]
                if row["status"] != "ingested":
                    raise DemoError(f"{name} was {row['status']}: {row.get('error')} (see {serve.log})")
                echo(f"   {name}: {row['particle_count']} particles stored, {after:.0f} s after the drop")
            if not pending:
                break
            serve.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"still waiting for {', '.join(sorted(pending))} after {config.timeout_s:g} s; "
                                f"see {serve.log}")  # fmt: skip
            time.sleep(1.0)
        timings["ingest_all"] = time.perf_counter() - t0 - timings["platform_ready"]

        echo("4. Per-sample summary, queried with SQL from the particle database:")
        sql, rows = query_summary(home)
        echo(format_table(rows, scans))
        echo("   D-values by volume over particles not cut by the scan border; sphericity of whole particles;")
        echo("   grade = valuable phase in % of particle volume, carriers = % of particles holding over 1 % of it;")
        echo("   truth = the synthetic ground truth (carriers: particles given the valuable mineral).")
        echo("   SQL:\n" + "\n".join("     " + line for line in sql.splitlines()))

        echo("5. Look further (the platform stops now; these read the stored data):")
        echo(f"   ps3d dashboard --home {home}                    # the Streamlit dashboard, http://127.0.0.1:8501")
        echo(f"   ps3d sql --home {home} \"SELECT * FROM d_values\"")
        echo(f"   ps3d serve --home {home} --ui                   # Prefect UI: flow runs, artifacts ingest-demo-*")
    finally:
        echo("6. Shutting down the platform (SIGTERM: watcher, runner, Dask cluster, Prefect server)")
        t = time.perf_counter()
        left_behind = serve.stop()
        timings["shutdown"] = time.perf_counter() - t
        echo(f"   stopped in {timings['shutdown']:.1f} s; "
             + ("no process left behind" if not left_behind else f"ended leftover processes {left_behind}"))  # fmt: skip
    timings["total"] = time.perf_counter() - t0
    echo(f"Demo done in {_minutes(timings['total'])}.")
    return {"home": str(home), "timings": timings, "rows": rows, "sql": sql, "left_behind": left_behind,
            "samples": {name: row for name, row in results.items()}}  # fmt: skip
