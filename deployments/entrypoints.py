"""Flow entry points for ``prefect.yaml`` (``prefect deploy``), which names flows by file path.

Prefect loads an entry-point file as a top-level module named after the file;
a flow *defined* in such a module is pickled by reference to that name, which
Dask workers cannot import ("No module named 'ingest'"). Importing the flows
here keeps them defined in their packages (``flows.ingest``, ``flows.retrain``).
"""

from flows.ingest import ingest_scan
from flows.retrain import evaluate_current, resegment_all, retrain

__all__ = ["evaluate_current", "ingest_scan", "resegment_all", "retrain"]
