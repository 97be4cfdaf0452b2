"""Which segmentation model is current: explicit, ``$PS3D_MODEL``, the promoted one, or the shipped default.

Promoted models live in ``<home>/models/<name>-<version>/`` (earlier versions
are kept); ``<home>/models/current.json`` names the current one and is
replaced atomically on promotion, so a flow that starts reads either the old
or the new model, never a mix.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ps3d_core.errors import ScanError
from ps3d_core.io.atomic import write_text_atomic
from ps3d_core.models import DEFAULT_MODEL_DIR, model_fingerprint, read_metadata

MODEL_ENV = "PS3D_MODEL"
MODELS_DIR = "models"
CURRENT_JSON = "current.json"


def models_dir(home: str | os.PathLike[str]) -> Path:
    return Path(home) / MODELS_DIR


def current_record(home: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``<home>/models/current.json`` (path, name, version, promoted_at, reason), or None."""
    path = models_dir(home) / CURRENT_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ScanError(path, f"is not valid JSON: {error}") from None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        raise ScanError(path, 'must hold {"path": "<model folder>", ...}')
    return record


def resolve_model(home: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None) -> Path:
    """The model folder to segment with: ``model_dir``, else ``$PS3D_MODEL``, else the promoted one, else the default."""
    if model_dir:
        return Path(model_dir).absolute()
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV]).absolute()
    record = current_record(home)
    if record is not None:
        path = Path(record["path"])
        return path if path.is_absolute() else (models_dir(home) / path).absolute()
    return DEFAULT_MODEL_DIR.absolute()


def describe_model(folder: str | os.PathLike[str]) -> dict[str, str]:
    """name, version and fingerprint of a model folder (raises ScanError when it is not one)."""
    metadata = read_metadata(folder)
    return {"path": str(Path(folder).absolute()), "name": metadata.name, "version": metadata.version,
            "fingerprint": model_fingerprint(folder)}  # fmt: skip


def promote(home: str | os.PathLike[str], folder: str | os.PathLike[str], reason: str = "") -> dict[str, Any]:
    """Make ``folder`` (under ``<home>/models/``) the current model; returns the new current record."""
    info = describe_model(folder)
    record = info | {"promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": reason}
    root = models_dir(home)
    try:
        record["path"] = str(Path(folder).absolute().relative_to(root.absolute()))
    except ValueError:
        pass  # a folder elsewhere is recorded by its absolute path
    write_text_atomic(root / CURRENT_JSON, json.dumps(record, indent=2) + "\n")
    return record


#: ``<home>/models/retrain.json``: when the platform first ran and when a retraining last completed
#: (``last_completed_at``, ``last_status``, ``last_run_id``); read by the catch-up of missed retrainings.
RETRAIN_STATE_JSON = "retrain.json"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def read_retrain_state(home: str | os.PathLike[str]) -> dict[str, Any]:
    """The retraining state (empty when none or unreadable); ``*_at`` values as aware datetimes."""
    path = models_dir(home) / RETRAIN_STATE_JSON
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: (_parse_time(v) if k.endswith("_at") else v) for k, v in record.items()}


def update_retrain_state(home: str | os.PathLike[str], **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the retraining state (datetimes stored as ISO 8601); returns the new state."""
    state = read_retrain_state(home)
    state.update(fields)
    text = json.dumps({k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in state.items()}, indent=2)
    write_text_atomic(models_dir(home) / RETRAIN_STATE_JSON, text + "\n")
    return state
