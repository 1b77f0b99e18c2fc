"""The examples in examples/ run as documented: one command from the repository root, the printed
result, exit code 0, no worker process left behind, and a rerun works."""

import glob
import inspect
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import unittest

from support import ROOT, TempDirTestCase, postgres_admin, require_postgres, session_members, wait_until

EXAMPLES = os.path.join(ROOT, "examples")


def require_pydantic():
    """Skip when pydantic is missing, but fail under CI=true, where it must be installed (the policy
    of test_serialization's pydantic tests)."""
    try:
        import pydantic  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            raise AssertionError("pydantic is not installed but CI=true: the CI job must install it "
                                 "(pip install '.[test]') so that example 3 is tested")
        raise unittest.SkipTest("pydantic is not installed (pip install '.[test]'); example 3 skipped")


class ExampleTestCase(unittest.TestCase):

    def setUp(self):
        # The examples keep their databases in examples/ (git-ignored); remove what a run leaves.
        before = set(self._database_files())
        self.addCleanup(self._remove_new_databases, before)

    @staticmethod
    def _database_files():
        return [p for pattern in ("*.db", "*.db-wal", "*.db-shm")
                for p in glob.glob(os.path.join(EXAMPLES, pattern))]

    def _remove_new_databases(self, before):
        for path in self._database_files():
            if path not in before:
                os.remove(path)

    def run_example(self, name, cwd=ROOT):
        """Run ``python examples/<name>`` in its own session; return its stdout. The example must exit
        0, print no traceback and leave no process of its session (its workers) behind."""
        path = os.path.join("examples", name) if cwd == ROOT else os.path.join(EXAMPLES, name)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)   # the examples find lilota themselves when run from a checkout
        env.pop("LILOTA_DB_URL", None)
        proc = subprocess.Popen([sys.executable, path], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.assertEqual(proc.returncode, 0, f"{name} failed:\nstdout:\n{out}\nstderr:\n{err}")
        self.assertNotIn("Traceback", err, err)
        wait_until(lambda: not session_members(proc.pid), 10, message=f"the worker processes of {name} to exit")
        return out

    def task_rows(self, db_name):
        connection = sqlite3.connect(os.path.join(EXAMPLES, db_name))
        try:
            return connection.execute("SELECT name, status, output FROM lilota_task").fetchall()
        finally:
            connection.close()


class QuickExampleTest(ExampleTestCase):

    def test_prints_the_sum(self):
        out = self.run_example("quick_example.py")
        self.assertEqual(out.splitlines(), [
            "We add the numbers 2 and 3: ",
            "{'sum': 5}",
            "completed: 2 + 3 = 5",
        ])
        self.assertEqual(self.task_rows("quick_example.db"), [("add", "completed", '{"sum":5}')])

    def test_reruns_start_from_an_empty_database(self):
        self.run_example("quick_example.py")
        out = self.run_example("quick_example.py")
        self.assertIn("{'sum': 5}", out.splitlines())
        self.assertEqual(len(self.task_rows("quick_example.db")), 1)

    def test_runs_from_any_directory(self):
        with tempfile.TemporaryDirectory() as elsewhere:
            out = self.run_example("quick_example.py", cwd=elsewhere)
            self.assertEqual(os.listdir(elsewhere), [], "the example wrote into the current directory")
        self.assertIn("{'sum': 5}", out.splitlines())

    def test_worker_script_runs_standalone_until_sigterm(self):
        # python examples/myscript.py is a worker of its own: it executes a task stored by anyone.
        import signal
        import lilota
        db_path = os.path.join(EXAMPLES, "quick_example.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db_path + suffix):
                os.remove(db_path + suffix)
        scheduler = lilota.Lilota.scheduler("sqlite:///" + db_path)
        self.addCleanup(self._close_storage, db_path)
        task_id = scheduler.schedule("add", {"a": 20, "b": 22})
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        worker = subprocess.Popen([sys.executable, os.path.join("examples", "myscript.py")], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(self._kill, worker)   # if it does not stop on SIGTERM (communicate times out)
        try:
            task = scheduler.wait(task_id, timeout=60)
        finally:
            worker.send_signal(signal.SIGTERM)
            out, err = worker.communicate(timeout=30)
        self.assertEqual(worker.returncode, 0, err)
        self.assertEqual((task.status, task.output), ("completed", {"sum": 42}))

    @staticmethod
    def _kill(proc):
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)

    @staticmethod
    def _close_storage(db_path):
        import lilota
        for key, storage in list(lilota.Storage._instances.items()):
            if db_path in key:
                storage.close()
                del lilota.Storage._instances[key]


# The seed README's quick example, as written there: PostgreSQL through psycopg 3 at
# localhost:5432, database lilota_sample, the worker script at sample/myscript.py.
SEED_WORKER_SCRIPT = """
from dataclasses import dataclass
from lilota.worker import LilotaWorker


@dataclass
class AddInput():
    a: int
    b: int


@dataclass
class AddOutput():
  sum: int


worker = LilotaWorker(
  db_url="postgresql+psycopg://postgres:postgres@localhost:5432/lilota_sample"
)


@worker.register("add", input_model=AddInput, output_model=AddOutput)
def add(input: AddInput) -> AddOutput:
  return AddOutput(input.a + input.b)


def main():
  worker.start()


if __name__ == "__main__":
  main()
"""

SEED_APPLICATION = """
from dataclasses import dataclass
from lilota.core import Lilota
from lilota.models import Task
import time


@dataclass
class AddInput():
    a: int
    b: int


@dataclass
class AddOutput():
  sum: int


lilota = Lilota(
  db_url="postgresql+psycopg://postgres:postgres@localhost:5432/lilota_sample",
  script_path="sample/myscript.py",
  number_of_workers=8
)


def main():
  # Start lilota
  lilota.start()

  # Schedule a task
  task_id = lilota.schedule("add", AddInput(a=2, b=3))

  # Wait one second because Lilota runs in the background and decides when to pick up a task.
  # This is normally not needed. We do it here because we want to wait until the task 
  # has been executed.
  time.sleep(1)

  # Retrieve task information from the database and print the result
  task: Task = lilota.get_task_by_id(task_id)
  print(f"We add the numbers 2 and 3: ")
  print(task.output)


if __name__ == "__main__":
  main()
"""


SEED_URL = "postgresql+psycopg://postgres:postgres@localhost:5432/lilota_sample"

#: The seed's application started again, waiting for the task this time.
SEED_RESTART = """
from lilota.core import Lilota

if __name__ == "__main__":
    with Lilota(db_url={url!r}, script_path="sample/myscript.py", number_of_workers=1) as app:
        print(app.wait({task_id!r}, timeout=60).status)
"""


class SeedPostgresExampleTest(TempDirTestCase):
    """The seed's own example with its PostgreSQL URL, unchanged, against a lilota_sample database
    made afresh (as its reader would: createdb lilota_sample)."""

    def test_seed_quick_example_runs_as_written(self):
        require_postgres(self)
        postgres_admin("DROP DATABASE IF EXISTS lilota_sample WITH (FORCE)")
        postgres_admin("CREATE DATABASE lilota_sample")
        self.addCleanup(postgres_admin, "DROP DATABASE IF EXISTS lilota_sample WITH (FORCE)")
        os.mkdir(self.path("sample"))
        self.write("sample/myscript.py", SEED_WORKER_SCRIPT)
        self.write("app.py", SEED_APPLICATION)
        proc = self.run_python("app.py", timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        # The seed sleeps one second and hopes: on a loaded machine eight workers may still be
        # starting then, and the task's output None. What must hold is that it ran, and right.
        lines = proc.stdout.splitlines()
        self.assertEqual(lines[0], "We add the numbers 2 and 3: ")
        self.assertIn(lines[1], ("{'sum': 5}", "None"))
        sample_url = os.environ["LILOTA_TEST_POSTGRES_URL"].rsplit("/", 1)[0] + "/lilota_sample"
        query = "SELECT id::text, name, status, output::text, attempts FROM lilota_task"
        rows = postgres_admin(query, url=sample_url)
        self.assertEqual(len(rows), 1, rows)
        task_id, *_ = rows[0]
        if rows[0][2] == "scheduled":
            # No worker had claimed it when the application exited (eight workers still starting
            # on a busy machine; stopping at exit lets a running task finish, but starts none):
            # it waits in the queue, never tried, and the application's next start runs it.
            self.assertEqual(lines[1], "None")
            self.assertEqual(rows[0][3:], (None, 0))
            self.write("again.py", SEED_RESTART.format(url=SEED_URL, task_id=task_id))
            again = self.run_python("again.py", timeout=120)
            self.assertEqual(again.returncode, 0, again.stderr)
            rows = postgres_admin(query, url=sample_url)
        self.assertEqual(rows, [(task_id, "add", "completed", '{"sum": 5}', 1)])


#: A process that keeps one core busy while its parent lives.
SPINNER = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


class SeedSQLiteExampleOnBusyCoresTest(TempDirTestCase):
    """The seed's quick example as written, with a SQLite URL, while busy-loop processes keep every
    core busy (other work on the machine): eight workers, schedule(), time.sleep(1), and the output
    must be there. The first worker starts alone, so it is ready about as soon as one alone would be."""

    def test_seed_quick_example_prints_the_sum_with_every_core_busy(self):
        url = "sqlite:///lilota_sample.db"
        os.mkdir(self.path("sample"))
        self.write("sample/myscript.py", SEED_WORKER_SCRIPT.replace(SEED_URL, url))
        self.write("app.py", SEED_APPLICATION.replace(SEED_URL, url))
        for _ in range(os.cpu_count() or 1):
            # Busy until this test process is gone even if it dies before its cleanups run (killed by
            # a timeout): an orphaned spinner would slow every later run on the machine.
            spinner = subprocess.Popen([sys.executable, "-c", SPINNER])
            self.addCleanup(spinner.wait)
            self.addCleanup(spinner.kill)
        proc = self.run_python("app.py", timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(proc.stdout.splitlines(), ["We add the numbers 2 and 3: ", "{'sum': 5}"])


class NumberedExamplesTest(ExampleTestCase):

    def test_1_hello_world(self):
        lines = self.run_example("1-hello-world.py").splitlines()
        self.assertEqual(lines[0], "Hello World")
        self.assertRegex(lines[1], r"^task [0-9a-f-]{36} completed after 1 attempt\(s\)$")

    def test_2_add_two_numbers(self):
        out = self.run_example("2-add-two-numbers.py")
        self.assertEqual(out.splitlines(), ["{'sum': 5}", "2 + 3 = 5", "1+1, 2+2, 3+3 = [2, 4, 6]"])
        rows = self.task_rows("2-add-two-numbers.db")
        self.assertEqual(sorted(status for _, status, _ in rows), ["completed"] * 4)

    def test_3_add_two_numbers_using_pydantic(self):
        require_pydantic()
        out = self.run_example("3-add-two-numbers-using-pydantic.py")
        self.assertEqual(out.splitlines(), ["{'sum': 5}", "2 + 3 = 5 (AddOutput)"])

    def test_4_using_db_inside_task(self):
        out = self.run_example("4-using-db-inside-task.py")
        self.assertEqual(out.splitlines(), [
            "{'report_id': 1, 'total': '100.00', 'reports_in_database': 1}",
            "report row: (1, 'Sales May', '2024-05-31', '100.00')",
        ])
        # A rerun starts from empty databases again: the report is number 1 once more.
        self.assertEqual(self.run_example("4-using-db-inside-task.py"), out)

    def test_5_setting_task_progress_manually(self):
        lines = self.run_example("5-setting-task-progress-manually.py").splitlines()
        self.assertEqual(lines[-1], "completed: {'processed': 5}, progress 100%")
        progress = [int(line.split()[1].rstrip("%")) for line in lines[:-1]]
        self.assertTrue(all(line.startswith("progress: ") for line in lines[:-1]), lines)
        self.assertEqual(progress, sorted(set(progress)), "progress is shown once per value, increasing")
        self.assertEqual(progress[-1], 100)
        self.assertTrue(set(progress) <= {0, 20, 40, 60, 80, 100}, progress)

    def test_every_example_is_tested(self):
        # Each example file is run by a test method of this module that names that very file (as a
        # string literal): a new example without a test, or a deleted test, fails here.
        names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.py")))
        self.assertIn("quick_example.py", names)
        methods = {f"{cls.__name__}.{name}": inspect.getsource(getattr(cls, name))
                   for cls in (QuickExampleTest, NumberedExamplesTest)
                   for name in unittest.TestLoader().getTestCaseNames(cls)
                   if name != "test_every_example_is_tested"}
        for name in names:
            literal = re.compile(r"""(["'])%s\1""" % re.escape(name))
            runs = [method for method, source in methods.items() if literal.search(source)]
            self.assertTrue(runs, f"no test method runs examples/{name}")


if __name__ == "__main__":
    unittest.main()
