"""Throwaway local PostgreSQL and Redis servers for ``make run`` and test fixtures.

Both servers are started from binaries installed on the machine (Debian's PostgreSQL and
``redis-server``), listen on loopback only, on a free port, and trade durability for speed.
On a machine with a reachable Docker engine and the optional ``testcontainers`` package, the
same classes can run the servers in containers instead (``backend="container"``, or
``backend="auto"`` when the local binaries are missing); local processes are preferred because
they start in about a second and need nothing but the binaries.

Example::

    with PostgresServer() as pg, RedisServer() as redis_server:
        dsn = pg.dsn("postgres", "postgres")
        url = redis_server.url
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import importlib
import importlib.util
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import redis

Backend = Literal["auto", "local", "container"]
"""Where a server runs: local processes, testcontainers, or local unless binaries are missing."""

LOOPBACK = "127.0.0.1"

_LOG_TAIL_LINES = 40

# Settings for a disposable cluster: no crash safety, nothing waits for the disk. Source:
# PostgreSQL 15 manual, "Non-Durable Settings" (section 14.5).
_PG_DEV_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
}

# Linux sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107


class DevServerError(RuntimeError):
    """A development server could not be started, reached or stopped."""


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LISTEN_PORTS_FROM = 10_000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's
    ``net.ipv4.ip_local_port_range``; 32768, its default, where it cannot be read)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def scratch_dir(prefix: str) -> Path:
    """A new empty directory under the system's temporary directory that other users may
    enter (mode 0755): run as root, PostgreSQL drops to an unprivileged user, which must be
    able to enter its data directory's parents (pytest's ``tmp_path`` is 0700; ``/tmp`` is
    world-enterable).

    Args:
        prefix: Start of the directory's name.

    Returns:
        Its path; the caller removes it (or leaves it to the system's temporary cleanup).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` right now, below the ephemeral range.

    The port is chosen at random between 10000 and the start of the kernel's ephemeral range
    and checked by binding it. A port the kernel assigned (``bind(host, 0)``) would lie in the
    ephemeral range, from which the kernel also picks the local port of every outgoing
    connection: between this call and the caller's bind, a connection of any process (a
    PostgreSQL or Redis client starting) could take it, and the server then fails with
    "Address already in use". Below that range only another listener can take the port.
    A port is not handed out twice by one process. The port is not reserved.

    Args:
        host: Address to probe, e.g. ``"127.0.0.1"``.

    Returns:
        A port number, or one in the ephemeral range where the range starts too low to
        leave room below it.

    Raises:
        OSError: No free port was found in 200 tries.
    """
    low = _ephemeral_low()
    if low - _LISTEN_PORTS_FROM < 1000:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
            return port
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_LISTEN_PORTS_FROM, low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free TCP port on {host} between {_LISTEN_PORTS_FROM} and {low}")


def docker_available() -> bool:
    """Tell whether a Docker engine answers and ``testcontainers`` is importable.

    Cheap checks only: the package must be installed and the engine socket (``DOCKER_HOST`` or
    ``/var/run/docker.sock``) must accept a connection; no container is started.

    Returns:
        True when the container backend can be used.

    """
    if importlib.util.find_spec("testcontainers") is None:
        return False
    docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if docker_host.startswith("unix://"):
        path = docker_host.removeprefix("unix://")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(path)
        except OSError:
            return False
        return True
    # A TCP or SSH engine: trust the configuration, the container start reports failures.
    return True


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def find_pg_bindir() -> Path:
    """Locate the directory holding ``initdb``, ``pg_ctl`` and ``pg_isready``.

    Looks at ``$AETERNA_PG_BINDIR``, then ``pg_config --bindir``, then the newest
    ``/usr/lib/postgresql/*/bin`` (Debian's layout, where ``pg_config`` on ``PATH`` may belong
    to the client package only).

    Returns:
        The binary directory.

    Raises:
        DevServerError: No PostgreSQL server binaries were found.

    """
    candidates: list[Path] = []
    if env := os.environ.get("AETERNA_PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(out))

    def version_key(path: str) -> tuple[int, ...]:
        version = Path(path).parent.name
        return tuple(int(p) for p in version.split(".") if p.isdigit())

    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    candidates += [Path(p) for p in debian]
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise DevServerError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql or set "
        "AETERNA_PG_BINDIR"
    )


def _user_can_traverse(path: Path, user: pwd.struct_passwd) -> Path | None:
    """Return the first ancestor of ``path`` that ``user`` cannot enter, or None."""
    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == user.pw_gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return parent
    return None


class PostgresServer:
    """A disposable PostgreSQL cluster on loopback, started with ``initdb`` and ``pg_ctl``.

    The cluster has one superuser, ``postgres``, with trust authentication on loopback and on
    its unix socket (placed inside the data directory when the path is short enough). Durability
    is switched off (``fsync=off`` etc.), so a crash may lose the data: this is for development
    and tests only.

    PostgreSQL refuses to run as root. When the current user is root, ``initdb`` and ``pg_ctl``
    run as ``run_as`` (default: the ``postgres`` system user, else ``nobody``) through
    ``runuser`` or ``setpriv``, the data directory is handed to that user, and every parent of
    the data directory must be enterable by that user (``/tmp`` is; pytest's ``tmp_path`` is not).

    Attributes:
        host: Listen address (always loopback for local processes).
        port: TCP port, known after :meth:`start`.
        data_dir: Cluster directory, known after :meth:`start` for local processes.
        startup_seconds: Wall time of the last :meth:`start` (initdb included), in seconds.

    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        keep: bool = False,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        bindir: str | os.PathLike[str] | None = None,
        run_as: str | None = None,
        startup_timeout_s: float = 30.0,
        backend: Backend = "auto",
        image: str = "postgres:15-alpine",
    ) -> None:
        """Configure, but do not start, a cluster.

        Args:
            data_dir: Cluster directory. None means a fresh temporary directory.
            keep: Keep ``data_dir`` after :meth:`stop` and reuse it on the next start when it
                already holds a cluster. When False, the directory is removed on stop, and an
                old cluster found in it is discarded on start.
            port: TCP port; None picks a free one.
            settings: Extra ``postgresql.conf`` settings, overriding the development defaults.
            bindir: Directory with the server binaries; None uses :func:`find_pg_bindir`.
            run_as: Unprivileged user for the server when running as root.
            startup_timeout_s: Seconds to wait for the server to accept connections.
            backend: ``"local"``, ``"container"`` (testcontainers), or ``"auto"`` (local if the
                binaries exist, else containers when Docker is reachable).
            image: Container image for the container backend.
            data_dir: Keep data in this directory with the append-only file fsynced on
                every write (``appendfsync always``), so that a server started again on it
                (same port, e.g. after :meth:`stop`) has every acknowledged write; the
                directory outlives :meth:`stop`. None keeps nothing on disk. Local backend
                only.

        """
        self._requested_dir = Path(data_dir) if data_dir is not None else None
        self.keep = keep
        self._requested_port = port
        self._settings = {**_PG_DEV_SETTINGS, **(settings or {})}
        self._bindir = Path(bindir) if bindir is not None else None
        self._run_as = run_as
        self.startup_timeout_s = startup_timeout_s
        self._backend = backend
        self._image = image
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self.host = LOOPBACK
        self.port = 0
        self.data_dir: Path | None = None
        self.socket_dir: Path | None = None
        self.startup_seconds = 0.0
        self._container: Any = None
        self._password: str | None = None
        self._remove_on_stop: list[Path] = []
        self._running = False

    # -- public API -------------------------------------------------------------------------

    def start(self) -> Self:
        """Create (if needed) and start the cluster, and wait until it accepts connections.

        Returns:
            This server, for chaining.

        Raises:
            DevServerError: The binaries are missing, initdb failed, or the server did not
                answer within ``startup_timeout_s``; the message carries the server log tail.

        """
        if self._running:
            return self
        began = time.monotonic()
        atexit.register(self.stop)
        try:
            if self._use_container():
                self._start_container()
            else:
                self._start_local()
        except BaseException:
            self.stop()
            raise
        self._running = True
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove what it does not keep; idempotent."""
        atexit.unregister(self.stop)
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()
            self._container = None
        elif self.data_dir is not None and (self.data_dir / "postmaster.pid").exists():
            for mode in ("fast", "immediate"):
                result = self._pg_run(
                    ["pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "20"],
                    check=False,
                )
                if result.returncode == 0 or not (self.data_dir / "postmaster.pid").exists():
                    break
        for path in self._remove_on_stop:
            shutil.rmtree(path, ignore_errors=True)
        self._remove_on_stop.clear()
        self._running = False

    def dsn(
        self, user: str = "postgres", database: str = "postgres", *, unix_socket: bool = False
    ) -> str:
        """Return a libpq/asyncpg connection URL.

        Args:
            user: Role to connect as.
            database: Database name.
            unix_socket: Connect through the unix socket instead of TCP (local backend only).

        Returns:
            A ``postgresql://`` URL.

        Raises:
            DevServerError: The server is not running, or no unix socket exists.

        """
        if not self._running:
            raise DevServerError("PostgreSQL server is not running")
        auth = f"{user}:{self._password}" if self._password else user
        if unix_socket:
            if self.socket_dir is None:
                raise DevServerError("this server has no unix socket")
            return f"postgresql://{auth}@/{database}?host={self.socket_dir}&port={self.port}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- local processes --------------------------------------------------------------------

    def _use_container(self) -> bool:
        if self._backend == "container":
            return True
        if self._backend == "local":
            return False
        try:
            self._bindir = self._bindir or find_pg_bindir()
        except DevServerError:
            if docker_available():
                return True
            raise
        return False

    def _pg_user(self) -> pwd.struct_passwd | None:
        """Return the user to run the server as when we are root, else None (ourselves)."""
        if os.geteuid() != 0:
            return None
        names = [self._run_as] if self._run_as else ["postgres", "nobody"]
        for name in names:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise DevServerError(f"running as root and none of the users {names} exists")

    def _pg_run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        assert self._bindir is not None
        cmd = [str(self._bindir / argv[0]), *argv[1:]]
        user = self._pg_user()
        if user is not None:
            if runuser := shutil.which("runuser"):
                cmd = [runuser, "-u", user.pw_name, "--", *cmd]
            elif setpriv := shutil.which("setpriv"):
                cmd = [
                    setpriv,
                    f"--reuid={user.pw_uid}",
                    f"--regid={user.pw_gid}",
                    "--init-groups",
                    "--",
                    *cmd,
                ]
            else:
                raise DevServerError("running as root needs runuser or setpriv to drop privileges")
        # The unprivileged user may not be able to enter our working directory.
        cwd = str(self.data_dir) if self.data_dir and self.data_dir.exists() else "/"
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout or self.startup_timeout_s + 30,
        )
        if check and result.returncode != 0:
            raise DevServerError(
                f"{' '.join(argv[:2])} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def _prepare_dir(self, user: pwd.struct_passwd | None) -> bool:
        """Create the data directory; return True when it already holds a cluster to reuse."""
        if self._requested_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="aeterna-pg-"))
            self._remove_on_stop.append(self.data_dir)
        else:
            self.data_dir = self._reachable(self._requested_dir, user)
            existed = self.data_dir.exists()
            initialised = (self.data_dir / "PG_VERSION").is_file()
            if initialised and self.keep:
                self._chown(self.data_dir, user)
                return True
            if initialised:
                shutil.rmtree(self.data_dir)
            elif existed and any(self.data_dir.iterdir()):
                raise DevServerError(f"{self.data_dir} is not empty and holds no cluster")
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if not self.keep:
                self._remove_on_stop.append(self.data_dir)
        self._chown(self.data_dir, user)
        return False

    @staticmethod
    def _reachable(requested: Path, user: pwd.struct_passwd | None) -> Path:
        """Return where the cluster of ``requested`` lives, as a directory ``user`` can enter.

        A clone in a directory only root may enter (``/root/...``) is not reachable by the
        unprivileged server user. Then the cluster lives under ``$AETERNA_PG_FALLBACK_DIR``
        (default ``/var/tmp``), in a directory named after the requested path, and
        ``requested`` becomes a symlink to it, so the data is still found (and kept) there.
        """
        if requested.is_symlink() or user is None:
            return requested.resolve()
        if _user_can_traverse(requested.parent, user) is None:
            return requested.resolve()
        base = Path(os.environ.get("AETERNA_PG_FALLBACK_DIR", "/var/tmp"))
        digest = hashlib.sha256(str(requested.resolve()).encode()).hexdigest()[:12]
        home = base / f"aeterna-pg-{digest}"
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o755)
        blocked = _user_can_traverse(home, user)
        if blocked is not None:
            raise DevServerError(
                f"user {user.pw_name!r} can enter neither {requested.parent} nor {blocked}; set "
                "AETERNA_PG_FALLBACK_DIR to a directory that user can reach"
            )
        target = home / "data"
        requested.parent.mkdir(parents=True, exist_ok=True)
        if requested.exists():
            if any(requested.iterdir()):
                shutil.move(str(requested), str(target))  # whatever was there moves along
            else:
                requested.rmdir()
        requested.symlink_to(target, target_is_directory=True)
        return target

    def _chown(self, path: Path, user: pwd.struct_passwd | None) -> None:
        if user is None:
            return
        blocked = _user_can_traverse(path, user)
        if blocked is not None:
            raise DevServerError(
                f"user {user.pw_name!r} cannot enter {blocked}; place the data directory where "
                "that user can reach it (e.g. under /tmp)"
            )
        for root, dirs, files in os.walk(path):
            os.chown(root, user.pw_uid, user.pw_gid)
            for name in [*dirs, *files]:
                os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)
        path.chmod(0o700)

    def _socket_dir(self, user: pwd.struct_passwd | None) -> Path:
        assert self.data_dir is not None
        sock = f"{self.data_dir}/.s.PGSQL.65535"
        if len(sock) <= _MAX_UNIX_SOCKET_PATH:
            return self.data_dir
        short = Path(tempfile.mkdtemp(prefix="pgs-"))
        self._remove_on_stop.append(short)
        if user is not None:
            os.chown(short, user.pw_uid, user.pw_gid)
        return short

    def _start_local(self) -> None:
        self._bindir = self._bindir or find_pg_bindir()
        user = self._pg_user()
        reuse = self._prepare_dir(user)
        assert self.data_dir is not None
        if not reuse:
            self._pg_run(
                [
                    "initdb",
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
        elif (self.data_dir / "postmaster.pid").exists():
            # Left by a killed run; a live server on it would make pg_ctl start fail loudly.
            self._pg_run(
                ["pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate"], check=False
            )
        self.socket_dir = self._socket_dir(user)
        log = self.data_dir / "server.log"
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            self.port = self._requested_port or free_port()
            options = {
                **self._settings,
                "listen_addresses": LOOPBACK,
                "port": str(self.port),
                "unix_socket_directories": str(self.socket_dir),
            }
            opts = " ".join(f"-c {k}={v!s}" for k, v in options.items())
            result = self._pg_run(
                [
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    str(int(self.startup_timeout_s)),
                    "-o",
                    opts,
                ],
                check=False,
            )
            if result.returncode == 0:
                break
            # A port taken between free_port() and bind: try another one.
            if attempt + 1 < attempts and "could not bind" in _tail(log):
                continue
            raise DevServerError(
                f"PostgreSQL did not start on port {self.port}:\n{result.stdout}{result.stderr}"
                f"\n--- {log} ---\n{_tail(log)}"
            )
        self._wait_ready(log)

    def _wait_ready(self, log: Path) -> None:
        assert self._bindir is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            result = subprocess.run(
                [
                    str(self._bindir / "pg_isready"),
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-t",
                    "2",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise DevServerError(
                    f"PostgreSQL on port {self.port} not ready after {self.startup_timeout_s} s: "
                    f"{result.stdout.strip()}\n--- {log} ---\n{_tail(log)}"
                )
            time.sleep(0.05)

    # -- containers -------------------------------------------------------------------------

    def _start_container(self) -> None:
        module = importlib.import_module("testcontainers.postgres")
        self._password = "postgres"
        container = module.PostgresContainer(
            self._image, username="postgres", password=self._password, dbname="postgres"
        )
        container.start()
        self._container = container
        self.host = container.get_container_host_ip()
        self.port = int(container.get_exposed_port(5432))


class RedisServer:
    """A disposable ``redis-server`` on loopback, with persistence switched off unless a
    ``data_dir`` is given.

    Attributes:
        host: Listen address.
        port: TCP port, known after :meth:`start`.
        startup_seconds: Wall time of the last :meth:`start`, in seconds.

    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 10.0,
        backend: Backend = "auto",
        image: str = "redis:7-alpine",
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Configure, but do not start, a server.

        Args:
            port: TCP port; None picks a free one.
            binary: Path of ``redis-server``; None searches ``PATH``.
            extra_args: More ``redis-server`` command-line options, e.g. ``["--maxmemory",
                "64mb"]``.
            startup_timeout_s: Seconds to wait for the server to answer PING.
            backend: ``"local"``, ``"container"`` (testcontainers), or ``"auto"`` (local if the
                binary exists, else containers when Docker is reachable).
            image: Container image for the container backend.
            data_dir: Keep data in this directory with the append-only file fsynced on
                every write (``appendfsync always``), so that a server started again on it
                (same port, e.g. after :meth:`stop`) has every acknowledged write; the
                directory outlives :meth:`stop`. None keeps nothing on disk. Local backend
                only.

        """
        self._requested_port = port
        self._binary = str(binary) if binary is not None else None
        self._extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self._backend = backend
        self._image = image
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self.host = LOOPBACK
        self.port = 0
        self.startup_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._container: Any = None

    @property
    def data_dir(self) -> Path | None:
        """The directory of the append-only file, or None without persistence."""
        return self._data_dir

    @property
    def url(self) -> str:
        """The ``redis://host:port/0`` URL of the running server.

        Raises:
            DevServerError: The server is not running.

        """
        if self._proc is None and self._container is None:
            raise DevServerError("Redis server is not running")
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> Self:
        """Start the server and wait until it answers PING.

        Returns:
            This server, for chaining.

        Raises:
            DevServerError: No binary, the process exited, or no PING reply within
                ``startup_timeout_s``; the message carries the server log tail.

        """
        if self._proc is not None or self._container is not None:
            return self
        began = time.monotonic()
        atexit.register(self.stop)
        try:
            binary = self._binary or shutil.which("redis-server")
            use_container = self._backend == "container" or (
                self._backend == "auto" and binary is None and docker_available()
            )
            if use_container:
                module = importlib.import_module("testcontainers.redis")
                self._container = module.RedisContainer(self._image)
                self._container.start()
                self.host = self._container.get_container_host_ip()
                self.port = int(self._container.get_exposed_port(6379))
            else:
                if binary is None:
                    raise DevServerError("redis-server not found on PATH")
                self._start_local(binary)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _start_local(self, binary: str) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="aeterna-redis-"))
        log = self._workdir / "redis.log"
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            self.port = self._requested_port or free_port()
            persistence = (
                ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self._data_dir)]
                if self._data_dir is not None
                else ["--appendonly", "no", "--dir", str(self._workdir)]
            )
            argv = [
                binary,
                "--port",
                str(self.port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                *persistence,
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                *self._extra_args,
            ]
            with log.open("ab") as out:
                self._proc = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            # A port race shows up as an immediate exit with a bind error in the log.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.1)
            if self._proc.poll() is None:
                return
            if attempt + 1 < attempts and "Address already in use" in _tail(log):
                continue
            raise DevServerError(f"redis-server exited ({self._proc.returncode}):\n{_tail(log)}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(
            host=self.host, port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        last: Exception | None = None
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError as exc:
                    last = exc
                if self._proc is not None and self._proc.poll() is not None:
                    raise DevServerError(
                        f"redis-server exited ({self._proc.returncode}):\n{self._log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise DevServerError(
                        f"Redis on port {self.port} not ready after {self.startup_timeout_s} s "
                        f"({last}):\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self) -> str:
        return _tail(self._workdir / "redis.log") if self._workdir else "(no log)"

    def kill(self) -> None:
        """Kill the local server process at once (SIGKILL, as in a crash), then clean up as
        :meth:`stop` does; a ``data_dir`` keeps what the server had fsynced."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def stop(self) -> None:
        """Stop the server and delete its working directory; idempotent."""
        atexit.unregister(self.stop)
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()
            self._container = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SentinelSet:
    """A throwaway Redis Sentinel deployment on loopback: one master, ``replicas`` replicas
    and three Sentinels (quorum 2) watching it under the name :attr:`master_name`, from
    Debian's ``redis-server`` and ``redis-sentinel`` (``make deps-system``). Nothing is
    persisted. The Sentinels declare the master down after ``down_after_ms`` of silence.

    Args:
        master_name: The monitored master's name (the path of the ``redis+sentinel://`` URL).
        replicas: Replicas of the master.
        down_after_ms: Sentinel ``down-after-milliseconds``.

    Raises:
        DevServerError: The binaries are missing or a server did not open its port in 20 s.
    """

    def __init__(
        self, master_name: str = "aeterna", *, replicas: int = 2, down_after_ms: int = 1000
    ) -> None:
        self.master_name = master_name
        self.data_ports = [free_port() for _ in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.down_after_ms = down_after_ms
        self.procs: list[subprocess.Popen[bytes]] = []
        self._root: Path | None = None

    @property
    def url(self) -> str:
        """``redis+sentinel://`` URL of the Sentinels and the master's name
        (:func:`aeterna_common.redis_client.redis_client`)."""
        hosts = ",".join(f"{LOOPBACK}:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.master_name}"

    def start(self) -> Self:
        """Start the data servers, then the Sentinels (returns when every port is open)."""
        server = shutil.which("redis-server")
        sentinel = shutil.which("redis-sentinel") or server
        if not server or not sentinel:
            raise DevServerError("redis-server and redis-sentinel are needed: make deps-system")
        self._root = Path(tempfile.mkdtemp(prefix="aeterna-sentinel-"))
        try:
            for i, port in enumerate(self.data_ports):
                args = [server, "--port", str(port), "--bind", LOOPBACK, "--save", ""]
                args += ["--appendonly", "no", "--dir", str(self._root)]
                if i:
                    args += ["--replicaof", LOOPBACK, str(self.data_ports[0])]
                self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
                self._wait_port(port)
            for port in self.sentinel_ports:
                conf = self._root / f"sentinel-{port}.conf"
                name = self.master_name
                conf.write_text(
                    f"port {port}\nbind {LOOPBACK}\ndir {self._root}\n"
                    f"sentinel monitor {name} {LOOPBACK} {self.data_ports[0]} 2\n"
                    f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {name} 10000\n"
                    f"sentinel parallel-syncs {name} 1\n"
                )
                extra = ["--sentinel"] if sentinel == server else []
                self.procs.append(
                    subprocess.Popen([sentinel, str(conf), *extra], stdout=subprocess.DEVNULL)
                )
                self._wait_port(port)
        except BaseException:
            self.stop()
            raise
        return self

    def kill_master(self) -> None:
        """SIGKILL the first master (the Sentinels then promote a replica)."""
        self.procs[0].kill()

    def stop(self) -> None:
        """Kill every process and remove the working directory."""
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(10)
        self.procs.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    @staticmethod
    def _wait_port(port: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection((LOOPBACK, port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise DevServerError(f"port {port} not open within {timeout_s} s") from None
                time.sleep(0.05)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
