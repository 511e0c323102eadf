"""The pages that show, through a real listening site: dashboard, sessions, trace, configuration."""

import json
import os
import re
import shutil
import tempfile
from io import BytesIO
from urllib.parse import urlencode

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from miltermanager import config, service, stages
from miltermanager.events import ChildReplied, MessageEnded, SessionEnded, SessionStarted
from miltermanager.merge import Status
from miltermanager.web import auth
from tests.peers.fixtures import free_port

PASSWORD = "correct horse battery"
LDAP_SECRET = "ldap-s3cret-never-shown"

CONFIG = """\
manager.connection_spec = "inet:0@[127.0.0.1]"
web.connection_spec = "inet:{port}@[127.0.0.1]"
web.password_file = "{dir}/users"
web.session_timeout = 900
controller.trace_sessions = 50
controller.connection_spec = "unix:{dir}/controller.sock"
ldap.bind_password_file = "{dir}/ldap-password"

with define_milter("alpha") as milter:
    milter.connection_spec = "inet:1@[127.0.0.1]"
    milter.evaluation_mode = True

with define_applicable_condition("Quiet") as condition:
    condition.description = "never stops"
    @condition.define_envelope_from_stopper
    def never(context, sender):
        return False
"""


class PagesTests(TestCase):
    """A ManagerService with the web pages on a free port, asked by an HTTP client."""

    @defer.inlineCallbacks
    def setUp(self):
        # Short: the controller's UNIX socket path holds at most 107 bytes.
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="mm-web-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = free_port()
        self.path = os.path.join(self.dir, "milter-manager.conf")
        with open(self.path, "w") as out:
            out.write(CONFIG.format(port=self.port, dir=self.dir))
        os.chmod(self.path, 0o600)
        with open(os.path.join(self.dir, "ldap-password"), "w") as out:
            out.write(LDAP_SECRET + "\n")
        auth.add_user(os.path.join(self.dir, "users"), "admin", PASSWORD, "admin")
        made = service.ManagerService(reactor, config.load(self.path),
                                      load=lambda: config.load(self.path))
        made.privilegedStartService()
        self.addCleanup(made.stopService)
        self.service = made
        self.agent = Agent(reactor)
        code, headers, _ = yield self.fetch("/login", b"POST",
                                            {"user": "admin", "password": PASSWORD}, login=False)
        self.assertEqual(code, 303)
        cookie = headers.getRawHeaders(b"set-cookie")[0]
        self.cookie = cookie.split(b";")[0]

    @defer.inlineCallbacks
    def fetch(self, path, method=b"GET", form=None, login=True):
        headers = Headers()
        if login:
            headers.addRawHeader(b"cookie", self.cookie)
        body = None
        if form is not None:
            headers.addRawHeader(b"content-type", b"application/x-www-form-urlencoded")
            body = FileBodyProducer(BytesIO(urlencode(form).encode("ascii")))
        response = yield self.agent.request(
            method, f"http://127.0.0.1:{self.port}{path}".encode("ascii"), headers, body)
        content = yield readBody(response)
        return response.code, response.headers, content

    @defer.inlineCallbacks
    def page(self, path, code=200):
        got, headers, content = yield self.fetch(path)
        text = content.decode("utf-8")
        self.assertEqual(got, code, text[:2000])
        self.assertNotIn("Traceback", text)
        return text

    @defer.inlineCallbacks
    def api(self, path, code=200):
        got, headers, content = yield self.fetch(path)
        self.assertEqual(got, code, content[:2000])
        self.assertEqual(headers.getRawHeaders(b"content-type"),
                         [b"application/json; charset=utf-8"])
        return json.loads(content)

    def mail(self):
        """Two known sessions: one message passed (alpha's reject only evaluated), one rejected."""
        observer = self.service.factory.observer
        for number, verdict, status, queue_id, sender in (
                (1, Status.REJECT, Status.CONTINUE, "QID-ONE", "<alice@example.org>"),
                (2, Status.REJECT, Status.REJECT, "QID-TWO", "<bob@example.net>")):
            observer.session_started(SessionStarted(number, ("alpha",)))
            observer.child_replied(ChildReplied(number, "alpha", stages.CONNECT, None,
                                                Status.CONTINUE, Status.CONTINUE, 0.002))
            observer.child_replied(ChildReplied(number, "alpha", stages.END_OF_MESSAGE, None,
                                                status if status is Status.REJECT
                                                else Status.CONTINUE, verdict, 0.004))
            decided = "alpha" if status is Status.REJECT else None
            observer.message_ended(MessageEnded(
                number, stages.END_OF_MESSAGE, status, decided, False, 0.1, queue_id, None,
                "mx.example.net[192.0.2.1]", sender, 1))
            observer.session_ended(SessionEnded(number, stages.END_OF_MESSAGE, status, decided,
                                                1, 0.2))

    @defer.inlineCallbacks
    def test_dashboard_data(self):
        """/api/dashboard counts the known messages by verdict and alpha's replies and latency."""
        before = yield self.api("/api/dashboard")
        self.assertEqual(before["messages"], {"total": 0, "verdicts": {}})
        self.mail()
        data = yield self.api("/api/dashboard?range=hour")
        self.assertEqual(data["range"], "hour")
        self.assertEqual(data["minutes"], 60)
        self.assertEqual(data["messages"], {"total": 2, "verdicts": {"continue": 1, "reject": 1}})
        self.assertEqual(sum(data["series"]["reject"]), 1)
        self.assertEqual(data["series"]["continue"][-1], 1)
        self.assertEqual(len(data["series"]["continue"]), 60)
        self.assertEqual(data["totals"]["messages"], 2)
        self.assertEqual(data["totals"]["sessions"], 2)
        self.assertEqual(data["totals"]["in_flight"], 0)
        [alpha] = data["children"]
        self.assertEqual(alpha["name"], "alpha")
        self.assertEqual(alpha["state"], "up")
        self.assertEqual(alpha["failures_in_row"], 0)
        self.assertTrue(alpha["evaluation_mode"])
        self.assertRegex(alpha["since"], r"^\d{4}-\d\d-\d\dT")
        self.assertEqual(alpha["replies"], {"continue": 2, "reject": 2})
        self.assertEqual(alpha["samples"], 4)
        # two at 2 ms, two at 4 ms: p50 is 2 ms, p99 4 ms, each within the buckets' 15.5 %
        self.assertTrue(2 / 1.155 <= alpha["p50_ms"] <= 2 * 1.155, alpha)
        self.assertTrue(4 / 1.155 <= alpha["p99_ms"] <= 4 * 1.155, alpha)
        self.assertRegex(data["now"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
        self.assertIn("reject", data["verdicts"])
        day = yield self.api("/api/dashboard?range=day")
        self.assertEqual((day["minutes"], day["messages"]["total"]), (1440, 2))

    @defer.inlineCallbacks
    def test_dashboard_bad_range(self):
        """A range other than hour or day is a 400 with the reason, as JSON and as a page."""
        data = yield self.api("/api/dashboard?range=week", 400)
        self.assertIn("hour or day", data["error"])
        text = yield self.page("/?range=%ff", 400)
        self.assertIn("not UTF-8", text)
        missing = yield self.api("/api/nothing", 404)
        self.assertIn("/api/dashboard", missing["error"])

    @defer.inlineCallbacks
    def test_dashboard_page(self):
        """The dashboard shell shows the numbers of the moment and loads dashboard.js."""
        self.mail()
        text = yield self.page("/")
        self.assertIn('<span class="value" id="messages-total">2</span>', text)
        self.assertIn('<span class="count" id="verdict-count-reject">1</span>', text)
        self.assertIn('<tr class="child-row" data-child="alpha">', text)
        self.assertIn('<script src="/static/dashboard.js"></script>', text)
        self.assertNotIn("<script>", text)
        self.assertNotIn(" onclick=", text)
        code, headers, script = yield self.fetch("/static/dashboard.js")
        self.assertEqual(code, 200)
        self.assertIn(b"/api/dashboard", script)
        self.assertIn(b"javascript", headers.getRawHeaders(b"content-type")[0])

    @defer.inlineCallbacks
    def test_sessions_search(self):
        """The sessions page lists the messages newest first and filters them by the query."""
        self.mail()
        text = yield self.page("/sessions")
        self.assertEqual(re.findall(r'data-session="(\d+)"', text), ["2", "1"])
        self.assertIn('<a class="trace-link" href="/sessions/1">', text)
        # the sender is escaped, never raw HTML
        self.assertIn("&lt;alice@example.org&gt;", text)
        self.assertNotIn("<alice@example.org>", text)
        text = yield self.page("/sessions?q=BOB")
        self.assertEqual(re.findall(r'data-session="(\d+)"', text), ["2"])
        self.assertIn('value="BOB"', text)
        text = yield self.page("/sessions?q=" + "%3Cb%3E")
        self.assertIn('value="&lt;b&gt;"', text)
        self.assertEqual(re.findall(r'data-session="(\d+)"', text), [])
        data = yield self.api("/api/sessions?q=qid-one")
        self.assertEqual([m["queue_id"] for m in data["messages"]], ["QID-ONE"])
        self.assertEqual(data["messages"][0]["verdict"], "continue")
        self.assertEqual(data["kept"], 2)
        text = yield self.page("/sessions?q=%ff%fe", 400)
        self.assertIn("not UTF-8", text)
        text = yield self.page("/sessions?q=" + "x" * 300, 400)
        self.assertIn("at most 200", text)

    @defer.inlineCallbacks
    def test_trace_page(self):
        """/sessions/N shows the session's decisions; unknown is 404, not a number 400."""
        self.mail()
        text = yield self.page("/sessions/1")
        self.assertIn("QID-ONE", text)
        self.assertIn("evaluation mode", text)  # alpha's reject counted as continue
        self.assertIn("end-of-message", text)
        text = yield self.page("/sessions/2")
        self.assertIn("decided by alpha", text)
        text = yield self.page("/sessions/999", 404)
        self.assertIn("no longer kept", text)
        for bad in ("abc", "1x", "-1", "9" * 40, "1/extra", "%ff"):
            text = yield self.page(f"/sessions/{bad}", 400)
            self.assertIn("session number", text)

    @defer.inlineCallbacks
    def test_configuration_origins(self):
        """A value set in the file shows its FILE:LINE; one left alone shows default."""
        text = yield self.page("/configuration")
        row = re.search(r'<tr class="setting" data-setting="session_timeout">.*?</tr>', text)
        self.assertIn("<td class=\"value\">900</td>", row.group(0))
        self.assertIn(f'<td class="origin">{self.path}:4</td>', row.group(0))
        row = re.search(r'<tr class="setting" data-setting="custom_versions">.*?</tr>', text)
        self.assertIn('<td class="origin default">default</td>', row.group(0))
        self.assertIn(f"{self.path}:11", text)  # define_milter("alpha")
        self.assertIn('data-milter="alpha"', text)
        self.assertIn('data-condition="Quiet"', text)
        self.assertIn("envelope_from</code> stopper never", text)

    @defer.inlineCallbacks
    def test_configuration_no_secret(self):
        """Neither the LDAP password nor any password hash is ever on the page."""
        text = yield self.page("/configuration")
        self.assertIn("ldap-password", text)  # the file's name is not a secret
        self.assertNotIn(LDAP_SECRET, text)
        self.assertNotIn("scrypt$", text)
        with open(os.path.join(self.dir, "users")) as users:
            digest = users.read().split("$")[-1].strip()
        self.assertNotIn(digest, text)

    @defer.inlineCallbacks
    def test_login_required(self):
        """Without the cookie every page here redirects to the login page."""
        for path in ("/", "/api/dashboard", "/sessions", "/sessions/1", "/api/sessions",
                     "/configuration"):
            code, headers, _ = yield self.fetch(path, login=False)
            self.assertEqual((code, headers.getRawHeaders(b"location")), (303, [b"/login"]),
                             path)

    @defer.inlineCallbacks
    def test_static_files(self):
        """/static serves the package's files, with no directory listing and nothing outside."""
        code, headers, content = yield self.fetch("/static/style.css", login=False)
        self.assertEqual(code, 200)
        self.assertIn(b".v-reject", content)
        self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        for path in ("/static/", "/static", "/static/nothing.js", "/static/../pages.py",
                     "/static/%2e%2e/pages.py"):
            code, _, content = yield self.fetch(path, login=False)
            self.assertIn(code, (301, 302, 404), path)
            self.assertNotIn(b"def install", content)
            self.assertNotIn(b"dashboard.js", content)
