"""Behaviours that each guard one promise: keep_input on every way a task ends, cancel winning over a
late completion, what wakes an idle worker, and the errors of the API that have no other test."""

import sys
import threading
import time
import unittest
import uuid
from dataclasses import dataclass

from support import TempDirTestCase, wait_until, on_every_backend

import lilota


@on_every_backend
class KeepInputTest(TempDirTestCase):

    def raw_input(self, task_id):
        return self.db_execute("SELECT input FROM lilota_task WHERE id = ?", str(task_id))[0][0]

    def test_task_that_times_out_under_the_supervisor_keeps_no_input(self):
        script = self.worker_script("""
            @worker.register("secret", keep_input=False, timeout=timedelta(seconds=0.5))
            def secret(data):
                time.sleep(60)
        """)
        app = self.start_lilota(script, 1)
        task_id = app.schedule("secret", {"password": "hunter2"})
        task = app.wait(task_id, timeout=60)
        self.assertEqual(task.status, "expired")
        self.assertEqual(task.error["type"], "TaskTimeoutError")
        self.assertIs(task.keep_input, False)
        self.assertIsNone(self.raw_input(task_id))

    def test_task_whose_worker_dies_keeps_no_input(self):
        script = self.worker_script("""
            @worker.register("secret", keep_input=False)
            def secret(data):
                os._exit(9)
        """)
        app = self.start_lilota(script, 1)
        task_id = app.schedule("secret", {"password": "hunter2"})
        task = app.wait(task_id, timeout=60)
        self.assertEqual(task.status, "failed")
        self.assertEqual(task.error["type"], "WorkerDiedError")
        self.assertIsNone(self.raw_input(task_id))

    def test_input_is_kept_while_a_retry_is_pending(self):
        worker = lilota.LilotaWorker(self.db_url, retry_delay=3600)

        @worker.register("flaky", keep_input=False, max_attempts=2)
        def flaky(data):
            raise RuntimeError("first attempt fails")

        task_id = lilota.LilotaScheduler(self.db_url).schedule("flaky", {"n": 1})
        [task] = worker.run_pending()
        self.assertEqual(task.id, task_id)
        self.assertEqual(task.status, "scheduled")        # waiting for its retry
        self.assertEqual(task.input, {"n": 1})


@on_every_backend
class CancelWinsOverLateCompletionTest(TempDirTestCase):

    def test_task_that_finishes_after_its_cancel_ends_cancelled(self):
        worker = lilota.LilotaWorker(self.db_url)
        scheduler = lilota.LilotaScheduler(self.db_url)
        answers = []

        @worker.register("report")
        def report(data, ctx: lilota.TaskContext):
            answers.append(scheduler.cancel(ctx.task_id))   # "being stopped": it is running
            return {"rows": 10}

        task_id = scheduler.schedule("report", {})
        [task] = worker.run_pending()
        self.assertEqual(answers, [True])
        self.assertEqual(task.id, task_id)
        self.assertEqual(task.status, "cancelled")
        self.assertIsNone(task.output)
        self.assertEqual(task.error["type"], "TaskCancelledError")
        self.assertIn("discarded", task.error["message"])

    def test_standalone_worker_in_a_thread_cannot_interrupt_but_still_ends_cancelled(self):
        worker = lilota.LilotaWorker(self.db_url, heartbeat_interval=0.05)
        started, release = threading.Event(), threading.Event()

        @worker.register("long")
        def long(data):
            started.set()
            release.wait(30)
            return {"done": True}

        scheduler = lilota.LilotaScheduler(self.db_url)
        task_id = scheduler.schedule("long", {})
        thread = threading.Thread(target=worker.start)
        thread.start()
        self.addCleanup(thread.join, 30)
        self.addCleanup(worker.stop)
        self.assertTrue(started.wait(30))
        self.assertTrue(scheduler.cancel(task_id))
        release.set()
        task = scheduler.wait(task_id, timeout=30)
        self.assertEqual(task.status, "cancelled")
        self.assertIsNone(task.output)


@on_every_backend
class IdleWakeUpTest(TempDirTestCase):
    """What ends an idle worker's wait, with the periodic safety claim switched off so that only
    the mechanism under test can end it (the waits are bounded by generous deadlines)."""

    def setUp(self):
        super().setUp()
        self.worker = lilota.LilotaWorker(self.db_url)
        self.worker.safety_claim_interval = 3600.0
        self.worker.storage.ensure_ready()
        self.worker._open_wake_pipe()
        self.addCleanup(self.worker._close_wake_pipe)

    def wait_idle(self, waitables, counter):
        thread = threading.Thread(target=self.worker._idle, args=(waitables, counter), daemon=True)
        thread.start()
        self.addCleanup(self.worker.stop)  # ends the wait if the mechanism under test failed
        return thread

    def test_commit_by_another_connection_wakes_it(self):
        """SQLite: any commit moves PRAGMA data_version. PostgreSQL: a task queued by anyone
        NOTIFYs the listening connection."""
        storage = self.worker.storage
        counter = storage.change_counter()
        listening = storage.listen_fd()
        self.assertEqual(listening is None, self.backend == "sqlite")
        waitables = [self.worker._wake_r] + ([listening] if listening is not None else [])
        thread = threading.Thread(target=self.worker._idle, args=(waitables, counter, listening), daemon=True)
        thread.start()
        self.addCleanup(self.worker.stop)
        if self.backend == "sqlite":
            self.db_execute("INSERT INTO lilota_meta (key, value) VALUES ('touched', '1')")
        else:
            now = self.db_time(time.time())
            self.db_execute("INSERT INTO lilota_task (id, name, status, run_at, created_at) "
                            "VALUES (?, 'by-hand', 'scheduled', ?, ?)", str(uuid.uuid4()), now, now)
        thread.join(30)
        self.assertFalse(thread.is_alive(), "a commit by another process did not wake the idle worker")

    def test_doorbell_wakes_it(self):
        read_fd, write_fd = lilota._nonblocking_pipe()
        self.addCleanup(lilota._close_fds, read_fd, write_fd)
        thread = self.wait_idle([self.worker._wake_r, read_fd], self.worker.storage.change_counter())
        lilota._ring(write_fd)
        thread.join(30)
        self.assertFalse(thread.is_alive(), "the doorbell did not wake the idle worker")

    def test_delayed_task_falling_due_wakes_it(self):
        lilota.LilotaScheduler(self.db_url).schedule("later", delay=0.3)
        counter = self.worker.storage.change_counter()   # read after the commit: no change to see
        thread = self.wait_idle([self.worker._wake_r], counter)
        thread.join(30)
        self.assertFalse(thread.is_alive(), "a task falling due did not wake the idle worker")

    def test_stop_wakes_it(self):
        thread = self.wait_idle([self.worker._wake_r], self.worker.storage.change_counter())
        self.worker.stop()
        thread.join(30)
        self.assertFalse(thread.is_alive())

    def test_a_scheduler_of_the_same_process_wakes_a_standalone_worker_thread(self):
        # They share the process's connection: on SQLite its commits do not move the worker's
        # change counter, so only the scheduler's word wakes the worker (the safety claim is off).
        @self.worker.register("now")
        def now(data):
            return data

        thread = threading.Thread(target=self.worker.start, name="test-worker", daemon=True)
        thread.start()
        self.addCleanup(thread.join, 30)
        self.addCleanup(self.worker.stop)
        scheduler = lilota.LilotaScheduler(self.db_url)
        wait_until(lambda: scheduler.storage.local_wakers, 30, message="the worker to start")
        for n in range(3):
            self.assertEqual(scheduler.wait(scheduler.schedule("now", n), timeout=20).output, n)
        self.worker.stop()
        thread.join(30)
        self.assertEqual(scheduler.storage.local_wakers, set())

    def test_a_wake_that_finds_nothing_costs_one_claim(self):
        # Every idle worker is woken by each task queued, and all but one find nothing: woken, a
        # worker makes its race-free look (bell, counter, listener) and claims once, not twice.
        claims = []
        claim = self.worker.storage.claim

        def counted_claim(*args):
            claims.append(claim(*args))
            return claims[-1]
        self.worker.storage.claim = counted_claim
        thread = threading.Thread(target=self.worker.start, name="test-worker", daemon=True)
        thread.start()
        self.addCleanup(thread.join, 30)
        self.addCleanup(self.worker.stop)
        wait_until(lambda: len(claims) >= 2, 30, message="the worker to claim and go idle")
        wakes = 5
        for _ in range(wakes):
            before = len(claims)
            lilota._ring(self.worker._wake_w)   # what wakes it is _idle's (see the tests above)
            wait_until(lambda: len(claims) > before, 30, message="the worker to be woken")
        self.worker.stop()
        thread.join(30)
        self.assertFalse(thread.is_alive())
        self.assertEqual([task for task in claims if task is not None], [])
        # Two before it first went idle, then one per wake (a wake may come as two claims begin).
        self.assertLessEqual(len(claims), 2 + wakes + 1, claims)


@dataclass
class Thumb:
    width: int


class ApiErrorTest(TempDirTestCase):
    """Each error of the API says what is wrong."""

    def test_output_that_does_not_fit_its_output_model_fails_the_task(self):
        worker = lilota.LilotaWorker(self.db_url)

        @worker.task
        def resize(data: dict) -> Thumb:
            return 42 if data["kind"] == "int" else {"height": 3}

        scheduler = lilota.LilotaScheduler(self.db_url)
        wrong_type = scheduler.schedule("resize", {"kind": "int"})
        wrong_fields = scheduler.schedule("resize", {"kind": "dict"})
        tasks = {t.id: t for t in worker.run_pending()}
        self.assertEqual(tasks[wrong_type].status, "failed")
        self.assertEqual(tasks[wrong_type].error["type"], "TypeError")
        self.assertIn("output_model is Thumb", tasks[wrong_type].error["message"])
        self.assertEqual(tasks[wrong_fields].status, "failed")
        self.assertEqual(tasks[wrong_fields].error["type"], "TypeError")

    def test_worker_cannot_start_twice_or_take_new_tasks_while_running(self):
        worker = lilota.LilotaWorker(self.db_url)
        thread = threading.Thread(target=worker.start)
        thread.start()
        self.addCleanup(thread.join, 30)
        self.addCleanup(worker.stop)
        wait_until(lambda: worker._running, 30, message="the worker to run")
        with self.assertRaisesRegex(lilota.LilotaError, "already running"):
            worker.start()
        with self.assertRaisesRegex(lilota.LilotaError, "register tasks before worker.start"):
            worker.register("late")(lambda data: None)

    def test_lilota_argument_errors(self):
        script = self.worker_script("")
        with self.assertRaisesRegex(lilota.ConfigurationError, "start_method"):
            lilota.Lilota(self.db_url, script_path=script, start_method="teleport")
        with self.assertRaisesRegex(TypeError, "script_path must be a path"):
            lilota.Lilota(self.db_url, script_path=42)
        with self.assertRaisesRegex(lilota.ConfigurationError, "needs a script_path"):
            lilota.Lilota(self.db_url, number_of_workers=2)

    def test_register_dialect_takes_a_dialect_class(self):
        with self.assertRaisesRegex(TypeError, "subclass of lilota.Dialect"):
            lilota.register_dialect("mysql", object)

    def test_names_and_values_that_cannot_be_stored(self):
        scheduler = lilota.LilotaScheduler(self.db_url)
        with self.assertRaisesRegex(ValueError, "valid unicode"):
            scheduler.schedule("bad\udc80name")
        deep = []
        for _ in range(sys.getrecursionlimit() * 2):
            deep = [deep]
        with self.assertRaisesRegex(lilota.UnserializableError, "nested too deeply"):
            scheduler.schedule("deep", deep)

    def test_unknown_dialect_names_the_hook(self):
        with self.assertRaisesRegex(lilota.ConfigurationError, "register_dialect"):
            lilota.LilotaScheduler("mysql://localhost/app")


if __name__ == "__main__":
    unittest.main()
