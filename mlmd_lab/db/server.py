"""Lifecycle of the embedded MongoDB-wire server (SecantusDB) behind ``connect()`` with no URI.

Why SecantusDB: no ``mongod`` can be installed from Debian or PyPI here, and SecantusDB passed every
pymongo check measured in ``../shared/guides/embedded-mongodb.md`` (indexes, unique keys, aggregation,
GridFS, restart and ``kill -9`` recovery). It is GPL-2.0-only and single-threaded Python, so it always
runs as a *separate process*, never imported into the library's process.

One data folder has at most one server. Several kernels and processes share it through files in the
data folder, all guarded by one inter-process lock (``server.lock``):

- ``server.json``: pid, host name, port and start time of the running server;
- ``clients/<pid>-<start time>``: one lease per process that connected.

``ensure_running()`` reuses a live server or starts one; ``release()`` drops this process's lease and stops
the server when no live client remains (leases of dead processes are pruned, so a killed kernel does not
keep the server alive forever). ``pin()`` keeps a server running with no clients (``mlmd-lab server start``).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from mlmd_lab.errors import DatabaseError

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
_LAUNCH = "import sys; from secantus.cli import main; sys.argv[0] = 'secantusd-py'; sys.exit(main())"


def default_data_dir() -> Path:
    """The user's mlmd_lab data folder: ``$MLMD_DATA_DIR`` or the platform's user data dir."""
    env = os.environ.get("MLMD_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    from platformdirs import user_data_dir

    return Path(user_data_dir("mlmd_lab", appauthor=False))


@dataclass(frozen=True)
class ServerInfo:
    """A running embedded server: process id, host name, TCP port on 127.0.0.1, start time (epoch s)."""

    pid: int
    host: str
    port: int
    started: float

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"


class EmbeddedServer:
    """The embedded server of one data folder (see module docstring for the sharing protocol)."""

    def __init__(self, data_dir: str | os.PathLike | None = None, cache_size: str | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.cache_size = cache_size or os.environ.get("MLMD_DB_CACHE_SIZE", "256M")
        self.storage = self.data_dir / "mongodb"
        self.state_file = self.data_dir / "server.json"
        self.log_file = self.data_dir / "server.log"
        self.clients_dir = self.data_dir / "clients"
        self._lock = FileLock(str(self.data_dir / "server.lock"))
        self._lease: Path | None = None

    # -- public -------------------------------------------------------------------------------
    def ensure_running(self, register: bool = True) -> ServerInfo:
        """Return the live server of this data folder, starting it if needed; register this process."""
        self._prepare_dirs()
        with self._locked():
            info = self._live_info()
            if info is None:
                info = self._start()
            if register:
                self._register()
            return info

    def status(self) -> ServerInfo | None:
        """The live server, or None (never starts one)."""
        if not self.state_file.exists():
            return None
        with self._locked():
            return self._live_info()

    def clients(self) -> list[int]:
        """Pids of live processes holding a lease on this server."""
        with self._locked():
            return self._live_clients()

    def release(self) -> None:
        """Drop this process's lease; stop the server if no live client (and no pin) remains."""
        if self._lease is None or not self._lease.name.startswith(f"{os.getpid()}-"):
            return
        if not self.data_dir.exists():  # folder removed (e.g. a temporary one): nothing left to release
            self._lease = None
            return
        with self._locked():
            self._lease.unlink(missing_ok=True)
            self._lease = None
            if not self._live_clients() and not (self.data_dir / "pinned").exists():
                self._stop_locked()

    def pin(self) -> ServerInfo:
        """Start (or reuse) the server and keep it running without clients until :meth:`stop`."""
        self._prepare_dirs()
        (self.data_dir / "pinned").write_text(str(time.time()))
        return self.ensure_running(register=False)

    def stop(self) -> bool:
        """Stop the server now (clients lose their connection). Returns True if one was running."""
        if not self.state_file.exists():
            return False
        with self._locked():
            (self.data_dir / "pinned").unlink(missing_ok=True)
            return self._stop_locked()

    # -- internals ----------------------------------------------------------------------------
    def _prepare_dirs(self) -> None:
        try:
            self.clients_dir.mkdir(parents=True, exist_ok=True)
            self.storage.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatabaseError(
                f"cannot create the embedded database folder {self.data_dir}: {err.strerror}; "
                "set MLMD_DATA_DIR to a writable folder"
            ) from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._lock.acquire(timeout=STARTUP_TIMEOUT_S + 30)
        except Timeout:
            raise DatabaseError(
                f"another process holds {self._lock.lock_file} for too long; if no mlmd_lab process is "
                "running, delete that file and retry"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def _read_state(self) -> ServerInfo | None:
        try:
            data = json.loads(self.state_file.read_text())
            return ServerInfo(int(data["pid"]), str(data["host"]), int(data["port"]), float(data["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _live_info(self) -> ServerInfo | None:
        info = self._read_state()
        if info is None:
            return None
        if info.host != socket.gethostname():
            raise DatabaseError(
                f"the embedded database in {self.data_dir} is served by a process on host {info.host!r}; "
                "use it from there, give this host its own MLMD_DATA_DIR, or connect to a shared MongoDB "
                "with connect('mongodb://...')"
            )
        if _is_server_process(info) and _port_open(info.port):
            return info
        self.state_file.unlink(missing_ok=True)
        return None

    def _start(self) -> ServerInfo:
        config = self.data_dir / "secantusd.toml"
        if not config.exists():  # an explicit (empty) config stops secantus reading ~/.secantus/*.toml
            config.write_text("# mlmd_lab passes every setting on the command line\n")
        last_error = ""
        for _attempt in range(3):
            port = _free_port()
            cmd = [
                sys.executable, "-c", _LAUNCH, "--config", str(config), "--host", "127.0.0.1",
                "--port", str(port), "--storage-path", str(self.storage), "--log-level", "WARNING",
                "--standalone", "--cache-size", self.cache_size,
            ]
            with open(self.log_file, "ab") as log:
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, close_fds=True,
                )
            info = ServerInfo(proc.pid, socket.gethostname(), port, psutil.Process(proc.pid).create_time())
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    last_error = _tail(self.log_file)
                    break
                if _port_open(port):
                    self.state_file.write_text(json.dumps(info.__dict__))
                    return info
                time.sleep(0.05)
            else:
                proc.kill()
                last_error = f"no answer on port {port} within {STARTUP_TIMEOUT_S:.0f} s"
        raise DatabaseError(
            f"the embedded database server did not start ({last_error.strip() or 'no message'}); "
            f"see {self.log_file}, or connect to a MongoDB server with connect('mongodb://...')"
        )

    def _register(self) -> None:
        if self._lease is not None and self._lease.exists():
            return
        me = psutil.Process()
        self._lease = self.clients_dir / f"{me.pid}-{me.create_time():.3f}"
        self._lease.write_text("")
        atexit.register(self.release)

    def _live_clients(self) -> list[int]:
        alive = []
        for lease in self.clients_dir.glob("*-*"):
            pid_s, _, created = lease.name.partition("-")
            try:
                proc = psutil.Process(int(pid_s))
                if abs(proc.create_time() - float(created)) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc.pid)
                    continue
            except (psutil.NoSuchProcess, ValueError):
                pass
            lease.unlink(missing_ok=True)
        return alive

    def _stop_locked(self) -> bool:
        info = self._read_state()
        self.state_file.unlink(missing_ok=True)
        if info is None or not _is_server_process(info):
            return False
        proc = psutil.Process(info.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        return True


def _is_server_process(info: ServerInfo) -> bool:
    """True if ``info.pid`` is still the process we started (guards against pid reuse)."""
    try:
        proc = psutil.Process(info.pid)
        return abs(proc.create_time() - info.started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
