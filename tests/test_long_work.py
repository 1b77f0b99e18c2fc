"""Long work: durable steps (ctx.step), log records stored with their task, and every attempt kept;
their API, command line, cleanup and the migration that brings their tables. Every class runs on
SQLite and PostgreSQL."""

import asyncio
import concurrent.futures
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import subprocess
import threading
import time
import uuid
from contextlib import redirect_stdout
from unittest import mock

import support

import lilota
from lilota import (Attempt, AttemptOutcome, LilotaScheduler, LilotaWorker, Step, TaskContext, TaskLog,
                    TaskNotFoundError, TaskStatus)


@dataclasses.dataclass
class Chunk:
    index: int
    rows: list


# A worker script whose task "five" runs five steps, each recording its call in side-effects.txt;
# the attempt named by $KILL_AT_ATTEMPT (a file's content) misbehaves between steps 3 and 4 as
# $HOW says: kill (SIGKILL of its own process), raise, or hang (past its timeout).
FIVE_STEPS = """
import signal

SIDE_EFFECTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "side-effects.txt")
HOW = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "how.txt")).read().strip()


def effect(name, value):
    with open(SIDE_EFFECTS, "a") as f:
        f.write(name + "\\n")
    return value


@worker.task(max_attempts=3, timeout=timedelta(seconds=3))
def five(n: int, ctx: TaskContext) -> int:
    ctx.logger.info("attempt %d starts", ctx.attempt)
    total = 0
    for i in (1, 2, 3):
        total += ctx.step(f"s{i}", effect, f"s{i}", i * n)
    if ctx.attempt == 1:
        ctx.logger.warning("misbehaving: %s", HOW)
        ctx.step("flush", effect, "flush", 0)   # the record above is written with this step
        if HOW == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif HOW == "raise":
            raise RuntimeError("between steps 3 and 4")
        else:
            time.sleep(60)
    total += ctx.step("s4", effect, "s4", 4 * n)
    total += ctx.step("s5", effect, "s5", 5 * n)
    return total
"""


@support.on_every_backend
class StepsAcrossAttemptsTests(support.TempDirTestCase):
    """A task of five steps whose first attempt dies, raises or times out between steps 3 and 4:
    the next attempt calls neither step 1, 2 nor 3 again, runs 4 and 5 once, and returns the right
    output; the steps, the log lines flushed before and the attempts are all kept."""

    def run_five(self, how):
        self.write("how.txt", how)
        script = self.worker_script(FIVE_STEPS)
        app = self.start_lilota(script, number_of_workers=1, retry_delay=0.05, retry_max_delay=0.1)
        task_id = app.schedule("five", 10)
        task = app.wait(task_id, timeout=60)
        self.assertEqual(task.status, TaskStatus.COMPLETED, task.error)
        self.assertEqual(task.output, 10 + 20 + 30 + 40 + 50)
        self.assertEqual(task.attempts, 2)
        with open(self.path("side-effects.txt")) as f:
            self.assertEqual(f.read().split(), ["s1", "s2", "s3", "flush", "s4", "s5"])
        steps = app.get_task_steps(task_id)
        self.assertEqual([(s.name, s.attempt, s.output) for s in steps],
                         [("s1", 1, 10), ("s2", 1, 20), ("s3", 1, 30), ("flush", 1, 0), ("s4", 2, 40), ("s5", 2, 50)])
        self.assertTrue(all(isinstance(s, Step) and s.started_at <= s.ended_at for s in steps))
        logs = app.get_task_logs(task_id)
        self.assertEqual([(r.attempt, r.level, r.logger, r.message) for r in logs][:2],
                         [(1, "INFO", "task.five", "attempt 1 starts"), (1, "WARNING", "task.five", f"misbehaving: {how}")])
        self.assertIn((2, "INFO", "task.five", "attempt 2 starts"), [(r.attempt, r.level, r.logger, r.message) for r in logs])
        attempts = app.get_task_attempts(task_id)
        self.assertEqual([(a.number, a.outcome) for a in attempts], [(1, self.FIRST[how]), (2, AttemptOutcome.COMPLETED)])
        self.assertIsNone(attempts[1].error)
        self.assertEqual(attempts[0].error["type"], self.ERROR[how])
        return app, task_id

    FIRST = {"kill": AttemptOutcome.WORKER_DIED, "raise": AttemptOutcome.FAILED, "hang": AttemptOutcome.EXPIRED}
    ERROR = {"kill": "WorkerDiedError", "raise": "RuntimeError", "hang": "TaskTimeoutError"}

    def test_worker_killed_between_steps(self):
        app, task_id = self.run_five("kill")
        self.assertIn("died", app.get_task_attempts(task_id)[0].error["message"])

    def test_exception_between_steps(self):
        self.run_five("raise")

    def test_timeout_between_steps(self):
        self.run_five("hang")

    def test_a_step_renews_the_lease_its_supervisor_gives(self):
        script = self.worker_script("""
            @worker.task
            def lease(n: int, ctx: TaskContext) -> float:
                ctx.step("one", int, n)
                node = worker.storage.node(str(worker.get_task_by_id(ctx.task_id).locked_by))
                return (node.lease_expires_at - node.last_seen_at).total_seconds()
            """)
        app = self.start_lilota(script, number_of_workers=1, node_timeout=7)
        task = app.wait(app.schedule("lease", 1), timeout=60)
        self.assertEqual((task.status, round(task.output, 3)), (TaskStatus.COMPLETED, 7.0))


@support.on_every_backend
class StepTests(support.TempDirTestCase):
    """ctx.step in the calling process (run_pending): numbering in a loop, revival to the return
    annotation, errors, keep_steps, the lease, the API's errors and the command line."""

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.worker = LilotaWorker(self.db_url, retry_delay=0)
        self.calls = []

    def call(self, name, value):
        self.calls.append(name)
        return value

    def test_steps_in_a_loop_are_numbered_and_not_called_again(self):
        def render(i) -> Chunk:
            return self.call(f"render{i}", Chunk(i, [i] * i))

        @self.worker.task(max_attempts=2)
        def chunks(n: int, ctx: TaskContext) -> list:
            done = [ctx.step("render", render, i) for i in range(n)]
            if ctx.attempt == 1:
                raise RuntimeError("after the loop")
            return [chunk.index for chunk in done]

        task_id = self.app.schedule("chunks", 3)
        self.worker.run_pending()
        task = self.app.get_task_by_id(task_id)
        self.assertEqual((task.status, task.output), (TaskStatus.COMPLETED, [0, 1, 2]))
        self.assertEqual(self.calls, ["render0", "render1", "render2"])
        self.assertEqual([s.name for s in self.app.get_task_steps(task_id)], ["render", "render#2", "render#3"])
        self.assertEqual(self.app.get_task_steps(task_id)[2].output, {"index": 2, "rows": [2, 2]})

    def test_stored_result_is_revived_to_the_return_annotation(self):
        def make_chunk() -> Chunk:
            self.calls.append("make")
            return Chunk(7, [1])

        seen = []

        @self.worker.task(max_attempts=2)
        def revive(n: int, ctx: TaskContext) -> int:
            chunk = ctx.step("make", make_chunk)
            seen.append(chunk)
            if ctx.attempt == 1:
                raise RuntimeError("again")
            return chunk.index

        task_id = self.app.schedule("revive", 1)
        self.worker.run_pending()
        self.assertEqual(self.app.get_task_by_id(task_id).output, 7)
        self.assertEqual(self.calls, ["make"])
        self.assertEqual(seen, [Chunk(7, [1]), Chunk(7, [1])])

    def test_an_async_step_in_an_async_task_is_awaited_and_not_called_again(self):
        async def fetch(i) -> Chunk:
            self.calls.append(f"fetch{i}")
            await asyncio.sleep(0)
            return Chunk(i, [i])

        @self.worker.task(max_attempts=2)
        async def gather(n: int, ctx: TaskContext) -> list:
            chunks = [await ctx.step("fetch", fetch, i) for i in range(n)]
            if ctx.attempt == 1:
                raise RuntimeError("after the steps")
            return [chunk.index for chunk in chunks]

        task_id = self.app.schedule("gather", 2)
        self.worker.run_pending()
        task = self.app.get_task_by_id(task_id)
        self.assertEqual((task.status, task.output), (TaskStatus.COMPLETED, [0, 1]))
        self.assertEqual(self.calls, ["fetch0", "fetch1"])   # the second attempt read them back
        self.assertEqual([(s.name, s.output) for s in self.app.get_task_steps(task_id)],
                         [("fetch", {"index": 0, "rows": [0]}), ("fetch#2", {"index": 1, "rows": [1]})])

    def test_unserializable_result_fails_the_task_naming_the_step(self):
        @self.worker.task
        def bad(n: int, ctx: TaskContext) -> int:
            ctx.step("fine", self.call, "fine", 1)
            ctx.step("fine", self.call, "fine", 2)
            ctx.step("fine", self.call, "fine", {1, 2})
            return 0

        task_id = self.app.schedule("bad", 1)
        self.worker.run_pending()
        task = self.app.get_task_by_id(task_id)
        self.assertEqual(task.status, TaskStatus.FAILED)
        self.assertEqual(task.error["type"], "UnserializableError")
        self.assertIn("step 'fine#3'", task.error["message"])
        self.assertEqual([s.name for s in self.app.get_task_steps(task_id)], ["fine", "fine#2"])

    def test_a_step_that_raises_stores_nothing_and_is_retried_with_its_task(self):
        def flaky():
            self.calls.append("flaky")
            if len(self.calls) < 3:
                raise ConnectionError("try again")
            return "ok"

        @self.worker.task(max_attempts=3)
        def uses_flaky(n: int, ctx: TaskContext) -> str:
            return ctx.step("flaky", flaky)

        task_id = self.app.schedule("uses_flaky", 1)
        self.worker.run_pending()
        task = self.app.get_task_by_id(task_id)
        self.assertEqual((task.status, task.output, task.attempts), (TaskStatus.COMPLETED, "ok", 3))
        self.assertEqual(self.calls, ["flaky"] * 3)
        self.assertEqual([(s.name, s.attempt) for s in self.app.get_task_steps(task_id)], [("flaky", 3)])

    def test_bad_step_names(self):
        @self.worker.task
        def named(name, ctx: TaskContext):
            ctx.step(name, self.call, "x", 1)

        for bad, error in (("", lilota.ConfigurationError), ("a#2", lilota.ConfigurationError),
                           ("x" * 201, lilota.ConfigurationError)):
            task_id = self.app.schedule("named", bad)
            self.worker.run_pending()
            task = self.app.get_task_by_id(task_id)
            self.assertEqual((task.status, task.error["type"]), (TaskStatus.FAILED, error.__name__), bad)
            self.assertIn("'#'", task.error["message"])
        with self.assertRaises(TypeError):
            TaskContext().step(3, self.call, "x", 1)

    def test_a_context_made_by_hand_just_calls(self):
        self.assertEqual(TaskContext().step("s", self.call, "s", 5), 5)
        self.assertEqual(self.calls, ["s"])

    def test_keep_steps_false_drops_them_when_the_task_completes(self):
        @self.worker.task(keep_steps=False)
        def dropped(n: int, ctx: TaskContext) -> int:
            return ctx.step("one", self.call, "one", n)

        @self.worker.task(keep_steps=False)
        def failing(n: int, ctx: TaskContext) -> int:
            ctx.step("one", self.call, "one", n)
            raise ValueError("no")

        done, failed = self.app.schedule("dropped", 1), self.app.schedule("failing", 2)
        self.worker.run_pending()
        self.assertEqual(self.app.get_task_by_id(done).output, 1)
        self.assertEqual(self.app.get_task_steps(done), [])
        self.assertEqual([s.output for s in self.app.get_task_steps(failed)], [2])   # kept: it may run again

    def test_a_step_renews_the_lease_of_its_worker(self):
        leases = []

        @self.worker.task
        def slow(n: int, ctx: TaskContext) -> int:
            node = str(self.app.get_task_by_id(ctx.task_id).locked_by)
            self.db_execute("UPDATE lilota_node SET lease_expires_at = ? WHERE id = ?", self.db_time(time.time() - 60),
                            node)
            ctx.step("one", self.call, "one", n)
            leases.append(self.db_execute("SELECT lease_expires_at FROM lilota_node WHERE id = ?", node)[0][0])
            return n

        self.app.schedule("slow", 1)
        self.worker.run_pending()
        lease = leases[0]
        lease = lease.timestamp() if hasattr(lease, "timestamp") else float(lease)
        self.assertGreater(lease, time.time() + self.worker.node_timeout / 2)

    def test_unknown_task_and_bad_ids(self):
        unknown = uuid.uuid4()
        for read in (self.app.get_task_steps, self.app.get_task_logs, self.app.get_task_attempts):
            with self.assertRaises(TaskNotFoundError):
                read(unknown)
            with self.assertRaises(ValueError):
                read("nope")
        task_id = self.app.schedule("x", 1)
        self.assertEqual(self.app.get_task_steps(task_id), [])
        self.assertEqual(self.app.get_task_logs(task_id), [])
        self.assertEqual(self.app.get_task_attempts(task_id), [])
        with self.assertRaises(TypeError):
            self.app.get_task_logs(task_id, after="1")

    def test_show_lists_the_steps(self):
        @self.worker.task
        def shown(n: int, ctx: TaskContext) -> int:
            return ctx.step("query", self.call, "query", {"rows": n})["rows"]

        task_id = self.app.schedule("shown", 4)
        self.worker.run_pending()
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(lilota.main(["show", str(task_id), "--db", self.db_url]), 0)
        self.assertIn("steps (1):", out.getvalue())
        self.assertIn('{"rows": 4}', out.getvalue())
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(lilota.main(["show", str(task_id), "--db", self.db_url, "--json"]), 0)
        record = json.loads(out.getvalue())
        self.assertEqual([(s["name"], s["attempt"], s["output"]) for s in record["steps"]], [("query", 1, {"rows": 4})])


library_logger = logging.getLogger("somelibrary.module")   # a library's logging.getLogger(__name__)


@support.on_every_backend
class TaskLogTests(support.TempDirTestCase):
    """Log records of a task's thread are stored with it, from ctx.logger and from any logger, at
    the task's level; not those of other threads nor lilota's own; bounded; the command line."""

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.worker = LilotaWorker(self.db_url, retry_delay=0)

    def records(self, task_id):
        return [(r.attempt, r.level, r.logger, r.message) for r in self.app.get_task_logs(task_id)]

    def test_records_of_the_task_thread_in_order_with_levels(self):
        @self.worker.task(max_attempts=2)
        def chatty(n: int, ctx: TaskContext) -> int:
            ctx.logger.info("starting %d", n)
            ctx.logger.debug("below the level: not stored")
            library_logger.warning("library says %s", "hello")
            other = threading.Thread(target=library_logger.warning, args=("from another thread",))
            other.start()
            other.join()
            logging.getLogger("lilota.worker").warning("lilota's own: not stored")
            try:
                raise KeyError("inner")
            except KeyError:
                ctx.logger.exception("caught")
            if ctx.attempt == 1:
                raise RuntimeError("first attempt fails")
            ctx.logger.error("done")
            return n

        task_id = self.app.schedule("chatty", 3)
        self.worker.run_pending()
        self.assertEqual(self.app.get_task_by_id(task_id).status, TaskStatus.COMPLETED)
        records = self.records(task_id)
        plain = [(a, level, name, message.splitlines()[0]) for a, level, name, message in records]
        self.assertEqual(plain, [
            (1, "INFO", "task.chatty", "starting 3"), (1, "WARNING", "somelibrary.module", "library says hello"),
            (1, "ERROR", "task.chatty", "caught"),
            (2, "INFO", "task.chatty", "starting 3"), (2, "WARNING", "somelibrary.module", "library says hello"),
            (2, "ERROR", "task.chatty", "caught"), (2, "ERROR", "task.chatty", "done")])
        self.assertIn("KeyError: 'inner'", records[2][3])
        self.assertIn("Traceback", records[2][3])
        logs = self.app.get_task_logs(task_id)
        self.assertTrue(all(isinstance(r, TaskLog) for r in logs))
        self.assertEqual([r.seq for r in logs], list(range(1, 8)))
        self.assertEqual([r.seq for r in self.app.get_task_logs(task_id, after=5)], [6, 7])
        self.assertEqual(self.app.get_task_logs(task_id, after=7), [])

    def test_log_level_on_register_and_on_the_worker(self):
        worker = LilotaWorker(self.db_url, task_log_level="WARNING")

        @worker.task(log_level=logging.DEBUG)
        def verbose(n: int, ctx: TaskContext) -> int:
            ctx.logger.debug("debug kept")
            return n

        @worker.task
        def quiet(n: int, ctx: TaskContext) -> int:
            ctx.logger.info("info dropped")
            ctx.logger.warning("warning kept")
            return n

        verbose_id, quiet_id = self.app.schedule("verbose", 1), self.app.schedule("quiet", 1)
        worker.run_pending()
        self.assertEqual(self.records(verbose_id), [(1, "DEBUG", "task.verbose", "debug kept")])
        self.assertEqual(self.records(quiet_id), [(1, "WARNING", "task.quiet", "warning kept")])
        for bad, error in (("LOUD", ValueError), (1.5, TypeError)):
            with self.assertRaises(error):
                LilotaWorker(self.db_url, task_log_level=bad)
            with self.assertRaises(error):
                worker.register("x" + str(id(bad)), log_level=bad)(lambda n: n)

    def test_the_bound_holds_and_says_how_many_were_left_out(self):
        @self.worker.task(max_attempts=2)
        def flood(n: int, ctx: TaskContext) -> int:
            for i in range(n):
                ctx.logger.info("line %d", i)
            if ctx.attempt == 1:
                raise RuntimeError("again")
            return n

        task_id = self.app.schedule("flood", 12)
        with mock.patch.object(lilota, "MAX_TASK_LOG_RECORDS", 8):
            self.worker.run_pending()
        records = self.records(task_id)
        self.assertEqual(records[:8], [(1, "INFO", "task.flood", f"line {i}") for i in range(8)])
        self.assertEqual(len(records), 10)   # the bound, and a note per attempt
        self.assertEqual(records[8][:3], (1, "WARNING", "lilota"))
        self.assertIn("4 log record(s) of this attempt were left out", records[8][3])
        self.assertIn("12 log record(s) of this attempt were left out", records[9][3])
        # The characters too.
        task_id = self.app.schedule("flood", 3)
        with mock.patch.object(lilota, "MAX_TASK_LOG_CHARS", 13):
            self.worker.run_pending()
        self.assertEqual([r[3][:30] for r in self.records(task_id)][:2], ["line 0", "line 1"])
        self.assertIn("1 log record(s)", self.records(task_id)[2][3])

    def test_follow_shows_a_line_while_the_task_runs_and_ends_with_it(self):
        script = self.worker_script(f"""
            import logging
            helper = logging.getLogger("helper")

            @worker.task(timeout=None)
            def waits(n: int, ctx: TaskContext) -> int:
                ctx.logger.info("first line")
                deadline = time.monotonic() + 60
                while not os.path.exists({self.path("go")!r}) and time.monotonic() < deadline:
                    time.sleep(0.01)
                helper.info("last line")
                return n
            """)
        app = self.start_lilota(script, number_of_workers=1)
        task_id = app.schedule("waits", 1)
        follow = self.popen_python("-m", "lilota", "logs", str(task_id), "--follow", "--db", self.db_url,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = follow.stdout.readline()
        self.assertIn("INFO     task.waits [1] first line", first)
        self.assertEqual(app.get_task_by_id(task_id).status, TaskStatus.RUNNING)
        self.write("go", "")
        rest, err = follow.communicate(timeout=60)
        self.assertEqual(follow.returncode, 0, err)
        self.assertIn("INFO     helper [1] last line", rest)
        self.assertEqual(app.get_task_by_id(task_id).status, TaskStatus.COMPLETED)
        # Without --follow, and as JSON lines; show prints the last lines.
        result = self.run_python("-m", "lilota", "logs", str(task_id), "--json", "--db", self.db_url)
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        self.assertEqual([(r["seq"], r["level"], r["logger"], r["message"]) for r in lines],
                         [(1, "INFO", "task.waits", "first line"), (2, "INFO", "helper", "last line")])
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(lilota.main(["show", str(task_id), "--db", self.db_url]), 0)
        self.assertIn("log:\n", out.getvalue())
        self.assertIn("[1] last line", out.getvalue())
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(lilota.main(["show", str(task_id), "--db", self.db_url, "--json"]), 0)
        self.assertEqual([r["message"] for r in json.loads(out.getvalue())["logs"]], ["first line", "last line"])

    def test_logs_of_an_unknown_task(self):
        err = io.StringIO()
        with mock.patch("sys.stderr", err):
            self.app.schedule("x", 1)   # the database exists
            self.assertEqual(lilota.main(["logs", str(uuid.uuid4()), "--db", self.db_url]), 3)
        self.assertIn("no task", err.getvalue())


@support.on_every_backend
class AttemptTests(support.TempDirTestCase):
    """Every attempt is kept with its outcome and error; task.error stays the last error."""

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.worker = LilotaWorker(self.db_url, retry_delay=0)

    def outcomes(self, task_id):
        return [(a.number, str(a.outcome)) for a in self.app.get_task_attempts(task_id)]

    def test_two_failures_and_a_success(self):
        seen = []

        @self.worker.task(max_attempts=3)
        def third_time(n: int, ctx: TaskContext) -> int:
            seen.append(self.outcomes(ctx.task_id))   # the running attempt is listed too
            if ctx.attempt < 3:
                raise ValueError(f"failure {ctx.attempt}")
            return n

        task_id = self.app.schedule("third_time", 5)
        self.worker.run_pending()
        task = self.app.get_task_by_id(task_id)
        self.assertEqual((task.status, task.output), (TaskStatus.COMPLETED, 5))
        attempts = self.app.get_task_attempts(task_id)
        self.assertTrue(all(isinstance(a, Attempt) for a in attempts))
        self.assertEqual([(a.number, a.outcome) for a in attempts],
                         [(1, AttemptOutcome.FAILED), (2, AttemptOutcome.FAILED), (3, AttemptOutcome.COMPLETED)])
        self.assertEqual([a.error and (a.error["type"], a.error["message"]) for a in attempts],
                         [("ValueError", "failure 1"), ("ValueError", "failure 2"), None])
        self.assertIn("Traceback", attempts[0].error["traceback"])
        self.assertEqual(task.error["message"], "failure 2")   # the last error, as before
        self.assertEqual({a.pid for a in attempts}, {os.getpid()})
        self.assertEqual({a.node for a in attempts}, {task.locked_by})
        for before, after in zip(attempts, attempts[1:]):
            self.assertLessEqual(before.started_at, before.ended_at)
            self.assertLessEqual(before.ended_at, after.started_at)
        self.assertEqual(seen, [[(1, "running")], [(1, "failed"), (2, "running")],
                                [(1, "failed"), (2, "failed"), (3, "running")]])
        self.assertEqual(attempts[2].as_dict()["outcome"], "completed")
        # retry() of a task keeps its earlier attempts.
        failing = self.app.schedule("third_time", 1, max_attempts=1)
        self.worker.run_pending()
        self.assertTrue(self.app.retry(failing))
        self.worker.run_pending()
        self.assertEqual(self.outcomes(failing), [(1, "failed"), (1, "failed")])

    def test_cancelled_interrupted_and_retry(self):
        @self.worker.task
        def cancels_itself(n: int, ctx: TaskContext) -> int:
            self.app.cancel(ctx.task_id)
            if n:
                raise RuntimeError("stopped")
            return n

        failed, completed = self.app.schedule("cancels_itself", 1), self.app.schedule("cancels_itself", 0)
        self.worker.run_pending()
        self.assertEqual(self.outcomes(failed), [(1, "cancelled")])
        self.assertEqual(self.outcomes(completed), [(1, "cancelled")])
        self.assertEqual(self.app.get_task_attempts(completed)[0].error["type"], "TaskCancelledError")

        snoozed = []

        @self.worker.task
        def snoozes(n: int, ctx: TaskContext) -> int:
            if not snoozed:
                snoozed.append(1)
                raise lilota.Retry(0)
            return n

        task_id = self.app.schedule("snoozes", 1)
        self.worker.run_pending()
        self.assertEqual(self.outcomes(task_id), [(1, "completed")])   # a Retry gives the attempt back: no record

        # A worker stopped while running it gives the task back: the attempt is given back too.
        task_id = self.app.schedule("snoozes", 2)
        storage, node = self.worker.storage, str(uuid.uuid4())
        claimed = storage.claim(self.worker._prepared_claim(), node, os.getpid())
        self.assertEqual(claimed.id, task_id)
        lilota._give_back(storage, node, "the worker stopped while running this task")
        self.assertEqual(self.outcomes(task_id), [(1, "interrupted")])
        self.worker.run_pending()
        self.assertEqual(self.outcomes(task_id), [(1, "interrupted"), (1, "completed")])
        self.assertEqual(self.app.get_task_attempts(task_id)[0].error["type"], "TaskInterruptedError")

    def test_a_lost_node_reads_worker_died(self):
        task_id = self.app.schedule("x", 1, max_attempts=2)
        storage, node = self.worker.storage, str(uuid.uuid4())
        storage.add_node(node, "gone", lilota.NodeType.WORKER, lilota.NodeStatus.RUNNING, 999999, 0.0)
        storage.claim(storage.prepare_claim([]), node, 999999)
        lilota._recover_lost_nodes(storage, 0, 0)
        [attempt] = self.app.get_task_attempts(task_id)
        self.assertEqual((attempt.number, attempt.outcome, attempt.pid, str(attempt.node)),
                         (1, AttemptOutcome.WORKER_DIED, 999999, node))
        self.assertIn("was lost", attempt.error["message"])
        self.assertIsNotNone(attempt.ended_at)

    def test_show_lists_the_attempts(self):
        @self.worker.task(max_attempts=2)
        def once_more(n: int, ctx: TaskContext) -> int:
            if ctx.attempt == 1:
                raise OSError("disk\nfull")
            return n

        task_id = self.app.schedule("once_more", 1)
        self.worker.run_pending()
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(lilota.main(["show", str(task_id), "--db", self.db_url]), 0)
        text = out.getvalue()
        self.assertIn("attempts (2):", text)
        self.assertRegex(text, r"\n  1  failed +\S+ ago .* OSError: disk full\n")
        self.assertRegex(text, r"\n  2  completed .* -\n")
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(lilota.main(["show", str(task_id), "--db", self.db_url, "--json"]), 0)
        shown = json.loads(out.getvalue())
        self.assertEqual([(a["number"], a["outcome"], a["error"] and a["error"]["type"]) for a in shown["attempt_records"]],
                         [(1, "failed", "OSError"), (2, "completed", None)])


@support.on_every_backend
class CleanupAndMigrationTests(support.TempDirTestCase):
    """cleanup() and delete_task_by_id() take a task's steps, logs and attempts with it; a
    database of schema version 2 gets the new tables, keeps its tasks, also when several processes
    open it at once."""

    def counts(self):
        return [self.db_execute(f"SELECT COUNT(*) FROM {table}")[0][0]
                for table in ("lilota_step", "lilota_log", "lilota_attempt")]

    def test_cleanup_removes_steps_logs_and_attempts(self):
        app = LilotaScheduler(self.db_url)
        worker = LilotaWorker(self.db_url, retry_delay=0)

        @worker.task(max_attempts=2)
        def work(n: int, ctx: TaskContext) -> int:
            ctx.logger.info("working")
            ctx.step("one", int, n)
            if ctx.attempt == 1:
                raise RuntimeError("again")
            return n

        old, deleted, kept = (app.schedule("work", i) for i in range(3))
        worker.run_pending()
        self.assertEqual(self.counts(), [3, 6, 3])
        self.assertTrue(app.delete_task_by_id(deleted))
        self.assertEqual(self.counts(), [2, 4, 2])
        self.db_execute("UPDATE lilota_task SET end_date_time = ? WHERE id = ?", self.db_time(time.time() - 86400),
                        str(old))
        self.assertEqual(app.cleanup(older_than=3600), {"tasks": 1, "log_entries": 2, "nodes": 0})
        self.assertEqual(self.counts(), [1, 2, 1])
        self.assertEqual([s.name for s in app.get_task_steps(kept)], ["one"])
        for read in (app.get_task_steps, app.get_task_logs, app.get_task_attempts):
            with self.assertRaises(TaskNotFoundError):
                read(old)

    def make_version_2(self):
        """A database as the release with schema version 2 wrote it (its statements are never
        edited), with a task in it."""
        with support.old_schema(self.db_url, 2) as (conn, dialect):
            conn.execute(dialect.sql(
                f"INSERT INTO lilota_task (id, name, status, run_at, input, created_at, queue) VALUES "
                f"(?, 'work', 'scheduled', {dialect.time_param}, {dialect.json_param}, {dialect.time_param}, 'default')"),
                (str(uuid.uuid4()), dialect.encode_time(time.time()), "3", dialect.encode_time(time.time())))

    def test_a_version_2_database_is_migrated_by_several_processes_at_once(self):
        self.make_version_2()
        with concurrent.futures.ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
            self.assertEqual(list(pool.map(_open_and_count, [self.db_url] * 4)), [1] * 4)
        self.assertEqual(self.db_execute("SELECT value FROM lilota_meta WHERE key = 'schema_version'"),
                         [(str(lilota.SCHEMA_VERSION),)])
        self.assertEqual(self.counts(), [0, 0, 0])
        worker = LilotaWorker(self.db_url)

        @worker.task
        def work(n: int, ctx: TaskContext) -> int:
            ctx.logger.info("migrated")
            return ctx.step("double", int, 2 * n)

        [task] = worker.run_pending()
        self.assertEqual((task.status, task.output), (TaskStatus.COMPLETED, 6))
        app = LilotaScheduler(self.db_url)
        self.assertEqual([r.message for r in app.get_task_logs(task.id)], ["migrated"])
        self.assertEqual([(a.number, a.outcome) for a in app.get_task_attempts(task.id)],
                         [(1, AttemptOutcome.COMPLETED)])


def _open_and_count(url):
    return len(LilotaScheduler(url).list_tasks(limit=None))
