"""What schema 6's index of ended tasks (lilota_task_ended) costs the claim path, A/B in one process.

    python bench/ended_index_ab.py

Two databases made by this lilota, the index dropped from one; one worker's claim + completion
path (LilotaWorker.run_pending(), the statements a worker process runs) drains 3,000 no-op tasks
from each in turn, 16 rounds, alternating which goes first. Same process, same moment: the load of
a shared machine falls on both alike. Prints the median rate of each and the median of the
per-round ratio with the spread.
"""
import sys, time, tempfile, sqlite3, statistics, logging
import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lilota
d = tempfile.mkdtemp()
setups = {}
for key in ("with_index", "without_index"):
    url = f"sqlite:///{d}/{key}.db"
    s = lilota.LilotaScheduler(url); s.storage.ensure_ready()
    if key == "without_index":
        c = sqlite3.connect(f"{d}/{key}.db"); c.execute("DROP INDEX lilota_task_ended"); c.commit(); c.close()
    w = lilota.LilotaWorker(url)
    w.register("noop")(lambda data: None)
    setups[key] = (s, w)
rates = {k: [] for k in setups}
for r in range(16):
    order = list(setups) if r % 2 == 0 else list(reversed(list(setups)))
    for key in order:
        s, w = setups[key]
        s.schedule_many("noop", [{"i": i} for i in range(3000)])
        t = time.perf_counter(); n = len(w.run_pending()); rates[key].append(n / (time.perf_counter() - t))
for k, v in rates.items(): print(k, "median", round(statistics.median(v)), "runs", len(v))
pairs = [a / b for a, b in zip(rates["with_index"], rates["without_index"])]
print("with/without per round: median", round(statistics.median(pairs), 3), sorted(round(p, 3) for p in pairs))
