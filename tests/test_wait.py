"""wait() and wait_async() are woken by the database when the task ends -- a NOTIFY on PostgreSQL
(the task is marked watched, and its end sends its id), the change counter on SQLite -- not by
re-reading the task: with the re-reads made an hour apart, a waiter still returns at once. Also:
one watcher thread and one listener per process, a waited task deleted, a lost listener
connection, and a queued task marked at once, the mark waking the workers (its row lock makes a
worker's claim pass the task by for a moment)."""

import asyncio
import threading
import time
import unittest

import support
from support import on_every_backend, wait_until

import lilota
from lilota import LilotaScheduler, TaskNotFoundError, TaskStatus, TaskWaitTimeout


class _Waiter(threading.Thread):
    """wait() in a thread of its own; ``result`` is the Task or the exception it raised."""

    def __init__(self, app, task_id, timeout=60):
        super().__init__(daemon=True)
        self.app, self.task_id, self.timeout = app, task_id, timeout
        self.result = None

    def run(self):
        try:
            self.result = self.app.wait(self.task_id, timeout=self.timeout)
        except Exception as exc:
            self.result = exc


@on_every_backend
class WokenByTheDatabaseTests(support.TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        # Without a word from the database, the watcher would look again in an hour.
        for name in ("reread", "poll"):
            self.addCleanup(setattr, lilota._TaskWatcher, name, getattr(lilota._TaskWatcher, name))
            setattr(lilota._TaskWatcher, name, 3600.0)

    def waiting_task(self):
        """A task that waits for another (due in an hour): not queued, so a waiter marks it at once."""
        return self.app.schedule("step", "b", depends_on=[self.app.schedule("step", "a", delay=3600)])

    def end_by_hand(self, task_id, status="cancelled"):
        """End the task on a connection of the test's own: another connection, as a worker's is."""
        ts = lilota._dialect_for_url(self.db_url).time_param
        self.db_execute(f"UPDATE lilota_task SET status = ?, end_date_time = {ts} WHERE id = ?",
                        status, lilota._dialect_for_url(self.db_url).encode_time(time.time()), str(task_id))

    def watch_threads(self):
        return sum(t.name == "lilota-wait" for t in threading.enumerate())

    def test_waiters_return_when_the_task_ends(self):
        wait_until(lambda: self.watch_threads() == 0, 10, message="the watchers of earlier tests to end")
        tasks = [self.waiting_task() for _ in range(5)]
        waiters = [_Waiter(self.app, task_id) for task_id in tasks for _ in range(2)]
        for waiter in waiters:
            waiter.start()
        wait_until(lambda: len(lilota._TaskWatcher.for_storage(self.app.storage).waiters) == 5, 10,
                   message="the waiters to be registered")
        self.assertEqual(self.watch_threads(), 1)   # one thread for all of them
        time.sleep(0.2)   # (nothing is told for a while: the waiters stay blocked)
        self.assertTrue(all(w.is_alive() for w in waiters))
        for task_id in tasks:
            self.end_by_hand(task_id)
        for waiter in waiters:
            waiter.join(10)
            self.assertFalse(waiter.is_alive(), "a waiter was not woken by the task's end")
            self.assertIsInstance(waiter.result, lilota.Task)
            self.assertIs(waiter.result.status, TaskStatus.CANCELLED)
        wait_until(lambda: self.watch_threads() == 0, 10, message="the watcher to end with its waiters")

    def test_wait_async_is_woken_too(self):
        task_id = self.waiting_task()

        async def main():
            waiting = asyncio.ensure_future(self.app.wait_async(task_id, timeout=60))
            await asyncio.sleep(0.2)
            self.assertFalse(waiting.done())
            await asyncio.to_thread(self.end_by_hand, task_id, "failed")
            return await asyncio.wait_for(waiting, 10)
        self.assertIs(asyncio.run(main()).status, TaskStatus.FAILED)

    def test_a_waited_task_that_is_deleted_raises_task_not_found(self):
        task_id = self.waiting_task()
        waiter = _Waiter(self.app, task_id)
        waiter.start()
        wait_until(lambda: str(task_id) in lilota._TaskWatcher.for_storage(self.app.storage).waiters, 10,
                   message="the waiter to be registered")
        time.sleep(0.1)   # (its mark is written)
        self.db_execute("DELETE FROM lilota_task WHERE id = ?", str(task_id))
        waiter.join(10)
        self.assertFalse(waiter.is_alive())
        self.assertIsInstance(waiter.result, TaskNotFoundError)

    def test_a_finished_or_unknown_task_answers_at_once_and_a_timeout_still_holds(self):
        task_id = self.waiting_task()
        self.end_by_hand(task_id, "completed")
        self.assertIs(self.app.wait(task_id, timeout=5).status, TaskStatus.COMPLETED)
        with self.assertRaises(TaskNotFoundError):
            self.app.wait("00000000-0000-7000-8000-000000000000", timeout=5)
        started = time.monotonic()
        with self.assertRaises(TaskWaitTimeout):
            self.app.wait(self.waiting_task(), timeout=0.3)
        self.assertLess(time.monotonic() - started, 5)


class ListenerOnPostgresTests(support.TempDirTestCase):
    backend = "postgres"

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)

    def test_a_queued_task_is_marked_at_once_and_the_mark_wakes_the_workers(self):
        # The mark locks the row for a moment, in which an idle worker's claim (SKIP LOCKED) passes
        # the task by; the workers' wake-up that the mark sends makes that worker claim again.
        self.app.storage.ensure_ready()   # (the listener listens on the channel of the table's schema)
        queued = self.app.storage.dialect.listen("queued")
        self.addCleanup(queued.close)
        wait_until(lambda: queued.fileno() is not None, 10, message="the workers' listener to connect")
        task_id = self.app.schedule("step", "a", delay=3600)
        wait_until(lambda: queued.drain(), 10, message="the NOTIFY of the schedule() itself")
        with self.assertRaises(TaskWaitTimeout):
            self.app.wait(task_id, timeout=0.3)
        self.assertEqual(self.db_execute("SELECT watched FROM lilota_task WHERE id = ?", str(task_id)), [(1,)])
        wait_until(lambda: queued.drain(), 10, message="the workers to be woken by the mark of a queued task")
        # A task that is not queued is marked without waking anyone: what reaches the listener
        # after that mark, and before a marker sent after it (in commit order), is nothing.
        waiting = self.app.schedule("step", "b", depends_on=[task_id])
        wait_until(lambda: queued.drain(), 10, message="the NOTIFY of the second schedule()")
        with self.assertRaises(TaskWaitTimeout):
            self.app.wait(waiting, timeout=0.3)
        self.assertEqual(self.db_execute("SELECT watched FROM lilota_task WHERE id = ?", str(waiting)), [(1,)])
        self.db_execute("SELECT pg_notify(?, 'marker')", "lilota_" + self.schema)
        received = []
        wait_until(lambda: received.extend(queued.drain()) or "marker" in received, 10, message="the marker")
        self.assertEqual(received, ["marker"])

    def test_the_default_mark_of_a_dialect_leaves_queued_tasks_to_be_polled(self):
        # Dialect.mark_watched, for a dialect of one's own with an "ended" listener: it cannot
        # know how to wake the workers its row lock turns away, so it does not mark a queued task.
        queued = str(self.app.schedule("step", "a", delay=3600))
        waiting = str(self.app.schedule("step", "b", depends_on=[queued]))
        with self.app.storage._guard as conn:
            marked = lilota.Dialect.mark_watched(self.app.storage.dialect, conn, [queued, waiting])
        self.assertEqual(marked, {waiting})
        self.assertEqual(self.db_execute("SELECT id, watched FROM lilota_task ORDER BY id"), [(queued, 0), (waiting, 1)])

    def test_a_waiter_outlives_its_listener_connection(self):
        waiting = self.app.schedule("step", "b", depends_on=[self.app.schedule("step", "a", delay=3600)])
        waiter = _Waiter(self.app, waiting)
        waiter.start()
        listener = self.app.storage.listen_ended()
        wait_until(lambda: listener.conn is not None and str(waiting) not in
                   lilota._TaskWatcher.for_storage(self.app.storage).unmarked, 10, message="the task to be marked")
        with listener.lock:
            pid = listener.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.db_execute("SELECT pg_terminate_backend(?)", pid)
        self.db_execute("UPDATE lilota_task SET status = 'cancelled', end_date_time = now() WHERE id = ?", str(waiting))
        waiter.join(20)
        self.assertFalse(waiter.is_alive())
        self.assertIs(waiter.result.status, TaskStatus.CANCELLED)
        # The listener connected again.
        wait_until(lambda: listener.fileno() is not None, 10, message="the listener to reconnect")
        with listener.lock:
            self.assertNotEqual(listener.conn.execute("SELECT pg_backend_pid()").fetchone()[0], pid)


if __name__ == "__main__":
    unittest.main()
