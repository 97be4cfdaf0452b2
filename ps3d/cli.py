"""``ps3d``: the platform's one command-line entry point.

Each command is a thin layer over ``ps3d_core``: it parses arguments, shows
progress, and turns bad input into one line ``error: <file>: <problem>`` with
exit status 2 instead of a traceback.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from ps3d_core import __version__
from ps3d_core.errors import ScanError

app = typer.Typer(
    name="ps3d",
    help="ParticleSeg3D platform: micro-CT scans of particles -> segmented particles -> particle database.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_BAD_INPUT = 2


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(EXIT_BAD_INPUT)


def reports_bad_input(command: Callable) -> Callable:
    """Turn the platform's input errors and OS errors into one clear line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ScanError as error:
            raise fail(str(error)) from None
        except OSError as error:
            where = error.filename or "(unknown file)"
            raise fail(f"{where}: {error.strerror or error}") from None

    return wrapper


@contextmanager
def progress_bar(description: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr."""
    bar = tqdm(desc=description, unit=unit, total=None, leave=False, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ps3d {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """ParticleSeg3D platform command line."""


@app.command()
@reports_bad_input
def synth(
    out: Annotated[Path, typer.Argument(help="Directory that receives one scan directory per sample, and _truth/.")],
    preset: Annotated[str, typer.Option(help="tiny, small, typical or hard.")] = "tiny",
    samples: Annotated[int, typer.Option(min=1, help="Number of samples.")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Random seed; the same seed gives the same bytes.")] = 0,
    stream: Annotated[
        Optional[str],
        typer.Option(help="feed, concentrate, tailings or other; default: cycle feed, concentrate, tailings."),
    ] = None,
    touching_rate: Annotated[
        Optional[float],
        typer.Option(min=0.0, max=0.5, help="Share of particles touching another (default: drawn per preset)."),
    ] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Processes for the CT simulation.")] = None,
) -> None:
    """Synthesize realistic micro-CT scans of particles with exact ground truth."""
    from ps3d_core import synth as synthesis

    if preset not in synthesis.PRESETS:
        raise fail(f"--preset {preset!r}: choose one of {', '.join(synthesis.PRESETS)}")
    if stream is not None and stream not in ("feed", "concentrate", "tailings", "other"):
        raise fail(f"--stream {stream!r}: choose one of feed, concentrate, tailings, other")
    started = time.perf_counter()
    with progress_bar(f"synth {preset}", "scan") as progress:
        scan_dirs = synthesis.synthesize_samples(
            out, preset, samples, seed, stream=stream, touching_rate=touching_rate, workers=workers, progress=progress
        )
    for scan_dir in scan_dirs:
        typer.echo(str(scan_dir))
    typer.secho(
        f"{len(scan_dirs)} scan(s) in {time.perf_counter() - started:.1f} s; ground truth in {out / '_truth'}",
        err=True,
    )


@app.command()
@reports_bad_input
def validate(
    scan_dir: Annotated[Path, typer.Argument(help="A scan directory (scan.json + image) or an original ParticleSeg3D dataset image.")],
) -> None:
    """Check a scan directory and print what the platform sees (one JSON line)."""
    from ps3d_core.io import open_scan

    scan = open_scan(scan_dir)
    volume = scan.volume
    summary = {
        "path": str(scan.path),
        "sample_id": scan.metadata.sample_id,
        "image": str(volume.path),
        "shape_zyx": list(volume.shape),
        "dtype": str(volume.dtype),
        "spacing_zyx_mm": list(scan.metadata.spacing_zyx_mm),
        "particle_size_mm": scan.metadata.particle_size_mm,
        "stream": scan.metadata.stream.value,
    }
    typer.echo(json.dumps(summary))


@app.command()
@reports_bad_input
def convert(
    scan_dir: Annotated[Path, typer.Argument(help="A scan directory, or an original ParticleSeg3D dataset image.")],
    out: Annotated[Path, typer.Argument(help="Output OME-Zarr directory, e.g. scan.ome.zarr.")],
    chunk: Annotated[int, typer.Option(min=16, help="Chunk edge in voxels.")] = 128,
    check_disk_space: Annotated[
        bool, typer.Option(help="Refuse a scan whose uncompressed size exceeds the free disk space.")
    ] = True,
) -> None:
    """Stream a scan into a chunked, compressed OME-Zarr image (opens in napari)."""
    from ps3d_core.io import convert_to_ome_zarr, open_scan

    scan = open_scan(scan_dir)
    started = time.perf_counter()
    with progress_bar(f"convert {scan.metadata.sample_id}", "slice") as progress:
        result = convert_to_ome_zarr(
            scan, out, chunks=(chunk, chunk, chunk), progress=progress, check_disk_space=check_disk_space
        )
    typer.echo(str(result))
    typer.secho(
        f"{scan.metadata.sample_id}: {'x'.join(map(str, scan.volume.shape))} {scan.volume.dtype} "
        f"in {time.perf_counter() - started:.1f} s",
        err=True,
    )


@app.command()
@reports_bad_input
def export(
    image: Annotated[Path, typer.Argument(help="An OME-Zarr image written by the platform.")],
    out: Annotated[Path, typer.Argument(help="Output multi-page TIFF (z, y, x).")],
) -> None:
    """Stream an OME-Zarr image into a multi-page TIFF for TIFF-based tools."""
    from ps3d_core.io import export_tiff

    with progress_bar(f"export {image.name}", "slice") as progress:
        result = export_tiff(image, out, progress=progress)
    typer.echo(str(result))


@app.command()
@reports_bad_input
def demo(
    workdir: Annotated[Path, typer.Option(help="Home of the demo platform (replaced if it holds a previous demo).")] = Path("ps3d-demo"),
    preset: Annotated[str, typer.Option(help="Synthetic preset of the demo scans (tiny: 96^3 voxels).")] = "tiny",
    seed: Annotated[int, typer.Option(min=0, help="Seed of the campaign's scans.")] = 1,
    model: Annotated[Optional[Path], typer.Option(help="Model folder; default the shipped models/ps3d-default.")] = None,
    segment_options: Annotated[Optional[str], typer.Option(help="JSON of segmentation options, e.g. '{\"device\": \"cuda\"}'.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Workers of the demo's Dask cluster.")] = None,
    timeout: Annotated[float, typer.Option(min=10.0, help="Give up after this many seconds.")] = 900.0,
) -> None:
    """Run the whole platform on three synthetic samples of one campaign, print their summary, stop.

    Starts the platform (`ps3d serve` with its own Prefect server and Dask
    cluster) in WORKDIR, synthesizes a feed, its concentrate and its tailings,
    drops them into the inbox, waits while the watcher has them ingested,
    prints a per-sample summary queried with SQL (particles, D10/D50/D80,
    sphericity, grade) and how to open the dashboard, then shuts everything down.
    """
    from deployments.demo import DemoConfig, DemoError, run_demo

    if model is not None:
        from ps3d_core.models import read_metadata

        read_metadata(model)
    config = DemoConfig(workdir=workdir, preset=preset, seed=seed, model=model, workers=workers, timeout_s=timeout,
                        segment_options=_parse_segment_options(segment_options) or None)  # fmt: skip
    try:
        run_demo(config, echo=typer.echo)
    except DemoError as error:
        raise fail(str(error)) from None


def default_output_dir(sample_id: str, suffix: str = "") -> Path:
    return Path("ps3d-output") / f"{sample_id}{suffix}"


@app.command()
@reports_bad_input
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Predicted instance labels (TIFF or OME-Zarr).")],
    ref: Annotated[Path, typer.Argument(help="Reference instance labels (TIFF or OME-Zarr).")],
) -> None:
    """Score a segmentation against a reference with the paper's metrics (one JSON line).

    f1 (voxel Dice), f1_match, f1_instance, merger_ratio and splitter_ratio,
    with the counts behind them; see ps3d_core.metrics.evaluate for the rules.
    """
    from ps3d_core.metrics import evaluate_files

    typer.echo(json.dumps(evaluate_files(pred, ref)))


@app.command()
@reports_bad_input
def baseline(
    scan_dir: Annotated[Path, typer.Argument(help="A scan directory, or an original ParticleSeg3D dataset image.")],
    out: Annotated[
        Optional[Path], typer.Option(help="Output directory; default ps3d-output/<sample_id>-threshwater/.")
    ] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Grey-value threshold; default Otsu.")] = None,
) -> None:
    """Segment a scan with the classical ThreshWater baseline (threshold, opening, erosion seeds, watershed).

    Writes OUT/labels.ome.zarr and OUT/segment.json, the same format as the
    model's segmentation, so both are evaluated the same way. The particle
    size of scan.json, when given, sets the size-relative parameters.
    """
    import dataclasses

    from ps3d_core.baseline import ThreshWaterParams, threshwater
    from ps3d_core.io import open_scan, write_labels_ome_zarr, write_text_atomic

    with open_scan(scan_dir) as scan:
        metadata = scan.metadata
        started = time.perf_counter()
        image = scan.volume.read(0, scan.volume.shape[0])
        read_seconds = time.perf_counter() - started
    params = ThreshWaterParams(threshold=threshold)
    if metadata.particle_size_mm is not None:
        mean_spacing = sum(metadata.spacing_zyx_mm) / 3
        params = dataclasses.replace(params, particle_radius=metadata.particle_size_mm / mean_spacing / 2)
    started = time.perf_counter()
    labels = threshwater(image, params)
    segment_seconds = time.perf_counter() - started
    out = out or default_output_dir(metadata.sample_id, "-threshwater")
    record = {
        "method": "threshwater",
        "version": __version__,
        "sample_id": metadata.sample_id,
        "scan": str(scan_dir),
        "parameters": params.to_dict(),
        "particle_size_mm": metadata.particle_size_mm,
        "particle_count": int(labels.max()),
        "seconds": {"read": round(read_seconds, 3), "segment": round(segment_seconds, 3)},
    }
    write_labels_ome_zarr(labels, out / "labels.ome.zarr", metadata.spacing_zyx_mm, attributes={"ps3d": record})
    write_text_atomic(out / "segment.json", json.dumps(record, indent=2))
    typer.echo(str(out))
    typer.secho(f"{metadata.sample_id}: {record['particle_count']} particles in {segment_seconds:.1f} s", err=True)


def parse_points(values: list[str], option: str) -> list[tuple[int, int, int]]:
    points = []
    for value in values:
        parts = value.split(",")
        if len(parts) != 3 or not all(part.strip().lstrip("-").isdigit() for part in parts):
            raise fail(f"{option} {value!r}: expected voxel coordinates z,y,x (integers)")
        points.append(tuple(int(part) for part in parts))
    return points


@app.command()
@reports_bad_input
def split(
    labels: Annotated[Path, typer.Argument(help="Instance labels to correct (TIFF or OME-Zarr).")],
    label: Annotated[int, typer.Option(min=1, help="Id of the particle to split.")],
    marker: Annotated[list[str], typer.Option(help="One marker per sub-particle: z,y,x (repeat).")],
    border: Annotated[list[str], typer.Option(help="Vertices z,y,x of the border line drawn between them (repeat).")],
    out: Annotated[Optional[Path], typer.Option(help="Output file; default: replace LABELS.")] = None,
) -> None:
    """Split touching particles that share one label, for preparing training data.

    The particle is divided by a watershed on the geodesic distance to the
    drawn border, seeded by the markers (ParticleSeg3D paper, section 3.1).
    Prints the new particle ids.
    """
    from ps3d_core.annotate import rasterize_polyline, split_particle_file

    markers = parse_points(marker, "--marker")
    vertices = parse_points(border, "--border")
    try:
        new_ids = split_particle_file(labels, out or labels, label, markers, rasterize_polyline(vertices))
    except ValueError as error:
        raise fail(f"{labels}: {error}") from None
    typer.echo(json.dumps({"label": label, "new_labels": new_ids, "out": str(out or labels)}))


def write_label_volume(volume, out: Path, spacing_zyx_mm) -> None:
    """TIFF when OUT ends in .tif/.tiff, else an OME-Zarr label image (needs a voxel size)."""
    from ps3d_core.io import write_labels_ome_zarr, write_tiff

    if out.suffix.lower() in (".tif", ".tiff"):
        write_tiff(out, volume, spacing_zyx_mm)
    elif spacing_zyx_mm is None:
        raise ScanError(out, "an OME-Zarr output needs a voxel size, and the input has none: write a .tif instead")
    else:
        write_labels_ome_zarr(volume, out, spacing_zyx_mm)


@app.command("border-core")
@reports_bad_input
def border_core(
    labels: Annotated[Path, typer.Argument(help="Instance labels (TIFF, OME-Zarr, NIfTI).")],
    out: Annotated[Path, typer.Argument(help="Output: .tif, or an .ome.zarr directory.")],
    thickness: Annotated[int, typer.Option(min=1, help="Border thickness in voxels (ball radius).")] = 3,
) -> None:
    """Turn instance labels into the border-core training target (0 background, 1 core, 2 border)."""
    from ps3d_core.bordercore import instances_to_border_core
    from ps3d_core.io import open_volume

    with open_volume(labels) as volume:
        spacing = volume.spacing_zyx_mm
        result = instances_to_border_core(volume.read(0, volume.shape[0]), thickness)
    write_label_volume(result, out, spacing)
    typer.echo(str(out))


@app.command()
@reports_bad_input
def instances(
    border_core_path: Annotated[Path, typer.Argument(metavar="BORDER_CORE", help="Border-core volume (0/1/2).")],
    out: Annotated[Path, typer.Argument(help="Output: .tif, or an .ome.zarr directory.")],
    min_distance: Annotated[float, typer.Option(help="Small-core filter: distance to the core's border (voxels).")] = 1,
    min_ratio: Annotated[float, typer.Option(help="Small-core filter: share of core voxels that near the border.")] = 0.95,
) -> None:
    """Turn a border-core segmentation into particle instances (uint32 labels)."""
    from ps3d_core.bordercore import border_core_to_instances
    from ps3d_core.io import open_volume

    with open_volume(border_core_path) as volume:
        spacing = volume.spacing_zyx_mm
        result = border_core_to_instances(volume.read(0, volume.shape[0]), min_distance, min_ratio)
    write_label_volume(result, out, spacing)
    typer.secho(f"{int(result.max())} particles", err=True)
    typer.echo(str(out))


@contextmanager
def stage_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback: one tqdm bar per pipeline stage."""
    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(desc=stage, unit="chunk", total=total, leave=False, dynamic_ncols=True)
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


@app.command()
@reports_bad_input
def segment(
    scan_dir: Annotated[Path, typer.Argument(help="A scan directory, or an original ParticleSeg3D dataset image.")],
    out: Annotated[Optional[Path], typer.Option(help="Output directory; default ps3d-output/<sample_id>/.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Model folder; default the shipped models/ps3d-default.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    tta: Annotated[bool, typer.Option(help="Mirroring test-time augmentation (8x slower).")] = False,
    mixed_precision: Annotated[
        bool, typer.Option(help="float16 on CUDA, bfloat16 on CPUs that have it; --no-mixed-precision: float32.")
    ] = True,
    folds: Annotated[Optional[list[int]], typer.Option(help="Folds to ensemble (repeat); default all.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Patches per forward pass.")] = 4,
    chunk_size: Annotated[Optional[int], typer.Option(min=1, help="Chunk edge in resampled voxels (multiple of the patch).")] = None,
    particle_size_mm: Annotated[
        Optional[float], typer.Option(help="Mean particle diameter in mm; overrides scan.json and the estimate.")
    ] = None,
    dask_address: Annotated[
        Optional[str], typer.Option(help="Dask scheduler to run the chunks on; default $DASK_SCHEDULER_ADDRESS, else a local cluster.")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Workers of the local Dask cluster.")] = None,
    keep_work: Annotated[bool, typer.Option(help="Keep the work directory OUT/.work-* (intermediates, task records).")] = False,
) -> None:
    """Segment every particle of a scan: OUT/labels.ome.zarr (uint32) and OUT/segment.json.

    The scan is normalised as the model prescribes, resampled so the mean
    particle has the model's target size, predicted chunk by chunk with
    Gaussian-weighted overlapping patches (chunks overlap by one patch),
    converted from border-core to instances with globally consistent labels,
    and resampled back. An interrupted run resumes from its finished chunks.
    """
    from pydantic import ValidationError

    from deployments.cluster import chunk_executors, dask_client
    from ps3d_core.inference import SegmentParams, run_segmentation
    from ps3d_core.io import open_scan

    try:
        params = SegmentParams(
            model_dir=model,
            folds=tuple(folds) if folds else None,
            device=device,
            tta=tta,
            mixed_precision=mixed_precision,
            batch_size=batch_size,
            chunk_size=chunk_size,
            particle_size_mm=particle_size_mm,
            keep_work=keep_work,
        )
    except ValidationError as error:
        raise fail("; ".join(item["msg"] for item in error.errors())) from None
    with open_scan(scan_dir) as scan:
        sample_id = scan.metadata.sample_id
    out = out or default_output_dir(sample_id)
    with dask_client(dask_address, n_workers=workers) as client, stage_progress() as progress:
        predict_executor, executor = chunk_executors(client)
        record = run_segmentation(
            scan_dir, out, params, predict_executor=predict_executor, executor=executor, progress=progress
        )
    typer.echo(str(out))
    typer.secho(
        f"{sample_id}: {record['particle_count']} particles; particle size {record['particle_size_mm']:.4g} mm "
        f"({record['particle_size_source']})",
        err=True,
    )


@app.command()
@reports_bad_input
def features(
    labels: Annotated[
        Path, typer.Argument(help="Particle labels: labels.ome.zarr from `ps3d segment`, or a TIFF/zarr label volume.")
    ],
    scan_dir: Annotated[Path, typer.Argument(help="The scan directory (scan.json + image) the labels belong to.")],
    out: Annotated[Path, typer.Option(help="Output Parquet file, e.g. particles.parquet (written atomically).")],
    workers: Annotated[
        Optional[int], typer.Option(min=1, help="Threads measuring the particle crops; default all CPUs.")
    ] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Run id written into every row; default a new one.")] = None,
) -> None:
    """Measure every particle: one Parquet row per label (size, shape, grey values, phase fractions).

    Columns and units: schemas/particles.py. Phases come from scan.json's
    grey-value ranges, or are found from the histogram and recorded in the
    file's metadata (ps3d.phases). Prints the output path.
    """
    import os

    from ps3d_core.features import extract_features_from_files, new_run_id, write_features_parquet

    run_id = run_id or new_run_id()
    started = time.perf_counter()
    with stage_progress() as progress:
        result = extract_features_from_files(
            labels, scan_dir, run_id, workers=workers or os.cpu_count() or 1, progress=progress
        )
    write_features_parquet(result, out)
    typer.echo(str(out))
    phases = ", ".join(f"{name} [{low:g}, {high:g})" for name, (low, high) in result.phases.items()) or "none"
    typer.secho(
        f"{result.table.num_rows} particles in {time.perf_counter() - started:.1f} s; run {run_id}; "
        f"phases ({result.phases_source}): {phases}",
        err=True,
    )


@app.command()
@reports_bad_input
def train(
    scans: Annotated[Path, typer.Option(help="Directory of scan directories (each with scan.json and its image).")],
    labels: Annotated[Path, typer.Option(help="Directory of instance label images: <sample_id>_labels.tif or <sample_id>.tif.")],
    out: Annotated[Path, typer.Option(help="Model folder to write, e.g. models/NAME.")],
    epochs: Annotated[int, typer.Option(min=1, help="Epochs of --iterations training steps.")] = 10,
    iterations: Annotated[int, typer.Option(min=1, help="Training steps per epoch.")] = 50,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    init: Annotated[Optional[Path], typer.Option(help="Start from this model folder's weights (fine-tuning).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name; default the folder name.")] = None,
    version: Annotated[str, typer.Option(help="Model version written into ps3d_model.json.")] = "0.1.0",
    target_size: Annotated[float, typer.Option(help="Mean particle diameter on the model grid, voxels.")] = 32.0,
    patch: Annotated[int, typer.Option(help="Patch edge (voxels, divisible by 8).")] = 64,
    normalization: Annotated[str, typer.Option(help="quantile (per scan, robust) or zscore (paper Eq. 1).")] = "quantile",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of the same settings from its last checkpoint.")] = False,
) -> None:
    """Train a border-core model with nnU-Net v2 on annotated scans; writes a self-contained model folder.

    The folder holds plans.json, dataset.json, fold_0/checkpoint_final.pth
    (weights only), ps3d_model.json and MODEL_CARD.md; `ps3d segment --model`
    uses it. With --init the training starts from an existing model; with
    --resume a run stopped early (its work folder OUT.work is kept) continues.
    """
    from pydantic import ValidationError

    from ps3d_core.training import ResumeError, TrainingConfig, pair_scans_with_labels, train_model

    if init is not None:
        from ps3d_core.models import read_metadata

        read_metadata(init)
    try:
        config = TrainingConfig(
            name=name or out.name,
            version=version,
            epochs=epochs,
            iterations_per_epoch=iterations,
            device=device,
            init_model=str(init) if init is not None else None,
            target_particle_size=target_size,
            patch_size=(patch, patch, patch),
            normalization=normalization,
            training_data=f"annotated scans from {scans} with labels from {labels}",
        )
    except ValidationError as error:
        raise fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())) from None
    try:
        folder = train_model(pair_scans_with_labels(scans, labels), out, config, resume=resume,
                             log=lambda line: typer.echo(line, err=True))  # fmt: skip
    except ResumeError as error:
        raise fail(str(error)) from None
    typer.echo(str(folder))


@app.command("evaluate-model")
@reports_bad_input
def evaluate_model_command(
    model: Annotated[Optional[Path], typer.Argument(help="Model folder; default the shipped models/ps3d-default.")] = None,
    preset: Annotated[str, typer.Option(help="Synthetic preset of the held-out scans.")] = "typical",
    samples: Annotated[int, typer.Option(min=1, help="Number of held-out scans.")] = 4,
    seed: Annotated[int, typer.Option(help="Batch seed of the held-out scans (training uses 2000-2999).")] = 1000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the full results here.")] = None,
) -> None:
    """Score a model and ThreshWater on held-out synthetic scans with the paper's five metrics."""
    from ps3d_core.io import write_text_atomic
    from ps3d_core.training import evaluate_model
    from ps3d_core.training.evaluate import METRICS

    if model is not None:
        from ps3d_core.models import read_metadata

        read_metadata(model)
    result = evaluate_model(model, preset=preset, samples=samples, seed=seed, device=device,
                            progress=lambda line: typer.echo(line, err=True))  # fmt: skip
    header = "scan                        method       " + " ".join(f"{k:>14s}" for k in METRICS)
    typer.echo(header)
    rows = [(s["sample_id"], s) for s in result["scans"]] + [("mean", result["mean"])]
    for name, entry in rows:
        for method in ("model", "threshwater"):
            typer.echo(f"{name:28s}{method:13s}" + " ".join(f"{entry[method][k]:14.4f}" for k in METRICS))
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result, indent=1))


HOME_HELP = "Platform home (particle database); default $PS3D_HOME, else ./ps3d-data."


def format_text_table(table, max_width: int = 40) -> str:
    """A pyarrow table as aligned text columns (floats to 6 significant digits)."""

    def cell(value) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, float):
            return f"{value:.6g}"
        text = str(value) if not isinstance(value, (dict, list)) else json.dumps(value, default=str)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    names = table.column_names
    rows = [[cell(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)]
    numeric = [str(t).startswith(("int", "uint", "double", "float", "decimal")) for t in table.schema.types]

    def line(values) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(names), line(["-" * w for w in widths]), *(line(r) for r in rows)])


@app.command()
@reports_bad_input
def sql(
    statement: Annotated[str, typer.Argument(metavar="SQL", help="One SELECT over samples, runs, particles, psd, d_values, size_classes.")],
    format: Annotated[str, typer.Option("--format", help="table, csv, json (one object per line) or parquet (needs --out).")] = "table",
    out: Annotated[Optional[Path], typer.Option(help="Write the rows to this file (atomically) instead of stdout.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Most rows returned; 0: no limit.")] = 10_000,
    timeout: Annotated[float, typer.Option(min=0.0, help="Stop the query after this many seconds; 0: no limit.")] = 30.0,
    home: Annotated[Optional[Path], typer.Option(help=HOME_HELP)] = None,
) -> None:
    """Query the particle database with read-only SQL (no file or network access; row and time limits).

    Tables: samples, runs, schema_version. Views: particles (every particle,
    all samples), psd (cumulative % passing by number and volume), d_values
    (D10/D50/D80), size_classes (sqrt(2) series with phase grades).
    Example: ps3d sql "SELECT * FROM d_values"
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from ps3d_core import catalog
    from ps3d_core.io import atomic_output

    formats = ("table", "csv", "json", "parquet")
    if format not in formats:
        raise fail(f"--format {format!r}: choose one of {', '.join(formats)}")
    if format == "parquet" and out is None:
        raise fail("--format parquet needs --out FILE")
    result = catalog.query(home, statement, limit=limit or None, timeout_s=timeout or None)
    table = result.table

    def render() -> str:
        if format == "table":
            return format_text_table(table) + "\n"
        if format == "json":
            return "".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist())
        import io

        buffer = io.BytesIO()
        pacsv.write_csv(table, buffer)
        return buffer.getvalue().decode()

    if out is not None:
        with atomic_output(out) as temporary:
            if format == "parquet":
                pq.write_table(table, temporary)
            else:
                temporary.write_text(render(), encoding="utf-8")
        typer.echo(str(out))
    else:
        typer.echo(render(), nl=False)
    note = f" (stopped at --limit {limit}; raise it or use 0 for all)" if result.truncated else ""
    typer.secho(f"{table.num_rows} row(s) in {result.seconds:.2f} s{note}", err=True)


@app.command()
@reports_bad_input
def dashboard(
    home: Annotated[Optional[Path], typer.Option(help=HOME_HELP)] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8501,
    address: Annotated[str, typer.Option(help="Address to bind: 127.0.0.1 keeps the dashboard on this machine; 0.0.0.0 serves every network, without authentication.")] = "127.0.0.1",
) -> None:
    """Serve the Streamlit dashboard on the particle database (read-only): Overview, Size, Shape,
    Composition, Process, Particle explorer, SQL. Ctrl-C stops it."""
    import os
    import sys

    import dashboards
    from ps3d_core import catalog

    home_path = catalog.resolve_home(home)
    script = Path(dashboards.__file__).resolve().parent / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(script), "--server.address", address, "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--global.developmentMode", "false", "--client.toolbarMode", "minimal",
    ]  # fmt: skip
    typer.secho(f"dashboard of {home_path} on http://{address}:{port} (Ctrl-C stops it)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # replace this process: signals (Ctrl-C, SIGTERM from a service manager) reach Streamlit, nothing is orphaned
    os.execve(sys.executable, command, {**os.environ, catalog.HOME_ENV: str(home_path)})


@app.command()
@reports_bad_input
def store(
    scan_dir: Annotated[Path, typer.Argument(help="The scan directory (or its scan.json) the particles were measured on.")],
    particles: Annotated[Path, typer.Argument(help="Particle Parquet file written by `ps3d features`.")],
    segment_json: Annotated[
        Optional[Path], typer.Option("--segment", help="segment.json of the segmentation: model and particle size used.")
    ] = None,
    home: Annotated[Optional[Path], typer.Option(help=HOME_HELP)] = None,
    lock_timeout: Annotated[float, typer.Option(min=0.0, help="Seconds to wait for another writer.")] = 60.0,
) -> None:
    """Register a sample's particles in the particle database (replaces the sample's earlier rows).

    Phases come from the file's metadata (ps3d.phases); the model and the
    particle size from --segment, else the particle size from scan.json.
    Prints one JSON line: sample, run, particle count, stored file.
    """
    import datetime as dt
    import socket
    import uuid

    import duckdb
    import pyarrow as pa

    from ps3d_core import catalog
    from ps3d_core.inbox import fingerprint as scan_fingerprint
    from schemas.scan import load_scan_metadata

    metadata = load_scan_metadata(scan_dir)
    table, phases, phases_source = catalog.read_particles_file(particles)
    size_mm, size_source = metadata.particle_size_mm, "scan.json" if metadata.particle_size_mm is not None else None
    model_name = model_version = None
    timings = {}
    if segment_json is not None:
        try:
            record = json.loads(segment_json.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise fail(f"{segment_json}: is not valid JSON: {error.msg}") from None
        model = record.get("model")
        if isinstance(model, dict):
            model_name, model_version = model.get("name"), model.get("version")
        elif record.get("method"):
            model_name, model_version = record["method"], record.get("version")
        if record.get("particle_size_mm") is not None:
            size_mm, size_source = float(record["particle_size_mm"]), record.get("particle_size_source") or size_source
        timings = {k: float(v) for k, v in (record.get("timings_s") or record.get("seconds") or {}).items()}
    run_ids = [r for r in set(table.column("run_id").to_pylist()) if r is not None] if "run_id" in table.column_names else []
    now = dt.datetime.now(dt.timezone.utc)
    run_id = run_ids[0] if len(run_ids) == 1 else f"store-{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    run = {
        "run_id": run_id,
        "sample_id": metadata.sample_id,
        "status": "succeeded",
        "started_at": now,
        "finished_at": now,
        "parameters": {"command": "ps3d store", "scan": str(scan_dir), "particles": str(particles),
                       "segment": str(segment_json) if segment_json else None},
        "timings": timings,
        "versions": {"ps3d": __version__, "duckdb": duckdb.__version__, "pyarrow": pa.__version__},
        "host": socket.gethostname(),
    }  # fmt: skip
    summary = catalog.store_sample(
        home, metadata, table, run,
        phases=phases, phases_source=phases_source,
        particle_size_mm=size_mm, particle_size_source=size_source,
        model_name=model_name, model_version=model_version,
        fingerprint=scan_fingerprint(scan_dir if scan_dir.is_dir() else scan_dir.parent),
        lock_timeout_s=lock_timeout,
    )  # fmt: skip
    typer.echo(json.dumps(summary))


def _parse_segment_options(text: Optional[str], option: str = "--segment-options") -> dict:
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise fail(f"{option}: not valid JSON: {error.msg}") from None
    if not isinstance(options, dict):
        raise fail(f"{option}: expected a JSON object such as '{{\"device\": \"cuda\"}}'")
    return options


@app.command()
@reports_bad_input
def serve(
    inbox: Annotated[Optional[Path], typer.Option(help="Directory watched for scans; default <home>/inbox.")] = None,
    home: Annotated[Optional[Path], typer.Option(help=HOME_HELP)] = None,
    watch: Annotated[bool, typer.Option(help="Run the inbox watcher (--no-watch: only serve the deployments).")] = True,
    quiet: Annotated[float, typer.Option(min=0.0, help="Seconds a scan without _SCAN_COMPLETE must stay unchanged.")] = 30.0,
    rescan: Annotated[float, typer.Option(min=0.5, help="Seconds between full rescans of the inbox.")] = 30.0,
    poll: Annotated[bool, typer.Option(help="Poll the inbox instead of file events (NFS/SMB mounts).")] = False,
    model: Annotated[Optional[Path], typer.Option(help="Model folder; default $PS3D_MODEL, else the promoted one, else the shipped default.")] = None,
    segment_options: Annotated[Optional[str], typer.Option(help="JSON of segmentation options, e.g. '{\"device\": \"cuda\"}'.")] = None,
    ingest_concurrency: Annotated[int, typer.Option(min=1, help="Scans ingested at the same time.")] = 1,
    retrain_cron: Annotated[str, typer.Option(help="Cron schedule of the retraining (default Sundays 03:00).")] = "0 3 * * 0",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule, e.g. Europe/Berlin.")] = "UTC",
    retrain_parameters: Annotated[Optional[str], typer.Option(help="JSON of retrain flow parameters, e.g. '{\"epochs\": 50, \"device\": \"cuda\"}'.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Workers of the local Dask cluster.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port of the local Prefect server; default 4200, else a free one.")] = None,
    ui: Annotated[bool, typer.Option(help="Serve the Prefect web UI too.")] = False,
) -> None:
    """Run the platform: Prefect server, Dask cluster, deployments and the inbox watcher (Ctrl-C stops all).

    Starts a local Prefect server (SQLite under <home>/prefect) unless
    PREFECT_API_URL points at one, a Dask LocalCluster unless
    DASK_SCHEDULER_ADDRESS points at a cluster, and serves the deployments
    ingest-scan/ingest, retrain/weekly, resegment/all and evaluate/current.
    """
    import logging
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from deployments.platform import PlatformConfig, run_platform
    from ps3d_core import catalog

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise fail(f"--timezone {timezone!r}: not a known time zone (e.g. UTC, Europe/Berlin)") from None
    if model is not None:
        from ps3d_core.models import read_metadata

        read_metadata(model)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = PlatformConfig(
        home=catalog.resolve_home(home), inbox=inbox, watch=watch, quiet_s=quiet, rescan_s=rescan, poll=poll,
        model_dir=str(model) if model else None, segment_options=_parse_segment_options(segment_options),
        ingest_concurrency=ingest_concurrency, retrain_cron=retrain_cron, timezone=timezone,
        retrain_parameters=_parse_segment_options(retrain_parameters, "--retrain-parameters"),
        dask_workers=workers, port=port, ui=ui,
    )  # fmt: skip
    run_platform(config)


@app.command()
@reports_bad_input
def watch(
    inbox: Annotated[Optional[Path], typer.Argument(help="Directory watched for scans; default <home>/inbox.")] = None,
    home: Annotated[Optional[Path], typer.Option(help=HOME_HELP)] = None,
    quiet: Annotated[float, typer.Option(min=0.0, help="Seconds a scan without _SCAN_COMPLETE must stay unchanged.")] = 30.0,
    rescan: Annotated[float, typer.Option(min=0.5, help="Seconds between full rescans of the inbox.")] = 30.0,
    poll: Annotated[bool, typer.Option(help="Poll the inbox instead of file events (NFS/SMB mounts).")] = False,
    deployment: Annotated[str, typer.Option(help="Deployment each ready scan triggers.")] = "ingest-scan/ingest",
) -> None:
    """Watch an inbox and trigger the ingest deployment once per ready scan and content.

    Needs a Prefect server serving the deployment: PREFECT_API_URL, else the
    one `ps3d serve` runs for this home (<home>/platform.json).
    """
    import logging
    import os

    from deployments.server import api_healthy
    from ps3d_core import catalog

    home_path = catalog.resolve_home(home)
    if not os.environ.get("PREFECT_API_URL"):
        record_path = home_path / "platform.json"
        url = json.loads(record_path.read_text())["api_url"] if record_path.is_file() else None
        if not url:
            raise fail(f"{record_path}: no running `ps3d serve` for this home; start it or set PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
    if not api_healthy(os.environ["PREFECT_API_URL"]):
        raise fail(f"{os.environ['PREFECT_API_URL']}: the Prefect server does not answer")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from deployments.watcher import watch_inbox_forever

    watch_inbox_forever(inbox or home_path / "inbox", quiet_s=quiet, rescan_s=rescan, poll=poll, deployment=deployment)
