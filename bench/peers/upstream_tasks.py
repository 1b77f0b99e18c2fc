"""Worker script of upstream lilota (PyPI) for the benchmark; started by its Lilota as a subprocess.

Versions up to 1.0.0 register with ``@worker.register(name)``; later ones with ``@worker.task``.
"""
import os
import time

from lilota.worker import LilotaWorker

worker = LilotaWorker(db_url=os.environ["BENCH_DB_URL"])


def noop(data=None):
    return None


def cpu10(data=None):
    end = time.thread_time() + 0.010
    while time.thread_time() < end:
        pass
    return None


def stamp(data=None):
    return {"t": time.time()}


for _function in (noop, cpu10, stamp):
    if hasattr(worker, "register"):
        worker.register(_function.__name__)(_function)
    else:
        worker.task(name=_function.__name__)(_function)


if __name__ == "__main__":
    worker.start()
