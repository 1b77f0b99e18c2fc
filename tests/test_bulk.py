"""The bulk path (issue 16): what schedule_many() makes for many inputs at once -- task ids, their
texts, the inputs' JSON -- equals what it makes for one."""

import unittest
import uuid

import support  # noqa: F401  (lilota on the path)

import lilota


class ManyAtOnceTests(unittest.TestCase):

    def test_ids_and_their_texts(self):
        for count in (1, 9, 10, 2500):
            with self.subTest(count=count):
                ints = lilota._new_task_id_ints(count)
                self.assertEqual(ints, sorted(set(ints)), "increasing")
                made = lilota._uuids(ints)
                built = [uuid.UUID(int=value) for value in ints]
                self.assertEqual(made, built)
                self.assertEqual([(u.version, u.variant, u.is_safe) for u in made],
                                 [(u.version, u.variant, u.is_safe) for u in built])
                self.assertEqual(lilota._uuid_texts(ints), [str(u) for u in built])
        self.assertTrue(lilota._DIRECT_UUIDS, "this Python's UUIDs are made without their constructor")

    def test_json_of_many(self):
        plain = [{"i": i, "s": "\u00e9", "l": [1.5, None, True]} for i in range(50)]
        self.assertEqual(lilota._dumps_many(plain), [lilota.dumps(value) for value in plain])
        careful = plain + [(1, 2), uuid.UUID(int=5), {"deep": [[[[]]]]}]
        self.assertEqual(lilota._dumps_many(careful), [lilota.dumps(value) for value in careful])
        for bad, error in (([1, float("nan")], ValueError), ([1, {"k": {1}}], TypeError),
                           ([1, {2: "x"}], TypeError), ([1, "\ud800"], ValueError), ([1, 10 ** 5000], ValueError)):
            with self.subTest(error=error.__name__, kind=type(bad[1]).__name__):
                with self.assertRaises(lilota.UnserializableError) as caught:
                    lilota._dumps_many(bad)
                self.assertIsInstance(caught.exception, error)


if __name__ == "__main__":
    unittest.main()
