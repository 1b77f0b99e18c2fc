"""4. Database access inside the task function.

The task stores a report row in the application's own SQLite database; the application reads it
back once the task has completed.

Run it from the repository root:  python examples/4-using-db-inside-task.py
"""
import os
import sqlite3
import sys
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # only needed when running from a checkout, not with lilota installed

from lilota.core import Lilota  # noqa: E402

DB_PATH = os.path.join(HERE, "4-using-db-inside-task.db")           # lilota's tasks
APP_DB_PATH = os.path.join(HERE, "4-using-db-inside-task-app.db")   # the application's data


@dataclass
class ReportInput:
    title: str
    day: date
    amounts: List[Decimal]


def main():
    # Start from empty databases on every run.
    for path in (DB_PATH, APP_DB_PATH):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)

    with Lilota(db_url="sqlite:///" + DB_PATH,
                script_path=os.path.join(HERE, "workers", "report.py"),
                number_of_workers=2) as lilota:
        task_id = lilota.schedule("generate_report", ReportInput(
            title="Sales May", day=date(2024, 5, 31), amounts=[Decimal("19.99"), Decimal("5.01"), Decimal("75.00")]))
        task = lilota.wait(task_id, timeout=60)
        if task.status != "completed":
            raise SystemExit(f"the task {task.status}: {task.error['message'] if task.error else ''}")
        print(task.output)   # the Decimal total comes back as the string "100.00"

    # The row the task wrote, read by the application
    connection = sqlite3.connect(APP_DB_PATH)
    try:
        row = connection.execute("SELECT id, title, day, total FROM report WHERE id = ?",
                                 (task.output["report_id"],)).fetchone()
    finally:
        connection.close()
    print(f"report row: {row}")


if __name__ == "__main__":   # required: worker processes are started with multiprocessing "spawn"
    main()
