"""mlmd_lab: teacher-data database, neural-network potentials and machine-learning MD in Jupyter."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "connect"]


def connect(uri: str | None = None, database: str = "mlmd", **kwargs):
    """Open the teacher-data database (see :func:`mlmd_lab.db.connect`)."""
    from mlmd_lab.db import connect as _connect

    return _connect(uri=uri, database=database, **kwargs)
