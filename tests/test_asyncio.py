"""asyncio, on both backends: async def task functions (one event loop per worker process, timeout,
cancel, progress, retries), and schedule_async / wait_async / get_task_by_id_async in an
application simulated with plain asyncio (200 concurrent waits, a loop that stays responsive)."""

import asyncio
import os
import threading
import time
import unittest
import uuid

import support
from support import on_every_backend, wait_until
from test_processes import WorkerTestCase

import lilota
from lilota import LilotaScheduler, LilotaWorker, Retry, TaskContext, TaskNotFoundError, TaskWaitTimeout


@on_every_backend
class AsyncTaskFunctionTests(support.TempDirTestCase):
    """Async task functions through run_pending(): the worker's own loop, in this process."""

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.worker = LilotaWorker(self.db_url, retry_delay=0)

    def test_runs_on_one_loop_reused_between_tasks_with_progress_and_context(self):
        @self.worker.register("fetch")
        async def fetch(data, ctx: TaskContext):
            await asyncio.sleep(0.01)
            ctx.progress.set(30)
            return {"n": data["n"], "loop": id(asyncio.get_running_loop()), "attempt": ctx.attempt}
        ids = [self.app.schedule("fetch", {"n": i}) for i in range(3)]
        self.worker.run_pending()
        tasks = [self.app.get_task_by_id(i) for i in ids]
        self.assertEqual([t.status for t in tasks], ["completed"] * 3)
        self.assertEqual([t.output["n"] for t in tasks], [0, 1, 2])
        self.assertEqual(len({t.output["loop"] for t in tasks}), 1, "one event loop, kept between tasks")
        self.assertEqual([t.progress_percentage for t in tasks], [100] * 3)

    def test_failure_retry_and_asked_retry(self):
        calls = []

        @self.worker.register("flaky", max_attempts=2)
        async def flaky(data, ctx: TaskContext):
            calls.append(ctx.attempt)
            if data == "retry" and len(calls) == 1:
                raise Retry(delay=0)
            if data == "fail" and ctx.attempt == 1:
                raise ValueError("first attempt")
            return ctx.attempt
        asked = self.app.schedule("flaky", "retry")
        self.worker.run_pending()
        self.assertEqual(self.app.get_task_by_id(asked).output, 1)   # the attempt was given back
        failed = self.app.schedule("flaky", "fail")
        self.worker.run_pending()
        task = self.app.get_task_by_id(failed)
        self.assertEqual((task.status, task.output, task.attempts), ("completed", 2, 2))
        self.assertEqual(task.error["type"], "ValueError")

    def test_timeout_cancels_the_coroutine(self):
        seen = []

        @self.worker.register("slow")
        async def slow(data):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
        task_id = self.app.schedule("slow", timeout=0.2)
        started = time.monotonic()
        self.worker.run_pending()
        self.assertLess(time.monotonic() - started, 10)
        task = self.app.get_task_by_id(task_id)
        self.assertEqual((task.status, task.error["type"]), ("expired", "TaskTimeoutError"))
        self.assertEqual(seen, ["cancelled"])

    def test_its_own_timeout_error_is_a_failure(self):
        @self.worker.register("own")
        async def own(data):
            raise asyncio.TimeoutError()
        task_id = self.app.schedule("own", timeout=60)
        self.worker.run_pending()
        self.assertEqual(self.app.get_task_by_id(task_id).status, "failed")

    def test_run_pending_from_async_code(self):
        @self.worker.register("fetch")
        async def fetch(data):
            await asyncio.sleep(0)
            return data

        async def main():
            task_id = await self.app.schedule_async("fetch", 7)
            self.worker.run_pending()   # a loop runs in this thread: the task runs on the worker's
            return await self.app.wait_async(task_id, timeout=10)
        self.assertEqual(asyncio.run(main()).output, 7)


ASYNC_TASKS = """
import asyncio

@worker.register("sleepy")
async def sleepy(data):
    await asyncio.sleep(data.get("sleep", 0))
    return {"pid": os.getpid(), "i": data.get("i")}

@worker.register("stubborn")
async def stubborn(data):
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        with open(data["marker"], "w") as f:
            f.write("cancelled")
        if data.get("ignore"):
            time.sleep(60)   # does not stop: its process must be killed
        raise
"""


@on_every_backend
class AsyncWorkerProcessTests(WorkerTestCase):
    def test_an_async_task_that_times_out_is_cancelled_and_the_worker_lives_on(self):
        app = self.start_lilota(self.script(more_tasks=ASYNC_TASKS), 1)
        marker = self.path("marker")
        task = app.wait(app.schedule("stubborn", {"marker": marker}, timeout=0.5), timeout=30)
        self.assertEqual((task.status, task.error["type"]), ("expired", "TaskTimeoutError"))
        with open(marker) as f:
            self.assertEqual(f.read(), "cancelled")
        after = app.wait(app.schedule("sleepy", {}), timeout=30)
        self.assertEqual(after.output["pid"], task.pid, "the coroutine stopped: no process was killed")

    def test_an_async_task_that_is_cancelled_ends_cancelled_and_the_worker_lives_on(self):
        app = self.start_lilota(self.script(more_tasks=ASYNC_TASKS), 1)
        marker = self.path("marker")
        task_id = app.schedule("stubborn", {"marker": marker})
        running = self.wait_status(app, task_id, "running")
        self.assertTrue(app.cancel(task_id))
        task = app.wait(task_id, timeout=30)
        self.assertEqual(task.status, "cancelled")
        self.assertTrue(os.path.exists(marker))
        self.assertEqual(app.wait(app.schedule("sleepy", {}), timeout=30).output["pid"], running.pid)

    def test_a_coroutine_that_does_not_stop_has_its_process_killed(self):
        app = lilota.Lilota(self.db_url, script_path=self.script(more_tasks=ASYNC_TASKS), number_of_workers=1)
        app.async_stop_grace = 0.5
        app.start()
        self.addCleanup(self._stop_and_check, app)
        task_id = app.schedule("stubborn", {"marker": self.path("marker"), "ignore": True})
        running = self.wait_status(app, task_id, "running")
        app.cancel(task_id)
        self.assertEqual(app.wait(task_id, timeout=30).status, "cancelled")
        self.assertTrue(os.path.exists(self.path("marker")), "its coroutine was asked first")
        wait_until(lambda: not support.process_alive(running.pid), 10, message="the stuck worker to be killed")
        self.assertNotEqual(app.wait(app.schedule("sleepy", {}), timeout=30).output["pid"], running.pid)


@on_every_backend
class AsyncApplicationTests(WorkerTestCase):
    """A FastAPI-style application simulated with plain asyncio."""

    def test_200_concurrent_waits_return_and_the_loop_stays_responsive(self):
        app = self.start_lilota(self.script(more_tasks=ASYNC_TASKS), 2)
        self.wait_workers_running(2)
        gaps = []

        async def ticker(stop):
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async def request(i):   # a request handler: schedule, then wait for the result
            task_id = await app.schedule_async("sleepy", {"sleep": 0.005, "i": i})
            task = await app.wait_async(task_id, timeout=120)
            return task.output["i"]

        async def main():
            stop = asyncio.Event()
            ticking = asyncio.ensure_future(ticker(stop))
            watchers = []
            waits = asyncio.gather(*(request(i) for i in range(200)))
            while not waits.done():
                watchers.append(sum(t.name == "lilota-wait" for t in threading.enumerate()))
                await asyncio.sleep(0.05)
            stop.set()
            await ticking
            return await waits, watchers

        results, watchers = asyncio.run(main())
        self.assertEqual(results, list(range(200)))
        self.assertLessEqual(max(watchers), 1, "one shared watcher thread serves every waiter")
        self.assertGreater(len(gaps), 10)
        self.assertLess(max(gaps), 0.1, f"the event loop stalled for {max(gaps) * 1000:.0f} ms")

    def test_wait_async_errors_and_get_task_by_id_async(self):
        app = LilotaScheduler(self.db_url)

        async def main():
            task_id = await app.schedule_async("sleepy", {}, delay=3600)
            self.assertEqual((await app.get_task_by_id_async(task_id)).status, "scheduled")
            self.assertIsNone(await app.get_task_by_id_async(uuid.uuid4()))
            with self.assertRaises(TaskWaitTimeout):
                await app.wait_async(task_id, timeout=0.1)
            with self.assertRaises(TaskNotFoundError):
                await app.wait_async(uuid.uuid4(), timeout=5)
            with self.assertRaises(ValueError):
                await app.schedule_async("sleepy", {}, on_failure="never")
            waiting = asyncio.ensure_future(app.wait_async(task_id))
            await asyncio.sleep(0.05)
            waiting.cancel()   # the wait stops; the task does not
            with self.assertRaises(asyncio.CancelledError):
                await waiting
            app.cancel(task_id)
            return await app.wait_async(task_id, timeout=5)
        self.assertEqual(asyncio.run(main()).status, "cancelled")


if __name__ == "__main__":
    unittest.main()
