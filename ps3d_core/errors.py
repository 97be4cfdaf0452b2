"""The one error type users see: it names the file and the problem.

Every function of the platform that rejects input raises :class:`ScanError`
(or a subclass), so the command line, the flows and the quarantine can report
``<path>: <problem>`` without a traceback.
"""

from __future__ import annotations

from os import PathLike


class ScanError(Exception):
    """Input that cannot be used, with the file it came from.

    Parameters
    ----------
    path : str or PathLike
        The file or directory that is wrong (the most specific one known).
    problem : str
        What is wrong, in words a user acts on ("slice 12 is 510x512, the
        first slice is 512x512").
    """

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # a Dask worker pickles the error back to the flow: rebuild it from
        # (path, problem), not from the formatted message in ``args``
        return type(self), (self.path, self.problem)
