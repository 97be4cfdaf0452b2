"""Training: dataset preparation, augmentations, a real few-iteration nnU-Net training, CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ps3d.cli import app
from ps3d_core.bordercore import border_core_to_instances, instances_to_border_core
from ps3d_core.errors import ScanError
from ps3d_core.inference.geometry import resample_nearest, target_shape, zoom_factors
from ps3d_core.intensity import normalize, quantile_levels, sample_voxels
from ps3d_core.io import open_scan, read_image
from ps3d_core.models import IntensityNormalization, load_model
from ps3d_core.synth import synthesize, synthesize_samples
from ps3d_core.training import (
    TrainingCase,
    crop_boxes,
    load_particle_bank,
    mean_equivalent_diameter_voxels,
    pair_scans_with_labels,
    save_particle_bank,
    split_cases,
    training_regions,
    write_raw_dataset,
)
from ps3d_core.training.augment import TouchingParticleTransform, intensity_transforms, paste_touching

runner = CliRunner()


@pytest.fixture(scope="module")
def scans_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-scans")
    synthesize_samples(root, "tiny", 3, 77, workers=1)
    return root


# --------------------------------------------------------------------------
# intensity normalisation
# --------------------------------------------------------------------------


def test_quantile_levels_follow_a_linear_rewindowing():
    scan = synthesize("tiny", 4, workers=1)
    image = scan.image.astype(np.float64)
    offset, scale = quantile_levels(image)
    other = 0.5 * image + 3000.0  # another scanner's export window; zeros stay zero outside the FOV
    other[image == 0] = 0
    offset2, scale2 = quantile_levels(other)
    assert offset2 == pytest.approx(0.5 * offset + 3000.0)
    assert scale2 == pytest.approx(0.5 * scale)
    np.testing.assert_allclose(normalize(other, offset2, scale2), normalize(image, offset, scale), atol=1e-5)


def test_sample_is_bounded_and_the_same_for_arrays_and_volumes():
    from ps3d_core.io import ArrayVolume

    image = np.random.default_rng(0).integers(0, 1000, (70, 300, 300), dtype=np.uint16)
    sample = sample_voxels(image, max_voxels=10_000)
    assert 0 < sample.size <= 10_000
    np.testing.assert_array_equal(sample, sample_voxels(ArrayVolume(image, "mem", (1.0, 1.0, 1.0)), max_voxels=10_000))


def test_quantile_levels_refuse_empty_and_flat_images():
    with pytest.raises(ValueError, match="empty"):
        quantile_levels(np.zeros((8, 8, 8), np.uint16))
    with pytest.raises(ValueError, match="flat"):
        quantile_levels(np.full((8, 8, 8), 7, np.uint16))


def test_normalization_metadata_validation():
    ramp = np.arange(1, 1001.0).reshape(10, 10, 10)
    assert IntensityNormalization(method="quantile", quantiles=(0.5, 0.99)).levels(ramp) == (
        pytest.approx(500.5),
        pytest.approx(990.01 - 500.5),
    )
    assert IntensityNormalization(mean=10.0, std=2.0).levels(None) == (10.0, 2.0)
    with pytest.raises(ValueError, match="needs mean and std"):
        IntensityNormalization(method="zscore")
    with pytest.raises(ValueError, match="quantiles"):
        IntensityNormalization(method="quantile", quantiles=(0.9, 0.5))


# --------------------------------------------------------------------------
# dataset preparation
# --------------------------------------------------------------------------


def test_pairing_scans_with_labels(scans_root, tmp_path):
    cases = pair_scans_with_labels(scans_root, scans_root / "_truth")
    assert [c.scan_dir.name for c in cases] == [f"synth-tiny-s77-00{i}" for i in range(3)]
    assert all(c.labels_path.name == f"{c.scan_dir.name}_labels.tif" for c in cases)
    (tmp_path / "labels").mkdir()
    with pytest.raises(ScanError, match="no label image for scan 'synth-tiny-s77-000'"):
        pair_scans_with_labels(scans_root, tmp_path / "labels")
    with pytest.raises(ScanError, match="holds no scan directory"):
        pair_scans_with_labels(tmp_path / "labels", tmp_path / "labels")


def test_mean_equivalent_diameter():
    labels = np.zeros((40, 40, 40), np.uint32)
    labels[2:10, 2:10, 2:10] = 1  # 512 voxels
    labels[20:24, 20:24, 20:28] = 2  # 128 voxels
    expected = np.mean(np.cbrt(6 * np.array([512, 128]) / np.pi))
    assert mean_equivalent_diameter_voxels(labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no particle"):
        mean_equivalent_diameter_voxels(np.zeros((4, 4, 4), np.uint32))


@pytest.mark.parametrize("shape", [(10, 200, 385), (192, 193, 1)])
def test_crop_boxes_tile_the_volume(shape):
    boxes = crop_boxes(shape, max_edge=96)
    cover = np.zeros(shape, np.int32)
    for box in boxes:
        assert all(s.stop - s.start <= 96 for s in box)
        cover[box] += 1
    assert (cover == 1).all()


def test_training_regions_of_a_large_scan_are_the_centre_and_a_corner():
    rng = np.random.default_rng(3)
    # 2x upsampling of a 256^3 scan: 512 model-grid voxels per axis, 144 source voxels fit 288
    for _ in range(20):
        central, corner = training_regions((256, 256, 256), (2.0, 2.0, 2.0), rng, max_edge=288)
        assert central == (slice(56, 200),) * 3
        assert all(s.stop - s.start == 144 for s in corner)
        assert 0 <= corner[0].start <= 112
        # the corner box reaches the slice plane's edges, where the field of view ends
        assert all(s.start == 0 or s.stop == 256 for s in corner[1:])
    assert training_regions((96, 96, 96), (1.5, 1.5, 1.5), rng, max_edge=288) == [(slice(0, 96),) * 3]


def test_splits_keep_scans_apart():
    crops = {f"scan{i}": [f"case_{i}_0", f"case_{i}_1"] for i in range(7)}
    split = split_cases(list(crops), crops)
    assert sorted(split["train"] + split["val"]) == sorted(c for v in crops.values() for c in v)
    val_scans = {c.split("_")[1] for c in split["val"]}
    assert len(val_scans) == 1 and not {c.split("_")[1] for c in split["train"]} & val_scans
    single = split_cases(["only"], {"only": ["a", "b"]})
    assert single == {"train": ["a", "b"], "val": ["a", "b"]}


def test_raw_dataset(scans_root, tmp_path):
    cases = pair_scans_with_labels(scans_root, scans_root / "_truth")
    normalization = IntensityNormalization(method="quantile", quantiles=(0.5, 0.99))
    info = write_raw_dataset(cases, tmp_path / "raw", normalization, target_particle_size=16, max_crop_edge=64)
    raw = tmp_path / "raw"
    dataset = json.loads((raw / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "core": 1, "border": 2}
    assert dataset["numTraining"] == info["crops"] == len(list((raw / "labelsTr").glob("*.tif")))
    # the first scan's crops reassemble into the border-core of its resampled labels
    first = info["cases"][0]
    labels = read_image(cases[0].labels_path)
    with open_scan(cases[0].scan_dir) as scan:
        meta = scan.metadata
    assert first["particle_size_source"] == "scan.json"
    shape = target_shape(labels.shape, zoom_factors(meta.spacing_zyx_mm, meta.particle_size_mm, 16))
    # a tiny scan fits the model grid whole: one region, every crop kept (blank ones are negatives)
    (region,) = first["regions"]
    assert region["region"] == [[0, 96]] * 3 and tuple(region["target_shape"]) == shape
    expected = instances_to_border_core(resample_nearest(labels, shape), 3)
    boxes = crop_boxes(shape, 64)
    assert len(region["crops"]) == len(boxes)
    for name, box in zip(region["crops"], boxes):
        np.testing.assert_array_equal(read_image(raw / "labelsTr" / f"{name}.tif"), expected[box])
        assert json.loads((raw / "imagesTr" / f"{name}.json").read_text()) == {"spacing": [1.0, 1.0, 1.0]}
        image = read_image(raw / "imagesTr" / f"{name}_0000.tif")
        assert image.dtype == np.float32 and image.shape == expected[box].shape
    assert np.median(read_image(raw / "imagesTr" / f"{region['crops'][0]}_0000.tif")) == pytest.approx(0, abs=0.3)
    split = json.loads((raw / "splits_final.json").read_text())[0]
    crops = [c for case in info["cases"] for r in case["regions"] for c in r["crops"]]
    assert sorted(split["train"] + split["val"]) == sorted(crops)
    bank = load_particle_bank(raw / "particle_bank.npz")
    assert len(bank) == info["bank_particles"] > 0
    assert all(m.any() and i.shape == m.shape for i, m in bank)


def test_labels_of_another_shape_are_refused(scans_root, tmp_path):
    from ps3d_core.io import write_tiff

    bad = tmp_path / "bad_labels.tif"
    write_tiff(bad, np.ones((5, 5, 5), np.uint32))
    case = TrainingCase(scans_root / "synth-tiny-s77-000", bad)
    with pytest.raises(ScanError, match="bad_labels.tif: has shape"):
        write_raw_dataset([case], tmp_path / "raw", IntensityNormalization(method="quantile", quantiles=(0.5, 0.99)),
                          target_particle_size=16)  # fmt: skip


def test_particle_bank_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    particles = [(rng.normal(size=s).astype(np.float16), rng.random(s) > 0.5) for s in [(3, 4, 5), (6, 2, 7)]]
    save_particle_bank(tmp_path / "bank.npz", particles)
    loaded = load_particle_bank(tmp_path / "bank.npz")
    for (image, mask), (image2, mask2) in zip(particles, loaded):
        np.testing.assert_array_equal(image.astype(np.float32), image2)
        np.testing.assert_array_equal(mask, mask2)


# --------------------------------------------------------------------------
# augmentations
# --------------------------------------------------------------------------


def _ball(radius: int) -> np.ndarray:
    grid = np.mgrid[-radius : radius + 1, -radius : radius + 1, -radius : radius + 1]
    return (grid**2).sum(0) <= radius**2


@pytest.mark.parametrize("seed", range(6))
def test_touching_particle_augmentation(seed):
    rng = np.random.default_rng(seed)
    instances = np.zeros((64, 64, 64), np.uint32)
    instances[22:43, 22:43, 22:43][_ball(10)] = 1
    border_core = instances_to_border_core(instances, 3)
    image = np.where(instances > 0, 1.0, 0.0).astype(np.float32)
    particle_mask = np.zeros((13, 15, 11), bool)
    particle_mask[1:12, 2:13, 1:10] = True
    particle_image = np.full(particle_mask.shape, 2.0, np.float32)
    before = border_core.copy()
    assert paste_touching(image, border_core, particle_image, particle_mask, rng)
    pasted = (border_core > 0) & (before == 0)
    # the pasted particle: the whole box (no clipping at this size), intensities copied
    assert pasted.sum() == particle_mask.sum()
    assert (image[pasted] == 2.0).all() and (image[before > 0] == 1.0).all()
    # the original particle is untouched, the pasted one face-touches it
    np.testing.assert_array_equal(border_core[before > 0], before[before > 0])
    grown = np.zeros_like(pasted)
    for axis in range(3):
        grown |= np.roll(pasted, 1, axis) | np.roll(pasted, -1, axis)
    assert (grown & (instances == 1)).any()
    # its own border-core is the box's erosion: two particles come back out of the target
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(pasted))
    np.testing.assert_array_equal(
        border_core[box], instances_to_border_core(np.pad(np.ones(pasted[box].shape, np.uint32), 1), 3)[1:-1, 1:-1, 1:-1]
    )
    assert border_core_to_instances(border_core).max() == 2


def test_touching_augmentation_does_nothing_without_particles():
    image = np.zeros((16, 16, 16), np.float32)
    target = np.zeros((16, 16, 16), np.int16)
    assert not paste_touching(image, target, np.ones((3, 3, 3), np.float32), np.ones((3, 3, 3), bool), np.random.default_rng(0))
    assert not target.any() and not image.any()


def test_touching_transform_on_nnunet_tensors(tmp_path):
    particle = np.zeros((13, 13, 13), bool)
    particle[1:12, 1:12, 1:12] = _ball(5)
    save_particle_bank(tmp_path / "bank.npz", [(np.full((13, 13, 13), 3.0, np.float16), particle)])
    instances = np.zeros((48, 48, 48), np.uint32)
    instances[16:33, 16:33, 16:33][_ball(8)] = 1
    seg = torch.from_numpy(instances_to_border_core(instances, 3).astype(np.int16))[None]
    seg[:, :, :, :2] = -1  # nnU-Net's padding marker
    transform = TouchingParticleTransform(tmp_path / "bank.npz", p=1.0)
    np.random.seed(3)
    out = transform(image=torch.zeros((1, 48, 48, 48)), segmentation=seg.clone())
    assert out["image"].shape == (1, 48, 48, 48) and out["segmentation"].dtype == torch.int16
    assert int((out["image"] == 3.0).sum()) == int(particle.sum())
    assert (out["segmentation"][:, :, :, :2] == -1).all()
    labels = border_core_to_instances(np.clip(out["segmentation"][0].numpy(), 0, None).astype(np.uint8))
    assert labels.max() == 2


def test_intensity_transforms_keep_shape_and_change_values():
    np.random.seed(0)
    torch.manual_seed(0)
    image = torch.randn(1, 32, 32, 32)
    changed = 0
    for transform in intensity_transforms():
        for _ in range(20):
            out = transform(image=image.clone())["image"]
            assert out.shape == image.shape and torch.isfinite(out).all()
            changed += int(not torch.equal(out, image))
    assert changed > 0


# --------------------------------------------------------------------------
# training with nnU-Net, the CLI, and the trained folder in `ps3d segment`
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(scans_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "mini"
    result = runner.invoke(
        app,
        [
            "train", "--scans", str(scans_root), "--labels", str(scans_root / "_truth"), "--out", str(out),
            "--epochs", "2", "--iterations", "3", "--device", "cpu", "--target-size", "16", "--patch", "32",
            "--version", "0.0.1",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_training_writes_a_loadable_model_folder(trained):
    for name in ("plans.json", "dataset.json", "ps3d_model.json", "MODEL_CARD.md", "training.json"):
        assert (trained / name).is_file(), name
    assert not trained.with_name("mini.work").exists()
    checkpoint = torch.load(trained / "fold_0" / "checkpoint_final.pth", weights_only=False, map_location="cpu")
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and set(checkpoint) >= {"network_weights", "init_args"}
    assert "optimizer_state" not in checkpoint
    model = load_model(trained, device="cpu")
    assert model.metadata.name == "mini" and model.metadata.version == "0.0.1"
    assert model.metadata.intensity_normalization.method == "quantile"
    assert model.metadata.target_particle_size_voxels == 16 and model.patch_size == (32, 32, 32)
    # weights shared between nnU-Net's modules are stored once: about 4 bytes per parameter
    size = (trained / "fold_0" / "checkpoint_final.pth").stat().st_size
    assert size < 4 * model.num_parameters * 1.2 + 100_000
    record = json.loads((trained / "training.json").read_text())
    assert len(record["history"]["train_losses"]) == 2
    assert record["dataset"]["scans"] == [f"synth-tiny-s77-00{i}" for i in range(3)]
    assert "2 epochs x 3 iterations" in (trained / "MODEL_CARD.md").read_text()


def test_segment_uses_the_trained_model(trained, scans_root, tmp_path):
    result = runner.invoke(
        app, ["segment", str(scans_root / "synth-tiny-s77-000"), "--out", str(tmp_path / "seg"), "--model", str(trained),
              "--workers", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "seg" / "segment.json").read_text())
    assert record["model"]["name"] == "mini" and record["model"]["version"] == "0.0.1"
    assert read_image(tmp_path / "seg" / "labels.ome.zarr").shape == (96, 96, 96)


def test_fine_tuning_starts_from_the_given_weights(trained, scans_root, tmp_path):
    from ps3d_core.training import TrainingConfig, train_model

    cases = pair_scans_with_labels(scans_root, scans_root / "_truth")[:1]
    config = TrainingConfig(name="mini-ft", version="0.0.2", target_particle_size=16, patch_size=(32, 32, 32),
                            epochs=1, iterations_per_epoch=1, val_iterations_per_epoch=1, initial_lr=1e-9,
                            device="cpu", init_model=str(trained), augmentation_workers=0)  # fmt: skip
    tuned = train_model(cases, tmp_path / "mini-ft", config, log=lambda _: None)
    before = load_model(trained, device="cpu").networks[0].state_dict()
    after = load_model(tuned, device="cpu").networks[0].state_dict()
    # one step at a vanishing learning rate: the weights are the initial model's, not a fresh initialisation
    for key, value in before.items():
        if value.is_floating_point():
            torch.testing.assert_close(after[key], value, atol=1e-4, rtol=0)


class MachineRestart(Exception):
    """The machine running a training goes down."""


def test_an_interrupted_training_resumes_from_its_last_checkpoint(scans_root, tmp_path, monkeypatch):
    from ps3d_core.training import ResumeError, TrainingConfig, train_model
    from ps3d_core.training.trainer import PS3DTrainer

    cases = pair_scans_with_labels(scans_root, scans_root / "_truth")[:1]
    config = TrainingConfig(name="mini-resume", target_particle_size=16, patch_size=(32, 32, 32), epochs=3,
                            iterations_per_epoch=2, val_iterations_per_epoch=1, device="cpu", augmentation_workers=0)  # fmt: skip
    out, work = tmp_path / "mini-resume", tmp_path / "work"
    finish_epoch = PS3DTrainer.on_epoch_end

    def restart_after_the_second_epoch(trainer):
        finish_epoch(trainer)
        if trainer.current_epoch == 2:
            raise MachineRestart

    monkeypatch.setattr(PS3DTrainer, "on_epoch_end", restart_after_the_second_epoch)
    with pytest.raises(MachineRestart):
        train_model(cases, out, config, work_dir=work, log=lambda _: None)
    monkeypatch.undo()
    assert not out.exists()
    saved = torch.load(next(work.rglob("checkpoint_latest.pth")), weights_only=False, map_location="cpu")
    assert saved["current_epoch"] == 2

    with pytest.raises(ResumeError, match=r"other settings \(epochs\)"):
        train_model(cases, out, config.model_copy(update={"epochs": 4}), work_dir=work, resume=True)
    lines = []
    folder = train_model(cases, out, config.model_copy(update={"time_budget_minutes": 30.0}), work_dir=work,
                         resume=True, log=lines.append)  # fmt: skip
    assert any(re.fullmatch(r"resuming from checkpoint_(latest|best)\.pth after epoch 2 of 3", line) for line in lines)
    assert not any(line.startswith("preparing") for line in lines)  # the prepared dataset was reused
    history = json.loads((folder / "training.json").read_text())["history"]
    assert history["train_losses"][:2] == saved["logging"]["train_losses"] and len(history["train_losses"]) == 3
    assert history["iterations_per_epoch"] == [2, 2, 2]
    assert load_model(folder, device="cpu").metadata.name == "mini-resume"
    assert not work.exists()


def test_train_cli_refuses_to_resume_a_run_of_other_settings(scans_root, tmp_path):
    from ps3d_core.training import TrainingConfig
    from ps3d_core.training.run import RUN_CONFIG

    out = tmp_path / "m"
    out.with_name("m.work").mkdir()
    training_data = f"annotated scans from {scans_root} with labels from {scans_root / '_truth'}"  # as the CLI says
    recorded = TrainingConfig(name="m", epochs=3, training_data=training_data).model_dump(mode="json")
    (out.with_name("m.work") / RUN_CONFIG).write_text(json.dumps(recorded))
    result = runner.invoke(app, ["train", "--scans", str(scans_root), "--labels", str(scans_root / "_truth"),
                                 "--out", str(out), "--epochs", "5", "--resume"])  # fmt: skip
    assert result.exit_code == 2
    assert "holds a training run with other settings (epochs)" in result.output
    assert (out.with_name("m.work") / RUN_CONFIG).read_text() == json.dumps(recorded)  # left as it was


def test_train_cli_reports_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["train", "--scans", str(tmp_path / "empty"), "--labels", str(tmp_path / "empty"),
                                 "--out", str(tmp_path / "m")])  # fmt: skip
    assert result.exit_code == 2
    assert "holds no scan directory" in result.output
    result = runner.invoke(app, ["train", "--scans", str(tmp_path), "--labels", str(tmp_path), "--out",
                                 str(tmp_path / "m"), "--normalization", "minmax"])  # fmt: skip
    assert result.exit_code == 2 and "normalization" in result.output
