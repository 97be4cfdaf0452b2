"""Paths of a platform home, errors, and the file-system primitives of atomic writes."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from pathlib import Path

from ps3d_core.errors import ScanError
from schemas.catalog import (
    CATALOG_FILE,
    LOCK_FILE,
    PARTICLES_DIR,
    SAFE_ID_PATTERN,
    SNAPSHOT_DIR,
    STAGING_DIR,
)

HOME_ENV = "PS3D_HOME"
DEFAULT_HOME = Path("ps3d-data")


class CatalogError(ScanError):
    """The particle database refused or failed an operation (names the file or home)."""


class CatalogLockTimeout(CatalogError):
    """Another process kept the catalog's writer lock longer than the timeout."""


class QueryRefused(CatalogError):
    """An analyst query is not allowed (not a single SELECT, or it reads files) or is invalid SQL."""


class QueryTimeout(CatalogError):
    """An analyst query ran past its time limit and was interrupted."""


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The platform home: ``home`` when given, else ``$PS3D_HOME``, else ``./ps3d-data``; made absolute."""
    if home is None:
        home = os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(home).expanduser().absolute()


def catalog_path(home: Path) -> Path:
    return home / CATALOG_FILE


def snapshot_path(home: Path) -> Path:
    return home / SNAPSHOT_DIR / CATALOG_FILE


def lock_path(home: Path) -> Path:
    return home / LOCK_FILE


def particles_dir(home: Path) -> Path:
    return home / PARTICLES_DIR


def staging_dir(home: Path) -> Path:
    return home / STAGING_DIR


def check_sample_id(sample_id: object, where: str | os.PathLike[str]) -> str:
    """A sample id that is safe as one path component (checked again though scan.json validation did)."""
    if not isinstance(sample_id, str) or not re.fullmatch(SAFE_ID_PATTERN, sample_id) or set(sample_id) == {"."}:
        raise CatalogError(
            where,
            f"sample id {sample_id!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-' "
            "(not only dots); it becomes a directory name",
        )
    return sample_id


def partition_dir(home: Path, sample_id: str) -> Path:
    """``<home>/particles/sample_id=<id>``, refusing any id that would leave that directory."""
    check_sample_id(sample_id, home)
    root = particles_dir(home)
    path = root / f"sample_id={sample_id}"
    if path.parent != root or os.path.normpath(path) != str(path):
        raise CatalogError(home, f"sample id {sample_id!r} would escape {root}")
    return path


def particles_file(home: str | os.PathLike[str] | None, sample_id: str) -> Path | None:
    """The Parquet file currently holding a sample's rows, or None when none is stored."""
    files = sorted(partition_dir(resolve_home(home), sample_id).glob("part-*.parquet"))
    return files[0] if files else None


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (power-loss safety of the renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _load_renameat2():
    global _renameat2
    if _renameat2 is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
            _renameat2 = function
        except (AttributeError, OSError):
            _renameat2 = False
    return _renameat2


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or file system cannot (then nothing moved):
    the caller falls back to two renames, during which the path is briefly absent.
    """
    function = _load_renameat2()
    if not function:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def swap_directories(a: Path, b: Path) -> None:
    """Exchange the contents of directories ``a`` and ``b`` (atomic where the system allows)."""
    if exchange(a, b):
        return
    aside = a.with_name(a.name + ".swap")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
