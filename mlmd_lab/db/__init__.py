"""Teacher-data database: embedded server lifecycle, ingest, queries (see :func:`connect`)."""

from mlmd_lab.db.ingest import IngestReport
from mlmd_lab.db.server import EmbeddedServer
from mlmd_lab.db.store import Database, DatabaseSummary, connect

__all__ = ["Database", "DatabaseSummary", "EmbeddedServer", "IngestReport", "connect"]
