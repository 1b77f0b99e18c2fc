"""lilota inside a threaded application: a Lilota started from a non-main thread, and many threads
scheduling and waiting at once on the process's one shared connection."""

import threading
import unittest

from support import TempDirTestCase, child_pids, process_alive, wait_until, on_every_backend

import lilota


@on_every_backend
class ThreadedApplicationTest(TempDirTestCase):

    def test_many_threads_schedule_and_wait_while_workers_run(self):
        script = self.worker_script("""
            @worker.register("double")
            def double(data):
                return {"value": data["n"] * 2}
        """)
        app = lilota.Lilota(self.db_url, script_path=script, number_of_workers=2)
        # Started from a thread that ends right away: the workers must not die with it.
        starter = threading.Thread(target=app.start)
        starter.start()
        starter.join()
        self.addCleanup(self._stop_and_check, app)
        self.assertTrue(app.is_running)

        results, errors = {}, []

        def client(k):
            try:
                ids = [app.schedule("double", {"n": k * 100 + i}) for i in range(25)]
                for i, task_id in enumerate(ids):
                    task = app.wait(task_id, timeout=60)
                    results[(k, i)] = (task.status, task.output)
            except BaseException as exc:  # reported below: a thread's exception would be lost
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 200)
        for (k, i), (status, output) in results.items():
            self.assertEqual(status, "completed")
            self.assertEqual(output, {"value": (k * 100 + i) * 2})

    def test_stop_from_another_thread_leaves_no_worker(self):
        script = self.worker_script("""
            @worker.register("noop")
            def noop(data):
                return None
        """)
        app = lilota.Lilota(self.db_url, script_path=script, number_of_workers=2)
        app.start()
        self.addCleanup(app.stop, 1)
        wait_until(lambda: all(h is not None and h.ready for h in app._handles) and len(app._handles) == 2,
                   30, message="two ready workers")
        pids = [h.process.pid for h in app._handles]
        stopper = threading.Thread(target=app.stop)
        stopper.start()
        stopper.join(60)
        self.assertFalse(stopper.is_alive())
        for pid in pids:
            self.assertFalse(process_alive(pid), f"worker {pid} outlived stop()")
        self.assertEqual([p for p in child_pids() if p in pids], [])


if __name__ == "__main__":
    unittest.main()
