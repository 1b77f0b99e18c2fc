"""Bad input: the edge cases the fuzz loop found, then the fuzz loop itself.

The loop draws seeded random schedule() inputs (nested, huge, every kind of text, NaN and Infinity,
cycles, models whose as_dict() fails), options, task names and task ids. Every case either
round-trips exactly (what get_task_by_id() returns, and what a worker receives and returns, is the
value's documented JSON form, bit for bit) or is refused with a clear TypeError or ValueError that
says what was wrong, writing nothing. At the end the database holds exactly the accepted tasks and
passes PRAGMA integrity_check. The seed is fixed (LILOTA_FUZZ_SEED and LILOTA_FUZZ_CASES explore
further); a failure names the seed and the case."""

import dataclasses
import enum
import math
import os
import random
import sqlite3
import sys
import unittest
import uuid
from datetime import date, datetime, time as dtime, timedelta, timezone
from decimal import Decimal

import support

import lilota
from lilota import LilotaScheduler, LilotaWorker, TaskStatus, UnserializableError

SEED = int(os.environ.get("LILOTA_FUZZ_SEED", "61"))
CASES = int(os.environ.get("LILOTA_FUZZ_CASES", "2500"))

BAD = object()   # the expected stored form of a value that schedule() must refuse


@dataclasses.dataclass
class Inner:
    label: str
    items: list


class Color(enum.Enum):
    RED = "red"
    ONE = 1


class FailingModel:
    def as_dict(self):
        raise RuntimeError("as_dict exploded")


class SelfModel:
    def as_dict(self):
        return self          # a cycle through a model


class SetModel:
    def as_dict(self):
        return {"s": {1, 2}}


class GoodModel:
    def __init__(self, payload):
        self.payload = payload

    def as_dict(self):
        return {"payload": self.payload}


# --- generators: (value, expected stored form or BAD) ---------------------------------------------

SPECIAL_TEXT = [
    "", " ", "\x00", "a\x00b", "\n\r\t", "\u2028\u2029", "\ufeff", "\ud800", "\udfff", "x\udc80y",
    "\ud83d\ude00", "😀", "é", "\u202etxet", "'; DROP TABLE lilota_task; --", "\" OR 1=1 --", "%s %d ?",
    ":name $1 @p", "\\", "\"", "/*", "*/", "NULL", "null", "{}", "[]", "\x7f", "\x1b[31m",
]


def text(rng, long=False):
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(SPECIAL_TEXT)
    size = rng.randint(10_000, 60_000) if long else rng.randint(0, 12)
    if kind < 0.55:
        return "".join(chr(rng.randint(32, 126)) for _ in range(size))
    # Any code point, lone surrogates included (JSON escapes them, so they survive).
    return "".join(chr(rng.choice((rng.randint(0, 0x7ff), rng.randint(0, 0xffff), rng.randint(0, 0x10ffff))))
                   for _ in range(size))


def unicode_or_bad(s):
    """A string is stored as it is when it is Unicode text; one holding surrogate code points is not
    (JSON would merge a pair of them into one character, and databases refuse a lone one)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return BAD
    return s


def scalar(rng):
    kind = rng.randrange(9)
    if kind == 0:
        return (None, None) if rng.random() < 0.5 else ((v := rng.random() < 0.5), v)
    if kind == 1:
        v = rng.choice([0, 1, -1, 2**31, -2**31 - 1, 2**63 - 1, -2**63, 2**64, 2**200, -(10**100)])
        v = v if rng.random() < 0.5 else rng.randint(-10**6, 10**6)
        return v, v
    if kind == 2:
        v = rng.choice([0.0, -0.0, 1e308, -1e308, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
                        0.1, 1 / 3, rng.uniform(-1e6, 1e6), rng.random() * 10 ** rng.randint(-300, 300)])
        return v, v
    if kind in (3, 4, 5):
        v = text(rng)
        return v, unicode_or_bad(v)
    if kind == 6:   # rich values, stored in their documented text forms
        v = rng.choice([
            datetime(2024, 5, 31, 12, 30, tzinfo=timezone.utc), datetime(1, 1, 1), date(9999, 12, 31),
            dtime(23, 59, 59, 999999), uuid.UUID(int=rng.getrandbits(128)), Decimal("19.99"),
            Decimal("-0.000000000000000000000001"), Decimal("1E+400"), timedelta(days=-1, microseconds=3),
            Color.RED, Color.ONE])
        if isinstance(v, (datetime, date, dtime)):
            return v, v.isoformat()
        if isinstance(v, uuid.UUID):
            return v, str(v)
        if isinstance(v, Decimal):
            return v, str(v)
        if isinstance(v, timedelta):
            return v, v.total_seconds()
        return v, v.value
    if kind == 7:   # subclasses of str and int are stored as plain values
        v = rng.choice([type("S", (str,), {})("sub"), type("I", (int,), {})(7)])
        return v, (str.__str__(v) if isinstance(v, str) else int(v))
    return bad(rng), BAD


def bad(rng):
    cyclic = [1]
    cyclic.append(cyclic)
    looped = {"a": {}}
    looped["a"]["b"] = looped
    too_deep = 1
    for _ in range(rng.randint(260, 5000)):
        too_deep = [too_deep] if rng.random() < 0.5 else {"k": too_deep}
    return rng.choice([
        float("nan"), float("inf"), float("-inf"), b"bytes", bytearray(b"x"), {1, 2}, frozenset(), 1j,
        object(), FailingModel(), SelfModel(), SetModel(), {1: "int key"}, {None: 1}, {("t",): 1},
        cyclic, looped, too_deep, 10 ** 5000, len, int, range(3), (x for x in ()), Decimal,
    ])


def value(rng, depth=0):
    roll = rng.random()
    if depth >= 5 or roll < 0.5:
        return scalar(rng)
    if roll < 0.65:
        parts = [value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
        as_tuple = rng.random() < 0.2
        v = tuple(p[0] for p in parts) if as_tuple else [p[0] for p in parts]
        return v, BAD if any(p[1] is BAD for p in parts) else [p[1] for p in parts]
    if roll < 0.85:
        keys = [text(rng) for _ in range(rng.randint(0, 5))]
        parts = {k: value(rng, depth + 1) for k in keys}
        broken = any(p[1] is BAD or unicode_or_bad(k) is BAD for k, p in parts.items())
        return {k: p[0] for k, p in parts.items()}, BAD if broken else {k: p[1] for k, p in parts.items()}
    if roll < 0.92:
        items = [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        label = text(rng)
        v = Inner(label=label, items=[p[0] for p in items])
        broken = unicode_or_bad(label) is BAD or any(p[1] is BAD for p in items)
        return v, BAD if broken else {"label": label, "items": [p[1] for p in items]}
    inner = value(rng, depth + 1)
    return GoodModel(inner[0]), BAD if inner[1] is BAD else {"payload": inner[1]}


def top_value(rng):
    roll = rng.random()
    if roll < 0.01:   # a few huge strings
        v = text(rng, long=True) * rng.randint(1, 30)
        return v, unicode_or_bad(v)
    if roll < 0.04:   # nesting up to the documented limit is accepted at any call depth
        depth = rng.randint(1, lilota._MAX_NESTING)
        v = e = "leaf"
        for _ in range(depth):
            v, e = ([v], [e]) if rng.random() < 0.5 else ({"k": v}, {"k": e})
        return v, e
    return value(rng)


def same(a, b):
    """Exact equality of JSON values: the same types, the same float bits, the same key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def task_name(rng):
    """(name, True if valid)."""
    roll = rng.random()
    if roll < 0.4:
        name = text(rng)[:lilota._MAX_NAME_LENGTH] or "x"
        name = name.strip() or "x"
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return name, False
        return name, True
    if roll < 0.55:
        return rng.choice(["a" * lilota._MAX_NAME_LENGTH, "é" * lilota._MAX_NAME_LENGTH, "'; DROP TABLE lilota_task; --",
                           "x' OR '1'='1", "lilota_task", "échec/🙂", "a\x00b", "%(name)s", "?", "name\nwith newline"]), True
    return rng.choice(["", " ", " lead", "trail ", "\t", "a" * (lilota._MAX_NAME_LENGTH + 1), "\udc80",
                       "x\ud800", None, 1, b"bytes", ["x"], 1.5]), False


def task_id_candidates(rng, known):
    """(value, expected): expected a UUID (found), None (valid but unknown) or an exception class."""
    real = rng.choice(known) if known else uuid.uuid4()
    return rng.choice([
        (real, real), (str(real), real), (str(real).upper(), real), ("{%s}" % real, real), (real.hex, real),
        ("urn:uuid:%s" % real, real), (uuid.uuid4(), None), (str(uuid.uuid4()), None),
        ("", ValueError), ("x", ValueError), (" %s " % real, ValueError), (str(real) + "\x00", ValueError),
        ("'; DROP TABLE lilota_task; --", ValueError), (str(real)[:-1], ValueError), ("\udc80" * 36, ValueError),
        ("%s%s" % (real, real), ValueError), ("0" * 10_000, ValueError),
        (None, TypeError), (12, TypeError), (real.bytes, TypeError), (real.int, TypeError), ([str(real)], TypeError),
        (3.5, TypeError),
    ])


def options(rng):
    """(schedule() keyword arguments, True if valid)."""
    opts, ok = {}, True
    roll = rng.random()
    if roll < 0.8:
        return opts, ok
    choice = rng.randrange(5)
    if choice == 0:
        opts["priority"] = rng.choice([0, 5, -5, 2**31 - 1, -2**31])
    elif choice == 1:
        opts["priority"], ok = rng.choice([2**31, "1", 1.0, True, None]), False
    elif choice == 2:
        opts["delay"] = rng.choice([0, 0.0, timedelta(days=1), 86400 * 3650])
    elif choice == 3:
        opts["delay"], ok = rng.choice([-1, float("nan"), float("inf"), "5", timedelta(days=-1), 1e13,
                                        timedelta.max]), False
    else:
        opts["run_at"], ok = rng.choice([
            (datetime(2000, 1, 1, tzinfo=timezone.utc), True), (datetime(9999, 12, 31, tzinfo=timezone.utc), True),
            (datetime(1, 1, 2, tzinfo=timezone.utc), True), (datetime.max.replace(tzinfo=timezone.utc), False),
            (datetime(2000, 1, 1), False), ("2000-01-01T00:00:00+00:00", False)])
    return opts, ok


class EdgeCaseTest(support.TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.scheduler = LilotaScheduler(self.db_url)
        self.worker = LilotaWorker(self.db_url)

        @self.worker.register("echo")
        def echo(data):
            return data

        @self.worker.register("emit")
        def emit(data):
            return {"text": data["text"] + "\udc80"}

    def count_rows(self):
        try:
            return self.db_execute("SELECT COUNT(*) FROM lilota_task")[0][0]
        except sqlite3.OperationalError:   # no table: nothing was ever stored
            return 0

    def test_strings_with_surrogate_code_points_are_refused(self):
        """A surrogate pair written as two code points came back as one character (JSON decodes the
        escaped pair as U+1F600): the input a task received was not the one scheduled."""
        for value in ("\ud83d\ude00", "a\udc80b", "\ud800", {"k\udfff": 1}, ["fine", "x\ud800"],
                      Inner(label="\udc80", items=[]), {"deep": [{"x": "\ud83d\ude00"}]}):
            with self.subTest(value=repr(value)):
                with self.assertRaises(UnserializableError) as cm:
                    self.scheduler.schedule("echo", value)
                self.assertIn("surrogate", str(cm.exception))
                self.assertIn("input", str(cm.exception))
        self.assertEqual(self.count_rows(), 0)
        # The same character as the one code point it is round-trips, also as a key.
        task_id = self.scheduler.schedule("echo", {"😀": "😀 é \x00 \u2028"})
        [task] = self.worker.run_pending()
        self.assertEqual(task.output, {"😀": "😀 é \x00 \u2028"})
        self.assertEqual(self.scheduler.get_task_by_id(task_id).input, {"😀": "😀 é \x00 \u2028"})
        # An output holding one fails its task, as any output that cannot be stored does.
        self.scheduler.schedule("emit", {"text": "ok"})
        [task] = self.worker.run_pending()
        self.assertEqual(task.status, TaskStatus.FAILED)
        self.assertEqual(task.error["type"], "UnserializableError")
        self.assertIn("surrogate", task.error["message"])

    def test_nesting_limit_is_fixed_whatever_the_callers_stack(self):
        """Whether a deep value could be stored depended on how deep the caller's stack was (at most
        about 500 levels from the top, fewer from deeper down), and a value stored from a shallow
        stack could be too deep for the worker to read back."""
        def nest(levels):
            value = "leaf"
            for i in range(levels):
                value = [value] if i % 2 else {"k": value}
            return value

        def deeper(frames, call):
            return call() if frames == 0 else deeper(frames - 1, call)

        limit = 200
        for levels in (limit + 1, 480):
            with self.subTest(levels=levels):
                with self.assertRaisesRegex(UnserializableError, f"nested too deeply.*{limit}"):
                    self.scheduler.schedule("echo", nest(levels))
        self.assertEqual(self.count_rows(), 0)
        # The limit itself is accepted from a deep stack too, and a worker reads it back.
        value = nest(limit)
        shallow = self.scheduler.schedule("echo", value)
        deep = deeper(300, lambda: self.scheduler.schedule("echo", value))
        done = deeper(300, self.worker.run_pending)
        self.assertEqual({t.id for t in done}, {shallow, deep})
        for task in done:
            self.assertEqual(task.status, TaskStatus.COMPLETED, task.error)
            self.assertEqual(task.output, value)

    @unittest.skipUnless(hasattr(sys, "get_int_max_str_digits"), "this Python converts ints of any length")
    def test_int_too_long_for_text_is_an_unserializable_error(self):
        """json.dumps raised a bare ValueError for an int of more digits than Python converts to text,
        where every other value that cannot be stored raises UnserializableError."""
        too_long = 10 ** (sys.get_int_max_str_digits() + 1)
        for value in (too_long, {"n": [too_long]}):
            with self.assertRaises(UnserializableError) as cm:
                self.scheduler.schedule("echo", value)
            self.assertIn("input", str(cm.exception))
            self.assertIn("digits", str(cm.exception))
        self.assertEqual(self.count_rows(), 0)
        self.scheduler.schedule("echo", 10 ** 300)
        [task] = self.worker.run_pending()
        self.assertEqual(task.output, 10 ** 300)



class FuzzTest(support.TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.rng = random.Random(SEED)
        self.scheduler = LilotaScheduler(self.db_url)
        self.worker = LilotaWorker(self.db_url)

        @self.worker.register("echo", max_attempts=1)
        def echo(data):
            return data

    def check_clear(self, exc, case):
        self.assertIsInstance(exc, (TypeError, ValueError), case)
        self.assertGreater(len(str(exc)), 10, f"{case}: the message must say what was wrong: {exc!r}")

    def test_schedule_inputs_names_options_and_ids(self):
        rng = self.rng
        accepted = {}            # task id -> (expected input, name)
        counts = {"accepted": 0, "refused": 0, "names refused": 0, "ids": 0}
        for case in range(CASES):
            where = f"seed {SEED}, case {case}"
            name, name_ok = task_name(rng) if rng.random() < 0.15 else ("echo", True)
            opts, opts_ok = options(rng)
            many = rng.random() < 0.1
            values = [top_value(rng) for _ in range(rng.randint(1, 4) if many else 1)]
            expected_ok = name_ok and opts_ok and all(e is not BAD for _, e in values)
            before = len(accepted)
            try:
                if many:
                    ids = self.scheduler.schedule_many(name, [v for v, _ in values], **opts)
                else:
                    ids = [self.scheduler.schedule(name, values[0][0], **opts)]
            except (TypeError, ValueError) as exc:
                self.assertFalse(expected_ok, f"{where}: refused a good case: {exc!r}")
                self.check_clear(exc, where)
                counts["refused"] += 1
                counts["names refused"] += not name_ok
                continue
            except Exception as exc:  # anything else is a bug: report the case
                self.fail(f"{where}: {type(exc).__name__} instead of TypeError/ValueError: {exc!r}")
            self.assertTrue(expected_ok, f"{where}: accepted a bad case: name={name!r} opts={opts!r}")
            self.assertEqual(len(ids), len(values))
            for task_id, (_, expected) in zip(ids, values):
                task = self.scheduler.get_task_by_id(task_id)
                self.assertIsNotNone(task, where)
                self.assertEqual(task.name, name, where)
                self.assertTrue(same(task.input, expected), f"{where}: stored {task.input!r:.200}, "
                                                            f"expected {expected!r:.200}")
                accepted[task_id] = (expected, name)
            self.assertEqual(len(accepted), before + len(ids))
            counts["accepted"] += len(ids)

            # Ids in every form: found, absent, or a clear TypeError/ValueError; never anything else.
            for _ in range(2):
                candidate, expected = task_id_candidates(rng, list(accepted)[-50:])
                counts["ids"] += 1
                if isinstance(expected, type):
                    with self.assertRaises(expected, msg=f"{where}: id {candidate!r:.80}") as cm:
                        self.scheduler.get_task_by_id(candidate)
                    self.check_clear(cm.exception, where)
                else:
                    task = self.scheduler.get_task_by_id(candidate)
                    self.assertEqual(None if task is None else task.id, expected, f"{where}: id {candidate!r}")

        self.assertGreater(counts["accepted"], CASES // 3, counts)
        self.assertGreater(counts["refused"], CASES // 20, counts)

        # The database holds exactly the accepted tasks, and is sound.
        self.assertEqual(self.db_execute("SELECT COUNT(*) FROM lilota_task"), [(len(accepted),)])
        self.assertEqual(self.db_execute("PRAGMA integrity_check"), [("ok",)])

        # A worker receives every accepted input exactly as stored and returns it unchanged. (Tasks
        # with other names fail as unknown, with a clear error and no harm to the worker.)
        now = datetime.now(timezone.utc)
        due = {i for i in accepted if self.scheduler.get_task_by_id(i).run_at <= now}
        done = {task.id: task for task in self.worker.run_pending()}
        self.assertEqual(set(done), due)
        for task_id in due:
            expected, name = accepted[task_id]
            task = done[task_id]
            if name == "echo":
                self.assertEqual(task.status, TaskStatus.COMPLETED, (task_id, task.error))
                self.assertTrue(same(task.output, expected), f"task {task_id}: output {task.output!r:.200}")
            else:
                self.assertEqual(task.status, TaskStatus.FAILED)
                self.assertEqual(task.error["type"], "UnknownTaskError")
        self.assertEqual(self.db_execute("PRAGMA integrity_check"), [("ok",)])



if __name__ == "__main__":
    unittest.main()
