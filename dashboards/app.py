"""ParticleSeg3D platform dashboard (Streamlit): compare feeds, concentrates and tailings.

Run with ``ps3d dashboard [--home DIR]`` (or ``streamlit run dashboards/app.py``
with ``PS3D_HOME`` set). Reads only the particle database, read-only.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run dashboards/app.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboards import common  # noqa: E402

st.set_page_config(page_title="ParticleSeg3D dashboard", layout="wide")

VIEWS = Path(__file__).resolve().parent / "views"
PAGES = [
    st.Page(VIEWS / "overview.py", title="Overview", url_path="overview", default=True),
    st.Page(VIEWS / "size.py", title="Size", url_path="size"),
    st.Page(VIEWS / "shape.py", title="Shape", url_path="shape"),
    st.Page(VIEWS / "composition.py", title="Composition", url_path="composition"),
    st.Page(VIEWS / "process.py", title="Process", url_path="process"),
    st.Page(VIEWS / "explorer.py", title="Particle explorer", url_path="explorer"),
    st.Page(VIEWS / "sql.py", title="SQL", url_path="sql"),
]

page = st.navigation(PAGES)
common.sidebar_filters()
page.run()
