"""mlmd_lab: teacher-data database, neural-network potentials and machine-learning MD in Jupyter."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "cluster", "connect"]


def connect(uri: str | None = None, database: str = "mlmd", **kwargs):
    """Open the teacher-data database (see :func:`mlmd_lab.db.connect`)."""
    from mlmd_lab.db import connect as _connect

    return _connect(uri=uri, database=database, **kwargs)


def __getattr__(name: str):
    """``mlmd_lab.cluster(kind, ...)`` without importing dask at ``import mlmd_lab`` (the subpackage is callable)."""
    if name == "cluster":
        import importlib

        return importlib.import_module("mlmd_lab.cluster")
    raise AttributeError(f"module 'mlmd_lab' has no attribute {name!r}")
