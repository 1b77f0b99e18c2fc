"""lilota: durable background tasks in one file.

lilota runs long-running work (reports, image processing, e-mails, heavy computations) in background
worker processes and keeps every task's state -- status, input, output, error, progress -- in a
database. There is no message broker and no server to run: this one module, the standard library
and SQLite; other databases plug in through a small dialect class (section 2).

The two sides meet only in the database:

* A *worker script* creates a :class:`LilotaWorker`, registers task functions on it and calls
  ``worker.start()``, which claims due tasks one at a time and executes them.
* The *application* creates a :class:`Lilota`, whose ``start()`` runs ``number_of_workers`` copies of
  the worker script in child processes and supervises them, and whose ``schedule()`` stores a task.

The file reads top to bottom; each section depends only on those above it:

1. Models and serialization  -- Task, Node, statuses, the one JSON serializer
2. Storage and dialects       -- the SQL, a dialect per database, errors
3. Scheduling API             -- LilotaScheduler: schedule, get, wait, cancel, cleanup
4. Worker                     -- LilotaWorker: registry, claim-execute loop, test helper
5. Supervisor                 -- Lilota: worker processes, crash recovery, timeouts, stop
6. Command line               -- ``python -m lilota``

Execution is at-least-once: without crashes every task runs exactly once; when a worker process
dies mid-task the task is retried (or failed, when its attempts are used up) with an error saying so.
"""

import atexit
import dataclasses
import datetime as _dt
import enum
import functools
import inspect
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import runpy
import select
import signal
import socket
import sqlite3
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
    "Node", "NodeStatus", "NodeType",
    "Dialect", "SQLiteDialect", "register_dialect",
    "LilotaError", "ConfigurationError", "DriverNotInstalledError", "StorageError",
    "DatabaseBusyError", "ReadOnlyDatabaseError", "DatabaseFullError", "CorruptDatabaseError",
    "DatabaseUnavailableError", "SchemaVersionError", "WorkerScriptError", "TaskNotFoundError", "UnserializableError",
    "TaskWaitTimeout", "TaskTimeoutError", "TaskCancelledError", "UnknownTaskError", "WorkerDiedError",
    "TaskInterruptedError",
]

# The seed's import paths (``from lilota.core import Lilota`` ...) name submodules of a package.
# lilota is one module, so it registers itself under those names while it loads; the import system
# looks in sys.modules right after importing the parent and finds them there.
if __name__ != "__main__":
    for _alias in ("core", "worker", "models", "scheduler"):
        sys.modules.setdefault(__name__ + "." + _alias, sys.modules[__name__])
    del _alias

logger = logging.getLogger("lilota")
logger.addHandler(logging.NullHandler())

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


# --- Statuses -------------------------------------------------------------------------------------

class _StrEnum(str, enum.Enum):
    def __str__(self):
        return self.value


class TaskStatus(_StrEnum):
    """Where a task is in its life. Values are the strings stored in ``lilota_task.status``."""

    CREATED = "created"      # reserved for rows written by other tools; lilota never writes it
    SCHEDULED = "scheduled"  # queued: runs once run_at has passed and a worker is free
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

    IDLE = "idle"
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


# --- Records --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
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

    @property
    def is_finished(self):
        """True once the task is completed, failed, expired or cancelled for good."""
        return self.status in _FINISHED

    def as_dict(self):
        """The task as JSON-compatible values (ISO 8601 datetimes, string ids)."""
        return {f.name: _to_json(getattr(self, f.name), f.name) for f in dataclasses.fields(self)}


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


@typing.runtime_checkable
class ModelProtocol(typing.Protocol):
    """Any object with ``as_dict()`` can be a task's input or output model."""

    def as_dict(self) -> typing.Dict[str, typing.Any]:
        ...


# --- Serialization --------------------------------------------------------------------------------
#
# Payloads are JSON, never pickle: a row must not be able to run code. Values that JSON lacks are
# stored in a documented text form and revived from the type annotations of the model they go into:
#   datetime / date / time -> ISO 8601 string      UUID    -> canonical string
#   Decimal                -> string ("1.10")       Enum    -> its value
#   timedelta              -> seconds (float)      Enum dict keys -> their (string) values
#   dataclass              -> dict of its fields    pydantic -> model_dump(mode="json") / .dict()
#   object with as_dict()  -> as_dict()             tuple   -> list
# Anything else (sets, bytes, arbitrary objects, dicts with non-string keys, NaN, infinity, cycles)
# raises UnserializableError -- a TypeError and a ValueError -- before anything is written.

_JSON_SCALARS = frozenset({str, int, bool, type(None)})   # JSON values as they are (exact types only)


def _to_json(value, path="input", _active=None):
    """Convert a value to plain JSON types (dict/list/str/int/float/bool/None) or raise."""
    kind = type(value)
    if kind in (str, int, bool) or value is None:
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
        return str(value) if isinstance(value, str) else int(value)
    if isinstance(value, float):
        return _to_json(float(value), path, _active)

    # Containers and models: guard against cycles, which json would reject less helpfully.
    if _active is None:
        _active = set()
    marker = id(value)
    if marker in _active:
        raise UnserializableError(f"{path}: the value contains itself (a reference cycle) and cannot be stored")
    _active.add(marker)
    try:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                name = key.value if isinstance(key, enum.Enum) else key
                if not isinstance(name, str):
                    raise UnserializableError(f"{path}: dictionary keys must be strings to be stored as JSON, "
                                    f"got key {key!r} of type {type(key).__name__}")
                # Exact str/int/bool/None stay as they are: no path to format for them.
                out[str(name)] = item if type(item) in _JSON_SCALARS else _to_json(item, f"{path}[{key!r}]", _active)
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
    if kind is float:
        return math.isfinite(value)
    if depth > 32:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _JSON_SCALARS and not _is_plain_json(item, depth + 1)):
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
    ``progress`` (a :class:`TaskProgress`) and ``logger``."""

    def __init__(self, *, task_id=None, name=None, attempt=1, max_attempts=1, progress=None, logger=None):
        self.task_id = task_id
        self.name = name
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.progress = progress
        self.logger = logger

    def __repr__(self):
        return f"TaskContext(task_id={self.task_id!s}, name={self.name!r}, attempt={self.attempt})"


def _error_record(exc, **extra):
    """The dict stored in ``lilota_task.error``: the exception's type name, message and traceback
    (empty for lilota's own records of what happened to a task), plus details such as the attempt."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc.__traceback__ else ""
    record = {"type": type(exc).__name__, "message": str(exc), "traceback": tb}
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

_TASK_COLUMNS = ("id", "name", "status", "priority", "pid", "run_at", "attempts", "max_attempts",
                 "timeout", "expires_at", "progress_percentage", "start_date_time", "end_date_time",
                 "input", "output", "error", "locked_by", "locked_at", "created_at", "cancel_requested",
                 "keep_input")
_TASK_SELECT = ", ".join(_TASK_COLUMNS)
_NODE_COLUMNS = "id, name, type, status, pid, hostname, created_at, last_seen_at, lease_expires_at"

_ALIVE_NODE_STATUSES = ("idle", "starting", "running", "stopping")
_ALIVE_SQL = "(" + ", ".join(f"'{status}'" for status in _ALIVE_NODE_STATUSES) + ")"


SCHEMA_VERSION = 1


class Dialect:
    """How lilota talks to one kind of database. Subclass it and ``register_dialect()`` it to add one.

    A dialect is built from the parsed URL and supplies:

    * ``connect()``: a new DB-API 2.0 connection in autocommit mode (one statement = one transaction);
    * ``placeholder``: the driver's positional placeholder; lilota writes ``?`` and translates;
    * ``migrations()``: for each schema version, the DDL statements that create it;
    * ``prepare_claim(defaults)`` and ``claim(conn, prepared, node_id, pid, now)``: the one atomic
      statement that picks the next due task and marks it running;
    * ``encode_time``/``decode_time`` and ``encode_json``/``decode_json``: column types;
    * ``change_counter(conn)``: a cheap value that changes when other connections commit (or None);
    * ``translate_error(exc)``: a specific :class:`StorageError` for a driver exception.
    """

    name = "generic"
    placeholder = "?"
    begin_write_sql = "BEGIN"
    #: False for a database that exists only inside one process (SQLite ``:memory:``).
    shared_between_processes = True

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
        parts = self.parts
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def connect(self):
        """A new DB-API connection in autocommit mode (raise a StorageError subclass if impossible)."""
        raise NotImplementedError

    def migrations(self):
        """{schema version: [DDL statements]}; each version's statements create what it adds."""
        raise NotImplementedError

    def prepare_claim(self, defaults):
        """Build the claim once per worker. ``defaults``: (name, timeout seconds, max_attempts,
        keep_input) of each registered task, written to a task's row at its first claim."""
        raise NotImplementedError

    def claim(self, conn, prepared, node_id, pid, now):
        """Atomically mark the next due task running for ``node_id``; return its row or None."""
        raise NotImplementedError

    def sql(self, text):
        """``text`` with lilota's ``?`` placeholders in the driver's style."""
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

    def decode_json(self, value):
        """A stored JSON column as Python values."""
        return loads(value)

    def change_counter(self, conn):
        """A cheap value that changes when other connections commit; None if there is none (then
        idle workers notice other processes' tasks by their periodic claim only)."""
        return None

    def translate_error(self, exc):
        """The StorageError to raise for a driver exception, or None to let it through."""
        return None


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


def _rollback(conn):
    try:
        conn.execute("ROLLBACK")
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
        except BaseException:
            conn.close()
            raise
        return conn

    def migrations(self):
        statuses = ", ".join(f"'{s.value}'" for s in TaskStatus)
        return {
            1: [
                f"""CREATE TABLE IF NOT EXISTS lilota_task (
                    id TEXT PRIMARY KEY,
                    name TEXT NOT NULL,
                    status TEXT NOT NULL CHECK (status IN ({statuses})),
                    priority INTEGER NOT NULL DEFAULT 0,
                    pid INTEGER,
                    run_at REAL NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    max_attempts INTEGER,
                    timeout REAL,
                    expires_at REAL,
                    progress_percentage INTEGER NOT NULL DEFAULT 0,
                    start_date_time REAL,
                    end_date_time REAL,
                    input TEXT,
                    output TEXT,
                    error TEXT,
                    locked_by TEXT,
                    locked_at REAL,
                    created_at REAL NOT NULL,
                    cancel_requested INTEGER NOT NULL DEFAULT 0,
                    keep_input INTEGER)""",
                # The claim reads this partial index in order; it holds queued tasks only, so it
                # stays small however many finished tasks the table keeps.
                "CREATE INDEX IF NOT EXISTS lilota_task_queue ON lilota_task (priority DESC, run_at) "
                "WHERE status = 'scheduled'",
                "CREATE INDEX IF NOT EXISTS lilota_task_running ON lilota_task (locked_by) "
                "WHERE status = 'running'",
                # When the next delayed task falls due: what an idle worker sleeps until. Without it
                # that is a scan of the queue on every idle wake of every worker. Only tasks due
                # later than they were stored (delays, retries) are in it: tasks due at once, the
                # bulk, cost no second index write.
                "CREATE INDEX IF NOT EXISTS lilota_task_due ON lilota_task (run_at) "
                "WHERE status = 'scheduled' AND run_at > created_at",
                """CREATE TABLE IF NOT EXISTS lilota_node (
                    id TEXT PRIMARY KEY,
                    name TEXT,
                    type TEXT NOT NULL,
                    status TEXT NOT NULL,
                    pid INTEGER,
                    hostname TEXT,
                    host_key TEXT,
                    created_at REAL NOT NULL,
                    last_seen_at REAL NOT NULL,
                    lease_expires_at REAL NOT NULL)""",
            ],
        }

    def prepare_claim(self, defaults):
        # The registered defaults of each task name, applied to the row at its first claim.
        params = {}
        timeouts, attempts, keeps = [], [], []
        for i, (name, timeout, max_attempts, keep_input) in enumerate(defaults):
            params.update({f"n{i}": name, f"t{i}": timeout, f"a{i}": max_attempts, f"k{i}": int(keep_input)})
            timeouts.append(f"WHEN :n{i} THEN :t{i}")
            attempts.append(f"WHEN :n{i} THEN :a{i}")
            keeps.append(f"WHEN :n{i} THEN :k{i}")
        timeout_case = f"CASE name {' '.join(timeouts)} ELSE NULL END" if defaults else "NULL"
        attempts_case = f"CASE name {' '.join(attempts)} ELSE 1 END" if defaults else "1"
        keep_case = f"CASE name {' '.join(keeps)} ELSE 1 END" if defaults else "1"
        update = (f"UPDATE lilota_task SET status = 'running', pid = :pid, attempts = attempts + 1, "
                  f"locked_by = :node, locked_at = :now, start_date_time = :now, end_date_time = NULL, "
                  f"progress_percentage = 0, timeout = COALESCE(timeout, {timeout_case}), "
                  f"max_attempts = COALESCE(max_attempts, {attempts_case}), "
                  f"keep_input = COALESCE(keep_input, {keep_case}), "
                  f"expires_at = :now + COALESCE(timeout, {timeout_case}) ")
        # INDEXED BY: the planner would rather take lilota_task_due for "run_at <= :now" and sort
        # every due task; the queue index yields them in claim order and stops at the first.
        pick = ("SELECT id FROM lilota_task INDEXED BY lilota_task_queue "
                "WHERE status = 'scheduled' AND run_at <= :now ORDER BY priority DESC, run_at LIMIT 1")
        if self.returning:
            return (f"{update} WHERE id = ({pick}) RETURNING {_TASK_SELECT}", params)
        return ((pick, f"{update} WHERE id = :id AND status = 'scheduled'",
                 f"SELECT {_TASK_SELECT} FROM lilota_task WHERE id = :id"), params)

    def claim(self, conn, prepared, node_id, pid, now):
        sql, params = prepared
        params = dict(params, node=node_id, pid=pid, now=now)
        if self.returning:
            rows = conn.execute(sql, params).fetchall()  # fetch all: the statement ends only then
            return rows[0] if rows else None
        # SQLite before 3.35 has no RETURNING: the same three steps under one write lock.
        pick, update, fetch = sql
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(pick, params).fetchone()
            if row is not None:
                params["id"] = row[0]
                conn.execute(update, params)
                row = conn.execute(fetch, params).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return row

    def change_counter(self, conn):
        return conn.execute("PRAGMA data_version").fetchone()[0]

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


class _Guard:
    """Holds the storage lock for one operation and turns driver errors into StorageErrors."""

    __slots__ = ("storage",)

    def __init__(self, storage):
        self.storage = storage

    def __enter__(self):
        storage = self.storage
        if storage._owner_pid != os.getpid():
            storage._forget_parent()
        storage._lock.acquire()
        storage._depth += 1
        try:
            if storage._conn is None:
                storage._open()
        except BaseException:
            storage._depth -= 1
            storage._lock.release()
            raise
        return storage._conn

    def __exit__(self, exc_type, exc, tb):
        storage = self.storage
        try:
            if exc is not None:
                conn = storage._conn
                # An exception (a signal's too) between BEGIN and COMMIT must not leave this
                # process's one connection holding the write lock.
                if storage._depth == 1 and conn is not None and getattr(conn, "in_transaction", False):
                    _rollback(conn)
                if not isinstance(exc, LilotaError):
                    translated = storage.dialect.translate_error(exc)
                    if translated is not None:
                        raise translated from exc
        finally:
            storage._depth -= 1
            storage._lock.release()
        return False


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
            if storage is None or storage._owner_pid != os.getpid():
                storage = cls._instances[key] = cls(dialect)
            return storage

    def __init__(self, dialect):
        self.dialect = dialect
        self._lock = threading.RLock()
        self._depth = 0               # nesting of _Guard blocks in the thread holding the lock
        self._conn = None
        self._owner_pid = os.getpid()
        self._guard = _Guard(self)
        sql = dialect.sql
        # Hot statements, translated once.
        self._insert_sql = sql(
            "INSERT INTO lilota_task (id, name, status, priority, run_at, attempts, max_attempts, timeout, "
            "progress_percentage, input, created_at, cancel_requested) "
            "VALUES (?, ?, 'scheduled', ?, ?, 0, ?, ?, 0, ?, ?, 0)")
        # A task whose cancel() was answered "being stopped" ends cancelled even when it finished
        # before it could be stopped: its result is discarded, as cancel() promised.
        self._complete_sql = sql(
            "UPDATE lilota_task SET "
            "status = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'completed' END, "
            "output = CASE WHEN cancel_requested = 1 THEN NULL ELSE ? END, "
            "error = CASE WHEN cancel_requested = 1 THEN ? ELSE error END, end_date_time = ?, "
            "progress_percentage = CASE WHEN ? THEN progress_percentage ELSE 100 END, "
            "input = CASE WHEN keep_input = 0 THEN NULL ELSE input END "
            "WHERE id = ? AND status = 'running' AND locked_by = ?")
        self._cancelled_late_json = dumps(_error_record(
            TaskCancelledError("cancelled while running; it finished before it could be stopped and its "
                               "result was discarded")), "error")
        # Ends an attempt that did not complete. A task queued again is unlocked; one whose cancel
        # was asked for while it ran ends cancelled instead of running again.
        self._fail_sql = sql(
            "UPDATE lilota_task SET "
            "status = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE ? END, "
            "run_at = COALESCE(?, run_at), "
            "end_date_time = CASE WHEN cancel_requested = 1 THEN ? ELSE ? END, "
            "error = ?, attempts = attempts - ?, "
            "input = CASE WHEN keep_input = 0 AND NOT (? AND cancel_requested = 0) THEN NULL ELSE input END, "
            "locked_by = CASE WHEN ? AND cancel_requested = 0 THEN NULL ELSE locked_by END, "
            "locked_at = CASE WHEN ? AND cancel_requested = 0 THEN NULL ELSE locked_at END "
            "WHERE id = ? AND status = 'running' AND locked_by = ?")
        self._get_sql = sql(f"SELECT {_TASK_SELECT} FROM lilota_task WHERE id = ?")
        # Called when a claim found nothing due: then every queued task is a delayed one.
        self._next_run_at_sql = ("SELECT MIN(run_at) FROM lilota_task "
                                 "WHERE status = 'scheduled' AND run_at > created_at")

    # --- connection and schema ---

    def _forget_parent(self):
        """In a child made by fork: the lock may have been held by a parent thread and the
        connection is the parent's. Start with a new lock and no connection (never close it)."""
        self._lock = threading.RLock()
        self._depth = 0
        self._conn = None
        self._owner_pid = os.getpid()

    def _open(self):
        conn = None
        try:
            conn = self.dialect.connect()
            self._migrate(conn)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            translated = None if isinstance(exc, LilotaError) else self.dialect.translate_error(exc)
            if translated is not None:
                raise translated from exc
            raise
        self._conn = conn

    def _migrate(self, conn):
        """Bring the schema to SCHEMA_VERSION; safe when several processes start at once."""
        def version():
            try:
                row = conn.execute("SELECT value FROM lilota_meta WHERE key = 'schema_version'").fetchone()
            except Exception as exc:
                if "no such table" in str(exc) or "does not exist" in str(exc):
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
        _retry_busy(lambda: conn.execute(self.dialect.begin_write_sql), getattr(self.dialect, "busy_timeout", 30))
        with _Transaction(conn, None):
            conn.execute("CREATE TABLE IF NOT EXISTS lilota_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            current = version()
            for number, statements in sorted(self.dialect.migrations().items()):
                if number > current:
                    for statement in statements:
                        conn.execute(statement)
            conn.execute(self.dialect.sql("DELETE FROM lilota_meta WHERE key = 'schema_version'"))
            conn.execute(self.dialect.sql("INSERT INTO lilota_meta (key, value) VALUES ('schema_version', ?)"),
                         (str(SCHEMA_VERSION),))

    def ensure_ready(self):
        """Open the connection and create or migrate the schema now (raises StorageError)."""
        with self._guard:
            pass

    def close(self):
        """Close this process's connection (the next operation opens a new one)."""
        with self._lock:
            if self._conn is not None and self._owner_pid == os.getpid():
                try:
                    self._conn.close()
                except Exception:
                    pass
            self._conn = None

    def _transaction(self, conn):
        return _Transaction(conn, self.dialect.begin_write_sql)

    # --- rows to records ---

    def _task(self, row):
        """The one place that turns a ``lilota_task`` row into a :class:`Task`."""
        if row is None:
            return None
        d = self.dialect
        (id_, name, status, priority, pid, run_at, attempts, max_attempts, timeout, expires_at,
         progress, start, end, input_, output, error, locked_by, locked_at, created_at, cancel, keep_input) = row
        return Task(
            id=uuid.UUID(str(id_)), name=name, status=TaskStatus(status), priority=priority, pid=pid,
            run_at=d.decode_time(run_at), attempts=attempts, max_attempts=max_attempts,
            timeout=None if timeout is None else timedelta(seconds=float(timeout)),
            expires_at=d.decode_time(expires_at), progress_percentage=progress,
            start_date_time=d.decode_time(start), end_date_time=d.decode_time(end),
            input=d.decode_json(input_), output=d.decode_json(output), error=d.decode_json(error),
            locked_by=None if locked_by is None else uuid.UUID(str(locked_by)),
            locked_at=d.decode_time(locked_at), created_at=d.decode_time(created_at),
            cancel_requested=bool(cancel), keep_input=None if keep_input is None else bool(keep_input))

    def _node(self, row):
        d = self.dialect
        id_, name, type_, status, pid, hostname, created_at, last_seen_at, lease = row
        return Node(id=uuid.UUID(str(id_)), name=name, type=NodeType(type_), status=NodeStatus(status),
                    pid=pid, hostname=hostname, created_at=d.decode_time(created_at),
                    last_seen_at=d.decode_time(last_seen_at), lease_expires_at=d.decode_time(lease))

    # --- tasks: scheduling side ---

    def insert_tasks(self, rows):
        """Store queued tasks in one transaction. ``rows``: (id, name, priority, run_at, max_attempts,
        timeout, input_json) tuples with run_at in epoch seconds, or None for "now": such a task's
        run_at equals its created_at, which keeps it out of the index of delayed tasks."""
        d = self.dialect
        now = _now()
        created = d.encode_time(now)
        params = [(id_, name, priority, created if run_at is None else d.encode_time(run_at), max_attempts,
                   timeout, d.encode_json(data), created)
                  for id_, name, priority, run_at, max_attempts, timeout, data in rows]
        with self._guard as conn:
            if len(params) == 1:
                conn.execute(self._insert_sql, params[0])  # one statement: its own transaction
                return
            with self._transaction(conn):
                conn.executemany(self._insert_sql, params)

    def get_task(self, task_id):
        """The Task stored under ``task_id`` (a canonical UUID string), or None."""
        with self._guard as conn:
            return self._task(conn.execute(self._get_sql, (task_id,)).fetchone())

    def task_state(self, task_id):
        """(status, change counter) for a cheap wait loop."""
        with self._guard as conn:
            row = conn.execute(self.dialect.sql("SELECT status FROM lilota_task WHERE id = ?"),
                               (task_id,)).fetchone()
            return (row[0] if row else None), self.dialect.change_counter(conn)

    def change_counter(self):
        """The dialect's change counter on this process's connection (see Dialect.change_counter)."""
        with self._guard as conn:
            return self.dialect.change_counter(conn)

    def cancel(self, task_id):
        """Cancel a queued task, or ask for a running one to be stopped.

        Returns "cancelled", "stopping", or the status it already had when it cannot be cancelled;
        None for an unknown id."""
        sql = self.dialect.sql
        with self._guard as conn:
            with self._transaction(conn):
                cur = conn.execute(sql("UPDATE lilota_task SET status = 'cancelled', end_date_time = ?, "
                                       "error = ? WHERE id = ? AND status IN ('created', 'scheduled')"),
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
        sql = self.dialect.sql
        with self._guard as conn:
            with self._transaction(conn):
                cur = conn.execute(sql("UPDATE lilota_task SET status = 'scheduled', run_at = ?, attempts = 0, "
                                       "end_date_time = NULL, cancel_requested = 0, locked_by = NULL, "
                                       "locked_at = NULL WHERE id = ? AND input IS NOT NULL "
                                       "AND status IN ('failed', 'expired', 'cancelled')"),
                                   (self.dialect.encode_time(_now()), task_id))
                if cur.rowcount == 1:
                    return True
                row = conn.execute(sql("SELECT status, input IS NULL FROM lilota_task WHERE id = ?"),
                                   (task_id,)).fetchone()
        if row is not None and row[0] in ("failed", "expired", "cancelled") and row[1]:
            raise LilotaError(f"task {task_id} cannot run again: its input was deleted when it finished "
                              f"(keep_input=False); schedule a new task with the input instead")
        return False

    def delete_finished(self, before):
        """Delete tasks that finished before ``before`` (epoch seconds) and nodes gone since then."""
        sql = self.dialect.sql
        cutoff = self.dialect.encode_time(before)
        with self._guard as conn:
            with self._transaction(conn):
                cur = conn.execute(sql("DELETE FROM lilota_task WHERE status IN "
                                       "('completed', 'failed', 'expired', 'cancelled') AND end_date_time < ?"),
                                   (cutoff,))
                conn.execute(sql("DELETE FROM lilota_node WHERE status IN ('stopped', 'crashed', 'dead') "
                                 "AND last_seen_at < ?"), (cutoff,))
                return cur.rowcount

    # --- tasks: worker side ---

    def prepare_claim(self, defaults):
        """The dialect's claim, built for these registered defaults (see Dialect.prepare_claim)."""
        return self.dialect.prepare_claim(tuple(defaults))

    def claim(self, prepared, node_id, pid):
        """Atomically take the next due task for ``node_id`` and mark it running (None if none)."""
        now = self.dialect.encode_time(_now())
        with self._guard as conn:
            return self._task(self.dialect.claim(conn, prepared, node_id, pid, now))

    def next_run_at(self):
        """Epoch seconds at which the earliest delayed queued task falls due, or None."""
        with self._guard as conn:
            row = conn.execute(self._next_run_at_sql).fetchone()
        value = row[0] if row else None
        return None if value is None else self.dialect.decode_time(value).timestamp()

    def complete(self, task_id, node_id, output_json, keep_progress):
        """Mark a task completed (cancelled, if its cancel was asked for while it ran); False when it
        was no longer this node's (recovered elsewhere)."""
        d = self.dialect
        with self._guard as conn:
            cur = conn.execute(self._complete_sql, (d.encode_json(output_json), d.encode_json(self._cancelled_late_json),
                                                    d.encode_time(_now()), keep_progress, task_id, node_id))
            return cur.rowcount == 1

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
        params = (status, run_at, now, end, d.encode_json(dumps(error, "error")), 0 if count_attempt else 1,
                  requeue, requeue, requeue, str(task.id), node_id)
        with self._guard as conn:
            return conn.execute(self._fail_sql, params).rowcount == 1

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
            query += " AND (expires_at <= ? OR cancel_requested = 1)"
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
            with self._transaction(conn):
                tasks = [self._task(r) for r in conn.execute(d.sql(query), params).fetchall()]
                for task in tasks:
                    retry_at = _retry_time(task, retry_delay, retry_max_delay) if retry and count_attempt else None
                    record = dict(error, attempt=task.attempts)
                    self.finish_attempt(task, node_id, record, final_status=final_status, retry_at=retry_at,
                                        count_attempt=count_attempt)
        return tasks

    # --- nodes ---

    def add_node(self, node_id, name, node_type, status, pid, lease):
        """Record a node of this host, alive for ``lease`` seconds unless its heartbeat renews it."""
        d = self.dialect
        now = _now()
        with self._guard as conn:
            conn.execute(d.sql(f"INSERT INTO lilota_node ({_NODE_COLUMNS}, host_key) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                         (node_id, name, str(node_type), str(status), pid, socket.gethostname(),
                          d.encode_time(now), d.encode_time(now), d.encode_time(now + lease), _host_key()))

    def set_node_status(self, node_id, status=None, pid=None):
        """Record a node's status and/or pid (None keeps the stored value) and that it was seen now."""
        d = self.dialect
        with self._guard as conn:
            conn.execute(d.sql("UPDATE lilota_node SET status = COALESCE(?, status), pid = COALESCE(?, pid), "
                               "last_seen_at = ? WHERE id = ?"),
                         (None if status is None else str(status), pid, d.encode_time(_now()), node_id))

    def heartbeat(self, node_ids, lease):
        """Renew the lease of nodes that are still alive; return the ids that are not (another
        process declared them dead and recovered their tasks: they must not go on working)."""
        if not node_ids:
            return set()
        d = self.dialect
        now = _now()
        marks = ", ".join("?" for _ in node_ids)
        with self._guard as conn:
            with self._transaction(conn):
                conn.execute(d.sql(f"UPDATE lilota_node SET last_seen_at = ?, lease_expires_at = ? "
                                   f"WHERE id IN ({marks}) AND status IN {_ALIVE_SQL}"),
                             [d.encode_time(now), d.encode_time(now + lease), *node_ids])
                alive = conn.execute(d.sql(f"SELECT id FROM lilota_node WHERE id IN ({marks}) "
                                           f"AND status IN {_ALIVE_SQL}"), list(node_ids)).fetchall()
        return set(node_ids) - {str(row[0]) for row in alive}

    def nodes(self):
        """Every row of lilota_node as a Node, oldest first."""
        with self._guard as conn:
            rows = conn.execute(f"SELECT {_NODE_COLUMNS} FROM lilota_node ORDER BY created_at").fetchall()
        return [self._node(r) for r in rows]

    def find_lost_nodes(self, exclude=()):
        """Mark dead the nodes marked alive whose lease has expired, or whose process is gone from
        this host (same host key: same machine, boot and pid namespace); return their ids. Nodes in
        ``exclude`` are the caller's own, which it looks after itself."""
        d = self.dialect
        here = _host_key()
        with self._guard as conn:
            with self._transaction(conn):
                rows = conn.execute(f"SELECT id, pid, host_key, lease_expires_at FROM lilota_node "
                                    f"WHERE status IN {_ALIVE_SQL}").fetchall()
                now = _now()
                lost = [str(node_id) for node_id, pid, host_key, lease in rows
                        if str(node_id) not in exclude and (
                            d.decode_time(lease).timestamp() < now
                            or (host_key == here and pid and not _process_exists(pid)))]
                for node_id in lost:
                    conn.execute(d.sql(f"UPDATE lilota_node SET status = 'dead' WHERE id = ? "
                                       f"AND status IN {_ALIVE_SQL}"), (node_id,))
        return lost

    def orphaned_nodes(self):
        """Ids of nodes that are not alive but still hold running tasks."""
        with self._guard as conn:
            rows = conn.execute(
                "SELECT DISTINCT locked_by FROM lilota_task WHERE status = 'running' AND locked_by NOT IN "
                f"(SELECT id FROM lilota_node WHERE status IN {_ALIVE_SQL})").fetchall()
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


_V7_RANDOM = (1 << 76) - 1 - (0b11 << 62)   # rand_a and rand_b of a version 7 UUID: 74 bits
_V7_MARKS = (7 << 76) | (0b10 << 62)        # its version (7) and variant (RFC 9562) bits


def _new_task_ids(count):
    """``count`` new task ids: version 7 UUIDs (RFC 9562), the current time in milliseconds followed
    by 74 random bits from os.urandom.

    Ids made later sort later, so a new task's entry in the primary-key index lands next to the
    newest ones instead of on a random page of an index that grows with every task kept: with
    random (version 4) ids, inserting 100,000 tasks into a table that already held 200,000 ran at
    about half the speed of inserting them into an empty one; with these it does not slow down.
    74 random bits keep ids unguessable and unique; the id tells when the task was created, which
    ``created_at`` says anyway."""
    prefix = (time.time_ns() // 1_000_000) << 80 | _V7_MARKS
    if count == 1:
        return [uuid.UUID(int=prefix | (int.from_bytes(os.urandom(10), "big") & _V7_RANDOM))]
    random_bytes = os.urandom(10 * count)
    from_bytes, make = int.from_bytes, uuid.UUID
    return [make(int=prefix | (from_bytes(random_bytes[i:i + 10], "big") & _V7_RANDOM))
            for i in range(0, 10 * count, 10)]


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


def _check_attempts(value, what="max_attempts"):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int of at least 1 (1 means no retry), got {value!r}")
    return value


class LilotaScheduler:
    """The scheduling side: store tasks and look after them. Runs no workers.

    Everything here works whether or not any worker is running: a scheduled task waits in the
    database until a worker claims it. Safe to share between threads.
    """

    def __init__(self, db_url=None):
        self.db_url = db_url or os.environ.get("LILOTA_DB_URL") or DEFAULT_DB_URL
        # Parsed now: a bad URL fails here, and a relative SQLite path is fixed to the current
        # directory of this moment, not of the first use.
        self._dialect = _dialect_for_url(self.db_url)
        self._storage = None

    @property
    def storage(self):
        """The process's :class:`Storage` for this database, opened on first use."""
        if self._storage is None:
            self._storage = Storage.for_dialect(self._dialect)
        return self._storage

    @property
    def db_url_for_workers(self):
        """The URL as other processes must see it (a relative SQLite path made absolute)."""
        return self._dialect.absolute_url

    def _notify_workers(self):
        """Called after tasks were stored; Lilota wakes its idle worker processes here."""

    def schedule(self, name, input=None, *, delay=None, run_at=None, priority=0, max_attempts=None,
                 timeout=None):
        """Store a task and return its id (a UUID).

        ``input`` (a dataclass, pydantic model, dict, ``as_dict()`` object or plain JSON value) is
        serialized now: a value that cannot be stored raises TypeError (ValueError for NaN,
        cycles) and nothing is written. ``delay`` (timedelta or seconds) or ``run_at`` (an aware
        datetime) postpone it; higher ``priority`` runs first; ``max_attempts`` and ``timeout``
        override the worker's registered defaults for this task.
        """
        return self._schedule(name, (input,), delay, run_at, priority, max_attempts, timeout)[0]

    def schedule_many(self, name, inputs, *, delay=None, run_at=None, priority=0, max_attempts=None,
                      timeout=None):
        """Store one task per input in a single transaction; return their ids in order.

        All inputs are serialized before anything is written: one bad input stores nothing."""
        return self._schedule(name, inputs, delay, run_at, priority, max_attempts, timeout)

    def _schedule(self, name, inputs, delay, run_at, priority, max_attempts, timeout):
        _check_name(name)
        if isinstance(priority, bool) or not isinstance(priority, int) or not -2**31 <= priority < 2**31:
            raise ValueError(f"priority must be an int (higher runs first), got {priority!r}")
        _check_attempts(max_attempts)
        timeout = _seconds(timeout, "timeout", allow_zero=False)
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
        if isinstance(inputs, (str, bytes, dict)) or not hasattr(inputs, "__iter__"):
            raise TypeError("schedule_many() takes an iterable of inputs, e.g. a list")
        payloads = [dumps(value, "input") for value in inputs]
        ids = _new_task_ids(len(payloads))
        if payloads:
            self.storage.insert_tasks([(str(task_id), name, priority, when, max_attempts, timeout, payload)
                                       for task_id, payload in zip(ids, payloads)])
            self._notify_workers()
        return ids

    def get_task_by_id(self, task_id):
        """The stored :class:`Task`, or None when there is no task with that id."""
        return self.storage.get_task(_task_id(task_id))

    def wait(self, task_id, timeout=None):
        """Block until the task is finished (completed, failed, expired or cancelled) and return it.

        Raises TaskNotFoundError for an unknown id and TaskWaitTimeout when ``timeout`` (seconds or
        timedelta) passes first; the task itself is not affected."""
        key = _task_id(task_id)
        limit = _seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        storage = self.storage
        # The change counter is read before the row, never after it: a commit that lands between
        # the two reads then moves the counter away from the value kept here, and the row is read
        # again at once. (Read after the row, the counter could already include a completion the
        # row missed, and wait() slept until its 50 ms re-read.)
        counter = storage.change_counter()
        status = storage.task_state(key)[0]
        delay, last_read = 0.0005, time.monotonic()
        while True:
            if status is None:
                raise TaskNotFoundError(f"no task with id {key}")
            if TaskStatus(status).is_finished:
                return storage.get_task(key)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TaskWaitTimeout(f"task {key} is still {status} after {limit:g}s")
            pause = delay if deadline is None else min(delay, max(0.0, deadline - now))
            time.sleep(pause)
            delay = min(delay * 1.5, 0.005 if counter is not None else 0.05)
            # Re-read the row when another connection committed, and at least every 50 ms (writes
            # made through this process's own connection do not move the counter).
            new_counter = storage.change_counter() if counter is not None else None
            if new_counter != counter or time.monotonic() - last_read > 0.05:
                counter = new_counter
                status = storage.task_state(key)[0]
                last_read = time.monotonic()

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
        """Delete tasks that finished more than ``older_than`` ago (and long-gone nodes);
        return how many tasks were deleted. Queued and running tasks are never deleted."""
        return self.storage.delete_finished(_now() - _seconds(older_than, "older_than"))

    def get_all_nodes(self):
        """Every node recorded in ``lilota_node``: worker processes and scheduling applications."""
        return self.storage.nodes()


# ==================================================================================================
# 4. Worker
# ==================================================================================================

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


def _recover_lost_nodes(storage, retry_delay, retry_max_delay, exclude=()):
    """Mark nodes whose lease expired (or whose process is gone) dead and release the running
    tasks they held: retried while attempts remain, else failed with a WorkerDiedError. The nodes
    in ``exclude`` are the caller's own (a supervisor handles its workers' deaths itself)."""
    exclude = set(exclude)
    lost = storage.find_lost_nodes(exclude)
    for node_id in (set(lost) | set(storage.orphaned_nodes())) - exclude:
        tasks = storage.recover_tasks(node_id, _error_record(WorkerDiedError(
            f"the worker node {node_id} running this task was lost (its heartbeat lease expired "
            f"or its process is gone)")), retry_delay=retry_delay, retry_max_delay=retry_max_delay)
        if tasks:
            logger.warning("recovered %d task(s) of lost node %s", len(tasks), node_id)


class _Interrupted(BaseException):
    """Raised inside a task function by a standalone worker to stop it (timeout or cancel).
    A BaseException, so that a task's ``except Exception`` does not swallow it."""


class _TaskFunction:
    """A registered task function with what lilota needs to call it."""

    def __init__(self, name, func, input_model, output_model, wants_progress, timeout, max_attempts, keep_input):
        self.name = name
        self.func = func
        self.output_model = output_model
        self.timeout = _seconds(timeout, f"timeout of task {name!r}", allow_zero=False)
        self.max_attempts = _check_attempts(max_attempts, f"max_attempts of task {name!r}")
        self.keep_input = bool(keep_input)
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
            self.progress_param = free.pop(0).name  # the seed's style: def task(data, task_progress)
        missing = [p.name for p in free if p.default is p.empty]
        if missing:
            raise TypeError(f"task {name!r}: lilota cannot fill parameter(s) {missing}; a task function takes "
                            f"its input, and optionally a TaskProgress and a TaskContext parameter")
        self.input_model = input_model

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


class _Supervision:
    """What a worker process gets from its supervisor (pickled into the child by multiprocessing)."""

    def __init__(self, db_url, node_id, control, doorbell, doorbell_writer, parent_pid):
        self.db_url = db_url
        self.node_id = node_id
        self.control = control              # duplex Connection to the supervisor
        self.doorbell = doorbell            # read end of the pipe the scheduler rings
        self.doorbell_writer = doorbell_writer
        self.parent_pid = parent_pid
        self.started = False

    @property
    def doorbell_writer_fd(self):
        return self.doorbell_writer.fileno()


# Set in a worker process started by a supervisor (section 5) before the worker script runs.
_supervision = None


class LilotaWorker:
    """The worker side: register task functions, then ``start()`` to execute tasks.

    Run standalone (``python myscript.py``) it executes tasks until stopped (Ctrl-C, SIGTERM or
    ``stop()``). Run by :class:`Lilota` (``script_path=``), each worker process runs the script
    and the supervisor handles timeouts, crashes and stop.
    """

    #: An idle worker claims at least this often (seconds), whatever it was told: a safety net
    #: under the doorbell and the change counter, which are what normally wake it.
    safety_claim_interval = 5.0

    def __init__(self, db_url=None, set_progress_manually=False, *, name=None, poll_interval=0.02,
                 heartbeat_interval=5.0, node_timeout=30.0, retry_delay=timedelta(seconds=1),
                 retry_max_delay=timedelta(minutes=10)):
        self.db_url = db_url or (_supervision.db_url if _supervision else None) \
            or os.environ.get("LILOTA_DB_URL") or DEFAULT_DB_URL
        self._dialect = _dialect_for_url(self.db_url)
        self.set_progress_manually = bool(set_progress_manually)
        self.name = name
        self.poll_interval = _seconds(poll_interval, "poll_interval", allow_zero=False)
        self.heartbeat_interval = _seconds(heartbeat_interval, "heartbeat_interval", allow_zero=False)
        self.node_timeout = _seconds(node_timeout, "node_timeout", allow_zero=False)
        self.retry_delay = _seconds(retry_delay, "retry_delay")
        self.retry_max_delay = _seconds(retry_max_delay, "retry_max_delay")
        self._registry = {}
        self._storage = None
        self._claim = None
        self._node_id = None
        self._helper_node_id = None
        self._stopping = threading.Event()
        self._running = False
        self._wake_r = self._wake_w = None
        self._fds_lock = threading.RLock()   # re-entrant: stop() may run in a signal handler
        self._current = None          # the task being executed, for the keeper thread
        self._interrupt = None        # (task id, reason) the keeper asked to stop
        self._interruptible = False
        self.logger = logging.getLogger("lilota.worker")

    # --- registration ---

    def register(self, name, input_model=None, output_model=None, task_progress=None,
                 timeout=timedelta(minutes=5), max_attempts=1, keep_input=True):
        """Decorator registering a task function under ``name``.

        The function receives its input as an ``input_model`` instance (the stored dict when there
        is none); with ``task_progress=TaskProgress`` (or a parameter annotated TaskProgress) also a
        :class:`TaskProgress`, and a parameter annotated :class:`TaskContext` receives the context.
        A run longer than ``timeout`` (None: no limit) is stopped and ends expired; ``max_attempts``
        counts every execution (1: no retry). ``keep_input=False`` deletes the input once the task
        has finished for good.
        """
        def decorator(func):
            self._add(_TaskFunction(_check_name(name), func, input_model, output_model, bool(task_progress),
                                    timeout, max_attempts, keep_input))
            return func
        return decorator

    def task(self, func=None, *, name=None, timeout=timedelta(minutes=5), max_attempts=1, keep_input=True):
        """Decorator registering a task under the function's name (or ``name``), with the input and
        output models read from its annotations: ``@worker.task`` or ``@worker.task(name=...)``."""
        def decorator(fn):
            hints = {}
            try:
                hints = typing.get_type_hints(fn)
            except Exception:
                pass
            output_model = hints.get("return")
            self._add(_TaskFunction(_check_name(name or fn.__name__), fn, None,
                                    None if output_model is type(None) else output_model,
                                    False, timeout, max_attempts, keep_input))
            return fn
        return decorator(func) if func is not None else decorator

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

    # --- storage helpers ---

    @property
    def storage(self):
        """The process's :class:`Storage` for this database, opened on first use."""
        if self._storage is None:
            self._storage = Storage.for_dialect(self._dialect)
        return self._storage

    def _prepared_claim(self):
        if self._claim is None:
            self._claim = self.storage.prepare_claim(
                (t.name, t.timeout, t.max_attempts, t.keep_input) for t in self._registry.values())
        return self._claim


    # --- executing one task ---

    def _execute(self, task, node_id):
        """Run one claimed task and store its outcome. Never raises for the task's own errors."""
        storage = self.storage
        function = self._registry.get(task.name)
        if function is None:
            known = ", ".join(repr(n) for n in self.registered_names) or "none"
            self.logger.warning("task %s: unknown task name %r", task.id, task.name)
            self._record(storage.finish_attempt, task, node_id, _error_record(UnknownTaskError(
                f"no task named {task.name!r} is registered in this worker (registered: {known}); "
                f"register it with @worker.register({task.name!r}) in the worker script"), attempt=task.attempts))
            return
        progress = context = None
        if function.progress_param is not None or function.context_param is not None:  # only if it takes them
            progress = TaskProgress(task.id, functools.partial(self._store_progress, node_id))
            if function.context_param is not None:
                context = TaskContext(task_id=task.id, name=task.name, attempt=task.attempts,
                                      max_attempts=task.max_attempts or 1, progress=progress, logger=self.logger)
        self._current, self._interrupt = task, None
        try:
            try:
                self._interruptible = True
                if self._interrupt is not None:  # asked to stop before we got here
                    raise _Interrupted(self._interrupt[1])
                result = function(task.input, progress, context)
            finally:
                self._interruptible = False
            output = function.output(result)
        except _Interrupted as stop:
            self._end_interrupted(task, node_id, str(stop))
            return
        except KeyboardInterrupt:
            # Ctrl-C of a standalone worker: give the task back to the queue and stop.
            self._record(storage.finish_attempt, task, node_id, _error_record(
                TaskInterruptedError("the worker was interrupted; the task was queued again")), count_attempt=False)
            raise
        except BaseException as exc:  # the task's own failure, SystemExit included
            self._end_failed(task, node_id, _error_record(exc, attempt=task.attempts))
            return
        finally:
            self._current = None
        if not self._record(storage.complete, str(task.id), node_id, output, self.set_progress_manually):
            self.logger.info("task %s finished but was no longer this worker's (cancelled or recovered); "
                             "its result was not stored", task.id)

    def _store_progress(self, node_id, task_id, percent):
        # Progress is informative: a database hiccup must not fail the task that reports it.
        try:
            self.storage.set_progress(str(task_id), node_id, percent)
        except StorageError as exc:
            self.logger.warning("task %s: could not store progress %s%% (%s)", task_id, percent, exc)

    def _record(self, write, *args, **kwargs):
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

    def _end_failed(self, task, node_id, error, final_status=TaskStatus.FAILED):
        retry_at = _retry_time(task, self.retry_delay, self.retry_max_delay)
        self.logger.warning("task %s (%s) attempt %s/%s failed: %s: %s%s", task.id, task.name, task.attempts,
                            task.max_attempts, error["type"], error["message"], " (will retry)" if retry_at else "")
        self._record(self.storage.finish_attempt, task, node_id, error, final_status=final_status,
                     retry_at=retry_at)

    def _end_interrupted(self, task, node_id, reason):
        if reason == "cancel":
            self._record(self.storage.finish_attempt, task, node_id, _error_record(
                TaskCancelledError("cancelled while running"), attempt=task.attempts), final_status=TaskStatus.CANCELLED)
        elif reason == "timeout":
            limit = f" of {task.timeout.total_seconds():g}s" if task.timeout is not None else ""
            self._end_failed(task, node_id, _error_record(
                TaskTimeoutError(f"task ran longer than its timeout{limit}"), attempt=task.attempts),
                final_status=TaskStatus.EXPIRED)
        else:  # "lost": another process declared this worker dead and already recovered the task
            self.logger.error("task %s was taken from this worker (its node was declared dead); stopped it",
                              task.id)

    # --- the test helper ---

    def run_pending(self, limit=None):
        """Execute due tasks in the calling process until none is left (or ``limit`` ran) and return
        them as stored afterwards. For tests: the same serialization and records as a worker
        process, without processes; timeouts are not enforced here."""
        if self._helper_node_id is None:
            self._helper_node_id = str(uuid.uuid4())
            self.storage.add_node(self._helper_node_id, "run_pending", NodeType.WORKER, NodeStatus.RUNNING,
                                  os.getpid(), self.node_timeout)
        else:
            self.storage.set_node_status(self._helper_node_id, NodeStatus.RUNNING)
        done = []
        try:
            while limit is None or len(done) < limit:
                self.storage.heartbeat([self._helper_node_id], self.node_timeout)
                task = self.storage.claim(self._prepared_claim(), self._helper_node_id, os.getpid())
                if task is None:
                    break
                self._execute(task, self._helper_node_id)
                done.append(self.storage.get_task(str(task.id)))
        finally:
            self.storage.set_node_status(self._helper_node_id, NodeStatus.STOPPED)
        return done

    # --- the worker loop ---

    def start(self):
        """Execute tasks until stopped. Blocks.

        Standalone, it stops on Ctrl-C, SIGTERM or ``stop()``, after the running task. Under a
        supervisor it stops when the supervisor says so."""
        if self._running:
            raise LilotaError("this worker is already running")
        supervision = _supervision
        if supervision is not None and not supervision.started:
            return self._start_supervised(supervision)
        return self._start_standalone()

    def stop(self):
        """Ask the worker to stop after the task it is running (safe from signal handlers and threads)."""
        self._stopping.set()
        with self._fds_lock:
            _ring(self._wake_w)

    def _open_wake_pipe(self):
        self._wake_r, self._wake_w = _nonblocking_pipe()

    def _close_wake_pipe(self):
        with self._fds_lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), None, None
            _close_fds(*fds)

    def _start_supervised(self, supervision):
        supervisor_db = _dialect_for_url(supervision.db_url)
        if self._dialect.identity != supervisor_db.identity:
            raise ConfigurationError(
                f"the worker script uses {self._dialect.describe()} but Lilota was started with "
                f"{supervisor_db.describe()}; give both the same db_url "
                f"(or leave LilotaWorker's db_url out to use the supervisor's)")
        node_id = supervision.node_id
        self.storage.ensure_ready()
        self._prepared_claim()
        self.storage.set_node_status(node_id, NodeStatus.RUNNING, os.getpid())
        supervision.started = True
        self._running = True
        self._open_wake_pipe()
        doorbell = supervision.doorbell.fileno()
        os.set_blocking(doorbell, False)
        supervision.control.send(("ready", os.getpid()))
        keeper = threading.Thread(target=self._listen_to_supervisor, args=(supervision.control,),
                                  name="lilota-keeper", daemon=True)
        keeper.start()
        try:
            self._loop(node_id, doorbell)
        finally:
            self._running = False
            self._close_wake_pipe()

    def _listen_to_supervisor(self, control):
        while True:
            try:
                message = control.recv()
            except (EOFError, OSError):
                # The application that started us is gone: workers never outlive it. A running task
                # is recovered by the next lilota process that sees this node's process gone.
                os._exit(1)
            if message and message[0] == "stop":
                self.stop()

    def _start_standalone(self):
        storage = self.storage
        storage.ensure_ready()
        self._prepared_claim()
        node_id = self._node_id = str(uuid.uuid4())
        storage.add_node(node_id, self.name or f"{socket.gethostname()}:{os.getpid()}", NodeType.WORKER,
                         NodeStatus.RUNNING, os.getpid(), self.node_timeout)
        self._running = True
        self._stopping.clear()
        self._open_wake_pipe()
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {}
        if in_main_thread:
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: self.stop())
            previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_interrupt_signal)
        keeper = threading.Thread(target=self._keep_standalone, args=(node_id, in_main_thread),
                                  name="lilota-keeper", daemon=True)
        keeper.start()
        status = NodeStatus.STOPPED
        try:
            self._loop(node_id, None)
        except KeyboardInterrupt:
            pass
        except BaseException:
            status = NodeStatus.CRASHED
            raise
        finally:
            self._running = False
            self._stopping.set()
            keeper.join(timeout=2 * self.heartbeat_interval)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._close_wake_pipe()
            try:
                storage.recover_tasks(node_id, _error_record(
                    TaskInterruptedError("the worker stopped while running this task")), count_attempt=False)
                storage.set_node_status(node_id, status)
            except StorageError:
                self.logger.exception("could not record that worker %s stopped", node_id)

    def _on_interrupt_signal(self, signum, frame):
        request, task = self._interrupt, self._current
        # Only the task the keeper meant: it may have finished, and another begun, since.
        if self._interruptible and request is not None and task is not None and task.id == request[0]:
            raise _Interrupted(request[1])

    def _request_interrupt(self, task, reason, can_interrupt):
        if can_interrupt and self._interrupt is None and self._current is task:
            self._interrupt = (task.id, reason)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def _keep_standalone(self, node_id, can_interrupt):
        """Heartbeats, recovery of lost nodes' tasks, and (for a worker in the main thread, where a
        signal can interrupt the task function) timeout and cancel of the running task. Without a
        supervisor nobody else does these."""
        storage = self.storage
        next_beat = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                if now >= next_beat:
                    next_beat = now + self.heartbeat_interval
                    if storage.heartbeat([node_id], self.node_timeout):
                        # Declared dead while alive (paused past its lease): the running task was
                        # recovered elsewhere. Stop it and come back to life for the next ones.
                        self.logger.error("worker %s was declared dead by another process; resuming", node_id)
                        task = self._current
                        if task is not None:
                            self._request_interrupt(task, "lost", can_interrupt)
                        storage.set_node_status(node_id, NodeStatus.RUNNING)
                        storage.heartbeat([node_id], self.node_timeout)
                    _recover_lost_nodes(storage, self.retry_delay, self.retry_max_delay)
                task = self._current
                if task is not None and self._interrupt is None:
                    for hit in storage.running_tasks([node_id], only_overdue_or_cancelled=True):
                        if hit.id == task.id:
                            self._request_interrupt(task, "cancel" if hit.cancel_requested else "timeout",
                                                    can_interrupt)
            except StorageError:
                self.logger.warning("worker %s: database unavailable for heartbeat; will retry", node_id,
                                    exc_info=True)
            self._stopping.wait(0.1 if self._current is not None else min(1.0, self.heartbeat_interval))

    def _loop(self, node_id, doorbell):
        """Claim and execute until stopped; sleep on the doorbell and the change counter when idle."""
        storage = self.storage
        prepared = self._prepared_claim()
        pid = os.getpid()
        stopping = self._stopping
        waitables = [self._wake_r] + ([doorbell] if doorbell is not None else [])
        busy_errors = 0
        while not stopping.is_set():
            try:
                task = storage.claim(prepared, node_id, pid)
                if task is not None:
                    busy_errors = 0
                    self._execute(task, node_id)
                    continue
                # Idle. Empty the doorbell and read the change counter, then claim once more: a
                # task stored after that claim rang the bell or moved the counter after its
                # commit, so it is either claimed now or wakes us below.
                rings = _drain(doorbell) if doorbell is not None else 0
                counter = storage.change_counter()
                task = storage.claim(prepared, node_id, pid)
                if task is not None:
                    if rings > 1:   # more work was announced: pass the wake-up on to another worker
                        _ring(_supervision.doorbell_writer_fd if _supervision else None)
                    self._execute(task, node_id)
                    continue
                self._idle(waitables, counter)
            except DatabaseBusyError:
                busy_errors += 1
                self.logger.warning("worker %s: database busy, retrying", node_id)
                stopping.wait(min(1.0, 0.01 * 2 ** min(busy_errors, 7)))

    def _idle(self, waitables, counter):
        """Wait until the doorbell rings, another connection commits (the change counter moves away
        from ``counter``), a delayed task falls due, or stop() is called."""
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
                return
            if due is not None and _now() >= due:
                return
            new_counter = storage.change_counter()
            if new_counter != counter or time.monotonic() > give_up:
                return


# ==================================================================================================
# 5. Supervisor
# ==================================================================================================

def _report_fatal(supervision, text):
    try:
        supervision.control.send(("fatal", text))
    except Exception:
        sys.stderr.write(text + "\n")


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


_EXIT_FATAL = 3  # a worker process's exit code when its script could not start


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
    sys.path.insert(0, os.path.dirname(script_path))
    try:
        runpy.run_path(script_path, run_name="__main__")
    except SystemExit as exc:
        if not supervision.started:
            _report_fatal(supervision, f"the worker script {script_path} exited (sys.exit({exc.code!r})) "
                                       f"before calling worker.start()")
            os._exit(_EXIT_FATAL)
        raise
    except BaseException:
        if not supervision.started:
            _report_fatal(supervision, f"the worker script {script_path} failed before calling worker.start():\n"
                                       + traceback.format_exc())
            os._exit(_EXIT_FATAL)
        raise
    if not supervision.started:
        _report_fatal(supervision, f"the worker script {script_path} finished without calling worker.start(); "
                                   f"call it (e.g. under `if __name__ == \"__main__\":`) so that the worker "
                                   f"executes tasks")
        os._exit(_EXIT_FATAL)


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


class Lilota(LilotaScheduler):
    """The application side: schedule tasks and run ``number_of_workers`` worker processes.

    ``start()`` starts the worker processes (each runs ``script_path`` as ``__main__``) and a
    supervisor thread that restarts crashed workers with backoff, stops tasks that run past their
    timeout or are cancelled, recovers the tasks of dead workers, and reports a broken script in
    ``error`` without restarting it. ``stop()`` (also on leaving a ``with`` block and at interpreter
    exit) lets running tasks finish for ``stop_timeout`` seconds, then stops the rest and queues
    them again. Worker processes are started with ``spawn`` by default, so the application's own
    entry point must be guarded by ``if __name__ == "__main__":`` as with any multiprocessing program.
    """

    def __init__(self, db_url=None, *, script_path=None, number_of_workers=None, stop_timeout=30.0,
                 heartbeat_interval=5.0, node_timeout=30.0, restart_delay=0.5, restart_max_delay=30.0,
                 retry_delay=timedelta(seconds=1), retry_max_delay=timedelta(minutes=10),
                 start_method="spawn", name=None):
        super().__init__(db_url)
        self.number_of_workers = 0
        self.script_path = None
        if script_path is not None:
            if not isinstance(script_path, (str, os.PathLike)):
                raise TypeError(f"script_path must be a path, not {type(script_path).__name__}")
            path = os.path.abspath(os.fspath(script_path))
            if not os.path.isfile(path):
                raise WorkerScriptError(f"worker script {os.fspath(script_path)!r} not found (looked for {path}); "
                                        f"script_path must name the file that creates the LilotaWorker")
            self.script_path = path
            if number_of_workers is None:
                number_of_workers = os.cpu_count() or 1
            if isinstance(number_of_workers, bool) or not isinstance(number_of_workers, int) \
                    or not 1 <= number_of_workers <= 1024:
                raise ConfigurationError(f"number_of_workers must be an int from 1 to 1024, got {number_of_workers!r}")
            self.number_of_workers = number_of_workers
        elif number_of_workers not in (None, 0):
            raise ConfigurationError("number_of_workers needs a script_path: the worker script to run")
        self.stop_timeout = _seconds(stop_timeout, "stop_timeout")
        self.heartbeat_interval = _seconds(heartbeat_interval, "heartbeat_interval", allow_zero=False)
        self.node_timeout = _seconds(node_timeout, "node_timeout", allow_zero=False)
        self.restart_delay = _seconds(restart_delay, "restart_delay")
        self.restart_max_delay = _seconds(restart_max_delay, "restart_max_delay")
        # Backoff before a task whose worker died or timed out runs again (the worker's own
        # retry_delay applies to tasks that raised).
        self.retry_delay = _seconds(retry_delay, "retry_delay")
        self.retry_max_delay = _seconds(retry_max_delay, "retry_max_delay")
        if start_method not in multiprocessing.get_all_start_methods():
            raise ConfigurationError(f"start_method must be one of {multiprocessing.get_all_start_methods()}, "
                                     f"got {start_method!r}")
        self.start_method = start_method
        self.name = name
        self.node_id = None
        self._error = None
        self._failed = threading.Event()
        self._thread = None
        self._stop_requested = threading.Event()
        self._stop_timeout_now = None
        self._wake_r = self._wake_w = None
        self._doorbell = None
        self._doorbell_fd = None
        self._handles = []
        self._ever_ready = False     # some worker of this run called worker.start(): the script works
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        # Ringing a pipe and closing it must not interleave: a number read before a close could
        # name another file by the time of the write.
        self._fds_lock = threading.Lock()

    # --- one side only ---

    @classmethod
    def scheduler(cls, db_url=None, **options):
        """A Lilota that only schedules and looks after tasks; it starts no workers."""
        return cls(db_url, **options)

    @classmethod
    def workers(cls, script_path, number_of_workers=None, db_url=None, **options):
        """A Lilota whose job is to run worker processes (e.g. on a worker host)."""
        return cls(db_url, script_path=script_path, number_of_workers=number_of_workers, **options)

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

    def _fail(self, text):
        if not self._failed.is_set():
            self._error = text
            self._failed.set()
            logger.error("lilota workers failed: %s", text)

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
            self.node_id = str(uuid.uuid4())
            storage.add_node(self.node_id, self.name or f"{socket.gethostname()}:{os.getpid()}", NodeType.SCHEDULER,
                             NodeStatus.RUNNING, os.getpid(), self.node_timeout)
            self._owner_pid = os.getpid()
            self._error = None
            self._failed.clear()
            self._stop_requested.clear()
            self._ever_ready = False
            if self.script_path is not None:
                self._wake_r, self._wake_w = _nonblocking_pipe()
                reader, writer = multiprocessing.Pipe(duplex=False)
                os.set_blocking(writer.fileno(), False)
                self._doorbell, self._doorbell_fd = (reader, writer), writer.fileno()
            self._thread = threading.Thread(target=self._supervise, name="lilota-supervisor", daemon=True)
            self._thread.start()
            atexit.register(self._stop_at_exit)
        return self

    def stop(self, timeout=None):
        """Stop the workers: running tasks get ``timeout`` seconds (default ``stop_timeout``) to
        finish; those still running then are stopped and queued again. Blocks until done."""
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
            with self._fds_lock:
                fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), None, None
                _close_fds(*fds)
            self._thread = None
            self.node_id = None
            atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self):
        if os.getpid() != self._owner_pid:
            return  # a forked child of the application: the workers are its parent's
        try:
            self.stop()
        except Exception:
            logger.exception("stopping lilota at exit failed")

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.stop()
        return False

    def _notify_workers(self):
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
            self._housekeeping()
            if self.script_path is None:
                # A scheduling-only application: keep its node alive and help recover lost nodes.
                while not self._stop_requested.wait(self.heartbeat_interval):
                    self._housekeeping()
                return
            context = multiprocessing.get_context(self.start_method)
            self._handles = [None] * self.number_of_workers
            restart_at = {i: 0.0 for i in range(self.number_of_workers)}
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
                                           + [at - now for at in restart_at.values()]))
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
                        restart_at[h.index] = time.monotonic() + self._restart_delay(h, crashes)
                        self._on_worker_exit(h)
                    if self._failed.is_set() or self._stop_requested.is_set():
                        break
                    now = time.monotonic()
                    for i, h in enumerate(self._handles):
                        if h is None and i not in restart_at:  # a replacement failed half-way
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
            self._fail("the lilota supervisor failed:\n" + traceback.format_exc())
        finally:
            self._shutdown()

    def _spawn(self, context, index):
        node_id = str(uuid.uuid4())
        self.storage.add_node(node_id, f"{self.name or socket.gethostname()}:worker-{index}", NodeType.WORKER,
                              NodeStatus.STARTING, None, self.node_timeout)
        parent_end, child_end = context.Pipe()
        reader, writer = self._doorbell
        # Under forkserver the worker's parent is the fork server, not this process.
        parent_pid = None if self.start_method == "forkserver" else os.getpid()
        supervision = _Supervision(self.db_url_for_workers, node_id, child_end, reader, writer, parent_pid)
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
        if not handle.ready and not self._ever_ready:
            # The script never got a worker running: a broken script, not a crash. No restarts.
            self.storage.set_node_status(handle.node_id, NodeStatus.CRASHED)
            self._fail(handle.fatal or f"worker process {handle.process.pid} ({self.script_path}) "
                                       f"{_describe_exit(code)} before calling worker.start()")
            return
        # A crash: release its task (retried, or failed when its attempts are used up).
        tasks = self._recover(handle.node_id, _error_record(WorkerDiedError(
            f"the worker process {handle.process.pid} running this task died ({_describe_exit(code)})")))
        self.storage.set_node_status(handle.node_id, NodeStatus.CRASHED)
        logger.warning("worker process %s %s%s%s", handle.process.pid, _describe_exit(code),
                       f" while running task {tasks[0].id}" if tasks else "",
                       f":\n{handle.fatal}" if handle.fatal else "")

    def _stop_overdue_and_cancelled(self, context):
        """Kill workers whose task ran past its timeout or was cancelled; record it and replace them."""
        by_node = {h.node_id: h for h in self._handles if h is not None and h.ready}
        if not by_node:
            return
        for task in self.storage.running_tasks(list(by_node), only_overdue_or_cancelled=True):
            handle = by_node[str(task.locked_by)]
            self._kill(handle)
            if task.cancel_requested:
                self._recover(handle.node_id, _error_record(TaskCancelledError("cancelled while running")),
                              final_status=TaskStatus.CANCELLED, retry=False, task_id=task.id)
            else:
                self._recover(handle.node_id, _error_record(TaskTimeoutError(
                    f"task ran longer than its timeout of {task.timeout.total_seconds():g}s; "
                    f"its worker process was stopped")), final_status=TaskStatus.EXPIRED, task_id=task.id)
            logger.info("task %s %s: worker process %s replaced", task.id,
                        "cancelled" if task.cancel_requested else "timed out", handle.process.pid)
            self._replace(handle, context)

    def _kill(self, handle):
        handle.process.kill()
        handle.process.join(5)
        handle.control.close()

    def _replace(self, handle, context):
        """After ``_kill``: requeue what the worker still held and start its successor."""
        self._handles[handle.index] = None
        self._recover(handle.node_id, _error_record(
            TaskInterruptedError("the worker was stopped while running this task")), count_attempt=False)
        self.storage.set_node_status(handle.node_id, NodeStatus.STOPPED)
        self._handles[handle.index] = self._spawn(context, handle.index)

    def _recover(self, node_id, error, **options):
        """Release the running tasks of one of our workers, retrying with this Lilota's backoff."""
        return self.storage.recover_tasks(node_id, error, retry_delay=self.retry_delay,
                                          retry_max_delay=self.retry_max_delay, **options)

    def _housekeeping(self, context=None):
        """Renew the leases of this node and its workers and recover the tasks of lost nodes. A
        worker declared dead by another process while alive (the application was paused past its
        lease) has had its task recovered: it is replaced, so that it does not go on with it."""
        live = [h for h in self._handles if h is not None]
        try:
            lost = self.storage.heartbeat([self.node_id] + [h.node_id for h in live], self.node_timeout)
            if self.node_id in lost:
                self.storage.set_node_status(self.node_id, NodeStatus.RUNNING)
                self.storage.heartbeat([self.node_id], self.node_timeout)
            for handle in live:
                if handle.node_id in lost and context is not None:
                    logger.error("worker %s was declared dead by another process while alive; replacing it",
                                 handle.process.pid)
                    self._kill(handle)
                    self._replace(handle, context)
            own = {self.node_id} | {h.node_id for h in self._handles if h is not None}
            _recover_lost_nodes(self.storage, self.retry_delay, self.retry_max_delay, exclude=own)
        except StorageError:
            logger.warning("lilota heartbeat failed; will retry", exc_info=True)

    def _shutdown(self):
        """Stop every worker: ask, wait up to the stop timeout (renewing their leases meanwhile, so
        that nobody takes their tasks), then kill and requeue."""
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
        while live and time.monotonic() < deadline:
            multiprocessing.connection.wait([h.process.sentinel for h in live],
                                            min(deadline, next_beat) - time.monotonic())
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
                self._recover(h.node_id, _error_record(TaskInterruptedError(
                    "lilota stopped while this task was running; it was queued again")), count_attempt=False)
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
# 6. Command line
# ==================================================================================================

def main(argv=None):
    """``python -m lilota``: run worker processes for a script in the foreground."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lilota", description="lilota: durable background tasks.")
    parser.add_argument("--version", action="version", version=f"lilota {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("worker", help="run worker processes for a worker script until Ctrl-C",
                              description="Example: python -m lilota worker myscript.py -n 4 --db sqlite:///lilota.db")
    run.add_argument("script", help="the worker script (it creates a LilotaWorker and calls worker.start())")
    run.add_argument("-n", "--workers", type=int, default=None, help="number of worker processes (default: CPUs)")
    run.add_argument("--db", default=None, help="database URL (default: $LILOTA_DB_URL, then sqlite:///lilota.db)")
    args = parser.parse_args(argv)
    try:
        lilota = Lilota.workers(args.script, args.workers, args.db)
        lilota.start()
    except LilotaError as exc:
        print(f"lilota: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set() and not lilota.has_failed():
            stop.wait(0.2)
    except KeyboardInterrupt:
        pass
    lilota.stop()
    if lilota.has_failed():
        print(f"lilota: {lilota.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as ``python -m lilota``: hand over to the module imported under its own name, so that worker
    # processes (which unpickle ``lilota._worker_process_main``) and worker scripts share one lilota.
    import lilota as _lilota
    sys.exit(_lilota.main())
