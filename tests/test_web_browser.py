"""The pages that show in a real browser: a manager process, a libmilter child, Chromium."""

import os
import shutil
import tempfile

from twisted.trial import unittest

from miltermanager.web import auth
from tests.browser import start_browser
from tests.test_log_analyzer import png_pixels

PASSWORD = "browser test password"
CONFIG = """\
manager.connection_spec = "{spec}"
web.connection_spec = "inet:%(web)d@[127.0.0.1]"
web.password_file = "%(users)s"
controller.connection_spec = "unix:%(control)s/controller.sock"
log.use_syslog = False

with define_milter("lm") as milter:
    milter.connection_spec = "%(lm)s"
"""
# The verdict colours of style.css as png_pixels gives them (RGB bytes).
REJECT = bytes((0xd6, 0x28, 0x28))
CONTINUE = bytes((0x3a, 0x86, 0xff))


class BrowserTests(unittest.TestCase):
    """Known mail through a real manager, watched on its dashboard and sessions page."""

    def setUp(self):
        from tests.peers.fixtures import LibmilterMilter, MiltermanagerProcess, free_port

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # Short: the controller's UNIX socket path holds at most 107 bytes.
        control = tempfile.mkdtemp(prefix="mm-webb-")
        self.addCleanup(shutil.rmtree, control, True)
        users = os.path.join(directory, "users")
        auth.add_user(users, "admin", PASSWORD, "admin")
        self.lm = LibmilterMilter(directory, "lm", "--reject-subject", "SPAM", "--no-add-header")
        self.lm.start()
        self.addCleanup(self.lm.stop)
        self.web_port = free_port()
        self.manager = MiltermanagerProcess(directory, CONFIG % {
            "web": self.web_port, "users": users, "control": control, "lm": self.lm.spec})
        self.manager.start()
        self.addCleanup(self.manager.stop)
        self.browser = start_browser(self, f"http://127.0.0.1:{self.web_port}")

    def send(self, *argv):
        from tests.peers.fixtures import send_with_test_server

        return send_with_test_server(self.manager.spec, *argv)

    def text(self, css):
        return self.browser.find(css).text.strip()

    def test_dashboard_live_and_sessions(self):
        """Mail shows on the dashboard without a reload, then in the sessions list and its trace."""
        browser = self.browser
        browser.login("admin", PASSWORD)
        browser.get("/")
        browser.wait_for(lambda d: int(self.browser.find("#dashboard")
                                       .get_attribute("data-updates") or 0) >= 1,
                         message="the dashboard never updated itself")
        loaded = browser.driver.execute_script("return window.milterManagerDashboard.loadedAt")
        before = int(self.text("#messages-total"))
        self.assertEqual(before, 0)
        self.assertEqual(self.text(".child-row[data-child=lm] .state"), "up")

        self.assertEqual(self.send("-f", "alice@example.org", "-r", "ok@example.org",
                                   "--envelope-from-macro", "i:QIDPASS1",
                                   "--end-of-message-macro", "i:QIDPASS1"), "status: pass")
        self.assertEqual(self.send("-f", "spammer@example.net", "-r", "ok@example.org",
                                   "-h", "Subject:SPAM here",
                                   "--envelope-from-macro", "i:QIDSPAM2",
                                   "--end-of-message-macro", "i:QIDSPAM2")
                         .split(" [")[0], "status: reject")

        def counted(driver):
            try:
                return (self.text("#messages-total"), self.text("#verdict-count-continue"),
                        self.text("#verdict-count-reject"), self.text("#messages-since-start"))
            except Exception:
                return None

        browser.wait_for(lambda d: counted(d) == (str(before + 2), "1", "1", "2"),
                         message=f"the dashboard shows {counted(None)}")
        row = ".child-row[data-child=lm]"
        browser.wait_for(lambda d: "reject 1" in self.text(row + " .replies"),
                         message=self.text(row))
        self.assertNotEqual(self.text(row + " .p50"), "\u2013")
        self.assertNotEqual(self.text(row + " .p99"), "\u2013")
        # No reload: the marker set when the page was loaded is the same, and the page was
        # reached by navigation (type 0), not by a reload (type 1).
        self.assertEqual(browser.driver.execute_script(
            "return window.milterManagerDashboard.loadedAt"), loaded)
        self.assertEqual(browser.driver.execute_script("return performance.navigation.type"), 0)
        browser.wait_for(lambda d: browser.find_all("#chart-svg rect.bar.v-reject")
                         and browser.find_all("#chart-svg rect.bar.v-continue"))
        colours = png_pixels(browser.screenshot("dashboard"))
        self.assertGreater(len(colours), 20)
        self.assertIn(REJECT, colours)
        self.assertIn(CONTINUE, colours)

        browser.get("/sessions")
        self.assertEqual([r.get_attribute("data-session") is not None
                          for r in browser.find_all("tr.session-row")], [True, True])
        self.assertEqual(self.text("tr.session-row .queue-id"), "QIDSPAM2")  # newest first
        search = browser.find("#q")
        search.send_keys("spammer@")
        browser.find("form.search button[type=submit]").click()
        browser.wait_for(lambda d: "q=spammer" in d.current_url)
        rows = browser.find_all("tr.session-row")
        self.assertEqual(len(rows), 1)
        self.assertEqual(self.text("tr.session-row .sender"), "<spammer@example.net>")
        self.assertEqual(self.text("tr.session-row .verdict"), "reject")
        colours = png_pixels(browser.screenshot("sessions"))
        self.assertGreater(len(colours), 10)
        self.assertIn(REJECT, colours)

        browser.get("/sessions?q=qidpass1")
        self.assertEqual([self.text("tr.session-row .queue-id")], ["QIDPASS1"])
        browser.get("/sessions?q=QIDSPAM2")
        browser.find("tr.session-row a.trace-link").click()
        browser.wait_for(lambda d: "/sessions/" in d.current_url and "q=" not in d.current_url)
        self.assertEqual(browser.find("section.message").get_attribute("data-queue-id"),
                         "QIDSPAM2")
        self.assertEqual(self.text("section.message strong.verdict"), "reject")
        self.assertIn("lm", self.text("section.message table.decisions"))
        self.assertIn("decided by lm", self.text("section.message"))
        browser.screenshot("trace")

        browser.get("/configuration")
        self.assertEqual(self.text('#section-web tr[data-setting=connection_spec] .origin'),
                         f"{self.manager.config_path}:2")
        self.assertEqual(self.text('#section-web tr[data-setting=tls_key] .origin'), "default")
        browser.screenshot("configuration")
