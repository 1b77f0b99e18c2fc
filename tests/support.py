"""Shared helpers for lilota's tests: temporary databases, worker scripts, polling with a deadline,
and checks that no worker process outlives a test."""

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import unittest
import uuid
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lilota  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def load_schema_1_dump(db_path):
    """Make ``db_path`` the SQLite database that the release with schema version 1 wrote (the dump
    tests/fixtures/schema-1.sql, made by that release)."""
    with open(os.path.join(FIXTURES, "schema-1.sql")) as f:
        script = f.read()
    conn = sqlite3.connect(db_path)
    try:
        conn.executescript(script)
    finally:
        conn.close()


@contextlib.contextmanager
def old_schema(db_url, version):
    """``with old_schema(db_url, 2) as (conn, dialect):`` the tables of schema ``version`` as its
    release made them (a released version's statements are never edited) and lilota_meta saying
    so, in one transaction that the block may add rows to; committed when the block ends."""
    dialect = lilota._dialect_for_url(db_url)
    conn = dialect.connect()
    try:
        dialect.begin_migration(conn)
        conn.execute("CREATE TABLE lilota_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for each in range(1, version + 1):
            for statement in dialect.migrations()[each]:
                statement(conn) if callable(statement) else conn.execute(statement)
        conn.execute(f"INSERT INTO lilota_meta VALUES ('schema_version', '{version}')")
        yield conn, dialect
        conn.execute("COMMIT")
    finally:
        conn.close()


def _load_bench_common():
    """bench/common.py, the home of the helpers the benchmark and the tests share (bench/ runs
    without tests/ on its path; the tests load its module by file, under a name of its own)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("lilota_bench_common", os.path.join(ROOT, "bench", "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bench_common = _load_bench_common()
rss_kib = _bench_common.rss_kib   # resident memory of a process in KiB (None once it is gone)


def wait_until(predicate, timeout=20.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns a true value; fail the test after ``timeout`` seconds."""
    return _bench_common.wait_until(predicate, timeout, interval, message, error=AssertionError)


def race_in_processes(target, *args, processes=2, threads=4, timeout=300):
    """Call ``target(*args)`` (a module-level function, so that spawned processes can import it) in
    ``threads`` threads of each of ``processes`` new processes, all let go at once; return the
    results, one list per process with one result per thread. An exception in a process fails
    the test with its repr."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    started = [context.Process(target=_race_process, args=(target, args, threads, barrier, results))
               for _ in range(processes)]
    for process in started:
        process.start()
    try:
        outcomes = [results.get(timeout=timeout) for _ in started]
    finally:
        for process in started:
            process.join(30)
            if process.is_alive():
                process.kill()
    for outcome in outcomes:
        if not isinstance(outcome, list):
            raise AssertionError(f"a racing process failed: {outcome}")
    return outcomes


def _race_process(target, args, threads, barrier, results):
    import threading
    try:
        start = threading.Barrier(threads)
        outcome = [None] * threads

        def run(n):
            start.wait()
            outcome[n] = target(*args)
        workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
        barrier.wait(60)
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        results.put(outcome)
    except BaseException as exc:
        results.put(repr(exc))


def live_processes():
    """(pid, parent pid, session id) of every live (non-zombie) process, from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry), int(fields[1]), int(fields[3])   # state, ppid, pgrp, session


def child_pids(pid=None):
    """Pids of the live direct children of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return [p for p, ppid, _ in live_processes() if ppid == pid]


def session_members(sid):
    """Pids of the live processes in session ``sid`` (e.g. a program and the workers it started)."""
    return [p for p, _, session in live_processes() if session == sid]


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class AddInput:
    """The input model of the "add" task several tests register."""
    a: int
    b: int


@dataclass
class AddOutput:
    total: int


# --- backends -----------------------------------------------------------------------------------
#
# Tests run on SQLite. A test class decorated with @on_every_backend runs a second time on
# PostgreSQL (a subclass named <Class>OnPostgres) when LILOTA_TEST_POSTGRES_URL names a server;
# each such test gets a schema of its own, dropped afterwards. Without a server those tests are
# skipped with a message -- except under CI=true, where they fail.

POSTGRES_URL = os.environ.get("LILOTA_TEST_POSTGRES_URL", "")
IN_CI = os.environ.get("CI", "").lower() == "true"
_postgres_problem = []   # the reason PostgreSQL cannot be used, once known


def postgres_problem():
    """None when the PostgreSQL test server is usable, else why not."""
    if not _postgres_problem:
        if not POSTGRES_URL:
            problem = ("PostgreSQL tests need a server: set LILOTA_TEST_POSTGRES_URL, e.g. "
                       "postgresql://postgres@127.0.0.1:5432/test, and install a driver (pip install 'psycopg[binary]')")
        else:
            try:
                conn = lilota._dialect_for_url(POSTGRES_URL).connect()
                conn.close()
                problem = None
            except Exception as exc:
                problem = f"PostgreSQL test server {POSTGRES_URL} is not usable: {exc}"
        _postgres_problem.append(problem)
    return _postgres_problem[0]


def require_postgres(test):
    """Skip ``test`` (fail it under CI=true) when the PostgreSQL test server is not usable, or
    when LILOTA_TEST_BACKENDS=sqlite deselects PostgreSQL on purpose (CI runs it on some Pythons)."""
    if os.environ.get("LILOTA_TEST_BACKENDS", "").strip().lower() == "sqlite":
        test.skipTest("PostgreSQL deselected by LILOTA_TEST_BACKENDS=sqlite")
    problem = postgres_problem()
    if problem is not None:
        if IN_CI:
            test.fail(problem + " (CI=true: PostgreSQL tests must run)")
        test.skipTest(problem)


def postgres_admin(statement, url=None):
    """Run one statement on the test server (outside any test schema)."""
    conn = lilota._dialect_for_url(url or POSTGRES_URL).connect()
    try:
        if statement.lstrip().upper().startswith("SELECT"):
            return [tuple(row) for row in conn.execute(statement).fetchall()]   # (pg8000's rows are lists)
        return conn.execute(statement)
    finally:
        conn.close()


def with_query(url, **options):
    """``url`` with query options added."""
    extra = "&".join(f"{key}={value}" for key, value in options.items())
    return url + ("&" if "?" in url else "?") + extra


def on_every_backend(cls):
    """Run the test class on SQLite and again on PostgreSQL (see the section comment)."""
    module = sys.modules[cls.__module__]
    name = cls.__name__ + "OnPostgres"
    setattr(module, name, type(name, (cls,), {"backend": "postgres", "__module__": cls.__module__,
                                               "__qualname__": name}))
    return cls


def sqlite_only(reason):
    """Mark a test of a class run on every backend as meaningful on SQLite only."""
    def decorate(test):
        def run(self, *args, **kwargs):
            if self.backend != "sqlite":
                self.skipTest(f"SQLite only: {reason}")
            return test(self, *args, **kwargs)
        run.__name__, run.__doc__ = test.__name__, test.__doc__
        return run
    return decorate


def wake_signal(test):
    """A function ``changed(timeout)`` that says whether what wakes idle workers happened within
    ``timeout`` seconds on ``test``'s database: a notification on PostgreSQL, a new data_version
    on SQLite (both watched from a connection of the test's own, from this call on)."""
    import select
    if test.backend == "sqlite":
        watcher = sqlite3.connect(test.db_path)
        test.addCleanup(watcher.close)
        start = watcher.execute("PRAGMA data_version").fetchone()[0]

        def changed(timeout):
            try:
                wait_until(lambda: watcher.execute("PRAGMA data_version").fetchone()[0] != start, timeout)
                return True
            except AssertionError:
                return False
        return changed
    listener = lilota._PostgresListener(lilota._dialect_for_url(test.db_url))
    test.addCleanup(listener.close)
    fd = listener.fileno()
    return lambda timeout: bool(select.select([fd], [], [], timeout)[0])


def sqlalchemy_engine(test):
    """A SQLAlchemy engine on ``test``'s database (its SQLite file, or its PostgreSQL schema),
    disposed of after the test; the test is skipped without SQLAlchemy, except in CI."""
    import importlib
    try:
        sqlalchemy = importlib.import_module("sqlalchemy")
    except ImportError:
        if IN_CI:
            raise
        test.skipTest("SQLAlchemy (a test-time dependency) is not installed")
    if test.backend == "sqlite":
        engine = sqlalchemy.create_engine("sqlite:///" + test.db_path)
    else:
        # The test's schema first on the search path, set on each new connection and committed
        # (a SET in a transaction rolled back is undone): pg8000 takes no "options".
        engine = sqlalchemy.create_engine(POSTGRES_URL.split("?")[0])

        @sqlalchemy.event.listens_for(engine, "connect")
        def use_the_tests_schema(dbapi_connection, _):
            cursor = dbapi_connection.cursor()
            cursor.execute(f'SET search_path TO "{test.schema}"')
            cursor.close()
            dbapi_connection.commit()
    test.addCleanup(engine.dispose)
    return sqlalchemy, engine


class TempDirTestCase(unittest.TestCase):
    """A test with its own directory and database (a SQLite file, or a PostgreSQL schema for
    classes run on every backend), removed afterwards."""

    backend = "sqlite"

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(prefix="lilota-test-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.db_path = os.path.join(self.dir, "lilota.db")
        self.db_url = "sqlite:///" + self.db_path
        self.schema = None
        if self.backend == "postgres":
            require_postgres(self)
            self.db_path = None
            self.schema = "lilota_test_" + uuid.uuid4().hex[:16]
            self.db_url = with_query(POSTGRES_URL, schema=self.schema)
            self.addCleanup(postgres_admin, f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        self.addCleanup(self._close_storages)

    def db_execute(self, statement, *params):
        """Run one statement (``?`` placeholders) on a connection of the test's own to its database
        and return the rows ([] for a statement without any)."""
        dialect = lilota._dialect_for_url(self.db_url)
        conn = dialect.connect()
        try:
            cursor = conn.execute(dialect.sql(statement), params)
            rows = cursor.fetchall()   # [] for a statement without a result
            # Ids as the text SQLite stores, whatever type the driver gives a uuid column.
            return [tuple(str(v) if isinstance(v, uuid.UUID) else v for v in row) for row in rows]
        finally:
            conn.close()

    def worker_nodes(self, status=None):
        """(id, pid, status, name) of the worker nodes, oldest first ([] before the schema exists)."""
        try:
            rows = self.db_execute("SELECT id, pid, status, name FROM lilota_node WHERE type = 'worker' "
                                   "ORDER BY created_at")
        except Exception as exc:
            if "no such table" not in str(exc) and "does not exist" not in str(exc):
                raise
            return []
        return [r for r in rows if status is None or r[2] == status]

    def wait_workers_running(self, count, timeout=30):
        """Wait until ``count`` worker processes have started executing (idle in their loop)."""
        return wait_until(lambda: len(self.worker_nodes("running")) >= count, timeout,
                          message=f"{count} running worker node(s)")

    def db_time(self, seconds):
        """Epoch seconds as the test database stores a time (for db_execute parameters)."""
        return lilota._dialect_for_url(self.db_url).encode_time(seconds)

    def _close_storages(self):
        for key, storage in list(lilota.Storage._instances.items()):
            if self.dir in key or (self.schema and f"schema={self.schema}" in key):
                storage.close()
                del lilota.Storage._instances[key]

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, name, text):
        """Write a file (dedented) into the test directory and return its path."""
        path = self.path(name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))
        return path

    def worker_script(self, body, name="worker_script.py", db_url=None):
        """A worker script: imports, ``worker = LilotaWorker(db_url)``, ``body``, ``worker.start()``."""
        header = (
            "import os, sys, time, json\n"
            "from dataclasses import dataclass\n"
            "from datetime import timedelta\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "from lilota import LilotaWorker, TaskProgress, TaskContext\n"
            f"worker = LilotaWorker(db_url={db_url or self.db_url!r})\n"
        )
        footer = "\nif __name__ == '__main__':\n    worker.start()\n"
        return self.write(name, header + textwrap.dedent(body).strip("\n") + "\n" + footer)

    def start_lilota(self, script, number_of_workers=2, **options):
        """A started Lilota that is stopped (quickly) when the test ends."""
        app = lilota.Lilota(self.db_url, script_path=script, number_of_workers=number_of_workers, **options)
        app.start()
        self.addCleanup(self._stop_and_check, app)
        return app

    def _stop_and_check(self, app):
        handles = [h for h in app._handles if h is not None]
        pids = [h.process.pid for h in handles]
        app.stop(timeout=5)
        for pid in pids:
            wait_until(lambda: not process_alive(pid), 10, message=f"worker {pid} to exit")

    def run_python(self, *args, timeout=120, env=None, **kwargs):
        """Run ``python args...`` in the test directory; return the CompletedProcess."""
        environment = dict(os.environ, PYTHONPATH=ROOT)
        environment.update(env or {})
        return subprocess.run([sys.executable, *args], cwd=self.dir, env=environment, timeout=timeout,
                              capture_output=True, text=True, **kwargs)

    def popen_python(self, *args, env=None, **kwargs):
        """Start ``python args...`` in its own process group; it is killed (group) at cleanup."""
        environment = dict(os.environ, PYTHONPATH=ROOT)
        environment.update(env or {})
        proc = subprocess.Popen([sys.executable, *args], cwd=self.dir, env=environment,
                                start_new_session=True, **kwargs)

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        self.addCleanup(kill)
        return proc
