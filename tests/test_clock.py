"""Time: tasks due in the distant past or the far future, times lilota cannot store, and a clock that
jumps (lilota takes every timestamp from ``lilota._now()``, which these tests replace)."""

import threading
import time
import unittest
from datetime import datetime, timedelta, timezone
from unittest import mock

import support

import lilota
from lilota import LilotaScheduler, LilotaWorker, TaskStatus

UTC = timezone.utc


class Clock:
    """The wall clock plus an offset that a test moves: a clock that jumps."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset


class ClockTestCase(support.TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        patcher = mock.patch.object(lilota, "_now", self.clock)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.scheduler = LilotaScheduler(self.db_url)
        self.worker = LilotaWorker(self.db_url)
        self.ran = []

        @self.worker.register("job")
        def job(data):
            self.ran.append(data)
            return data


@support.on_every_backend
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
        self.assertEqual(self.db_execute("SELECT COUNT(*) FROM lilota_task"), [(1,)], "a refused task must not be stored")

        far = self.scheduler.schedule("job", "far", run_at=datetime(9999, 12, 31, 23, 59, 58, tzinfo=UTC))
        oldest = self.scheduler.schedule("job", "oldest", run_at=datetime(1, 1, 2, tzinfo=UTC))
        self.assertEqual(self.scheduler.get_task_by_id(far).run_at, datetime(9999, 12, 31, 23, 59, 58, tzinfo=UTC))
        self.assertEqual(self.scheduler.get_task_by_id(oldest).run_at, datetime(1, 1, 2, tzinfo=UTC))
        self.assertEqual(self.worker.storage.next_run_at(), datetime(9999, 12, 31, 23, 59, 58, tzinfo=UTC).timestamp())
        done = self.worker.run_pending()
        self.assertEqual([t.input for t in done], ["oldest", "first"], "the oldest run_at runs first")
        self.assertEqual(self.scheduler.get_task_by_id(far).status, TaskStatus.SCHEDULED)


@support.on_every_backend
class ClockJumpTest(ClockTestCase):

    def names_run(self):
        return sorted(task.input for task in self.worker.run_pending())

    def test_jumps_neither_run_future_tasks_early_nor_strand_due_ones(self):
        """Tasks scheduled to run at once were stored with run_at = the time of scheduling, and a
        worker takes a task when run_at <= its clock: after the clock stepped back an hour, the
        whole queue waited an hour."""
        backlog = self.scheduler.schedule_many("job", ["now-1", "now-2"])
        past = self.scheduler.schedule("job", "past", run_at=datetime.now(UTC) - timedelta(minutes=5))
        self.scheduler.schedule("job", "in-a-minute", delay=60)
        self.scheduler.schedule("job", "in-an-hour", delay=3600)
        self.scheduler.schedule("job", "in-a-day", run_at=datetime.now(UTC) + timedelta(days=1))

        self.clock.offset = -3600      # the clock steps back an hour
        self.assertEqual(self.names_run(), ["now-1", "now-2", "past"])
        for task_id in backlog + [past]:
            self.assertEqual(self.scheduler.get_task_by_id(task_id).status, TaskStatus.COMPLETED)
        # Scheduled on the stepped-back clock: due at once too, delayed by its own clock.
        self.scheduler.schedule("job", "after-the-step")
        self.scheduler.schedule("job", "a-minute-after-the-step", delay=60)
        self.assertEqual(self.names_run(), ["after-the-step"])
        self.clock.offset = -3600 + 61
        self.assertEqual(self.names_run(), ["a-minute-after-the-step"])

        self.clock.offset = 30         # forward again, not yet a minute after the first tasks
        self.assertEqual(self.names_run(), [])
        self.clock.offset = 61
        self.assertEqual(self.names_run(), ["in-a-minute"])
        self.clock.offset = 3601
        self.assertEqual(self.names_run(), ["in-an-hour"])
        self.clock.offset = 86401
        self.assertEqual(self.names_run(), ["in-a-day"])
        self.assertEqual(self.scheduler.storage.next_run_at(), None)

    def test_idle_worker_notices_a_jump_to_a_due_time_at_once(self):
        """An idle worker sleeps toward the next due time in short steps of the clock, so a jump
        forward past it is noticed within a poll interval, not after the time it had computed."""
        task_id = self.scheduler.schedule("job", "in-an-hour", delay=3600)
        stop = threading.Thread(target=self.worker.start, name="clock-worker", daemon=True)
        stop.start()
        self.addCleanup(stop.join, 10)
        self.addCleanup(self.worker.stop)
        support.wait_until(lambda: self.worker._running, 10, message="the worker to start")
        time.sleep(0.3)   # not waiting for work: several idle polls pass, and none may run it early
        self.assertEqual(self.scheduler.get_task_by_id(task_id).status, TaskStatus.SCHEDULED)
        self.clock.offset = 3601
        jumped = time.monotonic()
        task = self.scheduler.wait(task_id, timeout=10)
        self.assertEqual(task.status, TaskStatus.COMPLETED)
        self.assertLess(time.monotonic() - jumped, 5)


if __name__ == "__main__":
    unittest.main()
