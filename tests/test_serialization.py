"""Serialization round trips: schedule() -> run_pending() -> task function -> output.

Everything runs in this process (LilotaWorker.run_pending), no worker processes."""

import dataclasses
import enum
import os
import unittest
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Dict, List, Optional

import support
from support import AddInput, AddOutput

import lilota
from lilota import LilotaScheduler, LilotaWorker, TaskContext, TaskStatus


# --- models (module level, so that their annotations resolve) ------------------------------------

class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Mode(str, enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class ModeCounts:
    counts: Dict[Mode, int]
    default: Mode = Mode.FAST


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Address:
    street: str
    zip_code: Optional[str] = None


@dataclass
class Person:
    name: str
    address: Address
    tags: List[str]
    scores: Dict[str, int]
    nickname: Optional[str] = None
    friends: List[Address] = field(default_factory=list)
    backup: Optional[Address] = None
    by_name: Dict[str, Address] = field(default_factory=dict)


@dataclass
class Rich:
    when: datetime
    day: date
    ident: uuid.UUID
    amount: Decimal
    color: Color
    level: Level
    maybe_when: Optional[datetime] = None
    days: List[date] = field(default_factory=list)
    colors: Dict[str, Color] = field(default_factory=dict)


class Point:
    """A ModelProtocol object: only as_dict(), rebuilt with Point(**dict)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def as_dict(self):
        return {"x": self.x, "y": self.y}

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


class BrokenModel:
    def as_dict(self):
        raise RuntimeError("as_dict exploded")


class Opaque:
    pass


def _pydantic():
    """The pydantic module, or skip (fail loudly under CI=true, where it must be installed)."""
    try:
        import pydantic
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            raise AssertionError("pydantic is not installed but CI=true: the CI job must install it "
                                 "(pip install 'pydantic>=2') so that the pydantic round trips are tested")
        raise unittest.SkipTest("pydantic is not installed (pip install 'pydantic>=2'); "
                                "pydantic round-trip tests skipped")
    return pydantic


def _pydantic_v1_base():
    pydantic = _pydantic()
    try:
        from pydantic.v1 import BaseModel
    except ImportError:
        if pydantic.VERSION.startswith("1."):
            return pydantic.BaseModel
        raise
    return BaseModel


class SerializationTestCase(support.TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.scheduler = LilotaScheduler(self.db_url)
        self.scheduler.storage.ensure_ready()
        self.worker = LilotaWorker(self.db_url)
        self.received = []

    def count_rows(self):
        return self.db_execute("SELECT COUNT(*) FROM lilota_task")[0][0]

    def run_one(self, name, value, **options):
        """Schedule one task, run it in-process and return the stored Task."""
        task_id = self.scheduler.schedule(name, value, **options)
        done = self.worker.run_pending()
        self.assertEqual([t.id for t in done], [task_id])
        task = self.scheduler.get_task_by_id(task_id)
        self.assertEqual(task.status, TaskStatus.COMPLETED, task.error)
        return task

    def echo(self, name="echo", **models):
        """Register a task that records its input and returns it."""
        @self.worker.register(name, **models)
        def echo(data):
            self.received.append(data)
            return data
        return echo


@support.on_every_backend
class DataclassTests(SerializationTestCase):
    def test_nested_dataclass_round_trip(self):
        self.echo(input_model=Person, output_model=Person)
        person = Person(name="Ada", address=Address("Main St 1", "12345"), tags=["a", "b"],
                        scores={"x": 1, "y": 2}, nickname=None,
                        friends=[Address("Side St 2"), Address("Back St 3", "999")],
                        backup=Address("Spare 4"), by_name={"home": Address("Home 5", "1")})
        task = self.run_one("echo", person)
        [got] = self.received
        self.assertIsInstance(got, Person)
        self.assertEqual(got, person)
        self.assertIsInstance(got.address, Address)
        self.assertTrue(all(isinstance(f, Address) for f in got.friends))
        self.assertIsInstance(got.backup, Address)
        self.assertIsInstance(got.by_name["home"], Address)
        # Stored as plain dicts, and rebuildable from them.
        self.assertIsInstance(task.input, dict)
        self.assertIsInstance(task.output, dict)
        self.assertEqual(task.output, dataclasses.asdict(person))
        self.assertEqual(task.output["address"], {"street": "Main St 1", "zip_code": "12345"})

    def test_optional_nested_none(self):
        self.echo(input_model=Person)
        person = Person(name="Bob", address=Address("x"), tags=[], scores={})
        self.run_one("echo", person)
        [got] = self.received
        self.assertIsNone(got.backup)
        self.assertIsNone(got.nickname)
        self.assertEqual(got.friends, [])

    def test_rich_types_revived(self):
        self.echo(input_model=Rich)
        aware = datetime(2024, 2, 29, 13, 14, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
        rich = Rich(when=aware, day=date(2023, 12, 31), ident=uuid.uuid4(), amount=Decimal("1.10"),
                    color=Color.BLUE, level=Level.HIGH,
                    maybe_when=datetime(2020, 1, 1, tzinfo=timezone.utc),
                    days=[date(2000, 1, 1), date(2001, 2, 3)], colors={"a": Color.RED})
        task = self.run_one("echo", rich)
        [got] = self.received
        self.assertIsInstance(got.when, datetime)
        self.assertEqual(got.when, aware)
        self.assertIsNotNone(got.when.tzinfo)
        self.assertEqual(got.when.utcoffset(), timedelta(hours=2))
        self.assertEqual(type(got.day), date)
        self.assertEqual(got.day, rich.day)
        self.assertIsInstance(got.ident, uuid.UUID)
        self.assertEqual(got.ident, rich.ident)
        self.assertIsInstance(got.amount, Decimal)
        self.assertEqual(str(got.amount), "1.10")  # precision kept
        self.assertIs(got.color, Color.BLUE)
        self.assertIs(got.level, Level.HIGH)
        self.assertEqual(got.maybe_when, rich.maybe_when)
        self.assertEqual(got.days, rich.days)
        self.assertIs(got.colors["a"], Color.RED)
        # The documented stored forms.
        self.assertEqual(task.input["when"], aware.isoformat())
        self.assertEqual(task.input["day"], "2023-12-31")
        self.assertEqual(task.input["ident"], str(rich.ident))
        self.assertEqual(task.input["amount"], "1.10")
        self.assertEqual(task.input["color"], "blue")
        self.assertEqual(task.input["level"], 2)
        self.assertEqual(task.output["amount"], "1.10")

    def test_str_enum_dict_keys(self):
        """A dict keyed by a str-valued Enum: the keys are stored as the Enum's values, like Enum
        values everywhere else, and revived to the Enum from the model's Dict[Mode, int]."""
        self.echo(input_model=ModeCounts)
        value = ModeCounts(counts={Mode.FAST: 1, Mode.SLOW: 2}, default=Mode.SLOW)
        task = self.run_one("echo", value)
        self.assertEqual(task.input, {"counts": {"fast": 1, "slow": 2}, "default": "slow"})
        [got] = self.received
        self.assertIs(got.default, Mode.SLOW)
        self.assertEqual(got.counts, {Mode.FAST: 1, Mode.SLOW: 2})
        self.assertEqual({type(k) for k in got.counts}, {Mode})

    def test_output_stored_as_dict(self):
        @self.worker.register("add", input_model=AddInput, output_model=AddOutput)
        def add(data: AddInput) -> AddOutput:
            return AddOutput(total=data.a + data.b)

        task = self.run_one("add", AddInput(a=2, b=3))
        self.assertEqual(task.output, {"total": 5})
        self.assertEqual(AddOutput(**task.output), AddOutput(total=5))

    def test_dict_input_for_dataclass_model(self):
        self.echo(input_model=AddInput)
        self.run_one("echo", {"a": 1, "b": 2})
        self.assertEqual(self.received, [AddInput(1, 2)])


@support.on_every_backend
class PlainValueTests(SerializationTestCase):
    def test_dict_without_model(self):
        self.echo()
        value = {"a": 1, "b": [1, 2, {"c": None}], "d": {"e": True}, "f": 1.5}
        task = self.run_one("echo", value)
        self.assertEqual(self.received, [value])
        self.assertEqual(task.output, value)

    def test_plain_values(self):
        self.echo()
        for value in (5, -3, "text", "ünïcödé ✓", 1.25, True, False, None, [1, "a", None], [], {}):
            with self.subTest(value=value):
                self.received.clear()
                task = self.run_one("echo", value)
                self.assertEqual(self.received, [value])
                self.assertEqual(task.input, value)
                self.assertEqual(task.output, value)
                self.assertIs(type(task.output), type(value))

    def test_tuple_becomes_list(self):
        self.echo()
        task = self.run_one("echo", (1, 2, (3, 4)))
        self.assertEqual(task.output, [1, 2, [3, 4]])

    def test_rich_values_without_model_are_stored_in_text_form(self):
        self.echo()
        ident = uuid.uuid4()
        task = self.run_one("echo", {"id": ident, "amount": Decimal("2.50"), "color": Color.RED,
                                     "day": date(2024, 1, 2)})
        self.assertEqual(task.output, {"id": str(ident), "amount": "2.50", "color": "red", "day": "2024-01-02"})

    def test_as_dict_model(self):
        self.echo(input_model=Point, output_model=Point)
        task = self.run_one("echo", Point(1, 2))
        [got] = self.received
        self.assertIsInstance(got, Point)
        self.assertEqual(got, Point(1, 2))
        self.assertIsInstance(lilota.ModelProtocol, type)
        self.assertIsInstance(Point(1, 2), lilota.ModelProtocol)
        self.assertEqual(task.input, {"x": 1, "y": 2})
        self.assertEqual(task.output, {"x": 1, "y": 2})
        self.assertEqual(Point(**task.output), Point(1, 2))

    def test_as_dict_output_without_model(self):
        @self.worker.register("point")
        def make_point(data):
            return Point(data["x"], data["x"] * 2)

        task = self.run_one("point", {"x": 3})
        self.assertEqual(task.output, {"x": 3, "y": 6})


@support.on_every_backend
class PydanticTests(SerializationTestCase):
    def test_pydantic_v2_round_trip(self):
        pydantic = _pydantic()
        if not hasattr(pydantic.BaseModel, "model_validate"):
            self.skipTest(f"pydantic {pydantic.VERSION} is not v2")

        class Item(pydantic.BaseModel):
            sku: str
            qty: int = 1

        class Order(pydantic.BaseModel):
            id: uuid.UUID
            placed: datetime
            total: Decimal
            color: Color
            items: List[Item]
            note: Optional[str] = None

        class Receipt(pydantic.BaseModel):
            order_id: uuid.UUID
            count: int

        @self.worker.register("order", input_model=Order, output_model=Receipt)
        def handle(order: Order) -> Receipt:
            self.received.append(order)
            return Receipt(order_id=order.id, count=len(order.items))

        order = Order(id=uuid.uuid4(), placed=datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc),
                      total=Decimal("9.99"), color=Color.RED, items=[Item(sku="a"), Item(sku="b", qty=3)])
        task = self.run_one("order", order)
        [got] = self.received
        self.assertIsInstance(got, Order)
        self.assertEqual(got, order)
        self.assertIsInstance(got.items[1], Item)
        self.assertEqual(got.placed.tzinfo.utcoffset(got.placed), timedelta(0))
        self.assertIsInstance(task.output, dict)
        self.assertEqual(Receipt(**task.output), Receipt(order_id=order.id, count=2))
        self.assertEqual(task.output["order_id"], str(order.id))

    def test_pydantic_v1_round_trip(self):
        BaseModel = _pydantic_v1_base()

        class Item(BaseModel):
            sku: str
            qty: int = 1

        class Order(BaseModel):
            id: uuid.UUID
            placed: datetime
            day: date
            color: Color
            items: List[Item]
            note: Optional[str] = None

        class Receipt(BaseModel):
            count: int
            placed: datetime

        @self.worker.register("order1", input_model=Order, output_model=Receipt)
        def handle(order):
            self.received.append(order)
            return Receipt(count=len(order.items), placed=order.placed)

        placed = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
        order = Order(id=uuid.uuid4(), placed=placed, day=date(2024, 5, 6), color=Color.BLUE,
                      items=[Item(sku="a", qty=2)])
        task = self.run_one("order1", order)
        [got] = self.received
        self.assertIsInstance(got, Order)
        self.assertEqual(got, order)
        self.assertIsInstance(got.items[0], Item)
        self.assertIs(got.color, Color.BLUE)
        self.assertEqual(task.input["id"], str(order.id))
        self.assertEqual(task.input["placed"], placed.isoformat())
        self.assertEqual(task.output, {"count": 1, "placed": placed.isoformat()})
        self.assertEqual(Receipt(**task.output), Receipt(count=1, placed=placed))


@support.on_every_backend
class TaskDecoratorTests(SerializationTestCase):
    def test_models_and_context_inferred_from_annotations(self):
        contexts = []

        @self.worker.task
        def add(data: AddInput, ctx: TaskContext) -> AddOutput:
            self.received.append(data)
            contexts.append(ctx)
            return AddOutput(total=data.a + data.b)

        self.assertIn("add", self.worker.registered_names)
        task = self.run_one("add", AddInput(a=4, b=5))
        self.assertEqual(self.received, [AddInput(4, 5)])
        [ctx] = contexts
        self.assertIsInstance(ctx, TaskContext)
        self.assertEqual(ctx.task_id, task.id)
        self.assertEqual(ctx.name, "add")
        self.assertEqual(ctx.attempt, 1)
        self.assertIsInstance(ctx.progress, lilota.TaskProgress)
        self.assertEqual(AddOutput(**task.output), AddOutput(9))

    def test_named_task_and_rich_annotation(self):
        @self.worker.task(name="rich-echo")
        def echo(value: Rich):
            self.received.append(value)
            return {"ok": True}

        rich = Rich(when=datetime(2024, 1, 1, tzinfo=timezone.utc), day=date(2024, 1, 1), ident=uuid.uuid4(),
                    amount=Decimal("0.1"), color=Color.RED, level=Level.LOW)
        task = self.run_one("rich-echo", rich)
        self.assertEqual(self.received, [rich])
        self.assertEqual(task.output, {"ok": True})


@support.on_every_backend
class BadInputTests(SerializationTestCase):
    def assert_refused(self, exc_type, value, *fragments):
        for schedule in (lambda: self.scheduler.schedule("echo", value),
                         lambda: self.scheduler.schedule_many("echo", [{"ok": 1}, value])):
            with self.assertRaises(exc_type) as cm:
                schedule()
            for fragment in fragments:
                self.assertIn(fragment, str(cm.exception))
        self.assertEqual(self.count_rows(), 0, "a refused input must not write a row")

    def test_type_errors(self):
        cases = [
            ({1, 2}, "set"),
            (frozenset({1}), "frozenset"),
            (b"bytes", "bytes"),
            (bytearray(b"x"), "bytearray"),
            (Opaque(), "Opaque"),
            (object(), "object"),
            ({1: "a"}, "key"),
            ({("a", "b"): 1}, "key"),
            ({"nested": {"deeper": {2, 3}}}, "set"),
            ([1, 2, Opaque()], "Opaque"),
            (AddInput(a=1, b={1}), "set"),
            (BrokenModel(), "as_dict"),
            ({"m": BrokenModel()}, "as_dict"),
            (complex(1, 2), "complex"),
        ]
        for value, fragment in cases:
            with self.subTest(value=repr(value)):
                self.assert_refused(TypeError, value, fragment)

    def test_value_errors(self):
        cyclic_list = [1, 2]
        cyclic_list.append(cyclic_list)
        cyclic_dict = {"a": 1}
        cyclic_dict["self"] = cyclic_dict
        deep_cycle = {"inner": [{"x": None}]}
        deep_cycle["inner"][0]["x"] = deep_cycle
        cases = [
            (float("nan"), "NaN"),
            (float("inf"), "Infinity"),
            (float("-inf"), "Infinity"),
            ({"x": [1.0, float("nan")]}, "NaN"),
            (AddInput(a=float("inf"), b=1), "Infinity"),
            (cyclic_list, "cycle"),
            (cyclic_dict, "cycle"),
            (deep_cycle, "cycle"),
        ]
        for value, fragment in cases:
            with self.subTest(value=fragment):
                self.assert_refused(ValueError, value, fragment)

    def test_shared_but_acyclic_references_are_fine(self):
        shared = {"k": 1}
        self.echo()
        task = self.run_one("echo", {"a": shared, "b": shared, "c": [shared, shared]})
        self.assertEqual(task.output, {"a": {"k": 1}, "b": {"k": 1}, "c": [{"k": 1}, {"k": 1}]})


@support.on_every_backend
class BadOutputTests(SerializationTestCase):
    def test_unserializable_output_fails_the_task(self):
        @self.worker.register("bad")
        def bad(data):
            return data and {1, 2, 3}

        @self.worker.register("bad-bytes")
        def bad_bytes(data):
            return {"blob": b"\x00\x01"}

        for name in ("bad", "bad-bytes"):
            with self.subTest(name=name):
                task_id = self.scheduler.schedule(name, {"x": 1})
                [task] = self.worker.run_pending()
                self.assertEqual(task.id, task_id)
                self.assertEqual(task.status, TaskStatus.FAILED)
                self.assertIsNone(task.output)
                # UnserializableError: both a TypeError and a ValueError.
                self.assertEqual(task.error["type"], "UnserializableError")
                self.assertTrue(issubclass(lilota.UnserializableError, TypeError))
                self.assertIn("output", task.error["message"])
                self.assertIn("UnserializableError", task.error["traceback"])

    def test_nan_output_fails_the_task(self):
        @self.worker.register("nan")
        def nan(data):
            return {"value": float("nan")}

        self.scheduler.schedule("nan", None)
        [task] = self.worker.run_pending()
        self.assertEqual(task.status, TaskStatus.FAILED)
        self.assertEqual(task.error["type"], "UnserializableError")
        self.assertTrue(issubclass(lilota.UnserializableError, ValueError))
        self.assertIn("NaN", task.error["message"])


class UnserializableErrorTests(unittest.TestCase):
    def test_one_exception_for_everything_that_cannot_be_stored(self):
        """TypeError-kind and ValueError-kind refusals are one UnserializableError, catchable as both."""
        cyclic = []
        cyclic.append(cyclic)
        for value in ({1, 2}, b"x", object(), {1: "a"}, float("nan"), float("inf"), cyclic):
            with self.subTest(value=type(value).__name__):
                with self.assertRaises(lilota.UnserializableError) as cm:
                    lilota.dumps({"value": value})
                self.assertIsInstance(cm.exception, TypeError)
                self.assertIsInstance(cm.exception, ValueError)
                self.assertIn("input['value']", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
