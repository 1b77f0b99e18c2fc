"""The public API, in-process: import paths, schedule() and its validation, schedule_many, Task
records, wait/cancel/retry/cleanup, nodes, progress, registration, Lilota's own validation.

Tasks run through LilotaWorker.run_pending(); no worker processes are started."""

import os
import threading
import time
import unittest
import unittest.mock
import uuid
from datetime import datetime, timedelta, timezone

import support
from support import AddInput, AddOutput

import lilota
from lilota import (ConfigurationError, Lilota, LilotaScheduler, LilotaWorker, Node, NodeStatus, NodeType, Task,
                    TaskContext, TaskNotFoundError, TaskProgress, TaskStatus, TaskWaitTimeout, WorkerScriptError)


class ApiTestCase(support.TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.lilota = Lilota(self.db_url)
        self.worker = LilotaWorker(self.db_url, retry_delay=0)
        self.calls = []

        @self.worker.register("add", input_model=AddInput, output_model=AddOutput)
        def add(data: AddInput) -> AddOutput:
            self.calls.append(("add", data))
            return AddOutput(total=data.a + data.b)

        @self.worker.register("boom")
        def boom(data):
            self.calls.append(("boom", data))
            raise ZeroDivisionError(f"boom {data}")

    def sql(self, query, params=()):
        return self.db_execute(query, *params)

    def count_rows(self):
        self.lilota.storage.ensure_ready()
        return self.sql("SELECT COUNT(*) FROM lilota_task")[0][0]


class ImportPathTests(support.TempDirTestCase):
    def test_seed_import_paths_in_a_fresh_process(self):
        code = (
            "import sys\n"
            "from lilota.core import Lilota\n"
            "from lilota.worker import LilotaWorker\n"
            "from lilota.models import Task, TaskProgress\n"
            "from lilota.scheduler import LilotaScheduler\n"
            "from lilota import Lilota as L2, LilotaWorker as W2\n"
            "import lilota\n"
            "assert Lilota is L2 is lilota.Lilota\n"
            "assert LilotaWorker is W2 is lilota.LilotaWorker\n"
            "assert Task is lilota.Task and TaskProgress is lilota.TaskProgress\n"
            "assert LilotaScheduler is lilota.LilotaScheduler and issubclass(Lilota, LilotaScheduler)\n"
            "print('imports ok')\n"
        )
        result = self.run_python("-c", code, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "imports ok")

    def test_import_of_a_submodule_then_attribute_access(self):
        code = (
            "import lilota.core, lilota.worker, lilota.models, lilota.scheduler\n"
            "import lilota\n"
            "assert lilota.core.Lilota is lilota.Lilota\n"
            "assert lilota.worker.LilotaWorker is lilota.LilotaWorker\n"
            "assert lilota.models.Task is lilota.Task\n"
            "assert lilota.scheduler.LilotaScheduler is lilota.LilotaScheduler\n"
            "try:\n"
            "    lilota.no_such_thing\n"
            "except AttributeError as exc:\n"
            "    assert 'no_such_thing' in str(exc)\n"
            "else:\n"
            "    raise SystemExit('an unknown attribute must raise AttributeError')\n"
            "print('imports ok')\n"
        )
        result = self.run_python("-c", code, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "imports ok")


@support.on_every_backend
class ScheduleTests(ApiTestCase):
    def test_schedule_returns_uuid_without_start_or_workers(self):
        for scheduler in (self.lilota, Lilota.scheduler(self.db_url), LilotaScheduler(self.db_url)):
            with self.subTest(scheduler=type(scheduler).__name__):
                task_id = scheduler.schedule("add", AddInput(a=2, b=3))
                self.assertIsInstance(task_id, uuid.UUID)
                task = scheduler.get_task_by_id(task_id)
                self.assertEqual(task.status, TaskStatus.SCHEDULED)
                self.assertEqual(task.input, {"a": 2, "b": 3})
                self.assertEqual(task.attempts, 0)
        self.assertFalse(self.lilota.is_running)
        self.assertEqual(self.count_rows(), 3)

    def test_schedule_options_are_stored(self):
        run_at = datetime.now(timezone.utc) + timedelta(hours=1)
        task = self.lilota.get_task_by_id(self.lilota.schedule("add", {"a": 1, "b": 1}, run_at=run_at, priority=7,
                                                               max_attempts=3, timeout=timedelta(seconds=9)))
        self.assertAlmostEqual(task.run_at.timestamp(), run_at.timestamp(), places=3)
        self.assertEqual(task.priority, 7)
        self.assertEqual(task.max_attempts, 3)
        self.assertEqual(task.timeout, timedelta(seconds=9))
        before = time.time()
        task = self.lilota.get_task_by_id(self.lilota.schedule("add", {"a": 1, "b": 1}, delay=30))
        self.assertGreaterEqual(task.run_at.timestamp(), before + 29)
        self.assertEqual(self.worker.run_pending(), [], "future tasks are not due")

    def test_argument_validation(self):
        naive = datetime.now() + timedelta(minutes=1)
        aware = datetime.now(timezone.utc) + timedelta(minutes=1)
        cases = [
            ((TypeError, ValueError), dict(name=""), "name"),
            ((TypeError, ValueError), dict(name="x" * 201), "name"),
            ((TypeError, ValueError), dict(name=" padded "), "name"),
            (TypeError, dict(name=None), "name"),
            (TypeError, dict(name=42), "name"),
            ((TypeError, ValueError), dict(priority="1"), "priority"),
            ((TypeError, ValueError), dict(priority=1.5), "priority"),
            ((TypeError, ValueError), dict(priority=True), "priority"),
            ((TypeError, ValueError), dict(priority=2 ** 63), "priority"),
            (ValueError, dict(max_attempts=0), "max_attempts"),
            (ValueError, dict(max_attempts=-1), "max_attempts"),
            ((TypeError, ValueError), dict(max_attempts="3"), "max_attempts"),
            (ValueError, dict(delay=-1), "delay"),
            (ValueError, dict(delay=timedelta(seconds=-5)), "delay"),
            (TypeError, dict(delay="5"), "delay"),
            (ValueError, dict(run_at=naive), "timezone"),
            (TypeError, dict(run_at="2030-01-01"), "run_at"),
            (ValueError, dict(delay=5, run_at=aware), "delay"),
            (ValueError, dict(timeout=0), "timeout"),
            (ValueError, dict(timeout=-3), "timeout"),
            (ValueError, dict(timeout=timedelta(0)), "timeout"),
            (ValueError, dict(timeout=float("nan")), "timeout"),
            (TypeError, dict(timeout="10"), "timeout"),
        ]
        for exc_type, kwargs, fragment in cases:
            with self.subTest(**{k: repr(v) for k, v in kwargs.items()}):
                name = kwargs.pop("name", "add")
                with self.assertRaises(exc_type) as cm:
                    self.lilota.schedule(name, {"a": 1, "b": 2}, **kwargs)
                self.assertIn(fragment, str(cm.exception))
                with self.assertRaises(exc_type):
                    self.lilota.schedule_many(name, [{"a": 1, "b": 2}], **kwargs)
        self.assertEqual(self.count_rows(), 0)

    def test_schedule_many(self):
        inputs = [AddInput(a=i, b=i) for i in range(20)]
        ids = self.lilota.schedule_many("add", inputs)
        self.assertEqual(len(ids), 20)
        self.assertTrue(all(isinstance(i, uuid.UUID) for i in ids))
        self.assertEqual(len(set(ids)), 20)
        for task_id, value in zip(ids, inputs):
            self.assertEqual(self.lilota.get_task_by_id(task_id).input, {"a": value.a, "b": value.b})
        self.assertEqual(self.lilota.schedule_many("add", []), [])
        self.assertEqual(self.lilota.schedule_many("add", (AddInput(1, 2) for _ in range(2))).__len__(), 2)
        with self.assertRaises(TypeError):
            self.lilota.schedule_many("add", {"a": 1, "b": 2})  # a dict is one input, not many
        done = self.worker.run_pending()
        self.assertEqual(len(done), 22)
        self.assertEqual({t.status for t in done}, {TaskStatus.COMPLETED})

    def test_schedule_many_bad_input_writes_nothing(self):
        inputs = [{"a": 1, "b": 2}, {"a": 3, "b": 4}, {"bad": {1, 2}}, {"a": 5, "b": 6}]
        with self.assertRaises(TypeError):
            self.lilota.schedule_many("add", inputs)
        with self.assertRaises(ValueError):
            self.lilota.schedule_many("add", [{"a": 1}, float("nan"), {"a": 2}])
        self.assertEqual(self.count_rows(), 0)

    def test_schedule_many_is_one_transaction(self):
        """A database error on the third row rolls back the first two."""
        self.lilota.storage.ensure_ready()
        if self.backend == "sqlite":
            self.sql("CREATE TRIGGER refuse BEFORE INSERT ON lilota_task WHEN NEW.input = '3' "
                     "BEGIN SELECT RAISE(ABORT, 'refused by test'); END")
        else:
            self.sql("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN RAISE EXCEPTION 'refused by test'; END $$")
            self.sql("CREATE TRIGGER refuse BEFORE INSERT ON lilota_task FOR EACH ROW "
                     "WHEN (NEW.input = '3'::jsonb) EXECUTE FUNCTION refuse()")
        with self.assertRaises(lilota.StorageError):
            self.lilota.schedule_many("add", [1, 2, 3, 4])
        self.assertEqual(self.count_rows(), 0)


@support.on_every_backend
class TaskIdOrderTests(ApiTestCase):
    """Ids sort by creation time, also within one millisecond and after the clock steps back."""

    def test_ids_increase_in_creation_order(self):
        ids = [self.lilota.schedule("add", i) for i in range(300)]
        ids += self.lilota.schedule_many("add", list(range(3000)))
        ids.append(self.lilota.schedule("add", 0))
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), len(ids))
        for task_id in ids[:3] + ids[-3:]:
            self.assertEqual((task_id.version, task_id.variant), (7, uuid.RFC_4122))
        stored = [row[0] for row in self.sql("SELECT id FROM lilota_task ORDER BY id")]
        self.assertEqual([str(uuid.UUID(str(value))) for value in stored], [str(i) for i in ids])
        newest_first = self.lilota.list_tasks(limit=5)
        self.assertEqual([task.id for task in newest_first], ids[:-6:-1])

    def test_ids_keep_increasing_when_the_clock_steps_back(self):
        real = time.time_ns()
        before = lilota._new_task_ids(3)
        with unittest.mock.patch.object(lilota.time, "time_ns", return_value=real - 3_600 * 10 ** 9):
            after = lilota._new_task_ids(3) + lilota._new_task_ids(1)
        self.assertEqual(before + after, sorted(before + after))
        self.assertEqual(len(set(before + after)), 7)


@support.on_every_backend
class TaskRecordTests(ApiTestCase):
    def test_get_task_by_id(self):
        task_id = self.lilota.schedule("add", AddInput(1, 2))
        by_uuid = self.lilota.get_task_by_id(task_id)
        by_str = self.lilota.get_task_by_id(str(task_id))
        by_upper = self.lilota.get_task_by_id(str(task_id).upper())
        self.assertIsInstance(by_uuid, Task)
        self.assertEqual(by_uuid, by_str)
        self.assertEqual(by_uuid, by_upper)
        self.assertIsNone(self.lilota.get_task_by_id(uuid.uuid4()))
        self.assertIsNone(self.lilota.get_task_by_id(str(uuid.uuid4())))
        with self.assertRaises(ValueError) as cm:
            self.lilota.get_task_by_id("not-a-task-id")
        self.assertIn("not-a-task-id", str(cm.exception))
        with self.assertRaises(TypeError):
            self.lilota.get_task_by_id(12345)

    def assert_utc(self, value, what):
        self.assertIsInstance(value, datetime, what)
        self.assertIsNotNone(value.tzinfo, what)
        self.assertEqual(value.utcoffset(), timedelta(0), what)

    def test_completed_task_fields(self):
        before = datetime.now(timezone.utc) - timedelta(seconds=1)
        task_id = self.lilota.schedule("add", AddInput(2, 3))
        [task] = self.worker.run_pending()
        after = datetime.now(timezone.utc) + timedelta(seconds=1)
        self.assertEqual(task, self.lilota.get_task_by_id(task_id))
        self.assertEqual(task.id, task_id)
        self.assertIsInstance(task.id, uuid.UUID)
        self.assertEqual(task.name, "add")
        self.assertIs(type(task.status), TaskStatus)
        self.assertIs(task.status, TaskStatus.COMPLETED)
        self.assertTrue(task.is_finished)
        self.assertEqual(task.pid, os.getpid())
        self.assertEqual(task.attempts, 1)
        self.assertEqual(task.max_attempts, 1)
        self.assertEqual(task.timeout, timedelta(minutes=5))
        self.assertEqual(task.progress_percentage, 100)
        self.assertEqual(task.input, {"a": 2, "b": 3})
        self.assertEqual(AddOutput(**task.output), AddOutput(5))
        self.assertIsNone(task.error)
        self.assertIsInstance(task.locked_by, uuid.UUID)
        for what in ("run_at", "start_date_time", "end_date_time", "expires_at", "locked_at", "created_at"):
            value = getattr(task, what)
            self.assert_utc(value, what)
            self.assertTrue(before <= value <= after + timedelta(minutes=5), what)
        self.assertLessEqual(task.start_date_time, task.end_date_time)
        self.assertEqual(task.expires_at - task.start_date_time, timedelta(minutes=5))
        data = task.as_dict()
        self.assertEqual(data["id"], str(task_id))
        self.assertEqual(data["status"], "completed")

    def test_failed_task_error_record(self):
        task_id = self.lilota.schedule("boom", 7)
        [task] = self.worker.run_pending()
        self.assertEqual(task.id, task_id)
        self.assertIs(task.status, TaskStatus.FAILED)
        self.assertIsNone(task.output)
        self.assertIsInstance(task.error, dict)
        self.assertEqual(task.error["type"], "ZeroDivisionError")
        self.assertEqual(task.error["message"], "boom 7")
        self.assertIn("Traceback", task.error["traceback"])
        self.assertIn("in boom", task.error["traceback"])
        self.assertIn("ZeroDivisionError: boom 7", task.error["traceback"])
        self.assert_utc(task.end_date_time, "end_date_time")
        self.assertEqual(task.attempts, 1)

    def test_statuses(self):
        self.assertEqual({s.value for s in TaskStatus},
                         {"created", "scheduled", "waiting", "running", "completed", "failed", "expired",
                          "cancelled"})
        self.assertEqual(TaskStatus("failed"), "failed")

    def test_unknown_task_name_fails_and_worker_goes_on(self):
        unknown = self.lilota.schedule("no-such-task", {"x": 1})
        known = self.lilota.schedule("add", AddInput(1, 1))
        done = {t.id: t for t in self.worker.run_pending()}
        self.assertEqual(set(done), {unknown, known})
        task = done[unknown]
        self.assertIs(task.status, TaskStatus.FAILED)
        self.assertEqual(task.error["type"], "UnknownTaskError")
        self.assertIn("no-such-task", task.error["message"])
        self.assertIs(done[known].status, TaskStatus.COMPLETED)


@support.on_every_backend
class WaitTests(ApiTestCase):
    def test_wait_returns_finished_task(self):
        task_id = self.lilota.schedule("add", AddInput(4, 4))
        self.worker.run_pending()
        task = self.lilota.wait(task_id, timeout=5)
        self.assertIsInstance(task, Task)
        self.assertIs(task.status, TaskStatus.COMPLETED)
        self.assertEqual(task.output, {"total": 8})
        self.assertEqual(self.lilota.wait(str(task_id)).id, task_id)  # no timeout: returns at once

    def test_wait_for_a_task_run_by_another_thread(self):
        task_id = self.lilota.schedule("add", AddInput(1, 2))
        runner = threading.Thread(target=self.worker.run_pending)
        runner.start()
        self.addCleanup(runner.join, 30)
        task = self.lilota.wait(task_id, timeout=20)
        self.assertIs(task.status, TaskStatus.COMPLETED)

    def test_wait_timeout(self):
        task_id = self.lilota.schedule("add", AddInput(4, 4))
        started = time.monotonic()
        with self.assertRaises(TaskWaitTimeout) as cm:
            self.lilota.wait(task_id, timeout=0.1)
        self.assertGreaterEqual(time.monotonic() - started, 0.09)
        self.assertIsInstance(cm.exception, TimeoutError)
        self.assertIn(str(task_id), str(cm.exception))
        self.assertIs(self.lilota.get_task_by_id(task_id).status, TaskStatus.SCHEDULED)
        with self.assertRaises(TaskWaitTimeout):
            self.lilota.wait(task_id, timeout=timedelta(milliseconds=50))

    def test_wait_unknown_task(self):
        unknown = uuid.uuid4()
        with self.assertRaises(TaskNotFoundError) as cm:
            self.lilota.wait(unknown, timeout=1)
        self.assertIn(str(unknown), str(cm.exception))
        with self.assertRaises(ValueError):
            self.lilota.wait("garbage", timeout=1)


@support.on_every_backend
class CancelRetryCleanupTests(ApiTestCase):
    def test_cancel_queued_task(self):
        task_id = self.lilota.schedule("add", AddInput(1, 2))
        other = self.lilota.schedule("add", AddInput(3, 4))
        self.assertIs(self.lilota.cancel(task_id), True)
        done = self.worker.run_pending()
        self.assertEqual([t.id for t in done], [other])
        self.assertEqual(self.calls, [("add", AddInput(3, 4))])
        task = self.lilota.get_task_by_id(task_id)
        self.assertIs(task.status, TaskStatus.CANCELLED)
        self.assertEqual(task.attempts, 0)
        self.assertEqual(task.error["type"], "TaskCancelledError")
        self.assertIsNotNone(task.end_date_time)
        # Cancelling again is idempotent (True, like concurrent.futures.Future.cancel());
        # cancelling a task that finished otherwise changes nothing and returns False.
        self.assertIs(self.lilota.cancel(task_id), True)
        self.assertIs(self.lilota.get_task_by_id(task_id).status, TaskStatus.CANCELLED)
        self.assertIs(self.lilota.cancel(other), False)
        self.assertIs(self.lilota.get_task_by_id(other).status, TaskStatus.COMPLETED)
        with self.assertRaises(TaskNotFoundError):
            self.lilota.cancel(uuid.uuid4())

    def test_retry_failed_task(self):
        task_id = self.lilota.schedule("boom", 1)
        [task] = self.worker.run_pending()
        self.assertIs(task.status, TaskStatus.FAILED)
        self.assertIs(self.lilota.retry(task_id), True)
        task = self.lilota.get_task_by_id(task_id)
        self.assertIs(task.status, TaskStatus.SCHEDULED)
        self.assertEqual(task.attempts, 0)
        self.assertIsNone(task.end_date_time)
        self.assertEqual(task.input, 1)
        [task] = self.worker.run_pending()
        self.assertEqual(task.id, task_id)
        self.assertIs(task.status, TaskStatus.FAILED)
        self.assertEqual(self.calls, [("boom", 1), ("boom", 1)])
        # A completed task cannot be retried; an unknown one is an error.
        done_id = self.lilota.schedule("add", AddInput(1, 1))
        self.worker.run_pending()
        self.assertIs(self.lilota.retry(done_id), False)
        with self.assertRaises(TaskNotFoundError):
            self.lilota.retry(uuid.uuid4())

    def test_retry_cancelled_task_then_completes(self):
        task_id = self.lilota.schedule("add", AddInput(2, 2))
        self.lilota.cancel(task_id)
        self.assertTrue(self.lilota.retry(task_id))
        [task] = self.worker.run_pending()
        self.assertEqual(task.id, task_id)
        self.assertIs(task.status, TaskStatus.COMPLETED)
        self.assertEqual(task.output, {"total": 4})

    def test_cleanup(self):
        old_done = self.lilota.schedule("add", AddInput(1, 1))
        old_failed = self.lilota.schedule("boom", 2)
        old_cancelled = self.lilota.schedule("add", AddInput(1, 2))
        recent_done = self.lilota.schedule("add", AddInput(1, 3))
        queued = self.lilota.schedule("add", AddInput(1, 4), delay=timedelta(hours=1))
        running = self.lilota.schedule("add", AddInput(1, 5), delay=timedelta(hours=1))
        self.lilota.cancel(old_cancelled)
        self.worker.run_pending()
        long_ago = self.db_time(time.time() - 3 * 86400)
        for task_id in (old_done, old_failed, old_cancelled):
            self.sql("UPDATE lilota_task SET end_date_time = ? WHERE id = ?", (long_ago, str(task_id)))
        # Queued and running tasks are never deleted, whatever their dates say.
        self.sql("UPDATE lilota_task SET end_date_time = ?, created_at = ? WHERE id = ?",
                 (long_ago, long_ago, str(queued)))
        self.sql("UPDATE lilota_task SET status = 'running', end_date_time = ?, created_at = ? WHERE id = ?",
                 (long_ago, long_ago, str(running)))
        self.assertEqual(self.lilota.cleanup(older_than=timedelta(days=1))["tasks"], 3)
        remaining = {uuid.UUID(str(r[0])) for r in self.sql("SELECT id FROM lilota_task")}
        self.assertEqual(remaining, {recent_done, queued, running})
        self.assertIsNone(self.lilota.get_task_by_id(old_done))
        self.assertEqual(self.lilota.cleanup(older_than=timedelta(days=1))["tasks"], 0)
        self.assertEqual(self.lilota.cleanup(older_than=0)["tasks"], 1)  # the recent completed one
        with self.assertRaises(ValueError):
            self.lilota.cleanup(older_than=timedelta(days=-1))


@support.on_every_backend
class NodeTests(ApiTestCase):
    def test_get_all_nodes(self):
        self.assertEqual(self.lilota.get_all_nodes(), [])
        self.lilota.schedule("add", AddInput(1, 1))
        self.worker.run_pending()
        app = Lilota(self.db_url, name="app-under-test")
        app.start()
        self.addCleanup(app.stop)
        nodes = app.get_all_nodes()
        self.assertEqual(len(nodes), 2)
        for node in nodes:
            self.assertIsInstance(node, Node)
            self.assertIsInstance(node.id, uuid.UUID)
            self.assertIsInstance(node.type, NodeType)
            self.assertIsInstance(node.status, NodeStatus)
            self.assertEqual(node.pid, os.getpid())
            self.assertEqual(node.created_at.utcoffset(), timedelta(0))
            self.assertEqual(node.last_seen_at.utcoffset(), timedelta(0))
        by_type = {n.type: n for n in nodes}
        self.assertIs(by_type[NodeType.WORKER].status, NodeStatus.STOPPED)
        scheduler_node = by_type[NodeType.SCHEDULER]
        self.assertEqual(scheduler_node.name, "app-under-test")
        self.assertIs(scheduler_node.status, NodeStatus.RUNNING)
        self.assertEqual(str(scheduler_node.id), app.node_id)
        app.stop()
        statuses = {n.id: n.status for n in self.lilota.get_all_nodes()}
        self.assertIs(statuses[scheduler_node.id], NodeStatus.STOPPED)


@support.on_every_backend
class ProgressTests(ApiTestCase):
    def test_task_progress_set_validates(self):
        stored = []
        progress = TaskProgress(uuid.uuid4(), lambda task_id, value: stored.append(value))
        for good in (0, 1, 50, 99, 100):
            progress.set(good)
        self.assertEqual(stored, [0, 1, 50, 99, 100])
        for bad in (-1, 101, 1000):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                progress.set(bad)
        for bad in (50.0, "50", None, True, [50]):
            with self.subTest(bad=bad), self.assertRaises(TypeError):
                progress.set(bad)
        self.assertEqual(stored, [0, 1, 50, 99, 100])

    def _progress_worker(self, manual):
        worker = LilotaWorker(self.db_url, set_progress_manually=manual)
        seen = {}

        @worker.register("steps", task_progress=TaskProgress)
        def steps(data, task_progress):
            task_progress.set(10)
            seen["during"] = self.lilota.get_task_by_id(task_progress.task_id).progress_percentage
            task_progress.set(data["last"])
            for bad in (101, -5, 2.5):
                try:
                    task_progress.set(bad)
                except (ValueError, TypeError) as exc:
                    seen.setdefault("errors", []).append(type(exc).__name__)
            return {}
        return worker, seen

    def test_progress_is_100_without_manual_progress(self):
        worker, seen = self._progress_worker(manual=False)
        self.lilota.schedule("steps", {"last": 42})
        [task] = worker.run_pending()
        self.assertIs(task.status, TaskStatus.COMPLETED)
        self.assertEqual(seen["during"], 10)
        self.assertEqual(seen["errors"], ["ValueError", "ValueError", "TypeError"])
        self.assertEqual(task.progress_percentage, 100)

    def test_manual_progress_keeps_last_value(self):
        worker, seen = self._progress_worker(manual=True)
        self.lilota.schedule("steps", {"last": 42})
        [task] = worker.run_pending()
        self.assertIs(task.status, TaskStatus.COMPLETED)
        self.assertEqual(seen["during"], 10)
        self.assertEqual(task.progress_percentage, 42)

    def test_progress_through_annotation_and_context(self):
        worker = LilotaWorker(self.db_url, set_progress_manually=True)

        @worker.register("annotated")
        def annotated(data, progress: TaskProgress, ctx: TaskContext):
            self.assertIsInstance(progress, TaskProgress)
            progress.set(30)
            ctx.progress.set(60)
            return None

        self.lilota.schedule("annotated", None)
        [task] = worker.run_pending()
        self.assertIs(task.status, TaskStatus.COMPLETED, task.error)
        self.assertEqual(task.progress_percentage, 60)


@support.on_every_backend
class RegisterTests(ApiTestCase):
    def test_register_validation(self):
        worker = LilotaWorker(self.db_url)

        @worker.register("one")
        def one(data):
            return data

        with self.assertRaises(ValueError) as cm:
            @worker.register("one")
            def again(data):
                return data
        self.assertIn("one", str(cm.exception))

        with self.assertRaises(TypeError) as cm:
            @worker.register("two-args")
            def two(a, b):
                return a
        self.assertIn("b", str(cm.exception))

        with self.assertRaises(TypeError):
            @worker.register("kw-only")
            def kw(data, *, extra):
                return data

        with self.assertRaises(ValueError) as cm:
            @worker.register("zero", max_attempts=0)
            def zero(data):
                return data
        self.assertIn("max_attempts", str(cm.exception))

        for bad_name in ("", "x" * 201):
            with self.subTest(name=bad_name), self.assertRaises(ValueError):
                worker.register(bad_name)(one)
        with self.assertRaises(TypeError):
            worker.register(None)(one)
        with self.assertRaises(ValueError):
            worker.register("t0", timeout=0)(one)
        self.assertEqual(worker.registered_names, ["one"])

        # Optional parameters are fine; so is a function without any.
        @worker.register("defaults")
        def defaults(data, scale=2):
            return data * scale

        @worker.register("no-input")
        def no_input():
            return "done"

        self.lilota.schedule("defaults", 21)
        self.lilota.schedule("no-input", None)
        outputs = {t.name: t.output for t in worker.run_pending()}
        self.assertEqual(outputs, {"defaults": 42, "no-input": "done"})


@support.on_every_backend
class RetryAttemptTests(ApiTestCase):
    def test_retry_keeps_id_and_counts_attempts(self):
        attempts = []

        @self.worker.register("flaky", max_attempts=3)
        def flaky(data, ctx: TaskContext):
            attempts.append((ctx.task_id, ctx.attempt, ctx.max_attempts))
            if ctx.attempt < 3:
                raise RuntimeError(f"attempt {ctx.attempt} failed")
            return {"ok": ctx.attempt}

        task_id = self.lilota.schedule("flaky", {"x": 1})
        history = []
        for _ in range(10):
            done = self.worker.run_pending(limit=1)
            if not done:
                break
            history.append((done[0].status, done[0].attempts))
            if done[0].is_finished:
                break
        self.assertEqual(history, [(TaskStatus.SCHEDULED, 1), (TaskStatus.SCHEDULED, 2), (TaskStatus.COMPLETED, 3)])
        self.assertEqual(attempts, [(task_id, 1, 3), (task_id, 2, 3), (task_id, 3, 3)])
        task = self.lilota.get_task_by_id(task_id)
        self.assertEqual(task.id, task_id)
        self.assertEqual(task.attempts, 3)
        self.assertEqual(task.output, {"ok": 3})
        self.assertEqual(self.count_rows(), 1)

    def test_attempts_used_up_keeps_last_error(self):
        task_id = self.lilota.schedule("boom", 5, max_attempts=2)
        first = self.worker.run_pending(limit=1)
        self.assertEqual([(t.id, t.status, t.attempts) for t in first], [(task_id, TaskStatus.SCHEDULED, 1)])
        self.assertEqual(first[0].error["type"], "ZeroDivisionError")
        self.assertEqual(first[0].input, 5, "the input is kept for the retry")
        second = self.worker.run_pending()
        self.assertEqual([(t.id, t.status, t.attempts) for t in second], [(task_id, TaskStatus.FAILED, 2)])
        self.assertEqual(second[0].error["type"], "ZeroDivisionError")
        self.assertEqual(second[0].error.get("attempt"), 2)
        self.assertEqual(self.worker.run_pending(), [])
        self.assertEqual(len(self.calls), 2)

    def test_default_is_no_retry(self):
        task_id = self.lilota.schedule("boom", 1)
        [task] = self.worker.run_pending()
        self.assertEqual((task.id, task.status, task.attempts, task.max_attempts),
                         (task_id, TaskStatus.FAILED, 1, 1))


class LilotaConfigurationTests(support.TempDirTestCase):
    def test_number_of_workers_validation(self):
        script = self.worker_script("pass")
        for bad in (0, -1, 2000, "2", 2.0, True):
            with self.subTest(number_of_workers=bad):
                with self.assertRaises(ConfigurationError) as cm:
                    Lilota(self.db_url, script_path=script, number_of_workers=bad)
                self.assertIn("number_of_workers", str(cm.exception))
        app = Lilota(self.db_url, script_path=script, number_of_workers=2)
        self.assertEqual(app.number_of_workers, 2)
        self.assertEqual(app.script_path, os.path.abspath(script))
        with self.assertRaises(ConfigurationError):
            Lilota(self.db_url, number_of_workers=2)  # workers need a script

    def test_missing_script(self):
        missing = self.path("nope.py")
        with self.assertRaises(WorkerScriptError) as cm:
            Lilota(self.db_url, script_path=missing, number_of_workers=1)
        self.assertIn("nope.py", str(cm.exception))
        self.assertIsInstance(cm.exception, FileNotFoundError)
        with self.assertRaises(WorkerScriptError):
            Lilota(self.db_url, script_path=self.dir, number_of_workers=1)  # a directory
        with self.assertRaises(WorkerScriptError):
            Lilota.workers(missing, 1, self.db_url)

    def test_factories(self):
        scheduler = Lilota.scheduler(self.db_url)
        self.assertIsInstance(scheduler, Lilota)
        self.assertIsNone(scheduler.script_path)
        self.assertEqual(scheduler.number_of_workers, 0)
        task_id = scheduler.schedule("x", {"a": 1})
        self.assertIs(scheduler.get_task_by_id(task_id).status, TaskStatus.SCHEDULED)

        script = self.worker_script("pass")
        workers = Lilota.workers(script, 3, self.db_url)
        self.assertIsInstance(workers, Lilota)
        self.assertEqual(workers.number_of_workers, 3)
        self.assertEqual(workers.script_path, os.path.abspath(script))
        self.assertEqual(workers.db_url, self.db_url)
        self.assertFalse(workers.is_running)
        with self.assertRaises(ConfigurationError):
            Lilota.workers(script, 0, self.db_url)


if __name__ == "__main__":
    unittest.main()
