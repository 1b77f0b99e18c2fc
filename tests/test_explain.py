"""explain(task_id) and ``lilota explain ID``, on both backends: each reason the issue lists is built
here and the answer checked (code, sentence, details)."""

import contextlib
import io
import json
import os
import unittest
import uuid
from datetime import timedelta

import support
from support import on_every_backend

import lilota
from lilota import LilotaScheduler, LilotaWorker, NodeStatus, NodeType, Reason, TaskNotFoundError


@on_every_backend
class ExplainTests(support.TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.storage = self.app.storage

    def node(self, queues=("default",), names=("job",), name="w1"):
        """A live worker node (as a worker process records itself) serving ``queues``."""
        node_id = str(uuid.uuid4())
        self.storage.add_node(node_id, name, NodeType.WORKER, NodeStatus.RUNNING, os.getpid(), 60,
                              list(queues), list(names))
        return node_id

    def claim(self, node_id, queues=("default",)):
        return self.storage.claim(self.storage.prepare_claim([], queues), node_id, os.getpid())

    def codes(self, task_id):
        return [reason.code for reason in self.app.explain(task_id)]

    def only(self, task_id, code):
        reasons = [r for r in self.app.explain(task_id) if r.code == code]
        self.assertEqual(len(reasons), 1, self.app.explain(task_id))
        self.assertIsInstance(reasons[0], Reason)
        self.assertEqual(str(reasons[0]), reasons[0].message)
        json.dumps(reasons[0].as_dict())   # JSON-compatible
        return reasons[0]

    def test_unknown_id(self):
        with self.assertRaises(TaskNotFoundError):
            self.app.explain(uuid.uuid4())

    def test_next_when_nothing_is_in_its_way(self):
        self.node()
        task_id = self.app.schedule("job")
        self.assertEqual(self.codes(task_id), ["next"])
        self.assertIn("next in queue 'default'", self.only(task_id, "next").message)

    def test_due_later(self):
        self.node()
        task_id = self.app.schedule("job", delay=timedelta(minutes=5))
        reason = self.only(task_id, "due_later")
        self.assertEqual(self.codes(task_id), ["due_later"])
        self.assertIn("due later: at ", reason.message)
        self.assertIn("(in 4m", reason.message)
        self.assertAlmostEqual(reason.details["in_seconds"], 300, delta=5)

    def test_retry_backoff(self):
        self.node()
        worker = LilotaWorker(self.db_url, retry_delay=3600, retry_max_delay=7200)

        @worker.register("job")
        def job(data):
            raise KeyError("missing")
        task_id = self.app.schedule("job", max_attempts=3)
        worker.run_pending()
        reason = self.only(task_id, "retry_backoff")
        self.assertIn("after attempt 1 of 3 failed (KeyError: 'missing'); attempt 2 is due at", reason.message)
        self.assertEqual((reason.details["failed_attempt"], reason.details["max_attempts"]), (1, 3))
        self.assertGreater(reason.details["in_seconds"], 1000)

    def test_waiting_for_dependencies(self):
        first = self.app.schedule("job", delay=3600)
        done = self.app.schedule("job")
        worker = LilotaWorker(self.db_url)
        worker.register("job")(lambda data: data)
        worker.run_pending()
        task_id = self.app.schedule("job", depends_on=[first, done])
        reason = self.only(task_id, "waiting_for_dependencies")
        self.assertEqual(reason.message, f"waiting for 1 of its 2 dependencies to complete: {first} (scheduled)")
        self.assertEqual(reason.details["open"], [{"id": str(first), "status": "scheduled"}])

    def test_no_live_worker_serves_its_queue(self):
        self.node(queues=["mail"])
        dead = self.node(queues=["images"])
        self.storage.set_node_status(dead, NodeStatus.DEAD)
        task_id = self.app.schedule("job", queue="images")
        reason = self.only(task_id, "no_worker")
        self.assertEqual(reason.message, "no live worker serves its queue 'images' (live workers serve mail)")
        other = self.app.schedule("job", queue="reports")
        self.assertEqual(self.only(other, "no_worker").details["served_queues"], ["mail"])

    def test_no_live_worker_has_its_name_registered(self):
        self.node(names=["resize", "thumbnail"])
        task_id = self.app.schedule("publish")
        reason = self.only(task_id, "not_registered")
        self.assertEqual(reason.message, "no live worker of its queue 'default' has the task name 'publish' "
                                         "registered (they have: resize, thumbnail)")
        self.node(names=["publish"], name="w2")
        self.assertEqual(self.codes(task_id), ["next"])

    def test_queue_paused(self):
        self.node()
        task_id = self.app.schedule("job")
        self.app.pause_queue("default")
        self.assertIn("its queue 'default' is paused", self.only(task_id, "queue_paused").message)
        self.app.resume_queue("default")
        self.assertEqual(self.codes(task_id), ["next"])

    def test_queue_at_its_concurrency_limit(self):
        node = self.node()
        self.app.set_queue_limit("default", concurrency=1)
        running = self.app.schedule("job")
        self.claim(node)
        task_id = self.app.schedule("job")
        reason = self.only(task_id, "queue_concurrency")
        self.assertEqual(reason.message, "its queue 'default' is at its concurrency limit: 1 of 1 running")
        self.assertEqual(self.codes(running), ["running"])

    def test_queue_at_its_rate_limit(self):
        node = self.node()
        self.app.set_queue_limit("default", rate=(1, timedelta(hours=1)))
        self.app.schedule("job")
        self.claim(node)
        task_id = self.app.schedule("job")
        reason = self.only(task_id, "queue_rate")
        self.assertIn("used its rate limit of 1 per 1h; the next start is possible at", reason.message)
        self.assertIn("(in 59m", reason.message)

    def test_tasks_ahead(self):
        self.node()
        self.app.schedule("job", priority=5)
        older = self.app.schedule("job")
        task_id = self.app.schedule("job")
        self.app.schedule("job", priority=-1)   # lower: behind it
        self.app.schedule("job", delay=3600, priority=9)   # not due: not ahead
        reason = self.only(task_id, "tasks_ahead")
        self.assertEqual(reason.message, "2 task(s) of higher priority or older are ahead of it in queue 'default'")
        self.assertEqual(self.only(older, "tasks_ahead").details["ahead"], 1)

    def test_running_on_a_node(self):
        node = self.node(name="host-a:worker-0")
        task_id = self.app.schedule("job", timeout=600)
        self.claim(node)
        self.storage.set_progress(str(task_id), node, 40)
        reason = self.only(task_id, "running")
        self.assertIn(f"running on node host-a:worker-0 (pid {os.getpid()}", reason.message)
        self.assertIn("last heartbeat ", reason.message)
        self.assertIn("progress 40%, attempt 1 of 1; it times out at", reason.message)
        self.assertEqual(reason.details["node"], node)
        self.assertLess(reason.details["last_heartbeat_seconds"], 30)
        self.assertTrue(self.app.cancel(task_id))
        self.assertEqual(self.codes(task_id), ["running", "cancel_requested"])

    def test_finished(self):
        worker = LilotaWorker(self.db_url)

        @worker.register("job")
        def job(data):
            if data == "bad":
                raise ValueError("no good")
            return data
        good, bad = self.app.schedule("job", "ok"), self.app.schedule("job", "bad")
        cancelled = self.app.schedule("job", delay=60)
        self.app.cancel(cancelled)
        worker.run_pending()
        self.assertRegex(self.only(good, "finished").message, r"^it completed at .* after 1 attempt\(s\)$")
        reason = self.only(bad, "finished")
        self.assertRegex(reason.message, r"^it failed at .* after 1 attempt\(s\): ValueError: no good$")
        self.assertEqual(reason.details["error"], {"type": "ValueError", "message": "no good"})
        self.assertIn("it cancelled at", self.only(cancelled, "finished").message)
        self.assertIn("without running: TaskCancelledError", self.only(cancelled, "finished").message)

    def test_created_by_another_tool(self):
        task_id = self.app.schedule("job")
        self.db_execute("UPDATE lilota_task SET status = 'created' WHERE id = ?", str(task_id))
        self.assertEqual(self.codes(task_id), ["created"])

    def test_command_line(self):
        self.node()
        task_id = self.app.schedule("job", delay=3600)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = lilota.main(["explain", str(task_id)[:13], "--db", self.db_url])
        self.assertEqual(code, 0, err.getvalue())
        self.assertRegex(out.getvalue(), r"^- due later: at .*\(in 59m")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = lilota.main(["explain", str(task_id), "--json", "--db", self.db_url])
        self.assertEqual([r["code"] for r in json.loads(out.getvalue())], ["due_later"])
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = lilota.main(["explain", str(uuid.uuid4()), "--db", self.db_url])
        self.assertNotEqual(code, 0)


if __name__ == "__main__":
    unittest.main()
