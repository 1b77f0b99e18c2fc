"""The dialect hook: a database lilota does not know, plugged in by a user with
``register_dialect()`` and the documented ``Dialect`` hooks only, runs the whole API."""

import sqlite3
import unittest

from support import TempDirTestCase

import lilota
from lilota import Lilota, LilotaScheduler, LilotaWorker, TaskStatus

# A third-party dialect, as a user would write it: SQLite through the plain DB-API (wrapped by
# DBAPIConnection), "numeric" placeholders, a claim in three statements, no change counter and no
# listener. Nothing in it comes from SQLiteDialect but the DDL text.
DIALECT_SOURCE = '''
import sqlite3, urllib.parse
import lilota


class NumericSQLiteDialect(lilota.Dialect):
    name = "numeric-sqlite"
    placeholder = "?NNN"       # translated by sql() below: ?1, ?2, ...
    begin_write_sql = "BEGIN IMMEDIATE"

    def __init__(self, url, parts):
        super().__init__(url, parts)
        self.path = parts.path[1:]
        self.statements = []

    def sql(self, text):
        parts = text.split("?")
        return parts[0] + "".join(f"?{i}{part}" for i, part in enumerate(parts[1:], 1))

    def connect(self):
        raw = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        raw.execute("PRAGMA journal_mode=WAL")
        return lilota.DBAPIConnection(raw)

    def migrations(self):
        return lilota.SQLiteDialect("sqlite:///x", urllib.parse.urlsplit("sqlite:///x")).migrations()

    def prepare_claim(self, defaults, queues, free=(), version=None):
        return ({name: (timeout, attempts, int(keep)) for name, timeout, attempts, keep in defaults}, queues)

    def claim(self, conn, prepared, node_id, pid, now):
        defaults, queues = prepared
        conn.execute("BEGIN IMMEDIATE")
        try:
            marks = ", ".join("?" for _ in queues)
            row = conn.execute(self.sql(f"SELECT id, name, timeout FROM lilota_task WHERE status = 'scheduled' "
                                        f"AND run_at <= ? AND queue IN ({marks}) ORDER BY priority DESC, run_at "
                                        f"LIMIT 1"), (now, *queues)).fetchone()
            if row is not None:
                task_id, name, timeout = row
                default_timeout, attempts, keep = defaults.get(name, (None, 1, 1))
                timeout = timeout if timeout is not None else default_timeout
                conn.execute(self.sql(
                    "UPDATE lilota_task SET status = 'running', pid = ?, attempts = attempts + 1, locked_by = ?, "
                    "locked_at = ?, start_date_time = ?, end_date_time = NULL, progress_percentage = 0, "
                    "timeout = ?, max_attempts = COALESCE(max_attempts, ?), keep_input = COALESCE(keep_input, ?), "
                    "expires_at = ? WHERE id = ?"),
                    (pid, node_id, now, now, timeout, attempts, keep, None if timeout is None else now + timeout,
                     task_id))
                row = conn.execute(self.sql(f"SELECT {lilota._TASK_SELECT} FROM lilota_task WHERE id = ?"),
                                   (task_id,)).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return row


lilota.register_dialect("numsqlite", NumericSQLiteDialect)
'''


class RegisteredDialectTest(TempDirTestCase):

    def setUp(self):
        super().setUp()
        namespace = {}
        exec(compile(DIALECT_SOURCE, "numeric_dialect.py", "exec"), namespace)
        self.addCleanup(lilota._DIALECTS.pop, "numsqlite", None)
        self.write("numeric_dialect.py", DIALECT_SOURCE)
        self.db_url = "numsqlite:///" + self.db_path

    def test_the_api_runs_on_a_registered_dialect(self):
        scheduler = LilotaScheduler(self.db_url)
        self.assertEqual(type(scheduler.storage.dialect).__name__, "NumericSQLiteDialect")
        worker = LilotaWorker(self.db_url, retry_delay=0)
        worker.register("add", timeout=60, max_attempts=2)(lambda data: {"sum": data["a"] + data["b"]})
        worker.register("boom", max_attempts=2)(lambda data: 1 / 0)

        added = scheduler.schedule("add", {"a": 1, "b": 2})
        boom = scheduler.schedule("boom", None)
        cancelled = scheduler.schedule_many("add", [{"a": 0, "b": 0}])[0]
        self.assertTrue(scheduler.cancel(cancelled))
        worker.run_pending()

        task = scheduler.wait(added, timeout=5)
        self.assertEqual((task.status, task.output, task.max_attempts), (TaskStatus.COMPLETED, {"sum": 3}, 2))
        self.assertEqual(task.timeout.total_seconds(), 60)
        failed = scheduler.get_task_by_id(boom)
        self.assertEqual((failed.status, failed.attempts, failed.error["type"]),
                         (TaskStatus.FAILED, 2, "ZeroDivisionError"))
        self.assertEqual(scheduler.get_task_by_id(cancelled).status, TaskStatus.CANCELLED)
        self.assertTrue(scheduler.retry(cancelled))
        worker.run_pending()
        self.assertEqual(scheduler.get_task_by_id(cancelled).status, TaskStatus.COMPLETED)
        self.assertEqual(scheduler.cleanup(older_than=0)["tasks"], 3)
        # The rows are where the dialect put them: a plain SQLite file.
        conn = sqlite3.connect(self.db_path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM lilota_task").fetchone()[0], 0)

    def test_worker_processes_run_on_a_registered_dialect(self):
        """Each worker process registers the dialect itself (the script imports it) and the idle
        workers, without a change counter or listener, still find tasks scheduled elsewhere."""
        script = self.write("numeric_worker.py", f"""
            import sys
            sys.path.insert(0, {self.dir!r})
            import numeric_dialect
            from lilota import LilotaWorker
            worker = LilotaWorker({self.db_url!r})

            @worker.register("double")
            def double(n):
                return n * 2

            if __name__ == "__main__":
                worker.start()
        """)
        app = Lilota(self.db_url, script_path=script, number_of_workers=2)
        app.start()
        self.addCleanup(app.stop, 5)
        ids = [app.schedule("double", n) for n in range(20)]
        other = LilotaScheduler(self.db_url)
        ids.append(other.schedule("double", 100))
        outputs = [app.wait(task_id, timeout=30).output for task_id in ids]
        self.assertEqual(outputs, [n * 2 for n in range(20)] + [200])


class DBAPIConnectionTest(unittest.TestCase):
    """The wrapper of a DB-API driver, whatever shape of rows the driver returns."""

    def test_a_statements_rows_are_a_list_the_caller_may_reorder(self):
        # pg8000's fetchall() is a tuple (of lists); a task's last log records are read newest
        # first and reversed in place (lilota show, lilota logs, the dashboard's task page).
        class Cursor:
            description, rowcount = (("seq",),), 2

            def execute(self, sql, params=None):
                pass

            def fetchall(self):
                return (["2"], ["1"])

        class Raw:
            def cursor(self):
                return Cursor()

        result = lilota.DBAPIConnection(Raw()).execute("SELECT seq FROM lilota_log ORDER BY seq DESC")
        rows = result.fetchall()
        rows.reverse()
        self.assertEqual(rows, [["1"], ["2"]])
        self.assertIsNone(result.fetchone())   # read whole


if __name__ == "__main__":
    unittest.main()
