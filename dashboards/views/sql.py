"""SQL: read-only analyst queries through ps3d_core.catalog.query (no files, no network, row and time limits)."""

import io

import pyarrow.csv as pacsv
import streamlit as st

from dashboards import common
from ps3d_core import catalog
from schemas.catalog import markdown

st.title("SQL")
st.caption(
    "One SELECT over the tables samples, runs, schema_version and the views particles, psd, d_values, "
    "size_classes. Read-only: writing, reading files, ATTACH and the network are refused."
)
with st.expander("Tables, views and columns"):
    st.markdown(markdown())
DEFAULT = "SELECT sample_id, stream, campaign, particle_count, d50_volume_mm FROM samples ORDER BY sample_id"
st.session_state.setdefault("sql_last", DEFAULT)  # the example runs on the first visit
sql = st.text_area("Query", value=DEFAULT, height=140, key="sql_text")
left, right = st.columns(2)
limit = left.number_input("Row limit", min_value=1, max_value=1_000_000, value=10_000, step=1000, key="sql_limit")
timeout = right.number_input("Time limit (s)", min_value=1.0, max_value=300.0, value=30.0, step=5.0, key="sql_timeout")
if not common.has_catalog():
    common.require_selection()  # explains and stops
if st.button("Run", type="primary", key="sql_run") or st.session_state.get("sql_last") == sql:
    st.session_state["sql_last"] = sql
    try:
        result = catalog.query(common.home(), sql, limit=int(limit), timeout_s=float(timeout))
    except catalog.QueryTimeout as error:
        st.error(f"Stopped: {error}")
        st.stop()
    except catalog.QueryRefused as error:
        st.error(f"Refused: {error}")
        st.stop()
    except catalog.CatalogError as error:
        st.error(str(error))
        st.stop()
    table = result.table
    note = f" (stopped at the row limit of {int(limit):,})" if result.truncated else ""
    st.caption(f"{table.num_rows:,} row(s) in {result.seconds:.2f} s{note}")
    st.dataframe(table.to_pandas(), hide_index=True, key="sql_result")
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    st.download_button("Download CSV", buffer.getvalue(), file_name="ps3d-query.csv", mime="text/csv", key="sql_csv")
