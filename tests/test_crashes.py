"""End-to-end crash tests on SQLite: a worker process killed with SIGKILL mid-task, a task that
kills its own worker every time (poison pill), and an application killed with its workers running."""

import os
import signal
import unittest

from support import ROOT, process_alive, wait_until, on_every_backend
from test_processes import WorkerTestCase

from lilota import LilotaScheduler

KILLABLE_APP = """
import sys, time
sys.path.insert(0, {root!r})
from lilota import Lilota

if __name__ == "__main__":
    app = Lilota({db_url!r}, script_path={script!r}, number_of_workers={workers}, name="doomed")
    app.start()
    while True:
        time.sleep(1)
"""


@on_every_backend
class WorkerKilledTest(WorkerTestCase):

    def kill_worker_running(self, app, task_id):
        running = self.wait_status(app, task_id, "running")
        self.assertTrue(process_alive(running.pid))
        os.kill(running.pid, signal.SIGKILL)
        return running

    def test_killed_worker_task_is_retried_to_completion(self):
        app = self.start_lilota(self.script(), 1)
        task_id = app.schedule("block_first", max_attempts=2)
        running = self.kill_worker_running(app, task_id)

        task = app.wait(task_id, timeout=30)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.id, task_id)
        self.assertEqual(task.attempts, 2)
        self.assertEqual(task.output["attempt"], 2)
        self.assertNotEqual(task.pid, running.pid)
        self.assertFalse(app.has_failed())

    def test_killed_worker_task_fails_with_worker_died_error(self):
        app = self.start_lilota(self.script(), 1)
        task_id = app.schedule("block_first", max_attempts=1)
        running = self.kill_worker_running(app, task_id)

        task = app.wait(task_id, timeout=30)
        self.assertEqual(task.status, "failed")
        self.assertEqual(task.attempts, 1)
        self.assertEqual(task.error["type"], "WorkerDiedError")
        self.assertIn("died", task.error["message"])
        self.assertIn(str(running.pid), task.error["message"])
        self.assertIn("traceback", task.error)

        # The worker was restarted and tasks keep completing.
        for _ in range(3):
            done = app.wait(app.schedule("pid"), timeout=30)
            self.assertEqual(done.status, "completed")
            self.assertNotEqual(done.pid, running.pid)
        self.assertEqual(self.starts(), 2)
        self.assertEqual([n[2] for n in self.worker_nodes()], ["crashed", "running"])
        self.assertFalse(app.has_failed())

    def test_poison_pill_fails_without_restart_storm(self):
        app = self.start_lilota(self.script(), 2)
        poison = app.schedule("suicide", max_attempts=3)
        others = [app.schedule("echo", {"i": i}) for i in range(10)]

        task = app.wait(poison, timeout=60)
        self.assertEqual(task.status, "failed")
        self.assertEqual(task.attempts, 3)
        self.assertEqual(task.error["type"], "WorkerDiedError")
        for task_id in others:
            self.assertEqual(app.wait(task_id, timeout=30).status, "completed")

        # One replacement per death: 2 workers + 3 restarts, and no more once both slots are back.
        def settled():
            statuses = [n[2] for n in self.worker_nodes()]
            return statuses.count("crashed") == 3 and statuses.count("running") == 2
        wait_until(settled, 30, message="3 crashed worker nodes and 2 running ones")
        more = [app.schedule("pid") for _ in range(5)]
        for task_id in more:
            self.assertEqual(app.wait(task_id, timeout=30).status, "completed")
        nodes = self.worker_nodes()
        self.assertEqual(len(nodes), 2 + 3)
        self.assertEqual(len(nodes), self.starts())
        self.assertEqual([n[2] for n in nodes].count("crashed"), 3)
        self.assertEqual([n[2] for n in nodes].count("running"), 2)
        self.assertFalse(app.has_failed())


@on_every_backend
class ApplicationKilledTest(WorkerTestCase):

    def test_killed_application_workers_exit_and_task_is_recovered(self):
        script = self.script()
        app_script = self.write("doomed_app.py", KILLABLE_APP.format(
            root=ROOT, db_url=self.db_url, script=script, workers=2))
        proc = self.popen_python(app_script)
        self.wait_workers_running(2)

        scheduler = LilotaScheduler(self.db_url)
        retried = scheduler.schedule("block_first", max_attempts=2)
        default = scheduler.schedule("block_first")          # the registered default: max_attempts=1
        running = [self.wait_status(scheduler, t, "running") for t in (retried, default)]
        worker_pids = [n[1] for n in self.worker_nodes()]
        self.assertEqual(sorted(worker_pids), sorted(t.pid for t in running))

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for pid in worker_pids:
            wait_until(lambda: not process_alive(pid), 5, message=f"worker {pid} of the killed application to exit")

        app = self.start_lilota(self.script(), 1)
        task = app.wait(retried, timeout=30)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.attempts, 2)
        self.assertNotIn(task.pid, worker_pids)

        task = app.wait(default, timeout=30)
        self.assertEqual(task.status, "failed")
        self.assertEqual(task.attempts, 1)
        self.assertEqual(task.max_attempts, 1)
        self.assertEqual(task.error["type"], "WorkerDiedError")
        self.assertIn("traceback", task.error)

        self.assertEqual(app.wait(app.schedule("pid"), timeout=30).status, "completed")
        statuses = dict(self.query("SELECT pid, status FROM lilota_node WHERE type = 'worker'"))
        for pid in worker_pids:
            self.assertEqual(statuses[pid], "dead")
        self.assertFalse(app.has_failed())


@on_every_backend
class LostNodeTest(WorkerTestCase):

    def test_frozen_standalone_worker_task_is_recovered_through_heartbeats(self):
        # The process still exists, so only its stale heartbeat can tell that it is lost.
        script = self.script(heartbeat_interval=0.1, node_timeout=1.0)
        frozen = self.popen_python(script)
        wait_until(lambda: [n for n in self.worker_nodes("running") if n[1] == frozen.pid], 20,
                   message="the first standalone worker's node")
        scheduler = LilotaScheduler(self.db_url)
        task_id = scheduler.schedule("block_first", max_attempts=2)
        running = self.wait_status(scheduler, task_id, "running")
        self.assertEqual(running.pid, frozen.pid)
        os.kill(frozen.pid, signal.SIGSTOP)
        self.addCleanup(self._continue, frozen.pid)

        helper = self.popen_python(script)
        task = scheduler.wait(task_id, timeout=30)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.attempts, 2)
        self.assertEqual(task.pid, helper.pid)
        statuses = dict(self.query("SELECT pid, status FROM lilota_node WHERE type = 'worker'"))
        self.assertEqual(statuses[frozen.pid], "dead")
        self.assertEqual(statuses[helper.pid], "running")

    @staticmethod
    def _continue(pid):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    unittest.main()
