"""Which scan directory a ``sample_id`` belongs to, when two directories claim it.

A sample id belongs to one scan directory, identified by its directory name
(an instrument writes ``<inbox>/<name>/scan.json``). Two directories may claim
the same id (a copied scan, a typo in ``scan.json``); the rule that decides
must not depend on which one arrived or was looked at first, since the
watcher, the runner and the file system order things differently each time:

1. a sample already stored from a directory (the archive's ``source.json``
   records the original path) belongs to that directory;
2. otherwise, among the directories of the inbox that claim the id, the one
   whose name sorts first wins.

Every other claimant loses (the ingest flow quarantines it, naming the
winner). :func:`claim_winner` is the rule, pure; :func:`claimants` reads the
claims of an inbox.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from schemas.scan import SCAN_JSON


def claim_winner(scan_name: str, claimants: Iterable[str], stored_from: str | None = None) -> str:
    """The directory name that owns the sample id ``scan_name`` claims.

    Parameters
    ----------
    scan_name : str
        The directory being ingested.
    claimants : iterable of str
        Names of the other directories in the inbox claiming the same sample id
        (``scan_name`` may be among them).
    stored_from : str, optional
        Name of the directory the sample was stored from, if it is stored.

    Returns
    -------
    str
        ``stored_from`` when given, else the smallest name of ``scan_name`` and
        ``claimants``; the scan wins when this is ``scan_name``.
    """
    if stored_from:
        return stored_from
    return min({scan_name, *claimants})


def _claimed_id(scan_dir: Path) -> str | None:
    """The ``sample_id`` of a directory's ``scan.json`` (None when it has none or cannot be read)."""
    try:
        value = json.loads((scan_dir / SCAN_JSON).read_text(encoding="utf-8")).get("sample_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def claimants(inbox: str | os.PathLike[str], sample_id: str) -> list[str]:
    """Names of the inbox's scan directories whose ``scan.json`` claims ``sample_id``, sorted.

    Hidden names and names starting with ``_`` are not scans (as in
    :func:`ps3d_core.inbox.list_scans`); an unreadable ``scan.json`` claims nothing.
    """
    from ps3d_core.inbox import list_scans

    return sorted(p.name for p in list_scans(inbox).scans if _claimed_id(p) == sample_id)
