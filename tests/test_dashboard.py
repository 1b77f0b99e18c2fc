"""The dashboard: its JSON API, its pages and its security rules (handler tests over real HTTP on
both backends), the command line, the schema version that adds its indexes; and, in a real
headless Chromium driven by Playwright, the pages themselves (skipped with a message when
Chromium or Playwright is missing; under CI=true they must run)."""

import http.client
import json
import os
import shutil
import signal
import subprocess
import unittest
import urllib.parse
import uuid
from datetime import timedelta
from unittest import mock

import support
from support import wait_until

import lilota
from lilota import LilotaScheduler, LilotaWorker, TaskStatus

EVIL = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>"]


class DashboardClient:
    """Requests to a running dashboard, answered as (status, headers, text); JSON decoded by json()."""

    def __init__(self, server):
        self.server = server
        self.host, self.port = "127.0.0.1", server.port
        self.csrf = server.csrf_token

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode("utf-8")
        finally:
            conn.close()

    def json(self, method, path, body=None, headers=None, csrf=True):
        headers = dict(headers or {})
        if method == "POST" and csrf:
            headers.setdefault("X-CSRF-Token", self.csrf)
            headers.setdefault("Content-Type", "application/json")
        status, response_headers, text = self.request(method, path, body, headers)
        return status, json.loads(text) if text else None


class DashboardTestCase(support.TempDirTestCase):

    def serve(self, **options):
        server = lilota.serve_dashboard(self.db_url, port=0, **options)
        self.addCleanup(server.stop)
        return server, DashboardClient(server)

    def fail_tasks(self, app, name, errors):
        """Tasks of ``name`` (in the queue "errors") that ran and failed, one per message in
        ``errors`` (ValueError)."""
        worker = LilotaWorker(self.db_url, queues=["errors"])
        ids = app.schedule_many(name, [{"message": message} for message in errors], queue="errors")

        @worker.register(name)
        def fail(data):
            raise ValueError(data["message"])
        with self.assertLogs("lilota", "WARNING"):   # each failure is logged; here they are expected
            worker.run_pending()
        return ids

    def run_with_details(self, app, log_lines=3):
        """A task "build" that a worker ran: two steps (ctx.step), ``log_lines`` log records (the
        last one holds markup), one attempt; and a task "publish" that depends on it and one
        still scheduled. Returns (build's id, publish's id, the scheduled one's id)."""
        worker = LilotaWorker(self.db_url)
        build = app.schedule("build", {"parts": 2})
        other = app.schedule("other", 1, delay=3600)
        publish = app.schedule("publish", 1, depends_on=[build, other])

        @worker.register("build")
        def run_build(data, ctx: lilota.TaskContext):
            total = 0
            for part in range(data["parts"]):
                total += ctx.step("part", lambda n: {"part": n, "rows": [n, n * 2]}, part)["part"]
            for line in range(log_lines - 1):
                ctx.logger.info("line %d", line)
            ctx.logger.warning("built %s", EVIL[0])
            return total
        worker.run_pending()
        return build, publish, other


@support.on_every_backend
class DashboardApiTests(DashboardTestCase):
    """Every endpoint, filter and bad parameter; actions and their answers."""

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.server, self.client = self.serve()

    def test_pages_are_one_shell_with_a_strict_policy(self):
        task = self.app.schedule("x", 1)
        for path in ("/", "/tasks", f"/tasks/{task}", "/nodes", "/queues", "/periodic"):
            status, headers, text = self.client.request("GET", path)
            self.assertEqual(status, 200, path)
            self.assertTrue(headers["Content-Type"].startswith("text/html"))
            self.assertIn("script-src 'self'", headers["Content-Security-Policy"])
            self.assertIn("default-src 'none'", headers["Content-Security-Policy"])
            self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
            self.assertEqual(headers["X-Frame-Options"], "DENY")
            # No inline script: the one script is a file of the dashboard's own.
            self.assertEqual(text.count("<script"), 1)
            self.assertIn('<script src="/static/dashboard.js" defer></script>', text)
            self.assertIn(self.server.csrf_token, text)
        for asset, kind in (("/static/dashboard.js", "text/javascript"), ("/static/dashboard.css", "text/css")):
            status, headers, text = self.client.request("GET", asset)
            self.assertEqual((status, headers["Content-Type"].split(";")[0]), (200, kind))
        self.assertEqual(self.client.request("HEAD", "/")[0], 200)
        self.assertEqual(self.client.json("GET", "/static/nope.js")[0], 404)
        self.assertEqual(self.client.json("GET", "/elsewhere")[0], 404)

    def test_stats(self):
        self.app.schedule_many("send", [1, 2, 3], queue="mail")
        self.app.schedule("send", 4)
        self.fail_tasks(self.app, "report", ["no address", "no address", "disk full"])
        status, data = self.client.json("GET", "/api/stats")
        self.assertEqual(status, 200)
        stats = data["stats"]
        self.assertEqual(stats["total"], 7)
        self.assertEqual(stats["by_status"]["scheduled"], 4)
        self.assertEqual(stats["by_status"]["failed"], 3)
        self.assertEqual(stats["by_queue"]["mail"], {"scheduled": 3})
        self.assertEqual(stats["by_name"]["report"], {"failed": 3})
        self.assertEqual(stats["last_minute"]["failed"], 3)
        self.assertEqual({q["name"] for q in data["queues"]}, {"default", "mail", "errors"})
        minutes = data["activity"]["minutes"]
        self.assertEqual(len(minutes), 60)
        self.assertEqual(minutes[-1], {"started": 3, "finished": 3, "failed": 3})
        self.assertEqual(sum(m["finished"] for m in minutes[:-1]), 0)
        self.assertEqual([(e["type"], e["message"], e["count"]) for e in data["errors"]],
                         [("ValueError", "no address", 2), ("ValueError", "disk full", 1)])
        self.assertIsNotNone(self.app.get_task_by_id(data["errors"][0]["task_id"]))

    def test_list_filters_and_pages(self):
        mail = self.app.schedule_many("send", list(range(5)), queue="mail")
        plain = self.app.schedule_many("other", list(range(3)))
        failed = self.fail_tasks(self.app, "report", ["warehouse unreachable", "Disk 100% full_now"])

        def ids(query):
            status, data = self.client.json("GET", "/api/tasks?" + urllib.parse.urlencode(query))
            self.assertEqual(status, 200, data)
            return [t["id"] for t in data["tasks"]]
        newest_first = [str(i) for i in reversed(mail + plain + failed)]
        self.assertEqual(ids({}), newest_first)
        self.assertEqual(ids({"status": "failed"}), [str(i) for i in reversed(failed)])
        self.assertEqual(ids({"name": "other"}), [str(i) for i in reversed(plain)])
        self.assertEqual(ids({"queue": "mail", "status": "scheduled"}), [str(i) for i in reversed(mail)])
        self.assertEqual(ids({"q": "WAREHOUSE"}), [str(failed[0])])
        self.assertEqual(ids({"q": "100% full_"}), [str(failed[1])])   # LIKE's wildcards are text here
        self.assertEqual(ids({"q": "100%_full"}), [])
        self.assertEqual(ids({"q": str(plain[1])}), [str(plain[1])])
        self.assertEqual(ids({"q": str(plain[1])[:8], "name": "nothing"}), [])
        # Keyset pages: each starts after the last id of the one before, none repeats or is skipped.
        seen, before = [], None
        while True:
            query = {"limit": 3, **({"before": before} if before else {})}
            status, data = self.client.json("GET", "/api/tasks?" + urllib.parse.urlencode(query))
            seen += [t["id"] for t in data["tasks"]]
            before = data["next"]
            if before is None:
                break
            self.assertEqual(before, seen[-1])
        self.assertEqual(seen, newest_first)
        status, data = self.client.json("GET", "/api/tasks?status=failed")
        entry = data["tasks"][0]
        self.assertNotIn("input", entry)
        self.assertEqual(entry["error"], {"type": "ValueError", "message": "Disk 100% full_now"})

    def test_bad_parameters_are_400_with_a_message(self):
        cases = {
            "/api/tasks?status=bogus": "unknown status",
            "/api/tasks?colour=red": "unknown parameter 'colour'",
            "/api/tasks?limit=0": "limit must be",
            "/api/tasks?limit=abc": "limit must be",
            "/api/tasks?limit=100000": "limit must be",
            "/api/tasks?before=nope": "before must be a task id",
            "/api/tasks?status=failed&status=completed": "given 2 times",
            "/api/tasks?name=" + "x" * 201: "longer than 200",
            "/api/tasks?queue=" + urllib.parse.quote("bad queue!"): "queue",
            "/api/tasks/not-a-task-id": "a task id is a UUID",
            "/api/stats?x=1": "takes no parameters",
            "/api/tasks?" + "&".join(f"p{i}=1" for i in range(30)): "too many",
            "/api/tasks?q=" + "x" * 3000: "longer than 2048",
        }
        for path, message in cases.items():
            status, data = self.client.json("GET", path)
            self.assertEqual(status, 400, path)
            self.assertIn(message, data["error"], path)
            self.assertNotIn("Traceback", data["error"])
        status, data = self.client.json("GET", f"/api/tasks/{uuid.uuid4()}")
        self.assertEqual(status, 404)
        self.assertIn("no task with id", data["error"])
        self.assertEqual(self.client.json("GET", "/api/nothing")[0], 404)

    def test_one_task(self):
        task_id = self.fail_tasks(self.app, "report", EVIL)[0]
        status, data = self.client.json("GET", f"/api/tasks/{task_id}")
        self.assertEqual(status, 200)
        task = data["task"]
        self.assertEqual((task["id"], task["status"], task["input"]), (str(task_id), "failed", {"message": EVIL[0]}))
        self.assertEqual(task["error"]["message"], EVIL[0])
        self.assertIn("Traceback", task["error"]["traceback"])
        self.assertEqual(set(task), {f.name for f in lilota.dataclasses.fields(lilota.Task)})
        self.assertEqual([r["code"] for r in data["explain"]], ["finished"])   # explain(), a task page's read
        queued = self.app.schedule("later", 1, delay=3600)
        reasons = self.client.json("GET", f"/api/tasks/{queued}")[1]["explain"]
        self.assertIn("due_later", [r["code"] for r in reasons])
        # The task page's extra reads: one place, each a key of the answer.
        with mock.patch.dict(lilota._DASHBOARD_TASK_READS, {"extra": lambda scheduler, t: [t.name]}):
            self.assertEqual(self.client.json("GET", f"/api/tasks/{task_id}")[1]["extra"], ["report"])

    def test_a_tasks_steps_logs_attempts_and_dependencies(self):
        build, publish, other = self.run_with_details(self.app, log_lines=lilota._DASHBOARD_LOG_TAIL + 20)
        data = self.client.json("GET", f"/api/tasks/{build}")[1]
        self.assertEqual(data["task"]["status"], "completed")
        self.assertEqual([(a["number"], a["outcome"]) for a in data["attempts"]], [(1, "completed")])
        self.assertIsNotNone(data["attempts"][0]["started_at"])
        self.assertEqual([(s["name"], s["attempt"], s["output"]) for s in data["steps"]],
                         [("part", 1, {"part": 0, "rows": [0, 0]}), ("part#2", 1, {"part": 1, "rows": [1, 2]})])
        # The latest records only; the rest through /logs?after=.
        logs = data["logs"]
        self.assertEqual(len(logs), lilota._DASHBOARD_LOG_TAIL)
        self.assertEqual(logs[-1]["message"], "built " + EVIL[0])
        self.assertEqual(logs[-1]["level"], "WARNING")
        self.assertEqual(data["dependencies"], [])
        status, page = self.client.json("GET", f"/api/tasks/{build}/logs")
        self.assertEqual(status, 200)
        self.assertEqual(len(page["logs"]), lilota._DASHBOARD_LOG_TAIL + 20)
        self.assertFalse(page["more"])
        self.assertEqual([r["seq"] for r in page["logs"]], sorted(r["seq"] for r in page["logs"]))
        after = page["logs"][-3]["seq"]
        tail = self.client.json("GET", f"/api/tasks/{build}/logs?after={after}")[1]["logs"]
        self.assertEqual([r["seq"] for r in tail], [r["seq"] for r in page["logs"][-2:]])
        with mock.patch.object(lilota, "_DASHBOARD_LOG_PAGE", 7):
            first = self.client.json("GET", f"/api/tasks/{build}/logs?after=0")[1]
        self.assertEqual((len(first["logs"]), first["more"]), (7, True))
        # A dependent task: its dependencies, each with its status and whether it is still open.
        data = self.client.json("GET", f"/api/tasks/{publish}")[1]
        self.assertEqual(data["dependencies"], [{"id": str(build), "status": "completed", "open": False},
                                                {"id": str(other), "status": "scheduled", "open": True}])
        self.assertEqual((data["attempts"], data["steps"], data["logs"]), ([], [], []))
        for path, code, message in ((f"/api/tasks/{build}/logs?after=x", 400, "after must be"),
                                    (f"/api/tasks/{build}/logs?after=-1", 400, "after must be"),
                                    (f"/api/tasks/{build}/logs?level=x", 400, "unknown parameter"),
                                    (f"/api/tasks/{build}/logs?after=1&after=2", 400, "given 2 times"),
                                    ("/api/tasks/nope/logs", 400, "a task id is a UUID"),
                                    (f"/api/tasks/{uuid.uuid4()}/logs", 404, "no task with id")):
            status, answer = self.client.json("GET", path)
            self.assertEqual(status, code, path)
            self.assertIn(message, answer["error"], path)

    def test_periodic(self):
        self.assertEqual(self.client.json("GET", "/api/periodic")[1]["periodic"], [])
        worker = LilotaWorker(self.db_url, queues=["maintenance"])

        @worker.register("cleanup")
        def cleanup(data):
            return None
        worker.periodic("cleanup", every=timedelta(minutes=5), input={"days": 30}, queue="maintenance")
        worker.run_periodic()
        status, data = self.client.json("GET", "/api/periodic")
        self.assertEqual(status, 200)
        self.assertEqual([(p["name"], p["task"], p["schedule"], p["queue"]) for p in data["periodic"]],
                         [("cleanup", "cleanup", "every 300s", "maintenance")])
        self.assertEqual(set(data["periodic"][0]), {f.name for f in lilota.dataclasses.fields(lilota.PeriodicSchedule)})
        self.assertIsNotNone(data["periodic"][0]["next_run_at"])
        self.assertEqual(self.client.json("GET", "/api/periodic?x=1")[0], 400)
        self.assertEqual(self.client.request("GET", "/periodic")[0], 200)

    def test_nodes(self):
        self.app.start()
        self.addCleanup(self.app.stop)
        worker = LilotaWorker(self.db_url)
        worker.storage.add_node("00000000-0000-4000-8000-000000000001", "w1", lilota.NodeType.WORKER,
                                lilota.NodeStatus.RUNNING, 4321, 30)
        running = self.app.schedule("slow", {"n": 1})
        self.db_execute("UPDATE lilota_task SET status = 'running', locked_by = ?, progress_percentage = 40, "
                        "start_date_time = run_at WHERE id = ?", "00000000-0000-4000-8000-000000000001", str(running))
        status, data = self.client.json("GET", "/api/nodes")
        self.assertEqual(status, 200)
        by_name = {n["name"]: n for n in data["nodes"]}
        self.assertTrue(by_name["w1"]["alive"])
        self.assertEqual(by_name["w1"]["tasks"], [{"id": str(running), "name": "slow", "progress_percentage": 40}])
        self.assertEqual(by_name["w1"]["pid"], 4321)
        self.assertGreaterEqual(by_name["w1"]["heartbeat_age"], 0)
        self.assertIn(str(self.app.node_id), {n["id"] for n in data["nodes"]})

    def test_task_actions(self):
        queued = self.app.schedule("x", 1)
        failed = self.fail_tasks(self.app, "report", ["boom"])[0]
        status, data = self.client.json("POST", f"/api/tasks/{queued}/cancel")
        self.assertEqual((status, data["ok"]), (200, True))
        self.assertIn("cancelled", data["message"])
        self.assertEqual(self.app.get_task_by_id(queued).status, TaskStatus.CANCELLED)
        status, data = self.client.json("POST", f"/api/tasks/{queued}/cancel")
        self.assertEqual((status, data["ok"]), (200, False))
        self.assertIn("nothing to cancel", data["message"])
        status, data = self.client.json("POST", f"/api/tasks/{failed}/retry")
        self.assertEqual((status, data["ok"]), (200, True))
        self.assertEqual(self.app.get_task_by_id(failed).status, TaskStatus.SCHEDULED)
        status, data = self.client.json("POST", f"/api/tasks/{failed}/retry")
        self.assertEqual((status, data["ok"]), (200, False))
        self.assertIn("only failed, expired or cancelled", data["message"])
        self.assertEqual(self.client.json("POST", f"/api/tasks/{uuid.uuid4()}/cancel")[0], 404)
        self.assertEqual(self.client.json("POST", f"/api/tasks/{queued}/delete")[0], 404)

    def test_queue_actions(self):
        status, data = self.client.json("POST", "/api/queues/mail/pause")
        self.assertEqual((status, data["ok"]), (200, True))
        self.assertTrue({q.name: q for q in self.app.get_queues()}["mail"].paused)
        self.assertEqual(self.client.json("POST", "/api/queues/mail/resume")[1]["ok"], True)
        self.assertFalse({q.name: q for q in self.app.get_queues()}["mail"].paused)
        status, data = self.client.json("POST", "/api/queues/mail/limit",
                                        {"concurrency": 2, "rate": {"tasks": 10, "per_seconds": 1}})
        self.assertEqual(status, 200, data)
        queue = {q.name: q for q in self.app.get_queues()}["mail"]
        self.assertEqual((queue.concurrency, queue.rate), (2, (10, timedelta(seconds=1))))
        self.assertEqual(self.client.json("POST", "/api/queues/mail/limit", {"concurrency": None, "rate": None})[0], 200)
        self.assertIsNone({q.name: q for q in self.app.get_queues()}["mail"].concurrency)
        for body, message in (({"concurrency": 0}, "concurrency must be"), ({"speed": 1}, "a limit takes"),
                              ({"rate": "fast"}, "rate must be"), ("[1]", "JSON object"), ("{", "must be JSON")):
            status, data = self.client.json("POST", "/api/queues/mail/limit", body)
            self.assertEqual(status, 400, body)
            self.assertIn(message, data["error"])
        self.assertEqual(self.client.json("POST", "/api/queues/" + urllib.parse.quote("bad name!") + "/pause")[0], 400)

    def test_csrf(self):
        queued = self.app.schedule("x", 1)
        cases = [
            {},                                                             # a cross-site form: no header
            {"X-CSRF-Token": "0" * 64},                                     # a guess
            {"X-CSRF-Token": self.server.csrf_token, "Origin": "https://evil.example"},
        ]
        for headers in cases:
            status, data = self.client.json("POST", f"/api/tasks/{queued}/cancel", headers=headers, csrf=False)
            self.assertEqual(status, 403, headers)
            self.assertIn("CSRF", data["error"])
        status, _, _ = self.client.request("POST", f"/api/tasks/{queued}/cancel", body="a=1",
                                           headers={"Content-Type": "application/x-www-form-urlencoded",
                                                    "Origin": "https://evil.example"})
        self.assertEqual(status, 403)
        self.assertEqual(self.app.get_task_by_id(queued).status, TaskStatus.SCHEDULED)
        same_origin = {"Origin": f"http://127.0.0.1:{self.server.port}"}
        self.assertEqual(self.client.json("POST", f"/api/tasks/{queued}/cancel", headers=same_origin)[0], 200)

    def test_bounds_and_host(self):
        status, data = self.client.json("POST", "/api/queues/mail/limit", "x" * 5000)
        self.assertEqual(status, 413)
        status, data = self.client.json("GET", "/api/stats", headers={"Host": "evil.example:80"})
        self.assertEqual(status, 400)
        self.assertIn("Host", data["error"])
        self.assertEqual(self.client.json("GET", "/api/stats", headers={"Host": f"localhost:{self.server.port}"})[0], 200)

    def test_database_trouble_is_503_and_bugs_are_500_without_traceback(self):
        with mock.patch.object(lilota.Storage, "list_tasks",
                               side_effect=lilota.DatabaseUnavailableError("server closed the connection")):
            status, data = self.client.json("GET", "/api/tasks")
        self.assertEqual(status, 503)
        self.assertIn("the database cannot be reached: server closed the connection", data["error"])
        with mock.patch.object(lilota.Storage, "activity", side_effect=RuntimeError("secret detail")), \
                self.assertLogs("lilota", "ERROR"):
            status, data = self.client.json("GET", "/api/stats")
        self.assertEqual(status, 500)
        self.assertNotIn("secret", json.dumps(data))


class DashboardAccessTests(DashboardTestCase):
    """Token, cookie, read-only, binding: the rules of who may see and change what."""

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.task = self.app.schedule("secret_task_name", {"card": "4111"})

    def test_token(self):
        server, client = self.serve(token="correct-horse")
        for headers in ({}, {"Authorization": "Bearer wrong-horse-"}, {"Cookie": "lilota_dashboard=forged"},
                        {"Authorization": "Basic Y29ycmVjdC1ob3JzZQ=="}):
            for path in ("/api/stats", "/api/tasks", f"/api/tasks/{self.task}", "/api/nodes", "/", "/tasks"):
                status, response_headers, text = client.request("GET", path, headers=headers)
                self.assertEqual(status, 401, (path, headers))
                self.assertNotIn("secret_task_name", text)
                self.assertNotIn(server.csrf_token, text)
            status, _, _ = client.request("POST", f"/api/tasks/{self.task}/cancel",
                                          headers=dict(headers, **{"X-CSRF-Token": server.csrf_token}))
            self.assertEqual(status, 401)
        self.assertEqual(self.app.get_task_by_id(self.task).status, TaskStatus.SCHEDULED)
        status, _, text = client.request("GET", "/")
        self.assertIn('<form method="post" action="/login"', text)
        self.assertEqual(client.request("GET", "/static/dashboard.css")[0], 200)   # no data in it
        bearer = {"Authorization": "Bearer correct-horse"}
        status, _, text = client.request("GET", "/api/tasks", headers=bearer)
        self.assertEqual(status, 200)
        self.assertIn("secret_task_name", text)
        # The login form: a wrong token is 401, the right one sets an HttpOnly, SameSite=Strict cookie.
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, headers, text = client.request("POST", "/login", body="token=wrong-horse", headers=form)
        self.assertEqual(status, 401)
        self.assertIn("Wrong token", text)
        self.assertNotIn("Set-Cookie", headers)
        status, headers, _ = client.request("POST", "/login", body="token=correct-horse", headers=form)
        self.assertEqual((status, headers["Location"]), (303, "/"))
        cookie = headers["Set-Cookie"]
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=Strict", cookie)
        self.assertNotIn("correct-horse", cookie)
        session = {"Cookie": cookie.split(";")[0]}
        status, _, text = client.request("GET", "/api/tasks", headers=session)
        self.assertEqual(status, 200)
        self.assertIn("secret_task_name", text)
        status, _, text = client.request("GET", "/", headers=session)
        self.assertIn(server.csrf_token, text)
        status, data = client.json("POST", f"/api/tasks/{self.task}/cancel", headers=session)
        self.assertEqual((status, data["ok"]), (200, True))

    def test_read_only(self):
        server, client = self.serve(read_only=True)
        status, _, text = client.request("GET", "/")
        self.assertIn('<meta name="read-only" content="1">', text)
        for path in (f"/api/tasks/{self.task}/cancel", "/api/queues/default/pause", "/api/queues/x/limit"):
            status, data = client.json("POST", path, {"concurrency": 1})
            self.assertEqual(status, 403, path)
            self.assertIn("read-only", data["error"])
        self.assertEqual(self.app.get_task_by_id(self.task).status, TaskStatus.SCHEDULED)
        self.assertFalse({q.name: q for q in self.app.get_queues()}["default"].paused)

    def test_the_database_name_in_the_page_is_escaped(self):
        url = "sqlite:///" + self.path(EVIL[1] + ".db")
        LilotaScheduler(url).schedule("x", 1)
        with lilota.serve_dashboard(url, port=0) as server:
            status, _, text = DashboardClient(server).request("GET", "/")
        self.assertEqual(status, 200)
        self.assertNotIn("<img", text)
        self.assertIn("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;.db", text)

    def test_binding(self):
        with self.assertRaises(lilota.ConfigurationError) as caught:
            lilota.serve_dashboard(self.db_url, host="0.0.0.0", port=0)
        self.assertIn("without a token", str(caught.exception))
        with self.assertRaises(lilota.ConfigurationError) as caught:
            lilota.serve_dashboard(self.db_url, port=0, token="short")
        self.assertIn("at least 8 characters", str(caught.exception))
        with lilota.serve_dashboard(self.db_url, host="0.0.0.0", port=0, token="long-enough-token") as server:
            client = DashboardClient(server)
            self.assertEqual(client.request("GET", "/api/stats", headers={"Authorization": "Bearer long-enough-token",
                                                                          "Host": "anything.example"})[0], 200)
        with lilota.serve_dashboard(self.db_url, port=0) as server:
            self.assertTrue(server.url.startswith("http://127.0.0.1:"))


class DashboardCommandLineTests(support.TempDirTestCase):

    def test_refuses_an_open_address_without_a_token(self):
        LilotaScheduler(self.db_url).schedule("x", 1)
        result = self.run_python("-m", "lilota", "dashboard", "--db", self.db_url, "--host", "0.0.0.0")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("without a token", result.stderr)
        result = self.run_python("-m", "lilota", "dashboard", "--db", "sqlite:///" + self.path("typo.db"))
        self.assertEqual(result.returncode, 4)
        self.assertIn("no lilota database", result.stderr)

    def test_serves_until_interrupted(self):
        LilotaScheduler(self.db_url).schedule("x", 1)
        proc = self.popen_python("-m", "lilota", "dashboard", "--db", self.db_url, "--port", "0",
                                 stdout=subprocess.PIPE, text=True)
        self.addCleanup(proc.stdout.close)
        line = proc.stdout.readline()
        self.assertIn("open http://127.0.0.1:", line)
        url = urllib.parse.urlsplit(line.split("open ", 1)[1].split()[0])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.request("GET", "/api/stats")
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.read())["stats"]["total"], 1)
        conn.close()
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(20), 0)


@support.on_every_backend
class DashboardSchemaTests(support.TempDirTestCase):
    """Version 6 adds the dashboard's indexes to a database of an earlier version."""

    def test_an_older_database_gets_the_indexes(self):
        if self.backend == "sqlite":
            support.load_schema_1_dump(self.db_path)
            indexes = "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'lilota_task_%'"
        else:
            with support.old_schema(self.db_url, 2):   # a database of version 2, as that release made it
                pass
            indexes = f"SELECT indexname FROM pg_indexes WHERE schemaname = '{self.schema}'"
        before = {row[0] for row in self.db_execute(indexes)}
        self.assertNotIn("lilota_task_ended", before)
        app = LilotaScheduler(self.db_url)
        self.assertEqual(len(app.list_tasks()), 5 if self.backend == "sqlite" else 0)
        after = {row[0] for row in self.db_execute(indexes)}
        self.assertIn("lilota_task_ended", after)
        self.assertEqual(self.db_execute("SELECT value FROM lilota_meta WHERE key = 'schema_version'"),
                         [(str(lilota.SCHEMA_VERSION),)])


# --- in a real browser ------------------------------------------------------------------------------

def _browser_problem():
    """None when headless Chromium can be driven by Playwright here, else why not."""
    if shutil.which("chromium") is None:
        return "the browser tests need Chromium: apt-get install chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the browser tests need Playwright for Python: pip install playwright"
    return None


class DashboardBrowserTests(DashboardTestCase):
    """The pages in headless Chromium (one browser for the class, a new page per test): what a
    person sees and clicks."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if os.environ.get("LILOTA_TEST_BROWSER", "").strip().lower() == "skip":
            # (CI runs them on the oldest and the newest Python: the pages are the same on every one)
            raise unittest.SkipTest("browser tests deselected by LILOTA_TEST_BROWSER=skip")
        problem = _browser_problem()
        if problem is not None:
            if support.IN_CI:
                raise AssertionError(problem + " (CI=true: the browser tests must run; .ci/run installs both)")
            raise unittest.SkipTest(problem)
        from playwright.sync_api import sync_playwright
        cls.playwright = sync_playwright().start()
        cls.browser = cls.playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])

    @classmethod
    def tearDownClass(cls):
        cls.browser.close()
        cls.playwright.stop()
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.dialogs = []
        self.errors = []

    def open(self, server, path, context=None):
        page = (context or self.browser).new_page()
        self.addCleanup(page.close)
        page.set_default_timeout(20000)
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.goto(server.url.rstrip("/") + path)
        return page

    def tearDown(self):
        self.assertEqual(self.errors, [], "script errors on the page")
        super().tearDown()

    def test_overview_counts_and_the_list_filters(self):
        self.app.schedule_many("send", [1, 2, 3])
        self.fail_tasks(self.app, "report", ["no address", "no address"])
        server, _ = self.serve()
        page = self.open(server, "/")
        page.wait_for_selector("#counts [data-status=scheduled] .n")
        self.assertEqual(page.inner_text("#counts [data-status=scheduled] .n"), "3")
        self.assertEqual(page.inner_text("#counts [data-status=failed] .n"), "2")
        self.assertIn("no address", page.inner_text("main"))
        self.assertEqual(page.locator("svg.chart rect.bad").count(), 1)
        # The list, filtered through its form.
        page.click("nav >> text=Tasks")
        page.wait_for_selector("#task-list tbody tr")
        self.assertEqual(page.locator("#task-list tbody tr").count(), 5)
        page.select_option("select[name=status]", "failed")
        page.click("button:has-text('Filter')")
        page.wait_for_url("**/tasks?status=failed*")
        wait_until(lambda: page.locator("#task-list tbody tr").count() == 2, 20, message="two failed tasks listed")
        self.assertNotIn("Scheduled", page.inner_text("#task-list"))
        page.fill("input[name=q]", "nothing like this")
        page.click("button:has-text('Filter')")
        page.wait_for_selector("text=No tasks match these filters.")

    def test_a_long_error_message_leaves_the_error_cards_columns_in_view(self):
        # The message is cut short with an ellipsis (its whole text in the title), not the card:
        # on a laptop-wide window the card is half the page, and its last column was clipped.
        self.fail_tasks(self.app, "sync", ["warehouse API at inventory.internal.example.com did not answer " * 3])
        server, _ = self.serve()
        page = self.open(server, "/")
        page.set_viewport_size({"width": 1360, "height": 900})
        cell = page.locator("tr:has-text('ValueError') td.nowrap")
        cell.wait_for()
        card = page.locator(".card:has(h2:has-text('Most frequent errors'))")
        cell_box, card_box = cell.bounding_box(), card.bounding_box()
        self.assertLessEqual(cell_box["x"] + cell_box["width"], card_box["x"] + card_box["width"])
        self.assertEqual(card.evaluate("card => card.scrollWidth <= card.clientWidth"), True)
        self.assertIn("did not answer", page.locator("tr:has-text('ValueError') .clip").get_attribute("title"))

    def test_progress_moves_and_the_running_task_is_cancelled(self):
        script = self.worker_script("""
            @worker.register("crunch", task_progress=TaskProgress, timeout=None)
            def crunch(data, progress):
                for step in range(1, 101):
                    time.sleep(0.15)
                    progress.set(step)
        """)
        self.start_lilota(script, number_of_workers=1)
        task_id = self.app.schedule("crunch", {"rows": 100})
        server, _ = self.serve()
        page = self.open(server, f"/tasks/{task_id}")
        page.wait_for_selector("#progress-value")

        def percent():
            return int(page.inner_text("#progress-value").rstrip("%"))
        wait_until(lambda: percent() > 0, 30, message="progress above 0")
        first = percent()
        wait_until(lambda: percent() > first, 20, message="the progress bar moving")
        page.click("button:has-text('Cancel task')")
        page.click("button:has-text('Yes, cancel it')")
        page.wait_for_selector(".flash")
        self.assertIn("asked to stop", page.inner_text(".flash"))
        page.wait_for_selector("h1 .badge.s-cancelled", timeout=30000)
        self.assertEqual(self.app.get_task_by_id(task_id).status, TaskStatus.CANCELLED)

    def test_a_failed_task_is_retried(self):
        task_id = self.fail_tasks(self.app, "report", ["boom"])[0]
        server, _ = self.serve()
        page = self.open(server, f"/tasks/{task_id}")
        page.wait_for_selector("#error")
        self.assertIn("ValueError: boom", page.inner_text("#error"))
        self.assertIn("Traceback", page.inner_text("#error pre"))
        page.click("button:has-text('Retry')")
        page.click("button:has-text('Keep it')")   # the confirmation can be declined
        self.assertEqual(self.app.get_task_by_id(task_id).status, TaskStatus.FAILED)
        page.click("button:has-text('Retry')")
        page.click("button:has-text('Yes, retry')")
        page.wait_for_selector("h1 .badge.s-scheduled")
        self.assertIn("queued again", page.inner_text(".flash"))
        self.assertEqual(self.app.get_task_by_id(task_id).status, TaskStatus.SCHEDULED)

    def test_markup_from_the_database_is_shown_as_text(self):
        worker = LilotaWorker(self.db_url)
        task_id = self.app.schedule(EVIL[1], {"a": EVIL[0], "b": EVIL[1]})

        @worker.register(EVIL[1])
        def fail(data):
            raise ValueError(EVIL[0] + " " + EVIL[1])
        with self.assertLogs("lilota", "WARNING"):
            worker.run_pending()
        worker.storage.add_node(str(uuid.uuid4()), EVIL[0] + "<b>node</b>", lilota.NodeType.WORKER,
                                lilota.NodeStatus.RUNNING, 1, 30)
        server, _ = self.serve()
        for path, shown in ((f"/tasks/{task_id}", EVIL[1]), ("/", EVIL[1]), ("/tasks", EVIL[1]),
                            ("/nodes", EVIL[0] + "<b>node</b>")):
            page = self.open(server, path)
            page.wait_for_selector("main h1")
            page.wait_for_function("document.querySelectorAll('main table, main pre').length > 0")
            self.assertEqual(page.locator("main img, main script, main b").count(), 0, path)
            self.assertIn(shown, page.inner_text("main"), path)
        page = self.open(server, f"/tasks/{task_id}")
        page.wait_for_selector("#input")
        self.assertEqual(json.loads(page.inner_text("#input")), {"a": EVIL[0], "b": EVIL[1]})
        self.assertIn(f"ValueError: {EVIL[0]} {EVIL[1]}", page.inner_text("#error"))
        self.assertEqual(self.dialogs, [])

    def test_a_task_page_shows_attempts_steps_logs_and_dependencies(self):
        build, publish, other = self.run_with_details(self.app, log_lines=lilota._DASHBOARD_LOG_TAIL + 5)
        server, _ = self.serve()
        page = self.open(server, f"/tasks/{build}")
        page.wait_for_selector("#logs pre")
        self.assertIn("completed", page.text_content("#attempts tbody"))
        self.assertEqual(page.locator("#steps tbody tr").count(), 2)
        self.assertEqual(json.loads(page.inner_text("#steps tr[data-step='part#2'] pre")), {"part": 1, "rows": [1, 2]})
        log = page.inner_text("#logs pre")
        self.assertIn("built " + EVIL[0], log)           # the markup, as text
        self.assertEqual(page.locator("#logs [data-seq]").count(), lilota._DASHBOARD_LOG_TAIL)
        self.assertEqual(page.locator("main script").count(), 0)
        page.click("#logs button:has-text('Show all')")   # every record, through /logs?after=
        wait_until(lambda: page.locator("#logs [data-seq]").count() == lilota._DASHBOARD_LOG_TAIL + 5, 20,
                   message="every log record shown")
        self.assertIn("line 0", page.inner_text("#logs pre"))
        page = self.open(server, f"/tasks/{publish}")
        page.wait_for_selector("#dependencies tbody tr")
        self.assertIn("1 of 2 open", page.inner_text("#dependencies"))
        page.click(f"#dependencies a:has-text('{build}')")
        page.wait_for_selector("#steps")
        self.assertEqual(self.dialogs, [])

    def test_show_all_follows_the_log_of_a_running_task(self):
        script = self.worker_script("""
            @worker.register("chatty", timeout=None)
            def chatty(data, ctx: TaskContext):
                for line in range(data["lines"]):
                    ctx.logger.info("line %d", line)
                    if line >= 110:
                        time.sleep(0.1)
        """)
        self.start_lilota(script, number_of_workers=1)
        task_id = self.app.schedule("chatty", {"lines": 400})
        wait_until(lambda: len(self.app.get_task_logs(task_id)) > 110, 30, message="the first records stored")
        server, _ = self.serve()
        page = self.open(server, f"/tasks/{task_id}")
        page.click("#logs button:has-text('Show all')")
        page.wait_for_selector("#logs [data-seq='1']")
        self.assertIn("following", page.inner_text("#logs"))
        shown = page.locator("#logs [data-seq]").count()
        self.assertGreater(shown, lilota._DASHBOARD_LOG_TAIL)
        wait_until(lambda: page.locator("#logs [data-seq]").count() > shown + 5, 20, message="new records followed")
        seqs = [int(s) for s in page.eval_on_selector_all("#logs [data-seq]", "els => els.map(e => e.dataset.seq)")]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)), "each record once, in order")
        self.app.cancel(task_id)

    def test_a_wrong_token_shows_nothing_and_the_login_form_lets_in(self):
        self.app.schedule("secret_task_name", {"card": "4111"})
        server, _ = self.serve(token="correct-horse")
        context = self.browser.new_context(extra_http_headers={"Authorization": "Bearer wrong-horse"})
        self.addCleanup(context.close)
        page = self.open(server, "/tasks", context)
        page.wait_for_selector("form[action='/login']")
        self.assertNotIn("secret_task_name", page.content())
        context = self.browser.new_context()
        self.addCleanup(context.close)
        page = self.open(server, "/", context)
        page.fill("input[name=token]", "wrong-horse")
        page.click("button:has-text('Log in')")
        page.wait_for_selector("text=Wrong token.")
        self.assertNotIn("secret_task_name", page.content())
        page.fill("input[name=token]", "correct-horse")
        page.click("button:has-text('Log in')")
        page.wait_for_selector("#counts [data-status=scheduled] .n")
        self.assertIn("secret_task_name", page.inner_text("main"))

    def test_an_unreachable_database_is_said_and_the_last_data_kept(self):
        self.app.schedule_many("send", [1, 2])
        server, _ = self.serve()
        page = self.open(server, "/")
        page.wait_for_selector("#counts [data-status=scheduled] .n")
        with mock.patch.object(lilota.Storage, "activity",
                               side_effect=lilota.DatabaseUnavailableError("connection refused")):
            page.wait_for_selector("#notice:not([hidden])")
            self.assertIn("cannot be reached", page.inner_text("#notice"))
            self.assertEqual(page.inner_text("#counts [data-status=scheduled] .n"), "2")
        page.wait_for_selector("#notice", state="hidden")


if __name__ == "__main__":
    unittest.main()
