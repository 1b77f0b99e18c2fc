"""Named queues and flow control: queue= on schedule, workers serving queues, pause/resume,
concurrency and rate limits that hold across processes, worker recycling, the schema migration
from version 1, and the command line of queues. Every class runs on SQLite and PostgreSQL."""

import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import time
import uuid
from datetime import timedelta

import support
from support import wait_until

import lilota
from lilota import Lilota, LilotaScheduler, LilotaWorker, Queue, TaskStatus



@support.on_every_backend
class QueueApiTests(support.TempDirTestCase):
    """The scheduling side: queue=, Task.queue, get_queues(), limits and pauses as stored records,
    and every bad input's error."""

    def setUp(self):
        super().setUp()
        self.app = Lilota(self.db_url)

    def test_default_queue_and_queue_argument(self):
        plain = self.app.schedule("x", 1)
        image = self.app.schedule("resize", {"w": 10}, queue="images")
        many = self.app.schedule_many("resize", [1, 2, 3], queue="images")
        self.assertEqual(self.app.get_task_by_id(plain).queue, "default")
        self.assertEqual(self.app.get_task_by_id(image).queue, "images")
        self.assertEqual({self.app.get_task_by_id(i).queue for i in many}, {"images"})
        self.assertEqual(self.app.get_task_by_id(image).as_dict()["queue"], "images")
        self.assertEqual(lilota.DEFAULT_QUEUE, "default")
        self.assertEqual(len(self.app.list_tasks(queue="images")), 4)
        self.assertEqual([t.id for t in self.app.list_tasks(queue="default")], [plain])
        self.assertEqual(self.app.stats()["by_queue"], {"default": {"scheduled": 1}, "images": {"scheduled": 4}})

    def test_get_queues_reports_settings_and_counts(self):
        self.app.schedule_many("x", [1, 2], queue="images")
        self.app.set_queue_limit("images", concurrency=2, rate=(10, timedelta(seconds=1)))
        self.app.pause_queue("mail")   # no task yet: allowed, and listed
        queues = {q.name: q for q in self.app.get_queues()}
        self.assertEqual(sorted(queues), ["default", "images", "mail"])
        images = queues["images"]
        self.assertIsInstance(images, Queue)
        self.assertEqual((images.paused, images.concurrency, images.rate), (False, 2, (10, timedelta(seconds=1))))
        self.assertEqual(images.counts["scheduled"], 2)
        self.assertEqual(images.counts["running"], 0)
        self.assertEqual(set(images.counts), {s.value for s in TaskStatus})
        self.assertTrue(queues["mail"].paused)
        self.assertEqual(queues["default"], Queue("default", counts={s.value: 0 for s in TaskStatus}))
        self.assertEqual(images.as_dict()["rate"], {"tasks": 10, "per_seconds": 1.0})
        # Lifting one limit keeps the other; resume clears the pause.
        self.app.set_queue_limit("images", concurrency=None)
        self.app.resume_queue("mail")
        queues = {q.name: q for q in self.app.get_queues()}
        self.assertEqual((queues["images"].concurrency, queues["images"].rate), (None, (10, timedelta(seconds=1))))
        self.assertFalse(queues["mail"].paused)
        self.app.set_queue_limit("images", rate=None)
        self.assertIsNone({q.name: q for q in self.app.get_queues()}["images"].rate)

    def test_bad_queue_names(self):
        for bad in ("", "a" * 101, "has space", "a/b", "ä", "x\n", "semi;colon", "comma,"):
            with self.subTest(name=bad):
                with self.assertRaises(ValueError) as cm:
                    self.app.schedule("x", 1, queue=bad)
                self.assertIn("letters, digits and _ . : -", str(cm.exception))
                for call in (lambda: self.app.pause_queue(bad), lambda: self.app.resume_queue(bad),
                             lambda: self.app.set_queue_limit(bad, concurrency=1),
                             lambda: self.app.list_tasks(queue=bad),
                             lambda: self.app.schedule_many("x", [1], queue=bad)):
                    self.assertRaises(ValueError, call)
        with self.assertRaises(TypeError):
            self.app.schedule("x", 1, queue=None)
        for good in ("a" * 100, "mail.bulk", "tenant:42", "low-prio_2"):
            self.app.schedule("x", 1, queue=good)
        self.assertEqual(self.app.stats()["total"], 4, "the bad calls wrote nothing")

    def test_bad_limits(self):
        for concurrency in (0, -1, True, 1.5, "2"):
            with self.subTest(concurrency=concurrency):
                with self.assertRaises(ValueError) as cm:
                    self.app.set_queue_limit("q", concurrency=concurrency)
                self.assertIn("at least 1", str(cm.exception))
        for rate in ((0, 1), (-1, 1), (10, 0), (10, -1), (10, timedelta(0)), (10, None), 10, (1, 2, 3), "10/s"):
            with self.subTest(rate=rate):
                with self.assertRaises(ValueError):
                    self.app.set_queue_limit("q", rate=rate)
        with self.assertRaises(TypeError):
            self.app.set_queue_limit("q", rate=(10, "1s"))
        with self.assertRaises(ValueError) as cm:
            self.app.set_queue_limit("q")
        self.assertIn("concurrency= and/or rate=", str(cm.exception))
        self.assertEqual([q.name for q in self.app.get_queues()], ["default"], "nothing was stored")

    def test_bad_queue_assignments(self):
        script = self.worker_script("")
        cases = [
            (dict(queues={"default": 2, "images": 1}, number_of_workers=2), "asks for 3 worker processes"),
            (dict(queues={}), "names no queue"),
            (dict(queues=[]), "is empty"),
            (dict(queues=["a", "a"]), "names a queue twice"),
            (dict(queues={"a": 0}), "an int of at least 1"),
            (dict(queues={"a": True}), "an int of at least 1"),
            (dict(queues={"bad name": 1}), "letters, digits"),
            (dict(queues=["ok", "no/slash"]), "letters, digits"),
        ]
        for options, message in cases:
            with self.subTest(**{k: repr(v) for k, v in options.items()}):
                with self.assertRaises(ValueError) as cm:
                    Lilota(self.db_url, script_path=script, **options)
                self.assertIn(message, str(cm.exception))
        with self.assertRaises(TypeError):
            Lilota(self.db_url, script_path=script, queues=42)
        with self.assertRaises(ValueError):
            Lilota(self.db_url, queues=["a"])   # no script: nothing would serve them
        with self.assertRaises(ValueError):
            LilotaWorker(self.db_url, queues=["x y"])
        for option in ("max_tasks_per_worker", "max_worker_memory"):
            for bad in (0, -5, 1.5, True):
                with self.subTest(option=option, value=bad):
                    with self.assertRaises(ValueError) as cm:
                        Lilota(self.db_url, script_path=script, **{option: bad})
                    self.assertIn(option, str(cm.exception))
        # The good forms.
        app = Lilota(self.db_url, script_path=script, queues={"default": 2, "images": 1})
        self.assertEqual((app.number_of_workers, app._queue_plan), (3, [("default",), ("default",), ("images",)]))
        app = Lilota(self.db_url, script_path=script, number_of_workers=3, queues=["images", "default"])
        self.assertEqual(app._queue_plan, [("images", "default")] * 3)
        app = Lilota.workers(script, 2, self.db_url, queues="images")
        self.assertEqual(app._queue_plan, [("images",)] * 2)


@support.on_every_backend
class ClaimAcrossQueuesTests(support.TempDirTestCase):
    """The claim, in-process: which task a worker serving some queues takes, and what a pause or a
    limit lets through. Claims are made directly on Storage, as worker processes make them."""

    def setUp(self):
        super().setUp()
        self.app = Lilota(self.db_url)
        self.storage = self.app.storage
        self.node = str(uuid.uuid4())

    def claim(self, *queues, node=None):
        prepared = self.storage.prepare_claim([], queues)
        return self.storage.claim(prepared, node or self.node, os.getpid())

    def test_a_worker_claims_only_its_queues_by_priority_then_age(self):
        old_mail = self.app.schedule("m", 1, queue="mail")
        image = self.app.schedule("i", 2, queue="images")
        urgent_mail = self.app.schedule("m", 3, queue="mail", priority=5)
        other = self.app.schedule("o", 4, queue="other")
        order = [self.claim("images", "mail").id for _ in range(3)]
        self.assertEqual(order, [urgent_mail, old_mail, image])
        self.assertIsNone(self.claim("images", "mail"))
        self.assertEqual(self.claim("other").id, other)
        self.assertIsNone(self.claim("default"))

    def test_a_paused_queue_does_not_block_the_others(self):
        self.app.pause_queue("mail")
        self.app.schedule("m", 1, queue="mail", priority=9)
        image = self.app.schedule("i", 2, queue="images")
        self.assertEqual(self.claim("mail", "images").id, image)
        self.assertIsNone(self.claim("mail", "images"))
        self.app.resume_queue("mail")
        self.assertEqual(self.claim("mail", "images").queue, "mail")

    def test_concurrency_limit(self):
        self.app.set_queue_limit("images", concurrency=2)
        ids = self.app.schedule_many("i", list(range(5)), queue="images")
        free = self.app.schedule("d", 0)
        first, second = self.claim("images"), self.claim("images", node=str(uuid.uuid4()))
        self.assertEqual([first.id, second.id], ids[:2])
        self.assertIsNone(self.claim("images"), "two are running: the limit is reached")
        self.assertEqual(self.claim("images", "default").id, free, "a limited queue does not block another")
        self.storage.complete(str(first.id), self.node, "null", False)
        self.assertEqual(self.claim("images").id, ids[2], "a slot freed up")
        self.assertIsNone(self.claim("images"))
        self.app.set_queue_limit("images", concurrency=None)
        self.assertEqual(self.claim("images").id, ids[3])
        self.assertEqual(self.claim("images").id, ids[4])

    def test_a_claim_held_across_settings_changes_obeys_them_at_its_next_claim(self):
        # A worker prepares its claim once. For a queue without settings it reads neither the
        # queue's row nor its rate ring, but the settings' version, which every change moves.
        claim = self.storage.prepare_claim([], ("images",))
        self.assertNotIn("lilota_queue ", str(claim.prepared.sql))
        self.assertNotIn("lilota_queue_rate", str(claim.prepared.sql))
        ids = self.app.schedule_many("i", list(range(4)), queue="images")
        self.app.pause_queue("images")
        self.assertIsNone(self.storage.claim(claim, self.node, os.getpid()), "paused")
        self.app.resume_queue("images")
        first = self.storage.claim(claim, self.node, os.getpid())
        self.assertEqual(first.id, ids[0])
        self.app.set_queue_limit("images", concurrency=1)
        self.assertIsNone(self.storage.claim(claim, self.node, os.getpid()), "at its limit of 1")
        stored, task = self.storage.complete_and_claim(str(first.id), self.node, "null", False, claim, os.getpid())
        self.assertTrue(stored)
        self.assertEqual(task.id, ids[1], "the slot freed is taken")
        self.app.set_queue_limit("images", concurrency=None)
        self.app.pause_queue("images")
        # A completion's claim built before the pause takes nothing, and the claim after it neither.
        stored, task = self.storage.complete_and_claim(str(task.id), self.node, "null", False, claim, os.getpid())
        self.assertTrue(stored)
        self.assertIsNone(task)
        self.assertIsNone(self.storage.claim(claim, self.node, os.getpid()))
        # A row written by hand moves the version too.
        self.db_execute("UPDATE lilota_queue SET paused = 0 WHERE name = 'images'")
        self.assertEqual(self.storage.claim(claim, self.node, os.getpid()).id, ids[2])
        other = self.storage.prepare_claim([], ("mail",))
        self.app.schedule("m", 1, queue="mail")
        ts = lilota._dialect_for_url(self.db_url).time_param
        self.db_execute(f"INSERT INTO lilota_queue (name, paused, updated_at) VALUES ('mail', 1, {ts})",
                        lilota._dialect_for_url(self.db_url).encode_time(time.time()))
        self.assertIsNone(self.storage.claim(other, self.node, os.getpid()))

    def test_a_completion_hands_its_slot_to_the_next_task_in_the_same_commit(self):
        # A busy worker of a limited queue completes and claims in one commit; the slot its task
        # frees is the one the next takes. (PostgreSQL does both in one statement, whose snapshot
        # still sees the completed task running: it must not count toward the limit.)
        self.app.set_queue_limit("images", concurrency=1)
        ids = self.app.schedule_many("i", list(range(3)), queue="images")
        prepared = self.storage.prepare_claim([], ("images",))
        task = self.storage.claim(prepared, self.node, os.getpid())
        claimed = [task.id]
        for _ in range(2):
            result = self.storage.complete_and_claim(str(task.id), self.node, "null", False, prepared, os.getpid())
            self.assertIsNotNone(result, "one commit for the completion and the claim")
            stored, task = result
            self.assertTrue(stored)
            self.assertIsNotNone(task, "the freed slot is taken by the next task of the queue")
            claimed.append(task.id)
        self.assertEqual(claimed, ids)
        self.assertEqual(self.app.get_task_by_id(ids[1]).status, "completed")
        # Another node's claim still finds the queue at its limit.
        self.assertIsNone(self.claim("images", node=str(uuid.uuid4())))
        # A completion that was not this node's (recovered elsewhere) frees nothing.
        other = str(uuid.uuid4())
        self.app.schedule("i", 9, queue="images")
        stored, following = self.storage.complete_and_claim(str(task.id), other, "null", False, prepared,
                                                            os.getpid())
        self.assertFalse(stored)
        self.assertIsNone(following, "the limit holds: the task still runs on its node")

    def test_lowering_a_limit_lets_running_tasks_finish_and_starts_none_until_below(self):
        ids = self.app.schedule_many("i", list(range(5)), queue="images")
        running = [self.claim("images") for _ in range(3)]   # no limit yet: they hold no slot
        self.app.set_queue_limit("images", concurrency=2)
        self.assertIsNone(self.claim("images"))
        self.storage.complete(str(running[0].id), self.node, "null", False)
        self.assertIsNone(self.claim("images"), "2 still run: at the limit")
        self.storage.complete(str(running[1].id), self.node, "null", False)
        self.assertEqual(self.claim("images").id, ids[3])
        self.assertIsNone(self.claim("images"))

    def test_rate_limit_ring(self):
        self.app.set_queue_limit("mail", rate=(3, timedelta(seconds=30)))
        ids = self.app.schedule_many("m", list(range(5)), queue="mail")
        for expected in ids[:3]:
            task = self.claim("mail")
            self.assertEqual(task.id, expected)
            self.storage.complete(str(task.id), self.node, "null", False)
        self.assertIsNone(self.claim("mail"), "3 started in this period")
        # The idle worker's wake-up: when the first of those slots is free again.
        due = self.storage.next_run_at()
        self.assertIsNotNone(due)
        self.assertAlmostEqual(due - time.time(), 30, delta=5)
        # A larger rate adds slots now; the used ones keep their time.
        self.app.set_queue_limit("mail", rate=(4, timedelta(seconds=30)))
        self.assertEqual(self.claim("mail").id, ids[3])
        self.assertIsNone(self.claim("mail"))
        # A smaller one keeps the most recent starts: still nothing.
        self.app.set_queue_limit("mail", rate=(2, timedelta(seconds=30)))
        self.assertIsNone(self.claim("mail"))
        self.app.set_queue_limit("mail", rate=None)
        self.assertEqual(self.claim("mail").id, ids[4])

    def test_rate_slots_free_again_after_the_period(self):
        self.app.set_queue_limit("mail", rate=(2, timedelta(seconds=0.3)))
        self.app.schedule_many("m", list(range(3)), queue="mail")
        self.assertIsNotNone(self.claim("mail"))
        self.assertIsNotNone(self.claim("mail"))
        self.assertIsNone(self.claim("mail"))
        third = wait_until(lambda: self.claim("mail"), 5, message="a rate slot to free")
        self.assertEqual(third.queue, "mail")

    def test_claimers_in_processes_never_exceed_the_limit(self):
        """Four processes, each with its own connection, claim from a queue limited to 2 as fast
        as they can; after each claim the claimer counts the queue's running tasks, which a
        concurrent claim that broke the limit would show as 3 or more."""
        self.app.set_queue_limit("q", concurrency=2)
        self.app.schedule_many("t", list(range(120)), queue="q")
        with concurrent.futures.ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_claim_and_count, [self.db_url] * 4))
        self.assertEqual(sum(claimed for claimed, _ in results), 120)
        self.assertLessEqual(max(seen for _, seen in results), 2)
        self.assertEqual(self.app.stats()["by_status"]["completed"], 120)


def _claim_and_count(url):
    """Claim from queue "q" until none is left: (tasks claimed, most running tasks of "q" seen)."""
    storage = LilotaScheduler(url).storage
    node = str(uuid.uuid4())
    prepared = storage.prepare_claim([], ("q",))
    claimed = seen = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task = storage.claim(prepared, node, os.getpid())
        if task is None:
            if not storage.list_tasks(status="scheduled", limit=1, queue="q"):
                break
            time.sleep(0.001)
            continue
        claimed += 1
        seen = max(seen, storage.list_tasks(status="running", queue="q").__len__())
        time.sleep(0.001)
        storage.complete(str(task.id), node, "null", False)
    return claimed, seen


@support.on_every_backend
class LimitsAcrossProcessesTests(support.TempDirTestCase):
    """The issue's proof: two applications, four worker processes in all, one limited queue."""

    SCRIPT = """
        @worker.register("record")
        def record(data):
            start = time.time()
            time.sleep(data["sleep"])
            return {"start": start, "end": time.time(), "pid": os.getpid()}
        """

    def run_two_apps(self, count, sleep):
        script = self.worker_script(self.SCRIPT)
        first = self.start_lilota(script, number_of_workers=2, queues=["limited", "default"])
        self.start_lilota(script, number_of_workers=2, queues=["limited"])
        self.wait_workers_running(4)
        ids = first.schedule_many("record", [{"sleep": sleep}] * count, queue="limited")
        wait_until(lambda: first.stats()["by_status"]["completed"] == count, 120,
                   message=f"{count} tasks to complete")
        self.assertFalse(first.has_failed())
        return [first.get_task_by_id(i) for i in ids]

    def test_concurrency_limit_holds_over_two_apps(self):
        app = LilotaScheduler(self.db_url)
        app.set_queue_limit("limited", concurrency=2)
        tasks = self.run_two_apps(200, 0.005)
        self.assertTrue(all(t.status is TaskStatus.COMPLETED for t in tasks))
        events = sorted([(t.output["start"], 1) for t in tasks] + [(t.output["end"], -1) for t in tasks],
                        key=lambda e: (e[0], e[1]))
        running = peak = 0
        for _, change in events:
            running += change
            peak = max(peak, running)
        self.assertLessEqual(peak, 2, "never more than 2 of the queue's tasks ran at once")
        self.assertEqual(peak, 2, "and the limit was used")
        # A worker that completes a task claims the next in the same commit, so the processes
        # that hold the two slots tend to keep them: competing claimers are the test above.
        self.assertGreaterEqual(len({t.output["pid"] for t in tasks}), 2)

    def test_rate_limit_holds_over_two_apps(self):
        app = LilotaScheduler(self.db_url)
        n, period = 5, 0.5
        app.set_queue_limit("limited", rate=(n, timedelta(seconds=period)))
        tasks = self.run_two_apps(40, 0)
        starts = sorted(t.start_date_time.timestamp() for t in tasks)
        worst = max(sum(1 for s in starts if first <= s < first + period) for first in starts)
        self.assertLessEqual(worst, n, f"no window of {period}s holds more than {n} starts")
        self.assertGreaterEqual(starts[-1] - starts[0], (40 / n - 1) * period - 0.05)


@support.on_every_backend
class PauseAndRecycleTests(support.TempDirTestCase):
    def test_a_paused_queue_waits_while_the_other_runs_and_resume_starts_it(self):
        script = self.worker_script("""
            @worker.register("job")
            def job(data):
                return data
            """)
        app = self.start_lilota(script, number_of_workers=1, queues=["mail", "default"])
        app.pause_queue("mail")
        mail = app.schedule_many("job", [1, 2, 3], queue="mail", priority=10)
        other = app.schedule_many("job", [4, 5, 6])
        for task_id in other:
            self.assertEqual(app.wait(task_id, timeout=30).status, TaskStatus.COMPLETED)
        self.assertEqual({app.get_task_by_id(i).status for i in mail}, {TaskStatus.SCHEDULED})
        resumed = time.monotonic()
        app.resume_queue("mail")
        wait_until(lambda: all(app.get_task_by_id(i).start_date_time for i in mail), 5,
                   message="the resumed queue's tasks to start")
        self.assertLess(time.monotonic() - resumed, 1.0, "resume starts them within a second")
        for task_id in mail:
            self.assertEqual(app.wait(task_id, timeout=30).status, TaskStatus.COMPLETED)

    def recycle(self, **options):
        script = self.worker_script("""
            LEAK = []

            @worker.register("leak")
            def leak(data):
                LEAK.append(bytearray(data["mib"] * 2**20))   # touched: resident
                return {"pid": os.getpid()}
            """)
        app = self.start_lilota(script, number_of_workers=1, **options)
        ids = app.schedule_many("leak", [{"mib": 40}] * 8)
        tasks = [app.wait(i, timeout=60) for i in ids]
        self.assertEqual({t.status for t in tasks}, {TaskStatus.COMPLETED})
        self.assertEqual([t.error for t in tasks], [None] * 8)
        self.assertEqual({t.attempts for t in tasks}, {1}, "no task ran twice")
        self.assertFalse(app.has_failed())
        self.assertIsNone(app.error)
        recycled = [n for n in app.get_all_nodes() if n.reason]
        return tasks, recycled

    def test_recycled_at_the_memory_bound(self):
        tasks, recycled = self.recycle(max_worker_memory=100 * 2**20)
        self.assertGreaterEqual(len({t.output["pid"] for t in tasks}), 3, "replaced at the bound")
        self.assertTrue(recycled)
        for node in recycled:
            self.assertEqual(node.status, lilota.NodeStatus.STOPPED)
            self.assertRegex(node.reason, r"recycled at \d+ MiB of memory \(max_worker_memory=100 MiB\)")

    def test_recycled_after_max_tasks(self):
        tasks, recycled = self.recycle(max_tasks_per_worker=3)
        pids = [t.output["pid"] for t in sorted(tasks, key=lambda t: t.start_date_time)]
        self.assertEqual(len(set(pids)), 3, pids)
        self.assertEqual([pids.count(p) for p in dict.fromkeys(pids)], [3, 3, 2])
        self.assertEqual(len(recycled), 2)
        for node in recycled:
            self.assertEqual(node.reason, "recycled after 3 tasks (max_tasks_per_worker=3)")


@support.on_every_backend
class MigrationTests(support.TempDirTestCase):
    """A database written by lilota with schema version 1 keeps every task, and its tasks land in
    the default queue and run."""

    def make_version_1(self):
        if self.backend == "sqlite":
            # The dump of a database that the release with schema version 1 wrote.
            support.load_schema_1_dump(self.db_path)
            return
        # PostgreSQL: version 1's statements, as released (a version is never edited), and rows
        # written the way that release wrote them.
        with support.old_schema(self.db_url, 1) as (conn, _):
            for i, status in enumerate(["scheduled", "completed", "scheduled", "cancelled", "scheduled"]):
                conn.execute(
                    "INSERT INTO lilota_task (id, name, status, priority, run_at, attempts, input, output, "
                    "created_at) VALUES (%s, 'add', %s, %s, now(), %s, %s, %s, now())",
                    (str(uuid.uuid4()), status, 5 if i == 1 else 0, 1 if status == "completed" else 0,
                     json.dumps({"a": i, "b": i}), json.dumps({"sum": 2 * i}) if status == "completed" else None))

    def test_tasks_of_version_1_are_kept_and_run(self):
        self.make_version_1()
        before = self.db_execute("SELECT id, status FROM lilota_task ORDER BY id")
        self.assertEqual(len(before), 5)
        app = LilotaScheduler(self.db_url)
        tasks = app.list_tasks(limit=None)
        self.assertEqual(sorted((str(t.id), str(t.status)) for t in tasks), sorted(before))
        self.assertEqual({t.queue for t in tasks}, {"default"})
        self.assertEqual(self.db_execute("SELECT value FROM lilota_meta WHERE key = 'schema_version'"),
                         [(str(lilota.SCHEMA_VERSION),)])
        worker = LilotaWorker(self.db_url, retry_delay=0)

        @worker.register("add")
        def add(data):
            return {"sum": data["a"] + data["b"]}
        self.assertEqual(len(worker.run_pending()), 3)
        statuses = sorted(str(t.status) for t in app.list_tasks(limit=None))
        self.assertEqual(statuses, ["cancelled", "completed", "completed", "completed", "completed"])
        # The new features work on the migrated database.
        app.set_queue_limit("default", concurrency=1)
        new = app.schedule("add", {"a": 1, "b": 1}, queue="other")
        self.assertEqual(app.get_task_by_id(new).queue, "other")

    def test_several_processes_migrate_at_once(self):
        self.make_version_1()
        with concurrent.futures.ProcessPoolExecutor(6, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = list(pool.map(_open_and_count, [self.db_url] * 6))
        self.assertEqual(outcomes, [5] * 6)
        self.assertEqual(self.db_execute("SELECT value FROM lilota_meta WHERE key = 'schema_version'"),
                         [(str(lilota.SCHEMA_VERSION),)])


def _open_and_count(url):
    return len(LilotaScheduler(url).list_tasks(limit=None))


@support.on_every_backend
class QueueCommandLineTests(support.TempDirTestCase):
    def cli(self, *args):
        """Run ``python -m lilota`` in-process: (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = lilota.main([*args, "--db", self.db_url])
        return code, out.getvalue(), err.getvalue()

    def assertCli(self, *args):
        code, out, err = self.cli(*args)
        self.assertEqual(code, 0, err)
        return out

    def test_queue_commands(self):
        app = LilotaScheduler(self.db_url)
        task_id = self.assertCli("schedule", "resize", '{"w": 1}', "--queue", "images").strip()
        self.assertEqual(app.get_task_by_id(task_id).queue, "images")
        self.assertIn("paused", self.assertCli("queue", "pause", "mail"))
        out = self.assertCli("queue", "limit", "images", "--concurrency", "2", "--rate", "10/s")
        self.assertIn("concurrency 2, rate 10/s", out)
        table = self.assertCli("queues").splitlines()
        self.assertEqual(table[0].split()[:5], ["QUEUE", "PAUSED", "CONCURRENCY", "RATE", "SCHEDULED"])
        rows = {line.split()[0]: line.split() for line in table[1:]}
        self.assertEqual(rows["images"][1:5], ["-", "2", "10/s", "1"])
        self.assertEqual(rows["mail"][1], "yes")
        self.assertIn("default", rows)
        records = [json.loads(line) for line in self.assertCli("queues", "--json").splitlines()]
        self.assertEqual([r["name"] for r in records], ["default", "images", "mail"])
        self.assertEqual(records[1]["rate"], {"tasks": 10, "per_seconds": 1.0})
        self.assertEqual(records[1]["counts"]["scheduled"], 1)
        self.assertIn("rate 5/30s", self.assertCli("queue", "limit", "images", "--rate", "5/30s"))
        self.assertIn("concurrency -, rate 5/30s", self.assertCli("queue", "limit", "images", "--concurrency", "none"))
        self.assertIn("rate -", self.assertCli("queue", "limit", "images", "--rate", "none"))
        self.assertIn("resumed", self.assertCli("queue", "resume", "mail"))
        self.assertFalse({q.name: q for q in app.get_queues()}["mail"].paused)
        # list --queue, show, stats per queue, --json of a task.
        app.schedule("other", 1)
        listed = self.assertCli("list", "--queue", "images").splitlines()
        self.assertEqual(listed[0].split()[:4], ["ID", "NAME", "QUEUE", "STATUS"])
        self.assertEqual(len(listed), 2)
        self.assertIn("images", listed[1])
        self.assertEqual(json.loads(self.assertCli("show", task_id, "--json"))["queue"], "images")
        self.assertRegex(self.assertCli("show", task_id), r"queue:\s+images")
        stats = self.assertCli("stats")
        self.assertRegex(stats, r"QUEUE\s+SCHEDULED")
        self.assertEqual(json.loads(self.assertCli("stats", "--json"))["by_queue"],
                         {"default": {"scheduled": 1}, "images": {"scheduled": 1}})

    def test_bad_queue_commands_exit_2(self):
        for args, text in ((("queue", "limit", "images"), "needs --concurrency and/or --rate"),
                           (("queue", "limit", "images", "--concurrency", "0"), "at least 1"),
                           (("queue", "limit", "images", "--concurrency", "many"), "at least 1"),
                           (("queue", "limit", "images", "--rate", "0/s"), "TASKS/PERIOD"),
                           (("queue", "limit", "images", "--rate", "10"), "TASKS/PERIOD"),
                           (("queue", "limit", "images", "--rate", "10/fortnight"), "TASKS/PERIOD"),
                           (("queue", "pause", "bad name"), "letters, digits"),
                           (("queue", "pause"), "required"),
                           (("queue", "frob", "x"), "invalid choice"),
                           (("schedule", "x", "--queue", "a/b"), "letters, digits"),
                           (("list", "--queue", ""), "letters, digits"),
                           (("worker", "w.py", "--queue", "no way"), "letters, digits")):
            with self.subTest(args=args):
                code, out, err = self.cli(*args)
                self.assertEqual(code, 2, (out, err))
                self.assertIn(text, err)
                self.assertNotIn("Traceback", err)
        self.assertEqual([q.name for q in LilotaScheduler(self.db_url).get_queues()], ["default"])

    def test_worker_command_serves_the_queues_given(self):
        script = self.worker_script("""
            @worker.register("job")
            def job(data):
                return data
            """)
        app = LilotaScheduler(self.db_url)
        images, mail, other = (app.schedule("job", i, queue=q) for i, q in enumerate(["images", "mail", "default"]))
        proc = self.popen_python("-m", "lilota", "worker", script, "-n", "1", "--queue", "images", "--queue", "mail",
                                 "--db", self.db_url, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for task_id in (images, mail):
            self.assertEqual(app.wait(task_id, timeout=60).status, TaskStatus.COMPLETED)
        workers = [n for n in app.get_all_nodes() if n.type == lilota.NodeType.WORKER]
        self.assertEqual([n.queues for n in workers], [["images", "mail"]])
        self.assertEqual(app.get_task_by_id(other).status, TaskStatus.SCHEDULED, "not its queue")
        self.assertIn("images", {q.name for q in app.get_queues()})
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 0, err)
        self.assertIn("serving images, mail", out)
