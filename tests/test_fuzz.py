"""Bad input: the edge cases the fuzz loop found, then the fuzz loop itself.

Every schedule() either round-trips exactly (what get_task_by_id() returns, and what a worker
receives and returns, is the value's documented JSON form, bit for bit) or is refused with a clear
TypeError or ValueError that says what was wrong, writing nothing."""

import dataclasses
import sqlite3
import sys
import unittest

try:
    from tests import support
except ImportError:  # run from inside tests/
    import support

import lilota
from lilota import LilotaScheduler, LilotaWorker, TaskStatus, UnserializableError


@dataclasses.dataclass
class Inner:
    label: str
    items: list


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
        conn = sqlite3.connect(self.db_path)
        try:
            return conn.execute("SELECT COUNT(*) FROM lilota_task").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            conn.close()

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


if __name__ == "__main__":
    unittest.main()
