"""A drop-in for upstream lilota 1.x (issue 21): an application written for upstream lilota 1.0 or 1.4
(``pip install lilota``) runs on this file with only the install line changed. Written against
upstream's documented API: LilotaMode and ``mode=``, upstream's constructor arguments (mapped to
ours, or accepted and checked where lilota has no such knob), the methods of its LilotaScheduler,
LilotaWorker and Lilota, ``cleanup()``'s counts, and a 1.x application run unchanged."""

import json
import logging
import os
import threading
import time
import unittest
from dataclasses import dataclass
from datetime import timedelta

import support

import lilota
from lilota import ConfigurationError, Lilota, LilotaScheduler, LilotaWorker, Node, NodeStatus, NodeType, TaskStatus


@dataclass
class AddInput:
    a: int
    b: int


@dataclass
class AddOutput:
    sum: int


#: Every constructor argument of upstream lilota 1.4, with the values its documentation shows.
UPSTREAM_WORKER_ARGUMENTS = dict(node_heartbeat_interval=5.0, node_heartbeat_interval_jitter=0.2, node_timeout_sec=20,
                                 task_heartbeat_interval=0.1, max_task_heartbeat_interval=5.0,
                                 logging_level=logging.INFO)
UPSTREAM_SCHEDULER_ARGUMENTS = dict(node_heartbeat_interval=5.0, node_timeout_sec=20, logging_level=logging.INFO)
UPSTREAM_LILOTA_ARGUMENTS = dict(scheduler_heartbeat_interval=5, scheduler_timeout_sec=20, process_manager_interval=1.0,
                                 stop_worker_timeout=60, logging_level=logging.INFO, on_fatal_error=None)


def keep_logging_levels(test):
    """``logging_level`` sets the level of the ``lilota`` logger: put it (and the root's) back afterwards."""
    for name in ("lilota", None):
        test.addCleanup(logging.getLogger(name).setLevel, logging.getLogger(name).level)


class UpstreamTestCase(support.TempDirTestCase):
    def setUp(self):
        super().setUp()
        keep_logging_levels(self)

    def upstream_worker_script(self, body="", name="myscript.py"):
        """A worker script as an upstream 1.4 user writes it: every LilotaWorker argument of upstream,
        an ``add`` task in the README's style and ``worker.start()`` in ``main()``."""
        return self.write(name, f"""
            import logging, os, sys
            from dataclasses import dataclass
            from lilota.worker import LilotaWorker
            from lilota.models import TaskContext


            @dataclass
            class AddInput():
                a: int
                b: int


            @dataclass
            class AddOutput():
                sum: int


            worker = LilotaWorker(
                db_url={self.db_url!r},
                node_heartbeat_interval=5.0,
                node_heartbeat_interval_jitter=0.2,
                node_timeout_sec=20,
                task_heartbeat_interval=0.1,
                max_task_heartbeat_interval=5.0,
                logging_level=logging.INFO,
            )


            @worker.register("add", input_model=AddInput, output_model=AddOutput)
            def add(data: AddInput) -> AddOutput:
                return AddOutput(sum=data.a + data.b)
            {body}

            def main():
                worker.start()


            if __name__ == "__main__":
                main()
            """)


class ImportTests(unittest.TestCase):
    def test_lilota_mode_is_importable_from_upstream_paths(self):
        from lilota import LilotaMode
        from lilota.core import LilotaMode as from_core
        from lilota.models import LilotaMode as from_models
        self.assertIs(from_core, LilotaMode)
        self.assertIs(from_models, LilotaMode)
        self.assertIn("LilotaMode", lilota.__all__)
        self.assertEqual([m.value for m in LilotaMode], ["all", "scheduler", "workers"])
        self.assertEqual(LilotaMode.WORKERS, "workers")   # a str enum, as upstream's


class ConstructorTests(UpstreamTestCase):
    def test_worker_takes_upstream_arguments_and_runs_tasks(self):
        worker = LilotaWorker(self.db_url, **UPSTREAM_WORKER_ARGUMENTS)
        self.assertEqual((worker.heartbeat_interval, worker.node_timeout), (5.0, 20.0))

        @worker.task
        def add(data: AddInput) -> AddOutput:
            return AddOutput(data.a + data.b)

        task_id = LilotaScheduler(self.db_url).schedule("add", AddInput(a=2, b=3))
        [task] = worker.run_pending()
        self.assertEqual((task.id, task.status, AddOutput(**task.output)), (task_id, TaskStatus.COMPLETED, AddOutput(5)))

    def test_scheduler_takes_upstream_arguments_by_keyword_and_position(self):
        scheduler = LilotaScheduler(self.db_url, **UPSTREAM_SCHEDULER_ARGUMENTS)
        self.assertEqual((scheduler.heartbeat_interval, scheduler.node_timeout), (5.0, 20.0))
        scheduler = LilotaScheduler(self.db_url, 2.5, 12, logging.WARNING)   # upstream's order
        self.assertEqual((scheduler.heartbeat_interval, scheduler.node_timeout), (2.5, 12.0))

    def test_lilota_takes_upstream_arguments(self):
        script = self.upstream_worker_script()
        app = Lilota(self.db_url, script_path=script, number_of_workers=1, **UPSTREAM_LILOTA_ARGUMENTS)
        self.assertEqual((app.heartbeat_interval, app.node_timeout, app.stop_timeout), (5.0, 20.0, 60.0))
        app = Lilota.scheduler(self.db_url, scheduler_heartbeat_interval=1, scheduler_timeout_sec=4)
        self.assertEqual((app.heartbeat_interval, app.node_timeout), (1.0, 4.0))

    def test_logging_level_sets_lilota_loggers_not_the_root(self):
        root = logging.getLogger().level
        LilotaWorker(self.db_url, logging_level=logging.DEBUG)
        self.assertEqual(logging.getLogger("lilota").level, logging.DEBUG)
        self.assertEqual(logging.getLogger("lilota.worker").getEffectiveLevel(), logging.DEBUG)
        LilotaScheduler(self.db_url, logging_level="WARNING")
        self.assertEqual(logging.getLogger("lilota").level, logging.WARNING)
        Lilota(self.db_url, logging_level=logging.ERROR)
        self.assertEqual(logging.getLogger("lilota").level, logging.ERROR)
        self.assertEqual(logging.getLogger().level, root)

    def test_invalid_upstream_values_raise_value_error(self):
        script = self.upstream_worker_script()
        cases = [
            (LilotaWorker, dict(node_heartbeat_interval_jitter=0)),
            (LilotaWorker, dict(node_heartbeat_interval_jitter=1)),
            (LilotaWorker, dict(node_heartbeat_interval_jitter=1.5)),
            (LilotaWorker, dict(task_heartbeat_interval=0)),
            (LilotaWorker, dict(task_heartbeat_interval=-0.1)),
            (LilotaWorker, dict(max_task_heartbeat_interval=0)),
            (LilotaWorker, dict(node_heartbeat_interval=0)),
            (LilotaWorker, dict(node_timeout_sec=-1)),
            (LilotaWorker, dict(logging_level="LOUD")),
            (LilotaScheduler, dict(node_heartbeat_interval=-5)),
            (LilotaScheduler, dict(node_timeout_sec=0)),
            (Lilota, dict(scheduler_heartbeat_interval=0)),
            (Lilota, dict(scheduler_timeout_sec=-20)),
            (Lilota, dict(stop_worker_timeout=-1)),
            (Lilota, dict(process_manager_interval=0)),
            (Lilota, dict(mode="everything")),
            (Lilota, dict(mode="workers")),                    # no script_path to run
            (Lilota, dict(script_path=script, number_of_workers=0)),
        ]
        for cls, arguments in cases:
            with self.subTest(cls=cls.__name__, **arguments):
                with self.assertRaises(ValueError):
                    cls(self.db_url, **arguments)
        with self.assertRaises(TypeError):
            Lilota(self.db_url, on_fatal_error="print")

    def test_our_name_and_upstreams_with_different_values_are_refused(self):
        for cls, ours, theirs in [(LilotaWorker, dict(heartbeat_interval=2), dict(node_heartbeat_interval=3)),
                                  (LilotaWorker, dict(node_timeout=40), dict(node_timeout_sec=20)),
                                  (LilotaScheduler, dict(node_timeout=40), dict(node_timeout_sec=20)),
                                  (Lilota, dict(stop_timeout=5), dict(stop_worker_timeout=60)),
                                  (Lilota, dict(heartbeat_interval=1), dict(scheduler_heartbeat_interval=5))]:
            with self.subTest(cls=cls.__name__, **ours, **theirs):
                with self.assertRaises(ConfigurationError) as caught:
                    cls(self.db_url, **ours, **theirs)
                for name in (*ours, *theirs):
                    self.assertIn(name, str(caught.exception))
        # The same value under both names is no conflict.
        self.assertEqual(Lilota(self.db_url, stop_timeout=timedelta(minutes=1), stop_worker_timeout=60).stop_timeout, 60)


class FatalErrorCallbackTests(UpstreamTestCase):
    def test_on_fatal_error_is_called_once_from_the_supervisor(self):
        script = self.write("broken.py", "raise RuntimeError('the script is broken')\n")
        calls = []
        app = Lilota(self.db_url, script_path=script, number_of_workers=2, on_fatal_error=lambda error: calls.append(
            (error, threading.current_thread().name, app.has_failed(), [h for h in app._handles if h])))
        self.addCleanup(self._stop_and_check, app)
        app.start()
        support.wait_until(lambda: calls, 30, message="on_fatal_error to be called")
        [(error, thread, failed, handles)] = calls
        self.assertIn("the script is broken", error)
        self.assertEqual(error, app.error)
        self.assertEqual(thread, "lilota-supervisor")
        self.assertTrue(failed)
        self.assertEqual(handles, [])   # called once the workers were stopped
        support.wait_until(lambda: not app.is_running, 10, message="the supervisor to end")
        self.assertEqual(len(calls), 1)

    def test_an_exception_in_on_fatal_error_is_logged_not_raised(self):
        script = self.write("broken.py", "import sys\nsys.exit(3)\n")

        def callback(error):
            raise ValueError("the callback is broken too")

        with self.assertLogs("lilota", logging.ERROR) as logs:
            app = self.start_lilota(script, 1, on_fatal_error=callback)
            support.wait_until(lambda: not app.is_running, 30, message="the supervisor to end")
        self.assertTrue(app.has_failed())
        self.assertTrue(any("on_fatal_error" in line and "the callback is broken too" in line
                            for line in logs.output), logs.output)


@support.on_every_backend
class ModeTests(UpstreamTestCase):
    def test_every_upstream_argument_in_a_worker_script_and_lilota(self):
        from lilota.core import LilotaMode
        script = self.upstream_worker_script()
        errors = []
        app = self.start_lilota(script, 1, mode=LilotaMode.ALL,
                                **dict(UPSTREAM_LILOTA_ARGUMENTS, on_fatal_error=errors.append))
        task_id = app.schedule("add", AddInput(a=2, b=3))
        task = app.wait(task_id, timeout=60)
        self.assertEqual((task.status, AddOutput(**task.output)), (TaskStatus.COMPLETED, AddOutput(sum=5)), task.error)
        self.assertEqual(errors, [])

    def test_scheduler_mode_schedules_and_starts_no_workers(self):
        from lilota.core import LilotaMode
        script = self.upstream_worker_script()
        # As upstream, a script_path given to a scheduler is not run.
        app = Lilota(self.db_url, mode=LilotaMode.SCHEDULER, script_path=script, number_of_workers=2)
        self.assertEqual((app.mode, app.script_path, app.number_of_workers), (LilotaMode.SCHEDULER, None, 0))
        app.start()
        self.addCleanup(app.stop)
        task_id = app.schedule("add", AddInput(a=1, b=2))
        self.assertEqual(app.get_task_by_id(task_id).status, TaskStatus.SCHEDULED)
        self.assertEqual([n.type for n in app.get_nodes()], [NodeType.SCHEDULER])
        self.assertEqual(app._handles, [])
        self.assertEqual(Lilota.scheduler(self.db_url).mode, LilotaMode.SCHEDULER)
        self.assertEqual(Lilota(self.db_url, mode="scheduler").mode, LilotaMode.SCHEDULER)

    def test_workers_mode_runs_workers_and_refuses_to_schedule(self):
        from lilota.core import LilotaMode
        script = self.upstream_worker_script()
        app = self.start_lilota(script, 1, mode=LilotaMode.WORKERS)
        for attempt in (lambda: app.schedule("add", AddInput(a=1, b=1)),
                        lambda: app.schedule_many("add", [AddInput(a=1, b=1)])):
            with self.assertRaises(RuntimeError) as caught:
                attempt()
            self.assertIn("only runs workers", str(caught.exception))
        self.assertEqual(app.list_tasks(), [])
        # Tasks scheduled elsewhere are run by its workers.
        task_id = Lilota.scheduler(self.db_url).schedule("add", AddInput(a=4, b=5))
        self.assertEqual(app.wait(task_id, timeout=60).output, {"sum": 9})
        factory = Lilota.workers(script, 1, self.db_url)
        self.assertEqual(factory.mode, LilotaMode.WORKERS)
        # Upstream 1.0's order: the database URL first.
        for old_order in (Lilota.workers(self.db_url, script, 3), Lilota.workers(self.db_url, script)):
            self.assertEqual((old_order.db_url, old_order.script_path, old_order.mode),
                             (factory.db_url, factory.script_path, LilotaMode.WORKERS))
        self.assertEqual(Lilota.workers(self.db_url, script, 3).number_of_workers, 3)
        with self.assertRaises(RuntimeError):
            factory.schedule("add", AddInput(a=1, b=1))

    def test_all_mode_is_the_default(self):
        from lilota.models import LilotaMode
        script = self.upstream_worker_script()
        self.assertEqual(Lilota(self.db_url).mode, LilotaMode.ALL)
        app = self.start_lilota(script, 1, mode="all")
        self.assertEqual(app.wait(app.schedule("add", AddInput(a=2, b=2)), timeout=60).output, {"sum": 4})


@support.on_every_backend
class MethodTests(UpstreamTestCase):
    def setUp(self):
        super().setUp()
        self.worker = LilotaWorker(self.db_url, retry_delay=0)

        @self.worker.task
        def add(data: AddInput) -> AddOutput:
            return AddOutput(data.a + data.b)

    def test_scheduler_start_registers_a_node_with_a_heartbeat_until_stop(self):
        scheduler = LilotaScheduler(self.db_url, node_heartbeat_interval=0.05)
        self.assertIsNone(scheduler.get_node())
        self.assertIs(scheduler.start(), scheduler)
        self.addCleanup(scheduler.stop)
        node = scheduler.get_node()
        self.assertIsInstance(node, Node)
        self.assertEqual((node.type, node.status, node.pid), (NodeType.SCHEDULER, NodeStatus.RUNNING, os.getpid()))
        self.assertEqual([n.id for n in scheduler.get_nodes()], [node.id])
        support.wait_until(lambda: scheduler.get_node().last_seen_at > node.last_seen_at, 10,
                           message="a heartbeat of the scheduler node")
        scheduler.stop()
        self.assertEqual(scheduler.get_node().status, NodeStatus.STOPPED)
        seen = scheduler.get_node().last_seen_at
        scheduler.stop()   # a second stop is a no-op
        self.assertEqual(scheduler.get_node().last_seen_at, seen)

    def test_worker_get_node_while_it_runs(self):
        worker = LilotaWorker(self.db_url, name="upstream-worker", **UPSTREAM_WORKER_ARGUMENTS)
        self.assertIsNone(worker.get_node())
        thread = threading.Thread(target=worker.start, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(worker.stop)
        node = support.wait_until(worker.get_node, 20, message="the worker's node")
        self.assertEqual((node.type, node.status, node.pid, node.name),
                         (NodeType.WORKER, NodeStatus.RUNNING, os.getpid(), "upstream-worker"))
        self.assertEqual([n.id for n in worker.get_nodes()], [node.id])

    def test_lilota_get_nodes_is_get_all_nodes(self):
        app = Lilota(self.db_url, name="app")
        self.assertIsNone(app.get_node())
        app.start()
        self.addCleanup(app.stop)
        self.worker.run_pending()
        self.assertEqual(app.get_nodes(), app.get_all_nodes())
        self.assertEqual(len(app.get_nodes()), 2)
        self.assertEqual((app.get_node().name, app.get_node().type), ("app", NodeType.SCHEDULER))

    def test_delete_task_by_id(self):
        scheduler = LilotaScheduler(self.db_url)
        queued, done = (scheduler.schedule("add", AddInput(a=i, b=i)) for i in range(2))
        self.worker.run_pending(limit=1)
        self.assertIs(scheduler.delete_task_by_id(queued), True)
        self.assertIsNone(scheduler.get_task_by_id(queued))
        self.assertIs(scheduler.delete_task_by_id(queued), False)
        self.assertIs(self.worker.delete_task_by_id(str(done)), True)   # a str id, from the worker side
        self.assertIsNone(self.worker.get_task_by_id(done))
        with self.assertRaises(ValueError):
            scheduler.delete_task_by_id("not-a-task-id")

    def test_a_running_task_can_be_deleted_and_its_result_is_dropped(self):
        scheduler = LilotaScheduler(self.db_url)
        task_id = scheduler.schedule("delete_me", {})
        seen = []

        @self.worker.task
        def delete_me(data: dict) -> dict:
            seen.append((scheduler.get_task_by_id(task_id).status, scheduler.delete_task_by_id(task_id)))
            return {"done": True}

        self.worker.run_pending()
        self.assertEqual(seen, [(TaskStatus.RUNNING, True)])
        self.assertIsNone(scheduler.get_task_by_id(task_id))
        self.assertFalse(scheduler.has_unfinished_tasks())

    def test_has_unfinished_tasks(self):
        scheduler = LilotaScheduler(self.db_url)
        self.assertIs(scheduler.has_unfinished_tasks(), False)
        scheduler.schedule("add", AddInput(a=1, b=1))
        self.assertIs(scheduler.has_unfinished_tasks(), True)
        self.worker.run_pending()
        self.assertIs(scheduler.has_unfinished_tasks(), False)
        delayed = scheduler.schedule("add", AddInput(a=1, b=1), delay=timedelta(hours=1))
        self.assertIs(scheduler.has_unfinished_tasks(), True)
        self.db_execute("UPDATE lilota_task SET status = 'running' WHERE id = ?", str(delayed))
        self.assertIs(scheduler.has_unfinished_tasks(), True)
        self.db_execute("UPDATE lilota_task SET status = 'failed' WHERE id = ?", str(delayed))
        self.assertIs(scheduler.has_unfinished_tasks(), False)

    def test_cleanup_returns_the_counts_of_each_kind_of_row(self):
        scheduler = LilotaScheduler(self.db_url)
        old, recent = (scheduler.schedule("add", AddInput(a=i, b=i)) for i in range(2))
        queued = scheduler.schedule("add", AddInput(a=9, b=9), delay=timedelta(hours=1))
        self.worker.run_pending()          # leaves a stopped worker node (run_pending's)
        scheduler.start()
        self.addCleanup(scheduler.stop)    # a running node, never deleted
        long_ago = self.db_time(time.time() - 3 * 86400)
        self.db_execute("UPDATE lilota_task SET end_date_time = ? WHERE id = ?", long_ago, str(old))
        self.db_execute("UPDATE lilota_node SET last_seen_at = ?", long_ago)
        self.assertEqual(scheduler.cleanup(timedelta(days=1)), {"tasks": 1, "log_entries": 0, "nodes": 1})
        self.assertEqual({t.id for t in scheduler.list_tasks()}, {recent, queued})
        self.assertEqual([n.type for n in scheduler.get_nodes()], [NodeType.SCHEDULER])
        self.assertEqual(scheduler.cleanup(timedelta(days=1)), {"tasks": 0, "log_entries": 0, "nodes": 0})
        with self.assertRaises(ValueError):
            scheduler.cleanup(timedelta(days=-1))


UPSTREAM_SCRIPT = '''
import logging
from dataclasses import dataclass
from lilota.worker import LilotaWorker
from lilota.models import TaskContext


@dataclass
class AddInput():
    a: int
    b: int


@dataclass
class AddOutput():
  sum: int


@dataclass
class MulInput():
    a: int
    b: int


@dataclass
class MulOutput():
  product: int


worker = LilotaWorker(
  db_url=DB_URL,
  node_heartbeat_interval=5.0,
  node_timeout_sec=20,
  logging_level=logging.INFO,
)


# The README of lilota 1.0
@worker.register("add", input_model=AddInput, output_model=AddOutput)
def add(data: AddInput) -> AddOutput:
  return AddOutput(sum=data.a + data.b)


# lilota 1.4: name and models from the function
@worker.task
def multiply(input: MulInput) -> MulOutput:
  return MulOutput(input.a * input.b)


@worker.task(name="report", timeout=timedelta(minutes=1))
def make_report(data: dict, ctx: TaskContext) -> dict:
  ctx.progress.set(50)
  ctx.logger.info("report for task %s", ctx.task_id)
  return {"pages": data["pages"], "task_id": str(ctx.task_id)}


@worker.task
def hello():
  return "Hello World"


def main():
  worker.start()


if __name__ == "__main__":
  main()
'''

UPSTREAM_APPLICATION = '''
from dataclasses import dataclass
from datetime import timedelta
import json
import logging
import time
from lilota.core import Lilota, LilotaMode
from lilota.models import Task
from myscript import AddInput, AddOutput, MulInput, MulOutput


def main():
  # lilota 1.4's factory methods: a scheduler, and workers that only execute
  scheduler = Lilota.scheduler(DB_URL, logging_level=logging.INFO)
  workers = Lilota.workers(script_path="myscript.py", number_of_workers=2, db_url=DB_URL,
                           stop_worker_timeout=60, on_fatal_error=lambda error: print("FATAL", error))
  scheduler.start()
  workers.start()

  ids = [
    scheduler.schedule("add", AddInput(a=2, b=3)),
    scheduler.schedule("multiply", MulInput(a=4, b=5)),
    scheduler.schedule("report", {"pages": 3}),
    scheduler.schedule("hello"),
  ]
  try:
    workers.schedule("add", AddInput(a=1, b=1))
  except RuntimeError:
    print("workers cannot schedule")

  deadline = time.monotonic() + 60
  while scheduler.has_unfinished_tasks() and time.monotonic() < deadline:
    time.sleep(0.05)

  for id in ids:
    task: Task = scheduler.get_task_by_id(id)
    print(task.name, task.status, json.dumps(task.output, sort_keys=True) if task.name != "report" else
          task.output["pages"], task.progress_percentage)
  print("sum", AddOutput(**scheduler.get_task_by_id(ids[0]).output).sum)
  print("report id", scheduler.get_task_by_id(ids[2]).output["task_id"] == str(ids[2]))
  print("nodes", sorted(str(n.type) for n in scheduler.get_nodes() if n.status in ("starting", "running")))
  print("own node", scheduler.get_node().type)
  print("deleted", scheduler.delete_task_by_id(ids[3]), scheduler.delete_task_by_id(ids[3]))

  workers.stop()
  scheduler.stop()
  counts = Lilota(DB_URL, mode=LilotaMode.SCHEDULER).cleanup(timedelta(0))
  print("cleanup", counts["tasks"], counts["log_entries"], counts["nodes"] >= 4)
  print("error", workers.error)


if __name__ == "__main__":
  main()
'''


@support.on_every_backend
class UpstreamApplicationTests(UpstreamTestCase):
    def test_an_upstream_application_runs_unchanged(self):
        """An application in the style of upstream's README (1.0 and 1.4) and its factory-methods
        sample; the database URL is the only thing changed."""
        db = f"DB_URL = {self.db_url!r}\n"
        self.write("myscript.py", UPSTREAM_SCRIPT.replace("import logging\n", "import logging\n"
                                                          "from datetime import timedelta\n" + db, 1))
        self.write("app.py", UPSTREAM_APPLICATION.replace("import time\n", "import time\n" + db, 1))
        result = self.run_python("app.py", timeout=180)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines(), [
            "workers cannot schedule",
            'add completed {"sum": 5} 100',
            'multiply completed {"product": 20} 100',
            "report completed 3 100",
            'hello completed "Hello World" 100',
            "sum 5",
            "report id True",
            "nodes ['scheduler', 'scheduler', 'worker', 'worker']",
            "own node scheduler",
            "deleted True False",
            "cleanup 3 1 True",
            "error None",
        ], result.stderr)


if __name__ == "__main__":
    unittest.main()
