"""Time: tasks due in the distant past or the far future, times lilota cannot store, and a clock that
jumps (lilota takes every timestamp from ``lilota._now()``, which these tests replace)."""

import sqlite3
import unittest
from datetime import datetime, timedelta, timezone

try:
    from tests import support
except ImportError:  # run from inside tests/
    import support

from lilota import LilotaScheduler, LilotaWorker, TaskStatus

UTC = timezone.utc


class ClockTestCase(support.TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.scheduler = LilotaScheduler(self.db_url)
        self.worker = LilotaWorker(self.db_url)
        self.ran = []

        @self.worker.register("job")
        def job(data):
            self.ran.append(data)
            return data

    def count_rows(self):
        conn = sqlite3.connect(self.db_path)
        try:
            return conn.execute("SELECT COUNT(*) FROM lilota_task").fetchone()[0]
        finally:
            conn.close()


class ExtremeTimesTest(ClockTestCase):

    def test_times_beyond_year_9999_are_refused_at_schedule(self):
        """A run_at that cannot be read back as a datetime broke every read of its row, and the idle
        workers' look at the next due time: the worker processes crashed over and over."""
        self.scheduler.schedule("job", "first")   # creates the tables
        for options in ({"delay": 1e12}, {"delay": timedelta.max},
                        {"run_at": datetime.max.replace(tzinfo=UTC)},
                        {"run_at": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)}):
            with self.subTest(options=options):
                with self.assertRaisesRegex(ValueError, "9999") as cm:
                    self.scheduler.schedule("job", "never", **options)
                self.assertIn("run_at" if "run_at" in options else "delay", str(cm.exception))
        self.assertEqual(self.count_rows(), 1, "a refused task must not be stored")

        far = self.scheduler.schedule("job", "far", run_at=datetime(9999, 12, 31, 23, 59, 58, tzinfo=UTC))
        oldest = self.scheduler.schedule("job", "oldest", run_at=datetime(1, 1, 2, tzinfo=UTC))
        self.assertEqual(self.scheduler.get_task_by_id(far).run_at, datetime(9999, 12, 31, 23, 59, 58, tzinfo=UTC))
        self.assertEqual(self.scheduler.get_task_by_id(oldest).run_at, datetime(1, 1, 2, tzinfo=UTC))
        self.assertEqual(self.worker.storage.next_run_at(), datetime(9999, 12, 31, 23, 59, 58, tzinfo=UTC).timestamp())
        done = self.worker.run_pending()
        self.assertEqual([t.input for t in done], ["oldest", "first"], "the oldest run_at runs first")
        self.assertEqual(self.scheduler.get_task_by_id(far).status, TaskStatus.SCHEDULED)


if __name__ == "__main__":
    unittest.main()
