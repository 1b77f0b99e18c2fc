"""End-to-end tests of lilota's real worker processes on SQLite: many workers in several
applications, failures, retries, timeouts, broken worker scripts, stop(), cancel, wake-up, delayed and
prioritised tasks, and the standalone worker. Crashes (kill -9, poison pills, killed applications)
are in test_crashes.py."""

import collections
import json
import os
import select
import signal
import subprocess
import time
import textwrap
import unittest
import uuid
from datetime import datetime, timedelta, timezone

from support import ROOT, TempDirTestCase, child_pids, process_alive, wait_until, on_every_backend

import lilota
from lilota import Lilota, LilotaScheduler

#: The tasks every test's worker script registers. HERE is the test directory (the script's own).
WORKER_BODY = """
HERE = os.path.dirname(os.path.abspath(__file__))

def append(name, text):
    fd = os.open(os.path.join(HERE, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\\n").encode())
    finally:
        os.close(fd)

append("starts.log", str(os.getpid()))   # one line each time the script runs
worker = LilotaWorker(db_url=worker.db_url, retry_delay=RETRY_DELAY, **WORKER_OPTIONS)

@worker.register("echo")
def echo(data):
    return data

@worker.register("pid")
def pid(data):
    return {"pid": os.getpid()}

@worker.register("log")
def log(data, ctx: TaskContext):
    append(data.get("log", "tasks.log"), str(ctx.task_id))
    if data.get("sleep"):
        time.sleep(data["sleep"])
    return {"pid": os.getpid()}

@worker.register("fail")
def fail(data):
    raise ValueError("boom " + str(data))

@worker.register("flaky")
def flaky(data, ctx: TaskContext):
    if ctx.attempt < data["succeed_at"]:
        raise RuntimeError("attempt %d fails" % ctx.attempt)
    return {"attempt": ctx.attempt}

@worker.register("backoff")
def backoff(data, ctx: TaskContext):
    row = worker.storage.get_task(str(ctx.task_id))
    append("backoff.log", json.dumps({"attempt": ctx.attempt, "run_at": row.run_at.timestamp(),
                                      "failed_at": time.time()}))
    raise RuntimeError("fails every time")

@worker.register("sleep")
def sleep(data):
    time.sleep(data["seconds"])
    return {"slept": data["seconds"]}

@worker.register("forever")
def forever(data):
    while True:
        time.sleep(0.05)

@worker.register("until_file")
def until_file(data, ctx: TaskContext):
    while not os.path.exists(os.path.join(HERE, data["file"])):
        time.sleep(0.01)
    return {"attempt": ctx.attempt, "pid": os.getpid()}

@worker.register("block_first")
def block_first(data, ctx: TaskContext):
    if ctx.attempt == 1:
        while True:
            time.sleep(0.05)
    return {"attempt": ctx.attempt, "pid": os.getpid()}

@worker.register("suicide")
def suicide(data):
    os._exit(1)
"""

APP_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from lilota import Lilota

if __name__ == "__main__":
    app = Lilota({db_url!r}, script_path={script!r}, number_of_workers={workers}, name=sys.argv[1])
    app.start()
    stop_file = {stop_file!r}
    while not os.path.exists(stop_file) and not app.has_failed():
        time.sleep(0.02)
    app.stop(timeout=10)
    if app.has_failed():
        print(app.error, file=sys.stderr)
        sys.exit(1)
"""


class WorkerTestCase(TempDirTestCase):
    """Helpers shared by the process tests."""

    def script(self, retry_delay=0.05, name="worker_script.py", more_tasks="", **options):
        """The worker script with WORKER_BODY's tasks (and the code in ``more_tasks``); ``options``
        go to its LilotaWorker."""
        return self.worker_script(f"RETRY_DELAY = {retry_delay!r}\nWORKER_OPTIONS = {options!r}\n" + WORKER_BODY
                                  + more_tasks, name=name)

    def query(self, sql, *params):
        return self.db_execute(sql, *params)

    def wait_status(self, app, task_id, status, timeout=20):
        return wait_until(lambda: (lambda t: t if t is not None and t.status == status else None)(
            app.get_task_by_id(task_id)), timeout, message=f"task {task_id} to be {status}")

    def starts(self):
        """How many times the worker script ran."""
        try:
            with open(self.path("starts.log")) as f:
                return len(f.read().split())
        except FileNotFoundError:
            return 0

    def worker_children(self):
        """Live child processes of the test process, without multiprocessing's resource tracker."""
        tracker = None
        try:
            from multiprocessing import resource_tracker
            tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
        except ImportError:
            pass
        return [pid for pid in child_pids() if pid != tracker]


@on_every_backend
class ManyWorkersTest(WorkerTestCase):

    def test_500_tasks_over_two_applications_run_exactly_once(self):
        script = self.script()
        stop_file = self.path("stop-apps")
        app_script = self.write("app.py", APP_SCRIPT.format(
            root=ROOT, db_url=self.db_url, script=script, workers=2, stop_file=stop_file))
        apps = [self.popen_python(app_script, name) for name in ("app1", "app2")]
        self.wait_workers_running(4)

        scheduler = LilotaScheduler(self.db_url)
        ids = [scheduler.schedule("log", {"sleep": 0.002}) for _ in range(250)]
        ids += scheduler.schedule_many("log", [{"sleep": 0.002}] * 250)
        for task_id in ids:
            task = scheduler.wait(task_id, timeout=60)
            self.assertEqual(task.status, "completed", task.error)
            self.assertEqual(task.attempts, 1)

        self.assertEqual(self.query("SELECT status, COUNT(*) FROM lilota_task GROUP BY status"), [("completed", 500)])
        with open(self.path("tasks.log")) as f:
            logged = collections.Counter(f.read().split())
        self.assertEqual(set(logged), {str(i) for i in ids})
        self.assertEqual([i for i, n in logged.items() if n != 1], [])

        # The work was shared by the workers of both applications.
        names = {name for (name,) in self.query(
            "SELECT DISTINCT n.name FROM lilota_task t JOIN lilota_node n ON n.id = t.locked_by")}
        self.assertEqual({n.split(":")[0] for n in names}, {"app1", "app2"})

        with open(stop_file, "w"):
            pass
        for proc in apps:
            self.assertEqual(proc.wait(30), 0)
        for node_id, pid, status, name in self.worker_nodes():
            self.assertEqual(status, "stopped", name)
            self.assertFalse(process_alive(pid))


@on_every_backend
class FailureAndRetryTest(WorkerTestCase):

    def test_exception_fails_task_and_worker_lives_on(self):
        app = self.start_lilota(self.script(), 1)
        failed = app.wait(app.schedule("fail", "x"), timeout=20)
        self.assertEqual(failed.status, "failed")
        self.assertEqual(failed.error["type"], "ValueError")
        self.assertEqual(failed.error["message"], "boom x")
        self.assertIn("Traceback", failed.error["traceback"])
        self.assertIn('raise ValueError("boom " + str(data))', failed.error["traceback"])
        self.assertEqual(failed.attempts, 1)
        self.assertIsNotNone(failed.end_date_time)

        done = app.wait(app.schedule("pid"), timeout=20)
        self.assertEqual(done.status, "completed")
        self.assertEqual(done.pid, failed.pid)
        self.assertEqual(done.output, {"pid": failed.pid})
        self.assertFalse(app.has_failed())

    def test_unknown_task_name_fails_and_worker_lives_on(self):
        app = self.start_lilota(self.script(), 1)
        task = app.wait(app.schedule("no_such_task", {"a": 1}), timeout=20)
        self.assertEqual(task.status, "failed")
        self.assertEqual(task.error["type"], "UnknownTaskError")
        self.assertIn("no_such_task", task.error["message"])
        self.assertIn("traceback", task.error)

        done = app.wait(app.schedule("pid"), timeout=20)
        self.assertEqual(done.status, "completed")
        self.assertEqual(done.pid, task.pid)
        self.assertTrue(process_alive(done.pid))
        self.assertFalse(app.has_failed())

    def test_retries_until_success_keep_the_id(self):
        app = self.start_lilota(self.script(), 1)
        task_id = app.schedule("flaky", {"succeed_at": 3}, max_attempts=3)
        task = app.wait(task_id, timeout=20)
        self.assertEqual(task.id, task_id)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.attempts, 3)
        self.assertEqual(task.max_attempts, 3)
        self.assertEqual(task.output, {"attempt": 3})

    def test_task_that_always_fails_uses_all_attempts(self):
        app = self.start_lilota(self.script(), 1)
        task = app.wait(app.schedule("flaky", {"succeed_at": 99}, max_attempts=3), timeout=20)
        self.assertEqual(task.status, "failed")
        self.assertEqual(task.attempts, 3)
        self.assertEqual(task.max_attempts, 3)
        self.assertEqual(task.error["type"], "RuntimeError")
        self.assertEqual(task.error["message"], "attempt 3 fails")  # the last error is kept

    def test_retry_delay_grows_exponentially(self):
        base = 0.2
        app = self.start_lilota(self.script(retry_delay=base), 1)
        task = app.wait(app.schedule("backoff", max_attempts=5), timeout=60)
        self.assertEqual(task.status, "failed")
        self.assertEqual(task.attempts, 5)
        with open(self.path("backoff.log")) as f:
            runs = [json.loads(line) for line in f]
        self.assertEqual([r["attempt"] for r in runs], [1, 2, 3, 4, 5])
        # The delay before attempt k+1 is run_at(k+1) - the time attempt k failed: the backoff plus
        # the (non-negative) time the worker took to record the failure, which a loaded machine
        # stretches. So the lower bounds are exact and the upper bounds leave room for that noise.
        delays = [runs[k + 1]["run_at"] - runs[k]["failed_at"] for k in range(4)]
        for k, delay in enumerate(delays):
            nominal = base * 2 ** k          # jitter takes it down to half of that
            self.assertGreaterEqual(delay, nominal * 0.5 - 0.02, delays)
            self.assertLessEqual(delay, nominal + 1.5, delays)
        # The delay doubles per attempt: the last one (at least 0.8 s) is longer than the first
        # (at most 0.2 s plus noise). A constant delay (0.1-0.2 s) fails the lower bounds above.
        self.assertGreater(delays[3], delays[0], delays)


@on_every_backend
class TimeoutTest(WorkerTestCase):

    def test_timeout_expires_task_and_replaces_worker(self):
        app = self.start_lilota(self.script(), 1)
        task_id = app.schedule("forever", timeout=timedelta(seconds=0.5))
        running = self.wait_status(app, task_id, "running")
        task = app.wait(task_id, timeout=20)
        self.assertEqual(task.status, "expired")
        self.assertEqual(task.attempts, 1)
        self.assertEqual(task.error["type"], "TaskTimeoutError")
        self.assertIn("timeout", task.error["message"])
        self.assertGreaterEqual(task.end_date_time - task.start_date_time, timedelta(seconds=0.5))
        wait_until(lambda: not process_alive(running.pid), 10, message="the timed-out worker to exit")

        done = app.wait(app.schedule("pid"), timeout=20)
        self.assertEqual(done.status, "completed")
        self.assertNotEqual(done.pid, running.pid)
        self.assertFalse(app.has_failed())

    def test_timeout_with_two_attempts_is_retried_once(self):
        app = self.start_lilota(self.script(), 1)
        task = app.wait(app.schedule("forever", timeout=timedelta(seconds=0.5), max_attempts=2), timeout=30)
        self.assertEqual(task.status, "expired")
        self.assertEqual(task.attempts, 2)
        self.assertEqual(task.error["type"], "TaskTimeoutError")
        # Each attempt ran in its own worker process, which was replaced after it.
        self.assertEqual(app.wait(app.schedule("pid"), timeout=20).status, "completed")
        self.assertEqual(self.starts(), 3)
        self.assertEqual(len(self.worker_nodes()), 3)


class BrokenScriptTest(WorkerTestCase):
    """A script that cannot start is a fatal error, reported once, and not restarted."""

    HEADER = f"import os, sys\nsys.path.insert(0, {ROOT!r})\n" + textwrap.dedent("""
        fd = os.open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "starts.log"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"start\\n")
        os.close(fd)
        from lilota import LilotaWorker
    """)

    def check_broken(self, body, *expected, counts_starts=True):
        script = self.write("broken.py", self.HEADER + textwrap.dedent(body))
        app = self.start_lilota(script, 2)
        self.assertTrue(app.wait_for_failure(30))
        self.assertTrue(app.has_failed())
        for text in expected:
            self.assertIn(text, app.error)
        app.stop(timeout=5)
        # Started once per worker slot at most: no restart loop. (A script with a syntax error
        # cannot count its own runs: the worker node rows count the spawns.)
        self.assertLessEqual(len(self.worker_nodes()), 2)
        self.assertLessEqual(self.starts(), 2)
        if counts_starts:
            self.assertGreaterEqual(self.starts(), 1)
        for node_id, pid, status, name in self.worker_nodes():
            self.assertFalse(process_alive(pid) if pid else False, name)
        self.assertEqual(self.worker_children(), [])
        return app

    def test_syntax_error(self):
        self.check_broken("""
            worker = LilotaWorker(db_url=%r)
            def oops(:
                pass
        """ % self.db_url, "SyntaxError", "broken.py", counts_starts=False)

    def test_exception_at_import(self):
        self.check_broken("""
            worker = LilotaWorker(db_url=%r)
            raise RuntimeError("cannot configure this worker")
            worker.start()
        """ % self.db_url, "Traceback", "RuntimeError: cannot configure this worker")

    def test_script_that_never_calls_start(self):
        self.check_broken("""
            worker = LilotaWorker(db_url=%r)

            @worker.register("echo")
            def echo(data):
                return data
        """ % self.db_url, "without calling worker.start()")

    def test_sys_exit_before_start(self):
        self.check_broken("""
            worker = LilotaWorker(db_url=%r)
            sys.exit(3)
            worker.start()
        """ % self.db_url, "sys.exit(3)", "before calling worker.start()")

    def test_worker_with_another_db_url(self):
        other = "sqlite:///" + self.path("other.db")
        self.check_broken("""
            worker = LilotaWorker(db_url=%r)
            if __name__ == "__main__":
                worker.start()
        """ % other, "other.db", "lilota.db", "same db_url")


@on_every_backend
class StopTest(WorkerTestCase):

    def test_stop_lets_a_short_task_finish(self):
        app = self.start_lilota(self.script(), 1)
        task_id = app.schedule("sleep", {"seconds": 0.5})
        running = self.wait_status(app, task_id, "running")
        app.stop(timeout=10)
        task = app.get_task_by_id(task_id)
        self.assertEqual(task.status, "completed")
        self.assertEqual(task.output, {"slept": 0.5})
        self.assertFalse(process_alive(running.pid))
        self.assertEqual(self.worker_children(), [])
        self.assertEqual([n[2] for n in self.worker_nodes()], ["stopped"])

    def test_stop_requeues_a_long_task_which_runs_after_restart(self):
        app = self.start_lilota(self.script(), 2)
        task_id = app.schedule("until_file", {"file": "release"})
        running = self.wait_status(app, task_id, "running")
        self.assertEqual(running.attempts, 1)
        app.stop(timeout=0.5)

        task = app.get_task_by_id(task_id)
        self.assertEqual(task.status, "scheduled")
        self.assertEqual(task.attempts, 0)        # the interrupted attempt was given back
        self.assertIsNone(task.end_date_time)
        self.assertFalse(process_alive(running.pid))
        self.assertEqual(self.worker_children(), [])
        for node_id, pid, status, name in self.worker_nodes():
            self.assertEqual(status, "stopped", name)
            self.assertFalse(process_alive(pid), name)

        with open(self.path("release"), "w"):
            pass
        again = self.start_lilota(self.script(), 1)
        task = again.wait(task_id, timeout=20)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.attempts, 1)
        self.assertEqual(task.output["attempt"], 1)
        self.assertNotEqual(task.pid, running.pid)


@on_every_backend
class CancelTest(WorkerTestCase):

    def test_cancel_queued_task_never_runs(self):
        # Cancelled before any worker exists, so the cancel cannot race a claim, however slow the
        # machine: the task is due at once and stays due while the workers run.
        app = Lilota(self.db_url, script_path=self.script(), number_of_workers=2)
        cancelled_id = app.schedule("log", {"log": "cancelled.log"})
        self.assertTrue(app.cancel(cancelled_id))
        app.start()
        self.addCleanup(self._stop_and_check, app)
        self.wait_workers_running(2)
        # A task of the same priority due later than the cancelled one: once it has run, the
        # cancelled one would have run first.
        later = app.wait(app.schedule("pid"), timeout=20)
        self.assertEqual(later.status, "completed")

        task = app.get_task_by_id(cancelled_id)
        self.assertEqual(task.status, "cancelled")
        self.assertLess(task.run_at, later.start_date_time)
        self.assertIsNone(task.start_date_time)
        self.assertIsNone(task.pid)
        self.assertEqual(task.attempts, 0)
        self.assertFalse(os.path.exists(self.path("cancelled.log")))

    def test_cancel_running_task_replaces_its_worker(self):
        app = self.start_lilota(self.script(), 1)
        task_id = app.schedule("forever")
        running = self.wait_status(app, task_id, "running")
        self.assertTrue(app.cancel(str(task_id)))
        task = app.wait(task_id, timeout=20)
        self.assertEqual(task.status, "cancelled")
        self.assertEqual(task.error["type"], "TaskCancelledError")
        wait_until(lambda: not process_alive(running.pid), 10, message="the cancelled task's worker to exit")

        done = app.wait(app.schedule("pid"), timeout=20)
        self.assertEqual(done.status, "completed")
        self.assertNotEqual(done.pid, running.pid)
        self.assertFalse(app.has_failed())

    def test_cancel_finished_and_unknown(self):
        app = self.start_lilota(self.script(), 1)
        done = app.wait(app.schedule("echo", {"x": 1}), timeout=20)
        self.assertEqual(done.status, "completed")
        self.assertFalse(app.cancel(done.id))
        self.assertEqual(app.get_task_by_id(done.id).status, "completed")
        failed = app.wait(app.schedule("fail"), timeout=20)
        self.assertFalse(app.cancel(failed.id))
        self.assertEqual(app.get_task_by_id(failed.id).status, "failed")
        with self.assertRaises(lilota.TaskNotFoundError):
            app.cancel(uuid.uuid4())

    def test_cancel_of_a_cancelled_task_returns_true_and_changes_nothing(self):
        scheduler = LilotaScheduler(self.db_url)
        task_id = scheduler.schedule("echo", delay=timedelta(hours=1))
        self.assertTrue(scheduler.cancel(task_id))
        first = scheduler.get_task_by_id(task_id)
        self.assertEqual(first.status, "cancelled")
        # cancel() is idempotent, like concurrent.futures.Future.cancel(): the task *is* cancelled.
        self.assertTrue(scheduler.cancel(task_id))
        self.assertEqual(scheduler.get_task_by_id(task_id), first)


@on_every_backend
class PickUpTest(WorkerTestCase):

    def test_idle_workers_pick_up_task_scheduled_by_another_process(self):
        app = self.start_lilota(self.script(), 2)
        self.wait_workers_running(2)
        code = textwrap.dedent(f"""
            from lilota import Lilota
            print(Lilota.scheduler({self.db_url!r}).schedule("echo", {{"from": "elsewhere"}}))
        """)
        result = self.run_python("-c", code)
        self.assertEqual(result.returncode, 0, result.stderr)
        task = app.wait(uuid.UUID(result.stdout.strip()), timeout=30)
        self.assertEqual(task.status, "completed")
        self.assertEqual(task.output, {"from": "elsewhere"})
        self.assertIn(task.pid, [n[1] for n in self.worker_nodes()])

    def test_idle_workers_pick_up_own_task(self):
        app = self.start_lilota(self.script(), 2)
        self.wait_workers_running(2)
        for i in range(3):
            task = app.wait(app.schedule("echo", {"i": i}), timeout=20)
            self.assertEqual(task.status, "completed")
            self.assertEqual(task.output, {"i": i})

    def test_delayed_task_runs_at_run_at_not_before(self):
        app = self.start_lilota(self.script(), 2)
        self.wait_workers_running(2)
        before = datetime.now(timezone.utc)
        task_id = app.schedule("echo", {"late": True}, delay=timedelta(seconds=1))
        scheduled = app.get_task_by_id(task_id)
        self.assertGreaterEqual(scheduled.run_at, before + timedelta(seconds=1))
        self.assertEqual(scheduled.status, "scheduled")
        task = app.wait(task_id, timeout=20)
        self.assertEqual(task.status, "completed")
        self.assertEqual(task.run_at, scheduled.run_at)
        self.assertGreaterEqual(task.start_date_time, task.run_at)

    def test_priority_orders_the_queue(self):
        scheduler = LilotaScheduler(self.db_url)
        low = [scheduler.schedule("echo", {"p": "low", "i": i}) for i in range(3)]
        high = [scheduler.schedule("echo", {"p": "high", "i": i}, priority=10) for i in range(3)]
        app = self.start_lilota(self.script(), 1)
        tasks = [app.wait(t, timeout=20) for t in low + high]
        self.assertTrue(all(t.status == "completed" for t in tasks))
        order = [t.id for t in sorted(tasks, key=lambda t: t.start_date_time)]
        self.assertEqual(order, high + low)  # high first; within a priority, oldest run_at first


@on_every_backend
class StandaloneWorkerTest(WorkerTestCase):

    def test_standalone_worker_runs_tasks_times_out_cooperatively_and_stops_on_sigterm(self):
        script = self.script()
        proc = self.popen_python(script)
        wait_until(lambda: [n for n in self.worker_nodes("running") if n[1] == proc.pid], 20,
                   message="the standalone worker's node")
        scheduler = Lilota.scheduler(self.db_url)

        done = scheduler.wait(scheduler.schedule("pid"), timeout=20)
        self.assertEqual(done.status, "completed")
        self.assertEqual(done.pid, proc.pid)

        expired = scheduler.wait(scheduler.schedule("forever", timeout=timedelta(seconds=1)), timeout=20)
        self.assertEqual(expired.status, "expired")
        self.assertEqual(expired.error["type"], "TaskTimeoutError")
        self.assertEqual(expired.pid, proc.pid)
        self.assertIsNone(proc.poll())            # interrupted, not killed

        after = scheduler.wait(scheduler.schedule("pid"), timeout=20)
        self.assertEqual(after.status, "completed")
        self.assertEqual(after.pid, proc.pid)

        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(20), 0)
        self.assertEqual([(n[1], n[2]) for n in self.worker_nodes()], [(proc.pid, "stopped")])

    SLOW_GIVE_BACK = """
import lilota as _lilota
_give_back = _lilota._give_back

def _slow_give_back(*args, **kwargs):   # the records of the worker's stop wait for the test's word
    if sys._getframe(1).f_code.co_name == "_start_standalone":
        print("giving back", file=sys.stderr, flush=True)
        while not os.path.exists(os.path.join(HERE, "release")):
            time.sleep(0.01)
    return _give_back(*args, **kwargs)

_lilota._give_back = _slow_give_back
"""

    def read_stderr_until(self, proc, text, seen):
        deadline = time.monotonic() + 20
        while not any(text in line for line in seen):
            self.assertLess(time.monotonic(), deadline, f"no {text!r} on stderr: {seen}")
            if select.select([proc.stderr], [], [], 0.1)[0]:
                seen.append(proc.stderr.readline())

    def check_signals(self, first, second, third=None):
        """A task runs; ``first`` lets it finish, ``second`` stops at once; ``third``, sent while the
        worker records its stop, changes nothing."""
        script = self.script(more_tasks=self.SLOW_GIVE_BACK if third else "")
        proc = self.popen_python(script, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        wait_until(lambda: [n for n in self.worker_nodes("running") if n[1] == proc.pid], 20,
                   message="the standalone worker's node")
        scheduler = Lilota.scheduler(self.db_url)
        task_id = scheduler.schedule("forever")
        wait_until(lambda: scheduler.get_task_by_id(task_id).status == "running", 20, message="the task to start")
        os.kill(proc.pid, first)       # graceful: the running task may finish
        seen = []
        self.read_stderr_until(proc, "stopping after the running task", seen)   # handled
        self.assertIsNone(proc.poll())
        self.assertEqual(scheduler.get_task_by_id(task_id).status, "running")
        os.kill(proc.pid, second)      # stop now
        if third:
            self.read_stderr_until(proc, "giving back", seen)
            os.kill(proc.pid, third)
            self.assertIsNone(proc.poll())
            with open(self.path("release"), "w"):
                pass
        _, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 0, "".join(seen) + err)
        task = scheduler.get_task_by_id(task_id)
        self.assertEqual((task.status, task.attempts), ("scheduled", 0), task)
        self.assertEqual([(n[1], n[2]) for n in self.worker_nodes()], [(proc.pid, "stopped")])

    def test_a_signal_while_the_worker_records_its_stop_changes_nothing(self):
        self.check_signals(signal.SIGTERM, signal.SIGINT, signal.SIGTERM)

    def test_standalone_worker_second_signal_stops_at_once_and_gives_the_task_back(self):
        for first, second in ((signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM),
                              (signal.SIGINT, signal.SIGTERM)):
            with self.subTest(first=first.name, second=second.name):
                self.check_signals(first, second)
                self.db_execute("DELETE FROM lilota_task")
                self.db_execute("DELETE FROM lilota_node")


if __name__ == "__main__":
    unittest.main()
