"""Periodic tasks: lilota's cron parser (fields, names, aliases, the either-day rule, daylight-saving
gaps and overlaps), worker.periodic() and @worker.task(cron=...) with a controllable clock, exactly
one task per slot however many nodes race for it, catch-up, the schedules recorded in the database
and the command line. The database tests run on SQLite and PostgreSQL."""

import contextlib
import io
import json
import signal
import unittest
import uuid
from datetime import datetime, timedelta, timezone
from unittest import mock

import support
from support import wait_until

import lilota
from lilota import LilotaScheduler, LilotaWorker, TaskContext, TaskStatus

UTC = timezone.utc


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def slots(expression, after, count=1, zone=None):
    """The ``count`` slots of ``expression`` after ``after`` (an aware datetime), as UTC datetimes."""
    periodic = lilota._Periodic("t", "t", cron=expression, timezone=zone)
    found, seconds = [], after.timestamp()
    for _ in range(count):
        seconds = periodic.next_after(seconds)
        found.append(datetime.fromtimestamp(seconds, UTC))
    return found


class CronTests(unittest.TestCase):
    """Known next times of expressions; every kind of bad field."""

    def test_next_times(self):
        table = [
            ("*/15 * * * *", utc(2026, 1, 1, 0, 7), [utc(2026, 1, 1, 0, 15), utc(2026, 1, 1, 0, 30)]),
            ("@hourly", utc(2026, 1, 1, 10, 0), [utc(2026, 1, 1, 11, 0)]),   # strictly after
            ("@daily", utc(2026, 5, 5, 12, 0), [utc(2026, 5, 6)]),
            ("@midnight", utc(2026, 5, 5, 12, 0), [utc(2026, 5, 6)]),
            ("@weekly", utc(2026, 12, 7), [utc(2026, 12, 13), utc(2026, 12, 20)]),   # Sundays
            ("@monthly", utc(2026, 1, 31), [utc(2026, 2, 1)]),
            ("@yearly", utc(2026, 6, 1), [utc(2027, 1, 1)]),
            ("@ANNUALLY", utc(2026, 6, 1), [utc(2027, 1, 1)]),
            # 29 February: the next leap year, and 2100 is none.
            ("0 0 29 2 *", utc(2026, 3, 1), [utc(2028, 2, 29), utc(2032, 2, 29)]),
            ("0 0 29 2 *", utc(2097, 3, 1), [utc(2104, 2, 29)]),
            ("0 0 31 * *", utc(2026, 4, 1), [utc(2026, 5, 31), utc(2026, 7, 31)]),
            # Both day fields restricted: either one is enough (Friday or the 13th).
            ("0 0 13 * fri", utc(2026, 12, 7), [utc(2026, 12, 11), utc(2026, 12, 13), utc(2026, 12, 18)]),
            # A day field starting with * counts as unrestricted: then both must match.
            ("0 0 */2 * mon", utc(2026, 12, 6), [utc(2026, 12, 7), utc(2026, 12, 21)]),
            ("30 9 * jan-mar mon-fri", utc(2026, 3, 31, 10), [utc(2027, 1, 1, 9, 30), utc(2027, 1, 4, 9, 30)]),
            ("0 12 * * 7", utc(2026, 12, 7), [utc(2026, 12, 13, 12)]),   # 7 is Sunday too
            ("0 12 * * SUN", utc(2026, 12, 7), [utc(2026, 12, 13, 12)]),
            ("5/20 * * * *", utc(2026, 1, 1, 0, 30), [utc(2026, 1, 1, 0, 45), utc(2026, 1, 1, 1, 5)]),
            ("0,30 8-10/2 * * *", utc(2026, 1, 1, 8, 45), [utc(2026, 1, 1, 10), utc(2026, 1, 1, 10, 30),
                                                            utc(2026, 1, 2, 8)]),
            ("0 0 1 */3 *", utc(2026, 2, 1), [utc(2026, 4, 1), utc(2026, 7, 1)]),
        ]
        for expression, after, expected in table:
            with self.subTest(expression=expression, after=after):
                self.assertEqual(slots(expression, after, len(expected)), expected)

    def test_daylight_saving_time(self):
        table = [
            # Europe/Berlin 2026: 02:00 CET -> 03:00 CEST on 29 March (01:00 UTC); 03:00 CEST ->
            # 02:00 CET on 25 October (01:00 UTC).
            # A slot the gap skips runs once at the first valid time after it...
            ("30 2 * * *", "Europe/Berlin", utc(2026, 3, 28, 12), [utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30)]),
            # ... and the slots of the skipped hour are one run, that of 03:00.
            ("*/15 * * * *", "Europe/Berlin", utc(2026, 3, 29, 0, 40),
             [utc(2026, 3, 29, 0, 45), utc(2026, 3, 29, 1), utc(2026, 3, 29, 1, 15)]),
            # A repeated time runs once, at its first occurrence.
            ("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12), [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]),
            ("0 * * * *", "Europe/Berlin", utc(2026, 10, 24, 23, 30),
             [utc(2026, 10, 25, 0), utc(2026, 10, 25, 2), utc(2026, 10, 25, 3)]),
            # Every wall-clock minute of the repeated hour once: none in its second pass.
            ("*/30 2 * * *", "Europe/Berlin", utc(2026, 10, 25, 0, 10), [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1)]),
            # America/New_York 2026: 02:00 EST -> 03:00 EDT on 8 March (07:00 UTC); 02:00 EDT ->
            # 01:00 EST on 1 November (06:00 UTC).
            ("30 2 * * *", "America/New_York", utc(2026, 3, 7, 12), [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]),
            ("0 2 * * *", "America/New_York", utc(2026, 3, 7, 12), [utc(2026, 3, 8, 7)]),
            ("30 1 * * *", "America/New_York", utc(2026, 10, 31, 12), [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]),
            ("0 9 * * mon-fri", "America/New_York", utc(2026, 12, 4, 15), [utc(2026, 12, 7, 14)]),
        ]
        for expression, zone, after, expected in table:
            with self.subTest(expression=expression, zone=zone, after=after):
                self.assertEqual(slots(expression, after, len(expected), zone), expected)

    def test_latest_slot(self):
        periodic = lilota._Periodic("t", "t", cron="0 0 29 2 *")
        self.assertEqual(datetime.fromtimestamp(periodic.latest(utc(2027, 6, 1).timestamp()), UTC), utc(2024, 2, 29))
        periodic = lilota._Periodic("t", "t", cron="*/15 * * * *")
        self.assertEqual(periodic.latest(utc(2026, 1, 1, 0, 15).timestamp()), utc(2026, 1, 1, 0, 15).timestamp())
        every = lilota._Periodic("t", "t", every=timedelta(minutes=5))
        moment = utc(2026, 1, 1, 0, 7).timestamp()
        self.assertEqual((every.latest(moment), every.next_after(moment)),
                         (utc(2026, 1, 1, 0, 5).timestamp(), utc(2026, 1, 1, 0, 10).timestamp()))

    def test_bad_expressions(self):
        table = [
            ("61 * * * *", "minute field: 61 is out of range 0-59"),
            ("* 24 * * *", "hour field: 24 is out of range 0-23"),
            ("* * 0 * *", "day of month field: 0 is out of range 1-31"),
            ("* * 32 * *", "day of month field: 32 is out of range 1-31"),
            ("* * * 13 *", "month field: 13 is out of range 1-12"),
            ("* * * * 8", "day of week field: 8 is out of range 0-7"),
            ("a * * * *", "minute field: 'a' is not a number"),
            ("\u00b2 * * * *", "minute field: '\u00b2' is not a number"),   # a digit, but not 0-9
            ("*/\u00b2 * * * *", "minute field: the step"),
            ("* * * foo *", "month field: 'foo' is not a number or a name"),
            ("* * * * mon-", "day of week field: '' is not a number or a name"),
            ("*/0 * * * *", "minute field: the step in '\\*/0' must be a whole number of at least 1"),
            ("*/x * * * *", "minute field: the step"),
            ("5-2 * * * *", "minute field: the range '5-2' runs backwards"),
            ("1,,2 * * * *", "minute field: empty item"),
            ("0 0 31 2 *", "day of month field: '31' never falls in the months"),
            ("0 0 30 2,feb *", "day of month field"),
            ("* * * *", "has 4 fields; it needs 5"),
            ("* * * * * *", "has 6 fields; it needs 5"),
            ("", "has 0 fields"),
            ("@reboot", "unknown alias '@reboot'"),
        ]
        for expression, message in table:
            with self.subTest(expression=expression), self.assertRaisesRegex(ValueError, message):
                lilota._Periodic("t", "t", cron=expression)
        with self.assertRaisesRegex(TypeError, "cron must be a string"):
            lilota._Periodic("t", "t", cron=15)

    def test_time_zones(self):
        self.assertEqual(lilota._Periodic("t", "t", cron="@daily").timezone, "UTC")
        self.assertEqual(lilota._Periodic("t", "t", cron="@daily", timezone="Europe/Berlin").timezone, "Europe/Berlin")
        with self.assertRaisesRegex(ValueError, "'Mars/Olympus' is not a known IANA time zone"):
            lilota._Periodic("t", "t", cron="@daily", timezone="Mars/Olympus")
        with self.assertRaisesRegex(TypeError, "timezone must be an IANA time zone name"):
            lilota._Periodic("t", "t", cron="@daily", timezone=1)


class Clock:
    """lilota's clock (``lilota._now``), moved by the test."""

    def __init__(self, start):
        self.now = start.timestamp()

    def __call__(self):
        return self.now

    def advance(self, **delta):
        self.now += timedelta(**delta).total_seconds()


@support.on_every_backend
class PeriodicWorkerTests(support.TempDirTestCase):
    """worker.periodic() and @worker.task(cron=...) through run_periodic(), with a clock the test moves."""

    def setUp(self):
        super().setUp()
        self.clock = Clock(utc(2026, 12, 7, 9, 7))
        patcher = mock.patch.object(lilota, "_now", self.clock)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.app = LilotaScheduler(self.db_url)

    def make_worker(self, **periodic):
        worker = LilotaWorker(self.db_url, queues=["default", "maintenance"])
        ran = []

        @worker.task(cron="*/15 * * * *")
        def refresh(ctx: TaskContext) -> None:
            ran.append(("refresh", ctx.scheduled_for))

        @worker.register("cleanup")
        def cleanup(data, ctx: TaskContext):
            ran.append(("cleanup", data, ctx.scheduled_for))
        worker.periodic("cleanup", every=timedelta(minutes=5), input={"days": 30}, queue="maintenance", **periodic)
        worker.ran = ran
        return worker

    def test_one_task_per_slot_over_several_nodes(self):
        nodes = [self.make_worker() for _ in range(3)]
        self.assertEqual([node.run_periodic() for node in nodes], [[], [], []], "a new schedule waits for its next slot")
        self.clock.advance(minutes=8)   # 09:15: a slot of both
        enqueued = [node.run_periodic() for node in nodes]
        self.assertEqual([len(ids) for ids in enqueued], [2, 0, 0])
        self.assertEqual([node.run_periodic() for node in nodes], [[], [], []])
        tasks = {t.name: t for t in map(self.app.get_task_by_id, enqueued[0])}
        self.assertEqual(tasks["refresh"].scheduled_for, utc(2026, 12, 7, 9, 15))
        self.assertEqual((tasks["cleanup"].input, tasks["cleanup"].queue), ({"days": 30}, "maintenance"))
        self.assertEqual(tasks["cleanup"].unique_key, "lilota.periodic:cleanup@2026-12-07T09:15:00+00:00")
        nodes[1].run_pending()
        self.assertEqual(sorted(map(str, nodes[1].ran)), sorted(map(str, [
            ("refresh", utc(2026, 12, 7, 9, 15)), ("cleanup", {"days": 30}, utc(2026, 12, 7, 9, 15))])))
        self.clock.advance(minutes=5)   # 09:20: cleanup only, by whichever node comes first
        self.assertEqual([len(node.run_periodic()) for node in reversed(nodes)], [1, 0, 0])
        rows = self.db_execute("SELECT name, COUNT(*) FROM lilota_task GROUP BY name ORDER BY name")
        self.assertEqual(rows, [("cleanup", 2), ("refresh", 1)])

    def test_missed_slots_catch_up_once(self):
        self.make_worker().run_periodic()
        self.clock.advance(hours=3)   # no node ran: 12 slots of refresh missed, 36 of cleanup
        ids = self.make_worker().run_periodic()
        slots = sorted((t.name, t.scheduled_for) for t in map(self.app.get_task_by_id, ids))
        self.assertEqual(slots, [("cleanup", utc(2026, 12, 7, 12, 5)), ("refresh", utc(2026, 12, 7, 12, 0))])

    def test_catch_up_false_skips_missed_slots(self):
        self.make_worker(catch_up=False).run_periodic()
        self.clock.advance(hours=3)
        node = self.make_worker(catch_up=False)
        self.assertEqual([self.app.get_task_by_id(i).name for i in node.run_periodic()], ["refresh"])
        self.clock.advance(minutes=3, seconds=30)   # 12:10:30: cleanup's slot 12:10 is within its grace
        self.assertEqual([self.app.get_task_by_id(i).name for i in node.run_periodic()], ["cleanup"])

    def test_schedules_are_recorded(self):
        node = self.make_worker()
        node.run_periodic()
        self.clock.advance(minutes=8)
        node.run_periodic()
        schedules = {p.name: p for p in self.app.get_periodic()}
        self.assertEqual(sorted(schedules), ["cleanup", "refresh"])
        refresh = schedules["refresh"]
        self.assertIsInstance(refresh, lilota.PeriodicSchedule)
        self.assertEqual((refresh.task, refresh.schedule, refresh.timezone, refresh.queue),
                         ("refresh", "*/15 * * * *", "UTC", "default"))
        self.assertEqual((refresh.last_slot, refresh.next_run_at), (utc(2026, 12, 7, 9, 15), utc(2026, 12, 7, 9, 30)))
        self.assertEqual(refresh.last_status, TaskStatus.SCHEDULED)
        self.assertEqual(self.app.get_task_by_id(refresh.last_task_id).scheduled_for, utc(2026, 12, 7, 9, 15))
        self.assertEqual(schedules["cleanup"].schedule, "every 300s")
        self.assertEqual(schedules["cleanup"].as_dict()["last_slot"], "2026-12-07T09:15:00+00:00")

    def test_deleted_record_is_made_again(self):
        node = self.make_worker()
        node.run_periodic()
        self.db_execute("DELETE FROM lilota_periodic")
        self.clock.advance(minutes=8)   # 09:15: the rows are made again, as new schedules
        self.assertEqual(node.run_periodic(), [])
        self.assertEqual(sorted(p.name for p in self.app.get_periodic()), ["cleanup", "refresh"])
        self.clock.advance(minutes=5)   # 09:20
        self.assertEqual([self.app.get_task_by_id(i).name for i in node.run_periodic()], ["cleanup"])

    def test_command_line(self):
        self.app.storage.ensure_ready()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(lilota.main(["periodic", "--db", self.db_url]), 0)
        self.assertTrue(out.getvalue().startswith("no periodic schedules"), out.getvalue())
        node = self.make_worker()
        node.run_periodic()
        self.clock.advance(minutes=8)
        node.run_periodic()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(lilota.main(["periodic", "--db", self.db_url]), 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0].split()[:5], ["NAME", "TASK", "SCHEDULE", "ZONE", "QUEUE"])
        self.assertIn("*/15 * * * *", lines[2])
        self.assertIn("scheduled", lines[2])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(lilota.main(["periodic", "--json", "--db", self.db_url]), 0)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([r["name"] for r in records], ["cleanup", "refresh"])
        self.assertEqual(records[1]["next_run_at"], "2026-12-07T09:30:00+00:00")

    def test_time_zone_schedule(self):
        worker = LilotaWorker(self.db_url)
        self.clock.now = utc(2026, 3, 28, 12).timestamp()
        worker.periodic("report", cron="30 2 * * *", timezone="Europe/Berlin")
        worker.run_periodic()
        self.clock.now = utc(2026, 3, 29, 1, 0, 1).timestamp()   # 03:00:01 CEST: the skipped 02:30's run
        [task_id] = worker.run_periodic()
        self.assertEqual(self.app.get_task_by_id(task_id).scheduled_for, utc(2026, 3, 29, 1))

    def test_bad_arguments(self):
        worker = LilotaWorker(self.db_url)
        with self.assertRaisesRegex(ValueError, "minute field: 61 is out of range 0-59"):
            @worker.task(cron="61 * * * *")
            def bad():
                pass
        self.assertEqual(worker.registered_names, [], "a bad expression registers nothing")
        cases = [
            (ValueError, "either cron= .* or every=", dict()),
            (ValueError, "either cron= .* or every=", dict(cron="@daily", every=60)),
            (ValueError, "at least 1 second", dict(every=0.5)),
            (ValueError, "positive duration", dict(every=0)),
            (TypeError, "cannot be stored|not JSON", dict(every=60, input=object())),
            (ValueError, "queue name", dict(every=60, queue="")),
        ]
        for error, message, kwargs in cases:
            with self.subTest(kwargs=kwargs), self.assertRaisesRegex(error, message):
                worker.periodic("job", **kwargs)
        worker.periodic("job", every=60)
        with self.assertRaisesRegex(ValueError, "already defined; give name="):
            worker.periodic("job", cron="@daily")
        worker.periodic("job", cron="@daily", name="job-daily")
        with self.assertRaisesRegex(ValueError, "go with cron="):
            worker.task(timezone="Europe/Berlin")


@support.on_every_backend
class SlotRaceTests(support.TempDirTestCase):
    """The database's part alone: 8 threads in 2 processes enqueue the same 50 slots at once,
    without the read that normally spares most of them the write; each slot gets one task."""

    def test_race_for_each_slot(self):
        worker = LilotaWorker(self.db_url)
        worker.periodic("tick", every=1)
        worker.run_periodic(utc(2026, 1, 1))   # records the schedule
        outcomes = support.race_in_processes(_enqueue_slots, self.db_url)
        winners = [slot for outcome in outcomes for slots in outcome for slot in slots]
        self.assertEqual(sorted(winners), list(range(50)), "one winner per slot")
        rows = self.db_execute("SELECT scheduled_for, COUNT(*) FROM lilota_task GROUP BY scheduled_for")
        self.assertEqual(len(rows), 50)
        self.assertEqual({count for _, count in rows}, {1})


def _enqueue_slots(db_url):
    """One thread of the slot race: try to enqueue slots 1..50 of "tick"; the slots it won."""
    storage = LilotaScheduler(db_url).storage
    periodic = lilota._Periodic("tick", "tick", every=1)
    start = utc(2026, 1, 1).timestamp()
    won = []
    for i in range(50):
        slot = start + 1 + i
        batch = lilota._TaskBatch("tick", unique_for=slot, scheduled_for=slot)
        if storage.enqueue_periodic("tick", slot, slot + 1, batch, uuid.uuid4(), "null", periodic.unique_key(slot),
                                    slot) is not None:
            won.append(i)
    return won


@support.on_every_backend
class PeriodicAcrossNodesTests(support.TempDirTestCase):
    """The issue's proof: three nodes (two applications, one standalone worker) with an every=1s
    schedule for about 10 s, one of them killed in the middle: each slot has exactly one task."""

    SCRIPT = """
        from lilota import TaskContext
        worker.periodic("tick", every=1)

        @worker.register("tick")
        def tick(data, ctx: TaskContext):
            return {"slot": ctx.scheduled_for.isoformat(), "pid": os.getpid()}
        """

    def slot_counts(self):
        try:
            rows = self.db_execute("SELECT scheduled_for, COUNT(*) FROM lilota_task WHERE name = 'tick' "
                                   "GROUP BY scheduled_for")
        except Exception:
            return {}
        return {str(slot): count for slot, count in rows}

    def test_exactly_one_task_per_slot(self):
        script = self.worker_script(self.SCRIPT)
        self.start_lilota(script, number_of_workers=1)
        self.start_lilota(script, number_of_workers=1)
        standalone = self.popen_python(script)
        self.wait_workers_running(3)
        wait_until(lambda: len(self.slot_counts()) >= 4, 30, message="4 slots")
        standalone.send_signal(signal.SIGKILL)
        standalone.wait(10)
        seen = len(self.slot_counts())
        wait_until(lambda: len(self.slot_counts()) >= seen + 6, 30, message="6 more slots")
        counts = self.slot_counts()
        self.assertEqual(set(counts.values()), {1}, f"one task per slot: {counts}")
        tasks = [t for t in LilotaScheduler(self.db_url).list_tasks(name="tick", limit=None)]
        moments = sorted(t.scheduled_for for t in tasks)
        gaps = [b - a for a, b in zip(moments, moments[1:])]
        self.assertEqual(set(gaps), {timedelta(seconds=1)}, "and no slot without one")
        self.assertTrue(all(m.microsecond == 0 for m in moments))
        done = [t for t in tasks if t.status is TaskStatus.COMPLETED]
        self.assertTrue(done)
        self.assertTrue(all(t.output["slot"] == t.scheduled_for.isoformat() for t in done))


if __name__ == "__main__":
    unittest.main()
