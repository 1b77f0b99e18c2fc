"""Screenshots of the dashboard on a seeded database, for the README.

    python bench/screenshots.py              # writes docs/screenshots/*.png (light and dark)
    python bench/screenshots.py --keep DIR   # also keep the seeded database and worker script in DIR

Needs Playwright for Python and a Chromium (Debian's ``chromium`` package; no browser download):
``apt-get install chromium`` and ``pip install playwright``.

The database is made the way an application makes one: tasks scheduled, run by a real worker
(some fail, one expires), two long tasks running in worker processes with their progress moving.
Only the times of the finished tasks are moved back, spread over the last hour, so that the
overview's chart of the last hour has something to show after a run of a few seconds.
"""

import argparse
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import lilota  # noqa: E402

OUT = os.path.join(ROOT, "docs", "screenshots")

WORKER_SCRIPT = textwrap.dedent('''
    import time, random
    from datetime import timedelta
    from lilota import LilotaWorker, TaskContext, TaskProgress

    worker = LilotaWorker(DB_URL, set_progress_manually=True, queues=["default", "emails", "reports"])

    @worker.task(name="send_email")
    def send_email(data):
        return {"sent_to": data["to"], "message_id": "<%d@mail.example.com>" % random.randrange(10**9)}

    @worker.task(name="resize_image", timeout=600)
    def resize_image(data, ctx: TaskContext):
        size = ctx.step("probe", lambda path: {"width": data["width"], "height": data["width"] * 3 // 4,
                                               "format": "png", "bytes": 18_874_368}, data["path"])
        ctx.step("fetch", lambda path: {"cached": "/var/cache/img/" + path.rsplit("/", 1)[1]}, data["path"])
        ctx.logger.info("resizing %s: %dx%d to half", data["path"], size["width"], size["height"])
        for step in range(1, 301):
            time.sleep(data.get("seconds", 60) / 300)
            ctx.progress.set(step // 3)
            if step % 6 == 0:
                ctx.logger.info("tile %d of 300 written", step)
        return {"width": data["width"] // 2, "path": data["path"].replace(".png", "-small.png")}

    @worker.task(name="cleanup_uploads")
    def cleanup_uploads(data):
        return {"removed": 0}

    worker.periodic("cleanup_uploads", every=timedelta(minutes=15), input={"days": 30}, name="cleanup-uploads")
    worker.periodic("generate_report", cron="0 6 1 * *", timezone="Europe/Berlin", input={"account": 1, "month": "auto"},
                    queue="reports", name="monthly-report")

    @worker.task(name="generate_report", max_attempts=2)
    def generate_report(data):
        if data["account"] % 5 == 0:
            raise ValueError("account %d has no billing address" % data["account"])
        return {"pages": 3 + data["account"] % 7}

    @worker.task(name="sync_inventory")
    def sync_inventory(data):
        if data["store"] % 4 == 0:
            raise ConnectionError("warehouse API at inventory.internal:8443 refused the connection")
        if data["store"] % 7 == 0:
            raise KeyError("sku")
        return {"updated": data["store"] * 13 % 200}

    if __name__ == "__main__":
        worker.start()
''')


def seed(directory):
    """The database and a running Lilota (two worker processes busy with long tasks)."""
    url = f"sqlite:///{directory}/app.db"
    script = os.path.join(directory, "tasks.py")
    with open(script, "w") as f:
        f.write(f"DB_URL = {url!r}\n" + WORKER_SCRIPT)
    sys.path.insert(0, directory)
    import logging
    logging.getLogger("lilota").setLevel(logging.CRITICAL)   # the seeded failures are expected
    import tasks  # noqa: E402  the worker script, run in this process for the finished tasks
    scheduler = lilota.LilotaScheduler(url)
    rng = random.Random(7)
    scheduler.schedule_many("send_email", [{"to": f"user{i}@example.com", "template": "welcome"} for i in range(420)],
                            queue="emails")
    scheduler.schedule_many("generate_report", [{"account": i, "month": "2026-11"} for i in range(160)], queue="reports")
    scheduler.schedule_many("sync_inventory", [{"store": i} for i in range(120)])
    done = tasks.worker.run_pending()
    tasks.worker.run_periodic()   # records the periodic schedules, as a running worker does
    logging.getLogger("lilota").setLevel(logging.WARNING)
    # Spread the finished tasks over the last hour, busier lately.
    db = sqlite3.connect(f"{directory}/app.db")
    now = time.time()
    rows = db.execute("SELECT id, start_date_time FROM lilota_task WHERE end_date_time IS NOT NULL").fetchall()
    for task_id, old_start in rows:
        ended = now - 3600 * rng.random() ** 1.6
        started = ended - rng.uniform(0.05, 4)
        db.execute("UPDATE lilota_task SET start_date_time = ?, end_date_time = ?, created_at = ?, run_at = ? "
                   "WHERE id = ?", (started, ended, started - rng.uniform(0, 2), started - 1, task_id))
        # Its attempt record moves with it (get_task_attempts() tells the task row's attempt by its start).
        db.execute("UPDATE lilota_attempt SET started_at = ?, ended_at = ? WHERE task_id = ? AND started_at = ?",
                   (started, ended, task_id, old_start))
    db.commit()
    db.close()
    # Queued work, a paused queue with a limit, and the evidence of a cancel.
    scheduler.schedule_many("send_email", [{"to": f"later{i}@example.com"} for i in range(37)], queue="emails",
                            delay=3600)
    scheduler.set_queue_limit("reports", concurrency=2, rate=(10, 1))
    scheduler.pause_queue("reports")
    scheduler.schedule_many("generate_report", [{"account": 1000 + i, "month": "2026-12"} for i in range(12)],
                            queue="reports")
    cancelled = scheduler.schedule("send_email", {"to": "bounced@example.com"}, queue="emails")
    scheduler.cancel(cancelled)
    app = lilota.Lilota(url, script_path=script, number_of_workers=2, name="web-1")
    app.start()
    running = [app.schedule("resize_image", {"path": f"/uploads/photo-{i}.png", "width": 4096, "seconds": 240},
                            queue="default", priority=10) for i in range(2)]
    return url, app, running, len(done)


def shoot(url, running, out):
    import shutil as _shutil
    from playwright.sync_api import sync_playwright
    server = lilota.serve_dashboard(url, port=0)
    pages = [("overview", "/"), ("tasks", "/tasks"), ("task", f"/tasks/{running[0]}"), ("failed", None),
             ("nodes", "/nodes"), ("queues", "/queues"), ("periodic", "/periodic")]
    failed = lilota.LilotaScheduler(url).list_tasks(status="failed", name="sync_inventory", limit=1)[0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_shutil.which("chromium"), args=["--no-sandbox"])
            for scheme in ("light", "dark"):
                page = browser.new_page(viewport={"width": 1360, "height": 900}, color_scheme=scheme,
                                        device_scale_factor=1)
                for name, path in pages:
                    page.goto(server.url.rstrip("/") + (path or f"/tasks/{failed.id}"))
                    page.wait_for_selector("main h1")
                    page.wait_for_timeout(2500 if name == "task" else 600)   # a few log records more
                    target = os.path.join(out, f"{name}-{scheme}.png")
                    page.screenshot(path=target, full_page=name in ("overview", "task", "failed"))
                    print("wrote", os.path.relpath(target, ROOT))
                page.close()
            browser.close()
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", metavar="DIR", help="seed the database in DIR and keep it")
    parser.add_argument("--out", default=OUT, help="where the PNG files go (default: docs/screenshots)")
    args = parser.parse_args()
    directory = args.keep or tempfile.mkdtemp(prefix="lilota-screens-")
    os.makedirs(directory, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    url, app, running, ran = seed(directory)
    try:
        print(f"seeded {url}: {ran} tasks run; two running in worker processes")
        deadline = time.time() + 30
        scheduler = lilota.LilotaScheduler(url)
        while time.time() < deadline and scheduler.get_task_by_id(running[0]).progress_percentage < 12:
            time.sleep(0.2)
        shoot(url, running, args.out)
    finally:
        for task_id in running:
            app.cancel(task_id)
        app.stop(timeout=5)
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
