"""5. Set the task progress manually in a task function, and watch it from the application.

Run it from the repository root:  python examples/5-setting-task-progress-manually.py
"""
import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # only needed when running from a checkout, not with lilota installed

from lilota.core import Lilota  # noqa: E402
from lilota.models import TaskWaitTimeout  # noqa: E402

DB_PATH = os.path.join(HERE, "5-setting-task-progress-manually.db")   # as in workers/progress.py


@dataclass
class ProcessInput:
    files: int


def main():
    # Start from an empty database on every run.
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(DB_PATH + suffix):
            os.remove(DB_PATH + suffix)

    with Lilota(db_url="sqlite:///" + DB_PATH,
                script_path=os.path.join(HERE, "workers", "progress.py"),
                number_of_workers=1) as lilota:
        task_id = lilota.schedule("process_files", ProcessInput(files=5))

        # Show the progress while the task runs: wait() with a short timeout is the pause between looks.
        shown = None
        while True:
            task = lilota.get_task_by_id(task_id)
            if task.progress_percentage != shown:
                shown = task.progress_percentage
                print(f"progress: {shown}% ({task.status})")
            if task.is_finished:
                break
            try:
                lilota.wait(task_id, timeout=0.05)
            except TaskWaitTimeout:
                pass

        print(f"{task.status}: {task.output}, progress {task.progress_percentage}%")


if __name__ == "__main__":   # required: worker processes are started with multiprocessing "spawn"
    main()
