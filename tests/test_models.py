"""Model folders (ps3d_core.models): round trip, nnU-Net compatibility, every loading error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ps3d_core.errors import ScanError
from ps3d_core.models import (
    DEFAULT_MODEL_DIR,
    ModelMetadata,
    build_network,
    load_model,
    make_dataset_json,
    make_plans,
    model_fingerprint,
    model_version,
    read_metadata,
    save_model_folder,
)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A writable copy of the tiny model folder."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def test_load_tiny_model(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert model.folds == (0, 1)
    assert len(model.networks) == 2
    assert all(not n.training for n in model.networks)
    assert model.patch_size == (32, 32, 32)
    assert model.mirroring_axes == (0, 1, 2)
    assert model.num_input_channels == 1
    assert model.device == torch.device("cpu")
    assert model.metadata.target_particle_size_voxels == 16
    assert model.metadata.border_thickness == 3
    assert model.metadata.intensity_normalization.method == "zscore"
    assert model_version(tiny_model_dir) == "0.0.1-test"
    assert read_metadata(tiny_model_dir) == model.metadata
    one = load_model(tiny_model_dir, folds=[1])
    assert one.folds == (1,) and len(one.networks) == 1
    # fold 1 is fold 0 trained further: different weights
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y0, y1 = (n(x) for n in model.networks)
        assert y0.shape == (1, 3, 32, 32, 32)
        assert not torch.equal(y0, y1)
        assert torch.equal(one.networks[0](x), y1)


def test_save_round_trip(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    weights = {f: n.state_dict() for f, n in zip(model.folds, model.networks)}
    meta = model.metadata.model_copy(update={"version": "2.0"})
    out = save_model_folder(tmp_path / "again", model.plans, model.dataset_json, weights, meta)
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json",
        "fold_0",
        "fold_1",
        "plans.json",
        "ps3d_model.json",
    ]
    ckpt = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert ckpt["trainer_name"] == "nnUNetTrainer"
    assert ckpt["init_args"]["configuration"] == "3d_fullres"
    assert tuple(ckpt["inference_allowed_mirroring_axes"]) == (0, 1, 2)
    again = load_model(out)
    assert again.metadata == meta and model_version(out) == "2.0"
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for a, b in zip(model.networks, again.networks):
            assert torch.equal(a(x), b(x))
    # replacing an existing folder is atomic and complete; a different fingerprint afterwards
    fp = model_fingerprint(out)
    save_model_folder(out, model.plans, model.dataset_json, {0: weights[0]}, meta.model_copy(update={"folds": (0,)}))
    assert load_model(out).folds == (0,) and not (out / "fold_1").exists()
    assert model_fingerprint(out) != fp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_refuses_inconsistent_input(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, folds=[0])
    weights = model.networks[0].state_dict()
    with pytest.raises(ValueError, match="fold_weights has folds"):
        save_model_folder(tmp_path / "m", model.plans, model.dataset_json, {0: weights}, model.metadata)
    other = make_plans(patch_size=(32, 32, 32), features_per_stage=(4, 8, 16))
    with pytest.raises(ValueError, match="do not fit"):
        save_model_folder(
            tmp_path / "m", other, model.dataset_json, {0: weights, 1: weights}, model.metadata
        )
    assert not (tmp_path / "m").exists()


def test_nnunet_loads_the_folder(tiny_model_dir):
    """nnU-Net's own loader accepts the folder (trainer nnUNetTrainer) and builds the same network."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False, verbose=False)
    pred.initialize_from_trained_model_folder(str(tiny_model_dir), use_folds=(0, 1))
    assert pred.configuration_manager.patch_size == [32, 32, 32]
    assert tuple(pred.allowed_mirroring_axes) == (0, 1, 2)
    ours = load_model(tiny_model_dir)
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for params, net in zip(pred.list_of_parameters, ours.networks):
            pred.network.load_state_dict(params)
            pred.network.eval()
            assert torch.equal(pred.network(x), net(x))


def test_make_plans_is_valid_nnunet():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = make_plans(patch_size=(64, 64, 64), features_per_stage=(16, 32, 64, 128))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    assert cm.patch_size == [64, 64, 64]
    assert cm.normalization_schemes == ["NoNormalization"]
    assert cm.network_arch_class_name.endswith("PlainConvUNet")
    assert pm.get_label_manager(make_dataset_json()).num_segmentation_heads == 3
    net = build_network(plans, "3d_fullres", make_dataset_json())
    n_params = sum(p.numel() for p in net.parameters())
    assert 1_300_000 < n_params < 1_500_000  # the notes' "small" 16-128 network: 1.4 M
    with pytest.raises(ValueError, match="divisible"):
        make_plans(patch_size=(60, 64, 64), features_per_stage=(16, 32, 64, 128))


# --------------------------------------------------------------------------
# loading errors: each names the file
# --------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(ScanError, match="does not exist") as info:
        load_model(tmp_path / "nope")
    assert info.value.path == str(tmp_path / "nope")


def test_missing_default_model_says_how_to_recreate_it(monkeypatch, tmp_path):
    import ps3d_core.models as models

    monkeypatch.setattr(models, "DEFAULT_MODEL_DIR", tmp_path / "models" / "ps3d-default")
    with pytest.raises(ScanError, match="default model folder is missing.*train_default_model.py"):
        models.load_model()
    assert DEFAULT_MODEL_DIR.name == "ps3d-default" and DEFAULT_MODEL_DIR.parent.name == "models"


@pytest.mark.parametrize("name", ["plans.json", "dataset.json", "ps3d_model.json"])
def test_missing_file(model_copy, name):
    (model_copy / name).unlink()
    with pytest.raises(ScanError, match="missing") as info:
        load_model(model_copy)
    assert info.value.path == str(model_copy / name)


def test_invalid_metadata(model_copy):
    _edit_json(model_copy / "ps3d_model.json", lambda d: d.update(intensity_normalization={"method": "minmax"}))
    with pytest.raises(ScanError, match="intensity_normalization") as info:
        load_model(model_copy)
    assert info.value.path == str(model_copy / "ps3d_model.json")
    (model_copy / "ps3d_model.json").write_text("{not json")
    with pytest.raises(ScanError, match="not valid JSON"):
        load_model(model_copy)


def test_patch_size_mismatch(model_copy):
    _edit_json(model_copy / "ps3d_model.json", lambda d: d.update(patch_size=[64, 64, 64]))
    with pytest.raises(ScanError, match="differs from plans.json"):
        load_model(model_copy)


def test_unknown_configuration(model_copy):
    _edit_json(model_copy / "ps3d_model.json", lambda d: d.update(configuration="2d"))
    with pytest.raises(ScanError, match="no usable configuration '2d'") as info:
        load_model(model_copy)
    assert info.value.path == str(model_copy / "plans.json")


def test_missing_fold(model_copy):
    with pytest.raises(ScanError, match=r"fold 3 is not in the model \(found \['fold_0', 'fold_1'\]\)") as info:
        load_model(model_copy, folds=[3])
    assert info.value.path == str(model_copy / "fold_3")
    (model_copy / "fold_1" / "checkpoint_final.pth").unlink()
    with pytest.raises(ScanError, match="missing") as info:
        load_model(model_copy)
    assert info.value.path == str(model_copy / "fold_1" / "checkpoint_final.pth")


def test_checkpoint_that_does_not_fit(model_copy):
    plans = make_plans(patch_size=(32, 32, 32), features_per_stage=(4, 8, 16))
    small = build_network(plans, "3d_fullres", make_dataset_json())
    path = model_copy / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt["network_weights"] = small.state_dict()
    torch.save(ckpt, path)
    with pytest.raises(ScanError, match="does not load into the network of plans.json") as info:
        load_model(model_copy)
    assert info.value.path == str(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ScanError, match="not a readable PyTorch checkpoint"):
        load_model(model_copy)


def test_wrong_class_count(model_copy):
    _edit_json(model_copy / "dataset.json", lambda d: d["labels"].update(extra=3))
    with pytest.raises(ScanError, match="declares 4 classes") as info:
        load_model(model_copy)
    assert info.value.path == str(model_copy / "dataset.json")
    _edit_json(model_copy / "dataset.json", lambda d: d.update(labels={"background": 0, "border": 1, "core": 2}))
    with pytest.raises(ScanError, match="background 0, core 1, border 2"):
        load_model(model_copy)


def test_multichannel_model_is_refused(model_copy):
    _edit_json(model_copy / "dataset.json", lambda d: d.update(channel_names={"0": "noNorm", "1": "noNorm"}))
    with pytest.raises(ScanError, match="expects 2 input channels"):
        load_model(model_copy)


def test_unsupported_architecture(model_copy):
    def primus(d):
        d["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = (
            "dynamic_network_architectures.architectures.primus.Primus"
        )

    _edit_json(model_copy / "plans.json", primus)
    with pytest.raises(ScanError, match="supported are PlainConvUNet"):
        load_model(model_copy)


def test_metadata_validation():
    base = dict(
        name="m",
        version="1",
        configuration="3d_fullres",
        intensity_normalization={"mean": 1.0, "std": 2.0},
        patch_size=(32, 32, 32),
        folds=(1, 0),
        created_at="2026-01-01T00:00:00Z",
    )
    meta = ModelMetadata(**base)
    assert meta.folds == (0, 1) and meta.target_particle_size_voxels == 60 and meta.border_thickness == 3
    for bad in (
        {"folds": (0, 0)},
        {"created_at": "2026-01-01T00:00:00"},
        {"intensity_normalization": {"mean": 0, "std": 0}},
        {"name": "a/b"},
        {"unknown": 1},
    ):
        with pytest.raises(ValueError):
            ModelMetadata(**(base | bad))


def test_no_timm_or_torchvision_import(tiny_model_dir):
    code = (
        "import sys, torch\n"
        "from ps3d_core.models import load_model\n"
        "import ps3d_core.inference as inf\n"
        f"m = load_model({str(tiny_model_dir)!r})\n"
        "p = inf.PatchPredictor(m.networks, 'cpu', m.mirroring_axes)\n"
        "p(torch.zeros(1, 1, 32, 32, 32))\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('timm', 'torchvision', 'prefect', 'dask', 'streamlit')]\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
