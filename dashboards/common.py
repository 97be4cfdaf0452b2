"""What every dashboard page shares: the home, cached read-only queries, the sample selection, captions.

Queries run on a new read-only connection to the catalog's snapshot
(:func:`ps3d_core.catalog.connect_readonly`), which writers never block, and
their (small, aggregated) results are cached per snapshot version: a store
publishes a new snapshot, so a new ingestion shows at the next rerun.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import streamlit as st

from dashboards import queries
from ps3d_core import catalog
from ps3d_core.catalog._common import particles_dir, snapshot_path

SELECTION_KEY = "ps3d_selected_samples"
ATTEMPTS = 5


def home() -> Path:
    """The platform home: ``$PS3D_HOME``, else ``./ps3d-data`` (``ps3d dashboard --home`` sets the variable)."""
    return catalog.resolve_home(None)


def snapshot_version(home_path: Path) -> tuple[int, int, int] | None:
    """Identity of the published snapshot (inode, size, mtime): changes with every write."""
    try:
        stat = snapshot_path(home_path).stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _run(home_path: str, name: str, kwargs: dict[str, Any]) -> Any:
    function = getattr(queries, name)
    for attempt in range(ATTEMPTS):
        connection = catalog.connect_readonly(home_path)
        try:
            return function(connection, **kwargs)
        except duckdb.IOException as error:
            # a sample stored again between planning and reading: its old file vanished; run again
            if str(particles_dir(Path(home_path))) not in str(error) or attempt == ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
        finally:
            connection.close()
    raise AssertionError("unreachable")


@st.cache_data(ttl=3600, max_entries=512, show_spinner=False)
def _cached(home_path: str, version: tuple[int, int, int] | None, name: str, kwargs: dict[str, Any]) -> Any:
    return _run(home_path, name, kwargs)


def load(name: str, **kwargs: Any) -> Any:
    """``dashboards.queries.<name>(connection, **kwargs)``, cached for the current snapshot."""
    home_path = home()
    return _cached(str(home_path), snapshot_version(home_path), name, kwargs)


def has_catalog() -> bool:
    return snapshot_version(home()) is not None


def all_samples() -> pd.DataFrame:
    return load("samples")


def with_particles(samples: pd.DataFrame) -> pd.DataFrame:
    """Samples whose particles are stored (a failed first ingestion has none)."""
    return samples[samples["particles_file"].notna()]


def selected() -> list[str]:
    """Sample ids chosen in the sidebar (campaign, stream, samples)."""
    return list(st.session_state.get(SELECTION_KEY, []))


def require_selection() -> list[str]:
    """The selected samples, or an explanation and the end of the page when there are none."""
    if not has_catalog():
        st.info(
            f"No particle database in `{home()}` yet. Ingest scans (`ps3d serve`, then drop scan directories into "
            "the inbox) or point `ps3d dashboard --home DIR` at a platform home."
        )
        st.stop()
    samples = with_particles(all_samples())
    if samples.empty:
        st.info(f"The particle database in `{home()}` holds no sample with stored particles yet.")
        st.stop()
    ids = selected()
    if not ids:
        st.info("No sample selected: choose campaigns, streams and samples in the sidebar.")
        st.stop()
    return ids


def sample_info(ids: list[str]) -> pd.DataFrame:
    samples = all_samples()
    return samples[samples["sample_id"].isin(ids)]


def weighting_caption(weighting: str, particles: int, samples: int, extra: str = "") -> None:
    """The line under every chart: its weighting and the particle count behind it."""
    words = {
        "number": "number (each particle counts once)",
        "volume": "volume (= mass when all particles have one density)",
        "phase volume": "volume of the phase",
    }[weighting]
    note = f" · {extra}" if extra else ""
    st.caption(f"Weighting: **{words}** · {particles:,} particles in {samples} sample(s){note}")


def sidebar_filters() -> None:
    """Campaign, stream and sample selectors; the chosen ids go to ``st.session_state``."""
    if not has_catalog():
        st.sidebar.caption(f"Home: `{home()}` (no database yet)")
        st.session_state[SELECTION_KEY] = []
        return
    samples = with_particles(all_samples())
    campaigns = sorted({c if isinstance(c, str) else "(none)" for c in samples["campaign"]})
    streams = sorted({s if isinstance(s, str) else "(none)" for s in samples["stream"]})
    st.sidebar.caption(f"Home: `{home()}` · read-only")
    chosen_campaigns = st.sidebar.multiselect("Campaign", campaigns, default=campaigns, key="filter_campaign")
    chosen_streams = st.sidebar.multiselect("Stream", streams, default=streams, key="filter_stream")
    campaign = samples["campaign"].fillna("(none)")
    stream = samples["stream"].fillna("(none)")
    options = list(samples[campaign.isin(chosen_campaigns) & stream.isin(chosen_streams)]["sample_id"])
    # the key follows the options, so the choice resets to "all" when the filters change
    key = f"filter_samples_{zlib.crc32(chr(0).join(options).encode()):08x}"
    chosen = st.sidebar.multiselect("Samples", options, default=options, key=key)
    st.session_state[SELECTION_KEY] = chosen
    st.sidebar.caption(f"{len(chosen)} of {len(samples)} samples selected")
