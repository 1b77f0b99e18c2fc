"""SQLite storage: schema, pragmas, the claim (order, exclusivity, pre-3.35 fallback), concurrent
schema creation, file modes and the specific errors for bad URLs and bad database files."""

import multiprocessing
import os
import sqlite3
import shutil
import stat
import subprocess
import sys
import threading
import time
import unittest
import uuid
from datetime import datetime, timedelta, timezone
from unittest import mock

import support

import lilota
from lilota import (ConfigurationError, CorruptDatabaseError, DatabaseBusyError, DatabaseFullError,
                    DatabaseUnavailableError, Lilota, LilotaScheduler, LilotaWorker, ReadOnlyDatabaseError,
                    SchemaVersionError, TaskStatus)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: SQLite 3.35+ runs UPDATE ... RETURNING; before that lilota claims through its fallback (a supported
#: platform), so the RETURNING path can only be forced, and checked, where SQLite has it.
SQLITE_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)


# --- code run in child processes (module level: started with "spawn") ----------------------------

def _claim_until_empty(url, node_id, fallback, start, results):
    import lilota as lil
    try:
        if fallback:
            lil.SQLiteDialect.returning = False
        storage = lil.Storage.for_url(url)
        storage.ensure_ready()
        prepared = storage.prepare_claim([])
        start.wait(30)
        claimed = []
        while True:
            task = storage.claim(prepared, node_id, os.getpid())
            if task is None:
                break
            claimed.append(str(task.id))
        storage.close()
        results.put((node_id, claimed, None))
    except BaseException as exc:  # report, never hang the parent
        results.put((node_id, [], repr(exc)))


def _create_schema(url, start, results):
    import lilota as lil
    try:
        start.wait(30)
        storage = lil.Storage.for_url(url)
        storage.ensure_ready()
        storage.close()
        results.put(None)
    except BaseException as exc:
        import traceback
        results.put(repr(exc) + "\n" + traceback.format_exc())


class StorageTestCase(support.TempDirTestCase):
    def sql(self, query, params=(), path=None):
        """Run one statement on a separate sqlite3 connection and return all rows."""
        conn = sqlite3.connect(path or self.db_path, isolation_level=None)
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    def count_rows(self):
        return self.sql("SELECT COUNT(*) FROM lilota_task")[0][0]

    def forget_storages(self):
        """Close this test's cached connections so that the next use opens the file afresh."""
        self._close_storages()

    def spawn_context(self):
        return multiprocessing.get_context("spawn")

    def join_all(self, processes):
        for p in processes:
            p.join(60)
        for p in processes:
            if p.is_alive():
                p.kill()
                p.join(5)
                self.fail(f"child process {p.pid} did not finish")

    def run_together(self, target, argument_lists):
        """Start one spawned process per argument list, release them at the same moment (each
        target gets the start Event and a result Queue last), and return what each put."""
        ctx = self.spawn_context()
        start, results = ctx.Event(), ctx.Queue()
        processes = [ctx.Process(target=target, args=(*args, start, results)) for args in argument_lists]
        for p in processes:
            p.start()
        start.set()
        outcomes = [results.get(timeout=60) for _ in processes]
        self.join_all(processes)
        results.close()
        results.join_thread()
        return outcomes


class SchemaTests(StorageTestCase):
    def test_tables_and_schema_version(self):
        LilotaScheduler(self.db_url).storage.ensure_ready()
        tables = {r[0] for r in self.sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertLessEqual({"lilota_task", "lilota_node", "lilota_meta", "lilota_step", "lilota_log",
                              "lilota_attempt"}, tables)
        self.assertEqual(self.sql("SELECT value FROM lilota_meta WHERE key = 'schema_version'"), [("7",)])
        self.assertEqual(lilota.SCHEMA_VERSION, 7)
        indexes = {r[0] for r in self.sql("SELECT name FROM sqlite_master WHERE type = 'index'")}
        self.assertIn("lilota_task_queue", indexes)
        columns = {r[1] for r in self.sql("PRAGMA table_info(lilota_task)")}
        for name in ("id", "name", "pid", "status", "run_at", "attempts", "max_attempts", "timeout", "expires_at",
                     "progress_percentage", "start_date_time", "end_date_time", "input", "output", "error",
                     "locked_by", "locked_at", "queue", "unique_key", "has_dependents", "watched"):
            self.assertIn(name, columns)

    def test_reopening_keeps_data_and_version(self):
        scheduler = LilotaScheduler(self.db_url)
        task_id = scheduler.schedule("x", {"a": 1})
        self.forget_storages()
        self.assertEqual(LilotaScheduler(self.db_url).get_task_by_id(task_id).input, {"a": 1})
        self.assertEqual(self.sql("SELECT COUNT(*) FROM lilota_meta WHERE key = 'schema_version'"), [(1,)])

    def test_wal_mode(self):
        LilotaScheduler(self.db_url).storage.ensure_ready()
        self.assertEqual(self.sql("PRAGMA journal_mode")[0][0].lower(), "wal")

    def _synchronous(self, url):
        storage = lilota.Storage.for_url(url)
        storage.ensure_ready()
        with storage._guard as conn:
            return conn.execute("PRAGMA synchronous").fetchone()[0]

    def test_synchronous_normal_by_default(self):
        self.assertEqual(self._synchronous(self.db_url), 1)  # NORMAL

    def test_synchronous_full_from_url(self):
        self.assertEqual(self._synchronous(self.db_url + "?synchronous=FULL"), 2)  # FULL

    def test_newer_schema_version_is_refused(self):
        scheduler = LilotaScheduler(self.db_url)
        scheduler.schedule("x", 1)
        self.forget_storages()
        newer = str(lilota.SCHEMA_VERSION + 1)
        self.sql("UPDATE lilota_meta SET value = ? WHERE key = 'schema_version'", (newer,))
        with self.assertRaises(SchemaVersionError) as cm:
            LilotaScheduler(self.db_url).schedule("x", 2)
        self.assertIn(newer, str(cm.exception))
        self.assertIn("upgrade", str(cm.exception).lower())
        self.assertIsInstance(cm.exception, lilota.StorageError)
        self.assertEqual(self.count_rows(), 1)
        self.assertEqual(self.sql("SELECT value FROM lilota_meta WHERE key = 'schema_version'"), [(newer,)])

    def test_file_mode_is_owner_only(self):
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)
        LilotaScheduler(self.db_url).schedule("x", 1)
        for suffix in ("", "-wal", "-shm"):
            path = self.db_path + suffix
            if suffix and not os.path.exists(path):
                continue
            with self.subTest(file=os.path.basename(path)):
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_concurrent_schema_creation(self):
        outcomes = self.run_together(_create_schema, [(self.db_url,)] * 6)
        self.assertEqual(outcomes, [None] * 6, "every process must open the new database")
        self.assertEqual(self.sql("SELECT value FROM lilota_meta WHERE key = 'schema_version'"),
                         [(str(lilota.SCHEMA_VERSION),)])
        tables = {r[0] for r in self.sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertLessEqual({"lilota_task", "lilota_node", "lilota_meta", "lilota_step", "lilota_log",
                              "lilota_attempt"}, tables)
        self.assertEqual(self.sql("PRAGMA journal_mode")[0][0].lower(), "wal")


class ClaimTests(StorageTestCase):
    def setUp(self):
        super().setUp()
        self.scheduler = LilotaScheduler(self.db_url)
        self.storage = self.scheduler.storage
        self.storage.ensure_ready()

    def claim_all(self, node_id=None):
        node_id = node_id or str(uuid.uuid4())
        prepared = self.storage.prepare_claim([])
        claimed = []
        while True:
            task = self.storage.claim(prepared, node_id, os.getpid())
            if task is None:
                return claimed
            claimed.append(task)

    def fill_ordering_queue(self):
        now = datetime.now(timezone.utc)
        ids = {}
        for label, priority, offset in [("a", 0, -10), ("b", 5, -1), ("c", 5, -5), ("d", 0, -20),
                                        ("e", 10, 3600), ("f", -3, -100), ("g", 10, -0.5)]:
            ids[label] = self.scheduler.schedule(label, None, priority=priority,
                                                 run_at=now + timedelta(seconds=offset))
        return ids

    def check_order(self):
        ids = self.fill_ordering_queue()
        claimed = self.claim_all()
        self.assertEqual([t.name for t in claimed], ["g", "c", "b", "d", "a", "f"])
        for task in claimed:
            self.assertEqual(task.status, TaskStatus.RUNNING)
            self.assertEqual(task.attempts, 1)
            self.assertIsInstance(task.locked_by, uuid.UUID)
        self.assertEqual(self.scheduler.get_task_by_id(ids["e"]).status, TaskStatus.SCHEDULED)
        rows = dict(self.sql("SELECT name, status FROM lilota_task"))
        self.assertEqual(rows, {"a": "running", "b": "running", "c": "running", "d": "running",
                                "e": "scheduled", "f": "running", "g": "running"})

    @unittest.skipUnless(SQLITE_HAS_RETURNING, f"SQLite {sqlite3.sqlite_version} < 3.35 has no RETURNING; "
                                               f"lilota uses the fallback here (tested below)")
    def test_returning_is_the_default_where_sqlite_has_it(self):
        self.assertTrue(lilota.SQLiteDialect.returning, "this SQLite has RETURNING; the main path is used")

    def test_claim_order(self):
        # Whichever path this SQLite uses by default (RETURNING from 3.35 on, the fallback before).
        self.check_order()

    @unittest.skipUnless(SQLITE_HAS_RETURNING, f"SQLite {sqlite3.sqlite_version} < 3.35 has no RETURNING")
    def test_claim_order_with_returning(self):
        with mock.patch.object(lilota.SQLiteDialect, "returning", True):
            self.check_order()

    def test_claim_order_fallback_without_returning(self):
        with mock.patch.object(lilota.SQLiteDialect, "returning", False):
            self.check_order()

    def test_claim_sets_running_fields(self):
        task_id = self.scheduler.schedule("x", {"v": 1}, timeout=7, max_attempts=2)
        node = str(uuid.uuid4())
        for returning in (True, False):
            with self.subTest(returning=returning), \
                    mock.patch.object(lilota.SQLiteDialect, "returning", returning):
                if returning and not SQLITE_HAS_RETURNING:
                    self.skipTest(f"SQLite {sqlite3.sqlite_version} < 3.35 has no RETURNING")
                self.sql("UPDATE lilota_task SET status = 'scheduled', attempts = 0")  # queued again for this path
                [task] = self.claim_all(node)
                self.assertEqual(task.id, task_id)
                self.assertEqual(task.pid, os.getpid())
                self.assertEqual(str(task.locked_by), node)
                self.assertEqual(task.timeout, timedelta(seconds=7))
                self.assertEqual(task.max_attempts, 2)
                self.assertIsNotNone(task.start_date_time)
                self.assertAlmostEqual((task.expires_at - task.start_date_time).total_seconds(), 7, places=3)
                self.assertEqual(task.input, {"v": 1})

    def test_next_due_time_is_read_from_an_index(self):
        """An idle worker asks when the next queued task falls due on every wake: with many delayed
        tasks a scan would cost each worker a pass over the whole queue."""
        self.scheduler.schedule_many("x", list(range(50)), delay=3600)
        plan = self.sql("EXPLAIN QUERY PLAN " + self.storage._next_run_at_sql, (time.time(),))
        details = " ".join(str(row[-1]) for row in plan)
        self.assertIn("lilota_task_due", details, details)
        self.assertNotIn("SCAN", details.upper().replace("SCAN LILOTA_TASK USING", ""), details)

    def test_claim_uses_the_queue_index(self):
        for i in range(50):
            self.scheduler.schedule("x", i, priority=i % 3)
        now = time.time()
        params = {"now": now, "node": str(uuid.uuid4()), "pid": 1, "id": "x"}
        with mock.patch.object(lilota.SQLiteDialect, "returning", False):
            dialect = lilota._dialect_for_url(self.db_url)
            prepared = dialect.prepare_claim((), ("default",))
            pick, extra = prepared.sql[0], prepared.params
        plan = self.sql("EXPLAIN QUERY PLAN " + pick, dict(params, **extra))
        details = " | ".join(str(r[-1]) for r in plan)
        self.assertIn("lilota_task_queue", details, details)
        self.assertNotIn("TEMP B-TREE", details.upper(), "the index must also give the order: " + details)
        if not SQLITE_HAS_RETURNING:
            return  # SQLite < 3.35 cannot prepare the RETURNING statement; the fallback is checked above
        # The single UPDATE ... RETURNING statement reads the same index.
        with mock.patch.object(lilota.SQLiteDialect, "returning", True):
            dialect = lilota._dialect_for_url(self.db_url)
            prepared = dialect.prepare_claim((("x", 5.0, 1, True),), ("default",))
        plan = self.sql("EXPLAIN QUERY PLAN " + prepared.sql, dict(params, **prepared.params))
        details = " | ".join(str(r[-1]) for r in plan)
        self.assertIn("lilota_task_queue", details, details)
        # A queue without settings: the claim reads neither lilota_queue nor its rate ring, but the
        # settings' version; the same index.
        prepared = dialect.prepare_claim((), ("default",), free=("default",), version="0")
        self.assertNotIn("lilota_queue ", prepared.sql)
        self.assertNotIn("lilota_queue_rate", prepared.sql)
        plan = self.sql("EXPLAIN QUERY PLAN " + prepared.sql, dict(params, **prepared.params))
        details = " | ".join(str(r[-1]) for r in plan)
        self.assertIn("lilota_task_queue", details, details)
        # Serving several queues: each queue's head is one probe of the index, in its order.
        with mock.patch.object(lilota.SQLiteDialect, "returning", True):
            prepared = dialect.prepare_claim((), ("images", "default", "mail"))
        plan = self.sql("EXPLAIN QUERY PLAN " + prepared.sql, dict(params, **prepared.params))
        details = " | ".join(str(r[-1]) for r in plan)
        self.assertEqual(details.count("USING INDEX lilota_task_queue"), 3, details)
        self.assertNotIn("SCAN LILOTA_TASK", details.upper().replace("SCAN LILOTA_TASK USING", ""), details)

    def test_threads_never_claim_the_same_task(self):
        self._claim_in_threads()

    def test_threads_never_claim_the_same_task_fallback(self):
        with mock.patch.object(lilota.SQLiteDialect, "returning", False):
            self._claim_in_threads()

    def _claim_in_threads(self):
        ids = {str(i) for i in self.scheduler.schedule_many("x", list(range(300)))}
        prepared = self.storage.prepare_claim([])
        results, errors = {}, []
        nodes = [str(uuid.uuid4()) for _ in range(8)]

        def run(n):
            mine = []
            try:
                while True:
                    task = self.storage.claim(prepared, nodes[n], os.getpid())
                    if task is None:
                        break
                    mine.append(str(task.id))
            except BaseException as exc:
                errors.append(exc)
            results[n] = mine

        threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        claimed = [i for mine in results.values() for i in mine]
        self.assertEqual(len(claimed), len(set(claimed)), "a task was claimed twice")
        self.assertEqual(set(claimed), ids)

    def _claim_in_processes(self, fallback):
        ids = {str(i) for i in self.scheduler.schedule_many("x", list(range(400)))}
        nodes = [str(uuid.uuid4()) for _ in range(8)]
        outcomes = self.run_together(_claim_until_empty, [(self.db_url, node, fallback) for node in nodes])
        self.assertEqual([error for _, _, error in outcomes], [None] * 8)
        claimed = [i for _, mine, _ in outcomes for i in mine]
        self.assertEqual(len(claimed), len(set(claimed)), "a task was claimed by two processes")
        self.assertEqual(set(claimed), ids)
        # Each task is locked by the node that reported it, and was claimed exactly once.
        stored = {row[0]: (row[1], row[2], row[3]) for row in
                  self.sql("SELECT id, status, locked_by, attempts FROM lilota_task")}
        for node, mine, _ in outcomes:
            for task_id in mine:
                self.assertEqual(stored[task_id], ("running", node, 1))

    def test_processes_never_claim_the_same_task(self):
        self._claim_in_processes(fallback=False)

    def test_processes_never_claim_the_same_task_fallback(self):
        self._claim_in_processes(fallback=True)


class UrlTests(support.TempDirTestCase):
    def test_bad_urls(self):
        cases = [
            ("lilota.db", "sqlite:///"),
            ("mysql://x", "mysql"),
            ("sqlite://host/x.db", "host"),
            (self.db_url + "?foo=1", "foo"),
            (self.db_url + "?timeout=soon", "timeout"),
            (self.db_url + "?synchronous=SOMETIMES", "synchronous"),
            (42, "42"),
        ]
        for url, fragment in cases:
            for make in (LilotaScheduler, LilotaWorker, Lilota.scheduler):
                with self.subTest(url=url, side=getattr(make, "__name__", make)):
                    with self.assertRaises(ConfigurationError) as cm:
                        make(url)
                    self.assertIn(fragment, str(cm.exception))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "x.db")))

    def test_good_urls(self):
        relative = os.path.relpath(self.path("rel.db"))
        for url in (self.db_url, "sqlite:///" + relative, self.db_url + "?timeout=1.5&synchronous=full"):
            with self.subTest(url=url):
                LilotaScheduler(url).schedule("x", 1)

    def _forget_memory(self):
        storage = lilota.Storage._instances.pop("sqlite::memory:", None)
        if storage is not None:
            storage.close()

    def test_memory_url_refused_for_worker_processes(self):
        self.addCleanup(self._forget_memory)
        script = self.worker_script("""
            @worker.register("x")
            def x(data):
                return data
        """)
        app = Lilota("sqlite:///:memory:", script_path=script, number_of_workers=1)
        children = set(support.child_pids())
        with self.assertRaises(ConfigurationError) as cm:
            app.start()
        self.assertIn("memory", str(cm.exception))
        self.assertFalse(app.is_running)
        self.assertEqual(set(support.child_pids()) - children, set(), "no worker process may start")

    def test_memory_url_in_process(self):
        self.addCleanup(self._forget_memory)
        scheduler = Lilota.scheduler("sqlite:///:memory:")
        worker = LilotaWorker("sqlite:///:memory:")

        @worker.register("add")
        def add(data):
            return {"total": data["a"] + data["b"]}

        task_id = scheduler.schedule("add", {"a": 2, "b": 3})
        [task] = worker.run_pending()
        self.assertEqual(task.id, task_id)
        self.assertEqual(scheduler.get_task_by_id(task_id).output, {"total": 5})
        self.assertEqual(scheduler.wait(task_id, timeout=5).status, TaskStatus.COMPLETED)


class DatabaseErrorTests(StorageTestCase):
    def test_missing_directory(self):
        url = "sqlite:///" + os.path.join(self.dir, "no", "such", "dir", "x.db")
        scheduler = LilotaScheduler(url)
        with self.assertRaises(DatabaseUnavailableError) as cm:
            scheduler.schedule("x", 1)
        self.assertIn("does not exist", str(cm.exception))
        self.assertIn(os.path.join(self.dir, "no", "such", "dir"), str(cm.exception))
        with self.assertRaises(DatabaseUnavailableError):
            LilotaWorker(url).run_pending()
        self.assertFalse(os.path.exists(os.path.join(self.dir, "no")))

    def test_corrupt_file(self):
        with open(self.db_path, "wb") as f:
            f.write(b"this is not a database, just some garbage bytes\x00\xff" * 200)
        with self.assertRaises(CorruptDatabaseError) as cm:
            LilotaScheduler(self.db_url).schedule("x", 1)
        self.assertIn(self.db_path, str(cm.exception))
        self.assertIsInstance(cm.exception, lilota.StorageError)
        with self.assertRaises(CorruptDatabaseError):
            LilotaScheduler(self.db_url).get_task_by_id(uuid.uuid4())

    def test_full_database(self):
        scheduler = LilotaScheduler(self.db_url)
        kept = scheduler.schedule("x", {"small": 1})
        storage = scheduler.storage
        with storage._guard as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages + 4}")
        big = {"blob": "x" * 200_000}
        stored = 0
        with self.assertRaises(DatabaseFullError) as cm:
            for _ in range(20):
                scheduler.schedule("x", big)
                stored += 1
        self.assertIn("full", str(cm.exception))
        self.assertEqual(stored, 0, "200 kB cannot fit into 4 spare pages")
        with self.assertRaises(DatabaseFullError):
            scheduler.schedule_many("x", [{"small": 2}, big])
        # Nothing was lost or half-written.
        self.assertEqual(self.count_rows(), 1)
        self.assertEqual(scheduler.get_task_by_id(kept).input, {"small": 1})

    def test_lock_held_past_busy_timeout(self):
        url = self.db_url + "?timeout=0.2"
        scheduler = LilotaScheduler(url)
        scheduler.storage.ensure_ready()
        blocker = sqlite3.connect(self.db_path, isolation_level=None)
        self.addCleanup(blocker.close)
        blocker.execute("BEGIN IMMEDIATE")
        self.addCleanup(lambda: blocker.in_transaction and blocker.execute("ROLLBACK"))
        started = time.monotonic()
        with self.assertRaises(DatabaseBusyError) as cm:
            scheduler.schedule("x", 1)
        self.assertGreaterEqual(time.monotonic() - started, 0.15)
        self.assertIn("locked", str(cm.exception))
        self.assertIn("timeout", str(cm.exception))
        worker = LilotaWorker(url)
        with self.assertRaises(DatabaseBusyError):
            worker.run_pending()
        blocker.execute("ROLLBACK")
        # Usable again once the lock is gone.
        task_id = scheduler.schedule("x", 2)
        self.assertEqual(scheduler.get_task_by_id(task_id).status, TaskStatus.SCHEDULED)

    def test_read_only_file(self):
        scheduler = LilotaScheduler(self.db_url)
        scheduler.schedule("x", 1)
        self.forget_storages()
        os.chmod(self.db_path, 0o400)
        self.addCleanup(os.chmod, self.db_path, 0o600)
        out = self.schedule_without_root_powers(self.db_url)
        self.assertIn("ReadOnlyDatabaseError", out)
        self.assertIn("read-only", out)
        self.assertEqual(self.count_rows(), 1)

    def schedule_without_root_powers(self, url):
        """Run ``LilotaScheduler(url).schedule('x', 2)`` in a process that file modes bind and return
        what it printed (the exception type and message, or 'ok'). Root ignores file modes, so under
        root the process runs without the capabilities that let it (util-linux's setpriv)."""
        code = ("import sys, lilota\n"
                "try:\n"
                "    lilota.LilotaScheduler(sys.argv[1]).schedule('x', 2)\n"
                "    print('ok')\n"
                "except lilota.LilotaError as exc:\n"
                "    print(type(exc).__name__, exc)\n")
        command = [sys.executable, "-c", code, url]
        if IS_ROOT:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                self.skipTest("running as root without util-linux's setpriv: cannot make file modes bind")
            command = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"] + command
        result = subprocess.run(command, env=dict(os.environ, PYTHONPATH=support.ROOT), capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_read_only_connection(self):
        """A database SQLite opens read-only (here through a mode=ro URI, which binds root too)."""
        scheduler = LilotaScheduler(self.db_url)
        scheduler.schedule("x", 1)
        self.forget_storages()
        real_connect = sqlite3.connect

        def read_only_connect(path, *args, **kwargs):
            return real_connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)

        with mock.patch.object(lilota.sqlite3, "connect", read_only_connect):
            with self.assertRaises(ReadOnlyDatabaseError) as cm:
                LilotaScheduler(self.db_url).schedule("x", 2)
        self.assertIn("read-only", str(cm.exception))
        self.forget_storages()
        self.assertEqual(self.count_rows(), 1)

    def test_read_only_directory_for_new_file(self):
        directory = self.path("ro")
        os.mkdir(directory, 0o500)
        self.addCleanup(os.chmod, directory, 0o700)
        out = self.schedule_without_root_powers("sqlite:///" + os.path.join(directory, "x.db"))
        self.assertIn("ReadOnlyDatabaseError", out)
        self.assertIn(directory, out)
        self.assertFalse(os.path.exists(os.path.join(directory, "x.db")))


if __name__ == "__main__":
    unittest.main()
