"""lilota: durable background tasks in one file.

lilota runs long-running work (reports, image processing, e-mails, heavy computations) in background
worker processes and keeps every task's state -- status, input, output, error, progress -- in a
database. There is no message broker and no server to run: this one module, the standard library
and SQLite -- or PostgreSQL through a driver you install, when an application outgrows one machine;
other databases plug in through a small dialect class (section 2).

The two sides meet only in the database:

* A *worker script* creates a :class:`LilotaWorker`, registers task functions on it and calls
  ``worker.start()``, which claims due tasks one at a time and executes them.
* The *application* creates a :class:`Lilota`, whose ``start()`` runs ``number_of_workers`` copies of
  the worker script in child processes and supervises them, and whose ``schedule()`` stores a task.

The file reads top to bottom; each section depends only on those above it:

1. Models and serialization  -- Task, Node, statuses, errors, the one JSON serializer
2. Storage and dialects       -- the SQL, a dialect per database, errors
3. Scheduling API             -- what every node shares; LilotaScheduler: schedule, wait, cancel ...
4. Worker                     -- the supervisor's protocol; LilotaWorker: registry, loop, keeper
5. Supervisor                 -- worker processes; Lilota: crash recovery, timeouts, stop
6. Dashboard                  -- ``serve_dashboard()``: web pages and a JSON API over the database
7. Command line               -- ``python -m lilota``

Where what is to come goes: queues in 2 (a column of the task row, a condition of the one claim)
and 3; dependencies in 2 (a ``waiting`` status a completion releases) and 3; async task functions
in 4 (stopped through the same keeper and ``_stopped_end``); periodic schedules are in 3 (the cron
parser and ``_PeriodicRunner``, a thread beside ``_Retention`` that each worker process with
schedules runs; the database lets one node through per slot); the
dashboard in a section of its own before the command line, its HTML, CSS and JavaScript one
compact block, as bottle's templates are.

Execution is at-least-once: without crashes every task runs exactly once; when a worker process
dies mid-task the task is retried (or failed, when its attempts are used up) with an error saying so.
"""

import atexit
import collections
import contextlib
import dataclasses
import datetime as _dt
import enum
import functools
import getpass
import importlib
import inspect
import io
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import runpy
import select
import signal
import socket
import sqlite3
import string
import struct
import sys
import threading
import time
import traceback
import types
import typing
import urllib.parse
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

__version__ = "0.1.0"

__all__ = [
    "Lilota", "LilotaScheduler", "LilotaWorker",
    "Task", "TaskStatus", "TaskProgress", "TaskContext", "ModelProtocol",
    "Node", "NodeStatus", "NodeType", "LilotaMode", "Queue", "Reason", "DEFAULT_QUEUE", "PeriodicSchedule",
    "Step", "TaskLog", "Attempt", "AttemptOutcome",
    "Dialect", "SQLiteDialect", "PostgreSQLDialect", "DBAPIConnection", "register_dialect",
    "LilotaError", "ConfigurationError", "DriverNotInstalledError", "StorageError",
    "DatabaseBusyError", "ReadOnlyDatabaseError", "DatabaseFullError", "CorruptDatabaseError",
    "DatabaseUnavailableError", "SchemaVersionError", "WorkerScriptError", "WorkersFailedError", "TaskNotFoundError", "UnserializableError",
    "TaskWaitTimeout", "TaskTimeoutError", "TaskCancelledError", "UnknownTaskError", "WorkerDiedError",
    "TaskInterruptedError", "DependencyFailedError", "Retry", "ON_FAILURE",
    "serve_dashboard", "DashboardServer", "DashboardError",
]

# The original lilota's import paths (``from lilota.core import Lilota`` ...) name submodules of a
# package. lilota is one module, so it registers itself under those names while it loads; the import
# system looks in sys.modules right after importing the parent and finds them there. ``import
# lilota.core`` then reads ``lilota.core`` as an attribute, which the module __getattr__ below
# answers (an attribute lookup only: inside this file the names stay free).
_SUBMODULE_ALIASES = ("core", "worker", "models", "scheduler")
if __name__ != "__main__":
    for _alias in _SUBMODULE_ALIASES:
        sys.modules.setdefault(__name__ + "." + _alias, sys.modules[__name__])
    del _alias


def __getattr__(name):
    if name in _SUBMODULE_ALIASES:
        return sys.modules[__name__]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# No NullHandler: in an application that configures no logging, Python's last-resort handler then
# prints lilota's warnings and errors (a worker script that cannot start, a database that went away)
# on stderr instead of swallowing them. Configured logging decides as usual.
logger = logging.getLogger("lilota")

DEFAULT_DB_URL = "sqlite:///lilota.db"


# ==================================================================================================
# 1. Models and serialization
# ==================================================================================================

# --- Errors ---------------------------------------------------------------------------------------

class LilotaError(Exception):
    """Base class of every error lilota raises."""


class ConfigurationError(LilotaError, ValueError):
    """An argument or URL that lilota cannot work with (the message says which and why)."""


class DriverNotInstalledError(LilotaError, ImportError):
    """The database driver a URL needs is not installed (the message names the package)."""


class UnserializableError(LilotaError, TypeError, ValueError):
    """A value cannot be stored as JSON (raised by ``schedule()`` before anything is written, and
    recorded as the error of a task whose output cannot be stored). Both a TypeError (for a type
    JSON lacks) and a ValueError (for NaN, infinity, cycles), so either ``except`` catches it."""


class WorkerScriptError(LilotaError, FileNotFoundError):
    """The worker script given to Lilota does not exist or is not a file."""


class WorkersFailedError(LilotaError):
    """Raised by ``Lilota.wait()`` once the application's workers failed for good (a broken worker
    script, a failed supervisor): no worker of this application will run the task. The message is
    ``Lilota.error``, e.g. the worker script's traceback."""


class TaskNotFoundError(LilotaError, LookupError):
    """No task with that id is stored."""


class TaskWaitTimeout(LilotaError, TimeoutError):
    """``wait()`` gave up before the task finished; the task itself goes on."""


class TaskTimeoutError(LilotaError, TimeoutError):
    """Recorded as a task's error when it ran past its timeout."""


class TaskCancelledError(LilotaError):
    """Recorded as a task's error when it was stopped by ``cancel()``."""


class UnknownTaskError(LilotaError, LookupError):
    """Recorded as a task's error when no worker registered its name."""


class WorkerDiedError(LilotaError):
    """Recorded as a task's error when the worker process running it died."""


class TaskInterruptedError(LilotaError):
    """Recorded as a task's error when its worker was stopped and the task was queued again."""


class DependencyFailedError(LilotaError):
    """Recorded as the error of a task that did not run because a task it depends on failed,
    expired or was cancelled for good: it ends ``cancelled`` (``on_failure="cancel"``) or
    ``failed`` (``on_failure="fail"``). The record's ``dependency`` is the id of that task."""


class StorageError(LilotaError):
    """The database refused or failed an operation."""


class DatabaseBusyError(StorageError):
    """The database stayed locked by other connections past the busy timeout."""


class ReadOnlyDatabaseError(StorageError):
    """The database (or its directory) cannot be written."""


class DatabaseFullError(StorageError):
    """The disk, or the database's size limit, is full."""


class CorruptDatabaseError(StorageError):
    """The file is not a database lilota can read."""


class DatabaseUnavailableError(StorageError):
    """The database cannot be opened or reached."""


class SchemaVersionError(StorageError):
    """The database was written by a newer lilota whose schema this version does not know."""


class Retry(Exception):
    """Raise it in a task function to run the task again later: ``raise lilota.Retry(delay=30)``.

    Not a failure: the task goes back to ``scheduled`` with ``run_at`` = now + ``delay`` (a
    timedelta or seconds, at least 0), or at ``at`` (an aware datetime; one in the past means at
    once). The attempt is given back -- ``attempts`` and ``max_attempts`` are as before the run --
    ``error`` keeps what an earlier failed attempt stored, and progress starts again from 0.
    ``retry_on``/``no_retry_on`` do not apply to it. A task that raises it every time runs every
    time it is asked to, like a poller, until it returns, fails or is cancelled."""

    def __init__(self, delay=None, *, at=None):
        if (delay is None) == (at is None):
            raise TypeError("Retry needs either delay= (a timedelta or seconds) or at= (an aware datetime)")
        if at is not None:
            if not isinstance(at, datetime):
                raise TypeError(f"Retry(at=...) must be a datetime, not {type(at).__name__}")
            if at.tzinfo is None or at.utcoffset() is None:
                raise ValueError("Retry(at=...) must be timezone-aware, e.g. datetime.now(timezone.utc) + timedelta(minutes=5)")
        self.delay = _seconds(delay, "Retry delay")
        self.at = at
        super().__init__(f"retry in {self.delay:g}s" if at is None else f"retry at {at.isoformat()}")

    def run_at(self, now):
        """When the task runs again (epoch seconds), given the current time."""
        return now + self.delay if self.at is None else max(now, self.at.timestamp())


# --- Statuses -------------------------------------------------------------------------------------

class _StrEnum(str, enum.Enum):
    def __str__(self):
        return self.value


class TaskStatus(_StrEnum):
    """Where a task is in its life. Values are the strings stored in ``lilota_task.status``."""

    CREATED = "created"      # reserved for rows written by other tools; lilota never writes it
    SCHEDULED = "scheduled"  # queued: runs once run_at has passed and a worker is free
    WAITING = "waiting"      # for its dependencies (depends_on); queued when the last one completes
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"      # ran past its timeout on its last attempt
    CANCELLED = "cancelled"

    @property
    def is_finished(self):
        """True for the final statuses: completed, failed, expired, cancelled."""
        return self in _FINISHED


_FINISHED = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.EXPIRED, TaskStatus.CANCELLED})


class NodeStatus(_StrEnum):
    """Life of a node (a worker process or a scheduling application) in ``lilota_node``."""

    IDLE = "idle"            # upstream lilota's; lilota never writes it, and counts it alive
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    DEAD = "dead"            # stopped sending heartbeats, or its process is gone


class NodeType(_StrEnum):
    """What a node is: a worker process, or an application that schedules (and supervises)."""

    SCHEDULER = "scheduler"
    WORKER = "worker"


class LilotaMode(_StrEnum):
    """What a :class:`Lilota` runs (``Lilota(..., mode=...)``, as in upstream lilota 1.x)."""

    ALL = "all"              # schedules, and runs worker processes when it has a script_path
    SCHEDULER = "scheduler"  # only schedules: no worker script, no worker processes
    WORKERS = "workers"      # only runs worker processes: schedule() raises RuntimeError


# --- Records --------------------------------------------------------------------------------------

#: The queue of a task scheduled without ``queue=``, and the one a worker serves without ``queues=``.
DEFAULT_QUEUE = "default"

#: What a task with dependencies does when one of them fails, expires or is cancelled for good:
#: it is cancelled (the default), failed with a DependencyFailedError, or run anyway.
ON_FAILURE = ("cancel", "fail", "run")


class _Unchanged:
    """The default of a setting that a call leaves as it is, where None means "none" (no limit)."""

    def __repr__(self):
        return "<unchanged>"


_UNCHANGED = _Unchanged()


class _Record:
    """A dataclass of lilota's records (Task, Step, ...) with ``as_dict()``."""

    def as_dict(self):
        """The record's fields as JSON-compatible values (ISO 8601 datetimes, string ids)."""
        return {f.name: _to_json(getattr(self, f.name), f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class Task(_Record):
    """A task as stored in ``lilota_task``. Datetimes are timezone-aware UTC.

    ``input`` and ``output`` are the stored JSON values (dicts for models), so
    ``AddOutput(**task.output)`` rebuilds an output model. ``error`` is None or a dict with at least
    ``type``, ``message`` and ``traceback``. ``max_attempts`` and ``timeout`` are None until a
    worker has applied its registered defaults (at the first claim) unless ``schedule()`` set them.
    """

    id: uuid.UUID
    name: str
    status: TaskStatus
    priority: int = 0
    pid: typing.Optional[int] = None
    run_at: typing.Optional[datetime] = None
    attempts: int = 0
    max_attempts: typing.Optional[int] = None
    timeout: typing.Optional[timedelta] = None
    expires_at: typing.Optional[datetime] = None
    progress_percentage: int = 0
    start_date_time: typing.Optional[datetime] = None
    end_date_time: typing.Optional[datetime] = None
    input: typing.Any = None
    output: typing.Any = None
    error: typing.Optional[dict] = None
    locked_by: typing.Optional[uuid.UUID] = None
    locked_at: typing.Optional[datetime] = None
    created_at: typing.Optional[datetime] = None
    cancel_requested: bool = False
    keep_input: typing.Optional[bool] = None   # the registered keep_input, known from the first claim
    queue: str = DEFAULT_QUEUE
    unique_key: typing.Optional[str] = None   # schedule(..., unique_key=): see LilotaScheduler.schedule
    scheduled_for: typing.Optional[datetime] = None   # a periodic task's slot (ctx.scheduled_for)
    depends_on: typing.Optional[typing.List[uuid.UUID]] = None   # the tasks it runs after (None: none)
    on_failure: typing.Optional[str] = None   # what it does when one of them fails: cancel, fail or run

    @property
    def is_finished(self):
        """True once the task is completed, failed, expired or cancelled for good."""
        return self.status in _FINISHED


@dataclasses.dataclass
class Node:
    """A process that takes part: a worker process, or an application that schedules/supervises."""

    id: uuid.UUID
    name: typing.Optional[str]
    type: NodeType
    status: NodeStatus
    pid: typing.Optional[int]
    hostname: typing.Optional[str]
    created_at: datetime
    last_seen_at: datetime
    lease_expires_at: datetime   # dead once this passes without a heartbeat
    queues: typing.Optional[typing.List[str]] = None   # a worker's queues, in the order it serves them
    reason: typing.Optional[str] = None   # why it stopped, when that is not plain (e.g. "recycled: ...")
    task_names: typing.Optional[typing.List[str]] = None   # a worker's registered task names


@dataclasses.dataclass
class Reason:
    """One answer of ``explain()``, why a task is (not) running: ``code``, a stable keyword to act
    on (see ``explain()``); ``message``, a sentence for people; ``details``, the values it was
    made of (JSON-compatible: ids and times as strings, durations in seconds)."""

    code: str
    message: str
    details: typing.Dict[str, typing.Any] = dataclasses.field(default_factory=dict)

    def __str__(self):
        return self.message

    def as_dict(self):
        return {"code": self.code, "message": self.message, "details": self.details}


@dataclasses.dataclass
class Queue:
    """A named queue as ``get_queues()`` reports it: what is set for it (``set_queue_limit()``,
    ``pause_queue()``) and ``counts``, its tasks by status (every status, 0 included).
    ``rate`` is (tasks, period as a timedelta) or None."""

    name: str
    paused: bool = False
    concurrency: typing.Optional[int] = None
    rate: typing.Optional[typing.Tuple[int, timedelta]] = None
    counts: typing.Dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self):
        """The queue as JSON-compatible values (the rate's period in seconds)."""
        rate = None if self.rate is None else {"tasks": self.rate[0], "per_seconds": self.rate[1].total_seconds()}
        return {"name": self.name, "paused": self.paused, "concurrency": self.concurrency, "rate": rate,
                "counts": dict(self.counts)}


@dataclasses.dataclass
class PeriodicSchedule(_Record):
    """A periodic schedule as running nodes recorded it in ``lilota_periodic`` (``get_periodic()``):
    the ``task`` it enqueues in ``queue``, ``schedule`` (the cron expression, or ``every 300s``) in
    ``timezone``, the next slot, the last slot enqueued and that task's id and status, and when a
    running node last showed it (``seen_at``)."""

    name: str
    task: str
    schedule: str
    timezone: str
    queue: str
    next_run_at: typing.Optional[datetime]
    last_slot: typing.Optional[datetime]
    last_task_id: typing.Optional[uuid.UUID]
    last_status: typing.Optional[TaskStatus]
    seen_at: datetime


@dataclasses.dataclass
class Step(_Record):
    """A step result stored by ``ctx.step()`` (``get_task_steps()``): its ``name`` (``render``, then
    ``render#2``, ... for a name called again), the ``attempt`` that ran it, when it started and
    ended, and ``output``, its stored JSON value."""

    name: str
    attempt: int
    started_at: datetime
    ended_at: datetime
    output: typing.Any = None


@dataclasses.dataclass
class TaskLog(_Record):
    """A log record stored with its task (``get_task_logs()``): ``seq`` numbers a task's records in
    order (``after=`` takes one), ``attempt`` is the attempt that logged it, ``level`` its level's
    name, ``logger`` the logger's name, ``message`` the formatted message and exception, if any."""

    seq: int
    attempt: int
    time: datetime
    level: str
    logger: str
    message: str


class AttemptOutcome(_StrEnum):
    """How an attempt of a task ended (``Attempt.outcome``)."""

    RUNNING = "running"            # not ended yet
    COMPLETED = "completed"
    FAILED = "failed"              # the task raised (or its row could not be read)
    EXPIRED = "expired"            # ran past its timeout
    CANCELLED = "cancelled"
    WORKER_DIED = "worker died"    # its worker process died, or its node was lost
    INTERRUPTED = "interrupted"    # its worker was stopped; the task was queued again, the attempt given back


@dataclasses.dataclass
class Attempt(_Record):
    """One execution of a task (``get_task_attempts()``): its ``number`` (the task's ``attempts``
    then; an interrupted attempt is given back, so the next one has its number again), the worker
    ``node`` id and ``pid`` that ran it, when it started and ended (None while it runs), its
    ``outcome`` and ``error`` (the error dict, None when it completed)."""

    number: int
    node: typing.Optional[uuid.UUID]
    pid: typing.Optional[int]
    started_at: typing.Optional[datetime]
    ended_at: typing.Optional[datetime]
    outcome: AttemptOutcome
    error: typing.Optional[dict] = None


@typing.runtime_checkable
class ModelProtocol(typing.Protocol):
    """Any object with ``as_dict()`` can be a task's input or output model."""

    def as_dict(self) -> typing.Dict[str, typing.Any]:
        ...


# --- Task ids -------------------------------------------------------------------------------------

_V7_MARKS = (7 << 76) | (0b10 << 62)        # its version (7) and variant (RFC 9562) bits
_V7_RANDOM_BITS = 74                        # rand_a (12 bits) and rand_b (62 bits)
_V7_STEP_BITS = 48                          # the random step between two ids of one millisecond
_V7_SEQUENCE = [0, 0]                       # the last id made in this process: [milliseconds, random]
_V7_LOCK = threading.Lock()


def _new_task_id_ints(count):
    """``count`` new task ids as 128-bit ints: version 7 UUIDs (RFC 9562), the current time in
    milliseconds followed by 74 bits from os.urandom, increasing within a process (RFC 9562's
    "monotonic random" method).

    Ids made later sort later, so a new task's entry in the primary-key index lands next to the
    newest ones instead of on a random page of an index that grows with every task kept: with
    random (version 4) ids, inserting 100,000 tasks into a table that already held 200,000 ran at
    about half the speed of inserting them into an empty one; with these it does not slow down.

    The first id of a millisecond takes 73 random bits; each further id in the same millisecond
    (or after the clock stepped back) is the one before plus a random step of up to 2**48, so ids
    made by one process strictly increase, in creation order. Ids of different processes made in
    the same millisecond do not sort among each other. When the steps run out (some 30 million ids
    in one millisecond), the millisecond is borrowed from the future, as the RFC allows."""
    random_bytes = os.urandom(8 * count + 10)   # one draw: 64 bits per id, 80 for a new millisecond
    steps = struct.unpack_from(f">{count}Q", random_bytes)
    first_mask = (1 << (_V7_RANDOM_BITS - 1)) - 1
    step_mask = (1 << _V7_STEP_BITS) - 1
    limit = 1 << _V7_RANDOM_BITS
    low_mask = (1 << 62) - 1
    ids = []
    append = ids.append
    with _V7_LOCK:
        now = time.time_ns() // 1_000_000
        millis, rand = _V7_SEQUENCE
        high = millis << 80 | _V7_MARKS
        for step in steps:
            if now > millis:
                millis, rand = now, int.from_bytes(random_bytes[-10:], "big") & first_mask
                high = millis << 80 | _V7_MARKS
            else:
                rand += 1 + (step & step_mask)
                if rand >= limit:
                    millis, rand = millis + 1, int.from_bytes(os.urandom(10), "big") & first_mask
                    high = millis << 80 | _V7_MARKS
            append(high | (rand >> 62) << 64 | (rand & low_mask))
        _V7_SEQUENCE[:] = (millis, rand)
    return ids


def _uuids_made_directly(ints):
    """UUID objects of 128-bit ``ints``, made as ``uuid.UUID(int=...)`` makes them but without its
    argument checks, which a task id passes by construction: three C loops instead of a Python call
    per id (a third of the time; Python 3.14's ``UUID._from_int`` does the same). None when this
    Python's UUID is not built that way (then _uuids calls the constructor)."""
    made = list(map(object.__new__, itertools.repeat(uuid.UUID, len(ints))))
    for _ in map(object.__setattr__, made, itertools.repeat("int"), ints):
        pass
    for _ in map(object.__setattr__, made, itertools.repeat("is_safe"), itertools.repeat(uuid.SafeUUID.unknown)):
        pass
    return made


def _direct_uuids_work():
    """Whether _uuids_made_directly makes what the constructor makes, on this Python."""
    try:
        value = 0x0190F5A2_3B4C_7D5E_8F60_718293A4B5C6
        made, built = _uuids_made_directly([value])[0], uuid.UUID(int=value)
        return (made == built and str(made) == str(built) and hash(made) == hash(built)
                and made.__getstate__() == built.__getstate__() and not hasattr(made, "__dict__"))
    except Exception:
        return False


_DIRECT_UUIDS = _direct_uuids_work()


def _uuids(ints):
    """UUID objects of 128-bit ``ints`` (task ids)."""
    if _DIRECT_UUIDS and len(ints) >= 10:   # below, the three loops cost more than they save
        return _uuids_made_directly(ints)
    return [uuid.UUID(int=value) for value in ints]


# The canonical text of a UUID: 32 hex digits in groups of 8-4-4-4-12. _uuid_texts writes each
# digit position into this template (a space after each id, which split() cuts at).
_UUID_TEXT_TEMPLATE = b"00000000-0000-0000-0000-000000000000 "
_UUID_DIGIT_POSITIONS = [i for i in range(36) if i not in (8, 13, 18, 23)]


def _uuid_texts(ints):
    """The canonical texts of 128-bit ``ints`` as UUIDs (``str(uuid.UUID(int=i))`` of each), made
    for all at once: the hex digits of all of them in one string, moved into their places by 32
    slice copies with a step (C loops), a third of the time str() takes for each id."""
    if len(ints) < 10:   # the copies cost a few microseconds whatever the count
        return [f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" for h in map("{:032x}".format, ints)]
    width = len(_UUID_TEXT_TEMPLATE)
    digits = b"".join(map(int.to_bytes, ints, itertools.repeat(16), itertools.repeat("big"))).hex().encode()
    text = bytearray(_UUID_TEXT_TEMPLATE * len(ints))
    for digit, position in enumerate(_UUID_DIGIT_POSITIONS):
        text[position::width] = digits[digit::32]
    return text.decode("ascii").split()


def _new_task_ids(count):
    """``count`` new task ids as UUIDs (see _new_task_id_ints)."""
    return _uuids(_new_task_id_ints(count))


def _first_task_id_at(seconds):
    """The smallest task id that _new_task_ids() can make at epoch ``seconds``: every task created
    before then has a smaller id, which lets the primary key find old tasks without an index of
    their own."""
    return str(uuid.UUID(int=int(seconds * 1000) << 80 | _V7_MARKS))


# --- Serialization --------------------------------------------------------------------------------
#
# Payloads are JSON, never pickle: a row must not be able to run code. Values that JSON lacks are
# stored in a documented text form and revived from the type annotations of the model they go into:
#   datetime / date / time -> ISO 8601 string      UUID    -> canonical string
#   Decimal                -> string ("1.10")       Enum    -> its value
#   timedelta              -> seconds (float)      Enum dict keys -> their (string) values
#   dataclass              -> dict of its fields    pydantic -> model_dump(mode="json") / .dict()
#   object with as_dict()  -> as_dict()             tuple   -> list
# Anything else (sets, bytes, arbitrary objects, dicts with non-string keys, NaN, infinity, cycles,
# strings holding surrogate code points) raises UnserializableError -- a TypeError and a ValueError --
# before anything is written.

#: How deeply containers may nest in a payload. A fixed limit, so that whether a value can be stored
#: does not depend on how deep the caller's stack is, and a worker can always read back what was
#: stored (json.loads and the model revival recurse too).
_MAX_NESTING = 200


# JSON values as they are (exact types only). Not str: a string is JSON only if it is Unicode text
# (see _is_text), which _to_json checks.
_JSON_SCALARS = frozenset({int, bool, type(None)})


def _to_json(value, path="input", _active=None):
    """Convert a value to plain JSON types (dict/list/str/int/float/bool/None) or raise."""
    kind = type(value)
    if kind in (str, int, bool) or value is None:
        if kind is str and not value.isascii():
            _check_text(value, path)
        return value
    if kind is float:
        if not math.isfinite(value):
            raise UnserializableError(f"{path}: {value!r} cannot be stored (JSON has no NaN or Infinity)")
        return value
    if isinstance(value, enum.Enum):
        return _to_json(value.value, path, _active)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (date, _dt.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (str, int)):  # subclasses that are not enums
        return _check_text(str(value), path) if isinstance(value, str) else int(value)
    if isinstance(value, float):
        return _to_json(float(value), path, _active)

    # Containers and models: guard against cycles, which json would reject less helpfully. _active
    # holds the containers between the top and here, so its size is the nesting depth.
    if _active is None:
        _active = set()
    marker = id(value)
    if marker in _active:
        raise UnserializableError(f"{path}: the value contains itself (a reference cycle) and cannot be stored")
    if len(_active) >= _MAX_NESTING:
        raise UnserializableError(f"{path}: the value is nested too deeply to be stored (more than "
                                  f"{_MAX_NESTING} levels)")
    _active.add(marker)
    try:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                name = key.value if isinstance(key, enum.Enum) else key
                if not isinstance(name, str):
                    raise UnserializableError(f"{path}: dictionary keys must be strings to be stored as JSON, "
                                    f"got key {key!r} of type {type(key).__name__}")
                # Exact int/bool/None stay as they are: no path to format for them.
                out[_check_text(str(name), path)] = (item if type(item) in _JSON_SCALARS
                                                     else _to_json(item, f"{path}[{key!r}]", _active))
            return out
        if isinstance(value, (list, tuple)):
            return [item if type(item) in _JSON_SCALARS else _to_json(item, f"{path}[{i}]", _active)
                    for i, item in enumerate(value)]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out = {}
            for f in dataclasses.fields(value):
                item = getattr(value, f.name)
                out[f.name] = item if type(item) in _JSON_SCALARS else _to_json(item, f"{path}.{f.name}", _active)
            return out
        if hasattr(value, "model_dump") and hasattr(type(value), "model_fields"):  # pydantic v2
            return _to_json(_call_model_method(value, "model_dump", path, mode="json"), path, _active)
        if hasattr(value, "dict") and hasattr(type(value), "__fields__"):  # pydantic v1
            return _to_json(_call_model_method(value, "dict", path), path, _active)
        if callable(getattr(value, "as_dict", None)):
            return _to_json(_call_model_method(value, "as_dict", path), path, _active)
    finally:
        _active.discard(marker)
    hint = " (convert it to a list)" if isinstance(value, (set, frozenset)) else ""
    raise UnserializableError(f"{path}: object of type {type(value).__name__} cannot be stored as JSON{hint}; "
                    f"use a dataclass, a pydantic model, a dict or an object with as_dict()")


def _is_text(text):
    """True for a str without surrogate code points: what JSON carries there and back unchanged."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(text, path):
    """``text`` if it is Unicode text; surrogate code points are not: JSON would merge a pair of them
    into one character on the way back, and databases refuse a lone one."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnserializableError(f"{path}: the string {text[max(0, exc.start - 10):exc.end + 10]!r} holds the "
                                  f"surrogate code point {text[exc.start]!r}, which is not Unicode text and "
                                  f"cannot be stored (decode bytes with errors='replace', or store them as "
                                  f"base64)") from None
    return text


def _call_model_method(value, method, path, **kwargs):
    try:
        return getattr(value, method)(**kwargs)
    except Exception as exc:
        raise UnserializableError(f"{path}: {type(value).__name__}.{method}() failed: {exc!r}") from exc


_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # stateless: safe to share


def _make_plain_encoder():
    """CPython's C encoder with lilota's settings, made once (``json.dumps`` makes one per call),
    for values that ``_is_plain_json`` has checked: they cannot contain themselves, so it needs no
    cycle bookkeeping. None where the C encoder is missing or differs; then the encoder above serves."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        encoder = make(None, _JSON_ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",",
                       False, False, False)
        sample = {"a": [1, 2.5, None, True, "\u00e9\ud800"], "": {}}
        if "".join(encoder(sample, 0)) != _JSON_ENCODER.encode(sample):
            return None
    except Exception:
        return None
    return encoder


_PLAIN_ENCODER = _make_plain_encoder()


def _is_plain_json(value, depth=0):
    """True when ``value`` is JSON as it stands: exact str, int, bool, None and finite floats, in
    exact lists and dicts with exact str keys. ``_to_json`` returns such a value unchanged, so it
    can go to the encoder as it is. Anything else -- subclasses, tuples, models, NaN, values nested
    deeper than 32 (a cycle among them) -- takes the careful path, which also names what is wrong."""
    kind = type(value)
    if kind in _JSON_SCALARS:
        return True
    if kind is str:
        return _is_text(value)
    if kind is float:
        return math.isfinite(value)
    if depth > 32:
        return False
    if kind is dict:
        for key, item in value.items():
            # isascii() first: the common key is decided without a call of _is_text.
            if type(key) is not str or not (key.isascii() or _is_text(key)) or (
                    type(item) not in _JSON_SCALARS and not _is_plain_json(item, depth + 1)):
                return False
        return True
    if kind is list:
        for item in value:
            if type(item) not in _JSON_SCALARS and not _is_plain_json(item, depth + 1):
                return False
        return True
    return False


def dumps(value, path="input"):
    """Serialize a payload to the JSON text lilota stores (raises TypeError / ValueError)."""
    try:
        if _is_plain_json(value):
            return "".join(_PLAIN_ENCODER(value, 0)) if _PLAIN_ENCODER else _JSON_ENCODER.encode(value)
        return _JSON_ENCODER.encode(_to_json(value, path))
    except RecursionError:
        raise UnserializableError(f"{path}: the value is nested too deeply to be stored") from None
    except UnserializableError:
        raise
    except ValueError as exc:  # an int with more digits than Python turns into text (sys.get_int_max_str_digits)
        raise UnserializableError(f"{path}: {exc}") from None


def _dumps_many(values, path="input"):
    """``[dumps(value, path) for value in values]`` (a list), faster when all of them are plain
    JSON: one check of the list, then the C encoder on each without a Python call in between."""
    if _PLAIN_ENCODER is not None and len(values) > 1 and _is_plain_json(values):
        try:
            return list(map("".join, map(_PLAIN_ENCODER, values, itertools.repeat(0))))
        except ValueError:
            pass   # an int too long to write out: dumps says which, as it always does
    return [dumps(value, path) for value in values]


def loads(text):
    """Parse stored JSON text (None stays None)."""
    return None if text is None else json.loads(text)


@functools.lru_cache(maxsize=None)
def _type_hints(cls):
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: revive those fields as plain JSON
        return {}


def _revive(tp, value):
    """Rebuild a value of type ``tp`` from its JSON form (the inverse of ``_to_json``)."""
    if tp is None or tp is typing.Any or value is None:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Union or (origin is not None and origin is getattr(types, "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _revive(args[0], value)
        for arg in args:
            try:
                return _revive(arg, value)
            except (TypeError, ValueError):
                continue
        return value
    if origin is typing.Literal:
        return value
    if origin in (list, tuple, set, frozenset) or origin in (typing.List, typing.Tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return tuple(_revive(a, v) for a, v in zip(args, value))
        item = args[0] if args else None
        return origin(_revive(item, v) for v in value)
    if origin is dict:
        args = typing.get_args(tp)
        key_type, item = (args[0], args[1]) if len(args) == 2 else (None, None)
        return {_revive(key_type, k): _revive(item, v) for k, v in value.items()}
    if not isinstance(tp, type):
        return value
    if isinstance(value, tp) and not isinstance(value, (dict, list)):
        return value
    if issubclass(tp, enum.Enum):
        return tp(value)
    if issubclass(tp, datetime):
        return datetime.fromisoformat(value)
    if issubclass(tp, date):
        return date.fromisoformat(value)
    if issubclass(tp, _dt.time):
        return _dt.time.fromisoformat(value)
    if issubclass(tp, uuid.UUID):
        return uuid.UUID(value)
    if issubclass(tp, timedelta):
        return timedelta(seconds=value)
    if issubclass(tp, Decimal):
        return Decimal(value)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = _type_hints(tp)
        return tp(**{k: _revive(hints.get(k), v) for k, v in value.items()})
    if hasattr(tp, "model_validate"):   # pydantic v2
        return tp.model_validate(value)
    if hasattr(tp, "parse_obj"):        # pydantic v1
        return tp.parse_obj(value)
    if isinstance(value, dict) and tp not in (dict, object):
        from_dict = getattr(tp, "from_dict", None)
        return from_dict(value) if callable(from_dict) else tp(**value)
    return value


# --- Time and the retry policy --------------------------------------------------------------------

def _now():
    """Seconds since the epoch: the one clock every timestamp lilota stores comes from."""
    return time.time()


def _to_datetime(seconds):
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def _seconds(value, what, allow_zero=True):
    """A duration given as timedelta or a number of seconds, as float seconds (None stays None)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{what} must be a timedelta or a number of seconds, not {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{what} must be a {'non-negative' if allow_zero else 'positive'} duration, got {value!r}")
    return seconds


def _backoff(attempt, base, cap):
    """Exponential backoff with jitter: about base * 2**(attempt-1), capped, randomised by up to half.

    The jitter spreads retries of tasks that failed together (a database hiccup, a dead host)."""
    delay = min(cap, base * (2 ** min(max(0, attempt - 1), 64)))  # bounded: no float overflow
    return delay * random.uniform(0.5, 1.0)


def _retry_time(task, base, cap):
    """When a task whose attempt failed runs again (epoch seconds), or None when its attempts are
    used up. The one retry policy: every way an attempt can fail goes through here."""
    if task.attempts < (task.max_attempts or 1):
        return _now() + _backoff(task.attempts, base, cap)
    return None


def _format_duration(seconds):
    """``850ms``, ``12.3s``, ``5m03s``, ``2h``, ``7d04h``: the two largest units, zeros dropped."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"
    whole = int(seconds)
    for big, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if whole >= size:
            rest = (whole % size) // small_size
            return f"{whole // size}{big}" + (f"{rest:02d}{small}" if rest else "")
    return f"{whole}s"


def _format_age(moment, now):
    """How long ago (or, for a future moment, in how long) a datetime is: ``3s ago``, ``in 5m``."""
    if moment is None:
        return "-"
    seconds = (now - moment).total_seconds()
    return f"{_format_duration(seconds)} ago" if seconds >= 0 else f"in {_format_duration(-seconds)}"


def _format_time(moment, now):
    """A datetime in full, UTC, with how long ago it was (``now`` None: without that)."""
    if moment is None:
        return "-"
    text = f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d} UTC"
    return text if now is None else f"{text} ({_format_age(moment, now)})"


class TaskProgress:
    """Lets a task function store how far it has got (0-100) while it runs.

    Passed to task functions registered with ``task_progress=TaskProgress`` or with a parameter
    annotated ``TaskProgress``; also available as ``TaskContext.progress``. Without
    ``set_progress_manually=True`` on the worker, a completed task ends with progress 100.
    """

    def __init__(self, task_id, set_progress):
        self.task_id = task_id
        self._set_progress = set_progress
        self.value = None

    def set(self, progress):
        """Store the progress in percent: an int from 0 to 100 (ValueError/TypeError otherwise)."""
        if isinstance(progress, bool) or not isinstance(progress, int):
            raise TypeError(f"progress must be an int from 0 to 100, not {type(progress).__name__}")
        if not 0 <= progress <= 100:
            raise ValueError(f"progress must be between 0 and 100, got {progress}")
        if progress != self.value:  # repeated values would only cost writes
            self._set_progress(self.task_id, progress)
            self.value = progress

    def __repr__(self):
        return f"TaskProgress(task_id={self.task_id!s}, value={self.value!r})"


class TaskContext:
    """What a running task may want to know about itself; declare a parameter annotated
    ``TaskContext`` to receive it: ``task_id``, ``name``, ``attempt``, ``max_attempts``,
    ``scheduled_for`` (the slot a periodic task runs for, else None), ``progress`` (a
    :class:`TaskProgress`) and ``logger``: the logger ``task.<name>``, an ordinary
    logger outside lilota's own ``lilota`` hierarchy (which is silent unless configured), so that
    its records go wherever the worker process's logging sends them, stderr when unconfigured --
    and are stored with the task, as the records of every logger the task's thread uses are.
    ``dependency_outputs``: {id: stored output} of the tasks it depends on (``depends_on``), read
    from the database on first use; {} for a task without dependencies. ``step()`` runs a durable
    step."""

    def __init__(self, *, task_id=None, name=None, attempt=1, max_attempts=1, progress=None, logger=None,
                 scheduled_for=None, dependency_outputs=None, run=None):
        self.task_id = task_id
        self.name = name
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.progress = progress
        self.logger = logger
        self.scheduled_for = scheduled_for   # a periodic task's slot (aware UTC datetime), else None
        self._dependency_outputs = dependency_outputs   # a dict, or a function that reads it
        self._run = run   # the worker's record of this attempt; None for a context made by hand

    @property
    def dependency_outputs(self):
        if callable(self._dependency_outputs):
            self._dependency_outputs = self._dependency_outputs()
        if self._dependency_outputs is None:
            self._dependency_outputs = {}
        return self._dependency_outputs

    def step(self, name, fn, *args, **kwargs):
        """Call ``fn(*args, **kwargs)`` as the step ``name`` and store its result (JSON) in a commit
        of its own before returning it. On a later attempt of the task the stored result is
        returned -- revived to ``fn``'s return annotation where it names a model -- and ``fn`` is
        not called. A name called again in an attempt is numbered: ``name``, ``name#2``, ...

        A step runs at least once (the worker may die after ``fn`` returned and before the commit);
        its identity is its name and occurrence, so renaming or reordering steps runs them afresh.
        Raises what ``fn`` raises (nothing is stored), UnserializableError naming the step when
        its result cannot be stored, TypeError/ConfigurationError for a bad name. For an ``async
        def`` fn it returns an awaitable: ``await ctx.step(...)`` in an async task. A context made
        by hand (no worker) just calls ``fn``."""
        _check_step_name(name)
        if self._run is None:
            return fn(*args, **kwargs)
        return self._run.step(name, fn, args, kwargs)

    def __repr__(self):
        return f"TaskContext(task_id={self.task_id!s}, name={self.name!r}, attempt={self.attempt})"


def _check_step_name(name):
    """A step's name: a non-empty string without ``#``, which numbers a name called again."""
    if not isinstance(name, str):
        raise TypeError(f"a step name must be a string, not {type(name).__name__}")
    if not name or "#" in name or len(name) > 200:
        raise ConfigurationError(f"step name {name!r}: give 1 to 200 characters without '#' ('#' numbers a "
                                 f"name called again in one attempt: render, render#2, ...)")


def _error_record(exc, **extra):
    """The dict stored in ``lilota_task.error``: the exception's type name, message and traceback
    (empty for lilota's own records of what happened to a task), plus details such as the attempt."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc.__traceback__ else ""
    # U+0000 written out: PostgreSQL cannot store the character itself in JSONB.
    record = {"type": type(exc).__name__, "message": str(exc).replace("\x00", "\\x00"),
              "traceback": tb.replace("\x00", "\\x00")}
    record.update(extra)
    return record


# ==================================================================================================
# 2. Storage and dialects
# ==================================================================================================
#
# ``Storage`` holds all the SQL that is the same everywhere. A ``Dialect`` knows one database: how
# to connect, its placeholders and types, its DDL, its claim statement and how to notice that other
# connections wrote. Storage writes every statement with ``?`` placeholders and asks the dialect to
# translate. Each process keeps one connection per database and URL options (``Storage.for_dialect``),
# shared by its threads behind a lock.

# --- Statuses and rows in SQL ---------------------------------------------------------------------
#
# How a task's status moves (lilota_task.status), and the Storage method that moves it:
#
#   scheduled -> running                        claim, complete_and_claim
#   running   -> completed                      complete
#   running   -> scheduled                      finish_attempt with a retry, snooze, recover_tasks
#   running   -> failed | expired               finish_attempt without one; claim: a row it cannot read
#   running   -> cancelled                      complete, finish_attempt, snooze: cancel() asked while it ran
#   created | scheduled | waiting -> cancelled  cancel
#   waiting   -> scheduled                      the commit that completed its last dependency
#   waiting   -> cancelled | failed             the commit that ended a dependency for good (on_failure)
#   failed | expired | cancelled -> scheduled   requeue
#
# A statement names one status as its text ('running'); lists of statuses come from the enums.

def _sql_list(statuses):
    """Statuses (members of one enum) as a SQL list, ``('a', 'b')``, in the order of the enum."""
    order = type(next(iter(statuses)))
    return "(" + ", ".join(f"'{s.value}'" for s in order if s in statuses) + ")"


def _sql_format(template, **columns):
    """A str.format() ``template`` as a SQL expression that builds the same text from ``columns``
    (SQL expressions by field name): literals and columns joined with ``||``."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append("'" + literal.replace("'", "''") + "'")
        if field is not None:
            parts.append(f"CAST({columns[field]} AS text)")
    return " || ".join(parts)


_FINISHED_SQL = "status IN " + _sql_list(_FINISHED)
_REQUEUEABLE = _FINISHED - {TaskStatus.COMPLETED}
_REQUEUEABLE_SQL = "status IN " + _sql_list(_REQUEUEABLE)
_CANCELLABLE_SQL = "status IN " + _sql_list({TaskStatus.CREATED, TaskStatus.SCHEDULED, TaskStatus.WAITING})
_ENDED_BADLY_SQL = "IN " + _sql_list(_REQUEUEABLE)   # failed, expired, cancelled: what on_failure answers
# The statuses version 1 allowed: its CHECK, as released (version 4 adds 'waiting').
_V1_STATUSES = frozenset(TaskStatus) - {TaskStatus.WAITING}
_UNFINISHED_SQL = "status IN " + _sql_list(set(TaskStatus) - _FINISHED)
_ALIVE_NODE_STATUSES = frozenset({NodeStatus.IDLE, NodeStatus.STARTING, NodeStatus.RUNNING, NodeStatus.STOPPING})
_ALIVE_SQL = "status IN " + _sql_list(_ALIVE_NODE_STATUSES)
_GONE_SQL = "status IN " + _sql_list(set(NodeStatus) - _ALIVE_NODE_STATUSES)

# The columns of lilota_task, in the order every statement reads them (Task's fields, same order):
# name, kind (the dialect's column type, see _schema, and how Storage._task decodes it), constraints.
_TASK_TABLE_V1 = (
    ("id", "id", "PRIMARY KEY"), ("name", "text", "NOT NULL"),
    ("status", "status", f"NOT NULL CHECK (status IN {_sql_list(_V1_STATUSES)})"),
    ("priority", "integer", "NOT NULL DEFAULT 0"), ("pid", "integer", ""),
    ("run_at", "time", "NOT NULL"), ("attempts", "integer", "NOT NULL DEFAULT 0"),
    ("max_attempts", "integer", ""), ("timeout", "real", ""), ("expires_at", "time", ""),
    ("progress_percentage", "integer", "NOT NULL DEFAULT 0"), ("start_date_time", "time", ""),
    ("end_date_time", "time", ""), ("input", "json", ""), ("output", "json", ""),
    ("error", "json", ""), ("locked_by", "id", ""), ("locked_at", "time", ""),
    ("created_at", "time", "NOT NULL"), ("cancel_requested", "flag", "NOT NULL DEFAULT 0"),
    ("keep_input", "flag", ""),
)
# Columns that later schema versions add to lilota_task (ALTER TABLE ... ADD COLUMN), by version;
# they follow the version-1 columns in every row, in this order.
_TASK_COLUMNS_ADDED = {
    2: (("queue", "text", "NOT NULL DEFAULT 'default'"),),
    3: (("unique_key", "text", ""), ("scheduled_for", "time", "")),
    4: (("depends_on", "ids", ""), ("on_failure", "text", "")),
}
_TASK_TABLE = _TASK_TABLE_V1 + tuple(column for version in sorted(_TASK_COLUMNS_ADDED)
                                     for column in _TASK_COLUMNS_ADDED[version])
_TASK_COLUMNS = tuple(column for column, _, _ in _TASK_TABLE)
_TASK_SELECT = ", ".join(_TASK_COLUMNS)
_NODE_COLUMNS = ("id, name, type, status, pid, hostname, created_at, last_seen_at, lease_expires_at, queues, reason, "
                 "task_names")

# --- Schema and migrations ------------------------------------------------------------------------

SCHEMA_VERSION = 7   # the newest key of _schema()


def _schema(**types):
    """{schema version: the DDL statements that make it from the version before}, in a dialect's
    column types: ``id``, ``text``, ``integer``, ``real``, ``time``, ``json`` and ``flag`` (0/1).
    A version is never edited once released: a change to the schema is a new version, applied
    forward and automatically by ``Storage._migrate``."""
    t = dict(types, status=types["text"], ids=types["json"])
    return {1: _schema_v1(t), 2: _schema_v2(t), 3: _schema_v3(t), 4: _schema_v4(t), 5: _schema_v5(t),
            6: _schema_v6(t), 7: _schema_v7(t)}


def _column_ddl(column, kind, constraints, t):
    return " ".join(filter(None, (column, t[kind], constraints)))


def _added_columns(version, t):
    """The ALTER TABLE statements that add ``version``'s columns of _TASK_COLUMNS_ADDED."""
    return [f"ALTER TABLE lilota_task ADD COLUMN {_column_ddl(*column, t)}"
            for column in _TASK_COLUMNS_ADDED.get(version, ())]


def _schema_v1(t):
    """Version 1: the task and node tables, and the claim's indexes."""
    task_columns = ",\n            ".join(_column_ddl(*column, t) for column in _TASK_TABLE_V1)
    return [
        f"""CREATE TABLE IF NOT EXISTS lilota_task (
            {task_columns})""",
        # The claim reads this partial index in order; it holds queued tasks only, so it stays
        # small however many finished tasks the table keeps.
        "CREATE INDEX IF NOT EXISTS lilota_task_queue ON lilota_task (priority DESC, run_at) "
        "WHERE status = 'scheduled'",
        "CREATE INDEX IF NOT EXISTS lilota_task_running ON lilota_task (locked_by) "
        "WHERE status = 'running'",
        # When the next delayed task falls due: what an idle worker sleeps until. Without it that
        # is a scan of the queue on every idle wake of every worker. Only tasks due later than they
        # were stored (delays, retries) are in it: tasks due at once, the bulk, cost no second
        # index write.
        "CREATE INDEX IF NOT EXISTS lilota_task_due ON lilota_task (run_at) "
        "WHERE status = 'scheduled' AND run_at > created_at",
        f"""CREATE TABLE IF NOT EXISTS lilota_node (
            id {t['id']} PRIMARY KEY,
            name {t['text']},
            type {t['text']} NOT NULL,
            status {t['text']} NOT NULL,
            pid {t['integer']},
            hostname {t['text']},
            host_key {t['text']},
            created_at {t['time']} NOT NULL,
            last_seen_at {t['time']} NOT NULL,
            lease_expires_at {t['time']} NOT NULL)""",
    ]


def _schema_v2(t):
    """Version 2: named queues. A task's queue; the claim's index by queue; the concurrency slot a
    running task of a limited queue holds (``slot``: unique per queue among running tasks, which is
    what makes a concurrency limit hold under concurrent claimers) and the rate-limit slot its
    start used (``rate_slot``); what is set per queue (lilota_queue) and the ring of a rate limit
    (lilota_queue_rate: N rows, each free again a period after the start that used it); and what a
    node serves and why it stopped."""
    return _added_columns(2, t) + [
        f"ALTER TABLE lilota_task ADD COLUMN slot {t['integer']}",
        f"ALTER TABLE lilota_task ADD COLUMN rate_slot {t['integer']}",
        "DROP INDEX IF EXISTS lilota_task_queue",
        "CREATE INDEX IF NOT EXISTS lilota_task_queue ON lilota_task (queue, priority DESC, run_at) "
        "WHERE status = 'scheduled'",
        # Only tasks that hold a slot: claims and completions of unlimited queues never write it.
        "CREATE UNIQUE INDEX IF NOT EXISTS lilota_task_slot ON lilota_task (queue, slot) "
        "WHERE status = 'running' AND slot IS NOT NULL",
        f"""CREATE TABLE IF NOT EXISTS lilota_queue (
            name {t['text']} PRIMARY KEY,
            paused {t['flag']} NOT NULL DEFAULT 0,
            concurrency {t['integer']},
            rate_limit {t['integer']},
            rate_period {t['real']},
            updated_at {t['time']} NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS lilota_queue_rate (
            queue {t['text']} NOT NULL,
            slot {t['integer']} NOT NULL,
            free_at {t['time']} NOT NULL,
            PRIMARY KEY (queue, slot))""",
        "CREATE INDEX IF NOT EXISTS lilota_queue_rate_free ON lilota_queue_rate (free_at)",
        f"ALTER TABLE lilota_node ADD COLUMN queues {t['text']}",
        f"ALTER TABLE lilota_node ADD COLUMN reason {t['text']}",
    ]


def _schema_v3(t):
    """Version 3: unique and periodic tasks. A task's ``unique_key`` and the index that finds the
    tasks holding a key (unfinished, or created within a ``unique_for`` window); a periodic task's
    slot (``scheduled_for``); and the periodic schedules of running nodes (lilota_periodic): what
    they enqueue and when, and the last slot enqueued, which each slot's enqueuer compares and sets."""
    return _added_columns(3, t) + [
        "CREATE INDEX IF NOT EXISTS lilota_task_unique ON lilota_task (unique_key, created_at) "
        "WHERE unique_key IS NOT NULL",
        f"""CREATE TABLE IF NOT EXISTS lilota_periodic (
            name {t['text']} PRIMARY KEY,
            task {t['text']} NOT NULL,
            schedule {t['text']} NOT NULL,
            timezone {t['text']} NOT NULL,
            queue {t['text']} NOT NULL,
            next_slot {t['time']},
            last_slot {t['time']},
            last_task_id {t['id']},
            seen_at {t['time']} NOT NULL)""",
    ]


def _schema_v4(t):
    """Version 4: dependencies between tasks. A task's ``depends_on`` (the JSON list of ids, as
    scheduled) and ``on_failure``; lilota_dependency, one row per (task, task it depends on),
    read from the dependency's side when it ends; and the status 'waiting', which each dialect
    adds to the status CHECK of version 1 in its own way (see its migrations()). Also the task
    names each worker node serves, for explain()."""
    return _added_columns(4, t) + [
        f"""CREATE TABLE IF NOT EXISTS lilota_dependency (
            task_id {t['id']} NOT NULL,
            depends_on {t['id']} NOT NULL,
            PRIMARY KEY (task_id, depends_on))""",
        "CREATE INDEX IF NOT EXISTS lilota_dependency_depends_on ON lilota_dependency (depends_on)",
        # The task names a worker has registered (a JSON list): what explain() checks a task against.
        f"ALTER TABLE lilota_node ADD COLUMN task_names {t['text']}",
    ]


def _schema_v5(t):
    """Version 5: long work. A task's stored step results (lilota_step: one row per step name and
    occurrence, ``render#2``), its log records (lilota_log, numbered per task by ``seq``) and its
    ended attempts (lilota_attempt, numbered per task by ``seq``; the attempt a task row still
    describes -- running, or ended by completion -- has no row: get_task_attempts() reads it from
    the task). Rows go with their task (cleanup(), delete_task_by_id()); no foreign key, so that
    rows of tasks written before this version, or by hand, need nothing."""
    return [
        f"""CREATE TABLE IF NOT EXISTS lilota_step (
            task_id {t['id']} NOT NULL,
            name {t['text']} NOT NULL,
            attempt {t['integer']} NOT NULL,
            started_at {t['time']} NOT NULL,
            ended_at {t['time']} NOT NULL,
            output {t['json']},
            PRIMARY KEY (task_id, name))""",
        f"""CREATE TABLE IF NOT EXISTS lilota_log (
            task_id {t['id']} NOT NULL,
            seq {t['integer']} NOT NULL,
            attempt {t['integer']} NOT NULL,
            logged_at {t['time']} NOT NULL,
            level {t['text']} NOT NULL,
            logger {t['text']} NOT NULL,
            message {t['text']} NOT NULL,
            PRIMARY KEY (task_id, seq))""",
        f"""CREATE TABLE IF NOT EXISTS lilota_attempt (
            task_id {t['id']} NOT NULL,
            seq {t['integer']} NOT NULL,
            number {t['integer']} NOT NULL,
            node {t['id']},
            pid {t['integer']},
            started_at {t['time']},
            ended_at {t['time']} NOT NULL,
            outcome {t['text']} NOT NULL,
            error {t['json']},
            PRIMARY KEY (task_id, seq))""",
    ]


def _schema_v6(t):
    """Version 6: the dashboard's reads (and stats()'). Finished tasks by when they ended: the
    overview's chart of the last hour, its recent errors and the last minute/hour of stats() read
    a range of it instead of every task kept. A task enters it once, when it ends (a partial index:
    queued and running tasks are not in it), which is all it costs the claim path. The task list
    needs no index of its own: it pages through the primary key (ids increase with time). The
    counts by status, queue and name get none either: an index on those columns changes at every
    claim and completion (the drain ran some 10 % slower with one), so the dashboard counts in
    the background instead (see _CountsCache)."""
    return [
        "CREATE INDEX IF NOT EXISTS lilota_task_ended ON lilota_task (end_date_time) "
        "WHERE end_date_time IS NOT NULL",
    ]


def _schema_v7(t):
    """Version 7: what a task's end must tell others, as flags on its row, so that an end that
    concerns nobody costs nothing. ``has_dependents``: a task scheduled later depends on this one
    (set by that task's scheduler, under the row's lock); only then does PostgreSQL's settle
    trigger run its function, and SQLite's Storage._settle go past its first look. ``watched``: a wait() waits
    for it (set by the waiter); only then does PostgreSQL's end of it NOTIFY the waiters' listener
    (a NOTIFY takes a lock that serialises the commits of every notifying transaction, so the
    drain's completions must not send one each). And the version of the queue settings
    (lilota_meta's ``queues_version``), which each dialect's trigger on lilota_queue moves: a
    claim built for queues without settings checks it instead of reading lilota_queue (see
    _claim_sql)."""
    return [
        f"ALTER TABLE lilota_task ADD COLUMN has_dependents {t['flag']} NOT NULL DEFAULT 0",
        f"ALTER TABLE lilota_task ADD COLUMN watched {t['flag']} NOT NULL DEFAULT 0",
        "UPDATE lilota_task SET has_dependents = 1 WHERE id IN (SELECT depends_on FROM lilota_dependency)",
        "INSERT INTO lilota_meta (key, value) SELECT 'queues_version', '0' "
        "WHERE NOT EXISTS (SELECT 1 FROM lilota_meta WHERE key = 'queues_version')",
    ]


# The dependents a task that ended badly takes with it (rows (id, via): via is the dependency that
# ended, or was ended, first): those waiting with on_failure cancel or fail, then theirs, and so on,
# in one recursive query whatever the chain's length. {root}: the task that ended.
_DOOMED_SQL = (
    "SELECT d.task_id, d.depends_on FROM lilota_dependency d JOIN lilota_task t ON t.id = d.task_id "
    "WHERE d.depends_on = {root} AND t.status = 'waiting' AND t.on_failure <> 'run' "
    "UNION SELECT d.task_id, d.depends_on FROM reach JOIN lilota_dependency d ON d.depends_on = reach.id "
    "JOIN lilota_task t ON t.id = d.task_id WHERE t.status = 'waiting' AND t.on_failure <> 'run'")
# True for a waiting task ({task}) none of whose dependencies is open: each completed, or ended
# otherwise when it runs anyway (on_failure 'run').
_NO_OPEN_DEPENDENCY_SQL = (
    "NOT EXISTS (SELECT 1 FROM lilota_dependency d JOIN lilota_task s ON s.id = d.depends_on "
    "WHERE d.task_id = {task}.id AND s.status <> 'completed' "
    f"AND (s.status NOT {_ENDED_BADLY_SQL} OR {{task}}.on_failure <> 'run'))")
# The message of a DependencyFailedError, as Python formats it and as SQL (PostgreSQL) builds it.
_DEPENDENCY_FAILED = "dependency {via} ended {ended}, so this task did not run (on_failure='{on_failure}')"

#: The tables whose rows belong to a task (``task_id``) and are deleted with it: its steps, log
#: records and attempts, and which tasks it depends on (tasks that depend on it keep their rows).
_TASK_DETAIL_TABLES = ("lilota_step", "lilota_log", "lilota_attempt", "lilota_dependency")

#: The outcome of an attempt that ended with one of lilota's own error records (others: failed).
_OUTCOME_OF_ERROR = {"TaskTimeoutError": AttemptOutcome.EXPIRED, "TaskCancelledError": AttemptOutcome.CANCELLED,
                     "WorkerDiedError": AttemptOutcome.WORKER_DIED,
                     "TaskInterruptedError": AttemptOutcome.INTERRUPTED}

#: lilota_meta's key for when old finished tasks were last deleted (see Storage.take_turn).
_RETENTION_KEY = "retention_ran_at"

# --- The dialect interface ------------------------------------------------------------------------

class Dialect:
    """How lilota talks to one kind of database. Subclass it and ``register_dialect()`` it to add one.

    A dialect is built from the parsed URL and supplies:

    * ``connect()``: a new DB-API 2.0 connection in autocommit mode (one statement = one transaction);
    * ``placeholder``: the driver's positional placeholder; lilota writes ``?`` and translates;
    * ``migrations()``: for each schema version, the DDL statements that create it (a statement
      may be a function of the connection, for a change the database has no DDL for);
    * ``prepare_claim(defaults, queues)`` and ``claim(conn, prepared, node_id, pid, now)``: the one
      atomic statement that picks the next due task of the queues and marks it running;
    * ``complete_and_claim(...)``, optional: a completion and the next claim in one commit;
    * ``settles_dependents``: whether the database settles a task's dependents itself when it
      ends (else Storage does, in the same transaction), and ``dependency_lock``;
    * ``encode_time``/``decode_time`` and ``encode_json``/``decode_json``: column types;
    * ``time_param``/``json_param``: how a time or JSON parameter is written, with a cast where the
      database cannot infer its type (inside CASE); Storage writes every such parameter this way;
    * ``begin_migration(conn)``: BEGIN the schema's transaction, serialised against other processes;
    * ``lock_unique_keys(conn, keys)``: serialise the schedulers of the same unique keys;
    * ``insert_rows(conn, table, columns, shared, chunks)``: many rows in one go (schedule_many);
    * ``change_counter(conn)``: a cheap value that changes when other connections commit (or None);
    * ``listen()``: a connection that is told when tasks are queued (or None);
    * ``translate_error(exc)``: a specific :class:`StorageError` for a driver exception, and
      ``connection_lost(exc)``: whether the connection is gone (the next operation opens a new one).

    Storage uses a connection as the standard library's ``sqlite3`` offers it: ``execute()`` and
    ``executemany()`` return the cursor. :class:`DBAPIConnection` gives any DB-API 2.0 connection
    that shape.
    """

    name = "generic"
    placeholder = "?"
    time_param = "?"
    json_param = "?"
    begin_write_sql = "BEGIN"
    #: False for a database that exists only inside one process (SQLite ``:memory:``).
    shared_between_processes = True
    #: True when the database itself settles the dependents of a task that ends (a trigger); else
    #: Storage does it in the transaction that ended the task (``Storage._settle``).
    settles_dependents = False
    #: Appended to the SELECT that reads the dependencies of a task being scheduled (which then
    #: get their has_dependents flag): a lock that makes a concurrent end of one of them wait for
    #: the new task's commit, taken in id order (none where writers take turns, as in SQLite).
    dependency_lock = ""

    def __init__(self, url, parts):
        self.url = url
        self.parts = parts

    @property
    def identity(self):
        """A string naming the database, equal for two URLs that reach the same one."""
        return self.url

    @property
    def connection_key(self):
        """What a process's connections are shared by: the database and the connection options."""
        return self.identity

    @property
    def absolute_url(self):
        """The URL naming the same database from any working directory."""
        return self.url

    def describe(self):
        """The database for error messages, without a password."""
        return urllib.parse.urlunsplit((self.parts.scheme, self._netloc(), self.parts.path, "", ""))

    def _netloc(self):
        parts = self.parts
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return f"{parts.username}@{netloc}" if parts.username else netloc

    def connect(self):
        """A new DB-API connection in autocommit mode (raise a StorageError subclass if impossible)."""
        raise NotImplementedError

    def migrations(self):
        """{schema version: [DDL statements]}; each version's statements create what it adds."""
        raise NotImplementedError

    def prepare_claim(self, defaults, queues, free=(), version=None):
        """Build the claim once per worker. ``defaults``: (name, timeout seconds, max_attempts,
        keep_input) of each registered task, written to a task's row at its first claim;
        ``queues``: the names of the queues it serves; ``free``: those of them that have neither
        a pause nor a limit under the queue settings' ``version`` (lilota_meta), which the claim
        may take from without looking at their settings, as long as the version is the same."""
        raise NotImplementedError

    def claim(self, conn, prepared, node_id, pid, now):
        """Atomically mark the next due task running for ``node_id``; return its row or None."""
        raise NotImplementedError

    def complete_and_claim(self, conn, completion, prepared, node_id, pid, now, settle=None):
        """Run ``completion`` (an UPDATE: its sql and parameters) and ``claim()`` in one commit, so
        that both happen or neither; ``settle(conn)``, given unless ``settles_dependents``, goes
        between them (what the completion releases can be claimed at once).
        Returns (rows the completion changed, the claimed row or None);
        None when this dialect cannot, having done nothing: the worker then stores the completion
        and claims in two commits. A busy worker completes and claims once per task; one commit
        instead of two is what it saves."""
        return None

    def adopt_connection(self, raw):
        """The caller's DB-API connection (``schedule(..., connection=raw)``) as (a connection in
        the shape Storage uses, whether it is in autocommit mode: then lilota's statements need a
        transaction of their own). TypeError for a connection of another kind of database."""
        raise TypeError(f"{self.describe()} takes no connection= ({_connection_kind(raw)}): "
                        f"this dialect does not support writing through the application's connection")

    def lock_unique_keys(self, conn, keys):
        """Inside the transaction open on ``conn``, take locks on the unique ``keys`` (sorted) that a
        concurrent transaction scheduling one of them waits for until this one ends. This
        default takes the database's write lock (what SQLite's BEGIN IMMEDIATE holds already; a
        caller's connection may not have it yet): every writer waits, which is race-free."""
        conn.execute("UPDATE lilota_meta SET value = value WHERE key = 'schema_version'")

    def begin_migration(self, conn):
        """Begin the transaction that creates or migrates the schema, so that a concurrent
        migrator waits until it has ended (and then finds the schema up to date)."""
        conn.execute(self.begin_write_sql)

    def insert_rows(self, conn, table, columns, shared, chunks):
        """Insert many rows into ``table`` inside the transaction open on ``conn``, as fast as the
        database allows. ``columns``: (name, placeholder) of each value a row gives; ``shared``:
        (name, placeholder, value) of each column that has the same value in every row, the value
        as the column stores it (from encode_time / encode_json); the placeholder is ``?``,
        ``time_param`` or ``json_param``. ``chunks``: an iterable of iterables of rows (tuples of
        ``columns``' values), read one chunk at a time: an exception raised while reading one
        leaves the transaction to be rolled back. This default: executemany() of a one-row INSERT."""
        names = [name for name, _ in columns] + [name for name, _, _ in shared]
        marks = [mark for _, mark in columns] + [mark for _, mark, _ in shared]
        values = tuple(value for _, _, value in shared)
        sql = self.sql(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(marks)})")
        for chunk in chunks:
            conn.executemany(sql, [row + values for row in chunk])

    def sql(self, text):
        """``text`` with lilota's ``?`` placeholders in the driver's style (lilota's statements
        contain no other ``?`` and no ``%``)."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def encode_time(self, seconds):
        """Epoch seconds as the value stored in a time column."""
        return seconds

    def decode_time(self, value):
        """A stored time column as an aware UTC datetime (None stays None)."""
        return _to_datetime(value)

    def encode_json(self, text):
        """JSON text as the value stored in a JSON column."""
        return text

    def minute_sql(self, column):
        """SQL for the whole minutes from the epoch-seconds parameter ``?`` to the time in
        ``column`` (never negative here: the rows read are those at or after it)."""
        return f"CAST(({column} - ?) / 60 AS INTEGER)"

    def decode_json(self, value):
        """A stored JSON column as Python values."""
        return loads(value)

    def change_counter(self, conn):
        """A cheap value that changes when other connections commit; None if there is none (then
        idle workers notice other processes' tasks by their periodic claim only)."""
        return None

    def listen(self, event="queued"):
        """A listener woken when tasks are queued (``event`` "queued") or when a watched task
        ended (``event`` "ended", see Storage.watch): an object with ``fileno()`` (None while the
        database cannot be reached) and ``drain()``, or None when this database has no such thing."""
        return None

    def mark_watched(self, conn, task_ids):
        """Mark the tasks ``task_ids`` (canonical ids, at most 500) as waited for, so that their
        end reaches the "ended" listeners; return the ids that are marked now (before, too).
        The mark locks a row for a moment, and a claim passes locked rows by: this default
        leaves queued tasks unmarked (their waiters look at them now and then); a dialect that
        marks them must wake the workers the mark may have turned away (as PostgreSQL's does)."""
        marks = ", ".join("?" for _ in task_ids)
        return {str(row[0]) for row in conn.execute(self.sql(
            f"WITH marked AS (UPDATE lilota_task SET watched = 1 WHERE id IN ({marks}) AND watched = 0 "
            f"AND status <> 'scheduled' RETURNING id) SELECT id FROM marked "
            f"UNION ALL SELECT id FROM lilota_task WHERE id IN ({marks}) AND watched = 1"),
            list(task_ids) * 2).fetchall()}

    def file_identity(self):
        """What identifies the file the database lives in (it changes when the file is deleted or
        replaced), or None for a database that is not a local file."""
        return None

    def translate_error(self, exc):
        """The StorageError to raise for a driver exception, or None to let it through."""
        return None

    def connection_lost(self, exc):
        """True when ``exc`` means the connection is unusable and a new one must be opened."""
        return False

    def connection_closed(self, conn):
        """True when an idle connection is known to be closed by the other side (checked before
        each operation, so it must be cheap); the operation then opens a new one."""
        return False

    def missing_table(self, exc):
        """True when ``exc`` says a table does not exist (the schema is not created yet)."""
        return "no such table" in str(exc) or "does not exist" in str(exc)


_DIALECTS = {}


def register_dialect(scheme, dialect_class):
    """Make URLs ``scheme://...`` (and ``scheme+driver://...``) use ``dialect_class``."""
    if not (isinstance(dialect_class, type) and issubclass(dialect_class, Dialect)):
        raise TypeError("dialect_class must be a subclass of lilota.Dialect")
    _DIALECTS[scheme.lower()] = dialect_class


def _dialect_for_url(url):
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"db_url {url!r} is not a database URL; use for example "
                                 f"'sqlite:///lilota.db' (a file next to the program) or 'sqlite:////abs/path.db'")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower().split("+", 1)[0]
    dialect_class = _DIALECTS.get(scheme)
    if dialect_class is None:
        known = ", ".join(sorted(f"{s}://" for s in _DIALECTS))
        raise ConfigurationError(f"no lilota dialect for {parts.scheme}:// URLs (db_url={url!r}); "
                                 f"this lilota knows {known}. Other databases plug in through "
                                 f"lilota.register_dialect(scheme, DialectClass)")
    return dialect_class(url, parts)


def _connection_kind(raw):
    """What a connection given as ``connection=`` is, for error messages: 'a psycopg2 connection'."""
    kind = type(raw)
    return f"a {kind.__module__}.{kind.__qualname__}"


def _unwrap_connection(raw):
    """The driver's connection under an SQLAlchemy pool proxy (``session.connection().connection``)
    or a Django connection wrapper (``django.db.connection``), else ``raw`` itself."""
    if type(raw).__module__.startswith("sqlalchemy"):
        # A pool's proxy: its driver connection (SQLAlchemy 2; 1.4: dbapi_connection); a
        # Connection: its proxy.
        for attribute in ("driver_connection", "dbapi_connection", "connection"):
            inner = getattr(raw, attribute, None)
            if inner is not None and not isinstance(inner, types.MethodType):   # Session.connection()
                return _unwrap_connection(inner)
    if type(raw).__module__.startswith("django.") and hasattr(raw, "ensure_connection"):   # also its proxy
        raw.ensure_connection()
        return raw.connection
    return raw


def _rollback(conn):
    try:
        conn.execute("ROLLBACK")
    except Exception:
        pass


def _close_quietly(conn):
    """Close a connection that may already be broken: a dropped one can fail to close, too."""
    try:
        conn.close()
    except Exception:
        pass


class _Transaction:
    """BEGIN (IMMEDIATE on SQLite; ``begin=None``: already begun) ... COMMIT, or ROLLBACK on error
    (a failed COMMIT included, so that the shared connection never stays inside a transaction)."""

    __slots__ = ("conn", "begin")

    def __init__(self, conn, begin):
        self.conn, self.begin = conn, begin

    def __enter__(self):
        if self.begin is not None:
            self.conn.execute(self.begin)
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                _rollback(self.conn)
                raise
        else:
            _rollback(self.conn)
        return False


class _Savepoint:
    """SAVEPOINT ... RELEASE inside the caller's open transaction, or ROLLBACK TO it on error: what
    was written under it is undone and the transaction goes on (what a failed statement leaves
    behind included, on PostgreSQL)."""

    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        conn = self.conn
        # sqlite3 in its legacy transaction control begins a transaction itself before an INSERT,
        # but not before a SAVEPOINT, which outside a transaction begins one that RELEASE commits:
        # begin it as sqlite3 would have. (PostgreSQL drivers begin before any statement.)
        if isinstance(conn, sqlite3.Connection) and not conn.in_transaction:
            conn.execute(f"BEGIN {conn.isolation_level or ''}")
        conn.execute("SAVEPOINT lilota_insert")
        return conn

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.conn.execute("RELEASE SAVEPOINT lilota_insert")
            return False
        try:
            self.conn.execute("ROLLBACK TO SAVEPOINT lilota_insert")
            self.conn.execute("RELEASE SAVEPOINT lilota_insert")
        except Exception:
            pass   # e.g. the connection is gone: the exception that ended the block says more
        return False


# --- The claim ------------------------------------------------------------------------------------

class _PreparedClaim(typing.NamedTuple):
    """The claim of lilota's dialects, built for a worker's registered defaults and served queues."""

    sql: typing.Any      # the statement; before SQLite 3.35, the (pick, update, fetch) statements
    params: typing.Any   # the defaults' values: by name (SQLite), or in order with _CLAIM_SLOTS in it
    # PostgreSQL: the claim as a part of the statement that completes the task before it (sql, params)
    after_completion: typing.Any = None


class _Claim:
    """A worker's claim (Storage.prepare_claim): the dialect's ``prepared`` claim, what it was built
    from, and the version of the queue settings it was built for, which Storage.claim compares
    when it finds nothing (built again in place when the settings changed)."""

    def __init__(self, prepared, defaults, queues, version):
        self.prepared, self.defaults, self.queues, self.version = prepared, defaults, queues, version


# The values each claim supplies: the worker's node id and pid, and the time.
_CLAIM_SLOTS = {"node": object(), "pid": object(), "now": object()}


def _claim_sql(defaults, queues, param, add_seconds, *, index="", lock="", finished="", free=(), version=None):
    """The claim as (update, pick): the UPDATE that marks a task running for this node, and the
    SELECT of the first due task of ``queues`` that may start. A task due when stored (run_at <=
    created_at) is due whatever the clock says since. ``defaults`` (name, timeout, max_attempts,
    keep_input of each registered task) are written to a task's row at its first claim.
    ``param(key, value, cast)`` returns a parameter's placeholder (keys of _CLAIM_SLOTS: each
    claim's own values); ``add_seconds`` formats a time plus seconds; ``index`` and ``lock`` go
    into the pick of each queue. ``finished``: a SELECT of the ids of tasks that the same statement
    has just ended (the claim part of a completion's statement), which still look running to it
    and do not count toward a limit.

    Several queues: the head of each (one index probe each) and the first of those by priority,
    then run_at. A queue may start a task unless it is paused, at its concurrency limit (its
    running tasks), or out of rate-limit slots. A task of a limited queue takes the lowest free
    concurrency slot and a free rate slot; the unique index on (queue, slot) of running tasks and
    the rate trigger refuse a slot taken by a concurrent claim (PostgreSQL: see _ClaimConflict).

    A queue of ``free`` (neither paused nor limited under the queue settings' ``version``) is read
    without its settings, and the statement does not name lilota_queue or lilota_queue_rate when
    all are free: those tables' locks and look-ups were a sixth of the server's work per task on
    PostgreSQL. Instead the head of such a queue checks that the settings' version is still the
    one the claim was built for (one look-up in lilota_meta, whose version a trigger on
    lilota_queue moves); when it is not, the claim finds nothing and Storage.claim builds it again."""
    def case(field, key, cast, fallback):
        whens = " ".join(f"WHEN {param(f'n{i}', task[0], None)} THEN {param(f'{key}{i}', task[field], cast)}"
                         for i, task in enumerate(defaults))
        return f"CASE name {whens} ELSE {fallback} END" if defaults else fallback

    defaults = [(name, timeout, attempts, int(keep)) for name, timeout, attempts, keep in defaults]
    now = lambda: param("now", None, "timestamptz")   # noqa: E731 -- placeholders come in order
    ended = f" AND {{0}}.id NOT IN ({finished})" if finished else ""
    limited = [queue for queue in queues if queue not in free or version is None]
    # Placeholders may be positional: the parts are built in the order they appear.
    update = (f"UPDATE lilota_task SET status = 'running', pid = {param('pid', None, 'integer')}, "
              f"attempts = attempts + 1, locked_by = {param('node', None, 'uuid')}, "
              f"locked_at = {now()}, start_date_time = {now()}, end_date_time = NULL, "
              f"progress_percentage = 0, "
              f"timeout = COALESCE(timeout, {case(1, 't', 'double precision', 'NULL')}), "
              f"max_attempts = COALESCE(max_attempts, {case(2, 'a', 'integer', '1')}), "
              f"keep_input = COALESCE(keep_input, {case(3, 'k', 'smallint', '1')}), "
              "expires_at = " + add_seconds.format(now(), f"COALESCE(timeout, {case(1, 't', 'double precision', 'NULL')})"))
    if not limited:
        update += ", slot = NULL, rate_slot = NULL"
    else:
        update += (
            # The lowest concurrency slot no running task of the queue holds (NULL: not limited).
            ", slot = (SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM lilota_task r WHERE r.status = 'running' "
            f"AND r.queue = q.name AND r.slot = 1{ended.format('r')}) THEN 1 ELSE (SELECT MIN(r.slot + 1) "
            "FROM lilota_task r WHERE r.status = 'running' AND r.queue = q.name AND r.slot < q.concurrency"
            f"{ended.format('r')} AND NOT EXISTS (SELECT 1 FROM lilota_task u WHERE u.status = 'running' "
            f"AND u.queue = q.name AND u.slot = r.slot + 1{ended.format('u')})) "
            "END FROM lilota_queue q WHERE q.name = lilota_task.queue AND q.concurrency IS NOT NULL), "
            # A free slot of the queue's rate limit (NULL: not limited); the trigger uses it up.
            f"rate_slot = (SELECT MIN(g.slot) FROM lilota_queue_rate g WHERE g.queue = lilota_task.queue "
            f"AND g.free_at <= {now()})")

    def head(i, queue, columns):
        q = lambda: param(f"q{i}", queue, "text")   # noqa: E731
        select = (f"SELECT {columns} FROM lilota_task {index}WHERE status = 'scheduled' AND queue = {q()} "
                  f"AND (run_at <= {now()} OR run_at <= created_at) ")
        if queue not in limited:
            return (select + "AND (SELECT value FROM lilota_meta WHERE key = 'queues_version') = "
                    f"{param(f'v{i}', version, 'text')} ORDER BY priority DESC, run_at LIMIT 1{lock}")
        return (select +
                f"AND NOT EXISTS (SELECT 1 FROM lilota_queue q WHERE q.name = {q()} AND (q.paused = 1 "
                f"OR q.concurrency <= (SELECT COUNT(*) FROM lilota_task r WHERE r.status = 'running' "
                f"AND r.queue = {q()}{ended.format('r')}) "
                f"OR (q.rate_limit IS NOT NULL AND NOT EXISTS (SELECT 1 FROM lilota_queue_rate g "
                f"WHERE g.queue = {q()} AND g.free_at <= {now()})))) "
                f"ORDER BY priority DESC, run_at LIMIT 1{lock}")

    if len(queues) == 1:
        pick = head(0, queues[0], "id")
    else:
        heads = " UNION ALL ".join(f"SELECT * FROM ({head(i, queue, 'id, priority, run_at')}) AS h{i}"
                                   for i, queue in enumerate(queues))
        pick = f"SELECT id FROM ({heads}) AS heads ORDER BY priority DESC, run_at LIMIT 1"
    return update, pick


class _ClaimConflict(StorageError):
    """A concurrent claim took the concurrency or rate slot this claim chose (PostgreSQL, where
    claimers do not wait for each other): nothing was done; claim again."""


# --- SQLite ---------------------------------------------------------------------------------------

def _retry_busy(operation, timeout):
    """Run ``operation``, retrying while SQLite reports a lock that its busy handler did not wait out
    (journal-mode changes and schema creation can fail at once when several processes start)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _sqlite_allow_waiting(conn):
    """Version 4 on SQLite: let lilota_task.status be 'waiting'. SQLite cannot alter a CHECK
    constraint; its documented way to loosen one is to edit the table's CREATE statement in
    sqlite_schema (writable_schema) and bump the schema cookie, in the migration's transaction.
    Every stored row satisfies the wider CHECK, so nothing else changes (see "Making Other Kinds
    Of Table Schema Changes" at sqlite.org/lang_altertable.html)."""
    old, new = (f"CHECK (status IN {_sql_list(statuses)})" for statuses in (_V1_STATUSES, frozenset(TaskStatus)))
    cookie = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("PRAGMA writable_schema = ON")
    try:
        changed = conn.execute("UPDATE sqlite_master SET sql = replace(sql, ?, ?) WHERE type = 'table' "
                               "AND name = 'lilota_task' AND instr(sql, ?) > 0", (old, new, old)).rowcount
        if changed:
            conn.execute(f"PRAGMA schema_version = {int(cookie) + 1}")
    finally:
        conn.execute("PRAGMA writable_schema = OFF")


class SQLiteDialect(Dialect):
    """SQLite through the standard library: WAL, a busy timeout, ``synchronous=NORMAL`` (or FULL).

    URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite:///:memory:``
    (one process only). Query options: ``timeout`` (busy timeout in seconds, default 30) and
    ``synchronous`` (NORMAL or FULL).
    """

    name = "sqlite"
    begin_write_sql = "BEGIN IMMEDIATE"  # take the write lock first: no deadlock on lock upgrade
    returning = sqlite3.sqlite_version_info >= (3, 35, 0)

    def __init__(self, url, parts):
        super().__init__(url, parts)
        if parts.netloc:
            raise ConfigurationError(f"SQLite URL {url!r} has a host part; write 'sqlite:///relative.db' "
                                     f"or 'sqlite:////absolute/path.db' (three or four slashes)")
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        options = dict(urllib.parse.parse_qsl(parts.query))
        unknown = set(options) - {"timeout", "synchronous"}
        if unknown:
            raise ConfigurationError(f"unknown SQLite URL option(s) {sorted(unknown)} in {url!r}; "
                                     f"known: timeout, synchronous")
        self.memory = path in ("", ":memory:")
        self.shared_between_processes = not self.memory
        self.path = path if self.memory else os.path.abspath(path)
        try:
            self.busy_timeout = float(options.get("timeout", 30))
        except ValueError:
            self.busy_timeout = -1.0
        if not 0 <= self.busy_timeout < math.inf:
            raise ConfigurationError(f"timeout in {url!r} must be a non-negative number of seconds")
        self.synchronous = options.get("synchronous", "NORMAL").upper()
        if self.synchronous not in ("NORMAL", "FULL", "OFF", "EXTRA"):
            raise ConfigurationError(f"synchronous in {url!r} must be NORMAL or FULL (or OFF/EXTRA)")

    @property
    def identity(self):
        return "sqlite::memory:" if self.memory else "sqlite:" + os.path.realpath(self.path)

    @property
    def connection_key(self):
        return f"{self.identity}?synchronous={self.synchronous}&timeout={self.busy_timeout:g}"

    @property
    def absolute_url(self):
        if self.memory:
            return self.url
        query = f"?{self.parts.query}" if self.parts.query else ""
        return f"sqlite:///{self.path}{query}"

    def describe(self):
        return "in-memory SQLite database" if self.memory else f"SQLite database {self.path!r}"

    def connect(self):
        if not self.memory:
            directory = os.path.dirname(self.path)
            if not os.path.isdir(directory):
                raise DatabaseUnavailableError(f"cannot open {self.describe()}: the directory {directory!r} "
                                               f"does not exist; create it or change db_url")
            if not os.path.exists(self.path):
                # Create the file ourselves so that it is readable by its owner only; SQLite gives
                # the -wal and -shm files the same mode.
                try:
                    os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise ReadOnlyDatabaseError(f"cannot create {self.describe()}: {exc.strerror}; "
                                                f"check the permissions of {directory!r}") from exc
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            if not self.memory:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if mode.lower() != "wal":
                    mode = _retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone(),
                                       self.busy_timeout)[0]
                if mode.lower() != "wal":  # e.g. a file system without shared memory
                    logger.warning("%s could not use WAL (journal_mode is %s): writers will block readers",
                                   self.describe(), mode)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            # Deleted content (an input dropped by keep_input=False, cleaned-up tasks) is overwritten,
            # in its page and in freed overflow pages, whatever default SQLite was built with.
            conn.execute("PRAGMA secure_delete=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def migrations(self):
        versions = _schema(id="TEXT", text="TEXT", integer="INTEGER", real="REAL", time="REAL",
                           json="TEXT", flag="INTEGER")
        # A claim that took a rate-limit slot uses it up until a period after this start. Writers
        # take turns in SQLite: the claim's own check that the slot was free still holds here.
        versions[2].append(
            "CREATE TRIGGER IF NOT EXISTS lilota_rate_slot_taken AFTER UPDATE OF rate_slot ON lilota_task "
            "WHEN NEW.rate_slot IS NOT NULL BEGIN "
            "UPDATE lilota_queue_rate SET free_at = NEW.locked_at + "
            "(SELECT rate_period FROM lilota_queue WHERE name = NEW.queue) "
            "WHERE queue = NEW.queue AND slot = NEW.rate_slot; END")
        versions[4].append(_sqlite_allow_waiting)
        # Any change to lilota_queue -- lilota's, or a row written by hand -- moves the version.
        versions[7] += [f"CREATE TRIGGER IF NOT EXISTS lilota_queue_{event.lower()}d AFTER {event} ON lilota_queue "
                        "BEGIN UPDATE lilota_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) "
                        "WHERE key = 'queues_version'; END" for event in ("INSERT", "UPDATE", "DELETE")]
        return versions

    def adopt_connection(self, raw):
        if not isinstance(raw, sqlite3.Connection):
            raise TypeError(f"connection= is {_connection_kind(raw)}, but db_url names the {self.describe()}: "
                            f"pass a sqlite3.Connection to that file")
        files = [row[2] for row in raw.execute("PRAGMA database_list").fetchall() if row[1] == "main"]
        if self.memory or not files or not files[0] or os.path.realpath(files[0]) != os.path.realpath(self.path):
            raise ValueError(f"connection= is connected to {files[0] if files and files[0] else 'an in-memory database'!r}, "
                             f"not to the {self.describe()} of db_url; connect it to that file")
        # sqlite3 opens a transaction itself before a write unless it is in autocommit mode
        # (isolation_level=None, or autocommit=True from Python 3.12 on).
        control = getattr(raw, "autocommit", -1)
        autocommit = not raw.in_transaction and (control is True or (control == -1 and raw.isolation_level is None))
        return raw, autocommit

    def begin_migration(self, conn):
        # BEGIN IMMEDIATE takes the write lock that serialises concurrent starters; when several
        # processes create the file at once it can fail at once instead of waiting: retry then.
        _retry_busy(lambda: conn.execute(self.begin_write_sql), self.busy_timeout)

    #: Parameters of one statement: the limit every SQLite build allows (newer ones allow more,
    #: which makes inserts no faster).
    max_parameters = 999

    def insert_rows(self, conn, table, columns, shared, chunks):
        # Many rows an INSERT: INSERT ... SELECT from a VALUES list of the rows' own values, the
        # shared ones numbered parameters (?1, ?2 ...) that every row reuses. Twice as fast as
        # executemany() of a one-row INSERT, which pays Python's and SQLite's work per statement
        # for each row.
        if sqlite3.sqlite_version_info < (3, 8, 3):   # VALUES in FROM came with 3.8.3
            return super().insert_rows(conn, table, columns, shared, chunks)
        width = len(columns)
        per_statement = (self.max_parameters - len(shared)) // width
        names = [name for name, _ in columns] + [name for name, _, _ in shared]
        picked = [f"column{i}" for i in range(1, width + 1)] + [f"?{i}" for i in range(1, len(shared) + 1)]
        head = f"INSERT INTO {table} ({', '.join(names)}) SELECT {', '.join(picked)} FROM (VALUES "
        row_marks = "(" + ", ".join(["?"] * width) + ")"
        values = [value for _, _, value in shared]
        full, full_sql = per_statement * width, head + ", ".join([row_marks] * per_statement) + ")"
        pending = []   # the values of rows not written yet, flat: they fill statements across chunks
        for chunk in chunks:
            pending.extend(itertools.chain.from_iterable(chunk))
            if len(pending) >= full:
                written = len(pending) - len(pending) % full
                for start in range(0, written, full):
                    conn.execute(full_sql, values + pending[start:start + full])
                del pending[:written]
        if pending:
            conn.execute(head + ", ".join([row_marks] * (len(pending) // width)) + ")", values + pending)

    def prepare_claim(self, defaults, queues, free=(), version=None):
        params = {}

        def param(key, value, cast):   # named: each value once, whatever number of times it is used
            if key not in _CLAIM_SLOTS:
                params[key] = value
            return ":" + key
        # INDEXED BY: the planner would rather take lilota_task_due for "run_at <= :now" and sort
        # every due task; the queue index yields them in claim order and stops at the first.
        update, pick = _claim_sql(defaults, queues, param, "{} + {}", index="INDEXED BY lilota_task_queue ",
                                  free=free, version=version)
        if self.returning:
            return _PreparedClaim(f"{update} WHERE id = ({pick}) RETURNING {_TASK_SELECT}", params)
        return _PreparedClaim((pick, f"{update} WHERE id = :id AND status = 'scheduled'",
                               f"SELECT {_TASK_SELECT} FROM lilota_task WHERE id = :id"), params)

    def complete_and_claim(self, conn, completion, prepared, node_id, pid, now, settle=None):
        if not self.returning:
            return None   # that claim is a transaction of its own
        with _Transaction(conn, self.begin_write_sql):
            changed = conn.execute(*completion).rowcount
            if changed and settle is not None:
                settle(conn)
            return changed, self.claim(conn, prepared, node_id, pid, now)

    def claim(self, conn, prepared, node_id, pid, now):
        sql, params = prepared.sql, prepared.params
        params = dict(params, node=node_id, pid=pid, now=now)   # the _CLAIM_SLOTS
        if self.returning:
            rows = conn.execute(sql, params).fetchall()  # fetch all: the statement ends only then
            return rows[0] if rows else None
        # SQLite before 3.35 has no RETURNING: the same three steps under one write lock.
        pick, update, fetch = sql
        with _Transaction(conn, self.begin_write_sql):
            row = conn.execute(pick, params).fetchone()
            if row is not None:
                params["id"] = row[0]
                conn.execute(update, params)
                row = conn.execute(fetch, params).fetchone()
        return row

    def change_counter(self, conn):
        return conn.execute("PRAGMA data_version").fetchone()[0]

    def file_identity(self):
        if self.memory:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return "missing"
        return (st.st_dev, st.st_ino)

    def translate_error(self, exc):
        if not isinstance(exc, sqlite3.Error):
            return None
        text = str(exc)
        where = self.describe()
        lowered = text.lower()
        if "locked" in lowered or "busy" in lowered:
            return DatabaseBusyError(f"{where} stayed locked by another connection for more than "
                                     f"{self.busy_timeout:g}s ({text}); raise ?timeout= in the URL or "
                                     f"find the process holding a long transaction")
        if "readonly" in lowered or "read-only" in lowered:
            return ReadOnlyDatabaseError(f"cannot write to {where}: it is read-only ({text}); give the "
                                         f"process write permission on the file and its directory")
        if "full" in lowered:
            return DatabaseFullError(f"cannot write to {where}: the database or disk is full ({text}); "
                                     f"free space or run cleanup() to delete old tasks")
        if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
            return CorruptDatabaseError(f"{where} is not a valid SQLite database ({text}); restore it "
                                        f"from a backup or point db_url at another file")
        if "unable to open" in lowered or "disk i/o" in lowered:
            return DatabaseUnavailableError(f"cannot open {where} ({text}); check that the path exists "
                                            f"and that the process may read and write it and its directory")
        if isinstance(exc, sqlite3.OperationalError) and "no such table" in lowered:
            return DatabaseUnavailableError(f"{where} lost its lilota tables ({text}); was the file "
                                            f"deleted or replaced while lilota was running?")
        return StorageError(f"{where}: {text}")


register_dialect("sqlite", SQLiteDialect)


# --- PostgreSQL -----------------------------------------------------------------------------------

class _Result:
    """What one statement returned, read whole (its ``rowcount``; ``fetchone()``, ``fetchall()``
    and iteration over its rows: none for a statement without a result), so that the
    connection's one cursor can run the next statement."""

    __slots__ = ("rowcount", "_rows", "_next")

    def __init__(self, cursor):
        self.rowcount = cursor.rowcount
        rows = cursor.fetchall() if _returned_rows(cursor) else []
        self._rows = rows if type(rows) is list else list(rows)   # pg8000's is a tuple; callers reorder it
        self._next = 0

    def fetchone(self):
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self):
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows

    def __iter__(self):
        return iter(self.fetchall())

    def close(self):
        """As a cursor's: nothing is held."""


_PGRES_TUPLES_OK = 2   # libpq's ExecStatusType of a result with rows (psycopg.pq.ExecStatus)


def _returned_rows(cursor):
    """Whether the statement just run on ``cursor`` returned rows (SELECT, RETURNING)."""
    pgresult = getattr(cursor, "pgresult", None)
    if pgresult is not None:
        # psycopg 3: its description makes an object per column at every call (80 µs for a
        # task's 26), where libpq's status is one attribute.
        return pgresult.status == _PGRES_TUPLES_OK
    return cursor.description is not None


class DBAPIConnection:
    """A DB-API 2.0 connection in the shape Storage uses (that of ``sqlite3``): ``execute()`` and
    ``executemany()`` return the statement's result (a _Result: rowcount, fetchone(), fetchall(),
    iteration), and ``in_transaction`` says whether a BEGIN is open. The connection must be in
    autocommit mode: lilota writes BEGIN and COMMIT itself."""

    __slots__ = ("raw", "in_transaction", "_cursor")

    def __init__(self, raw):
        self.raw = raw
        self.in_transaction = False
        # One cursor for every statement: a new one per statement made the one-by-one schedule()
        # on psycopg 3 about 5 % slower (measured on the insert alone).
        self._cursor = None

    def _statement_cursor(self):
        if self._cursor is None:
            self._cursor = self.raw.cursor()
        return self._cursor

    def execute(self, sql, params=()):
        cursor = self._statement_cursor()
        verb = sql[:8].upper()
        if verb.startswith("BEGIN"):
            self.in_transaction = True
        elif verb.startswith(("COMMIT", "ROLLBACK")):
            self.in_transaction = False
        if params:
            cursor.execute(sql, params)
        else:
            cursor.execute(sql)
        return _Result(cursor)

    def executemany(self, sql, seq_of_params):
        cursor = self._statement_cursor()
        cursor.executemany(sql, seq_of_params)
        return _Result(cursor)

    def copy_in(self, sql, blocks):
        """Run ``sql``, a PostgreSQL ``COPY ... FROM STDIN``, with the data ``blocks`` (str, in
        COPY's text format). psycopg 3 streams all the blocks into one COPY, sending each while
        the next is made; psycopg2 and pg8000 read the data they send from a file or an iterable,
        which would make the next block inside the driver -- where an exception cannot end the
        COPY cleanly -- so they get one COPY per block, each made before it begins."""
        raw = self.raw
        driver = type(raw).__module__.partition(".")[0]
        blocks = filter(None, blocks)
        first = next(blocks, None)
        if first is None:
            return   # no row: no COPY, whose statement trigger would wake the workers for nothing
        blocks = itertools.chain([first], blocks)
        if driver == "psycopg":
            with raw.cursor() as cursor, cursor.copy(sql) as copy:
                for block in blocks:
                    copy.write(block)   # an exception in between: psycopg ends the COPY as failed
        elif driver == "psycopg2":
            with raw.cursor() as cursor:
                for block in blocks:
                    cursor.copy_expert(sql, io.StringIO(block), size=len(block))
        elif driver == "pg8000":
            cursor = raw.cursor()
            for block in blocks:
                cursor.execute(sql, stream=[block])
        else:
            raise TypeError(f"COPY through {_connection_kind(raw)} is not supported; use psycopg, psycopg2 or pg8000")

    def fileno(self):
        raw = self.raw
        if hasattr(raw, "fileno"):
            return raw.fileno()
        # pg8000 (through 1.31) has no fileno() and no public way to its socket; _usock is that socket.
        return raw._usock.fileno()

    def close(self):
        self.in_transaction = False
        self.raw.close()


class _SchemaConnection(DBAPIConnection):
    """The application's connection (``schedule(..., connection=)``) when lilota's tables are in a
    schema of their own (``?schema=``): its statements name lilota_task in that schema, for the
    application's search_path is the application's."""

    __slots__ = ("table",)

    def __init__(self, raw, schema):
        super().__init__(raw)
        self.table = f'"{schema}".lilota_task'

    def execute(self, sql, params=()):
        return super().execute(sql.replace("lilota_task", self.table), params)

    def executemany(self, sql, seq_of_params):
        return super().executemany(sql.replace("lilota_task", self.table), seq_of_params)

    def copy_in(self, sql, blocks):
        return super().copy_in(sql.replace("lilota_task", self.table), blocks)


# PostgreSQL drivers in the order one is chosen when the URL names none:
# URL suffix -> (module to import, what to pip install)
#: The channel on which the end of a watched task is sent, in the schema of the table
#: (TG_TABLE_SCHEMA in a trigger): an identifier, so at most 63 bytes. Idle workers listen on
#: 'lilota_' || schema for queued tasks (schema version 1); waiters on this one.
_ENDED_CHANNEL_SQL = "left('lilota_ended_' || TG_TABLE_SCHEMA, 63)"
#: The schema that lilota_task is in, as the connection's search_path finds it (no row before
#: the table exists): that of the channels, outside a trigger.
_TASK_SCHEMA_SQL = ("SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.oid = to_regclass('lilota_task')")

_POSTGRES_DRIVERS = {
    "psycopg": ("psycopg", "psycopg[binary]"),
    "psycopg2": ("psycopg2", "psycopg2-binary"),
    "pg8000": ("pg8000", "pg8000"),
}

# SQLSTATE classes and codes (https://www.postgresql.org/docs/current/errcodes-appendix.html)
_PG_CONNECTION_LOST = ("08", "57P01", "57P02", "57P03", "57P05")
_PG_BUSY = ("40001", "40P01", "55P03")
_PG_SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,55}\Z")
# In JSON text: a string (kept as it is), or a number with a positive exponent (1e+16).
_STRING_OR_EXPONENT_FLOAT = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")|(-?\d+(?:\.\d+)?[eE]\+\d+)')


_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")   # what COPY's text format escapes


def _copy_field(value):
    """A value as a field of PostgreSQL's COPY text format: \\N for NULL, a time in ISO 8601, the
    characters that delimit fields and rows escaped."""
    if value is None:
        return "\\N"
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def _sqlstate(exc):
    """The SQLSTATE of a PostgreSQL driver's exception, or None (e.g. a network error)."""
    for attribute in ("sqlstate", "pgcode"):   # psycopg 3, psycopg2
        code = getattr(exc, attribute, None)
        if code:
            return code
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], dict):     # pg8000
        return args[0].get("C")
    return None


class PostgreSQLDialect(Dialect):
    """PostgreSQL through psycopg 3, psycopg2 or pg8000 (whichever the URL names, else the first
    installed): JSONB payloads, ``timestamptz`` times, a ``FOR UPDATE SKIP LOCKED`` claim, and
    LISTEN/NOTIFY so that idle workers wake when a task is queued.

    URLs: ``postgresql://user:password@host:port/database`` (also ``postgres://`` and
    ``postgresql+psycopg://``, ``+psycopg2``, ``+pg8000``). Query options go to the driver
    (``sslmode``, ``connect_timeout``, ``application_name`` ...), except lilota's own: ``schema``,
    the schema lilota's tables live in (created if missing; default: the server's search_path), and
    ``synchronous_commit``, set on each of lilota's connections (``off`` trades durability across a
    server crash for speed; default: the server's setting).
    """

    name = "postgresql"
    placeholder = "%s"
    time_param = "CAST(? AS timestamptz)"
    json_param = "CAST(? AS jsonb)"
    begin_write_sql = "BEGIN"
    settles_dependents = True   # the trigger lilota_settle_dependents (schema version 4)
    dependency_lock = " ORDER BY id FOR NO KEY UPDATE"
    #: Key of the advisory lock that serialises schema migrations.
    migration_lock_key = 0x6C696C6F7461  # "lilota"

    def __init__(self, url, parts):
        super().__init__(url, parts)
        driver = parts.scheme.lower().partition("+")[2]
        if driver and driver not in _POSTGRES_DRIVERS:
            raise ConfigurationError(f"unknown PostgreSQL driver {driver!r} in {self.describe()}; "
                                     f"use one of: " + ", ".join(f"postgresql+{d}://" for d in _POSTGRES_DRIVERS))
        self.driver = driver or None
        self.options = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        self.schema = self.options.pop("schema", None)
        if self.schema is not None and not _IDENTIFIER.match(self.schema):
            raise ConfigurationError(f"schema={self.schema!r} in {self.describe()} is not a plain "
                                     f"identifier (letters, digits, _; at most 56 characters)")
        self.synchronous_commit = self.options.pop("synchronous_commit", None)
        if self.synchronous_commit is not None:
            self.synchronous_commit = self.synchronous_commit.lower()
            if self.synchronous_commit not in _PG_SYNCHRONOUS_COMMIT:
                raise ConfigurationError(f"synchronous_commit={self.synchronous_commit!r} in {self.describe()} "
                                         f"must be one of: {', '.join(_PG_SYNCHRONOUS_COMMIT)}")
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError(f"the port in {self.describe()} is not a number") from None
        self.host = parts.hostname or self.options.pop("host", None)
        self.port = port or int(self.options.pop("port", 0) or 5432)
        self.user = urllib.parse.unquote(parts.username) if parts.username else None
        self.password = urllib.parse.unquote(parts.password) if parts.password else None
        self.database = urllib.parse.unquote(parts.path.lstrip("/")) or None
        self._module = None

    def describe(self):
        netloc = self._netloc()
        schema = f" (schema {self.schema})" if getattr(self, "schema", None) else ""
        return f"PostgreSQL database {self.parts.path.lstrip('/') or '(default)'!r} at {netloc or 'localhost'}{schema}"

    @property
    def identity(self):
        host = self.host or "localhost"
        if host in ("127.0.0.1", "::1"):   # the same server as "localhost" (or the default)
            host = "localhost"
        return f"postgresql://{host}:{self.port}/{self.database or self.user or ''}?schema={self.schema or ''}"

    @property
    def connection_key(self):
        options = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return (f"{self.identity}&driver={self.driver or ''}&user={self.user or ''}"
                f"&synchronous_commit={self.synchronous_commit or ''}&{options}")

    # --- connecting ---

    def _driver_module(self):
        if self._module is None:
            names = [self.driver] if self.driver else list(_POSTGRES_DRIVERS)
            for name in names:
                try:
                    self._module = importlib.import_module(_POSTGRES_DRIVERS[name][0])
                    self.driver = name
                    break
                except ImportError:
                    continue
            else:
                wanted = " or ".join(repr(_POSTGRES_DRIVERS[n][1]) for n in names)
                raise DriverNotInstalledError(f"{self.describe()} needs a PostgreSQL driver: pip install {wanted}")
        return self._module

    def _connect_raw(self):
        module = self._driver_module()
        options = dict(self.options)
        if self.driver == "pg8000":
            return self._connect_pg8000(module, options)
        options.setdefault("connect_timeout", "10")
        # A network that drops packets silently would block a statement (and the process's storage
        # lock) for many minutes: notice a dead peer within about 30 s instead.
        for option, value in (("keepalives", "1"), ("keepalives_idle", "10"), ("keepalives_interval", "5"),
                              ("keepalives_count", "3"), ("tcp_user_timeout", "30000")):
            options.setdefault(option, value)
        kwargs = {"host": self.host, "port": self.port, "user": self.user, "password": self.password,
                  "dbname": self.database}
        kwargs.update(options)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self.driver == "psycopg":
            conn = module.connect(autocommit=True, **kwargs)
            # Hand JSON columns over as text: lilota's one deserializer reads them.
            text_loader = importlib.import_module("psycopg.types.string").TextLoader
            conn.adapters.register_loader("jsonb", text_loader)
            conn.adapters.register_loader("json", text_loader)
        else:
            conn = module.connect(**kwargs)
            conn.autocommit = True
            extras = importlib.import_module("psycopg2.extras")
            extras.register_default_jsonb(conn_or_curs=conn, loads=lambda text: text)
            extras.register_default_json(conn_or_curs=conn, loads=lambda text: text)
        return conn

    def _connect_pg8000(self, module, options):
        kwargs = {"host": self.host or "localhost", "port": self.port, "database": self.database,
                  "user": self.user or getpass.getuser(), "password": self.password}
        sslmode = options.pop("sslmode", "prefer")
        if sslmode in ("disable", "allow"):
            kwargs["ssl_context"] = False    # pg8000's default (None) uses SSL whenever offered
        elif sslmode in ("require", "verify-ca", "verify-full"):
            import ssl
            context = ssl.create_default_context()
            if sslmode == "require":
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif sslmode == "verify-ca":
                context.check_hostname = False
            kwargs["ssl_context"] = context
        elif sslmode != "prefer":
            raise ConfigurationError(f"sslmode={sslmode!r} in {self.describe()} is not a libpq sslmode")
        kwargs["timeout"] = float(options.pop("connect_timeout", 10))
        if "application_name" in options:
            kwargs["application_name"] = options.pop("application_name")
        if options:
            raise ConfigurationError(f"URL option(s) {sorted(options)} are not supported with pg8000 "
                                     f"({self.describe()}); it knows sslmode, connect_timeout, application_name")
        conn = module.dbapi.connect(**{k: v for k, v in kwargs.items() if v is not None})
        # pg8000's timeout holds for every later read too: keep it for connecting only (a long
        # statement is not a lost server; TCP keepalive, on by default, finds a dead peer). pg8000
        # offers no public way to change it once connected: _usock is its socket.
        conn._usock.settimeout(None)
        conn.autocommit = True
        for oid in (114, 3802):   # json, jsonb: as text, for lilota's one deserializer
            conn.register_in_adapter(oid, lambda text: text)
        return conn

    def connect(self):
        raw = self._connect_raw()
        conn = DBAPIConnection(raw)
        try:
            conn.execute("SET TIME ZONE 'UTC'")
            if self.synchronous_commit:   # checked against a fixed list: safe to write into SQL
                conn.execute(f"SET synchronous_commit TO {self.synchronous_commit}")
            if self.schema:
                conn.execute(f'SET search_path TO "{self.schema}"')
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    # --- schema ---

    def begin_migration(self, conn):
        # CREATE ... IF NOT EXISTS is not safe against a concurrent twin in PostgreSQL; this lock,
        # held until the transaction ends, makes every other starting process wait here.
        conn.execute("BEGIN")
        conn.execute(f"SELECT pg_advisory_xact_lock({self.migration_lock_key})")
        if self.schema:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')

    def migrations(self):
        versions = _schema(id="uuid", text="text", integer="integer", real="double precision",
                           time="timestamptz", json="jsonb", flag="smallint")
        extra = {
            1: [
                # Wake-up: whoever queues a task -- schedule(), a retry, a requeue, a row written
                # by hand -- notifies the listening workers of this schema, once per transaction.
                """CREATE OR REPLACE FUNCTION lilota_notify_queued() RETURNS trigger
                   LANGUAGE plpgsql AS $$
                   BEGIN
                       PERFORM pg_notify('lilota_' || TG_TABLE_SCHEMA, '');
                       RETURN NULL;
                   END $$""",
                "CREATE TRIGGER lilota_task_inserted AFTER INSERT ON lilota_task "
                "FOR EACH STATEMENT EXECUTE FUNCTION lilota_notify_queued()",
                "CREATE TRIGGER lilota_task_requeued AFTER UPDATE OF status ON lilota_task FOR EACH ROW "
                "WHEN (NEW.status = 'scheduled' AND OLD.status <> 'scheduled') "
                "EXECUTE FUNCTION lilota_notify_queued()",
            ],
            2: [
                # A claim that took a rate-limit slot uses it up until a period after this start.
                # Each statement of a function sees what was committed before it: a concurrent
                # claim that took the same slot first makes this one fail (_ClaimConflict).
                """CREATE OR REPLACE FUNCTION lilota_rate_slot_taken() RETURNS trigger
                   LANGUAGE plpgsql AS $$
                   BEGIN
                       UPDATE lilota_queue_rate AS g
                          SET free_at = NEW.locked_at + make_interval(secs => q.rate_period)
                         FROM lilota_queue AS q
                        WHERE g.queue = NEW.queue AND g.slot = NEW.rate_slot AND q.name = NEW.queue
                          AND g.free_at <= NEW.locked_at;
                       IF NOT FOUND THEN
                           RAISE EXCEPTION 'lilota: rate-limit slot % of queue % was taken', NEW.rate_slot,
                               NEW.queue USING ERRCODE = 'LQ001';
                       END IF;
                       RETURN NULL;
                   END $$""",
                "CREATE TRIGGER lilota_rate_slot_taken AFTER UPDATE OF rate_slot ON lilota_task FOR EACH ROW "
                "WHEN (NEW.rate_slot IS NOT NULL) EXECUTE FUNCTION lilota_rate_slot_taken()",
                # Wake idle workers when a limit may have freed: a running task of a limited queue
                # ended (it held a slot), or a queue was resumed or its limits changed.
                "CREATE TRIGGER lilota_task_slot_freed AFTER UPDATE OF status ON lilota_task FOR EACH ROW "
                "WHEN (OLD.status = 'running' AND NEW.status <> 'running' AND OLD.slot IS NOT NULL) "
                "EXECUTE FUNCTION lilota_notify_queued()",
                "CREATE TRIGGER lilota_queue_changed AFTER INSERT OR UPDATE ON lilota_queue "
                "FOR EACH STATEMENT EXECUTE FUNCTION lilota_notify_queued()",
            ],
            4: [
                "ALTER TABLE lilota_task DROP CONSTRAINT IF EXISTS lilota_task_status_check",
                f"ALTER TABLE lilota_task ADD CONSTRAINT lilota_task_status_check "
                f"CHECK (status IN {_sql_list(TaskStatus)})",
                # What Storage._settle does on SQLite, done by the database: whatever ends a task
                # -- a completion that claims the next in the same statement, a failure, cancel(),
                # a crash recovery, a row updated by hand -- settles its dependents in its own
                # transaction. The closure of the dependents a failure ends is one recursive query;
                # the trigger, firing again for each of them, returns at once (its depth is 2).
                f"""CREATE OR REPLACE FUNCTION lilota_settle_dependents() RETURNS trigger
                   LANGUAGE plpgsql AS $$
                   DECLARE ended uuid[] := '{{}}';
                   BEGIN
                       IF pg_trigger_depth() > 1
                          OR NOT EXISTS (SELECT 1 FROM lilota_dependency WHERE depends_on = NEW.id) THEN
                           RETURN NULL;
                       END IF;
                       IF NEW.status <> 'completed' THEN
                           WITH RECURSIVE reach(id, via) AS (
                               {_DOOMED_SQL.format(root='NEW.id')}),
                           cause AS (
                               SELECT DISTINCT ON (r.id) r.id, r.via,
                                      CASE WHEN r.via = NEW.id THEN NEW.status
                                           WHEN v.on_failure = 'fail' THEN 'failed' ELSE 'cancelled' END AS ended
                                 FROM reach r JOIN lilota_task v ON v.id = r.via
                                ORDER BY r.id, r.via = NEW.id DESC, r.via),
                           done AS (
                               UPDATE lilota_task t
                                  SET status = CASE WHEN t.on_failure = 'fail' THEN 'failed' ELSE 'cancelled' END,
                                      end_date_time = COALESCE(NEW.end_date_time, now()),
                                      error = jsonb_build_object('type', 'DependencyFailedError',
                                          'message', {_sql_format(_DEPENDENCY_FAILED, via='c.via',
                                                                  ended='c.ended', on_failure='t.on_failure')},
                                          'traceback', '', 'dependency', c.via::text)
                                 FROM cause c WHERE t.id = c.id AND t.status = 'waiting'
                                RETURNING t.id)
                           SELECT COALESCE(array_agg(id), '{{}}') INTO ended FROM done;
                       END IF;
                       -- Two dependencies of one task ending in concurrent transactions: the
                       -- second waits here for the first to commit, and then sees it ended.
                       PERFORM 1 FROM lilota_task WHERE status = 'waiting' AND id IN
                           (SELECT task_id FROM lilota_dependency WHERE depends_on = NEW.id
                                OR depends_on = ANY(ended)) ORDER BY id FOR UPDATE;
                       UPDATE lilota_task t SET status = 'scheduled'
                        WHERE t.status = 'waiting' AND t.id IN (SELECT task_id FROM lilota_dependency
                              WHERE depends_on = NEW.id OR depends_on = ANY(ended))
                          AND {_NO_OPEN_DEPENDENCY_SQL.format(task='t')};
                       RETURN NULL;
                   END $$""",
                "CREATE TRIGGER lilota_task_settle_dependents AFTER UPDATE OF status ON lilota_task FOR EACH ROW "
                f"WHEN (NEW.status IN {_sql_list(_FINISHED)} AND OLD.status NOT IN {_sql_list(_FINISHED)}) "
                "EXECUTE FUNCTION lilota_settle_dependents()",
            ],
            7: [
                # Settle only the ends of tasks that have dependents: the others' ends (the drain)
                # call no function.
                "DROP TRIGGER IF EXISTS lilota_task_settle_dependents ON lilota_task",
                "CREATE TRIGGER lilota_task_settle_dependents AFTER UPDATE OF status ON lilota_task FOR EACH ROW "
                f"WHEN (NEW.status IN {_sql_list(_FINISHED)} AND OLD.status NOT IN {_sql_list(_FINISHED)} "
                "AND NEW.has_dependents = 1) EXECUTE FUNCTION lilota_settle_dependents()",
                # wait(): the end of a watched task, or its deletion, is sent to the waiters of this
                # schema (its id as the payload) when the transaction that ended it commits.
                f"""CREATE OR REPLACE FUNCTION lilota_notify_ended() RETURNS trigger
                   LANGUAGE plpgsql AS $$
                   BEGIN
                       PERFORM pg_notify({_ENDED_CHANNEL_SQL}, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END::text);
                       RETURN NULL;
                   END $$""",
                "CREATE TRIGGER lilota_task_ended_watched AFTER UPDATE OF status ON lilota_task FOR EACH ROW "
                f"WHEN (NEW.watched = 1 AND NEW.status IN {_sql_list(_FINISHED)} "
                f"AND OLD.status NOT IN {_sql_list(_FINISHED)}) EXECUTE FUNCTION lilota_notify_ended()",
                "CREATE TRIGGER lilota_task_deleted_watched AFTER DELETE ON lilota_task FOR EACH ROW "
                "WHEN (OLD.watched = 1) EXECUTE FUNCTION lilota_notify_ended()",
                # Any change to lilota_queue -- lilota's, or a row written by hand -- moves the
                # version of the queue settings, in its transaction.
                """CREATE OR REPLACE FUNCTION lilota_queue_settings_changed() RETURNS trigger
                   LANGUAGE plpgsql AS $$
                   BEGIN
                       UPDATE lilota_meta SET value = (CAST(value AS bigint) + 1)::text WHERE key = 'queues_version';
                       RETURN NULL;
                   END $$""",
                "CREATE TRIGGER lilota_queue_settings_changed AFTER INSERT OR UPDATE OR DELETE ON lilota_queue "
                "FOR EACH STATEMENT EXECUTE FUNCTION lilota_queue_settings_changed()",
            ],
        }
        return {version: statements + extra.get(version, []) for version, statements in versions.items()}

    def adopt_connection(self, raw):
        driver = type(raw).__module__.partition(".")[0]
        if driver not in _POSTGRES_DRIVERS:
            raise TypeError(f"connection= is {_connection_kind(raw)}, but db_url names the {self.describe()}: "
                            f"pass a psycopg, psycopg2 or pg8000 connection to it")
        if not hasattr(raw, "cursor") or type(raw).__name__.startswith("Async"):
            raise TypeError(f"connection= is {_connection_kind(raw)}, which is not a DB-API connection: "
                            f"pass psycopg.connect(...), psycopg2.connect(...) or pg8000.dbapi.connect(...)")
        conn = _SchemaConnection(raw, self.schema) if self.schema else DBAPIConnection(raw)
        return conn, bool(getattr(raw, "autocommit", False))

    #: The first key of the advisory locks on unique keys (the second: the key's hashtext). Locks of
    #: two int4 keys and of one bigint key (the migration's) do not conflict.
    unique_lock_class = 0x6C696C6F   # "lilo"

    def insert_rows(self, conn, table, columns, shared, chunks):
        # COPY: the server parses rows as they stream in, while the next chunk is made here; many
        # times faster than an INSERT per row. COPY fires the statement's triggers as INSERT does
        # (lilota_task_inserted: the NOTIFY that wakes the workers) and checks every constraint.
        names = [name for name, _ in columns] + [name for name, _, _ in shared]
        tail = "".join("\t" + _copy_field(value) for _, _, value in shared) + "\n"

        def block(chunk):
            rows = list(chunk)
            values = list(itertools.chain.from_iterable(rows))
            # The common chunk -- texts with nothing to escape, as ids and lilota's JSON are -- is
            # written by C loops, without a call of _copy_field per value.
            if set(map(type, values)) <= {str} and not _COPY_SPECIAL.search("".join(values)):
                return tail.join(map("\t".join, rows)) + tail if rows else ""
            return "".join(["\t".join(map(_copy_field, row)) + tail for row in rows])
        conn.copy_in(f"COPY {table} ({', '.join(names)}) FROM STDIN", map(block, chunks))

    def lock_unique_keys(self, conn, keys):
        # Only the schedulers of the same key (or of one whose hash is the same) wait for each other.
        # Up to 1,000 keys a statement, locked in the order given (WITH ORDINALITY ... ORDER BY: a
        # volatile function in the select list runs after the sort), as one statement per key did.
        for start in range(0, len(keys), 1000):
            conn.execute(f"SELECT pg_advisory_xact_lock({self.unique_lock_class}, hashtext(key)) "
                         "FROM unnest(CAST(%s AS text[])) WITH ORDINALITY AS given(key, position) ORDER BY position",
                         (list(keys[start:start + 1000]),)).fetchall()

    # --- the claim ---

    def prepare_claim(self, defaults, queues, free=(), version=None):
        def statement(finished=""):
            params = []

            def param(key, value, cast):   # positional: in the order the placeholders appear
                params.append(_CLAIM_SLOTS.get(key, value))
                return f"CAST(%s AS {cast})" if cast else "%s"
            # SKIP LOCKED: concurrent claimers take the next row instead of queueing behind a lock.
            update, pick = _claim_sql(defaults, queues, param, "{} + make_interval(secs => {})",
                                      lock=" FOR UPDATE SKIP LOCKED", finished=finished, free=free, version=version)
            return f"{update} WHERE id = ({pick}) RETURNING {_TASK_SELECT}", tuple(params)
        # After a completion in the same statement, whose snapshot still sees the completed task
        # running: without "done" a worker of a limited queue would find its own slot taken.
        return _PreparedClaim(*statement(), after_completion=statement(finished="SELECT id FROM done"))

    def claim(self, conn, prepared, node_id, pid, now):
        return conn.execute(prepared.sql, self._claim_params(prepared.params, node_id, pid, now)).fetchone()

    def complete_and_claim(self, conn, completion, prepared, node_id, pid, now, settle=None):
        # One statement: one round trip and one commit. Every data-modifying WITH clause runs, once,
        # in one snapshot; the completed row is running, so the claim cannot pick it. The outer
        # join returns the completion's count when there is no task left to claim. The claim reads
        # "done" where it counts a limited queue's running tasks (see prepare_claim): that runs the
        # completion first, so the slot it frees can be taken again without a unique-index conflict.
        complete_sql, complete_params = completion
        claim_sql, claim_params = prepared.after_completion
        row = conn.execute(
            f"WITH done AS ({complete_sql} RETURNING id), claimed AS ({claim_sql}) "
            f"SELECT (SELECT COUNT(*) FROM done), claimed.* FROM (SELECT 1) AS one LEFT JOIN claimed ON TRUE",
            [*complete_params, *self._claim_params(claim_params, node_id, pid, now)]).fetchone()
        return row[0], (row[1:] if row[1] is not None else None)

    def _claim_params(self, params, node_id, pid, now):
        node, pid_, now_ = _CLAIM_SLOTS.values()
        return [node_id if p is node else pid if p is pid_ else now if p is now_ else p for p in params]

    # --- types ---

    def encode_time(self, seconds):
        return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)

    def decode_time(self, value):
        return None if value is None else value.astimezone(timezone.utc)

    def minute_sql(self, column):
        return f"FLOOR((EXTRACT(EPOCH FROM {column}) - CAST(? AS double precision)) / 60)"

    def encode_json(self, text):
        # JSONB keeps numbers as numeric, which prints 1e+16 as 10000000000000000: an int when read
        # back. Written out in full with ".0", such a float comes back a float, and the same one.
        if text is not None and "e+" in text:
            text = _STRING_OR_EXPONENT_FLOAT.sub(
                lambda m: m.group(1) or format(Decimal(m.group(2)), "f") + ".0", text)
        return text

    # --- wake-up and errors ---

    def listen(self, event="queued"):
        return _PostgresListener(self, event)

    def mark_watched(self, conn, task_ids):
        # The mark locks the row for a moment, and a claim (SKIP LOCKED) then passes a queued task
        # by and may go idle: the same statement wakes the workers when it marked a queued task.
        # Its commit need not wait for the disk: a mark lost in a crash of the server costs a
        # waiter -- whose listener then broke and who reads every waited task again -- nothing.
        marks = ", ".join("?" for _ in task_ids)
        return {str(row[0]) for row in conn.execute(self.sql(
            f"WITH marked AS (UPDATE lilota_task SET watched = 1 WHERE id IN ({marks}) AND watched = 0 "
            f"RETURNING id, status), "
            f"quick AS (SELECT set_config('synchronous_commit', 'off', true)), "
            f"woken AS (SELECT pg_notify(left('lilota_' || ({_TASK_SCHEMA_SQL}), 63), '') "
            f"WHERE EXISTS (SELECT 1 FROM marked WHERE status = 'scheduled')) "
            # (A WITH that only reads runs only where it is read: hence the joins and the count.)
            f"SELECT id FROM marked, quick WHERE (SELECT COUNT(*) FROM woken) >= 0 "
            f"UNION ALL SELECT id FROM lilota_task WHERE id IN ({marks}) AND watched = 1"),
            list(task_ids) * 2).fetchall()}

    def missing_table(self, exc):
        return _sqlstate(exc) in ("42P01", "3F000")   # undefined table, undefined schema

    def connection_closed(self, conn):
        # Between statements the server says nothing, unless it is going away: a termination
        # notice, or the end of the stream. Either way this connection is finished.
        try:
            return bool(select.select([conn.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def _is_driver_error(self, exc):
        # pg8000 lets some socket errors (a reset connection) out unwrapped: OSError is ours too.
        module = self._module
        return module is not None and isinstance(exc, (getattr(module, "Error", ()), OSError))

    def connection_lost(self, exc):
        if not isinstance(exc, Exception):
            # KeyboardInterrupt or a task's interruption inside a statement: the driver may have
            # sent it and not read the reply. That connection is out of step; open another.
            return self._module is not None
        if not self._is_driver_error(exc):
            return False
        code = _sqlstate(exc)
        if code is None:
            # No SQLSTATE: the driver's own network or closed-connection error, or the socket's.
            return isinstance(exc, (self._module.OperationalError, self._module.InterfaceError, OSError))
        return code.startswith(_PG_CONNECTION_LOST)

    def translate_error(self, exc):
        if not self._is_driver_error(exc):
            return None
        code = _sqlstate(exc) or ""
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc.args[0] if exc.args else None, dict):   # pg8000's error dict
            first_line = exc.args[0].get("M", first_line)
        where = self.describe()
        # psycopg reports a refused login without a SQLSTATE: its message says which it was.
        if code == "3D000" or (not code and re.search(r'database "[^"]*" does not exist', first_line)):
            return DatabaseUnavailableError(f"{where} does not exist ({first_line}); create it "
                                            f"(createdb {self.database or ''}) or change db_url")
        if code.startswith("28") or (not code and re.search(r"authentication failed|no pg_hba\.conf entry|"
                                                            r"role \"[^\"]*\" does not exist", first_line)):
            return DatabaseUnavailableError(f"{where} refused the login ({first_line}); check the user and "
                                            f"password in db_url and the server's pg_hba.conf")
        if self.connection_lost(exc) or (code.startswith(("53", "57P")) and code != "53100"):
            return DatabaseUnavailableError(f"cannot reach {where} ({first_line}); lilota reconnects "
                                            f"when it is back -- check that the server runs and accepts this URL")
        if code == "LQ001" or (code == "23505" and "lilota_task_slot" in str(exc)):
            return _ClaimConflict(f"{where}: {first_line}")
        if code in _PG_BUSY:
            return DatabaseBusyError(f"{where} could not lock a row in time ({first_line}); retry")
        if code == "25006":
            return ReadOnlyDatabaseError(f"cannot write to {where}: the server is read-only "
                                         f"({first_line}); point db_url at the primary")
        if code == "53100":
            return DatabaseFullError(f"cannot write to {where}: its disk is full ({first_line}); free space "
                                     f"or run cleanup() to delete old tasks")
        if code == "42P01":
            return DatabaseUnavailableError(f"{where} lost its lilota tables ({first_line}); were they "
                                            f"dropped while lilota was running?")
        if code == "22P05":
            return UnserializableError(f"PostgreSQL cannot store this payload in JSONB ({first_line}); "
                                       f"the character U+0000 is not allowed in its strings")
        if code == "54000":
            return UnserializableError(f"PostgreSQL cannot store this payload ({first_line}); make it smaller")
        if code == "42501":
            return ReadOnlyDatabaseError(f"{where}: permission denied ({first_line}); grant the user "
                                         f"rights on lilota's tables and schema")
        return StorageError(f"{where}: {first_line}")


register_dialect("postgresql", PostgreSQLDialect)
register_dialect("postgres", PostgreSQLDialect)


# --- The PostgreSQL listener ----------------------------------------------------------------------

class _PostgresListener:
    """A connection of its own that LISTENs for "tasks were queued" in lilota's schema (``event``
    "queued"), or for "a watched task ended" ("ended"). An idle worker selects on its socket;
    whatever arrives there is a reason to claim again (a waiter: to look at its tasks again). The
    worker's keeper thread drains it while a task runs, hence the lock. Its Storage drops it in a
    child made by fork (Storage._adopt), which must not use the parent's socket."""

    #: The channel's name before the schema's, as the triggers of schema versions 1 and 7 build it.
    prefixes = {"queued": "lilota_", "ended": "lilota_ended_"}

    def __init__(self, dialect, event="queued"):
        self.dialect = dialect
        self.prefix = self.prefixes[event]
        self.conn = None
        self.lock = threading.Lock()
        # The payloads that arrived ("ended": the task ids), as the driver hands them over; for
        # "queued" only that one came matters.
        self.received = collections.deque(maxlen=None if event == "ended" else 1)

    def fileno(self):
        """Connect and LISTEN if not done yet (again after the connection broke), and return the
        socket to wait on; None while the server cannot be reached."""
        with self.lock:
            if self.conn is None:
                try:
                    self.conn = self._connect()
                except Exception:
                    logger.debug("cannot listen for notifications from %s", self.dialect.describe(),
                                 exc_info=True)
                    return None
            try:
                return self.conn.fileno()
            except Exception:
                self._close()
                return None

    def _connect(self):
        conn = self.dialect.connect()
        try:
            raw = conn.raw
            # Each driver keeps the notifications it read in its own way; lilota's deque holds
            # what it needs of them.
            if self.dialect.driver == "psycopg":
                raw.add_notify_handler(lambda notification: self.received.append(notification.payload))
            elif self.dialect.driver == "psycopg2":
                raw.notifies = self.received   # psycopg2's Notify objects
            else:
                raw.notifications = self.received   # pg8000's (pid, channel, payload) tuples
            row = conn.execute(_TASK_SCHEMA_SQL).fetchone()
            channel = (self.prefix + (row[0] if row else "public"))[:63]   # as left(..., 63) in SQL
            conn.execute('LISTEN "' + channel.replace('"', '""') + '"')
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def drain(self):
        """Consume what arrived, if anything did (without waiting): the drivers read notifications
        while they read a reply. Unread, they would pile up in the server's queue. Returns the
        payloads that arrived (none: an empty list), or None when the connection broke (what it
        missed is unknown)."""
        if not self.lock.acquire(blocking=False):
            return []   # the other thread is at it
        try:
            if self.conn is not None and select.select([self.conn.fileno()], [], [], 0)[0]:
                self._read()
            payloads = []
            while self.received:
                notification = self.received.popleft()
                payloads.append(notification if isinstance(notification, str) else
                                notification[2] if isinstance(notification, tuple) else notification.payload)
            return payloads
        except Exception:
            self._close()   # broken: the next fileno() reconnects and LISTENs again
            return None
        finally:
            self.lock.release()

    def _read(self):
        """Read what the server sent into ``received``: without a query where the driver can (a
        round trip less between a task's end and its waiter), else by one."""
        raw = self.conn.raw
        if self.dialect.driver == "psycopg":
            raw.pgconn.consume_input()
            while True:
                notification = raw.pgconn.notifies()
                if notification is None:
                    return
                self.received.append(notification.extra.decode())
        elif self.dialect.driver == "psycopg2":
            raw.poll()
        else:
            self.conn.execute("SELECT 1").fetchall()

    def close(self):
        with self.lock:
            self._close()

    def _close(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            _close_quietly(conn)


# --- Storage --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _host_key():
    """What makes a pid meaningful: the machine, its boot and the pid namespace. Two containers
    with the same hostname but their own pid namespaces get different keys."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("-")
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        parts.append("-")
    return "/".join(parts)


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _named_params(text):
    """A statement written with ``:name`` parameters (a name may repeat) as one with ``?``, and a
    function that takes the values by name and returns them in the order of the ``?``."""
    names = []
    text = re.sub(r"(?<![:\w]):([a-z_]+)", lambda match: names.append(match.group(1)) or "?", text)
    return text, lambda **values: tuple(values[name] for name in names)


#: Up to this many tasks in one call are written by the one-row INSERT (executemany): a statement
#: built for their number (SQLite) or a COPY (PostgreSQL: a round trip more) would cost more.
_FEW_TASKS = 10


class _TaskBatch(typing.NamedTuple):
    """What the tasks of one schedule() or schedule_many() call (or one periodic slot) share, as
    Storage.insert_tasks takes it."""

    name: str
    priority: int = 0
    run_at: typing.Optional[float] = None          # epoch seconds; None: due when stored
    max_attempts: typing.Optional[int] = None
    timeout: typing.Optional[float] = None         # seconds
    queue: str = DEFAULT_QUEUE
    unique_for: typing.Optional[float] = None      # seconds: the window of a unique key
    scheduled_for: typing.Optional[float] = None   # epoch seconds: a periodic schedule's slot


class Storage:
    """Every read and write lilota makes, over one connection per process and database."""

    _instances = {}
    _instances_lock = threading.Lock()

    @classmethod
    def for_url(cls, url):
        """The process's storage for ``url`` (created on first use, recreated after a fork)."""
        return cls.for_dialect(_dialect_for_url(url))

    @classmethod
    def for_dialect(cls, dialect):
        """The process's storage for the database a parsed URL names."""
        key = dialect.connection_key
        with cls._instances_lock:
            storage = cls._instances.get(key)
            if storage is None or storage._forked():
                storage = cls._instances[key] = cls(dialect)
            return storage

    def __init__(self, dialect):
        self.dialect = dialect
        self._lock = threading.RLock()
        self._depth = 0               # nesting of operations in the thread holding the lock
        self._conn = None
        self._owner_pid = os.getpid()
        self._guard = self            # "with self._guard as conn": one operation (__enter__)
        self._file = None             # the dialect's file_identity() when the connection was opened
        self._file_check_at = 0.0     # monotonic time of the next look at it
        sql = dialect.sql
        # Statements write ``?`` for a plain parameter and {ts} / {js} for a time / JSON one.
        ts, js = dialect.time_param, dialect.json_param
        self._listener = None         # the workers' "tasks were queued" (listen_fd)
        # How to wake the idle standalone workers of this process that use this Storage: the
        # commits of their own connection do not move their change counter (SQLite).
        self.local_wakers = set()
        self._ended_listener = None   # the waiters' "a watched task ended" (listen_ended)
        # How a stored value becomes the Task's, for the columns of _TASK_TABLE that need it, and
        # the nullable columns, whose NULL stays None.
        by_kind = {"id": lambda v: uuid.UUID(str(v)), "time": dialect.decode_time, "json": dialect.decode_json,
                   "real": lambda v: timedelta(seconds=float(v)), "flag": bool, "status": TaskStatus,
                   "ids": lambda v: [uuid.UUID(i) for i in dialect.decode_json(v)]}
        self._decoders = {column: by_kind[kind] for column, kind, _ in _TASK_TABLE if kind in by_kind}
        self._nullable = {column for column, _, constraints in _TASK_TABLE
                          if "NOT NULL" not in constraints and "PRIMARY KEY" not in constraints}
        self._unreachable_at = -math.inf   # time.monotonic() when the database was last out of reach
        # Hot statements, translated once.
        # The columns a new task's row is written with (the others keep their defaults: attempts,
        # progress_percentage and cancel_requested start at 0) and the placeholder of each: the
        # task's own id, input and unique key, then those that the tasks of one call share
        # (_shared_task_values, in this order).
        self._new_task_columns = (
            ("id", "?"), ("input", js), ("unique_key", "?"), ("name", "?"), ("status", "?"), ("priority", "?"),
            ("run_at", ts), ("max_attempts", "?"), ("timeout", "?"), ("created_at", ts), ("queue", "?"),
            ("scheduled_for", ts), ("depends_on", js), ("on_failure", "?"), ("end_date_time", ts), ("error", js))
        self._insert_sql = sql(f"INSERT INTO lilota_task ({', '.join(name for name, _ in self._new_task_columns)}) "
                               f"VALUES ({', '.join(mark for _, mark in self._new_task_columns)})")
        # A task whose cancel() was answered "being stopped" ends cancelled even when it finished
        # before it could be stopped: its result is discarded, as cancel() promised.
        self._complete_sql = sql(
            "UPDATE lilota_task SET "
            "status = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'completed' END, "
            f"output = CASE WHEN cancel_requested = 1 THEN NULL ELSE {js} END, "
            f"error = CASE WHEN cancel_requested = 1 THEN {js} ELSE error END, end_date_time = {ts}, "
            "progress_percentage = CASE WHEN ? THEN progress_percentage ELSE 100 END, "
            "input = CASE WHEN keep_input = 0 THEN NULL ELSE input END "
            "WHERE id = ? AND status = 'running' AND locked_by = ?")
        self._cancelled_late_json = dumps(_error_record(
            TaskCancelledError("cancelled while running; it finished before it could be stopped and its "
                               "result was discarded")), "error")
        # Ends an attempt that did not complete. A task queued again is unlocked; one whose cancel
        # was asked for while it ran ends cancelled instead of running again.
        fail_sql, self._fail_params = _named_params(
            "UPDATE lilota_task SET "
            "status = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE :status END, "
            f"run_at = COALESCE({ts.replace('?', ':run_at')}, run_at), "
            f"end_date_time = CASE WHEN cancel_requested = 1 THEN {ts.replace('?', ':now')} "
            f"ELSE {ts.replace('?', ':end')} END, error = {js.replace('?', ':error')}, attempts = attempts - :given_back, "
            "input = CASE WHEN keep_input = 0 AND NOT (:requeue AND cancel_requested = 0) THEN NULL ELSE input END, "
            "locked_by = CASE WHEN :requeue AND cancel_requested = 0 THEN NULL ELSE locked_by END, "
            "locked_at = CASE WHEN :requeue AND cancel_requested = 0 THEN NULL ELSE locked_at END "
            "WHERE id = :id AND status = 'running' AND locked_by = :node")
        self._fail_sql = sql(fail_sql)
        # A task that raised Retry: queued again at the time it asked for, its attempt given back,
        # its last error kept, its progress from 0 again; a cancel asked for while it ran wins.
        self._snooze_sql = sql(
            "UPDATE lilota_task SET "
            "status = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'scheduled' END, "
            f"run_at = CASE WHEN cancel_requested = 1 THEN run_at ELSE {ts} END, "
            f"end_date_time = CASE WHEN cancel_requested = 1 THEN {ts} ELSE NULL END, "
            f"error = CASE WHEN cancel_requested = 1 THEN {js} ELSE error END, "
            "attempts = CASE WHEN cancel_requested = 1 THEN attempts ELSE attempts - 1 END, "
            "progress_percentage = CASE WHEN cancel_requested = 1 THEN progress_percentage ELSE 0 END, "
            "input = CASE WHEN keep_input = 0 AND cancel_requested = 1 THEN NULL ELSE input END, "
            "locked_by = CASE WHEN cancel_requested = 1 THEN locked_by ELSE NULL END, "
            "locked_at = CASE WHEN cancel_requested = 1 THEN locked_at ELSE NULL END "
            "WHERE id = ? AND status = 'running' AND locked_by = ?")
        self._cancelled_retry_json = dumps(_error_record(
            TaskCancelledError("cancelled while running; the task asked to run again (Retry), which the "
                               "cancel overrides")), "error")
        # The record of an attempt that ends other than by complete(), from its task's row: the
        # task's attempt count, node, pid and start; cancelled when a cancel was asked meanwhile.
        self._attempt_sql = sql(
            "INSERT INTO lilota_attempt (task_id, seq, number, node, pid, started_at, ended_at, outcome, error) "
            "SELECT id, COALESCE((SELECT MAX(a.seq) FROM lilota_attempt a WHERE a.task_id = lilota_task.id), 0) + 1, "
            f"attempts, locked_by, pid, start_date_time, {ts}, "
            f"CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE CAST(? AS TEXT) END, {js} "
            "FROM lilota_task WHERE id = ? AND status = 'running' AND locked_by = ?")
        self._get_sql = sql(f"SELECT {_TASK_SELECT} FROM lilota_task WHERE id = ?")
        # Storage._settle's statements (SQLite; PostgreSQL's trigger has its own).
        self._settle_probe_sql = sql("SELECT status, end_date_time FROM lilota_task WHERE id = ? AND has_dependents = 1")
        self._doomed_sql = sql(f"WITH RECURSIVE reach(id, via) AS ({_DOOMED_SQL.format(root='?')}) "
                               "SELECT r.id, r.via, t.on_failure, v.on_failure FROM reach r "
                               "JOIN lilota_task t ON t.id = r.id JOIN lilota_task v ON v.id = r.via")
        self._doom_sql = sql(f"UPDATE lilota_task SET status = ?, end_date_time = ?, error = {js} "
                             "WHERE id = ? AND status = 'waiting'")
        self._release_sql = ("UPDATE lilota_task SET status = 'scheduled' WHERE status = 'waiting' AND id IN "
                             "(SELECT task_id FROM lilota_dependency WHERE depends_on IN ({marks})) AND "
                             + _NO_OPEN_DEPENDENCY_SQL.format(task="lilota_task").replace("{", "{{").replace("}", "}}"))
        # Called when a claim found nothing due: then every queued task is a delayed one, or in a
        # queue out of rate-limit slots until one is free again.
        self._next_run_at_sql = sql(
            "SELECT MIN(run_at) FROM lilota_task WHERE status = 'scheduled' AND run_at > created_at "
            f"UNION ALL SELECT MIN(free_at) FROM lilota_queue_rate WHERE free_at > {ts}")

    # --- Storage: the connection, the schema and writes -------------------------------------------

    def __enter__(self):
        """``with self._guard as conn``, one operation: hold the lock (the connection is the
        process's, shared by its threads) and return the connection, opened again if it was lost."""
        self._adopt()
        self._lock.acquire()
        self._depth += 1
        try:
            if self._conn is not None and self._depth == 1 and self.dialect.connection_closed(self._conn):
                self._discard_connection(lost=True)   # e.g. the server restarted while it was idle
            if self._conn is None:
                self._open()
            elif self._depth == 1 and time.monotonic() >= self._file_check_at and self._file_replaced():
                raise DatabaseUnavailableError(
                    f"{self.dialect.describe()} was deleted or replaced while lilota was using it; "
                    f"what was stored in it since is not in the file now at that path, which the next "
                    f"call opens (creating an empty database if there is none)")
        except BaseException:
            self._depth -= 1
            self._lock.release()
            raise
        return self._conn

    def __exit__(self, exc_type, exc, tb):
        """End an operation: release the lock; an exception ``exc`` is raised as a StorageError
        (after a lost connection is dropped: the next operation opens a new one)."""
        try:
            if exc is not None:
                conn = self._conn
                # An exception (a signal's too) between BEGIN and COMMIT must not leave this
                # process's one connection holding the write lock.
                if self._depth == 1 and conn is not None and getattr(conn, "in_transaction", False):
                    _rollback(conn)
                if not isinstance(exc, LilotaError):
                    if self.dialect.connection_lost(exc):
                        self._discard_connection(lost=True)
                    translated = self.dialect.translate_error(exc)
                    if translated is not None:
                        raise translated from exc
        finally:
            self._depth -= 1
            self._lock.release()
        return False

    @contextlib.contextmanager
    def _write(self):
        """``with self._write() as conn``: one operation (``self._guard``) in one transaction; inside
        another ``_write()`` of the same thread, part of that one (which commits)."""
        with self._guard as conn:
            if self._depth > 1 and conn.in_transaction:
                yield conn
            else:
                with _Transaction(conn, self.dialect.begin_write_sql):
                    yield conn

    @contextlib.contextmanager
    def _ending(self, task_ids, transaction=False):
        """``with self._ending(ids) as conn``: one operation whose statements may end the tasks
        ``ids`` (str), and then settle their dependents in the same transaction (_settle). Where
        the database does that itself (``Dialect.settles_dependents``), just the operation: one
        statement, unless ``transaction`` asks for a transaction around several."""
        if self.dialect.settles_dependents and not transaction:
            with self._guard as conn:
                yield conn
            return
        with self._write() as conn:
            yield conn
            if not self.dialect.settles_dependents:
                self._settle(conn, task_ids)

    def _settle(self, conn, task_ids):
        """In the transaction that may have ended the tasks ``task_ids``: end for good, as their
        on_failure says, the waiting dependents of those that ended otherwise than completed, and
        theirs in turn (one recursive query, whatever the chain's length); then queue the waiting
        dependents of all these that have no open dependency left. What PostgreSQL's trigger
        lilota_settle_dependents does (SQLite's triggers cannot run a recursive query)."""
        d = self.dialect
        for task_id in task_ids:
            row = conn.execute(self._settle_probe_sql, (task_id,)).fetchone()
            if row is None or row[0] not in _FINISHED:
                continue   # no dependents (the common case: one index probe), or not ended
            status, ended_at = row[0], row[1] if row[1] is not None else d.encode_time(_now())
            released_by = [task_id]
            if status != TaskStatus.COMPLETED:
                causes = {}
                for dependent, via, on_failure, via_on_failure in conn.execute(self._doomed_sql, (task_id,)):
                    dependent, via = str(dependent), str(via)
                    ended = status if via == task_id else "failed" if via_on_failure == "fail" else "cancelled"
                    if dependent not in causes or via == task_id:
                        causes[dependent] = (via, ended, on_failure)
                conn.executemany(self._doom_sql, [
                    ("failed" if on_failure == "fail" else "cancelled", ended_at, d.encode_json(dumps(_error_record(
                        DependencyFailedError(_DEPENDENCY_FAILED.format(via=via, ended=ended, on_failure=on_failure)),
                        dependency=via), "error")), dependent)
                    for dependent, (via, ended, on_failure) in causes.items()])
                released_by += list(causes)
            for start in range(0, len(released_by), 500):
                chunk = released_by[start:start + 500]
                conn.execute(d.sql(self._release_sql.format(marks=", ".join("?" for _ in chunk))), chunk)

    def _forked(self):
        """True in a child made by fork until _adopt(): the lock, connection and listener are the
        parent's. The one check of who owns them; every entry point calls _adopt() first."""
        return self._owner_pid != os.getpid()

    def _adopt(self):
        """In a child made by fork: the lock may have been held by a parent thread and the
        connection and listener are the parent's. Start with a new lock and neither (never close them)."""
        if not self._forked():
            return
        self._lock = threading.RLock()
        self._depth = 0
        self._conn = None
        self._listener = self._ended_listener = None
        self.local_wakers = set()   # the parent's workers are not this process's
        self._owner_pid = os.getpid()

    def _discard_connection(self, lost=False):
        """Drop the connection (``lost``: the database closed it): the next operation opens a new one."""
        if lost:
            self._unreachable_at = time.monotonic()
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_quietly(conn)

    def _open(self):
        conn = None
        try:
            conn = self.dialect.connect()
            self._migrate(conn)
        except BaseException as exc:
            if conn is not None:
                _close_quietly(conn)
            translated = None if isinstance(exc, LilotaError) else self.dialect.translate_error(exc)
            if isinstance(translated or exc, DatabaseUnavailableError):
                self._unreachable_at = time.monotonic()
            if translated is not None:
                raise translated from exc
            raise
        self._conn = conn
        self._file = self.dialect.file_identity()
        self._file_check_at = time.monotonic() + self.file_check_interval

    #: How often (seconds) an operation first checks that the database file is still the one open.
    file_check_interval = 1.0

    def _file_replaced(self):
        """Close the connection if its file is no longer the one at the database's path (deleted or
        replaced: a process that went on with it would share a database nobody else can reach)."""
        self._file_check_at = time.monotonic() + self.file_check_interval
        if self.dialect.file_identity() == self._file:
            return False
        logger.error("%s was deleted or replaced while in use; closing the connection to it", self.dialect.describe())
        self.close()
        return True

    def _migrate(self, conn):
        """Bring the schema to SCHEMA_VERSION; safe when several processes start at once."""
        def version():
            try:
                row = conn.execute("SELECT value FROM lilota_meta WHERE key = 'schema_version'").fetchone()
            except Exception as exc:
                if self.dialect.missing_table(exc):
                    _rollback(conn)
                    return 0
                raise
            return int(row[0]) if row else 0

        current = version()
        if current == SCHEMA_VERSION:
            return
        if current > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.dialect.describe()} has lilota schema version {current}, newer than the "
                f"{SCHEMA_VERSION} this lilota {__version__} knows; upgrade lilota")
        # The write lock serialises concurrent starters: the second one sees the new version.
        self.dialect.begin_migration(conn)
        with _Transaction(conn, None):
            conn.execute("CREATE TABLE IF NOT EXISTS lilota_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            current = version()
            for number, statements in sorted(self.dialect.migrations().items()):
                if number > current:
                    for statement in statements:   # SQL, or a function that changes what SQL cannot
                        statement(conn) if callable(statement) else conn.execute(statement)
            conn.execute(self.dialect.sql("DELETE FROM lilota_meta WHERE key = 'schema_version'"))
            conn.execute(self.dialect.sql("INSERT INTO lilota_meta (key, value) VALUES ('schema_version', ?)"),
                         (str(SCHEMA_VERSION),))

    def ensure_ready(self):
        """Open the connection and create or migrate the schema now (raises StorageError); a file
        deleted or replaced since the connection was opened is opened afresh."""
        self._adopt()
        with self._lock:
            if self._conn is not None:
                self._file_replaced()
            with self._guard:
                pass

    def close(self):
        """Close this process's connections (the next operation opens a new one)."""
        self._adopt()   # the parent's connections are the parent's to close
        with self._lock:
            self._discard_connection()
            for listener in (self._listener, self._ended_listener):
                if listener:
                    listener.close()
            self._listener = self._ended_listener = None

    def listen_fd(self):
        """A file descriptor that becomes readable when a task is queued (with the listening in
        place before this returns), or None: then change_counter() is what moves."""
        self._adopt()
        if self._listener is None:
            self._listener = self.dialect.listen()
            if self._listener is None:
                self._listener = False
        return self._listener.fileno() if self._listener else None

    def drain_notifications(self):
        """Consume the notifications that have arrived, if any (without waiting)."""
        self._adopt()
        if self._listener:
            self._listener.drain()

    # --- Storage: rows to records -----------------------------------------------------------------

    def _task(self, row):
        """The one place that turns a ``lilota_task`` row (the columns of _TASK_SELECT) into a :class:`Task`."""
        if row is None:
            return None
        values = dict(zip(_TASK_COLUMNS, row))
        decoders, nullable = self._decoders, self._nullable
        try:
            for column, decode in decoders.items():
                value = values[column]
                if value is not None or column not in nullable:
                    values[column] = decode(value)
            return Task(**values)
        except Exception as exc:  # a row written or damaged by something else than lilota
            values = dict(zip(_TASK_COLUMNS, row))
            column = "row"
            for name in ("id", "input", "output", "error"):
                try:
                    decoders[name](values[name])
                except Exception:
                    column = name
                    break
            unreadable = CorruptDatabaseError(f"task {values['id']!s:.60}: its stored {column} cannot be read "
                                              f"({type(exc).__name__}: {str(exc):.200}); it was not written "
                                              f"by lilota or was damaged")
            unreadable.column = column
            raise unreadable from exc

    def _node(self, row):
        d = self.dialect
        id_, name, type_, status, pid, hostname, created_at, last_seen_at, lease, queues, reason, task_names = row
        return Node(id=uuid.UUID(str(id_)), name=name, type=NodeType(type_), status=NodeStatus(status),
                    pid=pid, hostname=hostname, created_at=d.decode_time(created_at),
                    last_seen_at=d.decode_time(last_seen_at), lease_expires_at=d.decode_time(lease),
                    queues=queues.split(",") if queues else None, reason=reason, task_names=loads(task_names))

    # --- Storage: tasks, the scheduling side ------------------------------------------------------

    def insert_tasks(self, batch, chunks, keys=None, connection=None, depends_on=(), on_failure="cancel"):
        """Store queued tasks in one transaction: (their ids, UUIDs in the order given; the status
        they were stored with). ``batch``: what the tasks share (_TaskBatch); ``chunks``: an
        iterable of (ids, their canonical texts, input JSON texts) lists, read one chunk at a time
        as the tasks before it are written -- an exception that reading one raises writes nothing.
        A task's run_at is its batch's, or for "now" (None) its created_at, which keeps it out of
        the index of delayed tasks.

        ``keys``: None, or each task's unique key (or None), in order. A task whose key an
        unfinished task holds -- or, with ``batch.unique_for`` (seconds), a task created within that
        window -- or an earlier task of these, is not stored: its id in the result is that task's.

        ``depends_on``: ids (canonical strings) of stored tasks that each of these runs after. The
        tasks are 'waiting' until those completed; 'scheduled' at once when they have; ended at
        once as ``on_failure`` says when one of them already failed, expired or was cancelled.
        An id that is not stored raises TaskNotFoundError, and nothing is written.

        ``connection``: (the caller's connection, autocommit) from Dialect.adopt_connection: written
        to inside the caller's transaction, which is never committed or rolled back here (in
        autocommit mode these statements are one transaction of their own, as any statement is).
        When the tasks come in more than one chunk, they are written under a savepoint, which an
        exception rolls back: the caller's transaction goes on without them."""
        d = self.dialect
        now = _now()
        # The first two chunks are read before anything is written: when there is one, every task
        # is serialized before the transaction begins, and otherwise the caller's transaction
        # needs a savepoint.
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None:
            return [], TaskStatus.SCHEDULED
        second = next(chunks, None)
        several = second is not None
        chunks = itertools.chain([first] if second is None else [first, second], chunks)
        depends_on = list(depends_on)
        few = not several and len(first[0]) <= _FEW_TASKS

        def insert(conn):
            return self._insert_in(conn, batch, chunks, keys, now, depends_on, on_failure, few)
        if connection is not None:
            conn, autocommit = connection
            with self._guard:
                pass   # lilota's tables exist, up to date (on lilota's own connection)
            try:
                if autocommit:
                    with _Transaction(conn, d.begin_write_sql):   # what one call of it is
                        return insert(conn)
                if several:
                    with _Savepoint(conn):
                        return insert(conn)
                return insert(conn)
            except Exception as exc:
                translated = None if isinstance(exc, LilotaError) else d.translate_error(exc)
                if translated is not None:
                    raise translated from exc
                raise
        task_ids, texts, payloads = first
        if few and len(task_ids) == 1 and keys is None and not depends_on:
            with self._guard as conn:   # one statement: its own transaction
                conn.execute(self._insert_sql, (texts[0], d.encode_json(payloads[0]), None)
                             + self._shared_task_values(batch, now))
            return task_ids, TaskStatus.SCHEDULED
        with self._write() as conn:
            return insert(conn)

    def _shared_task_values(self, batch, now, status=TaskStatus.SCHEDULED, dependency=(None, None, None, None)):
        """The values, as stored, of the columns that the new tasks of ``batch`` share (those of
        _new_task_columns after id, input and unique_key, in that order), stored at ``now``;
        ``dependency``: (depends_on JSON, on_failure, end_date_time, error) of tasks with some."""
        d = self.dialect
        created = d.encode_time(now)
        return (batch.name, status.value, batch.priority, created if batch.run_at is None else d.encode_time(batch.run_at),
                batch.max_attempts, batch.timeout, created, batch.queue,
                None if batch.scheduled_for is None else d.encode_time(batch.scheduled_for)) + tuple(dependency)

    def _insert_in(self, conn, batch, chunks, keys, now, depends_on=(), on_failure="cancel", few=False):
        """insert_tasks' statements on ``conn``, inside a transaction the caller holds: (ids,
        status). The unique keys are locked -- concurrent schedulers of the same key wait until
        this transaction ends, and then see its task -- and their holders looked up, before any
        task is written; then the tasks go to the dialect's insert_rows, chunk by chunk, or with
        ``few`` (one chunk of at most _FEW_TASKS) to the one-row INSERT."""
        d = self.dialect
        status, dependency = TaskStatus.SCHEDULED, (None, None, None, None)
        if depends_on:
            status, end, error = self._dependency_status(conn, depends_on, on_failure, now)
            dependency = (d.encode_json(dumps(depends_on, "depends_on")), on_failure, end, error)
        holders = {}
        if keys is not None:
            distinct = sorted({key for key in keys if key is not None})
            d.lock_unique_keys(conn, distinct)
            holders = self._unique_holders(conn, distinct, batch.unique_for, now)
        values = self._shared_task_values(batch, now, status, dependency)
        own, rest = self._new_task_columns[:3], self._new_task_columns[3:]
        shared = [(name, mark, value) for (name, mark), value in zip(rest, values)]
        if keys is None:
            own, shared = own[:2], shared + [("unique_key", "?", None)]
        # JSON that the dialect stores as it is (SQLite) needs no call per task.
        encode = d.encode_json if type(d).encode_json is not Dialect.encode_json else None
        ids, stored = [], []   # stored: the texts of the ids written, for their dependency rows

        def rows():
            remaining_keys = iter(keys or ())
            for task_ids, texts, payloads in chunks:
                if encode is not None:
                    payloads = list(map(encode, payloads))
                if keys is None:
                    ids.extend(task_ids)
                    if depends_on:
                        stored.extend(texts)
                    yield zip(texts, payloads)
                    continue
                new = []
                # remaining_keys last: zip stops at the chunk's end without taking a key too many.
                for task_id, text, payload, key in zip(task_ids, texts, payloads, remaining_keys):
                    holder = None if key is None else holders.get(key)
                    if holder is not None:   # held before, or by an earlier task of these
                        ids.append(holder)
                        continue
                    if key is not None:
                        holders[key] = task_id
                    ids.append(task_id)
                    new.append((text, payload, key))
                    if depends_on:
                        stored.append(text)
                yield new
        if few:
            for chunk in rows():
                params = [(row if keys is not None else row + (None,)) + values for row in chunk]
                if params:   # none when every key is held
                    conn.executemany(self._insert_sql, params)
        else:
            d.insert_rows(conn, "lilota_task", own, shared, rows())
        if stored:
            conn.executemany(d.sql("INSERT INTO lilota_dependency (task_id, depends_on) VALUES (?, ?)"),
                             ((task_id, dependency) for task_id in stored for dependency in depends_on))
        return ids, status

    def _unique_holders(self, conn, keys, unique_for, now):
        """{unique key: the id (UUID) of the task that holds it} for those of ``keys`` that are
        held: by an unfinished task, or by one created after ``now - unique_for`` (seconds; None: no
        window) -- the newest such task. Read 500 keys a query, under the keys' locks
        (Dialect.lock_unique_keys)."""
        d = self.dialect
        cutoff = None if unique_for is None else d.encode_time(now - unique_for)
        newest = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            marks = ", ".join("?" for _ in part)
            for key, task_id, created_at in conn.execute(d.sql(
                    f"SELECT unique_key, id, created_at FROM lilota_task WHERE unique_key IN ({marks}) "
                    f"AND ({_UNFINISHED_SQL} OR created_at > {d.time_param})"), [*part, cutoff]):
                if key not in newest or created_at > newest[key][1]:
                    newest[key] = (task_id, created_at)
        return {key: uuid.UUID(str(task_id)) for key, (task_id, _) in newest.items()}

    def _dependency_status(self, conn, depends_on, on_failure, now):
        """(status, end time, error JSON) for tasks stored now that depend on ``depends_on``:
        'waiting'; 'scheduled' when all of them completed (or ended otherwise, with on_failure
        "run"); ended at once as on_failure says when one failed, expired or was cancelled.
        TaskNotFoundError when one of them is not stored."""
        d = self.dialect
        created = d.encode_time(now)
        marks = ", ".join("?" for _ in depends_on)
        # The lock (PostgreSQL): a dependency ending now waits for this commit, and then sees its
        # has_dependents flag and these tasks; one that ended before is read as ended. (Not a
        # share lock: two schedulers of dependents of one task would each wait for the other's
        # share to set the flag.)
        found = {str(task_id): TaskStatus(status) for task_id, status in conn.execute(d.sql(
            f"SELECT id, status FROM lilota_task WHERE id IN ({marks}){d.dependency_lock}"), depends_on)}
        missing = [task_id for task_id in depends_on if task_id not in found]
        if missing:
            raise TaskNotFoundError(f"depends_on names {len(missing)} task(s) that are not stored: "
                                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                                    f"a task can only depend on tasks scheduled before it")
        conn.execute(d.sql(f"UPDATE lilota_task SET has_dependents = 1 WHERE id IN ({marks}) AND has_dependents = 0"),
                     depends_on)
        failed = next((task_id for task_id in depends_on if found[task_id] in _REQUEUEABLE), None)
        if failed is not None and on_failure != "run":
            error = d.encode_json(dumps(_error_record(DependencyFailedError(_DEPENDENCY_FAILED.format(
                via=failed, ended=found[failed], on_failure=on_failure)), dependency=failed), "error"))
            return TaskStatus.FAILED if on_failure == "fail" else TaskStatus.CANCELLED, created, error
        if all(found[task_id] in _FINISHED for task_id in depends_on):
            return TaskStatus.SCHEDULED, None, None   # completed (or ended otherwise, with on_failure="run")
        return TaskStatus.WAITING, None, None

    def dependencies(self, task_id):
        """The tasks ``task_id`` depends on, as (id, status, output) rows in the order they were
        given; status None for one deleted since."""
        task = self.get_task(task_id)
        if task is None or not task.depends_on:
            return []
        ids = [str(i) for i in task.depends_on]
        marks = ", ".join("?" for _ in ids)
        with self._guard as conn:
            rows = {str(r[0]): r[1:] for r in conn.execute(self.dialect.sql(
                f"SELECT id, status, output FROM lilota_task WHERE id IN ({marks})"), ids)}
        return [(uuid.UUID(i), TaskStatus(rows[i][0]) if i in rows else None,
                 self.dialect.decode_json(rows[i][1]) if i in rows else None) for i in ids]

    def get_task(self, task_id):
        """The Task stored under ``task_id`` (a canonical UUID string), or None."""
        with self._guard as conn:
            return self._task(conn.execute(self._get_sql, (task_id,)).fetchone())

    def task_ids_between(self, low, high, limit=None):
        """The ids from ``low`` to ``high`` (canonical UUID strings), in order, at most ``limit``: a
        range on the primary key, which is how the ids that start with a prefix are found."""
        query = "SELECT id FROM lilota_task WHERE id >= ? AND id <= ? ORDER BY id"
        params = [low, high]
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        with self._guard as conn:
            return [str(row[0]) for row in conn.execute(self.dialect.sql(query), params).fetchall()]

    def task_state(self, task_id):
        """(status, change counter) for a cheap wait loop."""
        with self._guard as conn:
            row = conn.execute(self.dialect.sql("SELECT status FROM lilota_task WHERE id = ?"),
                               (task_id,)).fetchone()
            return (row[0] if row else None), self.dialect.change_counter(conn)

    def tasks(self, task_ids):
        """{id: Task} of the tasks ``task_ids`` (canonical strings) that are stored."""
        found = {}
        with self._guard as conn:
            for start in range(0, len(task_ids), 500):
                chunk = task_ids[start:start + 500]
                marks = ", ".join("?" for _ in chunk)
                for row in conn.execute(self.dialect.sql(f"SELECT {_TASK_SELECT} FROM lilota_task WHERE id IN ({marks})"),
                                        chunk).fetchall():
                    task = self._task(row)
                    found[str(task.id)] = task
        return found

    def task_statuses(self, task_ids):
        """{id: status} of the tasks ``task_ids`` (canonical strings) that are stored: one query per
        500 ids, whatever their number (the shared watcher of wait_async)."""
        found = {}
        with self._guard as conn:
            for start in range(0, len(task_ids), 500):
                chunk = task_ids[start:start + 500]
                marks = ", ".join("?" for _ in chunk)
                found.update((str(task_id), TaskStatus(status)) for task_id, status in conn.execute(
                    self.dialect.sql(f"SELECT id, status FROM lilota_task WHERE id IN ({marks})"), chunk))
        return found

    def watch(self, task_ids):
        """Mark tasks (canonical ids) as waited for, where their ends are then sent to the listeners
        of ``listen_ended()`` (PostgreSQL: the trigger of schema version 7; SQLite needs no mark: its
        waiters look at the change counter) -- Dialect.mark_watched. Returns the ids that are
        marked, or were not to be (SQLite); the waiters of the others must look at them now and
        then (and try again): all of them when the listener cannot connect or the mark cannot be
        written (a role that may only read)."""
        listener = self.listen_ended()
        if listener is None:
            return set(task_ids)
        if listener.fileno() is None:
            return set()   # (else the listening is in place before the mark: no end is missed)
        marked = set()
        try:
            with self._guard as conn:
                for start in range(0, len(task_ids), 500):
                    marked.update(self.dialect.mark_watched(conn, task_ids[start:start + 500]))
        except StorageError:
            logger.debug("cannot mark tasks as waited for; their waiters will poll", exc_info=True)
        return marked

    def listen_ended(self):
        """The listener that is woken when a watched task ends (one per process and database, its
        own connection), or None where the database has none (SQLite)."""
        self._adopt()
        if self._ended_listener is None:
            self._ended_listener = self.dialect.listen("ended") or False
        return self._ended_listener or None

    def change_counter(self):
        """The dialect's change counter on this process's connection (see Dialect.change_counter)."""
        with self._guard as conn:
            return self.dialect.change_counter(conn)

    def list_tasks(self, status=None, name=None, limit=None, queue=None, *, before=None, search=None):
        """Tasks newest first, only those with ``status``, ``name`` and/or ``queue`` when given, at
        most ``limit``. ``before`` (a task id) and ``search`` page through the primary key instead
        (the dashboard's list): the tasks with a smaller id, i.e. made earlier, and only those whose
        id starts with ``search`` or whose error contains it (any case)."""
        query, conditions, params = f"SELECT {_TASK_SELECT} FROM lilota_task", [], []
        for column, value in (("status", status), ("name", name), ("queue", queue)):
            if value is not None:
                conditions.append(f"{column} = ?")
                params.append(value)
        by_id = before is not None or search is not None
        if before is not None:
            conditions.append("id < ?")
            params.append(before)
        if search:
            digits = search.replace("-", "").lower()
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", search.lower()) + "%"
            text = "LOWER(CAST(error AS TEXT)) LIKE ? ESCAPE '\\'"
            if 0 < len(digits) <= 32 and not digits.strip("0123456789abcdef"):
                low, high = (str(uuid.UUID(digits.ljust(32, pad))) for pad in "0f")
                conditions.append(f"((id >= ? AND id <= ?) OR {text})")
                params += [low, high, pattern]
            else:
                conditions.append(text)
                params.append(pattern)
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        # ids increase in creation order; the primary key serves the newest first.
        query += " ORDER BY id DESC" if by_id else " ORDER BY created_at DESC, id DESC"
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        with self._guard as conn:
            return [self._task(row) for row in conn.execute(self.dialect.sql(query), params).fetchall()]

    def task_counts(self, finished_since=()):
        """Rows (name, queue, status, count, *finished) for every name, queue and status present,
        where ``finished`` holds, for each time in ``finished_since`` (epoch seconds), how many of
        those tasks ended then or later (only a finished task has an end_date_time)."""
        d = self.dialect
        query = "SELECT name, queue, status, COUNT(*) FROM lilota_task GROUP BY name, queue, status"
        windows = ", ".join(f"SUM(CASE WHEN end_date_time >= {d.time_param} THEN 1 ELSE 0 END)"
                            for _ in finished_since)
        times = [d.encode_time(t) for t in finished_since]
        with self._guard as conn:
            counts = conn.execute(query).fetchall()
            recent = {}
            if finished_since:
                # A range of the index of ended tasks, not a scan of every task. The subquery keeps
                # SQLite from walking another index instead, for the GROUP BY's order.
                for name, queue, status, *finished in conn.execute(d.sql(
                        f"SELECT name, queue, status, {windows} FROM (SELECT name, queue, status, end_date_time "
                        f"FROM lilota_task WHERE end_date_time >= {d.time_param} ORDER BY end_date_time) AS ended "
                        f"GROUP BY name, queue, status"), times + [min(times)]).fetchall():
                    recent[name, queue, status] = [int(n or 0) for n in finished]
        zeros = [0] * len(finished_since)
        return [(name, queue, status, int(count), *recent.get((name, queue, status), zeros))
                for name, queue, status, count in counts]

    def activity(self, since):
        """Rows (minute, started, finished, failed) for each whole minute after epoch ``since`` in
        which tasks started or ended: starts of the tasks running now or ended since then, endings
        of those ended since then (failed: failed or expired)."""
        d = self.dialect
        ts = d.time_param
        started = d.minute_sql("start_date_time")
        ended = d.minute_sql("end_date_time")
        failed = _sql_list({TaskStatus.FAILED, TaskStatus.EXPIRED})
        # Three ranges of partial indexes (ended tasks, running tasks), never a scan of all tasks.
        query = (f"SELECT {started}, COUNT(*), 0, 0 FROM lilota_task WHERE status = 'running' "
                 f"AND start_date_time >= {ts} GROUP BY 1 "
                 f"UNION ALL SELECT {started}, COUNT(*), 0, 0 FROM lilota_task WHERE end_date_time >= {ts} "
                 f"AND start_date_time >= {ts} AND {_FINISHED_SQL} GROUP BY 1 "
                 f"UNION ALL SELECT {ended}, 0, COUNT(*), SUM(CASE WHEN status IN {failed} THEN 1 ELSE 0 END) "
                 f"FROM lilota_task WHERE end_date_time >= {ts} AND {_FINISHED_SQL} GROUP BY 1")
        at = d.encode_time(since)
        minutes = {}
        with self._guard as conn:
            for minute, *counts in conn.execute(d.sql(query), [since, at, since, at, at, since, at]).fetchall():
                total = minutes.setdefault(int(minute), [0, 0, 0])
                for i, n in enumerate(counts):
                    total[i] += int(n or 0)
        return [(minute, *counts) for minute, counts in sorted(minutes.items())]

    def recent_errors(self, since, limit):
        """(id, end_date_time, error) of the at most ``limit`` latest failed or expired tasks that
        ended since epoch ``since``, the latest first."""
        d = self.dialect
        query = (f"SELECT id, end_date_time, error FROM lilota_task WHERE end_date_time >= {d.time_param} "
                 f"AND status IN {_sql_list({TaskStatus.FAILED, TaskStatus.EXPIRED})} "
                 f"ORDER BY end_date_time DESC LIMIT ?")
        with self._guard as conn:
            rows = conn.execute(d.sql(query), (d.encode_time(since), limit)).fetchall()
        return [(str(id_), d.decode_time(end), d.decode_json(error) if error is not None else None)
                for id_, end, error in rows]

    # --- Storage: queues --------------------------------------------------------------------------

    def set_queue(self, name, *, paused=_UNCHANGED, concurrency=_UNCHANGED, rate=_UNCHANGED):
        """Store what is set for queue ``name`` (its row is made on first use): ``paused`` (bool),
        ``concurrency`` (int or None) and ``rate`` ((tasks, period seconds) or None). A new rate
        keeps the most recent starts the old one recorded, so changing it starts no burst."""
        d = self.dialect
        now = _now()
        with self._write() as conn:
            conn.execute(d.sql(f"INSERT INTO lilota_queue (name, paused, updated_at) "
                               f"SELECT ?, 0, {d.time_param} WHERE NOT EXISTS "
                               f"(SELECT 1 FROM lilota_queue WHERE name = ?)"), (name, d.encode_time(now), name))
            changes = {}
            if paused is not _UNCHANGED:
                changes["paused"] = int(bool(paused))
            if concurrency is not _UNCHANGED:
                changes["concurrency"] = concurrency
            if rate is not _UNCHANGED:
                changes["rate_limit"], changes["rate_period"] = rate if rate is not None else (None, None)
            conn.execute(d.sql(f"UPDATE lilota_queue SET {''.join(f'{c} = ?, ' for c in changes)}"
                               f"updated_at = {d.time_param} WHERE name = ?"),
                         [*changes.values(), d.encode_time(now), name])
            if rate is not _UNCHANGED:
                # The ring: one row per task the rate allows in a period, each free again a period
                # after the start that used it. The most recent starts carry over.
                used = [row[0] for row in conn.execute(d.sql(
                    "SELECT free_at FROM lilota_queue_rate WHERE queue = ? ORDER BY free_at DESC"), (name,))]
                conn.execute(d.sql("DELETE FROM lilota_queue_rate WHERE queue = ?"), (name,))
                if rate is not None:
                    free_at = used[:rate[0]] + [d.encode_time(0.0)] * max(0, rate[0] - len(used))
                    conn.executemany(d.sql(f"INSERT INTO lilota_queue_rate (queue, slot, free_at) "
                                           f"VALUES (?, ?, {d.time_param})"),
                                     [(name, slot, value) for slot, value in enumerate(free_at, 1)])

    def queues(self, names=(), counted=True):
        """Every queue that has tasks or settings, and ``names``, as :class:`Queue` records by name;
        ``counted=False``: without counting the tasks (every count 0, only queues with settings
        and ``names``)."""
        with self._guard as conn:
            settings = conn.execute("SELECT name, paused, concurrency, rate_limit, rate_period "
                                    "FROM lilota_queue").fetchall()
            counts = conn.execute("SELECT queue, status, COUNT(*) FROM lilota_task GROUP BY queue, status"
                                  ).fetchall() if counted else ()
        found = {}

        def queue(name):
            if name not in found:
                found[name] = Queue(name, counts=dict.fromkeys((s.value for s in TaskStatus), 0))
            return found[name]
        for name in names:
            queue(name)
        for name, status, count in counts:
            queue(name).counts[status] = int(count)
        for name, paused, concurrency, rate_limit, rate_period in settings:
            q = queue(name)
            q.paused, q.concurrency = bool(paused), concurrency
            q.rate = None if rate_limit is None else (int(rate_limit), timedelta(seconds=float(rate_period)))
        return [found[name] for name in sorted(found)]

    def queue_situation(self, task):
        """What stands between a queued ``task`` and a worker in its queue, for explain(): a dict
        of ``running`` (its queue's running tasks), ``rate_free`` (how many rate-limit slots are
        free now) and ``rate_next`` (epoch seconds when the next one frees, or None), and
        ``ahead``: due queued tasks of its queue that a claim takes first (higher priority, or the
        same and an earlier run_at)."""
        d = self.dialect
        now = d.encode_time(_now())
        run_at = d.encode_time(task.run_at.timestamp())
        with self._guard as conn:
            running = conn.execute(d.sql("SELECT COUNT(*) FROM lilota_task WHERE status = 'running' AND queue = ?"),
                                   (task.queue,)).fetchone()[0]
            free, next_free = conn.execute(d.sql(
                f"SELECT SUM(CASE WHEN free_at <= {d.time_param} THEN 1 ELSE 0 END), MIN(free_at) "
                "FROM lilota_queue_rate WHERE queue = ?"), (now, task.queue)).fetchone()
            ahead = conn.execute(d.sql(
                f"SELECT COUNT(*) FROM lilota_task WHERE status = 'scheduled' AND queue = ? AND id <> ? "
                f"AND (run_at <= {d.time_param} OR run_at <= created_at) AND (priority > ? OR (priority = ? "
                f"AND (run_at < {d.time_param} OR (run_at = {d.time_param} AND id < ?))))"),
                (task.queue, str(task.id), now, task.priority, task.priority, run_at, run_at, str(task.id))).fetchone()[0]
        return {"running": int(running), "rate_free": int(free or 0),
                "rate_next": None if next_free is None else d.decode_time(next_free).timestamp(),
                "ahead": int(ahead)}

    def cancel(self, task_id):
        """Cancel a queued task, or ask for a running one to be stopped.

        Returns "cancelled", "stopping", or the status it already had when it cannot be cancelled;
        None for an unknown id."""
        sql, ts, js = self.dialect.sql, self.dialect.time_param, self.dialect.json_param
        with self._write() as conn, self._ending([task_id]):
            cur = conn.execute(sql(f"UPDATE lilota_task SET status = 'cancelled', end_date_time = {ts}, "
                                   f"error = {js} WHERE id = ? AND {_CANCELLABLE_SQL}"),
                               (self.dialect.encode_time(_now()), self.dialect.encode_json(dumps(
                                   _error_record(TaskCancelledError("cancelled before it ran")), "error")), task_id))
            if cur.rowcount:
                return "cancelled"
            cur = conn.execute(sql("UPDATE lilota_task SET cancel_requested = 1 "
                                   "WHERE id = ? AND status = 'running'"), (task_id,))
            if cur.rowcount:
                return "stopping"
            row = conn.execute(sql("SELECT status FROM lilota_task WHERE id = ?"), (task_id,)).fetchone()
            return None if row is None else row[0]

    def requeue(self, task_id):
        """Put a finished task (failed, expired, cancelled) back in the queue with the same id.

        Returns False for a task in another state; raises LilotaError when its input was deleted
        (``keep_input=False``): SQL NULL there means deleted, a stored None is the JSON ``null``."""
        sql, ts = self.dialect.sql, self.dialect.time_param
        with self._write() as conn:
            cur = conn.execute(sql(f"UPDATE lilota_task SET status = 'scheduled', run_at = {ts}, attempts = 0, "
                                   "end_date_time = NULL, cancel_requested = 0, locked_by = NULL, "
                                   "locked_at = NULL WHERE id = ? AND input IS NOT NULL "
                                   f"AND {_REQUEUEABLE_SQL}"),
                               (self.dialect.encode_time(_now()), task_id))
            if cur.rowcount == 1:
                return True
            row = conn.execute(sql("SELECT status, input IS NULL FROM lilota_task WHERE id = ?"),
                               (task_id,)).fetchone()
        if row is not None and row[0] in _REQUEUEABLE and row[1]:
            raise LilotaError(f"task {task_id} cannot run again: its input was deleted when it finished "
                              f"(keep_input=False); schedule a new task with the input instead")
        return False

    #: Tasks deleted per transaction by delete_finished().
    delete_batch_size = 500

    def delete_finished(self, before, batch_size=None, stop=None, everywhere=True):
        """Delete tasks that finished before ``before`` (epoch seconds), oldest first, then nodes
        gone since then; return how many rows of each: ``{"tasks": n, "log_entries": n, "nodes": n}``
        (log entries: the tasks' stored log records, deleted with them as their steps and attempts).

        Old tasks are found through the primary key: lilota's ids grow with time
        (_first_task_id_at), so a task that finished before ``before`` was created before it and
        has a smaller id -- no index of finished tasks is needed, which would cost every completion
        a write. Each batch of ``batch_size`` tasks (default ``delete_batch_size``) is a transaction
        of its own, and the next waits as long as the last took: workers get the database in
        between (SQLite has one writer). ``stop``, a threading.Event, ends it between batches.
        ``everywhere`` then also deletes, in one statement that reads the whole table, the old
        finished tasks whose ids are not lilota's (rows written by other tools, or made on a host
        whose clock was ahead); keep_finished leaves those to cleanup()."""
        batch_size = batch_size or self.delete_batch_size
        cutoff = self.dialect.encode_time(before)
        bound = _first_task_id_at(before)
        sql, ts = self.dialect.sql, self.dialect.time_param
        total = logs = 0
        while True:
            started = time.monotonic()
            deleted, deleted_logs = self._delete_batch(bound, cutoff, batch_size)
            total, logs = total + deleted, logs + deleted_logs
            if deleted < batch_size:
                break
            pause = min(1.0, max(0.001, time.monotonic() - started))
            if stop.wait(pause) if stop is not None else time.sleep(pause):
                return {"tasks": total, "log_entries": logs, "nodes": 0}
        with self._write() as conn:
            if everywhere:
                deleted, deleted_logs = self._delete_tasks(
                    conn, f"SELECT id FROM lilota_task WHERE id >= ? AND {_FINISHED_SQL} AND end_date_time < {ts}",
                    (bound, cutoff))
                total, logs = total + deleted, logs + deleted_logs
            nodes = conn.execute(sql(f"DELETE FROM lilota_node WHERE {_GONE_SQL} "
                                     f"AND last_seen_at < {ts}"), (cutoff,)).rowcount
        return {"tasks": total, "log_entries": logs, "nodes": nodes}

    def _delete_batch(self, bound, cutoff, batch_size):
        """One transaction: delete up to ``batch_size`` of the oldest tasks created before the id
        ``bound`` that finished before ``cutoff``, read along the primary key; (tasks, log records)."""
        with self._write() as conn:
            return self._delete_tasks(conn, f"SELECT id FROM lilota_task WHERE id < ? AND {_FINISHED_SQL} "
                                            f"AND end_date_time < {self.dialect.time_param} ORDER BY id LIMIT ?",
                                      (bound, cutoff, batch_size))

    def _delete_tasks(self, conn, select, params):
        """Inside a transaction: delete the tasks ``select`` picks (a SELECT of ids), with their
        steps, log records and attempts; return how many (tasks, log records)."""
        counts = {table: conn.execute(self.dialect.sql(f"DELETE FROM {table} WHERE task_id IN ({select})"),
                                      params).rowcount for table in _TASK_DETAIL_TABLES}
        tasks = conn.execute(self.dialect.sql(f"DELETE FROM lilota_task WHERE id IN ({select})"), params).rowcount
        return tasks, counts["lilota_log"]

    def take_turn(self, key, interval, now):
        """Compare-and-set on the time stored in lilota_meta under ``key``: True for the one caller,
        among all processes and hosts on this database, whose turn it is -- the last turn was at
        least ``interval`` seconds before ``now`` (or as far after it: a clock that was wrong) --
        and then stores ``now``; False for everyone else."""
        sql = self.dialect.sql
        with self._guard as conn:
            row = conn.execute(sql("SELECT value FROM lilota_meta WHERE key = ?"), (key,)).fetchone()
        if row is None:   # the first turn ever on this database: the row is made by whoever gets there
            try:
                with self._write() as conn:
                    return conn.execute(sql(
                        "INSERT INTO lilota_meta (key, value) SELECT CAST(? AS TEXT), CAST(? AS TEXT) "
                        "WHERE NOT EXISTS (SELECT 1 FROM lilota_meta WHERE key = ?)"),
                        (key, repr(now), key)).rowcount == 1
            except StorageError:
                return False   # another node made it at the same moment (a duplicate key): its turn
        try:
            last = float(row[0])
        except ValueError:
            last = -math.inf
        if abs(now - last) < interval:
            return False
        # Only if nobody changed it since it was read: of two nodes that both read an old time, one
        # changes the row and the other's UPDATE matches nothing.
        with self._guard as conn:
            return conn.execute(sql("UPDATE lilota_meta SET value = ? WHERE key = ? AND value = ?"),
                                (repr(now), key, row[0])).rowcount == 1

    def delete_task(self, task_id):
        """Delete one task, with its steps, logs, attempts and dependency rows, whatever its status;
        False when there was none with that id. Tasks that depend on it and still wait go on
        waiting (explain() says so)."""
        with self._write() as conn:
            return self._delete_tasks(conn, "SELECT id FROM lilota_task WHERE id = ?", (task_id,))[0] == 1

    def has_unfinished_tasks(self):
        """Whether any task is queued or running."""
        with self._guard as conn:
            return conn.execute(f"SELECT 1 FROM lilota_task WHERE {_UNFINISHED_SQL} LIMIT 1").fetchone() is not None

    # --- Storage: periodic schedules --------------------------------------------------------------

    def record_periodic(self, schedules, now):
        """Record this node's periodic schedules in lilota_periodic: (name, task, schedule text,
        timezone, queue, next slot, latest slot) tuples, times in epoch seconds. A schedule new to
        the database starts with its latest slot as done, so that its first task is for the next;
        a known one keeps its last slot (a missed one is caught up) and takes this definition."""
        d = self.dialect
        ts = d.time_param
        with self._write() as conn:
            conn.executemany(d.sql(
                "INSERT INTO lilota_periodic (name, task, schedule, timezone, queue, next_slot, last_slot, seen_at) "
                f"VALUES (?, ?, ?, ?, ?, {ts}, {ts}, {ts}) ON CONFLICT (name) DO UPDATE SET task = excluded.task, "
                "schedule = excluded.schedule, timezone = excluded.timezone, queue = excluded.queue, "
                "next_slot = excluded.next_slot, seen_at = excluded.seen_at"),
                [(name, task, schedule, zone, queue, d.encode_time(next_slot), d.encode_time(latest),
                  d.encode_time(now)) for name, task, schedule, zone, queue, next_slot, latest in schedules])

    def periodic_last_slots(self, names):
        """{schedule name: its last slot enqueued (epoch seconds, None: none yet)} of ``names``."""
        d = self.dialect
        with self._guard as conn:
            rows = conn.execute(d.sql("SELECT name, last_slot FROM lilota_periodic")).fetchall()
        return {name: None if slot is None else d.decode_time(slot).timestamp() for name, slot in rows
                if name in names}

    def enqueue_periodic(self, name, slot, next_slot, batch, task_id, input_json, key, now):
        """Enqueue a task of ``batch`` (its id, a UUID, input JSON and unique key) for ``slot`` of
        schedule ``name`` unless that slot, or a later one, was enqueued already: the
        compare-and-set of the schedule's last slot, in the task's transaction, lets one caller of
        all processes and hosts through per slot. Returns the task id (the text of the task that
        holds the key), or None when another node was first."""
        d = self.dialect
        ts = d.time_param
        with self._write() as conn:
            won = conn.execute(d.sql(
                f"UPDATE lilota_periodic SET last_slot = {ts}, next_slot = {ts}, seen_at = {ts} "
                f"WHERE name = ? AND (last_slot IS NULL OR last_slot < {ts})"),
                (d.encode_time(slot), d.encode_time(next_slot), d.encode_time(now), name, d.encode_time(slot))).rowcount
            if won != 1:
                return None
            stored = str(self._insert_in(conn, batch, [([task_id], [str(task_id)], [input_json])], [key], now,
                                         few=True)[0][0])
            conn.execute(d.sql("UPDATE lilota_periodic SET last_task_id = ? WHERE name = ?"), (stored, name))
            return stored

    def touch_periodic(self, names, now):
        """Say that a running node still has these schedules (lilota_periodic.seen_at)."""
        d = self.dialect
        with self._guard as conn:
            conn.executemany(d.sql(f"UPDATE lilota_periodic SET seen_at = {d.time_param} WHERE name = ?"),
                             [(d.encode_time(now), name) for name in names])

    def periodic_schedules(self):
        """Every recorded :class:`PeriodicSchedule`, by name, with its last task's status."""
        d = self.dialect
        with self._guard as conn:
            rows = conn.execute(
                "SELECT p.name, p.task, p.schedule, p.timezone, p.queue, p.next_slot, p.last_slot, p.last_task_id, "
                "t.status, p.seen_at FROM lilota_periodic p LEFT JOIN lilota_task t ON t.id = p.last_task_id "
                "ORDER BY p.name").fetchall()
        return [PeriodicSchedule(name, task, schedule, zone, queue, d.decode_time(next_slot), d.decode_time(last_slot),
                                 None if task_id is None else uuid.UUID(str(task_id)),
                                 None if status is None else TaskStatus(status), d.decode_time(seen_at))
                for name, task, schedule, zone, queue, next_slot, last_slot, task_id, status, seen_at in rows]

    # --- Storage: tasks, the worker side ----------------------------------------------------------

    def prepare_claim(self, defaults, queues=(DEFAULT_QUEUE,)):
        """A worker's claim (a :class:`_Claim`): the dialect's, built for these registered defaults
        and served queues under the queue settings stored now (see Dialect.prepare_claim; claim()
        builds it again when they change)."""
        return self._build_claim(tuple(defaults), tuple(queues))

    def _build_claim(self, defaults, queues):
        marks = ", ".join("?" for _ in queues)
        with self._guard as conn:
            version = conn.execute("SELECT value FROM lilota_meta WHERE key = 'queues_version'").fetchone()
            set_up = {row[0] for row in conn.execute(self.dialect.sql(
                f"SELECT name FROM lilota_queue WHERE name IN ({marks}) AND (paused = 1 OR concurrency IS NOT NULL "
                "OR rate_limit IS NOT NULL)"), queues)}
        version = version[0] if version else None   # (a missing row: every queue's settings are read)
        return _Claim(self.dialect.prepare_claim(defaults, queues, free=tuple(q for q in queues if q not in set_up),
                                                 version=version), defaults, queues, version)

    def _queue_settings_changed(self, claim):
        """Whether the queue settings moved away from those ``claim`` was built for; if so, it is
        built again (in place)."""
        with self._guard as conn:
            version = conn.execute("SELECT value FROM lilota_meta WHERE key = 'queues_version'").fetchone()
        if (version[0] if version else None) == claim.version:
            return False
        new = self._build_claim(claim.defaults, claim.queues)
        claim.prepared, claim.version = new.prepared, new.version
        return True

    def claim(self, claim, node_id, pid):
        """Atomically take the next due task for ``node_id`` with ``claim`` (prepare_claim) and mark
        it running (None if none). A claimed row whose id, input, output or error cannot be read is
        failed, with the reason as its error, and the next is taken."""
        while True:
            now = self.dialect.encode_time(_now())
            try:
                with self._guard as conn:
                    row = self.dialect.claim(conn, claim.prepared, node_id, pid, now)
            except _ClaimConflict:
                continue   # a concurrent claim took the slot this one chose; nothing was done
            task = self._claimed(row, node_id, now)
            if task is None and self._queue_settings_changed(claim):
                continue   # a claim built for other queue settings finds nothing: claim again
            if task is not False:
                return task

    def _claimed(self, row, node_id, now):
        """The Task of a row this node just claimed (None for no row); False when the task's own
        id, input, output or error cannot be read: it is then failed, with the reason as its error."""
        try:
            return self._task(row)
        except CorruptDatabaseError as exc:
            if getattr(exc, "column", "row") == "row":
                raise   # not the task's own data: failing task after task for it would not help
            logger.warning("%s", exc)
            with self._ending([str(row[0])]) as conn:
                conn.execute(self.dialect.sql(
                    "UPDATE lilota_task SET status = 'failed', end_date_time = ?, error = ? "
                    "WHERE id = ? AND status = 'running' AND locked_by = ?"),
                    (now, self.dialect.encode_json(dumps(_error_record(exc), "error")), row[0], node_id))
            return False

    def next_run_at(self):
        """Epoch seconds at which the earliest delayed queued task falls due, or a rate-limit slot
        is free again, or None."""
        d = self.dialect
        with self._guard as conn:
            values = [row[0] for row in conn.execute(self._next_run_at_sql, (d.encode_time(_now()),))
                      if row[0] is not None]
        return min(d.decode_time(value).timestamp() for value in values) if values else None

    def complete(self, task_id, node_id, output_json, keep_progress):
        """Mark a task completed (cancelled, if its cancel was asked for while it ran); False when it
        was no longer this node's (recovered elsewhere)."""
        with self._ending([task_id]) as conn:
            cur = conn.execute(self._complete_sql, self._completion(task_id, node_id, output_json, keep_progress,
                                                                    self.dialect.encode_time(_now())))
            return cur.rowcount == 1

    def complete_and_claim(self, task_id, node_id, output_json, keep_progress, claim, pid):
        """complete() this task and claim() the next in one commit: (whether the output was stored,
        the next Task or None). None when the dialect cannot do both at once; nothing was done then.
        A StorageError may come before the commit or after it (the connection lost on the way, or
        the claimed row unreadable as claim() finds it): the completion may be stored or not."""
        d = self.dialect
        now = d.encode_time(_now())
        completion = (self._complete_sql, self._completion(task_id, node_id, output_json, keep_progress, now))
        try:
            with self._guard as conn:
                result = d.complete_and_claim(conn, completion, claim.prepared, node_id, pid, now,
                                              None if d.settles_dependents else
                                              lambda conn: self._settle(conn, [task_id]))
        except _ClaimConflict:
            return None   # the claim's slot was taken concurrently; nothing was done: two commits then
        if result is None:
            return None
        changed, row = result
        return changed == 1, self._claimed(row, node_id, now) or None   # an unreadable one was failed

    def _completion(self, task_id, node_id, output_json, keep_progress, now):
        d = self.dialect
        return (d.encode_json(output_json), d.encode_json(self._cancelled_late_json), now, keep_progress,
                task_id, node_id)

    def finish_attempt(self, task, node_id, error, *, final_status=TaskStatus.FAILED, retry_at=None,
                       count_attempt=True):
        """End a running attempt that did not complete: requeue it at ``retry_at`` (epoch seconds) or
        give it its final status. ``count_attempt=False`` gives the attempt back (the task was
        interrupted through no fault of its own). False when the task was no longer this node's."""
        d = self.dialect
        now = d.encode_time(_now())
        requeue = retry_at is not None or not count_attempt
        if requeue:
            status, run_at, end = "scheduled", d.encode_time(retry_at if retry_at is not None else _now()), None
        else:
            status, run_at, end = str(final_status), None, now
        error_json = d.encode_json(dumps(error, "error"))
        params = self._fail_params(status=status, run_at=run_at, now=now, end=end, error=error_json,
                                   given_back=0 if count_attempt else 1, requeue=requeue, id=str(task.id), node=node_id)
        outcome = _OUTCOME_OF_ERROR.get(error.get("type"), AttemptOutcome.FAILED)
        with self._ending([str(task.id)], transaction=True) as conn:
            # The attempt's record first, from the row as it still is (running, this node's).
            conn.execute(self._attempt_sql, (now, str(outcome), error_json, str(task.id), node_id))
            return conn.execute(self._fail_sql, params).rowcount == 1

    def snooze(self, task, node_id, run_at):
        """Queue a running task again at ``run_at`` (epoch seconds) because it raised Retry: not a
        failure, the attempt does not count (cancelled instead, if that was asked for while it ran).
        False when the task was no longer this node's."""
        d = self.dialect
        now = d.encode_time(_now())
        params = (d.encode_time(run_at), now, d.encode_json(self._cancelled_retry_json), str(task.id), node_id)
        with self._ending([str(task.id)]) as conn:
            return conn.execute(self._snooze_sql, params).rowcount == 1

    def set_progress(self, task_id, node_id, progress):
        """Store a running task's progress, if ``node_id`` still holds it."""
        with self._guard as conn:
            conn.execute(self.dialect.sql("UPDATE lilota_task SET progress_percentage = ? "
                                          "WHERE id = ? AND status = 'running' AND locked_by = ?"),
                         (progress, task_id, node_id))

    def running_tasks(self, node_ids, *, only_overdue_or_cancelled=False):
        """Running tasks locked by the given nodes (optionally only those past expires_at or asked
        to stop)."""
        if not node_ids:
            return []
        d = self.dialect
        marks = ", ".join("?" for _ in node_ids)
        query = f"SELECT {_TASK_SELECT} FROM lilota_task WHERE status = 'running' AND locked_by IN ({marks})"
        params = list(node_ids)
        if only_overdue_or_cancelled:
            query += f" AND (expires_at <= {d.time_param} OR cancel_requested = 1)"
            params.append(d.encode_time(_now()))
        with self._guard as conn:
            return [self._task(row) for row in conn.execute(d.sql(query), params).fetchall()]

    def recover_tasks(self, node_id, error, *, final_status=TaskStatus.FAILED, retry=True, count_attempt=True,
                      task_id=None, retry_delay=1.0, retry_max_delay=600.0):
        """Release the running tasks of a node that is gone: each is requeued with backoff when
        ``retry`` and attempts remain (always, with ``count_attempt=False``), else given
        ``final_status``. Returns the tasks as they were before."""
        d = self.dialect
        query = f"SELECT {_TASK_SELECT} FROM lilota_task WHERE status = 'running' AND locked_by = ?"
        params = [node_id]
        if task_id is not None:
            query += " AND id = ?"
            params.append(str(task_id))
        with self._guard as conn:
            tasks = [self._task(r) for r in conn.execute(d.sql(query), params).fetchall()]
        # Each in a transaction of its own: finish_attempt() does nothing to a task that is no
        # longer running on this node by then.
        for task in tasks:
            retry_at = _retry_time(task, retry_delay, retry_max_delay) if retry and count_attempt else None
            record = dict(error, attempt=task.attempts)
            self.finish_attempt(task, node_id, record, final_status=final_status, retry_at=retry_at,
                                count_attempt=count_attempt)
        return tasks

    # --- Storage: steps, logs and attempts ------------------------------------------------------

    def _holds(self, conn, task_id, node_id):
        """Whether ``node_id`` still runs the task (it was not recovered elsewhere meanwhile)."""
        return conn.execute(self.dialect.sql("SELECT 1 FROM lilota_task WHERE id = ? AND status = 'running' "
                                             "AND locked_by = ?"), (task_id, node_id)).fetchone() is not None

    def step_outputs(self, task_id):
        """{step name: its stored JSON value} of a task's stored steps."""
        d = self.dialect
        with self._guard as conn:
            rows = conn.execute(d.sql("SELECT name, output FROM lilota_step WHERE task_id = ?"), (task_id,)).fetchall()
        return {name: d.decode_json(output) for name, output in rows}

    def save_step(self, task_id, node_id, name, attempt, started, output_json, lease, logs=(), log_bounds=None):
        """In one commit: store a step's result (JSON text) under ``name``, renew the lease of
        ``node_id`` for ``lease`` seconds and write the log records ``logs`` (see write_logs).
        Returns (stored, log records left out); nothing is stored when the task is no longer
        this node's."""
        d = self.dialect
        now = _now()
        with self._write() as conn:
            if not self._holds(conn, task_id, node_id):
                return False, 0
            conn.execute(d.sql(f"INSERT INTO lilota_step (task_id, name, attempt, started_at, ended_at, output) "
                               f"VALUES (?, ?, ?, {d.time_param}, {d.time_param}, {d.json_param})"),
                         (task_id, name, attempt, d.encode_time(started), d.encode_time(now), d.encode_json(output_json)))
            conn.execute(d.sql(f"UPDATE lilota_node SET last_seen_at = {d.time_param}, lease_expires_at = "
                               f"{d.time_param} WHERE id = ? AND {_ALIVE_SQL}"),
                         (d.encode_time(now), d.encode_time(now + lease), node_id))
            dropped = self._insert_logs(conn, task_id, logs, log_bounds) if logs else 0
        return True, dropped

    def delete_steps(self, task_id):
        """Delete a task's stored steps."""
        with self._guard as conn:
            conn.execute(self.dialect.sql("DELETE FROM lilota_step WHERE task_id = ?"), (task_id,))

    def steps(self, task_id):
        """A task's stored steps, in the order they were stored."""
        d = self.dialect
        with self._guard as conn:
            rows = conn.execute(d.sql("SELECT name, attempt, started_at, ended_at, output FROM lilota_step "
                                      "WHERE task_id = ? ORDER BY ended_at, name"), (task_id,)).fetchall()
        return [Step(name, attempt, d.decode_time(started), d.decode_time(ended), d.decode_json(output))
                for name, attempt, started, ended, output in rows]

    def write_logs(self, task_id, node_id, records, bounds):
        """Store a running task's log records in one commit, if ``node_id`` still runs it. Returns
        how many were left out (see _insert_logs)."""
        with self._write() as conn:
            if not self._holds(conn, task_id, node_id):
                return 0
            return self._insert_logs(conn, task_id, records, bounds)

    def _insert_logs(self, conn, task_id, records, bounds):
        """Append log records -- (attempt, epoch seconds, level name, logger name, message, forced)
        tuples -- to a task's, numbered on from its last. ``bounds`` (records, characters): what a
        task keeps at most, the records stored before included; records past that are left out
        (not those ``forced``: the note that some were) and counted in the return value."""
        d = self.dialect
        last, count, size = conn.execute(d.sql(
            "SELECT COALESCE(MAX(seq), 0), COUNT(*), COALESCE(SUM(LENGTH(message)), 0) FROM lilota_log "
            "WHERE task_id = ?"), (task_id,)).fetchone()
        max_records, max_size = bounds
        rows, dropped = [], 0
        for attempt, logged_at, level, name, message, forced in records:
            if not forced and (count >= max_records or size + len(message) > max_size):
                dropped += 1
                continue
            count, size, last = count + 1, size + len(message), last + 1
            rows.append((task_id, last, attempt, d.encode_time(logged_at), level, name, message))
        if rows:
            conn.executemany(d.sql(f"INSERT INTO lilota_log (task_id, seq, attempt, logged_at, level, logger, "
                                   f"message) VALUES (?, ?, ?, {d.time_param}, ?, ?, ?)"), rows)
        return dropped

    def logs(self, task_id, after=None, limit=None, last=None):
        """A task's log records in order: those after the ``seq`` ``after``, at most ``limit``; or
        its ``last`` ones."""
        d = self.dialect
        query = "SELECT seq, attempt, logged_at, level, logger, message FROM lilota_log WHERE task_id = ?"
        params = [task_id]
        if after is not None:
            query += " AND seq > ?"
            params.append(after)
        query += " ORDER BY seq DESC LIMIT ?" if last is not None else " ORDER BY seq"
        if last is not None:
            params.append(last)
        elif limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        with self._guard as conn:
            rows = conn.execute(d.sql(query), params).fetchall()
        if last is not None:
            rows.reverse()
        return [TaskLog(int(seq), attempt, d.decode_time(at), level, name, message)
                for seq, attempt, at, level, name, message in rows]

    def attempts(self, task_id):
        """A task's attempts in order, or None when there is no such task. The ended ones are rows
        of lilota_attempt; the one the task's row still describes (running, or ended by a
        completion, which writes no attempt row) is read from the task."""
        d = self.dialect
        with self._guard as conn:
            rows = conn.execute(d.sql("SELECT number, node, pid, started_at, ended_at, outcome, error "
                                      "FROM lilota_attempt WHERE task_id = ? ORDER BY seq"), (task_id,)).fetchall()
            task = self._task(conn.execute(self._get_sql, (task_id,)).fetchone())
        if task is None:
            return None
        attempts = [Attempt(number, None if node is None else uuid.UUID(str(node)), pid, d.decode_time(started),
                            d.decode_time(ended), AttemptOutcome(outcome), d.decode_json(error))
                    for number, node, pid, started, ended, outcome, error in rows]
        started = task.start_date_time
        if started is not None and (task.status == TaskStatus.RUNNING or (
                task.is_finished and all(a.started_at != started for a in attempts))):
            running = task.status == TaskStatus.RUNNING
            outcome = AttemptOutcome.RUNNING if running else AttemptOutcome(str(task.status))
            attempts.append(Attempt(task.attempts, task.locked_by, task.pid, started,
                                    None if running else task.end_date_time, outcome,
                                    None if outcome in (AttemptOutcome.RUNNING, AttemptOutcome.COMPLETED)
                                    else task.error))
        return attempts

    # --- Storage: nodes ---------------------------------------------------------------------------

    def add_node(self, node_id, name, node_type, status, pid, lease, queues=None, task_names=None):
        """Record a node of this host, alive for ``lease`` seconds unless its heartbeat renews it;
        ``queues``: the queues a worker serves; ``task_names``: the task names it has registered."""
        d = self.dialect
        now = _now()
        with self._guard as conn:
            conn.execute(d.sql(f"INSERT INTO lilota_node ({_NODE_COLUMNS}, host_key) VALUES "
                               f"(?, ?, ?, ?, ?, ?, {d.time_param}, {d.time_param}, {d.time_param}, ?, NULL, ?, ?)"),
                         (node_id, name, str(node_type), str(status), pid, socket.gethostname(),
                          d.encode_time(now), d.encode_time(now), d.encode_time(now + lease),
                          ",".join(queues) if queues else None,
                          None if task_names is None else dumps(list(task_names), "task_names"), _host_key()))

    def set_node_status(self, node_id, status=None, pid=None, reason=None, queues=None, task_names=None):
        """Record a node's status, pid, why it stopped, the queues it serves and/or the task names
        it registered (None keeps the stored value) and that it was seen now."""
        d = self.dialect
        with self._guard as conn:
            conn.execute(d.sql("UPDATE lilota_node SET status = COALESCE(?, status), pid = COALESCE(?, pid), "
                               "reason = COALESCE(?, reason), queues = COALESCE(?, queues), "
                               f"task_names = COALESCE(?, task_names), last_seen_at = {d.time_param} WHERE id = ?"),
                         (None if status is None else str(status), pid, reason,
                          ",".join(queues) if queues else None,
                          None if task_names is None else dumps(list(task_names), "task_names"),
                          d.encode_time(_now()), node_id))

    def heartbeat(self, node_ids, lease):
        """Renew the lease of nodes that are still alive; return the ids that are not (another
        process declared them dead and recovered their tasks: they must not go on working)."""
        if not node_ids:
            return set()
        d = self.dialect
        now = _now()
        marks = ", ".join("?" for _ in node_ids)
        with self._write() as conn:
            conn.execute(d.sql(f"UPDATE lilota_node SET last_seen_at = {d.time_param}, "
                               f"lease_expires_at = {d.time_param} "
                               f"WHERE id IN ({marks}) AND {_ALIVE_SQL}"),
                         [d.encode_time(now), d.encode_time(now + lease), *node_ids])
            alive = conn.execute(d.sql(f"SELECT id FROM lilota_node WHERE id IN ({marks}) "
                                       f"AND {_ALIVE_SQL}"), list(node_ids)).fetchall()
        return set(node_ids) - {str(row[0]) for row in alive}

    def nodes(self):
        """Every row of lilota_node as a Node, oldest first."""
        with self._guard as conn:
            rows = conn.execute(f"SELECT {_NODE_COLUMNS} FROM lilota_node ORDER BY created_at").fetchall()
        return [self._node(r) for r in rows]

    def node(self, node_id):
        """The Node stored under ``node_id``, or None."""
        with self._guard as conn:
            row = conn.execute(self.dialect.sql(f"SELECT {_NODE_COLUMNS} FROM lilota_node WHERE id = ?"),
                               (node_id,)).fetchone()
        return None if row is None else self._node(row)

    def find_lost_nodes(self, exclude=(), settle=0.0):
        """Mark dead the nodes marked alive whose lease has expired, or whose process is gone from
        this host (same host key: same machine, boot and pid namespace); return their ids. Nodes in
        ``exclude`` are the caller's own, which it looks after itself.

        Leases are not judged until this process has reached the database for ``settle`` seconds
        without a break: when it was out of reach, so perhaps was everyone, and nobody could renew
        a lease; the living need that long to renew theirs before the others are declared dead."""
        d = self.dialect
        here = _host_key()
        judge_leases = time.monotonic() - self._unreachable_at >= settle
        with self._write() as conn:
            rows = conn.execute(f"SELECT id, pid, host_key, lease_expires_at FROM lilota_node "
                                f"WHERE {_ALIVE_SQL}").fetchall()
            now = _now()
            lost = [str(node_id) for node_id, pid, host_key, lease in rows
                    if str(node_id) not in exclude and (
                        (judge_leases and d.decode_time(lease).timestamp() < now)
                        or (host_key == here and pid and not _process_exists(pid)))]
            for node_id in lost:
                conn.execute(d.sql(f"UPDATE lilota_node SET status = 'dead' WHERE id = ? "
                                   f"AND {_ALIVE_SQL}"), (node_id,))
        return lost

    def orphaned_nodes(self):
        """Ids of nodes that are not alive but still hold running tasks."""
        with self._guard as conn:
            rows = conn.execute(
                "SELECT DISTINCT locked_by FROM lilota_task WHERE status = 'running' AND locked_by NOT IN "
                f"(SELECT id FROM lilota_node WHERE {_ALIVE_SQL})").fetchall()
        return [str(r[0]) for r in rows]


def _reset_after_fork():
    # A thread of the parent may have held these locks at the fork; the child starts afresh (its
    # Storage objects notice the new pid and open their own connections).
    Storage._instances = {}
    Storage._instances_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


# ==================================================================================================
# 3. Scheduling API
# ==================================================================================================

_MAX_NAME_LENGTH = 200


def _task_id(value):
    """A task id given as UUID or string, as the canonical string stored in the database."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise ValueError(f"{value!r} is not a task id (expected a UUID like "
                             f"'12345678-1234-5678-1234-567812345678')") from None
    raise TypeError(f"a task id must be a UUID or a string, not {type(value).__name__}")


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"a task name must be a string, not {type(name).__name__}")
    if not name or name.strip() != name or len(name) > _MAX_NAME_LENGTH:
        raise ValueError(f"a task name must be 1 to {_MAX_NAME_LENGTH} characters without leading or "
                         f"trailing spaces, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"a task name must be valid unicode text, got {name!r}") from None
    return name


_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def _check_queue(name, what="a queue name"):
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, not {type(name).__name__}")
    if not _QUEUE_NAME.fullmatch(name):
        raise ValueError(f"{what} must be 1 to 100 letters, digits and _ . : - (e.g. 'images' or "
                         f"'mail.bulk'), got {name!r}")
    return name


def _queue_list(queues, what="queues"):
    """A worker's ``queues=``: a queue name or a list of them, in the order served (None: default)."""
    if queues is None:
        return (DEFAULT_QUEUE,)
    if isinstance(queues, str):
        queues = [queues]
    if isinstance(queues, dict) or not isinstance(queues, (list, tuple)):
        raise TypeError(f"{what} must be a queue name or a list of them, e.g. ['images', 'default'], "
                        f"not {type(queues).__name__}")
    if not queues:
        raise ValueError(f"{what} is empty: name at least one queue (or leave it out to serve {DEFAULT_QUEUE!r})")
    for name in queues:
        _check_queue(name, f"each name in {what}")
    if len(set(queues)) != len(queues):
        raise ValueError(f"{what} names a queue twice: {list(queues)!r}")
    return tuple(queues)


def _queue_plan(queues, number_of_workers):
    """The queues each worker process serves, one tuple per process, from Lilota's ``queues=``: a
    dict {queue: processes} (``number_of_workers`` then follows from it, or must equal its sum), or
    a list that all ``number_of_workers`` processes serve. None: all serve the default queue."""
    if isinstance(queues, dict):
        if not queues:
            raise ValueError("queues={} names no queue: give {queue name: number of processes}, e.g. "
                             "{'default': 2, 'images': 1}")
        for name, count in queues.items():
            _check_queue(name, "each key of queues")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"queues[{name!r}] must be a number of worker processes (an int of at least "
                                 f"1), got {count!r}")
        total = sum(queues.values())
        if number_of_workers is not None and number_of_workers != total:
            raise ValueError(f"queues={queues!r} asks for {total} worker processes but number_of_workers="
                             f"{number_of_workers}; give one or the other (with a dict, number_of_workers is its sum)")
        return [(name,) for name, count in queues.items() for _ in range(count)]
    served = _queue_list(queues)
    count = number_of_workers if number_of_workers is not None else (os.cpu_count() or 1)
    return [served] * count


def _rate(rate):
    """``rate=(tasks, period)`` as (tasks, period seconds); None stays None."""
    if rate is None:
        return None
    if not isinstance(rate, (tuple, list)) or len(rate) != 2:
        raise ValueError(f"rate must be (tasks, period), e.g. (10, timedelta(seconds=1)), or None to lift it; "
                         f"got {rate!r}")
    tasks, period = rate
    if period is None:
        raise ValueError("rate's period must be a positive duration, e.g. timedelta(seconds=1), got None")
    if isinstance(tasks, bool) or not isinstance(tasks, int) or not 1 <= tasks <= 100_000:
        raise ValueError(f"rate's number of tasks must be an int from 1 to 100000, got {tasks!r}")
    return tasks, _seconds(period, "rate's period", allow_zero=False)


_MAX_UNIQUE_KEY_LENGTH = 500


def _unique_keys(keys, unique_for):
    """``schedule_many``'s ``unique_keys`` checked: None, or a list of one str or None per input."""
    if keys is None:
        if unique_for is not None:
            raise ValueError("unique_for without a unique key: give unique_key= (unique_keys= in schedule_many) too")
        return None
    if isinstance(keys, (str, bytes, dict)) or not hasattr(keys, "__iter__"):
        raise TypeError("unique_keys must be a list of keys (str or None), one per input")
    keys = list(keys)
    for key in keys:
        if key is None:
            continue
        if not isinstance(key, str):
            raise TypeError(f"a unique key must be a string, not {type(key).__name__}")
        if not key or len(key) > _MAX_UNIQUE_KEY_LENGTH or "\x00" in key:
            raise ValueError(f"a unique key must be 1 to {_MAX_UNIQUE_KEY_LENGTH} characters without U+0000, "
                             f"got {key[:60]!r}{'...' if len(key) > 60 else ''}")
    return keys


def _keys_for_inputs(keys, inputs):
    """ValueError unless there is one unique key per input, told before anything is read when
    ``inputs`` has a length (else _task_chunks tells as it reads them)."""
    if keys is not None and hasattr(inputs, "__len__") and len(keys) != len(inputs):
        raise _key_count_error(len(keys), len(inputs))


def _key_count_error(key_count, input_count):
    return ValueError(f"unique_keys has {key_count} keys for {input_count} inputs; give one per input "
                      f"(None: not unique)")


#: How many inputs schedule_many() reads, serializes and writes at a time: what it holds at once
#: besides the inputs and the ids it returns, however many there are. On PostgreSQL each chunk
#: streams to the server while the next one is made, so a small chunk lets the two overlap early.
_BULK_CHUNK = 1000


def _task_chunks(inputs, key_count=None):
    """schedule_many()'s ``inputs`` as Storage.insert_tasks reads them: _BULK_CHUNK at a time, (new
    ids, their texts, the inputs' JSON). ``key_count``: the number of unique keys given, which
    must be the number of inputs (ValueError as soon as it is known not to be)."""
    iterator = iter(inputs)
    count = 0
    while True:
        values = list(itertools.islice(iterator, _BULK_CHUNK))
        if not values:
            break
        count += len(values)
        if key_count is not None and count > key_count:
            raise _key_count_error(key_count, "more")
        payloads = _dumps_many(values)
        ids = _new_task_id_ints(len(values))
        yield _uuids(ids), _uuid_texts(ids), payloads
    if key_count is not None and count != key_count:
        raise _key_count_error(key_count, count)


def _check_attempts(value, what="max_attempts"):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int of at least 1 (1 means no retry), got {value!r}")
    return value


def _positive(name, value):
    _seconds(value, name, allow_zero=False)


def _non_negative(name, value):
    _seconds(value, name)


def _jitter(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not 0 < value < 1:
        raise ValueError(f"{name} must be greater than 0 and smaller than 1, got {value!r}")


def _logging_level(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be a level of the logging module (e.g. logging.INFO or 'INFO'), "
                        f"not {type(value).__name__}")
    if isinstance(value, str) and not isinstance(logging.getLevelName(value), int):
        raise ValueError(f"{name}: unknown logging level {value!r}")


def _log_level(name, value):
    """A logging level given as a number or a name (``"INFO"``), as its number."""
    _logging_level(name, value)
    return value if isinstance(value, int) else logging.getLevelName(value)


#: The constructor arguments of upstream lilota 1.x (``LilotaWorker``, ``LilotaScheduler``, ``Lilota``),
#: accepted so that its applications run unchanged: upstream name -> (the argument of ours it sets,
#: or None where lilota has no such knob; the check upstream's value must pass). README: "Coming
#: from lilota 1.x".
_UPSTREAM_OPTIONS = {
    "node_heartbeat_interval": ("heartbeat_interval", _positive),
    "scheduler_heartbeat_interval": ("heartbeat_interval", _positive),
    "node_timeout_sec": ("node_timeout", _positive),
    "scheduler_timeout_sec": ("node_timeout", _positive),
    "stop_worker_timeout": ("stop_timeout", _non_negative),
    "logging_level": (None, _logging_level),             # the level of the "lilota" logger
    "node_heartbeat_interval_jitter": (None, _jitter),   # no effect: our heartbeats need no jitter
    "task_heartbeat_interval": (None, _positive),        # no effect: an idle worker is woken, it
    "max_task_heartbeat_interval": (None, _positive),    # does not back off polling
    "process_manager_interval": (None, _positive),       # no effect: the supervisor is woken by events
}


def _upstream_options(constructor, given, *ours):
    """Check the upstream arguments among ``given`` (the ``locals()`` of ``constructor``, where None
    means not given) and return the values of the arguments ``ours`` with upstream's folded in.
    Ours and upstream's both given with different values is a ConfigurationError (a ValueError).
    A ``logging_level`` sets the level of the ``lilota`` logger (and so of all of lilota's loggers)."""
    defaults = {name: p.default for name, p in inspect.signature(constructor).parameters.items()}
    owner = constructor.__qualname__.split(".")[0]
    values = {name: given[name] for name in ours}
    for name, (target, check) in _UPSTREAM_OPTIONS.items():
        value = given.get(name)
        if name not in defaults or value is None:
            continue
        check(name, value)
        if target is None:
            continue
        mine = values[target]   # the constructor has upstream's argument, so it has ours
        if mine != defaults[target] and _seconds(mine, target) != _seconds(value, name):
            raise ConfigurationError(f"{owner}: {target}={mine!r} and {name}={value!r} (its name in lilota 1.x) "
                                     f"set the same thing to different values; give only one of them")
        values[target] = value
    if given.get("logging_level") is not None and "logging_level" in defaults:
        logger.setLevel(given["logging_level"])
    return tuple(values[name] for name in ours)


# --- What every node shares -----------------------------------------------------------------------

def _nonblocking_pipe():
    """A self-pipe for waking a thread that waits in select(): (read fd, write fd)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    return read_fd, write_fd


def _close_fds(*fds):
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _drain(fd):
    """Read everything waiting in a non-blocking pipe; return how many bytes there were."""
    total = 0
    while True:
        try:
            chunk = os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return total
        if not chunk:
            return total
        total += len(chunk)


def _ring(fd):
    """Write one byte to a doorbell pipe; a full pipe already holds enough wake-ups, and a closed
    one belongs to workers that are gone."""
    if fd is None:
        return
    try:
        os.write(fd, b"\0")
    except OSError:
        pass


def _recover_lost_nodes(storage, retry_delay, retry_max_delay, exclude=(), settle=0.0):
    """Mark nodes whose lease expired (or whose process is gone) dead and release the running
    tasks they held: retried while attempts remain, else failed with a WorkerDiedError. The nodes
    in ``exclude`` are the caller's own (a supervisor handles its workers' deaths itself);
    ``settle``: see Storage.find_lost_nodes."""
    exclude = set(exclude)
    lost = storage.find_lost_nodes(exclude, settle)
    for node_id in (set(lost) | set(storage.orphaned_nodes())) - exclude:
        tasks = storage.recover_tasks(node_id, _error_record(WorkerDiedError(
            f"the worker node {node_id} running this task was lost (its heartbeat lease expired "
            f"or its process is gone)")), retry_delay=retry_delay, retry_max_delay=retry_max_delay)
        if tasks:
            logger.warning("recovered %d task(s) of lost node %s", len(tasks), node_id)


class _NodeBase:
    """What LilotaScheduler, LilotaWorker and Lilota share: a database, and a node with a lease."""

    def _set_up(self, db_url, constructor, given):
        """The URL (else $LILOTA_DB_URL, else the default) and the durations ``constructor`` takes,
        from ``given`` (its ``locals()``, with upstream lilota's names), as attributes in seconds."""
        self.db_url = db_url or os.environ.get("LILOTA_DB_URL") or DEFAULT_DB_URL
        # Parsed now: a bad URL fails here, and a relative SQLite path is fixed to the current
        # directory of this moment, not of the first use.
        self._dialect = _dialect_for_url(self.db_url)
        self._storage = None
        durations = [name for name in ("heartbeat_interval", "node_timeout", "stop_timeout") if name in given]
        for name, value in zip(durations, _upstream_options(constructor, given, *durations)):
            setattr(self, name, _seconds(value, name, allow_zero=name == "stop_timeout"))
        for name in ("retry_delay", "retry_max_delay"):
            if name in given:
                setattr(self, name, _seconds(given[name], name))

    @property
    def storage(self):
        """The process's :class:`Storage` for this database, opened on first use."""
        if self._storage is None:
            self._storage = Storage.for_dialect(self._dialect)
        return self._storage

    def get_task_by_id(self, task_id):
        """The stored :class:`Task`, or None when there is no task with that id."""
        return self.storage.get_task(_task_id(task_id))

    def get_task_steps(self, task_id):
        """The task's stored steps (``ctx.step``) as :class:`Step` records, in the order they were
        stored. TaskNotFoundError when there is no such task."""
        return self._task_details(task_id, self.storage.steps)

    def get_task_logs(self, task_id, after=None):
        """The task's stored log records as :class:`TaskLog` records, in order; with ``after`` (a
        record's ``seq``), only the later ones. TaskNotFoundError when there is no such task."""
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
            raise TypeError(f"after must be the seq (an int >= 0) of a log record, not {after!r}")
        return self._task_details(task_id, self.storage.logs, after)

    def get_task_attempts(self, task_id):
        """One :class:`Attempt` per execution of the task, in order, the running one included.
        TaskNotFoundError when there is no such task."""
        return self._task_details(task_id, self.storage.attempts)

    def _task_details(self, task_id, read, *args):
        task_id = _task_id(task_id)
        details = read(task_id, *args)
        if details is None or (not details and self.storage.task_state(task_id)[0] is None):
            raise TaskNotFoundError(f"no task with id {task_id}")
        return details

    def delete_task_by_id(self, task_id):
        """Delete a task whatever its status; True when it was deleted, False when there was no task
        with that id. A running task runs on; its result is not stored."""
        return self.storage.delete_task(_task_id(task_id))

    def get_nodes(self):
        """Every node recorded in ``lilota_node``: worker processes and scheduling applications."""
        return self.storage.nodes()

    def _add_node(self, node_type, queues=None, task_names=None):
        """Record this process as a running node (named ``name``, else host:pid); return its id."""
        node_id = str(uuid.uuid4())
        self.storage.add_node(node_id, self.name or f"{socket.gethostname()}:{os.getpid()}", node_type,
                              NodeStatus.RUNNING, os.getpid(), self.node_timeout, queues, task_names)
        return node_id

    def _renew_leases(self, node_ids):
        """Renew the leases of ``node_ids`` (this node's first); return those another process declared
        dead (their tasks were recovered). This node comes back to life; the caller sees to others."""
        lost = self.storage.heartbeat(node_ids, self.node_timeout)
        if node_ids[0] in lost:
            self.storage.set_node_status(node_ids[0], NodeStatus.RUNNING)
            self.storage.heartbeat(node_ids[:1], self.node_timeout)
        return lost

    def _open_wake_pipe(self):
        self._wake_r, self._wake_w = _nonblocking_pipe()

    def _close_wake_pipe(self):
        with self._fds_lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), None, None
            _close_fds(*fds)


# --- The watcher of the waiters ------------------------------------------------------------------


class _TaskWatcher:
    """One per process and database: a thread that tells every waiter -- wait(), wait_async(), the
    command line's wait -- when its task has ended, so that a thousand waiters cost what one does
    and none of them polls the database. It reads the statuses of all the waited tasks in one
    query whenever one of them may have ended:

    * PostgreSQL: a notification arrived on its listener (Storage.listen_ended, one connection per
      process), which the end of a task marked watched (Storage.watch) sends when its transaction
      commits; and every ``reread`` seconds, in case one was lost with a connection.
    * SQLite: the change counter moved (another connection committed), looked at every ``tick``
      seconds; and every ``reread`` seconds, for writes of this process's own connection, which do
      not move it.

    While the listener cannot connect or the mark cannot be written, it reads them and tries the
    mark again every ``poll`` seconds instead -- at first more often: a task just scheduled is
    usually claimed, and often done, within a millisecond or two. A new waiter rings it, so that
    it looks at once. It ends when nobody waits."""

    _instances = {}
    _instances_lock = threading.Lock()
    tick = 0.001     # seconds between looks at SQLite's change counter
    reread = 0.05    # seconds between reads of the waited tasks' statuses with nothing new
    poll = 0.005     # the same, where the database tells nothing (starting at first_poll)
    first_poll = 0.0005

    @classmethod
    def for_storage(cls, storage):
        key = (os.getpid(), storage.dialect.connection_key)
        with cls._instances_lock:
            watcher = cls._instances.get(key)
            if watcher is None:
                watcher = cls._instances[key] = cls(storage)
            return watcher

    def __init__(self, storage):
        self.storage = storage
        self.lock = threading.Lock()
        self.waiters = {}            # task id -> {future: its event loop, or None for a thread's}
        self.unmarked = set()        # waited task ids whose end is not told (yet): see Storage.watch
        self.rung = threading.Event()
        self.bell = None             # (read end, write end): rings the thread out of its select()
        self.thread = None

    def add(self, task_id, future, loop=None):
        """Resolve ``future`` with the Task once ``task_id`` has ended, or with TaskNotFoundError
        when it is not stored (or deleted): an asyncio future of ``loop``, or, without a loop, a
        concurrent.futures.Future. Returns at once: the watcher's thread marks the task watched
        (Storage.watch) before it first reads it."""
        with self.lock:
            if task_id not in self.waiters:
                self.unmarked.add(task_id)
            self.waiters.setdefault(task_id, {})[future] = loop
            if self.bell is None:
                self.bell = os.pipe()
                for end in self.bell:
                    os.set_blocking(end, False)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="lilota-wait", daemon=True)
                self.thread.start()
        self.rung.set()
        _ring(self.bell[1])

    def remove(self, task_id, future):
        with self.lock:
            futures = self.waiters.get(task_id)
            if futures is not None:
                futures.pop(future, None)
                if not futures:
                    del self.waiters[task_id]
                    self.unmarked.discard(task_id)
                    if not self.waiters:
                        _ring(self.bell[1])   # the thread ends now, not at its next look

    def _run(self):
        storage = self.storage
        counter, last_read, listening, backoff = None, -math.inf, False, self.first_poll
        while True:
            with self.lock:
                if not self.waiters:
                    self.thread = None
                    return
                waited, unmarked = set(self.waiters), list(self.unmarked)
            interval = self.reread
            try:
                marked = storage.watch(unmarked) if unmarked else ()
                with self.lock:
                    self.unmarked.difference_update(marked)
                    polled = bool(self.unmarked)
                if self.rung.is_set():
                    backoff = self.first_poll
                poll, backoff = (backoff, min(backoff * 1.5, self.poll)) if polled else (self.poll, self.first_poll)
                listener = storage.listen_ended()
                fd = listener.fileno() if listener is not None else None
                if listener is not None:
                    # Without the listening, nothing is told: look every poll seconds, and once
                    # more when it is back (an end may have been sent meanwhile, to nobody).
                    ended = listener.drain()
                    changed = ended is None or fd is None or not listening
                    listening = fd is not None
                    ended = [i for i in set(ended or ()) if i in waited]
                    if ended and not changed:   # the ids of the tasks that ended: read just those
                        self._resolve_ended(storage.tasks(ended), ended)
                    interval = poll if fd is None or polled else self.reread
                else:
                    new_counter = storage.change_counter()
                    changed, counter = new_counter is None or new_counter != counter, new_counter
                    interval = self.tick if new_counter is not None else poll
                # Read after a mark too: the task may have ended before it.
                if (self.rung.is_set() or changed or marked
                        or time.monotonic() - last_read >= (poll if polled else self.reread)):
                    self.rung.clear()
                    _drain(self.bell[0])
                    last_read = time.monotonic()
                    statuses = storage.task_statuses(list(waited))
                    ended = [i for i in waited if statuses.get(i) is None or statuses[i].is_finished]
                    if ended:
                        self._resolve_ended(storage.tasks(ended), ended)
            except Exception:   # the database's trouble, or lilota's: the waiters must not hang on it
                logger.warning("lilota wait: cannot read the waited tasks; will retry", exc_info=True)
                self.rung.clear()    # (it reads them all again next time anyway)
                self.rung.wait(0.5)
                continue
            if not self.waiters:
                continue   # all resolved: end now (a waiter added since has rung the bell)
            try:
                select.select([self.bell[0]] + ([fd] if listener is not None and fd is not None else []), [], [],
                              interval)
            except (OSError, ValueError):   # the listener's socket closed under select()
                pass

    def _resolve_ended(self, tasks, task_ids):
        """Resolve the waiters of ``task_ids`` whose task in ``tasks`` (read after they were told
        it ended) is finished, or is gone: TaskNotFoundError."""
        for task_id in task_ids:
            task = tasks.get(task_id)
            if task is None:
                self._resolve(task_id, exception=TaskNotFoundError(f"no task with id {task_id}"))
            elif task.is_finished:   # (else queued again meanwhile: retry())
                self._resolve(task_id, task=task)

    def _resolve(self, task_id, task=None, exception=None):
        with self.lock:
            futures = self.waiters.pop(task_id, {})
            self.unmarked.discard(task_id)
        for future, loop in futures.items():
            if loop is None:
                _settle_future(future, task, exception)
                continue
            try:
                loop.call_soon_threadsafe(_settle_future, future, task, exception)
            except RuntimeError:   # its loop was closed: nobody waits any more
                pass


def _settle_future(future, task, exception):
    if not future.done():
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(task)


# --- explain() ------------------------------------------------------------------------------------

def _ended_reason(task, now):
    """explain() for a finished task: how it ended, when, after how many attempts, with the error."""
    details = {"status": task.status.value, "end": task.end_date_time and task.end_date_time.isoformat(),
               "attempts": task.attempts}
    when = f" at {_format_time(task.end_date_time, now)}" if task.end_date_time else ""
    attempts = f" after {task.attempts} attempt(s)" if task.attempts else " without running"
    text = f"it {task.status.value}{when}{attempts}"
    if task.error and task.status != TaskStatus.COMPLETED:
        details["error"] = {"type": task.error.get("type"), "message": task.error.get("message")}
        text += f": {task.error.get('type')}: {task.error.get('message')}"
    return Reason("finished", text, details)


def _running_reasons(task, node, now):
    """explain() for a running task: where and since when, its node's last heartbeat, progress."""
    details = {"node": task.locked_by and str(task.locked_by), "since": task.start_date_time.isoformat()
               if task.start_date_time else None, "progress": task.progress_percentage, "pid": task.pid}
    where = "an unknown node"
    if node is not None:
        where = f"node {node.name or node.id} (pid {node.pid}, {node.hostname})"
        details["last_heartbeat_seconds"] = (now - node.last_seen_at).total_seconds()
        details["node_status"] = node.status.value
        where += f", last heartbeat {_format_age(node.last_seen_at, now)}"
        if node.status not in _ALIVE_NODE_STATUSES:
            where += f"; the node is {node.status.value}: its task is being recovered"
    text = (f"running on {where}, since {_format_time(task.start_date_time, now)}; progress "
            f"{task.progress_percentage}%, attempt {task.attempts} of {task.max_attempts or 1}")
    if task.expires_at is not None:
        details["expires_at"] = task.expires_at.isoformat()
        text += f"; it times out at {_format_time(task.expires_at, now)}"
    reasons = [Reason("running", text, details)]
    if task.cancel_requested:
        reasons.append(Reason("cancel_requested", "cancel() was asked: it is being stopped", {}))
    return reasons


# --- The scheduler --------------------------------------------------------------------------------

class LilotaScheduler(_NodeBase):
    """The scheduling side: store tasks and look after them. Runs no workers.

    Everything here works whether or not any worker is running: a scheduled task waits in the
    database until a worker claims it. Safe to share between threads.

    ``start()`` is optional: it records this process as a scheduler node (``get_node()``) and keeps
    it alive with a heartbeat until ``stop()``, as upstream lilota's scheduler does. The positional
    arguments after ``db_url`` are upstream's (see ``_UPSTREAM_OPTIONS``).
    """

    def __init__(self, db_url=None, node_heartbeat_interval=None, node_timeout_sec=None, logging_level=None, *,
                 heartbeat_interval=5.0, node_timeout=30.0, name=None):
        self._set_up(db_url, LilotaScheduler.__init__, locals())
        self.name = name
        self.node_id = None
        self._heartbeat = None    # (thread, stop event) of a started LilotaScheduler

    @property
    def db_url_for_workers(self):
        """The URL as other processes must see it (a relative SQLite path made absolute)."""
        return self._dialect.absolute_url

    def _notify_workers(self):
        """Called after tasks were stored: wakes the idle standalone workers of this process that
        share its connection (Storage.local_wakers); Lilota also its idle worker processes."""
        for wake in list(self.storage.local_wakers):
            wake()

    def schedule(self, name, input=None, *, delay=None, run_at=None, priority=0, max_attempts=None,
                 timeout=None, queue=DEFAULT_QUEUE, unique_key=None, unique_for=None, depends_on=None,
                 on_failure="cancel", connection=None):
        """Store a task and return its id (a UUID).

        ``input`` (a dataclass, pydantic model, dict, ``as_dict()`` object or plain JSON value) is
        serialized now: a value that cannot be stored raises TypeError (ValueError for NaN,
        cycles) and nothing is written. ``delay`` (timedelta or seconds) or ``run_at`` (an aware
        datetime) postpone it; higher ``priority`` runs first; ``max_attempts`` and ``timeout``
        override the worker's registered defaults for this task. Only workers that serve ``queue``
        run it.

        ``unique_key`` (a string, stored as ``Task.unique_key``): while a task with that key is
        unfinished (created, scheduled or running) -- or, with ``unique_for`` (timedelta or
        seconds), was created within that window whatever its status -- nothing is written and
        that task's id is returned. Race-free across processes and hosts.

        ``depends_on`` (ids of stored tasks): the task waits, status ``waiting``, until all of them
        completed, and is queued in the commit that completes the last one (at once when they
        already have). When one fails, expires or is cancelled for good, ``on_failure`` decides:
        ``"cancel"`` (the default) cancels it, ``"fail"`` fails it with a DependencyFailedError
        naming that task -- either way its own dependents follow, by their on_failure -- and
        ``"run"`` runs it anyway once all ended. An id that is not stored raises
        TaskNotFoundError, and nothing is written.

        ``connection``: the application's own DB-API connection to the same database (sqlite3,
        psycopg 3, psycopg2, pg8000; also under an SQLAlchemy or Django wrapper): the task is
        written inside its open transaction, which is never committed or rolled back here, and
        exists only if the application commits. TypeError for a connection of another kind of
        database than db_url's, ValueError for a SQLite connection to another file.
        """
        return self._schedule(name, (input,), delay, run_at, priority, max_attempts, timeout, queue,
                              unique_keys=None if unique_key is None else [unique_key], unique_for=unique_for,
                              depends_on=depends_on, on_failure=on_failure, connection=connection)[0]

    def schedule_many(self, name, inputs, *, delay=None, run_at=None, priority=0, max_attempts=None,
                      timeout=None, queue=DEFAULT_QUEUE, unique_keys=None, unique_for=None, depends_on=None,
                      on_failure="cancel", connection=None):
        """Store one task per input in a single transaction; return their ids in order.

        ``inputs``: any iterable, read and serialized a chunk at a time while the tasks are
        written, so that a generator of a million inputs is never held at once. One bad input
        stores nothing: its error rolls back the transaction (with ``connection=``, what this call
        wrote in it), and with at most 1,000 inputs it is raised before anything is written.
        ``unique_keys``: one key (or None) per input, as ``schedule()``'s ``unique_key``; an input
        whose key is held, or came earlier in the same call, gets the holding task's id.
        ``depends_on``: every one of these tasks depends on those (see ``schedule()``).
        ``connection``: as in ``schedule()``."""
        return self._schedule(name, inputs, delay, run_at, priority, max_attempts, timeout, queue,
                              unique_keys=unique_keys, unique_for=unique_for, depends_on=depends_on,
                              on_failure=on_failure, connection=connection)

    def _schedule(self, name, inputs, delay, run_at, priority, max_attempts, timeout, queue=DEFAULT_QUEUE, *,
                  unique_keys=None, unique_for=None, depends_on=None, on_failure="cancel", connection=None):
        _check_name(name)
        _check_queue(queue)
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(map(repr, ON_FAILURE))}, got {on_failure!r}")
        if depends_on is not None and (isinstance(depends_on, (str, bytes, uuid.UUID))
                                       or not hasattr(depends_on, "__iter__")):
            raise TypeError("depends_on takes a list of task ids, e.g. depends_on=[task_id]")
        depends_on = list(dict.fromkeys(_task_id(task_id) for task_id in depends_on or ()))
        if isinstance(priority, bool) or not isinstance(priority, int) or not -2**31 <= priority < 2**31:
            raise ValueError(f"priority must be an int (higher runs first), got {priority!r}")
        _check_attempts(max_attempts)
        timeout = _seconds(timeout, "timeout", allow_zero=False)
        unique_for = _seconds(unique_for, "unique_for", allow_zero=False)
        if delay is not None and run_at is not None:
            raise ValueError("give either delay or run_at, not both")
        if run_at is not None:
            if not isinstance(run_at, datetime):
                raise TypeError(f"run_at must be a datetime, not {type(run_at).__name__}")
            if run_at.tzinfo is None or run_at.utcoffset() is None:
                raise ValueError("run_at must be timezone-aware, e.g. datetime.now(timezone.utc) + timedelta(minutes=5)")
            when = run_at.timestamp()
        else:
            delay = _seconds(delay, "delay")
            when = _now() + delay if delay else None   # None: due at once, at the time it is stored
        if when is not None:
            # A time that cannot be read back as a datetime would break every read of the row,
            # and the idle workers' look at the next due time.
            try:
                _to_datetime(when)
            except (OverflowError, OSError, ValueError):
                raise ValueError(f"{'run_at' if run_at is not None else 'delay'} puts the task beyond the "
                                 f"dates lilota can store (year 9999 at the latest)") from None
        if isinstance(inputs, (str, bytes, dict)) or not hasattr(inputs, "__iter__"):
            raise TypeError("schedule_many() takes an iterable of inputs, e.g. a list")
        keys = _unique_keys(unique_keys, unique_for)
        _keys_for_inputs(keys, inputs)
        if connection is not None:
            connection = self._dialect.adopt_connection(_unwrap_connection(connection))
        batch = _TaskBatch(name, priority, when, max_attempts, timeout, queue, unique_for)
        ids, status = self.storage.insert_tasks(batch, _task_chunks(inputs, None if keys is None else len(keys)),
                                                keys, connection, depends_on, on_failure)
        if ids and connection is None and status == TaskStatus.SCHEDULED:
            # In the application's transaction the tasks exist from its commit on, which wakes
            # idle workers itself: a NOTIFY on PostgreSQL, data_version on SQLite.
            self._notify_workers()
        return ids

    def find_task_ids(self, prefix, limit=None):
        """The ids (UUIDs, in order, at most ``limit``) of the tasks whose id starts with ``prefix``:
        hex digits, in either case, with or without the hyphens. ValueError for anything else."""
        digits = prefix.replace("-", "").lower() if isinstance(prefix, str) else None
        if not digits or len(digits) > 32 or digits.strip("0123456789abcdef"):
            raise ValueError(f"{prefix!r} is not the start of a task id (hex digits, hyphens optional)")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        low, high = (str(uuid.UUID(digits.ljust(32, pad))) for pad in "0f")
        return [uuid.UUID(task_id) for task_id in self.storage.task_ids_between(low, high, limit)]

    def get_periodic(self):
        """The periodic schedules running nodes recorded (:class:`PeriodicSchedule`), by name: what
        each enqueues and when, its next slot, and its last task's id and status."""
        return self.storage.periodic_schedules()

    def list_tasks(self, status=None, name=None, limit=100, queue=None):
        """Stored tasks, newest first: only those with ``status`` (a TaskStatus or its value),
        ``name`` and/or ``queue`` when given, at most ``limit`` of them (None: all). ValueError for
        an unknown status."""
        if queue is not None:
            _check_queue(queue)
        if status is not None:
            try:
                status = TaskStatus(status).value
            except ValueError:
                raise ValueError(f"unknown task status {status!r}; the statuses are "
                                 f"{', '.join(s.value for s in TaskStatus)}") from None
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        return self.storage.list_tasks(status, name, limit, queue)

    def stats(self):
        """Task counts and recent throughput, as plain values: ``total``; ``by_status``, the count of
        every status; ``by_name`` and ``by_queue``, {name or queue: {status: count}}; and
        ``last_minute`` / ``last_hour``, the tasks that finished in that window per final status,
        in all (``finished``) and ``per_second``."""
        now = _now()
        windows = (("last_minute", 60), ("last_hour", 3600))
        finals = [s.value for s in TaskStatus if s.is_finished]
        result = {"total": 0, "by_status": {s.value: 0 for s in TaskStatus}, "by_name": {}, "by_queue": {}}
        recent = {key: dict.fromkeys(finals, 0) for key, _ in windows}
        for name, queue, status, count, *finished in self.storage.task_counts([now - s for _, s in windows]):
            result["total"] += count
            result["by_status"][status] = result["by_status"].get(status, 0) + count
            by_name = result["by_name"].setdefault(name, {})
            by_name[status] = by_name.get(status, 0) + count
            by_queue = result["by_queue"].setdefault(queue, {})
            by_queue[status] = by_queue.get(status, 0) + count
            for (key, _), n in zip(windows, finished):
                if status in recent[key]:
                    recent[key][status] += n
        for key, seconds in windows:
            total = sum(recent[key].values())
            result[key] = dict(recent[key], finished=total, per_second=round(total / seconds, 3))
        result["by_name"] = dict(sorted(result["by_name"].items()))
        result["by_queue"] = dict(sorted(result["by_queue"].items()))
        return result

    # --- queues ---

    def set_queue_limit(self, queue, *, concurrency=_UNCHANGED, rate=_UNCHANGED):
        """Limit a queue for every worker of every host sharing the database, from the next claim
        on: ``concurrency``, at most that many of its tasks running at once; ``rate`` (tasks,
        period), at most that many started in any window of the period (e.g. ``(10,
        timedelta(seconds=1))``). None lifts a limit; one left out stays as it is. Running tasks
        are not stopped by a lower limit: no new one starts until fewer run. ValueError for a bad
        name or a limit of 0 or less."""
        _check_queue(queue)
        if concurrency is _UNCHANGED and rate is _UNCHANGED:
            raise ValueError("give concurrency= and/or rate= (None lifts that limit)")
        changes = {}
        if concurrency is not _UNCHANGED:
            if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                            or concurrency < 1):
                raise ValueError(f"concurrency must be an int of at least 1 (tasks of the queue running at once), "
                                 f"or None to lift the limit; got {concurrency!r}")
            changes["concurrency"] = concurrency
        if rate is not _UNCHANGED:
            changes["rate"] = _rate(rate)
        self.storage.set_queue(queue, **changes)
        self._notify_workers()

    def pause_queue(self, queue):
        """Start no new task of ``queue`` until ``resume_queue()``, on any worker of any host;
        running tasks finish. A queue without tasks yet can be paused."""
        self.storage.set_queue(_check_queue(queue), paused=True)

    def resume_queue(self, queue):
        """Let the tasks of a paused ``queue`` start again (idle workers notice at once)."""
        self.storage.set_queue(_check_queue(queue), paused=False)
        self._notify_workers()

    def get_queues(self):
        """Every queue that has tasks or settings, the default queue and the queues live workers
        serve, as :class:`Queue` records (name, paused, concurrency, rate, counts by status), by name."""
        return self._queue_records()

    def _queue_records(self, counts=None):
        """get_queues(), or with ``counts`` ({queue: {status: n}}, e.g. stats()' by_queue) instead
        of counting the tasks again."""
        served = {name for node in self.storage.nodes() if node.queues and node.status in _ALIVE_NODE_STATUSES
                  for name in node.queues}
        if counts is None:
            return self.storage.queues({DEFAULT_QUEUE} | served)
        queues = self.storage.queues({DEFAULT_QUEUE} | served | set(counts), counted=False)
        for queue in queues:
            queue.counts.update(counts.get(queue.name, {}))
        return queues

    def wait(self, task_id, timeout=None):
        """Block until the task is finished (completed, failed, expired or cancelled) and return it.

        Raises TaskNotFoundError for an unknown id and TaskWaitTimeout when ``timeout`` (seconds or
        timedelta) passes first; the task itself is not affected. On a Lilota whose workers failed
        for good (``has_failed()``), an unfinished task raises WorkersFailedError at once."""
        import concurrent.futures
        key = _task_id(task_id)
        limit = _seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        future = concurrent.futures.Future()
        watcher = _TaskWatcher.for_storage(self.storage)
        watcher.add(key, future)   # woken by the database when the task ends (see _TaskWatcher)
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                try:   # a look at the workers' health ten times a second: no database in that
                    return future.result(timeout=0.1 if left is None else max(0.0, min(0.1, left)))
                except concurrent.futures.TimeoutError:
                    pass
                if deadline is not None and time.monotonic() >= deadline:
                    # A last look of its own: with timeout=0 the watcher may not have looked yet.
                    status = self.storage.task_state(key)[0]
                    if status is None:
                        raise TaskNotFoundError(f"no task with id {key}")
                    if TaskStatus(status).is_finished:
                        return self.storage.get_task(key)
                    self._check_workers()
                    raise TaskWaitTimeout(f"task {key} is still {status} after {limit:g}s")
                self._check_workers()
        finally:
            watcher.remove(key, future)

    def explain(self, task_id):
        """Why the task is where it is: a short list of :class:`Reason` records, each a ``code``, a
        sentence and its ``details``. TaskNotFoundError for an unknown id. Nothing is changed.

        Codes: ``finished`` (how it ended); ``running`` (on which node since when, the node's last
        heartbeat, progress) and ``cancel_requested``; ``waiting_for_dependencies`` (which are
        open, and their statuses); ``due_later`` (when, in how long) or ``retry_backoff`` (which
        attempt failed, when the next is due); ``queue_paused``, ``queue_concurrency`` and
        ``queue_rate`` (its queue's pause and limits); ``no_worker`` (no live worker serves its
        queue) or ``not_registered`` (none of those that do registered its name); ``tasks_ahead``
        (due tasks of its queue a worker takes first); ``next`` when nothing is in its way;
        ``created`` for a row another tool wrote, which lilota does not run."""
        key = _task_id(task_id)
        storage = self.storage
        task = storage.get_task(key)
        if task is None:
            raise TaskNotFoundError(f"no task with id {key}")
        now = datetime.now(timezone.utc)
        if task.is_finished:
            return [_ended_reason(task, now)]
        if task.status == TaskStatus.RUNNING:
            return _running_reasons(task, storage.node(str(task.locked_by)) if task.locked_by else None, now)
        if task.status == TaskStatus.WAITING:
            dependencies = [{"id": str(i), "status": None if s is None else s.value}
                            for i, s, _ in storage.dependencies(key) if s is None or not s.is_finished]
            listed = ", ".join(f"{d['id']} ({d['status'] or 'deleted: cancel this task'})" for d in dependencies)
            return [Reason("waiting_for_dependencies",
                           f"waiting for {len(dependencies)} of its {len(task.depends_on)} dependencies to "
                           f"complete: {listed}", {"open": dependencies, "on_failure": task.on_failure})]
        if task.status == TaskStatus.CREATED:
            return [Reason("created", "status 'created': written by another tool; lilota runs only "
                                      "'scheduled' tasks", {})]
        return self._queued_reasons(task, now)

    def _queued_reasons(self, task, now):
        """explain() for a scheduled task: its time, its queue's pause and limits, the workers
        that could take it, and the tasks a worker takes first."""
        storage = self.storage
        reasons = []
        due = task.run_at <= now or task.run_at <= task.created_at
        if not due:
            wait = {"run_at": task.run_at.isoformat(), "in_seconds": (task.run_at - now).total_seconds()}
            when = _format_time(task.run_at, now)
            if task.attempts and task.error:
                reasons.append(Reason("retry_backoff", f"waiting out the backoff after attempt {task.attempts} of "
                                      f"{task.max_attempts or 1} failed ({task.error.get('type')}: "
                                      f"{str(task.error.get('message', ''))[:100]}); attempt {task.attempts + 1} "
                                      f"is due at {when}", dict(wait, failed_attempt=task.attempts,
                                                                max_attempts=task.max_attempts or 1)))
            else:
                reasons.append(Reason("due_later", f"due later: at {when}", wait))
        queue = next(q for q in storage.queues([task.queue]) if q.name == task.queue)
        situation = storage.queue_situation(task)
        if queue.paused:
            reasons.append(Reason("queue_paused", f"its queue {queue.name!r} is paused (resume_queue, or "
                                  f"lilota queue resume {queue.name})", {"queue": queue.name}))
        if queue.concurrency is not None and situation["running"] >= queue.concurrency:
            reasons.append(Reason("queue_concurrency", f"its queue {queue.name!r} is at its concurrency limit: "
                                  f"{situation['running']} of {queue.concurrency} running",
                                  {"queue": queue.name, "running": situation["running"],
                                   "concurrency": queue.concurrency}))
        if queue.rate is not None and situation["rate_free"] == 0:
            free_at = _to_datetime(situation["rate_next"])
            reasons.append(Reason("queue_rate", f"its queue {queue.name!r} used its rate limit of {queue.rate[0]} "
                                  f"per {_format_duration(queue.rate[1].total_seconds())}; the next start is "
                                  f"possible at {_format_time(free_at, now)}",
                                  {"queue": queue.name, "tasks": queue.rate[0],
                                   "per_seconds": queue.rate[1].total_seconds(),
                                   "next_start": free_at and free_at.isoformat()}))
        workers = [n for n in storage.nodes() if n.type == NodeType.WORKER and n.status in _ALIVE_NODE_STATUSES
                   and n.lease_expires_at > now]
        serving = [n for n in workers if task.queue in (n.queues or [DEFAULT_QUEUE])]
        if not serving:
            served = sorted({q for n in workers for q in (n.queues or [DEFAULT_QUEUE])})
            reasons.append(Reason("no_worker", f"no live worker serves its queue {task.queue!r} ("
                                  + (f"live workers serve {', '.join(served)}" if served else "no worker is alive")
                                  + ")", {"queue": task.queue, "served_queues": served}))
        elif all(n.task_names is not None and task.name not in n.task_names for n in serving):
            names = sorted({name for n in serving for name in n.task_names})
            reasons.append(Reason("not_registered", f"no live worker of its queue {task.queue!r} has the task "
                                  f"name {task.name!r} registered (they have: {', '.join(names) or 'none'})",
                                  {"queue": task.queue, "name": task.name, "registered": names}))
        if due and situation["ahead"]:
            reasons.append(Reason("tasks_ahead", f"{situation['ahead']} task(s) of higher priority or older are "
                                  f"ahead of it in queue {task.queue!r}",
                                  {"queue": task.queue, "ahead": situation["ahead"]}))
        if not reasons:
            reasons.append(Reason("next", f"nothing is in its way: it is next in queue {task.queue!r}, for the first "
                                  f"of its {len(serving)} live worker(s) that is free",
                                  {"queue": task.queue, "workers": len(serving)}))
        return reasons

    # --- asyncio ---

    async def schedule_async(self, name, input=None, **options):
        """``schedule()`` for asyncio applications: the same arguments, errors and id; the database
        write runs in a thread (asyncio.to_thread), so the event loop never blocks."""
        import asyncio
        return await asyncio.to_thread(self.schedule, name, input, **options)

    async def get_task_by_id_async(self, task_id):
        """``get_task_by_id()`` for asyncio applications (the read runs in a thread)."""
        import asyncio
        return await asyncio.to_thread(self.get_task_by_id, task_id)

    async def wait_async(self, task_id, timeout=None):
        """``wait()`` for asyncio applications: the same result and errors (TaskNotFoundError,
        TaskWaitTimeout, WorkersFailedError), without blocking the event loop and without a query
        per waiter: one watcher thread per process serves all the waiters of all its loops (see
        _TaskWatcher). Cancelling the awaiting coroutine stops the wait, not the task."""
        import asyncio
        key = _task_id(task_id)
        limit = _seconds(timeout, "timeout")
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        future = loop.create_future()
        watcher = _TaskWatcher.for_storage(self.storage)
        watcher.add(key, future, loop)
        try:
            while True:
                self._check_workers()
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    task = await self.get_task_by_id_async(key)
                    raise TaskWaitTimeout(f"task {key} is still {task.status if task else 'unknown'} "
                                          f"after {limit:g}s")
                # A look at the workers' health every second: no database in that.
                done, _ = await asyncio.wait({future}, timeout=1.0 if left is None else min(1.0, left))
                if done:
                    return future.result()
        finally:
            watcher.remove(key, future)
            if not future.done():
                future.cancel()

    def _check_workers(self):
        """Called by wait() while the task is unfinished; Lilota raises there when its workers failed
        for good (waiting on would never end)."""

    def cancel(self, task_id):
        """Cancel a task. A queued task is cancelled at once and never runs; a running task is
        stopped by its supervisor (its worker process is replaced) and ends ``cancelled``.

        Returns True when the task is (or already was) cancelled or is being stopped, False when it
        had already completed, failed or expired. Raises TaskNotFoundError for an unknown id."""
        key = _task_id(task_id)
        outcome = self.storage.cancel(key)
        if outcome is None:
            raise TaskNotFoundError(f"no task with id {key}")
        if outcome == "stopping":
            self._notify_supervisor()
        return outcome in ("cancelled", "stopping")  # "cancelled" also when it already was

    def _notify_supervisor(self):
        """Called when a running task must be looked at now (Lilota wakes its supervisor)."""

    def retry(self, task_id):
        """Queue a failed, expired or cancelled task again under the same id, attempts reset.
        Returns False when the task is not in one of those states."""
        key = _task_id(task_id)
        if self.storage.get_task(key) is None:
            raise TaskNotFoundError(f"no task with id {key}")
        done = self.storage.requeue(key)
        if done:
            self._notify_workers()
        return done

    def cleanup(self, older_than=timedelta(days=30)):
        """Delete tasks that finished more than ``older_than`` ago, and nodes stopped, crashed or
        dead since longer; return how many rows of each kind: ``{"tasks": n, "log_entries": n,
        "nodes": n}`` (as upstream lilota 1.4; log entries: the tasks' stored log records, deleted
        with them as their steps and attempts are). Queued and running
        tasks are never deleted. It deletes in batches, each a transaction of its own, so that running
        workers are not held up."""
        deleted = self.storage.delete_finished(_now() - _seconds(older_than, "older_than"))
        return deleted

    def get_all_nodes(self):
        """The same as ``get_nodes()`` (both are upstream lilota's names)."""
        return self.get_nodes()

    def get_node(self):
        """This process's own node (a :class:`Node`) once started (stopped after ``stop()``), else None."""
        node_id = self.node_id
        return None if node_id is None else self.storage.node(node_id)

    def has_unfinished_tasks(self):
        """True while any task is queued (also delayed, or waiting for a retry) or running."""
        return self.storage.has_unfinished_tasks()

    # --- a node of its own (Lilota replaces these with its supervisor) ---

    def start(self):
        """Record this process as a scheduler node and keep it alive with a heartbeat thread until
        ``stop()``. Scheduling does not need it; it makes the application visible among the nodes.
        A no-op when already started."""
        if self._heartbeat is not None:
            return self
        storage = self.storage
        storage.ensure_ready()
        node_id = self._add_node(NodeType.SCHEDULER)
        stop = threading.Event()
        thread = threading.Thread(target=self._keep_node_alive, args=(node_id, stop),
                                  name="lilota-scheduler-heartbeat", daemon=True)
        self.node_id, self._heartbeat = node_id, (thread, stop)
        thread.start()
        atexit.register(self.stop)
        return self

    def _keep_node_alive(self, node_id, stop):
        while not stop.wait(self.heartbeat_interval):
            try:
                self._renew_leases([node_id])
            except StorageError:
                logger.warning("lilota scheduler heartbeat failed; will retry", exc_info=True)

    def stop(self):
        """Stop the heartbeat started by ``start()`` and record the node as stopped (a no-op when
        not started); ``get_node()`` then shows it stopped, until the next ``start()`` adds a new one."""
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is None:
            return
        thread, stop = heartbeat
        stop.set()
        thread.join()
        atexit.unregister(self.stop)
        try:
            self.storage.set_node_status(self.node_id, NodeStatus.STOPPED)
        except StorageError:
            logger.warning("could not record that node %s stopped", self.node_id, exc_info=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.stop()
        return False


class _BackgroundThread:
    """A daemon thread that runs ``_run()`` until ``stop()``; ``_run`` waits on ``self._stop``."""

    thread_name = "lilota-background"

    def __init__(self):
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class _Retention(_BackgroundThread):
    """``keep_finished``: deletes finished tasks older than that, in a background thread of a
    supervisor (Lilota) or standalone worker -- shortly after it starts, then every
    ``interval`` (a tenth of keep_finished, at most 5 minutes). Of all the nodes on a database
    only one deletes in each interval: the one whose compare-and-set on lilota_meta's time of the
    last turn succeeds (Storage.take_turn). It deletes as cleanup() does, in batches."""

    thread_name = "lilota-retention"
    #: Seconds after start before the first turn.
    first_delay = 1.0
    #: Tasks deleted per transaction (None: Storage.delete_batch_size).
    batch_size = None

    def __init__(self, owner, keep_finished):
        super().__init__()
        self.owner = owner           # what has the ``storage``: a LilotaScheduler or LilotaWorker
        self.keep_finished = keep_finished
        self.interval = max(1.0, min(keep_finished / 10, 300.0))

    def step(self, now=None, stop=None):
        """Take this interval's turn if no other node has: delete and return how many tasks were
        deleted; None when it was not this node's turn. ``now``: epoch seconds (tests)."""
        now = _now() if now is None else now
        storage = self.owner.storage
        if not storage.take_turn(_RETENTION_KEY, self.interval, now):
            return None
        deleted = storage.delete_finished(now - self.keep_finished, self.batch_size, stop, everywhere=False)["tasks"]
        if deleted:
            logger.info("deleted %d task(s) that finished more than %gs ago (keep_finished)", deleted,
                        self.keep_finished)
        return deleted

    def _run(self):
        wait = min(self.first_delay, self.interval)
        while not self._stop.wait(wait):
            wait = self.interval
            try:
                self.step(stop=self._stop)
            except StorageError:
                logger.warning("lilota could not delete old finished tasks; will retry", exc_info=True)
            except Exception:
                logger.exception("lilota could not delete old finished tasks; will retry")


# --- Periodic schedules ---------------------------------------------------------------------------
#
# A periodic schedule enqueues one task per *slot*: each time its cron expression matches (in its
# time zone), or each multiple of its interval since the epoch. Every node that has the schedule --
# each worker process of the scripts that define it -- enqueues each due slot; the database lets
# one through per slot (Storage.enqueue_periodic: a compare-and-set of the schedule's last slot, and
# a unique key per slot), so nodes may come and go without a leader.

_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# name, lowest and highest value, names (the first one's value is the lowest)
_CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
                ("month", 1, 12, _MONTH_NAMES), ("day of week", 0, 7, _DAY_NAMES))
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)   # February of leap years


def _cron_field(text, what, low, high, names):
    """The set of values a cron field ``text`` allows: ``*``, numbers, names, ranges ``a-b``, steps
    ``*/n``, ``a-b/n`` and ``a/n`` (a to the highest), and lists of these; ValueError naming the field."""
    def value(token):
        if token.isascii() and token.isdigit():
            number = int(token)
        elif token.lower() in names:
            number = names.index(token.lower()) + low
        else:
            kinds = "a number or a name (" + ", ".join(names[:3]) + " ...)" if names else "a number"
            raise ValueError(f"{what} field: {token!r} is not {kinds}")
        if not low <= number <= high:
            raise ValueError(f"{what} field: {number} is out of range {low}-{high}")
        return number

    values = set()
    for item in text.split(","):
        span, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
                raise ValueError(f"{what} field: the step in {item!r} must be a whole number of at least 1")
            step = int(step_text)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            start, _, end = span.partition("-")
            first, last = value(start), value(end)
            if first > last:
                raise ValueError(f"{what} field: the range {span!r} runs backwards; write the smaller end first")
        elif span:
            first = value(span)
            last = high if slash else first
        else:
            raise ValueError(f"{what} field: empty item in {text!r}")
        values.update(range(first, last + 1, step))
    return values


class _Cron:
    """A cron expression: the five standard fields (minute, hour, day of month, month, day of week)
    or an alias (@hourly, @daily, @weekly, @monthly, @yearly), its slots in time zone ``zone``.

    When both day fields are restricted (neither starts with ``*``), a day matching either one
    is enough, as in every cron since Vixie's. Slots are times on the zone's wall clock: one that
    a daylight-saving change skips runs once at the first valid time after the gap, and one that
    a change repeats runs once, at its first occurrence."""

    def __init__(self, expression, zone):
        if not isinstance(expression, str):
            raise TypeError(f"cron must be a string such as '*/15 * * * *' or '@daily', not {type(expression).__name__}")
        self.expression = expression.strip()
        text = _CRON_ALIASES.get(self.expression.lower(), self.expression)
        if text.startswith("@"):
            raise ValueError(f"cron: unknown alias {self.expression!r}; the aliases are {', '.join(_CRON_ALIASES)}")
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(f"cron: {self.expression!r} has {len(fields)} fields; it needs 5: minute hour "
                             f"day-of-month month day-of-week, e.g. '*/15 * * * *'")
        (self.minutes, self.hours, self.days, self.months, weekdays) = (
            _cron_field(field, *spec) for field, spec in zip(fields, _CRON_FIELDS))
        self.weekdays = {day % 7 for day in weekdays}   # 7 is Sunday too
        self.any_day, self.any_weekday = fields[2].startswith("*"), fields[4].startswith("*")
        if self.any_weekday and not any(day <= _DAYS_IN_MONTH[month - 1] for day in self.days for month in self.months):
            raise ValueError(f"day of month field: {fields[2]!r} never falls in the months of the month field "
                             f"({fields[3]!r})")
        self.zone = zone

    def _day_matches(self, wall):
        in_month = wall.day in self.days
        in_week = (wall.weekday() + 1) % 7 in self.weekdays   # cron: 0 is Sunday
        if self.any_day or self.any_weekday:   # "*/2" counts as a star here, yet allows odd days only
            return in_month and in_week
        return in_month or in_week

    def _next_wall(self, wall):
        """The first wall-clock minute at or after ``wall`` (naive) that the fields allow, or None
        within nine years (29 February comes at least every eight)."""
        last_year = wall.year + 9
        while wall.year <= last_year:
            if wall.month not in self.months:
                wall = datetime(wall.year + wall.month // 12, wall.month % 12 + 1, 1)
            elif not self._day_matches(wall):
                wall = datetime(wall.year, wall.month, wall.day) + timedelta(days=1)
            elif wall.hour not in self.hours:
                wall = datetime(wall.year, wall.month, wall.day, wall.hour) + timedelta(hours=1)
            elif wall.minute not in self.minutes:
                wall += timedelta(minutes=1)
            else:
                return wall
        return None

    def _instant(self, wall):
        """Epoch seconds of a wall-clock time: its first occurrence, or for a time a change to
        daylight-saving time skips, the first valid minute after the gap."""
        for _ in range(24 * 60):
            aware = wall.replace(tzinfo=self.zone)   # fold=0: the first of a repeated time
            if aware.astimezone(timezone.utc).astimezone(self.zone).replace(tzinfo=None) == wall:
                return aware.timestamp()
            wall += timedelta(minutes=1)
        raise ValueError(f"time zone {self.zone} skips more than a day at {wall}")

    def next_after(self, seconds):
        """The first slot after ``seconds`` (epoch), or None if there is none within nine years."""
        wall = datetime.fromtimestamp(seconds, self.zone).replace(tzinfo=None, second=0, microsecond=0)
        wall += timedelta(minutes=1)
        while True:
            wall = self._next_wall(wall)
            if wall is None:
                return None
            instant = self._instant(wall)
            if instant > seconds:   # not a repeated time's first occurrence, already past
                return instant
            wall += timedelta(minutes=1)


def _time_zone(name):
    """A ``timezone=`` (an IANA name such as 'Europe/Berlin', or a tzinfo; None: UTC) as (tzinfo, name)."""
    if name is None:
        return timezone.utc, "UTC"
    if isinstance(name, _dt.tzinfo):
        return name, str(getattr(name, "key", None) or name)
    if not isinstance(name, str):
        raise TypeError(f"timezone must be an IANA time zone name such as 'Europe/Berlin', not {type(name).__name__}")
    import zoneinfo   # only where time zones are used: it costs every worker's start otherwise
    try:
        return zoneinfo.ZoneInfo(name), name
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone {name!r} is not a known IANA time zone (e.g. 'Europe/Berlin', 'UTC'); on a "
                         f"system without a zone database, pip install tzdata") from None


class _Periodic:
    """One periodic schedule: ``name`` enqueues task ``task`` with ``input`` (JSON text) in
    ``queue`` at each slot of ``cron`` (in ``timezone``) or each multiple of ``every`` seconds since
    the epoch. ``catch_up``: a slot missed while no node ran is enqueued once when a node starts
    (only the latest of them); without it a slot is enqueued only within a grace of its time
    (a minute, or its period when shorter)."""

    def __init__(self, name, task, *, cron=None, every=None, timezone=None, input_json="null",
                 queue=DEFAULT_QUEUE, catch_up=True):
        self.name, self.task, self.input_json, self.queue = name, task, input_json, queue
        self.catch_up = bool(catch_up)
        if (cron is None) == (every is None):
            raise ValueError(f"periodic schedule {name!r}: give either cron= (e.g. '*/15 * * * *') or every= "
                             f"(e.g. timedelta(minutes=5)), one of them")
        self.zone, self.timezone = _time_zone(timezone)
        if cron is not None:
            self.cron, self.every = _Cron(cron, self.zone), None
            self.schedule = self.cron.expression
        else:
            self.cron, self.every = None, _seconds(every, "every", allow_zero=False)
            if self.every < 1:
                raise ValueError(f"every must be at least 1 second, got {every!r}")
            self.schedule = f"every {self.every:g}s"

    def next_after(self, seconds):
        """The first slot after ``seconds`` (epoch seconds), or None (a cron with none for years)."""
        if self.every is not None:
            return (math.floor(seconds / self.every) + 1) * self.every
        return self.cron.next_after(seconds)

    def latest(self, seconds):
        """The last slot at or before ``seconds``, or None."""
        if self.every is not None:
            return math.floor(seconds / self.every) * self.every
        # The slots of a window before ``seconds``, the window doubled until it holds one.
        span = 60.0
        while span < 10 * 366 * 86400:
            slot = self.next_after(seconds - span)
            if slot is not None and slot <= seconds:
                while True:
                    following = self.next_after(slot)
                    if following is None or following > seconds:
                        return slot
                    slot = following
            span *= 2
        return None

    def grace(self, slot):
        """How late a slot may still be enqueued without catch_up: a minute, or its period when shorter."""
        following = self.next_after(slot)
        return 60.0 if following is None else min(60.0, following - slot)

    def unique_key(self, slot):
        return f"lilota.periodic:{self.name}@{datetime.fromtimestamp(slot, timezone.utc).isoformat()}"


class _PeriodicRunner(_BackgroundThread):
    """Enqueues the due slots of a node's periodic schedules: ``tick()`` once, or from ``start()``
    on in a thread that sleeps until the next slot. The schedules are recorded in lilota_periodic
    first (and their ``seen_at`` renewed while it runs), so that ``get_periodic()`` and ``lilota
    periodic`` show them."""

    thread_name = "lilota-periodic"
    #: Seconds between renewals of the schedules' seen_at, and the longest sleep.
    touch_interval = 30.0

    def __init__(self, owner, schedules):
        super().__init__()
        self.owner = owner            # what has the ``storage``: a LilotaWorker
        self.schedules = list(schedules)
        self._handled = {}            # name -> the last slot this node dealt with
        self._recorded = False

    def tick(self, now=None):
        """Enqueue each schedule's latest due slot that no node has enqueued yet; return the ids of
        the tasks this node enqueued. ``now``: epoch seconds (tests; default the clock)."""
        now = _now() if now is None else now
        storage = self.owner.storage
        if not self._recorded:
            self._record(self.schedules, now)
            self._recorded = True
        due = {}
        for periodic in self.schedules:
            slot = periodic.latest(now)
            if slot is not None and slot > self._handled.get(periodic.name, -math.inf):
                due[periodic.name] = slot
        if not due:
            return []
        # A read first: of the nodes woken by one slot, only those that find it open try to write.
        done = storage.periodic_last_slots(set(due))
        lost = [p for p in self.schedules if p.name in due and p.name not in done]
        if lost:   # their rows were deleted while this node ran: recorded again, as new schedules
            self._record(lost, now)
        enqueued = []
        for periodic in self.schedules:
            slot = due.get(periodic.name)
            if slot is None or periodic in lost:
                continue
            last = done[periodic.name]
            if (last is not None and last >= slot) or (not periodic.catch_up and now - slot > periodic.grace(slot)):
                self._handled[periodic.name] = slot
                continue
            # unique_for back to the epoch: a task of this slot counts, whatever its age and status.
            batch = _TaskBatch(periodic.task, queue=periodic.queue, unique_for=now, scheduled_for=slot)
            stored = storage.enqueue_periodic(periodic.name, slot, periodic.next_after(slot), batch,
                                              _new_task_ids(1)[0], periodic.input_json, periodic.unique_key(slot), now)
            self._handled[periodic.name] = slot   # only now: after an error the next tick tries again
            if stored is not None:
                enqueued.append(uuid.UUID(stored))
                logger.debug("periodic %s: enqueued task %s for %s", periodic.name, stored, _to_datetime(slot))
        return enqueued

    def _record(self, schedules, now):
        self.owner.storage.record_periodic([(p.name, p.task, p.schedule, p.timezone, p.queue, p.next_after(now),
                                             p.latest(now)) for p in schedules], now)

    def _run(self):
        touched = _now()
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                self.tick()
                now = _now()
                if now - touched >= self.touch_interval:
                    self.owner.storage.touch_periodic([p.name for p in self.schedules], now)
                    touched = now
                upcoming = [slot for slot in (p.next_after(now) for p in self.schedules) if slot is not None]
                wait = min([self.touch_interval] + [slot - now for slot in upcoming])
            except StorageError:
                logger.warning("lilota could not enqueue periodic tasks; will retry", exc_info=True)
                wait = 1.0
            except Exception:
                logger.exception("lilota could not enqueue periodic tasks; will retry")
                wait = 1.0


# ==================================================================================================
# 4. Worker
# ==================================================================================================

# --- The supervisor's protocol with its worker processes ------------------------------------------

class _Supervision:
    """What a worker process gets from its supervisor (section 5; pickled into the child). On
    ``control`` the worker sends ``("no_timeout_retry", names)`` (tasks whose timeout ends them),
    then ``("ready", pid)`` once worker.start() runs, or ``("fatal", text)`` when the script cannot
    start (then it exits with _EXIT_FATAL), or ``("recycled", why)`` before it exits cleanly at a
    recycling limit (to be replaced at once); the supervisor sends ``("stop",)``. The supervisor
    renews its workers' leases and kills the one whose task must stop; a standalone worker does
    both itself. ``queues``: the queues the application assigned this process (None: the
    script's own); ``max_tasks`` and ``max_memory``: when it is recycled (None: never);
    ``node_timeout``: the supervisor's, which then applies to the worker too."""

    def __init__(self, db_url, node_id, control, doorbell, doorbell_writer, parent_pid, queues=None,
                 max_tasks=None, max_memory=None, node_timeout=None):
        self.db_url = db_url
        self.node_id = node_id
        self.node_timeout = node_timeout    # the lease the supervisor gives the node (a step renews it)
        self.queues = queues
        self.max_tasks = max_tasks
        self.max_memory = max_memory
        self.control = control              # duplex Connection to the supervisor
        self.doorbell = doorbell            # read end of the pipe the scheduler rings
        self.doorbell_writer = doorbell_writer
        self.parent_pid = parent_pid
        self.start_called = False           # the script called worker.start() ...
        self.started = False                # ... and it got the worker running

    def report_fatal(self, text):
        try:
            self.control.send(("fatal", text))
        except Exception:
            sys.stderr.write(text + "\n")


# Set in a worker process started by a supervisor (section 5) before the worker script runs.
_supervision = None

_EXIT_FATAL = 3  # a worker process's exit code when its script could not start
# ... and when the application's main module, run again in a new worker process by spawn or
# forkserver before the worker script, called Lilota.start() at its top level (no __main__ guard)
_EXIT_UNGUARDED_MAIN = 78
_UNGUARDED_MAIN_HELP = ("the application's main module calls Lilota.start() outside `if __name__ == "
                        "\"__main__\":`. Worker processes are started with multiprocessing (spawn), which runs "
                        "the main module again in each new process before anything else, so each worker would "
                        "start workers of its own. Put the code that creates and starts Lilota (and what uses it) "
                        "under `if __name__ == \"__main__\":` in the application's main module")



def _stop_reason(task):
    """Why a task of ``running_tasks(only_overdue_or_cancelled=True)`` must stop: a cancel wins."""
    return "cancel" if task.cancel_requested else "timeout"


def _stopped_end(task, reason, retries_timeout, process_stopped=False, **extra):
    """(error record, final status, may it run again) of a task stopped for ``reason``, whether a
    standalone worker interrupted it or a supervisor killed its process (``process_stopped``)."""
    if reason == "cancel":
        return _error_record(TaskCancelledError("cancelled while running"), **extra), TaskStatus.CANCELLED, False
    limit = f" of {task.timeout.total_seconds():g}s" if task.timeout is not None else ""
    stopped = "; its worker process was stopped" if process_stopped else ""
    error = TaskTimeoutError(f"task ran longer than its timeout{limit}{stopped}")
    return _error_record(error, **extra), TaskStatus.EXPIRED, retries_timeout


def _give_back(storage, node_id, why, task=None):
    """Queue ``task`` (else all node ``node_id`` holds) again, its attempt not counted: it was
    interrupted through no fault of its own (``why``)."""
    error = _error_record(TaskInterruptedError(why))
    if task is not None:
        return storage.finish_attempt(task, node_id, error, count_attempt=False)
    return storage.recover_tasks(node_id, error, count_attempt=False)


class _Interrupted(BaseException):
    """Raised inside a task function by a standalone worker to stop it (timeout or cancel).
    A BaseException, so that a task's ``except Exception`` does not swallow it."""


# --- Task functions -------------------------------------------------------------------------------

def _exception_types(value, what):
    """``retry_on``/``no_retry_on`` as a tuple of exception classes (None stays None): one class or
    an iterable of them, else TypeError."""
    if value is None:
        return None
    if isinstance(value, type):
        value = (value,)
    elif isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{what} must be an exception class or a tuple of them, not {type(value).__name__}")
    value = tuple(value)
    for item in value:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"{what} must hold exception classes (e.g. (ConnectionError, TimeoutError)), "
                            f"got {item!r}")
        if issubclass(item, Retry):
            raise ValueError(f"{what} cannot hold Retry: raising Retry always runs the task again, "
                             f"it is not a failure")
    return value


class _TaskFunction:
    """A registered task function with what lilota needs to call it."""

    def __init__(self, name, func, input_model, output_model, wants_progress, timeout, max_attempts, keep_input,
                 retry_on=None, no_retry_on=None, keep_steps=True, log_level=None):
        self.name = name
        self.func = func
        # An async def: called, it returns a coroutine, which the worker runs on its event loop.
        self.is_async = inspect.iscoroutinefunction(func)
        self.keep_steps = bool(keep_steps)
        self.log_level = None if log_level is None else _log_level(f"log_level of task {name!r}", log_level)
        self.output_model = output_model
        self.timeout = _seconds(timeout, f"timeout of task {name!r}", allow_zero=False)
        self.max_attempts = _check_attempts(max_attempts, f"max_attempts of task {name!r}")
        self.keep_input = bool(keep_input)
        self.retry_on = _exception_types(retry_on, f"retry_on of task {name!r}")
        self.no_retry_on = _exception_types(no_retry_on, f"no_retry_on of task {name!r}")
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            signature = None
        try:
            hints = typing.get_type_hints(func)
        except Exception:
            hints = {}
        self.input_param = self.progress_param = self.context_param = None
        self.positional_only = set()
        free = []
        for param in (signature.parameters.values() if signature else ()):
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            annotation = hints.get(param.name, param.annotation)
            if param.kind == param.POSITIONAL_ONLY:
                self.positional_only.add(param.name)
            if annotation is TaskContext:
                self.context_param = param.name
            elif annotation is TaskProgress:
                self.progress_param = param.name
            else:
                free.append(param)
        if free:
            self.input_param = free.pop(0).name
            if input_model is None:
                annotation = hints.get(self.input_param)
                if isinstance(annotation, type) and annotation not in (dict, object) or typing.get_origin(annotation):
                    input_model = annotation
        if wants_progress and self.progress_param is None and free:
            self.progress_param = free.pop(0).name  # the original lilota's style: def task(data, task_progress)
        missing = [p.name for p in free if p.default is p.empty]
        if missing:
            raise TypeError(f"task {name!r}: lilota cannot fill parameter(s) {missing}; a task function takes "
                            f"its input, and optionally a TaskProgress and a TaskContext parameter")
        self.input_model = input_model

    def retries(self, exc):
        """Whether a failed attempt that raised ``exc`` may be retried (while attempts remain): not
        when it is a ``no_retry_on`` type (which wins over ``retry_on``), nor when ``retry_on`` is
        given and it is none of those types. A timeout counts as a TaskTimeoutError."""
        if self.no_retry_on is not None and isinstance(exc, self.no_retry_on):
            return False
        return self.retry_on is None or isinstance(exc, self.retry_on)

    def output(self, result):
        """The JSON text stored for a task's return value. With an ``output_model``, the value must be
        an instance of it or a dict that builds one (TypeError otherwise); it is stored as a dict."""
        model = self.output_model
        if (isinstance(model, type) and model.__module__ != "builtins" and result is not None
                and not isinstance(result, model)):
            if not isinstance(result, dict):
                raise TypeError(f"task {self.name!r} returned {type(result).__name__}, but its output_model is "
                                f"{model.__name__}: return a {model.__name__} or a dict of its fields")
            _revive(model, result)  # raises when the dict does not fit the model
        return dumps(result, "output")

    def __call__(self, stored_input, progress, context):
        if self.progress_param is None and self.context_param is None:  # the common case: input only
            if self.input_param is None:
                return self.func()
            value = _revive(self.input_model, stored_input)
            if self.input_param in self.positional_only:
                return self.func(value)
            return self.func(**{self.input_param: value})
        args, kwargs = [], {}
        for role, value in ((self.input_param, None), (self.progress_param, progress), (self.context_param, context)):
            if role is None:
                continue
            if role == self.input_param:
                value = _revive(self.input_model, stored_input)
            if role in self.positional_only:
                args.append(value)
            else:
                kwargs[role] = value
        return self.func(*args, **kwargs)


# --- Steps and log records of a running task -----------------------------------------------------

#: What a task's stored log keeps at most (its attempts together); past that, one record of each
#: attempt says how many were left out.
MAX_TASK_LOG_RECORDS = 10_000
MAX_TASK_LOG_CHARS = 1 << 20
#: How often (seconds) at most the log records of a running task wait in memory before being written.
TASK_LOG_FLUSH_INTERVAL = 1.0


async def _awaitable(value):
    """``value``, as an awaitable: a stored step result where an async step's caller awaits one."""
    return value


class _TaskRun:
    """One attempt of a task in a worker: its steps (``ctx.step``) and its buffered log records,
    written with each step, at least every TASK_LOG_FLUSH_INTERVAL by a timer, and at its end."""

    def __init__(self, worker, task, node_id, function):
        self.worker = worker
        self.task_id = str(task.id)
        self.attempt = task.attempts
        self.node_id = node_id
        self.level = function.log_level if function.log_level is not None else worker.task_log_level
        self.stored_steps = None   # {name: stored value}, read at the first step
        self.calls = {}            # step name -> how often this attempt called it
        self.used_steps = False
        self.records = []          # (attempt, time, level, logger, message, forced)
        self.buffered_chars = 0
        self.dropped = 0
        self.lock = threading.Lock()         # the buffer
        self.flush_lock = threading.Lock()   # one writer at a time: records stay in order
        self.timer = None

    # --- steps ---

    def step(self, name, fn, args, kwargs):
        """TaskContext.step() in a worker: the stored result, or ``fn``'s, stored. For an ``async
        def`` fn, an awaitable of either (``await ctx.step(...)`` in an async task)."""
        count = self.calls[name] = self.calls.get(name, 0) + 1
        key = name if count == 1 else f"{name}#{count}"
        storage = self.worker.storage
        if self.stored_steps is None:
            self.stored_steps = self.worker._retry_until_stored(storage.step_outputs, self.task_id)
        self.used_steps = True
        if key in self.stored_steps:
            try:
                hint = typing.get_type_hints(fn).get("return")
            except Exception:
                hint = None
            value = _revive(None if hint is type(None) else hint, self.stored_steps[key])
            return _awaitable(value) if inspect.iscoroutinefunction(fn) else value
        started = _now()
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):   # an async def step, in an async task: awaited there
            return self._store_awaited(key, started, result)
        return self._store(key, started, result)

    async def _store_awaited(self, key, started, awaitable):
        return self._store(key, started, await awaitable)

    def _store(self, key, started, result):
        """Store the result of step ``key`` (in a commit of its own) and return it."""
        output = dumps(result, f"the result of step {key!r}")   # UnserializableError names the step
        storage = self.worker.storage
        with self.flush_lock:   # after the records a timer's flush is writing, if any: they keep their order
            stored, dropped = self.worker._retry_until_stored(
                storage.save_step, self.task_id, self.node_id, key, self.attempt, started, output,
                self.worker.node_timeout, self._take(), (MAX_TASK_LOG_RECORDS, MAX_TASK_LOG_CHARS))
            self.dropped += dropped
        if not stored:
            self.worker.logger.warning("task %s: step %s was not stored: the task is no longer this worker's",
                                       self.task_id, key)
        return result

    # --- log records ---

    def add(self, record):
        """Buffer a log record of the task's thread (called by _TaskLogCapture, in that thread)."""
        try:
            message = record.getMessage()
        except Exception:   # arguments that do not fit the format: keep what there is
            message = f"{record.msg!r} {record.args!r}"
        if record.exc_info:
            message += "\n" + _LOG_FORMATTER.formatException(record.exc_info)
        if record.stack_info:
            message += "\n" + record.stack_info
        message = message.replace("\x00", "\\x00")   # PostgreSQL text cannot hold U+0000
        with self.lock:
            if len(self.records) >= MAX_TASK_LOG_RECORDS or self.buffered_chars + len(message) > MAX_TASK_LOG_CHARS:
                self.dropped += 1
                return
            self.records.append((self.attempt, record.created, record.levelname, record.name, message, False))
            self.buffered_chars += len(message)
            if self.timer is None:
                self.timer = threading.Timer(TASK_LOG_FLUSH_INTERVAL, self._timed_flush)
                self.timer.daemon = True
                self.timer.start()

    def _take(self):
        with self.lock:
            records, self.records, self.buffered_chars = self.records, [], 0
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        return records

    def _timed_flush(self):
        with self.lock:
            self.timer = None
        self.flush()

    def flush(self, final=False):
        """Write the buffered records (``final``: and the note of those left out, if any). A
        database error loses them, with a warning: a task's log must not fail the task."""
        with self.flush_lock:
            records = self._take()
            bounds = (MAX_TASK_LOG_RECORDS, MAX_TASK_LOG_CHARS)
            try:
                if records:
                    self.dropped += self.worker.storage.write_logs(self.task_id, self.node_id, records, bounds)
                if final and self.dropped:   # rare: a commit of its own, once every count is known
                    records = [(self.attempt, _now(), "WARNING", "lilota", f"{self.dropped} log record(s) of this "
                                f"attempt were left out: a task keeps at most {bounds[0]} records and {bounds[1]} "
                                f"characters of log", True)]
                    self.dropped = 0
                    self.worker.storage.write_logs(self.task_id, self.node_id, records, bounds)
            except StorageError as exc:
                self.worker.logger.warning("task %s: %d log record(s) could not be stored (%s)", self.task_id,
                                           len(records), exc)


_LOG_FORMATTER = logging.Formatter()


class _TaskLogCapture(logging.Handler):
    """The handler on the root logger that stores the log records of running tasks: those of a
    thread that runs a task (``runs``), at the task's level or above, from any logger but lilota's
    own. The root logger's level is lowered to the lowest task level while workers run, and only
    when logging is unconfigured (no handler on the root): then Python's last resort (stderr,
    WARNING and above) was the only output, and this handler passes it on what it would have got."""

    def __init__(self):
        super().__init__()
        self.runs = {}         # thread ident -> _TaskRun
        self.users = 0         # workers running in this process
        self.lowered = None    # (the root's level before, the level set) while lowered
        self.forward = False

    def emit(self, record):
        run = self.runs.get(record.thread)
        if run is not None and record.levelno >= run.level and not (
                record.name == "lilota" or record.name.startswith("lilota.")):
            run.add(record)
        last_resort = logging.lastResort
        if self.forward and last_resort is not None and record.levelno >= last_resort.level \
                and not self._others(record.name):
            last_resort.handle(record)

    def _others(self, name):
        """Whether a handler other than this one sees records of logger ``name``."""
        log = logging.getLogger(name) if name != "root" else logging.getLogger()
        while log is not None:
            if any(handler is not self for handler in log.handlers):
                return True
            if not log.propagate:
                return False
            log = log.parent
        return False

    def install(self, level):
        """Called by a worker starting to run tasks whose lowest log level is ``level``."""
        root = logging.getLogger()
        with _TASK_LOGS_LOCK:
            self.users += 1
            if self.users == 1:
                self.forward = not root.handlers
                if self.forward and root.level > level:
                    self.lowered = (root.level, level)
                    root.setLevel(level)
                root.addHandler(self)

    def uninstall(self):
        root = logging.getLogger()
        with _TASK_LOGS_LOCK:
            self.users -= 1
            if self.users == 0:
                root.removeHandler(self)
                if self.lowered is not None and root.level == self.lowered[1]:
                    root.setLevel(self.lowered[0])
                self.lowered = None


_TASK_LOGS_LOCK = threading.Lock()
_TASK_LOGS = _TaskLogCapture()


# --- The worker -----------------------------------------------------------------------------------

def _rss_bytes():
    """This process's resident memory in bytes (Linux: now; elsewhere: its peak), or None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:   # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024



class LilotaWorker(_NodeBase):
    """The worker side: register task functions, then ``start()`` to execute tasks.

    Run standalone (``python myscript.py``) it executes tasks until stopped (Ctrl-C, SIGTERM or
    ``stop()``). Run by :class:`Lilota` (``script_path=``), each worker process runs the script
    and the supervisor handles timeouts, crashes and stop.

    ``keep_finished`` (a timedelta or seconds; None: keep them until ``cleanup()``): a standalone
    worker deletes finished tasks older than that in the background, as Lilota does; under a
    supervisor it is ignored, the supervisor's own ``keep_finished`` applies.
    """

    #: An idle worker claims at least this often (seconds), whatever it was told: a safety net
    #: under the doorbell and the change counter, which are what normally wake it.
    safety_claim_interval = 5.0

    def __init__(self, db_url=None, set_progress_manually=False, *, name=None, poll_interval=0.02,
                 heartbeat_interval=5.0, node_timeout=30.0, retry_delay=timedelta(seconds=1),
                 retry_max_delay=timedelta(minutes=10), node_heartbeat_interval=None,
                 node_heartbeat_interval_jitter=None, node_timeout_sec=None, task_heartbeat_interval=None,
                 max_task_heartbeat_interval=None, logging_level=None, keep_finished=None, queues=None,
                 task_log_level=logging.INFO):
        # Upstream lilota's arguments (the six before keep_finished): see _UPSTREAM_OPTIONS.
        self._set_up(db_url or (_supervision.db_url if _supervision else None), LilotaWorker.__init__, locals())
        # The application's assignment (Lilota(queues=...)) wins over the script's own.
        self.queues = _queue_list(queues)
        if _supervision is not None and _supervision.queues is not None:
            self.queues = tuple(_supervision.queues)
        self.set_progress_manually = bool(set_progress_manually)
        self.name = name
        self.poll_interval = _seconds(poll_interval, "poll_interval", allow_zero=False)
        # Standalone only: under a supervisor, the supervisor's keep_finished is what applies.
        self.keep_finished = _seconds(keep_finished, "keep_finished", allow_zero=False)
        # The level from which a task's log records are stored with it (register(log_level=) wins).
        self.task_log_level = _log_level("task_log_level", task_log_level)
        self._registry = {}
        self._periodic = {}           # schedule name -> _Periodic
        self._periodic_runner = None  # run_periodic()'s, kept for what this node already handled
        self._claim = None
        self._claim_lost = False      # a claim may have been committed with its reply lost
        self._node_id = None
        self._helper_node_id = None
        self._stopping = threading.Event()
        self._running = False
        self._wake_r = self._wake_w = None
        self._fds_lock = threading.RLock()   # re-entrant: stop() may run in a signal handler
        self._current = None          # the task being executed, for the keeper thread
        self._interrupt = None        # (task id, reason) the keeper asked to stop
        self._interruptible = False
        self._event_loop = None       # where async task functions run: one per process, kept
        self._coroutine_task = None   # the asyncio.Task of the async task function running now
        self._tasks_run = 0           # by this process: what max_tasks_per_worker counts
        self._recycled = None         # why this worker process stops to be replaced, once it does
        self.logger = logging.getLogger("lilota.worker")

    # --- registration ---

    def register(self, name, input_model=None, output_model=None, task_progress=None,
                 timeout=timedelta(minutes=5), max_attempts=1, keep_input=True, retry_on=None, no_retry_on=None,
                 keep_steps=True, log_level=None):
        """Decorator registering a task function under ``name``.

        The function receives its input as an ``input_model`` instance (the stored dict when there
        is none); with ``task_progress=TaskProgress`` (or a parameter annotated TaskProgress) also a
        :class:`TaskProgress`, and a parameter annotated :class:`TaskContext` receives the context.
        A run longer than ``timeout`` (None: no limit) is stopped and ends expired; ``max_attempts``
        counts every execution (1: no retry). ``keep_input=False`` deletes the input once the task
        has finished for good.

        ``retry_on`` (an exception class or a tuple of them): only failures raising one of these
        (or a subclass) are retried, any other ends the task at once; ``no_retry_on``: failures
        raising one of these end the task at once, others are retried. A type matching both is not
        retried. A timeout counts as :class:`TaskTimeoutError` (a ``TimeoutError``); a worker
        crash is retried whatever the filters. Raising :class:`Retry` is never a failure.

        ``keep_steps=False`` deletes the task's stored steps (``ctx.step``) once it completes
        (else they are kept until the task is deleted). ``log_level`` (a logging level; None: the
        worker's ``task_log_level``): the level from which the task's log records are stored.
        """
        def decorator(func):
            self._add(_TaskFunction(_check_name(name), func, input_model, output_model, bool(task_progress),
                                    timeout, max_attempts, keep_input, retry_on, no_retry_on, keep_steps, log_level))
            return func
        return decorator

    def task(self, func=None, *, name=None, timeout=timedelta(minutes=5), max_attempts=1, keep_input=True,
             retry_on=None, no_retry_on=None, cron=None, timezone=None, catch_up=True, keep_steps=True,
             log_level=None):
        """Decorator registering a task under the function's name (or ``name``), with the input and
        output models read from its annotations: ``@worker.task`` or ``@worker.task(name=...)``.
        The other options are those of :meth:`register`. ``cron`` (with ``timezone`` and
        ``catch_up``) also makes it periodic: see :meth:`periodic`."""
        if cron is None and (timezone is not None or catch_up is not True):
            raise ValueError("timezone= and catch_up= go with cron= (or worker.periodic(...)); give cron= too")

        def decorator(fn):
            try:
                output_model = typing.get_type_hints(fn).get("return")
            except Exception:
                output_model = None
            if cron is not None:   # first: a bad expression registers nothing
                self.periodic(name or fn.__name__, cron=cron, timezone=timezone, catch_up=catch_up)
            return self.register(name or fn.__name__, None, None if output_model is type(None) else output_model,
                                 None, timeout, max_attempts, keep_input, retry_on, no_retry_on, keep_steps,
                                 log_level)(fn)
        return decorator(func) if func is not None else decorator

    def periodic(self, task, *, cron=None, every=None, timezone=None, input=None, queue=DEFAULT_QUEUE,
                 catch_up=True, name=None):
        """Enqueue task ``task`` with ``input`` in ``queue`` periodically, while this worker runs:
        at each time ``cron`` matches ("*/15 * * * *", "@daily"; in ``timezone``, an IANA name,
        default UTC), or every ``every`` (a timedelta or seconds, at least 1 s; slots are its
        multiples since the epoch). However many nodes have the schedule, each slot gets one task
        (``Task.scheduled_for``, ``ctx.scheduled_for``). A slot missed while no node ran is enqueued
        once when one starts (the latest only), unless ``catch_up=False``. ``name``: the schedule's
        name (default: ``task``), unique per worker and what the database records it under.

        ValueError for a bad cron expression (naming the field and its range), an unknown time
        zone, both or neither of cron and every, or a name given twice; TypeError for an input that
        cannot be stored."""
        if self._running:
            raise LilotaError("add periodic schedules before worker.start(); the running worker cannot take new ones")
        _check_name(task)
        _check_queue(queue)
        name = _check_name(task if name is None else name)
        if name in self._periodic:
            raise ValueError(f"a periodic schedule named {name!r} is already defined; give name= to tell them apart")
        self._periodic[name] = _Periodic(name, task, cron=cron, every=every, timezone=timezone,
                                         input_json=dumps(input, "input"), queue=queue, catch_up=catch_up)
        self._periodic_runner = None

    def run_periodic(self, now=None):
        """Enqueue the due slots of this worker's periodic schedules, as a running worker does, as
        of ``now`` (an aware datetime; default: the clock) -- the test helper, with
        ``run_pending()`` to run them; returns the ids of the tasks enqueued. Later calls remember
        the slots handled, as one running node does; each worker is a node of its own."""
        if now is not None:
            if not isinstance(now, datetime) or now.utcoffset() is None:
                raise ValueError(f"now must be a timezone-aware datetime, got {now!r}")
            now = now.timestamp()
        if self._periodic_runner is None:
            self._periodic_runner = _PeriodicRunner(self, self._periodic.values())
        return self._periodic_runner.tick(now)

    def _start_periodic(self):
        """The thread that enqueues this worker's periodic slots (None without schedules)."""
        if not self._periodic:
            return None
        unknown = sorted({p.task for p in self._periodic.values()} - set(self._registry))
        if unknown:
            self.logger.warning("periodic schedules enqueue task(s) %s that this worker does not register; "
                                "workers elsewhere must run them", ", ".join(map(repr, unknown)))
        return _PeriodicRunner(self, self._periodic.values()).start()

    def _add(self, task_function):
        if self._running:
            raise LilotaError("register tasks before worker.start(); the running worker cannot take new ones")
        if task_function.name in self._registry:
            raise ValueError(f"a task named {task_function.name!r} is already registered")
        self._registry[task_function.name] = task_function
        self._claim = None

    @property
    def registered_names(self):
        """The names of the registered tasks, sorted."""
        return sorted(self._registry)

    # --- upstream lilota's queries on a worker ---

    def get_node(self):
        """This worker's :class:`Node` while it runs (``start()``), else None."""
        node_id = _supervision.node_id if self._running and _supervision is not None else self._node_id
        return None if node_id is None else self.storage.node(node_id)

    def _prepared_claim(self):
        if self._claim is None:
            self._claim = self.storage.prepare_claim(
                ((t.name, t.timeout, t.max_attempts, t.keep_input) for t in self._registry.values()), self.queues)
        return self._claim

    # --- executing one task ---

    def _execute(self, task, node_id, claim_next=None):
        """Run one claimed task and store its outcome. Never raises for the task's own errors.
        With ``claim_next`` (the prepared claim), a completion claims the next task in its commit,
        unless stop() was called meanwhile: returns that task, or None."""
        storage = self.storage
        function = self._registry.get(task.name)
        if function is None:
            known = ", ".join(repr(n) for n in self.registered_names) or "none"
            self.logger.warning("task %s: unknown task name %r", task.id, task.name)
            self._retry_until_stored(storage.finish_attempt, task, node_id, _error_record(UnknownTaskError(
                f"no task named {task.name!r} is registered in this worker (registered: {known}); "
                f"register it with @worker.register({task.name!r}) in the worker script"), attempt=task.attempts))
            return None
        progress = context = None
        run = _TaskRun(self, task, node_id, function)
        if function.progress_param is not None or function.context_param is not None:  # only if it takes them
            progress = TaskProgress(task.id, functools.partial(self._store_progress, node_id))
            if function.context_param is not None:
                context = TaskContext(task_id=task.id, name=task.name, attempt=task.attempts,
                                      max_attempts=task.max_attempts or 1, progress=progress,
                                      logger=logging.getLogger("task." + task.name), scheduled_for=task.scheduled_for,
                                      dependency_outputs=task.depends_on and functools.partial(
                                          self._dependency_outputs, task), run=run)
        self._current, self._interrupt = task, None
        self._tasks_run += 1
        thread = threading.get_ident()
        failure = None
        try:
            try:
                _TASK_LOGS.runs[thread] = run   # from here the thread's log records are the task's
                # A signal stops a plain function; a coroutine is cancelled on its loop instead.
                self._interruptible = not function.is_async
                if self._interrupt is not None:  # asked to stop before we got here
                    raise _Interrupted(self._interrupt[1])
                result = function(task.input, progress, context)
                if function.is_async:
                    result = self._await(task, result)
            finally:
                self._interruptible = False
                _TASK_LOGS.runs.pop(thread, None)
                if run.records or run.dropped:
                    run.flush(final=True)
            output = function.output(result)
        except _Interrupted as stop:
            self._end_interrupted(task, node_id, str(stop), function)
            return None
        except Retry as retry:   # asked for, not a failure
            self._end_retry(task, node_id, retry)
            return None
        except KeyboardInterrupt:
            # Ctrl-C of a standalone worker: give the task back to the queue and stop.
            self._retry_until_stored(_give_back, storage, node_id,
                                     "the worker was interrupted; the task was queued again", task)
            raise
        except BaseException as exc:  # the task's own failure, SystemExit included
            failure = _error_record(exc, attempt=task.attempts), function.retries(exc)
        finally:
            self._current = None
        if failure is not None:
            # Stored once the exception is gone: its traceback holds the task's frames and what
            # they hold, e.g. the memory whose lack raised a MemoryError, which storing needs.
            self._end_failed(task, node_id, failure[0], retry=failure[1])
            return None
        try:
            stored, next_task = self._store_output(task, node_id, output, claim_next)
        except UnserializableError as exc:   # the database refused this output (PostgreSQL: U+0000, size)
            self._end_failed(task, node_id, _error_record(exc, attempt=task.attempts), retry=function.retries(exc))
            return None
        if not stored:
            self.logger.info("task %s finished but was no longer this worker's (cancelled or recovered); "
                             "its result was not stored", task.id)
        elif run.used_steps and not function.keep_steps:
            try:
                storage.delete_steps(str(task.id))
            except StorageError as exc:
                self.logger.warning("task %s: could not delete its steps (keep_steps=False): %s", task.id, exc)
        return next_task

    def _dependency_outputs(self, task):
        """{id: stored output} of the tasks ``task`` depends on (TaskContext.dependency_outputs)."""
        return {task_id: output for task_id, _, output in
                self._retry_until_stored(self.storage.dependencies, str(task.id))}

    def _store_output(self, task, node_id, output, claim_next):
        """Store a completed task's output: (stored, the next task claimed in the same commit or None)."""
        storage = self.storage
        failed = False
        if claim_next is not None and not self._stopping.is_set() and self._recycle_reason() is None:
            try:
                result = storage.complete_and_claim(str(task.id), node_id, output, self.set_progress_manually,
                                                    claim_next, os.getpid())
                if result is not None:
                    return result
            except UnserializableError:
                raise
            except StorageError as exc:
                # Stored or not, and a task claimed or not: with the connection lost, the loop
                # releases what this node holds before it claims again (sets _claim_lost).
                failed = True
                self._claim_lost = self._claim_lost or isinstance(exc, DatabaseUnavailableError)
                self.logger.warning("could not record a task's outcome with the next claim (%s); "
                                    "storing it alone", exc)
        stored = self._retry_until_stored(storage.complete, str(task.id), node_id, output,
                                          self.set_progress_manually)
        if not stored and failed:   # the failed call may have committed it
            row = self._retry_until_stored(storage.get_task, str(task.id))
            stored = (row is not None and str(row.locked_by) == node_id
                      and row.status in (TaskStatus.COMPLETED, TaskStatus.CANCELLED))
        return stored, None

    def _recycle_reason(self):
        """Why this worker process should stop now, to be replaced by a fresh one (the
        application's max_tasks_per_worker and max_worker_memory), or None."""
        supervision = _supervision
        if supervision is None:
            return None
        if supervision.max_tasks is not None and self._tasks_run >= supervision.max_tasks:
            return f"recycled after {self._tasks_run} tasks (max_tasks_per_worker={supervision.max_tasks})"
        if supervision.max_memory is not None:
            rss = _rss_bytes()
            if rss is not None and rss > supervision.max_memory:
                return (f"recycled at {rss / 2**20:.0f} MiB of memory "
                        f"(max_worker_memory={supervision.max_memory / 2**20:.0f} MiB)")
        return None

    def _store_progress(self, node_id, task_id, percent):
        # Progress is informative: a database hiccup must not fail the task that reports it.
        try:
            self.storage.set_progress(str(task_id), node_id, percent)
        except StorageError as exc:
            self.logger.warning("task %s: could not store progress %s%% (%s)", task_id, percent, exc)

    def _retry_until_stored(self, write, *args, **kwargs):
        """Store a task's outcome, retrying while the database refuses: the worker takes no other
        task while one's outcome is unrecorded (the task would stay running and be run again)."""
        delay = 0.01
        while True:
            try:
                return write(*args, **kwargs)
            except StorageError as exc:
                self.logger.warning("could not record a task's outcome (%s); retrying in %.2fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _end_failed(self, task, node_id, error, final_status=TaskStatus.FAILED, retry=True):
        """End a failed attempt: retried with backoff while attempts remain, unless ``retry`` is
        False (the error's type is excluded by retry_on/no_retry_on): then final at once."""
        retry_at = _retry_time(task, self.retry_delay, self.retry_max_delay) if retry else None
        note = " (will retry)" if retry_at else "" if retry else " (not retried: retry_on/no_retry_on)"
        self.logger.warning("task %s (%s) attempt %s/%s failed: %s: %s%s", task.id, task.name, task.attempts,
                            task.max_attempts, error["type"], error["message"], note)
        self._retry_until_stored(self.storage.finish_attempt, task, node_id, error, final_status=final_status,
                                 retry_at=retry_at)

    def _end_retry(self, task, node_id, retry):
        run_at = retry.run_at(_now())
        self.logger.info("task %s (%s) asked to run again in %.3gs", task.id, task.name, max(0.0, run_at - _now()))
        self._retry_until_stored(self.storage.snooze, task, node_id, run_at)

    def _end_interrupted(self, task, node_id, reason, function=None):
        if reason == "lost":   # another process declared this worker dead and already recovered the task
            self.logger.error("task %s was taken from this worker (its node was declared dead); stopped it",
                              task.id)
            return
        retries = function is None or function.retries(TaskTimeoutError())
        error, status, retry = _stopped_end(task, reason, retries, attempt=task.attempts)
        if reason == "cancel":   # not the task's failure: nothing to warn about
            self._retry_until_stored(self.storage.finish_attempt, task, node_id, error, final_status=status)
        else:
            self._end_failed(task, node_id, error, final_status=status, retry=retry)

    # --- the test helper ---

    def run_pending(self, limit=None):
        """Execute due tasks in the calling process until none is left (or ``limit`` ran) and return
        them as stored afterwards. For tests: the same serialization and records as a worker
        process, without processes; timeouts are not enforced here."""
        if self._helper_node_id is None:
            self._helper_node_id = str(uuid.uuid4())
            self.storage.add_node(self._helper_node_id, "run_pending", NodeType.WORKER, NodeStatus.RUNNING,
                                  os.getpid(), self.node_timeout, self.queues)
        else:
            self.storage.set_node_status(self._helper_node_id, NodeStatus.RUNNING)
        node_id, done, task, prepared = self._helper_node_id, [], None, self._prepared_claim()
        self._claim_lost = False
        _TASK_LOGS.install(self._lowest_log_level())
        try:
            while limit is None or len(done) < limit:
                self.storage.heartbeat([node_id], self.node_timeout)
                if self._claim_lost:
                    self._release_lost_claim(node_id)
                if task is None:
                    task = self.storage.claim(prepared, node_id, os.getpid())
                    if task is None:
                        break
                # As a worker does: a completion claims the next task, unless the limit is reached.
                last = limit is not None and len(done) + 1 >= limit
                finished, task = task, self._execute(task, node_id, None if last else prepared)
                done.append(self.storage.get_task(str(finished.id)))
        finally:
            try:
                # A task claimed by the last completion and not run (an error on the way, Ctrl-C)
                # goes back to the queue; the attempt does not count.
                _give_back(self.storage, node_id, "run_pending() stopped before running this task")
            finally:
                try:
                    self._close_event_loop()
                finally:
                    _TASK_LOGS.uninstall()
                self.storage.set_node_status(node_id, NodeStatus.STOPPED)
        return done

    def _lowest_log_level(self):
        """The lowest level from which a registered task's log records are stored."""
        return min([self.task_log_level] + [t.log_level for t in self._registry.values() if t.log_level is not None])

    # --- the worker loop ---

    def start(self):
        """Execute tasks until stopped. Blocks.

        Standalone, it stops on Ctrl-C, SIGTERM or ``stop()``, after the running task. Under a
        supervisor it stops when the supervisor says so."""
        if self._running:
            raise LilotaError("this worker is already running")
        supervision = _supervision
        if supervision is not None and not supervision.started:
            supervision.start_called = True
            return self._start_supervised(supervision)
        return self._start_standalone()

    def stop(self):
        """Ask the worker to stop after the task it is running (safe from signal handlers and threads)."""
        self._stopping.set()
        with self._fds_lock:
            _ring(self._wake_w)

    def _start_supervised(self, supervision):
        supervisor_db = _dialect_for_url(supervision.db_url)
        if self._dialect.identity != supervisor_db.identity:
            raise ConfigurationError(
                f"the worker script uses {self._dialect.describe()} but Lilota was started with "
                f"{supervisor_db.describe()}; give both the same db_url "
                f"(or leave LilotaWorker's db_url out to use the supervisor's)")
        node_id = supervision.node_id
        if supervision.node_timeout is not None:   # the lease a step renews is the supervisor's
            self.node_timeout = supervision.node_timeout
        self.storage.ensure_ready()
        self._prepared_claim()
        self.storage.set_node_status(node_id, NodeStatus.RUNNING, os.getpid(), queues=self.queues,
                                     task_names=self.registered_names)
        supervision.started = True
        doorbell = supervision.doorbell.fileno()
        os.set_blocking(doorbell, False)
        # The supervisor stops tasks that run past their timeout: tell it which are not retried then.
        final_timeouts = [t.name for t in self._registry.values() if not t.retries(TaskTimeoutError())]
        if final_timeouts:
            supervision.control.send(("no_timeout_retry", final_timeouts))
        # Those the supervisor asks to stop (their coroutine is cancelled) before it kills the process.
        async_names = [t.name for t in self._registry.values() if t.is_async]
        if async_names:
            supervision.control.send(("async_tasks", async_names))
        supervision.control.send(("ready", os.getpid()))
        self._start_keeper(node_id, supervision.control, False)
        periodic = self._start_periodic()
        try:
            self._loop(node_id, doorbell)
        finally:
            self._running = False
            if periodic is not None:
                periodic.stop()
            self._close_wake_pipe()
            self._close_event_loop()
        if self._recycled is not None:
            # A clean exit, not a crash: the supervisor starts the successor at once.
            self._retry_until_stored(self.storage.set_node_status, node_id, NodeStatus.STOPPED,
                                     reason=self._recycled)
            self.logger.info("worker %s: %s", node_id, self._recycled)
            supervision.control.send(("recycled", self._recycled))

    def _start_standalone(self):
        storage = self.storage
        storage.ensure_ready()
        self._prepared_claim()
        node_id = self._node_id = self._add_node(NodeType.WORKER, self.queues, self.registered_names)
        self._stopping.clear()
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {}
        if in_main_thread:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._on_stop_signal)
            previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_interrupt_signal)
        keeper = self._start_keeper(node_id, None, in_main_thread)
        retention = _Retention(self, self.keep_finished).start() if self.keep_finished else None
        periodic = self._start_periodic()
        status = NodeStatus.STOPPED
        storage.local_wakers.add(self._ring_wake)
        try:
            self._loop(node_id, None)
        except KeyboardInterrupt:
            pass
        except BaseException:
            status = NodeStatus.CRASHED
            raise
        finally:
            storage.local_wakers.discard(self._ring_wake)
            if in_main_thread:   # stopping already: a further signal must not cut short the records below
                for signum in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_IGN)
            self._running = False
            self._stopping.set()
            keeper.join(timeout=2 * self.heartbeat_interval)
            if retention is not None:
                retention.stop()
            if periodic is not None:
                periodic.stop()
            self._close_wake_pipe()
            self._close_event_loop()
            try:
                _give_back(storage, node_id, "the worker stopped while running this task")
                storage.set_node_status(node_id, status)
            except StorageError:
                self.logger.exception("could not record that worker %s stopped", node_id)
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def _ring_wake(self):
        with self._fds_lock:
            _ring(self._wake_w)

    def _on_stop_signal(self, signum, frame):
        """A standalone worker's Ctrl-C or SIGTERM: the first lets the running task finish, a second
        stops at once (the KeyboardInterrupt ends the task function, which is given back)."""
        if self._stopping.is_set():
            raise KeyboardInterrupt
        # Stopping before anything else: a second signal can run its handler inside this one (at
        # any bytecode), and must then find the first one counted. No lock here either: the main
        # thread may hold it where the signal found it.
        self._stopping.set()
        _ring(self._wake_w)
        self.logger.warning("lilota worker stopping after the running task (%s again: stop now)",
                            signal.Signals(signum).name)

    def _on_interrupt_signal(self, signum, frame):
        request, task = self._interrupt, self._current
        # Only the task the keeper meant: it may have finished, and another begun, since.
        if self._interruptible and request is not None and task is not None and task.id == request[0]:
            raise _Interrupted(request[1])

    def _request_interrupt(self, task, reason, can_interrupt=False):
        """Stop the running ``task`` for ``reason`` (timeout, cancel, lost): an async task function
        by cancelling its coroutine, on its loop; a plain one (``can_interrupt``: this worker
        runs in its process's main thread) by a signal that raises _Interrupted in it."""
        if self._interrupt is not None or self._current is not task:
            return
        coroutine_task = self._coroutine_task
        if coroutine_task is not None:
            self._interrupt = (task.id, reason)
            coroutine_task.get_loop().call_soon_threadsafe(coroutine_task.cancel)
        elif can_interrupt:
            self._interrupt = (task.id, reason)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def _close_event_loop(self):
        """Close the loop of the async task functions, if one was made (the next makes a new one)."""
        loop, self._event_loop = self._event_loop, None
        if loop is not None and not loop.is_closed():
            loop.close()

    def _await(self, task, coroutine):
        """Run an async task function's coroutine to its end on this process's event loop (made on
        first use, kept for the next tasks) and return its result. Past the task's timeout the
        coroutine is cancelled (_Interrupted("timeout")); _request_interrupt cancels it too."""
        import asyncio
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:   # run_pending() called from async code: this thread's loop is busy running it
            import concurrent.futures
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lilota-async-task") as pool:
                return pool.submit(self._await, task, coroutine).result()
        loop = self._event_loop
        if loop is None or loop.is_closed():
            loop = self._event_loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
        limit = None if task.expires_at is None else max(0.0, task.expires_at.timestamp() - _now())

        async def run():
            deadline = None if limit is None else loop.time() + limit
            try:
                return await asyncio.wait_for(coroutine, limit)
            except asyncio.TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    raise _Interrupted("timeout") from None
                raise   # the task's own
        runner = self._coroutine_task = loop.create_task(run())
        try:
            if self._interrupt is not None:   # asked before the coroutine could be cancelled
                runner.cancel()
            return loop.run_until_complete(runner)
        except asyncio.CancelledError:
            if self._interrupt is not None:
                raise _Interrupted(self._interrupt[1]) from None
            raise
        finally:
            self._coroutine_task = None

    def _start_keeper(self, node_id, control, can_interrupt):
        """Mark the worker running and start its keeper thread (see _keep) beside the loop."""
        self._running = True
        self._open_wake_pipe()
        keeper = threading.Thread(target=self._keep, args=(node_id, control, can_interrupt), name="lilota-keeper",
                                  daemon=True)
        keeper.start()
        return keeper

    def _keep(self, node_id, control, can_interrupt):
        """The keeper thread: reads the notifications the loop does not while a task runs. Under a
        supervisor (``control``) it listens to it as long as the process lives; standalone it does
        what a supervisor would: renew the lease, recover lost nodes' tasks and (in the main thread,
        where a signal can interrupt the task function) stop the task that must stop."""
        storage = self.storage
        next_beat = 0.0
        while control is not None or not self._stopping.is_set():
            if control is not None and self._listen(control):
                continue
            try:
                if control is None and time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_interval
                    if self._renew_leases([node_id]):
                        # Declared dead while alive: the running task was recovered elsewhere. Stop
                        # it; the worker is alive again for the next ones.
                        self.logger.error("worker %s was declared dead by another process; resuming", node_id)
                        task = self._current
                        if task is not None:
                            self._request_interrupt(task, "lost", can_interrupt)
                    _recover_lost_nodes(storage, self.retry_delay, self.retry_max_delay,
                                        settle=self.node_timeout)
                task = self._current
                if task is not None:
                    storage.drain_notifications()   # the loop does not, while the task runs
                if control is None and task is not None and self._interrupt is None:
                    for hit in storage.running_tasks([node_id], only_overdue_or_cancelled=True):
                        if hit.id == task.id:
                            self._request_interrupt(task, _stop_reason(hit), can_interrupt)
            except StorageError:
                self.logger.warning("worker %s: database unavailable for heartbeat; will retry", node_id,
                                    exc_info=True)
            if control is None:
                self._stopping.wait(0.1 if self._current is not None else min(1.0, self.heartbeat_interval))

    def _listen(self, control):
        """Wait up to a second for a word of the supervisor; True when there was one."""
        try:
            if not control.poll(1.0):
                return False
            message = control.recv()
        except (EOFError, OSError):
            # The application that started us is gone: workers never outlive it. A running task
            # is recovered by the next lilota process that sees this node's process gone.
            os._exit(1)
        if message and message[0] == "stop":
            self.stop()
        elif message and message[0] == "interrupt":   # the supervisor's: stop this async task
            task = self._current
            if task is not None and str(task.id) == message[1]:
                self._request_interrupt(task, message[2])
        return True

    def _loop(self, node_id, doorbell):
        """Claim and execute until stopped; sleep on the doorbell and the change counter when idle."""
        storage = self.storage
        prepared = self._prepared_claim()
        pid = os.getpid()
        stopping = self._stopping
        waitables = [self._wake_r] + ([doorbell] if doorbell is not None else [])
        errors = 0
        self._claim_lost = False   # also set by _store_output, when a completion's claim may be lost
        drained_at = time.monotonic()
        woken = False   # back from _idle: the claim that follows the look below is the only one
        _TASK_LOGS.install(self._lowest_log_level())   # the running tasks' log records are stored
        try:
            while not stopping.is_set():
                try:
                    if self._claim_lost:
                        self._release_lost_claim(node_id)
                    self._recycled = self._recycle_reason()
                    if self._recycled is not None:
                        return
                    task = None if woken else storage.claim(prepared, node_id, pid)
                    woken = False
                    if task is None:
                        # Idle. Empty the doorbell, read the change counter and make sure the listener
                        # listens, then claim once more: a task stored after that claim rang the bell,
                        # moved the counter or notified after its commit, so it is either claimed now
                        # or wakes us below. Woken, a worker starts here: every idle worker is woken
                        # by each task queued, and all but one find nothing -- with one claim each.
                        rings = _drain(doorbell) if doorbell is not None else 0
                        counter = storage.change_counter()
                        listening = storage.listen_fd()
                        task = storage.claim(prepared, node_id, pid)
                        if task is None:
                            errors = 0
                            self._idle(waitables if listening is None else waitables + [listening], counter,
                                       listening)
                            woken = True
                            continue
                        if rings > 1:   # more work was announced: pass the wake-up on to another worker
                            _ring(_supervision.doorbell_writer.fileno() if _supervision else None)
                    errors = 0
                    # Busy: each completion claims the next task in the completion's commit, until none
                    # is due or stop() is called.
                    while task is not None:
                        task = self._execute(task, node_id, prepared)
                        if task is not None and stopping.is_set():
                            # stop() came while the commit that claimed it was under way: give it back.
                            self._retry_until_stored(_give_back, storage, node_id,
                                                     "the worker stopped before running this task", task)
                            break
                        if time.monotonic() - drained_at > 1.0:
                            storage.drain_notifications()
                            drained_at = time.monotonic()
                except StorageError as exc:
                    # Locked, full, the server gone (restarting, network): wait it out here. A worker
                    # that died of it would be replaced by one that meets the same error: a crash loop.
                    # A claim whose reply was lost with the connection may have been committed:
                    # release it first.
                    self._claim_lost = self._claim_lost or isinstance(exc, DatabaseUnavailableError)
                    errors += 1
                    self.logger.warning("worker %s: database error, retrying: %s", node_id, exc)
                    stopping.wait(min(2.0, 0.01 * 2 ** min(errors, 8)))
        finally:
            _TASK_LOGS.uninstall()

    def _release_lost_claim(self, node_id):
        """Requeue tasks this worker holds but does not execute: claimed by a statement whose
        reply the lost connection swallowed. Such an attempt does not count."""
        for task in _give_back(self.storage, node_id,
                               "the connection to the database was lost while this task was being claimed"):
            self.logger.warning("worker %s: requeued task %s, claimed as the connection was lost", node_id,
                                task.id)
        self._claim_lost = False

    def _idle(self, waitables, counter, listening=None):
        """Wait until the doorbell rings, another connection commits (the change counter moves away
        from ``counter``) or notifies (``listening`` is readable), a delayed task falls due, or
        stop() is called."""
        storage = self.storage
        due = storage.next_run_at()
        give_up = time.monotonic() + self.safety_claim_interval
        while not self._stopping.is_set():
            timeout = self.poll_interval
            if due is not None:
                timeout = max(0.0, min(timeout, due - _now()))
            ready = select.select(waitables, [], [], timeout)[0]
            if ready:
                if self._wake_r in ready:
                    _drain(self._wake_r)
                if listening is not None and listening in ready:
                    storage.drain_notifications()
                return
            if due is not None and _now() >= due:
                return
            new_counter = storage.change_counter()
            if new_counter != counter or time.monotonic() > give_up:
                return


# ==================================================================================================
# 5. Supervisor
# ==================================================================================================

# --- Worker processes -----------------------------------------------------------------------------

def _die_with_parent(parent_pid):
    """On Linux, have the kernel kill this process when its parent dies (the supervisor's thread,
    or the forkserver, which exits with the application); everywhere the keeper thread also notices
    the closed control pipe. ``parent_pid`` None: the parent is not the application (forkserver)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass
    if parent_pid is not None and os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def _describe_exit(code):
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _log_to_stderr_from_environment():
    """With $LILOTA_LOG_LEVEL set (e.g. INFO; ``lilota -v`` sets it for its worker processes), send
    the records of that level and above, of every logger, lilota's included, to stderr, as
    ``logging.basicConfig()`` does (which is then done). Unset: logging is left as it is."""
    level = os.environ.get("LILOTA_LOG_LEVEL", "").strip().upper()
    if not level:
        return
    try:
        logging.basicConfig(level=int(level) if level.isdigit() else level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    except ValueError:
        sys.stderr.write(f"lilota: LILOTA_LOG_LEVEL={level!r} ignored: not a logging level (DEBUG, INFO, WARNING, "
                         f"ERROR)\n")


def _script_module(path):
    """(module name, directory to import it from) for a script inside a package (a directory with
    ``__init__.py``), which runs as ``python -m`` would run it so that its relative imports work;
    None for a plain script."""
    directory, filename = os.path.split(path)
    name, extension = os.path.splitext(filename)
    if extension != ".py" or name == "__init__" or not name.isidentifier():
        return None
    parts = [name]
    while os.path.isfile(os.path.join(directory, "__init__.py")):
        directory, package = os.path.split(directory)
        if not package.isidentifier():
            return None
        parts.insert(0, package)
    return (".".join(parts), directory) if len(parts) > 1 else None


def _run_script(script_path):
    """Run the worker script as ``__main__``: a script inside a package as its module (``pkg/tasks.py``
    as ``python -m pkg.tasks``, with the directory above ``pkg`` first on sys.path), else by path.
    The script's own directory is on sys.path in both cases, as it always was."""
    sys.path.insert(0, os.path.dirname(script_path))
    module = _script_module(script_path)
    if module is not None:
        sys.path.insert(0, module[1])
        import importlib.util
        spec = importlib.util.find_spec(module[0])   # None, or another file: a package name taken
        if spec is not None and spec.origin and os.path.samefile(spec.origin, script_path):
            runpy.run_module(module[0], run_name="__main__", alter_sys=True)
            return
    runpy.run_path(script_path, run_name="__main__")


def _script_traceback(exc):
    """The traceback of an exception raised by running a worker script, from the script's first
    frame on: lilota's and runpy's frames above it say nothing about what is wrong."""
    trace = traceback.TracebackException.from_exception(exc)
    frames = list(trace.stack)
    for index, frame in enumerate(frames):
        if frame.filename not in (__file__, runpy.__file__) and "runpy" not in frame.filename:
            trace.stack = traceback.StackSummary.from_list(frames[index:])
            break
    else:
        trace.stack = traceback.StackSummary.from_list([])   # e.g. a SyntaxError: it shows the line
    return "".join(trace.format())


def _worker_process_main(script_path, supervision):
    """Entry point of a worker process: run the worker script as ``__main__`` under supervision."""
    global _supervision
    _supervision = supervision
    # The script imports lilota by that name: let it find this very module (and its _supervision).
    sys.modules.setdefault("lilota", sys.modules[__name__])
    # The supervisor owns this process's life: Ctrl-C and a SIGTERM sent to the whole process group
    # are the application's to handle (it stops the workers gracefully); it ends them with SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(supervision.parent_pid)
    sys.argv = [script_path]
    _log_to_stderr_from_environment()
    try:
        _run_script(script_path)
    except SystemExit as exc:
        if supervision.started:
            raise
        text = f"the worker script {script_path} exited (sys.exit({exc.code!r})) before calling worker.start()"
    except BaseException as exc:
        if supervision.started:
            raise
        if not supervision.start_called:
            text = f"the worker script {script_path} failed before calling worker.start():\n" \
                   + _script_traceback(exc)
        elif isinstance(exc, ConfigurationError):   # e.g. another database than the application's
            text = f"worker.start() in the worker script {script_path} refused to run: {exc}"
        else:
            text = f"worker.start() in the worker script {script_path} failed:\n" + traceback.format_exc()
    else:
        if supervision.started:
            return
        text = (f"the worker script {script_path} finished without calling worker.start(); call it (e.g. under "
                f"`if __name__ == \"__main__\":`) so that the worker executes tasks")
    supervision.report_fatal(text)
    os._exit(_EXIT_FATAL)


# --- The supervisor -------------------------------------------------------------------------------

class _WorkerHandle:
    """The supervisor's view of one worker process."""

    def __init__(self, index, node_id, process, control):
        self.index = index
        self.node_id = node_id
        self.process = process
        self.control = control
        self.started_at = time.monotonic()
        self.ready = False      # it called worker.start()
        self.fatal = None       # what it reported before dying, if anything
        self.recycled = None    # why it exits to be replaced (a recycling limit), if it does
        self.no_timeout_retry = frozenset()   # task names whose timeout ends them (retry_on/no_retry_on)
        self.async_names = frozenset()        # task names of async functions: cancelled before a kill
        self.interrupted = {}                 # task id -> monotonic time its coroutine was asked to stop


class Lilota(LilotaScheduler):
    """The application side: schedule tasks and run ``number_of_workers`` worker processes.

    ``start()`` starts the worker processes (each runs ``script_path`` as ``__main__``) and a
    supervisor thread that restarts crashed workers with backoff, stops tasks that run past their
    timeout or are cancelled, recovers the tasks of dead workers, and reports a broken script in
    ``error`` without restarting it. ``stop()`` (also on leaving a ``with`` block and at interpreter
    exit) lets running tasks finish for ``stop_timeout`` seconds, then stops the rest and queues
    them again. Worker processes are started with ``spawn`` by default, so the application's own
    entry point must be guarded by ``if __name__ == "__main__":`` as with any multiprocessing program.

    ``keep_finished`` (a timedelta or seconds; default None: keep them until ``cleanup()``): while
    started, finished tasks that ended longer ago than that are deleted in the background, in
    batches; when several nodes share the database, one of them does it in each interval.

    Signals (in the main thread): a SIGTERM while the workers run ends the application as Ctrl-C
    does (SystemExit, which stops lilota gracefully), unless the application handles SIGTERM
    itself; a SIGINT or SIGTERM during stop() stops the workers at once. Either way the tasks
    still running go back to the queue, their attempt not counted.
    """

    #: The first worker process starts alone, the others once it is ready (or after this many
    #: seconds): eight interpreters starting together share the cores, and the first is ready last.
    first_worker_head_start = 2.0

    def __init__(self, db_url=None, *, script_path=None, number_of_workers=None, stop_timeout=30.0,
                 heartbeat_interval=5.0, node_timeout=30.0, restart_delay=0.5, restart_max_delay=30.0,
                 retry_delay=timedelta(seconds=1), retry_max_delay=timedelta(minutes=10),
                 start_method="spawn", name=None, mode=LilotaMode.ALL, on_fatal_error=None,
                 scheduler_heartbeat_interval=None, scheduler_timeout_sec=None, process_manager_interval=None,
                 stop_worker_timeout=None, logging_level=None, keep_finished=None, queues=None,
                 max_tasks_per_worker=None, max_worker_memory=None):
        # Upstream lilota's arguments (the five before keep_finished): see _UPSTREAM_OPTIONS. retry_delay and
        # retry_max_delay: the backoff before a task whose worker died or timed out runs again (the
        # worker's own applies to tasks that raised).
        self._set_up(db_url, Lilota.__init__, locals())
        try:
            self.mode = LilotaMode(mode)
        except ValueError:
            raise ConfigurationError(f"mode must be one of {', '.join(repr(m.value) for m in LilotaMode)} "
                                     f"(a LilotaMode), got {mode!r}") from None
        if on_fatal_error is not None and not callable(on_fatal_error):
            raise TypeError(f"on_fatal_error must be a function taking the error, not {type(on_fatal_error).__name__}")
        self.on_fatal_error = on_fatal_error
        if self.mode is LilotaMode.SCHEDULER:
            script_path = number_of_workers = None   # as upstream: a scheduler runs no workers
        elif self.mode is LilotaMode.WORKERS and script_path is None:
            raise ConfigurationError("mode=LilotaMode.WORKERS needs a script_path: the worker script to run")
        self.number_of_workers = 0
        self.script_path = None
        self._queue_plan = []    # the queues each worker process serves, by index
        self._queues_given = queues is not None
        if self.mode is LilotaMode.SCHEDULER:
            queues = None
        elif queues is not None and script_path is None:
            raise ConfigurationError("queues needs a script_path: the worker script whose processes serve them")
        if script_path is not None:
            if not isinstance(script_path, (str, os.PathLike)):
                raise TypeError(f"script_path must be a path, not {type(script_path).__name__}")
            path = os.path.abspath(os.fspath(script_path))
            if not os.path.isfile(path):
                raise WorkerScriptError(f"worker script {os.fspath(script_path)!r} not found (looked for {path}); "
                                        f"script_path must name the file that creates the LilotaWorker")
            self.script_path = path
            if number_of_workers is not None and (isinstance(number_of_workers, bool)
                                                  or not isinstance(number_of_workers, int)
                                                  or not 1 <= number_of_workers <= 1024):
                raise ConfigurationError(f"number_of_workers must be an int from 1 to 1024, got {number_of_workers!r}")
            self._queue_plan = _queue_plan(queues, number_of_workers)
            if len(self._queue_plan) > 1024:
                raise ConfigurationError(f"queues={queues!r} asks for {len(self._queue_plan)} worker processes; "
                                         f"at most 1024")
            self.number_of_workers = len(self._queue_plan)
        elif number_of_workers not in (None, 0):
            raise ConfigurationError("number_of_workers needs a script_path: the worker script to run")
        for option, value in (("max_tasks_per_worker", max_tasks_per_worker), ("max_worker_memory", max_worker_memory)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{option} must be a positive int ({'tasks' if option.startswith('max_tasks') else 'bytes'}) "
                                 f"or None, got {value!r}")
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_worker_memory = max_worker_memory
        self.restart_delay = _seconds(restart_delay, "restart_delay")
        self.restart_max_delay = _seconds(restart_max_delay, "restart_max_delay")
        if start_method not in multiprocessing.get_all_start_methods():
            raise ConfigurationError(f"start_method must be one of {multiprocessing.get_all_start_methods()}, "
                                     f"got {start_method!r}")
        self.start_method = start_method
        self.name = name
        # Old finished tasks are deleted in the background while started (None: kept until cleanup()).
        self.keep_finished = _seconds(keep_finished, "keep_finished", allow_zero=False)
        self._retention = _Retention(self, self.keep_finished) if self.keep_finished else None
        self.node_id = None
        self._error = None
        self._failed = threading.Event()
        self._thread = None
        self._stop_requested = threading.Event()
        self._stop_timeout_now = None
        self._stop_at_once = False   # a signal came during stop(): kill the workers now, requeue their tasks
        self._in_stop = False        # stop() is under way (read by the signal handler)
        self._wake_r = self._wake_w = None
        self._doorbell = None
        self._doorbell_fd = None
        self._handles = []
        self._ever_ready = False     # some worker of this run called worker.start(): the script works
        self._db_file = None         # the database file's identity at start()
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        # Ringing a pipe and closing it must not interleave: a number read before a close could
        # name another file by the time of the write.
        self._fds_lock = threading.Lock()

    # --- one side only ---

    @classmethod
    def scheduler(cls, db_url=None, **options):
        """A Lilota that only schedules and looks after tasks; it starts no workers
        (``mode=LilotaMode.SCHEDULER``)."""
        return cls(db_url, mode=LilotaMode.SCHEDULER, **options)

    @classmethod
    def workers(cls, script_path, number_of_workers=None, db_url=None, **options):
        """A Lilota whose job is to run worker processes (e.g. on a worker host); it does not
        schedule (``mode=LilotaMode.WORKERS``). Upstream lilota 1.0's order, ``workers(db_url,
        script_path, number_of_workers)``, is recognised by the database URL in front."""
        if isinstance(script_path, str) and "://" in script_path and isinstance(number_of_workers, (str, os.PathLike)):
            db_url, script_path, number_of_workers = script_path, number_of_workers, db_url
        return cls(db_url, mode=LilotaMode.WORKERS, script_path=script_path, number_of_workers=number_of_workers,
                   **options)

    def _schedule(self, *args, **kwargs):
        if self.mode is LilotaMode.WORKERS:
            raise RuntimeError("this Lilota only runs workers (mode=LilotaMode.WORKERS) and cannot schedule "
                               "tasks; schedule with a Lilota in mode ALL or SCHEDULER (Lilota.scheduler(db_url))")
        return super()._schedule(*args, **kwargs)

    # --- failure reporting ---

    @property
    def error(self):
        """The fatal error of the workers (e.g. the worker script's traceback), or None."""
        return self._error

    def has_failed(self):
        """True once the workers hit a fatal error (then ``error`` says which); they are not restarted."""
        return self._failed.is_set()

    def wait_for_failure(self, timeout=None):
        """Block until a fatal error happens or ``timeout`` seconds pass; return ``has_failed()``."""
        return self._failed.wait(_seconds(timeout, "timeout"))

    def _set_fatal_error(self, text):
        if not self._failed.is_set():
            self._error = text
            self._failed.set()
            logger.error("lilota workers failed: %s", text)

    def _check_workers(self):
        if self._failed.is_set():
            raise WorkersFailedError(self._error)

    # --- start and stop ---

    @property
    def is_running(self):
        """True while the supervisor thread runs (from start() until stop() or a fatal error)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        """Start the worker processes and their supervisor (no-op when already running; after a
        fatal error it starts afresh).

        Raises StorageError subclasses when the database cannot be used and ConfigurationError for a
        database that worker processes cannot share (in-memory SQLite)."""
        if self.script_path is not None and _supervision is not None:
            # A worker process runs its script as __main__: a script that starts Lilota (tasks and
            # application in one file) would start workers in every worker, without end.
            raise ConfigurationError(
                f"Lilota.start() was called inside a lilota worker process: the worker script "
                f"{sys.argv[0]} starts Lilota with workers itself, and a worker process runs its script as "
                f"__main__, so `if __name__ == \"__main__\":` does not keep it from running there. Put the "
                f"tasks in a script of their own (the LilotaWorker, its tasks, and worker.start() under "
                f"`if __name__ == \"__main__\":`) and give that as script_path; keep Lilota(...) and "
                f"start() in the application, under its own `if __name__ == \"__main__\":` guard")
        if getattr(multiprocessing.current_process(), "_inheriting", False):   # what multiprocessing checks
            sys.stderr.write(f"lilota: {_UNGUARDED_MAIN_HELP}\n")
            raise SystemExit(_EXIT_UNGUARDED_MAIN)   # read by the application's supervisor
        if self.node_id is not None and not self.is_running:
            self.stop()  # the workers failed earlier: clean up before starting afresh
        with self._lock:
            if self.node_id is not None:
                return self
            if self.number_of_workers and not self._dialect.shared_between_processes:
                raise ConfigurationError(f"{self._dialect.describe()} exists only inside this process; worker "
                                         f"processes cannot reach it. Use a file, e.g. 'sqlite:///lilota.db', "
                                         f"or run tasks in-process with worker.run_pending() in tests")
            storage = self.storage
            storage.ensure_ready()
            self._db_file = self._dialect.file_identity()
            self.node_id = self._add_node(NodeType.SCHEDULER)
            self._owner_pid = os.getpid()
            self._error = None
            self._failed.clear()
            self._stop_requested.clear()
            self._stop_at_once = False
            self._ever_ready = False
            if self.script_path is not None:
                self._open_wake_pipe()
                reader, writer = multiprocessing.Pipe(duplex=False)
                os.set_blocking(writer.fileno(), False)
                self._doorbell, self._doorbell_fd = (reader, writer), writer.fileno()
            self._thread = threading.Thread(target=self._supervise, name="lilota-supervisor", daemon=True)
            self._thread.start()
            atexit.register(self._stop_at_exit)
            self._catch_sigterm()
        return self

    def stop(self, timeout=None):
        """Stop the workers: running tasks get ``timeout`` seconds (default ``stop_timeout``) to
        finish; those still running then are stopped and queued again. Blocks until done. Called
        in the main thread, a SIGINT (Ctrl-C) or SIGTERM meanwhile cuts the wait short: the workers
        are stopped at once and their tasks queued again."""
        # Take the signals over before the supervisor hears of the stop: from the moment the
        # workers are told to stop, a second signal means "stop now", never an exception out of
        # the middle of stop().
        restore = self._catch_stop_signals()
        try:
            with self._lock:
                if self.node_id is None:
                    return
                self._stop_timeout_now = self.stop_timeout if timeout is None else _seconds(timeout, "timeout")
                self._stop_requested.set()
                self._notify_supervisor()
                thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join()
            with self._lock:
                try:
                    self.storage.set_node_status(self.node_id, NodeStatus.STOPPED)
                except StorageError:
                    logger.warning("could not record that node %s stopped", self.node_id, exc_info=True)
                self._close_wake_pipe()
                self._thread = None
                self.node_id = None
                atexit.unregister(self._stop_at_exit)
        finally:
            restore()

    def _stop_at_exit(self):
        if os.getpid() != self._owner_pid:
            return  # a forked child of the application: the workers are its parent's
        try:
            try:
                self.stop()
            except (KeyboardInterrupt, SystemExit):   # a signal before stop() took them over: stop at once
                self._stop_at_once = True
                self.stop(timeout=0)
        except Exception:
            logger.exception("stopping lilota at exit failed")

    # --- signals ---
    #
    # Python runs signal handlers in the main thread, between two bytecodes of whatever it is doing
    # there; the handler below therefore takes no lock (the interrupted code may hold it): it sets
    # a flag and rings the supervisor's pipe, which stop() closes only after the flag is read.

    def _catch_sigterm(self):
        """Have SIGTERM end the application as Ctrl-C does (an exception, so that stop() runs at
        exit and the tasks are queued again), where SIGTERM would otherwise kill the process on the
        spot and take the workers and their tasks with it. Only in the main thread, and only when
        the application has not chosen a handler of its own."""
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, self._on_signal)
        except (ValueError, OSError):
            pass

    def _catch_stop_signals(self):
        """While stop() runs in the main thread, a SIGINT or SIGTERM means "stop now". Returns the
        function that puts the previous handlers back."""
        self._in_stop = True
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    previous[signum] = signal.signal(signum, self._on_signal)
                except (ValueError, OSError):
                    pass

        def restore():
            for signum, handler in previous.items():
                if handler == self._on_signal and self.node_id is None:   # start()'s: no longer needed
                    handler = signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler
                if handler is not None:
                    signal.signal(signum, handler)
            self._in_stop = False
        return restore

    def _on_signal(self, signum, frame):
        if self._in_stop:
            self._stop_at_once = True
            _ring(self._wake_w)
            return
        raise SystemExit(128 + signum)   # SIGTERM while running: exit through stop(), as Ctrl-C does

    def _notify_workers(self):
        super()._notify_workers()
        with self._fds_lock:
            _ring(self._doorbell_fd)

    def _notify_supervisor(self):
        with self._fds_lock:
            _ring(self._wake_w)

    # --- the supervisor thread ---
    #
    # One thread owns the worker processes: it starts them, reads their messages, notices their
    # deaths through process sentinels, kills the ones whose task is overdue or cancelled, renews
    # their heartbeat lease, and stops them. A database error in one round is logged and retried in
    # the next: it must not take the workers down.

    def _supervise(self):
        try:
            if self._retention is not None:
                self._retention.start()
            self._housekeeping()
            if self.script_path is None:
                # A scheduling-only application: keep its node alive and help recover lost nodes.
                while not self._stop_requested.wait(self.heartbeat_interval) and not self._failed.is_set():
                    self._housekeeping()
                return
            context = multiprocessing.get_context(self.start_method)
            self._handles = [None] * self.number_of_workers
            # The first worker starts alone: it is ready as fast as a single worker would be, and a
            # broken script fails once. The others start when it is ready (or after its head start).
            restart_at = {0: 0.0}
            held = set(range(1, self.number_of_workers))
            held_until = time.monotonic() + self.first_worker_head_start
            crashes = {}
            next_check = next_beat = 0.0
            while not self._stop_requested.is_set() and not self._failed.is_set():
                try:
                    now = time.monotonic()
                    waitables = [self._wake_r]
                    for h in self._handles:
                        if h is not None:
                            waitables += [h.control, h.process.sentinel]
                    timeout = max(0.0, min([next_check - now, next_beat - now]
                                           + [at - now for at in restart_at.values()]
                                           + ([held_until - now] if held else [])))
                    ready = multiprocessing.connection.wait(waitables, timeout)
                    if self._wake_r in ready:
                        _drain(self._wake_r)
                        next_check = 0.0  # a cancel may be waiting
                    # All messages first: a "ready" from one worker decides whether another's
                    # early death is a broken script or a crash.
                    ended = [h for h in self._handles
                             if h is not None and (self._read_messages(h) or h.process.exitcode is not None)]
                    for h in ended:
                        h.process.join(1)
                        if h.process.exitcode is None:  # its pipe closed but it lingers: end it
                            h.process.kill()
                            h.process.join(5)
                        self._handles[h.index] = None
                        if h.recycled is not None and h.process.exitcode == 0:   # replaced at once
                            restart_at[h.index] = time.monotonic()
                        else:
                            restart_at[h.index] = time.monotonic() + self._restart_delay(h, crashes)
                        self._on_worker_exit(h)
                    if self._failed.is_set() or self._stop_requested.is_set():
                        break
                    now = time.monotonic()
                    if held and (self._ever_ready or now >= held_until):
                        restart_at.update(dict.fromkeys(held, now))
                        held = set()
                    for i, h in enumerate(self._handles):
                        if h is None and i not in restart_at and i not in held:  # a replacement failed half-way
                            restart_at[i] = now
                    for i, at in sorted(restart_at.items()):
                        if at <= now:
                            self._handles[i] = self._spawn(context, i)
                            del restart_at[i]
                    if now >= next_check:
                        next_check = now + 0.2
                        self._stop_overdue_and_cancelled(context)
                    if now >= next_beat:
                        next_beat = now + self.heartbeat_interval
                        self._housekeeping(context)
                except StorageError:
                    logger.warning("lilota supervisor: database error; retrying", exc_info=True)
                    self._stop_requested.wait(0.5)
        except BaseException:
            self._set_fatal_error("the lilota supervisor failed:\n" + traceback.format_exc())
        finally:
            try:
                self._shutdown()
            finally:
                if self._failed.is_set() and self.on_fatal_error is not None:
                    self._call_on_fatal_error()

    def _call_on_fatal_error(self):
        """Tell the application's ``on_fatal_error`` about the failure, once, from the supervisor
        thread, after the workers were stopped. Its exceptions are logged, not raised."""
        try:
            self.on_fatal_error(self._error)
        except Exception as exc:
            logger.exception("lilota: the on_fatal_error function raised %s: %s", type(exc).__name__, exc)

    def _spawn(self, context, index):
        node_id = str(uuid.uuid4())
        queues = self._queue_plan[index]
        self.storage.add_node(node_id, f"{self.name or socket.gethostname()}:worker-{index}", NodeType.WORKER,
                              NodeStatus.STARTING, None, self.node_timeout, queues)
        parent_end, child_end = context.Pipe()
        reader, writer = self._doorbell
        # Under forkserver the worker's parent is the fork server, not this process.
        parent_pid = None if self.start_method == "forkserver" else os.getpid()
        supervision = _Supervision(self.db_url_for_workers, node_id, child_end, reader, writer, parent_pid,
                                   queues if self._queues_given else None, self.max_tasks_per_worker,
                                   self.max_worker_memory, self.node_timeout)
        process = context.Process(target=_worker_process_main, args=(self.script_path, supervision),
                                  name=f"lilota-worker-{index}")
        process.start()
        child_end.close()
        handle = _WorkerHandle(index, node_id, process, parent_end)
        try:
            self.storage.set_node_status(node_id, pid=process.pid)  # the child may already be running
        except StorageError:  # the process runs all the same; the worker records its pid itself
            logger.warning("could not record the pid of worker %s", process.pid, exc_info=True)
        return handle

    def _read_messages(self, handle):
        """Handle what a worker sent; True when its pipe closed (the process is ending)."""
        try:
            while handle.control.poll():
                message = handle.control.recv()
                if message[0] == "ready":
                    handle.ready = self._ever_ready = True
                elif message[0] == "fatal":
                    handle.fatal = message[1]
                elif message[0] == "no_timeout_retry":
                    handle.no_timeout_retry = frozenset(message[1])
                elif message[0] == "async_tasks":
                    handle.async_names = frozenset(message[1])
                elif message[0] == "recycled":
                    handle.recycled = message[1]
        except (EOFError, OSError):
            return True
        return False

    def _restart_delay(self, handle, crashes):
        """Backoff before a dead worker's replacement starts: a worker that keeps dying (a task that
        kills it, a broken environment) cannot cause a restart storm."""
        lived = time.monotonic() - handle.started_at
        count = 1 if lived > 60 else crashes.get(handle.index, 0) + 1
        crashes[handle.index] = count
        return _backoff(count, self.restart_delay, self.restart_max_delay)

    def _on_worker_exit(self, handle):
        """Record the death of a worker this supervisor did not stop."""
        code = handle.process.exitcode
        handle.control.close()
        if handle.recycled is not None and code == 0:
            # It recorded its stop itself; a task it still held (none, normally) goes back.
            _give_back(self.storage, handle.node_id, "the worker process was recycled while holding this task")
            logger.info("worker process %s %s; starting its successor", handle.process.pid, handle.recycled)
            return
        if not handle.ready and not self._ever_ready:
            # The script never got a worker running: a broken script, not a crash. No restarts.
            self.storage.set_node_status(handle.node_id, NodeStatus.CRASHED)
            if handle.fatal is None and code == _EXIT_UNGUARDED_MAIN:
                self._set_fatal_error(f"worker process {handle.process.pid} stopped before running "
                                      f"{self.script_path}: {_UNGUARDED_MAIN_HELP}")
                return
            self._set_fatal_error(handle.fatal or f"worker process {handle.process.pid} ({self.script_path}) "
                                                  f"{_describe_exit(code)} before calling worker.start()")
            return
        # A crash: release its task (retried, or failed when its attempts are used up).
        tasks = self.storage.recover_tasks(handle.node_id, _error_record(WorkerDiedError(
            f"the worker process {handle.process.pid} running this task died ({_describe_exit(code)})")),
            retry_delay=self.retry_delay, retry_max_delay=self.retry_max_delay)
        self.storage.set_node_status(handle.node_id, NodeStatus.CRASHED)
        logger.warning("worker process %s %s%s%s", handle.process.pid, _describe_exit(code),
                       f" while running task {tasks[0].id}" if tasks else "",
                       f":\n{handle.fatal}" if handle.fatal else "")

    #: Seconds an async task function has, once asked to stop (timeout, cancel), to end its coroutine
    #: before its worker process is killed.
    async_stop_grace = 5.0

    def _stop_overdue_and_cancelled(self, context):
        """Kill workers whose task ran past its timeout or was cancelled; record it and replace them.
        An async task's coroutine is asked to stop first (the worker cancels it and records the
        end), and its process is killed only if the task still runs ``async_stop_grace`` later."""
        by_node = {h.node_id: h for h in self._handles if h is not None and h.ready}
        if not by_node:
            return
        for task in self.storage.running_tasks(list(by_node), only_overdue_or_cancelled=True):
            handle = by_node[str(task.locked_by)]
            if task.name in handle.async_names:
                asked = handle.interrupted.get(task.id)
                if asked is None:
                    handle.interrupted[task.id] = time.monotonic()
                    try:
                        handle.control.send(("interrupt", str(task.id), _stop_reason(task)))
                        continue
                    except (OSError, ValueError):
                        pass   # its pipe is gone: the process is ending; kill it
                elif time.monotonic() - asked < self.async_stop_grace:
                    continue
            self._kill(handle)
            reason = _stop_reason(task)
            error, status, retry = _stopped_end(task, reason, task.name not in handle.no_timeout_retry,
                                                process_stopped=True)
            self.storage.recover_tasks(handle.node_id, error, final_status=status, retry=retry, task_id=task.id,
                                       retry_delay=self.retry_delay, retry_max_delay=self.retry_max_delay)
            logger.info("task %s %s: worker process %s replaced", task.id,
                        "cancelled" if reason == "cancel" else "timed out", handle.process.pid)
            self._replace(handle, context)

    def _kill(self, handle):
        handle.process.kill()
        handle.process.join(5)
        handle.control.close()

    def _replace(self, handle, context):
        """After ``_kill``: requeue what the worker still held and start its successor."""
        self._handles[handle.index] = None
        _give_back(self.storage, handle.node_id, "the worker was stopped while running this task")
        self.storage.set_node_status(handle.node_id, NodeStatus.STOPPED)
        self._handles[handle.index] = self._spawn(context, handle.index)

    def _housekeeping(self, context=None):
        """Renew the leases of this node and its workers and recover the tasks of lost nodes. A
        worker declared dead by another process while alive (the application was paused past its
        lease) has had its task recovered: it is replaced, so that it does not go on with it."""
        if self._db_file is not None and self._dialect.file_identity() != self._db_file:
            self._set_fatal_error(f"{self._dialect.describe()} was deleted or replaced while lilota was running; "
                                  f"the workers were stopped, as they would go on with a database no other process "
                                  f"can reach. Call start() again to use the database now at that path")
            return
        live = [h for h in self._handles if h is not None]
        try:
            lost = self._renew_leases([self.node_id] + [h.node_id for h in live])
            for handle in live:
                if handle.node_id in lost and context is not None:
                    logger.error("worker %s was declared dead by another process while alive; replacing it",
                                 handle.process.pid)
                    self._kill(handle)
                    self._replace(handle, context)
            own = {self.node_id} | {h.node_id for h in self._handles if h is not None}
            _recover_lost_nodes(self.storage, self.retry_delay, self.retry_max_delay, exclude=own,
                                settle=self.node_timeout)
        except StorageError:
            logger.warning("lilota heartbeat failed; will retry", exc_info=True)

    def _shutdown(self):
        """Stop every worker: ask, wait up to the stop timeout (renewing their leases meanwhile, so
        that nobody takes their tasks), then kill and requeue."""
        if self._retention is not None:
            self._retention.stop()
        handles = [h for h in self._handles if h is not None]
        live = [h for h in handles if h.process.exitcode is None]
        for h in live:
            try:
                h.control.send(("stop",))
                self.storage.set_node_status(h.node_id, NodeStatus.STOPPING)
            except (OSError, ValueError, StorageError):
                pass
        timeout = self._stop_timeout_now if self._stop_timeout_now is not None else self.stop_timeout
        deadline = time.monotonic() + (0.0 if self._failed.is_set() else timeout)
        next_beat = time.monotonic() + self.heartbeat_interval
        # A signal during stop() (see _on_signal) rings the wake pipe: stop at once.
        wake = [self._wake_r] if self._wake_r is not None else []
        while live and time.monotonic() < deadline and not self._stop_at_once:
            ready = multiprocessing.connection.wait([h.process.sentinel for h in live] + wake,
                                                    max(0.0, min(deadline, next_beat) - time.monotonic()))
            if wake and wake[0] in ready:
                _drain(wake[0])
            live = [h for h in live if h.process.exitcode is None]
            if live and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_interval
                try:
                    self.storage.heartbeat([self.node_id] + [h.node_id for h in live], self.node_timeout)
                except StorageError:
                    pass
        for h in live:
            h.process.kill()
        for h in handles:
            h.process.join(5)
            try:
                _give_back(self.storage, h.node_id,
                           "lilota stopped while this task was running; it was queued again")
                self.storage.set_node_status(h.node_id, NodeStatus.STOPPED)
            except StorageError:
                logger.warning("could not record the stop of worker %s", h.node_id, exc_info=True)
            try:
                h.control.close()
            except OSError:
                pass
        with self._fds_lock:
            doorbell, self._doorbell, self._doorbell_fd = self._doorbell, None, None
            for end in doorbell or ():
                end.close()
        self._handles = []


# ==================================================================================================
# 6. Dashboard
# ==================================================================================================
#
# ``python -m lilota dashboard`` / ``serve_dashboard()``: a web page over the database, served by the
# standard library's threaded http.server. The pages are one HTML shell, a stylesheet and a script
# (the block at the end of this section); the script reads the JSON API under /api/ and builds the
# page with DOM calls and textContent only, so no value from the database is ever parsed as HTML.
#
# The rules that make it safe to leave running: it binds to 127.0.0.1 unless given a token; with a
# token every request but the login form and the static files needs it (a bearer header, or the
# HttpOnly SameSite=Strict cookie the login form sets), compared in constant time; every POST
# carries the page's CSRF token in a header, which a cross-site form cannot send; --read-only
# answers every POST with 403; a Content-Security-Policy allows only our own script and styles;
# the Host header must name the server (no DNS rebinding); parameters and bodies are bounded and
# checked, and a bad one is a 400 with a message, never a traceback.

class DashboardError(LilotaError):
    """A request the dashboard refuses: ``status`` is the HTTP status it answers with (400 bad
    parameter, 401 no or wrong token, 403 CSRF or read-only, 404, 405, 413 too large)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


_DASHBOARD_PAGE_SIZE = 50          # tasks per page of the list (limit= up to _DASHBOARD_MAX_PAGE)
_DASHBOARD_MAX_PAGE = 200
_DASHBOARD_MAX_BODY = 4096         # bytes of a POST body
_DASHBOARD_MAX_TARGET = 2048       # characters of a request's path and query
_DASHBOARD_MAX_TEXT = 200          # characters of a text filter
_DASHBOARD_ERROR_SAMPLE = 500      # the latest failures the overview groups by error
_DASHBOARD_LOG_TAIL = 100          # a task's latest log records on its page (more: /api/tasks/ID/logs)
_DASHBOARD_LOG_PAGE = 1000         # log records per answer of /api/tasks/ID/logs
_DASHBOARD_COOKIE = "lilota_dashboard"
_DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                  "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
#: The pages: every one is the same shell, which the script fills from the API.
_DASHBOARD_PAGES = re.compile(r"/(?:tasks(?:/[0-9a-fA-F-]{36})?|nodes|queues|periodic)?")
_LIST_PARAMETERS = ("status", "name", "queue", "q", "before", "limit")

#: A task page's reads beyond the Task itself: {key in /api/tasks/ID's answer: function(scheduler,
#: task) -> JSON value}. A feature that stores more about a task (its attempts, logs, steps) adds
#: its read here and its section to TASK_SECTIONS in the script.
_DASHBOARD_TASK_READS = {
    "explain": lambda scheduler, task: [reason.as_dict() for reason in scheduler.explain(task.id)],
    "attempts": lambda scheduler, task: [a.as_dict() for a in scheduler.storage.attempts(str(task.id)) or []],
    "steps": lambda scheduler, task: [s.as_dict() for s in scheduler.storage.steps(str(task.id)) or []],
    # The latest records only: a task that logs a lot would make every poll of its page large; the
    # page asks /api/tasks/ID/logs?after= for the rest.
    "logs": lambda scheduler, task: [r.as_dict() for r in scheduler.storage.logs(str(task.id), last=_DASHBOARD_LOG_TAIL)],
    "dependencies": lambda scheduler, task: _dependency_states(scheduler, task),
}


def _dependency_states(scheduler, task):
    """The dependencies of ``task`` for ``show`` and the dashboard's task page: [{"id", "status",
    "open"}], in the order given; open: not ended yet (status None: deleted since, which leaves the
    task waiting)."""
    return [{"id": str(task_id), "status": None if status is None else status.value,
             "open": status is None or not status.is_finished}
            for task_id, status, _ in scheduler.storage.dependencies(str(task.id))] if task.depends_on else []


def _task_summary(task):
    """A task as the list shows it: its fields without input and output, the error's type and
    message only."""
    summary = {key: value for key, value in task.as_dict().items() if key not in ("input", "output", "error")}
    if task.error:
        summary["error"] = {"type": str(task.error.get("type", "")), "message": str(task.error.get("message", ""))[:300]}
    else:
        summary["error"] = None
    return summary


class _CountsCache:
    """stats() for the overview and the queues page. Counting every task is a scan of the table
    (about 2 s for a million tasks on a small machine), so the pages read this copy, which a
    thread of its own counts again while pages ask for it: a second after the last count, or ten
    times as long as a count took when that is longer, which keeps the dashboard's share of the
    database small.
    The first read counts at once (and raises what the database raises)."""

    def __init__(self, scheduler):
        self.scheduler = LilotaScheduler(scheduler.db_url_for_workers)
        # A connection of its own: a count that takes seconds must not hold up the pages' reads,
        # which share the process's one (and its lock).
        if scheduler._dialect.shared_between_processes:
            self.scheduler._storage = Storage(self.scheduler._dialect)
        self._lock = threading.Lock()
        self._stats, self._counted_at, self._took = None, 0.0, 0.0
        self._wanted_at = 0.0
        self._thread = None
        self._stop = threading.Event()

    def get(self):
        """(stats(), its age in seconds)."""
        self._wanted_at = time.monotonic()
        if self._stats is None:
            self._count()
        with self._lock:
            if not self._stop.is_set() and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="lilota-dashboard-counts", daemon=True)
                self._thread.start()
            return self._stats, time.monotonic() - self._counted_at

    def _count(self):
        began = time.monotonic()
        stats = self.scheduler.stats()
        with self._lock:
            self._stats, self._counted_at, self._took = stats, time.monotonic(), time.monotonic() - began

    def _run(self):
        # Counts while pages ask (an open overview polls every 2 s); ends a minute after the last.
        while not self._stop.wait(max(1.0, 10 * self._took)) and time.monotonic() - self._wanted_at < 60:
            try:
                self._count()
            except StorageError:
                pass   # the pages' own reads say that the database is out of reach

    def stop(self):
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join()
        if self.scheduler._storage is not None and self.scheduler._storage is not Storage._instances.get(
                self.scheduler._dialect.connection_key):
            self.scheduler._storage.close()


def _dashboard_overview(scheduler, counts):
    """The overview's data: the counts of stats() (``counts``: a _CountsCache) and their age, the
    queues, the tasks started and finished per minute over the last hour and the most frequent
    errors of the last day, grouped."""
    storage = scheduler.storage
    now = _now()
    since = (math.floor(now / 60) - 59) * 60.0   # 60 whole minutes, the current one last
    minutes = [[0, 0, 0] for _ in range(60)]
    for minute, started, finished, failed in storage.activity(since):
        if 0 <= minute < 60:
            minutes[minute] = [started, finished, failed]
    groups = {}
    for task_id, ended, error in storage.recent_errors(now - 86400, _DASHBOARD_ERROR_SAMPLE):
        error = error if isinstance(error, dict) else {}
        kind = str(error.get("type") or "error")
        message = str(error.get("message") or "").strip().split("\n", 1)[0][:300]
        group = groups.get((kind, message))
        if group is None:   # the latest first: the first seen is the group's latest
            group = groups[kind, message] = {"type": kind, "message": message, "count": 0,
                                             "last_at": _to_json(ended, "time"), "task_id": task_id}
        group["count"] += 1
    errors = sorted(groups.values(), key=lambda g: -g["count"])[:10]
    stats, age = counts.get()
    return {"now": _to_json(_to_datetime(now), "now"), "stats": stats, "counted_seconds_ago": round(age, 1),
            "queues": [q.as_dict() for q in scheduler._queue_records(stats["by_queue"])],
            "activity": {"since": _to_json(_to_datetime(since), "since"),
                         "minutes": [{"started": s, "finished": f, "failed": x} for s, f, x in minutes]},
            "errors": errors, "errors_sampled": _DASHBOARD_ERROR_SAMPLE}


def _dashboard_nodes(scheduler):
    """The nodes, alive first, with their heartbeat's age, liveness and the tasks each runs."""
    storage = scheduler.storage
    now = _to_datetime(_now())
    nodes = storage.nodes()
    running = collections.defaultdict(list)
    for task in storage.running_tasks([str(n.id) for n in nodes if n.status in _ALIVE_NODE_STATUSES]):
        running[task.locked_by].append({"id": str(task.id), "name": task.name,
                                        "progress_percentage": task.progress_percentage})
    result = []
    for node in nodes:
        alive = node.status in _ALIVE_NODE_STATUSES and node.lease_expires_at > now
        entry = _to_json(node, "node")
        entry.update(alive=alive, heartbeat_age=round((now - node.last_seen_at).total_seconds(), 1),
                     tasks=running.get(node.id, []))
        result.append(entry)
    result.sort(key=lambda n: (not n["alive"], n["created_at"]))
    return {"now": _to_json(now, "now"), "nodes": result[:500]}


def _one_query_value(query, key):
    values = query.get(key, [])
    if len(values) > 1:
        raise DashboardError(400, f"parameter {key!r} is given {len(values)} times; give it once")
    return values[0] if values else None


def _list_filters(query):
    """The task list's parameters, checked: status, name, queue, q (text in the id or error),
    before (the id that ends the previous page), limit. DashboardError 400 for a bad one."""
    unknown = sorted(set(query) - set(_LIST_PARAMETERS))
    if unknown:
        raise DashboardError(400, f"unknown parameter {unknown[0]!r}; the list takes {', '.join(_LIST_PARAMETERS)}")
    values = {key: (_one_query_value(query, key) or "").strip() or None for key in _LIST_PARAMETERS}
    if values["status"] is not None and values["status"] not in {s.value for s in TaskStatus}:
        raise DashboardError(400, f"unknown status {values['status'][:40]!r}; the statuses are "
                                  f"{', '.join(s.value for s in TaskStatus)}")
    for key in ("name", "q", "queue"):
        if values[key] is not None and len(values[key]) > _DASHBOARD_MAX_TEXT:
            raise DashboardError(400, f"{key} is longer than {_DASHBOARD_MAX_TEXT} characters")
    if values["queue"] is not None:
        try:
            _check_queue(values["queue"])
        except ValueError as exc:
            raise DashboardError(400, str(exc)) from None
    if values["before"] is not None:
        try:
            values["before"] = str(uuid.UUID(values["before"]))
        except ValueError:
            raise DashboardError(400, "before must be a task id (the last id of the previous page)") from None
    limit = values["limit"]
    if limit is None:
        values["limit"] = _DASHBOARD_PAGE_SIZE
    elif not limit.isdigit() or not 1 <= int(limit) <= _DASHBOARD_MAX_PAGE:
        raise DashboardError(400, f"limit must be a whole number from 1 to {_DASHBOARD_MAX_PAGE}")
    else:
        values["limit"] = int(limit)
    return values


def _dashboard_tasks(scheduler, query):
    """A page of the task list, newest first, and the ``before`` of the next page (None: the last)."""
    f = _list_filters(query)
    tasks = scheduler.storage.list_tasks(f["status"], f["name"], f["limit"] + 1, f["queue"],
                                         before=f["before"], search=f["q"] or "")
    more, tasks = len(tasks) > f["limit"], tasks[:f["limit"]]
    return {"tasks": [_task_summary(t) for t in tasks], "next": str(tasks[-1].id) if more else None,
            "filters": {key: f[key] for key in _LIST_PARAMETERS if key != "limit" and f[key]}}


def _dashboard_task(scheduler, task_id):
    task = scheduler.get_task_by_id(task_id)
    if task is None:
        raise DashboardError(404, f"no task with id {task_id}")
    answer = {"task": task.as_dict()}
    for key, read in _DASHBOARD_TASK_READS.items():
        answer[key] = read(scheduler, task)
    return answer


def _dashboard_task_id(text):
    try:
        return _task_id(text)
    except (TypeError, ValueError):
        raise DashboardError(400, "a task id is a UUID, e.g. 8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e") from None


def _dashboard_logs(scheduler, task_id, query):
    """A task's log records after the seq ``after`` (0: from the first), at most
    _DASHBOARD_LOG_PAGE of them, and ``more``: whether later ones are left for the next ask."""
    unknown = sorted(set(query) - {"after"})
    if unknown:
        raise DashboardError(400, f"unknown parameter {unknown[0]!r}; the logs take after (a record's seq)")
    after = (_one_query_value(query, "after") or "0").strip()
    if not after.isdigit() or len(after) > 18:
        raise DashboardError(400, "after must be a log record's seq (a whole number >= 0)")
    try:
        records = scheduler._task_details(task_id, scheduler.storage.logs, int(after), _DASHBOARD_LOG_PAGE + 1)
    except TaskNotFoundError as exc:
        raise DashboardError(404, str(exc)) from None
    return {"logs": [r.as_dict() for r in records[:_DASHBOARD_LOG_PAGE]], "more": len(records) > _DASHBOARD_LOG_PAGE}


def _json_body(body):
    try:
        value = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, ValueError):
        raise DashboardError(400, "the request body must be JSON") from None
    if not isinstance(value, dict):
        raise DashboardError(400, "the request body must be a JSON object")
    return value


def _dashboard_action(scheduler, kind, key, action, body):
    """Carry out a POST: cancel or retry a task, pause, resume or limit a queue. Returns
    {"ok": bool, "message": what happened}."""
    if kind == "tasks":
        task_id = _task_id(key)
        if action == "cancel":
            task = scheduler.get_task_by_id(task_id)
            if task is not None and task.is_finished:   # cancel() answers True for a cancelled one
                return {"ok": False, "message": f"The task is already {task.status}: nothing to cancel."}
            if scheduler.cancel(task_id):
                task = scheduler.get_task_by_id(task_id)
                if task is not None and task.status == TaskStatus.RUNNING:
                    return {"ok": True, "message": "The task is running: its worker was asked to stop it."}
                return {"ok": True, "message": "The task is cancelled."}
            task = scheduler.get_task_by_id(task_id)
            return {"ok": False, "message": f"The task already {task.status if task else 'ended'}: nothing to cancel."}
        if scheduler.retry(task_id):
            return {"ok": True, "message": "The task is queued again, its attempts reset."}
        task = scheduler.get_task_by_id(task_id)
        return {"ok": False, "message": f"The task is {task.status if task else 'gone'}: only failed, expired or "
                                        f"cancelled tasks can be retried."}
    try:
        _check_queue(key)
    except ValueError as exc:
        raise DashboardError(400, str(exc)) from None
    if action == "pause":
        scheduler.pause_queue(key)
        return {"ok": True, "message": f"Queue {key} is paused: no new task of it starts; running ones finish."}
    if action == "resume":
        scheduler.resume_queue(key)
        return {"ok": True, "message": f"Queue {key} is resumed."}
    values = _json_body(body)
    unknown = sorted(set(values) - {"concurrency", "rate"})
    if unknown or not values:
        raise DashboardError(400, "a limit takes concurrency (a number or null) and/or rate "
                                  "({\"tasks\": n, \"per_seconds\": s} or null)")
    changes = {}
    try:
        if "concurrency" in values:
            changes["concurrency"] = values["concurrency"]
        if "rate" in values:
            rate = values["rate"]
            if rate is not None:
                if not isinstance(rate, dict) or set(rate) != {"tasks", "per_seconds"}:
                    raise ValueError("rate must be {\"tasks\": n, \"per_seconds\": s} or null")
                rate = (rate["tasks"], rate["per_seconds"])
            changes["rate"] = rate
        scheduler.set_queue_limit(key, **changes)
    except (TypeError, ValueError) as exc:
        raise DashboardError(400, str(exc)) from None
    queue = next(q for q in scheduler.get_queues() if q.name == key)
    rate = "none" if queue.rate is None else f"{queue.rate[0]} per {queue.rate[1].total_seconds():g}s"
    return {"ok": True, "message": f"Queue {key}: concurrency {queue.concurrency or 'unlimited'}, rate {rate}."}


_DASHBOARD_ACTIONS = re.compile(r"/api/(tasks)/([0-9a-fA-F-]{36})/(cancel|retry)|/api/(queues)/([^/]{1,200})/(pause|resume|limit)")


def _html_escape(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;"))


class _DashboardHandler:
    """One request (mixed into http.server's BaseHTTPRequestHandler when a dashboard starts, which
    keeps http.server out of the import of lilota). The DashboardServer holds the scheduler and the
    settings."""

    server_version = "lilota-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):   # the access log goes to lilota's logger, not stderr
        logger.debug("dashboard: %s %s", self.address_string(), format % args)

    def do_GET(self):
        self._answer("GET")

    def do_HEAD(self):
        self._answer("HEAD")

    def do_POST(self):
        self._answer("POST")

    def _answer(self, method):
        dashboard = self.server.dashboard
        try:
            if len(self.path) > _DASHBOARD_MAX_TARGET:
                raise DashboardError(400, f"the request's path and query are longer than {_DASHBOARD_MAX_TARGET} characters")
            parts = urllib.parse.urlsplit(self.path)
            path = parts.path
            self._check_host(dashboard)
            body = self._read_body() if method == "POST" else b""
            if path.startswith("/static/"):
                return self._static(path, method)
            if path == "/login":
                return self._login(dashboard, method, body)
            if not self._authorized(dashboard):
                raise DashboardError(401, "this dashboard needs its token: log in, or send Authorization: Bearer TOKEN")
            if method == "POST":
                return self._post(dashboard, path, body)
            if path.startswith("/api/"):
                return self._get_api(dashboard, path, parts.query)
            if _DASHBOARD_PAGES.fullmatch(path):
                return self._send(200, "text/html; charset=utf-8", dashboard.shell(), method)
            raise DashboardError(404, f"no page {path[:100]}")
        except DashboardError as exc:
            self._refuse(exc.status, str(exc), method)
        except StorageError as exc:
            self._send_json(503, {"error": f"the database cannot be reached: {_one_line(exc)}"}, method)
        except Exception:   # a bug: logged here, never shown to the browser
            logger.exception("dashboard: %s %s failed", method, self.path[:200])
            self._send_json(500, {"error": "internal error (see the dashboard's log)"}, method)

    def _check_host(self, dashboard):
        host = (self.headers.get("Host") or "").strip().lower()
        if dashboard.allowed_hosts and host not in dashboard.allowed_hosts:
            raise DashboardError(400, "unexpected Host header: open the dashboard by the address it printed")

    def _read_body(self):
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            raise DashboardError(400, "Content-Length must be a number")
        if int(length) > _DASHBOARD_MAX_BODY:
            self.close_connection = True
            raise DashboardError(413, f"the request body is larger than {_DASHBOARD_MAX_BODY} bytes")
        return self.rfile.read(int(length))

    def _authorized(self, dashboard):
        if dashboard.token is None:
            return True
        given = self.headers.get("Authorization") or ""
        if given.startswith("Bearer "):
            return dashboard.token_matches(given[7:].strip())
        cookies = (self.headers.get("Cookie") or "").split(";")
        for cookie in cookies:
            name, _, value = cookie.strip().partition("=")
            if name == _DASHBOARD_COOKIE:
                return dashboard.session_matches(value)
        return False

    def _post(self, dashboard, path, body):
        if dashboard.read_only:
            raise DashboardError(403, "this dashboard is read-only: it changes nothing")
        import hmac
        origin = self.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc.lower() != (self.headers.get("Host") or "").lower():
            raise DashboardError(403, "a request from another site is refused (CSRF)")
        given = self.headers.get("X-CSRF-Token") or ""
        if not hmac.compare_digest(given.encode(), dashboard.csrf_token.encode()):
            raise DashboardError(403, "missing or wrong CSRF token: reload the page and try again")
        match = _DASHBOARD_ACTIONS.fullmatch(path)
        if match is None:
            raise DashboardError(404, f"no action {path[:100]}")
        kind, key, action = match.group(1, 2, 3) if match.group(1) else match.group(4, 5, 6)
        if kind == "queues":
            key = urllib.parse.unquote(key)
        try:
            answer = _dashboard_action(dashboard.scheduler, kind, key, action, body)
        except TaskNotFoundError as exc:
            raise DashboardError(404, str(exc)) from None
        self._send_json(200, answer, "POST")

    def _get_api(self, dashboard, path, query_text):
        try:
            query = urllib.parse.parse_qs(query_text, keep_blank_values=True, strict_parsing=False,
                                          max_num_fields=20)
        except ValueError:
            raise DashboardError(400, "too many query parameters") from None
        scheduler = dashboard.scheduler
        if path == "/api/tasks":
            return self._send_json(200, _dashboard_tasks(scheduler, query), "GET")
        match = re.fullmatch(r"/api/tasks/([^/]{1,100})/logs", path)
        if match:
            return self._send_json(200, _dashboard_logs(scheduler, _dashboard_task_id(match.group(1)), query), "GET")
        if query:
            raise DashboardError(400, f"{path} takes no parameters")
        if path == "/api/periodic":
            return self._send_json(200, {"now": _to_json(_to_datetime(_now()), "now"),
                                         "periodic": [p.as_dict() for p in scheduler.get_periodic()]}, "GET")
        if path == "/api/stats":
            return self._send_json(200, _dashboard_overview(scheduler, dashboard.counts), "GET")
        if path == "/api/nodes":
            return self._send_json(200, _dashboard_nodes(scheduler), "GET")
        if path == "/api/queues":
            stats, age = dashboard.counts.get()
            return self._send_json(200, {"queues": [q.as_dict() for q in scheduler._queue_records(stats["by_queue"])],
                                         "counted_seconds_ago": round(age, 1)}, "GET")
        match = re.fullmatch(r"/api/tasks/([^/]{1,100})", path)
        if match:
            return self._send_json(200, _dashboard_task(scheduler, _dashboard_task_id(match.group(1))), "GET")
        raise DashboardError(404, f"no API endpoint {path[:100]}")

    def _login(self, dashboard, method, body):
        if method != "POST":
            return self._send(200 if dashboard.token is None else 401, "text/html; charset=utf-8",
                              dashboard.login_page(), method)
        given = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
        if dashboard.token is None or not dashboard.token_matches(given):
            return self._send(401, "text/html; charset=utf-8", dashboard.login_page(wrong=True), method)
        self.send_response(303)
        self.send_header("Location", "/")
        self.send_header("Set-Cookie", f"{_DASHBOARD_COOKIE}={dashboard.session}; HttpOnly; SameSite=Strict; Path=/")
        self._common_headers()
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _static(self, path, method):
        asset = _DASHBOARD_ASSETS.get(path)
        if asset is None:
            raise DashboardError(404, f"no file {path[:100]}")
        self._send(200, asset[0], asset[1], method, cache="max-age=300")

    def _refuse(self, status, message, method):
        if status == 401 and not self.path.startswith("/api/") and method != "POST":
            # A page: the login form, and nothing of the data.
            return self._send(401, "text/html; charset=utf-8", self.server.dashboard.login_page(), method)
        self._send_json(status, {"error": message}, method)

    def _send_json(self, status, value, method):
        self._send(status, "application/json", json.dumps(value), method)

    def _common_headers(self):
        self.send_header("Content-Security-Policy", _DASHBOARD_CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")

    def _send(self, status, content_type, text, method, cache="no-store"):
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="lilota"')
        self._common_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class DashboardServer:
    """A running dashboard (``serve_dashboard()``): ``url`` to open, ``stop()`` to end it. Its
    requests are served by threads of their own; the scheduler they share reads the database."""

    def __init__(self, db_url=None, *, host="127.0.0.1", port=8765, token=None, read_only=False):
        import hmac
        import http.server
        import ipaddress
        import secrets
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise ConfigurationError("the dashboard's token must be a string of at least 8 characters "
                                     "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = False
        if not loopback and token is None:
            raise ConfigurationError(
                f"refusing to serve the dashboard on {host} without a token: anyone who reaches that address "
                f"could read every task and cancel them; give --token (token=) or bind to 127.0.0.1")
        self.scheduler = LilotaScheduler(db_url)
        self.counts = _CountsCache(self.scheduler)
        self.token, self.read_only = token, read_only
        secret = secrets.token_bytes(32)
        self.csrf_token = hmac.new(secret, b"csrf", "sha256").hexdigest()
        # The cookie holds a value derived from the token, not the token itself.
        self.session = None if token is None else hmac.new(secret, token.encode(), "sha256").hexdigest()
        handler = type("DashboardHandler", (_DashboardHandler, http.server.BaseHTTPRequestHandler), {})
        self._http = http.server.ThreadingHTTPServer((host.strip("[]"), port), handler)
        self._http.daemon_threads = True
        self._http.dashboard = self
        self.port = self._http.server_address[1]
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/"
        # Behind a loopback address the Host header must name it (a page of another site that
        # resolves its own name to 127.0.0.1 cannot read the dashboard); a token guards the rest.
        self.allowed_hosts = None
        if loopback:
            self.allowed_hosts = {f"{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]", shown)}
        self._thread = threading.Thread(target=self._http.serve_forever, name="lilota-dashboard", daemon=True)
        self._thread.start()

    def token_matches(self, given):
        import hmac
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode("utf-8"))

    def session_matches(self, given):
        import hmac
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.session.encode())

    def shell(self):
        """The HTML every page starts as: the script fills <main> from the API."""
        return _DASHBOARD_SHELL.format(csrf=self.csrf_token, read_only="1" if self.read_only else "0",
                                       database=_html_escape(self.scheduler._dialect.describe()),
                                       statuses=" ".join(s.value for s in TaskStatus),
                                       finished=" ".join(s.value for s in TaskStatus if s.is_finished))

    def login_page(self, wrong=False):
        return _DASHBOARD_LOGIN.format(message="Wrong token." if wrong else "This dashboard needs its token.")

    def stop(self):
        """Stop serving and close the listening socket (requests under way finish first)."""
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()
        self.counts.stop()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.stop()


def serve_dashboard(db_url=None, *, host="127.0.0.1", port=8765, token=None, read_only=False):
    """Serve the dashboard of the database at ``db_url`` in a background thread and return the
    running :class:`DashboardServer` (``.url``, ``.stop()``; a context manager). ``port=0`` takes a
    free port. ConfigurationError for a non-loopback ``host`` without a ``token`` (of at least 8
    characters); OSError when the address is taken."""
    return DashboardServer(db_url, host=host, port=port, token=token, read_only=read_only)


# --- Dashboard: the page, its styles and its script ---------------------------------------------

_DASHBOARD_ICON = ("data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect "
                   "width='16' height='16' rx='4' fill='%234f46e5'/%3E%3Cpath d='M5 3v10h6' stroke='white' "
                   "stroke-width='2' fill='none'/%3E%3C/svg%3E")

_DASHBOARD_SHELL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{csrf}"><meta name="read-only" content="{read_only}">
<meta name="statuses" content="{statuses}"><meta name="finished" content="{finished}">
<title>lilota</title><link rel="icon" href="%s"><link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script></head>
<body><header class="top"><a class="brand" href="/"><span class="logo">L</span>lilota</a>
<nav><a href="/" data-nav="overview">Overview</a><a href="/tasks" data-nav="tasks">Tasks</a>
<a href="/nodes" data-nav="nodes">Nodes</a><a href="/queues" data-nav="queues">Queues</a>
<a href="/periodic" data-nav="periodic">Periodic</a></nav>
<span class="database" title="the database">{database}</span></header>
<div id="notice" class="notice" role="alert" hidden></div>
<main id="main"><p class="muted">Loading&hellip;</p></main></body></html>
""" % _DASHBOARD_ICON

_DASHBOARD_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lilota: log in</title><link rel="icon" href="%s"><link rel="stylesheet" href="/static/dashboard.css"></head>
<body class="login"><form method="post" action="/login" class="card login-card">
<h1><span class="logo">L</span>lilota</h1><p>{message}</p>
<label>Token <input type="password" name="token" autocomplete="current-password" autofocus required></label>
<button type="submit" class="primary">Log in</button></form></body></html>
""" % _DASHBOARD_ICON

_DASHBOARD_CSS = r"""
:root{--bg:#f6f7f9;--panel:#fff;--text:#1d2330;--muted:#667085;--line:#e4e7ec;--accent:#4f46e5;
--accent-text:#fff;--code:#f2f4f7;--shadow:0 1px 2px rgba(16,24,40,.06),0 1px 3px rgba(16,24,40,.08);
--created:#64748b;--scheduled:#2563eb;--running:#7c3aed;--completed:#16a34a;--failed:#dc2626;
--expired:#ea580c;--cancelled:#6b7280;--waiting:#0891b2;--warn-bg:#fff4e5;--warn-text:#8a4b00;--ok-bg:#ecfdf3;--ok-text:#05603a;
--bad-bg:#fef3f2;--bad-text:#b42318}
@media (prefers-color-scheme:dark){:root{--bg:#0f1117;--panel:#171a23;--text:#e6e8ee;--muted:#98a2b3;
--line:#2a2f3c;--accent:#818cf8;--accent-text:#0f1117;--code:#0b0d12;--shadow:none;--created:#94a3b8;
--scheduled:#60a5fa;--running:#a78bfa;--completed:#4ade80;--failed:#f87171;--expired:#fb923c;
--cancelled:#9ca3af;--waiting:#22d3ee;--warn-bg:#3a2a10;--warn-text:#fcd9a5;--ok-bg:#0f2e1d;--ok-text:#a6f4c5;--bad-bg:#3b1414;
--bad-text:#fecdca}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--text);font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif;-webkit-font-smoothing:antialiased}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
code,pre,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.top{display:flex;align-items:center;gap:28px;padding:0 28px;height:56px;background:var(--panel);
border-bottom:1px solid var(--line);position:sticky;top:0;z-index:2}
.brand{font-weight:700;font-size:17px;color:var(--text);display:flex;align-items:center;gap:8px}
.brand:hover{text-decoration:none}
.logo{display:inline-grid;place-items:center;width:26px;height:26px;border-radius:7px;background:var(--accent);
color:var(--accent-text);font-weight:800;font-size:14px}
nav{display:flex;gap:4px}nav a{color:var(--muted);padding:6px 12px;border-radius:8px;font-weight:500}
nav a:hover{background:var(--bg);text-decoration:none;color:var(--text)}
nav a.active{background:var(--bg);color:var(--text)}
.database{margin-left:auto;color:var(--muted);font-size:12.5px;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis;max-width:40%}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 4px;font-weight:650;letter-spacing:-.01em;display:flex;align-items:center;gap:12px;
flex-wrap:wrap}
h2{font-size:15px;margin:0 0 12px;font-weight:600}
.sub{color:var(--muted);margin:0 0 20px}.muted{color:var(--muted)}
.card{background:var(--panel);border:1px solid var(--line);border-radius:12px;box-shadow:var(--shadow);
padding:18px 20px;margin-bottom:20px;min-width:0;overflow-x:auto}
.grid{display:grid;gap:20px}.two{grid-template-columns:minmax(0,1fr) minmax(0,1.25fr)}
@media (max-width:900px){.two{grid-template-columns:1fr}}
.counts{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:14px;margin-bottom:20px}
.count{display:block;background:var(--panel);border:1px solid var(--line);border-radius:12px;padding:14px 16px;
box-shadow:var(--shadow);border-top:3px solid var(--c,var(--line));color:var(--text)}
.count:hover{text-decoration:none;border-color:var(--c)}
.count .n{font-size:26px;font-weight:650;font-variant-numeric:tabular-nums;line-height:1.2}
.count .l{color:var(--muted);font-size:13px;text-transform:capitalize}
.s-created{--c:var(--created)}.s-scheduled{--c:var(--scheduled)}.s-running{--c:var(--running)}
.s-completed{--c:var(--completed)}.s-failed{--c:var(--failed)}.s-expired{--c:var(--expired)}
.s-cancelled{--c:var(--cancelled)}.s-waiting{--c:var(--waiting)}
pre.small{max-height:160px;padding:6px 10px;font-size:12px}td.wide{min-width:240px;width:45%}
pre.log{max-height:420px}.log-warning{color:var(--expired)}.log-error,.log-critical{color:var(--failed)}
.reasons{margin:0;padding-left:18px}.reasons li{margin:4px 0}
.badge{display:inline-flex;align-items:center;gap:6px;padding:1px 9px 1px 8px;border-radius:999px;font-size:12px;
font-weight:600;color:var(--c,var(--muted));background:color-mix(in srgb,var(--c,var(--muted)) 13%,transparent);
white-space:nowrap;text-transform:capitalize}
.badge::before{content:"";width:6px;height:6px;border-radius:50%;background:currentColor}
.s-running.badge::before{animation:pulse 1.2s ease-in-out infinite}
@keyframes pulse{50%{opacity:.25}}
table{width:100%;border-collapse:collapse}
th{text-align:left;font-weight:600;color:var(--muted);font-size:11.5px;text-transform:uppercase;letter-spacing:.03em;
padding:8px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
td{padding:9px 8px;border-bottom:1px solid var(--line);vertical-align:middle}
tr:last-child td{border-bottom:0}tbody tr:hover td{background:color-mix(in srgb,var(--bg) 60%,transparent)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.zero{color:var(--muted);opacity:.55}
.nowrap{white-space:nowrap}.clip{max-width:360px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
td.fill{width:100%;max-width:0}td.fill .clip{max-width:100%}
.bar{position:relative;height:8px;border-radius:99px;background:var(--line);overflow:hidden;min-width:70px}
.bar>span{position:absolute;inset:0 auto 0 0;background:var(--c,var(--accent));border-radius:99px;
transition:width .4s ease}
.bar.big{height:14px}
.progress-cell{display:flex;align-items:center;gap:8px}.progress-cell .bar{flex:1}
.filters{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-end;margin-bottom:16px}
label{display:flex;flex-direction:column;gap:4px;font-size:12px;color:var(--muted);font-weight:500}
input,select{font:inherit;color:var(--text);background:var(--panel);border:1px solid var(--line);border-radius:8px;
padding:7px 10px;min-width:0}
input:focus,select:focus{outline:2px solid color-mix(in srgb,var(--accent) 45%,transparent);outline-offset:0}
input.small{width:90px}
button,.button{font:inherit;font-weight:600;border-radius:8px;padding:7px 14px;border:1px solid var(--line);
background:var(--panel);color:var(--text);cursor:pointer;display:inline-block}
button:hover,.button:hover{border-color:var(--muted);text-decoration:none}
button.primary{background:var(--accent);border-color:var(--accent);color:var(--accent-text)}
button.danger{background:var(--failed);border-color:var(--failed);color:#fff}
button:disabled{opacity:.5;cursor:default}
.actions{display:flex;gap:8px;align-items:center;flex-wrap:wrap;margin:14px 0}
td .actions{flex-wrap:nowrap;margin:0}
.confirm{display:flex;gap:8px;align-items:center;padding:8px 12px;border-radius:10px;background:var(--warn-bg);
color:var(--warn-text);flex-wrap:wrap}
.flash{padding:10px 14px;border-radius:10px;margin:0 0 16px;background:var(--ok-bg);color:var(--ok-text)}
.flash.bad{background:var(--bad-bg);color:var(--bad-text)}
.notice{max-width:1184px;margin:16px auto 0;padding:10px 14px;border-radius:10px;background:var(--warn-bg);
color:var(--warn-text);font-weight:500}
.pager{display:flex;gap:10px;justify-content:flex-end;margin-top:14px}
pre{background:var(--code);border:1px solid var(--line);border-radius:10px;padding:12px 14px;overflow:auto;
margin:0;max-height:480px;white-space:pre-wrap;word-break:break-word}
dl.fields{display:grid;grid-template-columns:max-content 1fr;gap:6px 24px;margin:0}
dl.fields dt{color:var(--muted)}dl.fields dd{margin:0;word-break:break-all}
.error-head{font-weight:600;color:var(--failed);margin-bottom:8px;word-break:break-word}
.chart{width:100%;height:auto;display:block}
.chart .grid-line{stroke:var(--line)}.chart text{fill:var(--muted);font-size:11px;font-family:inherit}
.chart .done{fill:var(--completed)}.chart .bad{fill:var(--failed)}
.chart .started{fill:none;stroke:var(--scheduled);stroke-width:2;stroke-linejoin:round}
.legend{display:flex;gap:16px;color:var(--muted);font-size:12.5px;margin-top:6px}
.legend-started{background:var(--scheduled)}.legend-done{background:var(--completed)}
.legend-bad{background:var(--failed)}
.legend i{display:inline-block;width:10px;height:10px;border-radius:3px;margin-right:6px;vertical-align:-1px}
.empty{padding:24px;text-align:center;color:var(--muted)}
.split{display:flex;justify-content:space-between;align-items:baseline;gap:16px;flex-wrap:wrap}
.pill{font-size:12px;color:var(--muted);border:1px solid var(--line);border-radius:999px;padding:1px 8px}
.login{display:grid;place-items:center;min-height:100vh}
.login-card{width:340px;display:flex;flex-direction:column;gap:14px}.login-card h1{gap:10px}
"""

_DASHBOARD_JS = r"""
"use strict";
(function () {
  const meta = (name) => document.querySelector('meta[name="' + name + '"]').content;
  const CSRF = meta("csrf-token");
  const READ_ONLY = meta("read-only") === "1";
  // TaskStatus, from the server: a status added there shows here without a change.
  const STATUSES = meta("statuses").split(" ");
  const FINISHED = meta("finished").split(" ");
  const main = document.getElementById("main");
  const notice = document.getElementById("notice");
  let holds = 0;          // confirmations open or inputs being edited: live updates wait
  let flash = null;       // the answer to the last action, shown until the next one

  // --- building the page: elements and text nodes only, never HTML from data ---
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    add(el, children);
    return el;
  }
  function add(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
    for (const child of children) {
      if (typeof child === "string") el.append(document.createTextNode(child)); else if (child) el.append(child);
    }
    return el;
  }
  // Ids made close together share their first (time) digits: the short form keeps both ends.
  const shortId = (id) => id.slice(0, 8) + "\u2026" + id.slice(-4);
  const taskHref = (id) => "/tasks/" + encodeURIComponent(id);
  const listHref = (params) => "/tasks" + (Object.keys(params).length ? "?" + new URLSearchParams(params) : "");
  const badge = (status) => h("span", {class: "badge s-" + status}, status);
  const number = (n) => Number(n || 0).toLocaleString("en-US");
  function seconds(s) {
    if (s === null || s === undefined || isNaN(s)) return "\u2013";
    if (s < 1) return Math.round(s * 1000) + "ms";
    if (s < 60) return (Math.round(s * 10) / 10) + "s";
    const units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
    for (let i = 0; i < 3; i++) {
      if (s >= units[i][1]) {
        const rest = Math.floor((s % units[i][1]) / units[i + 1][1]);
        return Math.floor(s / units[i][1]) + units[i][0] + (rest ? String(rest).padStart(2, "0") + units[i + 1][0] : "");
      }
    }
    return Math.round(s) + "s";
  }
  const time = (iso) => iso ? new Date(iso).getTime() / 1000 : null;
  function age(iso) {
    if (!iso) return "\u2013";
    const s = Date.now() / 1000 - time(iso);
    return s >= 0 ? seconds(s) + " ago" : "in " + seconds(-s);
  }
  function duration(task) {
    if (!task.start_date_time) return "\u2013";
    const end = task.status === "running" ? Date.now() / 1000 : time(task.end_date_time);
    return end === null ? "\u2013" : seconds(Math.max(0, end - time(task.start_date_time)));
  }
  function progressBar(percent, status, big) {
    const value = Math.max(0, Math.min(100, Number(percent) || 0));
    return h("div", {class: "bar" + (big ? " big" : "") + " s-" + status, role: "progressbar",
                     "aria-valuenow": value, "aria-valuemin": 0, "aria-valuemax": 100},
             h("span", {style: null, "data-width": value}));
  }
  // The CSP forbids inline styles in markup; widths are set through the DOM (not markup).
  function applyWidths(root) {
    root.querySelectorAll("[data-width]").forEach((el) => { el.style.width = el.dataset.width + "%"; });
  }
  function json(value) { return JSON.stringify(value, null, 2); }

  // --- talking to the API ---
  class Unreachable extends Error {}
  async function api(path, options) {
    let response;
    try {
      response = await fetch(path, Object.assign({credentials: "same-origin", headers: {Accept: "application/json"}},
                                                 options || {}));
    } catch (e) {
      throw new Unreachable("The dashboard server cannot be reached.");
    }
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (response.status === 503) throw new Unreachable((body && body.error) || "The database cannot be reached.");
    if (response.status === 401) { location.reload(); throw new Error("not logged in"); }
    if (!response.ok) throw new Error((body && body.error) || ("HTTP " + response.status));
    return body;
  }
  function post(path, body) {
    return api(path, {method: "POST", body: body === undefined ? "" : JSON.stringify(body),
                      headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF, Accept: "application/json"}});
  }
  function showNotice(text) { notice.textContent = text; notice.hidden = false; }
  function hideNotice() { notice.hidden = true; }

  // Poll ``load`` every ``interval`` ms and hand the data to ``render`` (skipped while the user is
  // in the middle of something); when the database or the server is out of reach, say so and keep
  // the last data on the page.
  function live(load, render, interval) {
    let last = null;
    async function tick() {
      try {
        const data = await load();
        hideNotice();
        last = data;
        if (!holds) { render(data); applyWidths(main); }
      } catch (e) {
        if (e instanceof Unreachable) showNotice(e.message + " Showing what was last read; trying again\u2026");
        else if (last === null) { main.replaceChildren(h("div", {class: "card empty"}, e.message)); }
        else showNotice(e.message);
      }
      setTimeout(tick, interval);
    }
    tick();
  }

  // An action behind a confirmation: ``button`` opens "question [yes] [no]" in its place.
  function confirmButton(label, question, yes, run, kind) {
    const holder = h("span", {});
    const button = h("button", {class: kind || "", type: "button", onclick: open}, label);
    holder.append(button);
    function open() {
      holds++;
      const box = h("span", {class: "confirm", role: "group"}, question,
        h("button", {class: "danger", type: "button", onclick: async () => {
          box.querySelectorAll("button").forEach((b) => { b.disabled = true; });
          try {
            const answer = await run();
            flash = {ok: answer.ok, text: answer.message};
          } catch (e) {
            flash = {ok: false, text: e.message};
          }
          holds--;
          refresh();
        }}, yes),
        h("button", {type: "button", onclick: () => { holds--; holder.replaceChildren(button); }}, "Keep it"));
      holder.replaceChildren(box);
    }
    return holder;
  }
  function flashBox() {
    return flash ? h("div", {class: "flash" + (flash.ok ? "" : " bad"), role: "status"}, flash.text) : null;
  }
  let refresh = () => {};

  // --- Overview ---
  function chart(activity) {
    const minutes = activity.minutes, W = 960, H = 220, left = 36, bottom = 22, top = 8;
    const peak = Math.max(1, ...minutes.map((m) => Math.max(m.started, m.finished)));
    const scale = 4 * niceStep(peak / 4);   // four gridlines, each at a whole number of tasks
    const bw = (W - left) / minutes.length;
    const y = (v) => top + (H - top - bottom) * (1 - v / scale);
    const since = time(activity.since);
    const root = svg("svg", {class: "chart", viewBox: "0 0 " + W + " " + H, role: "img",
                             "aria-label": "tasks started and finished per minute, last hour"});
    for (let i = 0; i <= 4; i++) {
      const v = scale * i / 4;
      root.append(svg("line", {class: "grid-line", x1: left, x2: W, y1: y(v), y2: y(v)}));
      root.append(svg("text", {x: left - 6, y: y(v) + 4, "text-anchor": "end"}, compact(v)));
    }
    minutes.forEach((m, i) => {
      const x = left + i * bw + 1, w = Math.max(1, bw - 2);
      const at = new Date((since + i * 60) * 1000);
      const label = at.toTimeString().slice(0, 5) + ": " + m.started + " started, " + m.finished + " finished, " +
                    m.failed + " failed or expired";
      const ok = m.finished - m.failed;
      const g = svg("g", {}, svg("title", {}, label));
      if (ok > 0) g.append(svg("rect", {class: "done", x: x, width: w, y: y(m.finished), height: y(m.failed) - y(m.finished), rx: 1.5}));
      if (m.failed > 0) g.append(svg("rect", {class: "bad", x: x, width: w, y: y(m.failed), height: y(0) - y(m.failed), rx: 1.5}));
      g.append(svg("rect", {x: x, width: w, y: top, height: H - top - bottom, fill: "transparent"}));
      root.append(g);
    });
    const points = minutes.map((m, i) => (left + i * bw + bw / 2).toFixed(1) + "," + y(m.started).toFixed(1)).join(" ");
    root.append(svg("polyline", {class: "started", points: points}));
    [[0, "60 min ago"], [30, "30 min ago"], [59, "now"]].forEach(([i, text]) => {
      root.append(svg("text", {x: left + i * bw + bw / 2, y: H - 6, "text-anchor": i === 0 ? "start" : i === 59 ? "end" : "middle"}, text));
    });
    return root;
  }
  function niceStep(v) {   // the smallest tidy whole number at least v
    const p = Math.pow(10, Math.floor(Math.log10(Math.max(v, 1))));
    for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v && Number.isInteger(m * p)) return m * p;
    return 10 * p;
  }
  function compact(v) { return v >= 1000 ? (Math.round(v / 100) / 10) + "k" : String(Math.round(v * 10) / 10); }

  function countsTable(title, rows, param, statuses) {
    // The statuses that matter here: the usual four, and the others when some task has them.
    const shown = statuses.filter((s) => ["scheduled", "running", "completed", "failed"].includes(s) ||
                                         rows.some(([, counts]) => counts[s]));
    if (!rows.length) return h("div", {class: "card"}, h("h2", {}, title), h("p", {class: "muted"}, "No tasks yet."));
    return h("div", {class: "card"}, h("h2", {}, title), h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, param === "queue" ? "Queue" : "Name"),
        shown.map((s) => h("th", {class: "num"}, s)), h("th", {class: "num"}, "total"))),
      h("tbody", {}, rows.map(([key, counts]) => h("tr", {},
        h("td", {class: "clip"}, h("a", {href: listHref({[param]: key})}, key)),
        shown.map((s) => h("td", {class: "num" + (counts[s] ? "" : " zero")},
          counts[s] ? h("a", {href: listHref({[param]: key, status: s})}, number(counts[s])) : "0")),
        h("td", {class: "num"}, number(Object.values(counts).reduce((a, b) => a + b, 0))))))));
  }

  function overview(data) {
    const stats = data.stats;
    const shown = STATUSES.filter((s) => s !== "created" || stats.by_status.created);
    const errors = data.errors.length ? h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Error"), h("th", {class: "num"}, "Count"), h("th", {}, "Last"))),
      h("tbody", {}, data.errors.map((e) => h("tr", {},
        h("td", {class: "fill"}, h("div", {class: "clip", title: e.type + (e.message ? ": " + e.message : "")},
          h("strong", {}, e.type), e.message ? ": " + e.message : ""),
          h("a", {class: "muted", href: taskHref(e.task_id)}, "latest task \u2192")),
        h("td", {class: "num"}, number(e.count)), h("td", {class: "muted nowrap"}, age(e.last_at))))))
      : h("p", {class: "muted"}, "No failures in the last 24 hours.");
    main.replaceChildren(
      h("h1", {}, "Overview"),
      h("p", {class: "sub"}, (data.counted_seconds_ago > 5 ? "Counted " + seconds(data.counted_seconds_ago) + " ago: " : "") +
        number(stats.total) + " tasks \u00b7 " + number(stats.last_minute.finished) +
        " finished in the last minute (" + stats.last_minute.per_second + "/s) \u00b7 " + number(stats.last_hour.finished) +
        " in the last hour"),
      h("div", {class: "counts", id: "counts"}, shown.map((s) => h("a", {class: "count s-" + s, href: listHref({status: s}),
        "data-status": s}, h("div", {class: "n"}, number(stats.by_status[s])), h("div", {class: "l"}, s)))),
      h("div", {class: "card"}, h("div", {class: "split"}, h("h2", {}, "Last hour"),
        h("div", {class: "legend"}, h("span", {}, h("i", {class: "legend-started"}), "started"),
          h("span", {}, h("i", {class: "legend-done"}), "finished"), h("span", {}, h("i", {class: "legend-bad"}), "failed"))),
        chart(data.activity)),
      h("div", {class: "grid two"},
        h("div", {class: "card"}, h("h2", {}, "Most frequent errors, last 24 hours"), errors),
        countsTable("By queue", Object.entries(stats.by_queue), "queue", shown)),
      countsTable("By task name", Object.entries(stats.by_name), "name", shown));
  }

  // --- Tasks ---
  function taskList() {
    const params = new URLSearchParams(location.search);
    const value = (k) => params.get(k) || "";
    const form = h("form", {class: "filters card", method: "get", action: "/tasks"},
      h("label", {}, "Status", h("select", {name: "status"}, h("option", {value: ""}, "Any"),
        STATUSES.map((s) => h("option", {value: s, selected: value("status") === s}, s)))),
      h("label", {}, "Name", h("input", {name: "name", value: value("name"), placeholder: "task name"})),
      h("label", {}, "Queue", h("input", {name: "queue", value: value("queue"), placeholder: "queue", class: "small"})),
      h("label", {}, "Search", h("input", {name: "q", value: value("q"), placeholder: "id or error text", type: "search"})),
      h("button", {type: "submit", class: "primary"}, "Filter"),
      h("a", {class: "button", href: "/tasks"}, "Clear"));
    const region = h("div", {});
    main.replaceChildren(h("h1", {}, "Tasks"), h("p", {class: "sub"}, "Newest first."), form, region);
    const query = new URLSearchParams();
    for (const key of ["status", "name", "queue", "q", "before"]) if (value(key)) query.set(key, value(key));
    live(() => api("/api/tasks?" + query), (data) => {
      const rows = data.tasks.map((t) => h("tr", {"data-id": t.id},
        h("td", {}, h("a", {class: "mono", href: taskHref(t.id), title: t.id}, shortId(t.id))),
        h("td", {class: "clip"}, t.name), h("td", {}, t.queue), h("td", {}, badge(t.status)),
        h("td", {}, h("div", {class: "progress-cell"}, progressBar(t.progress_percentage, t.status),
          h("span", {class: "muted"}, t.progress_percentage + "%"))),
        h("td", {class: "num"}, t.attempts + (t.max_attempts ? "/" + t.max_attempts : "")),
        h("td", {class: "muted"}, age(t.created_at)), h("td", {class: "num"}, duration(t)),
        h("td", {}, t.error ? h("div", {class: "clip muted"}, t.error.type + ": " + t.error.message) : "")));
      const pager = h("div", {class: "pager"});
      if (value("before")) { const first = new URLSearchParams(query); first.delete("before"); pager.append(h("a", {class: "button", href: "/tasks?" + first}, "\u2190 Newest")); }
      if (data.next) { const next = new URLSearchParams(query); next.set("before", data.next); pager.append(h("a", {class: "button", href: "/tasks?" + next, rel: "next"}, "Older \u2192")); }
      region.replaceChildren(h("div", {class: "card"}, rows.length ? h("table", {id: "task-list"},
        h("thead", {}, h("tr", {}, ["ID", "Name", "Queue", "Status", "Progress"].map((c) => h("th", {}, c)),
          h("th", {class: "num"}, "Attempts"), h("th", {}, "Created"), h("th", {class: "num"}, "Duration"), h("th", {}, "Error"))),
        h("tbody", {}, rows)) : h("div", {class: "empty"}, "No tasks match these filters.")), pager);
    }, 2000);
  }

  // A task page is these sections, in order; each returns an element or null. A feature that
  // stores more about a task adds its read on the server (_DASHBOARD_TASK_READS) and a section here.
  const TASK_SECTIONS = [
    function progress(data) {
      const t = data.task;
      if (FINISHED.includes(t.status) && t.progress_percentage === 0) return null;
      return h("div", {class: "card"}, h("div", {class: "split"}, h("h2", {}, "Progress"),
        h("strong", {id: "progress-value"}, t.progress_percentage + "%")),
        progressBar(t.progress_percentage, t.status, true),
        t.status === "running" ? h("p", {class: "muted"}, "Running for " + duration(t) + ", attempt " + t.attempts +
          (t.max_attempts ? " of " + t.max_attempts : "") + ".") : null);
    },
    function why(data) {
      if (FINISHED.includes(data.task.status) || !data.explain || !data.explain.length) return null;
      return h("div", {class: "card", id: "explain"}, h("h2", {}, "Why it is where it is"),
        h("ul", {class: "reasons"}, data.explain.map((r) => h("li", {"data-code": r.code}, r.message))));
    },
    function error(data) {
      const e = data.task.error;
      if (!e) return null;
      return h("div", {class: "card", id: "error"}, h("h2", {}, "Error"),
        h("div", {class: "error-head"}, String(e.type || "error") + ": " + String(e.message || "")),
        e.traceback ? h("pre", {}, String(e.traceback)) : null,
        Object.keys(e).some((k) => !["type", "message", "traceback"].includes(k))
          ? h("pre", {}, json(Object.fromEntries(Object.entries(e).filter(([k]) => !["type", "message", "traceback"].includes(k))))) : null);
    },
    function dependencies(data) {
      const deps = data.dependencies || [];
      if (!deps.length) return null;
      const open = deps.filter((d) => d.open).length;
      return h("div", {class: "card", id: "dependencies"}, h("div", {class: "split"}, h("h2", {}, "Depends on"),
        h("span", {class: "pill"}, open + " of " + deps.length + " open")), h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Task"), h("th", {}, "Status"), h("th", {}, "Open"))),
        h("tbody", {}, deps.map((d) => h("tr", {"data-id": d.id},
          h("td", {}, h("a", {class: "mono", href: taskHref(d.id)}, d.id)),
          h("td", {}, d.status ? badge(d.status) : h("span", {class: "muted"}, "deleted")),
          h("td", {class: d.open ? "" : "muted"}, d.open ? "open" : "done"))))));
    },
    function attempts(data) {
      const rows = data.attempts || [];
      if (!rows.length) return null;
      return h("div", {class: "card", id: "attempts"}, h("h2", {}, "Attempts"), h("table", {},
        h("thead", {}, h("tr", {}, h("th", {class: "num"}, "#"), h("th", {}, "Outcome"), h("th", {}, "Started"),
          h("th", {class: "num"}, "Duration"), h("th", {}, "Node"), h("th", {}, "Error"))),
        h("tbody", {}, rows.map((a) => h("tr", {},
          h("td", {class: "num"}, a.number),
          h("td", {}, h("span", {class: "badge s-" + OUTCOME_COLOURS[a.outcome]}, a.outcome)),
          h("td", {class: "muted nowrap", title: a.started_at || ""}, age(a.started_at)),
          h("td", {class: "num"}, span(a.started_at, a.ended_at)),
          h("td", {class: "mono", title: a.node || ""}, a.node ? shortId(a.node) + (a.pid ? " · pid " + a.pid : "") : "–"),
          h("td", {}, a.error ? h("div", {class: "clip muted", title: String(a.error.message || "")},
            String(a.error.type || "error") + ": " + String(a.error.message || "")) : ""))))));
    },
    function steps(data) {
      const rows = data.steps || [];
      if (!rows.length) return null;
      return h("div", {class: "card", id: "steps"}, h("h2", {}, "Steps"), h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Step"), h("th", {class: "num"}, "Attempt"), h("th", {}, "Ended"),
          h("th", {class: "num"}, "Duration"), h("th", {}, "Output"))),
        h("tbody", {}, rows.map((s) => h("tr", {"data-step": s.name},
          h("td", {class: "mono"}, s.name), h("td", {class: "num"}, s.attempt),
          h("td", {class: "muted nowrap", title: s.ended_at || ""}, age(s.ended_at)),
          h("td", {class: "num"}, span(s.started_at, s.ended_at)),
          h("td", {class: "wide"}, h("pre", {class: "small"}, json(s.output))))))));
    },
    function logs(data) {
      // The page's poll brings the latest records; "Show all" reads every one and then follows
      // with /api/tasks/ID/logs?after= (only the records added since the last one shown).
      const state = logState;
      if (!state.all) state.records = data.logs || [];
      if (!state.records.length) return null;
      const first = state.records[0].seq;
      return h("div", {class: "card", id: "logs"}, h("div", {class: "split"}, h("h2", {}, "Log"),
        h("div", {class: "actions"}, h("span", {class: "muted"}, (state.all || first <= 1 ? "All " : "The latest ") + state.records.length +
            (state.records.length === 1 ? " record" : " records") +
            (state.all && !FINISHED.includes(data.task.status) ? ", following" : "")),
          !state.all && first > 1 ? h("button", {type: "button", onclick: () => showAllLogs(data.task.id)}, "Show all") : null)),
        h("pre", {class: "log"}, state.records.map((r) => h("span", {class: "log-" + String(r.level).toLowerCase(), "data-seq": r.seq},
          h("span", {class: "muted"}, r.time.slice(11, 23) + " "), String(r.level).padEnd(8) + " ",
          h("span", {class: "muted"}, r.logger + ": "), r.message + "\n"))));
    },
    function input(data) { return h("div", {class: "card"}, h("h2", {}, "Input"), h("pre", {id: "input"}, json(data.task.input))); },
    function output(data) {
      return data.task.status === "completed" || data.task.output !== null
        ? h("div", {class: "card"}, h("h2", {}, "Output"), h("pre", {id: "output"}, json(data.task.output))) : null;
    },
    function fields(data) {
      const t = data.task;
      return h("div", {class: "card"}, h("h2", {}, "Fields"), h("dl", {class: "fields"},
        Object.entries(t).filter(([k]) => !["input", "output", "error"].includes(k)).map(([k, v]) => [
          h("dt", {}, k), h("dd", {class: "mono"},
            v === null ? "\u2013" : typeof v === "object" ? json(v) : String(v) + (/_at$|date_time$/.test(k) && v ? "  (" + age(v) + ")" : ""))])));
    },
  ];

  const OUTCOME_COLOURS = {"running": "running", "completed": "completed", "failed": "failed", "expired": "expired",
                           "cancelled": "cancelled", "worker died": "failed", "interrupted": "scheduled"};
  const span = (start, end) => start ? seconds(Math.max(0, (end ? time(end) : Date.now() / 1000) - time(start))) : "\u2013";
  const logState = {all: false, records: []};
  let logReads = Promise.resolve();
  // Reads the records after the last one shown, one read at a time (a poll and "Show all" may
  // overlap), so that each record is shown once.
  function readLogs(id) {
    const read = logReads.then(async () => {
      for (;;) {
        const records = logState.records;
        const after = records.length ? records[records.length - 1].seq : 0;
        const page = await api("/api/tasks/" + encodeURIComponent(id) + "/logs?after=" + after);
        records.push(...page.logs.filter((r) => r.seq > after));
        if (!page.more) return;
      }
    });
    logReads = read.catch(() => {});
    return read;
  }
  function showAllLogs(id) {
    logState.all = true;
    logState.records = [];
    readLogs(id).then(refresh, (e) => showNotice(e.message));
  }

  function taskPage(id) {
    let lastStatus = null;
    const head = h("div", {}), actions = h("div", {}), sections = h("div", {});
    main.replaceChildren(h("p", {class: "muted"}, h("a", {href: "/tasks"}, "Tasks"), " / ", id), head, actions, sections);
    const load = async () => {
      const data = await api("/api/tasks/" + encodeURIComponent(id));
      if (logState.all) await readLogs(id);
      return data;
    };
    refresh = () => load().then(draw).catch(() => {});
    function draw(data) {
      const t = data.task;
      head.replaceChildren(h("h1", {}, t.name, badge(t.status)), h("p", {class: "sub mono"}, t.id + " \u00b7 queue " + t.queue));
      if (t.status !== lastStatus || flash) {
        lastStatus = t.status;
        const buttons = h("div", {class: "actions"});
        if (!READ_ONLY && !FINISHED.includes(t.status)) {
          buttons.append(confirmButton("Cancel task", t.status === "running" ? "Stop this running task?" : "Cancel this task?",
            "Yes, cancel it", () => post("/api/tasks/" + t.id + "/cancel")));
        }
        if (!READ_ONLY && ["failed", "expired", "cancelled"].includes(t.status)) {
          buttons.append(confirmButton("Retry", "Queue this task again, attempts reset?", "Yes, retry",
            () => post("/api/tasks/" + t.id + "/retry"), "primary"));
        }
        actions.replaceChildren(flashBox() || "", buttons);
        flash = null;
      }
      sections.replaceChildren(...TASK_SECTIONS.map((section) => section(data)).filter(Boolean));
      applyWidths(main);
    }
    live(load, draw, 1000);
  }

  // --- Nodes ---
  function nodes(data) {
    const rows = data.nodes.map((n) => h("tr", {},
      h("td", {class: "clip"}, n.name || n.id), h("td", {}, n.type),
      h("td", {}, h("span", {class: "badge " + (n.alive ? "s-completed" : "s-cancelled")}, n.alive ? n.status : (n.status === "stopped" ? "stopped" : "gone: " + n.status))),
      h("td", {}, n.hostname || "\u2013"), h("td", {class: "num"}, n.pid === null ? "\u2013" : n.pid),
      h("td", {}, n.queues ? n.queues.join(", ") : "\u2013"),
      h("td", {class: "num"}, seconds(n.heartbeat_age) + " ago"),
      h("td", {}, n.tasks.length ? n.tasks.map((t) => h("div", {}, h("a", {href: taskHref(t.id)}, t.name), " ",
        h("span", {class: "muted"}, t.progress_percentage + "%"))) : h("span", {class: "muted"}, n.alive && n.type === "worker" ? "idle" : "\u2013"))));
    const alive = data.nodes.filter((n) => n.alive).length;
    main.replaceChildren(h("h1", {}, "Nodes"),
      h("p", {class: "sub"}, alive + " alive of " + data.nodes.length + " known: worker processes and the applications that schedule or supervise them."),
      h("div", {class: "card"}, rows.length ? h("table", {},
        h("thead", {}, h("tr", {}, ["Name", "Type", "Status", "Host", "PID", "Queues", "Heartbeat", "Running"].map((c) =>
          h("th", {class: c === "PID" || c === "Heartbeat" ? "num" : ""}, c)))), h("tbody", {}, rows))
        : h("div", {class: "empty"}, "No nodes yet: start workers with python -m lilota worker SCRIPT.")));
  }

  // --- Queues ---
  function queues(data) {
    const rows = data.queues.map((q) => {
      const path = "/api/queues/" + encodeURIComponent(q.name);
      const concurrency = h("input", {type: "number", min: 1, class: "small", value: q.concurrency || "", placeholder: "no limit",
        "aria-label": "concurrency of " + q.name, onfocus: () => holds++, onblur: () => holds--});
      const tasks = h("input", {type: "number", min: 1, class: "small", value: q.rate ? q.rate.tasks : "", placeholder: "tasks",
        "aria-label": "rate tasks of " + q.name, onfocus: () => holds++, onblur: () => holds--});
      const per = h("input", {type: "number", min: 0.001, step: "any", class: "small", value: q.rate ? q.rate.per_seconds : "",
        placeholder: "seconds", "aria-label": "rate period of " + q.name, onfocus: () => holds++, onblur: () => holds--});
      const limit = () => post(path + "/limit", {concurrency: concurrency.value ? Number(concurrency.value) : null,
        rate: tasks.value ? {tasks: Number(tasks.value), per_seconds: Number(per.value || 1)} : null});
      return h("tr", {"data-queue": q.name},
        h("td", {class: "clip"}, h("a", {href: listHref({queue: q.name})}, q.name)),
        h("td", {}, q.paused ? h("span", {class: "badge s-expired"}, "paused") : h("span", {class: "badge s-completed"}, "active")),
        ["scheduled", "running", "completed", "failed"].map((s) => h("td", {class: "num" + (q.counts[s] ? "" : " zero")}, number(q.counts[s]))),
        h("td", {}, READ_ONLY ? (q.concurrency || "\u2013") : concurrency),
        h("td", {}, READ_ONLY ? (q.rate ? q.rate.tasks + " per " + q.rate.per_seconds + "s" : "\u2013") : h("span", {class: "progress-cell"}, tasks, "per", per, "s")),
        READ_ONLY ? null : h("td", {}, h("div", {class: "actions"},
          confirmButton("Save limits", "Set these limits on " + q.name + "?", "Yes, set", limit),
          q.paused ? confirmButton("Resume", "Resume " + q.name + "?", "Yes, resume", () => post(path + "/resume"), "primary")
                   : confirmButton("Pause", "Pause " + q.name + "? Running tasks finish.", "Yes, pause", () => post(path + "/pause")))));
    });
    main.replaceChildren(h("h1", {}, "Queues"),
      h("p", {class: "sub"}, "Limits and pauses hold for every worker on every host, from their next claim."),
      flashBox() || "",
      h("div", {class: "card"}, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Queue"), h("th", {}, "State"),
          ["Scheduled", "Running", "Completed", "Failed"].map((c) => h("th", {class: "num"}, c)),
          h("th", {}, "Concurrency"), h("th", {}, "Rate"), READ_ONLY ? null : h("th", {}, ""))),
        h("tbody", {}, rows))));
    flash = null;
  }

  // --- Periodic schedules ---
  function periodic(data) {
    const rows = data.periodic.map((p) => h("tr", {"data-name": p.name},
      h("td", {class: "clip"}, p.name), h("td", {class: "clip"}, h("a", {href: listHref({name: p.task})}, p.task)),
      h("td", {class: "mono"}, p.schedule), h("td", {}, p.timezone),
      h("td", {}, h("a", {href: listHref({queue: p.queue})}, p.queue)),
      h("td", {class: "nowrap", title: p.next_run_at || ""}, age(p.next_run_at)),
      h("td", {class: "muted nowrap", title: p.last_slot || ""}, age(p.last_slot)),
      h("td", {}, p.last_task_id ? h("a", {class: "mono", href: taskHref(p.last_task_id), title: p.last_task_id}, shortId(p.last_task_id)) : "\u2013"),
      h("td", {}, p.last_status ? badge(p.last_status) : "\u2013"),
      h("td", {class: "muted nowrap", title: p.seen_at || ""}, age(p.seen_at))));
    main.replaceChildren(h("h1", {}, "Periodic"),
      h("p", {class: "sub"}, "The schedules running nodes enqueue from, as they last recorded them."),
      h("div", {class: "card"}, rows.length ? h("table", {id: "periodic"},
        h("thead", {}, h("tr", {}, ["Name", "Task", "Schedule", "Zone", "Queue", "Next run", "Last slot", "Last task",
          "Status", "Seen"].map((c) => h("th", {}, c)))), h("tbody", {}, rows))
        : h("div", {class: "empty"}, "No periodic schedules yet: a node records them when it starts with periodic tasks.")));
  }

  // --- the page this is ---
  const path = location.pathname;
  const section = path === "/" ? "overview" : path.split("/")[1];
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === section));
  if (path === "/") { const load = () => api("/api/stats"); refresh = () => load().then(overview); live(load, overview, 2000); }
  else if (path === "/tasks") taskList();
  else if (path.startsWith("/tasks/")) taskPage(decodeURIComponent(path.slice(7)));
  else if (path === "/nodes") live(() => api("/api/nodes"), nodes, 2000);
  else if (path === "/periodic") live(() => api("/api/periodic"), periodic, 5000);
  else if (path === "/queues") {
    const load = () => api("/api/queues");
    refresh = () => load().then((d) => { queues(d); applyWidths(main); });
    live(load, queues, 2000);
  }
})();
"""

_DASHBOARD_ASSETS = {
    "/static/dashboard.css": ("text/css; charset=utf-8", _DASHBOARD_CSS),
    "/static/dashboard.js": ("text/javascript; charset=utf-8", _DASHBOARD_JS),
}


# ==================================================================================================
# 7. Command line
# ==================================================================================================
#
# ``python -m lilota`` (``lilota`` once installed). ``worker`` runs worker processes in the
# foreground; the other commands look after tasks through LilotaScheduler. Results go to stdout
# (``--json``: one JSON document, or JSON lines for lists), progress to stderr, and every failure is
# one line on stderr with one of these exit codes:

_EXIT_NOT_COMPLETED = 1   # the task failed/expired/was cancelled, the action was refused, workers failed
_EXIT_USAGE = 2           # bad arguments or input: JSON, duration, id, status, URL, missing script
_EXIT_NOT_FOUND = 3       # no task with that id
_EXIT_DATABASE = 4        # the database cannot be used (missing, corrupt, locked, read-only ...)
_EXIT_TIMEOUT = 5         # wait --timeout passed before the task finished
_EXIT_INTERRUPTED = 130   # Ctrl-C

_EXIT_CODES_HELP = """\
Exit codes: 0 done; 1 the task did not complete, the action was refused or the workers failed;
2 bad usage or input; 3 no such task; 4 the database cannot be used; 5 wait timed out;
130 interrupted. Errors are one line on stderr."""


class _CliError(Exception):
    """A failure the command line reports as one line on stderr with an exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def _exit_code(exc):
    """The exit code for an error lilota raised (see the table above)."""
    if isinstance(exc, TaskNotFoundError):
        return _EXIT_NOT_FOUND
    if isinstance(exc, TaskWaitTimeout):
        return _EXIT_TIMEOUT
    if isinstance(exc, StorageError):
        return _EXIT_DATABASE
    if isinstance(exc, (ConfigurationError, WorkerScriptError, DriverNotInstalledError)):
        return _EXIT_USAGE
    return _EXIT_NOT_COMPLETED


# --- Reading arguments ----------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_DURATION_NUMBER})(ms|min|s|m|h|d)")
_DURATION = re.compile(rf"{_DURATION_NUMBER}|(?:{_DURATION_NUMBER}(?:ms|min|s|m|h|d))+")
# The options whose value is a duration: main() joins a negative value to them (see there).
_DURATION_OPTIONS = ("--delay", "--timeout", "--stop-timeout", "--older-than", "--keep-finished")


def _parse_duration(text):
    """Seconds from ``500ms``, ``90s``, ``5m`` or ``5min``, ``2h``, ``2d``, a sum of them such as
    ``1h30m``, or a bare number of seconds."""
    import argparse
    number = text.strip()
    if re.match(r"-\.?\d", number):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: a duration must be positive")
    value = math.nan
    if _DURATION.fullmatch(number):   # no sign, no exponent, no "inf" or "nan"
        if _DURATION_PART.match(number):
            value = sum(float(amount) * _DURATION_UNITS[unit] for amount, unit in _DURATION_PART.findall(number))
        else:
            value = float(number)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: write a number and a unit, "
                                         f"e.g. 500ms, 90s, 5min, 1h30m or 2d")
    return value


def _parse_time(text):
    """An aware datetime from ISO 8601 with a zone (``2030-01-31T09:00:00+01:00``, or ``Z`` for UTC).
    A time without a zone is an error, not a guess at which zone was meant."""
    import argparse
    value = text.strip()
    if value.endswith(("Z", "z")):   # datetime.fromisoformat reads "Z" from Python 3.11 on only
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}: write it in ISO 8601 with a zone, e.g. "
                                         f"2030-01-31T09:00:00+01:00 or 2030-01-31T08:00:00Z") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise argparse.ArgumentTypeError(f"the time {text!r} has no zone: add one, e.g. {text}Z for UTC "
                                         f"or {text}+01:00")
    return moment


def _positive_int(text):
    """An int of at least 1 (for --limit, --max-attempts, -n)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _queue_arg(text):
    """A queue name (for --queue and the queue commands)."""
    import argparse
    try:
        return _check_queue(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _concurrency_arg(text):
    """--concurrency: a whole number of at least 1, or none (lifts the limit)."""
    return None if text.strip().lower() == "none" else _positive_int(text)


def _rate_arg(text):
    """--rate: TASKS/PERIOD such as 10/s, 100/m, 5/30s or 1000/1h, or none (lifts the limit):
    (tasks, period seconds) or None."""
    import argparse
    if text.strip().lower() == "none":
        return None
    tasks, _, period = text.partition("/")
    try:
        count = int(tasks)
        seconds = _parse_duration(period if period[:1].isdigit() else "1" + period)
    except (ValueError, argparse.ArgumentTypeError):
        count = seconds = 0
    if count < 1 or not period or not seconds:
        raise argparse.ArgumentTypeError(f"expected TASKS/PERIOD such as 10/s, 100/m or 5/30s (or none), got {text!r}")
    return count, seconds


_MIN_ID_PREFIX = 8      # hex digits of a shortened task id, as git's shortest abbreviation
_ID_CANDIDATES = 10     # the ids an error about an ambiguous prefix lists


def _task_id_arg(text):
    """A task id argument: a whole id, or its first characters (at least _MIN_ID_PREFIX hex digits,
    hyphens optional) that _resolve_task_id looks up. Anything else is a one-line usage error."""
    import argparse
    try:
        return _task_id(text)   # a whole id, in any form uuid.UUID reads
    except ValueError:
        pass
    digits = text.strip().replace("-", "").lower()
    if len(digits) < _MIN_ID_PREFIX or len(digits) > 32 or digits.strip("0123456789abcdef"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a task id: give a UUID like "
                                         f"'12345678-1234-5678-1234-567812345678', or at least "
                                         f"{_MIN_ID_PREFIX} of its first characters")
    return text.strip()


def _resolve_task_id(scheduler, text):
    """The whole id of the task ``text`` names (see _task_id_arg): TaskNotFoundError when no id
    starts with it, a usage error that lists them when several do."""
    if len(text.replace("-", "")) == 32:
        return _task_id(text)
    ids = scheduler.find_task_ids(text, limit=_ID_CANDIDATES + 1)
    if not ids:
        raise TaskNotFoundError(f"no task with an id that starts with {text}")
    if len(ids) > 1:
        listed = ", ".join(map(str, ids[:_ID_CANDIDATES])) + (", ..." if len(ids) > _ID_CANDIDATES else "")
        raise _CliError(f"the id prefix {text} is ambiguous: it starts the ids of "
                        f"{'more than ' + str(_ID_CANDIDATES) if len(ids) > _ID_CANDIDATES else len(ids)} "
                        f"tasks: {listed}; give more characters", _EXIT_USAGE)
    return str(ids[0])


def _parse_json_input(text):
    """The task input from a JSON argument (``-``: standard input; none: null). A syntax error is a
    usage error naming its line and column, raised before anything is written."""
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()

    def reject(constant):
        raise ValueError(f"{constant} is not allowed in JSON input")

    try:
        return json.loads(text, parse_constant=reject)
    except json.JSONDecodeError as exc:
        raise _CliError(f"invalid JSON input at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                        _EXIT_USAGE) from None
    except (ValueError, RecursionError) as exc:
        raise _CliError(f"invalid JSON input: {exc}", _EXIT_USAGE) from None


def _worker_script_path(text):
    """The worker script given as a path, or as a module (``myapp.tasks``) found as ``python -m``
    finds one, the current directory first: its file, which Lilota runs as that module when it is
    inside a package. A path is returned as it is (Lilota says when it is missing)."""
    if os.path.exists(text) or text.endswith(".py") or "/" in text or os.sep in text \
            or not all(part.isidentifier() for part in text.split(".")):
        return text
    import importlib.util
    if os.getcwd() not in sys.path:   # the `lilota` command runs from its bin directory
        sys.path.insert(0, os.getcwd())
    try:
        spec = importlib.util.find_spec(text)
        if spec is not None and spec.submodule_search_locations is not None:   # a package: its __main__
            spec = importlib.util.find_spec(text + ".__main__")
    except Exception as exc:   # a parent package that is missing or fails to import
        raise _CliError(f"cannot import the worker module {text!r}: {_one_line(exc)}", _EXIT_USAGE) from None
    if spec is None:
        raise _CliError(f"no worker script or module {text!r}: give a path (e.g. tasks.py) or a module "
                        f"importable from {os.getcwd()} (e.g. myapp.tasks)", _EXIT_USAGE)
    if not spec.has_location or not (spec.origin or "").endswith(".py"):
        raise _CliError(f"the worker module {text!r} is not a Python source file ({spec.origin})", _EXIT_USAGE)
    return spec.origin


def _scheduler(args, create=False):
    """The LilotaScheduler for ``--db``. Commands that only look after tasks (``create=False``)
    refuse an SQLite file that does not exist rather than leave an empty database behind a typo."""
    scheduler = LilotaScheduler(args.db)
    dialect = scheduler._dialect
    if not create and isinstance(dialect, SQLiteDialect) and not dialect.memory \
            and not os.path.exists(dialect.path):
        raise DatabaseUnavailableError(f"no lilota database at {dialect.path} (check --db or $LILOTA_DB_URL); "
                                       f"it is created when a task is scheduled or a worker starts")
    return scheduler


# --- Writing results ------------------------------------------------------------------------------

def _print_json(value):
    """One JSON document on one line (a list is printed as one of these per item: JSON lines)."""
    print(json.dumps(value))


def _table(headers, rows, right=()):
    """Columns padded to their widest cell, two spaces apart; the columns numbered in ``right``
    aligned right."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    return "\n".join("  ".join(cell.rjust(width) if i in right else cell.ljust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
                     for row in [list(headers)] + rows)


def _short(text, width=40):
    """Text cut to ``width`` characters for a table cell."""
    return text if len(text) <= width else text[:width - 3] + "..."


def _one_line(text):
    """Several lines joined into one, for an error line."""
    return " ".join(str(text).split())


def _task_row(task, now):
    """A task as a row of the ``list`` table: id, name, queue, status, progress, attempts, age, duration."""
    attempts = f"{task.attempts}/{task.max_attempts if task.max_attempts is not None else '-'}"
    start, end = task.start_date_time, task.end_date_time
    if end is None and task.status == TaskStatus.RUNNING:
        end = now   # so far
    # A task queued again after a run (e.g. given back on stop) has a start but no end: no duration.
    duration = "-" if start is None or end is None else _format_duration((end - start).total_seconds())
    return [task.id, _short(task.name), _short(task.queue), task.status, f"{task.progress_percentage}%", attempts,
            _format_age(task.created_at, now).replace(" ago", ""), duration]


def _describe_task(task, now, dependencies=()):
    """Every field of a task, one per line; input, output and error pretty-printed, the error's
    traceback in full; ``dependencies`` (_dependency_states) one per line."""
    lines = []
    for field in dataclasses.fields(task):
        value = getattr(task, field.name)
        if field.name in ("input", "output", "error"):
            continue
        if field.name == "depends_on" and dependencies:
            lines.append(f"depends_on:           {sum(d['open'] for d in dependencies)} of {len(dependencies)} open")
            lines += [f"  {d['id']}  {d['status'] or 'deleted'}{'  (open)' if d['open'] else ''}"
                      for d in dependencies]
            continue
        if isinstance(value, datetime):
            # A deadline counts down only while the task runs: "in 4m" would mislead once it ended.
            value = _format_time(value, now if field.name != "expires_at" or task.status == TaskStatus.RUNNING
                                 else None)
        elif isinstance(value, timedelta):
            value = _format_duration(value.total_seconds())
        lines.append(f"{field.name + ':':<22}{'-' if value is None else value}")
    for name in ("input", "output"):
        text = json.dumps(getattr(task, name), indent=2, ensure_ascii=False)
        lines.append(f"{name}:\n  " + text.replace("\n", "\n  ") if "\n" in text else f"{name + ':':<22}{text}")
    error = dict(task.error or {})
    traceback_text = error.pop("traceback", "")
    lines.append("error:" if task.error else f"{'error:':<22}-")
    lines += [f"  {key + ':':<20}{value}" for key, value in error.items()]
    if traceback_text:
        lines.append("  traceback:")
        lines += ["    " + line for line in traceback_text.rstrip("\n").splitlines()]
    return "\n".join(lines)


def _node_liveness(node, now):
    """``alive`` while a node says it runs and its lease holds, ``lease expired`` when it says it
    runs but has stopped renewing (another lilota process will declare it dead), else ``-``."""
    if str(node.status) not in _ALIVE_NODE_STATUSES:
        return "-"
    return "alive" if node.lease_expires_at > now else "lease expired"


def _report_end(task, as_json):
    """Print a finished task: its output (``--json``: the whole task) on stdout. Exit code 0 when
    it completed; else a _CliError with its error on one line."""
    if as_json:
        _print_json(task.as_dict())
    elif task.status == TaskStatus.COMPLETED:
        print(json.dumps(task.output, indent=2, ensure_ascii=False))
    if task.status != TaskStatus.COMPLETED:
        error = task.error or {}
        detail = f": {error.get('type')}: {_one_line(error.get('message', ''))}" if error else ""
        raise _CliError(f"task {task.id} {task.status}{detail}", _EXIT_NOT_COMPLETED)
    return 0


class _ProgressDisplay:
    """A task's progress on a stream while the command line waits for it: on a terminal one bar
    redrawn in place, otherwise a plain line each time the status or the percentage changes."""

    WIDTH = 30

    def __init__(self, stream, enabled=True):
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.drawn = False   # a bar is on the terminal's current line
        self.last = None     # (status, percent) of the last plain line

    def show(self, task):
        if not self.enabled:
            return
        percent = task.progress_percentage
        if self.tty:
            done = self.WIDTH * percent // 100
            since = task.start_date_time or task.created_at
            elapsed = ((task.end_date_time or datetime.now(timezone.utc)) - since).total_seconds()
            self.stream.write(f"\r\x1b[K[{'#' * done}{'-' * (self.WIDTH - done)}] {percent:3d}%  "
                              f"{task.status}  {_format_duration(elapsed)}")
            self.drawn = True
        elif (task.status, percent) != self.last:
            self.last = (task.status, percent)
            self.stream.write(f"{task.status} {percent}%\n")
        self.stream.flush()

    def close(self):
        """End the bar's line, so that what follows starts on a line of its own."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _wait_for(scheduler, task_id, timeout, display):
    """Wait until the task finishes, showing its progress every 0.2 s; return the finished Task.
    TaskNotFoundError for an unknown id, TaskWaitTimeout when ``timeout`` seconds pass first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        task = scheduler.get_task_by_id(task_id)
        if task is None:
            raise TaskNotFoundError(f"no task with id {task_id}")
        display.show(task)
        while not task.is_finished:
            step = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
            try:
                task = scheduler.wait(task_id, timeout=step)
            except TaskWaitTimeout:
                task = scheduler.get_task_by_id(task_id)
                if task is None:
                    raise TaskNotFoundError(f"task {task_id} was deleted while waiting for it") from None
            display.show(task)
            if not task.is_finished and deadline is not None and time.monotonic() >= deadline:
                raise TaskWaitTimeout(f"task {task_id} is still {task.status} after {_format_duration(timeout)}")
        return task
    finally:
        display.close()


class _WorkerEvents:
    """Prints a line when a worker process of this command starts, and when it stops, crashes or is
    lost, from its row in ``lilota_node`` (the supervisor names its workers ``<name>:worker-<index>``).
    A row tells the latest status only: a worker that started and ended between two looks gets both
    lines at once, in that order."""

    ENDS = {NodeStatus.STOPPED: "stopped", NodeStatus.CRASHED: "crashed", NodeStatus.DEAD: "lost (its lease expired)"}

    def __init__(self, scheduler, name):
        self.scheduler = scheduler
        self.prefix = name + ":"
        self.since = _now() - 1.0   # a row of an earlier run whose pid was the same is older
        self.said = {}              # node id -> the words printed for it

    def report(self):
        try:
            nodes = self.scheduler.get_all_nodes()   # oldest first: a replacement after its predecessor
        except StorageError:
            return   # the supervisor rides out database trouble; the next look tells
        for node in nodes:
            if (node.type != NodeType.WORKER or not (node.name or "").startswith(self.prefix)
                    or node.created_at.timestamp() < self.since):
                continue
            said = self.said.setdefault(node.id, set())
            # The process exists once the supervisor has recorded its pid (or the worker its status).
            if "started" not in said and (node.pid is not None or node.status != NodeStatus.STARTING):
                self._say(node, "started", said)
            end = self.ENDS.get(node.status)
            if end is not None and end not in said:
                self._say(node, end, said)

    def _say(self, node, word, said):
        said.add(word)
        pid = "" if node.pid is None else f" (pid {node.pid})"
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {node.name[len(self.prefix):]} {word}{pid}", flush=True)


# --- Commands -------------------------------------------------------------------------------------
#
# Each command's docstring is its --help description.

def _cmd_worker(args):
    """Run the worker processes of SCRIPT in the foreground until Ctrl-C or SIGTERM, which stop them
    gracefully: running tasks get --stop-timeout to finish, the rest go back to the queue; a second
    one stops them at once, their tasks back in the queue. Prints a line when a worker starts, stops
    or crashes. A script that cannot start is a fatal error:
    its traceback on stderr and exit code 1."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    app = Lilota.workers(_worker_script_path(args.script), args.workers, args.db, stop_timeout=args.stop_timeout,
                         name=name, keep_finished=args.keep_finished, queues=args.queues)
    # The handler only records the signal (taking a lock there could deadlock with the interrupted
    # code); the loop below looks at it. During the stop, Lilota.stop() handles them: a second
    # signal stops the workers at once.
    signals = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: signals.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    events = _WorkerEvents(app, name)
    try:
        app.start()
        served = f" serving {', '.join(args.queues)}" if args.queues else ""
        print(f"lilota: {app.number_of_workers} worker process(es) of {app.script_path}{served} on "
              f"{app._dialect.describe()}; Ctrl-C or SIGTERM stops them", flush=True)
        while not signals and not app.has_failed():
            time.sleep(0.25)
            events.report()
        if signals:
            print(f"lilota: stopping; running tasks have {_format_duration(app.stop_timeout)} to finish "
                  f"(Ctrl-C again: stop now, they go back to the queue)", flush=True)
    finally:
        app.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    events.report()
    if app.has_failed():
        raise _CliError(app.error, _EXIT_NOT_COMPLETED)
    return 0


def _cmd_schedule(args):
    """Store a task NAME with the JSON input (none: null; '-': read it from standard input) and
    print its id. The input is checked before anything is written. With --wait, wait for the task
    (progress on stderr) and print its output; the exit code says whether it completed."""
    data = _parse_json_input(args.input)
    scheduler = _scheduler(args, create=True)
    depends_on = [_resolve_task_id(scheduler, text) for text in args.depends_on]
    try:
        task_id = scheduler.schedule(args.name, data, delay=args.delay, run_at=args.run_at, priority=args.priority,
                                     max_attempts=args.max_attempts, timeout=args.timeout, queue=args.queue,
                                     unique_key=args.unique_key, unique_for=args.unique_for,
                                     depends_on=depends_on, on_failure=args.on_failure)
    except (TypeError, ValueError) as exc:   # a bad name or priority, an input JSON cannot hold
        raise _CliError(_one_line(exc), _EXIT_USAGE) from None
    if not args.wait:
        if args.json:
            _print_json({"id": str(task_id)})
        else:
            print(task_id)
        return 0
    if not args.json:
        print(task_id, flush=True)
    task = _wait_for(scheduler, task_id, None, _ProgressDisplay(sys.stderr, enabled=not args.json))
    return _report_end(task, args.json)


def _cmd_list(args):
    """List tasks, newest first, as a table: id, name, queue, status, progress, attempts
    (made/allowed), age and duration (of the last attempt, so far while it runs)."""
    scheduler = _scheduler(args)
    tasks = scheduler.list_tasks(status=args.status, name=args.name, limit=args.limit + 1, queue=args.queue)
    more, tasks = len(tasks) > args.limit, tasks[:args.limit]
    if args.json:
        for task in tasks:
            _print_json(task.as_dict())
        return 0
    if not tasks:
        print("no tasks")
        return 0
    now = datetime.now(timezone.utc)
    print(_table(["ID", "NAME", "QUEUE", "STATUS", "PROGRESS", "ATTEMPTS", "AGE", "DURATION"],
                 [_task_row(task, now) for task in tasks], right={4, 6, 7}))
    if more:
        print(f"(the newest {args.limit}; --limit shows more)")
    return 0


def _attempt_row(attempt, now):
    """An attempt as a row of ``show``'s table: number, outcome, start, duration (so far while it
    runs), pid, node (short), error on one line."""
    end = attempt.ended_at or (now if attempt.outcome == AttemptOutcome.RUNNING else None)
    duration = "-" if attempt.started_at is None or end is None else \
        _format_duration((end - attempt.started_at).total_seconds())
    error = attempt.error or {}
    return [attempt.number, attempt.outcome, _format_age(attempt.started_at, now), duration,
            "-" if attempt.pid is None else attempt.pid, "-" if attempt.node is None else str(attempt.node)[:8],
            _short(_one_line(f"{error.get('type')}: {error.get('message', '')}"), 70) if error else "-"]


#: How many of a task's last log records ``show`` prints.
_SHOWN_LOG_LINES = 10


def _cmd_show(args):
    """Show every field of a task; input, output and error pretty-printed, with the traceback; then
    its attempts (outcome and error of each), its stored steps and its last 10 log records
    (--json: under "attempt_records", "steps" and "logs")."""
    scheduler = _scheduler(args)
    task_id = _resolve_task_id(scheduler, args.id)
    task = scheduler.get_task_by_id(task_id)
    if task is None:
        raise TaskNotFoundError(f"no task with id {task_id}")
    dependencies = _dependency_states(scheduler, task)
    steps = scheduler.get_task_steps(task_id)
    attempts = scheduler.get_task_attempts(task_id)
    logs = scheduler.storage.logs(str(task.id), last=_SHOWN_LOG_LINES)
    if args.json:
        shown = dict(task.as_dict(), dependencies=dependencies) if task.depends_on else task.as_dict()
        _print_json(dict(shown, attempt_records=[attempt.as_dict() for attempt in attempts],
                         steps=[step.as_dict() for step in steps], logs=[record.as_dict() for record in logs]))
        return 0
    now = datetime.now(timezone.utc)
    print(_describe_task(task, now, dependencies))
    if attempts:
        print(f"\nattempts ({len(attempts)}):")
        print("  " + _table(["#", "OUTCOME", "STARTED", "DURATION", "PID", "NODE", "ERROR"],
                            [_attempt_row(attempt, now) for attempt in attempts], right={0, 3, 4}).replace("\n", "\n  "))
    if steps:
        print(f"\nsteps ({len(steps)}):")
        print("  " + _table(["NAME", "ATTEMPT", "ENDED", "DURATION", "OUTPUT"],
                            [[_short(step.name), step.attempt, _format_age(step.ended_at, now),
                              _format_duration((step.ended_at - step.started_at).total_seconds()),
                              _short(json.dumps(step.output, ensure_ascii=False), 60)] for step in steps],
                            right={1, 3}).replace("\n", "\n  "))
    if logs:
        print(f"\nlog (the last {len(logs)}; lilota logs ID prints them all):" if logs[0].seq > 1 else "\nlog:")
        for record in logs:
            print("  " + _log_line(record).replace("\n", "\n  "))
    return 0


def _cmd_explain(args):
    """Say why a task is (not) running: one line per reason (see LilotaScheduler.explain)."""
    scheduler = _scheduler(args)
    reasons = scheduler.explain(_resolve_task_id(scheduler, args.id))
    if args.json:
        _print_json([reason.as_dict() for reason in reasons])
    else:
        print("\n".join(f"- {reason.message}" for reason in reasons))
    return 0


def _log_line(record):
    """A stored log record as the ``logs`` command prints it: time (UTC), level, logger, [attempt]
    and message (a traceback on the lines that follow)."""
    moment = record.time
    return (f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d} {record.level:<8} {record.logger} "
            f"[{record.attempt}] {record.message}")


def _cmd_logs(args):
    """Print the log records stored with a task, in order: time (UTC), level, logger, [attempt]
    and message. --follow prints new records as the worker stores them (at least every second)
    and ends when the task has ended; --json prints a JSON line per record."""
    scheduler = _scheduler(args)
    task_id = _resolve_task_id(scheduler, args.id)
    after = None
    while True:
        # The status first: a task that had ended by then has every record stored before the logs are read.
        task = scheduler.get_task_by_id(task_id)
        if task is None:
            raise TaskNotFoundError(f"no task with id {task_id}")
        for record in scheduler.get_task_logs(task_id, after):
            if args.json:
                _print_json(record.as_dict())
            else:
                print(_log_line(record))
            after = record.seq
        sys.stdout.flush()
        if not args.follow or task.is_finished:
            return 0
        time.sleep(0.2)


def _cmd_wait(args):
    """Wait until a task ends, showing its progress on stderr (a live bar on a terminal, a line
    per change otherwise), then print its output. Exit code 0 when it completed, 1 when it failed,
    expired or was cancelled, 5 when --timeout passed first (the task goes on)."""
    scheduler = _scheduler(args)
    task = _wait_for(scheduler, _resolve_task_id(scheduler, args.id), args.timeout,
                     _ProgressDisplay(sys.stderr, enabled=not args.json))
    return _report_end(task, args.json)


def _cmd_cancel(args):
    """Cancel a task: a queued one never runs; a running one is stopped by its supervisor (its
    worker process is replaced). Exit code 1 when it had already completed, failed or expired."""
    scheduler = _scheduler(args)
    task_id = _resolve_task_id(scheduler, args.id)
    if not scheduler.cancel(task_id):
        task = scheduler.get_task_by_id(task_id)
        raise _CliError(f"task {task_id} already {task.status if task else 'ended'}; nothing to cancel",
                        _EXIT_NOT_COMPLETED)
    task = scheduler.get_task_by_id(task_id)
    if task is not None and task.status == TaskStatus.RUNNING:
        print(f"task {task_id} is running: asked its worker to stop it")
    else:
        print(f"task {task_id} cancelled")
    return 0


def _cmd_retry(args):
    """Queue a failed, expired or cancelled task again, under the same id, with its attempts
    reset. Exit code 1 for a task in another state or whose input was deleted (keep_input=False)."""
    scheduler = _scheduler(args)
    task_id = _resolve_task_id(scheduler, args.id)
    if not scheduler.retry(task_id):
        task = scheduler.get_task_by_id(task_id)
        raise _CliError(f"task {task_id} is {task.status if task else 'gone'}; only failed, expired or "
                        f"cancelled tasks can be retried", _EXIT_NOT_COMPLETED)
    print(f"task {task_id} queued again")
    return 0


def _cmd_cleanup(args):
    """Delete the tasks that finished longer ago than --older-than (and nodes gone since then).
    Queued and running tasks are never deleted."""
    deleted = _scheduler(args).cleanup(older_than=args.older_than)
    print(f"deleted {deleted['tasks']} task(s) that finished more than {_format_duration(args.older_than)} ago "
          f"and {deleted['nodes']} node(s) gone since then")
    return 0


def _cmd_nodes(args):
    """List the nodes, oldest first: worker processes and the applications that schedule or
    supervise them, with their liveness (alive while their heartbeat lease holds), the queues a
    worker serves and why a worker process was replaced (recycled)."""
    nodes = _scheduler(args).get_all_nodes()
    now = datetime.now(timezone.utc)
    if args.json:
        for node in nodes:
            _print_json(dict(_to_json(node, "node"), liveness=_node_liveness(node, now)))
        return 0
    if not nodes:
        print("no nodes")
        return 0
    print(_table(["ID", "NAME", "TYPE", "STATUS", "PID", "LAST SEEN", "LIVENESS", "QUEUES", "REASON"],
                 [[n.id, _short(n.name or "-"), n.type, n.status, "-" if n.pid is None else n.pid,
                   _format_age(n.last_seen_at, now), _node_liveness(n, now), _short(",".join(n.queues or ["-"])),
                   _one_line(n.reason or "-")] for n in nodes], right={4}))
    return 0


def _cmd_stats(args):
    """Count the tasks per status, per name and per queue, and show the throughput: tasks that
    finished in the last minute and the last hour."""
    stats = _scheduler(args).stats()
    if args.json:
        _print_json(stats)
        return 0
    shown = [s.value for s in TaskStatus if s is not TaskStatus.CREATED or stats["by_status"]["created"]]
    print(_table(["STATUS", "COUNT"], [[s, stats["by_status"][s]] for s in shown] + [["total", stats["total"]]],
                 right={1}))
    if stats["by_name"]:
        print()
        print(_table(["NAME"] + [s.upper() for s in shown] + ["TOTAL"],
                     [[_short(name)] + [counts.get(s, 0) for s in shown] + [sum(counts.values())]
                      for name, counts in stats["by_name"].items()], right=set(range(1, len(shown) + 2))))
    if stats["by_queue"]:
        print()
        print(_table(["QUEUE"] + [s.upper() for s in shown] + ["TOTAL"],
                     [[_short(queue)] + [counts.get(s, 0) for s in shown] + [sum(counts.values())]
                      for queue, counts in stats["by_queue"].items()], right=set(range(1, len(shown) + 2))))
    print()
    for key, label in (("last_minute", "last minute"), ("last_hour", "last hour")):
        window = stats[key]
        print(f"{label + ':':<13}{window['finished']} finished ({window['per_second']:g}/s): "
              + ", ".join(f"{window[s.value]} {s}" for s in TaskStatus if s.is_finished))
    return 0


def _cmd_queues(args):
    """List the queues: those with tasks or settings, the default one and those live workers
    serve, with their pause, limits and task counts per status."""
    queues = _scheduler(args).get_queues()
    if args.json:
        for queue in queues:
            _print_json(queue.as_dict())
        return 0
    shown = [s.value for s in TaskStatus if s is not TaskStatus.CREATED
             or any(q.counts.get("created") for q in queues)]
    print(_table(["QUEUE", "PAUSED", "CONCURRENCY", "RATE"] + [s.upper() for s in shown],
                 [[_short(q.name), "yes" if q.paused else "-", "-" if q.concurrency is None else q.concurrency,
                   _format_rate(q.rate)] + [q.counts.get(s, 0) for s in shown] for q in queues],
                 right=set(range(2, len(shown) + 4))))
    return 0


def _cmd_periodic(args):
    """List the periodic schedules that running nodes recorded: the task each enqueues, its cron
    expression or interval and time zone, its next run, and its last slot's task and status.
    SEEN is when a running node last had the schedule (older than a minute: no node runs it)."""
    schedules = _scheduler(args).get_periodic()
    if args.json:
        for schedule in schedules:
            _print_json(schedule.as_dict())
        return 0
    if not schedules:
        print("no periodic schedules (a worker script declares them with @worker.task(cron=...) or "
              "worker.periodic(...); they show here once a worker runs it)")
        return 0
    now = datetime.now(timezone.utc)
    print(_table(["NAME", "TASK", "SCHEDULE", "ZONE", "QUEUE", "NEXT RUN", "LAST SLOT", "LAST TASK", "STATUS", "SEEN"],
                 [[_short(p.name), _short(p.task), _short(p.schedule, 24), p.timezone, _short(p.queue),
                   _format_age(p.next_run_at, now), _format_age(p.last_slot, now),
                   "-" if p.last_task_id is None else str(p.last_task_id)[:8],
                   "-" if p.last_status is None else str(p.last_status), _format_age(p.seen_at, now)]
                  for p in schedules]))
    return 0


def _format_rate(rate):
    if rate is None:
        return "-"
    tasks, period = rate
    text = _format_duration(period.total_seconds())
    return f"{tasks}/{text[1:] if text[:1] == '1' and text[1:].isalpha() else text}"   # 10/s, not 10/1s


def _cmd_queue(args):
    """Pause or resume a queue, or set its limits, for every worker of every host sharing the
    database, from their next claim. A paused queue starts no task; running ones finish.
    limit: --concurrency N (at most N running at once) and/or --rate TASKS/PERIOD (at most that
    many started in any window of the period, e.g. 10/s); none lifts a limit."""
    scheduler = _scheduler(args, create=True)
    if args.action == "pause":
        scheduler.pause_queue(args.queue)
        print(f"queue {args.queue} paused: no new task of it starts (running ones finish)")
    elif args.action == "resume":
        scheduler.resume_queue(args.queue)
        print(f"queue {args.queue} resumed")
    else:
        changes = {key: value for key, value in (("concurrency", args.concurrency), ("rate", args.rate))
                   if value is not _UNCHANGED}
        if not changes:
            raise _CliError("queue limit needs --concurrency and/or --rate (none lifts a limit)", _EXIT_USAGE)
        scheduler.set_queue_limit(args.queue, **changes)
        queue = next(q for q in scheduler.get_queues() if q.name == args.queue)
        print(f"queue {args.queue}: concurrency {'-' if queue.concurrency is None else queue.concurrency}, "
              f"rate {_format_rate(queue.rate)}")
    return 0


def _cmd_dashboard(args):
    """Serve the dashboard -- overview, task list, task pages, nodes, queues, and a JSON API under
    /api/ -- until Ctrl-C, and print the URL to open. It binds to 127.0.0.1 unless --token is given
    (binding elsewhere without one is refused); --read-only hides the actions and refuses them."""
    token = args.token if args.token is not None else (os.environ.get("LILOTA_DASHBOARD_TOKEN") or None)
    _scheduler(args)   # an SQLite file that does not exist is a typo: say so instead of serving nothing
    try:
        server = serve_dashboard(args.db, host=args.host, port=args.port, token=token, read_only=args.read_only)
    except OSError as exc:
        raise _CliError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc} (is another dashboard "
                        f"running there? --port picks another)", _EXIT_USAGE) from None
    except ConfigurationError as exc:
        raise _CliError(str(exc), _EXIT_USAGE) from None
    print(f"lilota dashboard of {server.scheduler._dialect.describe()}: open {server.url}"
          + (" (log in with the token)" if token else "") + (" -- read-only" if args.read_only else "")
          + "; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


# --- The parser and main() ------------------------------------------------------------------------

_EXAMPLES = {
    "worker": "{prog} worker myscript.py -n 4 --db sqlite:////srv/app/lilota.db",
    "schedule": "{prog} schedule add '{{\"a\": 2, \"b\": 3}}' --delay 30s --priority 5 --wait",
    "list": "{prog} list --status failed --name add --limit 10",
    "show": "{prog} show 8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e",
    "explain": "{prog} explain 8c3f6a8e",
    "logs": "{prog} logs 8c3f6a8e --follow",
    "wait": "{prog} wait 8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e --timeout 5m",
    "cancel": "{prog} cancel 8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e",
    "retry": "{prog} retry 8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e",
    "cleanup": "{prog} cleanup --older-than 7d",
    "nodes": "{prog} nodes --json",
    "stats": "{prog} stats",
    "queues": "{prog} queues --json",
    "periodic": "{prog} periodic --json",
    "queue": "{prog} queue limit images --concurrency 2 --rate 10/s",
    "dashboard": "{prog} dashboard --db sqlite:////srv/app/lilota.db --port 8765",
}


_ID_HELP = "the task's id, or its first characters (at least 8, hyphens optional) when no other id starts so"


def _build_parser(prog):
    """The argparse parser of every command, each with its --help (the command's docstring and an
    example)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):   # one line and exit code 2, instead of argparse's usage dump
            raise _CliError(f"{message} (see {self.prog} --help)", _EXIT_USAGE)

    raw = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog=prog, formatter_class=raw,
                    description="lilota: durable background tasks. Run workers and look after tasks.",
                    epilog="The database is --db URL, else $LILOTA_DB_URL, else sqlite:///lilota.db.\n"
                           + _EXIT_CODES_HELP + "\n\nExample:\n  " + _EXAMPLES["schedule"].format(prog=prog)
                           + f"\n  {prog} list --status failed\n  {prog} CMD --help")
    parser.add_argument("--version", action="version", version=f"lilota {__version__}")
    # --db and -v go before the command or after it (there they win); SUPPRESS keeps a command's
    # parser from overwriting a value given before the command with its default.
    database = Parser(add_help=False)
    for options, suppress in ((parser, False), (database, True)):
        options.add_argument("--db", metavar="URL", default=argparse.SUPPRESS if suppress else None,
                             help="database URL (default: $LILOTA_DB_URL, then sqlite:///lilota.db)")
        options.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS if suppress else False,
                             help="print lilota's log on stderr, INFO and above (for worker: also the "
                                  "worker processes' log, with your tasks' INFO records)")
    as_json = Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output: JSON (lines for lists)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, run, summary, reads=True):
        description = inspect.cleandoc(run.__doc__) + "\n\nExample:\n  " + _EXAMPLES[name].format(prog=prog)
        sub = commands.add_parser(name, help=summary, description=description, formatter_class=raw,
                                  parents=[database, as_json] if reads else [database])
        sub.set_defaults(run=run)
        return sub

    sub = command("worker", _cmd_worker, "run worker processes for a worker script until Ctrl-C", reads=False)
    sub.add_argument("script", metavar="SCRIPT",
                     help="the worker script (it creates a LilotaWorker and calls worker.start()): a path, "
                          "or a module such as myapp.tasks, imported from the current directory like python -m")
    sub.add_argument("-n", "--workers", type=_positive_int, default=None,
                     help="number of worker processes (default: the number of CPUs)")
    sub.add_argument("--stop-timeout", type=_parse_duration, default=30.0, metavar="DURATION",
                     help="how long running tasks may finish after Ctrl-C/SIGTERM (default: 30s)")
    sub.add_argument("--keep-finished", type=_parse_duration, default=None, metavar="DURATION",
                     help="delete finished tasks older than this meanwhile, e.g. 7d (default: keep them)")
    sub.add_argument("--queue", dest="queues", action="append", type=_queue_arg, metavar="NAME",
                     help="a queue the worker processes serve, in order (repeat it for several; "
                          "default: the script's, else 'default')")

    sub = command("schedule", _cmd_schedule, "store a task and print its id")
    sub.add_argument("name", help="the registered task name")
    sub.add_argument("input", nargs="?", metavar="JSON", help="the input as JSON ('-': read standard input)")
    when = sub.add_mutually_exclusive_group()
    when.add_argument("--delay", type=_parse_duration, metavar="DURATION", help="run it this much later")
    when.add_argument("--run-at", type=_parse_time, metavar="TIME",
                      help="run it at this time: ISO 8601 with a zone, e.g. 2030-01-31T09:00:00+01:00 or ...Z")
    sub.add_argument("--priority", type=int, default=0, help="higher runs first (default: 0)")
    sub.add_argument("--max-attempts", type=_positive_int, metavar="N",
                     help="executions allowed, the first included (default: the registered value)")
    sub.add_argument("--timeout", type=_parse_duration, metavar="DURATION",
                     help="stop a run that takes longer (default: the registered value)")
    sub.add_argument("--queue", type=_queue_arg, default=DEFAULT_QUEUE, metavar="NAME",
                     help=f"the queue to put it in (default: {DEFAULT_QUEUE})")
    sub.add_argument("--unique-key", metavar="KEY",
                     help="store nothing while a task with this key is unfinished; print that task's id")
    sub.add_argument("--unique-for", type=_parse_duration, metavar="DURATION",
                     help="with --unique-key: a task with the key created this recently counts too")
    sub.add_argument("--depends-on", action="append", type=_task_id_arg, default=[], metavar="ID",
                     help="run it after this task completed (repeat it for several; " + _ID_HELP + ")")
    sub.add_argument("--on-failure", choices=ON_FAILURE, default="cancel",
                     help="when a --depends-on task fails: cancel this one (default), fail it, or run it anyway")
    sub.add_argument("--wait", action="store_true", help="wait for the task and print its output")

    sub = command("list", _cmd_list, "list tasks as a table")
    sub.add_argument("--status", choices=[s.value for s in TaskStatus], help="only tasks with this status")
    sub.add_argument("--name", help="only tasks with this name")
    sub.add_argument("--queue", type=_queue_arg, metavar="NAME", help="only tasks of this queue")
    sub.add_argument("--limit", type=_positive_int, default=20, metavar="K", help="at most K tasks (default: 20)")

    command("show", _cmd_show, "show every field of a task").add_argument("id", type=_task_id_arg, metavar="ID",
                                                                          help=_ID_HELP)

    command("explain", _cmd_explain, "say why a task is not running (or how it ended)").add_argument(
        "id", type=_task_id_arg, metavar="ID", help=_ID_HELP)
    sub = command("logs", _cmd_logs, "print the log records stored with a task")
    sub.add_argument("id", type=_task_id_arg, metavar="ID", help=_ID_HELP)
    sub.add_argument("-f", "--follow", action="store_true",
                     help="print new records as they are stored, until the task has ended")

    sub = command("wait", _cmd_wait, "wait for a task with a progress bar")
    sub.add_argument("id", type=_task_id_arg, metavar="ID", help=_ID_HELP)
    sub.add_argument("--timeout", type=_parse_duration, metavar="DURATION", help="give up after this long")

    command("cancel", _cmd_cancel, "cancel a task", reads=False).add_argument("id", type=_task_id_arg, metavar="ID",
                                                                              help=_ID_HELP)
    command("retry", _cmd_retry, "queue a failed, expired or cancelled task again",
            reads=False).add_argument("id", type=_task_id_arg, metavar="ID", help=_ID_HELP)
    command("cleanup", _cmd_cleanup, "delete old finished tasks", reads=False).add_argument(
        "--older-than", type=_parse_duration, default=30 * 86400.0, metavar="DURATION",
        help="delete tasks that finished longer ago than this (default: 30d)")
    command("nodes", _cmd_nodes, "list workers and schedulers with their liveness")
    command("stats", _cmd_stats, "task counts per status, name and queue, and throughput")
    command("queues", _cmd_queues, "list the queues with their pause, limits and counts")
    command("periodic", _cmd_periodic, "list the periodic schedules with their next run and last status")
    sub = command("queue", _cmd_queue, "pause or resume a queue, or set its limits", reads=False)
    actions = sub.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, summary in (("pause", "start no new task of the queue"), ("resume", "let the queue's tasks start"),
                            ("limit", "set or lift the queue's concurrency and rate limits")):
        part = actions.add_parser(action, help=summary, description=summary, parents=[database])
        part.add_argument("queue", type=_queue_arg, metavar="NAME", help="the queue")
        if action == "limit":
            part.add_argument("--concurrency", type=_concurrency_arg, default=_UNCHANGED, metavar="N",
                              help="at most N of its tasks running at once, over all hosts (none: no limit)")
            part.add_argument("--rate", type=_rate_arg, default=_UNCHANGED, metavar="TASKS/PERIOD",
                              help="at most TASKS started in any window of PERIOD, e.g. 10/s, 100/m, 5/30s "
                                   "(none: no limit)")
    sub = command("dashboard", _cmd_dashboard, "serve the web dashboard until Ctrl-C", reads=False)
    sub.add_argument("--host", default="127.0.0.1", help="the address to bind (default: 127.0.0.1; any other "
                                                         "needs --token)")
    sub.add_argument("--port", type=int, default=8765, help="the port (default: 8765; 0: a free one)")
    sub.add_argument("--token", default=None, help="the token every request needs (default: "
                                                   "$LILOTA_DASHBOARD_TOKEN, else none on 127.0.0.1)")
    sub.add_argument("--read-only", action="store_true", help="show, but do not cancel, retry or change queues")
    return parser


def _join_negative_durations(argv):
    """The arguments with ``--timeout -5s`` written ``--timeout=-5s``: argparse takes a value that
    starts with ``-`` for an option ("expected one argument"); joined, it reaches _parse_duration,
    which says that a duration must be positive."""
    joined = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return joined + list(argv[index:])
        if joined and joined[-1] in _DURATION_OPTIONS and re.match(r"-\.?\d", arg):
            joined[-1] += "=" + arg
        else:
            joined.append(arg)
    return joined


def main(argv=None):
    """``python -m lilota``: the command line. Returns the exit code (see ``--help``)."""
    prog = "lilota" if os.path.basename(sys.argv[0]) == "lilota" else "python -m lilota"
    try:
        args = _build_parser(prog).parse_args(_join_negative_durations(sys.argv[1:] if argv is None else argv))
        if args.verbose:   # this process's log and, through the environment, its worker processes'
            os.environ["LILOTA_LOG_LEVEL"] = os.environ.get("LILOTA_LOG_LEVEL", "").strip() or "INFO"
        _log_to_stderr_from_environment()
        return args.run(args)
    except _CliError as exc:
        print(f"lilota: {exc}", file=sys.stderr)
        return exc.code
    except LilotaError as exc:
        print(f"lilota: {_one_line(exc)}", file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`lilota list | head`): stop quietly, and keep Python's
        # final flush from complaining about it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _EXIT_NOT_COMPLETED


if __name__ == "__main__":
    # Run as ``python -m lilota``: hand over to the module imported under its own name, so that worker
    # processes (which unpickle ``lilota._worker_process_main``) and worker scripts share one lilota.
    import lilota as _lilota
    sys.exit(_lilota.main())
