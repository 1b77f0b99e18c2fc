"""Unique tasks: schedule(..., unique_key=, unique_for=) and schedule_many(..., unique_keys=) return
the task that holds the key instead of writing another, race-free across threads and processes.
Every class runs on SQLite and PostgreSQL."""

import contextlib
import io
import time
from datetime import timedelta
from unittest import mock

import support

import lilota
from lilota import Lilota, LilotaScheduler, LilotaWorker, TaskStatus


@support.on_every_backend
class UniqueTaskTests(support.TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)

    def rows(self, key):
        return self.db_execute("SELECT id, status FROM lilota_task WHERE unique_key = ?", key)

    def test_unfinished_task_holds_its_key(self):
        first = self.app.schedule("send_invoice", {"id": 7}, unique_key="invoice:7")
        again = self.app.schedule("send_invoice", {"id": 8}, unique_key="invoice:7", priority=5)
        self.assertEqual(again, first)
        self.assertEqual(len(self.rows("invoice:7")), 1)
        task = self.app.get_task_by_id(first)
        self.assertEqual((task.unique_key, task.input, task.priority), ("invoice:7", {"id": 7}, 0))
        self.assertEqual(task.as_dict()["unique_key"], "invoice:7")
        other = self.app.schedule("send_invoice", {"id": 9}, unique_key="invoice:9")
        self.assertNotEqual(other, first)
        self.assertIsNone(self.app.get_task_by_id(self.app.schedule("plain")).unique_key)

    def test_finished_task_frees_its_key(self):
        first = self.app.schedule("sync", unique_key="sync")
        self.assertTrue(self.app.cancel(first))
        second = self.app.schedule("sync", unique_key="sync")
        self.assertNotEqual(second, first)
        self.assertEqual(sorted(status for _, status in self.rows("sync")), ["cancelled", "scheduled"])

    def test_running_task_holds_its_key(self):
        worker = LilotaWorker(self.db_url)
        seen = []

        @worker.register("sync")
        def sync(data):
            seen.append(self.app.schedule("sync", unique_key="sync"))
        first = self.app.schedule("sync", unique_key="sync")
        worker.run_pending()
        self.assertEqual(seen, [first])
        self.assertEqual(self.app.get_task_by_id(first).status, TaskStatus.COMPLETED)
        self.assertNotEqual(self.app.schedule("sync", unique_key="sync"), first)

    def test_unique_for_window_counts_finished_tasks_until_it_expires(self):
        clock = [time.time()]
        with mock.patch.object(lilota, "_now", lambda: clock[0]):
            first = self.app.schedule("sync", unique_key="sync", unique_for=timedelta(minutes=10))
            self.app.cancel(first)
            clock[0] += 9 * 60
            self.assertEqual(self.app.schedule("sync", unique_key="sync", unique_for=timedelta(minutes=10)), first)
            # Without a window a finished task does not count.
            plain = self.app.schedule("sync", unique_key="sync")
            self.assertNotEqual(plain, first)
            self.app.cancel(plain)
            clock[0] += 2 * 60   # first is 11 minutes old, plain 2
            self.assertEqual(self.app.schedule("sync", unique_key="sync", unique_for=600), plain)
            clock[0] += 9 * 60
            third = self.app.schedule("sync", unique_key="sync", unique_for=600)
        self.assertNotIn(third, (first, plain))
        self.assertEqual(len(self.rows("sync")), 3)

    def test_unique_task_retried_keeps_one_row(self):
        worker = LilotaWorker(self.db_url, retry_delay=0)
        attempts = []

        @worker.register("flaky", max_attempts=3)
        def flaky(data):
            attempts.append(self.app.schedule("flaky", unique_key="flaky"))
            if len(attempts) < 3:
                raise RuntimeError("not yet")
        first = self.app.schedule("flaky", unique_key="flaky")
        worker.run_pending()
        self.assertEqual(attempts, [first] * 3)
        task = self.app.get_task_by_id(first)
        self.assertEqual((task.status, task.attempts), (TaskStatus.COMPLETED, 3))
        self.assertEqual(len(self.rows("flaky")), 1)

    def test_schedule_many_unique_keys(self):
        held = self.app.schedule("x", 0, unique_key="a")
        ids = self.app.schedule_many("x", [1, 2, 3, 4, 5], unique_keys=["a", "b", None, "b", "c"])
        self.assertEqual(ids[0], held)
        self.assertEqual(ids[1], ids[3])
        self.assertEqual(len(set(ids)), 4)
        self.assertEqual([self.app.get_task_by_id(i).input for i in ids], [0, 2, 3, 2, 5])
        self.assertEqual(len(self.db_execute("SELECT id FROM lilota_task")), 4)
        # A window applies to every key of the call.
        self.app.cancel(ids[4])
        again = self.app.schedule_many("x", [6, 7], unique_keys=["c", "d"], unique_for=60)
        self.assertEqual(again[0], ids[4])

    def test_lilota_application_schedules_unique(self):
        app = Lilota(self.db_url, script_path=None)
        self.assertEqual(app.schedule("x", unique_key="k"), app.schedule("x", unique_key="k"))

    def test_bad_unique_arguments(self):
        cases = [
            (TypeError, "unique key must be a string", dict(unique_key=5)),
            (ValueError, "1 to 500 characters", dict(unique_key="")),
            (ValueError, "1 to 500 characters", dict(unique_key="k" * 501)),
            (ValueError, "without a unique key", dict(unique_for=60)),
            (ValueError, "positive duration", dict(unique_key="k", unique_for=0)),
            (TypeError, "timedelta or a number", dict(unique_key="k", unique_for="1h")),
        ]
        for error, text, kwargs in cases:
            with self.subTest(kwargs=kwargs), self.assertRaisesRegex(error, text):
                self.app.schedule("x", **kwargs)
        with self.assertRaisesRegex(ValueError, "2 keys for 3 inputs"):
            self.app.schedule_many("x", [1, 2, 3], unique_keys=["a", "b"])
        with self.assertRaisesRegex(TypeError, "list of keys"):
            self.app.schedule_many("x", [1], unique_keys="a")
        self.assertEqual(self.app.list_tasks(), [])

    def test_show_prints_the_unique_key(self):
        task_id = self.app.schedule("x", unique_key="report:2026-12")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(lilota.main(["show", "--db", self.db_url, str(task_id)]), 0)
        self.assertRegex(out.getvalue(), r"unique_key:\s+report:2026-12")

    def test_race_eight_threads_in_two_processes(self):
        """The issue's proof: 8 threads in 2 processes schedule the same keys at once, 500 keys one
        after the other; each key ends with exactly one row, and every caller got its id."""
        LilotaScheduler(self.db_url).storage.ensure_ready()
        outcomes = support.race_in_processes(_schedule_keys, self.db_url)
        ids_per_key = {}
        for outcome in outcomes:
            for thread_ids in outcome:
                for i, task_id in enumerate(thread_ids):
                    ids_per_key.setdefault(i, set()).add(task_id)
        self.assertEqual(len(ids_per_key), 500)
        self.assertTrue(all(len(ids) == 1 for ids in ids_per_key.values()), "every caller got the same id per key")
        rows = self.db_execute("SELECT unique_key, COUNT(*) FROM lilota_task GROUP BY unique_key")
        self.assertEqual(len(rows), 500)
        self.assertEqual({count for _, count in rows}, {1}, "exactly one row per key")


def _schedule_keys(db_url):
    """One thread of the race: schedule keys race-0 ... race-499 in order; their ids."""
    scheduler = LilotaScheduler(db_url)
    return [str(scheduler.schedule("race", None, unique_key=f"race-{i}")) for i in range(500)]


@support.on_every_backend
class MigrationFromVersion2Tests(support.TempDirTestCase):
    """A database of schema version 2 (queues) is migrated to unique keys and keeps its tasks."""

    def test_version_2_database_is_migrated(self):
        dialect = lilota._dialect_for_url(self.db_url)
        conn = dialect.connect()
        try:
            dialect.begin_migration(conn)
            conn.execute("CREATE TABLE lilota_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            migrations = dialect.migrations()
            for statement in migrations[1] + migrations[2]:
                conn.execute(statement)
            conn.execute("INSERT INTO lilota_meta VALUES ('schema_version', '2')")
            conn.execute("COMMIT")
        finally:
            conn.close()
        self.db_execute("INSERT INTO lilota_task (id, name, status, run_at, created_at, queue) VALUES "
                        "('11111111-1111-1111-1111-111111111111', 'old', 'scheduled', "
                        + ("0, 0" if self.backend == "sqlite" else "now(), now()") + ", 'images')")
        app = LilotaScheduler(self.db_url)
        old = app.get_task_by_id("11111111-1111-1111-1111-111111111111")
        self.assertEqual((old.queue, old.unique_key), ("images", None))
        self.assertEqual(self.db_execute("SELECT value FROM lilota_meta WHERE key = 'schema_version'"),
                         [(str(lilota.SCHEMA_VERSION),)])
        self.assertEqual(app.schedule("x", unique_key="k"), app.schedule("x", unique_key="k"))


@support.on_every_backend
class UniqueCommandLineTests(support.TempDirTestCase):

    def run_cli(self, *args):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = lilota.main(list(args) + ["--db", self.db_url])
        return code, out.getvalue().strip()

    def test_schedule_unique_key(self):
        first = self.run_cli("schedule", "sync", "{}", "--unique-key", "sync")
        again = self.run_cli("schedule", "sync", "{}", "--unique-key", "sync", "--unique-for", "10m")
        self.assertEqual(first[0], 0)
        self.assertEqual(again, first)
        self.assertEqual(LilotaScheduler(self.db_url).get_task_by_id(first[1]).unique_key, "sync")
