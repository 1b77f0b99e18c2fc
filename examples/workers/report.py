"""Worker script of examples/4-using-db-inside-task.py.

The task writes to the application's own SQLite database (not lilota's): each task opens its own
connection, as a task runs in a worker process and must not share connections with the application.
"""
import os
import sqlite3
import sys
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import List

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(EXAMPLES))  # only needed when running from a checkout, not with lilota installed

from lilota.worker import LilotaWorker  # noqa: E402

APP_DB_PATH = os.path.join(EXAMPLES, "4-using-db-inside-task-app.db")   # the application's data


@dataclass
class ReportInput:
    title: str
    day: date               # stored as "2024-05-01", revived as a date from this annotation
    amounts: List[Decimal]  # stored as strings ("19.99"), revived as Decimals


@dataclass
class ReportOutput:
    report_id: int
    total: Decimal
    reports_in_database: int


worker = LilotaWorker(db_url="sqlite:///" + os.path.join(EXAMPLES, "4-using-db-inside-task.db"))


@worker.register("generate_report", input_model=ReportInput, output_model=ReportOutput)
def generate_report(data: ReportInput) -> ReportOutput:
    total = sum(data.amounts, Decimal("0"))
    connection = sqlite3.connect(APP_DB_PATH)
    try:
        with connection:   # one transaction: committed on success, rolled back on error
            connection.execute("CREATE TABLE IF NOT EXISTS report ("
                               "id INTEGER PRIMARY KEY, title TEXT NOT NULL, day TEXT NOT NULL, total TEXT NOT NULL)")
            cursor = connection.execute("INSERT INTO report (title, day, total) VALUES (?, ?, ?)",
                                        (data.title, data.day.isoformat(), str(total)))
            report_id = cursor.lastrowid
            count = connection.execute("SELECT COUNT(*) FROM report").fetchone()[0]
    finally:
        connection.close()
    return ReportOutput(report_id=report_id, total=total, reports_in_database=count)


if __name__ == "__main__":
    worker.start()
