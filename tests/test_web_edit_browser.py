"""The configuration editor in headless Chromium, against a real manager and two libmilter children."""

import os

from twisted.trial.unittest import TestCase

from miltermanager.web.auth import add_user

from .browser import start_browser
from .test_log_analyzer import png_pixels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """\
load("applicable-conditions/*.conf")
manager.connection_spec = "{spec}"
manager.custom_configuration_directory = "{dir}/custom"
web.connection_spec = "inet:%(web)d@[127.0.0.1]"
web.password_file = "{dir}/passwd"
# Until the service starts no controller socket for a Controller the web alone asked for.
controller.connection_spec = "inet:%(controller)d@[127.0.0.1]"
with define_milter("alpha") as milter:
    milter.connection_spec = "%(alpha)s"
with define_milter("rejecter") as milter:
    milter.connection_spec = "%(rejecter)s"
"""


class EditInBrowserTests(TestCase):
    """Log in, change the children in the page, and see the mail follow."""

    timeout = 240

    def setUp(self):
        from tests.peers.fixtures import (
            LibmilterMilter, MiltermanagerProcess, free_port, wait_for_port)

        directory = os.path.realpath(os.path.abspath(self.mktemp()))
        os.makedirs(directory)
        add_user(os.path.join(directory, "passwd"), "admin", "admin-password", "admin")
        self.alpha = LibmilterMilter(directory, "alpha", "--no-add-header")
        self.rejecter = LibmilterMilter(directory, "rejecter", "--reject-subject", "SPAM",
                                        "--no-add-header")
        for child in (self.alpha, self.rejecter):
            child.start()
            self.addCleanup(child.stop)
        web = free_port()
        self.manager = MiltermanagerProcess(directory, CONFIG % {
            "web": web, "controller": free_port(), "alpha": self.alpha.spec, "rejecter": self.rejecter.spec})
        self.manager.start()
        self.addCleanup(self.manager.stop)
        wait_for_port(web, 30, self.manager.process)
        self.custom = os.path.join(self.manager.dir, "custom", "milter-manager.custom.conf")
        self.browser = start_browser(self, f"http://127.0.0.1:{web}")
        self.browser.login("admin", "admin-password")

    def send(self, *argv):
        from tests.peers.fixtures import send_with_test_server

        return send_with_test_server(self.manager.spec, *argv).split(" [")[0]

    def screenshot(self, name):
        path = self.browser.screenshot(name)
        self.assertGreater(len(png_pixels(path)), 4, f"{path} looks blank")
        return path

    def open_milter(self, name):
        self.browser.get(f"/edit/milter/{name}")
        self.browser.wait_for(lambda driver: self.browser.find_all("form.milter"))

    def set_checkbox(self, name, on):
        box = self.browser.find(f"form.milter input[name={name}]")
        if box.is_selected() != on:
            box.click()

    def submit_and_confirm(self, screenshot=None):
        self.browser.find("form.milter button[type=submit]").click()
        self.browser.wait_for(lambda driver: self.browser.find_all("form.confirm"),
                              message=self.browser.driver.page_source[:2000])
        if screenshot:
            self.screenshot(screenshot)
        self.browser.find("form.confirm button[type=submit]").click()
        self.browser.wait_for(lambda driver: self.browser.find_all(".success, .error"))
        self.assertTrue(self.browser.find_all(".success"), self.browser.driver.page_source)

    def read(self):
        with open(self.custom, "rb") as file:
            return file.read()

    def test_disable_child_and_evaluation_mode(self):
        """Disabled in the page: not contacted; evaluation mode: its reject no longer rejects."""
        self.assertEqual(self.send("-h", "Subject:SPAM here"), "status: reject")
        self.open_milter("alpha")
        self.screenshot("edit-form")
        self.set_checkbox("enabled", False)
        self.submit_and_confirm("edit-diff")
        self.assertIn(b"milter.enabled = False", self.read())
        alpha_before = len(self.alpha.events())
        rejecter_before = len(self.rejecter.events())
        self.assertEqual(self.send(), "status: pass")
        self.assertEqual(self.alpha.events()[alpha_before:], [])
        self.assertIn("eom", [event["event"] for event in
                              self.rejecter.events()[rejecter_before:]])

        self.open_milter("rejecter")
        self.set_checkbox("evaluation_mode", True)
        self.submit_and_confirm()
        rejecter_before = len(self.rejecter.events())
        # The rejecter still runs and rejects, but only in the log: the message goes through
        # (accept: it was the only child left).
        self.assertIn(self.send("-h", "Subject:SPAM here"), ("status: pass", "status: accept"))
        self.assertIn("eom", [event["event"] for event in
                              self.rejecter.events()[rejecter_before:]])

    def test_error_beside_field_and_undo(self):
        """A bad timeout is shown beside its field and not written; undo restores the file."""
        self.open_milter("alpha")
        field = self.browser.find("form.milter input[name=reading_timeout]")
        field.clear()
        field.send_keys("abc")
        self.browser.find("form.milter button[type=submit]").click()
        self.browser.wait_for(lambda driver: self.browser.find_all(".field-error"))
        errors = self.browser.find_all("#row-reading_timeout .field-error")
        self.assertEqual(len(errors), 1)
        self.assertIn("must be a number of seconds", errors[0].text)
        self.screenshot("edit-error")
        self.assertFalse(os.path.exists(self.custom))

        self.open_milter("alpha")
        self.set_checkbox("evaluation_mode", True)
        self.submit_and_confirm()
        first = self.read()
        self.open_milter("rejecter")
        self.set_checkbox("enabled", False)
        self.submit_and_confirm()
        self.assertNotEqual(self.read(), first)

        self.browser.get("/edit/history")
        rows = self.browser.find_all("table.history tbody tr")
        self.assertEqual(len(rows), 2)
        self.screenshot("edit-history")
        rows[0].find_element("css selector", "form.undo button").click()
        self.browser.wait_for(lambda driver: self.browser.find_all("form.confirm"))
        self.assertIn("-    milter.enabled = False", self.browser.find("pre.diff").text)
        self.browser.find("form.confirm button[type=submit]").click()
        self.browser.wait_for(lambda driver: self.browser.find_all(".success, .error"))
        self.assertTrue(self.browser.find_all(".success"), self.browser.driver.page_source)
        self.assertEqual(self.read(), first)
        # The rejecter runs again: its reject rejects.
        self.assertEqual(self.send("-h", "Subject:SPAM here"), "status: reject")
