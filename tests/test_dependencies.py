"""Dependencies between tasks (depends_on, on_failure, the 'waiting' status), on both backends: the
API and its errors, release in the completing commit, failure propagation for each on_failure
through long chains, a diamond on two worker processes, and a worker killed mid-dependency."""

import json
import os
import sqlite3
import threading
import time
import unittest
import uuid

import support
import test_crashes
import test_queues
from support import on_every_backend, wait_until
from test_processes import WorkerTestCase

import lilota
from lilota import LilotaScheduler, LilotaWorker, TaskContext, TaskNotFoundError, TaskStatus


def _worker(db_url, log=None, fail=()):
    """A worker in this process whose task "step" returns its input, records it in ``log`` and
    raises for inputs in ``fail``."""
    worker = LilotaWorker(db_url, retry_delay=0)

    @worker.register("step")
    def step(data, ctx: TaskContext):
        if log is not None:
            log.append(data)
        if data in fail:
            raise RuntimeError(f"step {data} failed")
        return {"data": data, "deps": {str(k): v for k, v in ctx.dependency_outputs.items()}}
    return worker


@on_every_backend
class DependencyApiTests(support.TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.log = []
        self.worker = _worker(self.db_url, self.log, fail={"bad"})

    def status(self, task_id):
        return self.app.get_task_by_id(task_id).status

    def test_waits_until_its_dependency_completed_and_sees_its_output(self):
        a = self.app.schedule("step", "a")
        b = self.app.schedule("step", "b", depends_on=[a])
        task = self.app.get_task_by_id(b)
        self.assertIs(task.status, TaskStatus.WAITING)
        self.assertEqual(task.depends_on, [a])
        self.assertEqual(task.on_failure, "cancel")
        self.assertIsNone(self.app.get_task_by_id(a).depends_on)
        self.worker.run_pending()
        self.assertEqual(self.log, ["a", "b"])
        done = self.app.get_task_by_id(b)
        self.assertIs(done.status, TaskStatus.COMPLETED)
        self.assertEqual(done.output["deps"], {str(a): {"data": "a", "deps": {}}})
        self.assertEqual(done.as_dict()["depends_on"], [str(a)])

    def test_released_in_the_commit_that_completes_the_last_dependency(self):
        a, b = self.app.schedule("step", "a"), self.app.schedule("step", "b")
        c = self.app.schedule("step", "c", depends_on=[a, b])
        self.worker.run_pending(limit=1)
        self.assertIs(self.status(c), TaskStatus.WAITING)
        storage = self.app.storage
        node = str(uuid.uuid4())
        claimed = storage.claim(storage.prepare_claim([]), node, os.getpid())
        self.assertEqual(claimed.id, b)
        # Nothing but the completion of b runs between these two reads: no worker, no poll.
        self.assertTrue(storage.complete(str(b), node, "null", False))
        self.assertIs(self.status(c), TaskStatus.SCHEDULED)

    def test_a_dependency_already_completed_is_satisfied_at_once(self):
        a = self.app.schedule("step", "a")
        self.worker.run_pending()
        b = self.app.schedule("step", "b", depends_on=[str(a), a])   # a string, and twice: one dependency
        self.assertIs(self.status(b), TaskStatus.SCHEDULED)
        self.assertEqual(self.app.get_task_by_id(b).depends_on, [a])

    def test_unknown_dependency_raises_and_writes_nothing(self):
        a = self.app.schedule("step", "a")
        missing = uuid.uuid4()
        with self.assertRaises(TaskNotFoundError) as caught:
            self.app.schedule_many("step", ["x", "y"], depends_on=[a, missing])
        self.assertIn(str(missing), str(caught.exception))
        self.assertEqual(self.db_execute("SELECT COUNT(*) FROM lilota_task"), [(1,)])
        self.assertEqual(self.db_execute("SELECT COUNT(*) FROM lilota_dependency"), [(0,)])

    def test_bad_arguments(self):
        a = self.app.schedule("step", "a")
        with self.assertRaises(ValueError):
            self.app.schedule("step", "b", depends_on=[a], on_failure="ignore")
        with self.assertRaises(TypeError):
            self.app.schedule("step", "b", depends_on=a)   # one id, not a list
        with self.assertRaises(ValueError):
            self.app.schedule("step", "b", depends_on=["not-an-id"])
        self.assertEqual(self.db_execute("SELECT COUNT(*) FROM lilota_task"), [(1,)])

    def test_on_failure_cancel_fail_and_run(self):
        bad = self.app.schedule("step", "bad")
        cancelled = self.app.schedule("step", "c", depends_on=[bad])
        failed = self.app.schedule("step", "f", depends_on=[bad], on_failure="fail")
        ran = self.app.schedule("step", "r", depends_on=[bad], on_failure="run")
        self.worker.run_pending()
        self.assertEqual(sorted(self.log), ["bad", "r"])
        for task_id, status in ((cancelled, "cancelled"), (failed, "failed")):
            task = self.app.get_task_by_id(task_id)
            self.assertEqual(task.status, status)
            self.assertEqual(task.error["type"], "DependencyFailedError")
            self.assertEqual(task.error["dependency"], str(bad))
            self.assertIn(f"dependency {bad} ended failed", task.error["message"])
            self.assertIsNotNone(task.end_date_time)
        self.assertIs(self.status(ran), TaskStatus.COMPLETED)
        self.assertEqual(self.app.get_task_by_id(ran).output["deps"], {str(bad): None})

    def test_failure_propagates_through_a_chain_by_each_on_failure(self):
        bad = self.app.schedule("step", "bad")
        failed = self.app.schedule("step", "f", depends_on=[bad], on_failure="fail")
        cancelled = self.app.schedule("step", "c", depends_on=[failed])
        ran = self.app.schedule("step", "r", depends_on=[cancelled], on_failure="run")
        after_run = self.app.schedule("step", "after", depends_on=[ran])
        self.worker.run_pending()
        self.assertEqual(self.status(failed), "failed")
        cancelled_task = self.app.get_task_by_id(cancelled)
        self.assertEqual(cancelled_task.status, "cancelled")
        self.assertIn(f"dependency {failed} ended failed", cancelled_task.error["message"])
        self.assertEqual(self.status(ran), "completed")
        self.assertEqual(self.status(after_run), "completed")
        self.assertEqual(self.log, ["bad", "r", "after"])

    def test_a_dependency_that_will_be_retried_has_not_failed(self):
        worker = LilotaWorker(self.db_url, retry_delay=0)
        attempts = []

        @worker.register("flaky")
        def flaky(data, ctx: TaskContext):
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                raise RuntimeError("first time")

        @worker.register("step")
        def step(data):
            return data
        a = self.app.schedule("flaky", max_attempts=2)
        b = self.app.schedule("step", "b", depends_on=[a])
        worker.run_pending(limit=1)
        self.assertIs(self.status(b), TaskStatus.WAITING)
        wait_until(lambda: worker.run_pending() or self.status(b).is_finished, 10, message="b to finish")
        self.assertEqual(attempts, [1, 2])
        self.assertIs(self.status(b), TaskStatus.COMPLETED)

    def test_a_dependency_already_ended_badly(self):
        bad = self.app.schedule("step", "bad")
        self.worker.run_pending()
        cancelled = self.app.schedule("step", "c", depends_on=[bad])
        failed = self.app.schedule("step", "f", depends_on=[bad], on_failure="fail")
        ran = self.app.schedule("step", "r", depends_on=[bad], on_failure="run")
        self.assertEqual([self.status(t) for t in (cancelled, failed, ran)], ["cancelled", "failed", "scheduled"])
        self.assertEqual(self.app.get_task_by_id(failed).error["dependency"], str(bad))

    def test_cancelling_a_waiting_task_cancels_its_dependents(self):
        a = self.app.schedule("step", "a", delay=3600)
        b = self.app.schedule("step", "b", depends_on=[a])
        c = self.app.schedule("step", "c", depends_on=[b], on_failure="fail")
        self.assertTrue(self.app.cancel(b))
        self.assertEqual(self.status(b), "cancelled")
        self.assertEqual(self.status(c), "failed")
        self.assertEqual(self.status(a), "scheduled")
        self.assertTrue(self.app.cancel(a))

    def test_a_1000_long_chain_finishes(self):
        worker = LilotaWorker(self.db_url)

        @worker.register("step")
        def step(data, ctx: TaskContext):
            self.log.append(data)
            return data + sum(ctx.dependency_outputs.values())
        ids = [self.app.schedule("step", 0)]
        for i in range(1, 1000):
            ids.append(self.app.schedule("step", 1, depends_on=[ids[-1]]))
        self.assertEqual(self.app.stats()["by_status"]["waiting"], 999)
        done = worker.run_pending()
        self.assertEqual(len(done), 1000)
        self.assertEqual([t.id for t in done], ids)
        self.assertEqual(done[-1].output, 999)
        self.assertEqual(self.app.stats()["by_status"]["completed"], 1000)

    def test_a_failure_at_the_head_of_a_1000_long_chain_ends_all_of_it_at_once(self):
        ids = [self.app.schedule("step", "bad")]
        for i in range(1, 1000):
            ids.append(self.app.schedule("step", i, depends_on=[ids[-1]], on_failure="fail" if i % 2 else "cancel"))
        self.worker.run_pending()
        self.assertEqual(self.log, ["bad"])
        counts = self.app.stats()["by_status"]
        self.assertEqual((counts["failed"], counts["cancelled"], counts["waiting"]), (1 + 500, 499, 0))
        last = self.app.get_task_by_id(ids[-1])
        self.assertIn(f"dependency {ids[-2]} ended", last.error["message"])

    def test_run_pending_of_a_task_without_dependencies_has_empty_outputs(self):
        self.app.schedule("step", "a")
        self.assertEqual(self.worker.run_pending()[0].output["deps"], {})

    def test_deleting_tasks_deletes_their_dependency_rows(self):
        a = self.app.schedule("step", "a")
        b = self.app.schedule("step", "b", depends_on=[a])
        c = self.app.schedule("step", "c", depends_on=[a])
        self.assertTrue(self.app.delete_task_by_id(b))
        self.assertEqual(self.db_execute("SELECT task_id FROM lilota_dependency"), [(str(c),)])
        self.worker.run_pending()
        self.assertEqual(self.app.cleanup(older_than=0)["tasks"], 2)
        self.assertEqual(self.db_execute("SELECT COUNT(*) FROM lilota_dependency"), [(0,)])

    def test_a_deleted_dependency_leaves_its_dependent_waiting_and_explain_says_so(self):
        a = self.app.schedule("step", "a", delay=3600)
        b = self.app.schedule("step", "b", depends_on=[a])
        self.app.delete_task_by_id(a)
        [reason] = self.app.explain(b)
        self.assertIn(f"{a} (deleted: cancel this task)", reason.message)
        self.assertTrue(self.app.cancel(b))

    @support.sqlite_only("the CHECK of the SQLite table, rewritten by the migration")
    def test_the_status_check_still_refuses_unknown_statuses(self):
        self.app.storage.ensure_ready()
        with self.assertRaises(sqlite3.IntegrityError):
            self.db_execute("INSERT INTO lilota_task (id, name, status, run_at, created_at) "
                            "VALUES ('x', 'y', 'nonsense', 0, 0)")
        self.assertEqual(self.db_execute("PRAGMA integrity_check"), [("ok",)])


class ConcurrentEndsOnPostgresTests(support.TempDirTestCase):
    """PostgreSQL: two dependencies of one task end in concurrent transactions. Neither sees the
    other's end before it commits; the trigger's row lock on the dependent makes the second wait
    for the first, and then see it, so the dependent is queued once both ended."""

    backend = "postgres"

    def test_the_dependent_of_two_concurrent_completions_is_queued(self):
        app = LilotaScheduler(self.db_url)
        b, c = app.schedule("step", "b", delay=3600), app.schedule("step", "c", delay=3600)
        d = app.schedule("step", "d", depends_on=[b, c])
        dialect = lilota._dialect_for_url(self.db_url)
        first, second = dialect.connect(), dialect.connect()
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        end = "UPDATE lilota_task SET status = 'completed', end_date_time = now() WHERE id = %s"
        first.execute("BEGIN")
        first.execute(end, (str(b),))
        second_done = threading.Event()

        def end_c():
            second.execute("BEGIN")
            second.execute(end, (str(c),))   # its trigger waits for the first transaction
            second.execute("COMMIT")
            second_done.set()
        thread = threading.Thread(target=end_c)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.assertFalse(second_done.wait(0.5), "the second end waits for the first commit")
        first.execute("COMMIT")
        self.assertTrue(second_done.wait(10))
        self.assertIs(app.get_task_by_id(d).status, TaskStatus.SCHEDULED)


@on_every_backend
class DependencyCommandLineTests(support.TempDirTestCase):
    cli = test_queues.QueueCommandLineTests.cli

    def test_schedule_with_dependencies_and_show_them(self):
        app = LilotaScheduler(self.db_url)
        a = app.schedule("step", "a")
        _worker(self.db_url).run_pending()
        b = app.schedule("step", "b", delay=3600)
        code, out, err = self.cli("schedule", "step", '"c"', "--depends-on", str(a)[:13],
                                  "--depends-on", str(b), "--on-failure", "run")
        self.assertEqual(code, 0, err)
        c = out.strip()
        code, out, err = self.cli("show", c, "--json")
        shown = json.loads(out)
        self.assertEqual((shown["status"], shown["on_failure"]), ("waiting", "run"))
        self.assertEqual(shown["depends_on"], [str(a), str(b)])
        self.assertEqual(shown["dependencies"], [{"id": str(a), "status": "completed", "open": False},
                                                 {"id": str(b), "status": "scheduled", "open": True}])
        code, out, err = self.cli("show", c)
        self.assertIn("depends_on:           1 of 2 open", out)
        self.assertIn(f"  {b}  scheduled  (open)", out)
        code, out, err = self.cli("schedule", "step", "--depends-on", str(uuid.uuid4()))
        self.assertNotEqual(code, 0)
        self.assertIn("not stored", err)
        code, out, err = self.cli("list", "--status", "waiting")
        self.assertIn(c, out)


@on_every_backend
class DependencyWorkerTests(WorkerTestCase):
    RECORD = """
@worker.register("record")
def record(data, ctx: TaskContext):
    start = time.time()
    time.sleep(data.get("sleep", 0))
    return {"name": data["name"], "start": start, "end": time.time(),
            "deps": sorted(v["name"] for v in ctx.dependency_outputs.values() if v)}
"""

    def test_a_diamond_runs_in_order_on_two_workers(self):
        app = self.start_lilota(self.script(more_tasks=self.RECORD), 2)
        self.wait_workers_running(2)
        a = app.schedule("record", {"name": "a", "sleep": 0.05})
        b = app.schedule("record", {"name": "b", "sleep": 0.3}, depends_on=[a])
        c = app.schedule("record", {"name": "c", "sleep": 0.3}, depends_on=[a])
        d = app.schedule("record", {"name": "d"}, depends_on=[b, c])
        tasks = {t: app.wait(i, timeout=30) for t, i in zip("abcd", (a, b, c, d))}
        self.assertTrue(all(t.status == "completed" for t in tasks.values()), [t.error for t in tasks.values()])
        out = {name: task.output for name, task in tasks.items()}
        self.assertLessEqual(out["a"]["end"], out["b"]["start"])
        self.assertLessEqual(out["a"]["end"], out["c"]["start"])
        self.assertLessEqual(max(out["b"]["end"], out["c"]["end"]), out["d"]["start"])
        self.assertLess(max(out["b"]["start"], out["c"]["start"]), min(out["b"]["end"], out["c"]["end"]),
                        "b and c ran at the same time, one on each worker")
        self.assertEqual(out["d"]["deps"], ["b", "c"])

    kill_worker_running = test_crashes.WorkerKilledTest.kill_worker_running

    def test_a_worker_killed_running_the_last_attempt_of_a_dependency_ends_its_dependents(self):
        app = self.start_lilota(self.script(), 1)
        a = app.schedule("block_first", max_attempts=1)
        cancelled = app.schedule("pid", depends_on=[a])
        failed = app.schedule("pid", depends_on=[a], on_failure="fail")
        ran = app.schedule("pid", depends_on=[a], on_failure="run")
        self.kill_worker_running(app, a)
        self.assertEqual(app.wait(a, timeout=30).error["type"], "WorkerDiedError")
        self.assertEqual(app.wait(cancelled, timeout=30).status, "cancelled")
        self.assertEqual(app.wait(failed, timeout=30).error["dependency"], str(a))
        self.assertEqual(app.wait(ran, timeout=30).status, "completed")

    def test_a_worker_killed_running_a_dependency_that_is_retried_runs_its_dependents(self):
        app = self.start_lilota(self.script(), 1)
        a = app.schedule("block_first", max_attempts=2)
        b = app.schedule("pid", depends_on=[a])
        running = self.kill_worker_running(app, a)
        self.assertEqual(app.wait(b, timeout=30).status, "completed")
        self.assertEqual(app.get_task_by_id(a).attempts, 2)
        self.assertNotEqual(app.get_task_by_id(b).pid, running.pid)


if __name__ == "__main__":
    unittest.main()


@on_every_backend
class DependencyMigrationTests(support.TempDirTestCase):
    """A database of an earlier schema (version 1, as released) takes dependencies once migrated."""

    def test_an_old_database_migrates_and_takes_dependencies(self):
        test_queues.MigrationTests.make_version_1(self)
        app = LilotaScheduler(self.db_url)
        old = [t.id for t in app.list_tasks(status="scheduled", limit=None)]
        self.assertEqual(self.db_execute("SELECT value FROM lilota_meta WHERE key = 'schema_version'"),
                         [(str(lilota.SCHEMA_VERSION),)])
        waiting = app.schedule("add", {"a": 1, "b": 2}, depends_on=old)
        self.assertIs(app.get_task_by_id(waiting).status, TaskStatus.WAITING)
        worker = LilotaWorker(self.db_url)
        worker.register("add")(lambda data: {"sum": data["a"] + data["b"]})
        self.assertEqual(len(worker.run_pending()), len(old) + 1)
        self.assertEqual(app.get_task_by_id(waiting).output, {"sum": 3})
        with self.assertRaises(Exception):   # the status CHECK still holds, 'waiting' added
            self.db_execute("UPDATE lilota_task SET status = 'nonsense' WHERE id = ?", str(waiting))

    def test_dependents_waiting_in_a_version_6_database_are_released_once_migrated(self):
        # Version 7 settles the end of a task only when its row says it has dependents: the
        # migration must say so for the dependencies of the tasks already waiting.
        a, b, c, d = (str(uuid.uuid4()) for _ in range(4))
        with support.old_schema(self.db_url, 6) as (conn, dialect):
            now = dialect.encode_time(time.time())
            insert = dialect.sql(
                "INSERT INTO lilota_task (id, name, status, priority, run_at, attempts, progress_percentage, input, "
                f"created_at, cancel_requested, depends_on, on_failure) VALUES (?, 'step', ?, 0, {dialect.time_param}, "
                f"0, 0, {dialect.json_param}, {dialect.time_param}, 0, {dialect.json_param}, ?)")
            conn.execute(insert, (a, "scheduled", now, '"a"', now, None, None))
            conn.execute(insert, (b, "scheduled", now, '"bad"', now, None, None))
            conn.execute(insert, (c, "waiting", now, '"c"', now, json.dumps([a]), "cancel"))
            conn.execute(insert, (d, "waiting", now, '"d"', now, json.dumps([b]), "cancel"))
            conn.executemany(dialect.sql("INSERT INTO lilota_dependency (task_id, depends_on) VALUES (?, ?)"),
                             [(c, a), (d, b)])
        app = LilotaScheduler(self.db_url)
        app.storage.ensure_ready()   # migrates
        self.assertEqual(sorted(self.db_execute("SELECT id, has_dependents FROM lilota_task WHERE id IN (?, ?)", a, b)),
                         sorted([(a, 1), (b, 1)]))
        log = []
        _worker(self.db_url, log, fail={"bad"}).run_pending()
        self.assertEqual(sorted(log), ["a", "bad", "c"])
        self.assertIs(app.get_task_by_id(c).status, TaskStatus.COMPLETED)
        self.assertIs(app.get_task_by_id(d).status, TaskStatus.CANCELLED)
