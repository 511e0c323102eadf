"""The web's configuration editor: the custom file it writes, checks, versions, undo, its pages."""

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from miltermanager import config, service
from miltermanager.web import app as web_app
from miltermanager.web import auth, editing

from .peers.fixtures import TWISTD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """\
load("applicable-conditions/*.conf")
manager.connection_spec = "inet:0@[127.0.0.1]"
manager.custom_configuration_directory = "{dir}/custom"
web.connection_spec = "inet:0@[127.0.0.1]"
web.password_file = "{dir}/passwd"
web.custom_versions = {versions}
with define_milter("alpha") as milter:
    milter.connection_spec = "inet:10001@[127.0.0.1]"
with define_milter("beta") as milter:
    milter.connection_spec = "inet:10002@[127.0.0.1]"
    milter.applicable_conditions = ["S25R"]
with define_milter("gamma") as milter:
    milter.connection_spec = "inet:10003@[127.0.0.1]"
"""


class EditorTestsMixin:
    versions = 10

    def setUp(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="mm-edit-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "milter-manager.conf")
        with open(self.path, "w") as out:
            out.write(CONFIG.format(dir=self.dir, versions=self.versions))
        os.chmod(self.path, 0o600)
        auth.add_user(os.path.join(self.dir, "passwd"), "admin", "admin-password", "admin")
        auth.add_user(os.path.join(self.dir, "passwd"), "reader", "reader-password",
                      "read-only")
        self.reactor = MemoryReactorClock()
        self.service = self.make_service()
        self.editor = editing.Editor(self.service, self.reactor)
        self.custom = os.path.join(self.dir, "custom", "milter-manager.custom.conf")

    def load(self, custom=None):
        return config.load(self.path, load_paths=config.load_paths(), custom=custom)

    def make_service(self):
        return service.ManagerService(self.reactor, self.load(), load=self.load)

    def values(self, name, **changes):
        state, _, _ = self.editor.state()
        values = dict(state.milter(name))
        values.update(changes)
        return values

    def change(self, name, **changes):
        """Propose and confirm a change of child name; the apply's result."""
        proposal = self.editor.propose_milter("admin", self.editor.file_hash(), name,
                                              self.values(name, **changes))
        self.assertTrue(proposal.ok, (proposal.checked.errors, proposal.checked.general))
        return self.successResultOf(
            self.editor.apply("admin", proposal.pending.token, self.editor.file_hash()))

    def read(self):
        with open(self.custom, "rb") as file:
            return file.read()


class EditorTests(EditorTestsMixin, SynchronousTestCase):
    """Editor on a ManagerService whose load() reads real files."""

    def test_change_is_written_and_reloaded(self):
        """A confirmed change is in the custom file and in the running configuration."""
        self.assertIsNone(self.change("alpha", enabled=False, evaluation_mode=True,
                                      reading_timeout=12))
        alpha = self.service.configuration.milter("alpha")
        self.assertEqual((alpha.enabled, alpha.evaluation_mode, alpha.reading_timeout),
                         (False, True, 12.0))
        self.assertTrue(alpha.origins["enabled"].startswith(self.custom + ":"))
        text = self.read().decode("utf-8")
        self.assertTrue(text.startswith(editing.HEADER))
        self.assertIn("milter.enabled = False", text)
        self.assertNotIn("connection_spec", text)  # only what differs from the main files

    def test_child_order_is_kept(self):
        """Changing the first child leaves the children in their order."""
        self.change("alpha", fallback_status="reject")
        self.assertEqual([milter.name for milter in self.service.configuration.milters],
                         ["alpha", "beta", "gamma"])

    def test_value_set_back_leaves_no_file(self):
        """A value put back to the main files' leaves nothing to write: no custom file."""
        self.change("gamma", enabled=False)
        self.assertTrue(os.path.exists(self.custom))
        self.change("gamma", enabled=True)
        self.assertFalse(os.path.exists(self.custom))

    def test_file_mode_and_no_leftovers(self):
        """The file is written mode 0600 and no temporary file stays beside it."""
        self.change("beta", description="the spam checker")
        self.assertEqual(os.stat(self.custom).st_mode & 0o777, 0o600)
        leftovers = [name for name in os.listdir(os.path.dirname(self.custom))
                     if name.startswith(".")]
        self.assertEqual(leftovers, [])

    def test_errors_map_to_fields(self):
        """Each bad value's error comes back with the field whose line the loader refused."""
        proposal = self.editor.propose_milter(
            "admin", self.editor.file_hash(), "beta",
            self.values("beta", reading_timeout="abc", connection_spec="bogus:1",
                        fallback_status="maybe"))
        self.assertFalse(proposal.ok)
        errors = proposal.checked.of("beta")
        self.assertEqual(sorted(errors), ["connection_spec", "fallback_status", "reading_timeout"])
        self.assertIn("must be a number of seconds greater than 0; got 'abc'",
                      errors["reading_timeout"][0])
        self.assertIn("unknown type 'bogus'", errors["connection_spec"][0])
        self.assertIsNone(proposal.pending)
        self.assertFalse(os.path.exists(self.custom))

    def test_unknown_condition_maps_to_its_field(self):
        """A condition no file defines is refused beside applicable_conditions."""
        proposal = self.editor.propose_milter(
            "admin", self.editor.file_hash(), "alpha",
            self.values("alpha", applicable_conditions=["No Such Condition"]))
        self.assertIn("no condition 'No Such Condition'",
                      proposal.checked.of("alpha")["applicable_conditions"][0])

    def test_list_errors_map_to_fields(self):
        """A bad CIDR and a bad expression are refused beside their lists."""
        proposal = self.editor.propose_lists(
            "admin", self.editor.file_hash(), "bl.example 300.0.0.1", "/(unclosed/", None, None)
        errors = proposal.checked.of(editing.LISTS)
        self.assertEqual(sorted(errors), ["dnsbl_services", "trust_domains"])
        self.assertFalse(os.path.exists(self.custom))

    def test_lists_are_written(self):
        """The helpers' lists set in the page are those of the reloaded configuration."""
        proposal = self.editor.propose_lists(
            "admin", self.editor.file_hash(), "bl.example 127.0.0.2/32\n",
            "example.com\n/\\.example\\.org$/\n", ".friendly.example\n", "/^bot/\n")
        self.assertTrue(proposal.ok, proposal.checked.errors)
        self.successResultOf(self.editor.apply("admin", proposal.pending.token,
                                               self.editor.file_hash()))
        running = self.service.configuration
        self.assertEqual([each.domain for each in running.dnsbl.services], ["bl.example"])
        self.assertTrue(running.trust.trusted("<a@example.com>"))
        self.assertTrue(running.trust.trusted("<a@mail.example.org>"))
        self.assertFalse(running.trust.trusted("<a@gmail.com>"))
        self.assertTrue(running.s25r.whitelisted("mx.friendly.example"))
        self.assertTrue(running.s25r.blacklisted("bot7.example.net"))
        state, _, _ = self.editor.state()
        self.assertEqual(editing.list_text(state.s25r_whitelist), ".friendly.example\n")

    def test_add_and_remove_child(self):
        """A child added in the page runs after the others; removing it leaves no file."""
        values = dict(self.values("alpha"), connection_spec="inet:10004@[127.0.0.1]")
        proposal = self.editor.propose_milter("admin", self.editor.file_hash(), "delta",
                                              values, new=True)
        self.successResultOf(self.editor.apply("admin", proposal.pending.token,
                                               self.editor.file_hash()))
        self.assertEqual([milter.name for milter in self.service.configuration.milters],
                         ["alpha", "beta", "gamma", "delta"])
        proposal = self.editor.propose_removal("admin", self.editor.file_hash(), "delta")
        self.successResultOf(self.editor.apply("admin", proposal.pending.token,
                                               self.editor.file_hash()))
        self.assertIsNone(self.service.configuration.milter("delta"))
        self.assertFalse(os.path.exists(self.custom))

    def test_remove_main_files_child(self):
        """Removing a child of the main files writes remove_milter and it is gone."""
        proposal = self.editor.propose_removal("admin", self.editor.file_hash(), "beta")
        self.assertIn("+remove_milter('beta')", proposal.diff)
        self.successResultOf(self.editor.apply("admin", proposal.pending.token,
                                               self.editor.file_hash()))
        self.assertEqual([milter.name for milter in self.service.configuration.milters],
                         ["alpha", "gamma"])

    def test_new_child_name_taken(self):
        """A new child with an existing name is refused beside the name."""
        proposal = self.editor.propose_milter("admin", self.editor.file_hash(), "alpha",
                                              self.values("alpha"), new=True)
        self.assertIn("already", proposal.checked.of("alpha")["name"][0])

    def test_diff_shows_the_change(self):
        """The proposal carries the unified diff of the file now and the candidate."""
        proposal = self.editor.propose_milter("admin", self.editor.file_hash(), "alpha",
                                              self.values("alpha", enabled=False))
        self.assertIn("+++ milter-manager.custom.conf (new)", proposal.diff)
        self.assertIn("+    milter.enabled = False", proposal.diff)
        self.assertFalse(os.path.exists(self.custom))  # nothing written before confirming

    def test_conflict_at_confirm_leaves_file(self):
        """A file edited by hand between the diff and the confirmation is not overwritten."""
        self.change("alpha", enabled=False)
        page_hash = self.editor.file_hash()
        proposal = self.editor.propose_milter("admin", page_hash, "beta",
                                              self.values("beta", enabled=False))
        with open(self.custom, "a") as out:
            out.write("# a hand edit\n")
        edited = self.read()
        failure = self.failureResultOf(
            self.editor.apply("admin", proposal.pending.token, page_hash), editing.EditRefused)
        self.assertIn("was changed outside the web page since you loaded it",
                      failure.getErrorMessage())
        self.assertEqual(self.read(), edited)

    def test_conflict_at_propose(self):
        """A form made before a hand edit is refused at once."""
        page_hash = self.editor.file_hash()
        with open(self.custom if os.path.isdir(os.path.dirname(self.custom)) else
                  self._make_custom(), "w") as out:
            out.write("# by hand\n")
        self.assertRaises(editing.EditRefused, self.editor.propose_milter, "admin", page_hash,
                          "alpha", self.values("alpha", enabled=False))
        self.assertEqual(self.read(), b"# by hand\n")

    def _make_custom(self):
        os.makedirs(os.path.dirname(self.custom), mode=0o700)
        return self.custom

    def test_token_is_the_users(self):
        """Another user cannot confirm a change they did not make."""
        proposal = self.editor.propose_milter("admin", self.editor.file_hash(), "alpha",
                                              self.values("alpha", enabled=False))
        self.failureResultOf(self.editor.apply("mallory", proposal.pending.token,
                                               self.editor.file_hash()), editing.EditRefused)
        self.assertFalse(os.path.exists(self.custom))

    def test_undo_restores_byte_for_byte(self):
        """Undo puts the kept version back exactly, and the running configuration follows."""
        self.change("alpha", enabled=False)
        first = self.read()
        self.change("beta", evaluation_mode=True)
        versions = self.editor.versions()
        self.assertEqual([entry["user"] for entry in versions], ["admin", "admin"])
        proposal = self.editor.propose_undo("admin", self.editor.file_hash(), versions[0]["id"])
        self.assertIn("-    milter.evaluation_mode = True", proposal.diff)
        self.successResultOf(self.editor.apply("admin", proposal.pending.token,
                                               self.editor.file_hash()))
        self.assertEqual(self.read(), first)
        self.assertFalse(self.service.configuration.milter("beta").evaluation_mode)
        # The oldest version is "no file": undoing to it removes the file.
        proposal = self.editor.propose_undo("admin", self.editor.file_hash(), versions[1]["id"])
        self.successResultOf(self.editor.apply("admin", proposal.pending.token,
                                               self.editor.file_hash()))
        self.assertFalse(os.path.exists(self.custom))
        self.assertTrue(self.service.configuration.milter("alpha").enabled)

    def test_reload_failure_puts_previous_file_back(self):
        """A change whose reload fails is undone: the previous file is back, no version kept."""
        self.change("alpha", enabled=False)
        before = self.read()
        proposal = self.editor.propose_milter("admin", self.editor.file_hash(), "gamma",
                                              self.values("gamma", enabled=False))
        with open(self.path, "a") as out:
            out.write("this is not python\n")  # the main file breaks meanwhile
        problem = self.successResultOf(self.editor.apply("admin", proposal.pending.token,
                                                         self.editor.file_hash()))
        self.assertIn("reload failed", problem)
        self.assertIn("previous milter-manager.custom.conf is back", problem)
        self.assertEqual(self.read(), before)
        self.assertEqual(len(self.editor.versions()), 1)

    def test_change_survives_restart(self):
        """A new service loading the same files runs with the change."""
        self.change("gamma", evaluation_mode=True, fallback_status="temporary-failure")
        restarted = self.make_service()
        gamma = restarted.configuration.milter("gamma")
        self.assertTrue(gamma.evaluation_mode)
        self.assertEqual(gamma.fallback_status.label, "temporary-failure")

    def test_check_config_accepts_the_file(self):
        """twistd milter-manager --check-config loads the written file; --show-config shows it."""
        self.change("alpha", enabled=False, writing_timeout=3.5)
        environment = dict(os.environ, PYTHONPATH=REPO)
        command = [sys.executable, "-c", TWISTD, "milter-manager", "--config", self.path]
        checked = subprocess.run([*command, "--check-config"], capture_output=True, text=True,
                                 env=environment, cwd=self.dir, timeout=60)
        self.assertEqual(checked.returncode, 0, checked.stderr)
        shown = subprocess.run([*command, "--show-config"], capture_output=True, text=True,
                               env=environment, cwd=self.dir, timeout=60)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        alpha = shown.stdout[shown.stdout.index('define_milter("alpha")'):]
        self.assertRegex(alpha, r"milter.enabled = False  # .*milter-manager.custom.conf:\d+")
        self.assertRegex(alpha, r"milter.writing_timeout = 3.5  # .*custom.conf:\d+")


class VersionLimitTests(EditorTestsMixin, SynchronousTestCase):
    """web.custom_versions bounds the versions kept."""

    versions = 2

    def test_versions_bounded(self):
        """After four changes only the last two earlier files are kept, on disk too."""
        for timeout in (11, 12, 13, 14):
            self.change("alpha", reading_timeout=timeout)
        versions = self.editor.versions()
        self.assertEqual(len(versions), 2)
        kept = sorted(os.listdir(self.editor.versions_directory))
        self.assertEqual(kept, sorted([f"{entry['id']}.conf" for entry in versions]
                                      + ["index.json"]))
        self.assertIn(b"milter.reading_timeout = 13",
                      open(os.path.join(self.editor.versions_directory,
                                        f"{versions[0]['id']}.conf"), "rb").read())


class PageTests(EditorTestsMixin, SynchronousTestCase):
    """The /edit pages rendered through the guard, with DummyRequest."""

    def setUp(self):
        super().setUp()
        self.app = web_app.WebApp(self.service, self.reactor)
        self.root = self.app.root()

    def request(self, path, user="admin", method=b"GET", args=None, csrf=True):
        role, _ = self.app.auth.users()[user]
        session = self.app.auth.log_in(auth.User(user, role))
        request = DummyRequest([part.encode("utf-8") for part in path.lstrip("/").split("/")])
        request.uri = request.path = path.encode("utf-8")
        request.method = method
        cookies = {auth.COOKIE: session.encode("ascii")}
        request.getCookie = cookies.get
        request.isSecure = lambda: False  # (DummyRequest has none; the guard asks)
        for key, value in (args or {}).items():
            request.args[key.encode()] = [item if isinstance(item, bytes) else item.encode()
                                          for item in (value if isinstance(value, list)
                                                       else [value])]
        if csrf and method == b"POST":
            request.args[b"csrf"] = [self.app.auth.login_of(session).csrf.encode()]
        return request

    def render(self, request):
        from twisted.web.resource import getChildForRequest

        resource = getChildForRequest(self.root, request)
        body = resource.render(request)
        if isinstance(body, bytes):
            request.write(body)
            request.finish()
        return b"".join(request.written).decode("utf-8")

    def form(self, name, **changes):
        values = self.values(name, **changes)
        args = {"file_sha256": self.editor.file_hash()}
        for field, value in values.items():
            if field in editing.BOOLEAN_FIELDS:
                if value:
                    args[field] = "on"
            elif field == "applicable_conditions":
                args[field] = list(value)
            else:
                args[field] = "" if value is None else str(value)
        return args

    def test_overview_lists_children(self):
        """/edit shows every child with a link to its form."""
        body = self.render(self.request("/edit"))
        for name in ("alpha", "beta", "gamma"):
            self.assertIn(f'href="/edit/milter/{name}"', body)

    def test_read_only_sees_disabled_form(self):
        """A read-only user's form is disabled and has no submit button."""
        body = self.render(self.request("/edit/milter/alpha", user="reader"))
        self.assertIn("<fieldset disabled>", body)
        self.assertNotIn("Check and show the change", body)

    def test_read_only_post_refused(self):
        """A read-only user's POST is refused and nothing is written."""
        request = self.request("/edit/milter/alpha", user="reader", method=b"POST",
                               args=self.form("alpha", enabled=False))
        self.render(request)
        self.assertEqual(request.responseCode, 403)
        self.assertFalse(os.path.exists(self.custom))

    def test_error_beside_field(self):
        """A bad timeout comes back as a field-error inside the field's row; 400."""
        request = self.request("/edit/milter/alpha", method=b"POST",
                               args=self.form("alpha", reading_timeout="abc"))
        body = self.render(request)
        self.assertEqual(request.responseCode, 400)
        row = body[body.index('id="row-reading_timeout"'):]
        row = row[:row.index("</div>")]
        self.assertIn('class="field-error"', row)
        self.assertIn("got &#x27;abc&#x27;", row)
        self.assertFalse(os.path.exists(self.custom))

    def test_diff_then_confirm(self):
        """A good form shows the diff; confirming writes it."""
        body = self.render(self.request("/edit/milter/alpha", method=b"POST",
                                        args=self.form("alpha", enabled=False)))
        self.assertIn('<span class="add">+    milter.enabled = False</span>', body)
        token = body.split('name="token" value="')[1].split('"')[0]
        request = self.request("/edit/confirm", method=b"POST",
                               args={"token": token, "file_sha256": self.editor.file_hash()})
        body = self.render(request)
        self.assertIn("written and in use", body)
        self.assertFalse(self.service.configuration.milter("alpha").enabled)

    def test_bad_utf8_is_400(self):
        """A form field that is not UTF-8 gets a 400 page, not a traceback."""
        args = self.form("alpha")
        args["connection_spec"] = b"\xff\xfe"
        request = self.request("/edit/milter/alpha", method=b"POST", args=args)
        body = self.render(request)
        self.assertEqual(request.responseCode, 400)
        self.assertIn("not UTF-8", body)

    def test_unknown_child_is_clear(self):
        """A child that does not exist gets a clear 409 page."""
        request = self.request("/edit/milter/nobody")
        body = self.render(request)
        self.assertEqual(request.responseCode, 409)
        self.assertIn("there is no child milter", body)

    def test_undo_bad_version_is_400(self):
        """A version that is not a number gets a 400 page."""
        request = self.request("/edit/undo", method=b"POST",
                               args={"version": "x'", "file_sha256": "absent"})
        self.render(request)
        self.assertEqual(request.responseCode, 400)

    def test_values_are_escaped(self):
        """A description with markup is shown escaped in the form."""
        self.change("alpha", description='<script>alert("x")</script>')
        body = self.render(self.request("/edit/milter/alpha"))
        self.assertNotIn("<script>alert", body)
        self.assertIn("&lt;script&gt;", body)
