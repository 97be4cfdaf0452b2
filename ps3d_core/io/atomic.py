"""Write to a temporary place, then rename: readers never see half a file.

A crash, a full disk or Ctrl-C during a write leaves the previous version of
the target untouched (or no target at all) and removes the partial output.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path of ``target``; move it onto ``target`` on success.

    Works for files and for directories (zarr stores). The temporary path is
    in the same directory, so the final ``rename`` does not cross filesystems.
    An existing ``target`` is replaced only after the new one is complete: a
    directory target is first renamed aside, then deleted.

    Parameters
    ----------
    target : path
        The final file or directory.

    Yields
    ------
    Path
        Where to write. Nothing exists there yet.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    temporary = target.with_name(f".{target.name}.partial-{token}")
    try:
        yield temporary
    except BaseException:
        _remove(temporary)
        raise
    if not temporary.exists():
        raise FileNotFoundError(f"{temporary}: nothing was written for {target}")
    if target.is_dir() and not target.is_symlink():
        replace_directory(temporary, target)
    else:
        os.replace(temporary, target)


def replace_directory(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move directory ``source`` onto ``target`` on the same file system, replacing an existing one.

    The old ``target`` is renamed aside first and deleted only after
    ``source`` took its place, so ``target`` is never half of either.
    """
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        aside = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.replace(target, aside)
        os.replace(source, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(source, target)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write a small text file (JSON records) so readers see the old or the new one, never half."""
    with atomic_output(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(target)
