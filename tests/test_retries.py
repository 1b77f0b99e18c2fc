"""Retries and retention (issue 19): retry_on / no_retry_on, raise Retry(...), keep_finished.

Most tasks run through LilotaWorker.run_pending(); the timeout filter under a supervisor and the
background retention of a started Lilota use real processes and threads."""

import threading
import time
import unittest
import uuid
from datetime import datetime, timedelta, timezone
from unittest import mock

import support

import lilota
from lilota import Lilota, LilotaWorker, Retry, TaskContext, TaskProgress, TaskStatus


class RetryTestCase(support.TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.lilota = Lilota(self.db_url)
        # Retries wait an hour: a test makes a task due again when it wants it to run.
        self.worker = LilotaWorker(self.db_url, retry_delay=timedelta(hours=1), retry_max_delay=timedelta(hours=1))

    def run_one(self):
        """Run one due task; return it as stored afterwards (None when none was due)."""
        done = self.worker.run_pending(limit=1)
        return done[0] if done else None

    def make_due(self, task_id):
        """Make a queued task due now (the test does not wait out its delay)."""
        past = self.db_time(time.time() - 1)
        self.db_execute("UPDATE lilota_task SET run_at = ? WHERE id = ?", past, str(task_id))


def raising(exceptions):
    """A task function raising the exception its input names (from ``exceptions``)."""
    def task(name):
        raise exceptions[name](f"raised {name}")
    return task


_EXCEPTIONS = {"ConnectionResetError": ConnectionResetError, "TimeoutError": TimeoutError,
               "ValueError": ValueError, "KeyError": KeyError, "PermissionError": PermissionError,
               "FileNotFoundError": FileNotFoundError, "OSError": OSError}


@support.on_every_backend
class RetryFilterTests(RetryTestCase):
    def outcome(self, name, raised):
        """(status, attempts, error type) after one run of task ``name`` raising ``raised``."""
        task_id = self.lilota.schedule(name, raised, max_attempts=3)
        task = self.run_one()
        self.assertEqual(task.id, task_id)
        return task.status, task.attempts, task.error["type"]

    def test_retry_on_retries_only_those_types(self):
        self.worker.register("net", retry_on=(ConnectionError, TimeoutError))(raising(_EXCEPTIONS))
        retried, failed = TaskStatus.SCHEDULED, TaskStatus.FAILED
        self.assertEqual(self.outcome("net", "ConnectionResetError"), (retried, 1, "ConnectionResetError"))
        self.assertEqual(self.outcome("net", "TimeoutError"), (retried, 1, "TimeoutError"))
        # Any other type fails the task at once, attempts left or not.
        self.assertEqual(self.outcome("net", "ValueError"), (failed, 1, "ValueError"))

    def test_retry_on_still_ends_when_attempts_are_used_up(self):
        self.worker.register("net", retry_on=ConnectionError)(raising(_EXCEPTIONS))
        task_id = self.lilota.schedule("net", "ConnectionResetError", max_attempts=2)
        self.assertIs(self.run_one().status, TaskStatus.SCHEDULED)
        self.make_due(task_id)
        task = self.run_one()
        self.assertEqual((task.status, task.attempts), (TaskStatus.FAILED, 2))

    def test_no_retry_on_fails_those_at_once(self):
        self.worker.register("careful", no_retry_on=ValueError)(raising(_EXCEPTIONS))   # one class is fine
        self.assertEqual(self.outcome("careful", "ValueError"), (TaskStatus.FAILED, 1, "ValueError"))
        self.assertEqual(self.outcome("careful", "KeyError"), (TaskStatus.SCHEDULED, 1, "KeyError"))

    def test_no_retry_on_wins_over_retry_on(self):
        self.worker.register("both", retry_on=[OSError], no_retry_on=(PermissionError,))(raising(_EXCEPTIONS))
        self.assertEqual(self.outcome("both", "FileNotFoundError"), (TaskStatus.SCHEDULED, 1, "FileNotFoundError"))
        self.assertEqual(self.outcome("both", "PermissionError"), (TaskStatus.FAILED, 1, "PermissionError"))
        self.assertEqual(self.outcome("both", "ValueError"), (TaskStatus.FAILED, 1, "ValueError"))

    def test_task_decorator_takes_the_filters(self):
        @self.worker.task(retry_on=(ConnectionError,))
        def fetch(name: str):
            raise _EXCEPTIONS[name](name)

        self.assertEqual(self.outcome("fetch", "ConnectionResetError")[0], TaskStatus.SCHEDULED)
        self.assertEqual(self.outcome("fetch", "KeyError")[0], TaskStatus.FAILED)

    def test_filters_are_validated_at_registration(self):
        def f(data):
            return data

        for bad in ("ValueError", 3, (ValueError, "KeyError"), int, {ValueError: 1}, (None,)):
            for option in ("retry_on", "no_retry_on"):
                with self.subTest(option=option, value=bad):
                    with self.assertRaises(TypeError) as cm:
                        self.worker.register(f"bad-{uuid.uuid4().hex}", **{option: bad})(f)
                    self.assertIn(option, str(cm.exception))
                    with self.assertRaises(TypeError):
                        self.worker.task(name=f"bad-{uuid.uuid4().hex}", **{option: bad})(f)
        with self.assertRaises(ValueError) as cm:
            self.worker.register("snoozy", retry_on=(Retry,))(f)
        self.assertIn("Retry", str(cm.exception))
        self.assertEqual(self.worker.registered_names, [])
        # Classes, tuples, lists and other iterables of classes are accepted; so is BaseException.
        self.worker.register("ok1", retry_on=KeyError, no_retry_on=[SystemExit])(f)
        self.worker.register("ok2", retry_on=(KeyError, IndexError), no_retry_on=())(f)
        self.assertEqual(self.worker.registered_names, ["ok1", "ok2"])

    def test_a_timeout_counts_as_task_timeout_error(self):
        """The standalone worker's own timeout path: a timeout is a TaskTimeoutError for the filters."""
        def slow(data):
            return data

        self.worker.register("net", retry_on=(ConnectionError,), max_attempts=3)(slow)
        self.worker.register("any-timeout", retry_on=(TimeoutError,), max_attempts=3)(slow)
        self.worker.register("not-lilotas", no_retry_on=(lilota.TaskTimeoutError,), max_attempts=3)(slow)
        expected = {"net": (TaskStatus.EXPIRED, None), "any-timeout": (TaskStatus.SCHEDULED, None),
                    "not-lilotas": (TaskStatus.EXPIRED, None)}
        node_id = str(uuid.uuid4())
        prepared = self.worker._prepared_claim()
        for name in expected:
            task_id = self.lilota.schedule(name, None)
            task = self.worker.storage.claim(prepared, node_id, 1)
            self.assertEqual(task.id, task_id)
            self.worker._end_interrupted(task, node_id, "timeout", self.worker._registry[name])
            stored = self.lilota.get_task_by_id(task_id)
            with self.subTest(name=name):
                self.assertIs(stored.status, expected[name][0])
                self.assertEqual(stored.error["type"], "TaskTimeoutError")
                self.assertEqual(stored.attempts, 1)


class TimeoutFilterUnderSupervisorTests(support.TempDirTestCase):
    def test_supervisor_applies_the_filter_to_a_timeout(self):
        script = self.worker_script("""
            @worker.register("slow-net", timeout=0.3, max_attempts=2, retry_on=(ConnectionError,))
            def slow_net(data):
                time.sleep(60)

            @worker.register("slow-any", timeout=0.3, max_attempts=2, retry_on=(ConnectionError, TimeoutError))
            def slow_any(data):
                time.sleep(60)
        """)
        app = self.start_lilota(script, number_of_workers=2, retry_delay=0, retry_max_delay=0)
        net = app.schedule("slow-net", None)
        any_ = app.schedule("slow-any", None)
        net_task = app.wait(net, timeout=60)
        any_task = app.wait(any_, timeout=60)
        self.assertEqual((net_task.status, net_task.attempts), (TaskStatus.EXPIRED, 1))
        self.assertEqual((any_task.status, any_task.attempts), (TaskStatus.EXPIRED, 2))
        self.assertEqual(net_task.error["type"], "TaskTimeoutError")


@support.on_every_backend
class RetryExceptionTests(RetryTestCase):
    def test_retry_requeues_without_counting_an_attempt(self):
        runs = []

        @self.worker.register("poll")   # max_attempts=1: a Retry is not a failure, it needs no retries
        def poll(data, ctx: TaskContext):
            runs.append(ctx.attempt)
            ctx.progress.set(40)
            if len(runs) == 1:
                raise Retry(delay=timedelta(hours=1))
            return {"runs": len(runs)}

        task_id = self.lilota.schedule("poll", None)
        before = time.time()
        task = self.run_one()
        self.assertEqual((task.id, task.status, task.attempts, task.max_attempts), (task_id, TaskStatus.SCHEDULED, 0, 1))
        self.assertIsNone(task.error)
        self.assertIsNone(task.end_date_time)
        self.assertIsNone(task.locked_by)
        self.assertEqual(task.progress_percentage, 0)
        self.assertGreaterEqual(task.run_at.timestamp(), before + 3600 - 1)
        self.assertLessEqual(task.run_at.timestamp(), time.time() + 3600 + 1)
        self.assertIsNone(self.run_one(), "not due before its delay")
        self.make_due(task_id)
        task = self.run_one()
        self.assertEqual((task.status, task.attempts, task.output), (TaskStatus.COMPLETED, 1, {"runs": 2}))
        self.assertEqual(runs, [1, 1])

    def test_retry_keeps_the_last_error_and_the_attempt_budget(self):
        runs = []

        @self.worker.register("flaky", max_attempts=2, retry_on=(ConnectionError,))
        def flaky(data, progress: TaskProgress):
            runs.append(1)
            progress.set(70)
            if len(runs) == 1:
                raise ConnectionResetError("first")
            if len(runs) == 2:
                raise Retry(30)     # seconds; retry_on does not apply to it
            raise ConnectionResetError("third")

        task_id = self.lilota.schedule("flaky", None)
        first = self.run_one()
        self.assertEqual((first.status, first.attempts, first.error["message"]), (TaskStatus.SCHEDULED, 1, "first"))
        self.make_due(task_id)
        second = self.run_one()
        self.assertEqual((second.status, second.attempts, second.max_attempts), (TaskStatus.SCHEDULED, 1, 2))
        self.assertEqual(second.error, first.error, "a Retry keeps the error of the failed attempt before it")
        self.assertEqual(second.progress_percentage, 0)
        self.assertAlmostEqual(second.run_at.timestamp(), time.time() + 30, delta=5)
        self.make_due(task_id)
        third = self.run_one()
        self.assertEqual((third.status, third.attempts, third.error["message"]), (TaskStatus.FAILED, 2, "third"))

    def test_retry_at_a_time(self):
        when = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=2)

        @self.worker.register("later")
        def later(data):
            raise Retry(at=when if data == "future" else when - timedelta(days=4))

        future = self.lilota.schedule("later", "future")
        task = self.run_one()
        self.assertEqual((task.id, task.status, task.run_at), (future, TaskStatus.SCHEDULED, when))
        past = self.lilota.schedule("later", "past")
        task = self.run_one()
        self.assertEqual((task.id, task.status), (past, TaskStatus.SCHEDULED))
        self.assertLessEqual(task.run_at.timestamp(), time.time(), "a time in the past: due at once")
        self.assertEqual(self.run_one().id, past)

    def test_cancel_while_running_wins_over_retry(self):
        @self.worker.register("self-cancelling", keep_input=False)
        def self_cancelling(data, ctx: TaskContext):
            self.lilota.cancel(ctx.task_id)
            raise Retry(delay=60)

        task_id = self.lilota.schedule("self-cancelling", {"secret": 1})
        task = self.run_one()
        self.assertEqual((task.id, task.status), (task_id, TaskStatus.CANCELLED))
        self.assertEqual(task.error["type"], "TaskCancelledError")
        self.assertIsNotNone(task.end_date_time)
        self.assertIsNone(task.input)
        self.assertIsNone(self.run_one())

    def test_retry_arguments(self):
        self.assertEqual(Retry(delay=timedelta(minutes=1)).delay, 60.0)
        self.assertEqual(Retry(2.5).delay, 2.5)
        self.assertEqual(Retry(0).run_at(100.0), 100.0)
        with self.assertRaises(TypeError):
            Retry()
        with self.assertRaises(TypeError):
            Retry(1, at=datetime.now(timezone.utc))
        with self.assertRaises(TypeError):
            Retry("5")
        with self.assertRaises(ValueError):
            Retry(-1)
        with self.assertRaises(ValueError):
            Retry(at=datetime.now())    # naive
        with self.assertRaises(TypeError):
            Retry(at=time.time())
        self.assertIsInstance(Retry(1), Exception)
        self.assertIn("Retry", lilota.__all__)
        from lilota.worker import Retry as worker_retry
        self.assertIs(worker_retry, Retry)


@support.on_every_backend
class RetentionTests(RetryTestCase):
    HOUR = 3600.0

    def setUp(self):
        super().setUp()

        @self.worker.register("add")
        def add(data):
            return data["a"] + data["b"]

        @self.worker.register("boom")
        def boom(data):
            raise ValueError("boom")

    def scheduled_ago(self, seconds, name, inputs, **options):
        """Tasks scheduled as if ``seconds`` ago: their ids (which grow with time) are of then."""
        past_ns = time.time_ns() - int(seconds * 1e9)
        with mock.patch.object(lilota, "_V7_SEQUENCE", [0, 0]), \
                mock.patch.object(lilota.time, "time_ns", return_value=past_ns):
            return self.lilota.schedule_many(name, inputs, **options)

    def finished_tasks(self, count, name="add", ended_ago=None):
        """``count`` tasks run to their end (created and ended ``ended_ago`` seconds ago when given);
        their ids."""
        ids = self.scheduled_ago(ended_ago or 0, name, [{"a": i, "b": 1} for i in range(count)])
        self.assertEqual(len(self.worker.run_pending()), count)
        if ended_ago is not None:
            self.backdate(ids, ended_ago)
        return ids

    def backdate(self, ids, ended_ago, column="end_date_time"):
        when = self.db_time(time.time() - ended_ago)
        for task_id in ids:
            self.db_execute(f"UPDATE lilota_task SET {column} = ? WHERE id = ?", when, str(task_id))

    def remaining(self):
        return {uuid.UUID(str(r[0])) for r in self.db_execute("SELECT id FROM lilota_task")}

    def stored_turn(self):
        rows = self.db_execute("SELECT value FROM lilota_meta WHERE key = 'retention_ran_at'")
        return rows[0][0] if rows else None

    def test_a_started_lilota_deletes_old_finished_tasks(self):
        old = self.finished_tasks(3, ended_ago=2 * self.HOUR)
        [old_failed] = self.finished_tasks(1, "boom", ended_ago=2 * self.HOUR)
        [old_cancelled] = self.scheduled_ago(2 * self.HOUR, "add", [{"a": 0, "b": 0}], delay=60)
        self.lilota.cancel(old_cancelled)
        self.backdate([old_cancelled], 2 * self.HOUR)
        recent = self.finished_tasks(2, ended_ago=0.5 * self.HOUR)
        # Queued and running tasks stay, whatever their dates say.
        [queued, running] = self.scheduled_ago(3 * self.HOUR, "add", [{"a": 1, "b": 1}] * 2, delay=self.HOUR)
        for column in ("created_at", "end_date_time"):
            self.backdate([queued, running], 3 * self.HOUR, column)
        self.db_execute("UPDATE lilota_task SET status = 'running' WHERE id = ?", str(running))

        app = Lilota(self.db_url, keep_finished=timedelta(hours=1))
        self.assertEqual(app.keep_finished, self.HOUR)
        self.assertEqual(self.remaining(), {*old, old_failed, old_cancelled, *recent, queued, running})
        app.start()
        self.addCleanup(app.stop)
        support.wait_until(lambda: self.remaining() == {*recent, queued, running}, 20,
                           message="the old finished tasks to be deleted")
        app.stop()
        self.assertIsNotNone(self.stored_turn(), "the node took its turn")

    def test_a_standalone_worker_deletes_old_finished_tasks(self):
        old = self.finished_tasks(2, ended_ago=2 * self.HOUR)
        recent = self.finished_tasks(1, ended_ago=0)
        worker = LilotaWorker(self.db_url, keep_finished=self.HOUR)
        thread = threading.Thread(target=worker.start, daemon=True)
        thread.start()
        try:
            support.wait_until(lambda: self.remaining() == set(recent), 20,
                               message="the old finished tasks to be deleted")
            self.assertTrue(set(old).isdisjoint(self.remaining()))
        finally:
            worker.stop()
            thread.join(30)
        self.assertFalse(thread.is_alive())

    def test_one_node_deletes_per_interval(self):
        a = Lilota(self.db_url, keep_finished=timedelta(hours=1))
        b = Lilota(self.db_url, keep_finished=timedelta(hours=1))
        interval = a._retention.interval
        self.assertEqual(interval, 300.0, "a tenth of keep_finished, at most 5 minutes")
        self.finished_tasks(2, ended_ago=2 * self.HOUR)
        now = time.time()
        self.assertEqual(a._retention.step(now=now), 2)
        self.assertEqual(self.stored_turn(), repr(now))
        self.finished_tasks(1, ended_ago=2 * self.HOUR)
        self.assertIsNone(b._retention.step(now=now + 1), "a's turn lasts the interval, for every node")
        self.assertIsNone(a._retention.step(now=now + interval - 1))
        self.assertEqual(len(self.remaining()), 1)
        self.assertEqual(b._retention.step(now=now + interval), 1)
        self.assertEqual(self.stored_turn(), repr(now + interval))
        # A time far from the stored one in the other direction: a clock that was wrong; not stuck.
        self.assertEqual(a._retention.step(now=now - 2 * interval), 0)

    def test_take_turn_is_a_compare_and_set(self):
        """Several connections (as several hosts would) take the same turn at once: one gets it."""
        storages = [lilota.Storage(lilota._dialect_for_url(self.db_url)) for _ in range(4)]
        for storage in storages:
            self.addCleanup(storage.close)
            storage.ensure_ready()
        barrier = threading.Barrier(len(storages))
        results = []
        now = time.time()

        def take(storage):
            barrier.wait(10)
            results.append(storage.take_turn("retention_ran_at", 60, now))

        threads = [threading.Thread(target=take, args=(storage,)) for storage in storages]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(sorted(results), [False, False, False, True])
        # The row missing (e.g. deleted by hand): the first caller creates it and has the turn.
        self.db_execute("DELETE FROM lilota_meta WHERE key = 'retention_ran_at'")
        self.assertTrue(storages[0].take_turn("retention_ran_at", 60, now))
        self.assertFalse(storages[1].take_turn("retention_ran_at", 60, now + 1))

    def test_deletes_in_batches(self):
        old = self.finished_tasks(23, ended_ago=2 * self.HOUR)
        recent = self.finished_tasks(2, ended_ago=0)
        app = Lilota(self.db_url, keep_finished=self.HOUR)
        app._retention.batch_size = 5
        batches = []
        delete_batch = lilota.Storage._delete_batch

        def spy(storage, bound, cutoff, batch_size):
            deleted = delete_batch(storage, bound, cutoff, batch_size)
            batches.append(deleted[0])   # (tasks, log records)
            return deleted

        with mock.patch.object(lilota.Storage, "_delete_batch", spy):
            self.assertEqual(app._retention.step(), 23)
            self.assertEqual(batches, [5, 5, 5, 5, 3])
            self.assertEqual(self.remaining(), set(recent))
            # cleanup() deletes the same way.
            del batches[:]
            self.lilota.storage.delete_batch_size = 1
            self.addCleanup(setattr, self.lilota.storage, "delete_batch_size", lilota.Storage.delete_batch_size)
            self.assertEqual(self.lilota.cleanup(older_than=0)["tasks"], 2)
            self.assertEqual(batches, [1, 1, 0])
        self.assertTrue(old)

    def test_keep_finished_arguments(self):
        for bad in (0, -1, timedelta(0)):
            with self.subTest(keep_finished=bad), self.assertRaises(ValueError):
                Lilota(self.db_url, keep_finished=bad)
            with self.subTest(keep_finished=bad), self.assertRaises(ValueError):
                LilotaWorker(self.db_url, keep_finished=bad)
        with self.assertRaises(TypeError):
            Lilota(self.db_url, keep_finished="7d")
        self.assertIsNone(Lilota(self.db_url).keep_finished)
        self.assertIsNone(Lilota(self.db_url)._retention)
        script = self.worker_script("pass")
        workers = Lilota.workers(script, 1, self.db_url, keep_finished=timedelta(days=7))
        self.assertEqual(workers.keep_finished, 7 * 86400.0)
        self.assertEqual(LilotaWorker(self.db_url, keep_finished=60).keep_finished, 60.0)
        self.assertEqual(Lilota(self.db_url, keep_finished=5)._retention.interval, 1.0)

    def test_command_line_worker_option(self):
        parser = lilota._build_parser("lilota")
        self.assertEqual(parser.parse_args(["worker", "s.py", "--keep-finished", "7d"]).keep_finished, 7 * 86400.0)
        self.assertIsNone(parser.parse_args(["worker", "s.py"]).keep_finished)

    def test_old_tasks_are_found_along_the_primary_key(self):
        """No index of its own: a task created before the cutoff has a smaller id. Rows whose ids
        are not lilota's (written by another tool) are left to cleanup(), which deletes them too."""
        old = self.finished_tasks(2, ended_ago=2 * self.HOUR)
        recent = self.finished_tasks(1, ended_ago=0)
        foreign = str(uuid.uuid4())
        self.assertGreater(foreign, lilota._first_task_id_at(time.time() + 10 ** 9))  # sorts after every lilota id
        self.db_execute("INSERT INTO lilota_task (id, name, status, run_at, created_at, end_date_time, attempts, "
                        "priority, progress_percentage) VALUES (?, 'add', 'completed', ?, ?, ?, 1, 0, 100)",
                        foreign, *[self.db_time(time.time() - 2 * self.HOUR)] * 3)
        app = Lilota(self.db_url, keep_finished=self.HOUR)
        self.assertEqual(app._retention.step(), 2)
        self.assertEqual(self.remaining(), {*recent, uuid.UUID(foreign)})
        self.assertEqual(self.lilota.cleanup(older_than=self.HOUR)["tasks"], 1)
        self.assertEqual(self.remaining(), set(recent))
        self.assertTrue(set(old).isdisjoint(self.remaining()))
        if self.backend == "sqlite":
            plan = " ".join(str(row) for row in self.db_execute(
                "EXPLAIN QUERY PLAN SELECT id FROM lilota_task WHERE id < ? AND status IN ('completed') "
                "AND end_date_time < ? ORDER BY id LIMIT 5", lilota._first_task_id_at(time.time()), 0.0))
            self.assertIn("PRIMARY KEY", plan.upper().replace("SQLITE_AUTOINDEX_LILOTA_TASK_1", "PRIMARY KEY"))


if __name__ == "__main__":
    unittest.main()
