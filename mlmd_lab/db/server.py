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

A shared database with accounts (:func:`start` with ``auth=True``): the first start creates the
administrator ``root`` with a random password, kept in ``admin.secret`` (mode 0600) in the data folder,
while the server listens on 127.0.0.1 only and holds no data; from then on the data folder is only ever
served with ``--auth``, and ``connect()`` without a URI refuses it.
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
# The server's main program, run with ``python -c`` in its own process. Two fixes to SecantusDB 0.7.0b3's stop,
# both measured here (80 starts and stops: up to 20 s each, one in ~40 killed by SIGKILL after STOP_TIMEOUT_S):
# - its main thread waits on an Event with no timeout. Python runs a signal handler only in the main thread, and a
#   SIGTERM the kernel hands to one of the server's other threads (WiredTiger's, the accept thread) leaves that wait
#   asleep: the server never stops. A wait with a timeout wakes every 0.2 s, and the handler then runs.
# - its stop closes the listening socket, which does not wake the thread blocked in accept(); it then waits 2 s for
#   that thread. shutdown() on the socket wakes it.
_LAUNCH = """
import socket, sys
import secantus.cli
from secantus.server import SecantusDBServer


class _Server(SecantusDBServer):
    def wait(self):
        while not self._stop_event.wait(0.2):
            pass

    def stop(self):
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().stop()


secantus.cli.SecantusDBServer = _Server
sys.argv[0] = 'secantusd-py'
sys.exit(secantus.cli.main())
"""


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
    auth: bool = False
    bind: str = "127.0.0.1"

    @property
    def uri(self) -> str:
        host = "127.0.0.1" if self.bind in ("127.0.0.1", "0.0.0.0", "") else self.bind
        return f"mongodb://{host}:{self.port}/?directConnection=true"


class EmbeddedServer:
    """The embedded server of one data folder (see module docstring for the sharing protocol)."""

    def __init__(self, data_dir: str | os.PathLike | None = None, cache_size: str | None = None, *,
                 auth: bool = False, port: int | None = None, host: str = "127.0.0.1",
                 tls: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.cache_size = cache_size or os.environ.get("MLMD_DB_CACHE_SIZE", "256M")
        self.auth = auth
        self.port = port
        self.host = host
        self.tls = dict(tls or {})
        self.secret_file = self.data_dir / "admin.secret"
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
            elif info.auth != self.auth:
                raise DatabaseError(self._auth_mismatch(info.auth))
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
            return ServerInfo(int(data["pid"]), str(data["host"]), int(data["port"]), float(data["started"]),
                              bool(data.get("auth", False)), str(data.get("bind", "127.0.0.1")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _auth_mismatch(self, running_auth: bool) -> str:
        if running_auth or self.secret_file.exists():
            return (f"the database in {self.data_dir} has accounts (authentication on): connect with your URI, "
                    "connect('mongodb://USER:PASSWORD@HOST:PORT/?authSource=admin') or MLMD_MONGODB_URI; the "
                    "administrator starts it with mlmd_lab.db.server.start(data_dir)")
        return (f"the database in {self.data_dir} runs without authentication; stop it first "
                "(mlmd-lab server stop) to start it with accounts")

    def admin_uri(self, info: ServerInfo) -> str:
        """The administrator's URI of a server started with accounts (password from ``admin.secret``)."""
        from urllib.parse import quote_plus

        password = self.secret_file.read_text().strip()
        base = info.uri.replace("mongodb://", f"mongodb://root:{quote_plus(password)}@", 1)
        extra = "&tls=true&tlsAllowInvalidHostnames=true" if self.tls else ""
        if self.tls.get("ca"):
            extra += f"&tlsCAFile={quote_plus(self.tls['ca'])}"
        return base + "&authSource=admin" + extra

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
        if _is_server_process(info) and _port_open(info.port, info.bind):
            return info
        self.state_file.unlink(missing_ok=True)
        return None

    def _start(self) -> ServerInfo:
        if self.secret_file.exists() and not self.auth:
            raise DatabaseError(self._auth_mismatch(True))
        if self.auth and not self.secret_file.exists():
            if any(self.storage.iterdir()):
                raise DatabaseError(
                    f"{self.data_dir} already holds a database without accounts; start the shared database in a "
                    "new, empty folder and ingest or copy the data into it as its users")
            self._create_administrator()
        return self._launch(self.auth, self.host, self.port)

    def _create_administrator(self) -> None:
        """Create ``root`` on a fresh, empty storage (server on 127.0.0.1 without auth, then stopped)."""
        import secrets

        from pymongo import MongoClient

        info = self._launch(False, "127.0.0.1", None)
        password = secrets.token_urlsafe(24)
        try:
            client: MongoClient = MongoClient(info.uri, serverSelectionTimeoutMS=20000)
            client.admin.command("createUser", "root", pwd=password, roles=["root"])
            # another local process could have connected in the second without authentication: then it may
            # have made itself a user too, and this storage cannot be trusted
            intrusion = untrusted_setup(client)
            client.close()
            if intrusion:
                import shutil

                self._stop_locked()
                shutil.rmtree(self.storage, ignore_errors=True)
                self.storage.mkdir(parents=True, exist_ok=True)
                raise DatabaseError("another process connected to the new database while its administrator was "
                                    f"being created ({intrusion}); the folder was wiped: start again, and find out "
                                    "who else runs on this machine")
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(password + "\n")
        finally:
            self._stop_locked()

    def _launch(self, auth: bool, host: str, fixed_port: int | None) -> ServerInfo:
        config = self.data_dir / "secantusd.toml"
        if not config.exists():  # an explicit (empty) config stops secantus reading ~/.secantus/*.toml
            config.write_text("# mlmd_lab passes every setting on the command line\n")
        last_error = ""
        for _attempt in range(1 if fixed_port else 3):
            port = fixed_port or _free_port()
            cmd = [
                sys.executable, "-c", _LAUNCH, "--config", str(config), "--host", host,
                "--port", str(port), "--storage-path", str(self.storage), "--log-level", "WARNING",
                "--standalone", "--cache-size", self.cache_size,
            ] + (["--auth"] if auth else [])
            for flag, key in (("--tls-cert-file", "cert"), ("--tls-key-file", "key"), ("--tls-ca-file", "ca")):
                if self.tls.get(key):
                    cmd += [flag, str(self.tls[key])]
            with open(self.log_file, "ab") as log:
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, close_fds=True,
                )
            info = ServerInfo(proc.pid, socket.gethostname(), port, psutil.Process(proc.pid).create_time(), auth, host)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    last_error = _tail(self.log_file)
                    break
                if _port_open(port, host):
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


class ServerHandle:
    """A running embedded server with accounts (from :func:`start`): ``.uri`` (the administrator's, shown
    redacted) and ``.stop()``."""

    def __init__(self, server: EmbeddedServer, info: ServerInfo) -> None:
        from mlmd_lab.db.access import SecretURI

        self.server = server
        self.info = info
        self.port = info.port
        self.uri = SecretURI(server.admin_uri(info)) if server.auth else SecretURI(info.uri)

    def __repr__(self) -> str:
        auth = "accounts on" if self.server.auth else "no accounts"
        return f"<mlmd_lab embedded server {self.info.bind}:{self.port} ({auth}), data in {self.server.data_dir}>"

    def stop(self) -> bool:
        """Stop the server (every client loses its connection)."""
        return self.server.stop()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(data_dir: str | os.PathLike, port: int | None = None, auth: bool = True, *, host: str = "127.0.0.1",
          tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None) -> ServerHandle:
    """Start (or reuse) the embedded server of ``data_dir`` and keep it running until ``.stop()``.

    Args:
        data_dir: its data folder (the database files, ``server.json``, ``admin.secret``).
        port: TCP port (None: a free one).
        auth: accounts on (SCRAM): every client needs a user's URI; ``.uri`` is the administrator's.
            A folder once started with accounts is never served without them.
        host: address to listen on; anything but 127.0.0.1 needs TLS (``tls_cert``/``tls_key``), so that
            passwords never cross a network in the clear.
        tls_cert, tls_key, tls_ca: PEM files for TLS.

    Returns:
        a :class:`ServerHandle`.
    """
    if host not in ("127.0.0.1", "localhost") and not (tls_cert and tls_key):
        raise DatabaseError(f"listening on {host!r} sends passwords over the network: give tls_cert= and tls_key= "
                            "(PEM files), or keep host='127.0.0.1'")
    tls = {k: v for k, v in (("cert", tls_cert), ("key", tls_key), ("ca", tls_ca)) if v}
    server = EmbeddedServer(data_dir, auth=auth, port=port, host=host, tls=tls)
    info = server.pin()
    if port is not None and info.port != port:
        raise DatabaseError(f"the server of {server.data_dir} already runs on port {info.port}, not {port}; stop it "
                            "first to move it")
    return ServerHandle(server, info)


def untrusted_setup(client) -> str | None:
    """What, besides the administrator ``root``, exists on a server just set up (None: nothing)."""
    users = sorted(u["user"] for u in client.admin.command("usersInfo")["users"])
    extra = sorted(set(client.list_database_names()) - {"admin", "config", "local"})
    if users == ["root"] and not extra:
        return None
    return f"users {users}, databases {extra}"


def _is_server_process(info: ServerInfo) -> bool:
    """True if ``info.pid`` is still the process we started (guards against pid reuse)."""
    try:
        proc = psutil.Process(info.pid)
        return abs(proc.create_time() - info.started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    host = "127.0.0.1" if host in ("0.0.0.0", "localhost", "") else host
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
