"""Shared fixtures: a real MongoDB-wire server over a socket, and the external sample data.

The server is ``$MLMD_TEST_MONGODB_URI`` when set (e.g. a real mongod), else the embedded SecantusDB
server started in a temporary folder for the test session. Each test gets its own database, dropped after.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = (ROOT / ".." / "shared" / "external").resolve()


def external(sub: str = "") -> Path:
    """Path inside ../shared/external; skips the test (with the reason) if the folder is absent."""
    path = EXTERNAL / sub
    if not path.exists():
        pytest.skip(f"real sample data not found at {path} (../shared/external is only in this workplace)")
    return path


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory):
    uri = os.environ.get("MLMD_TEST_MONGODB_URI")
    if uri:
        yield uri
        return
    from mlmd_lab.db.server import EmbeddedServer

    server = EmbeddedServer(tmp_path_factory.mktemp("embedded-db"))
    info = server.ensure_running(register=False)
    yield info.uri
    server.stop()


@pytest.fixture
def db(mongo_uri):
    from mlmd_lab.db import connect

    database = connect(mongo_uri, database=f"test_{uuid.uuid4().hex[:12]}")
    yield database
    database.drop()
    database.close()
