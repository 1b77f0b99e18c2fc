"""What a new user trips on (issue 19), with real processes: signals during a graceful stop,
broken worker scripts and wait(), an application that is its own worker script, and a first
worker that starts alone."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from support import ROOT, TempDirTestCase, on_every_backend, process_alive, session_members, wait_until

import lilota

#: Tasks that run until the test ends (the test kills what is left), and one that returns at once.
TASKS = """
@worker.register("hold")
def hold(data):
    while True:
        time.sleep(0.05)

@worker.register("echo")
def echo(data):
    return data
"""

#: An application as a user writes it: start, schedule, wait (no try/finally: Ctrl-C and SIGTERM
#: go through lilota's stop at exit).
APP = """
import sys
sys.path.insert(0, {root!r})
from lilota import Lilota

if __name__ == "__main__":
    app = Lilota({db_url!r}, script_path={script!r}, number_of_workers=2)
    app.start()
    ids = [app.schedule("hold") for _ in range(2)]
    print(" ".join(str(i) for i in ids), flush=True)
    for task_id in ids:
        app.wait(task_id)
"""

#: Seconds a process may take to exit after the signal that stops it at once (the stop timeout
#: it cuts short is 30 s): "a second or two", with room for a loaded machine.
AT_ONCE = 6.0


def run_with_deadline(test, function, timeout=30.0):
    """Call ``function()`` in a thread; its result, or the exception it raised. Fails the test when
    it has not returned after ``timeout`` seconds (e.g. a wait() that never ends)."""
    outcome = {}

    def call():
        try:
            outcome["result"] = function()
        except BaseException as exc:  # noqa: B902 - handed to the test
            outcome["error"] = exc
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        test.fail(f"did not return within {timeout}s")
    return outcome


@on_every_backend
class SignalTest(TempDirTestCase):
    """A first SIGINT/SIGTERM stops gracefully, a second at once; either way the running tasks go
    back to the queue, their attempt not counted, and every node ends stopped."""

    def start_app(self, prelude=None, **options):
        """The application in its own session; its task ids once both tasks run. ``prelude``:
        code the application runs first under its ``if __name__ == "__main__":``."""
        script = self.worker_script(TASKS)
        text = APP.format(root=ROOT, db_url=self.db_url, script=script)
        if prelude:
            text = text.replace('if __name__ == "__main__":\n', 'if __name__ == "__main__":\n' + prelude)
        if options:
            text = text.replace("number_of_workers=2)", "number_of_workers=2, "
                                + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")")
        app = self.write("app.py", text)
        stderr = open(self.path("app.stderr"), "w")
        self.addCleanup(stderr.close)
        proc = self.popen_python(app, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.addCleanup(proc.stdout.close)
        ids = proc.stdout.readline().split()
        self.assertEqual(len(ids), 2, self.stderr())
        self.wait_running(ids)
        return proc, ids

    def stderr(self):
        with open(self.path("app.stderr")) as f:
            return f.read()

    def wait_running(self, ids):
        wait_until(lambda: all(self.status(i) == ("running", 1) for i in ids), 60,
                   message="both tasks to run")

    def status(self, task_id):
        rows = self.db_execute("SELECT status, attempts FROM lilota_task WHERE id = ?", task_id)
        return tuple(rows[0]) if rows else None

    def wait_stopping(self):
        """Until the graceful stop is under way (the workers were asked to stop)."""
        wait_until(lambda: len(self.worker_nodes("stopping")) == 2, 30, message="the workers to be stopping")

    def check_given_back(self, proc, ids, seconds, bound=AT_ONCE):
        self.assertLess(seconds, bound, f"the process did not stop at once:\n{self.stderr()}")
        for task_id in ids:
            self.assertEqual(self.status(task_id), ("scheduled", 0), task_id)
        nodes = self.db_execute("SELECT type, status FROM lilota_node")
        self.assertEqual(len(nodes), 3, nodes)
        self.assertEqual({status for _, status in nodes}, {"stopped"}, nodes)
        wait_until(lambda: not session_members(proc.pid), 10, message="the workers to exit")

    def signal_twice(self, first, second):
        proc, ids = self.start_app()
        os.killpg(proc.pid, first)
        self.wait_stopping()
        sent = time.monotonic()
        os.killpg(proc.pid, second)
        proc.wait(60)
        self.check_given_back(proc, ids, time.monotonic() - sent)
        return proc

    def test_second_ctrl_c_stops_at_once_and_gives_the_tasks_back(self):
        proc = self.signal_twice(signal.SIGINT, signal.SIGINT)
        self.assertEqual(proc.returncode, -signal.SIGINT)   # Python ends as the first Ctrl-C asked

    def test_sigterm_during_the_stop_after_ctrl_c_stops_at_once(self):
        self.signal_twice(signal.SIGINT, signal.SIGTERM)

    def test_second_sigterm_stops_at_once(self):
        proc = self.signal_twice(signal.SIGTERM, signal.SIGTERM)
        self.assertEqual(proc.returncode, 128 + signal.SIGTERM)

    def test_second_signal_the_moment_the_workers_are_told_to_stop(self):
        # The second SIGTERM arrives as stop() tells the supervisor to stop (here: sent by the
        # application to itself right then). It must cut the stop short, not raise out of the
        # middle of stop() and leave the graceful stop to run out its 30 s at exit.
        proc, ids = self.start_app(prelude='''    import os, signal
    told = Lilota._notify_supervisor

    def notify_then_signal(self):
        told(self)
        if self._stop_requested.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
    Lilota._notify_supervisor = notify_then_signal
''')
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        self.check_given_back(proc, ids, time.monotonic() - sent)
        self.assertEqual(proc.returncode, 128 + signal.SIGTERM)
        self.assertNotIn("Traceback", self.stderr())

    def test_sigterm_stops_gracefully(self):
        # One SIGTERM: the application stops as on Ctrl-C (by default it would die on the spot and
        # its workers with it, their tasks left running); here the stop timeout runs out.
        proc, ids = self.start_app(stop_timeout=1)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        self.assertGreaterEqual(time.monotonic() - sent, 0.9, "it did not give the tasks their stop timeout")
        self.check_given_back(proc, ids, time.monotonic() - sent, bound=1 + AT_ONCE)
        self.assertEqual(proc.returncode, 128 + signal.SIGTERM)

    def test_worker_command_stops_at_once_on_a_second_signal(self):
        for second in (signal.SIGINT, signal.SIGTERM):
            with self.subTest(second=second.name):
                script = self.worker_script(TASKS, name=f"tasks_{second.name}.py")
                scheduler = lilota.LilotaScheduler(self.db_url)
                ids = [str(scheduler.schedule("hold")) for _ in range(2)]
                proc = self.popen_python("-m", "lilota", "worker", script, "-n", "2", "--db", self.db_url,
                                         stdout=subprocess.DEVNULL)
                self.wait_running(ids)
                os.killpg(proc.pid, signal.SIGINT)
                wait_until(lambda: len(self.worker_nodes("stopping")) == 2, 30,
                           message="the workers to be stopping")
                sent = time.monotonic()
                os.killpg(proc.pid, second)
                proc.wait(60)
                self.assertLess(time.monotonic() - sent, AT_ONCE, "the command did not stop at once")
                for task_id in ids:
                    self.assertEqual(self.status(task_id), ("scheduled", 0), task_id)
                nodes = self.db_execute("SELECT status FROM lilota_node")
                self.assertEqual({status for status, in nodes}, {"stopped"}, nodes)
                wait_until(lambda: not session_members(proc.pid), 10, message="the workers to exit")
                self.db_execute("DELETE FROM lilota_task")
                self.db_execute("DELETE FROM lilota_node")


@on_every_backend
class BrokenScriptWaitTest(TempDirTestCase):
    """When the application's workers failed for good, wait() raises their error at once, and the
    failure is logged once at ERROR."""

    def check_wait_raises(self, body, *expected, unexpected=()):
        script = self.write("broken.py", f"import os, sys\nsys.path.insert(0, {ROOT!r})\n"
                                         f"from lilota import LilotaWorker\n" + textwrap.dedent(body))
        with self.assertLogs("lilota", "ERROR") as logs:
            app = self.start_lilota(script, 2)
            task_id = app.schedule("echo", {"x": 1})
            outcome = run_with_deadline(self, lambda: app.wait(task_id))   # no timeout: must not hang
        self.assertIsInstance(outcome.get("error"), lilota.WorkersFailedError, outcome)
        self.assertIsInstance(outcome["error"], lilota.LilotaError)
        self.assertTrue(app.has_failed())
        self.assertEqual(str(outcome["error"]), app.error)
        for text in expected:
            self.assertIn(text, app.error)
        for text in unexpected:
            self.assertNotIn(text, app.error)
        self.assertEqual(len([r for r in logs.records if app.error in r.getMessage()]), 1, logs.output)
        # At once also for a task scheduled after the failure.
        started = time.monotonic()
        with self.assertRaises(lilota.WorkersFailedError):
            app.wait(app.schedule("echo", {"x": 2}))
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(app.get_task_by_id(task_id).status, "scheduled")   # still queued, for other workers
        return app

    def test_syntax_error(self):
        self.check_wait_raises("""
            worker = LilotaWorker()
            def oops(:
                pass
        """, "SyntaxError", "broken.py", "def oops(:", unexpected=("runpy", "_worker_process_main"))

    def test_import_error(self):
        self.check_wait_raises("""
            import no_such_module_for_lilota_tests
            worker = LilotaWorker()
            worker.start()
        """, "ModuleNotFoundError", "no_such_module_for_lilota_tests", "before calling worker.start()",
            "broken.py\", line 5, in <module>", unexpected=("runpy", "_worker_process_main"))

    def test_script_that_never_calls_start(self):
        self.check_wait_raises("""
            worker = LilotaWorker()

            @worker.register("echo")
            def echo(data):
                return data
        """, "without calling worker.start()")

    def test_another_database(self):
        # The mismatch is found inside worker.start(): the message says so, and the worker's
        # database file is never created.
        other = self.path("other.db")
        self.check_wait_raises(f"""
            worker = LilotaWorker({"sqlite:///" + other!r})
            if __name__ == "__main__":
                worker.start()
        """, "worker.start()", "refused", "other.db", "same db_url", unexpected=("before calling",))
        self.assertFalse(os.path.exists(other))
        self.assertEqual([n for n in os.listdir(self.dir) if n.startswith("other")], [])


#: Tasks and application in one file, with the usual guard.
# The application's part of the scripts below: start, schedule, wait, and print what happened.
RUN_AND_REPORT = """
app.start()
started = time.monotonic()
try:
    app.wait(app.schedule("add", {"a": 2, "b": 3}))
    outcome = {"error_type": None}
except Exception as exc:
    outcome = {"error_type": type(exc).__name__, "error": str(exc)}
outcome["seconds"] = time.monotonic() - started
app.stop(timeout=5)
print(json.dumps(outcome), flush=True)
"""

ONE_FILE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from lilota import Lilota, LilotaWorker

worker = LilotaWorker({db_url!r})

@worker.register("add")
def add(data):
    return {{"sum": data["a"] + data["b"]}}

if __name__ == "__main__":
    app = Lilota({db_url!r}, script_path=__file__, number_of_workers=2)
""" + textwrap.indent(RUN_AND_REPORT.replace("{", "{{").replace("}", "}}"), "    ")


UNGUARDED = """
import json, sys, time
sys.path.insert(0, {root!r})
from lilota import Lilota

app = Lilota({db_url!r}, script_path={script!r}, number_of_workers=2)   # no `if __name__ == "__main__":`
""" + RUN_AND_REPORT.replace("{", "{{").replace("}", "}}")


@on_every_backend
class ApplicationThatStartsWorkersInItsWorkersTest(TempDirTestCase):
    """An application whose code would run again in its own workers fails with the fix, and no
    worker starts workers of its own."""

    def run_application(self, text):
        """Run the application script ``text``; its outcome (what wait() raised) and its stderr."""
        app = self.write("app.py", text)
        proc = self.popen_python(app, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        outcome = json.loads(out.splitlines()[-1])
        self.assertEqual(outcome["error_type"], "WorkersFailedError", outcome)
        self.assertLess(outcome["seconds"], 30)
        wait_until(lambda: not session_members(proc.pid), 10, message="the workers to exit")
        # No worker started workers of its own: one application node, no nested ones.
        nodes = self.db_execute("SELECT type, status FROM lilota_node")
        self.assertEqual([t for t, _ in nodes].count("scheduler"), 1, nodes)
        return outcome, err, nodes

    def test_application_that_is_its_own_worker_script_fails_with_the_fix(self):
        outcome, _, nodes = self.run_application(ONE_FILE.format(root=ROOT, db_url=self.db_url))
        self.assertIn("Lilota.start() was called inside a lilota worker process", outcome["error"])
        self.assertIn("script of their own", outcome["error"])
        self.assertIn('if __name__ == "__main__":', outcome["error"])
        self.assertLessEqual(len(nodes), 3, nodes)

    def test_application_that_starts_lilota_without_the_main_guard_fails_with_the_fix(self):
        script = self.worker_script("""
        @worker.register("add")
        def add(data):
            return {"sum": data["a"] + data["b"]}
        """)
        outcome, err, _ = self.run_application(UNGUARDED.format(root=ROOT, db_url=self.db_url, script=script))
        self.assertIn("calls Lilota.start() outside `if __name__ == \"__main__\":`", outcome["error"])
        self.assertNotIn("bootstrapping phase", err)   # not multiprocessing's riddle


@on_every_backend
class StaggeredStartTest(TempDirTestCase):
    """The first worker process starts alone; the others once it is ready, or after its head start."""

    BODY = """
    HERE = os.path.dirname(os.path.abspath(__file__))
    while not os.path.exists(os.path.join(HERE, "release")):   # a slow import
        time.sleep(0.01)

    @worker.register("echo")
    def echo(data):
        return data
    """

    def release(self):
        with open(self.path("release"), "w"):
            pass

    def test_the_others_start_once_the_first_is_ready(self):
        app = lilota.Lilota(self.db_url, script_path=self.worker_script(self.BODY), number_of_workers=3)
        app.first_worker_head_start = 120.0
        app.start()
        self.addCleanup(self._stop_and_check, app)
        wait_until(lambda: len(self.worker_nodes()) >= 1, 30, message="the first worker")
        # While the first is not ready, it is the only one: a few supervisor rounds pass.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            self.assertEqual(len(self.worker_nodes()), 1)
            time.sleep(0.05)
        self.release()
        self.wait_workers_running(3)
        self.assertEqual(app.wait(app.schedule("echo", {"x": 1}), timeout=30).output, {"x": 1})
        self.assertEqual(len(self.worker_nodes()), 3)

    def test_the_others_start_after_the_head_start_of_a_slow_first(self):
        app = lilota.Lilota(self.db_url, script_path=self.worker_script(self.BODY), number_of_workers=3)
        app.first_worker_head_start = 0.5
        app.start()
        self.addCleanup(self._stop_and_check, app)
        wait_until(lambda: len(self.worker_nodes()) == 3, 30, message="all three workers to be started")
        self.assertEqual(self.worker_nodes("running"), [])
        self.release()
        self.wait_workers_running(3)
        self.assertFalse(app.has_failed(), app.error)


if __name__ == "__main__":
    import unittest
    unittest.main()
